//! The tamper-evident audit log on disk: hash-chained JSON lines
//! ([`lanyard_core::audit`]), appended and fsynced one event at a time, owner-only (0600).
//!
//! Every change the datastore commits is covered: an API handler appends its record after the
//! commit and before it answers, and [`recover`] appends a record, rebuilt from the
//! datastore's change log, for each change committed since the last checkpoint when the
//! process died (or an append failed) in between. The checkpoint — the revision up to which
//! every change is known to be recorded — lives in the datastore (meta key
//! [`COVERED_REVISION_KEY`]) and advances only while no audited write is in flight, so a
//! recovered record may repeat one written just before a crash but a change is never missed.
//!
//! Opening an existing log verifies its whole chain first. A final line torn by a crash
//! (no newline) was never acknowledged and is cut off. A log that does not verify is not
//! appended to: opening fails with the line that breaks the chain, so tampering is reported
//! instead of being buried under new lines.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use lanyard_core::audit::{Chain, ChainError, Head};
use serde::Serialize;

use crate::datastore::{Datastore, DatastoreError};

/// The datastore meta key holding the revision up to which every change has an audit record,
/// for the server instance `local` (the default); other instances add `.<instance>`, since each
/// server sharing a datastore keeps its own audit log and checkpoint.
pub const COVERED_REVISION_KEY: &str = "audit.covered_revision";

/// The checkpoint's meta key for server `instance`.
pub fn covered_revision_key(instance: &str) -> String {
    if instance == crate::config::DEFAULT_INSTANCE {
        COVERED_REVISION_KEY.to_owned()
    } else {
        format!("{COVERED_REVISION_KEY}.{instance}")
    }
}

/// The caller named in records rebuilt from the change log.
pub const RECOVERED_CALLER: &str = "server (from the datastore's change log)";

/// Why the audit log cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Reading, writing or syncing failed.
    #[error("audit log {path}: {source}")]
    Io {
        /// The log.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The datastore could not be read or written while recovering records.
    #[error("recovering audit records from the datastore: {0}")]
    Datastore(#[from] DatastoreError),
    /// The existing log does not verify.
    #[error("audit log {path} has been tampered with ({source}); move it aside to start a new one")]
    Tampered {
        /// The log.
        path: PathBuf,
        /// Where the chain breaks.
        source: ChainError,
    },
}

/// An open audit log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    inner: Mutex<(File, Chain)>,
}

impl AuditLog {
    /// Opens (or creates, mode 0600) the log at `path` and verifies what it holds.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        let existing = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        let (chain, torn) = Chain::resume(&existing).map_err(|source| AuditError::Tampered {
            path: path.to_owned(),
            source,
        })?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        if torn > 0 {
            let keep = (existing.len() - torn) as u64;
            file.set_len(keep).map_err(io)?;
            tracing::warn!(path = %path.display(), bytes = torn, "cut off a torn last audit line");
        }
        Ok(Self {
            path: path.to_owned(),
            inner: Mutex::new((file, chain)),
        })
    }

    /// Appends `event` at `time` and syncs it to disk before returning.
    pub fn record(&self, time: SystemTime, event: &impl Serialize) -> Result<Head, AuditError> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (file, chain) = &mut *guard;
        let mut next = chain.clone();
        let line = next.append(time, event);
        let written = file
            .write_all(line.as_bytes())
            .and_then(|()| file.sync_data());
        if let Err(source) = written {
            // The line may be partly on disk; the next open cuts it off as torn. Until then
            // the chain stays where it was, so a retry writes the same link again.
            return Err(AuditError::Io {
                path: self.path.clone(),
                source,
            });
        }
        *chain = next;
        Ok(chain.head().clone())
    }

    /// The head of the chain: how many lines and the last line's hash.
    pub fn head(&self) -> Head {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .head()
            .clone()
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The revision up to which `store`'s changes are known to have audit records in server
/// `instance`'s log, if recorded.
pub async fn covered_revision(
    store: &dyn Datastore,
    instance: &str,
) -> Result<Option<i64>, AuditError> {
    let key = covered_revision_key(instance);
    let Some(bytes) = store.get_meta(&key).await? else {
        return Ok(None);
    };
    std::str::from_utf8(&bytes)
        .ok()
        .and_then(|text| text.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            AuditError::Datastore(DatastoreError::Backend(format!(
                "meta key {key} holds {bytes:?}, not a revision"
            )))
        })
}

/// Records that every change up to `revision` has an audit record in server `instance`'s log.
pub async fn set_covered_revision(
    store: &dyn Datastore,
    instance: &str,
    revision: i64,
) -> Result<(), AuditError> {
    store
        .set_meta(
            &covered_revision_key(instance),
            revision.to_string().as_bytes(),
        )
        .await?;
    Ok(())
}

/// Appends to `log` one record per change `store` committed after the last checkpoint, then
/// moves the checkpoint past them; returns how many it appended. A store never checkpointed
/// starts its coverage at its current revision (with one record saying so if it already
/// holds changes).
pub async fn recover(
    log: &AuditLog,
    store: &dyn Datastore,
    instance: &str,
    now: SystemTime,
) -> Result<usize, AuditError> {
    let Some(covered) = covered_revision(store, instance).await? else {
        let current = store.current_revision().await?;
        if current > 0 {
            log.record(
                now,
                &serde_json::json!({
                    "action": "audit coverage starts",
                    "caller": RECOVERED_CALLER,
                    "details": {"revision": current},
                }),
            )?;
        }
        set_covered_revision(store, instance, current).await?;
        return Ok(0);
    };
    let changes = store.changes_since(covered).await?;
    for change in &changes {
        log.record(
            now,
            &serde_json::json!({
                "action": "change recovered",
                "caller": RECOVERED_CALLER,
                "details": {
                    "revision": change.revision,
                    "change": change.kind.as_str(),
                    "subject": change.subject.kind_str(),
                    "id": change.subject.key(),
                },
            }),
        )?;
    }
    if let Some(last) = changes.last() {
        tracing::warn!(
            records = changes.len(),
            from = covered + 1,
            to = last.revision,
            "appended audit records rebuilt from the change log for changes committed without one"
        );
        set_covered_revision(store, instance, last.revision).await?;
    }
    Ok(changes.len())
}

/// A datastore write whose audit record is not yet appended; see [`AuditTrail::guard`].
#[derive(Debug)]
#[must_use = "the guard must live until the audit record is written"]
pub struct AuditedWrite(Arc<AtomicUsize>);

impl Drop for AuditedWrite {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The server's record of changes: the audit log (if it keeps one), the writes in flight
/// between their commit and their record, and the checkpoint that follows them.
pub struct AuditTrail {
    log: Option<AuditLog>,
    /// The server instance whose checkpoint this trail moves.
    instance: String,
    clock: Arc<dyn Fn() -> SystemTime + Send + Sync>,
    /// Audited writes between their commit and their audit record.
    in_flight: Arc<AtomicUsize>,
    /// An append failed since the last recovery: the checkpoint must not move.
    gap: AtomicBool,
}

impl std::fmt::Debug for AuditTrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditTrail")
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl AuditTrail {
    /// A trail that records in `log` (without one, events are only traced), stamped by
    /// `clock`, moving server `instance`'s checkpoint.
    pub fn new(
        log: Option<AuditLog>,
        instance: &str,
        clock: Arc<dyn Fn() -> SystemTime + Send + Sync>,
    ) -> Self {
        Self {
            log,
            instance: instance.to_owned(),
            clock,
            in_flight: Arc::default(),
            gap: AtomicBool::new(false),
        }
    }

    /// The audit log, if the server keeps one.
    pub fn log(&self) -> Option<&AuditLog> {
        self.log.as_ref()
    }

    /// Records a change: one `audit` trace line, and one line in the audit log, fsynced,
    /// with `caller`, `action` and `details` (a JSON object). The change it describes is
    /// already committed, so a failure to record it is logged as an error, not returned; the
    /// next checkpoint rebuilds the missing record from the change log.
    pub fn record(&self, caller: &str, action: &str, details: serde_json::Value) {
        tracing::info!(target: "audit", caller, details = %details, "{action}");
        let Some(log) = &self.log else { return };
        let event = serde_json::json!({"action": action, "caller": caller, "details": details});
        if let Err(error) = log.record((self.clock)(), &event) {
            self.gap.store(true, Ordering::SeqCst);
            tracing::error!(
                action,
                "the audit log could not record a change; it is rebuilt from the change log once \
                 the log can be written: {error}"
            );
        }
    }

    /// Marks a datastore write whose audit record follows: hold the guard from before the
    /// write until after [`AuditTrail::record`], so that the checkpoint never moves past a
    /// committed change whose record is not yet written.
    pub fn guard(&self) -> AuditedWrite {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        AuditedWrite(Arc::clone(&self.in_flight))
    }

    /// Whether an audited write is in flight or an append failed: the checkpoint cannot
    /// cover the current revision yet.
    pub fn pending(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) != 0 || self.gap.load(Ordering::SeqCst)
    }

    /// Moves the checkpoint to `store`'s current revision when no audited write is in
    /// flight, or, after a failed append, rebuilds the missing records from the change log
    /// first ([`recover`]). Without an audit log, does nothing.
    pub async fn checkpoint(&self, store: &dyn Datastore) {
        let Some(log) = &self.log else { return };
        let result = if self.gap.swap(false, Ordering::SeqCst) {
            let result = recover(log, store, &self.instance, (self.clock)()).await;
            if result.is_err() {
                self.gap.store(true, Ordering::SeqCst);
            }
            result.map(drop)
        } else {
            self.advance(store).await
        };
        if let Err(error) = result {
            tracing::warn!("the audit checkpoint did not move: {error}");
        }
    }

    async fn advance(&self, store: &dyn Datastore) -> Result<(), AuditError> {
        let revision = store.current_revision().await?;
        // Every change up to `revision` was committed before it was read; one whose guard is
        // gone has its record. One still in flight, or a failed append, holds the checkpoint.
        if self.pending() {
            return Ok(());
        }
        if covered_revision(store, &self.instance).await? >= Some(revision) {
            return Ok(());
        }
        set_covered_revision(store, &self.instance, revision).await
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use serde_json::json;

    use super::*;

    #[test]
    fn records_survive_reopening_and_verify() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).expect("opens");
        log.record(SystemTime::now(), &json!({"action": "entry created"}))
            .expect("records");
        let head = log
            .record(SystemTime::now(), &json!({"action": "agent banned"}))
            .expect("records");
        assert_eq!(head.lines, 2);
        drop(log);
        let mode = std::fs::metadata(&path)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let log = AuditLog::open(&path).expect("reopens");
        assert_eq!(log.head(), head);
        log.record(SystemTime::now(), &json!({"action": "policy reloaded"}))
            .expect("records");
        let text = std::fs::read_to_string(&path).expect("reads");
        assert_eq!(
            lanyard_core::audit::verify(&text).expect("verifies").lines,
            3
        );
    }

    #[tokio::test]
    async fn recovery_records_each_change_past_the_checkpoint_once() {
        use crate::datastore::MemoryStore;
        use lanyard_core::{EntryId, RegistrationEntry, Selector, SpiffeId, TrustDomain};

        let td = TrustDomain::new("example.org").expect("td");
        let entry = |path: &str| {
            RegistrationEntry::new(
                EntryId::generate(),
                SpiffeId::from_path(&td, path).expect("id"),
                SpiffeId::from_path(&td, "/agent").expect("id"),
                [Selector::new("unix", "uid:1").expect("selector")]
                    .into_iter()
                    .collect(),
                SystemTime::now(),
            )
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(&dir.path().join("audit.log")).expect("opens");
        let store = MemoryStore::new();
        store.create_entry(entry("/before")).await.expect("stores");

        // A store never checkpointed starts its coverage where it is, saying so.
        assert_eq!(
            recover(&log, &store, "local", SystemTime::now())
                .await
                .expect("recovers"),
            0
        );
        assert_eq!(
            covered_revision(&store, "local").await.expect("reads"),
            Some(1)
        );
        assert_eq!(log.head().lines, 1);

        let a = store.create_entry(entry("/a")).await.expect("stores");
        store.delete_entry(&a.id, None).await.expect("deletes");
        assert_eq!(
            recover(&log, &store, "local", SystemTime::now())
                .await
                .expect("recovers"),
            2
        );
        assert_eq!(
            covered_revision(&store, "local").await.expect("reads"),
            Some(3)
        );
        assert_eq!(
            recover(&log, &store, "local", SystemTime::now())
                .await
                .expect("recovers"),
            0
        );

        let text = std::fs::read_to_string(log.path()).expect("reads");
        let actions: Vec<_> = lanyard_core::audit::events(&text)
            .map(|(_, _, event)| {
                format!(
                    "{} {}",
                    event["action"].as_str().expect("action"),
                    event["details"]["change"].as_str().unwrap_or("-")
                )
            })
            .collect();
        assert_eq!(
            actions,
            [
                "audit coverage starts -",
                "change recovered created",
                "change recovered deleted"
            ]
        );

        store
            .set_meta(COVERED_REVISION_KEY, b"not a number")
            .await
            .expect("stores");
        assert!(
            recover(&log, &store, "local", SystemTime::now())
                .await
                .is_err()
        );
    }

    #[test]
    fn a_torn_last_line_is_cut_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).expect("opens");
        let head = log
            .record(SystemTime::now(), &json!({"action": "entry created"}))
            .expect("records");
        drop(log);
        let mut file = OpenOptions::new().append(true).open(&path).expect("opens");
        file.write_all(b"{\"seq\":1,\"ti").expect("writes");
        drop(file);

        let log = AuditLog::open(&path).expect("reopens");
        assert_eq!(log.head(), head);
        log.record(SystemTime::now(), &json!({"action": "entry deleted"}))
            .expect("records");
        let text = std::fs::read_to_string(&path).expect("reads");
        assert_eq!(
            lanyard_core::audit::verify(&text).expect("verifies").lines,
            2
        );
    }

    #[test]
    fn a_tampered_log_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).expect("opens");
        for n in 0..3 {
            log.record(SystemTime::now(), &json!({"n": n}))
                .expect("records");
        }
        drop(log);
        let text = std::fs::read_to_string(&path).expect("reads");
        let tampered = text.replacen("\"n\":0", "\"n\":5", 1);
        std::fs::write(&path, &tampered).expect("writes");

        let error = AuditLog::open(&path).expect_err("refused");
        assert!(matches!(error, AuditError::Tampered { ref source, .. } if source.line == 2));
        assert!(error.to_string().contains("move it aside"), "{error}");
        assert_eq!(std::fs::read_to_string(&path).expect("reads"), tampered);
    }
}
