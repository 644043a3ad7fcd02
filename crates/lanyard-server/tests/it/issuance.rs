//! SVID issuance end to end over mTLS: an attested agent obtains X.509 and JWT SVIDs for the
//! entries authorized to it and for no others, and syncs exactly those entries.

use std::time::{Duration, SystemTime};

use lanyard_core::keys::{KeyPair, KeyType};
use lanyard_core::{TrustDomain, x509};
use lanyard_proto::convert::{bundle_from_proto, entry_mask_all, spiffe_id_to_proto};
use lanyard_proto::spire::api::server::bundle::v1 as bundle_pb;
use lanyard_proto::spire::api::server::bundle::v1::bundle_client::BundleClient;
use lanyard_proto::spire::api::server::entry::v1 as entry_pb;
use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use lanyard_proto::spire::api::server::svid::v1 as svid_pb;
use lanyard_proto::spire::api::server::svid::v1::svid_client::SvidClient;
use lanyard_proto::spire::api::types;
use tonic::Code;

use crate::support::{AttestedAgentIdentity, TestServer, trust_domain};

pub(crate) async fn create_entry(
    server: &TestServer,
    spiffe_path: &str,
    parent: &lanyard_core::SpiffeId,
    expires_at: i64,
) -> String {
    let id = lanyard_core::SpiffeId::from_path(&trust_domain(), spiffe_path).unwrap();
    let response = EntryClient::new(server.admin().await)
        .batch_create_entry(entry_pb::BatchCreateEntryRequest {
            entries: vec![types::Entry {
                spiffe_id: Some(spiffe_id_to_proto(&id)),
                parent_id: Some(spiffe_id_to_proto(parent)),
                selectors: vec![types::Selector {
                    r#type: "unix".into(),
                    value: "uid:1000".into(),
                }],
                dns_names: vec!["web.example.org".into()],
                x509_svid_ttl: 600,
                expires_at,
                ..Default::default()
            }],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    let result = &response.results[0];
    assert_eq!(result.status.as_ref().unwrap().code, 0, "{result:?}");
    result.entry.as_ref().unwrap().id.clone()
}

pub(crate) async fn mint(
    server: &TestServer,
    agent: &AttestedAgentIdentity,
    entry_id: &str,
) -> svid_pb::batch_new_x509svid_response::Result {
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    let csr = x509::build_csr(&key, None).unwrap();
    let mut results = SvidClient::new(server.tls(Some((&agent.chain, &agent.key))).await)
        .batch_new_x509svid(svid_pb::BatchNewX509svidRequest {
            params: vec![svid_pb::NewX509svidParams {
                entry_id: entry_id.to_owned(),
                csr,
            }],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 1);
    results.remove(0)
}

#[tokio::test]
async fn an_agent_gets_svids_for_its_entries_only() {
    let server = TestServer::start().await;
    let agent_a = server.attest_new_agent().await;
    let agent_b = server.attest_new_agent().await;
    let entry = create_entry(&server, "/web", &agent_a.id, 0).await;

    let result = mint(&server, &agent_a, &entry).await;
    assert_eq!(result.status.as_ref().unwrap().code, 0, "{result:?}");
    let svid = result.svid.unwrap();
    let verified = x509::verify_svid_chain(
        &svid.cert_chain,
        &trust_domain(),
        &server.authorities(),
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(verified.spiffe_id().as_str(), "spiffe://example.org/web");
    let lifetime = verified
        .not_after()
        .duration_since(verified.not_before())
        .unwrap();
    assert!(
        lifetime <= Duration::from_secs(620),
        "TTL from the entry: {lifetime:?}"
    );

    // Agent B is not the entry's parent.
    let refused = mint(&server, &agent_b, &entry).await;
    assert_eq!(
        refused.status.as_ref().unwrap().code,
        Code::NotFound as i32,
        "{refused:?}"
    );
    assert!(refused.svid.is_none());

    // Unauthenticated callers get nothing at all.
    let err = SvidClient::new(server.tls(None).await)
        .batch_new_x509svid(svid_pb::BatchNewX509svidRequest {
            params: vec![svid_pb::NewX509svidParams {
                entry_id: entry.clone(),
                csr: x509::build_csr(&KeyPair::generate(KeyType::EcP256).unwrap(), None).unwrap(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_jwt_svid_for_an_entry_validates_against_the_bundle() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let entry = create_entry(&server, "/api", &agent.id, 0).await;
    let svid = SvidClient::new(server.tls(Some((&agent.chain, &agent.key))).await)
        .new_jwtsvid(svid_pb::NewJwtsvidRequest {
            entry_id: entry,
            audience: vec!["billing".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    let bundle = BundleClient::new(server.tls(None).await)
        .get_bundle(bundle_pb::GetBundleRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bundle.trust_domain, "example.org");
    let bundle = bundle_from_proto(&bundle).unwrap();
    let validated = lanyard_core::jwt::validate_jwt_svid_with_bundle(
        &svid.token,
        "billing",
        &bundle,
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(validated.spiffe_id.as_str(), "spiffe://example.org/api");
    let wrong_audience = lanyard_core::jwt::validate_jwt_svid_with_bundle(
        &svid.token,
        "other",
        &bundle,
        SystemTime::now(),
    );
    assert!(wrong_audience.is_err());
}

pub(crate) async fn sync_ids(server: &TestServer, agent: &AttestedAgentIdentity) -> Vec<String> {
    let channel = server.tls(Some((&agent.chain, &agent.key))).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(entry_pb::SyncAuthorizedEntriesRequest {
        output_mask: Some(entry_mask_all()),
        ids: Vec::new(),
    })
    .await
    .unwrap();
    let mut stream = EntryClient::new(channel)
        .sync_authorized_entries(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.entry_revisions.is_empty());
    let mut ids: Vec<String> = first.entries.into_iter().map(|e| e.id).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn sync_returns_authorized_unexpired_entries() {
    let server = TestServer::start().await;
    let agent = server.attest_new_agent().await;
    let other = server.attest_new_agent().await;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let live = create_entry(&server, "/live", &agent.id, 0).await;
    let expiring = create_entry(
        &server,
        "/expiring",
        &agent.id,
        i64::try_from(now + 60).unwrap(),
    )
    .await;
    create_entry(&server, "/others", &other.id, 0).await;

    let mut want = vec![live.clone(), expiring.clone()];
    want.sort();
    assert_eq!(sync_ids(&server, &agent).await, want);

    // Once the entry expires it authorizes nothing: not synced, not minted.
    server.clock.advance(Duration::from_secs(120));
    assert_eq!(sync_ids(&server, &agent).await, vec![live]);
    let refused = mint(&server, &agent, &expiring).await;
    assert_eq!(refused.status.unwrap().code, Code::NotFound as i32);
}

#[tokio::test]
async fn foreign_trust_domain_ids_are_refused_for_entries() {
    let server = TestServer::start().await;
    let parent = TrustDomain::new("example.org")
        .unwrap()
        .id()
        .join("agent")
        .unwrap();
    let response = EntryClient::new(server.admin().await)
        .batch_create_entry(entry_pb::BatchCreateEntryRequest {
            entries: vec![types::Entry {
                spiffe_id: Some(types::Spiffeid {
                    trust_domain: "elsewhere.org".into(),
                    path: "/web".into(),
                }),
                parent_id: Some(spiffe_id_to_proto(&parent)),
                selectors: vec![types::Selector {
                    r#type: "unix".into(),
                    value: "uid:1".into(),
                }],
                ..Default::default()
            }],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    let status = response.results[0].status.as_ref().unwrap();
    assert_eq!(status.code, Code::InvalidArgument as i32);
    assert!(status.message.contains("spiffe_id"), "{status:?}");
}

const OWNER_REQUIRED: &str = r#"package lanyard
import rego.v1
violations contains {"rule": "owner-required", "message": "no owner"} if { input.entry.owner == null }
"#;

#[tokio::test]
async fn an_entry_that_fails_the_policy_authorizes_nothing_until_it_passes() {
    let dir = tempfile::tempdir().unwrap();
    let policy_path = dir.path().join("policy.rego");
    std::fs::write(&policy_path, "package lanyard\n").unwrap();
    let path = policy_path.clone();
    let server = TestServer::start_with(move |config| {
        config.policy = Some(lanyard_server::config::PolicyConfig::new(path));
    })
    .await;
    let agent = server.attest_new_agent().await;
    // Registered while the policy allowed it; then the policy wants an owner.
    let entry = create_entry(&server, "/ownerless", &agent.id, 0).await;
    std::fs::write(&policy_path, OWNER_REQUIRED).unwrap();
    server
        .server()
        .state()
        .judge
        .policy()
        .unwrap()
        .reload()
        .unwrap();

    // No owner: not synced, not minted.
    assert!(sync_ids(&server, &agent).await.is_empty());
    let refused = mint(&server, &agent, &entry).await;
    assert_eq!(refused.status.unwrap().code, Code::NotFound as i32);

    // Setting the owner makes a new revision, which the policy passes.
    let results = lanyard_proto::lanyard::api::v1::entry_metadata_service_client::EntryMetadataServiceClient::new(
        server.admin().await,
    )
    .set_entry_metadata(lanyard_proto::lanyard::api::v1::SetEntryMetadataRequest {
        metadata: vec![lanyard_proto::lanyard::api::v1::EntryMetadata {
            entry_id: entry.clone(),
            owner: "team-a".into(),
            reason: String::new(),
            ticket: String::new(),
            source: String::new(),
        }],
    })
    .await
    .unwrap()
    .into_inner()
    .results;
    assert_eq!(results[0].status.as_ref().unwrap().code, 0, "{results:?}");
    assert_eq!(sync_ids(&server, &agent).await, vec![entry.clone()]);
    let minted = mint(&server, &agent, &entry).await;
    assert_eq!(minted.status.unwrap().code, 0);

    // A stricter policy, reloaded: the same revision no longer passes.
    std::fs::write(
        &policy_path,
        "package lanyard\nimport rego.v1\nviolations contains {\"rule\": \"closed\", \"message\": \"closed\"} if { true }\n",
    )
    .unwrap();
    server
        .server()
        .state()
        .judge
        .policy()
        .unwrap()
        .reload()
        .unwrap();
    assert!(sync_ids(&server, &agent).await.is_empty());
}

/// Compiles, and evaluates on the compile-time probe (an empty SPIFFE ID), but fails on any
/// real entry: `to_number` of a path segment that is not a number.
const FAILS_ON_REAL_ENTRIES: &str = r#"package lanyard
import rego.v1
violations contains {"rule": "odd", "message": "odd"} if {
  segment := split(input.entry.spiffe_id, "/")[3]
  to_number(segment) > 1
}
"#;

/// Takes far longer than the evaluation limit on a real entry.
const SLOW_ON_REAL_ENTRIES: &str = r#"package lanyard
import rego.v1
violations contains {"rule": "slow", "message": "slow"} if {
  input.entry.spiffe_id != ""
  count([x | some x in numbers.range(1, 3000000); x < 0]) > 0
}
"#;

#[tokio::test]
async fn a_reloaded_policy_that_fails_on_current_entries_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let policy_path = dir.path().join("policy.rego");
    std::fs::write(&policy_path, "package lanyard\n").unwrap();
    let path = policy_path.clone();
    let server = TestServer::start_with(move |config| {
        config.policy = Some(lanyard_server::config::PolicyConfig::new(path));
    })
    .await;
    let agent = server.attest_new_agent().await;
    let entry = create_entry(&server, "/web", &agent.id, 0).await;
    let holder = server.server().state().judge.policy().unwrap();
    let generation = holder.generation();

    std::fs::write(&policy_path, FAILS_ON_REAL_ENTRIES).unwrap();
    let error = holder.reload().unwrap_err();
    assert!(
        matches!(error, lanyard_server::policy::LoadError::Evaluate { .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("spiffe://example.org/web"),
        "{error}"
    );
    assert_eq!(holder.generation(), generation, "the old policy stays");
    assert_eq!(holder.failed_reloads(), 1);
    // Issuance goes on under the policy in force.
    assert_eq!(sync_ids(&server, &agent).await, vec![entry.clone()]);
    assert_eq!(mint(&server, &agent, &entry).await.status.unwrap().code, 0);
}

#[tokio::test]
async fn a_reloaded_policy_that_fails_on_a_synthetic_entry_is_refused_on_an_empty_server() {
    let dir = tempfile::tempdir().unwrap();
    let policy_path = dir.path().join("policy.rego");
    std::fs::write(&policy_path, "package lanyard\n").unwrap();
    let path = policy_path.clone();
    let server = TestServer::start_with(move |config| {
        config.policy = Some(lanyard_server::config::PolicyConfig::new(path));
    })
    .await;
    let holder = server.server().state().judge.policy().unwrap();
    // Fails on every entry; and one that fails only when a local admin writes.
    let fails_on_writes = r#"package lanyard
import rego.v1
violations contains {"rule": "w", "message": "w"} if {
  input.caller.local
  to_number("not a number") > 1
}
"#;
    for candidate in [FAILS_ON_REAL_ENTRIES, fails_on_writes] {
        std::fs::write(&policy_path, candidate).unwrap();
        let error = holder.reload().unwrap_err();
        assert!(
            error
                .to_string()
                .contains("spiffe://example.org/policy-probe"),
            "{error}"
        );
    }
    assert_eq!(holder.generation(), 1, "the policy loaded at start stays");
    // Entries can still be written under it.
    let agent = server.attest_new_agent().await;
    create_entry(&server, "/web", &agent.id, 0).await;
}

#[tokio::test]
async fn a_policy_slower_than_its_limit_fails_closed_without_stalling() {
    let dir = tempfile::tempdir().unwrap();
    let policy_path = dir.path().join("policy.rego");
    std::fs::write(&policy_path, "package lanyard\n").unwrap();
    let path = policy_path.clone();
    let server = TestServer::start_with(move |config| {
        let mut policy = lanyard_server::config::PolicyConfig::new(path);
        policy.evaluation_timeout = Duration::from_millis(50);
        config.policy = Some(policy);
    })
    .await;
    let agent = server.attest_new_agent().await;
    create_entry(&server, "/web", &agent.id, 0).await;
    let state = server.server().state();
    let input = state.policy_samples(1).remove(0);

    std::fs::write(&policy_path, SLOW_ON_REAL_ENTRIES).unwrap();
    // Without the limit the candidate evaluates (slowly) and is put in force.
    let error = state.judge.policy().unwrap().reload().unwrap_err();
    assert!(
        error.to_string().contains("spiffe://example.org/web"),
        "{error}"
    );

    // The same policy loaded directly fails to evaluate rather than running on.
    let slow = lanyard_server::policy::PolicyHolder::load_with_time_limit(
        &policy_path,
        Duration::from_millis(50),
    )
    .unwrap();
    assert!(slow.current().evaluate_entry(&input).is_err());
}
