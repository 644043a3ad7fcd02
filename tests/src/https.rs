//! Test PKI and an HTTPS client for the server's public endpoints (the bundle endpoint, OIDC
//! discovery): a certificate authority generated at run time with rcgen that issues server
//! certificates for `localhost` and 127.0.0.1, key pairs written as a server reads them, and
//! one `GET` over TLS that returns what the server answered and the chain it presented.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::{TIMEOUT, block_on};

/// A test certificate authority.
#[derive(Debug)]
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl TestCa {
    /// A self-signed CA named `name`.
    pub fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().expect("generating the test CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let cert = params.self_signed(&key).expect("self-signing the test CA");
        Self {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server certificate for `localhost` and 127.0.0.1 with common name `name`, and its
    /// key: (certificate PEM, key PEM).
    pub fn issue(&self, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("generating a server key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("signing a server certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// A client configuration that trusts this CA only and offers `http/1.1`.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.pem.as_bytes()) {
            roots
                .add(cert.expect("the CA's own PEM"))
                .expect("a usable root");
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// Writes `cert` to `<dir>/<stem>.crt` and `key` to `<dir>/<stem>.key` (mode 0600), each
/// under a temporary name renamed into place, as a certificate renewal tool would; returns
/// the two paths.
pub fn write_key_pair(dir: &Path, stem: &str, cert: &str, key: &str) -> (PathBuf, PathBuf) {
    let cert_path = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    replace_file(&cert_path, cert.as_bytes(), 0o644);
    replace_file(&key_path, key.as_bytes(), 0o600);
    (cert_path, key_path)
}

/// Replaces `path` with `contents` (mode `mode`) by renaming a temporary file over it.
pub fn replace_file(path: &Path, contents: &[u8], mode: u32) {
    let temporary = path.with_extension("tmp");
    fs::write(&temporary, contents)
        .unwrap_or_else(|e| panic!("writing {}: {e}", temporary.display()));
    fs::set_permissions(&temporary, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", temporary.display()));
    fs::rename(&temporary, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}

/// The DER of the first certificate in a PEM text.
pub fn first_der(pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("well-formed PEM")
        .to_vec()
}

/// What an HTTPS `GET` got.
#[derive(Debug, Clone)]
pub struct HttpsAnswer {
    /// The status code.
    pub status: u16,
    /// The `Content-Type` header, empty if none.
    pub content_type: String,
    /// The body.
    pub body: Vec<u8>,
    /// The certificate chain the server presented, DER, leaf first.
    pub chain: Vec<Vec<u8>>,
}

/// `GET path` from `addr` over TLS with `config`, naming the server `server_name`; every step
/// bounded by [`TIMEOUT`].
pub fn https_get(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
    path: &str,
) -> Result<HttpsAnswer, String> {
    let server_name = ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
    let path = path.to_owned();
    block_on(async move {
        tokio::time::timeout(TIMEOUT, async move {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connecting to {addr}: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
            let chain = tls
                .get_ref()
                .1
                .peer_certificates()
                .unwrap_or_default()
                .iter()
                .map(|c| c.to_vec())
                .collect();
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            let request = hyper::Request::get(path)
                .header(hyper::header::HOST, "localhost")
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("GET: {e}"))?;
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading the body: {e}"))?
                .to_bytes()
                .to_vec();
            Ok(HttpsAnswer {
                status,
                content_type,
                body,
                chain,
            })
        })
        .await
        .map_err(|_| format!("no answer from {addr} within {TIMEOUT:?}"))?
    })
}
