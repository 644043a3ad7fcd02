//! `lanyard revoke` against a real server: a dry run stores nothing, revocations of each kind
//! are listed and shown (with the agents that have not applied them), JSON output mirrors the
//! records, and bad input fails with one line or a usage error.

use crate::exceptions::{fail, json, lanyard, succeed};
use crate::real_server::start_server;

#[test]
fn revocations_are_made_listed_and_shown_from_the_cli() {
    let server = start_server();
    let socket = server.socket.to_str().unwrap().to_owned();
    let record = [
        "--owner",
        "security",
        "--reason",
        "key leaked",
        "--socket",
        &socket,
    ];
    let with = |head: &[&str], tail: &[&str]| -> Vec<String> {
        head.iter()
            .chain(record.iter())
            .chain(tail.iter())
            .map(|s| (*s).to_owned())
            .collect()
    };
    let run = |args: Vec<String>| succeed(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let dry = json(&run(with(
        &["revoke", "x509", "--spiffe-id", "spiffe://example.org/web"],
        &["--dry-run", "--output", "json"],
    )));
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["revocation"]["kind"], "spiffe-id");
    assert_eq!(dry["revocation"]["sequence"], 0);
    let listed = json(&succeed(&[
        "revoke", "list", "--socket", &socket, "--output", "json",
    ]));
    assert_eq!(
        listed["revocations"].as_array().unwrap().len(),
        0,
        "a dry run stores nothing"
    );

    let made = json(&run(with(
        &["revoke", "x509", "--serial", "00123456789"],
        &["--ticket", "INC-9", "--output", "json"],
    )));
    assert_eq!(made["revocation"]["value"], "123456789");
    assert_eq!(made["revocation"]["sequence"], 1);
    assert_eq!(made["revocation"]["ticket"], "INC-9");
    assert_eq!(made["serials"][0]["serial"], "123456789");
    let id = made["revocation"]["id"].as_str().unwrap().to_owned();
    let pretty = run(with(&["revoke", "jwt", "--jti", "abc-1"], &[]));
    assert!(pretty.contains("jwt-id abc-1"), "{pretty}");
    assert!(pretty.contains("Sequence"), "{pretty}");

    let listed = succeed(&["revoke", "list", "--socket", &socket]);
    assert!(listed.contains(&id) && listed.contains("abc-1"), "{listed}");
    let shown = json(&succeed(&[
        "revoke", "show", &id, "--socket", &socket, "--output", "json",
    ]));
    assert_eq!(shown["revocation"]["owner"], "security");
    assert_eq!(shown["serials"].as_array().unwrap().len(), 1);
    assert_eq!(shown["acknowledged"].as_array().unwrap().len(), 0);
    let shown = succeed(&["revoke", "show", &id, "--socket", &socket]);
    assert!(shown.contains("Not yet applied by"), "{shown}");

    // Refusals: the server's reason in one line; flags clap refuses are usage errors.
    let error = fail(
        &with(&["revoke", "x509", "--serial", "0xff"], &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(error.contains("not a decimal number"), "{error}");
    let error = fail(
        &with(&["revoke", "x509", "--entry-id", "missing"], &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(error.contains("not found"), "{error}");
    let error = fail(&["revoke", "show", "nope", "--socket", &socket]);
    assert!(error.contains("not found"), "{error}");
    let two = lanyard(&[
        "revoke",
        "x509",
        "--serial",
        "1",
        "--spiffe-id",
        "spiffe://example.org/x",
        "--owner",
        "o",
        "--reason",
        "r",
        "--socket",
        &socket,
    ]);
    assert_eq!(two.status.code(), Some(2));
    let none = lanyard(&[
        "revoke", "x509", "--owner", "o", "--reason", "r", "--socket", &socket,
    ]);
    assert_eq!(none.status.code(), Some(2));
}
