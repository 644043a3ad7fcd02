//! The server's persistent state behind one [`Datastore`] trait: registration entries, attested
//! agents, join tokens, trust bundles, federation relationships, the CA journal and a change
//! log.
//!
//! Three implementations pass the same conformance suite (`tests/it/datastore.rs`):
//! [`SqlStore`], SQLite through sqlx with versioned migrations (the default, embedded under
//! `data_dir`), [`PgStore`], PostgreSQL for several servers sharing one datastore, and
//! [`MemoryStore`] for tests. All store times in whole unix seconds, so a value
//! read back is the value written truncated to the second, whichever store holds it.
//!
//! Every write that changes an entry, an agent, a bundle, a federation relationship or a policy
//! exception bumps one global revision counter and records a [`Change`]; readers follow the log with [`Datastore::changes_since`] to update an
//! in-memory index per change instead of rebuilding it.
//!
//! CA private keys never go into the datastore; the CA journal is an opaque blob naming them.

use std::collections::BTreeSet;
use std::fmt;
use std::time::SystemTime;

use lanyard_core::bundle::TrustBundle;
use lanyard_core::bundle_fetch::FetchedBundleChange;
use lanyard_core::federation::{FederationRelationship, RelationshipMask};
use lanyard_core::policy::Exception;
use lanyard_core::revocation::{Revocation, RevocationAck, RevokedSerial};
use lanyard_core::{EntryId, RegistrationEntry, SelectorSet, SpiffeId, TrustDomain};

mod convert;
pub mod governance;
pub mod memory;
pub mod metered;
pub mod postgres;
pub mod sql;
pub mod transfer;

pub use governance::{EntryUsage, Issuance, IssuanceFilter, IssuanceKind};
pub use lanyard_core::agent::AttestedAgent;
pub use memory::MemoryStore;
pub use postgres::PgStore;
pub use sql::SqlStore;

/// The result type of every datastore operation.
pub type Result<T, E = DatastoreError> = std::result::Result<T, E>;

/// Why a datastore operation failed. The API layer maps each variant to one gRPC code.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DatastoreError {
    /// The record does not exist (`NOT_FOUND`).
    #[error("{0} not found")]
    NotFound(String),
    /// A record with the same key exists (`ALREADY_EXISTS`). For entries, `existing` is the
    /// stored entry, which SPIRE returns to the caller.
    #[error("{what} already exists")]
    AlreadyExists {
        /// What collided, e.g. `entry "abc"`.
        what: String,
        /// The stored entry, when the collision is with a registration entry.
        existing: Option<Box<RegistrationEntry>>,
    },
    /// A compare-and-set failed: the record changed since the caller read it (`ABORTED`).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The operation needs state that is not there, e.g. an entry federating with a trust
    /// domain that has no bundle (`FAILED_PRECONDITION`).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The request itself is malformed, e.g. an empty selector filter (`INVALID_ARGUMENT`).
    #[error("invalid {0}")]
    Invalid(String),
    /// The storage backend failed, or holds data this version cannot read (`INTERNAL`).
    #[error("datastore backend error: {0}")]
    Backend(String),
}

impl DatastoreError {
    /// The stored entry an [`DatastoreError::AlreadyExists`] collided with, if any.
    pub fn existing_entry(&self) -> Option<&RegistrationEntry> {
        match self {
            Self::AlreadyExists {
                existing: Some(entry),
                ..
            } => Some(entry),
            _ => None,
        }
    }

    pub(crate) fn entry_exists(entry: &RegistrationEntry, what: String) -> Self {
        Self::AlreadyExists {
            what,
            existing: Some(Box::new(entry.clone())),
        }
    }

    pub(crate) fn exists(what: impl Into<String>) -> Self {
        Self::AlreadyExists {
            what: what.into(),
            existing: None,
        }
    }
}

/// How a set-valued filter compares a record's set (the candidate) with the set given in the
/// filter. The four modes of SPIRE's `SelectorMatch` and `FederatesWithMatch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MatchMode {
    /// The candidate set equals the given set.
    #[default]
    Exact,
    /// The candidate set is non-empty and contained in the given set.
    Subset,
    /// The candidate set contains every element of the given set.
    Superset,
    /// The two sets share at least one element.
    Any,
}

impl MatchMode {
    /// Whether `candidate` matches `given` under this mode.
    pub fn matches<T: Ord>(self, candidate: &BTreeSet<T>, given: &BTreeSet<T>) -> bool {
        match self {
            Self::Exact => candidate == given,
            Self::Subset => !candidate.is_empty() && candidate.is_subset(given),
            Self::Superset => candidate.is_superset(given),
            Self::Any => !candidate.is_disjoint(given),
        }
    }

    fn matches_selectors(self, candidate: &SelectorSet, given: &SelectorSet) -> bool {
        match self {
            Self::Exact => candidate == given,
            Self::Subset => !candidate.is_empty() && candidate.is_subset(given),
            Self::Superset => given.is_subset(candidate),
            Self::Any => candidate.intersects(given),
        }
    }
}

/// Selects records by their selector set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorFilter {
    /// The given set; must not be empty.
    pub selectors: SelectorSet,
    /// How the record's set is compared with it.
    pub mode: MatchMode,
}

/// Selects entries by the trust domains they federate with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatesWithFilter {
    /// The given trust domains; must not be empty.
    pub trust_domains: BTreeSet<TrustDomain>,
    /// How the entry's set is compared with it.
    pub mode: MatchMode,
}

/// Which entries [`Datastore::list_entries`] and [`Datastore::count_entries`] return: those
/// matching every filter that is set. The default matches all entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryFilter {
    /// Entries issuing exactly this SPIFFE ID.
    pub by_spiffe_id: Option<SpiffeId>,
    /// Entries under exactly this parent.
    pub by_parent_id: Option<SpiffeId>,
    /// Entries whose selectors match.
    pub by_selectors: Option<SelectorFilter>,
    /// Entries whose `federates_with` matches.
    pub by_federates_with: Option<FederatesWithFilter>,
    /// Entries with exactly this hint.
    pub by_hint: Option<String>,
    /// Entries with this `downstream` flag.
    pub by_downstream: Option<bool>,
}

impl EntryFilter {
    /// Checks the filter itself: set filters need a non-empty set, as in SPIRE.
    pub fn validate(&self) -> Result<()> {
        if self
            .by_selectors
            .as_ref()
            .is_some_and(|f| f.selectors.is_empty())
        {
            return Err(DatastoreError::Invalid(
                "selector filter: empty selector set".to_owned(),
            ));
        }
        if self
            .by_federates_with
            .as_ref()
            .is_some_and(|f| f.trust_domains.is_empty())
        {
            return Err(DatastoreError::Invalid(
                "federates_with filter: empty trust domain set".to_owned(),
            ));
        }
        Ok(())
    }

    /// Whether `entry` passes every filter that is set.
    pub fn matches(&self, entry: &RegistrationEntry) -> bool {
        self.by_spiffe_id
            .as_ref()
            .is_none_or(|id| *id == entry.spiffe_id)
            && self
                .by_parent_id
                .as_ref()
                .is_none_or(|id| *id == entry.parent_id)
            && self
                .by_selectors
                .as_ref()
                .is_none_or(|f| f.mode.matches_selectors(&entry.selectors, &f.selectors))
            && self
                .by_federates_with
                .as_ref()
                .is_none_or(|f| f.mode.matches(&entry.federates_with, &f.trust_domains))
            && self.by_hint.as_ref().is_none_or(|hint| *hint == entry.hint)
            && self
                .by_downstream
                .is_none_or(|downstream| downstream == entry.downstream)
    }
}

/// Entries per page when the server loads them all ([`Datastore::list_all_entries`], the
/// index at startup): large enough that the round trips do not count, small enough that one
/// page of rows is never a large part of the server's memory.
pub const ENTRY_LOAD_PAGE: u32 = 10_000;

/// One page of a listing: resume after `token` (the `next_token` of the previous page, `None`
/// for the first page), at most `size` records (at least 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Where to resume; `None` starts at the beginning.
    pub token: Option<String>,
    /// The most records to return; must be positive.
    pub size: u32,
}

impl PageRequest {
    /// The first page of `size` records.
    pub fn first(size: u32) -> Self {
        Self { token: None, size }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.size == 0 {
            return Err(DatastoreError::Invalid(
                "page size: must be positive".to_owned(),
            ));
        }
        Ok(())
    }
}

/// A page of records and the token of the next page, `None` when this is the last one.
pub type Page<T> = (Vec<T>, Option<String>);

/// Which agents [`Datastore::list_agents`] and [`Datastore::count_agents`] return: those
/// matching every filter that is set. The default matches all agents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFilter {
    /// Agents attested by this node attestor.
    pub by_attestation_type: Option<String>,
    /// Agents whose node selectors match.
    pub by_selectors: Option<SelectorFilter>,
    /// Banned (`true`) or not banned (`false`) agents.
    pub by_banned: Option<bool>,
    /// Agents with this `can_reattest` flag.
    pub by_can_reattest: Option<bool>,
    /// Agents whose current SVID expires strictly before this instant.
    pub by_expires_before: Option<SystemTime>,
}

impl AgentFilter {
    /// Checks the filter itself: a selector filter needs a non-empty set.
    pub fn validate(&self) -> Result<()> {
        if self
            .by_selectors
            .as_ref()
            .is_some_and(|f| f.selectors.is_empty())
        {
            return Err(DatastoreError::Invalid(
                "selector filter: empty selector set".to_owned(),
            ));
        }
        Ok(())
    }

    /// Whether `agent` passes every filter that is set.
    pub fn matches(&self, agent: &AttestedAgent) -> bool {
        self.by_attestation_type
            .as_ref()
            .is_none_or(|t| *t == agent.attestation_type)
            && self
                .by_selectors
                .as_ref()
                .is_none_or(|f| f.mode.matches_selectors(&agent.selectors, &f.selectors))
            && self
                .by_banned
                .is_none_or(|banned| banned == agent.is_banned())
            && self
                .by_can_reattest
                .is_none_or(|can| can == agent.can_reattest)
            && self
                .by_expires_before
                .is_none_or(|before| agent.not_after < before)
    }
}

/// A join token: a one-time secret an agent presents to attest.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    /// The token value.
    pub token: String,
    /// After this instant the token is refused.
    pub expires_at: SystemTime,
}

impl fmt::Debug for JoinTokenRecord {
    // An unused token is a credential: keep it out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinTokenRecord")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// What to do with entries that federate with a bundle being deleted (SPIRE's
/// `BatchDeleteFederatedBundle` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BundleDeleteMode {
    /// Refuse with [`DatastoreError::FailedPrecondition`] if any entry federates with it.
    #[default]
    Restrict,
    /// Delete the entries that federate with it too.
    Delete,
    /// Remove the trust domain from those entries' `federates_with` (an update of each).
    Dissociate,
}

/// What a [`Change`] did to its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// The record was created.
    Created,
    /// The record was changed.
    Updated,
    /// The record was deleted.
    Deleted,
}

impl ChangeKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Deleted => "deleted",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Self> {
        match s {
            "created" => Ok(Self::Created),
            "updated" => Ok(Self::Updated),
            "deleted" => Ok(Self::Deleted),
            other => Err(DatastoreError::Backend(format!(
                "unknown change kind {other:?} in the change log"
            ))),
        }
    }
}

/// The record a [`Change`] is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChangeSubject {
    /// A registration entry.
    Entry(EntryId),
    /// An attested agent (including its node selectors).
    Agent(SpiffeId),
    /// A trust bundle.
    Bundle(TrustDomain),
    /// A policy exception, by ID.
    Exception(String),
    /// A federation relationship, by its foreign trust domain.
    FederationRelationship(TrustDomain),
    /// A revocation, by ID.
    Revocation(String),
    /// A published CRL, by the authority ID that signed it.
    Crl(String),
}

/// The newest CRL of one X.509 authority, as the server holding its key published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedCrl {
    /// The signer's subject key ID (hex).
    pub authority_id: String,
    /// The DER CRL.
    pub der: Vec<u8>,
    /// Its CRL number.
    pub number: u64,
    /// Its `nextUpdate`, in whole seconds.
    pub next_update: SystemTime,
}

impl ChangeSubject {
    pub(crate) fn kind_str(&self) -> &'static str {
        match self {
            Self::Entry(_) => "entry",
            Self::Agent(_) => "agent",
            Self::Bundle(_) => "bundle",
            Self::Exception(_) => "exception",
            Self::FederationRelationship(_) => "federation_relationship",
            Self::Revocation(_) => "revocation",
            Self::Crl(_) => "crl",
        }
    }

    pub(crate) fn key(&self) -> &str {
        match self {
            Self::Entry(id) => id.as_str(),
            Self::Agent(id) => id.as_str(),
            Self::Bundle(td) | Self::FederationRelationship(td) => td.name(),
            Self::Exception(id) | Self::Revocation(id) | Self::Crl(id) => id,
        }
    }

    pub(crate) fn parse(kind: &str, key: &str) -> Result<Self> {
        let corrupt = |e: &dyn fmt::Display| {
            DatastoreError::Backend(format!("change log holds an invalid {kind} key: {e}"))
        };
        match kind {
            "entry" => EntryId::new(key).map(Self::Entry).map_err(|e| corrupt(&e)),
            "agent" => key
                .parse::<SpiffeId>()
                .map(Self::Agent)
                .map_err(|e| corrupt(&e)),
            "bundle" => TrustDomain::new(key)
                .map(Self::Bundle)
                .map_err(|e| corrupt(&e)),
            "exception" if !key.is_empty() => Ok(Self::Exception(key.to_owned())),
            "revocation" if !key.is_empty() => Ok(Self::Revocation(key.to_owned())),
            "crl" if !key.is_empty() => Ok(Self::Crl(key.to_owned())),
            "federation_relationship" => TrustDomain::new(key)
                .map(Self::FederationRelationship)
                .map_err(|e| corrupt(&e)),
            other => Err(DatastoreError::Backend(format!(
                "unknown change subject {other:?} in the change log"
            ))),
        }
    }
}

/// Raised when the datastore announces a change ([`Datastore::change_signal`]). Dropping it
/// stops the listening behind it.
#[derive(Debug)]
pub struct ChangeSignal {
    notify: std::sync::Arc<tokio::sync::Notify>,
    listener: tokio::task::AbortHandle,
}

impl ChangeSignal {
    /// A signal raised through `notify` by the task behind `listener`.
    pub fn new(
        notify: std::sync::Arc<tokio::sync::Notify>,
        listener: tokio::task::AbortHandle,
    ) -> Self {
        Self { notify, listener }
    }

    /// Completes at the next announcement (or at once if one came since the last call).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for ChangeSignal {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// One entry of the change log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Change {
    /// The global revision this change produced; strictly increasing, never reused.
    pub revision: i64,
    /// What happened.
    pub kind: ChangeKind,
    /// To which record.
    pub subject: ChangeSubject,
}

/// The server's persistent state. Implementations are safe to share (`Arc<dyn Datastore>`),
/// make each operation atomic, and make a write durable before returning `Ok`.
#[async_trait::async_trait]
pub trait Datastore: Send + Sync + fmt::Debug {
    // ----- registration entries -----

    /// Stores a new entry with `revision_number` 0 and returns it as stored.
    ///
    /// Fails with [`DatastoreError::AlreadyExists`], carrying the stored entry, when an entry
    /// with the same ID exists or a *similar* one does (same SPIFFE ID, parent ID and selector
    /// set); with [`DatastoreError::Invalid`] if it has no selectors; and with
    /// [`DatastoreError::FailedPrecondition`] if it federates with a trust domain that has no
    /// bundle.
    async fn create_entry(&self, entry: RegistrationEntry) -> Result<RegistrationEntry>;

    /// The entry with this ID.
    async fn get_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>>;

    /// Replaces the entry with `entry.id`, keeping its `created_at` and setting
    /// `revision_number` to the stored one plus 1; returns it as stored.
    ///
    /// With `expected_revision`, fails with [`DatastoreError::Conflict`] unless the stored
    /// `revision_number` equals it. Fails with [`DatastoreError::AlreadyExists`] if the result
    /// would be similar to another entry.
    async fn update_entry(
        &self,
        entry: RegistrationEntry,
        expected_revision: Option<i64>,
    ) -> Result<RegistrationEntry>;

    /// Deletes the entry and returns it. With `expected_revision`, fails with
    /// [`DatastoreError::Conflict`] (and deletes nothing) unless the stored `revision_number`
    /// equals it.
    async fn delete_entry(
        &self,
        id: &EntryId,
        expected_revision: Option<i64>,
    ) -> Result<RegistrationEntry>;

    /// A page of the entries matching `filter`, ordered by entry ID. `None` returns them all.
    async fn list_entries(
        &self,
        filter: &EntryFilter,
        page: Option<PageRequest>,
    ) -> Result<Page<RegistrationEntry>>;

    /// How many entries match `filter`.
    async fn count_entries(&self, filter: &EntryFilter) -> Result<u64>;

    /// A page of every entry, ordered by ID, read where the server's decisions are read (the
    /// primary, never a read replica, which may lag behind the change log): for building the
    /// authorization index at startup a page at a time.
    async fn list_entries_page(&self, page: PageRequest) -> Result<Page<RegistrationEntry>>;

    /// Every entry, ordered by ID, from the primary ([`Datastore::list_entries_page`]).
    async fn list_all_entries(&self) -> Result<Vec<RegistrationEntry>> {
        let mut entries = Vec::new();
        let mut token = None;
        loop {
            let (page, next) = self
                .list_entries_page(PageRequest {
                    token: token.take(),
                    size: ENTRY_LOAD_PAGE,
                })
                .await?;
            entries.extend(page);
            match next {
                Some(next) => token = Some(next),
                None => return Ok(entries),
            }
        }
    }

    /// Deletes the entries whose `expires_at` is strictly before `expires_before`, returning
    /// their IDs.
    async fn prune_entries(&self, expires_before: SystemTime) -> Result<Vec<EntryId>>;

    // ----- change log -----

    /// The latest revision; 0 before the first change.
    async fn current_revision(&self) -> Result<i64>;

    /// The changes with a revision strictly greater than `revision`, oldest first.
    async fn changes_since(&self, revision: i64) -> Result<Vec<Change>>;

    /// A signal raised soon after another process commits a change, so that a follower need
    /// not wait for its next poll of [`Datastore::changes_since`]; `None` where the backend
    /// cannot announce changes (the follower polls). A signal may be raised with nothing new
    /// to read, and announcements can be lost: it shortens the wait, the poll stays.
    async fn change_signal(&self) -> Result<Option<ChangeSignal>> {
        Ok(None)
    }

    /// Forgets changes with a revision strictly less than `before`, returning how many.
    /// The revision counter is not affected.
    async fn prune_changes(&self, before: i64) -> Result<u64>;

    // ----- attested agents -----

    /// Stores a new agent, stamping `created_at` and `updated_at`.
    async fn create_agent(&self, agent: AttestedAgent) -> Result<AttestedAgent>;

    /// The agent with this SPIFFE ID.
    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AttestedAgent>>;

    /// Replaces every field of the agent with `agent.spiffe_id` (selectors included) but
    /// `created_at`, stamping `updated_at`. Never lifts a ban: a banned agent is refused with
    /// [`DatastoreError::FailedPrecondition`], so a write prepared from a read made before
    /// the ban (a renewal, a serial promotion, a re-attestation) cannot undo it; only
    /// [`Datastore::delete_agent`] (eviction) does.
    async fn update_agent(&self, agent: AttestedAgent) -> Result<AttestedAgent>;

    /// Replaces the agent's node selectors.
    async fn set_agent_selectors(
        &self,
        id: &SpiffeId,
        selectors: SelectorSet,
    ) -> Result<AttestedAgent>;

    /// Evicts the agent: deletes its record, which also lifts a ban. Returns the record.
    async fn delete_agent(&self, id: &SpiffeId) -> Result<AttestedAgent>;

    /// Bans the agent: clears its current and new serial numbers.
    async fn ban_agent(&self, id: &SpiffeId) -> Result<AttestedAgent>;

    /// A page of the agents matching `filter`, ordered by SPIFFE ID. `None` returns them all.
    async fn list_agents(
        &self,
        filter: &AgentFilter,
        page: Option<PageRequest>,
    ) -> Result<Page<AttestedAgent>>;

    /// How many agents match `filter`.
    async fn count_agents(&self, filter: &AgentFilter) -> Result<u64>;

    // ----- join tokens -----

    /// Stores a new join token. [`DatastoreError::AlreadyExists`] if the value is in use.
    async fn create_join_token(
        &self,
        token: &str,
        expires_at: SystemTime,
    ) -> Result<JoinTokenRecord>;

    /// Atomically deletes and returns the token: of concurrent takes exactly one succeeds, the
    /// rest get [`DatastoreError::NotFound`]. Expiry is the caller's to check.
    async fn take_join_token(&self, token: &str) -> Result<JoinTokenRecord>;

    /// Deletes the tokens that expire strictly before `expires_before`, returning how many.
    async fn prune_join_tokens(&self, expires_before: SystemTime) -> Result<u64>;

    // ----- trust bundles -----

    /// The bundle of `trust_domain`, with taint flags, JWT key expiries, sequence number and
    /// refresh hint as stored.
    async fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<Option<TrustBundle>>;

    /// Stores a new bundle. [`DatastoreError::AlreadyExists`] if the trust domain has one.
    async fn create_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle>;

    /// Replaces an existing bundle. [`DatastoreError::NotFound`] if there is none.
    async fn update_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle>;

    /// Creates or replaces the bundle.
    async fn set_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle>;

    /// Atomically adds the authorities of `bundle` to the stored bundle of its trust domain
    /// (creating it if absent) and returns the result. The sequence number moves only if
    /// something was added; the stored refresh hint is kept unless there was no bundle.
    ///
    /// This is how several servers sharing one datastore each publish their own CA.
    async fn append_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle>;

    /// Stores `bundle`, fetched from its trust domain's bundle endpoint, as that trust
    /// domain's bundle unless the stored one is the same or newer
    /// ([`lanyard_core::bundle_fetch::compare_fetched`]), deciding and writing in one
    /// transaction, so that servers sharing the datastore and fetching at once never move it
    /// back to an older sequence number. Returns the comparison; only
    /// [`FetchedBundleChange::Newer`] wrote anything.
    async fn store_fetched_bundle(&self, bundle: TrustBundle) -> Result<FetchedBundleChange>;

    /// Deletes the bundle of `trust_domain`, handling entries that federate with it per `mode`.
    async fn delete_bundle(
        &self,
        trust_domain: &TrustDomain,
        mode: BundleDeleteMode,
    ) -> Result<TrustBundle>;

    /// A page of bundles ordered by trust domain name. `None` returns them all.
    async fn list_bundles(&self, page: Option<PageRequest>) -> Result<Page<TrustBundle>>;

    /// How many bundles are stored (own and federated).
    async fn count_bundles(&self) -> Result<u64>;

    // ----- federation relationships -----

    /// Stores a new federation relationship. If it carries a bundle, that bundle becomes its
    /// trust domain's federated bundle (created or replaced) in the same transaction, as in
    /// SPIRE. Returns it as stored, with the bundle as stored if one was given and none
    /// otherwise. [`DatastoreError::AlreadyExists`] if the trust domain has one.
    async fn create_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<FederationRelationship>;

    /// The relationship with `trust_domain`, carrying the trust domain's federated bundle as
    /// stored now, if there is one.
    async fn get_federation_relationship(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>>;

    /// Writes the fields of `update` that `mask` selects over the stored relationship of its
    /// trust domain (a bundle only if `update` carries one, stored as in
    /// [`Datastore::create_federation_relationship`]), and returns the result with the trust
    /// domain's bundle as stored now. [`DatastoreError::NotFound`] if there is none.
    async fn update_federation_relationship(
        &self,
        update: FederationRelationship,
        mask: RelationshipMask,
    ) -> Result<FederationRelationship>;

    /// Deletes the relationship with `trust_domain` and returns it (without its bundle). The
    /// trust domain's federated bundle stays, as in SPIRE. [`DatastoreError::NotFound`] if
    /// there is none.
    async fn delete_federation_relationship(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<FederationRelationship>;

    /// A page of relationships ordered by trust domain name, each with its trust domain's
    /// bundle as stored now. `None` returns them all.
    async fn list_federation_relationships(
        &self,
        page: Option<PageRequest>,
    ) -> Result<Page<FederationRelationship>>;

    // ----- CA journal and server metadata -----

    /// The CA journal of the server identified by `server_key`: an opaque blob owned by the CA
    /// manager.
    async fn get_ca_journal(&self, server_key: &str) -> Result<Option<Vec<u8>>>;

    /// Stores (replaces) the CA journal of `server_key`.
    async fn set_ca_journal(&self, server_key: &str, journal: &[u8]) -> Result<()>;

    /// A small server-state value by key.
    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Stores (replaces) a small server-state value.
    async fn set_meta(&self, key: &str, value: &[u8]) -> Result<()>;

    // ----- exceptions -----

    /// Stores a new exception. [`DatastoreError::AlreadyExists`] if the ID is taken.
    async fn create_exception(&self, exception: Exception) -> Result<Exception>;

    /// The exception with this ID.
    async fn get_exception(&self, id: &str) -> Result<Option<Exception>>;

    /// Replaces the stored exception with `exception.id`, if it is still at
    /// `exception.revision` (the revision it was read at), and moves its revision on by one.
    /// [`DatastoreError::NotFound`] if there is none, [`DatastoreError::Conflict`] if it has
    /// moved. A new exception starts at revision 1.
    async fn update_exception(&self, exception: Exception) -> Result<Exception>;

    /// Every exception, active or not, ordered by ID.
    async fn list_exceptions(&self) -> Result<Vec<Exception>>;

    // ----- usage ledger -----

    /// Records issued SVIDs; one already recorded (same kind and serial) is kept as it is.
    async fn record_issuances(&self, issuances: &[Issuance]) -> Result<()>;

    /// A page of the issuances matching `filter`, newest first. `None` returns them all.
    async fn list_issuances(
        &self,
        filter: &IssuanceFilter,
        page: Option<PageRequest>,
    ) -> Result<Page<Issuance>>;

    /// Forgets issuances issued strictly before `issued_before`, returning how many.
    async fn prune_issuances(&self, issued_before: SystemTime) -> Result<u64>;

    /// Records that `agent_id` served each entry to a workload at the given time; a time
    /// older than the one stored is ignored.
    async fn record_served(
        &self,
        agent_id: &SpiffeId,
        served: &[(String, SystemTime)],
    ) -> Result<()>;

    /// Usage per entry and agent, ordered by entry ID then agent ID: every pair with an
    /// issuance in the ledger or a report of serving. Only `entry_ids` when not empty.
    async fn list_usage(&self, entry_ids: &[String]) -> Result<Vec<EntryUsage>>;

    // Revocations.

    /// Stores `revocation` with the serials it puts on the CRLs, numbered after every earlier
    /// one (its `sequence` is assigned here), and logs its creation. An existing ID is
    /// [`DatastoreError::AlreadyExists`].
    async fn create_revocation(
        &self,
        revocation: Revocation,
        serials: &[RevokedSerial],
    ) -> Result<Revocation>;

    /// The revocation with this ID, if any.
    async fn get_revocation(&self, id: &str) -> Result<Option<Revocation>>;

    /// The revocations numbered after `after_sequence`, in order.
    async fn list_revocations(&self, after_sequence: i64) -> Result<Vec<Revocation>>;

    /// Adds serials to the revocation `revocation_id` (those its agents report having
    /// dropped); a serial it lists already is left as it is. Logs an update when one is new.
    async fn add_revoked_serials(
        &self,
        revocation_id: &str,
        serials: &[RevokedSerial],
    ) -> Result<()>;

    /// The serials of one revocation, or with `None` of every revocation, ordered by serial.
    async fn list_revoked_serials(&self, revocation_id: Option<&str>)
    -> Result<Vec<RevokedSerial>>;

    /// Records that `agent_id` has applied every revocation up to `sequence` at `at`; a lower
    /// sequence than the one recorded leaves the record as it is.
    async fn acknowledge_revocations(
        &self,
        agent_id: &SpiffeId,
        sequence: i64,
        at: SystemTime,
    ) -> Result<()>;

    /// Every agent's acknowledgement, ordered by agent ID.
    async fn list_revocation_acks(&self) -> Result<Vec<RevocationAck>>;

    /// The acknowledgement of `agent_id`, if it has made one.
    async fn get_revocation_ack(&self, agent_id: &SpiffeId) -> Result<Option<RevocationAck>>;

    /// Publishes CRLs this server signed: each replaces its authority's stored one when its
    /// number is higher (a change logged per list written), so servers sharing the datastore
    /// serve each other's. Returns how many were written.
    async fn publish_crls(&self, crls: &[PublishedCrl]) -> Result<usize>;

    /// Every published CRL, ordered by authority ID.
    async fn list_published_crls(&self) -> Result<Vec<PublishedCrl>>;

    /// Deletes the published CRLs whose `next_update` is before `before`; returns how many.
    async fn prune_published_crls(&self, before: SystemTime) -> Result<u64>;

    /// Deletes the revocations that expired before `expired_before`, with their serials;
    /// returns how many.
    async fn prune_revocations(&self, expired_before: SystemTime) -> Result<u64>;
}

/// The error for a record that is not there, naming it.
pub(crate) fn not_found(what: &str, key: &str) -> DatastoreError {
    DatastoreError::NotFound(format!("{what} {key:?}"))
}

/// The refusal of [`Datastore::update_agent`] on a banned agent.
pub(crate) fn banned_agent(id: &SpiffeId) -> DatastoreError {
    DatastoreError::FailedPrecondition(format!("agent {id} is banned"))
}

pub(crate) fn missing_federated_bundle(trust_domain: &TrustDomain) -> DatastoreError {
    DatastoreError::FailedPrecondition(format!(
        "no bundle for federated trust domain {:?}",
        trust_domain.name()
    ))
}

pub(crate) fn exception_conflict(id: &str, expected: i64, actual: i64) -> DatastoreError {
    DatastoreError::Conflict(format!(
        "exception {id:?} is at revision {actual}, not the expected {expected}"
    ))
}

pub(crate) fn revision_conflict(id: &EntryId, expected: i64, actual: i64) -> DatastoreError {
    DatastoreError::Conflict(format!(
        "entry {:?} is at revision {actual}, not the expected {expected}",
        id.as_str()
    ))
}

pub(crate) fn bundle_in_use(trust_domain: &TrustDomain, n_entries: usize) -> DatastoreError {
    DatastoreError::FailedPrecondition(format!(
        "{n_entries} entries federate with {:?}; delete or dissociate them first",
        trust_domain.name()
    ))
}

/// Adds the authorities of `new` to `stored`; `None` if that changes nothing.
pub(crate) fn merge_bundles(
    stored: &TrustBundle,
    new: &TrustBundle,
) -> Result<Option<TrustBundle>> {
    let mut merged = stored.clone();
    let mut changed = false;
    for authority in new.x509_authorities() {
        changed |= merged.add_x509_authority(authority.clone());
    }
    for authority in new.jwt_authorities() {
        changed |= merged
            .add_jwt_authority(authority.clone())
            .map_err(|e| DatastoreError::Invalid(format!("bundle append: {e}")))?;
    }
    Ok(changed.then_some(merged))
}
