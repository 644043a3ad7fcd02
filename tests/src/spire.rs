//! SPIRE's own `spire-server` and `spire-agent` (built by [`crate::toolchain::spire`]) as
//! processes beside Lanyard's, for the interoperability tests: each pairs one SPIRE program
//! with its Lanyard counterpart.
//!
//! - [`SpireServer`] runs `spire-server run` with a generated HCL config (SQLite datastore,
//!   in-memory keys, the `join_token` node attestor) on a free port and a private admin socket,
//!   and drives its CLI ([`SpireServer::cli`]), which also works against Lanyard's admin socket
//!   ([`spire_server_cli`]).
//! - [`SpireAgent`] runs `spire-agent run` (`join_token`, disk keys, the `unix` workload
//!   attestor) against any server address, bootstrapped from a PEM bundle, and fetches SVIDs
//!   from it with `spire-agent api fetch`.
//! - [`LanyardAgent`] runs `lanyard agent run` against any server address (a SPIRE server),
//!   which the harness's [`crate::Agent`] cannot: it is tied to a Lanyard [`crate::Server`].
//!
//! Without Go the tests fail with a message saying how to get it; `LANYARD_E2E_SKIP_SPIRE=1`
//! skips them instead ([`spire_or_skip`]).

use std::ffi::OsStr;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::toolchain::{Spire, spire};
use crate::{
    ChildProcess, CliOutput, FetchedSvid, PrivateHosts, TIMEOUT, TRUST_DOMAIN, free_port, lanyard,
    pem_certificates, poll,
};

/// Set to `1` to skip the SPIRE interoperability tests (CI never does).
pub const SKIP_VAR: &str = "LANYARD_E2E_SKIP_SPIRE";

/// How long a SPIRE process may take to start and answer: the first start of a freshly built
/// binary on a loaded two-core machine is slow, and spire-agent backs off between retries.
pub const SPIRE_TIMEOUT: Duration = Duration::from_secs(60);

/// How many log lines a failure shows.
const LOG_TAIL_LINES: usize = 60;

/// SPIRE's binaries, built on first use; `None` (with a notice naming `test`) when
/// `LANYARD_E2E_SKIP_SPIRE=1`. Without Go it panics with how to get it.
pub fn spire_or_skip(test: &str) -> Option<&'static Spire> {
    if std::env::var_os(SKIP_VAR).is_some_and(|value| value == "1") {
        let _ = writeln!(
            std::io::stderr(),
            "lanyard-e2e: {SKIP_VAR}=1, skipping {test}"
        );
        return None;
    }
    if !Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|output| output.status.success())
    {
        panic!(
            "{test} builds SPIRE {} from the Go module proxy and needs the Go toolchain \
             (`go` on PATH, https://go.dev/dl/, or `apt-get install golang-go` if it is 1.25 \
             or newer) and a C compiler for SPIRE's SQLite driver; set {SKIP_VAR}=1 to skip \
             the SPIRE tests",
            crate::toolchain::SPIRE_VERSION
        );
    }
    Some(spire())
}

/// An HCL string literal holding `value`.
fn hcl_string(value: &str) -> String {
    // HCL's quoted strings take the same escapes as JSON's for everything a test writes.
    Value::String(value.to_owned()).to_string()
}

fn hcl_path(path: &Path) -> String {
    hcl_string(path.to_str().expect("temporary paths are UTF-8"))
}

fn write_file(path: &Path, contents: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
    }
    fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// `spire-server <subcommand…> -socketPath <socket> <args…>` against any server's admin socket
/// (SPIRE's or Lanyard's), run to completion.
pub fn spire_server_cli(socket: &Path, subcommand: &[&str], args: &[&str]) -> CliOutput {
    let mut command = Command::new(&spire().server);
    command
        .args(subcommand)
        .arg("-socketPath")
        .arg(socket)
        .args(args);
    CliOutput::run(&mut command)
}

/// The value after `label` (a `Label: value` or `Label : value` line) in pretty CLI output.
pub fn pretty_field(output: &str, label: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name.trim() == label).then(|| value.trim().to_owned())
    })
}

// ---------------------------------------------------------------------------------------------
// spire-server

/// A `spire-server run` on `127.0.0.1:<free port>`, its SQLite datastore and admin socket in
/// its own directory, keys in memory. Killed on drop.
#[derive(Debug)]
pub struct SpireServer {
    port: u16,
    socket: PathBuf,
    process: ChildProcess,
}

impl SpireServer {
    /// Starts a server in `dir` (created) for [`TRUST_DOMAIN`] and waits until
    /// `spire-server healthcheck` says it is healthy.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, "")
    }

    /// Like [`SpireServer::start`], with `extra_hcl` added to the `server` block (e.g.
    /// `agent_ttl = "20s"`).
    pub fn start_with(dir: &Path, extra_hcl: &str) -> Self {
        Self::start_in_trust_domain(dir, TRUST_DOMAIN, extra_hcl)
    }

    /// Like [`SpireServer::start_with`], for `trust_domain` instead of [`TRUST_DOMAIN`].
    pub fn start_in_trust_domain(dir: &Path, trust_domain: &str, extra_hcl: &str) -> Self {
        Self::start_in_trust_domain_with_env(dir, trust_domain, extra_hcl, &[])
    }

    /// Like [`SpireServer::start_in_trust_domain`], with `env` added to the process's
    /// environment (e.g. `SSL_CERT_FILE`, the Web PKI roots of Go's TLS clients on Linux).
    pub fn start_in_trust_domain_with_env(
        dir: &Path,
        trust_domain: &str,
        extra_hcl: &str,
        env: &[(&str, &OsStr)],
    ) -> Self {
        let spire = spire();
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let port = free_port();
        let socket = dir.join("private").join("api.sock");
        let config_path = dir.join("server.conf");
        let config = format!(
            "server {{\n\
             \x20   bind_address = \"127.0.0.1\"\n\
             \x20   bind_port = \"{port}\"\n\
             \x20   socket_path = {socket}\n\
             \x20   trust_domain = {td}\n\
             \x20   data_dir = {data}\n\
             \x20   log_level = \"DEBUG\"\n\
             \x20   {extra_hcl}\n\
             }}\n\
             plugins {{\n\
             \x20   DataStore \"sql\" {{\n\
             \x20       plugin_data {{\n\
             \x20           database_type = \"sqlite3\"\n\
             \x20           connection_string = {database}\n\
             \x20       }}\n\
             \x20   }}\n\
             \x20   NodeAttestor \"join_token\" {{\n\
             \x20       plugin_data {{}}\n\
             \x20   }}\n\
             \x20   KeyManager \"memory\" {{\n\
             \x20       plugin_data {{}}\n\
             \x20   }}\n\
             }}\n",
            socket = hcl_path(&socket),
            td = hcl_string(trust_domain),
            data = hcl_path(&dir.join("data")),
            database = hcl_path(&dir.join("data").join("datastore.sqlite3")),
        );
        write_file(&config_path, &config);
        let mut process =
            ChildProcess::new(format!("spire-server :{port}"), dir.join("server.log"));
        let mut command = Command::new(&spire.server);
        command
            .arg("run")
            .arg("-config")
            .arg(&config_path)
            .envs(env.iter().copied());
        process.start(command);
        let mut server = Self {
            port,
            socket,
            process,
        };
        poll("spire-server to become healthy", SPIRE_TIMEOUT, || {
            server.process.assert_running();
            let health = server.cli(&["healthcheck"], &[]);
            if health.success() {
                Ok(())
            } else {
                Err(health.to_string())
            }
        });
        server
    }

    /// `127.0.0.1:<port>`, the address agents attest to.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The admin API socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// `spire-server <subcommand…> -socketPath <its socket> <args…>`.
    pub fn cli(&self, subcommand: &[&str], args: &[&str]) -> CliOutput {
        spire_server_cli(&self.socket, subcommand, args)
    }

    /// Like [`SpireServer::cli`]; panics with the output and the server's log unless it
    /// succeeds, and returns stdout.
    pub fn cli_ok(&self, subcommand: &[&str], args: &[&str]) -> String {
        let output = self.cli(subcommand, args);
        assert!(
            output.success(),
            "spire-server command failed: {output}\n{}",
            self.log_tail()
        );
        output.stdout
    }

    /// Like [`SpireServer::cli_ok`] with `-output json`, parsed.
    pub fn cli_json(&self, subcommand: &[&str], args: &[&str]) -> Value {
        let mut with_output = args.to_vec();
        with_output.extend(["-output", "json"]);
        let stdout = self.cli_ok(subcommand, &with_output);
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
    }

    /// A fresh join token from `spire-server token generate`.
    pub fn generate_token(&self) -> String {
        let stdout = self.cli_ok(&["token", "generate"], &["-ttl", "600"]);
        pretty_field(&stdout, "Token").unwrap_or_else(|| panic!("no token in {stdout:?}"))
    }

    /// The X.509 authorities as PEM (`spire-server bundle show`).
    pub fn bundle_pem(&self) -> String {
        self.cli_ok(&["bundle", "show"], &[])
    }

    /// The X.509 authorities as DER.
    pub fn bundle_der(&self) -> Vec<Vec<u8>> {
        pem_certificates(&self.bundle_pem())
    }

    /// The process, for its log and state.
    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail(LOG_TAIL_LINES)
    }
}

// ---------------------------------------------------------------------------------------------
// spire-agent

/// How a [`SpireAgent`] attests its node.
#[derive(Debug, Clone, Copy)]
pub enum SpireAttestation<'a> {
    /// SPIRE's `join_token` node attestor with this token.
    JoinToken(&'a str),
    /// SPIRE's `x509pop` node attestor with this certificate (PEM, leaf first) and key (PEM).
    X509Pop {
        /// The certificate file.
        certificate: &'a Path,
        /// The private key file.
        private_key: &'a Path,
    },
    /// SPIRE's `k8s_psat` node attestor: the cluster's name and the projected service
    /// account token's file.
    K8sPsat {
        /// The cluster's name, as the server knows it.
        cluster: &'a str,
        /// The token file.
        token_path: &'a Path,
    },
}

/// A `spire-agent run` attesting with a join token, x509pop or k8s_psat to a server at some address
/// (SPIRE's or Lanyard's), its data directory and Workload API socket in its own directory.
/// Killed on drop.
#[derive(Debug)]
pub struct SpireAgent {
    dir: PathBuf,
    socket: PathBuf,
    process: ChildProcess,
}

impl SpireAgent {
    /// Starts an agent in `dir` that trusts `bundle_pem` (`trust_bundle_path`) to authenticate
    /// the server at `server_address` (`host:port`) and attests with `join_token`. Returns once
    /// its Workload API socket exists; attestation may still be under way (see
    /// [`SpireAgent::wait_for_x509`]).
    pub fn start(dir: &Path, server_address: &str, bundle_pem: &str, join_token: &str) -> Self {
        Self::start_with(
            dir,
            server_address,
            bundle_pem,
            SpireAttestation::JoinToken(join_token),
        )
    }

    /// Like [`SpireAgent::start`], attesting as `attestation` says.
    pub fn start_with(
        dir: &Path,
        server_address: &str,
        bundle_pem: &str,
        attestation: SpireAttestation<'_>,
    ) -> Self {
        Self::start_in(dir, server_address, bundle_pem, attestation, None)
    }

    /// Like [`SpireAgent::start_with`], with `hosts` (if given) as the agent's `/etc/hosts`,
    /// for a `server_address` whose host name only that file knows.
    pub fn start_in(
        dir: &Path,
        server_address: &str,
        bundle_pem: &str,
        attestation: SpireAttestation<'_>,
        hosts: Option<&PrivateHosts>,
    ) -> Self {
        Self::start_in_trust_domain(
            dir,
            TRUST_DOMAIN,
            server_address,
            bundle_pem,
            attestation,
            hosts,
        )
    }

    /// Like [`SpireAgent::start_in`], for `trust_domain` instead of [`TRUST_DOMAIN`].
    pub fn start_in_trust_domain(
        dir: &Path,
        trust_domain: &str,
        server_address: &str,
        bundle_pem: &str,
        attestation: SpireAttestation<'_>,
        hosts: Option<&PrivateHosts>,
    ) -> Self {
        let spire = spire();
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
        let (host, port) = server_address
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{server_address} is not host:port"));
        let bundle_path = dir.join("bootstrap-bundle.pem");
        write_file(&bundle_path, bundle_pem);
        let socket = dir.join("public").join("api.sock");
        let data_dir = dir.join("data");
        let config_path = dir.join("agent.conf");
        let config = format!(
            "agent {{\n\
             \x20   data_dir = {data}\n\
             \x20   log_level = \"DEBUG\"\n\
             \x20   server_address = {host}\n\
             \x20   server_port = \"{port}\"\n\
             \x20   socket_path = {socket}\n\
             \x20   trust_bundle_path = {bundle}\n\
             \x20   trust_domain = {td}\n\
             {join_token}\
             }}\n\
             plugins {{\n\
             {node_attestor}\
             \x20   KeyManager \"disk\" {{\n\
             \x20       plugin_data {{\n\
             \x20           directory = {data}\n\
             \x20       }}\n\
             \x20   }}\n\
             \x20   WorkloadAttestor \"unix\" {{\n\
             \x20       plugin_data {{}}\n\
             \x20   }}\n\
             }}\n",
            data = hcl_path(&data_dir),
            host = hcl_string(host),
            socket = hcl_path(&socket),
            bundle = hcl_path(&bundle_path),
            td = hcl_string(trust_domain),
            join_token = match attestation {
                SpireAttestation::JoinToken(token) => {
                    format!("    join_token = {}\n", hcl_string(token))
                }
                SpireAttestation::X509Pop { .. } | SpireAttestation::K8sPsat { .. } => {
                    String::new()
                }
            },
            node_attestor = match attestation {
                SpireAttestation::JoinToken(_) => {
                    "    NodeAttestor \"join_token\" {\n        plugin_data {}\n    }\n".to_owned()
                }
                SpireAttestation::X509Pop {
                    certificate,
                    private_key,
                } => format!(
                    "    NodeAttestor \"x509pop\" {{\n        plugin_data {{\n            \
                     certificate_path = {}\n            private_key_path = {}\n        }}\n    }}\n",
                    hcl_path(certificate),
                    hcl_path(private_key),
                ),
                SpireAttestation::K8sPsat {
                    cluster,
                    token_path,
                } => format!(
                    "    NodeAttestor \"k8s_psat\" {{\n        plugin_data {{\n            \
                     cluster = {}\n            token_path = {}\n        }}\n    }}\n",
                    hcl_string(cluster),
                    hcl_path(token_path),
                ),
            },
        );
        write_file(&config_path, &config);
        let mut process = ChildProcess::new("spire-agent", dir.join("agent.log"));
        let mut command = Command::new(&spire.agent);
        command.arg("run").arg("-config").arg(&config_path);
        process.start(match hosts {
            Some(hosts) => hosts.wrap(command),
            None => command,
        });
        let mut agent = Self {
            dir: dir.to_owned(),
            socket,
            process,
        };
        poll(
            "spire-agent to open its Workload API socket",
            SPIRE_TIMEOUT,
            || {
                agent.process.assert_running();
                std::os::unix::net::UnixStream::connect(&agent.socket)
                    .map(drop)
                    .map_err(|e| format!("connecting to {}: {e}", agent.socket.display()))
            },
        );
        agent
    }

    /// The Workload API socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// `spire-agent api fetch x509 -write <dir>`: the first SVID's chain and the bundle, or
    /// the failed command.
    pub fn fetch_x509(&self) -> Result<FetchedSvid, CliOutput> {
        let out = self.dir.join("fetched");
        let _ = fs::remove_dir_all(&out);
        fs::create_dir_all(&out).unwrap_or_else(|e| panic!("creating {}: {e}", out.display()));
        let output = CliOutput::run(
            Command::new(&spire().agent)
                .args(["api", "fetch", "x509", "-socketPath"])
                .arg(&self.socket)
                .arg("-write")
                .arg(&out),
        );
        if !output.success() {
            return Err(output);
        }
        let read = |name: &str| {
            let path = out.join(name);
            fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}\n{output}", path.display()))
        };
        let spiffe_id = pretty_field(&output.stdout, "SPIFFE ID").unwrap_or_default();
        Ok(FetchedSvid {
            spiffe_id,
            hint: pretty_field(&output.stdout, "Hint").unwrap_or_default(),
            chain: pem_certificates(&read("svid.0.pem")),
            bundle: pem_certificates(&read("bundle.0.pem")),
        })
    }

    /// `spire-agent api fetch x509 -write <dir>`: every SVID, in the order served, each with
    /// its chain and bundle; or the failed command.
    pub fn fetch_x509_all(&self) -> Result<Vec<FetchedSvid>, CliOutput> {
        let out = self.dir.join("fetched-all");
        let _ = fs::remove_dir_all(&out);
        fs::create_dir_all(&out).unwrap_or_else(|e| panic!("creating {}: {e}", out.display()));
        let output = CliOutput::run(
            Command::new(&spire().agent)
                .args(["api", "fetch", "x509", "-socketPath"])
                .arg(&self.socket)
                .arg("-write")
                .arg(&out),
        );
        if !output.success() {
            return Err(output);
        }
        // The CLI prints a `SPIFFE ID:` line per SVID and writes `svid.<i>.pem` and
        // `bundle.<i>.pem` in the same order.
        let ids = output.stdout.lines().filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name.trim() == "SPIFFE ID").then(|| value.trim().to_owned())
        });
        let read = |name: String| {
            let path = out.join(&name);
            fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}\n{output}", path.display()))
        };
        Ok(ids
            .enumerate()
            .map(|(i, spiffe_id)| FetchedSvid {
                spiffe_id,
                hint: String::new(),
                chain: pem_certificates(&read(format!("svid.{i}.pem"))),
                bundle: pem_certificates(&read(format!("bundle.{i}.pem"))),
            })
            .collect())
    }

    /// Polls [`SpireAgent::fetch_x509`] until it returns an SVID for `spiffe_id`; panics with
    /// the last answer and the agent's log after [`SPIRE_TIMEOUT`].
    pub fn wait_for_x509(&mut self, spiffe_id: &str) -> FetchedSvid {
        let what = format!("spire-agent to serve {spiffe_id}");
        poll(&what, SPIRE_TIMEOUT, || {
            self.process.assert_running();
            let svid = self.fetch_x509().map_err(|output| output.to_string())?;
            if svid.spiffe_id == spiffe_id {
                Ok(svid)
            } else {
                Err(format!("served {}", svid.spiffe_id))
            }
        })
    }

    /// `spire-agent api fetch jwt -audience <audience> -output json`: the SPIFFE ID and token
    /// of the first JWT-SVID, or the failed command.
    pub fn fetch_jwt(&self, audience: &str) -> Result<(String, String), CliOutput> {
        let output = CliOutput::run(
            Command::new(&spire().agent)
                .args([
                    "api",
                    "fetch",
                    "jwt",
                    "-audience",
                    audience,
                    "-output",
                    "json",
                ])
                .arg("-socketPath")
                .arg(&self.socket),
        );
        if !output.success() {
            return Err(output);
        }
        let json: Value = serde_json::from_str(&output.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {output}"));
        // An array of the JWTSVIDResponse and the JWTBundlesResponse, protojson.
        let svid = json
            .as_array()
            .and_then(|parts| parts.iter().find_map(|part| part["svids"].get(0)))
            .unwrap_or_else(|| panic!("no JWT-SVID in {output}"));
        Ok((
            svid["spiffe_id"].as_str().unwrap_or_default().to_owned(),
            svid["svid"].as_str().unwrap_or_default().to_owned(),
        ))
    }

    /// The process, for its log and state.
    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }

    /// The last lines of the agent's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail(LOG_TAIL_LINES)
    }
}

// ---------------------------------------------------------------------------------------------
// lanyard agent against any server

/// A `lanyard agent run` attesting with a join token to a server at any address (a SPIRE
/// server), bootstrapped from a PEM bundle. Killed on drop.
#[derive(Debug)]
pub struct LanyardAgent {
    socket: PathBuf,
    process: ChildProcess,
}

impl LanyardAgent {
    /// Starts an agent in `dir` for `server_address` that trusts `bundle_pem` and attests with
    /// `join_token`, and waits until its Workload API socket accepts connections.
    pub fn start(dir: &Path, server_address: &str, bundle_pem: &str, join_token: &str) -> Self {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
        let bundle_path = dir.join("bootstrap-bundle.pem");
        write_file(&bundle_path, bundle_pem);
        let socket = dir.join("public").join("api.sock");
        let config_path = dir.join("agent.toml");
        let config = format!(
            "server_address    = {address}\n\
             trust_domain      = {td}\n\
             data_dir          = {data}\n\
             trust_bundle_path = {bundle}\n\
             socket_path       = {socket}\n\
             sync_interval     = \"500ms\"\n\
             log_level         = \"debug\"\n\
             join_token        = {token}\n",
            address = crate::toml_string(server_address),
            td = crate::toml_string(TRUST_DOMAIN),
            data = crate::toml_string(dir.join("data").to_str().expect("UTF-8 path")),
            bundle = crate::toml_string(bundle_path.to_str().expect("UTF-8 path")),
            socket = crate::toml_string(socket.to_str().expect("UTF-8 path")),
            token = crate::toml_string(join_token),
        );
        write_file(&config_path, &config);
        let mut process = ChildProcess::new("lanyard agent", dir.join("agent.log"));
        let mut command = lanyard();
        command.args(["agent", "run", "--config"]).arg(&config_path);
        process.start(command);
        let mut agent = Self { socket, process };
        poll(
            "the lanyard agent to open its Workload API socket",
            TIMEOUT,
            || {
                agent.process.assert_running();
                std::os::unix::net::UnixStream::connect(&agent.socket)
                    .map(drop)
                    .map_err(|e| format!("connecting to {}: {e}", agent.socket.display()))
            },
        );
        agent
    }

    /// `lanyard fetch x509 --output json --socket <socket>` as this process: the SVIDs, or
    /// the failed command.
    pub fn fetch_x509(&self) -> Result<Vec<FetchedSvid>, CliOutput> {
        let output = CliOutput::run(
            lanyard()
                .args(["fetch", "x509", "--output", "json", "--socket"])
                .arg(&self.socket),
        );
        crate::parse_fetch(output)
    }

    /// Polls until a fetch returns an SVID for `spiffe_id`, and returns it; panics with the
    /// last answer and the agent's log after [`SPIRE_TIMEOUT`].
    pub fn wait_for_x509(&mut self, spiffe_id: &str) -> FetchedSvid {
        let what = format!("the lanyard agent to serve {spiffe_id}");
        poll(&what, SPIRE_TIMEOUT, || {
            self.process.assert_running();
            let svids = self.fetch_x509().map_err(|output| output.to_string())?;
            svids
                .iter()
                .find(|svid| svid.spiffe_id == spiffe_id)
                .cloned()
                .ok_or_else(|| {
                    let ids: Vec<&str> = svids.iter().map(|s| s.spiffe_id.as_str()).collect();
                    format!("served {ids:?}")
                })
        })
    }

    /// The Workload API socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The process, for its log and state.
    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }

    /// The last lines of the agent's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail(LOG_TAIL_LINES)
    }
}
