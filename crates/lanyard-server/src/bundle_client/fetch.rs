//! One fetch of a foreign trust domain's SPIFFE bundle from its bundle endpoint (SPIFFE
//! Federation §5): `GET` over HTTP/1.1 and TLS 1.2 or 1.3 (rustls, ring), no client
//! certificate (F-9). `https_web` checks the endpoint's certificate and name against Web PKI
//! roots (F-8); `https_spiffe` checks that it presents an X509-SVID for the expected SPIFFE ID
//! that chains to the authorities given (F-12), and never its name. Redirects to another
//! `https` URL are followed, at most [`MAX_REDIRECTS`], each target authenticated the same
//! way (F-11). The whole fetch has a deadline, and the body is read up to
//! [`MAX_BUNDLE_RESPONSE_LEN`]; the bundle is parsed strictly for the relationship's trust
//! domain, and one whose CA certificates name another trust domain is refused.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, CONTENT_LENGTH, HOST, LOCATION};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use lanyard_core::bundle::BundleError;
use lanyard_core::bundle_fetch::{MAX_BUNDLE_RESPONSE_LEN, WrongTrustDomain, check_trust_domain};
use lanyard_core::tls::SpiffeServerVerifier;
use lanyard_core::{BundleEndpointUrl, SpiffeId, TrustBundle, TrustDomain, x509};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;

/// How many redirects one fetch follows.
pub const MAX_REDIRECTS: usize = 5;

/// How the endpoint must authenticate.
#[derive(Clone)]
pub enum EndpointAuth {
    /// `https_web`: a certificate for the URL's host chaining to these roots.
    Web(Arc<rustls::RootCertStore>),
    /// `https_spiffe`: an X509-SVID for `endpoint_spiffe_id` chaining to `authorities` (DER
    /// CA certificates of that ID's trust domain).
    Spiffe {
        /// The SPIFFE ID the endpoint's SVID must carry.
        endpoint_spiffe_id: SpiffeId,
        /// The X.509 authorities of its trust domain, as known here.
        authorities: Vec<Vec<u8>>,
    },
}

impl fmt::Debug for EndpointAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Web(roots) => write!(f, "Web({} roots)", roots.len()),
            Self::Spiffe {
                endpoint_spiffe_id,
                authorities,
            } => write!(
                f,
                "Spiffe({endpoint_spiffe_id}, {} authorities)",
                authorities.len()
            ),
        }
    }
}

/// Why a fetch brought no usable bundle. [`FetchError::kind`] names the reason without its
/// details, for deciding whether it changed since the last failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The endpoint refused the TCP connection.
    #[error("connection refused by {address}")]
    ConnectionRefused {
        /// `host:port`.
        address: String,
    },
    /// The TCP connection failed otherwise (no route, unknown host, reset).
    #[error("connecting to {address}: {reason}")]
    Connect {
        /// `host:port`.
        address: String,
        /// The system's words.
        reason: String,
    },
    /// No complete answer within the deadline.
    #[error("no answer from {url} within {timeout:?}")]
    Timeout {
        /// The URL fetched.
        url: String,
        /// The deadline.
        timeout: Duration,
    },
    /// `https_spiffe`: the endpoint's certificate carries another SPIFFE ID.
    #[error(
        "the endpoint presented a certificate for {presented}, not for the expected {expected}"
    )]
    WrongSpiffeId {
        /// The ID (or what stood in its place) the certificate carries.
        presented: String,
        /// The configured endpoint SPIFFE ID.
        expected: SpiffeId,
    },
    /// The TLS handshake failed: a certificate that does not verify, no common protocol.
    #[error("TLS handshake with {address}: {reason}")]
    Tls {
        /// `host:port`.
        address: String,
        /// rustls's words.
        reason: String,
    },
    /// HTTP failed under the TLS connection.
    #[error("HTTP exchange with {address}: {reason}")]
    Http {
        /// `host:port`.
        address: String,
        /// hyper's words.
        reason: String,
    },
    /// An answer other than 200 or a followed redirect.
    #[error("the endpoint answered HTTP {status}")]
    Status {
        /// The status code.
        status: u16,
    },
    /// A redirect without a usable `https` target, or one too many.
    #[error("redirect refused: {0}")]
    Redirect(String),
    /// The body is longer than [`MAX_BUNDLE_RESPONSE_LEN`].
    #[error("the response is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The body is not a SPIFFE bundle.
    #[error("the response is not a SPIFFE bundle: {0}")]
    Malformed(BundleError),
    /// The bundle's authorities name another trust domain.
    #[error(transparent)]
    WrongTrustDomain(WrongTrustDomain),
}

impl FetchError {
    /// The reason without its details: the same for two failures of the same kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ConnectionRefused { .. } => "connection refused",
            Self::Connect { .. } => "connection failed",
            Self::Timeout { .. } => "timeout",
            Self::WrongSpiffeId { .. } => "wrong endpoint SPIFFE ID",
            Self::Tls { .. } => "TLS handshake",
            Self::Http { .. } => "HTTP",
            Self::Status { .. } => "HTTP status",
            Self::Redirect(_) => "redirect",
            Self::TooLarge { .. } => "oversized response",
            Self::Malformed(_) => "malformed bundle",
            Self::WrongTrustDomain(_) => "wrong trust domain",
        }
    }
}

/// Fetches `trust_domain`'s bundle from `url`, authenticating the endpoint with `auth`, within
/// `timeout` for the whole exchange (redirects included).
pub async fn fetch_bundle(
    trust_domain: &TrustDomain,
    url: &BundleEndpointUrl,
    auth: &EndpointAuth,
    timeout: Duration,
) -> Result<TrustBundle, FetchError> {
    let body = match tokio::time::timeout(timeout, fetch_following_redirects(url, auth)).await {
        Ok(body) => body?,
        Err(_) => {
            return Err(FetchError::Timeout {
                url: url.to_string(),
                timeout,
            });
        }
    };
    let bundle =
        TrustBundle::from_jwks_json(trust_domain.clone(), &body).map_err(FetchError::Malformed)?;
    check_trust_domain(trust_domain, &bundle).map_err(FetchError::WrongTrustDomain)?;
    Ok(bundle)
}

async fn fetch_following_redirects(
    url: &BundleEndpointUrl,
    auth: &EndpointAuth,
) -> Result<Bytes, FetchError> {
    let mut current = url.clone();
    for _ in 0..=MAX_REDIRECTS {
        match get(&current, auth).await? {
            Answer::Body(body) => return Ok(body),
            Answer::Redirect(location) => {
                let target = current
                    .url()
                    .join(&location)
                    .map_err(|e| FetchError::Redirect(format!("{location:?}: {e}")))?;
                current = target
                    .as_str()
                    .parse()
                    .map_err(|e| FetchError::Redirect(format!("{target}: {e}")))?;
            }
        }
    }
    Err(FetchError::Redirect(format!(
        "more than {MAX_REDIRECTS} redirects"
    )))
}

enum Answer {
    Body(Bytes),
    Redirect(String),
}

/// Where to connect and what to call the server in TLS.
struct Target {
    address: String,
    connect: Connect,
    server_name: ServerName<'static>,
    host_header: String,
    path_and_query: String,
}

enum Connect {
    Name(String, u16),
    Address(SocketAddr),
}

fn target(url: &BundleEndpointUrl) -> Result<Target, FetchError> {
    let parsed = url.url();
    let port = parsed.port_or_known_default().unwrap_or(443);
    let (connect, server_name) = match parsed.host() {
        Some(url::Host::Domain(name)) => {
            let server_name =
                ServerName::try_from(name.to_owned()).map_err(|e| FetchError::Connect {
                    address: format!("{name}:{port}"),
                    reason: format!("not a usable host name: {e}"),
                })?;
            (Connect::Name(name.to_owned(), port), server_name)
        }
        Some(url::Host::Ipv4(ip)) => (
            Connect::Address(SocketAddr::from((ip, port))),
            ServerName::IpAddress(std::net::IpAddr::V4(ip).into()),
        ),
        Some(url::Host::Ipv6(ip)) => (
            Connect::Address(SocketAddr::from((ip, port))),
            ServerName::IpAddress(std::net::IpAddr::V6(ip).into()),
        ),
        None => {
            return Err(FetchError::Redirect(format!("{url} names no host")));
        }
    };
    let host = parsed.host_str().unwrap_or_default();
    let host_header = match parsed.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    let mut path_and_query = parsed.path().to_owned();
    if let Some(query) = parsed.query() {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    Ok(Target {
        address: format!("{host}:{port}"),
        connect,
        server_name,
        host_header,
        path_and_query,
    })
}

async fn get(url: &BundleEndpointUrl, auth: &EndpointAuth) -> Result<Answer, FetchError> {
    let target = target(url)?;
    let address = target.address.clone();
    let connected = match &target.connect {
        Connect::Name(name, port) => TcpStream::connect((name.as_str(), *port)).await,
        Connect::Address(socket_address) => TcpStream::connect(socket_address).await,
    };
    let tcp = connected.map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => FetchError::ConnectionRefused {
            address: address.clone(),
        },
        _ => FetchError::Connect {
            address: address.clone(),
            reason: e.to_string(),
        },
    })?;
    let presented = Arc::new(Mutex::new(None));
    let tls_config = client_config(auth, &presented)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config))
        .connect(target.server_name.clone(), tcp)
        .await
        .map_err(|e| {
            let wrong_id = presented.lock().unwrap_or_else(|p| p.into_inner()).take();
            match (wrong_id, auth) {
                (
                    Some(presented),
                    EndpointAuth::Spiffe {
                        endpoint_spiffe_id, ..
                    },
                ) => FetchError::WrongSpiffeId {
                    presented,
                    expected: endpoint_spiffe_id.clone(),
                },
                _ => FetchError::Tls {
                    address: address.clone(),
                    reason: e.to_string(),
                },
            }
        })?;
    let http_error = |e: &dyn fmt::Display| FetchError::Http {
        address: address.clone(),
        reason: e.to_string(),
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| http_error(&e))?;
    // Ends when the sender is dropped or the endpoint closes the connection.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::get(target.path_and_query.as_str())
        .header(HOST, target.host_header.as_str())
        .header(ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| http_error(&e))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| http_error(&e))?;
    let status = response.status();
    if status.is_redirection()
        && matches!(
            status,
            StatusCode::MOVED_PERMANENTLY
                | StatusCode::FOUND
                | StatusCode::SEE_OTHER
                | StatusCode::TEMPORARY_REDIRECT
                | StatusCode::PERMANENT_REDIRECT
        )
    {
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| FetchError::Redirect(format!("HTTP {status} without a Location")))?;
        return Ok(Answer::Redirect(location.to_owned()));
    }
    if status != StatusCode::OK {
        return Err(FetchError::Status {
            status: status.as_u16(),
        });
    }
    let declared = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BUNDLE_RESPONSE_LEN as u64) {
        return Err(FetchError::TooLarge {
            limit: MAX_BUNDLE_RESPONSE_LEN,
        });
    }
    let body = Limited::new(response.into_body(), MAX_BUNDLE_RESPONSE_LEN)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                FetchError::TooLarge {
                    limit: MAX_BUNDLE_RESPONSE_LEN,
                }
            } else {
                http_error(&e)
            }
        })?
        .to_bytes();
    Ok(Answer::Body(body))
}

fn client_config(
    auth: &EndpointAuth,
    presented: &Arc<Mutex<Option<String>>>,
) -> Result<rustls::ClientConfig, FetchError> {
    let tls_error = |e: rustls::Error| FetchError::Tls {
        address: String::new(),
        reason: e.to_string(),
    };
    let builder = rustls::ClientConfig::builder_with_provider(lanyard_core::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?;
    let mut config = match auth {
        EndpointAuth::Web(roots) => builder
            .with_root_certificates(Arc::clone(roots))
            .with_no_client_auth(),
        EndpointAuth::Spiffe {
            endpoint_spiffe_id,
            authorities,
        } => {
            let authorities = authorities.clone();
            let inner = SpiffeServerVerifier::new(
                endpoint_spiffe_id.clone(),
                Arc::new(move || authorities.clone()),
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EndpointSvidVerifier {
                    inner,
                    expected: endpoint_spiffe_id.clone(),
                    presented: Arc::clone(presented),
                }))
                .with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// [`SpiffeServerVerifier`], which first notes a certificate that carries another SPIFFE ID
/// than the expected one, so that the failure says so rather than only "bad certificate".
#[derive(Debug)]
struct EndpointSvidVerifier {
    inner: SpiffeServerVerifier,
    expected: SpiffeId,
    presented: Arc<Mutex<Option<String>>>,
}

impl ServerCertVerifier for EndpointSvidVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = match x509::spiffe_id_of(end_entity) {
            Ok(id) if id == self.expected => None,
            Ok(id) => Some(id.to_string()),
            Err(error) => Some(format!("no SPIFFE ID ({error})")),
        };
        if let Some(presented) = presented {
            let refusal = format!("presented {presented}, expected {}", self.expected);
            *self.presented.lock().unwrap_or_else(|p| p.into_inner()) = Some(presented);
            return Err(rustls::Error::General(refusal));
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
