//! The state every API service shares: a bundle of components, each owning one concern —
//! the configuration, the datastore, the CA, the authorization index and its change feed
//! ([`IndexFeed`]), the policy and its decisions ([`IssuanceJudge`]), the audit trail
//! ([`AuditTrail`]), the usage ledger, the clock and the bundle refresh hook
//! ([`BundleRefresh`]) — and the few questions that need more than one of them (which entries
//! an agent may obtain, who is an admin).

use std::sync::Arc;
use std::time::SystemTime;

use lanyard_core::{EntryId, RegistrationEntry, SpiffeId, TrustBundle, TrustDomain};

use crate::audit::{AuditLog, AuditTrail};
use crate::authz::{AuthorizationIndex, IndexFeed};
use crate::ca::CaManager;
use crate::config::ServerConfig;
use crate::datastore::{AgentFilter, Datastore, DatastoreError, Issuance, PageRequest};
use crate::judge::IssuanceJudge;
use crate::ledger::Ledger;
use crate::metrics::ServerMetrics;
use crate::policy::PolicyHolder;
use crate::relationships::BundleRefresh;
use crate::revocations::RevocationState;

/// A source of the current time; tests substitute a controllable one.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(SystemTime::now)
}

/// Shared server state.
pub struct ServerState {
    /// The configuration the server runs with.
    pub config: ServerConfig,
    /// The datastore.
    pub store: Arc<dyn Datastore>,
    /// The CA manager.
    pub ca: Arc<CaManager>,
    /// The authorization index, fed from the datastore's change log.
    pub index: IndexFeed,
    /// The policy, its exceptions and its decisions at issuance.
    pub judge: IssuanceJudge,
    /// The audit log and its checkpoint.
    pub audit: Arc<AuditTrail>,
    /// Bundle refresh requests and relationship changes, for the client that fetches
    /// federated bundles.
    pub bundle_refresh: BundleRefresh,
    /// The counters of signing, attestation and policy decisions (see [`crate::metrics`]).
    pub metrics: ServerMetrics,
    /// The CRLs and the newest revocation sequence.
    pub revocations: RevocationState,
    clock: Clock,
    ledger: Option<Ledger>,
    rotation_requested: tokio::sync::Notify,
    /// What the agents' change streams announce.
    changes: tokio::sync::watch::Sender<ChangePoint>,
    /// While set, change streams announce nothing (tests of the agents' safety net).
    notices_held: std::sync::atomic::AtomicBool,
    /// The policy generation and the active exceptions at the last catch-up: when these move
    /// without a write (a policy reloaded, an exception lapsing), agents are told too.
    decision_context: std::sync::Mutex<Option<(u64, Vec<String>)>>,
}

/// Where the server's view stands, as the agents' change streams announce it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChangePoint {
    /// The change-log revision the index has applied.
    pub revision: i64,
    /// Counts changes that are not writes: a policy reloaded, an exception lapsing.
    pub sequence: u64,
    /// Counts catch-ups that found a bundle changed (this trust domain's or a federated
    /// one). Not sent: it tells each change stream that its agent must hear of it.
    pub bundles: u64,
    /// The highest revocation sequence (0 when there is none).
    pub revocations: i64,
    /// The version of the CRLs in force ([`crate::revocations::Crls::version`]), sent as the
    /// notice's `crl_number`: a new one (a serial added, the periodic re-signing, another
    /// server's lists) tells every agent's stream to have its agent sync.
    pub crls: u64,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("trust_domain", &self.config.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ServerState {
    /// Builds the state, loading the authorization index from the datastore.
    pub async fn new(
        config: ServerConfig,
        store: Arc<dyn Datastore>,
        ca: Arc<CaManager>,
        clock: Clock,
    ) -> Result<Self, DatastoreError> {
        // Read first: a change committed while the index is loaded is applied again by the
        // first catch-up, which is harmless (each change re-reads its record).
        let revision = store.current_revision().await?;
        // A page at a time into the index, so that the rows of every entry are never in
        // memory at once beside it (an allocator keeps such a peak long after).
        let mut index = AuthorizationIndex::new(config.trust_domain.server_id());
        let mut token = None;
        loop {
            let (entries, next) = store
                .list_entries_page(PageRequest {
                    token: token.take(),
                    size: crate::datastore::ENTRY_LOAD_PAGE,
                })
                .await?;
            for entry in entries {
                index.upsert_entry(entry);
            }
            match next {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        let mut agents = Vec::new();
        let mut token = None;
        loop {
            let page = PageRequest {
                token: token.take(),
                size: 1000,
            };
            let (batch, next) = store
                .list_agents(&AgentFilter::default(), Some(page))
                .await?;
            agents.extend(batch);
            match next {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        for agent in agents {
            index.set_agent(agent);
        }
        let exceptions = store.list_exceptions().await?;
        let audit = Arc::new(AuditTrail::new(None, &config.instance, Arc::clone(&clock)));
        let metrics = ServerMetrics::new();
        Ok(Self {
            judge: IssuanceJudge::new(
                &config,
                exceptions,
                Arc::clone(&audit),
                metrics.policy.clone(),
            ),
            metrics,
            index: IndexFeed::new(index, revision),
            audit,
            bundle_refresh: BundleRefresh::new(),
            config,
            store,
            ca,
            clock,
            ledger: None,
            rotation_requested: tokio::sync::Notify::new(),
            changes: tokio::sync::watch::Sender::new(ChangePoint {
                revision,
                sequence: 0,
                bundles: 0,
                revocations: 0,
                crls: 0,
            }),
            revocations: RevocationState::new(),
            decision_context: std::sync::Mutex::default(),
            notices_held: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Records audit events in `log` from now on (without one, they are only traced).
    pub fn with_audit_log(mut self, log: AuditLog) -> Self {
        self.audit = Arc::new(AuditTrail::new(
            Some(log),
            &self.config.instance,
            Arc::clone(&self.clock),
        ));
        let exceptions = self.judge.exceptions().to_vec();
        let policy = self.judge.policy().cloned();
        self.judge = IssuanceJudge::new(
            &self.config,
            exceptions,
            Arc::clone(&self.audit),
            self.metrics.policy.clone(),
        );
        if let Some(policy) = policy {
            self.judge.set_policy(policy);
        }
        self
    }

    /// Applies `policy` to every entry write and at issuance from now on: an entry that does
    /// not pass it authorizes nothing.
    pub fn with_policy(mut self, policy: Arc<PolicyHolder>) -> Self {
        self.judge.set_policy(policy);
        self
    }

    /// Records every issuance in `ledger` from now on.
    pub fn with_ledger(mut self, ledger: Ledger) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Asks the server's periodic pass (CA schedule, its own SVID, pruning) to run now rather
    /// than at its next tick: after a forced CA rotation, the server's own SVID must move to
    /// the new authority before the old one can be revoked.
    pub fn request_rotation(&self) {
        self.rotation_requested.notify_one();
    }

    /// Completes when [`ServerState::request_rotation`] was called (once per call).
    pub async fn rotation_requested(&self) {
        self.rotation_requested.notified().await;
    }

    /// Queues an issuance for the usage ledger, if the server keeps one.
    pub fn record_issuance(&self, issuance: Issuance) {
        if let Some(ledger) = &self.ledger {
            ledger.record(issuance);
        }
    }

    /// The usage ledger's queue, if the server keeps one.
    pub fn ledger(&self) -> Option<&Ledger> {
        self.ledger.as_ref()
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        (self.clock)()
    }

    /// The clock [`ServerState::now`] reads.
    pub fn clock(&self) -> Clock {
        Arc::clone(&self.clock)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.config.trust_domain
    }

    /// The trust domain's current bundle.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.ca
            .bundle()
            .unwrap_or_else(|| Arc::new(TrustBundle::new(self.config.trust_domain.clone())))
    }

    /// Brings the authorization index and the exceptions up to date with the datastore's
    /// change log ([`IndexFeed::catch_up`]). Writers call it after their commit, so a change
    /// is in the index before it is acknowledged; a periodic pass picks up the writes of
    /// other servers sharing the datastore.
    /// When the trust domain's own bundle changed (another server published its authorities),
    /// the CA takes the stored one, so that TLS and agents see every server's authorities.
    /// When federation relationships changed, [`BundleRefresh::relationships`] moves.
    pub async fn catch_up(&self) -> Result<(), DatastoreError> {
        let changed = self.index.catch_up(&*self.store, &self.judge).await?;
        let revision = self.index.revision().await;
        let context_moved = self.decision_context_moved();
        let bundles_moved = !changed.bundles.is_empty();
        if changed.revocations {
            self.refresh_revocations().await;
        } else if changed.crls {
            self.reload_published_crls().await;
        }
        let revocations = self.revocations.sequence();
        self.changes.send_if_modified(|announced| {
            let moved = announced.revision < revision
                || context_moved
                || bundles_moved
                || announced.revocations < revocations;
            announced.revision = announced.revision.max(revision);
            announced.revocations = announced.revocations.max(revocations);
            if context_moved {
                announced.sequence += 1;
            }
            if bundles_moved {
                announced.bundles += 1;
            }
            moved
        });
        if !changed.relationships.is_empty() {
            self.bundle_refresh.relationships_changed();
        }
        if changed.bundles.contains(self.trust_domain())
            && let Err(error) = self.ca.refresh_bundle().await
        {
            tracing::warn!(%error, "could not re-read the trust domain's bundle; the rotation pass will");
        }
        Ok(())
    }

    /// Where the server's view stands, changing after each catch-up that applied something or
    /// found the policy or the active exceptions changed: what `AgentChangeService` streams.
    pub fn watch_changes(&self) -> tokio::sync::watch::Receiver<ChangePoint> {
        self.changes.subscribe()
    }

    /// A digest of what `agent_id` can learn from a sync at `point`: the entries it may
    /// obtain now (IDs and revisions, after the policy and exceptions), whether it is still
    /// attested and not banned, and the bundle generation. A change stream tells its agent of
    /// a change only when this moves, so a write that concerns other agents costs this one
    /// nothing.
    pub fn agent_view(&self, agent_id: &SpiffeId, point: ChangePoint) -> u64 {
        use std::hash::{Hash as _, Hasher as _};

        let mut digest = std::collections::hash_map::DefaultHasher::new();
        point.bundles.hash(&mut digest);
        point.revocations.hash(&mut digest);
        point.crls.hash(&mut digest);
        let standing = self
            .index
            .read()
            .agent(agent_id)
            .map(|agent| agent.is_banned());
        standing.hash(&mut digest);
        for entry in self.authorized_entries(agent_id) {
            entry.id.hash(&mut digest);
            entry.revision_number.hash(&mut digest);
        }
        digest.finish()
    }

    /// Makes change streams hold back every notice while `held` (and send the newest once
    /// released): a notice lost on the way, for tests of the agents' safety net. Nothing but
    /// tests calls it.
    #[doc(hidden)]
    pub fn hold_change_notices_for_tests(&self, held: bool) {
        self.notices_held
            .store(held, std::sync::atomic::Ordering::Release);
        if !held {
            self.changes.send_modify(|_| {});
        }
    }

    /// Whether change notices are held back ([`ServerState::hold_change_notices_for_tests`]).
    pub fn change_notices_held(&self) -> bool {
        self.notices_held.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the policy generation or the set of active exceptions moved since the last
    /// call (the first call records them).
    fn decision_context_moved(&self) -> bool {
        let now = self.now();
        let generation = self.judge.policy().map_or(0, |policy| policy.generation());
        let mut active: Vec<String> = self
            .judge
            .exceptions()
            .iter()
            .filter(|exception| exception.is_active(now))
            .map(|exception| exception.id.clone())
            .collect();
        active.sort();
        let context = (generation, active);
        let mut last = self
            .decision_context
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let moved = last.as_ref().is_some_and(|last| *last != context);
        *last = Some(context);
        moved
    }

    /// [`ServerState::catch_up`] for a writer that has committed: a failure is logged, not
    /// returned (the change is committed; the next catch-up applies it).
    pub async fn written(&self) {
        if let Err(error) = self.catch_up().await {
            tracing::warn!(%error, "the authorization index could not catch up with the change log; retrying on the next pass");
        }
    }

    /// Re-reads the revocations and signs the CRLs anew ([`RevocationState::refresh`]); a
    /// failure is logged and the CRLs in force stay.
    pub async fn refresh_revocations(&self) {
        if let Err(error) = self
            .revocations
            .refresh(&*self.store, &self.ca, self.now())
            .await
        {
            tracing::error!(%error, "could not refresh the revocation lists; the ones in force stay");
            return;
        }
        self.announce_revocations();
    }

    /// Takes the CRLs other servers sharing the datastore published
    /// ([`RevocationState::reload_published`]); a failure is logged and the lists in force stay.
    async fn reload_published_crls(&self) {
        match self
            .revocations
            .reload_published(&*self.store, &self.ca)
            .await
        {
            Ok(true) => self.announce_revocations(),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, "could not read the CRLs other servers published; the ones in force stay");
            }
        }
    }

    /// Moves the change point when the revocation sequence or the set of CRLs moved, so that
    /// every agent's change stream announces it.
    fn announce_revocations(&self) {
        let version = self.revocations.crls().version;
        let sequence = self.revocations.sequence();
        self.changes.send_if_modified(|announced| {
            let moved = announced.crls != version || announced.revocations < sequence;
            announced.crls = version;
            announced.revocations = announced.revocations.max(sequence);
            moved
        });
    }

    /// Re-reads the exceptions from the datastore (after a write, and periodically, so that
    /// changes made through another server sharing the datastore apply too).
    pub async fn reload_exceptions(&self) -> Result<(), DatastoreError> {
        self.judge.reload_exceptions(&*self.store).await
    }

    /// Up to `n` current entries, and a synthetic one, as the policy sees them: what a
    /// candidate policy must evaluate before it replaces the one in force.
    pub fn policy_samples(&self, n: usize) -> Vec<lanyard_core::policy::EntryInput> {
        let entries = self.index.read().sample_entries(n);
        self.judge.policy_samples(&entries, self.now())
    }

    /// Moves the audit checkpoint ([`AuditTrail::checkpoint`]).
    pub async fn checkpoint_audit(&self) {
        self.audit.checkpoint(&*self.store).await;
    }

    /// Entries the agent may obtain SVIDs for now: those the index authorizes that the judge
    /// admits (never a reserved or foreign ID; passing the policy, if there is one).
    pub fn authorized_entries(&self, agent_id: &SpiffeId) -> Vec<Arc<RegistrationEntry>> {
        let now = self.now();
        let mut entries = self.index.read().authorized_entries(agent_id, now);
        entries.retain(|entry| self.judge.admits(entry, now));
        entries
    }

    /// The entry `entry_id`, if the agent may obtain SVIDs for it now: what
    /// [`ServerState::authorized_entries`] would hold of it, looked up alone.
    pub fn authorized_entry(
        &self,
        agent_id: &SpiffeId,
        entry_id: &EntryId,
    ) -> Option<Arc<RegistrationEntry>> {
        let now = self.now();
        self.index
            .read()
            .authorized_entry(agent_id, entry_id, now)
            .filter(|entry| self.judge.admits(entry, now))
    }

    /// Whether `id` is an admin: listed in `admin_ids`, or the SPIFFE ID of an unexpired
    /// entry marked `admin` that passes the policy.
    pub fn is_admin_id(&self, id: &SpiffeId) -> bool {
        if self.config.admin_ids.contains(id) {
            return true;
        }
        self.has_passing_flagged_entry(id, |e| e.admin)
    }

    /// Whether `id` is the SPIFFE ID of an unexpired entry marked `downstream` that passes
    /// the policy.
    pub fn is_downstream_id(&self, id: &SpiffeId) -> bool {
        self.has_passing_flagged_entry(id, |e| e.downstream)
    }

    fn has_passing_flagged_entry(
        &self,
        id: &SpiffeId,
        flag: impl Fn(&RegistrationEntry) -> bool,
    ) -> bool {
        let now = self.now();
        let flagged = self.index.read().flagged_entries(id, now, flag);
        flagged.iter().any(|entry| self.judge.passes(entry, now))
    }
}
