//! The bundle endpoint client: for every federation relationship, the foreign trust domain's
//! bundle fetched from its SPIFFE bundle endpoint ([`fetch`]) and stored as its federated
//! bundle, which agents hand to the workloads whose entries federate with it.
//!
//! One task follows the relationships ([`BundleRefresh::relationships`] moves whenever one is
//! created, updated or deleted, on this server or another sharing the datastore) and keeps one
//! updater per relationship. An updater fetches at once, then on the schedule of
//! [`lanyard_core::bundle_fetch`] (a quarter of the refresh hint; backing off after failures),
//! at once again when its relationship changes, and when `RefreshBundle` asks
//! ([`BundleRefresh::refresh_requests`]). `https_spiffe` endpoints are authenticated against
//! the stored bundle of the endpoint SPIFFE ID's trust domain, read at every fetch: the
//! peer's last fetched bundle, or the one given with the relationship to bootstrap it; or this
//! server's own bundle for an endpoint in its own trust domain. A fetched bundle is stored
//! only when it changed, and never over a newer one
//! ([`crate::datastore::Datastore::store_fetched_bundle`]), so servers sharing the datastore
//! may all fetch without fighting. A failure keeps the stored bundle and is logged once per
//! change of its reason, and once more when fetching works again.
//!
//! [`BundleRefresh::relationships`]: crate::relationships::BundleRefresh::relationships
//! [`BundleRefresh::refresh_requests`]: crate::relationships::BundleRefresh::refresh_requests

pub mod fetch;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lanyard_core::bundle_fetch::{FetchedBundleChange, HeldBundle, next_fetch_in};
use lanyard_core::federation::FederationRelationship;
use lanyard_core::{BundleEndpointProfile, BundleEndpointUrl, TrustBundle, TrustDomain};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::datastore::{DatastoreError, PageRequest};
use crate::state::ServerState;
use fetch::{EndpointAuth, FetchError, fetch_bundle};

/// The deadline of one fetch, redirects included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// How soon the relationships are read again after reading them failed.
const RELIST_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// Who the audit log names for a federated bundle this client stored.
const AUDIT_CALLER: &str = "bundle endpoint client";

/// Why a refresh stored nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RefreshError {
    /// The fetch failed, or what it brought was refused.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// `https_spiffe` with no known bundle for the endpoint SPIFFE ID's trust domain.
    #[error(
        "no bundle of {endpoint_trust_domain} is known to authenticate the endpoint's SPIFFE ID \
         {endpoint_spiffe_id}; give the relationship a trust domain bundle, or set that trust \
         domain's bundle"
    )]
    NoEndpointBundle {
        /// The trust domain of the endpoint SPIFFE ID.
        endpoint_trust_domain: TrustDomain,
        /// The endpoint SPIFFE ID.
        endpoint_spiffe_id: lanyard_core::SpiffeId,
    },
    /// `https_web` with no Web PKI roots at all.
    #[error(
        "no Web PKI roots to authenticate an https_web endpoint: the system has no CA \
         certificates and federation.https_web_extra_ca_certificates_path is not set"
    )]
    NoWebRoots,
    /// The endpoint served an older sequence number than the stored bundle's.
    #[error(
        "the endpoint served sequence number {fetched}, older than the stored bundle's \
         {stored}; the stored bundle is kept"
    )]
    Older {
        /// What was fetched.
        fetched: u64,
        /// What is stored.
        stored: u64,
    },
    /// The datastore failed.
    #[error("datastore: {0}")]
    Datastore(#[from] DatastoreError),
}

impl RefreshError {
    /// The reason without its details: the same for two failures of the same kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Fetch(error) => error.kind(),
            Self::NoEndpointBundle { .. } => "no endpoint bundle",
            Self::NoWebRoots => "no Web PKI roots",
            Self::Older { .. } => "older sequence number",
            Self::Datastore(_) => "datastore",
        }
    }
}

/// What a successful refresh did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refreshed {
    /// A changed bundle was stored, with this sequence number.
    Stored(u64),
    /// The endpoint served the bundle already stored.
    Unchanged,
}

/// Which failures are worth a log line: the first of a run, and each change of reason; and a
/// success that ends a run of failures.
#[derive(Debug, Default)]
pub struct FailureLog {
    last: Option<&'static str>,
}

impl FailureLog {
    /// A failure of `kind`: whether to log it (its reason differs from the previous failure's,
    /// or it is the first since a success).
    pub fn failed(&mut self, kind: &'static str) -> bool {
        self.last.replace(kind) != Some(kind)
    }

    /// A success: whether it ends a run of failures (worth saying that fetching works again).
    pub fn succeeded(&mut self) -> bool {
        self.last.take().is_some()
    }
}

/// The Web PKI roots of `https_web` endpoints: the system's CA certificates and, if given,
/// those of `extra` (PEM). An unreadable system store is logged; an unusable `extra` is an
/// error.
pub fn load_web_roots(extra: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::warn!(%error, "could not read some of the system's CA certificates (Web PKI roots for https_web bundle endpoints)");
    }
    let (_, n_ignored) = roots.add_parsable_certificates(native.certs);
    if n_ignored > 0 {
        tracing::debug!(
            n_ignored,
            "some system CA certificates were not usable as roots"
        );
    }
    if let Some(path) = extra {
        let pem = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let mut n_added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{}: not PEM: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
            n_added += 1;
        }
        if n_added == 0 {
            return Err(format!("{} holds no certificate", path.display()));
        }
    }
    Ok(roots)
}

/// The client of every relationship's bundle endpoint, over `state`'s datastore.
#[derive(Debug, Clone)]
pub struct BundleClient {
    state: Arc<ServerState>,
    web_roots: Arc<rustls::RootCertStore>,
    timeout: Duration,
}

/// Where and how one relationship's bundle is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchTarget {
    /// The endpoint's URL.
    pub url: BundleEndpointUrl,
    /// How it authenticates.
    pub profile: BundleEndpointProfile,
}

impl From<&FederationRelationship> for FetchTarget {
    fn from(relationship: &FederationRelationship) -> Self {
        Self {
            url: relationship.bundle_endpoint_url().clone(),
            profile: relationship.profile().clone(),
        }
    }
}

impl BundleClient {
    /// A client over `state`, with `web_roots` for `https_web` endpoints.
    pub fn new(state: Arc<ServerState>, web_roots: rustls::RootCertStore) -> Self {
        Self {
            state,
            web_roots: Arc::new(web_roots),
            timeout: FETCH_TIMEOUT,
        }
    }

    /// The same client with another deadline per fetch.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Fetches `trust_domain`'s bundle from `target` once and stores it if it changed.
    /// Returns what happened and what is held now (for the schedule).
    pub async fn refresh(
        &self,
        trust_domain: &TrustDomain,
        target: &FetchTarget,
    ) -> (Result<Refreshed, RefreshError>, HeldBundle) {
        let stored = match self.state.store.get_bundle(trust_domain).await {
            Ok(stored) => stored,
            Err(error) => return (Err(error.into()), HeldBundle::None),
        };
        let held = HeldBundle::of(stored.as_ref());
        match self.fetch_and_store(trust_domain, target, stored).await {
            Ok((refreshed, fetched)) => (Ok(refreshed), HeldBundle::of(Some(&fetched))),
            Err(error) => (Err(error), held),
        }
    }

    async fn fetch_and_store(
        &self,
        trust_domain: &TrustDomain,
        target: &FetchTarget,
        stored: Option<TrustBundle>,
    ) -> Result<(Refreshed, TrustBundle), RefreshError> {
        let auth = self.auth(trust_domain, &target.profile, stored).await?;
        let fetched = fetch_bundle(trust_domain, &target.url, &auth, self.timeout).await?;
        let _audited = self.state.audit.guard();
        match self
            .state
            .store
            .store_fetched_bundle(fetched.clone())
            .await?
        {
            FetchedBundleChange::Newer => {
                self.state.written().await;
                self.state.audit.record(
                    AUDIT_CALLER,
                    "federated bundle fetched",
                    serde_json::json!({
                        "trust_domain": trust_domain.name(),
                        "bundle_endpoint_url": target.url.as_str(),
                        "sequence_number": fetched.sequence_number(),
                        "x509_authorities": fetched.x509_authorities().len(),
                        "jwt_authorities": fetched.jwt_authorities().len(),
                    }),
                );
                Ok((Refreshed::Stored(fetched.sequence_number()), fetched))
            }
            FetchedBundleChange::Unchanged => Ok((Refreshed::Unchanged, fetched)),
            FetchedBundleChange::Older { stored } => Err(RefreshError::Older {
                fetched: fetched.sequence_number(),
                stored,
            }),
        }
    }

    /// How the endpoint must authenticate now.
    async fn auth(
        &self,
        trust_domain: &TrustDomain,
        profile: &BundleEndpointProfile,
        stored: Option<TrustBundle>,
    ) -> Result<EndpointAuth, RefreshError> {
        let endpoint_spiffe_id = match profile {
            BundleEndpointProfile::HttpsWeb => {
                if self.web_roots.is_empty() {
                    return Err(RefreshError::NoWebRoots);
                }
                return Ok(EndpointAuth::Web(Arc::clone(&self.web_roots)));
            }
            BundleEndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => endpoint_spiffe_id,
        };
        let endpoint_trust_domain = endpoint_spiffe_id.trust_domain();
        let bundle = if &endpoint_trust_domain == self.state.trust_domain() {
            Some((*self.state.bundle()).clone())
        } else if &endpoint_trust_domain == trust_domain {
            stored
        } else {
            self.state.store.get_bundle(&endpoint_trust_domain).await?
        };
        let authorities: Vec<Vec<u8>> = bundle
            .iter()
            .flat_map(|bundle| bundle.x509_authorities())
            .map(|authority| authority.der().to_vec())
            .collect();
        if authorities.is_empty() {
            return Err(RefreshError::NoEndpointBundle {
                endpoint_trust_domain,
                endpoint_spiffe_id: endpoint_spiffe_id.clone(),
            });
        }
        Ok(EndpointAuth::Spiffe {
            endpoint_spiffe_id: endpoint_spiffe_id.clone(),
            authorities,
        })
    }

    /// Runs until `stopped` turns true: one updater per relationship, following their changes.
    pub async fn run(self, mut stopped: watch::Receiver<bool>) {
        let mut changed = self.state.bundle_refresh.relationships();
        let mut updaters: HashMap<TrustDomain, watch::Sender<FetchTarget>> = HashMap::new();
        let mut tasks = JoinSet::new();
        loop {
            changed.mark_unchanged();
            let wait = match self.list_relationships().await {
                Ok(relationships) => {
                    self.reconcile(relationships, &mut updaters, &mut tasks, &stopped);
                    None
                }
                Err(error) => {
                    tracing::warn!(%error, "could not read the federation relationships; trying again shortly");
                    Some(RELIST_AFTER_FAILURE)
                }
            };
            // Reap the updaters that ended (their relationship is gone).
            while tasks.try_join_next().is_some() {}
            tokio::select! {
                result = changed.changed() => {
                    if result.is_err() {
                        break;
                    }
                }
                () = async {
                    match wait {
                        Some(wait) => tokio::time::sleep(wait).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = stopped.wait_for(|stop| *stop) => break,
            }
        }
        drop(updaters);
        while tasks.join_next().await.is_some() {}
    }

    async fn list_relationships(&self) -> Result<Vec<FederationRelationship>, DatastoreError> {
        let mut all = Vec::new();
        let mut token = None;
        loop {
            let page = PageRequest {
                token: token.take(),
                size: 1000,
            };
            let (batch, next) = self
                .state
                .store
                .list_federation_relationships(Some(page))
                .await?;
            all.extend(batch);
            match next {
                Some(next) => token = Some(next),
                None => return Ok(all),
            }
        }
    }

    /// Starts an updater for each new relationship, hands each changed one its new target,
    /// and stops those whose relationship is gone (by dropping their sender).
    fn reconcile(
        &self,
        relationships: Vec<FederationRelationship>,
        updaters: &mut HashMap<TrustDomain, watch::Sender<FetchTarget>>,
        tasks: &mut JoinSet<()>,
        stopped: &watch::Receiver<bool>,
    ) {
        let mut current: HashMap<TrustDomain, FetchTarget> = relationships
            .iter()
            .map(|r| (r.trust_domain().clone(), FetchTarget::from(r)))
            .collect();
        updaters.retain(|trust_domain, sender| match current.remove(trust_domain) {
            Some(target) => {
                sender.send_if_modified(|old| {
                    if *old == target {
                        return false;
                    }
                    tracing::info!(
                        trust_domain = %trust_domain,
                        bundle_endpoint_url = %target.url,
                        bundle_endpoint_profile = target.profile.name(),
                        "federation relationship changed; fetching its bundle from the new endpoint"
                    );
                    *old = target;
                    true
                });
                true
            }
            None => {
                tracing::info!(trust_domain = %trust_domain, "federation relationship deleted; its bundle is no longer fetched");
                false
            }
        });
        for (trust_domain, target) in current {
            tracing::info!(
                trust_domain = %trust_domain,
                bundle_endpoint_url = %target.url,
                bundle_endpoint_profile = target.profile.name(),
                "fetching the bundle of a federated trust domain"
            );
            let (sender, receiver) = watch::channel(target);
            updaters.insert(trust_domain.clone(), sender);
            tasks.spawn(self.clone().update(trust_domain, receiver, stopped.clone()));
        }
    }

    /// One relationship's updater: fetch, wait (the schedule, a refresh request, a changed
    /// target), again; until the relationship is gone or the server stops.
    async fn update(
        self,
        trust_domain: TrustDomain,
        mut target: watch::Receiver<FetchTarget>,
        mut stopped: watch::Receiver<bool>,
    ) {
        let requests = self.state.bundle_refresh.refresh_requests(&trust_domain);
        let mut failures = FailureLog::default();
        let mut consecutive_failures = 0_u32;
        loop {
            let current = target.borrow_and_update().clone();
            let (result, held) = self.refresh(&trust_domain, &current).await;
            match result {
                Ok(refreshed) => {
                    consecutive_failures = 0;
                    if failures.succeeded() {
                        tracing::info!(trust_domain = %trust_domain, "fetching the federated bundle works again");
                    }
                    match refreshed {
                        Refreshed::Stored(sequence_number) => tracing::info!(
                            trust_domain = %trust_domain,
                            sequence_number,
                            "federated bundle updated"
                        ),
                        Refreshed::Unchanged => {
                            tracing::debug!(trust_domain = %trust_domain, "federated bundle unchanged");
                        }
                    }
                }
                Err(error) => {
                    consecutive_failures = consecutive_failures.saturating_add(1);
                    if failures.failed(error.kind()) {
                        let kept = match held {
                            HeldBundle::None => "no bundle of this trust domain is held yet",
                            HeldBundle::WithHint(_) => "the last one stays in use",
                        };
                        tracing::warn!(
                            trust_domain = %trust_domain,
                            bundle_endpoint_url = %current.url,
                            reason = error.kind(),
                            "could not refresh the federated bundle; {kept}: {error}"
                        );
                    } else {
                        tracing::debug!(trust_domain = %trust_domain, "federated bundle refresh failed again: {error}");
                    }
                }
            }
            let wait = next_fetch_in(held, consecutive_failures);
            tracing::debug!(trust_domain = %trust_domain, ?wait, "next federated bundle refresh");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = requests.notified() => {
                    tracing::info!(trust_domain = %trust_domain, "federated bundle refresh requested");
                }
                result = target.changed() => {
                    if result.is_err() {
                        return;
                    }
                }
                _ = stopped.wait_for(|stop| *stop) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_logged_once_per_change_of_reason() {
        let mut log = FailureLog::default();
        assert!(!log.succeeded(), "nothing to recover from");
        assert!(log.failed("connection refused"));
        assert!(!log.failed("connection refused"));
        assert!(!log.failed("connection refused"));
        assert!(log.failed("timeout"), "another reason");
        assert!(log.failed("connection refused"), "and back");
        assert!(log.succeeded(), "works again");
        assert!(!log.succeeded());
        assert!(log.failed("connection refused"), "a new run of failures");
    }
}
