//! The bundle endpoint of a real server process (`[federation.bundle_endpoint]`):
//!
//! - fetched by go-spiffe's `federation.FetchBundle` (the client SPIRE servers federate with,
//!   through `tests/interop/go-spiffe`) with both profiles: `https_spiffe`, authenticating the
//!   server's SVID as `spiffe://example.org/spire/server` against the trust domain's bundle
//!   (and refusing another endpoint ID), and `https_web`;
//! - with `https_web`: served with a certificate chain from files that a test CA issued, the
//!   chain switched by replacing the files (no restart), a broken replacement logged and the
//!   old pair kept, and a key file others can read refused at start.
//!
//! Without Go the go-spiffe checks fail and say how to install it, unless
//! `LANYARD_E2E_SKIP_GO=1` (which skips only them).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use lanyard_e2e::https::{TestCa, first_der, https_get, replace_file, write_key_pair};
use lanyard_e2e::toolchain::{SKIP_GO_VAR, go_spiffe_client};
use lanyard_e2e::{
    CliOutput, Server, TIMEOUT, TestDir, free_port, pem_certificates, poll, spiffe_id, toml_string,
    trust_domain,
};
use serde_json::Value;

/// go-spiffe's `federation.FetchBundle` of `url` with `profile`, `auth_file` (the trust
/// domain's bundle, or the Web PKI roots) and `endpoint_id`; `None` when Go tests are skipped.
fn go_spiffe_fetch(
    url: &str,
    profile: &str,
    auth_file: &Path,
    endpoint_id: &str,
) -> Option<CliOutput> {
    if std::env::var_os(SKIP_GO_VAR).is_some_and(|value| value == "1") {
        return None;
    }
    Some(CliOutput::run(
        std::process::Command::new(go_spiffe_client())
            .args(["federation", lanyard_e2e::TRUST_DOMAIN, url, profile])
            .arg(auth_file)
            .arg(endpoint_id),
    ))
}

/// Checks what go-spiffe fetched against the server's own bundle.
fn assert_go_spiffe_got(server: &Server, fetched: &CliOutput, refresh_hint_seconds: u64) {
    let seen: Value = fetched.json();
    let stored = server.spiffe_bundle();
    assert_eq!(seen["sequence"], stored.sequence_number(), "{fetched}");
    assert_eq!(
        seen["refresh_hint_seconds"], refresh_hint_seconds,
        "{fetched}"
    );
    let mut authorities = pem_certificates(seen["x509_authorities_pem"].as_str().unwrap());
    let mut expected = server.bundle_der();
    authorities.sort();
    expected.sort();
    assert_eq!(authorities, expected, "{fetched}");
    let mut kids: Vec<&str> = seen["jwt_key_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kid| kid.as_str().unwrap())
        .collect();
    kids.sort_unstable();
    let mut expected: Vec<&str> = stored
        .jwt_authorities()
        .iter()
        .map(|a| a.key_id())
        .collect();
    expected.sort_unstable();
    assert_eq!(kids, expected, "{fetched}");
}

#[test]
fn go_spiffe_fetches_the_bundle_from_an_https_spiffe_bundle_endpoint() {
    let dir = TestDir::new();
    let port = free_port();
    let server = Server::start_with(
        &dir.join("server"),
        &format!("[federation.bundle_endpoint]\naddress = \"127.0.0.1:{port}\"\n"),
    );
    // What a peer is given once, out of band: the trust domain's bundle.
    let known = dir.join("example.org.json");
    let bundle = server.cli(["bundle", "show", "--format", "spiffe"]);
    std::fs::write(&known, bundle.expect_success()).unwrap();
    let url = format!("https://127.0.0.1:{port}/");
    let server_id = spiffe_id("/spire/server");
    let Some(fetched) = go_spiffe_fetch(&url, "https_spiffe", &known, &server_id) else {
        return;
    };
    assert_go_spiffe_got(&server, &fetched, 300);
    // Another endpoint ID is refused: the client checks the SVID's ID, not just its chain.
    let refused = go_spiffe_fetch(&url, "https_spiffe", &known, &spiffe_id("/elsewhere"))
        .expect("not skipped");
    assert!(!refused.success(), "{refused}");
}

fn endpoint_toml(port: u16, cert: &Path, key: &Path) -> String {
    format!(
        "[federation.bundle_endpoint]\n\
         address = \"127.0.0.1:{port}\"\n\
         profile = \"https_web\"\n\
         refresh_hint = \"1m\"\n\
         certificate_path = {}\n\
         private_key_path = {}\n",
        toml_string(cert.to_str().unwrap()),
        toml_string(key.to_str().unwrap()),
    )
}

/// The leaf the endpoint presents now.
fn presented_leaf(addr: SocketAddr, ca: &TestCa) -> Result<Vec<u8>, String> {
    let answer = https_get(addr, ca.client_config(), "localhost", "/")?;
    answer
        .chain
        .first()
        .cloned()
        .ok_or_else(|| "no certificate presented".to_owned())
}

#[test]
fn https_web_bundle_endpoint_serves_the_configured_chain_and_follows_replaced_files() {
    let dir = TestDir::new();
    let ca = TestCa::new("bundle endpoint");
    let tls_dir = dir.subdir("tls");
    let (first_cert, first_key) = ca.issue("first");
    let (cert_path, key_path) = write_key_pair(&tls_dir, "endpoint", &first_cert, &first_key);
    let port = free_port();
    let mut server = Server::start_with(
        &dir.join("server"),
        &endpoint_toml(port, &cert_path, &key_path),
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    // A Web PKI client: the test CA, the name `localhost`.
    let answer = https_get(addr, ca.client_config(), "localhost", "/").unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.content_type, "application/json");
    assert_eq!(answer.chain.first(), Some(&first_der(&first_cert)));
    let served = lanyard_core::TrustBundle::from_jwks_json(trust_domain(), &answer.body)
        .unwrap_or_else(|e| panic!("not a SPIFFE bundle ({e}): {answer:?}"));
    let stored = server.spiffe_bundle();
    assert_eq!(served.x509_authorities(), stored.x509_authorities());
    assert_eq!(served.sequence_number(), stored.sequence_number());
    assert_eq!(served.refresh_hint(), Some(Duration::from_secs(60)));
    let kids = |bundle: &lanyard_core::TrustBundle| -> Vec<String> {
        bundle
            .jwt_authorities()
            .iter()
            .map(|a| a.key_id().to_owned())
            .collect()
    };
    assert_eq!(kids(&served), kids(&stored));
    // So does go-spiffe, as a federated SPIRE server would with the https_web profile.
    let roots = tls_dir.join("roots.pem");
    std::fs::write(&roots, ca.pem()).unwrap();
    let url = format!("https://localhost:{port}/");
    if let Some(fetched) = go_spiffe_fetch(&url, "https_web", &roots, "-") {
        assert_go_spiffe_got(&server, &fetched, 60);
    }

    // A renewal replaces both files: the next handshakes present the new chain.
    let (second_cert, second_key) = ca.issue("second");
    write_key_pair(&tls_dir, "endpoint", &second_cert, &second_key);
    let second = first_der(&second_cert);
    poll(
        "the endpoint to present the replaced certificate",
        TIMEOUT,
        || {
            server.process().assert_running();
            let leaf = presented_leaf(addr, &ca)?;
            if leaf == second {
                Ok(())
            } else {
                Err("still the first certificate".to_owned())
            }
        },
    );

    // A broken replacement is logged, and the pair in use stays.
    replace_file(&cert_path, b"not a certificate\n", 0o644);
    poll("the server to log the refused certificate", TIMEOUT, || {
        let log = server.process().log();
        if log.contains("the changed certificate or key was refused") {
            Ok(())
        } else {
            Err(server.log_tail())
        }
    });
    assert_eq!(presented_leaf(addr, &ca).unwrap(), second);
    // So is a certificate that the key in place does not match.
    let (third_cert, _) = ca.issue("third");
    replace_file(&cert_path, third_cert.as_bytes(), 0o644);
    poll("the server to refuse the mismatched pair", TIMEOUT, || {
        let log = server.process().log();
        if log.contains("not the key of the first certificate") {
            Ok(())
        } else {
            Err(server.log_tail())
        }
    });
    assert_eq!(presented_leaf(addr, &ca).unwrap(), second);
    server.stop();
}

#[test]
fn https_web_bundle_endpoint_refuses_a_key_file_others_can_read() {
    let dir = TestDir::new();
    let ca = TestCa::new("bundle endpoint");
    let tls_dir = dir.subdir("tls");
    let (cert, key) = ca.issue("exposed");
    let (cert_path, key_path) = write_key_pair(&tls_dir, "endpoint", &cert, &key);
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let mut server = Server::configure(
        &dir.join("server"),
        &endpoint_toml(free_port(), &cert_path, &key_path),
    );
    server.launch();
    let status = server.process().wait_for_exit(TIMEOUT);
    assert!(!status.success());
    let log = server.process().log();
    assert!(
        log.contains("readable by others") && log.contains(key_path.to_str().unwrap()),
        "{log}"
    );
}
