//! `lanyard policy test|check` and `lanyard audit verify`: the shipped baseline's own tests
//! pass and a failing test fails the command; a candidate policy is checked against the
//! entries of a real server; a tampered audit log is refused with the line named.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use lanyard_core::audit::Chain;
use serde_json::{Value, json};

use crate::real_server::start_server;

fn lanyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(args)
        .env_remove("LANYARD_SERVER_SOCKET")
        .output()
        .expect("lanyard runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn policy_file(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/policy")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn policy_test_runs_the_baselines_own_tests() {
    let out = lanyard(&[
        "policy",
        "test",
        &policy_file("baseline.rego"),
        &policy_file("baseline_test.rego"),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("PASS data.lanyard.baseline_test.test_owner_required"),
        "{stdout}"
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn policy_test_fails_on_a_failing_test_and_on_a_broken_policy() {
    let dir = tempfile::tempdir().unwrap();
    let failing = dir.path().join("failing_test.rego");
    std::fs::write(
        &failing,
        "package lanyard.t\nimport rego.v1\ntest_wrong if { 1 == 2 }\ntest_right if { 1 == 1 }\n",
    )
    .unwrap();
    let out = lanyard(&[
        "policy",
        "test",
        failing.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert!(!out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["failed"], 1, "{report}");
    assert_eq!(report["tests"][1]["name"], "data.lanyard.t.test_wrong");
    assert_eq!(report["tests"][1]["passed"], false);
    assert!(
        text(&out.stderr).contains("1 policy test failed"),
        "{}",
        text(&out.stderr)
    );

    let broken = dir.path().join("broken.rego");
    std::fs::write(&broken, "package lanyard\nviolations contains v if {\n").unwrap();
    let out = lanyard(&["policy", "test", broken.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("does not compile") && stderr.contains("broken.rego"),
        "{stderr}"
    );
}

#[test]
fn policy_check_lists_the_entries_a_candidate_policy_would_refuse() {
    let server = start_server();
    let socket = server.socket.to_str().unwrap();
    let expires = (SystemTime::now() + Duration::from_secs(7 * 86_400))
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let create = |path: &str, extra: &[&str]| {
        let spiffe_id = format!("spiffe://example.org/{path}");
        let mut args = vec![
            "entry",
            "create",
            "--socket",
            socket,
            "--spiffe-id",
            &spiffe_id,
            "--parent-id",
            "spiffe://example.org/spire/server",
            "--selector",
            "unix:uid:1000",
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        let out = lanyard(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    create(
        "complete",
        &[
            "--owner",
            "team-a",
            "--reason",
            "serves the API",
            "--expires-at",
            &expires,
        ],
    );
    create(
        "ownerless",
        &["--reason", "legacy", "--expires-at", &expires],
    );
    create(
        "long-ttl",
        &[
            "--owner",
            "team-b",
            "--reason",
            "batch",
            "--expires-at",
            &expires,
            "--x509-svid-ttl",
            "48h",
        ],
    );

    let out = lanyard(&[
        "policy",
        "check",
        "--policy",
        &policy_file("baseline.rego"),
        "--socket",
        socket,
        "--output",
        "json",
    ]);
    assert!(!out.status.success(), "two entries break the baseline");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["checked"], 3, "{report}");
    assert_eq!(report["failing"], 2, "{report}");
    let failing: Vec<(String, Vec<String>)> = report["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            (
                entry["spiffe_id"].as_str().unwrap().to_owned(),
                entry["violations"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v["rule"].as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect();
    assert!(
        failing.contains(&(
            "spiffe://example.org/ownerless".to_owned(),
            vec!["owner-required".to_owned()]
        )),
        "{report}"
    );
    assert!(
        failing.contains(&(
            "spiffe://example.org/long-ttl".to_owned(),
            vec!["x509-ttl-max-24h".to_owned()]
        )),
        "{report}"
    );
    assert!(
        text(&out.stderr).contains("2 entries would fail"),
        "{}",
        text(&out.stderr)
    );

    // A permissive candidate passes everything.
    let dir = tempfile::tempdir().unwrap();
    let permissive = dir.path().join("permissive.rego");
    std::fs::write(&permissive, "package lanyard\n").unwrap();
    let out = lanyard(&[
        "policy",
        "check",
        "--policy",
        permissive.to_str().unwrap(),
        "--socket",
        socket,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("3 entries checked, 0 would fail"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn audit_verify_accepts_an_intact_log_and_names_the_tampered_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut chain = Chain::new();
    let mut log = String::new();
    for n in 0..4 {
        log.push_str(&chain.append(
            SystemTime::now(),
            &json!({"action": "entry created", "n": n}),
        ));
    }
    std::fs::write(&path, &log).unwrap();
    let file = path.to_str().unwrap();
    let head = format!("{}:{}", chain.head().lines, chain.head().hash);

    let out = lanyard(&["audit", "verify", file, "--head", &head]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("4 lines intact, head {head}")),
        "{}",
        text(&out.stdout)
    );

    // Edit line 2: line 3 no longer follows.
    let tampered = log.replacen("\"n\":1", "\"n\":7", 1);
    std::fs::write(&path, tampered).unwrap();
    let out = lanyard(&["audit", "verify", file]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("tampered") && stderr.contains("line 3"),
        "{stderr}"
    );

    // Drop the last line: the chain is valid, but not the expected head.
    let truncated: String = log
        .lines()
        .take(3)
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&path, truncated).unwrap();
    assert!(lanyard(&["audit", "verify", file]).status.success());
    let out = lanyard(&["audit", "verify", file, "--head", &head]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("removed from its end"),
        "{}",
        text(&out.stderr)
    );
}
