//! A TLS certificate chain and private key read from PEM files (`certificate_path`,
//! `private_key_path`), for the `https_web` bundle endpoint and OIDC discovery, and reloaded
//! without a restart.
//!
//! At start a pair that does not load stops the server. Afterwards the files are checked every
//! few seconds (size, modification time and inode of each, so a file renamed over the old one
//! counts) and on SIGHUP; a changed pair is loaded and served from the next handshake on. A
//! pair that does not load — unreadable, not PEM, a key others can read, a key that is not the
//! leaf's — is logged and counted, and the old pair stays; it is tried again when a file
//! changes again (so a certificate and key replaced one after the other load once both are
//! there).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate pair could not be loaded. The messages name files, never key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertFilesError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The certificate file holds no usable certificate.
    #[error("{path}: {reason}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file holds no usable key, or not the leaf certificate's.
    #[error("{path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file can be read or written by others than its owner.
    #[error(
        "key file {path} is readable by others (mode {mode:04o}); treat the key as exposed, or \
         run `chmod 600 {path}` if only trusted users could have read it"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Size, modification time and inode of both files: what the watcher compares.
type Stamp = [Option<(u64, SystemTime, u64)>; 2];

/// The pair in force and the files it came from.
pub struct CertFiles {
    certificate_path: PathBuf,
    private_key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    stamp: Mutex<Stamp>,
    failed_reloads: AtomicU64,
}

impl fmt::Debug for CertFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertFiles")
            .field("certificate_path", &self.certificate_path)
            .field("private_key_path", &self.private_key_path)
            .finish_non_exhaustive()
    }
}

impl CertFiles {
    /// Loads the pair; fails if it does not load.
    pub fn load(certificate_path: &Path, private_key_path: &Path) -> Result<Self, CertFilesError> {
        let stamp = stamp_of(certificate_path, private_key_path);
        let pair = load_pair(certificate_path, private_key_path)?;
        Ok(Self {
            certificate_path: certificate_path.to_owned(),
            private_key_path: private_key_path.to_owned(),
            current: RwLock::new(Arc::new(pair)),
            stamp: Mutex::new(stamp),
            failed_reloads: AtomicU64::new(0),
        })
    }

    /// The certificate chain in force, leaf first (DER).
    pub fn chain(&self) -> Vec<Vec<u8>> {
        self.read().cert.iter().map(|c| c.to_vec()).collect()
    }

    /// How many reloads were refused since start.
    pub fn failed_reloads(&self) -> u64 {
        self.failed_reloads.load(Ordering::Relaxed)
    }

    /// Loads the files again. On success the new pair is served from the next handshake; on
    /// failure the old one stays, and the failure is logged, counted and returned.
    pub fn reload(&self) -> Result<(), CertFilesError> {
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) =
            stamp_of(&self.certificate_path, &self.private_key_path);
        match load_pair(&self.certificate_path, &self.private_key_path) {
            Ok(pair) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pair);
                tracing::info!(
                    certificate = %self.certificate_path.display(),
                    "loaded a new certificate and key"
                );
                Ok(())
            }
            Err(error) => {
                let failures = self.failed_reloads.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(
                    certificate = %self.certificate_path.display(),
                    private_key = %self.private_key_path.display(),
                    failed_reloads = failures,
                    "the changed certificate or key was refused, the previous pair stays in use: {error}"
                );
                Err(error)
            }
        }
    }

    /// Reloads if either file changed since the last (re)load; returns whether it tried.
    pub fn reload_if_changed(&self) -> bool {
        let stamp = stamp_of(&self.certificate_path, &self.private_key_path);
        let changed = *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) != stamp;
        if changed {
            let _ = self.reload();
        }
        changed
    }

    /// Checks the files every `interval` until `shutdown` resolves, and on SIGHUP (Unix).
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
                    let _ = self.reload();
                }
            }
        }
    }

    fn read(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.read())
    }
}

fn load_pair(
    certificate_path: &Path,
    private_key_path: &Path,
) -> Result<CertifiedKey, CertFilesError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CertFilesError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let certificate_error = |reason: String| CertFilesError::Certificate {
        path: certificate_path.to_owned(),
        reason,
    };
    let key_error = |reason: String| CertFilesError::Key {
        path: private_key_path.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&read(certificate_path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| certificate_error(format!("not a PEM certificate chain: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(certificate_error("holds no certificate".into()));
    };
    lanyard_core::x509::validity_of(leaf)
        .map_err(|e| certificate_error(format!("the first certificate does not parse: {e}")))?;
    check_private_mode(private_key_path)?;
    // The error names the problem, never the key.
    let key = PrivateKeyDer::from_pem_slice(&read(private_key_path)?)
        .map_err(|e| key_error(format!("not a PEM private key: {e}")))?;
    let signing_key = crate::tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_error(format!("unusable private key: {e}")))?;
    let pair = CertifiedKey::new(chain, signing_key);
    pair.keys_match().map_err(|_| {
        key_error(format!(
            "not the key of the first certificate in {}",
            certificate_path.display()
        ))
    })?;
    Ok(pair)
}

/// Refuses a key file that others than its owner can read or write, as the key manager does.
fn check_private_mode(path: &Path) -> Result<(), CertFilesError> {
    match crate::keymanager::mode_open_to_others(path) {
        Ok(None) => Ok(()),
        Ok(Some(mode)) => Err(CertFilesError::Exposed {
            path: path.to_owned(),
            mode,
        }),
        Err(source) => Err(CertFilesError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn stamp_of(certificate_path: &Path, private_key_path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    [certificate_path, private_key_path].map(|path| {
        std::fs::metadata(path)
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?, m.ino())))
    })
}
