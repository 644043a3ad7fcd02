//! SPIRE's own agent (`spire-agent` v1.13.3) against the Lanyard server: it attests with a
//! join token from `lanyard token generate`, authenticating the server with the bundle from
//! `lanyard bundle show`, syncs the entries registered with `lanyard entry create`, and serves
//! a workload (`spire-agent api fetch`) X.509-SVIDs that chain to the Lanyard server's
//! authorities and JWT-SVIDs that its JWT keys validate. Entries created and deleted while it
//! runs reach it through the incremental sync.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use lanyard_core::jwt::validate_jwt_svid_with_bundle;
use lanyard_core::x509::verify_svid_chain;
use lanyard_e2e::spire::{SPIRE_TIMEOUT, SpireAgent, SpireAttestation, spire_or_skip};
use lanyard_e2e::{
    Server, TestDir, current_uid, poll, spiffe_id, toml_string, trust_domain, uid_selector,
};

const AUDIENCE: &str = "e2e-spire-agent";

#[test]
fn spire_agent_attests_to_the_lanyard_server_and_serves_its_workloads() {
    if spire_or_skip("spire_agent_attests_to_the_lanyard_server_and_serves_its_workloads").is_none()
    {
        return;
    }
    let dir = TestDir::new();
    // A short agent SVID, so that spire-agent renews it (RenewAgent) while the test runs.
    let server = Server::start_with(&dir.join("server"), "agent_ttl = \"20s\"");
    let token = server.generate_token();
    let agent_id = spiffe_id(&format!("/spire/agent/join_token/{token}"));
    let workload_id = spiffe_id("/e2e/spire-agent/workload");
    let selector = uid_selector(current_uid());
    let entry_id = server.create_entry(&workload_id, &agent_id, &[&selector], &[]);

    let mut agent = SpireAgent::start(
        &dir.join("spire-agent"),
        &server.address(),
        &server.bundle_pem(),
        &token,
    );

    // X.509: the workload's identity, chaining to the Lanyard server's authorities, served
    // with exactly those authorities as the bundle.
    let svid = agent.wait_for_x509(&workload_id);
    let mut authorities = server.bundle_der();
    let verified = verify_svid_chain(
        &svid.chain,
        &trust_domain(),
        &authorities,
        SystemTime::now(),
    )
    .unwrap_or_else(|e| {
        panic!(
            "the SVID spire-agent served does not verify against the Lanyard bundle: {e}\n{}",
            agent.log_tail()
        )
    });
    assert_eq!(verified.spiffe_id().as_str(), workload_id);
    let mut served = svid.bundle.clone();
    served.sort();
    authorities.sort();
    assert_eq!(
        served, authorities,
        "the bundle spire-agent serves vs. the Lanyard server's"
    );

    // The server knows the agent by its join-token ID.
    assert!(
        server.agent_ids().contains(&agent_id),
        "{agent_id} is not among the Lanyard server's agents: {:?}",
        server.agent_ids()
    );

    // JWT: minted by the Lanyard server for spire-agent, valid under the server's JWT keys.
    let (jwt_id, jwt) = poll("spire-agent to serve a JWT-SVID", SPIRE_TIMEOUT, || {
        agent
            .fetch_jwt(AUDIENCE)
            .map_err(|output| output.to_string())
    });
    assert_eq!(jwt_id, workload_id);
    let validated =
        validate_jwt_svid_with_bundle(&jwt, AUDIENCE, &server.spiffe_bundle(), SystemTime::now())
            .unwrap_or_else(|e| panic!("the JWT-SVID from spire-agent does not validate: {e}"));
    assert_eq!(validated.spiffe_id.as_str(), workload_id);
    assert_eq!(validated.audiences, [AUDIENCE]);

    // The incremental sync: a new entry reaches the agent and a deleted one leaves it.
    let renamed_id = spiffe_id("/e2e/spire-agent/renamed");
    server.create_entry(&renamed_id, &agent_id, &[&selector], &[]);
    let deleted = server.cli(["entry", "delete", "--entry-id", &entry_id]);
    assert!(deleted.success(), "{deleted}");
    let renamed = agent.wait_for_x509(&renamed_id);
    verify_svid_chain(
        &renamed.chain,
        &trust_domain(),
        &authorities,
        SystemTime::now(),
    )
    .unwrap_or_else(|e| panic!("the second SVID does not verify: {e}"));

    // RenewAgent: near half-life spire-agent renews its SVID, and the server makes the new
    // serial current on its first use; the agent goes on syncing with it.
    let first_serial = agent_serial(&server, &agent_id);
    poll("spire-agent to renew its agent SVID", SPIRE_TIMEOUT, || {
        let serial = agent_serial(&server, &agent_id);
        if serial == first_serial {
            Err(format!("the serial is still {serial}"))
        } else {
            Ok(())
        }
    });
    let after_renewal_id = spiffe_id("/e2e/spire-agent/after-renewal");
    let renamed_entry = server.cli_json(&["entry", "show", "--spiffe-id", &renamed_id]);
    let renamed_entry_id = renamed_entry["entries"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    server.create_entry(&after_renewal_id, &agent_id, &[&selector], &[]);
    let deleted = server.cli(["entry", "delete", "--entry-id", &renamed_entry_id]);
    assert!(deleted.success(), "{deleted}");
    agent.wait_for_x509(&after_renewal_id);

    // Banned: the next sync is denied with AGENT_BANNED, and spire-agent shuts down.
    let banned = server.cli(["agent", "ban", "--spiffe-id", &agent_id]);
    assert!(banned.success(), "{banned}");
    let status = agent.process().wait_for_exit(SPIRE_TIMEOUT);
    assert!(!status.success(), "spire-agent exited with {status}");
    assert!(
        agent.process().log().contains("Agent is banned"),
        "spire-agent did not see the ban as one:\n{}",
        agent.log_tail()
    );
}

/// The agent's current SVID serial, as `lanyard agent show` reports it.
pub(crate) fn agent_serial(server: &Server, agent_id: &str) -> String {
    let shown = server.cli_json(&["agent", "show", "--spiffe-id", agent_id]);
    shown["x509svid_serial_number"]
        .as_str()
        .unwrap_or_else(|| panic!("no serial in {shown}"))
        .to_owned()
}

/// A node CA the Lanyard server trusts for x509pop, and a node certificate and key it issued,
/// as PEM files in `dir`: (CA, certificate, key, the certificate's DER).
fn x509pop_node(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf, Vec<u8>) {
    use lanyard_core::keys::{KeyPair, KeyType, pem_encode};
    use lanyard_core::x509::{CaSubject, SvidParams, X509Ca};
    let now = SystemTime::now();
    let ca = X509Ca::self_signed(
        &lanyard_core::TrustDomain::new("nodes.example").unwrap(),
        KeyPair::generate(KeyType::EcP256).unwrap(),
        &CaSubject::default(),
        now,
        Duration::from_secs(3600),
    )
    .unwrap();
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let node = ca
        .mint_svid(
            &SvidParams::new(
                "spiffe://nodes.example/node-1".parse().unwrap(),
                key.public_key_der(),
                Duration::from_secs(3600),
            ),
            now,
        )
        .unwrap();
    let paths = (
        dir.join("node-ca.pem"),
        dir.join("node.pem"),
        dir.join("node.key"),
    );
    std::fs::write(&paths.0, pem_encode("CERTIFICATE", ca.cert_der())).unwrap();
    std::fs::write(&paths.1, pem_encode("CERTIFICATE", node.leaf_der())).unwrap();
    std::fs::write(&paths.2, key.secret_pkcs8_pem()).unwrap();
    (paths.0, paths.1, paths.2, node.leaf_der().to_vec())
}

#[test]
fn spire_agent_attests_with_x509pop_to_the_lanyard_server() {
    if spire_or_skip("spire_agent_attests_with_x509pop_to_the_lanyard_server").is_none() {
        return;
    }
    let dir = TestDir::new();
    let (ca, certificate, private_key, leaf) = x509pop_node(&dir.subdir("pki"));
    let server = Server::start_with(
        &dir.join("server"),
        &format!(
            "[node_attestor.x509pop]\nca_bundle_path = {}",
            toml_string(ca.to_str().unwrap())
        ),
    );
    // SPIRE names an x509pop agent by the SHA-1 fingerprint of its certificate.
    let agent_id = spiffe_id(&format!(
        "/spire/agent/x509pop/{}",
        lanyard_core::x509::fingerprint_sha1_hex(&leaf)
    ));
    let workload_id = spiffe_id("/e2e/spire-agent/x509pop-workload");
    server.create_entry(
        &workload_id,
        &agent_id,
        &[&uid_selector(current_uid())],
        &[],
    );

    let mut agent = SpireAgent::start_with(
        &dir.join("spire-agent"),
        &server.address(),
        &server.bundle_pem(),
        SpireAttestation::X509Pop {
            certificate: &certificate,
            private_key: &private_key,
        },
    );
    let svid = agent.wait_for_x509(&workload_id);
    verify_svid_chain(
        &svid.chain,
        &trust_domain(),
        &server.bundle_der(),
        SystemTime::now(),
    )
    .unwrap_or_else(|e| panic!("the SVID does not verify: {e}\n{}", agent.log_tail()));
    assert!(
        server.agent_ids().contains(&agent_id),
        "{agent_id} is not among the Lanyard server's agents: {:?}",
        server.agent_ids()
    );
}
