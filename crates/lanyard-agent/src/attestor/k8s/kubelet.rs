//! Asking the kubelet for its pods (`GET /pods`), and sharing the answers among callers.
//!
//! The secure port is HTTPS (rustls with ring), HTTP/1.1, with `Authorization: Bearer
//! <token>`; the kubelet checks the token with a TokenReview and authorizes `get` on
//! `nodes/proxy` (or `nodes/pods` where it has fine-grained authorization). The read-only
//! port is plain HTTP without credentials. The token and the CA file are read anew for each
//! request, since projected tokens rotate. Each request has 10 s, as in SPIRE, and its
//! answer is bounded.
//!
//! [`PodListFetcher`] lets any number of waiting callers share one request: a request
//! starts at least `poll_retry_interval` after the one before, its answer is reused by
//! callers that have not seen it until `poll_retry_interval` after the request started, and
//! a caller that looked at an answer and did not find its container waits for the next one.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::pods::PodIndex;
use crate::config::{KubeletEndpoint, KubeletVerification};

/// The longest a request to the kubelet may take (connection, handshake, answer).
pub const KUBELET_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest pod list read: a node's pods with their managed fields run to a few
/// megabytes at the usual limit of 110 pods.
pub const MAX_POD_LIST_LEN: usize = 32 * 1024 * 1024;

/// How much of an error answer goes into the error message.
const MAX_ERROR_BODY_LEN: usize = 512;

/// Where pod lists come from: the kubelet, or a test.
#[tonic::async_trait]
pub(crate) trait PodSource: Send + Sync + 'static {
    /// The pods on the node now.
    async fn pods(&self) -> Result<PodIndex, String>;
}

/// A client for one kubelet.
pub(crate) struct KubeletClient {
    endpoint: KubeletEndpoint,
    ca_path: PathBuf,
    token_path: PathBuf,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for KubeletClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletClient")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl KubeletClient {
    /// A client for `endpoint`, with the CA and token read from these files at each request.
    pub(crate) fn new(endpoint: KubeletEndpoint, ca_path: PathBuf, token_path: PathBuf) -> Self {
        Self {
            endpoint,
            ca_path,
            token_path,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    /// Reads the files a request needs and builds its TLS configuration, so that a
    /// configuration that cannot work fails when the agent starts.
    pub(crate) fn check(&self) -> Result<(), String> {
        if let KubeletEndpoint::Secure { host, .. } = &self.endpoint {
            self.tls_config()?;
            self.token()?;
            ServerName::try_from(host.clone())
                .map_err(|_| format!("the kubelet host {host:?} is not a DNS name or an IP"))?;
        }
        Ok(())
    }

    /// `host:port`, with brackets around an IPv6 address.
    fn authority(&self) -> String {
        let (host, port) = match &self.endpoint {
            KubeletEndpoint::Secure { host, port, .. } => (host.as_str(), *port),
            KubeletEndpoint::ReadOnly { port } => ("127.0.0.1", *port),
        };
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }

    fn token(&self) -> Result<String, String> {
        let token = std::fs::read_to_string(&self.token_path).map_err(|e| {
            format!(
                "reading the kubelet token (token_path {}): {e}",
                self.token_path.display()
            )
        })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(format!(
                "the kubelet token (token_path {}) is empty",
                self.token_path.display()
            ));
        }
        Ok(token.to_owned())
    }

    fn tls_config(&self) -> Result<rustls::ClientConfig, String> {
        let KubeletEndpoint::Secure { verification, .. } = &self.endpoint else {
            return Err("the read-only port has no TLS".into());
        };
        let check = match verification {
            KubeletVerification::Skip => Check::Nothing,
            KubeletVerification::ChainOnly | KubeletVerification::ChainAndName(_) => {
                let roots = self.roots()?;
                let name = match verification {
                    KubeletVerification::ChainAndName(name) => {
                        Some(ServerName::try_from(name.clone()).map_err(|_| {
                            format!("the kubelet name {name:?} is not a DNS name or an IP")
                        })?)
                    }
                    _ => None,
                };
                Check::Chain {
                    roots: Arc::new(roots),
                    name,
                }
            }
        };
        let verifier = KubeletVerifier {
            check,
            provider: Arc::clone(&self.provider),
        };
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    fn roots(&self) -> Result<RootCertStore, String> {
        let pem = std::fs::read(&self.ca_path).map_err(|e| {
            format!(
                "reading the kubelet CA (kubelet_ca_path {}): {e}",
                self.ca_path.display()
            )
        })?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| {
                format!(
                    "the kubelet CA (kubelet_ca_path {}) is not PEM: {e}",
                    self.ca_path.display()
                )
            })?;
            roots.add(cert).map_err(|e| {
                format!(
                    "the kubelet CA (kubelet_ca_path {}) is unusable: {e}",
                    self.ca_path.display()
                )
            })?;
        }
        if roots.is_empty() {
            return Err(format!(
                "the kubelet CA (kubelet_ca_path {}) holds no certificate",
                self.ca_path.display()
            ));
        }
        Ok(roots)
    }

    async fn get_pods(&self) -> Result<Bytes, String> {
        let authority = self.authority();
        let tcp = match &self.endpoint {
            KubeletEndpoint::Secure { host, port, .. } => {
                TcpStream::connect((host.as_str(), *port)).await
            }
            KubeletEndpoint::ReadOnly { port } => TcpStream::connect(("127.0.0.1", *port)).await,
        }
        .map_err(|e| format!("connecting to the kubelet at {authority}: {e}"))?;
        match &self.endpoint {
            KubeletEndpoint::Secure { host, .. } => {
                let token = self.token()?;
                let config = self.tls_config()?;
                let server_name = ServerName::try_from(host.clone())
                    .map_err(|_| format!("the kubelet host {host:?} is not a DNS name or an IP"))?;
                let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect(server_name, tcp)
                    .await
                    .map_err(|e| {
                        let trust = if matches!(
                            self.endpoint,
                            KubeletEndpoint::Secure {
                                verification: KubeletVerification::Skip,
                                ..
                            }
                        ) {
                            String::new()
                        } else {
                            format!(" (kubelet_ca_path {})", self.ca_path.display())
                        };
                        format!("TLS handshake with the kubelet at {authority}{trust}: {e}")
                    })?;
                get(tls, &authority, Some(&token)).await
            }
            KubeletEndpoint::ReadOnly { .. } => get(tcp, &authority, None).await,
        }
    }
}

#[tonic::async_trait]
impl PodSource for KubeletClient {
    async fn pods(&self) -> Result<PodIndex, String> {
        let body = match tokio::time::timeout(KUBELET_REQUEST_TIMEOUT, self.get_pods()).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(format!(
                    "the kubelet at {} did not answer within {KUBELET_REQUEST_TIMEOUT:?}",
                    self.authority()
                ));
            }
        };
        PodIndex::parse(&body)
    }
}

/// `GET /pods` on an open connection; the body of a 200 answer.
async fn get<S>(stream: S, authority: &str, token: Option<&str>) -> Result<Bytes, String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP with the kubelet at {authority}: {e}"))?;
    // Ends when the sender is dropped or the kubelet closes the connection.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = Request::get("/pods")
        .header(HOST, authority)
        .header(ACCEPT, "application/json");
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("building the request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET /pods from the kubelet at {authority}: {e}"))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_POD_LIST_LEN)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                format!(
                    "the kubelet at {authority} answered with more than {} MiB",
                    MAX_POD_LIST_LEN / (1024 * 1024)
                )
            } else {
                format!("reading the kubelet's pod list from {authority}: {e}")
            }
        })?
        .to_bytes();
    if status != StatusCode::OK {
        let shown = body.get(..MAX_ERROR_BODY_LEN).unwrap_or(&body);
        let text: String = String::from_utf8_lossy(shown)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        return Err(format!(
            "the kubelet at {authority} answered GET /pods with {status}: {}",
            text.trim()
        ));
    }
    Ok(body)
}

/// What is checked of the kubelet's certificate.
#[derive(Debug)]
enum Check {
    Nothing,
    Chain {
        roots: Arc<RootCertStore>,
        /// The name it must be valid for; none on SPIRE's 127.0.0.1 fallback.
        name: Option<ServerName<'static>>,
    },
}

/// rustls's WebPKI checks, with the name check optional (SPIRE verifies only the chain when
/// it reaches the kubelet on 127.0.0.1) and everything optional with
/// `skip_kubelet_verification`. The handshake signature is always verified.
#[derive(Debug)]
struct KubeletVerifier {
    check: Check,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for KubeletVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Check::Chain { roots, name } = &self.check {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
            if let Some(name) = name {
                rustls::client::verify_server_name(&cert, name)?;
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// One answer of the kubelet (or its failure), numbered in the order requests started.
#[derive(Debug)]
pub(crate) struct Fetched {
    /// 1 for the first request, then one more for each.
    pub(crate) version: u64,
    started: Instant,
    /// The pods, or why there are none.
    pub(crate) pods: Result<Arc<PodIndex>, String>,
}

/// Shares pod lists among callers and spaces requests to the kubelet.
pub(crate) struct PodListFetcher {
    source: Box<dyn PodSource>,
    interval: Duration,
    latest: Mutex<Option<Arc<Fetched>>>,
    /// Held while a request is under way; holds when the last request started.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for PodListFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodListFetcher")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl PodListFetcher {
    /// Requests from `source` at most once every `interval`.
    pub(crate) fn new(source: Box<dyn PodSource>, interval: Duration) -> Self {
        Self {
            source,
            interval,
            latest: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(None),
        }
    }

    fn latest(&self) -> Option<Arc<Fetched>> {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The latest answer if it is newer than `seen` and still fresh.
    fn fresh_newer_than(&self, seen: u64) -> Option<Arc<Fetched>> {
        self.latest()
            .filter(|f| f.version > seen && Instant::now() < f.started + self.interval)
    }

    /// An answer the caller has not seen (`seen` is the version of the last one it looked
    /// at, 0 for none): the latest if it is fresh, the one under way if any, or a new one,
    /// started no sooner than `interval` after the last.
    pub(crate) async fn newer_than(&self, seen: u64) -> Arc<Fetched> {
        if let Some(fetched) = self.fresh_newer_than(seen) {
            return fetched;
        }
        let known_on_arrival = self.latest().map_or(0, |f| f.version);
        let mut last_start = self.fetching.lock().await;
        // A request that was under way while this caller waited answers it, fresh or not.
        if let Some(fetched) = self
            .latest()
            .filter(|f| f.version > seen.max(known_on_arrival))
        {
            return fetched;
        }
        if let Some(fetched) = self.fresh_newer_than(seen) {
            return fetched;
        }
        if let Some(last) = *last_start {
            tokio::time::sleep_until(last + self.interval).await;
        }
        let started = Instant::now();
        *last_start = Some(started);
        let pods = self.source.pods().await.map(Arc::new);
        let version = self.latest().map_or(0, |f| f.version) + 1;
        let fetched = Arc::new(Fetched {
            version,
            started,
            pods,
        });
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&fetched));
        fetched
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Counting {
        calls: Arc<AtomicUsize>,
        takes: Duration,
    }

    #[tonic::async_trait]
    impl PodSource for Counting {
        async fn pods(&self) -> Result<PodIndex, String> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.takes).await;
            if n % 2 == 1 {
                return Err(format!("failure {n}"));
            }
            Ok(PodIndex::default())
        }
    }

    fn fetcher(takes: Duration) -> (Arc<PodListFetcher>, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let source = Counting {
            calls: Arc::clone(&calls),
            takes,
        };
        let fetcher = PodListFetcher::new(Box::new(source), Duration::from_millis(500));
        (Arc::new(fetcher), calls)
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_callers_makes_one_request_per_interval() {
        let (fetcher, calls) = fetcher(Duration::from_millis(30));
        let start = Instant::now();
        // 200 callers that never find their container and poll 5 times each.
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let fetcher = Arc::clone(&fetcher);
            tasks.push(tokio::spawn(async move {
                let mut seen = 0;
                let mut versions = Vec::new();
                for _ in 0..5 {
                    let fetched = fetcher.newer_than(seen).await;
                    assert!(fetched.version > seen, "an answer the caller had seen");
                    seen = fetched.version;
                    versions.push(seen);
                }
                versions
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), [1, 2, 3, 4, 5]);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 5, "requests for 1,000 polls");
        // Requests started 500 ms apart: the last at 2 s, answering at 2.03 s.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(2030) && elapsed < Duration::from_millis(2100),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_answer_is_reused_and_a_stale_one_is_not() {
        let (fetcher, calls) = fetcher(Duration::ZERO);
        let first = fetcher.newer_than(0).await;
        assert_eq!(first.version, 1);
        assert!(first.pods.is_ok());
        // A new caller within the interval gets the same answer without a request.
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(fetcher.newer_than(0).await.version, 1);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Past the interval, a new request; failures are shared like answers.
        tokio::time::advance(Duration::from_millis(200)).await;
        let second = fetcher.newer_than(0).await;
        assert_eq!(second.version, 2);
        assert_eq!(
            second.pods.as_ref().err().map(String::as_str),
            Some("failure 1")
        );
        assert_eq!(fetcher.newer_than(1).await.version, 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // A caller that has seen the latest waits out the interval for the next.
        let before = Instant::now();
        assert_eq!(fetcher.newer_than(2).await.version, 3);
        assert_eq!(before.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_serves_everyone_who_waited_for_it() {
        // The request outlasts the interval: its answer is not fresh by the time it comes,
        // yet every caller that waited for it takes it instead of asking again.
        let (fetcher, calls) = fetcher(Duration::from_secs(2));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let fetcher = Arc::clone(&fetcher);
            tasks.push(tokio::spawn(
                async move { fetcher.newer_than(0).await.version },
            ));
            tokio::task::yield_now().await;
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), 1);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
