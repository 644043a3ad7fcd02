//! `lanyard dev` as a child process: the printed tour works as printed, the workload
//! commands reach its agent, and Ctrl-C cleans up.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn lanyard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(args)
        .output()
        .expect("lanyard runs")
}

#[test]
fn dev_serves_the_current_user_and_cleans_up_on_ctrl_c() {
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("workload.sock");
    let socket_str = socket.to_str().unwrap().to_owned();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(["dev", "--socket", &socket_str])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // The banner names the data directory and the export line.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut data_dir = None;
    let mut export = None;
    let mut admin = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.trim().strip_prefix("data") {
            data_dir = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.contains("export SPIFFE_ENDPOINT_SOCKET=") {
            export = Some(line.trim().to_owned());
        }
        if let Some(rest) = line.trim().strip_prefix("export LANYARD_SERVER_SOCKET=") {
            admin = Some(rest.to_owned());
        }
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    let data_dir = data_dir.expect("the banner names the data directory");
    assert_eq!(
        export.as_deref(),
        Some(format!("export SPIFFE_ENDPOINT_SOCKET=unix://{socket_str}").as_str())
    );
    let admin = admin.expect("the banner names the admin socket");

    let deadline = Instant::now() + Duration::from_secs(30);
    while !lanyard(&["agent", "healthcheck", "--socket", &socket_str])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "agent never became healthy");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The user's identity, through SPIFFE_ENDPOINT_SOCKET as the banner says.
    let uri = format!("unix://{socket_str}");
    let fetch = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_lanyard"))
            .args(args)
            .env("SPIFFE_ENDPOINT_SOCKET", &uri)
            .output()
            .unwrap()
    };
    let mut svid = fetch(&["fetch", "x509", "--output", "json"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !svid.status.success() {
        assert!(Instant::now() < deadline, "no SVID: {svid:?}");
        std::thread::sleep(Duration::from_millis(200));
        svid = fetch(&["fetch", "x509", "--output", "json"]);
    }
    let json: serde_json::Value = serde_json::from_slice(&svid.stdout).unwrap();
    let id = json["svids"][0]["spiffe_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("spiffe://example.org/user/"), "{id}");

    let out_dir = sockets.path().join("out");
    let written = fetch(&["fetch", "x509", "--write", out_dir.to_str().unwrap()]);
    assert!(written.status.success(), "{written:?}");
    use std::os::unix::fs::PermissionsExt as _;
    let key_mode = std::fs::metadata(out_dir.join("svid.0.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let chain = std::fs::read_to_string(out_dir.join("svid.0.pem")).unwrap();
    assert!(chain.contains("BEGIN CERTIFICATE"));

    let jwt = fetch(&["fetch", "jwt", "--audience", "tour"]);
    assert!(jwt.status.success(), "{jwt:?}");
    let token = String::from_utf8_lossy(&jwt.stdout)
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let valid = fetch(&["validate", "jwt", "--audience", "tour", "--svid", &token]);
    assert!(valid.status.success(), "{valid:?}");
    assert!(String::from_utf8_lossy(&valid.stdout).contains(&id));
    let invalid = fetch(&["validate", "jwt", "--audience", "other", "--svid", &token]);
    assert!(!invalid.status.success());

    // The printed admin socket reaches the dev server; the user's entry carries governance.
    let entries = Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(["entry", "show", "--output", "json"])
        .env("LANYARD_SERVER_SOCKET", &admin)
        .output()
        .unwrap();
    assert!(entries.status.success(), "{entries:?}");
    let text = String::from_utf8_lossy(&entries.stdout);
    assert!(text.contains("lanyard dev"), "{text}");

    // Dev runs on the shipped baseline, and the user's entry passes it.
    let policy = std::path::Path::new(&data_dir).join("policy.rego");
    let check = Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(["policy", "check", "--policy"])
        .arg(&policy)
        .env("LANYARD_SERVER_SOCKET", &admin)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("1 entry checked, 0 would fail"),
        "{check:?}"
    );
    let baseline = std::fs::read_to_string(&policy).unwrap();
    assert!(baseline.contains("owner-required"), "{baseline}");

    // Ctrl-C stops both and removes the temporary data directory.
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "dev did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "{exit:?}");
    assert!(
        !std::path::Path::new(&data_dir).exists(),
        "{data_dir} was not removed"
    );
}
