//! `lanyard helper` delivering SVIDs to Debian's nginx: nginx serves mTLS with the files the
//! helper writes (and the helper starts it, then signals it on every rotation); a client with
//! another SVID, written by `lanyard helper --once` as another user, connects over and over
//! while the server's SVID rotates, and sees the new certificate with no failed handshake.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lanyard_core::tls::{SpiffeServerVerifier, client_config};
use lanyard_core::{KeyPair, SpiffeId};
use lanyard_e2e::nginx::nginx_or_skip;
use lanyard_e2e::{
    ChildProcess, CliOutput, Cluster, RunAs, free_port, poll, toml_string, uid_selector,
};

/// The server's X.509-SVID lifetime: short, so that it rotates (at half-life) during the test.
const SERVER_SVID_TTL: &str = "20";

/// The uid the client's helper runs as (nobody), to get an identity of its own.
const CLIENT_UID: u32 = 65534;

/// The PEM certificates of a file, DER.
pub(crate) fn certificates(path: &Path) -> Vec<Vec<u8>> {
    let pem =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    crate::revocation::pem_blocks(&pem, "CERTIFICATE")
}

/// The serial number of the certificate the server presented, and the response body.
pub(crate) fn get_over_mtls(
    port: u16,
    config: &Arc<rustls::ClientConfig>,
) -> Result<(Vec<u8>, String), String> {
    let server_name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
    let connection = rustls::ClientConnection::new(Arc::clone(config), server_name)
        .map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("handshake or write: {e}"))?;
    let mut response = String::new();
    tls.read_to_string(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    let leaf = tls
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.as_ref().to_vec())
        .ok_or("no server certificate")?;
    let serial = lanyard_core::x509::serial_decimal(&leaf).map_err(|e| e.to_string())?;
    Ok((serial.into_bytes(), response))
}

#[test]
fn helper_keeps_nginx_serving_mtls_across_rotations() {
    let Some(nginx) = nginx_or_skip("helper_keeps_nginx_serving_mtls_across_rotations") else {
        return;
    };
    let cluster = Cluster::start();
    let server_id = cluster.register_uid(
        "/nginx",
        lanyard_e2e::current_uid(),
        &["--x509-svid-ttl", SERVER_SVID_TTL],
    );
    let client_id = cluster.register("/client", &[&uid_selector(CLIENT_UID)], &[]);
    let dir = cluster.dir();

    // nginx's configuration: mTLS with the helper's files, client certificates verified
    // against the trust bundle.
    let port = free_port();
    let certs = dir.subdir("nginx-certs");
    let nginx_dir = dir.subdir("nginx");
    let conf = nginx_dir.join("nginx.conf");
    std::fs::write(
        &conf,
        lanyard_e2e::nginx::mtls_config(&nginx_dir, &certs, port, false),
    )
    .expect("writing nginx.conf");

    // The helper starts nginx once the files are there, and SIGHUPs it on every rotation.
    let helper_conf = dir.join("helper.toml");
    std::fs::write(
        &helper_conf,
        format!(
            "agent_address = {socket}\ncert_dir = {certs}\ncmd = {nginx}\n\
             cmd_args = {args}\nrenew_signal = \"SIGHUP\"\n",
            socket = toml_string(cluster.agent.socket_path().to_str().expect("UTF-8")),
            certs = toml_string(certs.to_str().expect("UTF-8")),
            nginx = toml_string(nginx.to_str().expect("UTF-8")),
            args = toml_string(&format!("-c {}", conf.display())),
        ),
    )
    .expect("writing helper.toml");
    let mut helper = ChildProcess::new("lanyard helper", dir.join("helper.log"));
    let mut command = cluster.agent.workload_command(None);
    command.arg("helper").arg("--config").arg(&helper_conf);
    helper.start(command);

    // The key is a secret; the rest is not.
    use std::os::unix::fs::PermissionsExt as _;
    poll(
        "the helper to write the files",
        Duration::from_secs(30),
        || {
            helper.assert_running();
            if certs.join("svid_bundle.pem").is_file() {
                Ok(())
            } else {
                Err(helper.log_tail(20))
            }
        },
    );
    let mode = |name: &str| {
        std::fs::metadata(certs.join(name))
            .expect("a written file")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("svid_key.pem"), 0o600);
    assert_eq!(mode("svid.pem"), 0o644);

    // The client's files: `--once`, as nobody, into a directory nobody may write.
    let client_certs = dir.subdir("client-certs");
    std::os::unix::fs::chown(&client_certs, Some(CLIENT_UID), Some(CLIENT_UID))
        .expect("chown the client's directory");
    let client_conf = dir.join("client-helper.toml");
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
    let mut once = cluster.agent.workload_command(Some(RunAs::uid(CLIENT_UID)));
    once.arg("helper")
        .arg("--config")
        .arg(&client_conf)
        .arg("--once");
    let output = CliOutput::run(&mut once);
    assert!(output.success(), "helper --once: {output}");
    let client_chain = certificates(&client_certs.join("svid.pem"));
    let client_key = KeyPair::from_pkcs8_pem(
        &std::fs::read_to_string(client_certs.join("svid_key.pem")).expect("the client key"),
    )
    .expect("a PKCS#8 key");
    assert_eq!(
        lanyard_core::x509::spiffe_id_of(&client_chain[0])
            .expect("an SVID")
            .to_string(),
        client_id
    );

    // A client that expects nginx's SPIFFE ID, verified against the bundle the helper wrote.
    let bundle = certificates(&client_certs.join("svid_bundle.pem"));
    let expected: SpiffeId = server_id.parse().expect("the server's SPIFFE ID");
    let verifier = SpiffeServerVerifier::new(expected, Arc::new(move || bundle.clone()));
    let mut config = client_config(Arc::new(verifier), Some((&client_chain, &client_key)))
        .expect("a client config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = Arc::new(config);

    let (first_serial, body) = poll("nginx to serve mTLS", Duration::from_secs(30), || {
        get_over_mtls(port, &config).map_err(|e| format!("{e}\n{}", helper.log_tail(20)))
    });
    assert!(body.contains("client verified: SUCCESS"), "{body}");

    // Connect again and again while the server's SVID rotates (at half of its 20 s): every
    // handshake succeeds, and nginx comes to present a new certificate.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut serials = vec![first_serial.clone()];
    let mut handshakes = 0;
    while Instant::now() < deadline && serials.len() < 3 {
        match get_over_mtls(port, &config) {
            Ok((serial, body)) => {
                handshakes += 1;
                assert!(body.contains("client verified: SUCCESS"), "{body}");
                if serials.last() != Some(&serial) {
                    serials.push(serial);
                }
            }
            Err(error) => panic!(
                "a handshake failed during rotation after {handshakes}: {error}\n{}\n{}",
                helper.log_tail(30),
                std::fs::read_to_string(nginx_dir.join("error.log")).unwrap_or_default()
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        serials.len() >= 2,
        "nginx still presents its first certificate after {handshakes} handshakes\n{}",
        helper.log_tail(30)
    );
    let log = helper.log();
    assert!(log.contains("signalled the consumer"), "{log}");

    // Stopping the helper stops the nginx it started.
    let status = helper.terminate();
    assert!(status.success(), "the helper exits cleanly: {status}");
    poll(
        "nginx to stop with the helper",
        Duration::from_secs(10),
        || match get_over_mtls(port, &config) {
            Err(_) => Ok(()),
            Ok(_) => Err("nginx still answers".to_owned()),
        },
    );
}

#[test]
fn helper_once_fails_with_a_clear_error_when_no_identity_comes() {
    let cluster = Cluster::start();
    let dir = cluster.dir();
    let conf = dir.join("helper.toml");
    std::fs::write(
        &conf,
        format!(
            "agent_address = {socket}\ncert_dir = {certs}\nonce_timeout = \"2s\"\n",
            socket = toml_string(cluster.agent.socket_path().to_str().expect("UTF-8")),
            certs = toml_string(dir.join("certs").to_str().expect("UTF-8")),
        ),
    )
    .expect("writing helper.toml");
    let mut command = cluster.agent.workload_command(None);
    command
        .arg("helper")
        .arg("--config")
        .arg(&conf)
        .arg("--once");
    let output = CliOutput::run(&mut command);
    assert!(
        !output.success(),
        "no entry, yet --once succeeded: {output}"
    );
    assert!(output.stderr.contains("once_timeout"), "{output}");
    assert!(
        !dir.join("certs").join("svid.pem").exists(),
        "nothing written without an SVID"
    );
}
