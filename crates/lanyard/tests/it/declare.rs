//! `lanyard plan|apply` against a real server running the shipped baseline policy: a file is
//! applied, planned again to nothing, edited and pruned; entries the file does not own are
//! never changed or deleted.

use std::path::Path;

use serde_json::Value;

use crate::exceptions::{
    fail, in_days, json, lanyard, show_entry, start_with_baseline, succeed, text,
};

const PARENT: &str = "spiffe://example.org/spire/agent/join_token/node-1";

/// One `[[entry]]` table with an owner, a reason and an expiry the baseline accepts (30
/// days from when the test started, the same in every version of the file).
fn entry_table(path: &str, uid: u32, extra: &str) -> String {
    static EXPIRES: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    format!(
        "[[entry]]\nspiffe_id = \"spiffe://example.org/{path}\"\nparent_id = \"{PARENT}\"\nselectors = [\"unix:uid:{uid}\"]\nowner = \"team-a\"\nreason = \"serves {path}\"\nexpires_at = \"{}\"\n{extra}\n",
        EXPIRES.get_or_init(|| in_days(30))
    )
}

fn write_file(path: &Path, tables: &[String]) {
    let mut text = "source = \"team-a\"\n\n".to_owned();
    for table in tables {
        text.push_str(table);
    }
    std::fs::write(path, text).unwrap();
}

/// Every entry on the server as `entry show --output json` prints them.
fn entries(socket: &str) -> Vec<Value> {
    let shown = json(&succeed(&[
        "entry", "show", "--socket", socket, "--output", "json",
    ]));
    shown["entries"].as_array().unwrap().clone()
}

fn find<'a>(entries: &'a [Value], path: &str) -> Option<&'a Value> {
    entries.iter().find(|e| e["spiffe_id"]["path"] == path)
}

fn plan_json(socket: &str, file: &str, prune: bool) -> (Value, Option<i32>) {
    let mut args = vec!["plan", "-f", file, "--socket", socket, "--output", "json"];
    if prune {
        args.push("--prune");
    }
    let out = lanyard(&args);
    (json(&text(&out.stdout)), out.status.code())
}

fn hand_made(socket: &str, path: &str, uid: &str) -> String {
    let created = json(&succeed(&[
        "entry",
        "create",
        "--socket",
        socket,
        "--spiffe-id",
        &format!("spiffe://example.org/{path}"),
        "--parent-id",
        PARENT,
        "--selector",
        &format!("unix:uid:{uid}"),
        "--owner",
        "team-b",
        "--reason",
        "made by hand",
        "--expires-at",
        &in_days(10),
        "--output",
        "json",
    ]));
    created["results"][0]["entry"]["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn apply_reconciles_and_prunes_only_its_own_entries() {
    let server = start_with_baseline();
    let socket = server.socket.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file_path = dir.path().join("entries.toml");
    let file = file_path.to_str().unwrap();

    // Entries the file does not own: one with no counterpart, one it will later collide with.
    let tool_id = hand_made(socket, "tool", "3000");
    let shared_id = hand_made(socket, "shared", "3001");

    write_file(
        &file_path,
        &[entry_table("web", 1000, ""), entry_table("db", 1001, "")],
    );
    let (plan, code) = plan_json(socket, file, true);
    assert_eq!(code, Some(0), "{plan}");
    assert_eq!(plan["creates"].as_array().unwrap().len(), 2, "{plan}");
    assert_eq!(plan["deletes"], serde_json::json!([]), "{plan}");
    assert_eq!(
        plan["holders"]["gained"].as_array().unwrap().len(),
        2,
        "{plan}"
    );
    assert_eq!(entries(socket).len(), 2, "plan changes nothing");

    let applied = succeed(&["apply", "-f", file, "--socket", socket]);
    assert!(applied.contains("2 of 2 changes done"), "{applied}");
    let now_stored = entries(socket);
    assert_eq!(now_stored.len(), 4);
    let web = find(&now_stored, "/web").expect("web created");
    assert_eq!(web["owner"], "team-a");
    let shown = succeed(&[
        "entry",
        "show",
        "--socket",
        socket,
        "--spiffe-id",
        "spiffe://example.org/web",
    ]);
    assert!(shown.contains("Source           : team-a"), "{shown}");

    // A second plan sees nothing to do.
    let out = succeed(&["plan", "-f", file, "--socket", socket, "--prune"]);
    assert!(out.contains("No changes."), "{out}");
    let (plan, _) = plan_json(socket, file, true);
    assert_eq!(plan["unchanged"], 2, "{plan}");

    // Edit one entry (its TTL) and drop the other.
    write_file(
        &file_path,
        &[entry_table("web", 1000, "x509_svid_ttl = \"30m\"")],
    );
    let (plan, code) = plan_json(socket, file, false);
    assert_eq!(code, Some(0), "{plan}");
    assert_eq!(plan["deletes"], serde_json::json!([]), "no --prune: {plan}");
    assert_eq!(plan["undeclared"].as_array().unwrap().len(), 1, "{plan}");
    let (plan, _) = plan_json(socket, file, true);
    let changes = plan["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{plan}");
    assert_eq!(
        changes[0]["fields"],
        serde_json::json!([{"field": "x509_svid_ttl", "old": 0, "new": 1800}]),
        "{plan}"
    );
    let deletes = plan["deletes"].as_array().unwrap();
    assert_eq!(deletes.len(), 1, "{plan}");
    assert_eq!(deletes[0]["spiffe_id"], "spiffe://example.org/db");
    assert_eq!(
        plan["holders"]["lost"][0]["spiffe_id"],
        "spiffe://example.org/db"
    );
    let text_plan = succeed(&["plan", "-f", file, "--socket", socket, "--prune"]);
    assert!(
        text_plan.contains("x509_svid_ttl: default -> 30m"),
        "{text_plan}"
    );

    succeed(&["apply", "-f", file, "--socket", socket, "--prune"]);
    let now_stored = entries(socket);
    assert_eq!(find(&now_stored, "/web").unwrap()["x509_svid_ttl"], 1800);
    assert!(find(&now_stored, "/db").is_none(), "pruned");
    assert_eq!(
        show_entry(socket, &tool_id)["owner"],
        "team-b",
        "never pruned"
    );
    let (plan, _) = plan_json(socket, file, true);
    assert_eq!(plan["changes"], serde_json::json!([]), "{plan}");
    assert_eq!(plan["deletes"], serde_json::json!([]), "{plan}");

    // A declared entry that collides with the hand-made one is a conflict: reported, left
    // alone, and the rest is still applied; an entry the policy refuses is reported too.
    let shared_before = show_entry(socket, &shared_id);
    write_file(
        &file_path,
        &[
            entry_table("web", 1000, "x509_svid_ttl = \"30m\""),
            entry_table("shared", 3001, "hint = \"mine now\""),
            entry_table("api", 1002, ""),
            entry_table("ownerless", 1003, "").replace("owner = \"team-a\"\n", ""),
        ],
    );
    let (plan, code) = plan_json(socket, file, true);
    assert_eq!(code, Some(1), "a conflict fails the plan: {plan}");
    let conflicts = plan["conflicts"].as_array().unwrap();
    assert_eq!(conflicts.len(), 1, "{plan}");
    assert_eq!(conflicts[0]["entry_id"], shared_id.as_str());
    assert_eq!(conflicts[0]["owned_by"], Value::Null);
    let out = lanyard(&["apply", "-f", file, "--socket", socket, "--prune"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(stdout.contains("is unlabelled"), "{stdout}");
    assert!(
        stdout.contains("failed to create spiffe://example.org/ownerless"),
        "{stdout}"
    );
    assert!(stdout.contains("owner-required"), "{stdout}");
    assert!(stderr.contains("1 conflict"), "{stderr}");
    let now_stored = entries(socket);
    assert!(find(&now_stored, "/api").is_some(), "the rest was applied");
    assert!(
        find(&now_stored, "/ownerless").is_none(),
        "refused by the policy"
    );
    assert_eq!(show_entry(socket, &shared_id), shared_before, "left alone");
    assert_eq!(show_entry(socket, &tool_id)["owner"], "team-b");
}

#[test]
fn a_bad_file_is_refused_before_the_server_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("entries.toml");
    std::fs::write(
        &path,
        "source = \"team-a\"\n[[entry]]\nspiffe_id = \"spiffe://example.org/a\"\nparent_id = \"spiffe://example.org/b\"\nselectors = [\"unix:uid:1\"]\nowners = \"x\"\n",
    )
    .unwrap();
    // No server listens on this socket: the file's error comes first.
    let socket = dir.path().join("absent.sock");
    let line = fail(&[
        "apply",
        "-f",
        path.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
    ]);
    assert!(line.starts_with("error: apply: "), "{line}");
    assert!(line.contains("unknown field `owners`"), "{line}");
    assert!(line.contains("line 6"), "{line}");
}
