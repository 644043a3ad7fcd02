//! A Lanyard server as a child process (`lanyard server run --config <file>`), for the
//! benchmarks whose load does not fit beside the server in one process: 10k agents' mTLS
//! connections and the server's 10k sockets would need more file descriptors than one process
//! may hold. The end-to-end harness (`lanyard_e2e::Server`) panics on failure and waits at
//! most 30 s for a start; a server with a million entries needs longer, and a benchmark
//! reports errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use lanyard_proto::spire::api::server::bundle::v1::GetBundleRequest;
use lanyard_proto::spire::api::server::bundle::v1::bundle_client::BundleClient;
use lanyard_server::ServerConfig;
use tokio::time::Instant;

use crate::cpu::{CpuMeter, rss_bytes};
use crate::harness::{AgentKind, TRUST_DOMAIN, Target, uds_channel};

/// Log lines shown when the server fails.
const LOG_TAIL_LINES: usize = 30;

/// The files of a server that runs as a child: its config, log, port and admin socket.
#[derive(Debug, Clone)]
pub(crate) struct ServerFiles {
    pub(crate) config_path: PathBuf,
    pub(crate) log_path: PathBuf,
    pub(crate) addr: SocketAddr,
    pub(crate) admin_socket: PathBuf,
    /// The config as the server reads it (for its datastore path).
    pub(crate) config: ServerConfig,
}

impl ServerFiles {
    /// Writes a config in `dir` for a server on a free loopback port, SQLite datastore and
    /// disk keys, with `limits_toml` as its `[limits]` table, and checks that it parses.
    pub(crate) fn write(dir: &Path, limits_toml: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .context("finding a free port")?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let admin_socket = dir.join("admin").join("api.sock");
        let text = format!(
            "trust_domain = {td}\n\
             data_dir     = {data}\n\
             bind_address = \"{addr}\"\n\
             socket_path  = {socket}\n\
             log_level    = \"warn\"\n\
             \n\
             [limits]\n\
             {limits_toml}\n\
             \n\
             [datastore]\n\
             kind = \"sqlite\"\n\
             \n\
             [key_manager]\n\
             kind = \"disk\"\n",
            td = toml_string(TRUST_DOMAIN),
            data = toml_string(&dir.join("data").display().to_string()),
            socket = toml_string(&admin_socket.display().to_string()),
        );
        let config = ServerConfig::parse(&text)
            .with_context(|| format!("the benchmark's server config does not parse:\n{text}"))?;
        let config_path = dir.join("server.toml");
        std::fs::write(&config_path, &text)
            .with_context(|| format!("writing {}", config_path.display()))?;
        Ok(Self {
            config_path,
            log_path: dir.join("server.log"),
            addr,
            admin_socket,
            config,
        })
    }
}

/// A TOML basic string (JSON's escaping is a subset of TOML's).
fn toml_string(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string()
}

/// The `lanyard` binary: `explicit` if given, else the one beside this executable (cargo
/// builds both into the same target directory; test binaries sit one level deeper, in
/// `deps/`).
pub(crate) fn lanyard_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if path.is_file() {
            return Ok(path.to_owned());
        }
        bail!("--lanyard-bin {} is not a file", path.display());
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("lanyard"))
        .collect();
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no `lanyard` binary beside {} (looked for {:?}): build it with the same \
                 profile, e.g. `cargo build --release -p lanyard`, or pass --lanyard-bin",
                exe.display(),
                candidates
            )
        })
}

/// A running `lanyard server run`; killed when dropped.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    child: Child,
    files: ServerFiles,
}

impl ServerProcess {
    /// Starts `binary` on `files`' config, its output appended to `files.log_path`.
    pub(crate) fn spawn(binary: &Path, files: &ServerFiles) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&files.log_path)
            .with_context(|| format!("opening {}", files.log_path.display()))?;
        let child = Command::new(binary)
            .args(["server", "run", "--config"])
            .arg(&files.config_path)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            child,
            files: files.clone(),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident set size in bytes.
    pub(crate) fn rss(&self) -> u64 {
        rss_bytes(self.pid())
    }

    /// The server as the benchmarks reach it; its CPU is the whole child process's.
    pub(crate) fn target(&self) -> Target {
        Target {
            name: "lanyard".to_owned(),
            addr: self.files.addr,
            admin_socket: self.files.admin_socket.clone(),
            cpu: CpuMeter::Process(self.pid()),
            agent: AgentKind::Lanyard,
            scraper: None,
        }
    }

    /// Fails, with the log's tail, if the process has exited.
    pub(crate) fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the server exited ({status}):\n{}", self.log_tail());
        }
        Ok(())
    }

    /// Waits until the admin API answers `GetBundle`; returns how long that took.
    pub(crate) async fn wait_admin(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            self.check_running()?;
            if self.files.admin_socket.exists()
                && let Ok(channel) = uds_channel(&self.files.admin_socket).await
                && BundleClient::new(channel)
                    .get_bundle(GetBundleRequest { output_mask: None })
                    .await
                    .is_ok()
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= timeout {
                bail!(
                    "the server's admin API did not answer within {timeout:?}:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit; returns how long it took.
    pub(crate) async fn stop(mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        // std can only SIGKILL; `kill(1)` sends the SIGTERM that asks for a clean shutdown.
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !sent {
            bail!("cannot send SIGTERM to the server (pid {})", self.pid());
        }
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!(
                        "the server exited with {status} on SIGTERM:\n{}",
                        self.log_tail()
                    );
                }
                return Ok(started.elapsed());
            }
            if started.elapsed() >= timeout {
                bail!(
                    "the server did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines of its log.
    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.files.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
