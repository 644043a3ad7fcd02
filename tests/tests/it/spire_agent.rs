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
    let server = Server::start(&dir.join("server"));
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
    agent.process().assert_running();
}
