//! Two servers of one trust domain over one PostgreSQL (the test cluster of
//! `crates/lanyard-server/tests/it/pg.rs`), as real processes, and an agent given both: the
//! server it uses is killed while a workload fetches and another streams (the published
//! `spiffe` crate), and neither goes without a valid SVID nor sees an error; the agent renews
//! its own SVID and its workloads' through the survivor.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lanyard_core::x509::verify_svid_chain;
use lanyard_e2e::{
    Agent, Server, TIMEOUT, TestDir, current_uid, poll, spiffe_id, toml_string, trust_domain,
    uid_selector,
};
use serde_json::Value;
use tokio_stream::StreamExt as _;

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
    // Agent SVIDs short enough to be renewed through the survivor too.
    let mut a = Server::start_on(
        &dir.join("a"),
        "instance = \"a\"\nagent_ttl = \"20s\"",
        &datastore,
    );
    let b = Server::start_on(
        &dir.join("b"),
        "instance = \"b\"\nagent_ttl = \"20s\"",
        &datastore,
    );
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
    let stream = Streamed::open(&agent.endpoint());
    stream.wait_for(&[&first]);

    // The server the agent attested through dies; the other takes over.
    let own_svid = agent_svid(&b, &agent_id);
    a.kill();
    let killed = SystemTime::now();
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
    // One agent, attested once, whose own SVID was renewed through B.
    assert_eq!(b.agent_ids(), std::slice::from_ref(&agent_id));
    let renewed = agent_svid(&b, &agent_id);
    assert_ne!(
        renewed.0, own_svid.0,
        "the agent SVID was not renewed after A died"
    );
    assert!(renewed.1 > own_svid.1, "{renewed:?} after {own_svid:?}");

    // The stream stayed open throughout, delivered the entry made through B and the renewals,
    // and at no moment left the workload holding an SVID that had expired.
    let authorities = b.bundle_der();
    stream.check(killed, &[&first, &later], &authorities);
}

/// The agent's own SVID as B's datastore records it: serial and expiry.
fn agent_svid(server: &Server, agent_id: &str) -> (String, i64) {
    let list = server.cli_json(&["agent", "list"]);
    let agent = list["agents"]
        .as_array()
        .and_then(|agents| {
            agents
                .iter()
                .find(|agent| lanyard_e2e::spiffe_id_of(&agent["id"]) == agent_id)
        })
        .unwrap_or_else(|| panic!("no {agent_id} in {list}"));
    let serial = agent["x509svid_serial_number"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let expires = match &agent["x509svid_expires_at"] {
        Value::Number(n) => n.as_i64().unwrap_or_default(),
        Value::String(s) => s.parse().unwrap_or_default(),
        other => panic!("no expiry in {other}"),
    };
    (serial, expires)
}

/// One X.509 update seen on the stream.
struct Update {
    at: SystemTime,
    svids: Vec<(String, Vec<Vec<u8>>)>,
}

/// A workload holding a `FetchX509SVID` stream open (the `spiffe` crate), on its own thread.
struct Streamed {
    updates: Arc<Mutex<Vec<Update>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Streamed {
    fn open(endpoint: &str) -> Self {
        let updates = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (seen, failed, endpoint) = (
            Arc::clone(&updates),
            Arc::clone(&errors),
            endpoint.to_owned(),
        );
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().expect("a runtime");
            runtime.block_on(async move {
                let stream = async {
                    let client = spiffe::WorkloadApiClient::connect_to(&endpoint).await?;
                    client.stream_x509_contexts().await
                };
                let mut stream = match stream.await {
                    Ok(stream) => stream,
                    Err(error) => {
                        failed.lock().unwrap().push(format!("opening: {error}"));
                        return;
                    }
                };
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(context) => {
                            let svids = context
                                .svids()
                                .iter()
                                .map(|svid| {
                                    let chain =
                                        svid.cert_chain().iter().map(|c| c.as_bytes().to_vec());
                                    (svid.spiffe_id().to_string(), chain.collect())
                                })
                                .collect();
                            seen.lock().unwrap().push(Update {
                                at: SystemTime::now(),
                                svids,
                            });
                        }
                        Err(error) => failed.lock().unwrap().push(error.to_string()),
                    }
                }
                failed.lock().unwrap().push("the stream ended".into());
            });
        });
        Self { updates, errors }
    }

    fn wait_for(&self, ids: &[&str]) {
        poll("the stream to deliver the SVIDs", TIMEOUT, || {
            let updates = self.updates.lock().unwrap();
            let last = updates.last().map(ids_of).unwrap_or_default();
            if ids.iter().all(|id| last.contains(&id.to_string())) {
                Ok(())
            } else {
                Err(format!(
                    "last update holds {last:?}; errors {:?}",
                    self.errors.lock().unwrap()
                ))
            }
        });
    }

    fn check(&self, killed: SystemTime, ids: &[&str], authorities: &[Vec<u8>]) {
        let errors = self.errors.lock().unwrap();
        assert!(errors.is_empty(), "the stream failed: {errors:?}");
        let updates = self.updates.lock().unwrap();
        let now = SystemTime::now();
        for (index, update) in updates.iter().enumerate() {
            // Every SVID of an update is still valid when the next one arrives (or now).
            let until = updates.get(index + 1).map_or(now, |next| next.at);
            for (id, chain) in &update.svids {
                for at in [update.at, until] {
                    let verified = verify_svid_chain(chain, &trust_domain(), authorities, at)
                        .unwrap_or_else(|e| {
                            panic!("update {index}: {id} is not valid at {at:?}: {e}")
                        });
                    assert_eq!(verified.spiffe_id().as_str(), id);
                }
            }
        }
        let after: Vec<&Update> = updates.iter().filter(|u| u.at > killed).collect();
        let last = after.last().expect("no update on the stream after A died");
        let mut held = ids_of(last);
        held.sort();
        let mut expected: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        expected.sort();
        assert_eq!(held, expected);
        // Renewed through B: the stream carried certificates other than those before the kill.
        let before: Vec<&Vec<Vec<u8>>> = updates
            .iter()
            .filter(|u| u.at <= killed)
            .flat_map(|u| u.svids.iter().map(|(_, chain)| chain))
            .collect();
        assert!(
            last.svids.iter().all(|(_, chain)| !before.contains(&chain)),
            "the SVIDs held at the end were issued before A died"
        );
    }
}

fn ids_of(update: &Update) -> Vec<String> {
    update.svids.iter().map(|(id, _)| id.clone()).collect()
}

/// PostgreSQL crashes (`SIGKILL`) and comes back while two servers take writes and an agent
/// attached to one of them serves a workload: the workload never sees an error, both servers
/// reconnect by themselves and say so, every write they acknowledged is there afterwards, and a
/// change made through one server reaches the other's agent again.
#[test]
fn two_servers_ride_out_a_postgres_crash_under_load() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = crate::pg::Dedicated::start().unwrap_or_else(|e| panic!("no PostgreSQL: {e}"));
    let url = runtime.block_on(cluster.fresh_database());
    let dir = TestDir::new();
    let datastore = format!(
        "kind = \"postgres\"\nconnection_string = {}\n",
        toml_string(&url)
    );
    let mut a = Server::start_on(&dir.join("a"), "instance = \"a\"", &datastore);
    let mut b = Server::start_on(&dir.join("b"), "instance = \"b\"", &datastore);
    let token = b.generate_token();
    let agent_id = spiffe_id(&format!("/spire/agent/join_token/{token}"));
    let me = uid_selector(current_uid());
    let first = spiffe_id("/e2e/ha/pg/first");
    a.create_entry(&first, &agent_id, &[&me], &[]);
    let mut agent = Agent::start(&dir.join("agent"), &b, &token);
    agent.wait_for_svids(None, &[&first]);

    // Load: entries written through A without pause (for a uid that is not ours, so that the
    // workload's own set stays known), and the workload fetching throughout.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, a_socket, agent_id, other) = (
            Arc::clone(&stop),
            a.admin_socket().to_owned(),
            agent_id.clone(),
            uid_selector(current_uid() + 4242),
        );
        std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let id = spiffe_id(&format!("/e2e/ha/pg/load/{n}"));
                let output = lanyard_e2e::CliOutput::run(
                    lanyard_e2e::lanyard()
                        .args(["entry", "create", "--spiffe-id", &id, "--parent-id"])
                        .arg(&agent_id)
                        .args(["--selector", &other, "--output", "json", "--socket"])
                        .arg(&a_socket),
                );
                let created = output.success().then(|| output.json());
                match created.as_ref().map(|c| &c["results"][0]) {
                    Some(result) if result["status"]["code"] == 0 => {
                        let id = result["entry"]["id"].as_str().unwrap().to_owned();
                        acknowledged.push((Instant::now(), id));
                    }
                    // Refused, or failed while PostgreSQL was down: not acknowledged.
                    _ => {}
                }
            }
            acknowledged
        })
    };
    let fetch_all_along = |agent: &Agent, for_how_long: Duration| {
        let since = Instant::now();
        while since.elapsed() < for_how_long {
            let svids = agent
                .fetch_x509()
                .unwrap_or_else(|output| panic!("a workload fetch failed: {output}"));
            assert!(!svids.is_empty());
            for svid in svids {
                svid.verify();
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    fetch_all_along(&agent, Duration::from_secs(2));

    // Down for longer than the servers' write probe interval, so that both notice.
    cluster.kill();
    fetch_all_along(&agent, Duration::from_secs(7));
    cluster.start_again();
    let restarted = Instant::now();
    for (name, server) in [("A", &mut a), ("B", &mut b)] {
        poll(&format!("server {name} to say it is back"), TIMEOUT, || {
            let log = server.process().log();
            let lost = log.find("lost the connection that listens for other servers");
            let back = log.rfind("listening for other servers' changes again");
            match (lost, back) {
                (Some(lost), Some(back)) if back > lost => Ok(()),
                seen => Err(format!("(lost at, back at) = {seen:?}")),
            }
        });
    }
    fetch_all_along(&agent, Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acknowledged = writer.join().unwrap();
    assert!(
        acknowledged.iter().any(|(at, _)| *at > restarted),
        "no write was acknowledged after PostgreSQL came back ({} before)",
        acknowledged.len()
    );

    // Nothing acknowledged is lost: B's view of the store holds every entry A acknowledged.
    let listed = b.cli_json(&["entry", "show"]);
    let held: Vec<&str> = listed["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries in {listed}"))
        .iter()
        .filter_map(|entry| entry["id"].as_str())
        .collect();
    for (_, id) in &acknowledged {
        assert!(
            held.contains(&id.as_str()),
            "entry {id} was acknowledged and is gone"
        );
    }
    // Announcements flow again: an entry made through A reaches the agent behind B.
    let after = spiffe_id("/e2e/ha/pg/after");
    a.create_entry(&after, &agent_id, &[&me], &[]);
    agent.wait_for_svids(None, &[&first, &after]);
    // Both report SERVING again (a probe that failed during the outage succeeds again).
    for server in [&a, &b] {
        poll("the server to report SERVING", TIMEOUT, || {
            let health = server.healthcheck();
            if health.success() {
                Ok(())
            } else {
                Err(health.to_string())
            }
        });
    }
    agent.process().assert_running();
}
