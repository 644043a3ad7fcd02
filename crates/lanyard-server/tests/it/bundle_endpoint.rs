//! The SPIFFE bundle endpoint (`[federation.bundle_endpoint]`) with the `https_spiffe`
//! profile: what a federated client authenticating the server's SVID gets, across a forced CA
//! rotation, and the bounds that hold for clients that misbehave.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use lanyard_core::TrustBundle;
use lanyard_core::tls::SpiffeServerVerifier;
use lanyard_core::x509;
use lanyard_proto::spire::api::server::localauthority::v1 as pb;
use lanyard_proto::spire::api::server::localauthority::v1::local_authority_client::LocalAuthorityClient;
use lanyard_server::config::BundleEndpointConfig;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::http::{Answer, call_plain, client_config, get_tls, request};
use crate::support::{TestServer, trust_domain};

async fn start(edit: impl FnOnce(&mut BundleEndpointConfig)) -> (TestServer, SocketAddr) {
    let server = TestServer::start_with(|config| {
        let mut endpoint = BundleEndpointConfig::new("127.0.0.1:0".parse().unwrap());
        edit(&mut endpoint);
        config.federation.bundle_endpoint = Some(endpoint);
    })
    .await;
    let addr = server.server().bundle_endpoint_addr().unwrap();
    (server, addr)
}

/// A federated peer of the trust domain: it authenticates the endpoint as
/// `spiffe://example.org/spire/server` against the bundle it holds, first the one it was
/// given, then the latest it fetched (F-13).
struct Peer {
    authorities: Arc<Mutex<Vec<Vec<u8>>>>,
    versions: &'static [&'static rustls::SupportedProtocolVersion],
}

impl Peer {
    fn new(authorities: Vec<Vec<u8>>) -> Self {
        Self {
            authorities: Arc::new(Mutex::new(authorities)),
            versions: rustls::DEFAULT_VERSIONS,
        }
    }

    async fn fetch(&self, addr: SocketAddr) -> Result<(Answer, TrustBundle), String> {
        let authorities = Arc::clone(&self.authorities);
        let verifier = SpiffeServerVerifier::new(
            trust_domain().server_id(),
            Arc::new(move || authorities.lock().unwrap().clone()),
        );
        let config = Arc::new(client_config(Arc::new(verifier), self.versions));
        let answer = get_tls(addr, config, "bundle.example.org", "/").await?;
        if answer.status != StatusCode::OK {
            return Err(format!("{answer:?}"));
        }
        let bundle = TrustBundle::from_jwks_json(trust_domain(), &answer.body)
            .map_err(|e| format!("not a SPIFFE bundle ({e}): {answer:?}"))?;
        *self.authorities.lock().unwrap() = bundle
            .x509_authorities()
            .iter()
            .map(|a| a.der().to_vec())
            .collect();
        Ok((answer, bundle))
    }
}

const TLS12_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

fn assert_serves(served: &TrustBundle, stored: &TrustBundle, refresh_hint: Duration) {
    assert_eq!(served.x509_authorities(), stored.x509_authorities());
    // The JWKS carries no key expiry.
    let keys = |bundle: &TrustBundle| -> Vec<(String, Vec<u8>)> {
        bundle
            .jwt_authorities()
            .iter()
            .map(|a| (a.key_id().to_owned(), a.public_key_der().to_vec()))
            .collect()
    };
    assert_eq!(keys(served), keys(stored));
    assert_eq!(served.sequence_number(), stored.sequence_number());
    assert_eq!(served.refresh_hint(), Some(refresh_hint));
}

#[tokio::test]
async fn the_bundle_endpoint_serves_the_bundle_over_https_spiffe_and_follows_a_ca_rotation() {
    let refresh_hint = Duration::from_secs(90);
    let (server, addr) = start(|endpoint| endpoint.refresh_hint = refresh_hint).await;
    let peer = Peer::new(server.authorities());
    let (answer, served) = peer.fetch(addr).await.unwrap();
    assert_eq!(answer.header("content-type"), "application/json");
    let stored = server.server().state().bundle();
    assert_serves(&served, &stored, refresh_hint);
    assert!(!served.x509_authorities().is_empty() && !served.jwt_authorities().is_empty());
    let first_authority = server.server().state().ca.x509_ca().unwrap();
    x509::verify_svid_chain(
        &answer.chain,
        &trust_domain(),
        &[first_authority.cert_der()],
        server.clock.clock()(),
    )
    .expect("the endpoint presents the server SVID");

    // TLS 1.2 is enough for this public endpoint.
    let old_client = Peer {
        authorities: Arc::new(Mutex::new(server.authorities())),
        versions: TLS12_ONLY,
    };
    old_client.fetch(addr).await.unwrap();

    // A forced rotation through the LocalAuthority API: prepare, then activate.
    let mut local_authority = LocalAuthorityClient::new(server.admin().await);
    let prepared = local_authority
        .prepare_x509_authority(pb::PrepareX509AuthorityRequest {})
        .await
        .unwrap()
        .into_inner()
        .prepared_authority
        .unwrap();
    let (_, after_prepare) = peer.fetch(addr).await.unwrap();
    assert!(after_prepare.sequence_number() > served.sequence_number());
    assert_eq!(
        after_prepare.x509_authorities().len(),
        served.x509_authorities().len() + 1,
        "the prepared authority is published before it signs"
    );
    local_authority
        .activate_x509_authority(pb::ActivateX509AuthorityRequest {
            authority_id: prepared.authority_id.clone(),
        })
        .await
        .unwrap();
    let active = server.server().state().ca.x509_ca().unwrap();
    assert_eq!(active.authority_id(), prepared.authority_id);

    // The server re-mints its SVID from the new authority; the endpoint presents it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (answer, served) = peer.fetch(addr).await.unwrap();
        let current = x509::verify_svid_chain(
            &answer.chain,
            &trust_domain(),
            &[active.cert_der()],
            server.clock.clock()(),
        );
        if let Ok(current) = current {
            assert_eq!(current.spiffe_id(), &trust_domain().server_id());
            assert_serves(&served, &server.server().state().bundle(), refresh_hint);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the endpoint still presents an SVID of the old authority"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Tainting and revoking the old authority changes the served bundle and its sequence.
    let before = peer.fetch(addr).await.unwrap().1.sequence_number();
    let old_id = first_authority.authority_id();
    local_authority
        .taint_x509_authority(pb::TaintX509AuthorityRequest {
            authority_id: old_id.clone(),
        })
        .await
        .unwrap();
    local_authority
        .revoke_x509_authority(pb::RevokeX509AuthorityRequest {
            authority_id: old_id,
        })
        .await
        .unwrap();
    let (_, served) = peer.fetch(addr).await.unwrap();
    assert!(served.sequence_number() > before);
    assert_eq!(
        served
            .x509_authorities()
            .iter()
            .map(|a| a.der().to_vec())
            .collect::<Vec<_>>(),
        vec![active.cert_der().to_vec()]
    );
    assert_serves(&served, &server.server().state().bundle(), refresh_hint);
}

/// Reads until the server closes the connection (or `within` passes); how long that took.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| started.elapsed())
}

#[tokio::test]
async fn the_bundle_endpoint_drops_slow_clients_and_refuses_connections_over_its_cap() {
    let timeout = Duration::from_secs(2);
    let (server, addr) = start(|endpoint| {
        endpoint.max_connections = 2;
        endpoint.header_read_timeout = timeout;
    })
    .await;
    let peer = Peer::new(server.authorities());

    // A client that connects and never starts TLS, and one that never sends its headers.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let took = closed_within(&mut silent, Duration::from_secs(15))
        .await
        .expect("a client that never handshakes is dropped");
    assert!(took >= timeout - Duration::from_millis(200), "{took:?}");
    let tls = {
        let authorities = server.authorities();
        let verifier = SpiffeServerVerifier::new(
            trust_domain().server_id(),
            Arc::new(move || authorities.clone()),
        );
        let config = client_config(Arc::new(verifier), rustls::DEFAULT_VERSIONS);
        let tcp = TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("bundle.example.org".try_into().unwrap(), tcp)
            .await
            .unwrap()
    };
    let started = Instant::now();
    let mut tls = tls;
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(15), tls.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "a client that sends no request is dropped: {read:?}"
    );
    assert!(started.elapsed() >= timeout - Duration::from_millis(200));

    // Two connections hold both slots; a third is closed at once, long before the timeout.
    let _first = TcpStream::connect(addr).await.unwrap();
    let _second = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    let took = closed_within(&mut third, timeout)
        .await
        .expect("a connection over the cap is closed");
    assert!(took < timeout, "{took:?}");
    drop((_first, _second));
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(error) = peer.fetch(addr).await {
        assert!(Instant::now() < deadline, "no slot came back: {error}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_bundle_endpoint_answers_get_on_its_root_only_and_refuses_large_requests() {
    let (server, addr) = start(|_| {}).await;
    let authorities = server.authorities();
    let verifier = Arc::new(SpiffeServerVerifier::new(
        trust_domain().server_id(),
        Arc::new(move || authorities.clone()),
    ));
    let config = Arc::new(client_config(verifier, rustls::DEFAULT_VERSIONS));
    let call = |method: Method, path: &'static str, headers: Vec<(&'static str, String)>| {
        let config = Arc::clone(&config);
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect("bundle.example.org".try_into().unwrap(), tcp)
                .await
                .unwrap();
            request(tls, method, path, &headers, Vec::new()).await
        }
    };
    assert_eq!(
        call(Method::GET, "/", vec![]).await.unwrap().status,
        StatusCode::OK
    );
    for path in ["/bundle", "/.well-known/spiffe-bundle", "/keys"] {
        let answer = call(Method::GET, path, vec![]).await.unwrap();
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
    }
    for method in [Method::POST, Method::PUT, Method::DELETE, Method::HEAD] {
        let answer = call(method.clone(), "/", vec![]).await.unwrap();
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(answer.header("allow"), "GET");
    }
    let huge_header = vec![("x-padding", "a".repeat(20 * 1024))];
    let answer = call(Method::GET, "/", huge_header).await.unwrap();
    assert_eq!(answer.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // A large body is refused without being read; the client sends none of it.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::clone(&config))
        .connect("bundle.example.org".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nhost: lanyard.test\r\ncontent-length: 1073741824\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");

    // Plain HTTP is not spoken at all.
    assert!(
        call_plain(addr, Method::GET, "/", &[], Vec::new())
            .await
            .is_err()
    );
}

/// A federated peer that checks revocations reads the CRLs at `/crl`: once an SVID's serial is
/// revoked, the lists it gets there refuse that SVID and pass others.
#[tokio::test]
async fn the_bundle_endpoint_serves_the_crls_at_crl() {
    use lanyard_proto::lanyard::api::v1::RevokeRequest;
    use lanyard_proto::lanyard::api::v1::revocation_service_client::RevocationServiceClient;

    let (server, addr) = start(|_| {}).await;
    let agent = server.attest_new_agent().await;
    let entry = crate::issuance::create_entry(&server, "/revoked", &agent.id, 0).await;
    let chain = |result: lanyard_proto::spire::api::server::svid::v1::batch_new_x509svid_response::Result| {
        result.svid.unwrap().cert_chain
    };
    let revoked = chain(crate::issuance::mint(&server, &agent, &entry).await);
    let kept = chain(crate::issuance::mint(&server, &agent, &entry).await);
    RevocationServiceClient::new(server.admin().await)
        .revoke(RevokeRequest {
            kind: "x509-serial".to_owned(),
            value: x509::serial_decimal(&revoked[0]).unwrap(),
            owner: "security".to_owned(),
            reason: "copied".to_owned(),
            ticket: String::new(),
            dry_run: false,
        })
        .await
        .unwrap();

    let authorities = server.authorities();
    let verifier = SpiffeServerVerifier::new(trust_domain().server_id(), {
        let authorities = authorities.clone();
        Arc::new(move || authorities.clone())
    });
    let config = Arc::new(client_config(Arc::new(verifier), rustls::DEFAULT_VERSIONS));
    let answer = get_tls(addr, config, "bundle.example.org", "/crl")
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.header("content-type"), "application/x-pem-file");
    let text = String::from_utf8(answer.body.clone()).unwrap();
    let crls: Vec<Vec<u8>> = text
        .split("-----BEGIN X509 CRL-----")
        .skip(1)
        .map(|block| {
            use base64::Engine as _;
            let body: String = block
                .split("-----END X509 CRL-----")
                .next()
                .unwrap()
                .split_whitespace()
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .unwrap()
        })
        .collect();
    assert!(!crls.is_empty(), "{text}");
    let now = server.clock.clock()();
    assert!(matches!(
        x509::verify_svid_chain_with_crls(&revoked, &trust_domain(), &authorities, &crls, now),
        Err(x509::X509Error::Revoked)
    ));
    x509::verify_svid_chain_with_crls(&kept, &trust_domain(), &authorities, &crls, now)
        .expect("an unrevoked SVID passes");
}
