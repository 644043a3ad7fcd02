//! SPIRE on the same machine, for `--against-spire`: `spire-server` as a child process with
//! its SQLite datastore on the same tmpfs as Lanyard's (or, for `propagation`, two of them
//! over one PostgreSQL database), rate limits off (every simulated agent shares one IP), and
//! `spire-agent` for the Workload API benchmarks. The benchmarks drive it through the same
//! SPIRE APIs they use against Lanyard.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::cpu::CpuMeter;
use crate::harness::{AgentKind, TRUST_DOMAIN, Target, trust_domain, wait_until};
use crate::plan::Outcomes;
use crate::report::Report;
use crate::workload::AgentProcess;

/// A running `spire-server`.
#[derive(Debug)]
pub(crate) struct SpireServer {
    child: Child,
    pub(crate) target: Target,
}

impl Drop for SpireServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn binary(bin: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = bin.join(name);
    anyhow::ensure!(
        path.is_file(),
        "{} not found; pass --spire-bin with a directory holding spire-server and spire-agent (v1.13.3)",
        path.display()
    );
    Ok(path)
}

/// Where a `spire-server` keeps its data.
#[derive(Debug, Clone)]
pub(crate) enum SpireDatastore {
    /// SQLite in the server's directory.
    Sqlite,
    /// The PostgreSQL database at this URL, which several servers may share.
    Postgres(String),
}

impl SpireServer {
    /// Starts `spire-server` from `bin` on `dir` with SQLite.
    pub(crate) async fn start(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        Self::start_on(bin, dir, &SpireDatastore::Sqlite).await
    }

    /// Starts `spire-server` from `bin` on `dir` with `datastore`.
    pub(crate) async fn start_on(
        bin: &Path,
        dir: &Path,
        datastore: &SpireDatastore,
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let (database_type, connection_string) = match datastore {
            SpireDatastore::Sqlite => (
                "sqlite3",
                dir.join("datastore.sqlite3").display().to_string(),
            ),
            // The benchmark's cluster has no TLS; SPIRE's driver (pgx) would try it first.
            SpireDatastore::Postgres(url) => ("postgres", format!("{url}?sslmode=disable")),
        };
        let socket = dir.join("server.sock");
        let config = format!(
            r#"server {{
  bind_address = "127.0.0.1"
  bind_port = "{port}"
  socket_path = "{socket}"
  trust_domain = "{TRUST_DOMAIN}"
  data_dir = "{data}"
  log_level = "WARN"
  ca_key_type = "ec-p256"
  default_x509_svid_ttl = "1h"
  ratelimit {{
    attestation = false
    signing = false
  }}
}}
plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "{database_type}"
      connection_string = "{connection_string}"
    }}
  }}
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
}}
"#,
            socket = socket.display(),
            data = dir.join("data").display(),
        );
        let config_path = dir.join("server.conf");
        std::fs::write(&config_path, config)?;
        let child = Command::new(binary(bin, "spire-server")?)
            .arg("run")
            .arg("-config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting spire-server")?;
        let pid = child.id();
        let server = Self {
            child,
            target: Target {
                scraper: None,
                name: "spire".to_owned(),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                admin_socket: socket,
                cpu: CpuMeter::Process(pid),
                agent: AgentKind::Spire(bin.to_owned()),
            },
        };
        let target = server.target.clone();
        wait_until("spire-server", Duration::from_secs(60), || {
            let target = target.clone();
            async move { target.authorities().await.is_ok_and(|a| !a.is_empty()) }
        })
        .await?;
        Ok(server)
    }
}

/// Starts `spire-agent` from `bin` against `target`, attesting with a fresh join token.
pub(crate) async fn start_agent(
    bin: &Path,
    target: &Target,
    dir: &Path,
    sync_interval: Duration,
) -> anyhow::Result<AgentProcess> {
    let admin = target.admin().await?;
    let token = target.join_token(&admin).await?;
    let bundle = dir.join("bootstrap.pem");
    let pem: String = target
        .authorities()
        .await?
        .iter()
        .map(|der| lanyard_core::keys::pem_encode("CERTIFICATE", der))
        .collect();
    std::fs::write(&bundle, pem)?;
    let socket = dir.join("workload").join("api.sock");
    std::fs::create_dir_all(dir.join("workload"))?;
    let config = format!(
        r#"agent {{
  data_dir = "{data}"
  log_level = "WARN"
  server_address = "127.0.0.1"
  server_port = "{port}"
  socket_path = "{socket}"
  trust_bundle_path = "{bundle}"
  trust_domain = "{TRUST_DOMAIN}"
  join_token = "{token}"
  experimental {{
    sync_interval = "{interval}ms"
  }}
}}
plugins {{
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
  WorkloadAttestor "unix" {{
    plugin_data {{}}
  }}
}}
"#,
        data = dir.join("agent").display(),
        port = target.addr.port(),
        socket = socket.display(),
        bundle = bundle.display(),
        interval = sync_interval.as_millis(),
    );
    let config_path = dir.join("agent.conf");
    std::fs::write(&config_path, config)?;
    let child = Command::new(binary(bin, "spire-agent")?)
        .arg("run")
        .arg("-config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting spire-agent")?;
    let agent_id = trust_domain().join_token_agent_id(&token)?;
    Ok(AgentProcess::adopt(child, socket, agent_id))
}

/// Records Lanyard/SPIRE ratios for every figure both runs produced.
pub(crate) fn compare(report: &mut Report, lanyard: &Outcomes, spire: &Outcomes) {
    let mut bench = report.bench("vs_spire");
    if let (Some(l), Some(s)) = (&lanyard.batch, &spire.batch) {
        for (&(agents, size), &rate) in l {
            if let Some(&spire_rate) = s.get(&(agents, size)) {
                bench.versus(
                    &format!("batch.agents_{agents}.size_{size}.svids_per_sec"),
                    &format!("BatchNewX509SVID SVIDs/s, {agents} agent(s), batches of {size}"),
                    rate,
                    "/s",
                    ("SPIRE", spire_rate, "/s"),
                );
            }
        }
    }
    if let (Some(l), Some(s)) = (&lanyard.jwt, &spire.jwt) {
        bench.versus(
            "jwt.per_sec",
            "NewJWTSVID per second",
            l.per_sec,
            "/s",
            ("SPIRE", s.per_sec, "/s"),
        );
        bench.versus(
            "jwt.p99_ms",
            "NewJWTSVID p99",
            l.p99_ms,
            "ms",
            ("SPIRE", s.p99_ms, "ms"),
        );
    }
    if let (Some(l), Some(s)) = (&lanyard.sync, &spire.sync) {
        bench.versus(
            "sync.server_cpu_us_per_sync",
            "server CPU per steady-state sync",
            l.cpu_us_per_sync,
            "µs",
            ("SPIRE", s.cpu_us_per_sync, "µs"),
        );
        bench.versus(
            "sync.bytes_per_sync",
            "bytes on the wire per sync",
            l.bytes_per_sync,
            "B",
            ("SPIRE", s.bytes_per_sync, "B"),
        );
        bench.versus(
            "sync.propagation_p50_ms",
            "entry create → SVID at a workload, p50",
            l.propagation_p50_ms,
            "ms",
            ("SPIRE", s.propagation_p50_ms, "ms"),
        );
        bench.versus(
            "sync.propagation_p99_ms",
            "entry create → SVID at a workload, p99",
            l.propagation_p99_ms,
            "ms",
            ("SPIRE", s.propagation_p99_ms, "ms"),
        );
    }
    if let (Some(l), Some(s)) = (&lanyard.propagation, &spire.propagation) {
        for (p, lanyard_ms, spire_ms) in [
            ("p50", l.authorized_p50_ms, s.authorized_p50_ms),
            ("p99", l.authorized_p99_ms, s.authorized_p99_ms),
        ] {
            bench.versus(
                &format!("propagation.authorized_at_b_{p}_ms"),
                &format!(
                    "two servers over PostgreSQL: entry created through A → authorized at B, {p}"
                ),
                lanyard_ms,
                "ms",
                ("SPIRE", spire_ms, "ms"),
            );
        }
        for (p, lanyard_ms, spire_ms) in [
            ("p50", l.svid_p50_ms, s.svid_p50_ms),
            ("p99", l.svid_p99_ms, s.svid_p99_ms),
        ] {
            bench.versus(
                &format!("propagation.svid_{p}_ms"),
                &format!(
                    "two servers over PostgreSQL: entry created through A → SVID at a workload of an agent on B, {p}"
                ),
                lanyard_ms,
                "ms",
                ("SPIRE", spire_ms, "ms"),
            );
        }
    }
    if let (Some(l), Some(s)) = (&lanyard.fanin, &spire.fanin) {
        bench.versus(
            "fanin.first_svid_p50_ms",
            "first SVID under fan-in, p50",
            l.first_svid_p50_ms,
            "ms",
            ("SPIRE", s.first_svid_p50_ms, "ms"),
        );
        bench.versus(
            "fanin.first_svid_p99_ms",
            "first SVID under fan-in, p99",
            l.first_svid_p99_ms,
            "ms",
            ("SPIRE", s.first_svid_p99_ms, "ms"),
        );
        bench.versus(
            "fanin.agent_rss_per_stream_bytes",
            "agent RSS per open stream",
            l.rss_per_stream,
            "B",
            ("SPIRE", s.rss_per_stream, "B"),
        );
        bench.versus(
            "fanin.rotation_all_ms",
            "entry change → rotation at every stream",
            l.rotation_all_ms,
            "ms",
            ("SPIRE", s.rotation_all_ms, "ms"),
        );
    }
}
