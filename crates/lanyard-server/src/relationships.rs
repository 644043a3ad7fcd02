//! Federation relationships on the server: their one write path ([`RelationshipWriter`]) and
//! the hook through which the client that fetches foreign bundles is told what to do
//! ([`BundleRefresh`]).
//!
//! [`RelationshipWriter`] alone calls the datastore's relationship writes (a source test,
//! `tests/it/write_path.rs`, holds it to that), in the entry writer's order: structure (never
//! the server's own trust domain), commit (a bundle given with a relationship becomes the
//! trust domain's federated bundle in the same transaction, as in SPIRE), catch-up with the
//! change log ([`ServerState::written`], which also moves [`BundleRefresh::relationships`]),
//! then the audit record, under the audit guard from before the commit.
//!
//! [`BundleRefresh`] is the contract with the bundle endpoint client
//! ([`crate::bundle_client`]). That client subscribes to [`BundleRefresh::relationships`] (a
//! `watch` whose value moves whenever a relationship was created, updated or deleted, by this
//! server or by another sharing the datastore, as the change log shows) and re-reads the
//! relationships when it moves; for each relationship it fetches for, it waits on the `Notify`
//! of [`BundleRefresh::refresh_requests`], which `RefreshBundle` signals.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lanyard_core::federation::{FederationError, FederationRelationship, RelationshipMask};
use lanyard_core::{BundleEndpointProfile, TrustDomain};
use tokio::sync::{Notify, watch};

use crate::caller::Caller;
use crate::datastore::DatastoreError;
use crate::state::ServerState;

/// What a relationship operation was doing when it found no relationship; SPIRE answers each
/// in its own words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelationshipOperation {
    /// `BatchUpdateFederationRelationship`.
    Update,
    /// `BatchDeleteFederationRelationship`.
    Delete,
    /// `RefreshBundle`.
    Refresh,
}

/// Why a relationship write did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelationshipError {
    /// The relationship breaks a rule (it is with the server's own trust domain).
    #[error("{0}")]
    Invalid(FederationError),
    /// The trust domain has a relationship already.
    #[error("a federation relationship with trust domain {:?} already exists", .0.name())]
    Exists(TrustDomain),
    /// The trust domain has no relationship.
    #[error("no federation relationship with trust domain {:?}", .trust_domain.name())]
    NotFound {
        /// The trust domain asked for.
        trust_domain: TrustDomain,
        /// What was being done.
        during: RelationshipOperation,
    },
    /// The datastore failed.
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
}

/// The one component that writes federation relationships; see the module documentation.
#[derive(Debug, Clone)]
pub struct RelationshipWriter {
    state: Arc<ServerState>,
}

impl RelationshipWriter {
    /// A writer over `state`'s datastore, change feed and audit log.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }

    /// Creates `relationship` for `caller`; `method` names the RPC in the audit record.
    /// Returns it as stored, with its bundle if it was given one.
    pub async fn create(
        &self,
        caller: &Caller,
        relationship: FederationRelationship,
        method: &str,
    ) -> Result<FederationRelationship, RelationshipError> {
        relationship
            .check_foreign(self.state.trust_domain())
            .map_err(RelationshipError::Invalid)?;
        let _audited = self.state.audit.guard();
        let trust_domain = relationship.trust_domain().clone();
        let bundle_given = relationship.trust_domain_bundle().is_some();
        let created = match self
            .state
            .store
            .create_federation_relationship(relationship)
            .await
        {
            Ok(created) => created,
            Err(DatastoreError::AlreadyExists { .. }) => {
                return Err(RelationshipError::Exists(trust_domain));
            }
            Err(error) => return Err(error.into()),
        };
        self.state.written().await;
        self.state.audit.record(
            &caller.describe(),
            "federation relationship created",
            audit_details(method, &created, bundle_given, None),
        );
        self.warn_without_endpoint_bundle(&created).await;
        Ok(created)
    }

    /// Writes the fields of `update` that `mask` selects over the stored relationship of its
    /// trust domain, for `caller`. Returns the result with the trust domain's bundle as stored.
    pub async fn update(
        &self,
        caller: &Caller,
        update: FederationRelationship,
        mask: RelationshipMask,
        method: &str,
    ) -> Result<FederationRelationship, RelationshipError> {
        let _audited = self.state.audit.guard();
        let trust_domain = update.trust_domain().clone();
        let bundle_given = mask.trust_domain_bundle && update.trust_domain_bundle().is_some();
        let updated = match self
            .state
            .store
            .update_federation_relationship(update, mask)
            .await
        {
            Ok(updated) => updated,
            Err(DatastoreError::NotFound(_)) => {
                return Err(RelationshipError::NotFound {
                    trust_domain,
                    during: RelationshipOperation::Update,
                });
            }
            Err(error) => return Err(error.into()),
        };
        self.state.written().await;
        self.state.audit.record(
            &caller.describe(),
            "federation relationship updated",
            audit_details(method, &updated, bundle_given, Some(&mask)),
        );
        self.warn_without_endpoint_bundle(&updated).await;
        Ok(updated)
    }

    /// Deletes the relationship with `trust_domain` for `caller`. Its bundle stays, as in
    /// SPIRE: entries that federate with the trust domain keep trusting it until the bundle
    /// itself is deleted.
    pub async fn delete(
        &self,
        caller: &Caller,
        trust_domain: &TrustDomain,
        method: &str,
    ) -> Result<FederationRelationship, RelationshipError> {
        let _audited = self.state.audit.guard();
        let deleted = match self
            .state
            .store
            .delete_federation_relationship(trust_domain)
            .await
        {
            Ok(deleted) => deleted,
            Err(DatastoreError::NotFound(_)) => {
                return Err(RelationshipError::NotFound {
                    trust_domain: trust_domain.clone(),
                    during: RelationshipOperation::Delete,
                });
            }
            Err(error) => return Err(error.into()),
        };
        self.state.written().await;
        self.state.audit.record(
            &caller.describe(),
            "federation relationship deleted",
            serde_json::json!({
                "method": method,
                "trust_domain": deleted.trust_domain().name(),
            }),
        );
        Ok(deleted)
    }

    /// Asks for `trust_domain`'s bundle to be fetched now ([`BundleRefresh`]), for `caller`;
    /// only a trust domain with a relationship can be refreshed. Nothing is written, but the
    /// request is audited like a write.
    pub async fn request_refresh(
        &self,
        caller: &Caller,
        trust_domain: &TrustDomain,
        method: &str,
    ) -> Result<(), RelationshipError> {
        if self
            .state
            .store
            .get_federation_relationship(trust_domain)
            .await?
            .is_none()
        {
            return Err(RelationshipError::NotFound {
                trust_domain: trust_domain.clone(),
                during: RelationshipOperation::Refresh,
            });
        }
        self.state.bundle_refresh.request_refresh(trust_domain);
        self.state.audit.record(
            &caller.describe(),
            "bundle refresh requested",
            serde_json::json!({
                "method": method,
                "trust_domain": trust_domain.name(),
            }),
        );
        Ok(())
    }

    /// Makes the stored relationships match `configured`, those of the configuration file
    /// (`[federation.trust_domains]`), at start: each is created, or the stored one updated
    /// where its endpoint URL or profile differ. A bundle given with one is written only while
    /// the server holds none of its trust domain, so a restart never puts back an older
    /// bundle than the one fetched since. Relationships made through the API and absent from
    /// the file are left alone.
    pub async fn apply_configured(
        &self,
        configured: Vec<FederationRelationship>,
    ) -> Result<(), RelationshipError> {
        let caller = Caller::Configuration;
        for relationship in configured {
            let trust_domain = relationship.trust_domain().clone();
            let relationship = if self.state.store.get_bundle(&trust_domain).await?.is_some() {
                relationship.without_trust_domain_bundle()
            } else {
                relationship
            };
            let stored = self
                .state
                .store
                .get_federation_relationship(&trust_domain)
                .await?;
            if let Some(stored) = &stored
                && stored.bundle_endpoint_url() == relationship.bundle_endpoint_url()
                && stored.profile() == relationship.profile()
                && relationship.trust_domain_bundle().is_none()
            {
                continue;
            }
            let mask = RelationshipMask {
                bundle_endpoint_url: true,
                bundle_endpoint_profile: true,
                trust_domain_bundle: relationship.trust_domain_bundle().is_some(),
            };
            if stored.is_none() {
                match self
                    .create(&caller, relationship.clone(), CONFIGURATION_METHOD)
                    .await
                {
                    // Another server sharing the datastore created it meanwhile.
                    Err(RelationshipError::Exists(_)) => {}
                    other => {
                        other?;
                        continue;
                    }
                }
            }
            self.update(&caller, relationship, mask, CONFIGURATION_METHOD)
                .await?;
        }
        Ok(())
    }

    /// SPIRE's warning for an `https_spiffe` endpoint whose trust domain's bundle the server
    /// does not have: the fetching client could not authenticate the endpoint.
    async fn warn_without_endpoint_bundle(&self, relationship: &FederationRelationship) {
        let BundleEndpointProfile::HttpsSpiffe { endpoint_spiffe_id } = relationship.profile()
        else {
            return;
        };
        let endpoint_trust_domain = endpoint_spiffe_id.trust_domain();
        if relationship.trust_domain_bundle().is_some()
            && &endpoint_trust_domain == relationship.trust_domain()
        {
            return;
        }
        if &endpoint_trust_domain == self.state.trust_domain() {
            return;
        }
        match self.state.store.get_bundle(&endpoint_trust_domain).await {
            Ok(Some(_)) => {}
            Ok(None) => tracing::warn!(
                endpoint_spiffe_id = %endpoint_spiffe_id,
                "bundle not found for the endpoint SPIFFE ID trust domain"
            ),
            Err(error) => tracing::warn!(
                endpoint_spiffe_id = %endpoint_spiffe_id,
                %error,
                "failed to check whether a bundle exists for the endpoint SPIFFE ID trust domain"
            ),
        }
    }
}

/// What the audit log names as the method of a relationship written from the configuration
/// file.
pub const CONFIGURATION_METHOD: &str = "[federation.trust_domains]";

/// The audit record of a created or updated relationship: what it is now, whether a bundle
/// came with it, and for an update which fields it wrote.
fn audit_details(
    method: &str,
    relationship: &FederationRelationship,
    bundle_given: bool,
    mask: Option<&RelationshipMask>,
) -> serde_json::Value {
    let mut details = serde_json::json!({
        "method": method,
        "trust_domain": relationship.trust_domain().name(),
        "bundle_endpoint_url": relationship.bundle_endpoint_url().as_str(),
        "bundle_endpoint_profile": relationship.profile().name(),
        "endpoint_spiffe_id": relationship
            .profile()
            .endpoint_spiffe_id()
            .map(|id| id.as_str().to_owned()),
        "trust_domain_bundle_set": bundle_given,
    });
    if let Some(mask) = mask {
        details["fields"] = serde_json::json!({
            "bundle_endpoint_url": mask.bundle_endpoint_url,
            "bundle_endpoint_profile": mask.bundle_endpoint_profile,
            "trust_domain_bundle": mask.trust_domain_bundle,
        });
    }
    if bundle_given && let Some(bundle) = relationship.trust_domain_bundle() {
        details["trust_domain_bundle_sequence_number"] = bundle.sequence_number().into();
    }
    details
}

/// Requests for foreign bundles to be fetched now, and the news that federation
/// relationships changed: what the bundle-fetching client listens to (see the module
/// documentation).
#[derive(Debug)]
pub struct BundleRefresh {
    requests: Mutex<HashMap<TrustDomain, Arc<Notify>>>,
    relationships: watch::Sender<u64>,
}

impl Default for BundleRefresh {
    fn default() -> Self {
        Self::new()
    }
}

impl BundleRefresh {
    /// No requests yet; relationship generation 0.
    pub fn new() -> Self {
        Self {
            requests: Mutex::default(),
            relationships: watch::channel(0).0,
        }
    }

    /// The signal of refresh requests for `trust_domain`, the same `Notify` for every call:
    /// `notified().await` completes once per request, and a request made while nothing waits
    /// is kept (one, however many were made) until something does.
    pub fn refresh_requests(&self, trust_domain: &TrustDomain) -> Arc<Notify> {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(requests.entry(trust_domain.clone()).or_default())
    }

    /// Asks for `trust_domain`'s bundle to be fetched now.
    pub fn request_refresh(&self, trust_domain: &TrustDomain) {
        self.refresh_requests(trust_domain).notify_one();
    }

    /// A receiver whose value (a generation count) moves whenever federation relationships
    /// changed: `changed().await` completes after each move, then read the relationships
    /// from the datastore.
    pub fn relationships(&self) -> watch::Receiver<u64> {
        self.relationships.subscribe()
    }

    /// Tells every receiver of [`BundleRefresh::relationships`] that relationships changed.
    pub(crate) fn relationships_changed(&self) {
        self.relationships
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).expect("valid trust domain")
    }

    /// Whether `future` completes at its first poll.
    fn ready_at_once(future: impl Future) -> bool {
        let mut future = std::pin::pin!(future);
        let mut context = Context::from_waker(Waker::noop());
        matches!(future.as_mut().poll(&mut context), Poll::Ready(_))
    }

    #[test]
    fn a_refresh_requested_before_anyone_waits_is_kept_once() {
        let refresh = BundleRefresh::new();
        let requests = refresh.refresh_requests(&td("partner.example"));
        assert!(!ready_at_once(requests.notified()), "nothing asked yet");
        refresh.request_refresh(&td("partner.example"));
        refresh.request_refresh(&td("partner.example"));
        assert!(ready_at_once(requests.notified()), "the kept request");
        assert!(
            !ready_at_once(requests.notified()),
            "two requests before anyone waited are one"
        );
        // Another trust domain's requests are its own.
        refresh.request_refresh(&td("other.example"));
        assert!(!ready_at_once(requests.notified()));
        assert!(ready_at_once(
            refresh.refresh_requests(&td("other.example")).notified()
        ));
    }

    #[test]
    fn every_receiver_sees_relationships_change() {
        let refresh = BundleRefresh::new();
        let mut first = refresh.relationships();
        let mut second = refresh.relationships();
        assert!(!ready_at_once(first.changed()));
        refresh.relationships_changed();
        assert!(ready_at_once(first.changed()));
        assert!(ready_at_once(second.changed()));
        assert_eq!(*first.borrow_and_update(), 1);
        assert!(!ready_at_once(first.changed()));
    }
}
