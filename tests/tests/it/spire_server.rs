//! SPIRE's own server (`spire-server` v1.13.3) with Lanyard's agent and CLI: the Lanyard agent
//! attests to it with a join token from `spire-server token generate`, authenticating it with
//! the bundle from `spire-server bundle show`, and serves workloads the entries created with
//! `spire-server entry create`, chaining to SPIRE's authorities; and the Lanyard admin CLI
//! (`--socket`) manages SPIRE's entries, agents, join tokens, bundle and federation
//! relationships, each effect checked with SPIRE's own CLI.

use std::time::SystemTime;

use lanyard_core::x509::verify_svid_chain;
use lanyard_e2e::spire::{LanyardAgent, SPIRE_TIMEOUT, SpireServer, pretty_field, spire_or_skip};
use lanyard_e2e::{
    CliOutput, TestDir, cli, current_uid, pem_certificates, poll, spiffe_id, trust_domain,
    uid_selector,
};

#[test]
fn lanyard_agent_attests_to_spire_server_and_serves_its_entries() {
    if spire_or_skip("lanyard_agent_attests_to_spire_server_and_serves_its_entries").is_none() {
        return;
    }
    let dir = TestDir::new();
    // A short agent SVID, so that the Lanyard agent renews it (RenewAgent) while the test runs.
    let spire = SpireServer::start_with(&dir.join("spire-server"), "agent_ttl = \"20s\"");
    let token = spire.generate_token();
    let agent_id = spiffe_id(&format!("/spire/agent/join_token/{token}"));
    let workload_id = spiffe_id("/e2e/lanyard-agent/workload");
    let selector = uid_selector(current_uid());
    spire.cli_ok(
        &["entry", "create"],
        &[
            "-parentID",
            &agent_id,
            "-spiffeID",
            &workload_id,
            "-selector",
            &selector,
        ],
    );

    let mut agent = LanyardAgent::start(
        &dir.join("agent"),
        &spire.address(),
        &spire.bundle_pem(),
        &token,
    );
    let svid = agent.wait_for_x509(&workload_id);
    let mut authorities = spire.bundle_der();
    let verified = verify_svid_chain(
        &svid.chain,
        &trust_domain(),
        &authorities,
        SystemTime::now(),
    )
    .unwrap_or_else(|e| panic!("the SVID does not verify against SPIRE's bundle: {e}"));
    assert_eq!(verified.spiffe_id().as_str(), workload_id);
    let mut served = svid.bundle.clone();
    served.sort();
    authorities.sort();
    assert_eq!(
        served, authorities,
        "the bundle the agent serves vs. SPIRE's"
    );

    // SPIRE lists the agent as attested with its join token.
    let listed = spire.cli_ok(&["agent", "list"], &[]);
    assert_eq!(
        pretty_field(&listed, "SPIFFE ID").as_deref(),
        Some(agent_id.as_str()),
        "{listed}"
    );

    // A JWT-SVID through the Lanyard agent, minted by SPIRE.
    let jwt = CliOutput::run(
        lanyard_e2e::lanyard()
            .args([
                "fetch",
                "jwt",
                "--audience",
                "e2e-spire-server",
                "--output",
                "json",
                "--socket",
            ])
            .arg(agent.socket_path()),
    );
    let jwt = jwt.json();
    let token_text = jwt["svids"][0]["svid"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {jwt}"));
    let spiffe_bundle = spire.cli_ok(&["bundle", "show"], &["-format", "spiffe"]);
    let bundle =
        lanyard_core::TrustBundle::from_jwks_json(trust_domain(), spiffe_bundle.as_bytes())
            .unwrap_or_else(|e| {
                panic!("SPIRE's SPIFFE bundle does not parse ({e}): {spiffe_bundle}")
            });
    let validated = lanyard_core::jwt::validate_jwt_svid_with_bundle(
        token_text,
        "e2e-spire-server",
        &bundle,
        SystemTime::now(),
    )
    .unwrap_or_else(|e| panic!("SPIRE's JWT-SVID does not validate: {e}"));
    assert_eq!(validated.spiffe_id.as_str(), workload_id);

    // An entry created while the agent runs reaches it through the sync.
    let second_id = spiffe_id("/e2e/lanyard-agent/second");
    spire.cli_ok(
        &["entry", "create"],
        &[
            "-parentID",
            &agent_id,
            "-spiffeID",
            &second_id,
            "-selector",
            &selector,
        ],
    );
    agent.wait_for_x509(&second_id);

    // RenewAgent: SPIRE makes the renewed SVID's serial current on its first use, and the
    // agent goes on syncing with it.
    let serial = |listed: &str| pretty_field(listed, "Serial number").unwrap_or_default();
    let first_serial = serial(&listed);
    poll(
        "the Lanyard agent to renew its SVID with SPIRE",
        SPIRE_TIMEOUT,
        || {
            let now = serial(&spire.cli_ok(&["agent", "list"], &[]));
            if now == first_serial {
                Err(format!("the serial is still {now}"))
            } else {
                Ok(())
            }
        },
    );
    let third_id = spiffe_id("/e2e/lanyard-agent/after-renewal");
    spire.cli_ok(
        &["entry", "create"],
        &[
            "-parentID",
            &agent_id,
            "-spiffeID",
            &third_id,
            "-selector",
            &selector,
        ],
    );
    agent.wait_for_x509(&third_id);

    // Banned by SPIRE: the agent's next call is denied with AGENT_BANNED and it stops.
    spire.cli_ok(&["agent", "ban"], &["-spiffeID", &agent_id]);
    let status = agent.process().wait_for_exit(SPIRE_TIMEOUT);
    assert!(!status.success(), "the agent exited with {status}");
    assert!(
        agent.process().log().contains("agent is banned"),
        "the agent did not report the ban:\n{}",
        agent.log_tail()
    );
}

/// `lanyard <args> --socket <SPIRE's admin socket>`.
fn lanyard_on(spire: &SpireServer, args: &[&str]) -> CliOutput {
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    all.push(std::ffi::OsStr::new("--socket"));
    all.push(spire.socket_path().as_os_str());
    cli(all)
}

fn lanyard_json(spire: &SpireServer, args: &[&str]) -> serde_json::Value {
    let mut with_output = args.to_vec();
    with_output.extend(["--output", "json"]);
    let output = lanyard_on(spire, &with_output);
    assert!(
        output.success(),
        "lanyard against spire-server failed: {output}\n{}",
        spire.log_tail()
    );
    output.json()
}

#[test]
fn lanyard_cli_administers_spire_server() {
    if spire_or_skip("lanyard_cli_administers_spire_server").is_none() {
        return;
    }
    let dir = TestDir::new();
    let spire = SpireServer::start(&dir.join("spire-server"));

    let health = lanyard_on(&spire, &["server", "healthcheck"]);
    assert!(health.success(), "{health}");

    // A join token from the Lanyard CLI attests a Lanyard agent to SPIRE.
    let token = lanyard_json(&spire, &["token", "generate", "--ttl", "600"]);
    let token = token["value"]
        .as_str()
        .unwrap_or_else(|| panic!("{token}"))
        .to_owned();
    let agent_id = spiffe_id(&format!("/spire/agent/join_token/{token}"));
    let selector = uid_selector(current_uid());
    let workload_id = spiffe_id("/e2e/lanyard-cli/workload");

    // entry create, as SPIRE sees it.
    let created = lanyard_json(
        &spire,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &workload_id,
            "--parent-id",
            &agent_id,
            "--selector",
            &selector,
            "--x509-svid-ttl",
            "300",
            "--hint",
            "lanyard-cli",
        ],
    );
    let result = &created["results"][0];
    assert_eq!(result["status"]["code"], 0, "{created}");
    let entry_id = result["entry"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{created}"))
        .to_owned();
    let shown = spire.cli_ok(&["entry", "show"], &["-entryID", &entry_id]);
    assert_eq!(
        pretty_field(&shown, "SPIFFE ID").as_deref(),
        Some(workload_id.as_str()),
        "{shown}"
    );
    assert_eq!(
        pretty_field(&shown, "Parent ID").as_deref(),
        Some(agent_id.as_str()),
        "{shown}"
    );
    assert_eq!(
        pretty_field(&shown, "X509-SVID TTL").as_deref(),
        Some("300"),
        "{shown}"
    );
    assert_eq!(
        pretty_field(&shown, "Hint").as_deref(),
        Some("lanyard-cli"),
        "{shown}"
    );
    assert_eq!(
        pretty_field(&shown, "Selector").as_deref(),
        Some(selector.as_str()),
        "{shown}"
    );

    // The agent attested with the Lanyard-generated token gets it.
    let mut agent = LanyardAgent::start(
        &dir.join("agent"),
        &spire.address(),
        &spire.bundle_pem(),
        &token,
    );
    let svid = agent.wait_for_x509(&workload_id);
    verify_svid_chain(
        &svid.chain,
        &trust_domain(),
        &spire.bundle_der(),
        SystemTime::now(),
    )
    .unwrap_or_else(|e| panic!("the SVID does not verify against SPIRE's bundle: {e}"));

    // entry show: all and filtered.
    let all = lanyard_json(&spire, &["entry", "show"]);
    let ids: Vec<&str> = all["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("{all}"))
        .iter()
        .filter_map(|entry| entry["id"].as_str())
        .collect();
    assert_eq!(ids, [entry_id.as_str()], "{all}");
    let by_id = lanyard_json(&spire, &["entry", "show", "--entry-id", &entry_id]);
    assert!(by_id.to_string().contains(&entry_id), "{by_id}");
    let by_selector = lanyard_json(&spire, &["entry", "show", "--selector", &selector]);
    assert!(by_selector.to_string().contains(&entry_id), "{by_selector}");
    let by_spiffe_id = lanyard_json(&spire, &["entry", "show", "--spiffe-id", &workload_id]);
    assert!(
        by_spiffe_id.to_string().contains(&entry_id),
        "{by_spiffe_id}"
    );

    // entry update: SPIRE sees the new TTL and a new revision.
    let updated = lanyard_json(
        &spire,
        &[
            "entry",
            "update",
            "--entry-id",
            &entry_id,
            "--x509-svid-ttl",
            "600",
        ],
    );
    assert_eq!(updated["results"][0]["status"]["code"], 0, "{updated}");
    let shown = spire.cli_ok(&["entry", "show"], &["-entryID", &entry_id]);
    assert_eq!(
        pretty_field(&shown, "X509-SVID TTL").as_deref(),
        Some("600"),
        "{shown}"
    );
    assert_eq!(
        pretty_field(&shown, "Revision").as_deref(),
        Some("1"),
        "{shown}"
    );
    assert_eq!(
        pretty_field(&shown, "Hint").as_deref(),
        Some("lanyard-cli"),
        "{shown}"
    );

    // bundle show: SPIRE's authorities.
    let pem = lanyard_on(&spire, &["bundle", "show"]);
    let mut from_lanyard = pem_certificates(pem.expect_success());
    let mut from_spire = spire.bundle_der();
    from_lanyard.sort();
    from_spire.sort();
    assert_eq!(
        from_lanyard, from_spire,
        "lanyard bundle show vs. spire-server bundle show"
    );

    // agent list/show/count/ban/evict.
    let agents = lanyard_json(&spire, &["agent", "list"]);
    assert_eq!(
        agents["agents"][0]["id"]["path"],
        format!("/spire/agent/join_token/{token}"),
        "{agents}"
    );
    let shown = lanyard_json(&spire, &["agent", "show", "--spiffe-id", &agent_id]);
    assert_eq!(shown["attestation_type"], "join_token", "{shown}");
    // SPIRE drops an --expires-before it cannot parse instead of refusing it, so these
    // counts show the filter arrives in a layout SPIRE reads.
    let before_attestation = lanyard_json(
        &spire,
        &["agent", "list", "--expires-before", "2001-01-01T00:00:00Z"],
    );
    assert_eq!(
        before_attestation["agents"],
        serde_json::json!([]),
        "{before_attestation}"
    );
    let far_future = lanyard_json(
        &spire,
        &["agent", "list", "--expires-before", "2999-01-01T00:00:00Z"],
    );
    assert_eq!(
        far_future["agents"].as_array().map(Vec::len),
        Some(1),
        "{far_future}"
    );
    let count = lanyard_on(&spire, &["agent", "count"]);
    assert!(
        count.expect_success().contains("1 attested agent"),
        "{count}"
    );
    let banned = lanyard_on(&spire, &["agent", "ban", "--spiffe-id", &agent_id]);
    assert!(banned.success(), "{banned}");
    let listed = spire.cli_ok(&["agent", "list"], &[]);
    assert_eq!(
        pretty_field(&listed, "Banned").as_deref(),
        Some("true"),
        "{listed}"
    );
    let evicted = lanyard_on(&spire, &["agent", "evict", "--spiffe-id", &agent_id]);
    assert!(evicted.success(), "{evicted}");
    let listed = spire.cli_ok(&["agent", "list"], &[]);
    assert!(listed.contains("No attested agents found"), "{listed}");
    drop(agent);

    // The admin client tells a SPIRE server from a Lanyard server once: reads of Lanyard's
    // governance records say what the server lacks, rather than failing on the wire.
    for command in [
        &["report", "exceptions"][..],
        &["report", "stale"][..],
        &["exception", "list"][..],
    ] {
        let refused = lanyard_on(&spire, command);
        assert!(!refused.success(), "{command:?}: {refused}");
        assert!(
            refused
                .stderr
                .contains("the server has no Lanyard governance services (is it a SPIRE server?)"),
            "{command:?}: {refused}"
        );
    }

    // entry delete.
    let deleted = lanyard_on(&spire, &["entry", "delete", "--entry-id", &entry_id]);
    assert!(deleted.success(), "{deleted}");
    let missing = spire.cli(&["entry", "show"], &["-entryID", &entry_id]);
    assert!(!missing.success(), "{missing}");
    assert!(missing.stderr.contains("NotFound"), "{missing}");
}

/// `lanyard federation` against `spire-server`: what Lanyard's CLI sends is what SPIRE's
/// TrustDomain API takes, and what SPIRE answers (its paging, its texts) reads back.
#[test]
fn lanyard_cli_manages_spire_servers_federation_relationships() {
    if spire_or_skip("lanyard_cli_manages_spire_servers_federation_relationships").is_none() {
        return;
    }
    let dir = TestDir::new();
    let spire = SpireServer::start(&dir.join("spire-server"));
    let partner = lanyard_core::TrustDomain::new("partner.example").unwrap();
    let key = lanyard_core::KeyPair::generate(lanyard_core::KeyType::EcP256).unwrap();
    let ca = lanyard_core::x509::create_self_signed_ca(
        &partner,
        &key,
        &lanyard_core::x509::CaSubject::default(),
        SystemTime::now(),
        std::time::Duration::from_secs(3600),
    )
    .unwrap();
    let pem_path = dir.join("partner.pem");
    std::fs::write(
        &pem_path,
        lanyard_core::keys::pem_encode("CERTIFICATE", &ca),
    )
    .unwrap();

    let created = lanyard_json(
        &spire,
        &[
            "federation",
            "create",
            "--trust-domain",
            "partner.example",
            "--bundle-endpoint-url",
            "https://partner.example:8443",
            "--bundle-endpoint-profile",
            "https_spiffe",
            "--endpoint-spiffe-id",
            "spiffe://partner.example/spire/server",
            "--trust-domain-bundle-path",
            pem_path.to_str().unwrap(),
        ],
    );
    assert_eq!(created["results"][0]["status"]["code"], 0, "{created}");
    let shown = spire.cli_ok(
        &["federation", "show"],
        &["-trustDomain", "partner.example"],
    );
    assert_eq!(
        pretty_field(&shown, "Endpoint SPIFFE ID").as_deref(),
        Some("spiffe://partner.example/spire/server"),
        "{shown}"
    );
    // SPIRE stored the bundle as the federated bundle; the Lanyard CLI lists it.
    let bundles = lanyard_json(&spire, &["bundle", "list"]);
    assert_eq!(
        bundles["bundles"][0]["trust_domain"], "partner.example",
        "{bundles}"
    );
    let bundles = spire.cli_ok(&["bundle", "list"], &[]);
    assert_eq!(pem_certificates(&bundles), [ca], "{bundles}");

    // SPIRE pages with a token after every non-empty page; the listing reads to the end.
    let listed = lanyard_json(&spire, &["federation", "list"]);
    let relationships = listed["federation_relationships"]
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(relationships.len(), 1, "{listed}");
    assert_eq!(
        relationships[0]["trust_domain_bundle"]["trust_domain"], "partner.example",
        "{listed}"
    );

    let updated = lanyard_on(
        &spire,
        &[
            "federation",
            "update",
            "--trust-domain",
            "partner.example",
            "--bundle-endpoint-url",
            "https://partner.example/bundle",
            "--bundle-endpoint-profile",
            "https_web",
        ],
    );
    assert!(updated.success(), "{updated}");
    let shown = spire.cli_ok(
        &["federation", "show"],
        &["-trustDomain", "partner.example"],
    );
    assert_eq!(
        pretty_field(&shown, "Bundle endpoint profile").as_deref(),
        Some("https_web"),
        "{shown}"
    );
    assert_eq!(
        pretty_field(&shown, "Bundle endpoint URL").as_deref(),
        Some("https://partner.example/bundle"),
        "{shown}"
    );

    // SPIRE's refusals reach the Lanyard CLI's error line with SPIRE's codes.
    let duplicate = lanyard_on(
        &spire,
        &[
            "federation",
            "create",
            "--trust-domain",
            "partner.example",
            "--bundle-endpoint-url",
            "https://partner.example/bundle",
            "--bundle-endpoint-profile",
            "https_web",
        ],
    );
    assert!(!duplicate.success(), "{duplicate}");
    assert!(
        duplicate
            .stderr
            .contains("failed to create federation relationship"),
        "{duplicate}"
    );
    let unknown = lanyard_on(
        &spire,
        &["federation", "refresh", "--trust-domain", "unknown.example"],
    );
    assert!(!unknown.success(), "{unknown}");
    assert!(
        unknown
            .stderr
            .contains("there is no federation relationship with trust domain unknown.example"),
        "{unknown}"
    );

    let deleted = lanyard_on(
        &spire,
        &["federation", "delete", "--trust-domain", "partner.example"],
    );
    assert!(deleted.success(), "{deleted}");
    let listed = spire.cli_ok(&["federation", "list"], &[]);
    assert!(
        listed.contains("Found 0 federation relationships"),
        "{listed}"
    );
    // SPIRE keeps the bundle too.
    let bundles = lanyard_json(&spire, &["bundle", "list"]);
    assert_eq!(
        bundles["bundles"][0]["trust_domain"], "partner.example",
        "{bundles}"
    );
}
