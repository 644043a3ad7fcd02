//! A small HTTPS client for the three Kubernetes API calls `k8s_psat` makes (create a
//! TokenReview, get a pod, get a node): HTTP/1.1 over rustls (ring), the API server verified
//! against the configured CA, one connection per call, a deadline on every call and a bound
//! on every response body. Bearer tokens (the server's own and the agent's) are never logged.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use super::kubeconfig::{ApiServerAccess, Credentials};

/// The longest a whole call (connect, handshake, request, response) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest response body read (a pod with many containers and managed fields is tens of
/// kilobytes).
const MAX_RESPONSE_LEN: usize = 4 * 1024 * 1024;

/// Why a call produced no answer from the API server.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The API server could not be reached or did not answer in time; worth retrying.
    #[error("{0}")]
    Unreachable(String),
    /// Something on this side is wrong (credentials unreadable, a response too large).
    #[error("{0}")]
    Local(String),
}

/// A client for one API server.
#[derive(Clone)]
pub struct KubeClient {
    access: ApiServerAccess,
    tls: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    timeout: Duration,
}

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeClient")
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

impl KubeClient {
    /// A client for `access`; fails if its CA or client certificate cannot be used.
    pub fn new(access: ApiServerAccess) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        let mut n_roots = 0;
        for cert in CertificateDer::pem_slice_iter(&access.ca_pem) {
            let cert = cert.map_err(|e| format!("the API server CA is not PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("the API server CA is unusable: {e}"))?;
            n_roots += 1;
        }
        if n_roots == 0 {
            return Err("the API server CA holds no certificate".into());
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
        let mut tls = match &access.credentials {
            Credentials::ClientCertificate { cert_pem, key_pem } => {
                let chain = CertificateDer::pem_slice_iter(cert_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("the client certificate is not PEM: {e}"))?;
                // The error names the problem, never the key.
                let key = PrivateKeyDer::from_pem_slice(key_pem)
                    .map_err(|e| format!("the client key is not PEM: {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("the client certificate is unusable: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = ServerName::try_from(access.host.clone())
            .map_err(|e| format!("the API server host {:?} is invalid: {e}", access.host))?;
        Ok(Self {
            access,
            tls: Arc::new(tls),
            server_name,
            timeout: CALL_TIMEOUT,
        })
    }

    /// Sets the deadline of each call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// `host:port` of the API server.
    pub fn authority(&self) -> String {
        self.access.authority()
    }

    /// One call: `method path` with an optional JSON body; the status and body of the answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), CallError> {
        let authority = self.authority();
        match tokio::time::timeout(self.timeout, self.call_inner(method, path, body)).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Unreachable(format!(
                "the API server {authority} did not answer within {:?}",
                self.timeout
            ))),
        }
    }

    async fn call_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), CallError> {
        let authority = self.authority();
        let unreachable = |what: &str, e: &dyn std::fmt::Display| {
            CallError::Unreachable(format!("{what} {authority}: {e}"))
        };
        let tcp = TcpStream::connect((self.access.host.as_str(), self.access.port))
            .await
            .map_err(|e| unreachable("connecting to the API server", &e))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| unreachable("TLS handshake with the API server", &e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unreachable("HTTP with the API server", &e))?;
        // Ends when the sender is dropped or the server closes the connection.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.access.path_prefix))
            .header(HOST, &authority)
            .header(ACCEPT, "application/json");
        if let Some(token) = self.bearer_token().await? {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| CallError::Local(format!("building the request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable("request to the API server", &e))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_LEN)
            .collect()
            .await
            .map_err(|e| unreachable("reading the answer of the API server", &e))?
            .to_bytes();
        Ok((status, body))
    }

    async fn bearer_token(&self) -> Result<Option<String>, CallError> {
        match &self.access.credentials {
            Credentials::Token(token) => Ok(Some(token.clone())),
            Credentials::TokenFile(path) => {
                let token = tokio::fs::read_to_string(path).await.map_err(|e| {
                    CallError::Local(format!(
                        "reading the server's API server token {}: {e}",
                        path.display()
                    ))
                })?;
                let token = token.trim();
                if token.is_empty() {
                    return Err(CallError::Local(format!(
                        "the server's API server token {} is empty",
                        path.display()
                    )));
                }
                Ok(Some(token.to_owned()))
            }
            Credentials::Anonymous | Credentials::ClientCertificate { .. } => Ok(None),
        }
    }
}
