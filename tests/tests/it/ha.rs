//! Two servers of one trust domain over one PostgreSQL (the test cluster of
//! `crates/lanyard-server/tests/it/pg.rs`), as real processes, and an agent given both: the
//! server it uses is killed, and its workloads never go without a valid SVID.

use std::time::{Duration, Instant};

use lanyard_e2e::{
    Agent, Server, TIMEOUT, TestDir, current_uid, poll, spiffe_id, toml_string, uid_selector,
};

/// Longer than the workload SVIDs' lifetime, so that they are renewed through the survivor.
const AFTER_THE_DEATH: Duration = Duration::from_secs(25);

#[test]
fn an_agent_with_two_servers_rides_out_the_death_of_one() {
    let url = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(crate::pg::fresh_database());
    let dir = TestDir::new();
    let datastore = format!(
        "kind = \"postgres\"\nconnection_string = {}\n",
        toml_string(&url)
    );
    let mut a = Server::start_on(&dir.join("a"), "instance = \"a\"", &datastore);
    let b = Server::start_on(&dir.join("b"), "instance = \"b\"", &datastore);
    // The bundle the agent boots with holds both servers' authorities.
    poll("A to serve B's authority", TIMEOUT, || {
        let count = a.bundle_der().len();
        if count == 2 {
            Ok(())
        } else {
            Err(format!("{count} authorities"))
        }
    });

    let token = a.generate_token();
    let agent_id = spiffe_id(&format!("/spire/agent/join_token/{token}"));
    let me = uid_selector(current_uid());
    let short = ["--x509-svid-ttl", "20s"];
    let first = spiffe_id("/e2e/ha/first");
    a.create_entry(&first, &agent_id, &[&me], &short);
    let mut agent = Agent::configure(&dir.join("agent"), &a, Some(&token), "");
    let (to_a, to_b) = (a.address(), b.address());
    agent.edit_config(|text| {
        text.replace(&format!("\"{to_a}\""), &format!("[\"{to_a}\", \"{to_b}\"]"))
    });
    agent.start_again();
    agent.wait_for_svids(None, &[&first])[0].verify();

    // The server the agent attested through dies; the other takes over.
    a.kill();
    let later = spiffe_id("/e2e/ha/later");
    b.create_entry(&later, &agent_id, &[&me], &short);
    for svid in agent.wait_for_svids(None, &[&first, &later]) {
        svid.verify();
    }
    let since = Instant::now();
    let mut fetches = 0;
    while since.elapsed() < AFTER_THE_DEATH {
        let svids = agent
            .fetch_x509()
            .unwrap_or_else(|output| panic!("a fetch failed after A died: {output}"));
        assert_eq!(svids.len(), 2, "{svids:?}");
        for svid in svids {
            // Valid now: renewed through B once the ones from A's time neared their end.
            svid.verify();
        }
        fetches += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(fetches > 10, "only {fetches} fetches");
    agent.process().assert_running();
    // One agent, attested once.
    assert_eq!(b.agent_ids(), [agent_id]);
}
