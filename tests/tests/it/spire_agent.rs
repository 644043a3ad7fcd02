//! SPIRE's own agent (`spire-agent` v1.13.3) against the Lanyard server: it attests with a
//! join token from `lanyard token generate`, authenticating the server with the bundle from
//! `lanyard bundle show`, syncs the entries registered with `lanyard entry create`, and serves
//! a workload (`spire-agent api fetch`) X.509-SVIDs that chain to the Lanyard server's
//! authorities and JWT-SVIDs that its JWT keys validate. Entries created and deleted while it
//! runs reach it through the incremental sync.

use std::time::SystemTime;

use lanyard_core::jwt::validate_jwt_svid_with_bundle;
use lanyard_core::x509::verify_svid_chain;
use lanyard_e2e::spire::{SPIRE_TIMEOUT, SpireAgent, spire_or_skip};
use lanyard_e2e::{Server, TestDir, current_uid, poll, spiffe_id, trust_domain, uid_selector};

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
fn agent_serial(server: &Server, agent_id: &str) -> String {
    let shown = server.cli_json(&["agent", "show", "--spiffe-id", agent_id]);
    shown["x509svid_serial_number"]
        .as_str()
        .unwrap_or_else(|| panic!("no serial in {shown}"))
        .to_owned()
}
