//! The mTLS example (`examples/mtls`: rustls configs from `spiffe-rustls` over the `spiffe`
//! crate's `X509Source`) as two workloads of a real agent. A client keeps opening fresh TLS
//! connections to a server, each side authorizing the other by SPIFFE ID, while their
//! short-lived X.509-SVIDs rotate underneath them; then each side refuses the wrong peer.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use lanyard_e2e::{
    ChildProcess, CliOutput, Cluster, TIMEOUT, current_uid, poll, spiffe_id, workspace_root,
};
use serde_json::Value;

/// Renewal comes at about half-life, so both SVIDs rotate about twice while the client runs.
const TTL: &str = "12s";
const HANDSHAKES: usize = 24;
const INTERVAL_MS: &str = "500";

#[test]
fn the_mtls_example_keeps_handshaking_across_svid_rotations() {
    let cluster = Cluster::start();
    let uid = current_uid();
    // One uid, two identities: the hint tells the example which SVID to present.
    let server_id = cluster.register_uid(
        "/mtls/server",
        uid,
        &["--hint", "server", "--x509-svid-ttl", TTL],
    );
    let client_id = cluster.register_uid(
        "/mtls/client",
        uid,
        &["--hint", "client", "--x509-svid-ttl", TTL],
    );
    let before = cluster
        .agent
        .wait_for_svids(None, &[&server_id, &client_id]);

    let mut server =
        ChildProcess::new("mtls example server", cluster.dir().join("mtls-server.log"));
    server.start(example(
        &cluster,
        "server",
        "server",
        &["--listen", "127.0.0.1:0", "--allow", &client_id],
    ));
    let address = poll("the example server to listen", TIMEOUT, || {
        server.assert_running();
        listening_address(&server.log()).ok_or_else(|| "no `listening on` line yet".to_owned())
    });

    let client = CliOutput::run(&mut example(
        &cluster,
        "client",
        "client",
        &[
            "--connect",
            &address,
            "--server-id",
            &server_id,
            "--count",
            &HANDSHAKES.to_string(),
            "--interval-ms",
            INTERVAL_MS,
        ],
    ));
    let server_log = server.log();
    assert!(
        client.success(),
        "the client failed: {client}\n{}",
        server.log_tail(40)
    );

    // Every handshake succeeded, and the client saw the server's certificate change.
    let greetings: Vec<&str> = client.stdout.lines().collect();
    assert_eq!(greetings.len(), HANDSHAKES, "{client}");
    let mut server_serials = BTreeSet::new();
    for (n, line) in (1..).zip(&greetings) {
        let prefix = format!("{n}/{HANDSHAKES} {server_id} (certificate serial ");
        let suffix = format!(") says: hello {client_id}");
        let serial = line
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(&suffix))
            .unwrap_or_else(|| panic!("unexpected client line {line:?}\n{client}"));
        server_serials.insert(serial.to_owned());
    }
    assert!(
        server_serials.len() >= 2,
        "the server's SVID never rotated during the run: {server_serials:?}\n{}",
        cluster.logs()
    );

    // The server authorized every connection, and saw the client's certificate change.
    let client_serials: Vec<&str> = server_log
        .lines()
        .filter_map(|line| line.strip_prefix("accepted "))
        .map(|rest| {
            let serial = rest
                .strip_prefix(&format!("{client_id} (certificate serial "))
                .and_then(|rest| rest.strip_suffix(')'));
            serial.unwrap_or_else(|| panic!("unexpected server line {rest:?}\n{server_log}"))
        })
        .collect();
    assert_eq!(client_serials.len(), HANDSHAKES, "{server_log}");
    let distinct: BTreeSet<&str> = client_serials.iter().copied().collect();
    assert!(
        distinct.len() >= 2,
        "the client's SVID never rotated during the run: {distinct:?}\n{}",
        cluster.logs()
    );

    // The Workload API agrees: both identities have new leaves now.
    let after = cluster
        .agent
        .fetch_x509()
        .unwrap_or_else(|output| panic!("fetching after the run: {output}"));
    for id in [&server_id, &client_id] {
        let leaf_of = |svids: &[lanyard_e2e::FetchedSvid]| {
            svids
                .iter()
                .find(|svid| &svid.spiffe_id == id)
                .unwrap_or_else(|| panic!("no SVID for {id}"))
                .leaf()
                .to_vec()
        };
        assert_ne!(leaf_of(&before), leaf_of(&after), "{id} was not rotated");
    }

    // The server refuses a client with another identity (here: the server's own).
    let impostor = CliOutput::run(&mut example(
        &cluster,
        "client",
        "server",
        &["--connect", &address, "--server-id", &server_id],
    ));
    assert!(
        !impostor.success(),
        "an unlisted client got through: {impostor}"
    );
    poll("the server to log the refusal", TIMEOUT, || {
        let log = server.log();
        if log.contains(&format!("not authorized: {server_id}")) {
            Ok(())
        } else {
            Err(log)
        }
    });

    // The client refuses a server that is not the one it expects.
    let other = spiffe_id("/mtls/other");
    let wrong_server = CliOutput::run(&mut example(
        &cluster,
        "client",
        "client",
        &["--connect", &address, "--server-id", &other],
    ));
    assert!(
        !wrong_server.success() && wrong_server.stderr.contains("not authorized"),
        "the client accepted a server that is not {other}: {wrong_server}"
    );
    server.assert_running();
}

/// `lanyard-example-mtls <subcommand> --svid-hint <hint> <args>` with `SPIFFE_ENDPOINT_SOCKET`
/// pointing at the cluster's agent.
fn example(cluster: &Cluster, subcommand: &str, hint: &str, args: &[&str]) -> Command {
    let mut command = Command::new(example_binary());
    command
        .args([subcommand, "--svid-hint", hint])
        .args(args)
        .env("SPIFFE_ENDPOINT_SOCKET", cluster.agent.endpoint())
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null());
    command
}

/// `127.0.0.1:PORT` from the server's `listening on 127.0.0.1:PORT as …` line.
fn listening_address(log: &str) -> Option<String> {
    log.lines()
        .find_map(|line| line.strip_prefix("listening on "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
}

static EXAMPLE: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The example binary, built once per test process with `cargo build -p
/// lanyard-example-mtls` on this workspace, as the harness builds `lanyard`.
fn example_binary() -> &'static Path {
    match EXAMPLE.get_or_init(build_example) {
        Ok(path) => path,
        Err(message) => panic!("{message}"),
    }
}

fn build_example() -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "-p",
            "lanyard-example-mtls",
            "--bin",
            "lanyard-example-mtls",
        ])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        .stdin(Stdio::null());
    let output = command
        .output()
        .map_err(|e| format!("running {command:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "building the mTLS example failed ({}): {command:?}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == "lanyard-example-mtls")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| format!("{command:?} reported no lanyard-example-mtls executable"))
}
