//! Concurrent admin changes against a real server: none is lost without a word. Updates of
//! different fields made at the same time all land; an update over a revision the entry has
//! left is refused with "changed by someone else since you read it"; a saved plan applied
//! after a hand edit, or a prune planned before one, changes nothing.

use std::path::Path;
use std::thread;

use serde_json::Value;

use crate::exceptions::{
    fail, in_days, json, lanyard, show_entry, start_with_baseline, succeed, text,
};

const PARENT: &str = "spiffe://example.org/spire/agent/join_token/node-1";
const CHANGED: &str = "changed by someone else since you read it; re-run";

fn create(socket: &str, path: &str, uid: &str) -> String {
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
        "team-a",
        "--reason",
        "serves traffic",
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

fn revision(entry: &Value) -> i64 {
    entry["revision_number"].as_i64().unwrap_or_default()
}

#[test]
fn concurrent_updates_of_different_fields_all_land() {
    let server = start_with_baseline();
    let socket = server.socket.to_str().unwrap().to_owned();
    let id = create(&socket, "busy", "4000");
    // Six writers at once, each changing its own field over the revision it read.
    let changes: Vec<Vec<String>> = [
        vec!["--hint", "busy"],
        vec!["--x509-svid-ttl", "1800"],
        vec!["--jwt-svid-ttl", "600"],
        vec!["--dns", "busy.example.org"],
        vec!["--ticket", "CHG-7"],
        vec!["--reason", "serves more traffic"],
    ]
    .iter()
    .map(|args| args.iter().map(|a| (*a).to_owned()).collect())
    .collect();
    let writers: Vec<_> = changes
        .into_iter()
        .map(|change| {
            let (socket, id) = (socket.clone(), id.clone());
            thread::spawn(move || {
                let mut args = vec!["entry", "update", "--socket", &socket, "--entry-id", &id];
                args.extend(change.iter().map(String::as_str));
                let out = lanyard(&args);
                (change, out.status.code(), text(&out.stderr))
            })
        })
        .collect();
    for writer in writers {
        let (change, code, stderr) = writer.join().unwrap();
        assert_eq!(code, Some(0), "{change:?}: {stderr}");
    }
    let entry = show_entry(&socket, &id);
    assert_eq!(entry["hint"], "busy", "{entry}");
    assert_eq!(entry["x509_svid_ttl"], 1800, "{entry}");
    assert_eq!(entry["jwt_svid_ttl"], 600, "{entry}");
    assert_eq!(
        entry["dns_names"],
        serde_json::json!(["busy.example.org"]),
        "{entry}"
    );
    assert_eq!(entry["ticket"], "CHG-7", "{entry}");
    assert_eq!(entry["reason"], "serves more traffic", "{entry}");
    assert_eq!(entry["owner"], "team-a", "{entry}");
    assert_eq!(revision(&entry), 6, "one revision per change: {entry}");
}

#[test]
fn an_update_over_a_revision_the_entry_has_left_is_refused_and_writes_nothing() {
    let server = start_with_baseline();
    let socket = server.socket.to_str().unwrap();
    let id = create(socket, "contested", "4001");
    let read_at = revision(&show_entry(socket, &id)).to_string();
    // One admin changes the hint; another, who read the same revision, changes it too.
    succeed(&[
        "entry",
        "update",
        "--socket",
        socket,
        "--entry-id",
        &id,
        "--hint",
        "first",
    ]);
    let refused = fail(&[
        "entry",
        "update",
        "--socket",
        socket,
        "--entry-id",
        &id,
        "--hint",
        "second",
        "--revision",
        &read_at,
    ]);
    assert!(refused.contains(CHANGED), "{refused}");
    let entry = show_entry(socket, &id);
    assert_eq!(entry["hint"], "first", "{entry}");
    // Over the revision it is at, the same update goes through.
    let current = revision(&entry).to_string();
    succeed(&[
        "entry",
        "update",
        "--socket",
        socket,
        "--entry-id",
        &id,
        "--hint",
        "second",
        "--revision",
        &current,
    ]);
    assert_eq!(show_entry(socket, &id)["hint"], "second");

    // Exceptions likewise: an extend over a revision the exception has left is refused.
    let created = json(&succeed(&[
        "exception",
        "create",
        "--socket",
        socket,
        "--spiffe-id",
        "spiffe://example.org/contested",
        "--rule",
        "x509-ttl-max-24h",
        "--owner",
        "team-a",
        "--reason",
        "migration",
        "--ticket",
        "CHG-8",
        "--duration",
        "2d",
        "--output",
        "json",
    ]));
    let exception_id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["revision"], 1, "{created}");
    succeed(&[
        "exception",
        "extend",
        &exception_id,
        "--socket",
        socket,
        "--duration",
        "3d",
        "--reason",
        "more time",
        "--revision",
        "1",
    ]);
    let refused = fail(&[
        "exception",
        "revoke",
        &exception_id,
        "--socket",
        socket,
        "--reason",
        "done",
        "--revision",
        "1",
    ]);
    assert!(refused.contains(CHANGED), "{refused}");
    let shown = json(&succeed(&[
        "exception",
        "show",
        &exception_id,
        "--socket",
        socket,
        "--output",
        "json",
    ]));
    assert_eq!(
        (shown["status"].as_str(), shown["revision"].as_i64()),
        (Some("active"), Some(2))
    );
}

fn write_file(path: &Path, hint: &str, with_db: bool) {
    let table = |name: &str, uid: u32, extra: &str| {
        format!(
            "[[entry]]\nspiffe_id = \"spiffe://example.org/{name}\"\nparent_id = \"{PARENT}\"\nselectors = [\"unix:uid:{uid}\"]\nowner = \"team-a\"\nreason = \"serves {name}\"\nexpires_at = \"{}\"\n{extra}\n",
            in_days(20).split('T').next().unwrap().to_owned() + "T00:00:00Z"
        )
    };
    let mut text = "source = \"team-a\"\n\n".to_owned();
    text.push_str(&table("web", 5000, &format!("hint = \"{hint}\"")));
    if with_db {
        text.push_str(&table("db", 5001, ""));
    }
    std::fs::write(path, text).unwrap();
}

fn entry_by_path(socket: &str, path: &str) -> Option<Value> {
    let shown = json(&succeed(&[
        "entry", "show", "--socket", socket, "--output", "json",
    ]));
    shown["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["spiffe_id"]["path"] == path)
        .cloned()
}

#[test]
fn a_saved_plan_applied_after_a_hand_edit_changes_nothing() {
    let server = start_with_baseline();
    let socket = server.socket.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file_path = dir.path().join("entries.toml");
    let file = file_path.to_str().unwrap();
    let plan_path = dir.path().join("plan.json");
    let saved = plan_path.to_str().unwrap();
    write_file(&file_path, "v1", true);
    succeed(&["apply", "-f", file, "--socket", socket]);
    let web = entry_by_path(socket, "/web").expect("web applied");
    let web_id = web["id"].as_str().unwrap().to_owned();

    // The file changes web's hint; the plan is saved; then someone edits web by hand.
    write_file(&file_path, "v2", true);
    succeed(&["plan", "-f", file, "--socket", socket, "--out", saved]);
    succeed(&[
        "entry",
        "update",
        "--socket",
        socket,
        "--entry-id",
        &web_id,
        "--ticket",
        "HAND-1",
    ]);
    let out = lanyard(&["apply", "-f", file, "--socket", socket, "--plan", saved]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains(&web_id) && stdout.contains(CHANGED),
        "{stdout}"
    );
    assert!(stderr.contains("nothing was applied"), "{stderr}");
    let web = show_entry(socket, &web_id);
    assert_eq!(
        (web["hint"].as_str(), web["ticket"].as_str()),
        (Some("v1"), Some("HAND-1"))
    );

    // Planned again, the same change applies.
    succeed(&["plan", "-f", file, "--socket", socket, "--out", saved]);
    succeed(&["apply", "-f", file, "--socket", socket, "--plan", saved]);
    assert_eq!(show_entry(socket, &web_id)["hint"], "v2");

    // A prune planned before a hand edit of the entry it would delete deletes nothing.
    write_file(&file_path, "v2", false);
    succeed(&[
        "plan", "-f", file, "--socket", socket, "--prune", "--out", saved,
    ]);
    let db_id = entry_by_path(socket, "/db").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    succeed(&[
        "entry",
        "update",
        "--socket",
        socket,
        "--entry-id",
        &db_id,
        "--hint",
        "still-needed",
    ]);
    let out = lanyard(&["apply", "-f", file, "--socket", socket, "--plan", saved]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains(&db_id), "{}", text(&out.stdout));
    assert_eq!(show_entry(socket, &db_id)["hint"], "still-needed");
    // A changed file is refused against a plan of the old one.
    std::fs::write(
        &file_path,
        std::fs::read_to_string(&file_path).unwrap() + "\n# edited\n",
    )
    .unwrap();
    let out = lanyard(&["apply", "-f", file, "--socket", socket, "--plan", saved]);
    assert!(
        text(&out.stdout).contains("file changed since the plan"),
        "{}",
        text(&out.stdout)
    );
}
