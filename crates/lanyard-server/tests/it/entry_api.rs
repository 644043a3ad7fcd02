//! The Entry and EntryMetadata services through real gRPC: admin RPCs over a Unix socket, where
//! every caller is local and so an admin, and the agent RPCs over mTLS with an SVID obtained by
//! join-token attestation.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::tls::{SpiffeServerVerifier, client_config};
use lanyard_core::x509::CaSubject;
use lanyard_core::{KeyType, TrustBundle, TrustDomain};
use lanyard_proto::lanyard::api::v1::entry_metadata_service_client::EntryMetadataServiceClient;
use lanyard_proto::lanyard::api::v1::{
    EntryMetadata, GetEntryMetadataRequest, ListEntryMetadataRequest, SetEntryMetadataRequest,
};
use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use lanyard_proto::spire::api::server::entry::v1::{
    BatchCreateEntryRequest, BatchDeleteEntryRequest, BatchUpdateEntryRequest, CountEntriesRequest,
    GetAuthorizedEntriesRequest, GetEntryRequest, ListEntriesRequest, SyncAuthorizedEntriesRequest,
    SyncAuthorizedEntriesResponse, batch_create_entry_response, count_entries_request,
    list_entries_request,
};
use lanyard_proto::spire::api::types::{
    self, EntryMask, FederatesWithMatch, SelectorMatch, federates_with_match, selector_match,
};
use lanyard_server::api::entry::EntryService;
use lanyard_server::api::metadata::EntryMetadataService;
use lanyard_server::ca::{CaConfig, CaManager};
use lanyard_server::config::ServerConfig;
use lanyard_server::datastore::{Datastore, MemoryStore, SqlStore};
use lanyard_server::keymanager::MemoryKeyManager;
use lanyard_server::state::{ServerState, system_clock};
use lanyard_server::tls::ServerSvid;
use tempfile::TempDir;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::transport::{Channel, Server};
use tonic::{Code, Streaming};

use crate::support::{AttestedAgentIdentity, TestServer, tls_channel, uds_channel};

const HOUR: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------------------------
// Harness

/// The Entry and EntryMetadata services on a temporary Unix socket.
struct Harness {
    state: Arc<ServerState>,
    channel: Channel,
    _shutdown: tokio::sync::oneshot::Sender<()>,
    _dir: TempDir,
}

impl Harness {
    async fn memory() -> Self {
        Self::start(Arc::new(MemoryStore::new()), TempDir::new().unwrap()).await
    }

    async fn sql() -> Self {
        let dir = TempDir::new().unwrap();
        let store = SqlStore::open(&dir.path().join("datastore.sqlite3"))
            .await
            .unwrap();
        Self::start(Arc::new(store), dir).await
    }

    async fn start(store: Arc<dyn Datastore>, dir: TempDir) -> Self {
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
        let config = ServerConfig::new(td(), dir.path().join("data"));
        let state = Arc::new(
            ServerState::new(config, store, Arc::new(ca), system_clock())
                .await
                .unwrap(),
        );
        let socket = dir.path().join("api.sock");
        let incoming = UnixListenerStream::new(UnixListener::bind(&socket).unwrap());
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            Server::builder()
                .add_service(EntryService::new(Arc::clone(&state)).into_server())
                .add_service(EntryMetadataService::new(Arc::clone(&state)).into_server())
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = shutdown_rx.await;
                }),
        );
        let channel = uds_channel(&socket).await;
        Self {
            state,
            channel,
            _shutdown: shutdown,
            _dir: dir,
        }
    }

    fn entries(&self) -> EntryClient<Channel> {
        EntryClient::new(self.channel.clone())
    }

    fn metadata(&self) -> EntryMetadataServiceClient<Channel> {
        EntryMetadataServiceClient::new(self.channel.clone())
    }

    async fn create(&self, entries: Vec<types::Entry>) -> Vec<batch_create_entry_response::Result> {
        self.entries()
            .batch_create_entry(BatchCreateEntryRequest {
                entries,
                output_mask: None,
            })
            .await
            .unwrap()
            .into_inner()
            .results
    }

    /// Creates one entry that must succeed; returns it as stored.
    async fn create_ok(&self, entry: types::Entry) -> types::Entry {
        let mut results = self.create(vec![entry]).await;
        assert_eq!(results.len(), 1);
        let result = results.remove(0);
        assert_eq!(code(&result.status), Code::Ok, "{:?}", result.status);
        result.entry.unwrap()
    }

    async fn list(&self, filter: list_entries_request::Filter) -> Vec<String> {
        let response = self
            .entries()
            .list_entries(ListEntriesRequest {
                filter: Some(filter),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(response.next_page_token.is_empty());
        let mut hints: Vec<String> = response.entries.into_iter().map(|e| e.hint).collect();
        hints.sort();
        hints
    }

    async fn count(&self, filter: count_entries_request::Filter) -> i32 {
        self.entries()
            .count_entries(CountEntriesRequest {
                filter: Some(filter),
            })
            .await
            .unwrap()
            .into_inner()
            .count
    }
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn sid(path: &str) -> types::Spiffeid {
    types::Spiffeid {
        trust_domain: "example.org".to_owned(),
        path: path.to_owned(),
    }
}

fn selector(kind: &str, value: &str) -> types::Selector {
    types::Selector {
        r#type: kind.to_owned(),
        value: value.to_owned(),
    }
}

const AGENT: &str = "/spire/agent/join_token/abc";

/// A workload entry under [`AGENT`] with selector `unix:uid:1000`.
fn workload(path: &str) -> types::Entry {
    types::Entry {
        spiffe_id: Some(sid(path)),
        parent_id: Some(sid(AGENT)),
        selectors: vec![selector("unix", "uid:1000")],
        ..Default::default()
    }
}

fn code(status: &Option<types::Status>) -> Code {
    Code::from(status.as_ref().expect("every result has a status").code)
}

fn message(status: &Option<types::Status>) -> &str {
    &status.as_ref().unwrap().message
}

fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// The mask SPIRE v1.13's agent sends on `SyncAuthorizedEntries`.
fn agent_mask() -> EntryMask {
    EntryMask {
        spiffe_id: true,
        selectors: true,
        federates_with: true,
        admin: true,
        downstream: true,
        revision_number: true,
        store_svid: true,
        hint: true,
        created_at: true,
        ..EntryMask::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Admin RPCs

async fn crud(harness: &Harness) {
    let before = unix_now();
    let mut request = workload("/web");
    request.x509_svid_ttl = 3600;
    request.jwt_svid_ttl = 300;
    request.dns_names = vec!["web.example.org".to_owned()];
    request.hint = "web".to_owned();
    request.admin = true;
    request.expires_at = before + 86_400;
    // The server assigns these.
    request.revision_number = 7;
    request.created_at = 5;
    let created = harness.create_ok(request.clone()).await;
    assert_eq!(created.id.len(), 36, "a UUID is generated: {}", created.id);
    assert_eq!(created.spiffe_id, request.spiffe_id);
    assert_eq!(created.parent_id, request.parent_id);
    assert_eq!(created.selectors, request.selectors);
    assert_eq!(created.x509_svid_ttl, 3600);
    assert_eq!(created.jwt_svid_ttl, 300);
    assert_eq!(created.dns_names, request.dns_names);
    assert_eq!(created.hint, "web");
    assert!(created.admin);
    assert_eq!(created.expires_at, before + 86_400);
    assert_eq!(created.revision_number, 0);
    assert!(created.created_at >= before && created.created_at <= unix_now());

    let got = harness
        .entries()
        .get_entry(GetEntryRequest {
            id: created.id.clone(),
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, created);

    // No input mask: every field is replaced, as `spire-server entry update` does.
    let mut update = created.clone();
    update.selectors = vec![selector("unix", "uid:1001"), selector("unix", "gid:5")];
    update.hint = "web-2".to_owned();
    update.dns_names = Vec::new();
    update.admin = false;
    let results = harness
        .entries()
        .batch_update_entry(BatchUpdateEntryRequest {
            entries: vec![update],
            input_mask: None,
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        code(&results[0].status),
        Code::Ok,
        "{:?}",
        results[0].status
    );
    let updated = results[0].entry.clone().unwrap();
    assert_eq!(updated.revision_number, 1);
    assert_eq!(updated.created_at, created.created_at);
    assert_eq!(updated.hint, "web-2");
    assert_eq!(updated.selectors.len(), 2);
    assert!(updated.dns_names.is_empty());
    assert!(!updated.admin);

    // With an input mask only the masked fields change, whatever else the message holds.
    let partial = types::Entry {
        id: created.id.clone(),
        hint: "web-3".to_owned(),
        jwt_svid_ttl: 60,
        ..Default::default()
    };
    let results = harness
        .entries()
        .batch_update_entry(BatchUpdateEntryRequest {
            entries: vec![partial],
            input_mask: Some(EntryMask {
                hint: true,
                ..EntryMask::default()
            }),
            output_mask: Some(EntryMask {
                hint: true,
                revision_number: true,
                ..EntryMask::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        code(&results[0].status),
        Code::Ok,
        "{:?}",
        results[0].status
    );
    let masked = results[0].entry.clone().unwrap();
    assert_eq!(masked.id, created.id);
    assert_eq!(masked.hint, "web-3");
    assert_eq!(masked.revision_number, 2);
    assert!(masked.spiffe_id.is_none(), "the output mask applies");
    let stored = harness
        .entries()
        .get_entry(GetEntryRequest {
            id: created.id.clone(),
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.jwt_svid_ttl, 300);
    assert_eq!(stored.selectors.len(), 2);

    let results = harness
        .entries()
        .batch_delete_entry(BatchDeleteEntryRequest {
            ids: vec![created.id.clone(), created.id.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].id, created.id);
    assert_eq!(code(&results[0].status), Code::Ok);
    assert_eq!(results[1].id, created.id);
    assert_eq!(code(&results[1].status), Code::NotFound);
    assert_eq!(message(&results[1].status), "entry not found");

    let error = harness
        .entries()
        .get_entry(GetEntryRequest {
            id: created.id.clone(),
            output_mask: None,
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert_eq!(error.message(), "entry not found");
    assert!(
        harness
            .state
            .index
            .read()
            .entry(&created.id.parse().unwrap())
            .is_none(),
        "the authorization index follows deletions"
    );
}

#[tokio::test]
async fn create_get_update_delete() {
    crud(&Harness::memory().await).await;
}

#[tokio::test]
async fn create_get_update_delete_on_sqlite() {
    let harness = Harness::sql().await;
    crud(&harness).await;
    // And the store really holds what the API wrote.
    let entry = harness.create_ok(workload("/persisted")).await;
    let stored = harness
        .state
        .store
        .get_entry(&entry.id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.spiffe_id.path(), "/persisted");
}

#[tokio::test]
async fn a_client_chosen_id_is_kept() {
    let harness = Harness::memory().await;
    let mut entry = workload("/web");
    entry.id = "my-entry.1".to_owned();
    let created = harness.create_ok(entry).await;
    assert_eq!(created.id, "my-entry.1");
    assert!(
        harness
            .state
            .index
            .read()
            .entry(&"my-entry.1".parse().unwrap())
            .is_some(),
        "the authorization index follows creations"
    );

    // The same ID for a different registration is refused, without handing back the other.
    let mut other = workload("/other");
    other.id = "my-entry.1".to_owned();
    let results = harness.create(vec![other]).await;
    assert_eq!(code(&results[0].status), Code::AlreadyExists);
    assert!(results[0].entry.is_none());
}

#[tokio::test]
async fn each_invalid_item_gets_its_own_invalid_argument_naming_the_field() {
    let harness = Harness::memory().await;
    let valid = workload("/ok");

    let mut foreign_spiffe_id = workload("/x");
    foreign_spiffe_id.spiffe_id = Some(types::Spiffeid {
        trust_domain: "other.org".to_owned(),
        path: "/x".to_owned(),
    });
    let mut bad_spiffe_id = workload("/x");
    bad_spiffe_id.spiffe_id = Some(sid("no-leading-slash"));
    let mut missing_parent = workload("/x");
    missing_parent.parent_id = None;
    let mut foreign_parent = workload("/x");
    foreign_parent.parent_id = Some(types::Spiffeid {
        trust_domain: "other.org".to_owned(),
        path: AGENT.to_owned(),
    });
    let mut no_selectors = workload("/x");
    no_selectors.selectors.clear();
    let mut bad_selector = workload("/x");
    bad_selector.selectors = vec![selector("", "uid:1")];
    let mut negative_ttl = workload("/x");
    negative_ttl.x509_svid_ttl = -1;
    let mut huge_jwt_ttl = workload("/x");
    huge_jwt_ttl.jwt_svid_ttl = i32::MAX;
    let mut bad_id = workload("/x");
    bad_id.id = "not/allowed".to_owned();
    let mut bad_dns = workload("/x");
    bad_dns.dns_names = vec!["bad_name".to_owned()];
    let mut bad_federation = workload("/x");
    bad_federation.federates_with = vec!["spiffe://UPPER".to_owned()];
    let mut server_id = workload("/spire/server");
    server_id.spiffe_id = Some(sid("/spire/server"));
    let mut ip_dns = workload("/x");
    ip_dns.dns_names = vec!["10.1.2.3".to_owned()];
    let mut too_many_selectors = workload("/x");
    too_many_selectors.selectors = (0..=lanyard_core::entry::MAX_SELECTORS_PER_ENTRY)
        .map(|i| selector("unix", &format!("uid:{i}")))
        .collect();
    let mut too_many_dns_names = workload("/x");
    too_many_dns_names.dns_names = (0..=lanyard_core::entry::MAX_DNS_NAMES_PER_ENTRY)
        .map(|i| format!("h{i}.example.org"))
        .collect();
    let mut long_hint = workload("/x");
    long_hint.hint = "h".repeat(lanyard_core::entry::MAX_HINT_LEN + 1);

    let cases: Vec<(types::Entry, &str)> = vec![
        (foreign_spiffe_id, "spiffe_id"),
        (bad_spiffe_id, "spiffe_id"),
        (missing_parent, "parent_id"),
        (foreign_parent, "parent_id"),
        (no_selectors, "selectors"),
        (bad_selector, "selectors"),
        (negative_ttl, "x509_svid_ttl"),
        (huge_jwt_ttl, "jwt_svid_ttl"),
        (bad_id, "id"),
        (bad_dns, "dns name"),
        (bad_federation, "federates_with"),
        (server_id, "spiffe_id"),
        (ip_dns, "dns name"),
        (too_many_selectors, "selectors"),
        (too_many_dns_names, "DNS names"),
        (long_hint, "hint"),
    ];
    let mut request = vec![valid.clone()];
    request.extend(cases.iter().map(|(entry, _)| entry.clone()));
    request.push(valid);
    let results = harness.create(request).await;
    assert_eq!(results.len(), cases.len() + 2, "one result per item");

    assert_eq!(code(&results[0].status), Code::Ok);
    for ((_, field), result) in cases.iter().zip(&results[1..]) {
        assert_eq!(
            code(&result.status),
            Code::InvalidArgument,
            "{field}: {:?}",
            result.status
        );
        let text = message(&result.status);
        assert!(text.contains(field), "{text:?} should name {field}");
        assert!(text.starts_with("failed to convert entry: "), "{text:?}");
        assert!(result.entry.is_none());
    }
    // The last item repeats the first: the first is what comes back.
    let last = results.last().unwrap();
    assert_eq!(code(&last.status), Code::AlreadyExists);
    assert_eq!(message(&last.status), "similar entry already exists");
    assert_eq!(
        last.entry.as_ref().unwrap().id,
        results[0].entry.as_ref().unwrap().id
    );

    let count = harness
        .count(count_entries_request::Filter::default())
        .await;
    assert_eq!(count, 1);

    // An entry that is its own parent is accepted, as SPIRE accepts it: spire-controller-manager
    // creates one to find out which fields the server keeps.
    let mut own_parent = workload("/probe");
    own_parent.parent_id = own_parent.spiffe_id.clone();
    let results = harness.create(vec![own_parent]).await;
    assert_eq!(
        code(&results[0].status),
        Code::Ok,
        "{:?}",
        results[0].status
    );
}

#[tokio::test]
async fn an_entry_already_expired_is_refused_and_a_batch_over_the_limit_applies_nothing() {
    let harness = Harness::memory().await;
    let mut expired = workload("/expired");
    expired.expires_at = unix_now() - 1;
    let results = harness.create(vec![expired]).await;
    assert_eq!(code(&results[0].status), Code::InvalidArgument);
    assert!(
        message(&results[0].status).contains("expires_at"),
        "{:?}",
        results[0].status
    );

    let max = lanyard_server::api::MAX_ENTRIES_PER_BATCH;
    let batch: Vec<_> = (0..=max).map(|i| workload(&format!("/w{i}"))).collect();
    let status = harness
        .entries()
        .batch_create_entry(BatchCreateEntryRequest {
            entries: batch.clone(),
            output_mask: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains(&max.to_string()), "{status:?}");
    let status = harness
        .entries()
        .batch_delete_entry(BatchDeleteEntryRequest {
            ids: (0..=max).map(|i| format!("id{i}")).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let count = harness
        .count(count_entries_request::Filter::default())
        .await;
    assert_eq!(count, 0, "nothing of a refused batch is applied");

    // Exactly the limit is accepted.
    let results = harness.create(batch[..max].to_vec()).await;
    assert!(results.iter().all(|r| code(&r.status) == Code::Ok));
}

#[tokio::test]
async fn a_duplicate_returns_the_existing_entry_under_the_output_mask() {
    let harness = Harness::memory().await;
    let mut original = workload("/web");
    original.hint = "first".to_owned();
    let existing = harness.create_ok(original).await;

    // Same SPIFFE ID, parent and selector set (in another order): a duplicate, whatever the
    // other fields say.
    let mut duplicate = workload("/web");
    duplicate.selectors = vec![selector("unix", "uid:1000"), selector("unix", "uid:1000")];
    duplicate.hint = "second".to_owned();
    let results = harness
        .entries()
        .batch_create_entry(BatchCreateEntryRequest {
            entries: vec![duplicate],
            output_mask: Some(EntryMask {
                hint: true,
                ..EntryMask::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(code(&results[0].status), Code::AlreadyExists);
    let returned = results[0].entry.as_ref().unwrap();
    assert_eq!(returned.id, existing.id);
    assert_eq!(returned.hint, "first");
    assert!(returned.spiffe_id.is_none(), "masked");

    // A different selector set is a different registration.
    let mut distinct = workload("/web");
    distinct.selectors.push(selector("unix", "gid:1"));
    harness.create_ok(distinct).await;
}

#[tokio::test]
async fn update_reports_each_failure_per_item() {
    let harness = Harness::memory().await;
    let a = harness.create_ok(workload("/a")).await;
    let b = harness.create_ok(workload("/b")).await;

    let mut invalid = a.clone();
    invalid.selectors.clear();
    let mut similar_to_a = b.clone();
    similar_to_a.spiffe_id = a.spiffe_id.clone();
    let unknown = types::Entry {
        id: "nope".to_owned(),
        ..workload("/c")
    };
    let missing_id = workload("/d");
    let mut ok = b.clone();
    ok.hint = "fine".to_owned();

    let results = harness
        .entries()
        .batch_update_entry(BatchUpdateEntryRequest {
            entries: vec![invalid, similar_to_a, unknown, missing_id, ok],
            input_mask: None,
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<Code> = results.iter().map(|r| code(&r.status)).collect();
    assert_eq!(
        codes,
        [
            Code::InvalidArgument,
            Code::AlreadyExists,
            Code::NotFound,
            Code::InvalidArgument,
            Code::Ok
        ]
    );
    assert!(message(&results[0].status).contains("selectors"));
    assert_eq!(message(&results[2].status), "entry not found");
    assert!(message(&results[3].status).contains("id"));
    assert_eq!(results[4].entry.as_ref().unwrap().hint, "fine");
    assert_eq!(results[4].entry.as_ref().unwrap().revision_number, 1);
}

#[tokio::test]
async fn delete_reports_each_id() {
    let harness = Harness::memory().await;
    let entry = harness.create_ok(workload("/a")).await;
    let results = harness
        .entries()
        .batch_delete_entry(BatchDeleteEntryRequest {
            ids: vec![
                "missing".to_owned(),
                String::new(),
                entry.id.clone(),
                "bad/id".to_owned(),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let summary: Vec<(&str, Code)> = results
        .iter()
        .map(|r| (r.id.as_str(), code(&r.status)))
        .collect();
    assert_eq!(
        summary,
        [
            ("missing", Code::NotFound),
            ("", Code::InvalidArgument),
            (entry.id.as_str(), Code::Ok),
            ("bad/id", Code::InvalidArgument),
        ]
    );
    assert_eq!(harness.count(Default::default()).await, 0);
}

#[tokio::test]
async fn get_entry_edge_cases() {
    let harness = Harness::memory().await;
    let entry = harness.create_ok(workload("/a")).await;
    let error = harness
        .entries()
        .get_entry(GetEntryRequest::default())
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    for id in ["unknown", "bad/id"] {
        let error = harness
            .entries()
            .get_entry(GetEntryRequest {
                id: id.to_owned(),
                output_mask: None,
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::NotFound, "{id}");
    }
    let masked = harness
        .entries()
        .get_entry(GetEntryRequest {
            id: entry.id.clone(),
            output_mask: Some(EntryMask {
                parent_id: true,
                ..EntryMask::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(masked.id, entry.id);
    assert_eq!(masked.parent_id, entry.parent_id);
    assert!(masked.spiffe_id.is_none());
    assert!(masked.selectors.is_empty());
}

#[tokio::test]
async fn list_pages_through_every_entry() {
    let harness = Harness::memory().await;
    let mut created = BTreeSet::new();
    for i in 0..5 {
        created.insert(harness.create_ok(workload(&format!("/w{i}"))).await.id);
    }

    let mut seen = Vec::new();
    let mut page_sizes = Vec::new();
    let mut token = String::new();
    loop {
        let response = harness
            .entries()
            .list_entries(ListEntriesRequest {
                filter: Some(list_entries_request::Filter {
                    by_downstream: Some(false),
                    ..Default::default()
                }),
                output_mask: Some(EntryMask {
                    spiffe_id: true,
                    ..EntryMask::default()
                }),
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        page_sizes.push(response.entries.len());
        for entry in &response.entries {
            assert!(entry.spiffe_id.is_some());
            assert!(entry.parent_id.is_none(), "the output mask applies");
            seen.push(entry.id.clone());
        }
        if response.next_page_token.is_empty() {
            break;
        }
        token = response.next_page_token;
    }
    assert_eq!(page_sizes, [2, 2, 1]);
    assert_eq!(seen.len(), 5);
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), created);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "ordered by entry ID");

    // No page size: everything at once.
    let all = harness
        .entries()
        .list_entries(ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 5);
    assert!(all.next_page_token.is_empty());
    assert_eq!(harness.count(Default::default()).await, 5);
}

#[tokio::test]
async fn list_and_count_filters() {
    let harness = Harness::memory().await;
    for td in ["fed1.org", "fed2.org"] {
        harness
            .state
            .store
            .create_bundle(TrustBundle::new(TrustDomain::new(td).unwrap()))
            .await
            .unwrap();
    }
    let other_agent = "/spire/agent/join_token/other";
    let entries = [
        // hint, spiffe path, parent path, selectors, federates_with, downstream
        (
            "a",
            "/a",
            AGENT,
            vec![("unix", "uid:1")],
            vec!["fed1.org"],
            false,
        ),
        (
            "b",
            "/b",
            AGENT,
            vec![("unix", "uid:1"), ("unix", "gid:2")],
            vec!["fed1.org", "fed2.org"],
            false,
        ),
        ("c", "/c", other_agent, vec![("k8s", "ns:x")], vec![], true),
        (
            "d",
            "/a",
            other_agent,
            vec![("unix", "gid:2")],
            vec!["fed2.org"],
            false,
        ),
    ];
    for (hint, path, parent, selectors, federates_with, downstream) in entries {
        harness
            .create_ok(types::Entry {
                spiffe_id: Some(sid(path)),
                parent_id: Some(sid(parent)),
                selectors: selectors.iter().map(|(k, v)| selector(k, v)).collect(),
                federates_with: federates_with.iter().map(|s| (*s).to_owned()).collect(),
                downstream,
                hint: hint.to_owned(),
                ..Default::default()
            })
            .await;
    }
    type F = list_entries_request::Filter;
    let by_selectors = |mode: selector_match::MatchBehavior, selectors: &[(&str, &str)]| F {
        by_selectors: Some(SelectorMatch {
            selectors: selectors.iter().map(|(k, v)| selector(k, v)).collect(),
            r#match: mode as i32,
        }),
        ..Default::default()
    };
    let by_federates = |mode: federates_with_match::MatchBehavior, tds: &[&str]| F {
        by_federates_with: Some(FederatesWithMatch {
            trust_domains: tds.iter().map(|s| (*s).to_owned()).collect(),
            r#match: mode as i32,
        }),
        ..Default::default()
    };
    use federates_with_match::MatchBehavior as Fed;
    use selector_match::MatchBehavior as Sel;

    let cases: Vec<(&str, F, &[&str])> = vec![
        ("none", F::default(), &["a", "b", "c", "d"]),
        (
            "spiffe_id",
            F {
                by_spiffe_id: Some(sid("/a")),
                ..Default::default()
            },
            &["a", "d"],
        ),
        (
            "parent_id",
            F {
                by_parent_id: Some(sid(other_agent)),
                ..Default::default()
            },
            &["c", "d"],
        ),
        (
            "spiffe_id and parent_id",
            F {
                by_spiffe_id: Some(sid("/a")),
                by_parent_id: Some(sid(AGENT)),
                ..Default::default()
            },
            &["a"],
        ),
        (
            "selectors exact",
            by_selectors(Sel::MatchExact, &[("unix", "uid:1")]),
            &["a"],
        ),
        (
            "selectors subset",
            by_selectors(Sel::MatchSubset, &[("unix", "uid:1"), ("unix", "gid:2")]),
            &["a", "b", "d"],
        ),
        (
            "selectors superset",
            by_selectors(Sel::MatchSuperset, &[("unix", "uid:1")]),
            &["a", "b"],
        ),
        (
            "selectors any",
            by_selectors(Sel::MatchAny, &[("unix", "gid:2"), ("k8s", "ns:x")]),
            &["b", "c", "d"],
        ),
        (
            "federates exact",
            by_federates(Fed::MatchExact, &["fed1.org"]),
            &["a"],
        ),
        (
            "federates subset",
            by_federates(Fed::MatchSubset, &["fed1.org", "spiffe://fed2.org"]),
            &["a", "b", "d"],
        ),
        (
            "federates superset",
            by_federates(Fed::MatchSuperset, &["spiffe://fed2.org"]),
            &["b", "d"],
        ),
        (
            "federates any",
            by_federates(Fed::MatchAny, &["fed1.org"]),
            &["a", "b"],
        ),
        (
            "hint",
            F {
                by_hint: Some("c".to_owned()),
                ..Default::default()
            },
            &["c"],
        ),
        (
            "downstream",
            F {
                by_downstream: Some(true),
                ..Default::default()
            },
            &["c"],
        ),
        (
            // SPIRE's CLI always sends by_downstream; false means "no filter".
            "downstream false",
            F {
                by_downstream: Some(false),
                ..Default::default()
            },
            &["a", "b", "c", "d"],
        ),
    ];
    for (name, filter, expected) in cases {
        let count_filter = count_entries_request::Filter {
            by_spiffe_id: filter.by_spiffe_id.clone(),
            by_parent_id: filter.by_parent_id.clone(),
            by_selectors: filter.by_selectors.clone(),
            by_federates_with: filter.by_federates_with.clone(),
            by_hint: filter.by_hint.clone(),
            by_downstream: filter.by_downstream,
        };
        assert_eq!(harness.list(filter).await, expected, "{name}");
        assert_eq!(
            harness.count(count_filter).await,
            i32::try_from(expected.len()).unwrap(),
            "count {name}"
        );
    }

    // Malformed filters are refused as a whole.
    let bad: Vec<F> = vec![
        by_selectors(Sel::MatchAny, &[]),
        by_selectors(Sel::MatchAny, &[("", "x")]),
        F {
            by_selectors: Some(SelectorMatch {
                selectors: vec![selector("unix", "uid:1")],
                r#match: 42,
            }),
            ..Default::default()
        },
        by_federates(Fed::MatchAny, &[]),
        by_federates(Fed::MatchAny, &["not a domain"]),
        F {
            by_parent_id: Some(types::Spiffeid {
                trust_domain: "other.org".to_owned(),
                path: AGENT.to_owned(),
            }),
            ..Default::default()
        },
        F {
            by_spiffe_id: Some(sid("relative")),
            ..Default::default()
        },
    ];
    for filter in bad {
        let error = harness
            .entries()
            .list_entries(ListEntriesRequest {
                filter: Some(filter.clone()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{filter:?}");
        assert!(
            error.message().starts_with("malformed"),
            "{}",
            error.message()
        );
    }
}

#[tokio::test]
async fn agent_rpcs_refuse_local_callers() {
    let harness = Harness::memory().await;
    let error = harness
        .entries()
        .get_authorized_entries(GetAuthorizedEntriesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::PermissionDenied);
    assert_eq!(
        error.message(),
        "authorization denied for method /spire.api.server.entry.v1.Entry/GetAuthorizedEntries"
    );
    let error = open_sync(
        &mut harness.entries(),
        SyncAuthorizedEntriesRequest {
            output_mask: Some(agent_mask()),
            ids: Vec::new(),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), Code::PermissionDenied);
}

// ---------------------------------------------------------------------------------------------
// Entry metadata

fn metadata(entry_id: &str, owner: &str, reason: &str, ticket: &str) -> EntryMetadata {
    EntryMetadata {
        entry_id: entry_id.to_owned(),
        owner: owner.to_owned(),
        reason: reason.to_owned(),
        ticket: ticket.to_owned(),
        source: String::new(),
    }
}

#[tokio::test]
async fn entry_metadata_set_get_list_and_clear() {
    let harness = Harness::memory().await;
    let a = harness.create_ok(workload("/a")).await;
    let b = harness.create_ok(workload("/b")).await;
    let c = harness.create_ok(workload("/c")).await;

    let results = harness
        .metadata()
        .set_entry_metadata(SetEntryMetadataRequest {
            metadata: vec![
                metadata(&a.id, "team-web", "serves the site", "CHG-1"),
                metadata("missing", "x", "", ""),
                metadata(&c.id, "team-db", "", ""),
                metadata(&b.id, "bad\nowner", "", ""),
                metadata("", "x", "", ""),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<Code> = results.iter().map(|r| code(&r.status)).collect();
    assert_eq!(
        codes,
        [
            Code::Ok,
            Code::NotFound,
            Code::Ok,
            Code::InvalidArgument,
            Code::InvalidArgument
        ]
    );
    assert_eq!(
        results[0].metadata,
        Some(metadata(&a.id, "team-web", "serves the site", "CHG-1"))
    );
    assert_eq!(message(&results[1].status), "entry not found");
    assert!(message(&results[3].status).contains("owner"));
    assert!(results[1].metadata.is_none());

    // The entry's revision moved with it, and the Entry API is unchanged.
    let stored = harness
        .entries()
        .get_entry(GetEntryRequest {
            id: a.id.clone(),
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.revision_number, 1);
    assert_eq!(stored.hint, a.hint);

    // Get leaves out unknown IDs and entries without metadata.
    let got = harness
        .metadata()
        .get_entry_metadata(GetEntryMetadataRequest {
            entry_ids: vec![
                c.id.clone(),
                "missing".to_owned(),
                b.id.clone(),
                a.id.clone(),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .metadata;
    assert_eq!(
        got,
        [
            metadata(&c.id, "team-db", "", ""),
            metadata(&a.id, "team-web", "serves the site", "CHG-1"),
        ]
    );

    // Setting the same values again writes nothing.
    let results = harness
        .metadata()
        .set_entry_metadata(SetEntryMetadataRequest {
            metadata: vec![metadata(&a.id, "team-web", "serves the site", "CHG-1")],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(code(&results[0].status), Code::Ok);
    let stored = harness
        .state
        .store
        .get_entry(&a.id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.revision_number, 1);
    assert_eq!(stored.owner.as_deref(), Some("team-web"));

    // List pages over entries that have metadata only.
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let response = harness
            .metadata()
            .list_entry_metadata(ListEntryMetadataRequest {
                page_size: 1,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(response.metadata.len() <= 1);
        listed.extend(response.metadata.into_iter().map(|m| m.entry_id));
        if response.next_page_token.is_empty() {
            break;
        }
        token = response.next_page_token;
    }
    let mut expected = vec![a.id.clone(), c.id.clone()];
    expected.sort();
    assert_eq!(listed, expected);

    // Empty strings clear: an entry with nothing left drops out of get and list.
    let results = harness
        .metadata()
        .set_entry_metadata(SetEntryMetadataRequest {
            metadata: vec![
                metadata(&c.id, "", "", ""),
                metadata(&a.id, "team-web", "", ""),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(results.iter().all(|r| code(&r.status) == Code::Ok));
    assert_eq!(results[0].metadata, Some(metadata(&c.id, "", "", "")));
    let all = harness
        .metadata()
        .list_entry_metadata(ListEntryMetadataRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.metadata, [metadata(&a.id, "team-web", "", "")]);
    assert!(all.next_page_token.is_empty());
    let stored = harness
        .state
        .store
        .get_entry(&c.id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (stored.owner, stored.reason, stored.ticket),
        (None, None, None)
    );
}

#[tokio::test]
async fn entry_metadata_survives_on_sqlite() {
    let harness = Harness::sql().await;
    let a = harness.create_ok(workload("/a")).await;
    let results = harness
        .metadata()
        .set_entry_metadata(SetEntryMetadataRequest {
            metadata: vec![metadata(&a.id, "team", "why", "T-1")],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(code(&results[0].status), Code::Ok);
    let got = harness
        .metadata()
        .get_entry_metadata(GetEntryMetadataRequest {
            entry_ids: vec![a.id.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .metadata;
    assert_eq!(got, [metadata(&a.id, "team", "why", "T-1")]);
}

// ---------------------------------------------------------------------------------------------
// Agent RPCs over mTLS

/// Serves `service` over TLS with the server's identity on an ephemeral port, as the TCP
/// endpoint does.
async fn serve_tls(state: &Arc<ServerState>, service: EntryService) -> std::net::SocketAddr {
    let svid = ServerSvid::new(&state.ca, HOUR, state.now()).unwrap();
    let config = lanyard_server::tls::server_config(Arc::new(svid), Arc::clone(&state.ca)).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(stream) = acceptor.accept(tcp).await {
                    let _ = tx.send(Ok::<_, std::io::Error>(stream)).await;
                }
            });
        }
    });
    tokio::spawn(
        Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(ReceiverStream::new(rx)),
    );
    addr
}

/// A channel to `addr` presenting the agent's SVID.
async fn agent_channel(
    server: &TestServer,
    addr: std::net::SocketAddr,
    agent: &AttestedAgentIdentity,
) -> Channel {
    let authorities = server.authorities();
    let verifier =
        SpiffeServerVerifier::new(td().server_id(), Arc::new(move || authorities.clone()));
    let config = client_config(Arc::new(verifier), Some((&agent.chain[..], &agent.key))).unwrap();
    tls_channel(addr, config).await
}

async fn open_sync(
    client: &mut EntryClient<Channel>,
    first: SyncAuthorizedEntriesRequest,
) -> Result<
    (
        mpsc::Sender<SyncAuthorizedEntriesRequest>,
        Streaming<SyncAuthorizedEntriesResponse>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.unwrap();
    let responses = client
        .sync_authorized_entries(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, responses))
}

fn initial_request() -> SyncAuthorizedEntriesRequest {
    SyncAuthorizedEntriesRequest {
        output_mask: Some(agent_mask()),
        ids: Vec::new(),
    }
}

/// An attested agent with five entries of its own, one expired entry, and one entry of
/// another agent. Returns the five IDs, sorted.
async fn agent_with_entries(
    server: &TestServer,
    admin: &EntryClient<Channel>,
) -> (AttestedAgentIdentity, Vec<String>) {
    let agent = server.attest_new_agent().await;
    let agent_id = lanyard_proto::convert::spiffe_id_to_proto(&agent.id);
    let mut entries: Vec<types::Entry> = (0..5)
        .map(|i| types::Entry {
            spiffe_id: Some(sid(&format!("/w{i}"))),
            parent_id: Some(agent_id.clone()),
            selectors: vec![selector("unix", &format!("uid:{i}"))],
            dns_names: vec!["never-sent.example.org".to_owned()],
            ..Default::default()
        })
        .collect();
    // Expired entries cannot be created through the API; one that expired since is written
    // to the store directly.
    let mut expired = lanyard_core::RegistrationEntry::new(
        lanyard_core::EntryId::new("expired").unwrap(),
        lanyard_core::SpiffeId::from_path(&td(), "/expired").unwrap(),
        agent.id.clone(),
        ["unix:uid:9".parse::<lanyard_core::Selector>().unwrap()]
            .into_iter()
            .collect(),
        std::time::SystemTime::now(),
    );
    expired.expires_at = Some(std::time::SystemTime::now() - std::time::Duration::from_secs(3600));
    let state = server.server().state();
    state.store.create_entry(expired).await.unwrap();
    state.catch_up().await.unwrap();
    entries.push(types::Entry {
        id: "elsewhere".to_owned(),
        spiffe_id: Some(sid("/elsewhere")),
        parent_id: Some(sid("/spire/agent/join_token/someone-else")),
        selectors: vec![selector("unix", "uid:9")],
        ..Default::default()
    });
    let results = admin
        .clone()
        .batch_create_entry(BatchCreateEntryRequest {
            entries,
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(results.iter().all(|r| code(&r.status) == Code::Ok));
    let mut ids: Vec<String> = results[..5]
        .iter()
        .map(|r| r.entry.as_ref().unwrap().id.clone())
        .collect();
    ids.sort();
    (agent, ids)
}

/// The test server's state behind its own admin socket with the Entry service.
async fn admin_client(server: &TestServer, dir: &TempDir) -> EntryClient<Channel> {
    let socket = dir.path().join("entry-admin.sock");
    let incoming = UnixListenerStream::new(UnixListener::bind(&socket).unwrap());
    tokio::spawn(
        Server::builder()
            .add_service(EntryService::new(Arc::clone(server.server().state())).into_server())
            .serve_with_incoming(incoming),
    );
    EntryClient::new(uds_channel(&socket).await)
}

#[tokio::test]
async fn sync_sends_up_to_a_page_in_one_message() {
    let server = TestServer::start().await;
    let dir = TempDir::new().unwrap();
    let admin = admin_client(&server, &dir).await;
    let (agent, ids) = agent_with_entries(&server, &admin).await;
    let state = server.server().state();
    let addr = serve_tls(state, EntryService::new(Arc::clone(state))).await;
    let mut client = EntryClient::new(agent_channel(&server, addr, &agent).await);

    let (_tx, mut responses) = open_sync(&mut client, initial_request()).await.unwrap();
    let first = responses.message().await.unwrap().unwrap();
    assert!(first.entry_revisions.is_empty());
    assert!(!first.more);
    let sent: Vec<&str> = first.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(sent, ids, "the agent's unexpired entries, nothing else");
    for entry in &first.entries {
        assert!(entry.spiffe_id.is_some());
        assert_eq!(entry.selectors.len(), 1);
        assert!(entry.created_at > 0);
        assert!(entry.parent_id.is_none(), "the agent's mask applies");
        assert!(entry.dns_names.is_empty(), "the agent's mask applies");
    }
    // Then the RPC ends with OK.
    assert!(responses.message().await.unwrap().is_none());

    // The legacy RPC returns the same set.
    let legacy = client
        .get_authorized_entries(GetAuthorizedEntriesRequest {
            output_mask: Some(agent_mask()),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(legacy, first.entries);

    // The initial request is checked.
    let with_ids = SyncAuthorizedEntriesRequest {
        ids: vec![ids[0].clone()],
        ..initial_request()
    };
    let error = open_sync(&mut client, with_ids).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    let no_revision = SyncAuthorizedEntriesRequest {
        output_mask: Some(EntryMask {
            revision_number: false,
            ..agent_mask()
        }),
        ids: Vec::new(),
    };
    let error = open_sync(&mut client, no_revision).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);

    // An agent is not an admin.
    let error = client
        .list_entries(ListEntriesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn sync_pages_revisions_then_answers_id_requests_until_cancelled() {
    let server = TestServer::start().await;
    let dir = TempDir::new().unwrap();
    let admin = admin_client(&server, &dir).await;
    let (agent, ids) = agent_with_entries(&server, &admin).await;
    let state = server.server().state();
    let addr = serve_tls(
        state,
        EntryService::new(Arc::clone(state)).with_sync_page_size(2),
    )
    .await;
    let mut client = EntryClient::new(agent_channel(&server, addr, &agent).await);

    let (tx, mut responses) = open_sync(&mut client, initial_request()).await.unwrap();
    let mut pages = Vec::new();
    loop {
        let page = responses.message().await.unwrap().unwrap();
        assert!(
            page.entries.is_empty(),
            "a revision page carries no entries"
        );
        let more = page.more;
        pages.push(page);
        if !more {
            break;
        }
    }
    let page_ids: Vec<Vec<&str>> = pages
        .iter()
        .map(|p| p.entry_revisions.iter().map(|r| r.id.as_str()).collect())
        .collect();
    assert_eq!(
        page_ids,
        [
            vec![ids[0].as_str(), ids[1].as_str()],
            vec![ids[2].as_str(), ids[3].as_str()],
            vec![ids[4].as_str()],
        ]
    );
    for revision in pages.iter().flat_map(|p| &p.entry_revisions) {
        assert_eq!(revision.revision_number, 0);
        assert!(revision.created_at > 0);
    }

    // Ask for three known IDs plus unknown, expired and foreign ones, as the agent would.
    tx.send(SyncAuthorizedEntriesRequest {
        output_mask: None,
        ids: vec![
            ids[0].clone(),
            "elsewhere".to_owned(),
            "expired".to_owned(),
            ids[3].clone(),
            "unknown".to_owned(),
            ids[4].clone(),
        ],
    })
    .await
    .unwrap();
    let first = responses.message().await.unwrap().unwrap();
    let second = responses.message().await.unwrap().unwrap();
    let sent = |m: &SyncAuthorizedEntriesResponse| -> Vec<String> {
        m.entries.iter().map(|e| e.id.clone()).collect()
    };
    assert_eq!(sent(&first), [ids[0].clone(), ids[3].clone()]);
    assert!(first.more);
    assert_eq!(sent(&second), [ids[4].clone()]);
    assert!(!second.more);
    for entry in first.entries.iter().chain(&second.entries) {
        assert!(entry.spiffe_id.is_some());
        assert!(entry.parent_id.is_none(), "the initial mask applies");
        assert!(entry.dns_names.is_empty(), "the initial mask applies");
    }

    // Nothing it may have: one empty final message.
    tx.send(SyncAuthorizedEntriesRequest {
        output_mask: None,
        ids: vec!["elsewhere".to_owned()],
    })
    .await
    .unwrap();
    let empty = responses.message().await.unwrap().unwrap();
    assert_eq!(empty, SyncAuthorizedEntriesResponse::default());

    // SPIRE's agent cancels rather than half-closing; the server copes and serves the next
    // sync on the same connection.
    drop(responses);
    drop(tx);
    let (tx, mut responses) = open_sync(&mut client, initial_request()).await.unwrap();
    let page = responses.message().await.unwrap().unwrap();
    assert_eq!(page.entry_revisions.len(), 2);

    // A half-close ends the exchange too.
    drop(tx);
    let mut n_messages = 1;
    while let Some(message) = responses.message().await.unwrap() {
        assert!(message.entries.is_empty());
        n_messages += 1;
    }
    assert_eq!(n_messages, 3);
}
