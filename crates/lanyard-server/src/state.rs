//! The state every API service shares: configuration, datastore, CA, the authorization index
//! and the clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::policy::{
    CallerInput, EntryInput, EntryView, Exception, Operation, covering_exceptions,
    describe_violations, unix_seconds,
};

use lanyard_core::{EntryId, RegistrationEntry, SpiffeId, TrustBundle, TrustDomain};

use crate::audit::AuditLog;
use crate::authz::AuthorizationIndex;
use crate::ca::CaManager;
use crate::config::ServerConfig;
use crate::datastore::{Datastore, Issuance};
use crate::ledger::Ledger;
use crate::policy::PolicyHolder;

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
    index: RwLock<AuthorizationIndex>,
    /// The change-log revision the index reflects; held while a catch-up applies changes, so
    /// that they are applied one catch-up at a time, in revision order.
    index_revision: tokio::sync::Mutex<i64>,
    clock: Clock,
    audit: Option<AuditLog>,
    /// Audited writes between their commit and their audit record; see [`AuditedWrite`].
    audits_in_flight: Arc<AtomicUsize>,
    /// An audit append failed since the last recovery: the checkpoint must not move.
    audit_gap: AtomicBool,
    policy: Option<Arc<PolicyHolder>>,
    decisions: Mutex<HashMap<EntryId, CachedDecision>>,
    exceptions: RwLock<Arc<Vec<Exception>>>,
    exceptions_generation: AtomicU64,
    ledger: Option<Ledger>,
    rotation_requested: tokio::sync::Notify,
    /// Entries already reported as never issuable, so that each is logged once.
    refused_entries: Mutex<std::collections::HashSet<EntryId>>,
}

/// A datastore write whose audit record is not yet appended; see
/// [`ServerState::audited_write`].
#[derive(Debug)]
#[must_use = "the guard must live until the audit record is written"]
pub struct AuditedWrite(Arc<AtomicUsize>);

impl Drop for AuditedWrite {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a policy decision about an entry is reused while neither the entry nor the
/// policy changes. Rules may depend on the time (an expiry cap), so decisions age out.
const DECISION_TTL: Duration = Duration::from_secs(30);

/// A policy decision about one revision of an entry under one policy generation and one
/// set of exceptions.
#[derive(Debug, Clone)]
struct CachedDecision {
    revision: i64,
    generation: u64,
    exceptions_generation: u64,
    passes: bool,
    exceptions_used: Arc<[String]>,
    /// When the decision must be made again: [`DECISION_TTL`] after it was made, or when
    /// the first exception it relies on lapses, whichever comes first.
    valid_until: SystemTime,
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
    ) -> Result<Self, crate::datastore::DatastoreError> {
        // Read first: a change committed while the index is loaded is applied again by the
        // first catch-up, which is harmless (each change re-reads its record).
        let revision = store.current_revision().await?;
        let entries = store.list_all_entries().await?;
        let mut agents = Vec::new();
        let mut token = None;
        loop {
            let page = crate::datastore::PageRequest {
                token: token.take(),
                size: 1000,
            };
            let (batch, next) = store
                .list_agents(&crate::datastore::AgentFilter::default(), Some(page))
                .await?;
            agents.extend(batch.into_iter().map(|a| (a.spiffe_id, a.selectors)));
            match next {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        let index = AuthorizationIndex::build(config.trust_domain.server_id(), entries, agents);
        let exceptions = store.list_exceptions().await?;
        Ok(Self {
            config,
            store,
            ca,
            index: RwLock::new(index),
            index_revision: tokio::sync::Mutex::new(revision),
            clock,
            audit: None,
            audits_in_flight: Arc::default(),
            audit_gap: AtomicBool::new(false),
            policy: None,
            decisions: Mutex::new(HashMap::new()),
            exceptions: RwLock::new(Arc::new(exceptions)),
            exceptions_generation: AtomicU64::new(0),
            ledger: None,
            rotation_requested: tokio::sync::Notify::new(),
            refused_entries: Mutex::default(),
        })
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

    /// Records every issuance in `ledger` from now on.
    pub fn with_ledger(mut self, ledger: Ledger) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Queues an issuance for the usage ledger, if the server keeps one.
    pub fn record_issuance(&self, issuance: Issuance) {
        if let Some(ledger) = &self.ledger {
            ledger.record(issuance);
        }
    }

    /// Every exception the server knows, active or not, as of the last reload.
    pub fn exceptions(&self) -> Arc<Vec<Exception>> {
        Arc::clone(&self.exceptions.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Re-reads the exceptions from the datastore (after a write, and periodically, so that
    /// changes made through another server sharing the datastore apply too). Decisions made
    /// under the old set are not reused.
    pub async fn reload_exceptions(&self) -> Result<(), crate::datastore::DatastoreError> {
        let fresh = self.store.list_exceptions().await?;
        let mut current = self.exceptions.write().unwrap_or_else(|e| e.into_inner());
        if **current != fresh {
            *current = Arc::new(fresh);
            self.exceptions_generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    /// The policy's input for `entry`: the entry with the server's default TTLs and the
    /// active exceptions that cover it.
    pub(crate) fn entry_input(
        &self,
        entry: &RegistrationEntry,
        operation: Operation,
        caller: Option<CallerInput>,
        now: SystemTime,
    ) -> EntryInput {
        let exceptions = self.exceptions();
        EntryInput {
            operation,
            now: unix_seconds(now),
            caller,
            entry: EntryView::new(
                entry,
                self.config.default_x509_svid_ttl,
                self.config.default_jwt_svid_ttl,
            ),
            exceptions: covering_exceptions(
                exceptions.iter(),
                entry.id.as_str(),
                entry.spiffe_id.as_str(),
                now,
            ),
        }
    }

    /// Up to `n` current entries as the policy sees them at issuance: what a candidate policy
    /// must evaluate before it replaces the one in force.
    pub fn policy_samples(&self, n: usize) -> Vec<EntryInput> {
        let now = self.now();
        let entries = self.index().sample_entries(n);
        let mut samples: Vec<EntryInput> = entries
            .iter()
            .map(|entry| self.entry_input(entry, Operation::Issue, None, now))
            .collect();
        // A synthetic entry, written by a local admin and issued, so that a server without
        // entries still tries both questions a write and an issuance ask.
        if let Some(probe) = self.synthetic_entry(now) {
            let admin = CallerInput {
                id: None,
                local: true,
            };
            samples.push(self.entry_input(&probe, Operation::Create, Some(admin), now));
            samples.push(self.entry_input(&probe, Operation::Issue, None, now));
        }
        samples
    }

    /// A plain workload entry under an agent of this trust domain, expiring in a day.
    fn synthetic_entry(&self, now: SystemTime) -> Option<RegistrationEntry> {
        let td = self.trust_domain();
        let mut entry = RegistrationEntry::new(
            EntryId::new("policy-probe").ok()?,
            SpiffeId::from_path(td, "/policy-probe").ok()?,
            SpiffeId::from_path(td, "/spire/agent/policy-probe").ok()?,
            ["unix:uid:1000".parse::<lanyard_core::Selector>().ok()?]
                .into_iter()
                .collect(),
            now,
        );
        entry.expires_at = Some(now + Duration::from_secs(24 * 3600));
        entry.owner = Some("policy-probe".to_owned());
        entry.reason = Some("checks that a policy evaluates before it is put in force".to_owned());
        Some(entry)
    }

    /// The exceptions `entry` passed the policy under at its last issuance decision.
    pub fn exceptions_used(&self, entry: &RegistrationEntry) -> Vec<String> {
        self.decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&entry.id)
            .filter(|cached| cached.revision == entry.revision_number)
            .map(|cached| cached.exceptions_used.to_vec())
            .unwrap_or_default()
    }

    /// Records audit events in `log` from now on (without one, they are only traced).
    pub fn with_audit_log(mut self, log: AuditLog) -> Self {
        self.audit = Some(log);
        self
    }

    /// Applies `policy` at issuance from now on: an entry that does not pass it authorizes
    /// nothing.
    pub fn with_policy(mut self, policy: Arc<PolicyHolder>) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The policy in force, if the server has one.
    pub fn policy(&self) -> Option<&Arc<PolicyHolder>> {
        self.policy.as_ref()
    }

    /// The audit log, if the server keeps one.
    pub fn audit_log(&self) -> Option<&AuditLog> {
        self.audit.as_ref()
    }

    /// Records a change: one `audit` trace line, and one line in the audit log, fsynced,
    /// with `caller`, `action` and `details` (a JSON object). The change it describes is
    /// already committed, so a failure to record it is logged as an error, not returned.
    pub fn audit(&self, caller: &str, action: &str, details: serde_json::Value) {
        tracing::info!(target: "audit", caller, details = %details, "{action}");
        let Some(log) = &self.audit else { return };
        let event = serde_json::json!({"action": action, "caller": caller, "details": details});
        if let Err(error) = log.record(self.now(), &event) {
            self.audit_gap.store(true, Ordering::SeqCst);
            tracing::error!(
                action,
                "the audit log could not record a change; it is rebuilt from the change log once \
                 the log can be written: {error}"
            );
        }
    }

    /// Marks a datastore write whose audit record follows: hold the guard from before the
    /// write until after [`ServerState::audit`], so that the audit checkpoint never moves past
    /// a committed change whose record is not yet written.
    pub fn audited_write(&self) -> AuditedWrite {
        self.audits_in_flight.fetch_add(1, Ordering::SeqCst);
        AuditedWrite(Arc::clone(&self.audits_in_flight))
    }

    /// Moves the audit checkpoint to the datastore's current revision when no audited write is
    /// in flight, or, after a failed append, rebuilds the missing records from the change log
    /// first ([`crate::audit::recover`]). Without an audit log, does nothing.
    pub async fn checkpoint_audit(&self) {
        let Some(log) = &self.audit else { return };
        let result = if self.audit_gap.load(Ordering::SeqCst) {
            self.audit_gap.store(false, Ordering::SeqCst);
            let result = crate::audit::recover(log, &*self.store, self.now()).await;
            if result.is_err() {
                self.audit_gap.store(true, Ordering::SeqCst);
            }
            result.map(drop)
        } else {
            self.advance_audit_checkpoint().await
        };
        if let Err(error) = result {
            tracing::warn!("the audit checkpoint did not move: {error}");
        }
    }

    /// Whether an audited write is in flight or an append failed: the checkpoint cannot
    /// cover the current revision yet.
    pub fn audit_pending(&self) -> bool {
        self.audits_in_flight.load(Ordering::SeqCst) != 0 || self.audit_gap.load(Ordering::SeqCst)
    }

    async fn advance_audit_checkpoint(&self) -> Result<(), crate::audit::AuditError> {
        let revision = self.store.current_revision().await?;
        // Every change up to `revision` was committed before it was read; one whose guard is
        // gone has its record. One still in flight, or a failed append, holds the checkpoint.
        if self.audits_in_flight.load(Ordering::SeqCst) != 0
            || self.audit_gap.load(Ordering::SeqCst)
        {
            return Ok(());
        }
        if crate::audit::covered_revision(&*self.store).await? >= Some(revision) {
            return Ok(());
        }
        crate::audit::set_covered_revision(&*self.store, revision).await
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

    /// Read access to the authorization index.
    pub fn index(&self) -> RwLockReadGuard<'_, AuthorizationIndex> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn index_mut(&self) -> RwLockWriteGuard<'_, AuthorizationIndex> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the authorization index (and the exceptions) up to date with the datastore's
    /// change log: every change past the revision the index reflects, in revision order, each
    /// applied by re-reading its record, so the index ends as the datastore is whatever order
    /// writers committed in, and whichever server made them. Writers call it after their
    /// commit, so a change is in the index before it is acknowledged; a periodic pass picks up
    /// the writes of other servers sharing the datastore. On a datastore error nothing past
    /// the last applied change is recorded as done, so the next catch-up tries again.
    pub async fn catch_up(&self) -> Result<(), crate::datastore::DatastoreError> {
        use crate::datastore::ChangeSubject;

        let mut applied = self.index_revision.lock().await;
        let changes = self.store.changes_since(*applied).await?;
        let Some(last) = changes.last().map(|change| change.revision) else {
            return Ok(());
        };
        // The record as it is now stands for every change to it; each subject is read once.
        let mut seen = std::collections::HashSet::new();
        let mut exceptions_changed = false;
        for change in changes.iter().rev() {
            if !seen.insert(&change.subject) {
                continue;
            }
            match &change.subject {
                ChangeSubject::Entry(id) => match self.store.get_entry(id).await? {
                    Some(entry) => self.index_mut().upsert_entry(entry),
                    None => self.entry_gone(id),
                },
                ChangeSubject::Agent(id) => match self.store.get_agent(id).await? {
                    Some(agent) => self
                        .index_mut()
                        .set_agent_selectors(id.clone(), agent.selectors),
                    None => self.index_mut().remove_agent(id),
                },
                ChangeSubject::Exception(_) => exceptions_changed = true,
                ChangeSubject::Bundle(_) => {}
            }
        }
        if exceptions_changed {
            self.reload_exceptions().await?;
        }
        *applied = last;
        Ok(())
    }

    /// [`ServerState::catch_up`] for a writer that has committed: a failure is logged, not
    /// returned (the change is committed; the next catch-up applies it).
    pub async fn written(&self) {
        if let Err(error) = self.catch_up().await {
            tracing::warn!(%error, "the authorization index could not catch up with the change log; retrying on the next pass");
        }
    }

    /// Puts `entry` in the authorization index without the datastore, for tests that need a
    /// state the datastore refuses to hold. Nothing but tests calls it: the index is fed from
    /// the change log.
    #[doc(hidden)]
    pub fn plant_in_index_for_tests(&self, entry: &RegistrationEntry) {
        self.index_mut().upsert_entry(entry.clone());
    }

    /// The change-log revision the authorization index reflects.
    pub async fn index_revision(&self) -> i64 {
        *self.index_revision.lock().await
    }

    fn entry_gone(&self, id: &EntryId) {
        self.index_mut().remove_entry(id);
        self.decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Entries the agent may obtain SVIDs for now: those the index authorizes that also pass
    /// the policy, if there is one.
    ///
    /// An entry for a reserved ID (the server's, an agent's) or another trust domain's is
    /// never issued, whatever the datastore holds: the write path refuses such entries, and
    /// this check stands behind it for stores written by other means.
    pub fn authorized_entries(&self, agent_id: &SpiffeId) -> Vec<Arc<RegistrationEntry>> {
        let now = self.now();
        let mut entries = self.index().authorized_entries(agent_id, now);
        entries.retain(|entry| self.issuable(entry));
        match &self.policy {
            None => entries,
            Some(policy) => entries
                .into_iter()
                .filter(|entry| self.passes_policy(policy, entry, now))
                .collect(),
        }
    }

    /// Whether an SVID may ever be issued for `entry`'s SPIFFE ID; says so loudly, once per
    /// entry, when the datastore holds one that may not.
    fn issuable(&self, entry: &RegistrationEntry) -> bool {
        let trust_domain = self.trust_domain();
        let ok = !entry.spiffe_id.is_reserved()
            && entry.spiffe_id.is_member_of(trust_domain)
            && !entry.spiffe_id.is_trust_domain_id();
        if !ok {
            let first = self
                .refused_entries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(entry.id.clone());
            if first {
                tracing::error!(
                    entry_id = %entry.id,
                    spiffe_id = %entry.spiffe_id,
                    "the datastore holds an entry for an ID that is never issued (reserved or \
                     outside the trust domain); it authorizes nothing. Delete it"
                );
            }
        }
        ok
    }

    /// Whether `entry` passes the policy at `now`, reusing a recent decision about the same
    /// revision under the same policy and exceptions. A policy that fails to evaluate fails
    /// closed.
    fn passes_policy(
        &self,
        policy: &PolicyHolder,
        entry: &RegistrationEntry,
        now: SystemTime,
    ) -> bool {
        let generation = policy.generation();
        let exceptions_generation = self.exceptions_generation.load(Ordering::Acquire);
        // The lock covers the lookup and the insert, not the evaluation: syncs of many
        // agents evaluate in parallel (two may decide the same entry at once; both agree).
        let cached = self
            .decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&entry.id)
            .cloned();
        if let Some(cached) = &cached {
            let fresh = now < cached.valid_until;
            if cached.revision == entry.revision_number
                && cached.generation == generation
                && cached.exceptions_generation == exceptions_generation
                && fresh
            {
                return cached.passes;
            }
        }
        let input = self.entry_input(entry, Operation::Issue, None, now);
        let (passes, exceptions_used, rules) = match policy.current().evaluate_entry(&input) {
            Ok(decision) if decision.passes() => (true, decision.exceptions_used(), Vec::new()),
            Ok(decision) => {
                tracing::warn!(
                    entry_id = %entry.id,
                    spiffe_id = %entry.spiffe_id,
                    "the entry fails the policy and authorizes nothing: {}",
                    describe_violations(&decision.violations)
                );
                let rules = decision.violations.into_iter().map(|v| v.rule).collect();
                (false, Vec::new(), rules)
            }
            Err(error) => {
                tracing::error!(entry_id = %entry.id, "the policy failed to evaluate, so the entry authorizes nothing: {error}");
                (false, Vec::new(), vec!["(evaluation failed)".to_owned()])
            }
        };
        // The audit log records each change of an entry's standing, not every re-decision; a
        // first decision is news only if it is not a plain pass.
        let changed = match &cached {
            Some(cached) => {
                cached.passes != passes || *cached.exceptions_used != *exceptions_used.as_slice()
            }
            None => !passes || !exceptions_used.is_empty(),
        };
        if changed {
            self.audit(
                "policy",
                if passes {
                    "entry authorizes at issuance"
                } else {
                    "entry stopped authorizing at issuance"
                },
                serde_json::json!({
                    "entry_id": entry.id.as_str(),
                    "spiffe_id": entry.spiffe_id.to_string(),
                    "revision_number": entry.revision_number,
                    "policy_generation": generation,
                    "exception_ids": exceptions_used,
                    "rules": rules,
                }),
            );
        }
        // An exception's expiry is a deadline for the decision too.
        let valid_until = input
            .exceptions
            .iter()
            .filter(|exception| exceptions_used.contains(&exception.id))
            .map(|exception| UNIX_EPOCH + Duration::from_secs(exception.expires_at))
            .fold(now + DECISION_TTL, SystemTime::min);
        let mut decisions = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        decisions.insert(
            entry.id.clone(),
            CachedDecision {
                revision: entry.revision_number,
                generation,
                exceptions_generation,
                passes,
                exceptions_used: exceptions_used.into(),
                valid_until,
            },
        );
        passes
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
        let flagged = self.index().flagged_entries(id, now, flag);
        match &self.policy {
            None => !flagged.is_empty(),
            Some(policy) => flagged
                .iter()
                .any(|entry| self.passes_policy(policy, entry, now)),
        }
    }
}
