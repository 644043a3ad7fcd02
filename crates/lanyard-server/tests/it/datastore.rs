//! Datastore conformance suite: every test is written once over `Arc<dyn Datastore>` and run
//! against each implementation (`memory_store::*`, `sql_store::*`), plus SQLite-only tests of
//! persistence, migrations, file permissions and durability under SIGKILL.

// Helpers and the generic test bodies are not `#[test]` functions; a panic in them is a test
// failure all the same.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lanyard_core::bundle::{JwtAuthority, TrustBundle, X509Authority};
use lanyard_core::bundle_fetch::FetchedBundleChange;
use lanyard_core::federation::{
    BundleEndpointProfile, FederationRelationship, HTTPS_SPIFFE, RelationshipMask,
};
use lanyard_core::policy::Exception;
use lanyard_core::revocation::{Revocation, RevocationTarget, RevokedSerial};
use lanyard_core::x509::{CaSubject, create_self_signed_ca};
use lanyard_core::{
    EntryId, KeyPair, KeyType, RegistrationEntry, SelectorSet, SpiffeId, TrustDomain,
};
use lanyard_server::datastore::{
    AgentFilter, AttestedAgent, BundleDeleteMode, Change, ChangeKind, ChangeSubject, Datastore,
    DatastoreError, EntryFilter, FederatesWithFilter, Issuance, IssuanceFilter, IssuanceKind,
    MatchMode, PageRequest, PublishedCrl, SelectorFilter, SqlStore,
};
use tempfile::TempDir;

type Store = Arc<dyn Datastore>;

/// Generates one `#[tokio::test]` per (test, backend).
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(std::sync::Arc::new(
                        lanyard_server::datastore::MemoryStore::new(),
                    ))
                    .await;
                }
            )*
        }

        mod sql_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let dir = tempfile::TempDir::new().unwrap();
                    let store = super::open_sql(&dir).await;
                    super::$name(std::sync::Arc::new(store)).await;
                }
            )*
        }

        mod pg_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let url = crate::pg::fresh_database().await;
                    let store = lanyard_server::datastore::PgStore::connect(&url, 4)
                        .await
                        .unwrap();
                    super::$name(std::sync::Arc::new(store)).await;
                }
            )*
        }
    };
}

conformance!(
    entry_crud,
    entry_times_and_ttls_are_whole_seconds,
    similar_entry_is_refused_with_the_existing_one,
    entry_needs_selectors_and_existing_federated_bundles,
    update_bumps_revision_and_checks_expected_revision,
    entry_filters_by_id_hint_and_downstream,
    entry_selector_match_modes,
    entry_federates_with_match_modes,
    empty_set_filters_are_invalid,
    entry_paging,
    loading_every_entry_goes_page_by_page_in_id_order,
    prune_entries_by_expiry,
    change_log_records_every_change,
    agent_crud,
    ban_clears_serials,
    agent_filters,
    agent_paging,
    join_tokens_are_one_time,
    concurrent_join_token_takes_succeed_once,
    prune_join_tokens,
    bundle_round_trip_keeps_taint_expiry_sequence_and_hint,
    bundle_create_update_set_list_count,
    append_bundle_merges_atomically,
    fetched_bundles_never_go_back_to_an_older_sequence,
    delete_bundle_modes,
    ca_journal_and_meta,
    exceptions_round_trip,
    federation_relationship_crud,
    federation_relationship_bundles_are_the_trust_domains,
    federation_relationship_paging_and_change_log,
    ledger_records_lists_pages_and_prunes,
    usage_merges_issuances_and_reports,
    revocations_are_numbered_list_their_serials_and_record_acknowledgements,
    published_crls_move_only_forward_and_are_pruned,
);

// ----- fixtures -----

fn at(seconds: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
}

fn spiffe(path: &str) -> SpiffeId {
    format!("spiffe://example.org{path}").parse().unwrap()
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn selectors(items: &[&str]) -> SelectorSet {
    items.iter().map(|s| s.parse().unwrap()).collect()
}

fn entry(id: &str, spiffe_path: &str, parent_path: &str, sels: &[&str]) -> RegistrationEntry {
    RegistrationEntry::new(
        EntryId::new(id).unwrap(),
        spiffe(spiffe_path),
        spiffe(parent_path),
        selectors(sels),
        at(1_700_000_000),
    )
}

fn agent(path: &str, attestation_type: &str, serial: &str, not_after: u64) -> AttestedAgent {
    AttestedAgent::new(spiffe(path), attestation_type, serial, at(not_after))
}

async fn open_sql(dir: &TempDir) -> SqlStore {
    SqlStore::open(&dir.path().join("datastore.sqlite3"))
        .await
        .unwrap()
}

async fn entry_ids(store: &Store, filter: &EntryFilter) -> Vec<String> {
    let (entries, next) = store.list_entries(filter, None).await.unwrap();
    assert_eq!(next, None);
    let ids: Vec<String> = entries.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(
        store.count_entries(filter).await.unwrap(),
        ids.len() as u64,
        "count disagrees with list for {filter:?}"
    );
    ids
}

async fn agent_paths(store: &Store, filter: &AgentFilter) -> Vec<String> {
    let (agents, next) = store.list_agents(filter, None).await.unwrap();
    assert_eq!(next, None);
    let paths: Vec<String> = agents
        .iter()
        .map(|a| a.spiffe_id.path().to_owned())
        .collect();
    assert_eq!(
        store.count_agents(filter).await.unwrap(),
        paths.len() as u64,
        "count disagrees with list for {filter:?}"
    );
    paths
}

fn ca_der(trust_domain: &TrustDomain) -> Vec<u8> {
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    create_self_signed_ca(
        trust_domain,
        &key,
        &CaSubject::default(),
        SystemTime::now(),
        Duration::from_secs(3600),
    )
    .unwrap()
}

fn jwt_authority(key_id: &str, expires_at: Option<SystemTime>) -> JwtAuthority {
    let key = KeyPair::generate(KeyType::EcP256).unwrap();
    JwtAuthority::from_key_pair(key_id, &key, expires_at).unwrap()
}

/// Runs `pages` of `size` until the last, checking the union is `expected` with no repeats.
async fn collect_entry_pages(
    store: &Store,
    filter: &EntryFilter,
    size: u32,
) -> (usize, Vec<String>) {
    let mut token = None;
    let mut seen = Vec::new();
    let mut n_pages = 0;
    loop {
        let (page, next) = store
            .list_entries(filter, Some(PageRequest { token, size }))
            .await
            .unwrap();
        n_pages += 1;
        assert!(page.len() <= size as usize);
        seen.extend(page.iter().map(|e| e.id.to_string()));
        match next {
            Some(next) => token = Some(next),
            None => break,
        }
        assert!(n_pages < 100, "paging does not end");
    }
    (n_pages, seen)
}

// ----- entries -----

async fn entry_crud(store: Store) {
    store
        .create_bundle(TrustBundle::new(td("fed.org")))
        .await
        .unwrap();
    let mut full = entry(
        "e1",
        "/web",
        "/spire/agent/join_token/t1",
        &["unix:uid:1000", "unix:gid:1000"],
    );
    full.x509_svid_ttl = Some(Duration::from_secs(3600));
    full.jwt_svid_ttl = Some(Duration::from_secs(300));
    full.federates_with = [td("fed.org")].into_iter().collect();
    full.admin = true;
    full.downstream = true;
    full.expires_at = Some(at(1_800_000_000));
    full.dns_names = vec!["web.example.org".into(), "alt.example.org".into()];
    full.store_svid = false;
    full.hint = "web hint".into();
    full.owner = Some("team-web".into());
    full.reason = Some("serves the site".into());
    full.ticket = Some("CHG-1".into());
    full.revision_number = 7; // the store starts every entry at 0

    let created = store.create_entry(full.clone()).await.unwrap();
    let mut expected = full.clone();
    expected.revision_number = 0;
    assert_eq!(created, expected);
    assert_eq!(
        store.get_entry(&full.id).await.unwrap(),
        Some(expected.clone())
    );

    let plain = entry(
        "e2",
        "/db",
        "/spire/agent/join_token/t1",
        &["unix:uid:1001"],
    );
    assert_eq!(store.create_entry(plain.clone()).await.unwrap(), plain);
    assert_eq!(
        store.list_all_entries().await.unwrap(),
        vec![expected.clone(), plain.clone()]
    );

    assert_eq!(store.delete_entry(&full.id, None).await.unwrap(), expected);
    assert_eq!(store.get_entry(&full.id).await.unwrap(), None);
    assert!(matches!(
        store.delete_entry(&full.id, None).await,
        Err(DatastoreError::NotFound(_))
    ));
    assert!(matches!(
        store.update_entry(full.clone(), None).await,
        Err(DatastoreError::NotFound(_))
    ));
    assert_eq!(store.list_all_entries().await.unwrap(), vec![plain]);
}

/// How the server loads its index: pages in ID order that together hold every entry once.
async fn loading_every_entry_goes_page_by_page_in_id_order(store: Store) {
    let mut created = Vec::new();
    for i in [3, 0, 4, 1, 2] {
        let e = entry(
            &format!("load-{i}"),
            &format!("/load/{i}"),
            "/agent",
            &["unix:uid:1"],
        );
        created.push(store.create_entry(e).await.unwrap());
    }
    created.sort_by(|a, b| a.id.cmp(&b.id));
    let mut loaded = Vec::new();
    let mut pages = 0;
    let mut token = None;
    loop {
        let (page, next) = store
            .list_entries_page(PageRequest {
                token: token.take(),
                size: 2,
            })
            .await
            .unwrap();
        assert!(page.len() <= 2, "{} in one page", page.len());
        loaded.extend(page);
        pages += 1;
        match next {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    assert_eq!(loaded, created);
    assert_eq!(pages, 3);
    assert_eq!(store.list_all_entries().await.unwrap(), created);
}

async fn entry_times_and_ttls_are_whole_seconds(store: Store) {
    let mut e = entry("e1", "/web", "/agent", &["unix:uid:1"]);
    e.created_at = at(100) + Duration::from_millis(999);
    e.expires_at = Some(at(200) + Duration::from_millis(1));
    e.x509_svid_ttl = Some(Duration::from_millis(1500));
    let created = store.create_entry(e).await.unwrap();
    assert_eq!(created.created_at, at(100));
    assert_eq!(created.expires_at, Some(at(200)));
    assert_eq!(created.x509_svid_ttl, Some(Duration::from_secs(1)));
    assert_eq!(store.get_entry(&created.id).await.unwrap(), Some(created));
}

async fn similar_entry_is_refused_with_the_existing_one(store: Store) {
    let first = store
        .create_entry(entry("e1", "/web", "/agent", &["unix:uid:1", "unix:gid:1"]))
        .await
        .unwrap();
    let revision = store.current_revision().await.unwrap();

    // Same SPIFFE ID, parent and selector set (listed in another order), new ID.
    let err = store
        .create_entry(entry("e2", "/web", "/agent", &["unix:gid:1", "unix:uid:1"]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DatastoreError::AlreadyExists { .. }),
        "{err:?}"
    );
    assert_eq!(err.existing_entry(), Some(&first));

    // Same ID, different content.
    let err = store
        .create_entry(entry("e1", "/other", "/agent", &["unix:uid:2"]))
        .await
        .unwrap_err();
    assert_eq!(err.existing_entry(), Some(&first));
    assert_eq!(
        store.current_revision().await.unwrap(),
        revision,
        "failed writes log nothing"
    );

    // Any difference in the triple makes a distinct entry.
    store
        .create_entry(entry("e3", "/web", "/agent", &["unix:uid:1"]))
        .await
        .unwrap();
    store
        .create_entry(entry(
            "e4",
            "/web",
            "/agent2",
            &["unix:uid:1", "unix:gid:1"],
        ))
        .await
        .unwrap();

    // An update may not make an entry similar to another either.
    let err = store
        .update_entry(
            entry("e3", "/web", "/agent", &["unix:uid:1", "unix:gid:1"]),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.existing_entry(), Some(&first));
    assert_eq!(
        store.count_entries(&EntryFilter::default()).await.unwrap(),
        3
    );
}

async fn entry_needs_selectors_and_existing_federated_bundles(store: Store) {
    let no_selectors = entry("e1", "/web", "/agent", &[]);
    assert!(matches!(
        store.create_entry(no_selectors).await,
        Err(DatastoreError::Invalid(_))
    ));

    let mut federated = entry("e2", "/web", "/agent", &["unix:uid:1"]);
    federated.federates_with = [td("fed.org")].into_iter().collect();
    assert!(matches!(
        store.create_entry(federated.clone()).await,
        Err(DatastoreError::FailedPrecondition(_))
    ));
    store
        .create_bundle(TrustBundle::new(td("fed.org")))
        .await
        .unwrap();
    store.create_entry(federated.clone()).await.unwrap();

    federated.federates_with.insert(td("other.org"));
    assert!(matches!(
        store.update_entry(federated, None).await,
        Err(DatastoreError::FailedPrecondition(_))
    ));
}

async fn update_bumps_revision_and_checks_expected_revision(store: Store) {
    let created = store
        .create_entry(entry("e1", "/web", "/agent", &["unix:uid:1"]))
        .await
        .unwrap();
    assert_eq!(created.revision_number, 0);

    let mut changed = created.clone();
    changed.hint = "new hint".into();
    changed.selectors = selectors(&["unix:uid:2"]);
    changed.created_at = at(5); // ignored: creation time is kept
    changed.revision_number = 99; // ignored: the store counts
    let updated = store.update_entry(changed, None).await.unwrap();
    assert_eq!(updated.revision_number, 1);
    assert_eq!(updated.created_at, created.created_at);
    assert_eq!(updated.hint, "new hint");
    assert_eq!(updated.selectors, selectors(&["unix:uid:2"]));
    assert_eq!(
        store.get_entry(&created.id).await.unwrap(),
        Some(updated.clone())
    );

    let mut again = updated.clone();
    again.dns_names = vec!["a.example.org".into()];
    let updated2 = store.update_entry(again.clone(), Some(1)).await.unwrap();
    assert_eq!(updated2.revision_number, 2);

    let err = store.update_entry(again, Some(1)).await.unwrap_err();
    assert!(matches!(err, DatastoreError::Conflict(_)), "{err:?}");
    assert_eq!(
        store.get_entry(&created.id).await.unwrap(),
        Some(updated2.clone())
    );

    // A delete conditional on a revision the entry has left deletes nothing.
    let err = store.delete_entry(&created.id, Some(1)).await.unwrap_err();
    assert!(matches!(err, DatastoreError::Conflict(_)), "{err:?}");
    assert!(store.get_entry(&created.id).await.unwrap().is_some());

    // The selector filters see the new selectors, not the old.
    let by_old = EntryFilter {
        by_selectors: Some(SelectorFilter {
            selectors: selectors(&["unix:uid:1"]),
            mode: MatchMode::Any,
        }),
        ..Default::default()
    };
    assert!(entry_ids(&store, &by_old).await.is_empty());

    // At the revision it is at, the conditional delete goes through.
    assert_eq!(
        store.delete_entry(&created.id, Some(2)).await.unwrap(),
        updated2
    );
    assert!(matches!(
        store.delete_entry(&created.id, Some(2)).await,
        Err(DatastoreError::NotFound(_))
    ));
}

/// Entries for the filter tests:
///
/// | id | spiffe | parent  | selectors                     | federates_with | hint | downstream |
/// |----|--------|---------|-------------------------------|----------------|------|------------|
/// | a  | /a     | /agent1 | uid:1                         | -              | x    | no         |
/// | b  | /b     | /agent1 | uid:1 gid:1                   | fed1           | y    | yes        |
/// | c  | /c     | /agent2 | gid:1                         | fed1 fed2      |      | no         |
/// | d  | /a     | /agent2 | k8s:ns:prod                   | fed2           |      | no         |
/// | e  | /e     | /agent1 | uid:1 gid:1 k8s:ns:prod       | -              |      | no         |
async fn filter_fixture(store: &Store) {
    store
        .create_bundle(TrustBundle::new(td("fed1.org")))
        .await
        .unwrap();
    store
        .create_bundle(TrustBundle::new(td("fed2.org")))
        .await
        .unwrap();
    let mut a = entry("a", "/a", "/agent1", &["unix:uid:1"]);
    a.hint = "x".into();
    let mut b = entry("b", "/b", "/agent1", &["unix:uid:1", "unix:gid:1"]);
    b.federates_with = [td("fed1.org")].into_iter().collect();
    b.hint = "y".into();
    b.downstream = true;
    let mut c = entry("c", "/c", "/agent2", &["unix:gid:1"]);
    c.federates_with = [td("fed1.org"), td("fed2.org")].into_iter().collect();
    let mut d = entry("d", "/a", "/agent2", &["k8s:ns:prod"]);
    d.federates_with = [td("fed2.org")].into_iter().collect();
    let e = entry(
        "e",
        "/e",
        "/agent1",
        &["unix:uid:1", "unix:gid:1", "k8s:ns:prod"],
    );
    // Created out of order: listings are ordered by ID regardless.
    for entry in [e, c, a, d, b] {
        store.create_entry(entry).await.unwrap();
    }
}

async fn entry_filters_by_id_hint_and_downstream(store: Store) {
    filter_fixture(&store).await;
    assert_eq!(
        entry_ids(&store, &EntryFilter::default()).await,
        ["a", "b", "c", "d", "e"]
    );
    assert_eq!(
        entry_ids(
            &store,
            &EntryFilter {
                by_spiffe_id: Some(spiffe("/a")),
                ..Default::default()
            }
        )
        .await,
        ["a", "d"]
    );
    assert_eq!(
        entry_ids(
            &store,
            &EntryFilter {
                by_parent_id: Some(spiffe("/agent1")),
                ..Default::default()
            }
        )
        .await,
        ["a", "b", "e"]
    );
    assert_eq!(
        entry_ids(
            &store,
            &EntryFilter {
                by_hint: Some("y".into()),
                ..Default::default()
            }
        )
        .await,
        ["b"]
    );
    assert_eq!(
        entry_ids(
            &store,
            &EntryFilter {
                by_hint: Some(String::new()),
                ..Default::default()
            }
        )
        .await,
        ["c", "d", "e"]
    );
    assert_eq!(
        entry_ids(
            &store,
            &EntryFilter {
                by_downstream: Some(true),
                ..Default::default()
            }
        )
        .await,
        ["b"]
    );
    assert_eq!(
        entry_ids(
            &store,
            &EntryFilter {
                by_downstream: Some(false),
                ..Default::default()
            }
        )
        .await,
        ["a", "c", "d", "e"]
    );
    // Filters combine with AND.
    let combined = EntryFilter {
        by_parent_id: Some(spiffe("/agent1")),
        by_selectors: Some(SelectorFilter {
            selectors: selectors(&["k8s:ns:prod"]),
            mode: MatchMode::Any,
        }),
        ..Default::default()
    };
    assert_eq!(entry_ids(&store, &combined).await, ["e"]);
    let nothing = EntryFilter {
        by_spiffe_id: Some(spiffe("/a")),
        by_parent_id: Some(spiffe("/agent1")),
        by_downstream: Some(true),
        ..Default::default()
    };
    assert!(entry_ids(&store, &nothing).await.is_empty());
}

async fn entry_selector_match_modes(store: Store) {
    filter_fixture(&store).await;
    let by = |items: &[&str], mode| EntryFilter {
        by_selectors: Some(SelectorFilter {
            selectors: selectors(items),
            mode,
        }),
        ..Default::default()
    };
    let given = ["unix:uid:1", "unix:gid:1"];
    assert_eq!(
        entry_ids(&store, &by(&given, MatchMode::Exact)).await,
        ["b"]
    );
    assert_eq!(
        entry_ids(&store, &by(&given, MatchMode::Subset)).await,
        ["a", "b", "c"]
    );
    assert_eq!(
        entry_ids(&store, &by(&given, MatchMode::Superset)).await,
        ["b", "e"]
    );
    assert_eq!(
        entry_ids(&store, &by(&given, MatchMode::Any)).await,
        ["a", "b", "c", "e"]
    );
    let one = ["unix:uid:1"];
    assert_eq!(entry_ids(&store, &by(&one, MatchMode::Exact)).await, ["a"]);
    assert_eq!(entry_ids(&store, &by(&one, MatchMode::Subset)).await, ["a"]);
    assert_eq!(
        entry_ids(&store, &by(&one, MatchMode::Superset)).await,
        ["a", "b", "e"]
    );
    let absent = ["unix:uid:404"];
    for mode in [
        MatchMode::Exact,
        MatchMode::Subset,
        MatchMode::Superset,
        MatchMode::Any,
    ] {
        assert!(
            entry_ids(&store, &by(&absent, mode)).await.is_empty(),
            "{mode:?}"
        );
    }
    // A selector value equal to another's type:value split differently must not match.
    assert!(
        entry_ids(&store, &by(&["unix:uid"], MatchMode::Any))
            .await
            .is_empty()
    );
}

async fn entry_federates_with_match_modes(store: Store) {
    filter_fixture(&store).await;
    let by = |names: &[&str], mode| EntryFilter {
        by_federates_with: Some(FederatesWithFilter {
            trust_domains: names.iter().map(|n| td(n)).collect(),
            mode,
        }),
        ..Default::default()
    };
    let fed1 = ["fed1.org"];
    assert_eq!(entry_ids(&store, &by(&fed1, MatchMode::Exact)).await, ["b"]);
    // Entries federating with nothing are never a subset match.
    assert_eq!(
        entry_ids(&store, &by(&fed1, MatchMode::Subset)).await,
        ["b"]
    );
    assert_eq!(
        entry_ids(&store, &by(&fed1, MatchMode::Superset)).await,
        ["b", "c"]
    );
    assert_eq!(
        entry_ids(&store, &by(&fed1, MatchMode::Any)).await,
        ["b", "c"]
    );
    let both = ["fed1.org", "fed2.org"];
    assert_eq!(entry_ids(&store, &by(&both, MatchMode::Exact)).await, ["c"]);
    assert_eq!(
        entry_ids(&store, &by(&both, MatchMode::Subset)).await,
        ["b", "c", "d"]
    );
    assert_eq!(
        entry_ids(&store, &by(&both, MatchMode::Superset)).await,
        ["c"]
    );
    assert_eq!(
        entry_ids(&store, &by(&both, MatchMode::Any)).await,
        ["b", "c", "d"]
    );
}

async fn empty_set_filters_are_invalid(store: Store) {
    let empty_selectors = EntryFilter {
        by_selectors: Some(SelectorFilter {
            selectors: SelectorSet::new(),
            mode: MatchMode::Any,
        }),
        ..Default::default()
    };
    assert!(matches!(
        store.list_entries(&empty_selectors, None).await,
        Err(DatastoreError::Invalid(_))
    ));
    assert!(matches!(
        store.count_entries(&empty_selectors).await,
        Err(DatastoreError::Invalid(_))
    ));
    let empty_federation = EntryFilter {
        by_federates_with: Some(FederatesWithFilter {
            trust_domains: BTreeSet::new(),
            mode: MatchMode::Exact,
        }),
        ..Default::default()
    };
    assert!(matches!(
        store.list_entries(&empty_federation, None).await,
        Err(DatastoreError::Invalid(_))
    ));
    let empty_agent_selectors = AgentFilter {
        by_selectors: Some(SelectorFilter {
            selectors: SelectorSet::new(),
            mode: MatchMode::Exact,
        }),
        ..Default::default()
    };
    assert!(matches!(
        store.count_agents(&empty_agent_selectors).await,
        Err(DatastoreError::Invalid(_))
    ));
    assert!(matches!(
        store
            .list_entries(&EntryFilter::default(), Some(PageRequest::first(0)))
            .await,
        Err(DatastoreError::Invalid(_))
    ));
}

async fn entry_paging(store: Store) {
    for i in [4, 2, 0, 3, 1] {
        store
            .create_entry(entry(
                &format!("e{i}"),
                &format!("/w{i}"),
                "/agent",
                &["unix:uid:1"],
            ))
            .await
            .unwrap();
    }
    let all: Vec<String> = (0..5).map(|i| format!("e{i}")).collect();

    let (n_pages, seen) = collect_entry_pages(&store, &EntryFilter::default(), 2).await;
    assert_eq!(n_pages, 3);
    assert_eq!(seen, all, "pages in ID order, every entry once");

    let (n_pages, seen) = collect_entry_pages(&store, &EntryFilter::default(), 5).await;
    assert_eq!(
        (n_pages, seen.clone()),
        (1, all.clone()),
        "an exact fit has no next page"
    );
    let (n_pages, seen) = collect_entry_pages(&store, &EntryFilter::default(), 1).await;
    assert_eq!((n_pages, seen), (5, all.clone()));
    let (n_pages, seen) = collect_entry_pages(&store, &EntryFilter::default(), 100).await;
    assert_eq!((n_pages, seen), (1, all.clone()));

    // Paging composes with filters.
    store
        .create_entry(entry("e5", "/other", "/agent2", &["unix:uid:1"]))
        .await
        .unwrap();
    let filter = EntryFilter {
        by_parent_id: Some(spiffe("/agent")),
        ..Default::default()
    };
    let (n_pages, seen) = collect_entry_pages(&store, &filter, 2).await;
    assert_eq!((n_pages, seen), (3, all.clone()));

    // A token past the end gives an empty last page.
    let (page, next) = store
        .list_entries(
            &EntryFilter::default(),
            Some(PageRequest {
                token: Some("zzz".into()),
                size: 2,
            }),
        )
        .await
        .unwrap();
    assert!(page.is_empty());
    assert_eq!(next, None);
}

async fn prune_entries_by_expiry(store: Store) {
    let mut old = entry("old", "/old", "/agent", &["unix:uid:1"]);
    old.expires_at = Some(at(100));
    let mut edge = entry("edge", "/edge", "/agent", &["unix:uid:1"]);
    edge.expires_at = Some(at(150));
    let mut later = entry("later", "/later", "/agent", &["unix:uid:1"]);
    later.expires_at = Some(at(200));
    let forever = entry("forever", "/forever", "/agent", &["unix:uid:1"]);
    for e in [old, edge, later, forever] {
        store.create_entry(e).await.unwrap();
    }
    let before = store.current_revision().await.unwrap();
    let pruned = store.prune_entries(at(150)).await.unwrap();
    assert_eq!(pruned, vec![EntryId::new("old").unwrap()]);
    assert_eq!(
        entry_ids(&store, &EntryFilter::default()).await,
        ["edge", "forever", "later"]
    );
    let changes = store.changes_since(before).await.unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].kind, ChangeKind::Deleted);
    assert_eq!(
        changes[0].subject,
        ChangeSubject::Entry(EntryId::new("old").unwrap())
    );
}

async fn change_log_records_every_change(store: Store) {
    assert_eq!(store.current_revision().await.unwrap(), 0);
    assert!(store.changes_since(0).await.unwrap().is_empty());

    let e1 = store
        .create_entry(entry("e1", "/web", "/agent", &["unix:uid:1"]))
        .await
        .unwrap();
    let mut changed = e1.clone();
    changed.hint = "h".into();
    store.update_entry(changed, None).await.unwrap();
    let a1 = store
        .create_agent(agent("/spire/agent/x/1", "x", "1", 1000))
        .await
        .unwrap();
    store.ban_agent(&a1.spiffe_id).await.unwrap();
    store.delete_entry(&e1.id, None).await.unwrap();
    store
        .set_bundle(TrustBundle::new(td("fed.org")))
        .await
        .unwrap();
    store.delete_agent(&a1.spiffe_id).await.unwrap();

    // Failed writes and token/journal writes are not in the log.
    assert!(store.delete_entry(&e1.id, None).await.is_err());
    store.create_join_token("tok", at(1000)).await.unwrap();
    store.take_join_token("tok").await.unwrap();
    store.set_ca_journal("server", b"journal").await.unwrap();

    let entry_id = ChangeSubject::Entry(e1.id.clone());
    let agent_id = ChangeSubject::Agent(a1.spiffe_id.clone());
    let expected = vec![
        Change {
            revision: 1,
            kind: ChangeKind::Created,
            subject: entry_id.clone(),
        },
        Change {
            revision: 2,
            kind: ChangeKind::Updated,
            subject: entry_id.clone(),
        },
        Change {
            revision: 3,
            kind: ChangeKind::Created,
            subject: agent_id.clone(),
        },
        Change {
            revision: 4,
            kind: ChangeKind::Updated,
            subject: agent_id.clone(),
        },
        Change {
            revision: 5,
            kind: ChangeKind::Deleted,
            subject: entry_id,
        },
        Change {
            revision: 6,
            kind: ChangeKind::Created,
            subject: ChangeSubject::Bundle(td("fed.org")),
        },
        Change {
            revision: 7,
            kind: ChangeKind::Deleted,
            subject: agent_id,
        },
    ];
    assert_eq!(store.current_revision().await.unwrap(), 7);
    assert_eq!(store.changes_since(0).await.unwrap(), expected);
    assert_eq!(
        store.changes_since(5).await.unwrap(),
        expected[5..].to_vec()
    );
    assert!(store.changes_since(7).await.unwrap().is_empty());

    // Pruning forgets old changes but never rewinds the counter.
    assert_eq!(store.prune_changes(4).await.unwrap(), 3);
    assert_eq!(
        store.changes_since(0).await.unwrap(),
        expected[3..].to_vec()
    );
    assert_eq!(store.current_revision().await.unwrap(), 7);
    store
        .create_entry(entry("e2", "/web2", "/agent", &["unix:uid:1"]))
        .await
        .unwrap();
    assert_eq!(store.current_revision().await.unwrap(), 8);
}

// ----- agents -----

async fn agent_crud(store: Store) {
    let before = SystemTime::now() - Duration::from_secs(1);
    let mut new = agent(
        "/spire/agent/join_token/t1",
        "join_token",
        "1234",
        2_000_000_000,
    );
    new.new_serial = "5678".into();
    new.new_not_after = Some(at(2_000_000_500) + Duration::from_millis(300));
    new.can_reattest = true;
    new.selectors = selectors(&["join_token:t1", "unix:uid:0"]);
    new.agent_version = "1.2.3".into();
    new.created_at = at(1); // ignored: the store stamps it

    let created = store.create_agent(new.clone()).await.unwrap();
    assert!(created.created_at >= before && created.created_at <= SystemTime::now());
    assert_eq!(created.updated_at, created.created_at);
    assert_eq!(created.new_not_after, Some(at(2_000_000_500)));
    let expected = AttestedAgent {
        created_at: created.created_at,
        updated_at: created.updated_at,
        new_not_after: Some(at(2_000_000_500)),
        ..new.clone()
    };
    assert_eq!(created, expected);
    assert_eq!(
        store.get_agent(&new.spiffe_id).await.unwrap(),
        Some(expected.clone())
    );
    assert!(matches!(
        store.create_agent(new.clone()).await,
        Err(DatastoreError::AlreadyExists { .. })
    ));

    let mut changed = expected.clone();
    changed.serial = "5678".into();
    changed.not_after = at(2_000_000_500);
    changed.new_serial = String::new();
    changed.new_not_after = None;
    changed.can_reattest = false;
    changed.agent_version = "1.2.4".into();
    changed.selectors = selectors(&["unix:uid:0"]);
    changed.created_at = at(2);
    let updated = store.update_agent(changed.clone()).await.unwrap();
    assert_eq!(
        updated.created_at, created.created_at,
        "creation time is kept"
    );
    assert!(updated.updated_at >= created.updated_at);
    assert_eq!(
        updated,
        AttestedAgent {
            created_at: created.created_at,
            updated_at: updated.updated_at,
            ..changed
        }
    );
    assert_eq!(
        store.get_agent(&new.spiffe_id).await.unwrap(),
        Some(updated.clone())
    );

    let reselected = store
        .set_agent_selectors(&new.spiffe_id, selectors(&["k8s:cluster:c1"]))
        .await
        .unwrap();
    assert_eq!(reselected.selectors, selectors(&["k8s:cluster:c1"]));
    assert_eq!(reselected.serial, "5678");
    assert_eq!(
        store.get_agent(&new.spiffe_id).await.unwrap(),
        Some(reselected.clone())
    );

    assert_eq!(
        store.delete_agent(&new.spiffe_id).await.unwrap(),
        reselected
    );
    assert_eq!(store.get_agent(&new.spiffe_id).await.unwrap(), None);
    let missing = spiffe("/spire/agent/none");
    assert!(matches!(
        store.delete_agent(&missing).await,
        Err(DatastoreError::NotFound(_))
    ));
    assert!(matches!(
        store.ban_agent(&missing).await,
        Err(DatastoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .update_agent(agent("/spire/agent/none", "x", "1", 1))
            .await,
        Err(DatastoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .set_agent_selectors(&missing, SelectorSet::new())
            .await,
        Err(DatastoreError::NotFound(_))
    ));
    // Eviction lifts a ban: the agent can attest (be created) again.
    store.create_agent(new).await.unwrap();
}

async fn ban_clears_serials(store: Store) {
    let mut a = agent("/spire/agent/x/1", "x", "111", 1000);
    a.new_serial = "222".into();
    a.new_not_after = Some(at(2000));
    let created = store.create_agent(a).await.unwrap();
    assert!(!created.is_banned());
    let banned = store.ban_agent(&created.spiffe_id).await.unwrap();
    assert!(banned.is_banned());
    assert_eq!(banned.serial, "");
    assert_eq!(banned.new_serial, "");
    assert_eq!(banned.not_after, created.not_after);
    assert_eq!(
        store.get_agent(&created.spiffe_id).await.unwrap(),
        Some(banned.clone())
    );
    // A write from a read made before the ban (a renewal, a serial promotion, a
    // re-attestation racing the ban) cannot bring the agent back: only an eviction can.
    let mut stale = created.clone();
    stale.serial = "333".into();
    assert!(matches!(
        store.update_agent(stale).await,
        Err(DatastoreError::FailedPrecondition(_))
    ));
    assert_eq!(
        store.get_agent(&created.spiffe_id).await.unwrap(),
        Some(banned)
    );
}

async fn agent_filters(store: Store) {
    let mut a = agent("/spire/agent/a", "join_token", "1", 100);
    a.selectors = selectors(&["unix:uid:0"]);
    let mut b = agent("/spire/agent/b", "x509pop", "2", 200);
    b.selectors = selectors(&["unix:uid:0", "x509pop:subject:cn:b"]);
    b.can_reattest = true;
    let mut c = agent("/spire/agent/c", "x509pop", "3", 300);
    c.selectors = selectors(&["x509pop:subject:cn:c"]);
    c.can_reattest = true;
    let d = agent("/spire/agent/d", "join_token", "4", 400);
    for x in [d, c, b, a] {
        store.create_agent(x).await.unwrap();
    }
    store.ban_agent(&spiffe("/spire/agent/c")).await.unwrap();

    let all = [
        "/spire/agent/a",
        "/spire/agent/b",
        "/spire/agent/c",
        "/spire/agent/d",
    ];
    assert_eq!(agent_paths(&store, &AgentFilter::default()).await, all);
    assert_eq!(
        agent_paths(
            &store,
            &AgentFilter {
                by_attestation_type: Some("x509pop".into()),
                ..Default::default()
            }
        )
        .await,
        ["/spire/agent/b", "/spire/agent/c"]
    );
    assert_eq!(
        agent_paths(
            &store,
            &AgentFilter {
                by_banned: Some(true),
                ..Default::default()
            }
        )
        .await,
        ["/spire/agent/c"]
    );
    assert_eq!(
        agent_paths(
            &store,
            &AgentFilter {
                by_banned: Some(false),
                ..Default::default()
            }
        )
        .await,
        ["/spire/agent/a", "/spire/agent/b", "/spire/agent/d"]
    );
    assert_eq!(
        agent_paths(
            &store,
            &AgentFilter {
                by_can_reattest: Some(true),
                ..Default::default()
            }
        )
        .await,
        ["/spire/agent/b", "/spire/agent/c"]
    );
    assert_eq!(
        agent_paths(
            &store,
            &AgentFilter {
                by_can_reattest: Some(false),
                ..Default::default()
            }
        )
        .await,
        ["/spire/agent/a", "/spire/agent/d"]
    );
    assert_eq!(
        agent_paths(
            &store,
            &AgentFilter {
                by_expires_before: Some(at(300)),
                ..Default::default()
            }
        )
        .await,
        ["/spire/agent/a", "/spire/agent/b"],
        "strictly before"
    );

    let by_selectors = |items: &[&str], mode| AgentFilter {
        by_selectors: Some(SelectorFilter {
            selectors: selectors(items),
            mode,
        }),
        ..Default::default()
    };
    let given = ["unix:uid:0", "x509pop:subject:cn:b"];
    assert_eq!(
        agent_paths(&store, &by_selectors(&given, MatchMode::Exact)).await,
        ["/spire/agent/b"]
    );
    // d has no selectors: never a subset match.
    assert_eq!(
        agent_paths(&store, &by_selectors(&given, MatchMode::Subset)).await,
        ["/spire/agent/a", "/spire/agent/b"]
    );
    assert_eq!(
        agent_paths(&store, &by_selectors(&["unix:uid:0"], MatchMode::Superset)).await,
        ["/spire/agent/a", "/spire/agent/b"]
    );
    assert_eq!(
        agent_paths(
            &store,
            &by_selectors(&["unix:uid:0", "x509pop:subject:cn:c"], MatchMode::Any)
        )
        .await,
        ["/spire/agent/a", "/spire/agent/b", "/spire/agent/c"]
    );

    let combined = AgentFilter {
        by_attestation_type: Some("x509pop".into()),
        by_banned: Some(false),
        by_selectors: Some(SelectorFilter {
            selectors: selectors(&["unix:uid:0"]),
            mode: MatchMode::Any,
        }),
        ..Default::default()
    };
    assert_eq!(agent_paths(&store, &combined).await, ["/spire/agent/b"]);

    // Selector changes are visible to the filters.
    store
        .set_agent_selectors(&spiffe("/spire/agent/d"), selectors(&["unix:uid:0"]))
        .await
        .unwrap();
    assert_eq!(
        agent_paths(&store, &by_selectors(&["unix:uid:0"], MatchMode::Exact)).await,
        ["/spire/agent/a", "/spire/agent/d"]
    );
}

async fn agent_paging(store: Store) {
    for i in [3, 0, 4, 1, 2] {
        store
            .create_agent(agent(&format!("/spire/agent/x/{i}"), "x", "1", 1000))
            .await
            .unwrap();
    }
    let mut token = None;
    let mut seen = Vec::new();
    let mut n_pages = 0;
    loop {
        let (page, next) = store
            .list_agents(
                &AgentFilter::default(),
                Some(PageRequest { token, size: 2 }),
            )
            .await
            .unwrap();
        n_pages += 1;
        assert!(page.len() <= 2);
        seen.extend(page.into_iter().map(|a| a.spiffe_id.path().to_owned()));
        match next {
            Some(next) => token = Some(next),
            None => break,
        }
        assert!(n_pages < 10);
    }
    assert_eq!(n_pages, 3);
    let expected: Vec<String> = (0..5).map(|i| format!("/spire/agent/x/{i}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(
        store.count_agents(&AgentFilter::default()).await.unwrap(),
        5
    );
}

// ----- join tokens -----

async fn join_tokens_are_one_time(store: Store) {
    let created = store.create_join_token("token-1", at(1000)).await.unwrap();
    assert_eq!(created.token, "token-1");
    assert_eq!(created.expires_at, at(1000));
    assert!(
        !format!("{created:?}").contains("token-1"),
        "Debug redacts the token"
    );
    assert!(matches!(
        store.create_join_token("token-1", at(2000)).await,
        Err(DatastoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        store.create_join_token("", at(2000)).await,
        Err(DatastoreError::Invalid(_))
    ));

    let taken = store.take_join_token("token-1").await.unwrap();
    assert_eq!(taken, created);
    assert!(matches!(
        store.take_join_token("token-1").await,
        Err(DatastoreError::NotFound(_))
    ));
    assert!(matches!(
        store.take_join_token("never-made").await,
        Err(DatastoreError::NotFound(_))
    ));
    // Once used, the value can be issued again (SPIRE does not remember used tokens).
    store.create_join_token("token-1", at(3000)).await.unwrap();
}

async fn concurrent_join_token_takes_succeed_once(store: Store) {
    for round in 0..5 {
        let token = format!("race-{round}");
        store.create_join_token(&token, at(1000)).await.unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(10));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let store = store.clone();
            let token = token.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                store.take_join_token(&token).await
            }));
        }
        let mut n_ok = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(record) => {
                    assert_eq!(record.token, token);
                    n_ok += 1;
                }
                Err(DatastoreError::NotFound(_)) => {}
                Err(other) => panic!("unexpected error: {other:?}"),
            }
        }
        assert_eq!(n_ok, 1, "round {round}: exactly one take succeeds");
    }
}

async fn prune_join_tokens(store: Store) {
    store.create_join_token("old", at(100)).await.unwrap();
    store.create_join_token("edge", at(150)).await.unwrap();
    store.create_join_token("new", at(200)).await.unwrap();
    assert_eq!(store.prune_join_tokens(at(150)).await.unwrap(), 1);
    assert!(matches!(
        store.take_join_token("old").await,
        Err(DatastoreError::NotFound(_))
    ));
    store.take_join_token("edge").await.unwrap();
    store.take_join_token("new").await.unwrap();
}

// ----- bundles -----

fn full_bundle(name: &str) -> TrustBundle {
    let trust_domain = td(name);
    let mut bundle = TrustBundle::new(trust_domain.clone());
    bundle.add_x509_authority(X509Authority::new(ca_der(&trust_domain)).unwrap());
    bundle.add_x509_authority(
        X509Authority::new(ca_der(&trust_domain))
            .unwrap()
            .with_tainted(true),
    );
    bundle
        .add_jwt_authority(jwt_authority("kid-a", Some(at(1_900_000_000))))
        .unwrap();
    bundle
        .add_jwt_authority(jwt_authority("kid-b", None).with_tainted(true))
        .unwrap();
    bundle.set_refresh_hint(Some(Duration::from_secs(300)));
    bundle.set_sequence_number(42);
    bundle
}

async fn bundle_round_trip_keeps_taint_expiry_sequence_and_hint(store: Store) {
    let bundle = full_bundle("example.org");
    let created = store.create_bundle(bundle.clone()).await.unwrap();
    assert_eq!(created, bundle);
    let stored = store.get_bundle(&td("example.org")).await.unwrap().unwrap();
    assert_eq!(stored, bundle);
    assert_eq!(stored.sequence_number(), 42);
    assert_eq!(stored.refresh_hint(), Some(Duration::from_secs(300)));
    let taints: Vec<bool> = stored
        .x509_authorities()
        .iter()
        .map(|a| a.is_tainted())
        .collect();
    assert_eq!(taints, [false, true]);
    let jwt: Vec<(&str, Option<SystemTime>, bool)> = stored
        .jwt_authorities()
        .iter()
        .map(|a| (a.key_id(), a.expires_at(), a.is_tainted()))
        .collect();
    assert_eq!(
        jwt,
        [
            ("kid-a", Some(at(1_900_000_000)), false),
            ("kid-b", None, true)
        ]
    );

    // Key expiries are kept to the second.
    let mut precise = TrustBundle::new(td("precise.org"));
    precise
        .add_jwt_authority(jwt_authority(
            "k",
            Some(at(500) + Duration::from_millis(700)),
        ))
        .unwrap();
    let stored = store.set_bundle(precise).await.unwrap();
    assert_eq!(stored.jwt_authorities()[0].expires_at(), Some(at(500)));
    assert_eq!(
        store.get_bundle(&td("precise.org")).await.unwrap(),
        Some(stored)
    );

    // A large u64 sequence number survives too.
    let mut big = TrustBundle::new(td("big.org"));
    big.set_sequence_number(u64::MAX - 1);
    store.set_bundle(big.clone()).await.unwrap();
    assert_eq!(store.get_bundle(&td("big.org")).await.unwrap(), Some(big));

    assert_eq!(store.get_bundle(&td("absent.org")).await.unwrap(), None);
}

async fn bundle_create_update_set_list_count(store: Store) {
    assert_eq!(store.count_bundles().await.unwrap(), 0);
    let first = full_bundle("b.org");
    store.create_bundle(first.clone()).await.unwrap();
    assert!(matches!(
        store.create_bundle(first.clone()).await,
        Err(DatastoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        store.update_bundle(TrustBundle::new(td("none.org"))).await,
        Err(DatastoreError::NotFound(_))
    ));

    // Update replaces the whole content, authorities included.
    let mut replaced = TrustBundle::new(td("b.org"));
    replaced
        .add_jwt_authority(jwt_authority("only", None))
        .unwrap();
    replaced.set_sequence_number(43);
    assert_eq!(
        store.update_bundle(replaced.clone()).await.unwrap(),
        replaced
    );
    assert_eq!(
        store.get_bundle(&td("b.org")).await.unwrap(),
        Some(replaced.clone())
    );

    // Set is an upsert.
    let other = full_bundle("a.org");
    store.set_bundle(other.clone()).await.unwrap();
    let mut other2 = other.clone();
    other2.taint_jwt_authority("kid-a");
    store.set_bundle(other2.clone()).await.unwrap();
    assert_eq!(
        store.get_bundle(&td("a.org")).await.unwrap(),
        Some(other2.clone())
    );
    store
        .set_bundle(TrustBundle::new(td("c.org")))
        .await
        .unwrap();

    assert_eq!(store.count_bundles().await.unwrap(), 3);
    let (all, next) = store.list_bundles(None).await.unwrap();
    assert_eq!(next, None);
    assert_eq!(all, vec![other2, replaced, TrustBundle::new(td("c.org"))]);

    let (page1, next) = store
        .list_bundles(Some(PageRequest::first(2)))
        .await
        .unwrap();
    assert_eq!(page1.len(), 2);
    let (page2, next) = store
        .list_bundles(Some(PageRequest {
            token: next,
            size: 2,
        }))
        .await
        .unwrap();
    assert_eq!(next, None);
    let names: Vec<&str> = page1
        .iter()
        .chain(&page2)
        .map(|b| b.trust_domain().name())
        .collect();
    assert_eq!(names, ["a.org", "b.org", "c.org"]);
}

async fn append_bundle_merges_atomically(store: Store) {
    let trust_domain = td("example.org");
    // Appending to nothing creates the bundle.
    let mut server_a = TrustBundle::new(trust_domain.clone());
    server_a.add_x509_authority(X509Authority::new(ca_der(&trust_domain)).unwrap());
    server_a
        .add_jwt_authority(jwt_authority("a", Some(at(1_900_000_000))))
        .unwrap();
    let created = store.append_bundle(server_a.clone()).await.unwrap();
    assert_eq!(created, server_a);

    // Another server appends its own authorities; both sets are kept, in order.
    let mut server_b = TrustBundle::new(trust_domain.clone());
    server_b.add_x509_authority(X509Authority::new(ca_der(&trust_domain)).unwrap());
    server_b
        .add_jwt_authority(jwt_authority("b", None))
        .unwrap();
    let merged = store.append_bundle(server_b.clone()).await.unwrap();
    assert_eq!(merged.x509_authorities().len(), 2);
    assert_eq!(merged.x509_authorities()[0], server_a.x509_authorities()[0]);
    assert_eq!(merged.x509_authorities()[1], server_b.x509_authorities()[0]);
    let kids: Vec<&str> = merged
        .jwt_authorities()
        .iter()
        .map(|a| a.key_id())
        .collect();
    assert_eq!(kids, ["a", "b"]);
    assert!(merged.sequence_number() > created.sequence_number());
    assert_eq!(
        store.get_bundle(&trust_domain).await.unwrap(),
        Some(merged.clone())
    );

    // Appending what is already there changes nothing, not even the sequence number.
    let revision = store.current_revision().await.unwrap();
    let same = store.append_bundle(server_b).await.unwrap();
    assert_eq!(same, merged);
    assert_eq!(store.current_revision().await.unwrap(), revision);

    // A key ID naming a different key is refused.
    let mut clash = TrustBundle::new(trust_domain.clone());
    clash.add_jwt_authority(jwt_authority("a", None)).unwrap();
    assert!(matches!(
        store.append_bundle(clash).await,
        Err(DatastoreError::Invalid(_))
    ));
    assert_eq!(store.get_bundle(&trust_domain).await.unwrap(), Some(merged));
}

async fn fetched_bundles_never_go_back_to_an_older_sequence(store: Store) {
    let trust_domain = td("partner.org");
    let fetched = |sequence: u64, n_cas: usize| {
        let mut bundle = TrustBundle::new(trust_domain.clone());
        for _ in 0..n_cas {
            bundle.add_x509_authority(X509Authority::new(ca_der(&trust_domain)).unwrap());
        }
        bundle.set_sequence_number(sequence);
        bundle
    };
    let first = fetched(3, 1);
    assert_eq!(
        store.store_fetched_bundle(first.clone()).await.unwrap(),
        FetchedBundleChange::Newer
    );
    assert_eq!(
        store.get_bundle(&trust_domain).await.unwrap(),
        Some(first.clone())
    );
    // The same bundle again writes nothing: no change in the log.
    let revision = store.current_revision().await.unwrap();
    assert_eq!(
        store.store_fetched_bundle(first.clone()).await.unwrap(),
        FetchedBundleChange::Unchanged
    );
    assert_eq!(store.current_revision().await.unwrap(), revision);
    // An older sequence number is refused, whatever it holds.
    assert_eq!(
        store.store_fetched_bundle(fetched(2, 2)).await.unwrap(),
        FetchedBundleChange::Older { stored: 3 }
    );
    assert_eq!(store.get_bundle(&trust_domain).await.unwrap(), Some(first));
    assert_eq!(store.current_revision().await.unwrap(), revision);
    let second = fetched(4, 2);
    assert_eq!(
        store.store_fetched_bundle(second.clone()).await.unwrap(),
        FetchedBundleChange::Newer
    );
    assert_eq!(store.get_bundle(&trust_domain).await.unwrap(), Some(second));
    let changes = store.changes_since(revision).await.unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].kind, ChangeKind::Updated);

    // Writers racing with bundles of every sequence number, in any order: the highest stays.
    let racers: Vec<TrustBundle> = (5..13).map(|sequence| fetched(sequence, 1)).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for bundle in racers.iter().rev().cloned() {
        let store = Arc::clone(&store);
        tasks.spawn(async move { store.store_fetched_bundle(bundle).await.unwrap() });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    assert_eq!(
        store.get_bundle(&trust_domain).await.unwrap(),
        racers.last().cloned()
    );
}

async fn delete_bundle_modes(store: Store) {
    for name in ["fed1.org", "fed2.org", "fed3.org"] {
        store
            .create_bundle(TrustBundle::new(td(name)))
            .await
            .unwrap();
    }
    let mut e1 = entry("e1", "/one", "/agent", &["unix:uid:1"]);
    e1.federates_with = [td("fed1.org"), td("fed2.org")].into_iter().collect();
    let mut e2 = entry("e2", "/two", "/agent", &["unix:uid:1"]);
    e2.federates_with = [td("fed2.org")].into_iter().collect();
    let e3 = entry("e3", "/three", "/agent", &["unix:uid:1"]);
    for e in [e1, e2, e3] {
        store.create_entry(e).await.unwrap();
    }

    // Restrict: refused while entries federate with it.
    assert!(matches!(
        store
            .delete_bundle(&td("fed2.org"), BundleDeleteMode::Restrict)
            .await,
        Err(DatastoreError::FailedPrecondition(_))
    ));
    assert!(store.get_bundle(&td("fed2.org")).await.unwrap().is_some());
    // ... and fine when none does.
    store
        .delete_bundle(&td("fed3.org"), BundleDeleteMode::Restrict)
        .await
        .unwrap();
    assert!(matches!(
        store
            .delete_bundle(&td("fed3.org"), BundleDeleteMode::Restrict)
            .await,
        Err(DatastoreError::NotFound(_))
    ));

    // Dissociate: the entries lose the reference, as an update.
    let revision = store.current_revision().await.unwrap();
    let deleted = store
        .delete_bundle(&td("fed1.org"), BundleDeleteMode::Dissociate)
        .await
        .unwrap();
    assert_eq!(deleted, TrustBundle::new(td("fed1.org")));
    let e1 = store
        .get_entry(&EntryId::new("e1").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e1.federates_with, [td("fed2.org")].into_iter().collect());
    assert_eq!(e1.revision_number, 1);
    let changes = store.changes_since(revision).await.unwrap();
    let kinds: Vec<(ChangeKind, ChangeSubject)> =
        changes.into_iter().map(|c| (c.kind, c.subject)).collect();
    assert_eq!(
        kinds,
        [
            (ChangeKind::Updated, ChangeSubject::Entry(e1.id.clone())),
            (ChangeKind::Deleted, ChangeSubject::Bundle(td("fed1.org"))),
        ]
    );
    let fed1 = EntryFilter {
        by_federates_with: Some(FederatesWithFilter {
            trust_domains: [td("fed1.org")].into_iter().collect(),
            mode: MatchMode::Any,
        }),
        ..Default::default()
    };
    assert!(entry_ids(&store, &fed1).await.is_empty());

    // Delete: the entries go with it.
    store
        .delete_bundle(&td("fed2.org"), BundleDeleteMode::Delete)
        .await
        .unwrap();
    assert_eq!(entry_ids(&store, &EntryFilter::default()).await, ["e3"]);
    assert_eq!(store.count_bundles().await.unwrap(), 0);
}

// ----- CA journal and metadata -----

async fn ca_journal_and_meta(store: Store) {
    assert_eq!(store.get_ca_journal("server-a").await.unwrap(), None);
    store
        .set_ca_journal("server-a", b"\x00journal-1")
        .await
        .unwrap();
    store.set_ca_journal("server-b", b"other").await.unwrap();
    assert_eq!(
        store.get_ca_journal("server-a").await.unwrap().as_deref(),
        Some(&b"\x00journal-1"[..])
    );
    store
        .set_ca_journal("server-a", b"journal-2")
        .await
        .unwrap();
    assert_eq!(
        store.get_ca_journal("server-a").await.unwrap().as_deref(),
        Some(&b"journal-2"[..])
    );
    assert_eq!(
        store.get_ca_journal("server-b").await.unwrap().as_deref(),
        Some(&b"other"[..])
    );

    assert_eq!(store.get_meta("k").await.unwrap(), None);
    store.set_meta("k", b"v1").await.unwrap();
    store.set_meta("k", b"v2").await.unwrap();
    assert_eq!(
        store.get_meta("k").await.unwrap().as_deref(),
        Some(&b"v2"[..])
    );
}

// ----- SQLite only -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_state_persists_across_reopen() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("datastore.sqlite3");
    let bundle = full_bundle("example.org");
    let (entry_written, agent_written) = {
        let store = SqlStore::open(&path).await.unwrap();
        store.create_bundle(bundle.clone()).await.unwrap();
        let mut e = entry("e1", "/web", "/agent", &["unix:uid:1"]);
        e.federates_with = [td("example.org")].into_iter().collect();
        let e = store.create_entry(e).await.unwrap();
        let mut a = agent("/spire/agent/x/1", "x", "1", 1000);
        a.selectors = selectors(&["x:a:b"]);
        let a = store.create_agent(a).await.unwrap();
        store.create_join_token("tok", at(5000)).await.unwrap();
        store.set_ca_journal("server", b"journal").await.unwrap();
        store.set_meta("k", b"v").await.unwrap();
        // Dropped without close(): the data must already be durable.
        (e, a)
    };
    let store = SqlStore::open(&path).await.unwrap();
    assert_eq!(
        store.get_entry(&entry_written.id).await.unwrap(),
        Some(entry_written)
    );
    assert_eq!(
        store.get_agent(&agent_written.spiffe_id).await.unwrap(),
        Some(agent_written)
    );
    assert_eq!(
        store.get_bundle(&td("example.org")).await.unwrap(),
        Some(bundle)
    );
    assert_eq!(
        store.take_join_token("tok").await.unwrap().expires_at,
        at(5000)
    );
    assert_eq!(
        store.get_ca_journal("server").await.unwrap().as_deref(),
        Some(&b"journal"[..])
    );
    assert_eq!(
        store.get_meta("k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    assert_eq!(store.current_revision().await.unwrap(), 3);
    assert_eq!(store.changes_since(0).await.unwrap().len(), 3);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_migrations_are_idempotent_and_newer_schemas_refused() {
    use sqlx::ConnectOptions as _;

    let dir = TempDir::new().unwrap();
    let path = dir.path().join("datastore.sqlite3");
    for round in 0..3 {
        let store = SqlStore::open(&path).await.unwrap();
        store
            .create_entry(entry(
                &format!("e{round}"),
                &format!("/w{round}"),
                "/agent",
                &["unix:uid:1"],
            ))
            .await
            .unwrap();
        assert_eq!(
            store.count_entries(&EntryFilter::default()).await.unwrap(),
            round + 1
        );
        store.close().await;
    }
    assert!(SqlStore::schema_version() >= 1);

    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await
        .unwrap();
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let expected: Vec<i64> = (1..=SqlStore::schema_version()).collect();
    assert_eq!(versions, expected, "each migration applied exactly once");
    let journal_mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(journal_mode.to_lowercase(), "wal");

    // A database migrated by a newer build is refused rather than misread.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (999999, 'from the future', 1, x'00', 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    drop(conn);
    let err = SqlStore::open(&path).await.unwrap_err();
    assert!(matches!(err, DatastoreError::Backend(_)), "{err:?}");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_database_file_is_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;

    let dir = TempDir::new().unwrap();
    let path = dir.path().join("nested/data/datastore.sqlite3");
    let store = SqlStore::open(&path).await.unwrap();
    store.set_meta("k", b"v").await.unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    let wal = path.with_file_name("datastore.sqlite3-wal");
    if wal.exists() {
        assert_eq!(
            mode(&wal),
            0o600,
            "SQLite gives the WAL the database's mode"
        );
    }
    store.close().await;

    // A file left world-readable is tightened on open.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = SqlStore::open(&path).await.unwrap();
    assert_eq!(mode(&path), 0o600);
    assert_eq!(
        store.get_meta("k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    store.close().await;
}

/// Set in the child process of [`sql_acknowledged_writes_survive_sigkill`]: the database it
/// writes to.
const CRASH_WRITER_DB: &str = "LANYARD_TEST_DATASTORE_CRASH_WRITER_DB";
const CRASH_TEST_NAME: &str = "datastore::sql_acknowledged_writes_survive_sigkill";
const ACKS_BEFORE_KILL: usize = 150;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_acknowledged_writes_survive_sigkill() {
    if let Some(path) = std::env::var_os(CRASH_WRITER_DB) {
        crash_writer(Path::new(&path)).await;
        return;
    }

    let dir = TempDir::new().unwrap();
    let path = dir.path().join("crash.sqlite3");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            CRASH_TEST_NAME,
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_WRITER_DB, &path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut acknowledged = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while acknowledged.len() < ACKS_BEFORE_KILL {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(id) = line.strip_prefix("ACK ") {
                    acknowledged.push(id.to_owned());
                }
            }
            Err(e) => {
                let _ = child.kill();
                let status = child.wait().unwrap();
                panic!(
                    "writer stopped after {} acknowledgements ({e}; exit {status})",
                    acknowledged.len()
                );
            }
        }
    }
    // SIGKILL mid-stream: the writer is in the middle of its next writes.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the writer was killed, not finished: {status}"
    );
    drop(lines_rx);
    reader.join().unwrap();

    let store = SqlStore::open(&path).await.unwrap();
    for id in &acknowledged {
        let id = EntryId::new(id).unwrap();
        assert!(
            store.get_entry(&id).await.unwrap().is_some(),
            "acknowledged entry {id} lost after SIGKILL"
        );
    }
    let n_stored = store.count_entries(&EntryFilter::default()).await.unwrap();
    assert!(n_stored >= acknowledged.len() as u64);
    let revision = store.current_revision().await.unwrap();
    assert_eq!(
        revision, n_stored as i64,
        "log and table agree after recovery"
    );
    store.close().await;
}

/// The child's side of the crash test: create entries forever, printing each ID once the
/// store has acknowledged it.
async fn crash_writer(path: &Path) {
    let store = SqlStore::open(path).await.unwrap();
    for i in 0u64.. {
        let id = format!("crash-{i:08}");
        store
            .create_entry(entry(&id, &format!("/w/{i}"), "/agent", &["unix:uid:1"]))
            .await
            .unwrap();
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "ACK {id}").unwrap();
        stdout.flush().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_in_memory_store_works() {
    let store: Store = Arc::new(SqlStore::open_in_memory().await.unwrap());
    entry_crud(store.clone()).await;
    change_log_records_every_change(Arc::new(SqlStore::open_in_memory().await.unwrap())).await;
}

// ----- SQL only -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_bulk_create_is_all_or_nothing() {
    let dir = TempDir::new().unwrap();
    let store = open_sql(&dir).await;
    let stored = store
        .create_entries(vec![
            entry("bulk-1", "/a", "/agent", &["unix:uid:1"]),
            entry("bulk-2", "/b", "/agent", &["unix:uid:2"]),
        ])
        .await
        .unwrap();
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().all(|e| e.revision_number == 0));

    // A duplicate ID in the batch refuses the whole batch.
    let refused = store
        .create_entries(vec![
            entry("bulk-3", "/c", "/agent", &["unix:uid:3"]),
            entry("bulk-1", "/d", "/agent", &["unix:uid:4"]),
        ])
        .await;
    assert!(matches!(refused, Err(DatastoreError::AlreadyExists { .. })));
    let ids: Vec<String> = store
        .list_all_entries()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id.as_str().to_owned())
        .collect();
    assert_eq!(ids, ["bulk-1", "bulk-2"]);
    assert_eq!(store.current_revision().await.unwrap(), 2);
}

// ----- governance records -----

// ----- federation relationships -----

fn relationship(name: &str, url: &str) -> FederationRelationship {
    FederationRelationship::new(
        td(name),
        url.parse().unwrap(),
        BundleEndpointProfile::HttpsWeb,
    )
}

fn spiffe_profile(id: &str) -> BundleEndpointProfile {
    BundleEndpointProfile::from_name(HTTPS_SPIFFE, Some(id)).unwrap()
}

async fn federation_relationship_crud(store: Store) {
    let web = relationship("partner.org", "https://partner.org/bundle");
    let created = store
        .create_federation_relationship(web.clone())
        .await
        .unwrap();
    assert_eq!(created, web);
    assert_eq!(
        store
            .get_federation_relationship(&td("partner.org"))
            .await
            .unwrap(),
        Some(web.clone())
    );
    assert_eq!(
        store
            .get_federation_relationship(&td("unknown.org"))
            .await
            .unwrap(),
        None
    );
    let duplicate = store
        .create_federation_relationship(relationship("partner.org", "https://elsewhere.org/"))
        .await
        .unwrap_err();
    assert!(
        matches!(duplicate, DatastoreError::AlreadyExists { .. }),
        "{duplicate:?}"
    );

    // An update writes the masked fields only.
    let update = FederationRelationship::new(
        td("partner.org"),
        "https://partner.org:8443/new".parse().unwrap(),
        spiffe_profile("spiffe://partner.org/spire/server"),
    );
    let url_only = RelationshipMask {
        bundle_endpoint_url: true,
        bundle_endpoint_profile: false,
        trust_domain_bundle: false,
    };
    let updated = store
        .update_federation_relationship(update.clone(), url_only)
        .await
        .unwrap();
    assert_eq!(
        updated.bundle_endpoint_url().as_str(),
        "https://partner.org:8443/new"
    );
    assert_eq!(updated.profile(), &BundleEndpointProfile::HttpsWeb);
    let updated = store
        .update_federation_relationship(update.clone(), RelationshipMask::ALL)
        .await
        .unwrap();
    assert_eq!(updated, update);
    assert_eq!(
        store
            .get_federation_relationship(&td("partner.org"))
            .await
            .unwrap(),
        Some(update.clone())
    );
    // Back to https_web: the endpoint ID goes with the profile.
    let back = store
        .update_federation_relationship(web.clone(), RelationshipMask::ALL)
        .await
        .unwrap();
    assert_eq!(back, web);
    assert_eq!(back.profile().endpoint_spiffe_id(), None);

    let missing = store
        .update_federation_relationship(
            relationship("unknown.org", "https://unknown.org/"),
            RelationshipMask::ALL,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(missing, DatastoreError::NotFound(_)),
        "{missing:?}"
    );

    let deleted = store
        .delete_federation_relationship(&td("partner.org"))
        .await
        .unwrap();
    assert_eq!(deleted, web);
    assert_eq!(
        store
            .get_federation_relationship(&td("partner.org"))
            .await
            .unwrap(),
        None
    );
    let again = store
        .delete_federation_relationship(&td("partner.org"))
        .await
        .unwrap_err();
    assert!(matches!(again, DatastoreError::NotFound(_)), "{again:?}");
    // Gone means gone: it can be created anew.
    store
        .create_federation_relationship(web.clone())
        .await
        .unwrap();
}

async fn federation_relationship_bundles_are_the_trust_domains(store: Store) {
    // A bundle given at creation becomes the trust domain's federated bundle.
    let bundle = full_bundle("partner.org");
    let with_bundle = FederationRelationship::new(
        td("partner.org"),
        "https://partner.org/bundle".parse().unwrap(),
        spiffe_profile("spiffe://partner.org/spire/server"),
    )
    .with_trust_domain_bundle(bundle.clone())
    .unwrap();
    let created = store
        .create_federation_relationship(with_bundle.clone())
        .await
        .unwrap();
    assert_eq!(created.trust_domain_bundle(), Some(&bundle));
    assert_eq!(
        store.get_bundle(&td("partner.org")).await.unwrap(),
        Some(bundle.clone())
    );

    // A relationship created without one has none, until the trust domain gets a bundle by
    // any means; reads carry the bundle as it is then.
    let other = relationship("other.org", "https://other.org/bundle");
    let created = store
        .create_federation_relationship(other.clone())
        .await
        .unwrap();
    assert_eq!(created.trust_domain_bundle(), None);
    let other_bundle = full_bundle("other.org");
    store.set_bundle(other_bundle.clone()).await.unwrap();
    let read = store
        .get_federation_relationship(&td("other.org"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.trust_domain_bundle(), Some(&other_bundle));

    // A bundle replaces the stored one only through a mask that includes it.
    let mut newer = TrustBundle::new(td("partner.org"));
    newer.add_x509_authority(X509Authority::new(ca_der(&td("partner.org"))).unwrap());
    newer.set_sequence_number(43);
    let update = relationship("partner.org", "https://partner.org/bundle")
        .with_trust_domain_bundle(newer.clone())
        .unwrap();
    let without_bundle = RelationshipMask {
        trust_domain_bundle: false,
        ..RelationshipMask::ALL
    };
    let updated = store
        .update_federation_relationship(update.clone(), without_bundle)
        .await
        .unwrap();
    assert_eq!(updated.trust_domain_bundle(), Some(&bundle));
    assert_eq!(
        store.get_bundle(&td("partner.org")).await.unwrap(),
        Some(bundle.clone())
    );
    let updated = store
        .update_federation_relationship(update, RelationshipMask::ALL)
        .await
        .unwrap();
    assert_eq!(updated.trust_domain_bundle(), Some(&newer));
    assert_eq!(
        store.get_bundle(&td("partner.org")).await.unwrap(),
        Some(newer.clone())
    );
    // An update without a bundle keeps the stored one.
    let updated = store
        .update_federation_relationship(
            relationship("partner.org", "https://partner.org/b2"),
            RelationshipMask::ALL,
        )
        .await
        .unwrap();
    assert_eq!(updated.trust_domain_bundle(), Some(&newer));

    // Deleting the relationship keeps the bundle, as SPIRE does.
    let deleted = store
        .delete_federation_relationship(&td("partner.org"))
        .await
        .unwrap();
    assert_eq!(deleted.trust_domain_bundle(), None);
    assert_eq!(
        store.get_bundle(&td("partner.org")).await.unwrap(),
        Some(newer)
    );
    // And deleting the bundle keeps the relationship, which then carries none.
    store
        .delete_bundle(&td("other.org"), BundleDeleteMode::Restrict)
        .await
        .unwrap();
    let read = store
        .get_federation_relationship(&td("other.org"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.trust_domain_bundle(), None);
}

async fn federation_relationship_paging_and_change_log(store: Store) {
    let names = ["e.org", "a.org", "d.org", "b.org", "c.org"];
    for name in names {
        let mut relationship = relationship(name, &format!("https://{name}/bundle"));
        if name == "c.org" {
            relationship = relationship
                .with_trust_domain_bundle(TrustBundle::new(td(name)))
                .unwrap();
        }
        store
            .create_federation_relationship(relationship)
            .await
            .unwrap();
    }
    let (all, next) = store.list_federation_relationships(None).await.unwrap();
    assert_eq!(next, None);
    let listed: Vec<&str> = all.iter().map(|r| r.trust_domain().name()).collect();
    assert_eq!(listed, ["a.org", "b.org", "c.org", "d.org", "e.org"]);
    assert!(all[2].trust_domain_bundle().is_some());
    assert!(all[0].trust_domain_bundle().is_none());

    let mut token = None;
    let mut pages = Vec::new();
    loop {
        let (page, next) = store
            .list_federation_relationships(Some(PageRequest { token, size: 2 }))
            .await
            .unwrap();
        pages.push(
            page.iter()
                .map(|r| r.trust_domain().name().to_owned())
                .collect::<Vec<_>>(),
        );
        match next {
            Some(next) => token = Some(next),
            None => break,
        }
        assert!(pages.len() < 10, "paging does not end");
    }
    assert_eq!(
        pages,
        [
            vec!["a.org", "b.org"],
            vec!["c.org", "d.org"],
            vec!["e.org"]
        ]
    );

    // Every write is in the change log, a bundle given with a relationship too; a failed
    // write is not.
    let before = store.current_revision().await.unwrap();
    store
        .update_federation_relationship(
            relationship("a.org", "https://a.org/new")
                .with_trust_domain_bundle(TrustBundle::new(td("a.org")))
                .unwrap(),
            RelationshipMask::ALL,
        )
        .await
        .unwrap();
    store
        .delete_federation_relationship(&td("b.org"))
        .await
        .unwrap();
    assert!(
        store
            .delete_federation_relationship(&td("b.org"))
            .await
            .is_err()
    );
    let changes: Vec<(ChangeKind, ChangeSubject)> = store
        .changes_since(before)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.kind, c.subject))
        .collect();
    assert_eq!(
        changes,
        [
            (ChangeKind::Created, ChangeSubject::Bundle(td("a.org"))),
            (
                ChangeKind::Updated,
                ChangeSubject::FederationRelationship(td("a.org"))
            ),
            (
                ChangeKind::Deleted,
                ChangeSubject::FederationRelationship(td("b.org"))
            ),
        ]
    );
    let created: Vec<ChangeSubject> = store
        .changes_since(0)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.kind == ChangeKind::Created)
        .map(|c| c.subject)
        .collect();
    assert_eq!(
        created,
        [
            ChangeSubject::FederationRelationship(td("e.org")),
            ChangeSubject::FederationRelationship(td("a.org")),
            ChangeSubject::FederationRelationship(td("d.org")),
            ChangeSubject::FederationRelationship(td("b.org")),
            ChangeSubject::Bundle(td("c.org")),
            ChangeSubject::FederationRelationship(td("c.org")),
            ChangeSubject::Bundle(td("a.org")),
        ]
    );
}

fn sample_exception(id: &str) -> Exception {
    Exception {
        id: id.to_owned(),
        owner: "platform".to_owned(),
        reason: "migration".to_owned(),
        ticket: Some("CHG-1".to_owned()),
        rules: ["admin-needs-exception".to_owned()].into(),
        entry_ids: ["e1".to_owned(), "e2".to_owned()].into(),
        spiffe_id_pattern: Some("spiffe://example.org/ops/*".to_owned()),
        expires_at: at(2_000_000_000) + Duration::from_millis(700),
        created_at: at(1_900_000_000),
        created_by: "local uid 0".to_owned(),
        revoked_at: None,
        revision: 0,
    }
}

async fn exceptions_round_trip(store: Store) {
    let created = store
        .create_exception(sample_exception("x1"))
        .await
        .unwrap();
    // Times come back whole seconds, like every other record.
    assert_eq!(created.expires_at, at(2_000_000_000));
    assert_eq!(
        store.get_exception("x1").await.unwrap(),
        Some(created.clone())
    );
    assert!(matches!(
        store.create_exception(sample_exception("x1")).await,
        Err(DatastoreError::AlreadyExists { .. })
    ));
    let mut bare = sample_exception("x0");
    bare.ticket = None;
    bare.spiffe_id_pattern = None;
    let bare = store.create_exception(bare).await.unwrap();

    // A new exception is at revision 1; an update over the revision read moves it on.
    assert_eq!(created.revision, 1);
    let mut revoked = created.clone();
    revoked.revoked_at = Some(at(1_950_000_000));
    let stored = store.update_exception(revoked.clone()).await.unwrap();
    revoked.revision = 2;
    assert_eq!(stored, revoked);
    assert_eq!(
        store.get_exception("x1").await.unwrap(),
        Some(revoked.clone())
    );
    // An update over a revision it has left writes nothing.
    let mut stale = created.clone();
    stale.expires_at = at(2_100_000_000);
    assert!(matches!(
        store.update_exception(stale).await,
        Err(DatastoreError::Conflict(_))
    ));
    assert_eq!(
        store.get_exception("x1").await.unwrap(),
        Some(revoked.clone())
    );
    let ids: Vec<String> = store
        .list_exceptions()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["x0", "x1"]);
    assert_eq!(store.list_exceptions().await.unwrap()[0], bare);
    // Each committed exception write is in the change log, so the audit log can be completed
    // from it after a crash.
    let exception_changes: Vec<(ChangeKind, ChangeSubject)> = store
        .changes_since(0)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| matches!(c.subject, ChangeSubject::Exception(_)))
        .map(|c| (c.kind, c.subject))
        .collect();
    assert_eq!(
        exception_changes,
        [
            (
                ChangeKind::Created,
                ChangeSubject::Exception("x1".to_owned())
            ),
            (
                ChangeKind::Created,
                ChangeSubject::Exception("x0".to_owned())
            ),
            (
                ChangeKind::Updated,
                ChangeSubject::Exception("x1".to_owned())
            ),
        ]
    );
    assert!(matches!(
        store.update_exception(sample_exception("missing")).await,
        Err(DatastoreError::NotFound(_))
    ));
    assert!(store.get_exception("missing").await.unwrap().is_none());
}

fn sample_revocation(id: &str, target: RevocationTarget) -> Revocation {
    Revocation {
        id: id.to_owned(),
        target,
        owner: "security".to_owned(),
        reason: "key leaked".to_owned(),
        ticket: "INC-7".to_owned(),
        created_at: at(1_900_000_000) + Duration::from_millis(300),
        created_by: "local uid 0".to_owned(),
        expires_at: at(1_900_086_400),
        sequence: 0,
    }
}

fn revoked(serial: &str, authority: &str) -> RevokedSerial {
    RevokedSerial {
        serial: serial.to_owned(),
        authority_id: authority.to_owned(),
        revoked_at: at(1_900_000_000) + Duration::from_millis(900),
    }
}

async fn revocations_are_numbered_list_their_serials_and_record_acknowledgements(store: Store) {
    let by_id = RevocationTarget::SpiffeId(spiffe("/web"));
    let first = store
        .create_revocation(
            sample_revocation("r1", by_id.clone()),
            &[revoked("0012", "aa"), revoked("7", "bb")],
        )
        .await
        .unwrap();
    assert_eq!(first.sequence, 1);
    // Times come back whole seconds; serials without leading zeros.
    assert_eq!(first.created_at, at(1_900_000_000));
    assert_eq!(
        store.get_revocation("r1").await.unwrap(),
        Some(first.clone())
    );
    let second = store
        .create_revocation(
            sample_revocation("r2", RevocationTarget::JwtId("j-1".to_owned())),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(second.sequence, 2);
    assert!(matches!(
        store
            .create_revocation(sample_revocation("r1", by_id.clone()), &[])
            .await,
        Err(DatastoreError::AlreadyExists { .. })
    ));
    // A record without a reason, or with a bad serial, is refused and takes no number.
    let mut bad = sample_revocation("r3", by_id.clone());
    bad.reason.clear();
    assert!(matches!(
        store.create_revocation(bad, &[]).await,
        Err(DatastoreError::Invalid(_))
    ));
    assert!(matches!(
        store
            .create_revocation(sample_revocation("r3", by_id.clone()), &[revoked("x1", "")])
            .await,
        Err(DatastoreError::Invalid(_))
    ));
    let ids = |list: Vec<Revocation>| {
        list.into_iter()
            .map(|r| (r.id, r.sequence))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(store.list_revocations(0).await.unwrap()),
        [("r1".to_owned(), 1), ("r2".to_owned(), 2)]
    );
    assert_eq!(
        ids(store.list_revocations(1).await.unwrap()),
        [("r2".to_owned(), 2)]
    );
    assert!(store.list_revocations(2).await.unwrap().is_empty());

    let serials = |list: Vec<RevokedSerial>| {
        list.into_iter()
            .map(|s| (s.serial, s.authority_id))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        serials(store.list_revoked_serials(Some("r1")).await.unwrap()),
        [
            ("12".to_owned(), "aa".to_owned()),
            ("7".to_owned(), "bb".to_owned())
        ]
    );
    // Agents add serials; one listed already stays as it was.
    store
        .add_revoked_serials("r1", &[revoked("12", "zz"), revoked("99", "")])
        .await
        .unwrap();
    assert_eq!(
        serials(store.list_revoked_serials(None).await.unwrap()),
        [
            ("12".to_owned(), "aa".to_owned()),
            ("7".to_owned(), "bb".to_owned()),
            ("99".to_owned(), String::new()),
        ]
    );
    assert!(matches!(
        store
            .add_revoked_serials("missing", &[revoked("1", "")])
            .await,
        Err(DatastoreError::NotFound(_))
    ));
    // Creation and each addition that brought a new serial are in the change log.
    let changes: Vec<(ChangeKind, ChangeSubject)> = store
        .changes_since(0)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.kind, c.subject))
        .collect();
    let r = |id: &str| ChangeSubject::Revocation(id.to_owned());
    assert_eq!(
        changes,
        [
            (ChangeKind::Created, r("r1")),
            (ChangeKind::Created, r("r2")),
            (ChangeKind::Updated, r("r1")),
        ]
    );
    store
        .add_revoked_serials("r1", &[revoked("99", "")])
        .await
        .unwrap();
    assert_eq!(store.changes_since(0).await.unwrap().len(), 3);

    // Acknowledgements only move forward.
    let agent = spiffe("/spire/agent/a");
    store
        .acknowledge_revocations(&agent, 2, at(1_900_000_010))
        .await
        .unwrap();
    store
        .acknowledge_revocations(&agent, 1, at(1_900_000_020))
        .await
        .unwrap();
    store
        .acknowledge_revocations(&spiffe("/spire/agent/b"), 1, at(1_900_000_030))
        .await
        .unwrap();
    let acks: Vec<(String, i64, SystemTime)> = store
        .list_revocation_acks()
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.agent_id.to_string(), a.sequence, a.acked_at))
        .collect();
    assert_eq!(
        acks,
        [
            (agent.to_string(), 2, at(1_900_000_010)),
            (spiffe("/spire/agent/b").to_string(), 1, at(1_900_000_030)),
        ]
    );
    let one = store.get_revocation_ack(&agent).await.unwrap().unwrap();
    assert_eq!((one.sequence, one.acked_at), (2, at(1_900_000_010)));
    assert!(
        store
            .get_revocation_ack(&spiffe("/spire/agent/never"))
            .await
            .unwrap()
            .is_none()
    );

    // Pruning drops what expired, with its serials.
    let mut short = sample_revocation("r0", RevocationTarget::X509Serial("5".to_owned()));
    short.expires_at = at(1_900_000_500);
    let short = store
        .create_revocation(short, &[revoked("5", "")])
        .await
        .unwrap();
    assert_eq!(short.sequence, 3);
    assert_eq!(store.prune_revocations(at(1_900_001_000)).await.unwrap(), 1);
    assert!(store.get_revocation("r0").await.unwrap().is_none());
    assert_eq!(store.list_revoked_serials(Some("r0")).await.unwrap(), []);
    assert_eq!(store.list_revocations(0).await.unwrap().len(), 2);
    // A number is never given twice, even once its revocation is gone.
    let next = store
        .create_revocation(sample_revocation("r4", by_id), &[])
        .await
        .unwrap();
    assert_eq!(next.sequence, 4);
}

async fn published_crls_move_only_forward_and_are_pruned(store: Store) {
    let crl = |authority: &str, number: u64, next_update: u64| PublishedCrl {
        authority_id: authority.to_owned(),
        der: format!("{authority}-{number}").into_bytes(),
        number,
        next_update: at(next_update),
    };
    let before = store.current_revision().await.unwrap();
    let written = store
        .publish_crls(&[crl("aa", 5, 1_900_000_000), crl("bb", 7, 1_900_000_100)])
        .await
        .unwrap();
    assert_eq!(written, 2);
    // A lower or equal number leaves the stored list; a higher one replaces it.
    assert_eq!(
        store
            .publish_crls(&[crl("aa", 4, 1_900_009_000), crl("bb", 7, 1_900_009_000)])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .publish_crls(&[crl("aa", 6, 1_900_000_200)])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.list_published_crls().await.unwrap(),
        [crl("aa", 6, 1_900_000_200), crl("bb", 7, 1_900_000_100)]
    );
    // Every list written is a change, for the other servers' change feeds.
    let changes: Vec<ChangeSubject> = store
        .changes_since(before)
        .await
        .unwrap()
        .into_iter()
        .map(|change| change.subject)
        .collect();
    assert_eq!(
        changes,
        [
            ChangeSubject::Crl("aa".to_owned()),
            ChangeSubject::Crl("bb".to_owned()),
            ChangeSubject::Crl("aa".to_owned()),
        ]
    );
    // Bad input is refused, storing nothing.
    assert!(matches!(
        store.publish_crls(&[crl("", 9, 1_900_000_000)]).await,
        Err(DatastoreError::Invalid(_))
    ));
    assert!(matches!(
        store
            .publish_crls(&[crl("cc", u64::MAX, 1_900_000_000)])
            .await,
        Err(DatastoreError::Invalid(_))
    ));
    assert_eq!(store.list_published_crls().await.unwrap().len(), 2);
    assert_eq!(
        store.prune_published_crls(at(1_900_000_150)).await.unwrap(),
        1
    );
    assert_eq!(
        store.list_published_crls().await.unwrap(),
        [crl("aa", 6, 1_900_000_200)]
    );
}

fn issuance(
    kind: IssuanceKind,
    serial: &str,
    entry: &str,
    agent_path: &str,
    issued: u64,
) -> Issuance {
    Issuance {
        kind,
        serial: serial.to_owned(),
        entry_id: entry.to_owned(),
        spiffe_id: spiffe("/web"),
        agent_id: spiffe(agent_path),
        authority_id: if kind == IssuanceKind::JwtSvid {
            "kid-1".to_owned()
        } else {
            "ab12".to_owned()
        },
        issued_at: at(issued),
        not_after: at(issued + 3600),
        exception_ids: if serial == "3" {
            vec!["x1".to_owned()]
        } else {
            Vec::new()
        },
    }
}

async fn ledger_records_lists_pages_and_prunes(store: Store) {
    let records = vec![
        issuance(IssuanceKind::X509Svid, "1", "e1", "/agent/a", 1000),
        issuance(IssuanceKind::X509Svid, "2", "e1", "/agent/b", 2000),
        issuance(IssuanceKind::JwtSvid, "3", "e2", "/agent/a", 3000),
        issuance(IssuanceKind::AgentSvid, "4", "", "/agent/a", 4000),
    ];
    store.record_issuances(&records).await.unwrap();
    // Recording the same SVID again changes nothing.
    store.record_issuances(&records[..1]).await.unwrap();
    let all = store
        .list_issuances(&IssuanceFilter::default(), None)
        .await
        .unwrap()
        .0;
    let serials: Vec<&str> = all.iter().map(|i| i.serial.as_str()).collect();
    assert_eq!(serials, ["4", "3", "2", "1"], "newest first");
    assert_eq!(all[1], records[2]);

    let by = |filter: IssuanceFilter| {
        let store = Arc::clone(&store);
        async move {
            store
                .list_issuances(&filter, None)
                .await
                .unwrap()
                .0
                .into_iter()
                .map(|i| i.serial)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        by(IssuanceFilter {
            entry_id: Some("e1".into()),
            ..Default::default()
        })
        .await,
        ["2", "1"]
    );
    assert_eq!(
        by(IssuanceFilter {
            agent_id: Some(spiffe("/agent/a")),
            ..Default::default()
        })
        .await,
        ["4", "3", "1"]
    );
    assert_eq!(
        by(IssuanceFilter {
            authority_id: Some("kid-1".into()),
            ..Default::default()
        })
        .await,
        ["3"]
    );
    assert_eq!(
        by(IssuanceFilter {
            valid_after: Some(at(2000 + 3600)),
            ..Default::default()
        })
        .await,
        ["4", "3"]
    );
    assert_eq!(
        by(IssuanceFilter {
            spiffe_id: Some(spiffe("/other")),
            ..Default::default()
        })
        .await,
        Vec::<String>::new()
    );

    let (first, next) = store
        .list_issuances(&IssuanceFilter::default(), Some(PageRequest::first(3)))
        .await
        .unwrap();
    assert_eq!(first.len(), 3);
    let (second, last) = store
        .list_issuances(
            &IssuanceFilter::default(),
            Some(PageRequest {
                token: next,
                size: 3,
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        second.iter().map(|i| i.serial.as_str()).collect::<Vec<_>>(),
        ["1"]
    );
    assert!(last.is_none());
    assert!(matches!(
        store
            .list_issuances(
                &IssuanceFilter::default(),
                Some(PageRequest {
                    token: Some("x".into()),
                    size: 3
                })
            )
            .await,
        Err(DatastoreError::Invalid(_))
    ));

    assert_eq!(store.prune_issuances(at(2500)).await.unwrap(), 2);
    assert_eq!(by(IssuanceFilter::default()).await, ["4", "3"]);
}

async fn usage_merges_issuances_and_reports(store: Store) {
    store
        .record_issuances(&[
            issuance(IssuanceKind::X509Svid, "1", "e1", "/agent/a", 1000),
            issuance(IssuanceKind::X509Svid, "2", "e1", "/agent/a", 2000),
            issuance(IssuanceKind::X509Svid, "3", "e2", "/agent/b", 3000),
            issuance(IssuanceKind::AgentSvid, "4", "", "/agent/a", 4000),
        ])
        .await
        .unwrap();
    store
        .record_served(&spiffe("/agent/a"), &[("e1".into(), at(2500))])
        .await
        .unwrap();
    // An older report does not move the time back.
    store
        .record_served(&spiffe("/agent/a"), &[("e1".into(), at(2400))])
        .await
        .unwrap();
    store
        .record_served(&spiffe("/agent/c"), &[("e3".into(), at(5000))])
        .await
        .unwrap();

    let usage = store.list_usage(&[]).await.unwrap();
    type Row<'a> = (
        &'a str,
        &'a str,
        Option<SystemTime>,
        Option<SystemTime>,
        u64,
    );
    let rows: Vec<Row<'_>> = usage
        .iter()
        .map(|u| {
            (
                u.entry_id.as_str(),
                u.agent_id.as_str(),
                u.last_issued_at,
                u.last_served_at,
                u.issued,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (
                "e1",
                "spiffe://example.org/agent/a",
                Some(at(2000)),
                Some(at(2500)),
                2
            ),
            (
                "e2",
                "spiffe://example.org/agent/b",
                Some(at(3000)),
                None,
                1
            ),
            (
                "e3",
                "spiffe://example.org/agent/c",
                None,
                Some(at(5000)),
                0
            ),
        ]
    );
    let only = store.list_usage(&["e2".to_owned()]).await.unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].entry_id, "e2");
}

/// A write that SQLite rolled back on its own (as it does after an I/O error such as a full
/// disk) leaves no broken connection behind: every later write succeeds.
#[tokio::test]
async fn a_connection_left_in_a_failed_transaction_is_not_reused() {
    use sqlx::{ConnectOptions as _, Executor as _};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("datastore.sqlite3");
    let store = SqlStore::open(&path).await.unwrap();
    let mut raw = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await
        .unwrap();
    // RAISE(ROLLBACK) ends the whole transaction from inside SQLite, like an I/O error does.
    raw.execute(
        "CREATE TRIGGER fail_write BEFORE INSERT ON meta WHEN NEW.key = 'fail' \
         BEGIN SELECT RAISE(ROLLBACK, 'disk full (simulated)'); END",
    )
    .await
    .unwrap();
    for _ in 0..3 {
        let error = store.set_meta("fail", b"x").await.unwrap_err();
        assert!(error.to_string().contains("disk full"), "{error}");
    }
    for i in 0..20 {
        store
            .set_meta(&format!("k{i}"), b"v")
            .await
            .unwrap_or_else(|e| panic!("write {i} after the failure: {e}"));
        store
            .create_entry(entry(
                &format!("e{i}"),
                &format!("/w{i}"),
                "/agent",
                &["k:v"],
            ))
            .await
            .unwrap_or_else(|e| panic!("entry {i} after the failure: {e}"));
    }
}
