//! `lanyard exception`, `lanyard grant` and entry writes under the policy, against a real server.
//! The server runs the shipped baseline policy; every outcome is checked on the server
//! afterwards, through the CLI's own reads.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::real_server::{RunningServer, start_server_with};

pub(crate) fn lanyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(args)
        .env_remove("LANYARD_SERVER_SOCKET")
        .output()
        .expect("lanyard runs")
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a command that must succeed and returns its stdout.
pub(crate) fn succeed(args: &[&str]) -> String {
    let out = lanyard(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs a command that must fail with one error line (exit 1) and returns that line.
pub(crate) fn fail(args: &[&str]) -> String {
    let out = lanyard(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr:?}");
    stderr
}

pub(crate) fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|err| panic!("not JSON ({err}): {stdout}"))
}

pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// RFC 3339 text `days` from now.
pub(crate) fn in_days(days: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(days * 86_400))
        .to_string()
}

/// A server running the shipped baseline policy.
pub(crate) fn start_with_baseline() -> RunningServer {
    let policy = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/policy/baseline.rego")
        .canonicalize()
        .unwrap();
    start_server_with(
        tempfile::tempdir().unwrap(),
        &format!("[policy]\npath = {:?}\n", policy.display().to_string()),
    )
}

/// The entry with this ID, as `entry show --output json` prints it.
pub(crate) fn show_entry(socket: &str, entry_id: &str) -> Value {
    let shown = json(&succeed(&[
        "entry",
        "show",
        "--socket",
        socket,
        "--entry-id",
        entry_id,
        "--output",
        "json",
    ]));
    shown["entries"][0].clone()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

const PARENT: &str = "spiffe://example.org/spire/agent/join_token/node-1";

#[test]
fn entry_writes_are_judged_by_the_policy() {
    let server = start_with_baseline();
    let socket = server.socket.to_str().unwrap();
    let expires = in_days(7);
    let create = |extra: &[&str]| {
        let mut args = vec![
            "entry",
            "create",
            "--socket",
            socket,
            "--spiffe-id",
            "spiffe://example.org/web",
            "--parent-id",
            PARENT,
            "--selector",
            "unix:uid:1000",
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };

    // No owner: refused, with the rule and its fix on the one error line.
    let line = fail(&strs(&create(&[
        "--reason",
        "serves the web tier",
        "--expires-at",
        &expires,
    ])));
    assert!(line.starts_with("error: entry create: "), "{line}");
    assert!(line.contains("owner-required"), "{line}");
    assert!(line.contains("fix: set --owner"), "{line}");
    let count = succeed(&["entry", "count", "--socket", socket]);
    assert!(count.starts_with("0 "), "nothing was stored: {count}");

    // Owner, reason and expiry: accepted and stored together.
    let created = json(&succeed(&strs(&create(&[
        "--owner",
        "team-web",
        "--reason",
        "serves the web tier",
        "--expires-at",
        &expires,
        "--output",
        "json",
    ]))));
    assert_eq!(created["results"][0]["status"]["code"], 0, "{created}");
    let entry_id = created["results"][0]["entry"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let stored = show_entry(socket, &entry_id);
    assert_eq!(stored["owner"], "team-web", "{stored}");
    assert_eq!(stored["reason"], "serves the web tier", "{stored}");

    // An update is judged as the whole entry it makes: a TTL over 24h is refused and the
    // entry stays as it was.
    let line = fail(&[
        "entry",
        "update",
        "--socket",
        socket,
        "--entry-id",
        &entry_id,
        "--x509-svid-ttl",
        "48h",
    ]);
    assert!(line.contains("x509-ttl-max-24h"), "{line}");
    assert_eq!(show_entry(socket, &entry_id)["x509_svid_ttl"], 0);

    // A metadata-only update keeps the entry's fields and the other metadata.
    succeed(&[
        "entry",
        "update",
        "--socket",
        socket,
        "--entry-id",
        &entry_id,
        "--ticket",
        "CHG-7",
    ]);
    let stored = show_entry(socket, &entry_id);
    assert_eq!(
        (&stored["owner"], &stored["ticket"]),
        (&Value::from("team-web"), &Value::from("CHG-7")),
        "{stored}"
    );
    assert_eq!(stored["selectors"][0]["value"], "uid:1000", "{stored}");
}

#[test]
fn exceptions_let_an_admin_entry_in_and_follow_their_lifecycle() {
    let server = start_with_baseline();
    let socket = server.socket.to_str().unwrap();
    let admin_id = "spiffe://example.org/ops/admin";
    let expires = in_days(7);
    let create_admin = |output: &str| {
        lanyard(&[
            "entry",
            "create",
            "--socket",
            socket,
            "--spiffe-id",
            admin_id,
            "--parent-id",
            PARENT,
            "--selector",
            "unix:uid:0",
            "--admin",
            "--owner",
            "team-ops",
            "--reason",
            "runs the server's tooling",
            "--expires-at",
            &expires,
            "--output",
            output,
        ])
    };

    let out = create_admin("pretty");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("admin-needs-exception"), "{stderr}");
    assert!(stderr.contains("fix: create an exception"), "{stderr}");

    // The policy's exception rules: admin waivers need a ticket.
    let exception_args = |extra: &[&str]| {
        let mut args = vec![
            "exception",
            "create",
            "--socket",
            socket,
            "--owner",
            "team-ops",
            "--reason",
            "tooling migration",
            "--rule",
            "admin-needs-exception",
            "--spiffe-id",
            admin_id,
            "--duration",
            "1d",
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let line = fail(&strs(&exception_args(&[])));
    assert!(line.contains("exception-ticket-required"), "{line}");

    let before = now();
    let exception = json(&succeed(&strs(&exception_args(&[
        "--ticket", "CHG-9", "--output", "json",
    ]))));
    let exception_id = exception["id"].as_str().unwrap().to_owned();
    assert!(!exception_id.is_empty(), "{exception}");
    assert_eq!(exception["status"], "active");
    assert_eq!(exception["spiffe_id_pattern"], admin_id);
    assert!(!exception["created_by"].as_str().unwrap().is_empty());
    let expires_at = exception["expires_at"].as_i64().unwrap();
    assert!(
        (before + 86_400 - 5..=now() + 86_400 + 5).contains(&expires_at),
        "{exception}"
    );

    // Now the admin entry is accepted, and says under which exception.
    let out = create_admin("json");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let created = json(&text(&out.stdout));
    assert_eq!(
        created["results"][0]["exception_ids"],
        serde_json::json!([exception_id]),
        "{created}"
    );
    assert_eq!(created["results"][0]["entry"]["admin"], true);

    // list, show.
    let listed = succeed(&["exception", "list", "--socket", socket]);
    let row = listed
        .lines()
        .find(|line| line.starts_with(&exception_id))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        row.contains("active") && row.contains("admin-needs-exception"),
        "{row}"
    );
    let shown = succeed(&["exception", "show", "--socket", socket, &exception_id]);
    assert!(shown.contains("Ticket           : CHG-9"), "{shown}");
    let line = fail(&["exception", "show", "--socket", socket, "no-such-exception"]);
    assert!(line.contains("NotFound"), "{line}");

    // extend: the policy caps each extension at 30 days from now.
    let line = fail(&[
        "exception",
        "extend",
        "--socket",
        socket,
        &exception_id,
        "--duration",
        "40d",
        "--reason",
        "still migrating",
    ]);
    assert!(line.contains("exception-max-30d"), "{line}");
    let extended = json(&succeed(&[
        "exception",
        "extend",
        "--socket",
        socket,
        &exception_id,
        "--duration",
        "20d",
        "--reason",
        "still migrating",
        "--output",
        "json",
    ]));
    assert!(
        extended["expires_at"].as_i64().unwrap() > expires_at + 18 * 86_400,
        "{extended}"
    );

    // revoke, once.
    let revoked = json(&succeed(&[
        "exception",
        "revoke",
        "--socket",
        socket,
        &exception_id,
        "--reason",
        "migration done",
        "--output",
        "json",
    ]));
    assert_eq!(revoked["status"], "revoked", "{revoked}");
    assert!(revoked["revoked_at"].as_i64().unwrap() >= before);
    let line = fail(&[
        "exception",
        "revoke",
        "--socket",
        socket,
        &exception_id,
        "--reason",
        "again",
    ]);
    assert!(line.contains("FailedPrecondition"), "{line}");

    // The default list is active exceptions only; --all shows the revoked one.
    let listed = json(&succeed(&[
        "exception",
        "list",
        "--socket",
        socket,
        "--output",
        "json",
    ]));
    assert_eq!(listed["exceptions"], serde_json::json!([]), "{listed}");
    let listed = succeed(&["exception", "list", "--all", "--socket", socket]);
    assert!(
        listed
            .lines()
            .any(|line| line.starts_with(&exception_id) && line.contains("revoked")),
        "{listed}"
    );

    // Without the exception, a second admin entry is refused again.
    let line = fail(&[
        "entry",
        "create",
        "--socket",
        socket,
        "--spiffe-id",
        admin_id,
        "--parent-id",
        PARENT,
        "--selector",
        "unix:uid:1",
        "--admin",
        "--owner",
        "team-ops",
        "--reason",
        "again",
        "--expires-at",
        &expires,
    ]);
    assert!(line.contains("admin-needs-exception"), "{line}");
}

#[test]
fn grants_end_on_their_own_and_revoke_only_grants() {
    let server = start_with_baseline();
    let socket = server.socket.to_str().unwrap();
    let before = now();
    let granted = json(&succeed(&[
        "grant",
        "create",
        "--socket",
        socket,
        "--spiffe-id",
        "spiffe://example.org/debug",
        "--parent-id",
        PARENT,
        "--selector",
        "unix:uid:1000",
        "--duration",
        "1h",
        "--reason",
        "incident 42",
        "--owner",
        "alice",
        "--output",
        "json",
    ]));
    assert_eq!(granted["source"], "grant", "{granted}");
    let grant_id = granted["entry"]["id"].as_str().unwrap().to_owned();
    let ends_at = granted["ends_at"].as_i64().unwrap();
    assert!(
        (before + 3600 - 5..=now() + 3600 + 5).contains(&ends_at),
        "{granted}"
    );
    let stored = show_entry(socket, &grant_id);
    assert_eq!(stored["expires_at"], ends_at, "{stored}");
    assert_eq!(stored["owner"], "alice", "{stored}");

    // Pretty output names the entry and the end; the owner defaults to the current user.
    let out = succeed(&[
        "grant",
        "create",
        "--socket",
        socket,
        "--spiffe-id",
        "spiffe://example.org/debug2",
        "--parent-id",
        PARENT,
        "--selector",
        "unix:uid:1001",
        "--duration",
        "30m",
        "--reason",
        "incident 43",
    ]);
    assert!(
        out.contains("as entry ") && out.contains("Ends at "),
        "{out}"
    );

    let listed = json(&succeed(&[
        "grant", "list", "--socket", socket, "--output", "json",
    ]));
    let grants = listed["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 2, "{listed}");
    assert!(grants.iter().all(|g| g["status"] == "active"), "{listed}");

    // Revoking ends it now.
    succeed(&[
        "grant", "revoke", "--socket", socket, &grant_id, "--reason", "fixed",
    ]);
    let after = show_entry(socket, &grant_id);
    let expires_at = after["expires_at"].as_i64().unwrap();
    assert!(
        (before..=now()).contains(&expires_at),
        "expiry moved to now: {after}"
    );
    assert_eq!(after["owner"], "alice", "metadata kept: {after}");
    let listed = succeed(&["grant", "list", "--socket", socket]);
    let row = listed
        .lines()
        .find(|line| line.starts_with(&grant_id))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(row.contains("ended"), "{row}");
    let line = fail(&["grant", "revoke", "--socket", socket, &grant_id]);
    assert!(line.contains("already ended"), "{line}");

    // An ordinary entry is not a grant.
    let created = json(&succeed(&[
        "entry",
        "create",
        "--socket",
        socket,
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        PARENT,
        "--selector",
        "unix:uid:2000",
        "--owner",
        "team-web",
        "--reason",
        "web",
        "--expires-at",
        &in_days(7),
        "--output",
        "json",
    ]));
    let entry_id = created["results"][0]["entry"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let expiry = show_entry(socket, &entry_id)["expires_at"].clone();
    let line = fail(&["grant", "revoke", "--socket", socket, &entry_id]);
    assert!(line.contains("is not a grant"), "{line}");
    assert_eq!(show_entry(socket, &entry_id)["expires_at"], expiry);
}
