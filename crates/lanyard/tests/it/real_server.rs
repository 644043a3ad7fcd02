//! `lanyard server run` as a child process, driven by the CLI's own admin commands.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) struct RunningServer {
    child: Child,
    pub(crate) socket: PathBuf,
    /// The server's `data_dir` (its datastore is `datastore.sqlite3` there).
    #[allow(dead_code)]
    pub(crate) data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lanyard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(args)
        .output()
        .expect("lanyard runs")
}

pub(crate) fn start_server() -> RunningServer {
    start_server_with(tempfile::tempdir().unwrap(), "")
}

/// Starts a server on `dir` with `extra` appended to its config (after the top-level keys,
/// so it may open tables such as `[policy]`). Whatever is already in `dir/data` (a seeded
/// datastore) is used.
pub(crate) fn start_server_with(dir: tempfile::TempDir, extra: &str) -> RunningServer {
    let socket = dir.path().join("admin").join("api.sock");
    let config = dir.path().join("server.toml");
    let data_dir = dir.path().join("data");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\nbind_address = \"127.0.0.1:0\"\nsocket_path = {:?}\ndata_dir = {:?}\n{extra}",
            socket, data_dir,
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(["server", "run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = RunningServer {
        child,
        socket,
        data_dir,
        _dir: dir,
    };
    wait_healthy(&server.socket);
    server
}

fn wait_healthy(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = lanyard(&[
            "server",
            "healthcheck",
            "--socket",
            socket.to_str().unwrap(),
        ]);
        if out.status.success() {
            return;
        }
        assert!(Instant::now() < deadline, "server never became healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn admin_commands_work_against_a_real_server() {
    let server = start_server();
    let socket = server.socket.to_str().unwrap();

    let out = lanyard(&["token", "generate", "--socket", socket, "--ttl", "600"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("Token: "), "{stdout}");

    let out = lanyard(&[
        "entry",
        "create",
        "--socket",
        socket,
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        "spiffe://example.org/spire/agent/join_token/t1",
        "--selector",
        "unix:uid:1000",
        "--x509-svid-ttl",
        "10m",
        "--owner",
        "team-web",
        "--reason",
        "serves the web tier",
    ]);
    assert!(out.status.success(), "{out:?}");

    let out = lanyard(&["entry", "show", "--socket", socket, "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = json.to_string();
    assert!(
        text.contains("spiffe://example.org/web") || text.contains("\"/web\""),
        "{text}"
    );
    assert!(text.contains("team-web"), "owner is shown: {text}");

    // A duplicate is refused with a clear one-line error and exit 1.
    let out = lanyard(&[
        "entry",
        "create",
        "--socket",
        socket,
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        "spiffe://example.org/spire/agent/join_token/t1",
        "--selector",
        "unix:uid:1000",
    ]);
    assert!(!out.status.success());

    // An invalid ID never reaches the server.
    let out = lanyard(&[
        "entry",
        "create",
        "--socket",
        socket,
        "--spiffe-id",
        "spiffe://Example.org/web",
        "--parent-id",
        "spiffe://example.org/spire/server",
        "--selector",
        "unix:uid:1",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: entry create:"), "{stderr}");

    let out = lanyard(&["entry", "count", "--socket", socket]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains('1'));

    // An update that gives only a ticket keeps the owner and reason; one without governance
    // flags prints the stored ones.
    let id = json["entries"][0]["id"].as_str().unwrap().to_owned();
    let out = lanyard(&[
        "entry",
        "update",
        "--socket",
        socket,
        "--entry-id",
        &id,
        "--ticket",
        "CHG-2",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = lanyard(&[
        "entry",
        "update",
        "--socket",
        socket,
        "--entry-id",
        &id,
        "--hint",
        "blue",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for field in [
        "Owner            : team-web\n",
        "Reason           : serves the web tier\n",
        "Ticket           : CHG-2\n",
        "Hint             : blue\n",
    ] {
        assert!(text.contains(field), "{field:?} in {text}");
    }

    // An owner the server refuses fails the item: the entry is not written.
    let long_owner = "o".repeat(300);
    let out = lanyard(&[
        "entry",
        "create",
        "--socket",
        socket,
        "--spiffe-id",
        "spiffe://example.org/db",
        "--parent-id",
        "spiffe://example.org/spire/server",
        "--selector",
        "unix:uid:2",
        "--owner",
        &long_owner,
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: entry create: 1 of 1 entry failed"),
        "{stderr}"
    );
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(results["results"][0]["status"]["code"], 3, "{results}");
    let out = lanyard(&["entry", "count", "--socket", socket]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains('1'),
        "{out:?}"
    );

    let out = lanyard(&["bundle", "show", "--socket", socket]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE"));

    let out = lanyard(&["bundle", "show", "--socket", socket, "--format", "spiffe"]);
    assert!(out.status.success(), "{out:?}");
    let jwks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        jwks["keys"].as_array().is_some_and(|k| k.len() >= 2),
        "{jwks}"
    );

    let out = lanyard(&[
        "x509",
        "mint",
        "--socket",
        socket,
        "--spiffe-id",
        "spiffe://example.org/tool",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE"));

    let out = lanyard(&[
        "jwt",
        "mint",
        "--socket",
        socket,
        "--spiffe-id",
        "spiffe://example.org/tool",
        "--audience",
        "api",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .split('.')
            .count(),
        3
    );

    let out = lanyard(&["agent", "count", "--socket", socket]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_bad_config_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        "trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\nca_tll = \"1h\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(["server", "run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ca_tll"), "{stderr}");
    assert!(stderr.starts_with("error: server run:"), "{stderr}");
}

#[test]
fn acknowledged_entries_survive_sigkill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin").join("api.sock");
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\nbind_address = \"127.0.0.1:0\"\nsocket_path = {:?}\ndata_dir = {:?}\n",
            socket,
            dir.path().join("data"),
        ),
    )
    .unwrap();
    let spawn = || {
        let child = Command::new(env!("CARGO_BIN_EXE_lanyard"))
            .args(["server", "run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_healthy(&socket);
        child
    };
    let mut server = spawn();
    let socket_str = socket.to_str().unwrap().to_owned();

    // Writers keep creating entries; every exit status 0 is an acknowledged write.
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let acknowledged = std::sync::Arc::clone(&acknowledged);
        let stop = std::sync::Arc::clone(&stop);
        let socket = socket_str.clone();
        std::thread::spawn(move || {
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let id = format!("spiffe://example.org/w{i}");
                let out = lanyard(&[
                    "entry",
                    "create",
                    "--socket",
                    &socket,
                    "--spiffe-id",
                    &id,
                    "--parent-id",
                    "spiffe://example.org/spire/server",
                    "--selector",
                    &format!("k:v{i}"),
                ]);
                if out.status.success() {
                    acknowledged.lock().unwrap().push(id);
                }
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while acknowledged.lock().unwrap().len() < 10 {
        assert!(Instant::now() < deadline, "writes were not acknowledged");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL: no chance to flush or shut down cleanly.
    server.kill().unwrap();
    server.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 10);

    let mut server = spawn();
    let out = lanyard(&["entry", "show", "--socket", &socket_str, "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    for id in &acknowledged {
        let path = id.trim_start_matches("spiffe://example.org");
        assert!(
            shown.contains(&format!("\"{id}\"")) || shown.contains(&format!("\"{path}\"")),
            "acknowledged entry {id} was lost"
        );
    }
    // Every entry the datastore holds has an audit record: written before its acknowledgement,
    // or rebuilt from the change log at restart if the kill fell between commit and append.
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let audit = std::fs::read_to_string(dir.path().join("data").join("audit.log")).unwrap();
    lanyard_core::audit::verify(&audit).unwrap();
    let audited: std::collections::HashSet<String> = lanyard_core::audit::events(&audit)
        .filter_map(|(_, _, event)| {
            let details = &event["details"];
            details["entry_id"]
                .as_str()
                .or(details["id"].as_str())
                .map(str::to_owned)
        })
        .collect();
    let entries = shown["entries"].as_array().unwrap();
    assert!(entries.len() >= acknowledged.len());
    for entry in entries {
        let id = entry["id"].as_str().unwrap();
        assert!(audited.contains(id), "entry {id} has no audit record");
    }
    let _ = server.kill();
    let _ = server.wait();
}
