//! The bundle endpoint client (`bundle_client`): a relationship's bundle fetched from a real
//! peer server's `https_spiffe` endpoint as soon as the relationship exists, and again on
//! `RefreshBundle` after the peer rotated its CA; and every kind of bad answer from a fake
//! endpoint refused for its own reason while the last good bundle stays stored.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lanyard_core::bundle_fetch::MAX_BUNDLE_RESPONSE_LEN;
use lanyard_core::x509::{CaSubject, SvidParams, X509Ca};
use lanyard_core::{
    BundleEndpointProfile, KeyPair, KeyType, SpiffeId, TrustBundle, TrustDomain, X509Authority,
};
use lanyard_proto::convert::bundle_to_proto;
use lanyard_proto::spire::api::server::localauthority::v1 as authority_pb;
use lanyard_proto::spire::api::server::localauthority::v1::local_authority_client::LocalAuthorityClient;
use lanyard_proto::spire::api::server::trustdomain::v1 as pb;
use lanyard_proto::spire::api::server::trustdomain::v1::trust_domain_client::TrustDomainClient;
use lanyard_proto::spire::api::types;
use lanyard_proto::spire::api::types::federation_relationship::BundleEndpointProfile as Profile;
use lanyard_server::bundle_client::{BundleClient, FetchTarget, RefreshError, Refreshed};
use lanyard_server::config::BundleEndpointConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::support::TestServer;

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn ca_of(trust_domain: &str) -> X509Ca {
    X509Ca::self_signed(
        &td(trust_domain),
        KeyPair::generate(KeyType::EcP256).unwrap(),
        &CaSubject::default(),
        SystemTime::now(),
        Duration::from_secs(3600),
    )
    .unwrap()
}

fn bundle_of(trust_domain: &str, cas: &[&X509Ca], sequence: u64) -> TrustBundle {
    let mut bundle = TrustBundle::new(td(trust_domain));
    for ca in cas {
        bundle.add_x509_authority(X509Authority::new(ca.cert_der().to_vec()).unwrap());
    }
    bundle.set_sequence_number(sequence);
    bundle
}

async fn create_relationship(
    server: &TestServer,
    relationship: types::FederationRelationship,
) -> pb::batch_create_federation_relationship_response::Result {
    TrustDomainClient::new(server.admin().await)
        .batch_create_federation_relationship(pb::BatchCreateFederationRelationshipRequest {
            federation_relationships: vec![relationship],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0)
}

fn https_spiffe(
    trust_domain: &str,
    url: &str,
    endpoint_id: &str,
    bundle: Option<&TrustBundle>,
) -> types::FederationRelationship {
    types::FederationRelationship {
        trust_domain: trust_domain.to_owned(),
        bundle_endpoint_url: url.to_owned(),
        bundle_endpoint_profile: Some(Profile::HttpsSpiffe(types::HttpsspiffeProfile {
            endpoint_spiffe_id: endpoint_id.to_owned(),
        })),
        trust_domain_bundle: bundle.map(bundle_to_proto),
    }
}

async fn stored(server: &TestServer, trust_domain: &str) -> Option<TrustBundle> {
    server
        .server()
        .state()
        .store
        .get_bundle(&td(trust_domain))
        .await
        .unwrap()
}

/// Polls `check` every 50 ms for up to 20 s.
async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_bundle_is_fetched_when_the_relationship_is_made_and_after_it_rotates() {
    let peer = TestServer::start_with(|config| {
        config.trust_domain = td("peer.org");
        config.federation.bundle_endpoint =
            Some(BundleEndpointConfig::new("127.0.0.1:0".parse().unwrap()));
    })
    .await;
    let endpoint = peer.server().bundle_endpoint_addr().unwrap();
    let server = TestServer::start().await;
    // Bootstrap as operators do: the peer's bundle, handed over once. An older copy than the
    // endpoint serves (sequence 0), so that the first fetch has something to change.
    let peer_bundle = peer.server().state().bundle();
    let mut bootstrap = (*peer_bundle).clone();
    bootstrap.set_sequence_number(0);
    let created = create_relationship(
        &server,
        https_spiffe(
            "peer.org",
            &format!("https://127.0.0.1:{}/", endpoint.port()),
            "spiffe://peer.org/spire/server",
            Some(&bootstrap),
        ),
    )
    .await;
    assert_eq!(created.status.unwrap().code, 0);
    let fetched = eventually("the first fetch", async || {
        stored(&server, "peer.org")
            .await
            .filter(|b| b.sequence_number() == peer_bundle.sequence_number())
    })
    .await;
    assert_eq!(fetched.x509_authorities(), peer_bundle.x509_authorities());
    assert_eq!(
        fetched.refresh_hint(),
        Some(lanyard_server::config::DEFAULT_BUNDLE_REFRESH_HINT),
        "the hint the endpoint serves"
    );

    // The peer prepares a new CA: its bundle grows. RefreshBundle fetches it now, the endpoint
    // authenticated with the bundle fetched last.
    let prepared = LocalAuthorityClient::new(peer.admin().await)
        .prepare_x509_authority(authority_pb::PrepareX509AuthorityRequest {})
        .await
        .unwrap()
        .into_inner()
        .prepared_authority
        .unwrap();
    let grown = peer.server().state().bundle();
    assert_eq!(grown.x509_authorities().len(), 2, "{prepared:?}");
    TrustDomainClient::new(server.admin().await)
        .refresh_bundle(pb::RefreshBundleRequest {
            trust_domain: "peer.org".into(),
        })
        .await
        .unwrap();
    let refreshed = eventually("the refreshed bundle", async || {
        stored(&server, "peer.org")
            .await
            .filter(|b| b.sequence_number() == grown.sequence_number())
    })
    .await;
    assert_eq!(refreshed.x509_authorities(), grown.x509_authorities());
    let log = std::fs::read_to_string(server.config.audit_log_path()).unwrap();
    let fetches = lanyard_core::audit::events(&log)
        .filter(|(_, _, record)| record["action"] == "federated bundle fetched")
        .count();
    assert_eq!(fetches, 2, "one audit record per stored bundle");
}

/// What the fake endpoint answers on a path.
#[derive(Clone)]
enum Reply {
    /// 200 with this body, and a `Content-Length` unless `false`.
    Body(Vec<u8>, bool),
    /// This status, no body.
    Status(u16),
    /// 307 to this location.
    Redirect(String),
    /// Nothing, ever.
    Hang,
}

/// A TLS endpoint presenting `chain` and answering each path as told.
struct FakeEndpoint {
    addr: SocketAddr,
    replies: Arc<Mutex<HashMap<String, Reply>>>,
}

impl FakeEndpoint {
    async fn start(chain: Vec<Vec<u8>>, key: &KeyPair) -> Self {
        let certs: Vec<CertificateDer<'static>> =
            chain.into_iter().map(CertificateDer::from).collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.secret_pkcs8_der().to_vec()));
        let config = rustls::ServerConfig::builder_with_provider(lanyard_core::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let replies: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
        let table = Arc::clone(&replies);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let table = Arc::clone(&table);
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut byte = [0_u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if tls.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    let reply = table.lock().unwrap().get(&path).cloned();
                    let response = match reply {
                        Some(Reply::Body(body, with_length)) => {
                            let mut response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n".to_vec();
                            if with_length {
                                response.extend(format!("Content-Length: {}\r\n", body.len()).bytes());
                            }
                            response.extend(b"\r\n");
                            response.extend(body);
                            response
                        }
                        Some(Reply::Status(status)) => format!(
                            "HTTP/1.1 {status} Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .into_bytes(),
                        Some(Reply::Redirect(location)) => format!(
                            "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .into_bytes(),
                        Some(Reply::Hang) => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        }
                        None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                    };
                    let _ = tls.write_all(&response).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Self { addr, replies }
    }

    fn reply(&self, path: &str, reply: Reply) {
        self.replies.lock().unwrap().insert(path.to_owned(), reply);
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.addr.port())
    }
}

/// A fake `https_spiffe` endpoint of `partner.org` whose SVID carries `id`.
async fn spiffe_endpoint(ca: &X509Ca, id: &str) -> FakeEndpoint {
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let svid = ca
        .mint_svid(
            &SvidParams::new(
                id.parse::<SpiffeId>().unwrap(),
                key.public_key_der(),
                Duration::from_secs(600),
            ),
            SystemTime::now(),
        )
        .unwrap();
    FakeEndpoint::start(svid.cert_chain().to_vec(), &key).await
}

fn target(url: &str, endpoint_id: &str) -> FetchTarget {
    FetchTarget {
        url: url.parse().unwrap(),
        profile: BundleEndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: endpoint_id.parse().unwrap(),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_answers_are_refused_each_for_its_reason_and_the_good_bundle_stays() {
    const ENDPOINT_ID: &str = "spiffe://partner.org/bundle-endpoint";
    let server = TestServer::start().await;
    let partner_ca = ca_of("partner.org");
    let endpoint = spiffe_endpoint(&partner_ca, ENDPOINT_ID).await;
    let impostor = spiffe_endpoint(&partner_ca, "spiffe://partner.org/someone-else").await;
    let bootstrap = bundle_of("partner.org", &[&partner_ca], 1);
    let second_ca = ca_of("partner.org");
    let good = bundle_of("partner.org", &[&partner_ca, &second_ca], 7);
    endpoint.reply("/", Reply::Body(good.to_jwks_json().into_bytes(), true));
    for fake in [&endpoint, &impostor] {
        fake.reply("/", Reply::Body(good.to_jwks_json().into_bytes(), true));
    }

    // The running client fetches as soon as the relationship exists.
    let created = create_relationship(
        &server,
        https_spiffe(
            "partner.org",
            &endpoint.url("/"),
            ENDPOINT_ID,
            Some(&bootstrap),
        ),
    )
    .await;
    assert_eq!(created.status.unwrap().code, 0);
    eventually("the good bundle", async || {
        stored(&server, "partner.org")
            .await
            .filter(|b| b.sequence_number() == 7)
    })
    .await;

    // The same client, on its own, with a short deadline.
    let client = BundleClient::new(
        Arc::clone(server.server().state()),
        rustls::RootCertStore::empty(),
    )
    .with_timeout(Duration::from_secs(2));
    let partner = td("partner.org");
    let refresh = async |target: FetchTarget| client.refresh(&partner, &target).await.0;
    assert_eq!(
        refresh(target(&endpoint.url("/"), ENDPOINT_ID))
            .await
            .unwrap(),
        Refreshed::Unchanged
    );

    let oversized = vec![b' '; MAX_BUNDLE_RESPONSE_LEN + 1];
    let other_domain = bundle_of("elsewhere.org", &[&ca_of("elsewhere.org")], 8)
        .to_jwks_json()
        .into_bytes();
    let older = bundle_of("partner.org", &[&partner_ca], 6)
        .to_jwks_json()
        .into_bytes();
    let cases: Vec<(&str, Reply, &str)> = vec![
        (
            "/malformed",
            Reply::Body(b"{\"keys\": [".to_vec(), true),
            "malformed bundle",
        ),
        (
            "/not-a-bundle",
            Reply::Body(b"{\"spiffe_sequence\": 9}".to_vec(), true),
            "malformed bundle",
        ),
        (
            "/elsewhere",
            Reply::Body(other_domain, true),
            "wrong trust domain",
        ),
        (
            "/oversized",
            Reply::Body(oversized.clone(), true),
            "oversized response",
        ),
        (
            "/oversized-unannounced",
            Reply::Body(oversized, false),
            "oversized response",
        ),
        ("/older", Reply::Body(older, true), "older sequence number"),
        ("/error", Reply::Status(500), "HTTP status"),
        ("/hang", Reply::Hang, "timeout"),
        ("/loop", Reply::Redirect("/loop".into()), "redirect"),
        (
            "/away",
            Reply::Redirect("http://127.0.0.1/".into()),
            "redirect",
        ),
    ];
    for (path, reply, kind) in cases {
        endpoint.reply(path, reply);
        let error = refresh(target(&endpoint.url(path), ENDPOINT_ID))
            .await
            .expect_err(path);
        assert_eq!(error.kind(), kind, "{path}: {error}");
    }
    let error = refresh(target(&impostor.url("/"), ENDPOINT_ID))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), "wrong endpoint SPIFFE ID", "{error}");
    assert!(
        error
            .to_string()
            .contains("spiffe://partner.org/someone-else"),
        "{error}"
    );
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let error = refresh(target(&format!("https://127.0.0.1:{closed}/"), ENDPOINT_ID))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), "connection refused", "{error}");
    // An endpoint ID of a trust domain whose bundle is unknown cannot be authenticated.
    let error = refresh(target(&endpoint.url("/"), "spiffe://unknown.org/endpoint"))
        .await
        .unwrap_err();
    assert!(
        matches!(error, RefreshError::NoEndpointBundle { .. }),
        "{error}"
    );
    // https_web without roots for this endpoint's certificate.
    let error = refresh(FetchTarget {
        url: endpoint.url("/").parse().unwrap(),
        profile: BundleEndpointProfile::HttpsWeb,
    })
    .await
    .unwrap_err();
    assert_eq!(error.kind(), "no Web PKI roots", "{error}");

    assert_eq!(
        stored(&server, "partner.org").await,
        Some(good.clone()),
        "every refusal kept the good bundle"
    );

    // A redirect to a good answer is followed; the target authenticates the same way.
    let newer = bundle_of("partner.org", &[&second_ca], 8);
    endpoint.reply(
        "/moved",
        Reply::Body(newer.to_jwks_json().into_bytes(), true),
    );
    endpoint.reply("/redirect", Reply::Redirect("/moved".into()));
    assert_eq!(
        refresh(target(&endpoint.url("/redirect"), ENDPOINT_ID))
            .await
            .unwrap(),
        Refreshed::Stored(8)
    );
    assert_eq!(stored(&server, "partner.org").await, Some(newer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_web_endpoints_are_checked_against_the_web_pki_roots_and_their_name() {
    let issuer_key = rcgen::KeyPair::generate().unwrap();
    let mut issuer_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    issuer_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer_cert = issuer_params.self_signed(&issuer_key).unwrap();
    let issuer = rcgen::Issuer::new(issuer_params, issuer_key);
    let leaf_key = KeyPair::generate(KeyType::EcP256).unwrap();
    let leaf_rcgen_key = rcgen::KeyPair::try_from(leaf_key.secret_pkcs8_der()).unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_rcgen_key, &issuer)
        .unwrap();
    let endpoint = FakeEndpoint::start(vec![leaf.der().to_vec()], &leaf_key).await;
    let partner_ca = ca_of("partner.org");
    let bundle = bundle_of("partner.org", &[&partner_ca], 3);
    endpoint.reply("/", Reply::Body(bundle.to_jwks_json().into_bytes(), true));

    let server = TestServer::start().await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(issuer_cert.der().clone()).unwrap();
    let client = BundleClient::new(Arc::clone(server.server().state()), roots);
    let web = |url: String| FetchTarget {
        url: url.parse().unwrap(),
        profile: BundleEndpointProfile::HttpsWeb,
    };
    let partner = td("partner.org");
    let (result, _) = client
        .refresh(
            &partner,
            &web(format!("https://localhost:{}/", endpoint.addr.port())),
        )
        .await;
    assert_eq!(result.unwrap(), Refreshed::Stored(3));
    assert_eq!(stored(&server, "partner.org").await, Some(bundle));
    // The certificate names localhost, not 127.0.0.1.
    let (result, _) = client.refresh(&partner, &web(endpoint.url("/"))).await;
    let error = result.unwrap_err();
    assert_eq!(error.kind(), "TLS handshake", "{error}");
}
