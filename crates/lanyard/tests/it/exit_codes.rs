//! The exit statuses (`cli::Exit`): 0 done, 1 error, 2 usage.

use crate::exceptions::{lanyard, text};

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
