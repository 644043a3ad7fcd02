//! The policy in force, and its reloading.
//!
//! The server loads its policy (`[policy] path`, one Rego file) at start and refuses to start
//! if it does not compile. Afterwards it reloads the file when asked (SIGHUP) and when its
//! modification time or size changes ([`PolicyHolder::watch`]). A candidate that does not
//! read or compile is refused: the policy in force stays, the error is logged, and
//! [`PolicyHolder::failed_reloads`] counts it. Evaluation always sees one complete policy.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use lanyard_core::policy::{EntryInput, Policy, PolicyError};

/// The longest one evaluation may run by default (`[policy] evaluation_timeout`).
pub const DEFAULT_EVALUATION_TIMEOUT: Duration = Duration::from_millis(100);

/// What a candidate policy is tried on before it replaces the one in force: current entries.
pub type Sampler = Box<dyn Fn() -> Vec<EntryInput> + Send + Sync>;

/// Why a policy file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("reading policy {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// It does not compile.
    #[error(transparent)]
    Compile(#[from] PolicyError),
    /// It compiles but fails to evaluate on a current entry.
    #[error("policy {path} fails to evaluate entry {entry}: {error}")]
    Evaluate {
        /// The file.
        path: PathBuf,
        /// The entry it was tried on (SPIFFE ID).
        entry: String,
        /// Why evaluation failed.
        error: PolicyError,
    },
}

/// Size and modification time: what the watcher compares.
type Stamp = Option<(u64, SystemTime)>;

/// The policy in force and the file it came from.
pub struct PolicyHolder {
    path: PathBuf,
    current: RwLock<Arc<Policy>>,
    stamp: Mutex<Stamp>,
    generation: AtomicU64,
    failed_reloads: AtomicU64,
    time_limit: Duration,
    sampler: std::sync::OnceLock<Sampler>,
}

impl std::fmt::Debug for PolicyHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyHolder")
            .field("path", &self.path)
            .field("generation", &self.generation())
            .field("time_limit", &self.time_limit)
            .finish_non_exhaustive()
    }
}

impl PolicyHolder {
    /// Loads `path`, or fails (the server does not start with a broken policy).
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::load_with_time_limit(path, DEFAULT_EVALUATION_TIMEOUT)
    }

    /// Like [`PolicyHolder::load`], each evaluation bounded by `time_limit`.
    pub fn load_with_time_limit(path: &Path, time_limit: Duration) -> Result<Self, LoadError> {
        let stamp = stamp_of(path);
        let policy = compile_file(path)?.with_time_limit(time_limit);
        Ok(Self {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(policy)),
            stamp: Mutex::new(stamp),
            generation: AtomicU64::new(1),
            failed_reloads: AtomicU64::new(0),
            time_limit,
            sampler: std::sync::OnceLock::new(),
        })
    }

    /// Sets what a candidate policy is tried on at each reload (the server's current
    /// entries). Only the first call counts.
    pub fn set_sampler(&self, sampler: Sampler) {
        let _ = self.sampler.set(sampler);
    }

    /// Compiles the file and tries the candidate on the sample entries: one that fails to
    /// evaluate on any of them would stop their issuance, so it is refused.
    fn candidate(&self) -> Result<Policy, LoadError> {
        let policy = compile_file(&self.path)?.with_time_limit(self.time_limit);
        let samples = self
            .sampler
            .get()
            .map(|sample| sample())
            .unwrap_or_default();
        for input in &samples {
            if let Err(error) = policy.evaluate_entry(input) {
                return Err(LoadError::Evaluate {
                    path: self.path.clone(),
                    entry: input.entry.spiffe_id.clone(),
                    error,
                });
            }
        }
        Ok(policy)
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<Policy> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The file the policy comes from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many policies have been put in force (1 after loading); decisions cached under an
    /// older generation are stale.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// How many reloads were refused since start.
    pub fn failed_reloads(&self) -> u64 {
        self.failed_reloads.load(Ordering::Relaxed)
    }

    /// Reads and compiles the file again. On success the new policy is in force; on failure
    /// the old one stays, the failure is logged and counted, and returned.
    pub fn reload(&self) -> Result<(), LoadError> {
        let stamp = stamp_of(&self.path);
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        match self.candidate() {
            Ok(policy) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                tracing::info!(target: "audit", path = %self.path.display(), generation, "policy reloaded");
                Ok(())
            }
            Err(error) => {
                let failures = self.failed_reloads.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(
                    path = %self.path.display(),
                    failed_reloads = failures,
                    "policy reload refused, the previous policy stays in force: {error}"
                );
                Err(error)
            }
        }
    }

    /// Reloads if the file's size or modification time changed since the last (re)load.
    /// Returns whether it tried.
    pub fn reload_if_changed(&self) -> bool {
        let stamp = stamp_of(&self.path);
        let changed = *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) != stamp;
        if changed {
            let _ = self.reload();
        }
        changed
    }

    /// Checks the file every `interval` until `shutdown` resolves, and on SIGHUP (Unix).
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|error| tracing::warn!("cannot listen for SIGHUP: {error}"))
            .ok();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = ticker.tick() => {
                    self.reload_if_changed();
                }
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    tracing::info!(path = %self.path.display(), "SIGHUP: reloading the policy");
                    let _ = self.reload();
                }
            }
        }
    }
}

fn compile_file(path: &Path) -> Result<Policy, LoadError> {
    let source = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    let name = path.display().to_string();
    Ok(Policy::compile([(name.as_str(), source.as_str())])?)
}

fn stamp_of(path: &Path) -> Stamp {
    std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.len(), m.modified().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOW_ALL: &str = "package lanyard\n";
    const OWNER_REQUIRED: &str = "package lanyard\nimport rego.v1\nviolations contains {\"rule\": \"owner-required\", \"message\": \"no owner\"} if { input.entry.owner == null }\n";

    fn rules(holder: &PolicyHolder) -> usize {
        let input: lanyard_core::policy::EntryInput = serde_json::from_value(serde_json::json!({
            "operation": "check", "now": 0, "caller": null, "exceptions": [],
            "entry": {"id": "e", "spiffe_id": "spiffe://example.org/a", "parent_id": "spiffe://example.org/p",
                "selectors": ["unix:uid:1"], "x509_svid_ttl": 1, "jwt_svid_ttl": 1, "admin": false,
                "downstream": false, "federates_with": [], "dns_names": [], "hint": "", "store_svid": false,
                "owner": null, "reason": null, "ticket": null, "expires_at": null}
        }))
        .expect("valid input");
        holder
            .current()
            .evaluate_entry(&input)
            .expect("evaluates")
            .violations
            .len()
    }

    #[test]
    fn a_broken_policy_does_not_replace_a_working_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.rego");
        std::fs::write(&path, OWNER_REQUIRED).expect("write");
        let holder = PolicyHolder::load(&path).expect("loads");
        assert_eq!(rules(&holder), 1);
        assert_eq!(holder.generation(), 1);

        std::fs::write(&path, "package lanyard\nviolations contains v if {").expect("write");
        let error = holder.reload().expect_err("refused");
        assert!(error.to_string().contains("does not compile"), "{error}");
        assert_eq!(rules(&holder), 1, "the old policy is still in force");
        assert_eq!(holder.failed_reloads(), 1);
        assert_eq!(holder.generation(), 1);

        std::fs::remove_file(&path).expect("remove");
        assert!(matches!(holder.reload(), Err(LoadError::Read { .. })));
        assert_eq!(holder.failed_reloads(), 2);
        assert_eq!(rules(&holder), 1);

        std::fs::write(&path, ALLOW_ALL).expect("write");
        holder.reload().expect("reloads");
        assert_eq!(rules(&holder), 0);
        assert_eq!(holder.generation(), 2);
    }

    #[test]
    fn a_broken_policy_fails_the_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.rego");
        std::fs::write(&path, "package other\n").expect("write");
        let error = PolicyHolder::load(&path).expect_err("refused");
        assert!(error.to_string().contains("package lanyard"), "{error}");
        assert!(PolicyHolder::load(&dir.path().join("missing.rego")).is_err());
    }

    #[test]
    fn a_changed_file_is_reloaded_and_an_unchanged_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.rego");
        std::fs::write(&path, ALLOW_ALL).expect("write");
        let holder = PolicyHolder::load(&path).expect("loads");
        assert!(!holder.reload_if_changed());
        // A different size is a change even within the file system's mtime granularity.
        std::fs::write(&path, OWNER_REQUIRED).expect("write");
        assert!(holder.reload_if_changed());
        assert_eq!(rules(&holder), 1);
        assert_eq!(holder.generation(), 2);
        assert!(!holder.reload_if_changed());
    }

    #[tokio::test]
    async fn sighup_reloads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.rego");
        std::fs::write(&path, ALLOW_ALL).expect("write");
        let holder = Arc::new(PolicyHolder::load(&path).expect("loads"));
        // Tokio's handler, once installed, stays for the life of the process: installing it
        // here first means the signal below can never take the default action (exit).
        let _installed = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .expect("SIGHUP handler");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // A long interval: only the signal can cause the reload.
        let watcher = tokio::spawn(Arc::clone(&holder).watch(Duration::from_secs(3600), async {
            let _ = stopped.await;
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reloads_before = holder.generation();
        let status = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while holder.generation() == reloads_before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "SIGHUP did not reload"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop.send(());
        watcher.await.expect("watcher ends");
    }
}
