//! SPIRE's TrustDomain API on the Lanyard server: federation relationships created, listed,
//! shown, updated and deleted with SPIRE's rules and texts, the bundle that comes with one
//! stored as the trust domain's federated bundle (and kept when the relationship goes), the
//! refresh hook, the audit log, and admins only.

use std::time::{Duration, SystemTime};

use lanyard_core::x509::{CaSubject, create_self_signed_ca};
use lanyard_core::{KeyPair, KeyType, TrustBundle, TrustDomain, X509Authority};
use lanyard_proto::convert::bundle_to_proto;
use lanyard_proto::spire::api::server::bundle::v1 as bundle_pb;
use lanyard_proto::spire::api::server::bundle::v1::bundle_client::BundleClient;
use lanyard_proto::spire::api::server::trustdomain::v1 as pb;
use lanyard_proto::spire::api::server::trustdomain::v1::trust_domain_client::TrustDomainClient;
use lanyard_proto::spire::api::types;
use lanyard_proto::spire::api::types::federation_relationship::BundleEndpointProfile as Profile;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::TestServer;

async fn client(server: &TestServer) -> TrustDomainClient<Channel> {
    TrustDomainClient::new(server.admin().await)
}

fn web(trust_domain: &str, url: &str) -> types::FederationRelationship {
    types::FederationRelationship {
        trust_domain: trust_domain.to_owned(),
        bundle_endpoint_url: url.to_owned(),
        bundle_endpoint_profile: Some(Profile::HttpsWeb(types::HttpsWebProfile {})),
        trust_domain_bundle: None,
    }
}

fn spiffe(trust_domain: &str, url: &str, endpoint_id: &str) -> types::FederationRelationship {
    types::FederationRelationship {
        bundle_endpoint_profile: Some(Profile::HttpsSpiffe(types::HttpsspiffeProfile {
            endpoint_spiffe_id: endpoint_id.to_owned(),
        })),
        ..web(trust_domain, url)
    }
}

/// A bundle of `trust_domain` with one freshly made CA.
fn bundle_of(trust_domain: &str, sequence_number: u64) -> types::Bundle {
    let trust_domain = TrustDomain::new(trust_domain).unwrap();
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let der = create_self_signed_ca(
        &trust_domain,
        &key,
        &CaSubject::default(),
        SystemTime::now(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let mut bundle = TrustBundle::new(trust_domain);
    bundle.add_x509_authority(X509Authority::new(der).unwrap());
    bundle.set_sequence_number(sequence_number);
    bundle_to_proto(&bundle)
}

async fn create(
    server: &TestServer,
    relationships: Vec<types::FederationRelationship>,
) -> Vec<pb::batch_create_federation_relationship_response::Result> {
    client(server)
        .await
        .batch_create_federation_relationship(pb::BatchCreateFederationRelationshipRequest {
            federation_relationships: relationships,
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results
}

async fn update(
    server: &TestServer,
    relationships: Vec<types::FederationRelationship>,
    input_mask: Option<types::FederationRelationshipMask>,
) -> Vec<pb::batch_update_federation_relationship_response::Result> {
    client(server)
        .await
        .batch_update_federation_relationship(pb::BatchUpdateFederationRelationshipRequest {
            federation_relationships: relationships,
            input_mask,
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results
}

async fn delete(
    server: &TestServer,
    trust_domains: &[&str],
) -> Vec<pb::batch_delete_federation_relationship_response::Result> {
    client(server)
        .await
        .batch_delete_federation_relationship(pb::BatchDeleteFederationRelationshipRequest {
            trust_domains: trust_domains.iter().map(|td| (*td).to_owned()).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .results
}

async fn get(
    server: &TestServer,
    trust_domain: &str,
) -> Result<types::FederationRelationship, tonic::Status> {
    client(server)
        .await
        .get_federation_relationship(pb::GetFederationRelationshipRequest {
            trust_domain: trust_domain.to_owned(),
            output_mask: None,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn list(server: &TestServer) -> Vec<types::FederationRelationship> {
    client(server)
        .await
        .list_federation_relationships(pb::ListFederationRelationshipsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .federation_relationships
}

async fn federated_bundle(server: &TestServer, trust_domain: &str) -> Option<types::Bundle> {
    match BundleClient::new(server.admin().await)
        .get_federated_bundle(bundle_pb::GetFederatedBundleRequest {
            trust_domain: trust_domain.to_owned(),
            output_mask: None,
        })
        .await
    {
        Ok(bundle) => Some(bundle.into_inner()),
        Err(status) if status.code() == Code::NotFound => None,
        Err(status) => panic!("GetFederatedBundle: {status:?}"),
    }
}

/// `(code, message)` of a batch item's status.
fn status_of(status: Option<&types::Status>) -> (Code, String) {
    let status = status.expect("every result has a status");
    (Code::from_i32(status.code), status.message.clone())
}

/// The audit records with `action`, in order.
fn audit_records(server: &TestServer, action: &str) -> Vec<serde_json::Value> {
    let log = std::fs::read_to_string(server.config.audit_log_path()).unwrap();
    lanyard_core::audit::verify(&log).unwrap();
    lanyard_core::audit::events(&log)
        .map(|(_, _, record)| record)
        .filter(|record| record["action"] == action)
        .collect()
}

#[tokio::test]
async fn relationships_are_created_listed_shown_updated_and_deleted() {
    let mut server = TestServer::start().await;
    let mut changes = server.server().state().bundle_refresh.relationships();
    let partner_bundle = bundle_of("partner.example", 7);
    let mut with_bundle = spiffe(
        "partner.example",
        "https://partner.example:8443/bundle",
        "spiffe://partner.example/spire/server",
    );
    with_bundle.trust_domain_bundle = Some(partner_bundle.clone());
    let results = create(
        &server,
        vec![
            web("web.example", "https://web.example/bundle"),
            with_bundle.clone(),
        ],
    )
    .await;
    assert_eq!(results.len(), 2);
    for result in &results {
        assert_eq!(status_of(result.status.as_ref()), (Code::Ok, "OK".into()));
    }
    assert_eq!(
        results[0].federation_relationship,
        Some(web("web.example", "https://web.example/bundle"))
    );
    assert_eq!(
        results[1].federation_relationship,
        Some(with_bundle.clone())
    );
    assert!(
        changes.has_changed().unwrap(),
        "the fetching client hears of it"
    );
    changes.mark_unchanged();

    // The bundle that came with it is the trust domain's federated bundle.
    assert_eq!(
        federated_bundle(&server, "partner.example").await,
        Some(partner_bundle.clone())
    );

    // Get, bare or in spiffe:// form; list in trust domain order.
    assert_eq!(get(&server, "partner.example").await.unwrap(), with_bundle);
    assert_eq!(
        get(&server, "spiffe://partner.example").await.unwrap(),
        with_bundle
    );
    let listed = list(&server).await;
    let names: Vec<&str> = listed.iter().map(|r| r.trust_domain.as_str()).collect();
    assert_eq!(names, ["partner.example", "web.example"]);
    let status = get(&server, "unknown.example").await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::NotFound, "federation relationship does not exist")
    );
    let status = get(&server, "Bad.example").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("failed to parse trust domain: trust domain characters"),
        "{status:?}"
    );

    // Paging, and an output mask that keeps only the trust domain (always there).
    let page = client(&server)
        .await
        .list_federation_relationships(pb::ListFederationRelationshipsRequest {
            output_mask: Some(types::FederationRelationshipMask::default()),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page.federation_relationships,
        [types::FederationRelationship {
            trust_domain: "partner.example".into(),
            ..types::FederationRelationship::default()
        }]
    );
    assert_eq!(page.next_page_token, "partner.example");
    let page = client(&server)
        .await
        .list_federation_relationships(pb::ListFederationRelationshipsRequest {
            output_mask: None,
            page_size: 1,
            page_token: page.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.federation_relationships.len(), 1);
    assert_eq!(page.federation_relationships[0].trust_domain, "web.example");
    assert_eq!(page.next_page_token, "");

    // A relationship outlives a restart.
    server.restart().await;
    assert_eq!(get(&server, "partner.example").await.unwrap(), with_bundle);

    // Update: every field without a mask; the bundle stays when none is given.
    let results = update(
        &server,
        vec![web("partner.example", "https://partner.example/new")],
        None,
    )
    .await;
    assert_eq!(status_of(results[0].status.as_ref()).0, Code::Ok);
    let mut expected = web("partner.example", "https://partner.example/new");
    expected.trust_domain_bundle = Some(partner_bundle.clone());
    assert_eq!(results[0].federation_relationship, Some(expected.clone()));
    assert_eq!(get(&server, "partner.example").await.unwrap(), expected);

    // Delete: the relationship goes, the bundle stays.
    let results = delete(&server, &["spiffe://partner.example", "web.example"]).await;
    assert_eq!(
        results
            .iter()
            .map(|r| (status_of(r.status.as_ref()).0, r.trust_domain.as_str()))
            .collect::<Vec<_>>(),
        [(Code::Ok, "partner.example"), (Code::Ok, "web.example")]
    );
    assert!(list(&server).await.is_empty());
    assert_eq!(
        federated_bundle(&server, "partner.example").await,
        Some(partner_bundle)
    );

    // Every write is audited with the method and the caller.
    let created = audit_records(&server, "federation relationship created");
    assert_eq!(created.len(), 2, "{created:?}");
    assert_eq!(created[1]["details"]["trust_domain"], "partner.example");
    assert_eq!(
        created[1]["details"]["bundle_endpoint_profile"],
        "https_spiffe"
    );
    assert_eq!(
        created[1]["details"]["endpoint_spiffe_id"],
        "spiffe://partner.example/spire/server"
    );
    assert_eq!(created[1]["details"]["trust_domain_bundle_set"], true);
    assert!(
        created[1]["details"]["method"]
            .as_str()
            .unwrap()
            .ends_with("/BatchCreateFederationRelationship")
    );
    assert!(
        created[1]["caller"].as_str().unwrap().starts_with("local"),
        "{created:?}"
    );
    let updated = audit_records(&server, "federation relationship updated");
    assert_eq!(updated.len(), 1, "{updated:?}");
    assert_eq!(
        updated[0]["details"]["bundle_endpoint_url"],
        "https://partner.example/new"
    );
    let deleted = audit_records(&server, "federation relationship deleted");
    let deleted: Vec<&str> = deleted
        .iter()
        .map(|r| r["details"]["trust_domain"].as_str().unwrap())
        .collect();
    assert_eq!(deleted, ["partner.example", "web.example"]);
}

#[tokio::test]
async fn bad_relationships_are_refused_with_spires_texts() {
    let server = TestServer::start().await;
    create(
        &server,
        vec![web("taken.example", "https://taken.example/bundle")],
    )
    .await;
    let mut mismatched = web("partner.example", "https://partner.example/bundle");
    mismatched.trust_domain_bundle = Some(bundle_of("other.example", 1));
    let mut no_profile = web("partner.example", "https://partner.example/bundle");
    no_profile.bundle_endpoint_profile = None;
    let cases: Vec<(&str, types::FederationRelationship, Code, &str)> = vec![
        (
            "a malformed URL",
            web("partner.example", "https://partner example/bundle"),
            Code::InvalidArgument,
            "failed to convert federation relationship: failed to parse bundle endpoint URL: ",
        ),
        (
            "an http:// URL",
            web("partner.example", "http://partner.example/bundle"),
            Code::InvalidArgument,
            "failed to convert federation relationship: bundle endpoint URL must use the https scheme",
        ),
        (
            "a URL without a host",
            web("partner.example", "https:///bundle"),
            Code::InvalidArgument,
            "failed to convert federation relationship: bundle endpoint URL must specify the host",
        ),
        (
            "user info in the URL",
            web("partner.example", "https://admin:secret@partner.example/"),
            Code::InvalidArgument,
            "failed to convert federation relationship: bundle endpoint URL must not contain user info",
        ),
        (
            "the server's own trust domain",
            web("example.org", "https://example.org/bundle"),
            Code::InvalidArgument,
            "unable to create federation relationship for server trust domain",
        ),
        (
            "an invalid trust domain",
            web("Partner.example", "https://partner.example/bundle"),
            Code::InvalidArgument,
            "failed to convert federation relationship: failed to parse trust domain: trust domain \
             characters are limited to lowercase letters, numbers, dots, dashes, and underscores",
        ),
        (
            "an endpoint ID that is no SPIFFE ID",
            spiffe(
                "partner.example",
                "https://partner.example/bundle",
                "partner.example/spire/server",
            ),
            Code::InvalidArgument,
            "failed to convert federation relationship: failed to parse endpoint SPIFFE ID: scheme \
             is missing or invalid",
        ),
        (
            "another trust domain's bundle",
            mismatched,
            Code::InvalidArgument,
            "failed to convert federation relationship: trust domain bundle (\"other.example\") \
             must match the trust domain of the federation relationship (\"partner.example\")",
        ),
        (
            "no profile",
            no_profile,
            Code::InvalidArgument,
            "failed to convert federation relationship: missing bundle_endpoint_profile",
        ),
        (
            "a duplicate",
            web("taken.example", "https://elsewhere.example/bundle"),
            Code::AlreadyExists,
            "failed to create federation relationship: a federation relationship with trust \
             domain \"taken.example\" already exists",
        ),
    ];
    let request: Vec<_> = cases.iter().map(|(_, r, _, _)| r.clone()).collect();
    let results = create(&server, request).await;
    assert_eq!(results.len(), cases.len(), "one result per item, in order");
    for ((what, _, code, message), result) in cases.iter().zip(&results) {
        let (got_code, got_message) = status_of(result.status.as_ref());
        assert_eq!(got_code, *code, "{what}: {got_message}");
        assert!(
            got_message.starts_with(message),
            "{what}: {got_message:?} does not start with {message:?}"
        );
        assert!(result.federation_relationship.is_none(), "{what}");
    }
    // Nothing of it was stored, and the taken one is as it was.
    let listed = list(&server).await;
    assert_eq!(
        listed,
        [web("taken.example", "https://taken.example/bundle")]
    );
    assert_eq!(federated_bundle(&server, "other.example").await, None);
    assert_eq!(federated_bundle(&server, "partner.example").await, None);

    // An endpoint served from another trust domain is SPIRE's to allow, and so Lanyard's.
    let elsewhere = spiffe(
        "partner.example",
        "https://bundles.example/partner",
        "spiffe://bundles.example/endpoint",
    );
    let results = create(&server, vec![elsewhere.clone()]).await;
    assert_eq!(status_of(results[0].status.as_ref()).0, Code::Ok);
    assert_eq!(get(&server, "partner.example").await.unwrap(), elsewhere);
}

#[tokio::test]
async fn updates_write_the_fields_of_the_input_mask() {
    let server = TestServer::start().await;
    let first_bundle = bundle_of("partner.example", 1);
    let mut stored = web("partner.example", "https://partner.example/bundle");
    stored.trust_domain_bundle = Some(first_bundle.clone());
    create(&server, vec![stored.clone()]).await;

    let mut change = spiffe(
        "partner.example",
        "https://partner.example/new",
        "spiffe://partner.example/endpoint",
    );
    let second_bundle = bundle_of("partner.example", 2);
    change.trust_domain_bundle = Some(second_bundle.clone());

    // An empty mask writes nothing; the result is the stored relationship.
    let results = update(
        &server,
        vec![change.clone()],
        Some(types::FederationRelationshipMask::default()),
    )
    .await;
    assert_eq!(results[0].federation_relationship, Some(stored.clone()));
    assert_eq!(
        federated_bundle(&server, "partner.example").await,
        Some(first_bundle)
    );

    // The URL alone.
    let url_only = types::FederationRelationshipMask {
        bundle_endpoint_url: true,
        ..types::FederationRelationshipMask::default()
    };
    let results = update(&server, vec![change.clone()], Some(url_only)).await;
    let mut expected = stored.clone();
    expected.bundle_endpoint_url = "https://partner.example/new".into();
    assert_eq!(results[0].federation_relationship, Some(expected.clone()));

    // The profile and the bundle: the bundle becomes the federated bundle.
    let profile_and_bundle = types::FederationRelationshipMask {
        bundle_endpoint_profile: true,
        trust_domain_bundle: true,
        ..types::FederationRelationshipMask::default()
    };
    let results = update(&server, vec![change.clone()], Some(profile_and_bundle)).await;
    assert_eq!(results[0].federation_relationship, Some(change.clone()));
    assert_eq!(get(&server, "partner.example").await.unwrap(), change);
    assert_eq!(
        federated_bundle(&server, "partner.example").await,
        Some(second_bundle)
    );

    // An output mask on the result.
    let result = client(&server)
        .await
        .batch_update_federation_relationship(pb::BatchUpdateFederationRelationshipRequest {
            federation_relationships: vec![change.clone()],
            input_mask: Some(url_only),
            output_mask: Some(types::FederationRelationshipMask {
                bundle_endpoint_profile: true,
                ..types::FederationRelationshipMask::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    let relationship = result.federation_relationship.unwrap();
    assert!(relationship.bundle_endpoint_profile.is_some());
    assert!(relationship.bundle_endpoint_url.is_empty());
    assert!(relationship.trust_domain_bundle.is_none());

    // As in SPIRE, the relationship is checked whole, whatever the input mask leaves out.
    let results = update(
        &server,
        vec![
            web("partner.example", "http://partner.example/bundle"),
            web("unknown.example", "https://unknown.example/bundle"),
        ],
        Some(url_only),
    )
    .await;
    assert_eq!(
        status_of(results[0].status.as_ref()),
        (
            Code::InvalidArgument,
            "failed to convert federation relationship: bundle endpoint URL must use the https \
             scheme"
                .into()
        )
    );
    assert_eq!(
        status_of(results[1].status.as_ref()),
        (
            Code::NotFound,
            "failed to update federation relationship: unable to fetch federation relationship: \
             record not found"
                .into()
        )
    );
}

#[tokio::test]
async fn deletes_and_refreshes_answer_as_spire_does() {
    let server = TestServer::start().await;
    create(
        &server,
        vec![web("partner.example", "https://partner.example/bundle")],
    )
    .await;

    let results = delete(&server, &["", "Bad", "unknown.example", "partner.example"]).await;
    let answers: Vec<(Code, String, &str)> = results
        .iter()
        .map(|r| {
            let (code, message) = status_of(r.status.as_ref());
            (code, message, r.trust_domain.as_str())
        })
        .collect();
    assert_eq!(
        answers[0],
        (Code::InvalidArgument, "missing trust domain".into(), "")
    );
    assert_eq!(answers[1].0, Code::InvalidArgument);
    assert!(
        answers[1].1.starts_with("failed to parse trust domain: "),
        "{answers:?}"
    );
    assert_eq!(answers[1].2, "Bad");
    assert_eq!(
        answers[2],
        (
            Code::NotFound,
            "federation relationship not found".into(),
            "unknown.example"
        )
    );
    assert_eq!(answers[3], (Code::Ok, "OK".into(), "partner.example"));

    // RefreshBundle: only for a trust domain with a relationship; it signals the hook.
    let refresh = |trust_domain: &str| {
        let trust_domain = trust_domain.to_owned();
        let server = &server;
        async move {
            client(server)
                .await
                .refresh_bundle(pb::RefreshBundleRequest { trust_domain })
                .await
        }
    };
    let status = refresh("partner.example").await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::NotFound,
            "no relationship with trust domain \"partner.example\""
        )
    );
    let status = refresh("").await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::InvalidArgument,
            "failed to parse trust domain: trust domain is missing"
        )
    );
    create(
        &server,
        vec![web("partner.example", "https://partner.example/bundle")],
    )
    .await;
    // The bundle endpoint client takes the request (`bundle_client.rs` sees it fetch).
    refresh("spiffe://partner.example").await.unwrap();
    let requested = audit_records(&server, "bundle refresh requested");
    assert_eq!(requested.len(), 1, "{requested:?}");
    assert_eq!(requested[0]["details"]["trust_domain"], "partner.example");
}

#[tokio::test]
async fn only_admins_manage_relationships() {
    let server = TestServer::start().await;
    create(
        &server,
        vec![web("partner.example", "https://partner.example/bundle")],
    )
    .await;
    let agent = server.attest_new_agent().await;
    for channel in [
        server.tls(Some((&agent.chain, &agent.key))).await,
        server.bootstrap_tls().await,
    ] {
        let mut client = TrustDomainClient::new(channel);
        let refusals =
            [
                (
                    "ListFederationRelationships",
                    client
                        .list_federation_relationships(
                            pb::ListFederationRelationshipsRequest::default(),
                        )
                        .await
                        .map(|_| ()),
                ),
                (
                    "GetFederationRelationship",
                    client
                        .get_federation_relationship(pb::GetFederationRelationshipRequest {
                            trust_domain: "partner.example".into(),
                            output_mask: None,
                        })
                        .await
                        .map(|_| ()),
                ),
                (
                    "BatchCreateFederationRelationship",
                    client
                        .batch_create_federation_relationship(
                            pb::BatchCreateFederationRelationshipRequest {
                                federation_relationships: vec![web(
                                    "other.example",
                                    "https://other.example/",
                                )],
                                output_mask: None,
                            },
                        )
                        .await
                        .map(|_| ()),
                ),
                (
                    "BatchUpdateFederationRelationship",
                    client
                        .batch_update_federation_relationship(
                            pb::BatchUpdateFederationRelationshipRequest {
                                federation_relationships: vec![web(
                                    "partner.example",
                                    "https://evil.example/",
                                )],
                                input_mask: None,
                                output_mask: None,
                            },
                        )
                        .await
                        .map(|_| ()),
                ),
                (
                    "BatchDeleteFederationRelationship",
                    client
                        .batch_delete_federation_relationship(
                            pb::BatchDeleteFederationRelationshipRequest {
                                trust_domains: vec!["partner.example".into()],
                            },
                        )
                        .await
                        .map(|_| ()),
                ),
                (
                    "RefreshBundle",
                    client
                        .refresh_bundle(pb::RefreshBundleRequest {
                            trust_domain: "partner.example".into(),
                        })
                        .await
                        .map(|_| ()),
                ),
            ];
        for (method, result) in refusals {
            let status = result.unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied, "{method}");
            assert_eq!(
                status.message(),
                format!(
                    "authorization denied for method \
                     /spire.api.server.trustdomain.v1.TrustDomain/{method}"
                )
            );
        }
    }
    // Nothing changed.
    assert_eq!(
        list(&server).await,
        [web("partner.example", "https://partner.example/bundle")]
    );
}

/// `[federation.trust_domains]`: relationships from the configuration file, written at start
/// through the relationship writer, shown by the API, updated when the file changes, their
/// bundle file used only while the server holds no bundle of the trust domain.
#[tokio::test]
async fn relationships_from_the_configuration_file_are_applied_at_start() {
    use lanyard_server::config::{BundleFileFormat, ConfiguredRelationshipConfig};

    let files = tempfile::tempdir().unwrap();
    let first = bundle_of("partner.example", 4);
    let first_core = lanyard_proto::convert::bundle_from_proto(&first).unwrap();
    let bundle_path = files.path().join("partner.json");
    std::fs::write(&bundle_path, first_core.to_jwks_json()).unwrap();
    let partner = ConfiguredRelationshipConfig {
        bundle_endpoint_url: "https://127.0.0.1:1/partner".into(),
        bundle_endpoint_profile: "https_spiffe".into(),
        endpoint_spiffe_id: Some("spiffe://partner.example/spire/server".into()),
        trust_domain_bundle_path: Some(bundle_path.clone()),
        trust_domain_bundle_format: BundleFileFormat::Spiffe,
    };
    let web_config = ConfiguredRelationshipConfig {
        bundle_endpoint_url: "https://127.0.0.1:1/web".into(),
        bundle_endpoint_profile: "https_web".into(),
        endpoint_spiffe_id: None,
        trust_domain_bundle_path: None,
        trust_domain_bundle_format: BundleFileFormat::Pem,
    };
    let mut server = TestServer::start_with(|config| {
        config
            .federation
            .trust_domains
            .insert("partner.example".into(), partner.clone());
        config
            .federation
            .trust_domains
            .insert("web.example".into(), web_config.clone());
    })
    .await;
    let listed = list(&server).await;
    let names: Vec<&str> = listed.iter().map(|r| r.trust_domain.as_str()).collect();
    assert_eq!(names, ["partner.example", "web.example"]);
    assert_eq!(listed[0].bundle_endpoint_url, "https://127.0.0.1:1/partner");
    assert_eq!(
        listed[0].bundle_endpoint_profile,
        Some(Profile::HttpsSpiffe(types::HttpsspiffeProfile {
            endpoint_spiffe_id: "spiffe://partner.example/spire/server".into(),
        }))
    );
    assert_eq!(
        listed[1].bundle_endpoint_profile,
        Some(Profile::HttpsWeb(types::HttpsWebProfile {}))
    );
    let stored = federated_bundle(&server, "partner.example").await.unwrap();
    assert_eq!(stored.sequence_number, 4);
    assert_eq!(stored.x509_authorities, first.x509_authorities);
    assert!(federated_bundle(&server, "web.example").await.is_none());
    let created = audit_records(&server, "federation relationship created");
    assert_eq!(created.len(), 2, "{created:?}");
    assert!(
        created.iter().all(|r| r["caller"] == "server configuration"
            && r["details"]["method"] == "[federation.trust_domains]"),
        "{created:?}"
    );

    // A restart with the same file writes nothing; with another URL, updates; another
    // bundle in the file does not replace the one held.
    server.restart().await;
    assert_eq!(
        audit_records(&server, "federation relationship updated").len(),
        0
    );
    let second = bundle_of("partner.example", 2);
    std::fs::write(
        &bundle_path,
        lanyard_proto::convert::bundle_from_proto(&second)
            .unwrap()
            .to_jwks_json(),
    )
    .unwrap();
    let mut moved = partner.clone();
    moved.bundle_endpoint_url = "https://127.0.0.1:2/partner".into();
    server
        .config
        .federation
        .trust_domains
        .insert("partner.example".into(), moved);
    server.restart().await;
    let listed = list(&server).await;
    assert_eq!(listed[0].bundle_endpoint_url, "https://127.0.0.1:2/partner");
    let updated = audit_records(&server, "federation relationship updated");
    assert_eq!(updated.len(), 1, "{updated:?}");
    let stored = federated_bundle(&server, "partner.example").await.unwrap();
    assert_eq!(stored.sequence_number, 4, "the held bundle stays");

    // A relationship made through the API, absent from the file, is left alone; one with
    // the server's own trust domain in the file stops the start.
    let extra = create(&server, vec![web("api.example", "https://127.0.0.1:1/api")]).await;
    assert_eq!(extra[0].status.as_ref().unwrap().code, 0);
    server.restart().await;
    assert_eq!(list(&server).await.len(), 3);
    let mut config = server.config.clone();
    config
        .federation
        .trust_domains
        .insert("example.org".into(), web_config);
    let error = config.check().unwrap_err().to_string();
    assert!(
        error.contains("unable to create federation relationship for server trust domain"),
        "{error}"
    );
}
