//! The mTLS example (`examples/mtls`: rustls configs from `spiffe-rustls` over the `spiffe`
//! crate's `X509Source`) as two workloads of a real agent. A client keeps opening fresh TLS
//! connections to a server, each side authorizing the other by SPIFFE ID, while their
//! short-lived X.509-SVIDs rotate underneath them; then each side refuses the wrong peer.
//! With `--crl-file` (the CRLs `lanyard helper` writes), the server refuses a client whose
//! certificate was revoked and takes the replacement its agent minted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};

use lanyard_core::tls::{SpiffeServerVerifier, client_config};
use lanyard_core::{KeyPair, SpiffeId};
use lanyard_e2e::{
    ChildProcess, CliOutput, Cluster, RunAs, TIMEOUT, current_uid, poll, spiffe_id, toml_string,
    uid_selector, workspace_root,
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

/// The uid the revoked client runs as (nobody), to get an identity of its own.
const CLIENT_UID: u32 = 65534;

#[test]
fn the_mtls_example_refuses_a_revoked_client_with_the_crls_the_helper_writes() {
    use std::os::unix::fs::PermissionsExt as _;

    let cluster = Cluster::start();
    let server_id = cluster.register_uid("/mtls/crl-server", current_uid(), &["--hint", "server"]);
    let client_id = cluster.register("/mtls/crl-client", &[&uid_selector(CLIENT_UID)], &[]);
    let dir = cluster.dir();

    // The helper keeps the trust domain's CRLs in a file for the example server.
    let crl_dir = dir.subdir("mtls-crl");
    let helper_conf = dir.join("mtls-helper.toml");
    std::fs::write(
        &helper_conf,
        format!(
            "agent_address = {socket}\ncert_dir = {certs}\ncrl_file_name = \"crl.pem\"\n",
            socket = toml_string(cluster.agent.socket_path().to_str().expect("UTF-8")),
            certs = toml_string(crl_dir.to_str().expect("UTF-8")),
        ),
    )
    .expect("writing the helper's config");
    let mut helper = ChildProcess::new("lanyard helper", dir.join("mtls-helper.log"));
    let mut command = cluster.agent.workload_command(None);
    command.arg("helper").arg("--config").arg(&helper_conf);
    helper.start(command);
    let crl_file = crl_dir.join("crl.pem");
    let crl_text = || std::fs::read_to_string(&crl_file).unwrap_or_default();
    poll("the helper to write the CRLs", TIMEOUT, || {
        helper.assert_running();
        if crl_text().contains("BEGIN X509 CRL") {
            Ok(())
        } else {
            Err(helper.log_tail(20))
        }
    });

    let crl_arg = crl_file.to_str().expect("UTF-8");
    let mut server = ChildProcess::new(
        "mtls example server with CRLs",
        dir.join("mtls-crl-server.log"),
    );
    server.start(example(
        &cluster,
        "server",
        "server",
        &[
            "--listen",
            "127.0.0.1:0",
            "--allow",
            &client_id,
            "--crl-file",
            crl_arg,
        ],
    ));
    let address = poll("the example server to listen", TIMEOUT, || {
        server.assert_running();
        listening_address(&server.log()).ok_or_else(|| "no `listening on` line yet".to_owned())
    });

    // The client's SVID and key, as `helper --once` writes them for nobody.
    let client_certs = dir.subdir("mtls-client-certs");
    std::os::unix::fs::chown(&client_certs, Some(CLIENT_UID), Some(CLIENT_UID))
        .expect("chown the client's directory");
    let client_conf = dir.join("mtls-client-helper.toml");
    std::fs::write(
        &client_conf,
        format!(
            "agent_address = {socket}\ncert_dir = {certs}\n",
            socket = toml_string(cluster.agent.socket_path().to_str().expect("UTF-8")),
            certs = toml_string(client_certs.to_str().expect("UTF-8")),
        ),
    )
    .expect("writing the client's helper.toml");
    std::fs::set_permissions(&client_conf, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let fetch_client = || {
        let mut once = cluster.agent.workload_command(Some(RunAs::uid(CLIENT_UID)));
        once.arg("helper")
            .arg("--config")
            .arg(&client_conf)
            .arg("--once");
        let output = CliOutput::run(&mut once);
        assert!(output.success(), "helper --once: {output}");
        let chain = crate::helper::certificates(&client_certs.join("svid.pem"));
        let key = KeyPair::from_pkcs8_pem(
            &std::fs::read_to_string(client_certs.join("svid_key.pem")).expect("the client key"),
        )
        .expect("a PKCS#8 key");
        let serial = lanyard_core::x509::serial_decimal(&chain[0]).expect("a serial");
        let bundle = crate::helper::certificates(&client_certs.join("svid_bundle.pem"));
        let expected: SpiffeId = server_id.parse().expect("the server's SPIFFE ID");
        let verifier = SpiffeServerVerifier::new(expected, Arc::new(move || bundle.clone()));
        let config =
            client_config(Arc::new(verifier), Some((&chain, &key))).expect("a client config");
        (serial, Arc::new(config))
    };
    let greeting = |config: &Arc<rustls::ClientConfig>| greeting_over_mtls(&address, config);
    let hello = format!("hello {client_id}");

    let (revoked_serial, revoked) = fetch_client();
    assert_eq!(greeting(&revoked).as_deref(), Ok(hello.as_str()));

    let made = cluster.server.cli([
        "revoke",
        "x509",
        "--serial",
        revoked_serial.as_str(),
        "--owner",
        "security",
        "--reason",
        "the client's key was copied",
    ]);
    assert!(made.success(), "revoke: {made}");

    // The helper rewrites the CRLs; the example reads them at the next connection and closes
    // the revoked client's without a greeting.
    poll(
        "the example to refuse the revoked client",
        TIMEOUT,
        || match greeting(&revoked) {
            Ok(line) if line == hello => Err(format!("still greeted\n{}", helper.log_tail(20))),
            _ => Ok(()),
        },
    );
    let refused_line = format!("refused {client_id}");
    let log = server.log();
    assert!(
        log.lines()
            .any(|line| line.starts_with(&refused_line) && line.contains("revoked")),
        "the server says why: {log}"
    );

    // The replacement the agent minted is greeted.
    let (fresh_serial, fresh) = poll("a replacement SVID", TIMEOUT, || {
        let (serial, config) = fetch_client();
        if serial == revoked_serial {
            Err("the revoked SVID is still served".to_owned())
        } else {
            Ok((serial, config))
        }
    });
    assert_ne!(fresh_serial, revoked_serial);
    assert_eq!(greeting(&fresh).as_deref(), Ok(hello.as_str()));

    // The example client checks its server against the same lists too; this one is not on
    // them. (A second server, which takes the server's own identity as its client.)
    let mut second = ChildProcess::new("mtls example second server", dir.join("mtls-second.log"));
    second.start(example(
        &cluster,
        "server",
        "server",
        &[
            "--listen",
            "127.0.0.1:0",
            "--allow",
            &server_id,
            "--crl-file",
            crl_arg,
        ],
    ));
    let second_address = poll("the second server to listen", TIMEOUT, || {
        second.assert_running();
        listening_address(&second.log()).ok_or_else(|| "no `listening on` line yet".to_owned())
    });
    let client = CliOutput::run(&mut example(
        &cluster,
        "client",
        "server",
        &[
            "--connect",
            &second_address,
            "--server-id",
            &server_id,
            "--crl-file",
            crl_arg,
        ],
    ));
    assert!(
        client.success() && client.stdout.contains(&format!("says: hello {server_id}")),
        "the client with CRLs: {client}\n{}",
        second.log_tail(20)
    );
    server.assert_running();
    let status = helper.terminate();
    assert!(status.success(), "the helper exits cleanly: {status}");
}

/// The line the example server greets a client with over a fresh mTLS connection, or why
/// there was none.
fn greeting_over_mtls(address: &str, config: &Arc<rustls::ClientConfig>) -> Result<String, String> {
    use std::io::Read as _;

    let server_name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
    let connection = rustls::ClientConnection::new(Arc::clone(config), server_name)
        .map_err(|e| e.to_string())?;
    let tcp = std::net::TcpStream::connect(address).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    let mut text = String::new();
    match tls.read_to_string(&mut text) {
        Ok(_) => {}
        // The server may close without close_notify after refusing.
        Err(error) if !text.is_empty() => return Err(format!("{error} after {text:?}")),
        Err(error) => return Err(error.to_string()),
    }
    match text.lines().next() {
        Some(line) => Ok(line.to_owned()),
        None => Err("closed without a greeting".to_owned()),
    }
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
