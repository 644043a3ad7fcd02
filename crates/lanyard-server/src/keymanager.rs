//! Where the server's private keys live: on disk (PKCS#8 DER, mode 0600, written atomically)
//! or in memory. CA private keys never go into the datastore.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use lanyard_core::keys::{KeyError, KeyPair, KeyType};

/// Errors from storing or loading keys. Messages name the key ID and file, never key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyManagerError {
    /// The key ID has characters that are not safe in a file name.
    #[error("invalid key id {0:?}: use letters, digits, '-' and '_'")]
    InvalidId(String),
    /// Reading or writing a key file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A stored key could not be decoded.
    #[error("key {id:?} is unreadable: {source}")]
    Corrupt {
        /// The key ID.
        id: String,
        /// Why decoding failed.
        source: KeyError,
    },
    /// A key file can be read by users other than its owner.
    #[error(
        "key file {path} is readable by others (mode {mode:04o}); treat the key as exposed, or \
         run `chmod 600 {path}` if only trusted users could have read it"
    )]
    Exposed {
        /// The file involved.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Key generation failed.
    #[error("generating key {id:?}: {source}")]
    Generate {
        /// The key ID.
        id: String,
        /// Why generation failed.
        source: KeyError,
    },
}

/// A store of named private keys.
pub trait KeyManager: Send + Sync + fmt::Debug {
    /// Loads the key named `id`, if it exists.
    fn load(&self, id: &str) -> Result<Option<KeyPair>, KeyManagerError>;

    /// Stores `key` under `id`, replacing any previous key of that name.
    fn store(&self, id: &str, key: &KeyPair) -> Result<(), KeyManagerError>;

    /// Removes the key named `id`; absent keys are not an error.
    fn delete(&self, id: &str) -> Result<(), KeyManagerError>;

    /// The IDs of every stored key, sorted.
    fn list(&self) -> Result<Vec<String>, KeyManagerError>;

    /// Moves the key named `id` out of the way under a new name that says why (`tag`) and
    /// when, without deleting it, and returns where it went; `None` if there was no such key.
    fn set_aside(&self, id: &str, tag: &str) -> Result<Option<String>, KeyManagerError>;

    /// Where the key named `id` lives, for messages: a file path, or a note that it is held
    /// in memory.
    fn locate(&self, id: &str) -> String;

    /// Generates a new key of `key_type`, stores it under `id` and returns it.
    fn generate(&self, id: &str, key_type: KeyType) -> Result<KeyPair, KeyManagerError> {
        let key = KeyPair::generate(key_type).map_err(|source| KeyManagerError::Generate {
            id: id.to_owned(),
            source,
        })?;
        self.store(id, &key)?;
        Ok(key)
    }
}

fn check_id(id: &str) -> Result<(), KeyManagerError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(KeyManagerError::InvalidId(id.to_owned()))
    }
}

/// Keys as files `<dir>/<id>.key` holding PKCS#8 DER, mode 0600, in a directory of mode 0700.
#[derive(Debug)]
pub struct DiskKeyManager {
    dir: PathBuf,
}

impl DiskKeyManager {
    /// Opens (creating if needed) the key directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, KeyManagerError> {
        let dir = dir.into();
        create_private_dir(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.key"))
    }
}

impl KeyManager for DiskKeyManager {
    fn load(&self, id: &str) -> Result<Option<KeyPair>, KeyManagerError> {
        check_id(id)?;
        let path = self.path(id);
        let der = match fs::read(&path) {
            Ok(der) => der,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(KeyManagerError::Io { path, source }),
        };
        check_private_mode(&path)?;
        KeyPair::from_pkcs8_der(&der)
            .map(Some)
            .map_err(|source| KeyManagerError::Corrupt {
                id: id.to_owned(),
                source,
            })
    }

    fn store(&self, id: &str, key: &KeyPair) -> Result<(), KeyManagerError> {
        check_id(id)?;
        write_private_file(&self.path(id), key.secret_pkcs8_der())
    }

    fn delete(&self, id: &str) -> Result<(), KeyManagerError> {
        check_id(id)?;
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(KeyManagerError::Io { path, source }),
        }
    }

    fn list(&self) -> Result<Vec<String>, KeyManagerError> {
        let io = |source| KeyManagerError::Io {
            path: self.dir.clone(),
            source,
        };
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io)? {
            let name = entry.map_err(io)?.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".key")) else {
                continue;
            };
            if check_id(id).is_ok() {
                ids.push(id.to_owned());
            }
        }
        ids.sort();
        Ok(ids)
    }

    fn set_aside(&self, id: &str, tag: &str) -> Result<Option<String>, KeyManagerError> {
        check_id(id)?;
        check_id(tag)?;
        let path = self.path(id);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // A name that ends in neither `.key` nor a key ID, so that `list` never sees it again.
        let mut aside = self.dir.join(format!("{id}.key.{tag}-{stamp}"));
        let mut n = 1;
        while aside.exists() {
            aside = self.dir.join(format!("{id}.key.{tag}-{stamp}-{n}"));
            n += 1;
        }
        match fs::rename(&path, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(KeyManagerError::Io { path, source }),
        }
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| KeyManagerError::Io {
                path: self.dir.clone(),
                source,
            })?;
        Ok(Some(aside.display().to_string()))
    }

    fn locate(&self, id: &str) -> String {
        self.path(id).display().to_string()
    }
}

/// Refuses a key file that users other than its owner can read or write.
fn check_private_mode(path: &Path) -> Result<(), KeyManagerError> {
    match mode_open_to_others(path) {
        Ok(None) => Ok(()),
        Ok(Some(mode)) => Err(KeyManagerError::Exposed {
            path: path.to_owned(),
            mode,
        }),
        Err(source) => Err(KeyManagerError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The permission bits of the file at `path` if users other than its owner may read or
/// write it (any group or other bit): the one rule for every private key file the server
/// reads.
pub(crate) fn mode_open_to_others(path: &Path) -> std::io::Result<Option<u32>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(path)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Ok(Some(mode));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(None)
}

/// Keys held only in this process; they are gone when it exits.
#[derive(Default)]
pub struct MemoryKeyManager {
    keys: Mutex<HashMap<String, Vec<u8>>>,
}

impl MemoryKeyManager {
    /// An empty key manager.
    pub fn new() -> Self {
        Self::default()
    }
}

impl fmt::Debug for MemoryKeyManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<String> = self
            .keys
            .lock()
            .map(|k| k.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("MemoryKeyManager")
            .field("key_ids", &ids)
            .finish()
    }
}

impl KeyManager for MemoryKeyManager {
    fn load(&self, id: &str) -> Result<Option<KeyPair>, KeyManagerError> {
        check_id(id)?;
        let der = {
            let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            keys.get(id).cloned()
        };
        der.map(|der| {
            KeyPair::from_pkcs8_der(&der).map_err(|source| KeyManagerError::Corrupt {
                id: id.to_owned(),
                source,
            })
        })
        .transpose()
    }

    fn store(&self, id: &str, key: &KeyPair) -> Result<(), KeyManagerError> {
        check_id(id)?;
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.insert(id.to_owned(), key.secret_pkcs8_der().to_vec());
        Ok(())
    }

    fn delete(&self, id: &str) -> Result<(), KeyManagerError> {
        check_id(id)?;
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.remove(id);
        Ok(())
    }

    fn list(&self) -> Result<Vec<String>, KeyManagerError> {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<String> = keys
            .keys()
            .filter(|id| check_id(id).is_ok())
            .cloned()
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn set_aside(&self, id: &str, tag: &str) -> Result<Option<String>, KeyManagerError> {
        check_id(id)?;
        check_id(tag)?;
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let Some(der) = keys.remove(id) else {
            return Ok(None);
        };
        let mut n = 0;
        let aside = loop {
            n += 1;
            let name = format!("{id}.{tag}.{n}");
            if !keys.contains_key(&name) {
                break name;
            }
        };
        keys.insert(aside.clone(), der);
        Ok(Some(aside))
    }

    fn locate(&self, id: &str) -> String {
        format!("in-memory key {id:?}")
    }
}

/// Creates `dir` (and parents) and restricts it to its owner.
pub fn create_private_dir(dir: &Path) -> Result<(), KeyManagerError> {
    let io = |source| KeyManagerError::Io {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(dir).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically with mode 0600: a temporary file in the same
/// directory, fsync, rename over the target, fsync the directory. A crash leaves either the
/// old file or the new one, never a torn or world-readable one.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), KeyManagerError> {
    let io = |source| KeyManagerError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    // A temporary file left by a crashed run of a process with the same ID goes first; the
    // new one is created exclusively (never through a planted link) with its final mode.
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(km: &dyn KeyManager) {
        assert!(km.load("x509-ca-a").unwrap().is_none());
        let key = km.generate("x509-ca-a", KeyType::EcP256).unwrap();
        let loaded = km.load("x509-ca-a").unwrap().unwrap();
        assert_eq!(loaded.public_key_der(), key.public_key_der());
        let other = KeyPair::generate(KeyType::EcP384).unwrap();
        km.store("x509-ca-a", &other).unwrap();
        let loaded = km.load("x509-ca-a").unwrap().unwrap();
        assert_eq!(loaded.key_type(), KeyType::EcP384);
        km.delete("x509-ca-a").unwrap();
        km.delete("x509-ca-a").unwrap();
        assert!(km.load("x509-ca-a").unwrap().is_none());
        assert!(matches!(
            km.load("../etc/passwd"),
            Err(KeyManagerError::InvalidId(_))
        ));
    }

    #[test]
    fn memory_round_trip() {
        round_trip(&MemoryKeyManager::new());
    }

    #[test]
    fn disk_round_trip_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let km = DiskKeyManager::open(&keys).unwrap();
        round_trip(&km);
        km.generate("jwt-a", KeyType::EcP256).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&keys), 0o700);
            assert_eq!(mode(&keys.join("jwt-a.key")), 0o600);
        }
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(&keys)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["jwt-a.key"]);
        // A restarted key manager sees the same key.
        let again = DiskKeyManager::open(&keys).unwrap();
        assert!(again.load("jwt-a").unwrap().is_some());
    }

    #[test]
    fn a_corrupt_key_file_is_reported_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let km = DiskKeyManager::open(dir.path()).unwrap();
        write_private_file(&dir.path().join("bad.key"), b"garbage").unwrap();
        let err = km.load("bad").unwrap_err();
        assert!(matches!(err, KeyManagerError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("bad"));
    }

    #[test]
    fn disk_keys_are_listed_set_aside_and_refused_when_exposed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let km = DiskKeyManager::open(dir.path()).unwrap();
        let key = km.generate("x509-ca-a", KeyType::EcP256).unwrap();
        km.generate("jwt-a", KeyType::EcP256).unwrap();
        assert_eq!(km.list().unwrap(), ["jwt-a", "x509-ca-a"]);
        let aside = km.set_aside("x509-ca-a", "replaced").unwrap().unwrap();
        assert!(aside.contains("x509-ca-a.key.replaced-"), "{aside}");
        assert_eq!(km.list().unwrap(), ["jwt-a"]);
        let moved = KeyPair::from_pkcs8_der(&fs::read(&aside).unwrap()).unwrap();
        assert_eq!(moved.public_key_der(), key.public_key_der());
        assert!(km.set_aside("x509-ca-a", "replaced").unwrap().is_none());

        let path = dir.path().join("jwt-a.key");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = km.load("jwt-a").unwrap_err();
        assert!(
            matches!(err, KeyManagerError::Exposed { mode: 0o640, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_planted_link_at_the_temporary_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let target = dir.path().join("k.key");
        let tmp = dir
            .path()
            .join(format!(".k.key.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        write_private_file(&target, b"secret").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(&target).unwrap(), b"secret");
    }

    #[test]
    fn debug_lists_ids_not_keys() {
        let km = MemoryKeyManager::new();
        let key = km.generate("k1", KeyType::EcP256).unwrap();
        let debug = format!("{km:?}");
        assert!(debug.contains("k1"));
        let pem = key.secret_pkcs8_pem();
        let secret_line = pem.lines().nth(1).unwrap();
        assert!(!debug.contains(secret_line));
    }
}
