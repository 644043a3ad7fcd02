//! Envoy's Secret Discovery Service (SDS v3) as Envoy calls it, through the go-control-plane
//! client in `tests/interop/sds` ([`lanyard_e2e::sds`]): against the Lanyard agent, and
//! against SPIRE's own agent (which serves SDS on its Workload API socket too), so the client
//! and the harness are checked against the reference as well.
//!
//! Against the Lanyard agent: a caller with no entry gets no secret; a stream receives the
//! certificate and validation contexts (`ALL` with the federated trust domain), every
//! response passes go-control-plane's `ValidateAll()`; ACKs and NACKs get no answer (the
//! NACK is logged); a rotation arrives on the stream, with the next version, before the old
//! SVID expires; an Envoy older than 1.18 gets plain trusted CAs and is refused `ALL`; a
//! name the caller may not have ends the stream; `FetchSecrets` answers once and
//! `DeltaSecrets` is Unimplemented.
//!
//! Without Go the test fails and says how to install it, unless `LANYARD_E2E_SKIP_GO=1` or
//! `LANYARD_E2E_SKIP_SPIRE=1`.

use std::time::{Duration, SystemTime};

use lanyard_core::x509::{VerifiedSvid, verify_svid_chain};
use lanyard_e2e::https::TestCa;
use lanyard_e2e::sds::{SdsStream, sds_delta, sds_fetch};
use lanyard_e2e::spire::{SpireAgent, SpireServer, spire_or_skip};
use lanyard_e2e::toolchain::SKIP_GO_VAR;
use lanyard_e2e::{
    Cluster, TIMEOUT, TestDir, current_uid, pem_certificates, poll, spiffe_id, trust_domain,
    uid_selector,
};
use serde_json::{Value, json};

/// Envoy's name for its SPIFFE certificate validator.
const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";

/// How long a stream must stay quiet after an ACK or a NACK.
const QUIET: Duration = Duration::from_secs(2);

/// The X.509-SVID lifetime of the Lanyard test's entry. The agent renews at half of the
/// certificate's validity, which starts 10 s before the mint (the backdate), so a rotation
/// reaches the stream about 15 s after the first SVID: after the ACK and NACK quiet windows
/// (2 × [`QUIET`]), which a rotation falling inside them would break.
const SHORT_TTL: &str = "40s";

#[test]
fn lanyard_agent_serves_sds_as_envoy_expects() {
    if std::env::var_os(SKIP_GO_VAR).is_some_and(|value| value == "1") {
        eprintln!("lanyard-e2e: {SKIP_GO_VAR}=1, skipping the SDS test");
        return;
    }
    let cluster = Cluster::start();
    let socket = cluster.agent.socket_path().to_owned();
    let logs = || cluster.logs();

    // Synced, but nothing is registered for this uid: no secret of any kind.
    for names in [vec![], vec!["ROOTCA"]] {
        poll(
            "FetchSecrets to refuse a caller with no entry",
            TIMEOUT,
            || {
                let refused = sds_fetch(&socket, &names);
                if refused["code"] == "PermissionDenied" {
                    Ok(())
                } else {
                    Err(format!("{names:?}: {refused}"))
                }
            },
        );
    }
    let mut stranger = SdsStream::start(&socket, &[]);
    stranger.send(&json!({"names": ["ROOTCA"]}));
    let end = stranger.next_response(TIMEOUT);
    assert_eq!(
        (&end["end"], &end["code"]),
        (&json!(true), &json!("PermissionDenied")),
        "{end}"
    );

    // A federated trust domain, and an entry for this uid that federates with it.
    let partner = TestCa::new("partner.org test CA");
    let partner_pem = cluster.dir().join("partner.pem");
    std::fs::write(&partner_pem, partner.pem()).unwrap();
    cluster
        .server
        .cli([
            "bundle",
            "set",
            "--id",
            "partner.org",
            "--path",
            partner_pem.to_str().unwrap(),
        ])
        .expect_success();
    let workload = cluster.register_uid(
        "/e2e/sds/envoy",
        current_uid(),
        &[
            "--x509-svid-ttl",
            SHORT_TTL,
            "--federates-with",
            "partner.org",
        ],
    );
    cluster.agent.wait_for_svids(None, &[&workload]);
    let mut authorities = cluster.server.bundle_der();
    authorities.sort();
    let partner_authorities = sorted_certificates(&json!(partner.pem()));
    let own_id = format!("spiffe://{}", lanyard_e2e::TRUST_DOMAIN);

    // One stream, as Envoy opens it, for the SVID and every bundle name at once.
    let mut sds = SdsStream::start(&socket, &[]);
    sds.send(&json!({"names": [workload, own_id, "ROOTCA", "ALL", "spiffe://partner.org"]}));
    let first = valid_response(&mut sds, &logs);
    assert_eq!(first["version_info"], "1", "{first}");
    assert_eq!(secrets(&first).len(), 5, "{first}");
    let first_svid = assert_certificate(&first, &workload, &authorities);
    assert_spiffe_validator(&first, &own_id, &authorities);
    assert_spiffe_validator(&first, "ROOTCA", &authorities);
    let all = secret(&first, "ALL");
    assert_eq!(all["validator"], SPIFFE_VALIDATOR, "{first}");
    assert_eq!(
        sorted_certificates(&all["spiffe_trust_domains"][lanyard_e2e::TRUST_DOMAIN]),
        authorities,
        "{first}"
    );
    assert_eq!(
        sorted_certificates(&all["spiffe_trust_domains"]["partner.org"]),
        partner_authorities,
        "{first}"
    );
    assert_eq!(
        sorted_certificates(
            &secret(&first, "spiffe://partner.org")["spiffe_trust_domains"]["partner.org"]
        ),
        partner_authorities,
        "{first}"
    );

    // An ACK gets no answer; nor does a NACK, which the agent logs.
    sds.send(&json!({"ack": true}));
    assert_quiet(&mut sds, "after an ACK");
    sds.send(&json!({"ack": false, "error": "e2e: refusing the secrets"}));
    assert_quiet(&mut sds, "after a NACK");
    assert!(
        cluster
            .agent
            .log_tail()
            .contains("e2e: refusing the secrets"),
        "the NACK is logged:\n{}",
        cluster.agent.log_tail()
    );

    // The SVID rotates at half its life: the new one comes on the open stream, with the next
    // version and a fresh nonce, before the old one expires.
    let rotated = valid_response(&mut sds, &logs);
    let arrived = SystemTime::now();
    let second_svid = assert_certificate(&rotated, &workload, &authorities);
    assert_ne!(second_svid.serial(), first_svid.serial(), "{rotated}");
    assert!(
        arrived < first_svid.not_after(),
        "the rotation arrived after the old SVID expired"
    );
    assert_eq!(rotated["version_info"], "2", "{rotated}");
    assert_ne!(rotated["nonce"], first["nonce"], "{rotated}");
    sds.send(&json!({"ack": true}));

    // A name this workload may not have ends the stream, naming it.
    let not_mine = spiffe_id("/e2e/sds/not-mine");
    sds.send(&json!({"names": [workload, not_mine]}));
    let end = sds.next_response(TIMEOUT);
    assert_eq!(end["code"], "InvalidArgument", "{end}");
    assert!(
        end["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&not_mine),
        "{end}"
    );

    // An Envoy older than 1.18 gets trusted CAs, and cannot have ALL as one flat CA list.
    let mut old_envoy = SdsStream::start(&socket, &["-envoy-version", "1.17.0"]);
    old_envoy.send(&json!({"names": ["ROOTCA", "spiffe://partner.org"]}));
    let old = valid_response(&mut old_envoy, &logs);
    assert_eq!(
        sorted_certificates(&secret(&old, "ROOTCA")["trusted_ca"]),
        authorities,
        "{old}"
    );
    assert_eq!(
        sorted_certificates(&secret(&old, "spiffe://partner.org")["trusted_ca"]),
        partner_authorities,
        "{old}"
    );
    old_envoy.send(&json!({"names": ["ALL"]}));
    let end = old_envoy.next_response(TIMEOUT);
    assert_eq!(end["code"], "InvalidArgument", "{end}");
    // So does an Envoy that turns the SPIFFE validator off in its node metadata.
    let mut opted_out = SdsStream::start(
        &socket,
        &["-metadata", "disable_spiffe_cert_validation=true"],
    );
    opted_out.send(&json!({"names": ["ROOTCA"]}));
    let plain = valid_response(&mut opted_out, &logs);
    assert!(
        secret(&plain, "ROOTCA").get("validator").is_none(),
        "{plain}"
    );
    assert_eq!(opted_out.close(TIMEOUT)["code"], "OK");

    // FetchSecrets answers once, the default SVID name included; DeltaSecrets is not served.
    let fetched = sds_fetch(&socket, &["default", "ROOTCA"]);
    assert_eq!(fetched["valid"], true, "{fetched}");
    assert_certificate(&fetched, "default", &authorities);
    assert_spiffe_validator(&fetched, "ROOTCA", &authorities);
    let delta = sds_delta(&socket);
    assert_eq!(delta["code"], "Unimplemented", "{delta}");
}

/// The next line from `sds`, which must be a response that passed go-control-plane's
/// validation.
fn valid_response(sds: &mut SdsStream, logs: &dyn Fn() -> String) -> Value {
    let response = sds.next_response(TIMEOUT);
    assert!(
        response.get("secrets").is_some(),
        "expected an SDS response, got {response}\n{}",
        logs()
    );
    assert_eq!(
        response["type_url"],
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    );
    assert_eq!(
        response["valid"], true,
        "the response does not pass ValidateAll(): {response}"
    );
    response
}

#[test]
fn go_control_plane_client_against_spire_agent() {
    if std::env::var_os(SKIP_GO_VAR).is_some_and(|value| value == "1") {
        eprintln!("lanyard-e2e: {SKIP_GO_VAR}=1, skipping the SDS test");
        return;
    }
    if spire_or_skip("go_control_plane_client_against_spire_agent").is_none() {
        return;
    }
    let dir = TestDir::new();
    let server = SpireServer::start(&dir.join("spire-server"));
    let token = server.generate_token();
    let workload = spiffe_id("/e2e/sds/workload");
    server.cli_ok(
        &["entry", "create"],
        &[
            "-spiffeID",
            &workload,
            "-parentID",
            &spiffe_id(&format!("/spire/agent/join_token/{token}")),
            "-selector",
            &uid_selector(current_uid()),
        ],
    );
    let mut agent = SpireAgent::start(
        &dir.join("spire-agent"),
        &server.address(),
        &server.bundle_pem(),
        &token,
    );
    agent.wait_for_x509(&workload);
    let socket = agent.socket_path().to_owned();
    let mut authorities = server.bundle_der();
    authorities.sort();
    let trust_domain_id = format!("spiffe://{}", lanyard_e2e::TRUST_DOMAIN);

    // A stream as Envoy opens it: our SVID and the trust domain's bundle, the bundle for an
    // Envoy that has the SPIFFE validator.
    let mut sds = SdsStream::start(&socket, &[]);
    sds.send(&json!({"names": [workload, trust_domain_id]}));
    let first = next_response(&mut sds, &agent);
    assert!(
        !first["version_info"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
            && !first["nonce"].as_str().unwrap_or_default().is_empty(),
        "a streamed response has a version and a nonce: {first}"
    );
    assert_eq!(secrets(&first).len(), 2, "{first}");
    assert_certificate(&first, &workload, &authorities);
    assert_spiffe_validator(&first, &trust_domain_id, &authorities);

    // An ACK, and a NACK of the same response, change nothing: no new response.
    sds.send(&json!({"ack": true}));
    assert_quiet(&mut sds, "after an ACK");
    sds.send(&json!({"ack": false, "error": "e2e: refusing the secrets"}));
    assert_quiet(&mut sds, "after a NACK");

    // New names get a new response: the default bundle name, then all bundles.
    sds.send(&json!({"names": [workload, "ROOTCA"]}));
    let rootca = next_response(&mut sds, &agent);
    assert_ne!(rootca["nonce"], first["nonce"], "{rootca}");
    assert_certificate(&rootca, &workload, &authorities);
    assert_spiffe_validator(&rootca, "ROOTCA", &authorities);
    sds.send(&json!({"names": ["ALL"]}));
    let all = next_response(&mut sds, &agent);
    assert_eq!(secrets(&all).len(), 1, "{all}");
    assert_spiffe_validator(&all, "ALL", &authorities);

    // A name the workload is not entitled to ends the stream.
    sds.send(&json!({"names": [workload, spiffe_id("/e2e/sds/not-mine")]}));
    let end = sds.next_response(TIMEOUT);
    assert_eq!(end["end"], true, "{end}");
    assert_eq!(end["code"], "InvalidArgument", "{end}");

    // An Envoy older than 1.18 gets the bundle as trusted_ca instead.
    let mut old_envoy = SdsStream::start(&socket, &["-envoy-version", "1.17.0"]);
    old_envoy.send(&json!({"names": ["ROOTCA"]}));
    let old = next_response(&mut old_envoy, &agent);
    let bundle = secret(&old, "ROOTCA");
    assert_eq!(bundle["kind"], "validation_context", "{old}");
    assert_eq!(
        sorted_certificates(&bundle["trusted_ca"]),
        authorities,
        "{old}"
    );
    assert!(bundle.get("validator").is_none(), "{old}");
    assert_eq!(old_envoy.close(TIMEOUT)["code"], "OK");

    // FetchSecrets answers the same; DeltaSecrets is not served.
    let fetched = sds_fetch(&socket, &[&workload, "ROOTCA"]);
    assert_eq!(fetched["valid"], true, "{fetched}");
    assert_certificate(&fetched, &workload, &authorities);
    assert_spiffe_validator(&fetched, "ROOTCA", &authorities);
    let refused = sds_fetch(&socket, &[&spiffe_id("/e2e/sds/not-mine")]);
    assert_eq!(refused["code"], "InvalidArgument", "{refused}");
    let delta = sds_delta(&socket);
    assert_eq!(delta["code"], "Unimplemented", "{delta}");
}

/// The next line from `sds`, which must be a response that passed go-control-plane's
/// validation.
fn next_response(sds: &mut SdsStream, agent: &SpireAgent) -> Value {
    let response = sds.next_response(TIMEOUT);
    assert!(
        response.get("secrets").is_some(),
        "expected an SDS response, got {response}\n{}",
        agent.log_tail()
    );
    assert_eq!(
        response["type_url"],
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    );
    assert_eq!(
        response["valid"], true,
        "the response does not pass ValidateAll(): {response}"
    );
    response
}

fn assert_quiet(sds: &mut SdsStream, when: &str) {
    let line = sds.next_response(QUIET);
    assert_eq!(
        line,
        json!({"timeout": true}),
        "expected no response {when}"
    );
}

fn secrets(response: &Value) -> &[Value] {
    response["secrets"].as_array().map_or(&[], Vec::as_slice)
}

fn secret<'a>(response: &'a Value, name: &str) -> &'a Value {
    secrets(response)
        .iter()
        .find(|secret| secret["name"] == name)
        .unwrap_or_else(|| panic!("no secret named {name} in {response}"))
}

fn sorted_certificates(pem: &Value) -> Vec<Vec<u8>> {
    let mut der = pem_certificates(pem.as_str().unwrap_or_default());
    der.sort();
    der
}

/// `response` holds a `tls_certificate` named `name`: an X509-SVID that chains to
/// `authorities`, for `name` unless that is a default name, with a private key (of which the
/// client prints only the length). Returns the verified leaf.
fn assert_certificate(response: &Value, name: &str, authorities: &[Vec<u8>]) -> VerifiedSvid {
    let svid = secret(response, name);
    assert_eq!(svid["kind"], "tls_certificate", "{response}");
    let chain = pem_certificates(svid["certificate_chain"].as_str().unwrap_or_default());
    let verified = verify_svid_chain(&chain, &trust_domain(), authorities, SystemTime::now())
        .unwrap_or_else(|e| panic!("the SDS certificate chain does not verify: {e}\n{response}"));
    if name.starts_with("spiffe://") {
        assert_eq!(verified.spiffe_id().as_str(), name);
    }
    assert!(
        svid["private_key_bytes"].as_u64().is_some_and(|n| n > 0),
        "{response}"
    );
    verified
}

/// `response` holds a `validation_context` named `name` for Envoy's SPIFFE validator, with
/// exactly `authorities` for the test trust domain and no other trust domain.
fn assert_spiffe_validator(response: &Value, name: &str, authorities: &[Vec<u8>]) {
    let bundle = secret(response, name);
    assert_eq!(bundle["kind"], "validation_context", "{response}");
    assert_eq!(bundle["validator"], SPIFFE_VALIDATOR, "{response}");
    let domains = bundle["spiffe_trust_domains"]
        .as_object()
        .unwrap_or_else(|| panic!("no SPIFFE trust domains in {response}"));
    assert_eq!(domains.len(), 1, "{response}");
    assert_eq!(
        sorted_certificates(&domains[lanyard_e2e::TRUST_DOMAIN]),
        authorities,
        "{response}"
    );
}
