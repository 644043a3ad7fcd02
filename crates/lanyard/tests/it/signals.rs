//! Signals to `lanyard server run` and `lanyard agent run` as child processes: SIGHUP is
//! survived and re-reads the log level, SIGTERM shuts down with exit status 0 and removes the
//! sockets.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A bound on every wait; the test fails instead of hanging.
const WAIT: Duration = Duration::from_secs(30);

fn lanyard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(args)
        .output()
        .expect("lanyard runs")
}

/// A `lanyard … run` child logging JSON lines to a file.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &'static str, args: &[&str], config: &Path, log: PathBuf) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_lanyard"))
            .args(args)
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { name, child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `field` of the first log line whose message is `message`.
    fn logged_field(&self, message: &str, field: &str) -> Option<String> {
        self.log().lines().find_map(|line| {
            let line: serde_json::Value = serde_json::from_str(line).ok()?;
            let fields = line.get("fields")?;
            (fields.get("message")?.as_str()? == message)
                .then(|| fields.get(field)?.as_str().map(str::to_owned))?
        })
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {}", self.name);
    }

    fn assert_running(&mut self) {
        let exited = self.child.try_wait().unwrap();
        assert!(
            exited.is_none(),
            "{} exited ({exited:?}); its log:\n{}",
            self.name,
            self.log()
        );
    }

    fn wait_for_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop; its log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the log has `count` lines containing `text`, failing at once if the
    /// process exits meanwhile.
    fn wait_for_log(&mut self, text: &str, count: usize) {
        let deadline = Instant::now() + WAIT;
        while self.log().matches(text).count() < count {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{} never logged {text:?} {count} times; its log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn server_healthy(socket: &str) -> bool {
    lanyard(&["server", "healthcheck", "--socket", socket])
        .status
        .success()
}

fn agent_healthy(socket: &str) -> bool {
    lanyard(&["agent", "healthcheck", "--socket", socket])
        .status
        .success()
}

#[test]
fn sighup_reloads_the_log_level_and_sigterm_stops_cleanly_removing_the_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let admin_socket = dir.path().join("server").join("api.sock");
    let admin = admin_socket.to_str().unwrap().to_owned();
    let workload_socket = dir.path().join("agent").join("api.sock");
    let workload = workload_socket.to_str().unwrap().to_owned();

    // A server without [policy].
    let server_config = dir.path().join("server.toml");
    std::fs::write(
        &server_config,
        format!(
            "trust_domain = \"example.org\"\nbind_address = \"127.0.0.1:0\"\n\
             socket_path = {admin:?}\ndata_dir = {:?}\nlog_format = \"json\"\n",
            dir.path().join("server-data"),
        ),
    )
    .unwrap();
    let mut server = Process::spawn(
        "server",
        &["server", "run"],
        &server_config,
        dir.path().join("server.log"),
    );
    wait_until("the server never became healthy", || server_healthy(&admin));
    let address = server
        .logged_field("server started", "address")
        .expect("the server logs its address");

    // An agent attested with a join token.
    let token = lanyard(&["token", "generate", "--socket", &admin, "--ttl", "600"]);
    assert!(token.status.success(), "{token:?}");
    let token = String::from_utf8(token.stdout).unwrap();
    let token = token.trim().strip_prefix("Token: ").unwrap().to_owned();
    let bundle = lanyard(&["bundle", "show", "--socket", &admin]);
    assert!(bundle.status.success(), "{bundle:?}");
    let bundle_path = dir.path().join("bundle.pem");
    std::fs::write(&bundle_path, bundle.stdout).unwrap();
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "server_address = {address:?}\ntrust_domain = \"example.org\"\n\
             trust_bundle_path = {bundle_path:?}\ndata_dir = {:?}\nsocket_path = {workload:?}\n\
             join_token = {token:?}\nlog_format = \"json\"\n",
            dir.path().join("agent-data"),
        ),
    )
    .unwrap();
    let mut agent = Process::spawn(
        "agent",
        &["agent", "run"],
        &agent_config,
        dir.path().join("agent.log"),
    );
    wait_until("the agent never became healthy", || {
        agent_healthy(&workload)
    });

    // SIGHUP: logged, survived, and both still answer.
    const HANGUP: &str = "SIGHUP received: re-reading log_level from the config";
    server.signal("HUP");
    agent.signal("HUP");
    server.wait_for_log(HANGUP, 1);
    agent.wait_for_log(HANGUP, 1);
    assert!(server_healthy(&admin), "the server stopped answering");
    assert!(agent_healthy(&workload), "the agent stopped answering");
    assert!(!agent.log().contains("\"level\":\"DEBUG\""));

    // The agent takes a new log_level; the server keeps its level when its config no longer
    // reads, and keeps running.
    let config = std::fs::read_to_string(&agent_config).unwrap();
    std::fs::write(&agent_config, format!("{config}log_level = \"debug\"\n")).unwrap();
    std::fs::write(&server_config, "trust_domain = \"not a config\"\n").unwrap();
    server.signal("HUP");
    agent.signal("HUP");
    server.wait_for_log("keeping the log level", 1);
    agent.wait_for_log("changing the log level", 1);
    server.assert_running();
    assert!(server_healthy(&admin), "the server stopped answering");
    assert!(agent_healthy(&workload), "the agent stopped answering");
    agent.wait_for_log("\"level\":\"DEBUG\"", 1);

    // SIGTERM: exit status 0, sockets gone.
    agent.signal("TERM");
    let status = agent.wait_for_exit();
    assert!(status.success(), "agent: {status:?}\n{}", agent.log());
    assert!(
        !workload_socket.exists(),
        "the agent left its socket behind"
    );
    server.signal("TERM");
    let status = server.wait_for_exit();
    assert!(status.success(), "server: {status:?}\n{}", server.log());
    assert!(!admin_socket.exists(), "the server left its socket behind");
}
