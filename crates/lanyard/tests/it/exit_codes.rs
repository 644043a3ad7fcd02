//! The exit statuses (`cli::Exit`): 0 done, 1 error, 2 usage, 3 `plan --exit-code` with
//! changes pending.

use crate::exceptions::{json, lanyard, succeed, text};
use crate::real_server::start_server;

/// Runs a command that must fail with `code` and one error line, and returns that line.
fn fails_with(code: i32, args: &[&str]) -> String {
    let out = lanyard(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr:?}");
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    stderr
}

#[test]
fn usage_errors_exit_2_whoever_finds_them() {
    // Found by clap.
    for args in [
        &["entry", "create", "--no-such-flag"][..],
        &["entry", "frobnicate"],
        &["jwt", "mint", "--spiffe-id", "spiffe://example.org/a"],
        &["bundle", "show", "--output", "yaml"],
        &["completions", "tcsh"],
    ] {
        let line = fails_with(2, args);
        assert!(
            line.trim_end().ends_with("(see --help)"),
            "{args:?}: {line}"
        );
    }
    // A missing subcommand shows the group's help, on stderr, as a usage error.
    let out = lanyard(&["entry"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("Usage: lanyard entry"));

    // Found by the command, before it connects anywhere.
    let cases: &[(&[&str], &str)] = &[
        (
            &["entry", "create", "--node", "--selector", "unix:uid:1"],
            "--node needs --spiffe-id",
        ),
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/web",
                "--selector",
                "unix:uid:1",
            ],
            "--parent-id (or --node) is required",
        ),
        (
            &["entry", "update", "--entry-id", "some-id"],
            "nothing to update",
        ),
        (&["datastore", "check"], "say which datastore"),
    ];
    for (args, expected) in cases {
        let line = fails_with(2, args);
        assert!(line.contains(expected), "{args:?}: {line}");
        assert!(
            line.trim_end().ends_with("(see --help)"),
            "{args:?}: {line}"
        );
    }
}

#[test]
fn bad_values_and_failures_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("no-server.sock");
    let socket = socket.to_str().unwrap();
    fails_with(1, &["entry", "count", "--socket", socket]);
    fails_with(
        1,
        &["token", "generate", "--ttl", "soon", "--socket", socket],
    );
    // A bad field of a --data file is the file's fault, not the command line's.
    let data = dir.path().join("update.json");
    std::fs::write(&data, r#"{"entries": [{"id": "some-id"}]}"#).unwrap();
    let line = fails_with(
        1,
        &[
            "entry",
            "update",
            "--data",
            data.to_str().unwrap(),
            "--socket",
            socket,
        ],
    );
    assert!(line.contains("entries[0]: nothing to update"), "{line}");
}

#[test]
fn plan_exit_code_tells_changes_from_none() {
    let server = start_server();
    let socket = server.socket.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file_path = dir.path().join("entries.toml");
    let file = file_path.to_str().unwrap();
    std::fs::write(
        &file_path,
        "source = \"team-a\"\n\n[[entry]]\nspiffe_id = \"spiffe://example.org/web\"\nparent_id = \"spiffe://example.org/spire/server\"\nselectors = [\"unix:uid:1000\"]\n",
    )
    .unwrap();

    // Without --exit-code a plan with changes succeeds, as before.
    succeed(&["plan", "-f", file, "--socket", socket]);

    // With it: 3, the plan printed in full and no error line.
    let out = lanyard(&[
        "plan",
        "-f",
        file,
        "--socket",
        socket,
        "--exit-code",
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    let plan = json(&text(&out.stdout));
    assert_eq!(plan["creates"].as_array().unwrap().len(), 1, "{plan}");
    let out = lanyard(&["plan", "-f", file, "--socket", socket, "--exit-code"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stdout).contains("spiffe://example.org/web"));

    // Applied, there is nothing left to change: 0.
    succeed(&["apply", "-f", file, "--socket", socket]);
    let out = lanyard(&["plan", "-f", file, "--socket", socket, "--exit-code"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("No changes."));

    // An error is still 1, and a mistyped flag 2.
    let missing = dir.path().join("missing.toml");
    fails_with(
        1,
        &[
            "plan",
            "-f",
            missing.to_str().unwrap(),
            "--socket",
            socket,
            "--exit-code",
        ],
    );
    fails_with(2, &["plan", "-f", file, "--socket", socket, "--exit-codes"]);
}
