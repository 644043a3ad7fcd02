//! The SVID and Bundle services through real gRPC over a Unix socket, where every caller is
//! local and so an admin. Agent-authenticated paths are unit-tested in `api::svid` until the
//! TLS endpoint exists.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use lanyard_core::x509::{self, CaSubject, build_csr, create_self_signed_ca};
use lanyard_core::{EntryId, KeyPair, KeyType, RegistrationEntry, SpiffeId, TrustDomain};
use lanyard_proto::convert::{bundle_from_proto, spiffe_id_to_proto};
use lanyard_proto::spire::api::server::bundle::v1::batch_delete_federated_bundle_request::Mode;
use lanyard_proto::spire::api::server::bundle::v1::bundle_client::BundleClient;
use lanyard_proto::spire::api::server::bundle::v1::bundle_server::BundleServer;
use lanyard_proto::spire::api::server::bundle::v1::{
    AppendBundleRequest, BatchCreateFederatedBundleRequest, BatchDeleteFederatedBundleRequest,
    BatchSetFederatedBundleRequest, BatchUpdateFederatedBundleRequest, CountBundlesRequest,
    GetBundleRequest, GetFederatedBundleRequest, ListFederatedBundlesRequest,
    PublishJwtAuthorityRequest,
};
use lanyard_proto::spire::api::server::svid::v1::svid_client::SvidClient;
use lanyard_proto::spire::api::server::svid::v1::svid_server::SvidServer;
use lanyard_proto::spire::api::server::svid::v1::{
    BatchNewX509svidRequest, MintJwtsvidRequest, MintX509svidRequest, NewDownstreamX509caRequest,
    NewJwtsvidRequest, NewX509svidParams,
};
use lanyard_proto::spire::api::types::{self, BundleMask, JwtKey, X509Certificate};
use lanyard_server::api::bundle::BundleService;
use lanyard_server::api::svid::SvidService;
use lanyard_server::ca::{CaConfig, CaManager};
use lanyard_server::config::ServerConfig;
use lanyard_server::datastore::{Datastore, MemoryStore};
use lanyard_server::keymanager::MemoryKeyManager;
use lanyard_server::state::{ServerState, system_clock};
use tempfile::TempDir;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Server};

const HOUR: Duration = Duration::from_secs(3600);

/// A server with the SVID and Bundle services on a temporary Unix socket.
struct Harness {
    state: Arc<ServerState>,
    channel: Channel,
    _shutdown: tokio::sync::oneshot::Sender<()>,
    _dir: TempDir,
}

impl Harness {
    async fn start() -> Self {
        let dir = TempDir::new().unwrap();
        let store: Arc<dyn Datastore> = Arc::new(MemoryStore::new());
        let ca_config = CaConfig {
            trust_domain: td(),
            ca_ttl: 24 * HOUR,
            x509_key_type: KeyType::EcP256,
            jwt_key_type: KeyType::EcP256,
            subject: CaSubject::default(),
            new_trust_domain: false,
            instance: "local".to_owned(),
        };
        let ca = CaManager::load(
            ca_config,
            Arc::new(MemoryKeyManager::new()),
            Arc::clone(&store),
            SystemTime::now(),
        )
        .await
        .unwrap();
        let config = ServerConfig::new(td(), dir.path().to_owned());
        let state = Arc::new(
            ServerState::new(config, store, Arc::new(ca), system_clock())
                .await
                .unwrap(),
        );

        let socket = dir.path().join("api.sock");
        let incoming = UnixListenerStream::new(UnixListener::bind(&socket).unwrap());
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let server = Server::builder()
            .add_service(SvidServer::new(SvidService::new(Arc::clone(&state))))
            .add_service(BundleServer::new(BundleService::new(Arc::clone(&state))))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_rx.await;
            });
        tokio::spawn(server);

        let channel = connect(socket).await;
        Self {
            state,
            channel,
            _shutdown: shutdown,
            _dir: dir,
        }
    }

    fn svid(&self) -> SvidClient<Channel> {
        SvidClient::new(self.channel.clone())
    }

    fn bundle(&self) -> BundleClient<Channel> {
        BundleClient::new(self.channel.clone())
    }

    async fn get_bundle(&self) -> types::Bundle {
        self.bundle()
            .get_bundle(GetBundleRequest::default())
            .await
            .unwrap()
            .into_inner()
    }
}

async fn connect(socket: PathBuf) -> Channel {
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .unwrap()
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn id(path: &str) -> SpiffeId {
    SpiffeId::from_path(&td(), path).unwrap()
}

fn roots(bundle: &types::Bundle) -> Vec<Vec<u8>> {
    bundle
        .x509_authorities
        .iter()
        .map(|a| a.asn1.clone())
        .collect()
}

/// A CSR with the given URI and DNS SANs, signed by a fresh P-256 key.
fn csr(uris: &[&str], dns_names: &[&str]) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    for uri in uris {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI((*uri).try_into().unwrap()));
    }
    for name in dns_names {
        params
            .subject_alt_names
            .push(rcgen::SanType::DnsName((*name).try_into().unwrap()));
    }
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn dns_names_of(cert_der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).unwrap();
    let Some(san) = cert.subject_alternative_name().unwrap() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
        .collect()
}

fn unix(time: SystemTime) -> i64 {
    i64::try_from(time.duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

/// A foreign trust domain's bundle with one fresh CA certificate.
fn foreign_bundle(name: &str, sequence_number: u64) -> types::Bundle {
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let cert = create_self_signed_ca(
        &name.parse().unwrap(),
        &key,
        &CaSubject::default(),
        SystemTime::now(),
        24 * HOUR,
    )
    .unwrap();
    types::Bundle {
        trust_domain: name.to_owned(),
        x509_authorities: vec![X509Certificate {
            asn1: cert,
            ..X509Certificate::default()
        }],
        refresh_hint: 300,
        sequence_number,
        ..types::Bundle::default()
    }
}

fn status_codes(statuses: impl IntoIterator<Item = Option<types::Status>>) -> Vec<Code> {
    statuses
        .into_iter()
        .map(|status| Code::from(status.expect("every result has a status").code))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// SVID service

#[tokio::test]
async fn mint_x509_svid_chains_to_the_bundle_with_dns_names_and_ttl() {
    let harness = Harness::start().await;
    let bundle = harness.get_bundle().await;
    let request = MintX509svidRequest {
        csr: csr(
            &["spiffe://example.org/web"],
            &["web.example.org", "www.example.org"],
        ),
        ttl: 600,
    };
    let svid = harness
        .svid()
        .mint_x509svid(request)
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    let verified =
        x509::verify_svid_chain(&svid.cert_chain, &td(), &roots(&bundle), SystemTime::now())
            .unwrap();
    assert_eq!(verified.spiffe_id(), &id("/web"));
    assert_eq!(svid.id, Some(spiffe_id_to_proto(&id("/web"))));
    assert_eq!(svid.expires_at, unix(verified.not_after()));
    let lifetime = verified
        .not_after()
        .duration_since(verified.not_before())
        .unwrap();
    assert_eq!(
        lifetime,
        Duration::from_secs(610),
        "TTL plus 10 s backdating"
    );
    assert_eq!(
        dns_names_of(&svid.cert_chain[0]),
        ["web.example.org", "www.example.org"]
    );

    // A TTL beyond the CA's lifetime is capped at the CA's NotAfter.
    let request = MintX509svidRequest {
        csr: csr(&["spiffe://example.org/web"], &[]),
        ttl: 1_000_000,
    };
    let svid = harness
        .svid()
        .mint_x509svid(request)
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    let (_, ca_not_after) = x509::validity_of(&bundle.x509_authorities[0].asn1).unwrap();
    assert_eq!(svid.expires_at, unix(ca_not_after));

    // No TTL: the one-hour default.
    let request = MintX509svidRequest {
        csr: csr(&["spiffe://example.org/web"], &[]),
        ttl: 0,
    };
    let svid = harness
        .svid()
        .mint_x509svid(request)
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    let lifetime = svid.expires_at - unix(SystemTime::now());
    assert!((3590..=3600).contains(&lifetime), "{lifetime}");
}

#[tokio::test]
async fn mint_x509_svid_refuses_bad_csrs_and_ids() {
    let harness = Harness::start().await;
    let mut bad_signature = csr(&["spiffe://example.org/web"], &[]);
    let last = bad_signature.len() - 1;
    bad_signature[last] ^= 0x01;
    let cases = [
        ("flipped signature byte", bad_signature),
        ("empty", Vec::new()),
        ("garbage", b"not a csr".to_vec()),
        ("no URI SAN", csr(&[], &["web.example.org"])),
        (
            "two URI SANs",
            csr(&["spiffe://example.org/a", "spiffe://example.org/b"], &[]),
        ),
        ("not a SPIFFE ID", csr(&["https://example.org/web"], &[])),
        ("other trust domain", csr(&["spiffe://other.org/web"], &[])),
        ("trust domain ID", csr(&["spiffe://example.org"], &[])),
        (
            "reserved path",
            csr(&["spiffe://example.org/spire/agent/x"], &[]),
        ),
    ];
    for (what, csr) in cases {
        let status = harness
            .svid()
            .mint_x509svid(MintX509svidRequest { csr, ttl: 0 })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    }
}

#[tokio::test]
async fn mint_jwt_svid_validates_against_the_bundle() {
    let harness = Harness::start().await;
    let audience = vec!["db".to_owned(), "cache".to_owned()];
    let svid = harness
        .svid()
        .mint_jwtsvid(MintJwtsvidRequest {
            id: Some(spiffe_id_to_proto(&id("/web"))),
            audience: audience.clone(),
            ttl: 60,
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(svid.expires_at - svid.issued_at, 60);
    assert_eq!(svid.id, Some(spiffe_id_to_proto(&id("/web"))));

    let bundle = bundle_from_proto(&harness.get_bundle().await).unwrap();
    let validated = lanyard_core::jwt::validate_jwt_svid_with_bundle(
        &svid.token,
        "db",
        &bundle,
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(validated.spiffe_id, id("/web"));
    assert_eq!(validated.audiences, audience);
    assert_eq!(unix(validated.expires_at), svid.expires_at);
    assert!(bundle.jwt_authority(&validated.key_id).is_some());

    // Refusals.
    let cases = [
        (
            "empty audience",
            Some(spiffe_id_to_proto(&id("/web"))),
            vec![],
        ),
        ("missing ID", None, audience.clone()),
        (
            "other trust domain",
            Some(types::Spiffeid {
                trust_domain: "other.org".to_owned(),
                path: "/web".to_owned(),
            }),
            audience.clone(),
        ),
        (
            "trust domain ID",
            Some(types::Spiffeid {
                trust_domain: "example.org".to_owned(),
                path: String::new(),
            }),
            audience.clone(),
        ),
    ];
    for (what, id, audience) in cases {
        let status = harness
            .svid()
            .mint_jwtsvid(MintJwtsvidRequest {
                id,
                audience,
                ttl: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    }
}

#[tokio::test]
async fn agent_rpcs_refuse_a_local_caller() {
    let harness = Harness::start().await;
    let status = harness
        .svid()
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: "web".to_owned(),
                csr: csr(&["spiffe://example.org/web"], &[]),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = harness
        .svid()
        .new_jwtsvid(NewJwtsvidRequest {
            entry_id: "web".to_owned(),
            audience: vec!["db".to_owned()],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn downstream_x509_ca_for_a_local_caller() {
    let harness = Harness::start().await;
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let response = harness
        .svid()
        .new_downstream_x509ca(NewDownstreamX509caRequest {
            csr: build_csr(&key, None).unwrap(),
            preferred_ttl: 7200,
        })
        .await
        .unwrap()
        .into_inner();
    let bundle = harness.get_bundle().await;
    assert_eq!(response.x509_authorities, roots(&bundle));
    let ca_der = &response.ca_cert_chain[0];
    assert!(x509::is_ca(ca_der).unwrap());
    assert_eq!(x509::spiffe_id_of(ca_der).unwrap(), td().id());
    let (_, not_after) = x509::validity_of(ca_der).unwrap();
    let lifetime = unix(not_after) - unix(SystemTime::now());
    assert!((7190..=7200).contains(&lifetime), "{lifetime}");
}

// ---------------------------------------------------------------------------------------------
// Bundle service: own bundle

#[tokio::test]
async fn get_bundle_shape() {
    let harness = Harness::start().await;
    let bundle = harness.get_bundle().await;
    assert_eq!(bundle.trust_domain, "example.org");
    assert_eq!(bundle.x509_authorities.len(), 1);
    let ca = harness.state.ca.x509_ca().unwrap();
    assert_eq!(bundle.x509_authorities[0].asn1, ca.cert_der());
    assert!(!bundle.x509_authorities[0].tainted);
    assert_eq!(bundle.jwt_authorities.len(), 1);
    let jwt = &bundle.jwt_authorities[0];
    assert_eq!(jwt.key_id, harness.state.ca.jwt_key().unwrap().key_id);
    assert!(jwt.expires_at > unix(SystemTime::now()));
    assert!(bundle.sequence_number > 0);
    // It parses the way SPIRE's agent parses it.
    bundle_from_proto(&bundle).unwrap();

    let masked = harness
        .bundle()
        .get_bundle(GetBundleRequest {
            output_mask: Some(BundleMask {
                x509_authorities: true,
                ..BundleMask::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(masked.trust_domain, "example.org");
    assert_eq!(masked.x509_authorities.len(), 1);
    assert!(masked.jwt_authorities.is_empty());
    assert_eq!(masked.sequence_number, 0);
}

#[tokio::test]
async fn append_bundle_adds_authorities_and_bumps_the_sequence() {
    let harness = Harness::start().await;
    let before = harness.get_bundle().await;

    let extra_key = KeyPair::generate(KeyType::EcP256).unwrap();
    let extra_ca = create_self_signed_ca(
        &td(),
        &extra_key,
        &CaSubject::default(),
        SystemTime::now(),
        HOUR,
    )
    .unwrap();
    let jwt_key = KeyPair::generate(KeyType::EcP256).unwrap();
    let appended = harness
        .bundle()
        .append_bundle(AppendBundleRequest {
            x509_authorities: vec![X509Certificate {
                asn1: extra_ca.clone(),
                ..X509Certificate::default()
            }],
            jwt_authorities: vec![JwtKey {
                public_key: jwt_key.public_key_der(),
                key_id: "appended".to_owned(),
                expires_at: unix(SystemTime::now() + HOUR),
                ..JwtKey::default()
            }],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(appended.x509_authorities.len(), 2);
    assert_eq!(appended.x509_authorities[1].asn1, extra_ca);
    assert_eq!(appended.jwt_authorities.len(), 2);
    assert!(appended.sequence_number > before.sequence_number);
    assert_eq!(harness.get_bundle().await, appended);

    // Appending what is already there changes nothing.
    let again = harness
        .bundle()
        .append_bundle(AppendBundleRequest {
            x509_authorities: vec![X509Certificate {
                asn1: extra_ca,
                ..X509Certificate::default()
            }],
            ..AppendBundleRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.sequence_number, appended.sequence_number);

    // Refusals: nothing to append, a non-certificate, a key ID naming another key.
    let other_key = KeyPair::generate(KeyType::EcP256).unwrap();
    let cases = [
        AppendBundleRequest::default(),
        AppendBundleRequest {
            x509_authorities: vec![X509Certificate {
                asn1: b"not a certificate".to_vec(),
                ..X509Certificate::default()
            }],
            ..AppendBundleRequest::default()
        },
        AppendBundleRequest {
            jwt_authorities: vec![JwtKey {
                public_key: other_key.public_key_der(),
                key_id: "appended".to_owned(),
                ..JwtKey::default()
            }],
            ..AppendBundleRequest::default()
        },
        AppendBundleRequest {
            jwt_authorities: vec![JwtKey {
                public_key: other_key.public_key_der(),
                key_id: String::new(),
                ..JwtKey::default()
            }],
            ..AppendBundleRequest::default()
        },
    ];
    for request in cases {
        let status = harness.bundle().append_bundle(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    assert_eq!(harness.get_bundle().await, appended);
}

#[tokio::test]
async fn publish_jwt_authority_returns_every_jwt_authority() {
    let harness = Harness::start().await;
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let published = harness
        .bundle()
        .publish_jwt_authority(PublishJwtAuthorityRequest {
            jwt_authority: Some(JwtKey {
                public_key: key.public_key_der(),
                key_id: "downstream".to_owned(),
                ..JwtKey::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .jwt_authorities;
    let key_ids: Vec<&str> = published.iter().map(|k| k.key_id.as_str()).collect();
    assert_eq!(key_ids.len(), 2);
    assert!(key_ids.contains(&"downstream"));
    assert_eq!(harness.get_bundle().await.jwt_authorities, published);

    let status = harness
        .bundle()
        .publish_jwt_authority(PublishJwtAuthorityRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// Bundle service: federated bundles

#[tokio::test]
async fn federated_bundle_crud() {
    let harness = Harness::start().await;
    let mut client = harness.bundle();

    let foo = foreign_bundle("foo.test", 7);
    let bar = foreign_bundle("bar.test", 1);
    let results = client
        .batch_create_federated_bundle(BatchCreateFederatedBundleRequest {
            bundle: vec![
                foo.clone(),
                foreign_bundle("example.org", 1),
                bar.clone(),
                foo.clone(),
                types::Bundle {
                    trust_domain: "Not A Trust Domain".to_owned(),
                    ..types::Bundle::default()
                },
            ],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        status_codes(results.iter().map(|r| r.status.clone())),
        [
            Code::Ok,
            Code::InvalidArgument,
            Code::Ok,
            Code::AlreadyExists,
            Code::InvalidArgument,
        ]
    );
    assert_eq!(results[0].bundle.as_ref(), Some(&foo));
    assert!(results[1].bundle.is_none());

    // Get, in both spellings of the trust domain.
    for name in ["foo.test", "spiffe://foo.test"] {
        let got = client
            .get_federated_bundle(GetFederatedBundleRequest {
                trust_domain: name.to_owned(),
                output_mask: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got, foo);
    }
    for (name, code) in [
        ("unknown.test", Code::NotFound),
        ("example.org", Code::InvalidArgument),
        ("", Code::InvalidArgument),
    ] {
        let status = client
            .get_federated_bundle(GetFederatedBundleRequest {
                trust_domain: name.to_owned(),
                output_mask: None,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{name}");
    }

    // Count includes the own bundle; lists do not.
    let count = client
        .count_bundles(CountBundlesRequest {})
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count, 3);
    let all = client
        .list_federated_bundles(ListFederatedBundlesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.bundles, [bar.clone(), foo.clone()]);
    assert!(all.next_page_token.is_empty());

    // Paged, one at a time.
    let mut seen = Vec::new();
    let mut page_token = String::new();
    for _ in 0..10 {
        let page = client
            .list_federated_bundles(ListFederatedBundlesRequest {
                output_mask: Some(BundleMask::default()),
                page_size: 1,
                page_token: page_token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.bundles.len() <= 1);
        seen.extend(page.bundles.into_iter().map(|b| b.trust_domain));
        page_token = page.next_page_token;
        if page_token.is_empty() {
            break;
        }
    }
    assert!(page_token.is_empty(), "paging ends");
    assert_eq!(seen, ["bar.test", "foo.test"]);

    // Update with an input mask: only the refresh hint changes.
    let results = client
        .batch_update_federated_bundle(BatchUpdateFederatedBundleRequest {
            bundle: vec![
                types::Bundle {
                    trust_domain: "foo.test".to_owned(),
                    refresh_hint: 60,
                    ..types::Bundle::default()
                },
                types::Bundle {
                    trust_domain: "unknown.test".to_owned(),
                    ..types::Bundle::default()
                },
                types::Bundle {
                    trust_domain: "example.org".to_owned(),
                    ..types::Bundle::default()
                },
            ],
            input_mask: Some(BundleMask {
                refresh_hint: true,
                ..BundleMask::default()
            }),
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        status_codes(results.iter().map(|r| r.status.clone())),
        [Code::Ok, Code::NotFound, Code::InvalidArgument]
    );
    let updated = results[0].bundle.clone().unwrap();
    assert_eq!(updated.refresh_hint, 60);
    assert_eq!(updated.x509_authorities, foo.x509_authorities);
    assert_eq!(updated.sequence_number, foo.sequence_number);

    // Without an input mask every field is replaced.
    let replacement = foreign_bundle("foo.test", 8);
    let results = client
        .batch_update_federated_bundle(BatchUpdateFederatedBundleRequest {
            bundle: vec![replacement.clone()],
            input_mask: None,
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results[0].bundle.as_ref(), Some(&replacement));

    // Set creates or replaces, never for the own trust domain.
    let baz = foreign_bundle("spiffe://baz.test", 3);
    let results = client
        .batch_set_federated_bundle(BatchSetFederatedBundleRequest {
            bundle: vec![baz.clone(), foreign_bundle("example.org", 1)],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        status_codes(results.iter().map(|r| r.status.clone())),
        [Code::Ok, Code::InvalidArgument]
    );
    assert_eq!(
        results[0].bundle.as_ref().unwrap().trust_domain,
        "baz.test",
        "stored under the bare name"
    );
    let own = harness.get_bundle().await;
    assert_eq!(own.x509_authorities.len(), 1, "own bundle untouched");
    assert_eq!(
        own.x509_authorities[0].asn1,
        harness.state.ca.x509_ca().unwrap().cert_der()
    );
}

#[tokio::test]
async fn federated_bundle_delete_modes() {
    let harness = Harness::start().await;
    let mut client = harness.bundle();
    client
        .batch_create_federated_bundle(BatchCreateFederatedBundleRequest {
            bundle: ["a.test", "b.test", "c.test", "d.test"]
                .into_iter()
                .map(|name| foreign_bundle(name, 1))
                .collect(),
            output_mask: None,
        })
        .await
        .unwrap();

    // Entries federating with a.test, b.test and c.test.
    let agent = id("/spire/agent/join_token/t");
    let mut entry_ids = Vec::new();
    for name in ["a.test", "b.test", "c.test"] {
        let mut entry = RegistrationEntry::new(
            EntryId::new(&format!("fed-{name}")).unwrap(),
            id(&format!("/federated/{name}")),
            agent.clone(),
            ["unix:uid:1000".parse().unwrap()].into_iter().collect(),
            SystemTime::now(),
        );
        entry.federates_with = [TrustDomain::new(name).unwrap()].into_iter().collect();
        let stored = harness.state.store.create_entry(entry).await.unwrap();
        harness.state.catch_up().await.unwrap();
        entry_ids.push(stored.id);
    }

    let delete = |trust_domains: &[&str], mode: Mode| BatchDeleteFederatedBundleRequest {
        trust_domains: trust_domains.iter().map(|s| (*s).to_owned()).collect(),
        mode: mode as i32,
    };

    // RESTRICT (the default) refuses while entries federate; it deletes an unused bundle.
    let results = client
        .batch_delete_federated_bundle(delete(
            &[
                "a.test",
                "d.test",
                "example.org",
                "unknown.test",
                "spiffe://",
            ],
            Mode::Restrict,
        ))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        status_codes(results.iter().map(|r| r.status.clone())),
        [
            Code::FailedPrecondition,
            Code::Ok,
            Code::InvalidArgument,
            Code::NotFound,
            Code::InvalidArgument,
        ]
    );
    let names: Vec<&str> = results.iter().map(|r| r.trust_domain.as_str()).collect();
    assert_eq!(
        names[..4],
        ["a.test", "d.test", "example.org", "unknown.test"]
    );

    // DELETE removes the federating entry, from the store and from the authorization index.
    let results = client
        .batch_delete_federated_bundle(delete(&["a.test"], Mode::Delete))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        status_codes(results.iter().map(|r| r.status.clone())),
        [Code::Ok]
    );
    assert!(
        harness
            .state
            .store
            .get_entry(&entry_ids[0])
            .await
            .unwrap()
            .is_none()
    );
    assert!(harness.state.index.read().entry(&entry_ids[0]).is_none());

    // DISSOCIATE keeps the entry but drops the trust domain from it.
    let results = client
        .batch_delete_federated_bundle(delete(&["spiffe://b.test"], Mode::Dissociate))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        status_codes(results.iter().map(|r| r.status.clone())),
        [Code::Ok]
    );
    assert_eq!(results[0].trust_domain, "b.test");
    let entry = harness
        .state
        .store
        .get_entry(&entry_ids[1])
        .await
        .unwrap()
        .unwrap();
    assert!(entry.federates_with.is_empty());
    let indexed = harness
        .state
        .index
        .read()
        .entry(&entry_ids[1])
        .cloned()
        .unwrap();
    assert!(indexed.federates_with.is_empty());
    assert_eq!(indexed.revision_number, entry.revision_number);

    // An unknown mode fails the whole call.
    let status = client
        .batch_delete_federated_bundle(BatchDeleteFederatedBundleRequest {
            trust_domains: vec!["c.test".to_owned()],
            mode: 42,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let remaining: Vec<String> = client
        .list_federated_bundles(ListFederatedBundlesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .bundles
        .into_iter()
        .map(|b| b.trust_domain)
        .collect();
    assert_eq!(remaining, ["c.test"]);
}
