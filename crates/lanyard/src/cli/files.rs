//! Writing the files a user asks for (`fetch x509 --write`, `x509 mint --write`, `jwt mint
//! --write`, the bundle and policy of `dev`) into a directory that someone else may be able to
//! write to as well.
//!
//! Nothing already at the final name is opened: each file is created under a temporary name
//! in the same directory with `O_CREAT | O_EXCL | O_NOFOLLOW` and its final mode, written,
//! fsynced, and renamed over the final name. `rename` replaces a symlink planted there instead
//! of writing through it, and readers see the old file or the complete new one, never a
//! half-written key. The server's key manager writes its key files the same way
//! (`lanyard_server::keymanager::write_private_file`).

use std::ffi::OsString;
use std::fs;
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;

/// File mode of written certificates, bundles and policies.
pub(crate) const PUBLIC_FILE_MODE: u32 = 0o644;
/// File mode of written private keys and tokens.
pub(crate) const SECRET_FILE_MODE: u32 = 0o600;

/// How many temporary names one call tries before giving up: a name is taken only by a
/// leftover of a crashed run or by someone planting files, and each try picks a fresh one.
const MAX_TEMPORARY_NAMES: u32 = 16;

/// Replaces `path` with a new regular file holding `contents` with exactly `mode`. A symlink
/// at `path` is replaced, never followed; on any error the temporary file is removed and
/// `path` is left as it was.
pub(crate) fn replace_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("cannot write {}: not a file name", path.display()))?;
    let (mut file, temporary) = create_temporary(dir, name, mode)?;
    let written = (|| {
        // The mode given to open(2) is narrowed by the umask; the file gets exactly `mode`.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temporary, path)?;
        // The rename itself survives a crash only once the directory is synced.
        fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written.with_context(|| format!("cannot write {}", path.display()))
}

/// A new file `.NAME.PID.N.tmp` in `dir`, created exclusively without following a link.
fn create_temporary(
    dir: &Path,
    name: &std::ffi::OsStr,
    mode: u32,
) -> anyhow::Result<(fs::File, PathBuf)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut last_error = None;
    for _ in 0..MAX_TEMPORARY_NAMES {
        let mut temporary_name = OsString::from(".");
        temporary_name.push(name);
        temporary_name.push(format!(
            ".{}.{}.tmp",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let temporary = dir.join(temporary_name);
        let opened = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temporary);
        match opened {
            Ok(file) => return Ok((file, temporary)),
            Err(error) if error.kind() == ErrorKind::AlreadyExists => last_error = Some(error),
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("cannot create a file in {}", dir.display()));
            }
        }
    }
    Err(last_error.unwrap_or_else(|| ErrorKind::AlreadyExists.into())).with_context(|| {
        format!(
            "cannot create a file in {}: every temporary name is taken",
            dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn a_planted_symlink_is_replaced_and_its_target_left_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").expect("victim written");
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let key = dir.path().join("svid.0.key");
        std::os::unix::fs::symlink(&victim, &key).expect("symlink planted");
        let dangling = dir.path().join("bundle.0.pem");
        std::os::unix::fs::symlink(dir.path().join("absent"), &dangling).expect("symlink planted");

        replace_file(&key, b"secret", SECRET_FILE_MODE).expect("written");
        replace_file(&dangling, b"bundle", PUBLIC_FILE_MODE).expect("written");

        assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
        let victim_mode = std::fs::metadata(&victim).expect("victim").mode() & 0o777;
        assert_eq!(victim_mode, 0o644);
        assert!(!dir.path().join("absent").exists());
        for (path, contents) in [(&key, &b"secret"[..]), (&dangling, &b"bundle"[..])] {
            let metadata = std::fs::symlink_metadata(path).expect("metadata");
            assert!(metadata.file_type().is_file(), "{}", path.display());
            assert_eq!(std::fs::read(path).expect("read"), contents);
        }
        let key_mode = std::fs::symlink_metadata(&key).expect("key").mode() & 0o777;
        assert_eq!(key_mode, 0o600);
        // No temporary file is left behind.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("listed")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        assert_eq!(names, ["bundle.0.pem", "svid.0.key", "victim"]);
    }

    #[test]
    fn an_existing_wider_file_is_replaced_by_an_owner_only_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("key.pem");
        std::fs::write(&path, "old").expect("pre-existing file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        replace_file(&path, b"secret", SECRET_FILE_MODE).expect("written");
        assert_eq!(
            std::fs::metadata(&path).expect("metadata").mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read(&path).expect("read"), b"secret");
    }

    #[test]
    fn a_directory_that_is_not_there_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("missing").join("key.pem");
        let err = replace_file(&path, b"secret", SECRET_FILE_MODE).expect_err("no directory");
        assert!(format!("{err:#}").contains("missing"), "{err:#}");
    }
}
