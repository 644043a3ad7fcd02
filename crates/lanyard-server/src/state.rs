//! The state every API service shares: configuration, datastore, CA, the authorization index
//! and the clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use lanyard_core::policy::{EntryInput, EntryView, Operation, describe_violations, unix_seconds};

use lanyard_core::{EntryId, RegistrationEntry, SpiffeId, TrustBundle, TrustDomain};

use crate::audit::AuditLog;
use crate::authz::AuthorizationIndex;
use crate::ca::CaManager;
use crate::config::ServerConfig;
use crate::datastore::Datastore;
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
    clock: Clock,
    audit: Option<AuditLog>,
    policy: Option<Arc<PolicyHolder>>,
    decisions: Mutex<HashMap<EntryId, CachedDecision>>,
}

/// How long a policy decision about an entry is reused while neither the entry nor the
/// policy changes. Rules may depend on the time (an expiry cap), so decisions age out.
const DECISION_TTL: Duration = Duration::from_secs(30);

/// A policy decision about one revision of an entry under one policy generation.
#[derive(Debug, Clone, Copy)]
struct CachedDecision {
    revision: i64,
    generation: u64,
    passes: bool,
    decided_at: SystemTime,
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
        Ok(Self {
            config,
            store,
            ca,
            index: RwLock::new(index),
            clock,
            audit: None,
            policy: None,
            decisions: Mutex::new(HashMap::new()),
        })
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
            tracing::error!(action, "the audit log could not record a change: {error}");
        }
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        (self.clock)()
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

    /// Records a committed entry write in the index.
    pub fn entry_written(&self, entry: &RegistrationEntry) {
        self.index_mut().upsert_entry(entry.clone());
    }

    /// Records a committed entry deletion in the index.
    pub fn entry_deleted(&self, id: &EntryId) {
        self.index_mut().remove_entry(id);
        self.decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Records an agent's node selectors after attestation.
    pub fn agent_attested(&self, agent_id: &SpiffeId, selectors: lanyard_core::SelectorSet) {
        self.index_mut()
            .set_agent_selectors(agent_id.clone(), selectors);
    }

    /// Records an agent's eviction.
    pub fn agent_evicted(&self, agent_id: &SpiffeId) {
        self.index_mut().remove_agent(agent_id);
    }

    /// Entries the agent may obtain SVIDs for now: those the index authorizes that also pass
    /// the policy, if there is one.
    pub fn authorized_entries(&self, agent_id: &SpiffeId) -> Vec<Arc<RegistrationEntry>> {
        let now = self.now();
        let entries = self.index().authorized_entries(agent_id, now);
        match &self.policy {
            None => entries,
            Some(policy) => entries
                .into_iter()
                .filter(|entry| self.passes_policy(policy, entry, now))
                .collect(),
        }
    }

    /// Whether `entry` passes the policy at `now`, reusing a recent decision about the same
    /// revision under the same policy. A policy that fails to evaluate fails closed.
    fn passes_policy(
        &self,
        policy: &PolicyHolder,
        entry: &RegistrationEntry,
        now: SystemTime,
    ) -> bool {
        let generation = policy.generation();
        // The lock covers the lookup and the insert, not the evaluation: syncs of many
        // agents evaluate in parallel (two may decide the same entry at once; both agree).
        let cached = self
            .decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&entry.id)
            .copied();
        if let Some(cached) = cached {
            let fresh = now
                .duration_since(cached.decided_at)
                .is_ok_and(|age| age < DECISION_TTL);
            if cached.revision == entry.revision_number && cached.generation == generation && fresh
            {
                return cached.passes;
            }
        }
        let input = EntryInput {
            operation: Operation::Issue,
            now: unix_seconds(now),
            caller: None,
            entry: EntryView::new(
                entry,
                self.config.default_x509_svid_ttl,
                self.config.default_jwt_svid_ttl,
            ),
            exceptions: Vec::new(),
        };
        let passes = match policy.current().evaluate_entry(&input) {
            Ok(decision) if decision.passes() => true,
            Ok(decision) => {
                tracing::warn!(
                    entry_id = %entry.id,
                    spiffe_id = %entry.spiffe_id,
                    "the entry fails the policy and authorizes nothing: {}",
                    describe_violations(&decision.violations)
                );
                false
            }
            Err(error) => {
                tracing::error!(entry_id = %entry.id, "the policy failed to evaluate, so the entry authorizes nothing: {error}");
                false
            }
        };
        self.decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                entry.id.clone(),
                CachedDecision {
                    revision: entry.revision_number,
                    generation,
                    passes,
                    decided_at: now,
                },
            );
        passes
    }

    /// Whether `id` is an admin: listed in `admin_ids`, or the SPIFFE ID of an unexpired
    /// entry marked `admin`.
    pub fn is_admin_id(&self, id: &SpiffeId) -> bool {
        if self.config.admin_ids.contains(id) {
            return true;
        }
        let now = self.now();
        self.index().has_flagged_entry(id, now, |e| e.admin)
    }

    /// Whether `id` is the SPIFFE ID of an unexpired entry marked `downstream`.
    pub fn is_downstream_id(&self, id: &SpiffeId) -> bool {
        let now = self.now();
        self.index().has_flagged_entry(id, now, |e| e.downstream)
    }
}
