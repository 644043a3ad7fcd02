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

/// An nginx configuration that serves HTTPS (TLS 1.3) on `127.0.0.1:port` with the files
/// `lanyard helper` writes into `certs` (`svid.pem`, `svid_key.pem`, `svid_bundle.pem`, and
/// with `check_crl` the CRLs in `crl.pem`), requires a client certificate from the bundle and
/// answers `client verified: …`; its pid file, logs and temporary files go under `dir`
/// (the pid file is `dir/nginx.pid`).
pub fn mtls_config(dir: &Path, certs: &Path, port: u16, check_crl: bool) -> String {
    let crl = if check_crl {
        format!("     ssl_crl {}/crl.pem;\n", certs.display())
    } else {
        String::new()
    };
    format!(
        "daemon off;\nuser root;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
         error_log {dir}/error.log info;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n\
           access_log {dir}/access.log;\n\
           client_body_temp_path {dir}/body;\n\
           proxy_temp_path {dir}/proxy;\n\
           fastcgi_temp_path {dir}/fastcgi;\n\
           uwsgi_temp_path {dir}/uwsgi;\n\
           scgi_temp_path {dir}/scgi;\n\
           server {{\n\
             listen 127.0.0.1:{port} ssl;\n\
             ssl_protocols TLSv1.3;\n\
             ssl_certificate {certs}/svid.pem;\n\
             ssl_certificate_key {certs}/svid_key.pem;\n\
             ssl_client_certificate {certs}/svid_bundle.pem;\n\
        {crl}\
             ssl_verify_client on;\n\
             ssl_verify_depth 3;\n\
             location / {{ return 200 \"client verified: $ssl_client_verify\\n\"; }}\n\
           }}\n\
         }}\n",
        dir = dir.display(),
        certs = certs.display(),
    )
}
