//! The end-to-end harness: runs the real `lanyard` binary as server, agent, admin CLI and
//! workload, on temporary directories, ephemeral ports and temporary sockets.
//!
//! Bottom up:
//!
//! - [`lanyard_binary`] builds `lanyard` once per test process (with cargo), or takes
//!   `LANYARD_E2E_BINARY`; [`lanyard`] is a [`Command`] for it with the environment
//!   variables that would redirect it removed.
//! - [`cli`] runs one command to completion and returns a [`CliOutput`].
//! - [`TestDir`] is a temporary directory that other users can enter, so that workloads running
//!   under other uids reach the Workload API socket.
//! - [`ChildProcess`] is a long-running child whose stdout and stderr go to a log file. It is
//!   killed on drop, and if the test is panicking its log tail is printed, so that failures
//!   show what the server and agent said.
//! - [`Server`] and [`Agent`] run `lanyard server run` and `lanyard agent run` with generated
//!   configs, wait until they answer, and stop, kill and restart them on the same paths and port.
//! - [`Cluster`] is a server plus one agent attested with a join token: where most tests start.
//! - [`Agent::fetch_x509`] and [`Agent::fetch_x509_as`] run `lanyard fetch x509 --output json`
//!   as this process or as another uid ([`RunAs`]) and parse it into [`FetchedSvid`]s.
//! - [`poll`] retries until a deadline instead of sleeping; [`block_on`] runs async clients
//!   and [`within`] bounds each of their calls.
//! - [`toolchain`] builds what the interoperability tests run beside Lanyard: SPIRE and
//!   Kubernetes (`kube-apiserver`, etcd) from the Go module proxy and the go-spiffe and
//!   java-spiffe clients under `tests/interop`. The first [`lanyard_binary`] call starts the
//!   SPIRE and Kubernetes builds in the background when tests that need them are selected,
//!   so that a first build on a fresh machine overlaps with the other tests.
//! - [`sds`] drives an agent's Secret Discovery Service as Envoy does, through a
//!   go-control-plane client under `tests/interop`.
//! - [`https`] is a test CA (rcgen) and an HTTPS client for the server's public endpoints
//!   (the bundle endpoint, OIDC discovery).
//! - [`kube::KubeCluster`] is a real Kubernetes API server and its etcd, with a generated
//!   PKI, kubeconfigs and a small typed HTTPS client: for `k8s_psat` attestation and
//!   TokenReview.
//!
//! Every helper panics with the command and its output when something goes wrong (this is
//! test code: a panic with context is the most useful failure), and every [`ChildProcess`]
//! still alive prints its log tail as the panic unwinds.
//!
//! Environment: `LANYARD_E2E_BINARY` (test a prebuilt binary), `LANYARD_E2E_LOG_LEVEL` (the
//! servers' and agents' `log_level`, default `info`), `LANYARD_E2E_KEEP=1` (keep the temporary
//! directories of failed tests).

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use lanyard_core::TrustDomain;
use lanyard_core::x509::{VerifiedSvid, X509Error};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde_json::Value;

pub mod controller_manager;
pub mod https;
pub mod kube;
pub mod kubelet;
pub mod nginx;
pub mod prometheus;
pub mod sds;
pub mod spire;
pub mod toolchain;

/// The trust domain of every server and agent the harness starts.
pub const TRUST_DOMAIN: &str = "example.org";

/// The default bound on every wait: long enough for a loaded two-core machine, short enough
/// that a hang fails the test instead of the CI job.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// How often [`poll`] retries.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The `log_level` of generated configs unless `LANYARD_E2E_LOG_LEVEL` says otherwise.
const DEFAULT_LOG_LEVEL: &str = "info";

/// How many log lines a failure shows.
const LOG_TAIL_LINES: usize = 40;

/// Variables that would point the binary somewhere else than the test says.
const REDIRECTING_ENV: [&str; 3] = [
    "LANYARD_SERVER_SOCKET",
    "SPIFFE_ENDPOINT_SOCKET",
    "RUST_LOG",
];

// ---------------------------------------------------------------------------------------------
// The binary

static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The `lanyard` binary under test.
///
/// `LANYARD_E2E_BINARY` names a prebuilt one. Otherwise the first call builds it with cargo
/// (`$CARGO`, on this workspace's manifest, `CARGO_TARGET_DIR` inherited) and every later
/// call, from any thread, gets the same path. A failed build fails every test with cargo's
/// output.
///
/// The build is `cargo test --workspace --no-run`, the same build as the project's test
/// command, so that under `cargo test --workspace` it finds everything fresh. A plain
/// `cargo build -p lanyard` resolves dependency features without the workspace's
/// dev-dependencies, and would compile a second copy of most of the dependency tree. If the
/// workspace build fails (another crate's tests do not compile), `cargo build -p lanyard`
/// is the fallback.
pub fn lanyard_binary() -> &'static Path {
    toolchain::prefetch_builds();
    match BINARY.get_or_init(locate_or_build) {
        Ok(path) => path,
        Err(message) => panic!("{message}"),
    }
}

fn locate_or_build() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("LANYARD_E2E_BINARY") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "LANYARD_E2E_BINARY={} is not a file",
                path.display()
            ))
        };
    }
    cargo_build(&["test", "--workspace", "--no-run"]).or_else(|workspace_error| {
        cargo_build(&["build", "-p", "lanyard", "--bin", "lanyard"]).map_err(|package_error| {
            format!("{workspace_error}\n\nand the fallback failed too:\n{package_error}")
        })
    })
}

/// Runs `cargo <args>` on this workspace and returns the `lanyard` executable it reports.
fn cargo_build(args: &[&str]) -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        .stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_by_cargo_for_the_test) {
            command.env_remove(name);
        }
    }
    let line = describe_command(&command);
    let output = command
        .output()
        .map_err(|e| format!("cannot run {line}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "building lanyard failed ({}): {line}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // Cargo reports every artifact, fresh or rebuilt, with its path: the one source of truth
    // for the target directory, the profile and the target triple. The binary itself, not
    // its unit-test harness.
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == "lanyard")
        .filter(|message| message["profile"]["test"] == false)
        .filter(|message| {
            message["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|kind| kind == "bin"))
        })
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| format!("{line} reported no lanyard executable"))
}

/// Whether cargo set `name` in the environment of the test it runs (`CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`, …). Left to the nested build, these would reach the build scripts that
/// watch them (ring's reruns when `CARGO_PKG_NAME` changes), and the nested build and the next
/// `cargo test` would each rebuild ring and everything above it for the other.
fn set_by_cargo_for_the_test(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_EXE_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// The workspace this crate belongs to.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("the e2e crate lives one level below the workspace root")
        .to_owned()
}

/// A [`Command`] for `lanyard`, with the variables that would redirect it
/// (`LANYARD_SERVER_SOCKET`, `SPIFFE_ENDPOINT_SOCKET`, `RUST_LOG`) removed and colours off.
pub fn lanyard() -> Command {
    lanyard_at(lanyard_binary())
}

fn lanyard_at(binary: &Path) -> Command {
    let mut command = Command::new(binary);
    for name in REDIRECTING_ENV {
        command.env_remove(name);
    }
    command.env("NO_COLOR", "1").stdin(Stdio::null());
    command
}

// ---------------------------------------------------------------------------------------------
// One-shot commands

/// What a finished command printed. `Display` shows all of it, for failure messages.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// The command line, for messages.
    pub command: String,
    /// How it exited.
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl CliOutput {
    /// Runs `command` to completion.
    pub fn run(command: &mut Command) -> Self {
        let line = describe_command(command);
        let output = command
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {line}: {e}"));
        Self {
            command: line,
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Its stdout; panics with everything it printed unless it succeeded.
    pub fn expect_success(&self) -> &str {
        assert!(self.success(), "expected success: {self}");
        &self.stdout
    }

    /// Its stdout parsed as JSON; panics unless it succeeded and printed one JSON document.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.expect_success())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }
}

impl fmt::Display for CliOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.status,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Runs `lanyard <args>` to completion.
pub fn cli<I, S>(args: I) -> CliOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    CliOutput::run(lanyard().args(args))
}

fn describe_command(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

// ---------------------------------------------------------------------------------------------
// Waiting, users, ports

/// Calls `attempt` every 100 ms until it returns `Ok`, for at most `timeout`; then panics with
/// `what` and the last error. The way to wait for an outcome without sleeping for a guess.
pub fn poll<T>(what: &str, timeout: Duration, mut attempt: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let error = match attempt() {
            Ok(value) => return value,
            Err(error) => error,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last attempt: {error}"
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Runs a future to completion on a fresh multi-threaded tokio runtime: the harness is
/// synchronous, the SPIFFE clients the tests drive are async.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building a tokio runtime")
        .block_on(future)
}

/// Awaits `future` for at most [`TIMEOUT`]; panics naming `what` if it takes longer. For async
/// clients, so that a stuck agent fails the test instead of hanging it.
pub async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(TIMEOUT, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {TIMEOUT:?} waiting for {what}"),
    }
}

/// The uid of this process, from the kernel's view of `/proc/self`.
pub fn current_uid() -> u32 {
    fs::metadata("/proc/self")
        .expect("reading /proc/self")
        .uid()
}

/// The gid of this process, from the kernel's view of `/proc/self`.
pub fn current_gid() -> u32 {
    fs::metadata("/proc/self")
        .expect("reading /proc/self")
        .gid()
}

/// Whether this process can run children under other uids.
pub fn running_as_root() -> bool {
    current_uid() == 0
}

/// `apt-get <args>` (noninteractive), waiting up to ten minutes for another installation's
/// dpkg lock rather than failing at once.
pub fn apt_get(args: &[&str]) -> Result<(), String> {
    let status = Command::new("apt-get")
        .args(["-o", "DPkg::Lock::Timeout=600"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("apt-get {} failed: {status}", args.join(" ")))
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago: bound, read and closed. A server
/// restarted on it keeps its address, which is what agents know it by.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("binding an ephemeral port on 127.0.0.1")
        .port()
}

/// A TCP port that was free a moment ago on every one of `hosts` (loopback addresses such as
/// 127.0.0.2 and 127.0.0.3): for servers that one host name reaches on one port.
pub fn free_port_on(hosts: &[IpAddr]) -> u16 {
    let (first, others) = hosts.split_first().expect("at least one host");
    for _ in 0..100 {
        let port = std::net::TcpListener::bind((*first, 0))
            .and_then(|listener| listener.local_addr())
            .unwrap_or_else(|e| panic!("binding an ephemeral port on {first}: {e}"))
            .port();
        if others
            .iter()
            .all(|host| std::net::TcpListener::bind((*host, port)).is_ok())
        {
            return port;
        }
    }
    panic!("no port free on all of {hosts:?}")
}

/// The `unix:uid:<uid>` selector.
pub fn uid_selector(uid: u32) -> String {
    format!("unix:uid:{uid}")
}

/// A TOML basic string holding `value`.
pub fn toml_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `log_level` for generated configs: `LANYARD_E2E_LOG_LEVEL` (e.g. `debug`) or `info`.
fn log_level() -> String {
    std::env::var("LANYARD_E2E_LOG_LEVEL").unwrap_or_else(|_| DEFAULT_LOG_LEVEL.to_owned())
}

fn toml_path(path: &Path) -> String {
    toml_string(path.to_str().expect("temporary paths are UTF-8"))
}

// ---------------------------------------------------------------------------------------------
// Directories

/// A temporary directory, mode 0755 so that workloads under other uids can reach the sockets
/// and the binary below it (the server and agent make their own private parts owner-only).
/// Removed on drop, unless the test is panicking and `LANYARD_E2E_KEEP` is set.
#[derive(Debug)]
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// Creates a fresh directory under the system temporary directory.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("lanyard-e2e-")
            .tempdir()
            .expect("creating a temporary directory");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .expect("making the temporary directory enterable");
        let path = dir.path().to_owned();
        Self {
            dir: Some(dir),
            path,
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path below it.
    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.path.join(relative)
    }

    /// Creates (with parents) and returns a subdirectory, mode 0755.
    pub fn subdir(&self, relative: impl AsRef<Path>) -> PathBuf {
        let path = self.join(relative);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        path
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && std::env::var_os("LANYARD_E2E_KEEP").is_some()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            let _ = writeln!(
                std::io::stderr(),
                "lanyard-e2e: kept {} (LANYARD_E2E_KEEP)",
                kept.display()
            );
        }
    }
}

/// The binary at `dir/lanyard`, runnable by any uid as long as `dir`'s ancestors can be
/// entered, which the build output directory may not allow: a hard link if the binary is
/// world-executable already (cheap), else a copy made so (a hard link shares the mode of the
/// build output, which is not ours to change).
fn public_binary(dir: &Path) -> PathBuf {
    let target = dir.join("lanyard");
    if target.exists() {
        return target;
    }
    let source = lanyard_binary();
    let world_executable = fs::metadata(source).is_ok_and(|m| m.mode() & 0o005 == 0o005);
    if !(world_executable && fs::hard_link(source, &target).is_ok()) {
        fs::copy(source, &target).unwrap_or_else(|e| {
            panic!("copying {} to {}: {e}", source.display(), target.display())
        });
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", target.display()));
    }
    target
}

// ---------------------------------------------------------------------------------------------
// Long-running children

/// A long-running child process (a server or an agent) whose stdout and stderr are appended to
/// a log file. Start, stop and start it again any number of times; each start is marked in
/// the log. Killed on drop; if the thread is panicking, the log tail is printed first (the
/// test harness shows it with the failure).
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    log_path: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl ChildProcess {
    /// A process named `name` (for messages) that logs to `log_path`; not started yet.
    pub fn new(name: impl Into<String>, log_path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            log_path: log_path.into(),
            child: None,
            starts: 0,
        }
    }

    /// Starts `command` with its output going to the log. Panics if it is still running (a
    /// child that exited on its own is reaped and replaced).
    pub fn start(&mut self, mut command: Command) {
        assert!(
            !self.is_running(),
            "{} is already running; stop it first",
            self.name
        );
        self.child = None;
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log_path.display()));
        let _ = writeln!(
            log,
            "=== lanyard-e2e: start #{} of {}: {} ===",
            self.starts,
            self.name,
            describe_command(&command)
        );
        let stdout = log.try_clone().expect("duplicating the log file handle");
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(log));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.name));
        self.child = Some(child);
    }

    /// The process name given to [`ChildProcess::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pid, while started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it was started and has not exited.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Panics with the log tail if it was started but has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!(
                "{} exited unexpectedly with {status}\n{}",
                self.name,
                self.log_tail(LOG_TAIL_LINES)
            );
        }
    }

    /// Waits up to `timeout` for it to exit on its own (a process expected to fail) and returns
    /// how it exited; panics with the log tail if it is still running then.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("{} was not started", self.name));
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
                Ok(None) => panic!(
                    "{} still runs after {timeout:?}\n{}",
                    self.name,
                    self.log_tail(LOG_TAIL_LINES)
                ),
                Err(e) => panic!("waiting for {}: {e}", self.name),
            }
        }
    }

    /// SIGKILL, then reaps it. A no-op when not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to [`TIMEOUT`] for it to exit and returns how it exited. Panics
    /// (after a SIGKILL) if it does not exit in time: a graceful shutdown that hangs is a bug.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        // std can only SIGKILL; `kill(1)` sends the SIGTERM that asks for a clean shutdown.
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !sent {
            let _ = child.kill();
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "{} did not exit within {TIMEOUT:?} of SIGTERM\n{}",
                        self.name,
                        self.log_tail(LOG_TAIL_LINES)
                    );
                }
            }
        }
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything logged so far, across starts.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log, headed by the process name and the log path.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        let tail = &all[all.len().saturating_sub(lines)..];
        format!(
            "--- last {} lines of {} ({}) ---\n{}",
            tail.len(),
            self.name,
            self.log_path.display(),
            tail.join("\n")
        )
    }
}

impl Drop for ChildProcess {
    // `eprintln!`, not a raw stderr write: the test harness captures it into the failed
    // test's output, next to the panic message.
    #[allow(clippy::print_stderr)]
    fn drop(&mut self) {
        if std::thread::panicking() && self.starts > 0 {
            eprintln!("{}", self.log_tail(LOG_TAIL_LINES));
        }
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Private host names

/// The shell that runs a command with [`PrivateHosts`]: bind-mount `$HOSTS` over `/etc/hosts`
/// in the new mount namespace, then become the command (same pid, so that signals reach it).
const PRIVATE_HOSTS_SCRIPT: &str = "mount --bind \"$HOSTS\" /etc/hosts && exec \"$@\"";

/// A hosts file that children see as their `/etc/hosts`: each runs in a mount namespace of
/// its own (`unshare -m`, private propagation) with the file bind-mounted over `/etc/hosts`, so
/// that a test can give one name several addresses without touching the machine's file. Needs
/// root (`CAP_SYS_ADMIN`) and `unshare` from util-linux; [`PrivateHosts::check`] says whether
/// this machine allows it.
#[derive(Debug)]
pub struct PrivateHosts {
    path: PathBuf,
}

impl PrivateHosts {
    /// Writes `path` with `localhost` and one line per `(address, name)`.
    pub fn write(path: &Path, names: &[(IpAddr, &str)]) -> Self {
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (address, name) in names {
            text.push_str(&format!("{address} {name}\n"));
        }
        fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        Self {
            path: path.to_owned(),
        }
    }

    /// `Ok` if a child run through [`PrivateHosts::wrap`] sees this file as `/etc/hosts`;
    /// otherwise why not (not root, `unshare` missing or refused).
    pub fn check(&self) -> Result<(), String> {
        if !running_as_root() {
            return Err(format!(
                "a private /etc/hosts needs root (uid {})",
                current_uid()
            ));
        }
        let mut cat = Command::new("cat");
        cat.arg("/etc/hosts");
        let output = CliOutput::run(&mut self.wrap(cat));
        let expected = fs::read_to_string(&self.path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.path.display()));
        if output.success() && output.stdout == expected {
            Ok(())
        } else {
            Err(format!("a private /etc/hosts is refused here: {output}"))
        }
    }

    /// `command` run as `unshare -m -- sh -c '<bind-mount, exec>' sh <program> <args…>`, with
    /// its environment and working directory.
    pub fn wrap(&self, command: Command) -> Command {
        let mut wrapped = Command::new("unshare");
        wrapped
            .args(["-m", "--", "sh", "-c", PRIVATE_HOSTS_SCRIPT, "sh"])
            .arg(command.get_program())
            .args(command.get_args());
        for (name, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(name, value),
                None => wrapped.env_remove(name),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped.env("HOSTS", &self.path);
        wrapped
    }
}

// ---------------------------------------------------------------------------------------------
// Server

/// A `lanyard server run` on `127.0.0.1:<free port>` with its admin socket, SQLite datastore
/// and disk keys in its own directory. Stop and start it again to keep its data and port.
#[derive(Debug)]
pub struct Server {
    dir: PathBuf,
    trust_domain: String,
    host: IpAddr,
    port: u16,
    config_path: PathBuf,
    admin_socket: PathBuf,
    process: ChildProcess,
}

impl Server {
    /// Starts a server in `dir` (created if missing) and waits until it is healthy.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, "")
    }

    /// Like [`Server::start`], with `extra_toml` added to the config's top-level keys (e.g.
    /// `default_x509_svid_ttl = "30s"`).
    pub fn start_with(dir: &Path, extra_toml: &str) -> Self {
        let mut server = Self::configure(dir, extra_toml);
        server.start_again();
        server
    }

    /// Writes the config (with `extra_toml` among its top-level keys) and picks the port, but
    /// starts nothing: then [`Server::start_again`], or [`Server::launch`] for a server
    /// expected to fail.
    pub fn configure(dir: &Path, extra_toml: &str) -> Self {
        Self::configure_on(dir, extra_toml, "kind = \"sqlite\"\n")
    }

    /// Like [`Server::start_with`], with `datastore_toml` as the `[datastore]` table (e.g. a
    /// PostgreSQL database shared with other servers).
    pub fn start_on(dir: &Path, extra_toml: &str, datastore_toml: &str) -> Self {
        let mut server = Self::configure_on(dir, extra_toml, datastore_toml);
        server.start_again();
        server
    }

    /// Like [`Server::configure`], with `datastore_toml` as the `[datastore]` table.
    pub fn configure_on(dir: &Path, extra_toml: &str, datastore_toml: &str) -> Self {
        Self::configure_for(dir, TRUST_DOMAIN, extra_toml, datastore_toml)
    }

    /// Like [`Server::start_with`], for `trust_domain` instead of [`TRUST_DOMAIN`] (agents
    /// started against it join that trust domain too).
    pub fn start_in_trust_domain(dir: &Path, trust_domain: &str, extra_toml: &str) -> Self {
        let mut server = Self::configure_for(dir, trust_domain, extra_toml, "kind = \"sqlite\"\n");
        server.start_again();
        server
    }

    /// Like [`Server::configure_on`], for `trust_domain`.
    pub fn configure_for(
        dir: &Path,
        trust_domain: &str,
        extra_toml: &str,
        datastore_toml: &str,
    ) -> Self {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let port = free_port();
        let admin_socket = dir.join("admin").join("api.sock");
        let config_path = dir.join("server.toml");
        let config = format!(
            "trust_domain = {td}\n\
             data_dir     = {data}\n\
             bind_address = \"127.0.0.1:{port}\"\n\
             socket_path  = {socket}\n\
             log_level    = {log_level}\n\
             {extra_toml}\n\
             [datastore]\n\
             {datastore_toml}\n\
             [key_manager]\n\
             kind = \"disk\"\n",
            td = toml_string(trust_domain),
            data = toml_path(&dir.join("data")),
            socket = toml_path(&admin_socket),
            log_level = toml_string(&log_level()),
        );
        fs::write(&config_path, config)
            .unwrap_or_else(|e| panic!("writing {}: {e}", config_path.display()));
        Self {
            dir: dir.to_owned(),
            trust_domain: trust_domain.to_owned(),
            host: IpAddr::from([127, 0, 0, 1]),
            port,
            process: ChildProcess::new(format!("server :{port}"), dir.join("server.log")),
            config_path,
            admin_socket,
        }
    }

    /// Starts the (configured or stopped) server with its config, data and port, and waits
    /// until it is healthy.
    pub fn start_again(&mut self) {
        self.launch();
        poll("the server to become healthy", TIMEOUT, || {
            self.process.assert_running();
            let health = self.healthcheck();
            if health.success() {
                Ok(())
            } else {
                Err(health.stderr)
            }
        });
    }

    /// Starts the process without waiting for anything.
    pub fn launch(&mut self) {
        let mut command = lanyard();
        command
            .args(["server", "run", "--config"])
            .arg(&self.config_path);
        self.process.start(command);
    }

    /// SIGTERM; asserts that it shut down cleanly (exit status 0).
    pub fn stop(&mut self) {
        let status = self.process.terminate();
        assert!(
            status.success(),
            "the server exited with {status} on SIGTERM\n{}",
            self.process.log_tail(LOG_TAIL_LINES)
        );
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// The server's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The generated config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The TLS port agents connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `<host>:<port>` (`127.0.0.1:<port>` unless [`Server::rebind`] said otherwise).
    pub fn address(&self) -> String {
        SocketAddr::new(self.host, self.port).to_string()
    }

    /// Makes the (configured or stopped) server listen on `address` from its next start:
    /// rewrites `bind_address` in its config. For servers on other loopback addresses
    /// (127.0.0.2, …) or a server taking over another's address.
    pub fn rebind(&mut self, address: SocketAddr) {
        assert!(
            !self.process.is_running(),
            "stop the server before moving it to {address}"
        );
        let text = fs::read_to_string(&self.config_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.config_path.display()));
        let old = format!("bind_address = \"{}\"", self.address());
        assert!(text.contains(&old), "no `{old}` in {text}");
        let new = format!("bind_address = \"{address}\"");
        fs::write(&self.config_path, text.replace(&old, &new))
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.config_path.display()));
        self.host = address.ip();
        self.port = address.port();
    }

    /// The admin API socket.
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// The process, for its log and state.
    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail(LOG_TAIL_LINES)
    }

    /// `lanyard <args> --socket <admin socket>`, run to completion.
    pub fn cli<I, S>(&self, args: I) -> CliOutput
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        CliOutput::run(lanyard().args(args).arg("--socket").arg(&self.admin_socket))
    }

    /// Like [`Server::cli`] with `--output json`; panics with the output and the server's log
    /// unless the command succeeds and prints JSON.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let output = self.cli(args.iter().chain(&["--output", "json"]));
        assert!(
            output.success(),
            "admin command failed: {output}\n{}",
            self.log_tail()
        );
        output.json()
    }

    /// `lanyard server healthcheck`.
    pub fn healthcheck(&self) -> CliOutput {
        self.cli(["server", "healthcheck"])
    }

    /// A fresh join token, valid for ten minutes.
    pub fn generate_token(&self) -> String {
        let token = self.cli_json(&["token", "generate", "--ttl", "600"]);
        token["value"]
            .as_str()
            .unwrap_or_else(|| panic!("no token value in {token}"))
            .to_owned()
    }

    /// Creates a registration entry and returns its ID. `extra` holds further
    /// `lanyard entry create` flags (`--x509-svid-ttl 20s`, `--hint web`, …).
    pub fn create_entry(
        &self,
        spiffe_id: &str,
        parent_id: &str,
        selectors: &[&str],
        extra: &[&str],
    ) -> String {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            parent_id,
        ];
        for selector in selectors {
            args.extend(["--selector", selector]);
        }
        args.extend(extra);
        let created = self.cli_json(&args);
        let result = &created["results"][0];
        assert_eq!(
            result["status"]["code"], 0,
            "creating {spiffe_id} failed: {created}"
        );
        result["entry"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no entry ID in {created}"))
            .to_owned()
    }

    /// The SPIFFE IDs of the attested agents, from `lanyard agent list`.
    pub fn agent_ids(&self) -> Vec<String> {
        let list = self.cli_json(&["agent", "list"]);
        list["agents"]
            .as_array()
            .unwrap_or_else(|| panic!("no agents array in {list}"))
            .iter()
            .map(|agent| spiffe_id_of(&agent["id"]))
            .collect()
    }

    /// The X.509 authorities as PEM (`lanyard bundle show`).
    pub fn bundle_pem(&self) -> String {
        let output = self.cli(["bundle", "show", "--format", "pem"]);
        output.expect_success().to_owned()
    }

    /// The X.509 authorities as DER.
    pub fn bundle_der(&self) -> Vec<Vec<u8>> {
        pem_certificates(&self.bundle_pem())
    }

    /// The SPIFFE bundle (JWKS with X.509 and JWT authorities), `lanyard bundle show
    /// --format spiffe`, parsed by `lanyard-core`.
    pub fn spiffe_bundle(&self) -> lanyard_core::TrustBundle {
        let output = self.cli(["bundle", "show", "--format", "spiffe"]);
        lanyard_core::TrustBundle::from_jwks_json(
            TrustDomain::new(&self.trust_domain).expect("the server's trust domain is valid"),
            output.expect_success().as_bytes(),
        )
        .unwrap_or_else(|e| panic!("the SPIFFE bundle does not parse ({e}): {output}"))
    }
}

/// A SPIFFE ID from its JSON form in the CLI's output (`trust_domain` and `path`).
pub fn spiffe_id_of(id: &Value) -> String {
    format!(
        "spiffe://{}{}",
        id["trust_domain"].as_str().unwrap_or_default(),
        id["path"].as_str().unwrap_or_default()
    )
}

/// [`TRUST_DOMAIN`] as a `lanyard-core` type.
pub fn trust_domain() -> TrustDomain {
    TrustDomain::new(TRUST_DOMAIN).expect("the test trust domain is valid")
}

/// `spiffe://example.org<path>`.
pub fn spiffe_id(path: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}{path}")
}

/// Checks what a SPIFFE client library reported of its X.509-SVID, as JSON fields of `seen`
/// (`x509_spiffe_id`, `x509_chain_pem`, `x509_bundle_pem`): the identity `id`, a chain that
/// verifies against the server's authorities, and exactly those authorities as the bundle.
pub fn assert_client_x509(server: &Server, seen: &Value, id: &str, client: &str) {
    assert_eq!(seen["x509_spiffe_id"], id, "{seen}");
    let chain = pem_certificates(seen["x509_chain_pem"].as_str().unwrap_or_default());
    let mut authorities = server.bundle_der();
    let verified = lanyard_core::x509::verify_svid_chain(
        &chain,
        &trust_domain(),
        &authorities,
        SystemTime::now(),
    )
    .unwrap_or_else(|e| panic!("the chain {client} got does not verify: {e}\n{seen}"));
    assert_eq!(verified.spiffe_id().as_str(), id);
    let mut served = pem_certificates(seen["x509_bundle_pem"].as_str().unwrap_or_default());
    served.sort();
    authorities.sort();
    assert_eq!(
        served, authorities,
        "the bundle {client} got vs. the server's"
    );
}

/// Checks what a SPIFFE client library reported of its JWT-SVID (`jwt_spiffe_id`,
/// `jwt_audience`, `jwt_token`, and `validated_spiffe_id`, `validated_audience`,
/// `offline_spiffe_id` from validating it through the agent and offline): minted for `id` and
/// `audience`, validated as such, and valid against the server's own bundle.
pub fn assert_client_jwt(server: &Server, seen: &Value, id: &str, audience: &str, client: &str) {
    let audiences = serde_json::json!([audience]);
    assert_eq!(seen["jwt_spiffe_id"], id, "{seen}");
    assert_eq!(seen["jwt_audience"], audiences, "{seen}");
    assert_eq!(seen["validated_spiffe_id"], id, "{seen}");
    assert_eq!(seen["validated_audience"], audiences, "{seen}");
    assert_eq!(seen["offline_spiffe_id"], id, "{seen}");
    let token = seen["jwt_token"].as_str().unwrap_or_default();
    let validated = lanyard_core::jwt::validate_jwt_svid_with_bundle(
        token,
        audience,
        &server.spiffe_bundle(),
        SystemTime::now(),
    )
    .unwrap_or_else(|e| panic!("the JWT-SVID {client} got does not validate: {e}\n{seen}"));
    assert_eq!(validated.spiffe_id.as_str(), id);
}

/// The DER certificates of a PEM text, in order.
pub fn pem_certificates(pem: &str) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|cert| cert.expect("well-formed PEM certificate").to_vec())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Agent

/// A user to run a workload as (needs root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// The uid.
    pub uid: u32,
    /// The primary gid; supplementary groups are dropped.
    pub gid: u32,
}

impl RunAs {
    /// `uid` with the same number as gid (as for 65534, nobody/nogroup).
    pub fn uid(uid: u32) -> Self {
        Self { uid, gid: uid }
    }
}

/// A `lanyard agent run` with its data directory and Workload API socket in its own
/// directory, a `sync_interval` of 500 ms, and the server's bundle for bootstrap.
#[derive(Debug)]
pub struct Agent {
    dir: PathBuf,
    config_path: PathBuf,
    socket: PathBuf,
    process: ChildProcess,
    public_binary: OnceLock<PathBuf>,
}

impl Agent {
    /// Starts an agent in `dir` that attests to `server` with `join_token`, and waits until
    /// its Workload API answers.
    pub fn start(dir: &Path, server: &Server, join_token: &str) -> Self {
        Self::start_with(dir, server, Some(join_token), "")
    }

    /// Like [`Agent::start`]; `join_token` may be absent (an agent with stored credentials),
    /// and `extra_toml` is added to the config's top-level keys.
    pub fn start_with(
        dir: &Path,
        server: &Server,
        join_token: Option<&str>,
        extra_toml: &str,
    ) -> Self {
        let mut agent = Self::configure(dir, server, join_token, extra_toml);
        agent.start_again();
        agent
    }

    /// Writes the config and the server's bundle (for `trust_bundle_path`), but starts
    /// nothing: then [`Agent::start_again`], or [`Agent::launch`] for an agent expected to
    /// fail (see [`ChildProcess::wait_for_exit`]).
    pub fn configure(
        dir: &Path,
        server: &Server,
        join_token: Option<&str>,
        extra_toml: &str,
    ) -> Self {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
        let bundle_path = dir.join("bootstrap-bundle.pem");
        fs::write(&bundle_path, server.bundle_pem())
            .unwrap_or_else(|e| panic!("writing {}: {e}", bundle_path.display()));
        let socket = dir.join("public").join("api.sock");
        let config_path = dir.join("agent.toml");
        let join_token = join_token
            .map(|token| format!("join_token = {}\n", toml_string(token)))
            .unwrap_or_default();
        let config = format!(
            "server_address    = \"{address}\"\n\
             trust_domain      = {td}\n\
             data_dir          = {data}\n\
             trust_bundle_path = {bundle}\n\
             socket_path       = {socket}\n\
             sync_interval     = \"500ms\"\n\
             log_level         = {log_level}\n\
             {join_token}\
             {extra_toml}\n",
            address = server.address(),
            td = toml_string(server.trust_domain()),
            data = toml_path(&dir.join("data")),
            bundle = toml_path(&bundle_path),
            socket = toml_path(&socket),
            log_level = toml_string(&log_level()),
        );
        fs::write(&config_path, config)
            .unwrap_or_else(|e| panic!("writing {}: {e}", config_path.display()));
        Self {
            process: ChildProcess::new("agent", dir.join("agent.log")),
            dir: dir.to_owned(),
            config_path,
            socket,
            public_binary: OnceLock::new(),
        }
    }

    /// Starts the (configured or stopped) agent with its config and data directory, and waits
    /// until its Workload API answers.
    pub fn start_again(&mut self) {
        self.launch();
        self.wait_until_serving();
    }

    /// Starts the process without waiting for anything.
    pub fn launch(&mut self) {
        let mut command = lanyard();
        command
            .args(["agent", "run", "--config"])
            .arg(&self.config_path);
        self.process.start(command);
    }

    /// Like [`Agent::start_again`], with `hosts` as the agent's `/etc/hosts`.
    pub fn start_again_with_hosts(&mut self, hosts: &PrivateHosts) {
        let mut command = lanyard();
        command
            .args(["agent", "run", "--config"])
            .arg(&self.config_path);
        self.process.start(hosts.wrap(command));
        self.wait_until_serving();
    }

    /// Waits until the Workload API socket accepts connections and answers a request (with
    /// SVIDs or with a gRPC error such as PermissionDenied).
    pub fn wait_until_serving(&mut self) {
        poll("the agent's Workload API to answer", TIMEOUT, || {
            self.process.assert_running();
            std::os::unix::net::UnixStream::connect(&self.socket)
                .map_err(|e| format!("connecting to {}: {e}", self.socket.display()))?;
            let output = self.fetch_x509_output(None);
            if output.success() || !output.stderr.contains("cannot connect") {
                Ok(())
            } else {
                Err(output.to_string())
            }
        });
    }

    /// SIGTERM; asserts that it shut down cleanly (exit status 0).
    pub fn stop(&mut self) {
        let status = self.process.terminate();
        assert!(
            status.success(),
            "the agent exited with {status} on SIGTERM\n{}",
            self.process.log_tail(LOG_TAIL_LINES)
        );
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Rewrites the config file through `edit` (e.g. to drop the `join_token` line before
    /// [`Agent::start_again`]).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let text = fs::read_to_string(&self.config_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.config_path.display()));
        fs::write(&self.config_path, edit(text))
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.config_path.display()));
    }

    /// The agent's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The generated config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The Workload API socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// `unix://<socket>`: the value for `SPIFFE_ENDPOINT_SOCKET` and SPIFFE clients.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The process, for its log and state.
    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }

    /// The last lines of the agent's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail(LOG_TAIL_LINES)
    }

    /// A `lanyard` command (the binary is runnable by any uid) with `SPIFFE_ENDPOINT_SOCKET`
    /// set to this agent, running as `run_as` if given. Add the subcommand and run it.
    pub fn workload_command(&self, run_as: Option<RunAs>) -> Command {
        let binary = self
            .public_binary
            .get_or_init(|| public_binary(&self.dir))
            .clone();
        let mut command = lanyard_at(&binary);
        command.env("SPIFFE_ENDPOINT_SOCKET", self.endpoint());
        if let Some(user) = run_as {
            command.uid(user.uid).gid(user.gid).current_dir("/");
        }
        command
    }

    /// `lanyard fetch x509 --output json` as `run_as` (or as this process), run to completion.
    pub fn fetch_x509_output(&self, run_as: Option<RunAs>) -> CliOutput {
        let mut command = self.workload_command(run_as);
        command
            .args(["fetch", "x509", "--output", "json", "--socket"])
            .arg(&self.socket);
        CliOutput::run(&mut command)
    }

    /// The X.509-SVIDs this process gets, or the failed command (e.g. PermissionDenied).
    pub fn fetch_x509(&self) -> Result<Vec<FetchedSvid>, CliOutput> {
        parse_fetch(self.fetch_x509_output(None))
    }

    /// The X.509-SVIDs a process running as `run_as` gets, or the failed command.
    pub fn fetch_x509_as(&self, run_as: RunAs) -> Result<Vec<FetchedSvid>, CliOutput> {
        parse_fetch(self.fetch_x509_output(Some(run_as)))
    }

    /// Polls until a fetch (as `run_as`, or as this process) returns exactly the SPIFFE IDs
    /// `expected` (in any order), and returns those SVIDs. Panics after [`TIMEOUT`] with the
    /// last answer (and, through [`ChildProcess`]'s drop, the agent's log).
    pub fn wait_for_svids(&self, run_as: Option<RunAs>, expected: &[&str]) -> Vec<FetchedSvid> {
        let mut expected_ids: Vec<&str> = expected.to_vec();
        expected_ids.sort_unstable();
        let what = format!("the agent to serve exactly {expected:?} to {run_as:?}");
        poll(&what, TIMEOUT, || {
            let svids = parse_fetch(self.fetch_x509_output(run_as)).map_err(|o| o.to_string())?;
            let mut ids: Vec<&str> = svids.iter().map(|s| s.spiffe_id.as_str()).collect();
            ids.sort_unstable();
            if ids == expected_ids {
                Ok(svids)
            } else {
                Err(format!("served {ids:?}"))
            }
        })
    }
}

/// The SVIDs that `lanyard fetch x509 --output json` printed, or the command if it failed.
pub fn parse_fetch(output: CliOutput) -> Result<Vec<FetchedSvid>, CliOutput> {
    if !output.success() {
        return Err(output);
    }
    let json = output.json();
    let svids = json["svids"]
        .as_array()
        .unwrap_or_else(|| panic!("no svids array: {output}"));
    Ok(svids
        .iter()
        .map(|svid| FetchedSvid {
            spiffe_id: svid["spiffe_id"].as_str().unwrap_or_default().to_owned(),
            hint: svid["hint"].as_str().unwrap_or_default().to_owned(),
            chain: pem_certificates(svid["x509_svid_pem"].as_str().unwrap_or_default()),
            bundle: pem_certificates(svid["bundle_pem"].as_str().unwrap_or_default()),
        })
        .collect())
}

/// One X.509-SVID as `lanyard fetch x509 --output json` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedSvid {
    /// The SPIFFE ID the agent says the SVID is for.
    pub spiffe_id: String,
    /// The entry's hint, empty if none.
    pub hint: String,
    /// The certificate chain, DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The trust domain's X.509 authorities served with it, DER.
    pub bundle: Vec<Vec<u8>>,
}

impl FetchedSvid {
    /// Verifies the chain against `authorities` at `now` (`lanyard-core`'s X.509-SVID rules).
    pub fn verify_with(
        &self,
        authorities: &[Vec<u8>],
        now: SystemTime,
    ) -> Result<VerifiedSvid, X509Error> {
        lanyard_core::x509::verify_svid_chain(&self.chain, &trust_domain(), authorities, now)
    }

    /// Verifies the chain against the bundle served with it, now, and checks that the leaf
    /// names the SPIFFE ID the agent said; panics with the reason otherwise.
    pub fn verify(&self) -> VerifiedSvid {
        let verified = self
            .verify_with(&self.bundle, SystemTime::now())
            .unwrap_or_else(|e| panic!("the SVID for {} does not verify: {e}", self.spiffe_id));
        assert_eq!(
            verified.spiffe_id().as_str(),
            self.spiffe_id,
            "the leaf's URI SAN vs. the SPIFFE ID the agent reported"
        );
        verified
    }

    /// The leaf certificate, DER.
    pub fn leaf(&self) -> &[u8] {
        self.chain.first().map_or(&[], Vec::as_slice)
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster

/// A server and one agent attested with a join token, in one [`TestDir`]: `server/` and
/// `agent/`. The common starting point; register workloads with [`Cluster::register`].
#[derive(Debug)]
pub struct Cluster {
    // Dropped in declaration order: the agent, then the server, then the directory.
    /// The agent.
    pub agent: Agent,
    /// The server.
    pub server: Server,
    token: String,
    dir: TestDir,
}

impl Cluster {
    /// Starts a server, generates a join token, starts an agent with it.
    pub fn start() -> Self {
        Self::start_with("", "")
    }

    /// Like [`Cluster::start`], with extra top-level TOML for the server and the agent.
    pub fn start_with(server_toml: &str, agent_toml: &str) -> Self {
        let dir = TestDir::new();
        let server = Server::start_with(&dir.join("server"), server_toml);
        let token = server.generate_token();
        let agent = Agent::start_with(&dir.join("agent"), &server, Some(&token), agent_toml);
        Self {
            agent,
            server,
            token,
            dir,
        }
    }

    /// The test directory holding `server/` and `agent/`.
    pub fn dir(&self) -> &TestDir {
        &self.dir
    }

    /// The join token the agent attested with.
    pub fn join_token(&self) -> &str {
        &self.token
    }

    /// The agent's SPIFFE ID: `spiffe://example.org/spire/agent/join_token/<token>`.
    pub fn agent_id(&self) -> String {
        spiffe_id(&format!("/spire/agent/join_token/{}", self.token))
    }

    /// Registers `spiffe://example.org<path>` for workloads of this agent with `selectors`,
    /// passing `extra` flags to `lanyard entry create`; returns the SPIFFE ID.
    pub fn register(&self, path: &str, selectors: &[&str], extra: &[&str]) -> String {
        let id = spiffe_id(path);
        self.server
            .create_entry(&id, &self.agent_id(), selectors, extra);
        id
    }

    /// Registers `path` for processes running as `uid` (selector `unix:uid:<uid>`).
    pub fn register_uid(&self, path: &str, uid: u32, extra: &[&str]) -> String {
        self.register(path, &[&uid_selector(uid)], extra)
    }

    /// The server's and the agent's log tails, for assertion messages.
    pub fn logs(&self) -> String {
        format!("{}\n{}", self.server.log_tail(), self.agent.log_tail())
    }
}
