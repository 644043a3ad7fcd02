//! [`IssuanceJudge`]: the policy in force, the exceptions to it, and the decisions made with
//! them about each entry at issuance, cached per entry revision, policy generation and
//! exception-set generation.
//!
//! An entry for a reserved ID (the server's, an agent's) or another trust domain's is never
//! issued, whatever the datastore holds: the write path refuses such entries, and
//! [`IssuanceJudge::issuable`] stands behind it for stores written by other means. A policy that
//! fails to evaluate fails closed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::policy::{
    CallerInput, EntryInput, EntryView, Exception, Operation, covering_exceptions,
    describe_violations, unix_seconds,
};
use lanyard_core::{EntryId, RegistrationEntry, SpiffeId, TrustDomain};

use crate::audit::AuditTrail;
use crate::config::ServerConfig;
use crate::datastore::{Datastore, DatastoreError};
use crate::metrics::{PolicyDecision, PolicyMetrics, PolicyPoint};
use crate::policy::PolicyHolder;

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

/// The policy, its exceptions and its decisions about entries; see the module documentation.
pub struct IssuanceJudge {
    trust_domain: TrustDomain,
    default_x509_svid_ttl: Duration,
    default_jwt_svid_ttl: Duration,
    policy: Option<Arc<PolicyHolder>>,
    decisions: Mutex<HashMap<EntryId, CachedDecision>>,
    exceptions: RwLock<Arc<Vec<Exception>>>,
    exceptions_generation: AtomicU64,
    /// Entries already reported as never issuable, so that each is logged once.
    refused_entries: Mutex<HashSet<EntryId>>,
    audit: Arc<AuditTrail>,
    metrics: PolicyMetrics,
}

impl std::fmt::Debug for IssuanceJudge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuanceJudge")
            .field("trust_domain", &self.trust_domain)
            .field("policy", &self.policy.is_some())
            .finish_non_exhaustive()
    }
}

impl IssuanceJudge {
    /// A judge for `config`'s trust domain and default TTLs, without a policy, knowing
    /// `exceptions`; changes of an entry's standing are recorded in `audit`, and each
    /// decision it makes is counted in `metrics`.
    pub fn new(
        config: &ServerConfig,
        exceptions: Vec<Exception>,
        audit: Arc<AuditTrail>,
        metrics: PolicyMetrics,
    ) -> Self {
        Self {
            trust_domain: config.trust_domain.clone(),
            default_x509_svid_ttl: config.default_x509_svid_ttl,
            default_jwt_svid_ttl: config.default_jwt_svid_ttl,
            policy: None,
            decisions: Mutex::new(HashMap::new()),
            exceptions: RwLock::new(Arc::new(exceptions)),
            exceptions_generation: AtomicU64::new(0),
            refused_entries: Mutex::default(),
            audit,
            metrics,
        }
    }

    /// Applies `policy` from now on.
    pub fn set_policy(&mut self, policy: Arc<PolicyHolder>) {
        self.policy = Some(policy);
    }

    /// The counters of policy decisions, for the write path's.
    pub fn metrics(&self) -> &PolicyMetrics {
        &self.metrics
    }

    /// The policy in force, if there is one.
    pub fn policy(&self) -> Option<&Arc<PolicyHolder>> {
        self.policy.as_ref()
    }

    /// Every exception known, active or not, as of the last reload.
    pub fn exceptions(&self) -> Arc<Vec<Exception>> {
        Arc::clone(&self.exceptions.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Re-reads the exceptions from `store`. Decisions made under the old set are not
    /// reused.
    pub async fn reload_exceptions(&self, store: &dyn Datastore) -> Result<(), DatastoreError> {
        let fresh = store.list_exceptions().await?;
        let mut current = self.exceptions.write().unwrap_or_else(|e| e.into_inner());
        if **current != fresh {
            *current = Arc::new(fresh);
            self.exceptions_generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Forgets the decision about an entry that is gone.
    pub fn forget(&self, id: &EntryId) {
        self.decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// The policy's input for `entry`: the entry with the server's default TTLs and the
    /// active exceptions that cover it.
    pub fn entry_input(
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
            entry: EntryView::new(entry, self.default_x509_svid_ttl, self.default_jwt_svid_ttl),
            exceptions: covering_exceptions(
                exceptions.iter(),
                entry.id.as_str(),
                entry.spiffe_id.as_str(),
                now,
            ),
        }
    }

    /// `entries` as the policy sees them at issuance, plus a synthetic entry written by a
    /// local admin and issued: what a candidate policy must evaluate before it replaces the
    /// one in force, so that a server without entries still tries both questions a write and
    /// an issuance ask.
    pub fn policy_samples(
        &self,
        entries: &[Arc<RegistrationEntry>],
        now: SystemTime,
    ) -> Vec<EntryInput> {
        let mut samples: Vec<EntryInput> = entries
            .iter()
            .map(|entry| self.entry_input(entry, Operation::Issue, None, now))
            .collect();
        if let Some(probe) = self.synthetic_entry(now) {
            let admin = CallerInput {
                id: None,
                local: true,
                socket: None,
            };
            samples.push(self.entry_input(&probe, Operation::Create, Some(admin), now));
            samples.push(self.entry_input(&probe, Operation::Issue, None, now));
        }
        samples
    }

    /// A plain workload entry under an agent of this trust domain, expiring in a day.
    fn synthetic_entry(&self, now: SystemTime) -> Option<RegistrationEntry> {
        let td = &self.trust_domain;
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

    /// Whether an SVID may be issued for `entry` at `now`: its ID may ever be issued, and it
    /// passes the policy, if there is one.
    pub fn admits(&self, entry: &RegistrationEntry, now: SystemTime) -> bool {
        self.issuable(entry)
            && match &self.policy {
                None => true,
                Some(policy) => self.passes_policy(policy, entry, now),
            }
    }

    /// Whether `entry` passes the policy at `now` (every entry does without one).
    pub fn passes(&self, entry: &RegistrationEntry, now: SystemTime) -> bool {
        match &self.policy {
            None => true,
            Some(policy) => self.passes_policy(policy, entry, now),
        }
    }

    /// Whether an SVID may ever be issued for `entry`'s SPIFFE ID; says so loudly, once per
    /// entry, when the datastore holds one that may not.
    fn issuable(&self, entry: &RegistrationEntry) -> bool {
        let ok = !entry.spiffe_id.is_reserved()
            && entry.spiffe_id.is_member_of(&self.trust_domain)
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
            Ok(decision) if decision.passes() => {
                let used = decision.exceptions_used();
                let counted = if used.is_empty() {
                    PolicyDecision::Pass
                } else {
                    PolicyDecision::Waived
                };
                self.metrics.record(PolicyPoint::Issuance, counted, []);
                (true, used, Vec::new())
            }
            Ok(decision) => {
                self.metrics.record(
                    PolicyPoint::Issuance,
                    PolicyDecision::Refused,
                    decision.violations.iter().map(|v| v.rule.as_str()),
                );
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
                self.metrics
                    .record(PolicyPoint::Issuance, PolicyDecision::Failed, []);
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
            self.audit.record(
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
}
