//! Debian's Prometheus for the tests: `prometheus` and `promtool` found in `/usr/bin`, or
//! installed with `apt-get` (package `prometheus`, without its recommendations) when the
//! tests run as root and they are missing. CI never skips; `LANYARD_E2E_SKIP_PROMETHEUS=1`
//! skips the tests that need them locally.
//!
//! [`Prometheus::start`] runs one on a free loopback port with a generated config scraping
//! the given targets every second, its storage in a temporary directory; it is killed when
//! dropped. [`Prometheus::query`] asks its HTTP API (`/api/v1/query`).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use crate::{ChildProcess, TestDir, free_port, poll};

/// Set to `1` to skip the Prometheus tests (CI never does).
pub const SKIP_VAR: &str = "LANYARD_E2E_SKIP_PROMETHEUS";

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

/// The two binaries.
#[derive(Debug)]
pub struct Binaries {
    /// The server.
    pub prometheus: PathBuf,
    /// Its command-line tool (`promtool check metrics`).
    pub promtool: PathBuf,
}

/// Prometheus and promtool, installed from Debian's packages if needed; `None` (with a
/// notice naming `test`) when [`SKIP_VAR`] is set. Panics, saying how to get them, when they
/// cannot be had.
pub fn prometheus_or_skip(test: &str) -> Option<&'static Binaries> {
    if std::env::var_os(SKIP_VAR).is_some_and(|value| value == "1") {
        let _ = writeln!(std::io::stderr(), "skipping {test}: {SKIP_VAR}=1");
        return None;
    }
    static BINARIES: OnceLock<Result<Binaries, String>> = OnceLock::new();
    match BINARIES.get_or_init(install) {
        Ok(binaries) => Some(binaries),
        Err(error) => panic!("{error}"),
    }
}

fn install() -> Result<Binaries, String> {
    let binaries = Binaries {
        prometheus: PathBuf::from(PROMETHEUS),
        promtool: PathBuf::from(PROMTOOL),
    };
    let present = |b: &Binaries| b.prometheus.is_file() && b.promtool.is_file();
    if present(&binaries) {
        return Ok(binaries);
    }
    if !crate::running_as_root() {
        return Err(format!(
            "Prometheus is not installed ({PROMETHEUS}, {PROMTOOL}) and installing it needs \
             root: run `apt-get install --no-install-recommends prometheus`, or set {SKIP_VAR}=1"
        ));
    }
    crate::apt_get(&["update"])?;
    crate::apt_get(&["install", "-y", "--no-install-recommends", "prometheus"])?;
    if present(&binaries) {
        Ok(binaries)
    } else {
        Err(format!(
            "apt-get installed prometheus but there is no {PROMETHEUS} or {PROMTOOL}"
        ))
    }
}

/// `promtool check metrics` on an exposition: `Ok` when it reports no problem, else what it
/// said.
pub fn check_metrics(binaries: &Binaries, exposition: &str) -> Result<(), String> {
    let mut child = Command::new(&binaries.promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running promtool: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("promtool has no stdin")?
        .write_all(exposition.as_bytes())
        .map_err(|e| format!("writing to promtool: {e}"))?;
    let output = child
        .wait_with_output()
        .map_err(|e| format!("waiting for promtool: {e}"))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!(
            "promtool check metrics ({}): {said}",
            output.status
        ))
    }
}

/// A running Prometheus, killed when dropped.
#[derive(Debug)]
pub struct Prometheus {
    port: u16,
    process: ChildProcess,
    // Dropped after the process: its storage lives here.
    _dir: TestDir,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port, scraping `targets` (job name, `host:port`)
    /// every second at `/metrics`, and waits until it is ready.
    pub fn start(binaries: &Binaries, targets: &[(&str, String)]) -> Self {
        let dir = TestDir::new();
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n",
        );
        for (job, target) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    metrics_path: /metrics\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("writing prometheus.yml");
        let port = free_port();
        let mut process = ChildProcess::new("prometheus", dir.join("prometheus.log"));
        let mut command = Command::new(&binaries.prometheus);
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.subdir("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir.path());
        process.start(command);
        let prometheus = Self {
            port,
            process,
            _dir: dir,
        };
        poll(
            "Prometheus to be ready",
            Duration::from_secs(60),
            || match http_get(port, "/-/ready") {
                Ok((200, _)) => Ok(()),
                Ok((status, body)) => Err(format!("{status} {body}")),
                Err(error) => Err(error),
            },
        );
        prometheus
    }

    /// The result vector of the instant query `promql`, or why there is none.
    pub fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let (status, body) = http_get(
            self.port,
            &format!("/api/v1/query?query={}", percent_encode(promql)),
        )?;
        let answer: Value =
            serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
        if answer["status"] != "success" {
            return Err(format!("{status}: {body}"));
        }
        answer["data"]["result"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("no result vector: {body}"))
    }

    /// Polls `promql` until it answers at least one sample; returns the samples.
    pub fn wait_for_sample(&self, promql: &str, timeout: Duration) -> Vec<Value> {
        poll(&format!("Prometheus to answer {promql}"), timeout, || {
            let samples = self.query(promql)?;
            if samples.is_empty() {
                Err("no sample yet".to_owned())
            } else {
                Ok(samples)
            }
        })
    }

    /// The log tail, for assertion messages.
    pub fn log_tail(&self) -> String {
        self.process.log_tail(30)
    }
}

/// `GET path` on 127.0.0.1:`port` (HTTP/1.1, `Connection: close`): the status and body.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).map_err(|e| e.to_string())?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP response: {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {response:?}"))?;
    let chunked = head
        .lines()
        .any(|line| line.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// A chunked body's content.
fn dechunk(mut body: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| format!("bad chunk in {body:?}"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest
            .get(..size)
            .ok_or_else(|| format!("short chunk in {rest:?}"))?;
        out.push_str(chunk);
        body = rest.get(size + 2..).unwrap_or("");
    }
}

/// `text` as a URL query value.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}
