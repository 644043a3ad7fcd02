//! The bundle endpoint of a real server process (`[federation.bundle_endpoint]`) with the
//! `https_web` profile: served with a certificate chain from files that a test CA issued, the
//! chain switched by replacing the files (no restart), a broken replacement logged and the
//! old pair kept, and a key file others can read refused at start.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use lanyard_e2e::https::{TestCa, first_der, https_get, replace_file, write_key_pair};
use lanyard_e2e::{Server, TIMEOUT, TestDir, free_port, poll, toml_string, trust_domain};

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
