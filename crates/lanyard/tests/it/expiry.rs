//! Entry expiries at the edge of what certificates can hold: the server refuses an expiry
//! after 9999-12-31T23:59:59Z, and `entry show` prints any expiry a datastore may already hold
//! (one written before that check, up to i64::MAX seconds) instead of panicking.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::{EntryId, RegistrationEntry};
use lanyard_server::datastore::{Datastore as _, SqlStore};

use crate::real_server::start_server_with;
use crate::{assert_one_error_line, lanyard};

/// An entry whose expiry only a datastore written before the check could hold.
async fn seed_far_future_entry(path: &std::path::Path) {
    let store = SqlStore::open(path).await.expect("datastore opens");
    let mut entry = RegistrationEntry::new(
        EntryId::new("far-future").expect("valid ID"),
        "spiffe://example.org/far-future".parse().expect("valid ID"),
        "spiffe://example.org/spire/agent/join_token/node"
            .parse()
            .expect("valid ID"),
        ["unix:uid:1000".parse().expect("valid selector")]
            .into_iter()
            .collect(),
        SystemTime::now(),
    );
    entry.expires_at = UNIX_EPOCH.checked_add(Duration::from_secs(i64::MAX as u64));
    assert!(entry.expires_at.is_some());
    store.create_entry(entry).await.expect("seeded");
    store.close().await;
}

fn show(socket: &str) -> String {
    let out = lanyard(&["entry", "show", "--socket", socket]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "entry show: {stderr}");
    assert!(!stderr.contains("panicked"), "entry show: {stderr}");
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn expiries_past_year_9999_are_refused_and_never_break_entry_show() {
    let dir = tempfile::tempdir().expect("temp dir");
    let datastore = dir.path().join("data").join("datastore.sqlite3");
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(seed_far_future_entry(&datastore));
    let server = start_server_with(dir, "");
    let socket = server.socket.to_str().expect("UTF-8 path");

    // What an older server let in is shown, as Unix seconds.
    let shown = show(socket);
    assert!(
        shown.contains("9223372036854775807 (Unix seconds)"),
        "{shown}"
    );

    let create = |name: &str, expires_at: &str| {
        let path = format!("spiffe://example.org/{name}");
        let args = [
            "entry",
            "create",
            "--socket",
            socket,
            "--spiffe-id",
            &path,
            "--parent-id",
            "spiffe://example.org/spire/agent/join_token/node",
            "--selector",
            "unix:uid:1001",
            "--expires-at",
            expires_at,
        ];
        (lanyard(&args), args.map(str::to_owned))
    };
    // 10000-01-01T00:00:00Z and i64::MAX seconds are refused, each with one line saying why.
    for (name, expires_at) in [("y10k", "253402300800"), ("max", "9223372036854775807")] {
        let (out, args) = create(name, expires_at);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_one_error_line(&out, &args, "after 9999-12-31T23:59:59Z");
    }
    // The last second a certificate can hold is accepted, and shown as a date.
    let (out, _) = create("y9999", "9999-12-31T23:59:59Z");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = show(socket);
    assert!(shown.contains("9999-12-31T23:59:59Z"), "{shown}");
    assert!(!shown.contains("spiffe://example.org/y10k"), "{shown}");
    assert!(shown.contains("Found 2 entries"), "{shown}");
}
