//! The CLI against a real server holding 100,000 entries: far more than fit in one gRPC message
//! (4 MB, about 27,000 entries), so every command that reads all entries must page.

use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use lanyard_core::{EntryId, RegistrationEntry, SpiffeId};
use lanyard_server::datastore::SqlStore;
use serde_json::Value;

use crate::real_server::start_server_with;

const N_ENTRIES: usize = 100_000;

/// A policy with no rules: every entry passes, so `policy check` only counts.
const PASSING_POLICY: &str = "package lanyard\n";

fn lanyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(args)
        .env_remove("LANYARD_SERVER_SOCKET")
        .output()
        .expect("lanyard runs")
}

/// Runs `args` and parses its JSON output, failing with its stderr.
fn json_of(args: &[&str]) -> Value {
    let out = lanyard(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// `N_ENTRIES` ownerless entries, written in one transaction.
async fn seed(path: &std::path::Path) {
    let store = SqlStore::open(path).await.expect("datastore opens");
    let parent: SpiffeId = "spiffe://example.org/spire/agent/join_token/node"
        .parse()
        .expect("valid ID");
    let created_at = SystemTime::now() - Duration::from_secs(3_600);
    let entries = (0..N_ENTRIES)
        .map(|n| {
            RegistrationEntry::new(
                EntryId::new(&format!("entry-{n:06}")).expect("valid ID"),
                format!("spiffe://example.org/workload/{n}")
                    .parse()
                    .expect("valid ID"),
                parent.clone(),
                [format!("unix:uid:{n}").parse().expect("valid selector")]
                    .into_iter()
                    .collect(),
                created_at,
            )
        })
        .collect();
    store.create_entries(entries).await.expect("seeded");
    store.close().await;
}

#[test]
fn commands_that_read_every_entry_see_all_100k() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let datastore = dir.path().join("data").join("datastore.sqlite3");
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(seed(&datastore));
    let policy = dir.path().join("pass.rego");
    std::fs::write(&policy, PASSING_POLICY).expect("policy written");
    let seeded = started.elapsed();
    let server = start_server_with(dir, "");
    let started_server = started.elapsed();
    let socket = server.socket.to_str().expect("UTF-8 path");

    let shown = json_of(&["entry", "show", "--socket", socket, "--output", "json"]);
    let shown = shown["entries"].as_array().expect("an entry list");
    assert_eq!(shown.len(), N_ENTRIES);
    assert_eq!(shown[0]["id"], "entry-000000");
    assert_eq!(
        shown[N_ENTRIES - 1]["id"],
        format!("entry-{:06}", N_ENTRIES - 1)
    );

    let shown_at = started.elapsed();
    let ownerless = json_of(&[
        "report",
        "ownerless",
        "--socket",
        socket,
        "--output",
        "json",
    ]);
    assert_eq!(
        ownerless["entries"]
            .as_array()
            .expect("an entry list")
            .len(),
        N_ENTRIES
    );

    let reported_at = started.elapsed();
    let checked = json_of(&[
        "policy",
        "check",
        "--policy",
        policy.to_str().expect("UTF-8 path"),
        "--socket",
        socket,
        "--output",
        "json",
    ]);
    assert_eq!(checked["checked"], N_ENTRIES);
    assert_eq!(checked["failing"], 0);

    eprintln!(
        "{N_ENTRIES} entries: seeded at {seeded:?}, server up at {started_server:?}, \
         entry show done at {shown_at:?}, report at {reported_at:?}, policy check at {:?}",
        started.elapsed()
    );
}
