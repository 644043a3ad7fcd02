//! [`MeteredStore`]: any [`Datastore`] with the latency of each call recorded by operation
//! and result, for `lanyard_server_datastore_query_duration_seconds`. The server puts it
//! around its store when `metrics_address` is set; otherwise the store is used bare.
//!
//! `result` is `ok`, `refused` for the answers a caller can cause (not found, exists,
//! conflict, precondition, invalid) and `error` for the backend failing.

use std::fmt;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use lanyard_core::bundle::TrustBundle;
use lanyard_core::federation::{FederationRelationship, RelationshipMask};
use lanyard_core::policy::Exception;
use lanyard_core::revocation::{Revocation, RevocationAck, RevokedSerial};
use lanyard_core::{EntryId, RegistrationEntry, SelectorSet, SpiffeId, TrustDomain};
use lanyard_metrics::Outcome;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{
    AgentFilter, AttestedAgent, BundleDeleteMode, Change, ChangeSignal, Datastore, DatastoreError,
    EntryFilter, EntryUsage, FetchedBundleChange, Issuance, IssuanceFilter, JoinTokenRecord, Page,
    PageRequest, PublishedCrl, Result,
};

type QueryLabels = [(&'static str, &'static str); 2];

fn latency_histogram() -> Histogram {
    Histogram::new(lanyard_metrics::LATENCY_BUCKETS)
}

/// The latency family of a [`MeteredStore`].
#[derive(Debug, Clone)]
pub struct DatastoreMetrics {
    durations: Family<QueryLabels, Histogram, fn() -> Histogram>,
}

impl Default for DatastoreMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl DatastoreMetrics {
    /// An empty family.
    pub fn new() -> Self {
        Self {
            durations: Family::new_with_constructor(latency_histogram),
        }
    }

    /// Registers `datastore_query_duration_seconds` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "datastore_query_duration_seconds",
            "Datastore calls by operation (the Datastore method) and result (ok, refused, error)",
            self.durations.clone(),
        );
    }

    fn record<T>(&self, operation: &'static str, started: Instant, result: &Result<T>) {
        let outcome = match result {
            Ok(_) => Outcome::Ok,
            Err(DatastoreError::Backend(_)) => Outcome::Error,
            Err(_) => Outcome::Refused,
        };
        self.durations
            .get_or_create(&[("operation", operation), ("result", outcome.as_str())])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// A [`Datastore`] whose calls are timed into [`DatastoreMetrics`].
pub struct MeteredStore {
    inner: Arc<dyn Datastore>,
    metrics: DatastoreMetrics,
}

impl fmt::Debug for MeteredStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeteredStore")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl MeteredStore {
    /// `inner`, timed into `metrics`.
    pub fn new(inner: Arc<dyn Datastore>, metrics: DatastoreMetrics) -> Self {
        Self { inner, metrics }
    }
}

/// Implements every method of [`Datastore`] by timing the inner store's; the compiler
/// checks that none is missing, except those with a default body, listed here too.
macro_rules! metered {
    ($(async fn $name:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) -> $ret:ty;)*) => {
        #[async_trait::async_trait]
        impl Datastore for MeteredStore {
            $(
                async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    let started = Instant::now();
                    let result = self.inner.$name($($arg),*).await;
                    self.metrics.record(stringify!($name), started, &result);
                    result
                }
            )*
        }
    };
}

metered! {
    async fn create_federation_relationship(&self, relationship: FederationRelationship) -> Result<FederationRelationship>;
    async fn get_federation_relationship(&self, trust_domain: &TrustDomain) -> Result<Option<FederationRelationship>>;
    async fn update_federation_relationship(&self, update: FederationRelationship, mask: RelationshipMask) -> Result<FederationRelationship>;
    async fn delete_federation_relationship(&self, trust_domain: &TrustDomain) -> Result<FederationRelationship>;
    async fn list_federation_relationships(&self, page: Option<PageRequest>) -> Result<Page<FederationRelationship>>;
    async fn create_entry(&self, entry: RegistrationEntry) -> Result<RegistrationEntry>;
    async fn get_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>>;
    async fn update_entry(&self, entry: RegistrationEntry, expected_revision: Option<i64>) -> Result<RegistrationEntry>;
    async fn delete_entry(&self, id: &EntryId, expected_revision: Option<i64>) -> Result<RegistrationEntry>;
    async fn list_entries(&self, filter: &EntryFilter, page: Option<PageRequest>) -> Result<Page<RegistrationEntry>>;
    async fn count_entries(&self, filter: &EntryFilter) -> Result<u64>;
    async fn list_entries_page(&self, page: PageRequest) -> Result<Page<RegistrationEntry>>;
    async fn list_all_entries(&self) -> Result<Vec<RegistrationEntry>>;
    async fn prune_entries(&self, expires_before: SystemTime) -> Result<Vec<EntryId>>;
    async fn current_revision(&self) -> Result<i64>;
    async fn changes_since(&self, revision: i64) -> Result<Vec<Change>>;
    async fn change_signal(&self) -> Result<Option<ChangeSignal>>;
    async fn prune_changes(&self, before: i64) -> Result<u64>;
    async fn create_agent(&self, agent: AttestedAgent) -> Result<AttestedAgent>;
    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AttestedAgent>>;
    async fn update_agent(&self, agent: AttestedAgent) -> Result<AttestedAgent>;
    async fn set_agent_selectors(&self, id: &SpiffeId, selectors: SelectorSet) -> Result<AttestedAgent>;
    async fn delete_agent(&self, id: &SpiffeId) -> Result<AttestedAgent>;
    async fn ban_agent(&self, id: &SpiffeId) -> Result<AttestedAgent>;
    async fn list_agents(&self, filter: &AgentFilter, page: Option<PageRequest>) -> Result<Page<AttestedAgent>>;
    async fn count_agents(&self, filter: &AgentFilter) -> Result<u64>;
    async fn create_join_token(&self, token: &str, expires_at: SystemTime) -> Result<JoinTokenRecord>;
    async fn take_join_token(&self, token: &str) -> Result<JoinTokenRecord>;
    async fn prune_join_tokens(&self, expires_before: SystemTime) -> Result<u64>;
    async fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<Option<TrustBundle>>;
    async fn create_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle>;
    async fn update_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle>;
    async fn set_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle>;
    async fn append_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle>;
    async fn store_fetched_bundle(&self, bundle: TrustBundle) -> Result<FetchedBundleChange>;
    async fn delete_bundle(&self, trust_domain: &TrustDomain, mode: BundleDeleteMode) -> Result<TrustBundle>;
    async fn list_bundles(&self, page: Option<PageRequest>) -> Result<Page<TrustBundle>>;
    async fn count_bundles(&self) -> Result<u64>;
    async fn get_ca_journal(&self, server_key: &str) -> Result<Option<Vec<u8>>>;
    async fn set_ca_journal(&self, server_key: &str, journal: &[u8]) -> Result<()>;
    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>>;
    async fn set_meta(&self, key: &str, value: &[u8]) -> Result<()>;
    async fn create_exception(&self, exception: Exception) -> Result<Exception>;
    async fn get_exception(&self, id: &str) -> Result<Option<Exception>>;
    async fn update_exception(&self, exception: Exception) -> Result<Exception>;
    async fn list_exceptions(&self) -> Result<Vec<Exception>>;
    async fn record_issuances(&self, issuances: &[Issuance]) -> Result<()>;
    async fn list_issuances(&self, filter: &IssuanceFilter, page: Option<PageRequest>) -> Result<Page<Issuance>>;
    async fn prune_issuances(&self, issued_before: SystemTime) -> Result<u64>;
    async fn record_served(&self, agent_id: &SpiffeId, served: &[(String, SystemTime)]) -> Result<()>;
    async fn list_usage(&self, entry_ids: &[String]) -> Result<Vec<EntryUsage>>;
    async fn create_revocation(&self, revocation: Revocation, serials: &[RevokedSerial]) -> Result<Revocation>;
    async fn get_revocation(&self, id: &str) -> Result<Option<Revocation>>;
    async fn list_revocations(&self, after_sequence: i64) -> Result<Vec<Revocation>>;
    async fn add_revoked_serials(&self, revocation_id: &str, serials: &[RevokedSerial]) -> Result<()>;
    async fn list_revoked_serials(&self, revocation_id: Option<&str>) -> Result<Vec<RevokedSerial>>;
    async fn acknowledge_revocations(&self, agent_id: &SpiffeId, sequence: i64, at: SystemTime) -> Result<()>;
    async fn list_revocation_acks(&self) -> Result<Vec<RevocationAck>>;
    async fn get_revocation_ack(&self, agent_id: &SpiffeId) -> Result<Option<RevocationAck>>;
    async fn publish_crls(&self, crls: &[PublishedCrl]) -> Result<usize>;
    async fn list_published_crls(&self) -> Result<Vec<PublishedCrl>>;
    async fn prune_published_crls(&self, before: SystemTime) -> Result<u64>;
    async fn prune_revocations(&self, expired_before: SystemTime) -> Result<u64>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::MemoryStore;

    #[tokio::test]
    async fn calls_are_timed_by_operation_and_result() {
        let metrics = DatastoreMetrics::new();
        let store = MeteredStore::new(Arc::new(MemoryStore::new()), metrics.clone());
        store.current_revision().await.expect("a revision");
        store.current_revision().await.expect("a revision");
        let missing: EntryId = "missing".parse().expect("an entry ID");
        assert!(store.delete_entry(&missing, None).await.is_err());
        let mut registry = Registry::with_prefix("lanyard_server");
        metrics.register(&mut registry);
        let text = lanyard_metrics::encode(&registry);
        let count = |labels: &str| {
            format!("lanyard_server_datastore_query_duration_seconds_count{{{labels}}} ")
        };
        assert!(
            text.contains(&format!(
                "{}2\n",
                count("operation=\"current_revision\",result=\"ok\"")
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "{}1\n",
                count("operation=\"delete_entry\",result=\"refused\"")
            )),
            "{text}"
        );
    }
}
