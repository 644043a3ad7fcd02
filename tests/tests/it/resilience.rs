//! Outages and restarts with real processes: an agent keeps serving while its server is down
//! and syncs again once the server is back on the same data and port; a restarted agent keeps
//! its identity without a new join token.

use std::time::{Duration, Instant};

use lanyard_e2e::{Cluster, current_uid};

/// How long the agent must keep serving without its server: several sync intervals (500 ms),
/// so that it has noticed the server is gone.
const OUTAGE: Duration = Duration::from_secs(2);

#[test]
fn the_agent_serves_through_a_server_outage_and_syncs_again_after_it() {
    let mut cluster = Cluster::start();
    let me = current_uid();
    let before = cluster.register_uid("/e2e/before-outage", me, &[]);
    cluster.agent.wait_for_svids(None, &[&before])[0].verify();
    let bundle = cluster.server.bundle_der();

    cluster.server.stop();
    assert!(
        !cluster.server.healthcheck().success(),
        "the server is stopped"
    );
    let outage = Instant::now();
    let mut fetches = 0;
    while outage.elapsed() < OUTAGE {
        let svids = cluster.agent.fetch_x509().unwrap_or_else(|output| {
            panic!("the agent stopped serving while the server was down: {output}")
        });
        assert_eq!(svids.len(), 1, "{svids:?}");
        assert_eq!(svids[0].spiffe_id, before);
        svids[0].verify();
        fetches += 1;
    }
    cluster.agent.process().assert_running();
    assert!(fetches > 1, "only {fetches} fetch(es) during the outage");

    // Same data directory, same port: same CA, same agents, and sync resumes.
    cluster.server.start_again();
    assert_eq!(
        cluster.server.bundle_der(),
        bundle,
        "the CA survived the restart"
    );
    assert_eq!(cluster.server.agent_ids(), [cluster.agent_id()]);
    let after = cluster.register_uid("/e2e/after-outage", me, &[]);
    for svid in cluster.agent.wait_for_svids(None, &[&before, &after]) {
        svid.verify();
    }
}

#[test]
fn a_restarted_agent_keeps_its_identity_without_a_new_join_token() {
    let mut cluster = Cluster::start();
    let me = current_uid();
    let first = cluster.register_uid("/e2e/steady", me, &[]);
    cluster.agent.wait_for_svids(None, &[&first]);
    let agent_before = attested_agent(&cluster);

    // A clean stop and a start with the same config: its join token is spent by now.
    cluster.agent.stop();
    let refused = cluster
        .agent
        .fetch_x509()
        .expect_err("nothing serves while the agent is stopped");
    assert!(refused.stderr.contains("cannot connect"), "{refused}");
    cluster.agent.start_again();
    cluster.agent.wait_for_svids(None, &[&first])[0].verify();
    assert_eq!(
        attested_agent(&cluster),
        agent_before,
        "the agent came back with the SVID it had, without attesting again"
    );

    // A crash, and a start with no join token in the config at all.
    cluster.agent.kill();
    cluster.agent.edit_config(|text| without_join_token(&text));
    cluster.agent.start_again();
    cluster.agent.wait_for_svids(None, &[&first])[0].verify();
    assert_eq!(attested_agent(&cluster), agent_before);

    // Still authorized with the server: a new entry reaches it.
    let second = cluster.register_uid("/e2e/after-restarts", me, &[]);
    for svid in cluster.agent.wait_for_svids(None, &[&first, &second]) {
        svid.verify();
    }
    assert_eq!(attested_agent(&cluster), agent_before);
}

/// The one attested agent's SPIFFE ID and SVID serial, from `lanyard agent list` on the server.
fn attested_agent(cluster: &Cluster) -> (String, String) {
    let list = cluster.server.cli_json(&["agent", "list"]);
    let agents = list["agents"]
        .as_array()
        .unwrap_or_else(|| panic!("no agents in {list}"));
    assert_eq!(agents.len(), 1, "exactly one agent: {list}");
    let agent = &agents[0];
    let id = format!(
        "spiffe://{}{}",
        agent["id"]["trust_domain"].as_str().unwrap_or_default(),
        agent["id"]["path"].as_str().unwrap_or_default()
    );
    assert_eq!(id, cluster.agent_id(), "{list}");
    let serial = agent["x509svid_serial_number"]
        .as_str()
        .unwrap_or_else(|| panic!("no SVID serial in {list}"))
        .to_owned();
    (id, serial)
}

fn without_join_token(config: &str) -> String {
    let kept: Vec<&str> = config
        .lines()
        .filter(|line| !line.trim_start().starts_with("join_token"))
        .collect();
    assert!(
        kept.len() < config.lines().count(),
        "no join_token in:\n{config}"
    );
    kept.join("\n") + "\n"
}
