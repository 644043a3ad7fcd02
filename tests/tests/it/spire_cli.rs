//! SPIRE's own admin CLI (`spire-server` v1.13.3 with `-socketPath`) against the Lanyard
//! server's admin socket: health, join tokens, registration entries, agents, the bundle and
//! federation relationships.
//! Every effect is checked from the other side: through the Lanyard CLI, or through a Lanyard
//! agent attested with the token SPIRE's CLI generated.
//!
//! The CLI's default "pretty" output dereferences fields of the responses without checks, so
//! most commands run in that mode; `-output json` is checked where it prints more.

use lanyard_e2e::spire::{pretty_field, spire_or_skip, spire_server_cli};
use lanyard_e2e::{
    Agent, CliOutput, Server, TestDir, current_uid, pem_certificates, spiffe_id, trust_domain,
    uid_selector,
};

/// `spire-server <subcommand> -socketPath <the Lanyard server's admin socket> <args>`;
/// panics with the output and the server's log unless it succeeds.
fn spire_ok(server: &Server, subcommand: &[&str], args: &[&str]) -> String {
    let output = spire_server_cli(server.admin_socket(), subcommand, args);
    assert!(
        output.success(),
        "spire-server against the Lanyard server failed: {output}\n{}",
        server.log_tail()
    );
    output.stdout
}

fn spire_json(server: &Server, subcommand: &[&str], args: &[&str]) -> serde_json::Value {
    let mut with_output = args.to_vec();
    with_output.extend(["-output", "json"]);
    let stdout = spire_ok(server, subcommand, &with_output);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// The entries `lanyard entry show` lists, by ID.
fn lanyard_entry(server: &Server, entry_id: &str) -> Option<serde_json::Value> {
    let shown = server.cli_json(&["entry", "show"]);
    shown["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries array in {shown}"))
        .iter()
        .find(|entry| entry["id"] == entry_id)
        .cloned()
}

#[test]
fn spire_server_cli_administers_the_lanyard_server() {
    if spire_or_skip("spire_server_cli_administers_the_lanyard_server").is_none() {
        return;
    }
    let dir = TestDir::new();
    let server = Server::start(&dir.join("server"));

    let health = spire_ok(&server, &["healthcheck"], &[]);
    assert!(health.contains("Server is healthy"), "{health}");

    // A join token from SPIRE's CLI attests a Lanyard agent.
    let generated = spire_ok(&server, &["token", "generate"], &["-ttl", "600"]);
    let token = pretty_field(&generated, "Token").unwrap_or_else(|| panic!("{generated}"));
    let agent_id = spiffe_id(&format!("/spire/agent/join_token/{token}"));
    let agent = Agent::start(&dir.join("agent"), &server, &token);
    assert_eq!(server.agent_ids(), std::slice::from_ref(&agent_id));

    entries(&server, &agent, &agent_id);
    bundle(&server);
    local_authority(&server);
    agents(&server, &agent_id);
}

/// The authority ID in one `AuthorityState` of SPIRE's JSON output.
fn authority_id(state: &serde_json::Value) -> String {
    state["authority_id"]
        .as_str()
        .or_else(|| state["authorityId"].as_str())
        .unwrap_or_else(|| panic!("no authority ID in {state}"))
        .to_owned()
}

/// `localauthority x509 show/prepare/activate/taint/revoke`: a forced rotation of the Lanyard
/// server's CA, driven by SPIRE's CLI, checked in the bundle the Lanyard CLI shows.
fn local_authority(server: &Server) {
    let show = || spire_json(server, &["localauthority", "x509", "show"], &[]);
    let first = authority_id(&show()["active"]);
    let pretty = spire_ok(server, &["localauthority", "x509", "show"], &[]);
    assert!(pretty.contains(&first), "{pretty}");
    let prepared = spire_json(server, &["localauthority", "x509", "prepare"], &[]);
    let prepared = authority_id(&prepared["prepared_authority"]);
    assert_ne!(prepared, first);
    let activated = spire_ok(
        server,
        &["localauthority", "x509", "activate"],
        &["-authorityID", &prepared],
    );
    assert!(activated.contains(&prepared), "{activated}");
    let state = show();
    assert_eq!(authority_id(&state["active"]), prepared, "{state}");
    assert_eq!(authority_id(&state["old"]), first, "{state}");
    for step in ["taint", "revoke"] {
        spire_ok(
            server,
            &["localauthority", "x509", step],
            &["-authorityID", &first],
        );
    }
    let in_bundle: Vec<String> = server
        .bundle_der()
        .iter()
        .map(|der| lanyard_core::x509::authority_id_of(der).unwrap())
        .collect();
    assert_eq!(in_bundle, vec![prepared], "the bundle after the rotation");
}

/// `entry create/show/count/update/delete`.
fn entries(server: &Server, agent: &Agent, agent_id: &str) {
    let uid = current_uid().to_string();
    let selector = uid_selector(current_uid());
    let workload_id = spiffe_id("/e2e/spire-cli/workload");
    let created = spire_ok(
        server,
        &["entry", "create"],
        &[
            "-parentID",
            agent_id,
            "-spiffeID",
            &workload_id,
            "-selector",
            &selector,
            "-x509SVIDTTL",
            "300",
            "-hint",
            "spire-cli",
            "-dns",
            "workload.example.org",
        ],
    );
    let entry_id = pretty_field(&created, "Entry ID").unwrap_or_else(|| panic!("{created}"));
    assert_eq!(
        pretty_field(&created, "SPIFFE ID").as_deref(),
        Some(workload_id.as_str()),
        "{created}"
    );
    assert_eq!(
        pretty_field(&created, "Revision").as_deref(),
        Some("0"),
        "{created}"
    );

    // Lanyard sees it as created, and its agent serves it.
    let entry = lanyard_entry(server, &entry_id).unwrap_or_else(|| panic!("{entry_id} missing"));
    assert_eq!(entry["x509_svid_ttl"], 300, "{entry}");
    assert_eq!(entry["hint"], "spire-cli", "{entry}");
    assert_eq!(
        entry["dns_names"],
        serde_json::json!(["workload.example.org"]),
        "{entry}"
    );
    assert_eq!(
        entry["selectors"],
        serde_json::json!([{ "type": "unix", "value": format!("uid:{uid}") }]),
        "{entry}"
    );
    let served = agent.wait_for_svids(None, &[&workload_id]);
    served[0].verify();

    // A second, identical entry is refused as SPIRE does (AlreadyExists), and the CLI says so.
    let duplicate = spire_server_cli(
        server.admin_socket(),
        &["entry", "create"],
        &[
            "-parentID",
            agent_id,
            "-spiffeID",
            &workload_id,
            "-selector",
            &selector,
        ],
    );
    assert!(!duplicate.success(), "{duplicate}");
    assert!(duplicate.stderr.contains("AlreadyExists"), "{duplicate}");

    // show: all, by ID, by SPIFFE ID, by selector; count.
    let all = spire_ok(server, &["entry", "show"], &[]);
    assert!(all.contains("Found 1 entry"), "{all}");
    assert!(
        all.contains(&format!("Entry ID         : {entry_id}")),
        "{all}"
    );
    let by_id = spire_ok(server, &["entry", "show"], &["-entryID", &entry_id]);
    assert!(
        by_id.contains(&format!("SPIFFE ID        : {workload_id}")),
        "{by_id}"
    );
    let by_spiffe_id = spire_ok(server, &["entry", "show"], &["-spiffeID", &workload_id]);
    assert!(by_spiffe_id.contains(&entry_id), "{by_spiffe_id}");
    let by_parent = spire_ok(server, &["entry", "show"], &["-parentID", agent_id]);
    assert!(by_parent.contains(&entry_id), "{by_parent}");
    let by_selector = spire_ok(server, &["entry", "show"], &["-selector", &selector]);
    assert!(by_selector.contains(&entry_id), "{by_selector}");
    let other_selector = spire_ok(
        server,
        &["entry", "show"],
        &["-selector", "unix:uid:4242424"],
    );
    assert!(
        other_selector.contains("Found 0 entries"),
        "{other_selector}"
    );
    // JSON: the CLI prints a ListEntriesResponse even for one entry.
    let json = spire_json(server, &["entry", "show"], &["-entryID", &entry_id]);
    let shown = &json["entries"][0];
    assert_eq!(shown["id"], entry_id.as_str(), "{json}");
    assert_eq!(shown["revision_number"], "0", "{json}");
    assert_eq!(
        shown["spiffe_id"]["path"], "/e2e/spire-cli/workload",
        "{json}"
    );
    let count = spire_ok(server, &["entry", "count"], &[]);
    assert!(count.contains("1 registration entry"), "{count}");

    // update: every field is replaced; the revision goes up.
    let updated = spire_ok(
        server,
        &["entry", "update"],
        &[
            "-entryID",
            &entry_id,
            "-parentID",
            agent_id,
            "-spiffeID",
            &workload_id,
            "-selector",
            &selector,
            "-selector",
            "unix:gid:4242",
            "-x509SVIDTTL",
            "600",
        ],
    );
    assert_eq!(
        pretty_field(&updated, "Revision").as_deref(),
        Some("1"),
        "{updated}"
    );
    let entry = lanyard_entry(server, &entry_id).unwrap_or_else(|| panic!("{entry_id} missing"));
    assert_eq!(entry["x509_svid_ttl"], 600, "{entry}");
    assert_eq!(entry["revision_number"], 1, "{entry}");
    assert_eq!(entry["hint"], "", "{entry}");
    assert_eq!(
        entry["selectors"].as_array().map(Vec::len),
        Some(2),
        "{entry}"
    );

    // delete.
    let deleted = spire_ok(server, &["entry", "delete"], &["-entryID", &entry_id]);
    assert!(
        deleted.contains(&format!("Deleted entry with ID: {entry_id}")),
        "{deleted}"
    );
    assert!(lanyard_entry(server, &entry_id).is_none());
    let missing = spire_server_cli(
        server.admin_socket(),
        &["entry", "show"],
        &["-entryID", &entry_id],
    );
    assert!(!missing.success(), "{missing}");
    assert!(missing.stderr.contains("NotFound"), "{missing}");
}

/// `bundle show`, PEM and SPIFFE.
fn bundle(server: &Server) {
    let pem = spire_ok(server, &["bundle", "show"], &[]);
    let mut from_spire = pem_certificates(&pem);
    let mut from_lanyard = server.bundle_der();
    from_spire.sort();
    from_lanyard.sort();
    assert!(!from_spire.is_empty(), "{pem}");
    assert_eq!(
        from_spire, from_lanyard,
        "bundle show vs. lanyard bundle show"
    );

    let spiffe = spire_ok(server, &["bundle", "show"], &["-format", "spiffe"]);
    let parsed = lanyard_core::TrustBundle::from_jwks_json(trust_domain(), spiffe.as_bytes())
        .unwrap_or_else(|e| panic!("the SPIFFE bundle does not parse ({e}): {spiffe}"));
    assert_eq!(
        parsed.x509_authorities().len(),
        from_lanyard.len(),
        "{spiffe}"
    );
    assert!(!parsed.jwt_authorities().is_empty(), "{spiffe}");
}

/// `agent list/show/count/ban/evict`.
fn agents(server: &Server, agent_id: &str) {
    let listed = spire_ok(server, &["agent", "list"], &[]);
    assert!(listed.contains("Found 1 attested agent"), "{listed}");
    assert_eq!(
        pretty_field(&listed, "SPIFFE ID").as_deref(),
        Some(agent_id),
        "{listed}"
    );
    assert_eq!(
        pretty_field(&listed, "Attestation type").as_deref(),
        Some("join_token"),
        "{listed}"
    );
    let serial = pretty_field(&listed, "Serial number").unwrap_or_else(|| panic!("{listed}"));
    assert!(
        !serial.is_empty() && serial.bytes().all(|b| b.is_ascii_digit()),
        "serial numbers are decimal: {listed}"
    );
    assert_eq!(
        pretty_field(&listed, "Can re-attest").as_deref(),
        Some("false"),
        "{listed}"
    );

    let shown = spire_ok(server, &["agent", "show"], &["-spiffeID", agent_id]);
    assert!(shown.contains("Found an attested agent"), "{shown}");
    let count = spire_ok(server, &["agent", "count"], &[]);
    assert!(count.contains("1 attested agent"), "{count}");
    let by_type = spire_ok(server, &["agent", "list"], &["-attestationType", "x509pop"]);
    assert!(by_type.contains("No attested agents found"), "{by_type}");

    // -expiresBefore is sent in Go's `2006-01-02 15:04:05 -0700 -07` layout.
    let later = spire_ok(
        server,
        &["agent", "list"],
        &["-expiresBefore", "2999-01-02 15:04:05 +0000 +00"],
    );
    assert!(later.contains(agent_id), "{later}");
    let earlier = spire_ok(
        server,
        &["agent", "count"],
        &["-expiresBefore", "2001-01-02 15:04:05 -0700 -07"],
    );
    assert!(earlier.contains("0 attested agents"), "{earlier}");

    let banned = spire_ok(server, &["agent", "ban"], &["-spiffeID", agent_id]);
    assert!(banned.contains("Agent banned successfully"), "{banned}");
    let lanyard_view = server.cli_json(&["agent", "show", "--spiffe-id", agent_id]);
    assert_eq!(lanyard_view["banned"], true, "{lanyard_view}");
    let listed = spire_ok(server, &["agent", "list"], &[]);
    assert_eq!(
        pretty_field(&listed, "Banned").as_deref(),
        Some("true"),
        "{listed}"
    );
    let banned_only = spire_ok(server, &["agent", "list"], &["-banned", "true"]);
    assert!(banned_only.contains(agent_id), "{banned_only}");

    let evicted = spire_ok(server, &["agent", "evict"], &["-spiffeID", agent_id]);
    assert!(evicted.contains("Agent evicted successfully"), "{evicted}");
    assert!(server.agent_ids().is_empty(), "{:?}", server.agent_ids());
    let missing: CliOutput = spire_server_cli(
        server.admin_socket(),
        &["agent", "show"],
        &["-spiffeID", agent_id],
    );
    assert!(!missing.success(), "{missing}");
    assert!(missing.stderr.contains("NotFound"), "{missing}");
}

/// A CA certificate of `trust_domain`, made now, as a one-authority bundle.
fn foreign_bundle(trust_domain: &str) -> lanyard_core::TrustBundle {
    let trust_domain = lanyard_core::TrustDomain::new(trust_domain).unwrap();
    let key = lanyard_core::KeyPair::generate(lanyard_core::KeyType::EcP256).unwrap();
    let der = lanyard_core::x509::create_self_signed_ca(
        &trust_domain,
        &key,
        &lanyard_core::x509::CaSubject::default(),
        std::time::SystemTime::now(),
        std::time::Duration::from_secs(3600),
    )
    .unwrap();
    let mut bundle = lanyard_core::TrustBundle::new(trust_domain);
    bundle.add_x509_authority(lanyard_core::X509Authority::new(der).unwrap());
    bundle
}

/// The trust domains of the federated bundles `lanyard bundle list` shows.
fn lanyard_federated_bundles(server: &Server) -> Vec<String> {
    let listed = server.cli_json(&["bundle", "list"]);
    listed["bundles"]
        .as_array()
        .unwrap_or_else(|| panic!("no bundles array in {listed}"))
        .iter()
        .map(|bundle| {
            bundle["trust_domain"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// `federation create/list/show/update/refresh/delete` and `bundle list`, each effect checked
/// through `lanyard federation` and `lanyard bundle list`.
#[test]
fn spire_server_cli_manages_the_lanyard_servers_federation_relationships() {
    if spire_or_skip("spire_server_cli_manages_the_lanyard_servers_federation_relationships")
        .is_none()
    {
        return;
    }
    let dir = TestDir::new();
    let server = Server::start(&dir.join("server"));
    let partner_bundle = foreign_bundle("partner.example");
    let partner_pem = dir.join("partner.pem");
    std::fs::write(&partner_pem, partner_bundle.x509_authorities_pem()).unwrap();

    // create, from flags: https_spiffe with a PEM bundle, and https_web.
    let created = spire_ok(
        &server,
        &["federation", "create"],
        &[
            "-trustDomain",
            "partner.example",
            "-bundleEndpointURL",
            "https://partner.example:8443",
            "-bundleEndpointProfile",
            "https_spiffe",
            "-endpointSpiffeID",
            "spiffe://partner.example/spire/server",
            "-trustDomainBundlePath",
            partner_pem.to_str().unwrap(),
            "-trustDomainBundleFormat",
            "pem",
        ],
    );
    assert_eq!(
        pretty_field(&created, "Bundle endpoint profile").as_deref(),
        Some("https_spiffe"),
        "{created}"
    );
    let created = spire_json(
        &server,
        &["federation", "create"],
        &[
            "-trustDomain",
            "web.example",
            "-bundleEndpointURL",
            "https://web.example/bundle",
            "-bundleEndpointProfile",
            "https_web",
        ],
    );
    assert_eq!(
        created["results"][0]["federation_relationship"]["trust_domain"], "web.example",
        "{created}"
    );
    let shown = server.cli_json(&["federation", "show", "--trust-domain", "partner.example"]);
    assert_eq!(
        shown["https_spiffe"]["endpoint_spiffe_id"], "spiffe://partner.example/spire/server",
        "{shown}"
    );
    assert_eq!(
        shown["bundle_endpoint_url"], "https://partner.example:8443",
        "{shown}"
    );
    assert_eq!(lanyard_federated_bundles(&server), ["partner.example"]);

    // list and show.
    let listed = spire_ok(&server, &["federation", "list"], &[]);
    assert!(
        listed.contains("Found 2 federation relationships"),
        "{listed}"
    );
    assert!(listed.contains("https://web.example/bundle"), "{listed}");
    let listed = spire_json(&server, &["federation", "list"], &[]);
    assert_eq!(
        listed["federation_relationships"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    let shown = spire_ok(
        &server,
        &["federation", "show"],
        &["-trustDomain", "web.example"],
    );
    assert!(
        shown.contains("Found a federation relationship with trust domain web.example"),
        "{shown}"
    );
    assert_eq!(
        pretty_field(&shown, "Bundle endpoint profile").as_deref(),
        Some("https_web"),
        "{shown}"
    );

    // Refusals come back with Lanyard's answers, which are SPIRE's texts.
    let duplicate = spire_server_cli(
        server.admin_socket(),
        &["federation", "create"],
        &[
            "-trustDomain",
            "web.example",
            "-bundleEndpointURL",
            "https://web.example/other",
            "-bundleEndpointProfile",
            "https_web",
        ],
    );
    assert!(!duplicate.success(), "{duplicate}");
    assert!(duplicate.stderr.contains("AlreadyExists"), "{duplicate}");
    let own = spire_server_cli(
        server.admin_socket(),
        &["federation", "create"],
        &[
            "-trustDomain",
            trust_domain().name(),
            "-bundleEndpointURL",
            "https://example.org/bundle",
            "-bundleEndpointProfile",
            "https_web",
        ],
    );
    assert!(!own.success(), "{own}");
    assert!(
        own.stderr
            .contains("unable to create federation relationship for server trust domain"),
        "{own}"
    );

    // update from a -data file: web.example moves to https_spiffe with a SPIFFE bundle.
    let web_bundle = foreign_bundle("web.example");
    let data = dir.join("relationships.json");
    let jwks: serde_json::Value = serde_json::from_str(&web_bundle.to_jwks_json()).unwrap();
    std::fs::write(
        &data,
        serde_json::json!({"federationRelationships": [{
            "trustDomain": "web.example",
            "bundleEndpointURL": "https://web.example:8443/bundle",
            "bundleEndpointProfile": "https_spiffe",
            "endpointSPIFFEID": "spiffe://web.example/spire/server",
            "trustDomainBundle": jwks,
            "trustDomainBundleFormat": "spiffe",
        }]})
        .to_string(),
    )
    .unwrap();
    let updated = spire_ok(
        &server,
        &["federation", "update"],
        &["-data", data.to_str().unwrap()],
    );
    assert_eq!(
        pretty_field(&updated, "Endpoint SPIFFE ID").as_deref(),
        Some("spiffe://web.example/spire/server"),
        "{updated}"
    );
    let shown = server.cli_json(&["federation", "show", "--trust-domain", "web.example"]);
    assert_eq!(
        shown["bundle_endpoint_url"], "https://web.example:8443/bundle",
        "{shown}"
    );
    assert_eq!(
        shown["trust_domain_bundle"]["x509_authorities"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{shown}"
    );
    assert_eq!(
        lanyard_federated_bundles(&server),
        ["partner.example", "web.example"]
    );

    // spire-server bundle list shows the federated bundles, certificates and all.
    let bundles = spire_ok(&server, &["bundle", "list"], &[]);
    assert!(bundles.contains("* partner.example"), "{bundles}");
    assert!(bundles.contains("* web.example"), "{bundles}");
    let mut listed_der = pem_certificates(&bundles);
    listed_der.sort();
    let mut expected_der: Vec<Vec<u8>> = [&partner_bundle, &web_bundle]
        .iter()
        .flat_map(|bundle| bundle.x509_authorities().iter().map(|a| a.der().to_vec()))
        .collect();
    expected_der.sort();
    assert_eq!(listed_der, expected_der, "{bundles}");

    // refresh: a trust domain with a relationship, then one without.
    let refreshed = spire_ok(
        &server,
        &["federation", "refresh"],
        &["-id", "partner.example"],
    );
    assert!(refreshed.contains("Bundle refreshed"), "{refreshed}");
    let unknown = spire_server_cli(
        server.admin_socket(),
        &["federation", "refresh"],
        &["-id", "unknown.example"],
    );
    assert!(!unknown.success(), "{unknown}");
    assert!(
        unknown
            .stderr
            .contains("there is no federation relationship with trust domain"),
        "{unknown}"
    );

    // delete: the relationship goes, its bundle stays.
    let deleted = spire_ok(
        &server,
        &["federation", "delete"],
        &["-id", "spiffe://partner.example"],
    );
    assert!(
        deleted.contains("federation relationship deleted."),
        "{deleted}"
    );
    let remaining = server.cli_json(&["federation", "list"]);
    assert_eq!(
        remaining["federation_relationships"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{remaining}"
    );
    assert_eq!(
        lanyard_federated_bundles(&server),
        ["partner.example", "web.example"]
    );
    let missing = spire_server_cli(
        server.admin_socket(),
        &["federation", "show"],
        &["-trustDomain", "partner.example"],
    );
    assert!(!missing.success(), "{missing}");
    assert!(missing.stderr.contains("NotFound"), "{missing}");
    let again = spire_server_cli(
        server.admin_socket(),
        &["federation", "delete"],
        &["-id", "partner.example"],
    );
    assert!(!again.success(), "{again}");
    assert!(
        again.stderr.contains("federation relationship not found"),
        "{again}"
    );
}
