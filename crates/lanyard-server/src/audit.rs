//! The tamper-evident audit log on disk: hash-chained JSON lines
//! ([`lanyard_core::audit`]), appended and fsynced one event at a time, owner-only (0600).
//!
//! Opening an existing log verifies its whole chain first. A final line torn by a crash
//! (no newline) was never acknowledged and is cut off. A log that does not verify is not
//! appended to: opening fails with the line that breaks the chain, so tampering is reported
//! instead of being buried under new lines.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use lanyard_core::audit::{Chain, ChainError, Head};
use serde::Serialize;

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
