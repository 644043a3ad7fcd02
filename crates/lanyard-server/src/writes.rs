//! The one write path for registration entries. [`EntryWriter`] alone calls the datastore's
//! entry-write methods, and applies to every write, whoever asks for it (the Entry service,
//! the governed entries, entry metadata, `CreateJoinToken`'s alias entry), the same steps in
//! the same order:
//!
//! 1. structure: the entry is valid for this trust domain (and, created, not already expired);
//!    an entry created through a named admin socket without owner, reason or source gets the
//!    socket's, and a source that a named socket keeps is refused from anyone else;
//! 2. policy: the policy in force, with the active exceptions that cover the entry, judges the
//!    write as the caller's (a refusal is audited and names each broken rule);
//! 3. commit: the datastore writes it (an update only over the revision it was judged on,
//!    retried a few times if another writer got in between);
//! 4. index: the authorization index catches up with the change log
//!    ([`ServerState::written`]), so the write is served before it is acknowledged;
//! 5. audit: the write is recorded, under [`ServerState::audited_write`] from before the commit
//!    so that a crash between commit and record is recovered at the next start.
//!
//! Errors are [`WriteError`], a domain error; the API maps it to a gRPC status in one place
//! (`api::errors`).

use std::sync::Arc;

use lanyard_core::policy::{Decision, Operation, Violation, describe_violations, unix_seconds};
use lanyard_core::{EntryId, RegistrationEntry};

use crate::caller::{Caller, caller_input};
use crate::datastore::DatastoreError;
use crate::metrics::{PolicyDecision, PolicyPoint};
use crate::state::ServerState;

/// How many times an update is tried when the entry changes between read and write.
const UPDATE_ATTEMPTS: usize = 3;

/// Why an entry write did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The entry is malformed, or the request cannot be turned into one.
    #[error("{0}")]
    Invalid(String),
    /// The policy refuses the write.
    #[error("entry violates policy: {}", describe_violations(.violations))]
    Refused {
        /// Each rule the entry breaks, with its fix.
        violations: Vec<Violation>,
    },
    /// The policy could not be evaluated; the write is refused (fail closed).
    #[error("the policy failed to evaluate: {0}")]
    PolicyFailed(String),
    /// A similar entry (same SPIFFE ID, parent and selectors) is already stored.
    #[error("similar entry already exists")]
    Duplicate {
        /// The stored entry, when a create found it.
        existing: Option<Box<RegistrationEntry>>,
    },
    /// Another entry already has the ID the caller chose.
    #[error("an entry with id {0:?} already exists")]
    IdTaken(String),
    /// No entry has this ID.
    #[error("entry not found")]
    NotFound,
    /// A conditional write found the entry at another revision than the one the caller read.
    #[error(
        "entry {id} was changed since revision {expected} was read (it is at revision {current}); nothing was written"
    )]
    Changed {
        /// The entry's ID.
        id: String,
        /// The revision the caller read.
        expected: i64,
        /// The revision it is at.
        current: i64,
    },
    /// The datastore failed, or another writer kept changing the entry.
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
}

/// A write that happened: the entry as stored and the exceptions it passed the policy under.
#[derive(Debug, Clone)]
pub struct Written {
    /// The entry as stored (for a delete, as it was).
    pub entry: RegistrationEntry,
    /// The IDs of the exceptions the entry passed the policy under.
    pub exception_ids: Vec<String>,
    /// Whether anything was written ([`EntryWriter::update_if_changed`] writes nothing for a
    /// change that leaves the entry as it is).
    pub changed: bool,
}

/// The one component that writes registration entries; see the module documentation.
#[derive(Debug, Clone)]
pub struct EntryWriter {
    state: Arc<ServerState>,
}

impl EntryWriter {
    /// A writer over `state`'s datastore, policy, index and audit log.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }

    /// Creates `entry` for `caller`; `method` names the RPC in the audit record.
    pub async fn create(
        &self,
        caller: &Caller,
        entry: RegistrationEntry,
        method: &str,
    ) -> Result<Written, WriteError> {
        let entry = self.attribute(caller, entry)?;
        self.check_structure(&entry)?;
        if entry.is_expired(self.state.now()) {
            return Err(WriteError::Invalid(
                "expires_at is already past: an entry expired at creation would authorize nothing"
                    .to_owned(),
            ));
        }
        let exception_ids = self.judge(&entry, Operation::Create, caller)?;
        let _audited = self.state.audit.guard();
        let created = match self.state.store.create_entry(entry.clone()).await {
            Ok(created) => created,
            Err(error) => {
                return Err(match error.existing_entry() {
                    // SPIRE answers a duplicate with the entry that is already registered.
                    Some(existing) if existing.is_similar(&entry) => WriteError::Duplicate {
                        existing: Some(Box::new(existing.clone())),
                    },
                    // The client chose an ID that a different entry has: nothing to hand back
                    // that the client asked for.
                    Some(_) => WriteError::IdTaken(entry.id.as_str().to_owned()),
                    None => WriteError::Datastore(error),
                });
            }
        };
        self.state.written().await;
        self.state.audit.record(
            &caller.describe(),
            "entry created",
            serde_json::json!({
                "method": method,
                "entry_id": created.id.as_str(),
                "spiffe_id": created.spiffe_id.to_string(),
                "parent_id": created.parent_id.to_string(),
                "owner": created.owner,
                "source": created.source,
                "expires_at": created.expires_at.map(unix_seconds),
                "exception_ids": exception_ids,
            }),
        );
        Ok(Written {
            entry: created,
            exception_ids,
            changed: true,
        })
    }

    /// Reads entry `id`, applies `change` and writes the result back for `caller`, over the
    /// revision it read (read, change and checks again if another writer got in between). The
    /// revision moves even if `change` leaves the entry as it was, as SPIRE's does.
    pub async fn update(
        &self,
        caller: &Caller,
        id: &EntryId,
        method: &str,
        change: impl Fn(&RegistrationEntry) -> Result<RegistrationEntry, WriteError>,
    ) -> Result<Written, WriteError> {
        self.update_entry(caller, id, method, None, change, true)
            .await
    }

    /// [`EntryWriter::update`], only while the entry is at `expected_revision` (the one the
    /// caller read): otherwise [`WriteError::Changed`] and nothing is written. The check and
    /// the write are one datastore transaction.
    pub async fn update_at(
        &self,
        caller: &Caller,
        id: &EntryId,
        method: &str,
        expected_revision: Option<i64>,
        change: impl Fn(&RegistrationEntry) -> Result<RegistrationEntry, WriteError>,
    ) -> Result<Written, WriteError> {
        self.update_entry(caller, id, method, expected_revision, change, true)
            .await
    }

    /// [`EntryWriter::update`], but a change that leaves the entry as it is writes nothing
    /// (and is not judged or audited).
    pub async fn update_if_changed(
        &self,
        caller: &Caller,
        id: &EntryId,
        method: &str,
        change: impl Fn(&RegistrationEntry) -> Result<RegistrationEntry, WriteError>,
    ) -> Result<Written, WriteError> {
        self.update_entry(caller, id, method, None, change, false)
            .await
    }

    async fn update_entry(
        &self,
        caller: &Caller,
        id: &EntryId,
        method: &str,
        expected_revision: Option<i64>,
        change: impl Fn(&RegistrationEntry) -> Result<RegistrationEntry, WriteError>,
        write_unchanged: bool,
    ) -> Result<Written, WriteError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(current) = self.state.store.get_entry(id).await? else {
                return Err(WriteError::NotFound);
            };
            if let Some(expected) = expected_revision
                && current.revision_number != expected
            {
                return Err(WriteError::Changed {
                    id: id.as_str().to_owned(),
                    expected,
                    current: current.revision_number,
                });
            }
            let updated = change(&current)?;
            if updated.source != current.source {
                self.check_source(caller, &updated)?;
            }
            if !write_unchanged && updated == current {
                return Ok(Written {
                    entry: current,
                    exception_ids: Vec::new(),
                    changed: false,
                });
            }
            self.check_structure(&updated)
                .map_err(|e| WriteError::Invalid(format!("failed to convert entry: {e}")))?;
            let exception_ids = self.judge(&updated, Operation::Update, caller)?;
            let _audited = self.state.audit.guard();
            let stored = match self
                .state
                .store
                .update_entry(updated, Some(current.revision_number))
                .await
            {
                Ok(stored) => stored,
                Err(DatastoreError::Conflict(_)) if attempt < UPDATE_ATTEMPTS => continue,
                Err(DatastoreError::NotFound(_)) => return Err(WriteError::NotFound),
                Err(DatastoreError::AlreadyExists { .. }) => {
                    return Err(WriteError::Duplicate { existing: None });
                }
                Err(error) => return Err(error.into()),
            };
            self.state.written().await;
            self.state.audit.record(
                &caller.describe(),
                "entry updated",
                serde_json::json!({
                    "method": method,
                    "entry_id": stored.id.as_str(),
                    "spiffe_id": stored.spiffe_id.to_string(),
                    "revision_number": stored.revision_number,
                    "owner": stored.owner,
                    "reason": stored.reason,
                    "ticket": stored.ticket,
                    "source": stored.source,
                    "expires_at": stored.expires_at.map(unix_seconds),
                    "exception_ids": exception_ids,
                }),
            );
            return Ok(Written {
                entry: stored,
                exception_ids,
                changed: true,
            });
        }
    }

    /// Deletes entry `id` for `caller`. A delete is never refused by the policy: taking an
    /// identity away is always allowed to an admin.
    pub async fn delete(
        &self,
        caller: &Caller,
        id: &EntryId,
        method: &str,
    ) -> Result<Written, WriteError> {
        self.delete_at(caller, id, method, None).await
    }

    /// [`EntryWriter::delete`], only while the entry is at `expected_revision` (the one the
    /// caller read): otherwise [`WriteError::Changed`] and nothing is deleted.
    pub async fn delete_at(
        &self,
        caller: &Caller,
        id: &EntryId,
        method: &str,
        expected_revision: Option<i64>,
    ) -> Result<Written, WriteError> {
        let _audited = self.state.audit.guard();
        let deleted = match self.state.store.delete_entry(id, expected_revision).await {
            Ok(deleted) => deleted,
            Err(DatastoreError::NotFound(_)) => return Err(WriteError::NotFound),
            Err(DatastoreError::Conflict(_)) => {
                let current = match self.state.store.get_entry(id).await? {
                    Some(entry) => entry.revision_number,
                    None => return Err(WriteError::NotFound),
                };
                return Err(WriteError::Changed {
                    id: id.as_str().to_owned(),
                    expected: expected_revision.unwrap_or_default(),
                    current,
                });
            }
            Err(error) => return Err(error.into()),
        };
        self.state.written().await;
        self.state.audit.record(
            &caller.describe(),
            "entry deleted",
            serde_json::json!({
                "method": method,
                "entry_id": deleted.id.as_str(),
                "spiffe_id": deleted.spiffe_id.to_string(),
            }),
        );
        Ok(Written {
            entry: deleted,
            exception_ids: Vec::new(),
            changed: true,
        })
    }

    /// `entry` as created by `caller`: through a named admin socket and with none of owner,
    /// reason and source, it gets the socket's (a program speaking SPIRE's API cannot send
    /// them); and its source must not be one that a named socket keeps for another caller.
    fn attribute(
        &self,
        caller: &Caller,
        mut entry: RegistrationEntry,
    ) -> Result<RegistrationEntry, WriteError> {
        if let Caller::Local {
            socket: Some(socket),
            ..
        } = caller
            && entry.owner.is_none()
            && entry.reason.is_none()
            && entry.source.is_none()
        {
            entry.owner.clone_from(&socket.owner);
            entry.reason.clone_from(&socket.reason);
            entry.source = Some(socket.source().to_owned());
        }
        self.check_source(caller, &entry)?;
        Ok(entry)
    }

    /// Refuses to give `entry` a source that a named admin socket other than `caller`'s keeps.
    fn check_source(&self, caller: &Caller, entry: &RegistrationEntry) -> Result<(), WriteError> {
        let Some(source) = entry.source.as_deref() else {
            return Ok(());
        };
        let Some(keeper) = self
            .state
            .config
            .admin_sockets
            .iter()
            .find(|socket| socket.source() == source)
        else {
            return Ok(());
        };
        let through_keeper = matches!(
            caller,
            Caller::Local { socket: Some(socket), .. } if socket.name == keeper.name
        );
        if through_keeper {
            Ok(())
        } else {
            Err(WriteError::Invalid(format!(
                "source {source:?} is kept for what is created through the admin socket {:?}; \
                 choose another source",
                keeper.name
            )))
        }
    }

    /// Judges an entry about to be written by `caller`, without writing it. Without a policy
    /// every entry passes. Returns the IDs of the exceptions it passes under; a refusal is
    /// audited.
    pub fn judge(
        &self,
        entry: &RegistrationEntry,
        operation: Operation,
        caller: &Caller,
    ) -> Result<Vec<String>, WriteError> {
        let Some(policy) = self.state.judge.policy() else {
            return Ok(Vec::new());
        };
        let now = self.state.now();
        let input = self
            .state
            .judge
            .entry_input(entry, operation, Some(caller_input(caller)), now);
        let metrics = self.state.judge.metrics();
        let decision: Decision = policy.current().evaluate_entry(&input).map_err(|e| {
            metrics.record(PolicyPoint::Write, PolicyDecision::Failed, []);
            WriteError::PolicyFailed(e.to_string())
        })?;
        if decision.passes() {
            let used = decision.exceptions_used();
            let counted = if used.is_empty() {
                PolicyDecision::Pass
            } else {
                PolicyDecision::Waived
            };
            metrics.record(PolicyPoint::Write, counted, []);
            return Ok(used);
        }
        metrics.record(
            PolicyPoint::Write,
            PolicyDecision::Refused,
            decision.violations.iter().map(|v| v.rule.as_str()),
        );
        self.state.audit.record(
            &caller.describe(),
            "entry refused by policy",
            serde_json::json!({
                "operation": operation,
                "entry_id": entry.id.as_str(),
                "spiffe_id": entry.spiffe_id.to_string(),
                "rules": decision.violations.iter().map(|v| v.rule.as_str()).collect::<Vec<_>>(),
            }),
        );
        Err(WriteError::Refused {
            violations: decision.violations,
        })
    }

    fn check_structure(&self, entry: &RegistrationEntry) -> Result<(), WriteError> {
        entry
            .validate(self.state.trust_domain())
            .map_err(|e| WriteError::Invalid(e.to_string()))
    }
}
