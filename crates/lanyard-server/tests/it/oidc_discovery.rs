//! OIDC discovery (`[oidc_discovery]`): the discovery document for `jwt_issuer`, the JWT
//! authorities at `/keys` through a forced JWT key rotation (prepare, activate, taint,
//! revoke), over plain HTTP for a proxy in front and over TLS with a configured certificate.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;

use hyper::{Method, StatusCode};
use lanyard_proto::spire::api::server::localauthority::v1 as pb;
use lanyard_proto::spire::api::server::localauthority::v1::local_authority_client::LocalAuthorityClient;
use lanyard_server::Server;
use lanyard_server::config::OidcDiscoveryConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use serde_json::{Value, json};

use crate::http::{call_plain, get_tls};
use crate::support::{TestClock, TestServer, config_in};

const ISSUER: &str = "https://oidc.example.org";

async fn get(addr: SocketAddr, path: &str) -> crate::http::Answer {
    call_plain(addr, Method::GET, path, &[], Vec::new())
        .await
        .unwrap()
}

/// The key IDs `/keys` serves, checking the shape of every key on the way.
async fn served_kids(addr: SocketAddr) -> Vec<String> {
    let answer = get(addr, "/keys").await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.header("content-type"), "application/json");
    assert_eq!(answer.header("cache-control"), "max-age=60");
    let keys = answer.json();
    keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|key| {
            assert_eq!(key["use"], "sig", "{key}");
            assert_eq!(key["kty"], "EC", "{key}");
            assert_eq!(key["alg"], "ES256", "{key}");
            assert!(key.get("x5c").is_none(), "{key}");
            key["kid"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn bundle_kids(server: &TestServer) -> Vec<String> {
    server
        .server()
        .state()
        .bundle()
        .jwt_authorities()
        .iter()
        .map(|a| a.key_id().to_owned())
        .collect()
}

#[tokio::test]
async fn oidc_discovery_serves_the_issuer_s_document_and_follows_the_jwt_authorities() {
    let server = TestServer::start_with(|config| {
        config.jwt_issuer = Some(ISSUER.to_owned());
        config.oidc_discovery = Some(OidcDiscoveryConfig::insecure_http(
            "127.0.0.1:0".parse().unwrap(),
        ));
    })
    .await;
    let addr = server.server().oidc_discovery_addr().unwrap();

    let answer = get(addr, "/.well-known/openid-configuration").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("content-type"), "application/json");
    assert_eq!(answer.header("cache-control"), "max-age=60");
    assert_eq!(answer.header("access-control-allow-origin"), "*");
    assert_eq!(
        answer.json(),
        json!({
            "issuer": ISSUER,
            "jwks_uri": "https://oidc.example.org/keys",
            "authorization_endpoint": "",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "ES384"],
        })
    );
    // The keys are the bundle's JWT authorities, with the bundle's key parameters.
    let first = bundle_kids(&server);
    assert_eq!(first.len(), 1);
    assert_eq!(served_kids(addr).await, first);
    let keys = get(addr, "/keys").await.json();
    let authority = server.server().state().bundle().jwt_authorities()[0].jwk();
    for parameter in ["kty", "crv", "x", "y", "kid"] {
        assert_eq!(
            keys["keys"][0][parameter], authority[parameter],
            "{parameter}"
        );
    }

    // Prepare: the next key is published before it signs.
    let mut local_authority = LocalAuthorityClient::new(server.admin().await);
    let prepared = local_authority
        .prepare_jwt_authority(pb::PrepareJwtAuthorityRequest {})
        .await
        .unwrap()
        .into_inner()
        .prepared_authority
        .unwrap()
        .authority_id;
    let kids = served_kids(addr).await;
    assert_eq!(kids.len(), 2);
    assert!(
        kids.contains(&first[0]) && kids.contains(&prepared),
        "{kids:?}"
    );
    local_authority
        .activate_jwt_authority(pb::ActivateJwtAuthorityRequest {
            authority_id: prepared.clone(),
        })
        .await
        .unwrap();
    // Tainted, the old key still verifies what it signed, and is still served.
    local_authority
        .taint_jwt_authority(pb::TaintJwtAuthorityRequest {
            authority_id: first[0].clone(),
        })
        .await
        .unwrap();
    assert_eq!(served_kids(addr).await.len(), 2);
    // Revoked, it is gone.
    local_authority
        .revoke_jwt_authority(pb::RevokeJwtAuthorityRequest {
            authority_id: first[0].clone(),
        })
        .await
        .unwrap();
    assert_eq!(served_kids(addr).await, vec![prepared.clone()]);
    assert_eq!(bundle_kids(&server), vec![prepared]);

    // Nothing else is served, and only GET.
    for path in ["/", "/jwks", "/.well-known/spiffe-bundle", "/keys/x"] {
        assert_eq!(
            get(addr, path).await.status,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    for method in [Method::POST, Method::PUT, Method::DELETE] {
        let answer = call_plain(addr, method.clone(), "/keys", &[], b"{}".to_vec())
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
    }
    let answer = call_plain(
        addr,
        Method::GET,
        "/keys",
        &[("x-padding", "a".repeat(20 * 1024))],
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
}

/// A test CA and a leaf for `localhost` and 127.0.0.1 that it signed, as PEM: (CA
/// certificate, leaf certificate, leaf key).
pub fn web_pki(name: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf_params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}

fn write_pair(
    dir: &Path,
    cert: &str,
    key: &str,
    key_mode: u32,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert_path = dir.join("oidc.crt");
    let key_path = dir.join("oidc.key");
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(key_mode)).unwrap();
    (cert_path, key_path)
}

#[tokio::test]
async fn oidc_discovery_over_tls_serves_the_configured_certificate_and_refuses_an_exposed_key() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, leaf_pem, key_pem) = web_pki("oidc");
    let (cert_path, key_path) = write_pair(dir.path(), &leaf_pem, &key_pem, 0o600);
    let mut config = config_in(dir.path());
    config.jwt_issuer = Some(ISSUER.to_owned());
    let mut oidc = OidcDiscoveryConfig::insecure_http("127.0.0.1:0".parse().unwrap());
    oidc.insecure_http = false;
    oidc.certificate_path = Some(cert_path);
    oidc.private_key_path = Some(key_path.clone());
    config.oidc_discovery = Some(oidc);
    let server = Server::start(config.clone(), TestClock::new().clock())
        .await
        .unwrap();
    let addr = server.oidc_discovery_addr().unwrap();

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let answer = get_tls(
        addr,
        Arc::new(client),
        "localhost",
        "/.well-known/openid-configuration",
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let document: Value = answer.json();
    assert_eq!(document["issuer"], ISSUER);
    assert!(
        call_plain(addr, Method::GET, "/keys", &[], Vec::new())
            .await
            .is_err(),
        "no plain HTTP without insecure_http"
    );
    server.shutdown().await;

    // A key file others can read is refused at start, by name.
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let error = Server::start(config, TestClock::new().clock())
        .await
        .expect_err("an exposed key stops the server")
        .to_string();
    assert!(
        error.contains(&key_path.display().to_string()) && error.contains("readable by others"),
        "{error}"
    );
}
