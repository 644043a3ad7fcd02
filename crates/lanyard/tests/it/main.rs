//! Runs the built `lanyard` binary: help for every command, the one-line error when the
//! server's socket is not there, and the entry and health commands against an in-memory fake
//! of the admin socket (`fake_server`). Tests against the real server belong to the
//! workspace's end-to-end crate; they point `--socket` at a temporary socket the same way.

#![allow(clippy::unwrap_used)]

mod conflicts;
mod datastore;
mod declare;
mod dev;
mod exceptions;
mod exit_codes;
mod expiry;
mod fake_server;
mod federation;
mod generate;
mod governance;
mod json_output;
mod paging;
#[path = "../../../lanyard-server/tests/it/pg.rs"]
mod pg;
mod real_server;
mod report;
mod revoke;
mod signals;

use std::path::Path;
use std::process::{Command, Output};

/// Every leaf command, with arguments that parse, so that the only failure left is the
/// connection.
const SERVER_COMMANDS: &[&[&str]] = &[
    &[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        "spiffe://example.org/spire/server",
        "--selector",
        "unix:uid:1000",
    ],
    &["entry", "show"],
    &["entry", "show", "--entry-id", "some-id"],
    &["entry", "update", "--entry-id", "some-id", "--hint", "h"],
    &["entry", "delete", "--entry-id", "some-id"],
    &["entry", "count"],
    &["agent", "list"],
    &[
        "agent",
        "show",
        "--spiffe-id",
        "spiffe://example.org/spire/agent/x",
    ],
    &[
        "agent",
        "ban",
        "--spiffe-id",
        "spiffe://example.org/spire/agent/x",
    ],
    &[
        "agent",
        "evict",
        "--spiffe-id",
        "spiffe://example.org/spire/agent/x",
    ],
    &["agent", "count"],
    &["token", "generate"],
    &["bundle", "show"],
    &["bundle", "list"],
    &["bundle", "delete", "--id", "partner.org"],
    &[
        "federation",
        "create",
        "--trust-domain",
        "partner.org",
        "--bundle-endpoint-url",
        "https://partner.org/bundle",
        "--bundle-endpoint-profile",
        "https_web",
    ],
    &["federation", "list"],
    &["federation", "show", "--trust-domain", "partner.org"],
    &[
        "federation",
        "update",
        "--trust-domain",
        "partner.org",
        "--bundle-endpoint-url",
        "https://partner.org/bundle",
        "--bundle-endpoint-profile",
        "https_web",
    ],
    &["federation", "delete", "--trust-domain", "partner.org"],
    &["federation", "refresh", "--trust-domain", "partner.org"],
    &["x509", "mint", "--spiffe-id", "spiffe://example.org/web"],
    &[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--audience",
        "api",
    ],
    &["exception", "list"],
    &["exception", "show", "some-id"],
    &["exception", "revoke", "some-id", "--reason", "done"],
    &["grant", "list"],
    &["grant", "revoke", "some-id"],
    &["report", "stale"],
    &["report", "expiring"],
    &["report", "exceptions"],
    &["report", "ownerless"],
    &["report", "usage", "some-id"],
    &["report", "holders"],
];

const GROUPS: &[&str] = &[
    "entry",
    "agent",
    "token",
    "bundle",
    "federation",
    "x509",
    "jwt",
    "server",
    "datastore",
    "exception",
    "grant",
    "report",
];

fn lanyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(args)
        .env_remove("LANYARD_SERVER_SOCKET")
        .output()
        .expect("the lanyard binary runs")
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8")
}

fn assert_one_error_line(output: &Output, args: &[&str], must_mention: &str) -> String {
    assert_one_error_line_with(1, output, args, must_mention)
}

fn assert_one_error_line_with(
    code: i32,
    output: &Output,
    args: &[&str],
    must_mention: &str,
) -> String {
    let stderr = stderr_of(output);
    assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: stderr is not one line: {stderr:?}"
    );
    assert!(lines[0].contains(must_mention), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    lines[0].to_owned()
}

#[test]
fn a_missing_socket_is_one_error_line_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("no-server.sock");
    let socket = socket.to_str().expect("utf-8 path");
    for command in SERVER_COMMANDS {
        let args = [*command, &["--socket", socket]].concat();
        let output = lanyard(&args);
        let line = assert_one_error_line(&output, &args, socket);
        let expected_prefix = format!("error: {} {}: ", command[0], command[1]);
        assert!(line.starts_with(&expected_prefix), "{args:?}: {line}");
        assert!(output.stdout.is_empty(), "{args:?} printed to stdout");
    }
}

#[test]
fn the_socket_comes_from_the_environment_too() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("from-env.sock");
    let output = Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(["entry", "count"])
        .env("LANYARD_SERVER_SOCKET", &socket)
        .output()
        .expect("runs");
    assert_one_error_line(
        &output,
        &["entry", "count"],
        socket.to_str().expect("utf-8"),
    );
}

#[test]
fn the_default_socket_is_the_servers() {
    let default = "/tmp/lanyard/server/private/api.sock";
    if Path::new(default).exists() {
        // A real server is running here; this test only covers the error path.
        return;
    }
    let output = lanyard(&["entry", "count"]);
    assert_one_error_line(&output, &["entry", "count"], default);
}

#[test]
fn healthcheck_reports_an_unreachable_server_as_unhealthy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("no-server.sock");
    let socket = socket.to_str().expect("utf-8 path");
    let args = ["server", "healthcheck", "--socket", socket];
    let output = lanyard(&args);
    let line = assert_one_error_line(&output, &args, socket);
    assert!(line.starts_with("Server is unhealthy: "), "{line}");
}

#[test]
fn bad_values_fail_before_connecting() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "example.org/web",
                "--parent-id",
                "spiffe://example.org/a",
                "--selector",
                "unix:uid:1",
            ],
            "error: entry create: spiffe_id is invalid: ",
        ),
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/web",
                "--parent-id",
                "spiffe://example.org/a",
                "--selector",
                "uid",
            ],
            "error: entry create: invalid selector \"uid\"",
        ),
        (
            &["token", "generate", "--ttl", "soon"],
            "error: token generate: --ttl is invalid: invalid duration \"soon\"",
        ),
        (
            &["entry", "create", "--data", "/nonexistent/entries.json"],
            "error: entry create: cannot read /nonexistent/entries.json",
        ),
    ];
    for (args, expected) in cases {
        let output = lanyard(args);
        let line = assert_one_error_line(&output, args, expected);
        assert!(line.starts_with(expected), "{args:?}: {line}");
    }
}

#[test]
fn usage_errors_are_one_line_too() {
    let cases: &[&[&str]] = &[
        &["entry", "create", "--no-such-flag"],
        &["entry", "frobnicate"],
        &["jwt", "mint", "--spiffe-id", "spiffe://example.org/a"],
        &["bundle", "show", "--format", "der"],
    ];
    for args in cases {
        let output = lanyard(args);
        let line = assert_one_error_line_with(2, &output, args, "error:");
        assert!(line.starts_with("error: "), "{args:?}: {line}");
    }
}

#[test]
fn help_works_for_every_command() {
    let output = lanyard(&["--help"]);
    assert!(output.status.success());
    let top = String::from_utf8(output.stdout).expect("utf-8");
    for group in GROUPS {
        assert!(top.contains(group), "top-level help lacks {group}: {top}");
        let output = lanyard(&[group, "--help"]);
        assert!(
            output.status.success(),
            "{group} --help: {}",
            stderr_of(&output)
        );
    }
    let mut leaves: Vec<Vec<&str>> = SERVER_COMMANDS
        .iter()
        .map(|command| command[..2].to_vec())
        .collect();
    leaves.push(vec!["bundle", "set"]);
    leaves.push(vec!["server", "healthcheck"]);
    for leaf in leaves {
        let args = [&leaf[..], &["--help"]].concat();
        let output = lanyard(&args);
        assert!(output.status.success(), "{args:?}: {}", stderr_of(&output));
        let help = String::from_utf8(output.stdout).expect("utf-8");
        assert!(help.contains("Usage: lanyard"), "{args:?}: {help}");
        if leaf != ["server", "healthcheck"] {
            assert!(help.contains("--output"), "{args:?} lacks --output: {help}");
        }
        assert!(help.contains("--socket"), "{args:?} lacks --socket: {help}");
    }
}

#[test]
fn a_missing_subcommand_fails() {
    let output = lanyard(&["entry"]);
    assert_eq!(output.status.code(), Some(2));
}

// ---------------------------------------------------------------------------------------------
// Against the fake server

use fake_server::FakeServer;

/// Runs the binary with `--socket` pointing at `server`, off the async runtime that serves it.
async fn lanyard_at(server: &FakeServer, args: &[&str]) -> Output {
    let mut args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    args.push("--socket".into());
    args.push(server.socket().to_str().expect("utf-8").to_owned());
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lanyard(&args)
    })
    .await
    .expect("the command thread finishes")
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

fn assert_success(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what}: {:?} {}",
        output.status,
        stderr_of(output)
    );
    assert!(output.stderr.is_empty(), "{what}: {}", stderr_of(output));
    stdout_of(output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_passes_against_a_serving_server() {
    let server = FakeServer::start().await;
    let output = lanyard_at(&server, &["server", "healthcheck"]).await;
    assert_eq!(
        assert_success(&output, "healthcheck"),
        "Server is healthy.\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_round_trip_through_spires_entry_api() {
    let server = FakeServer::start().await;

    let output = lanyard_at(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/web",
            "--parent-id",
            "spiffe://example.org/spire/agent/join_token/abc",
            "--selector",
            "unix:uid:1000",
            "--x509-svid-ttl",
            "1h",
        ],
    )
    .await;
    let text = assert_success(&output, "entry create");
    assert!(text.starts_with("Entry ID         : entry-1\n"), "{text}");
    assert!(text.contains("X509-SVID TTL    : 1h\n"), "{text}");
    {
        let state = server.state.lock().expect("state");
        assert_eq!(state.entries.len(), 1);
    }

    // A batch file: one new entry and one that already exists.
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("entries.json");
    std::fs::write(
        &data,
        r#"{"entries": [
            {"spiffe_id": "spiffe://example.org/db", "parent_id": "spiffe://example.org/spire/server",
             "selectors": ["unix:uid:1001"]},
            {"spiffe_id": "spiffe://example.org/web",
             "parent_id": "spiffe://example.org/spire/agent/join_token/abc",
             "selectors": [{"type": "unix", "value": "uid:1000"}]}
        ]}"#,
    )
    .expect("write");
    let output = lanyard_at(
        &server,
        &["entry", "create", "--data", data.to_str().expect("utf-8")],
    )
    .await;
    let line = assert_one_error_line(&output, &["entry", "create"], "1 of 2 entries failed");
    assert_eq!(line, "error: entry create: 1 of 2 entries failed");
    let text = stdout_of(&output);
    assert!(text.contains("Entry ID         : entry-2\n"), "{text}");
    assert!(
        text.contains("Failed to create the following entry (code: AlreadyExists, msg: \"similar entry already exists\"):"),
        "{text}"
    );

    // Show follows the page tokens (the fake pages one entry at a time).
    let output = lanyard_at(&server, &["entry", "show"]).await;
    let text = assert_success(&output, "entry show");
    assert!(text.starts_with("Found 2 entries\n"), "{text}");
    assert!(
        !text.contains("Owner"),
        "a SPIRE server keeps no owner: {text}"
    );

    let output = lanyard_at(
        &server,
        &[
            "entry",
            "show",
            "--spiffe-id",
            "spiffe://example.org/db",
            "--output",
            "json",
        ],
    )
    .await;
    let json: serde_json::Value =
        serde_json::from_str(&assert_success(&output, "entry show json")).expect("json");
    assert_eq!(json["entries"].as_array().map(Vec::len), Some(1));
    assert_eq!(json["entries"][0]["id"], "entry-2");
    assert_eq!(
        json["entries"][0]["spiffe_id"],
        serde_json::json!({"trust_domain": "example.org", "path": "/db"})
    );

    // Update changes only what is given.
    let output = lanyard_at(
        &server,
        &["entry", "update", "--entry-id", "entry-1", "--hint", "blue"],
    )
    .await;
    let text = assert_success(&output, "entry update");
    assert!(text.contains("Hint             : blue\n"), "{text}");
    {
        let state = server.state.lock().expect("state");
        assert_eq!(
            state.update_masks.last(),
            Some(&lanyard_proto::spire::api::types::EntryMask {
                hint: true,
                ..Default::default()
            })
        );
        assert_eq!(
            state.entries[0].x509_svid_ttl, 3600,
            "untouched by the update"
        );
    }

    let output = lanyard_at(
        &server,
        &["entry", "update", "--entry-id", "entry-1", "--admin"],
    )
    .await;
    let text = assert_success(&output, "entry update --admin");
    assert!(text.contains("Admin            : true\n"), "{text}");
    assert!(text.contains("Hint             : blue\n"), "{text}");

    let output = lanyard_at(&server, &["entry", "count"]).await;
    assert_eq!(
        assert_success(&output, "entry count"),
        "2 registration entries\n"
    );

    let output = lanyard_at(
        &server,
        &[
            "entry",
            "delete",
            "--entry-id",
            "entry-2",
            "--entry-id",
            "nope",
        ],
    )
    .await;
    assert_one_error_line(&output, &["entry", "delete"], "1 of 2 entries failed");
    let text = stdout_of(&output);
    assert!(text.contains("Deleted entry with ID: entry-2\n"), "{text}");
    assert!(
        text.contains(
            "Failed to delete entry with ID nope (code: NotFound, msg: \"entry not found\")"
        ),
        "{text}"
    );

    let output = lanyard_at(&server, &["entry", "show", "--entry-id", "nope"]).await;
    let line = assert_one_error_line(&output, &["entry", "show"], "nope");
    assert_eq!(
        line,
        "error: entry show: cannot get entry nope: entry not found (NotFound)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_the_metadata_service_still_shows_entries() {
    let server = FakeServer::start().await;
    let create = [
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        "spiffe://example.org/spire/server",
        "--selector",
        "unix:uid:1",
    ];
    assert_success(&lanyard_at(&server, &create).await, "plain create");
    let output = lanyard_at(&server, &["entry", "show"]).await;
    let text = assert_success(&output, "entry show");
    assert!(text.starts_with("Found 1 entry\n"), "{text}");
    assert!(!text.contains("Owner"), "{text}");

    // Asking for governance fields that the server cannot store is an item failure.
    let output = lanyard_at(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/db",
            "--parent-id",
            "spiffe://example.org/spire/server",
            "--selector",
            "unix:uid:2",
            "--owner",
            "team-db",
        ],
    )
    .await;
    assert_one_error_line(&output, &["entry", "create"], "1 of 1 entry failed");
    let text = stdout_of(&output);
    assert!(
        text.contains(
            "Failed to set the owner, reason and ticket of entry entry-2 (code: Unimplemented"
        ),
        "{text}"
    );
}
