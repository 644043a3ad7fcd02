//! Debian's nginx for the tests: found at `/usr/sbin/nginx`, or installed with `apt-get`
//! (`nginx-light`, else `nginx`) when the tests run as root and it is missing. CI never skips;
//! `LANYARD_E2E_SKIP_NGINX=1` skips the tests that need it locally.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Set to `1` to skip the nginx tests (CI never does).
pub const SKIP_VAR: &str = "LANYARD_E2E_SKIP_NGINX";

const NGINX: &str = "/usr/sbin/nginx";

/// The nginx binary, installed from Debian's packages if needed; `None` (with a notice naming
/// `test`) when [`SKIP_VAR`] is set. Panics, saying how to get it, when it cannot be had.
pub fn nginx_or_skip(test: &str) -> Option<&'static Path> {
    if std::env::var_os(SKIP_VAR).is_some_and(|value| value == "1") {
        let _ = writeln!(std::io::stderr(), "skipping {test}: {SKIP_VAR}=1");
        return None;
    }
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BINARY.get_or_init(install) {
        Ok(path) => Some(path.as_path()),
        Err(error) => panic!("{error}"),
    }
}

fn install() -> Result<PathBuf, String> {
    let binary = PathBuf::from(NGINX);
    if binary.is_file() {
        return Ok(binary);
    }
    if !crate::running_as_root() {
        return Err(format!(
            "nginx is not installed ({NGINX}) and installing it needs root: run `apt-get \
             install nginx-light` (or `nginx`), or set {SKIP_VAR}=1"
        ));
    }
    crate::apt_get(&["update"])?;
    if crate::apt_get(&["install", "-y", "--no-install-recommends", "nginx-light"]).is_err() {
        crate::apt_get(&["install", "-y", "--no-install-recommends", "nginx"])?;
    }
    // The package starts the system's nginx on port 80; the tests run their own.
    let _ = Command::new(&binary).args(["-s", "stop"]).status();
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(format!("apt-get installed nginx but there is no {NGINX}"))
    }
}
