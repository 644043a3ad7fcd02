//! Just-in-time grants seen by a workload: a grant's SVID is never served past the grant's
//! end, and revoking a grant early stops it being served within one agent sync interval.
//! Both delays are measured and asserted against the agent's `sync_interval` (500 ms here).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lanyard_e2e::{Cluster, current_uid, spiffe_id, uid_selector, workspace_root};

/// The harness agent's `sync_interval`.
const SYNC_INTERVAL: Duration = Duration::from_millis(500);

/// What a sync may take on top of its interval (the RPCs, minting, a loaded machine).
const SYNC_SLACK: Duration = Duration::from_millis(500);

fn governed_cluster() -> Cluster {
    let policy = workspace_root().join("deploy/policy/baseline.rego");
    Cluster::start_with(
        &format!("[policy]\npath = {:?}\n", policy.display().to_string()),
        "",
    )
}

/// Grants `path` to this process's uid for `duration`; returns the entry ID and the end.
fn grant(cluster: &Cluster, path: &str, duration: &str) -> (String, SystemTime) {
    let created = cluster.server.cli_json(&[
        "grant",
        "create",
        "--spiffe-id",
        &spiffe_id(path),
        "--parent-id",
        &cluster.agent_id(),
        "--selector",
        &uid_selector(current_uid()),
        "--duration",
        duration,
        "--reason",
        "e2e: debugging a stuck job",
        "--owner",
        "e2e",
    ]);
    let id = created["entry"]["id"]
        .as_str()
        .expect("the grant's entry ID")
        .to_owned();
    let ends = created["ends_at"].as_i64().expect("the grant's end");
    (
        id,
        UNIX_EPOCH + Duration::from_secs(u64::try_from(ends).unwrap()),
    )
}

/// Polls the Workload API until `id` is no longer served. Returns when the last fetch that
/// still got it began: the agent was serving it at least until then, however slow the fetch
/// itself was, so the bound is a lower bound on how long it stayed served.
fn last_served(cluster: &Cluster, id: &str, timeout: Duration) -> Option<SystemTime> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let began = SystemTime::now();
        let served = cluster
            .agent
            .fetch_x509()
            .map(|svids| svids.iter().any(|svid| svid.spiffe_id == id))
            .unwrap_or(false);
        if !served {
            return last;
        }
        last = Some(began);
        assert!(
            Instant::now() < deadline,
            "{id} still served after {timeout:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long after `since` the SVID was still seen served (zero if not after it).
fn served_for(last: Option<SystemTime>, since: SystemTime) -> Duration {
    last.and_then(|last| last.duration_since(since).ok())
        .unwrap_or_default()
}

#[test]
fn a_grants_svids_stop_at_its_end_and_within_a_sync_interval_of_its_revocation() {
    let cluster = governed_cluster();

    // A short grant: its SVID ends with it, so the agent drops it at the end itself.
    let short_id = spiffe_id("/grant/short");
    let (_, ends) = grant(&cluster, "/grant/short", "8s");
    let svids = cluster.agent.wait_for_svids(None, &[&short_id]);
    let not_after = svids[0].verify().not_after();
    assert!(
        not_after <= ends,
        "the SVID outlives the grant: {not_after:?} > {ends:?}"
    );
    let late = served_for(
        last_served(&cluster, &short_id, Duration::from_secs(30)),
        ends,
    );
    assert!(
        late <= SYNC_INTERVAL + SYNC_SLACK,
        "served {late:?} past the grant's end (sync interval {SYNC_INTERVAL:?})"
    );

    // A long grant revoked early: gone within one sync interval of the revocation.
    let long_id = spiffe_id("/grant/long");
    let (entry, _) = grant(&cluster, "/grant/long", "1h");
    cluster.agent.wait_for_svids(None, &[&long_id]);
    let revoked = cluster
        .server
        .cli(["grant", "revoke", &entry, "--reason", "done"]);
    assert!(revoked.success(), "{revoked}");
    let revoked_at = SystemTime::now();
    let delay = served_for(
        last_served(&cluster, &long_id, Duration::from_secs(30)),
        revoked_at,
    );
    assert!(
        delay <= SYNC_INTERVAL + SYNC_SLACK,
        "served {delay:?} after the revocation (sync interval {SYNC_INTERVAL:?})"
    );
    println!("last served {late:?} after the grant's end; {delay:?} after its revocation");
}
