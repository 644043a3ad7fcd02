//! What the agent keeps in `data_dir` across restarts: its SVID chain and private key, the
//! trust bundle it last received and whether the server lets it re-attest.
//!
//! Everything lives in one JSON file, [`STATE_FILE`], so that a chain and its key are always
//! replaced together: the file is written to a temporary name, flushed to disk and renamed
//! over the old one. The file is readable by the owner only (0600) and the directory is made
//! owner-only (0700), because the file holds the agent's private key.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lanyard_core::keys::{KeyPair, pem_encode};
use lanyard_core::{TrustBundle, TrustDomain};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use serde::{Deserialize, Serialize};

/// The state file's name inside `data_dir`.
pub(crate) const STATE_FILE: &str = "agent-data.json";

/// The version of the state file's layout; bumped on incompatible changes.
const FORMAT_VERSION: u32 = 1;

/// The largest state file read back; anything bigger is not ours.
const MAX_STATE_LEN: u64 = 16 * 1024 * 1024;

/// Why the stored state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StorageError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The agent's SVID as stored: the chain (leaf first) and its private key.
pub(crate) struct StoredSvid {
    pub(crate) chain: Vec<Vec<u8>>,
    pub(crate) key: Arc<KeyPair>,
}

impl std::fmt::Debug for StoredSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSvid")
            .field("n_certs", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Everything persisted.
#[derive(Debug)]
pub(crate) struct StoredState {
    /// `None` after the SVID was deleted (banned, or must attest again with a new token).
    pub(crate) svid: Option<StoredSvid>,
    pub(crate) reattestable: bool,
    pub(crate) bundle: TrustBundle,
}

/// The file's JSON layout. Not `Debug`: it holds the private key.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    trust_domain: String,
    /// PEM `CERTIFICATE` blocks, leaf first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    svid_chain_pem: Option<String>,
    /// A PEM `PRIVATE KEY` (PKCS#8) block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    svid_key_pem: Option<String>,
    reattestable: bool,
    /// The trust domain's bundle in the SPIFFE bundle format (a JWK Set).
    bundle: serde_json::Value,
}

/// Creates `dir` if needed and makes it owner-only.
pub(crate) fn prepare_data_dir(dir: &Path) -> Result<(), StorageError> {
    let io_error = |source| StorageError::Io {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(dir).map_err(io_error)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_error)
}

/// Reads the stored state of `data_dir`; `Ok(None)` when there is none yet.
///
/// State of another trust domain is ignored with a warning: the configuration changed and
/// the old SVID and bundle are of no use.
pub(crate) fn load(
    data_dir: &Path,
    trust_domain: &TrustDomain,
) -> Result<Option<StoredState>, StorageError> {
    let path = data_dir.join(STATE_FILE);
    let invalid = |reason: String| StorageError::Invalid {
        path: path.clone(),
        reason,
    };
    let text = match read_limited(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StorageError::Io {
                path: path.clone(),
                source,
            });
        }
    };
    let file: StateFile = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
    if file.version != FORMAT_VERSION {
        return Err(invalid(format!(
            "unsupported format version {} (expected {FORMAT_VERSION})",
            file.version
        )));
    }
    if file.trust_domain != trust_domain.name() {
        tracing::warn!(
            path = %path.display(),
            stored = %file.trust_domain,
            configured = %trust_domain,
            "ignoring stored agent state of another trust domain"
        );
        return Ok(None);
    }
    let bundle =
        TrustBundle::from_jwks_json(trust_domain.clone(), file.bundle.to_string().as_bytes())
            .map_err(|e| invalid(format!("bundle: {e}")))?;
    let svid = match (file.svid_chain_pem, file.svid_key_pem) {
        (Some(chain_pem), Some(key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .map(|cert| cert.map(|c| c.to_vec()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(format!("svid_chain_pem: {e}")))?;
            if chain.is_empty() {
                return Err(invalid("svid_chain_pem holds no certificate".into()));
            }
            // The key error says nothing about the key's bytes.
            let key = KeyPair::from_pkcs8_pem(&key_pem)
                .map_err(|e| invalid(format!("svid_key_pem: {e}")))?;
            Some(StoredSvid {
                chain,
                key: Arc::new(key),
            })
        }
        (None, None) => None,
        _ => return Err(invalid("an SVID chain needs its key and vice versa".into())),
    };
    Ok(Some(StoredState {
        svid,
        reattestable: file.reattestable,
        bundle,
    }))
}

/// Replaces the stored state of `data_dir` atomically.
pub(crate) fn save(data_dir: &Path, state: &StoredState) -> Result<(), StorageError> {
    let path = data_dir.join(STATE_FILE);
    let bundle =
        serde_json::from_str(&state.bundle.to_jwks_json()).map_err(|e| StorageError::Invalid {
            path: path.clone(),
            reason: format!("encoding the bundle: {e}"),
        })?;
    let file = StateFile {
        version: FORMAT_VERSION,
        trust_domain: state.bundle.trust_domain().name().to_owned(),
        svid_chain_pem: state.svid.as_ref().map(|svid| {
            svid.chain
                .iter()
                .map(|der| pem_encode("CERTIFICATE", der))
                .collect()
        }),
        svid_key_pem: state.svid.as_ref().map(|svid| svid.key.secret_pkcs8_pem()),
        reattestable: state.reattestable,
        bundle,
    };
    let mut bytes = serde_json::to_vec_pretty(&file).map_err(|e| StorageError::Invalid {
        path: path.clone(),
        reason: format!("encoding: {e}"),
    })?;
    bytes.push(b'\n');
    write_atomic(&path, &bytes, 0o600).map_err(|source| StorageError::Io { path, source })
}

/// Writes `bytes` to `path` so that readers see either the old or the new content, never a
/// mix: a temporary file in the same directory, created with `mode`, flushed to disk, then
/// renamed over `path`, and the directory flushed so the rename survives a crash.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // A leftover temporary file may have been created with other permissions.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn read_limited(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_STATE_LEN + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_STATE_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the file is too large",
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use lanyard_core::KeyType;
    use lanyard_core::x509::X509Ca;

    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn bundle_and_svid() -> (TrustBundle, StoredSvid) {
        let ca = X509Ca::self_signed(
            &td(),
            KeyPair::generate(KeyType::EcP256).unwrap(),
            &Default::default(),
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .unwrap();
        let key = KeyPair::generate(KeyType::EcP256).unwrap();
        let svid = ca
            .mint_svid(
                &lanyard_core::x509::SvidParams::new(
                    "spiffe://example.org/spire/agent/join_token/t"
                        .parse()
                        .unwrap(),
                    key.public_key_der(),
                    Duration::from_secs(600),
                ),
                SystemTime::now(),
            )
            .unwrap();
        let mut bundle = TrustBundle::new(td());
        bundle
            .add_x509_authority(lanyard_core::X509Authority::new(ca.cert_der().to_vec()).unwrap());
        (
            bundle,
            StoredSvid {
                chain: svid.cert_chain().to_vec(),
                key: Arc::new(key),
            },
        )
    }

    #[test]
    fn state_round_trips_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("agent");
        prepare_data_dir(&data_dir).unwrap();
        assert_eq!(
            fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(load(&data_dir, &td()).unwrap().is_none());

        let (bundle, svid) = bundle_and_svid();
        let chain = svid.chain.clone();
        let key_der = svid.key.secret_pkcs8_der().to_vec();
        save(
            &data_dir,
            &StoredState {
                svid: Some(svid),
                reattestable: true,
                bundle: bundle.clone(),
            },
        )
        .unwrap();
        let path = data_dir.join(STATE_FILE);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!data_dir.join("agent-data.json.tmp").exists());

        let loaded = load(&data_dir, &td()).unwrap().unwrap();
        assert!(loaded.reattestable);
        assert_eq!(loaded.bundle, bundle);
        let loaded_svid = loaded.svid.unwrap();
        assert_eq!(loaded_svid.chain, chain);
        assert_eq!(loaded_svid.key.secret_pkcs8_der(), key_der);

        // Deleting the SVID keeps the bundle.
        save(
            &data_dir,
            &StoredState {
                svid: None,
                reattestable: false,
                bundle: bundle.clone(),
            },
        )
        .unwrap();
        let loaded = load(&data_dir, &td()).unwrap().unwrap();
        assert!(loaded.svid.is_none());
        assert_eq!(loaded.bundle, bundle);

        // Another trust domain's state is ignored.
        let other = TrustDomain::new("other.org").unwrap();
        assert!(load(&data_dir, &other).unwrap().is_none());
    }

    #[test]
    fn corrupt_state_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let err = load(dir.path(), &td()).unwrap_err().to_string();
        assert!(err.contains(STATE_FILE), "{err}");
        fs::write(
            dir.path().join(STATE_FILE),
            br#"{"version":1,"trust_domain":"example.org","svid_chain_pem":"x","reattestable":false,"bundle":{"keys":[]}}"#,
        )
        .unwrap();
        let err = load(dir.path(), &td()).unwrap_err().to_string();
        assert!(err.contains("needs its key"), "{err}");
    }

    #[test]
    fn atomic_write_replaces_content_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&path, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
