//! The agent's end of the server connection: TLS dialled the way SPIRE's agent dials it, and
//! one function per RPC that checks the response as SPIRE's agent relies on it.
//!
//! Attestation and the `GetBundle` that follows it use a connection without a client
//! certificate; every other call uses mTLS with the agent SVID. The mTLS channel is cached
//! and dropped after any RPC error and whenever the agent SVID changes, as SPIRE does.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use lanyard_core::keys::KeyPair;
use lanyard_core::tls::{InsecureBootstrapVerifier, SpiffeServerVerifier, client_config};
use lanyard_core::x509::{self, X509Svid};
use lanyard_core::{SpiffeId, TrustBundle, TrustDomain, k8s_psat, x509pop};
use lanyard_proto::convert::bundle_from_proto;
use lanyard_proto::lanyard::api::v1 as lanyard_pb;
use lanyard_proto::lanyard::api::v1::agent_revocation_service_client::AgentRevocationServiceClient;
use lanyard_proto::lanyard::api::v1::usage_service_client::UsageServiceClient;
use lanyard_proto::spire::api::server::agent::v1 as agent_pb;
use lanyard_proto::spire::api::server::agent::v1::agent_client::AgentClient;
use lanyard_proto::spire::api::server::bundle::v1 as bundle_pb;
use lanyard_proto::spire::api::server::bundle::v1::bundle_client::BundleClient;
use lanyard_proto::spire::api::server::svid::v1 as svid_pb;
use lanyard_proto::spire::api::server::svid::v1::svid_client::SvidClient;
use lanyard_proto::spire::api::types;
use lanyard_proto::spire::api::types::PermissionDeniedDetails;
use lanyard_proto::spire::api::types::permission_denied_details::Reason;
use prost::Message as _;
use rustls::pki_types::ServerName;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::machine::dial_order;

/// The deadline of one RPC, streams included (SPIRE's agent uses 30 s).
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// How long establishing a TCP and TLS connection may take, all addresses tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one address may take to accept TCP and finish the TLS handshake before the next
/// is tried; also how long resolving one host name may take.
const ADDRESS_TIMEOUT: Duration = Duration::from_secs(3);

/// Why talking to the server failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// The RPC failed (including connection failures, which tonic reports as statuses).
    #[error("{rpc}: {}", describe(.status))]
    Rpc { rpc: &'static str, status: Status },
    /// The server answered something the agent cannot use.
    #[error("{rpc}: {reason}")]
    InvalidResponse { rpc: &'static str, reason: String },
    /// A TLS configuration could not be built from the agent's credentials.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The configured server address is not usable.
    #[error("server_address {address:?}: {reason}")]
    Address { address: String, reason: String },
    /// Building a key, CSR or attestation message failed locally.
    #[error("{0}")]
    Local(String),
}

impl ClientError {
    /// The `PermissionDeniedDetails` reason of a refused RPC, if it carries one.
    pub(crate) fn denial_reason(&self) -> Option<Reason> {
        match self {
            Self::Rpc { status, .. } => denial_reason(status),
            _ => None,
        }
    }

    /// The gRPC code of a failed RPC.
    pub(crate) fn code(&self) -> Option<Code> {
        match self {
            Self::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    fn invalid(rpc: &'static str, reason: impl fmt::Display) -> Self {
        Self::InvalidResponse {
            rpc,
            reason: reason.to_string(),
        }
    }
}

fn describe(status: &Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    // Connection failures carry their cause (refused, TLS) in the source chain.
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn rpc_error(rpc: &'static str) -> impl Fn(Status) -> ClientError {
    move |status| ClientError::Rpc { rpc, status }
}

/// Runs `future` with the RPC deadline.
pub(crate) async fn with_deadline<T>(
    rpc: &'static str,
    future: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(RPC_TIMEOUT, future).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Rpc {
            rpc,
            status: Status::deadline_exceeded("the server did not answer in time"),
        }),
    }
}

/// `google.rpc.Status`, the payload of the `grpc-status-details-bin` trailer.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// The reason SPIRE's server attaches to an authorization failure: a
/// `spire.api.types.PermissionDeniedDetails` in the `google.rpc.Status` details of a
/// `PermissionDenied` status. Like SPIRE's agent, only that code and detail type count.
pub(crate) fn denial_reason(status: &Status) -> Option<Reason> {
    if status.code() != Code::PermissionDenied {
        return None;
    }
    let rpc_status = RpcStatus::decode(status.details()).ok()?;
    rpc_status.details.iter().find_map(|any| {
        let details = any.to_msg::<PermissionDeniedDetails>().ok()?;
        Reason::try_from(details.reason).ok()
    })
}

/// The agent's own SVID and key, presented on mTLS connections.
pub(crate) struct AgentCredentials {
    pub(crate) svid: X509Svid,
    pub(crate) not_before: SystemTime,
    pub(crate) key: Arc<KeyPair>,
}

impl fmt::Debug for AgentCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentCredentials")
            .field("svid", &self.svid)
            .finish_non_exhaustive()
    }
}

/// How to authenticate the server on a connection without a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServerTrust {
    /// Verify its SVID against the current bundle.
    Bundle,
    /// Check only its SPIFFE ID (`insecure_bootstrap`, before any bundle is known).
    InsecureBootstrap,
}

/// One configured server address and the name sent as SNI to it.
#[derive(Debug, Clone)]
struct Target {
    address: String,
    server_name: ServerName<'static>,
}

/// The server that answered last: which configured target, and which of the addresses its
/// name resolved to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct LastAnswered {
    target: usize,
    address: Option<SocketAddr>,
}

/// Connections to the server, shared by the manager and the JWT minter. With several server
/// addresses, or a host name that resolves to several, a connection is made to the one that
/// answered last, or else to the next that answers, in the configured (then resolved) order:
/// a server that dies costs one failed call, after which the cached channel is dropped and the
/// next dial moves on.
pub(crate) struct ServerClient {
    targets: Arc<Vec<Target>>,
    preferred: Arc<Mutex<LastAnswered>>,
    endpoint: Endpoint,
    server_id: SpiffeId,
    /// The trust domain's X.509 authorities, read on every handshake.
    authorities: Arc<RwLock<Vec<Vec<u8>>>>,
    credentials: RwLock<Option<Arc<AgentCredentials>>>,
    channel: Mutex<Option<Channel>>,
}

impl fmt::Debug for ServerClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerClient")
            .field("targets", &self.targets)
            .field("server_id", &self.server_id)
            .finish_non_exhaustive()
    }
}

impl ServerClient {
    /// A client for the servers at `addresses` (`host:port` each) of `trust_domain`.
    pub(crate) fn new(
        addresses: &[String],
        trust_domain: &TrustDomain,
    ) -> Result<Self, ClientError> {
        let mut targets = Vec::with_capacity(addresses.len());
        for address in addresses {
            let address_error = |reason: String| ClientError::Address {
                address: address.to_owned(),
                reason,
            };
            let host =
                host_of(address).ok_or_else(|| address_error("expected host:port".into()))?;
            // Like grpc-go, send the host as SNI (rustls sends none for IP addresses). The
            // server ignores it, so a host that is not a valid DNS name falls back to a fixed
            // name.
            let server_name = ServerName::try_from(host.to_owned())
                .or_else(|_| ServerName::try_from("lanyard-server"))
                .map_err(|e| address_error(e.to_string()))?;
            targets.push(Target {
                address: address.to_owned(),
                server_name,
            });
        }
        let first = targets.first().ok_or_else(|| ClientError::Address {
            address: String::new(),
            reason: "no server address".into(),
        })?;
        // The endpoint's URI is only a label: the connector below picks the address.
        let endpoint = Endpoint::from_shared(format!("http://{}", first.address))
            .map_err(|e| ClientError::Address {
                address: first.address.clone(),
                reason: e.to_string(),
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(RPC_TIMEOUT);
        Ok(Self {
            targets: Arc::new(targets),
            preferred: Arc::default(),
            endpoint,
            server_id: trust_domain.server_id(),
            authorities: Arc::new(RwLock::new(Vec::new())),
            credentials: RwLock::new(None),
            channel: Mutex::new(None),
        })
    }

    /// Trusts `bundle`'s X.509 authorities for the server from the next handshake on.
    pub(crate) fn set_bundle(&self, bundle: &TrustBundle) {
        let authorities = bundle
            .x509_authorities()
            .iter()
            .map(|a| a.der().to_vec())
            .collect();
        *self.authorities.write().unwrap_or_else(|e| e.into_inner()) = authorities;
    }

    /// Presents `credentials` from now on, dropping the connection made with the old ones.
    pub(crate) fn set_credentials(&self, credentials: Arc<AgentCredentials>) {
        *self.credentials.write().unwrap_or_else(|e| e.into_inner()) = Some(credentials);
        self.reset();
    }

    /// The credentials presented on mTLS connections.
    pub(crate) fn credentials(&self) -> Option<Arc<AgentCredentials>> {
        self.credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Drops the cached mTLS connection; the next call dials again.
    pub(crate) fn reset(&self) {
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The mTLS channel, dialled lazily on first use.
    pub(crate) fn channel(&self) -> Result<Channel, ClientError> {
        let mut cached = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = cached.as_ref() {
            return Ok(channel.clone());
        }
        let credentials = self
            .credentials()
            .ok_or_else(|| ClientError::Local("the agent has no SVID yet".into()))?;
        let config = client_config(
            Arc::new(self.verifier()),
            Some((credentials.svid.cert_chain(), &credentials.key)),
        )?;
        let channel = self.dial(config);
        *cached = Some(channel.clone());
        Ok(channel)
    }

    /// A new channel without a client certificate, for attestation and the bundle fetch
    /// that follows it.
    pub(crate) fn bootstrap_channel(&self, trust: ServerTrust) -> Result<Channel, ClientError> {
        let config = match trust {
            ServerTrust::Bundle => client_config(Arc::new(self.verifier()), None)?,
            ServerTrust::InsecureBootstrap => client_config(
                Arc::new(InsecureBootstrapVerifier::new(self.server_id.clone())),
                None,
            )?,
        };
        Ok(self.dial(config))
    }

    fn verifier(&self) -> SpiffeServerVerifier {
        let authorities = Arc::clone(&self.authorities);
        SpiffeServerVerifier::new(
            self.server_id.clone(),
            Arc::new(move || {
                authorities
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            }),
        )
    }

    fn dial(&self, config: rustls::ClientConfig) -> Channel {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let targets = Arc::clone(&self.targets);
        let preferred = Arc::clone(&self.preferred);
        self.endpoint
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let connector = connector.clone();
                let targets = Arc::clone(&targets);
                let preferred = Arc::clone(&preferred);
                async move { connect_any(&connector, &targets, &preferred).await }
            }))
    }
}

/// Connects to the server that answered last, or else to each next address in turn, and
/// makes the one that answered the preferred one. Every target's host name is resolved at each
/// dial, and each address it resolves to is tried with its own [`ADDRESS_TIMEOUT`], so that a
/// name for several servers reaches a live one past a dead one, even one that accepts TCP and
/// then never answers. The error is the last address's.
async fn connect_any(
    connector: &tokio_rustls::TlsConnector,
    targets: &[Target],
    preferred: &Mutex<LastAnswered>,
) -> Result<TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>, io::Error> {
    let last = *preferred.lock().unwrap_or_else(|e| e.into_inner());
    let mut last_error = io::Error::other("no server address");
    for index in dial_order(last.target, targets.len()) {
        let target = &targets[index];
        let resolved =
            tokio::time::timeout(ADDRESS_TIMEOUT, tokio::net::lookup_host(&target.address)).await;
        let addresses = match resolved {
            Ok(Ok(addresses)) => answered_first(addresses.collect(), last.address),
            Ok(Err(error)) => {
                tracing::debug!(server = %target.address, %error, "cannot resolve");
                last_error = io::Error::new(error.kind(), format!("{}: {error}", target.address));
                continue;
            }
            Err(_) => {
                tracing::debug!(server = %target.address, "resolving timed out");
                last_error = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{}: resolving timed out", target.address),
                );
                continue;
            }
        };
        let attempt = |address: SocketAddr| async move {
            let tcp = tokio::net::TcpStream::connect(address).await?;
            tcp.set_nodelay(true)?;
            connector.connect(target.server_name.clone(), tcp).await
        };
        match first_answering(&addresses, ADDRESS_TIMEOUT, attempt).await {
            Ok((address, tls)) => {
                if last.address.is_some_and(|before| before != address) {
                    tracing::info!(
                        server = %target.address, %address, "connected to another server"
                    );
                }
                *preferred.lock().unwrap_or_else(|e| e.into_inner()) = LastAnswered {
                    target: index,
                    address: Some(address),
                };
                return Ok(TokioIo::new(tls));
            }
            Err(error) => {
                last_error = io::Error::new(error.kind(), format!("{}: {error}", target.address));
            }
        }
    }
    Err(last_error)
}

/// `resolved` with the address that answered last, if among them, moved to the front.
fn answered_first(mut resolved: Vec<SocketAddr>, last: Option<SocketAddr>) -> Vec<SocketAddr> {
    if let Some(position) = resolved.iter().position(|address| Some(*address) == last) {
        let address = resolved.remove(position);
        resolved.insert(0, address);
    }
    resolved
}

/// Runs `attempt` on each address in turn, each for at most `timeout`, and returns the first
/// that succeeds with its address. An address that fails or hangs costs its own attempt and
/// never the next one's time. The error is the last address's.
async fn first_answering<T, F, Fut>(
    addresses: &[SocketAddr],
    timeout: Duration,
    mut attempt: F,
) -> Result<(SocketAddr, T), io::Error>
where
    F: FnMut(SocketAddr) -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "resolved to no address");
    for &address in addresses {
        match tokio::time::timeout(timeout, attempt(address)).await {
            Ok(Ok(answer)) => return Ok((address, answer)),
            Ok(Err(error)) => {
                tracing::debug!(%address, %error, "cannot connect");
                last_error = io::Error::new(error.kind(), format!("{address}: {error}"));
            }
            Err(_) => {
                tracing::debug!(%address, "connecting timed out");
                last_error = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{address}: connecting timed out"),
                );
            }
        }
    }
    Err(last_error)
}

/// The host part of `host:port` or `[v6]:port`.
fn host_of(address: &str) -> Option<&str> {
    let (host, port) = address.rsplit_once(':')?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return None;
    }
    Some(
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host),
    )
}

/// How the node proves its identity.
pub(crate) enum Attestor {
    /// A one-time join token.
    JoinToken(String),
    /// An x509pop certificate chain (leaf first) and the leaf's key.
    X509Pop {
        chain: Vec<Vec<u8>>,
        key: Box<KeyPair>,
    },
    /// A Kubernetes projected service account token and the cluster's name.
    K8sPsat(k8s_psat::Payload),
}

impl fmt::Debug for Attestor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a credential until it is used.
        match self {
            Self::JoinToken(_) => f.write_str("JoinToken"),
            // The payload's Debug shows the cluster, never the token.
            Self::K8sPsat(payload) => f.debug_tuple("K8sPsat").field(payload).finish(),
            Self::X509Pop { chain, .. } => f
                .debug_struct("X509Pop")
                .field("n_certs", &chain.len())
                .finish_non_exhaustive(),
        }
    }
}

/// What a successful attestation returns.
#[derive(Debug)]
pub(crate) struct Attested {
    /// The agent SVID chain, leaf first.
    pub(crate) chain: Vec<Vec<u8>>,
    /// Whether the agent re-attests instead of renewing.
    pub(crate) reattestable: bool,
}

const ATTEST_AGENT: &str = "AttestAgent";

/// Runs `AttestAgent` for an agent key `key`: the parameters, then a challenge response
/// for each challenge (x509pop), until the result.
pub(crate) async fn attest_agent(
    channel: Channel,
    attestor: &Attestor,
    key: &KeyPair,
) -> Result<Attested, ClientError> {
    use agent_pb::attest_agent_request::Step as RequestStep;
    use agent_pb::attest_agent_response::Step as ResponseStep;

    let csr = x509::build_csr(key, None)
        .map_err(|e| ClientError::Local(format!("building the agent CSR: {e}")))?;
    let (kind, payload) = match attestor {
        Attestor::JoinToken(token) => ("join_token", token.as_bytes().to_vec()),
        Attestor::X509Pop { chain, .. } => (
            x509pop::ATTESTOR_NAME,
            x509pop::build_attestation_payload(chain),
        ),
        Attestor::K8sPsat(payload) => (k8s_psat::ATTESTOR_NAME, payload.to_bytes()),
    };
    let (requests, outbound) = mpsc::channel(2);
    let closed = || ClientError::invalid(ATTEST_AGENT, "the server closed the stream");
    requests
        .send(agent_pb::AttestAgentRequest {
            step: Some(RequestStep::Params(
                agent_pb::attest_agent_request::Params {
                    data: Some(types::AttestationData {
                        r#type: kind.to_owned(),
                        payload,
                    }),
                    params: Some(agent_pb::AgentX509svidParams { csr }),
                },
            )),
        })
        .await
        .map_err(|_| closed())?;
    let mut responses = AgentClient::new(channel)
        .attest_agent(ReceiverStream::new(outbound))
        .await
        .map_err(rpc_error(ATTEST_AGENT))?
        .into_inner();
    loop {
        let response = responses
            .message()
            .await
            .map_err(rpc_error(ATTEST_AGENT))?
            .ok_or_else(|| {
                ClientError::invalid(ATTEST_AGENT, "the stream ended without a result")
            })?;
        match response.step {
            Some(ResponseStep::Challenge(challenge)) => {
                let Attestor::X509Pop { key: pop_key, .. } = attestor else {
                    return Err(ClientError::invalid(
                        ATTEST_AGENT,
                        "server issued unexpected challenge",
                    ));
                };
                let answer = x509pop::answer_challenge(pop_key, &challenge).map_err(|e| {
                    ClientError::Local(format!("answering the x509pop challenge: {e}"))
                })?;
                requests
                    .send(agent_pb::AttestAgentRequest {
                        step: Some(RequestStep::ChallengeResponse(answer)),
                    })
                    .await
                    .map_err(|_| closed())?;
            }
            Some(ResponseStep::Result(result)) => {
                let svid = result
                    .svid
                    .ok_or_else(|| ClientError::invalid(ATTEST_AGENT, "the result has no SVID"))?;
                if svid.cert_chain.is_empty() {
                    return Err(ClientError::invalid(
                        ATTEST_AGENT,
                        "the SVID has no certificates",
                    ));
                }
                // Half-close and let the server end the stream.
                drop(requests);
                let _ = responses.message().await;
                return Ok(Attested {
                    chain: svid.cert_chain,
                    reattestable: result.reattestable,
                });
            }
            None => {
                return Err(ClientError::invalid(
                    ATTEST_AGENT,
                    "a response without a step",
                ));
            }
        }
    }
}

const GET_BUNDLE: &str = "GetBundle";

/// The trust domain's bundle, which must belong to `trust_domain` and hold at least one
/// X.509 authority (an empty one would leave the agent unable to verify the server).
pub(crate) async fn get_bundle(
    channel: Channel,
    trust_domain: &TrustDomain,
) -> Result<TrustBundle, ClientError> {
    let bundle = BundleClient::new(channel)
        .get_bundle(bundle_pb::GetBundleRequest::default())
        .await
        .map_err(rpc_error(GET_BUNDLE))?
        .into_inner();
    let bundle = bundle_from_proto(&bundle).map_err(|e| ClientError::invalid(GET_BUNDLE, e))?;
    if bundle.trust_domain() != trust_domain {
        return Err(ClientError::invalid(
            GET_BUNDLE,
            format!(
                "the bundle is for {}, not {trust_domain}",
                bundle.trust_domain()
            ),
        ));
    }
    if bundle.x509_authorities().is_empty() {
        return Err(ClientError::invalid(
            GET_BUNDLE,
            "the bundle has no X.509 authorities",
        ));
    }
    Ok(bundle)
}

const GET_FEDERATED_BUNDLE: &str = "GetFederatedBundle";

/// The bundle of a federated trust domain; `None` when the server has none (NotFound).
pub(crate) async fn get_federated_bundle(
    channel: Channel,
    trust_domain: &TrustDomain,
) -> Result<Option<TrustBundle>, ClientError> {
    let result = BundleClient::new(channel)
        .get_federated_bundle(bundle_pb::GetFederatedBundleRequest {
            trust_domain: trust_domain.name().to_owned(),
            output_mask: None,
        })
        .await;
    let bundle = match result {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == Code::NotFound => return Ok(None),
        Err(status) => return Err(rpc_error(GET_FEDERATED_BUNDLE)(status)),
    };
    let bundle =
        bundle_from_proto(&bundle).map_err(|e| ClientError::invalid(GET_FEDERATED_BUNDLE, e))?;
    if bundle.trust_domain() != trust_domain {
        return Err(ClientError::invalid(
            GET_FEDERATED_BUNDLE,
            format!(
                "asked for {trust_domain}, got the bundle of {}",
                bundle.trust_domain()
            ),
        ));
    }
    Ok(Some(bundle))
}

const BATCH_NEW_X509_SVID: &str = "BatchNewX509SVID";

/// Mints one X509-SVID per parameter. Results come in request order; there may be fewer
/// than parameters, never more.
pub(crate) async fn batch_new_x509_svid(
    channel: Channel,
    params: Vec<svid_pb::NewX509svidParams>,
) -> Result<Vec<svid_pb::batch_new_x509svid_response::Result>, ClientError> {
    let n_params = params.len();
    let results = SvidClient::new(channel)
        .batch_new_x509svid(svid_pb::BatchNewX509svidRequest { params })
        .await
        .map_err(rpc_error(BATCH_NEW_X509_SVID))?
        .into_inner()
        .results;
    if results.len() > n_params {
        return Err(ClientError::invalid(
            BATCH_NEW_X509_SVID,
            format!("{} results for {n_params} requests", results.len()),
        ));
    }
    Ok(results)
}

const NEW_JWT_SVID: &str = "NewJWTSVID";

/// Mints a JWT-SVID for an entry. The response must have a token, and non-zero `issued_at`
/// and `expires_at` in that order.
pub(crate) async fn new_jwt_svid(
    channel: Channel,
    entry_id: &str,
    audiences: &[String],
) -> Result<types::Jwtsvid, ClientError> {
    let svid = SvidClient::new(channel)
        .new_jwtsvid(svid_pb::NewJwtsvidRequest {
            entry_id: entry_id.to_owned(),
            audience: audiences.to_vec(),
        })
        .await
        .map_err(rpc_error(NEW_JWT_SVID))?
        .into_inner()
        .svid
        .ok_or_else(|| ClientError::invalid(NEW_JWT_SVID, "the response has no SVID"))?;
    if svid.token.is_empty() {
        return Err(ClientError::invalid(NEW_JWT_SVID, "the SVID has no token"));
    }
    if svid.issued_at <= 0 || svid.expires_at <= 0 || svid.issued_at > svid.expires_at {
        return Err(ClientError::invalid(
            NEW_JWT_SVID,
            "issued_at and expires_at must be set and in order",
        ));
    }
    Ok(svid)
}

const RENEW_AGENT: &str = "RenewAgent";

/// Renews the agent SVID for the key behind `csr`; returns the new chain, leaf first.
pub(crate) async fn renew_agent(
    channel: Channel,
    csr: Vec<u8>,
) -> Result<Vec<Vec<u8>>, ClientError> {
    let svid = AgentClient::new(channel)
        .renew_agent(agent_pb::RenewAgentRequest {
            params: Some(agent_pb::AgentX509svidParams { csr }),
        })
        .await
        .map_err(rpc_error(RENEW_AGENT))?
        .into_inner()
        .svid
        .ok_or_else(|| ClientError::invalid(RENEW_AGENT, "the response has no SVID"))?;
    if svid.cert_chain.is_empty() {
        return Err(ClientError::invalid(
            RENEW_AGENT,
            "the SVID has no certificates",
        ));
    }
    Ok(svid.cert_chain)
}

pub(crate) const REPORT_USAGE: &str = "ReportUsage";

/// Tells the server when workloads were last served each entry (Lanyard's
/// `UsageService`; a SPIRE server answers Unimplemented).
pub(crate) async fn report_usage(
    channel: Channel,
    served: &[crate::usage::Served],
) -> Result<(), ClientError> {
    let served = served
        .iter()
        .map(|served| lanyard_pb::report_usage_request::Served {
            entry_id: served.entry_id.as_str().to_owned(),
            last_served_at: served.last_served_at,
        })
        .collect();
    UsageServiceClient::new(channel)
        .report_usage(lanyard_pb::ReportUsageRequest { served })
        .await
        .map_err(rpc_error(REPORT_USAGE))?;
    Ok(())
}

pub(crate) const FETCH_REVOCATIONS: &str = "FetchRevocations";
pub(crate) const ACKNOWLEDGE_REVOCATIONS: &str = "AcknowledgeRevocations";

/// The revocations after `after_sequence`, and the CRLs unless `crl_number` is current
/// (Lanyard's `AgentRevocationService`; a SPIRE server answers Unimplemented).
pub(crate) async fn fetch_revocations(
    channel: Channel,
    after_sequence: i64,
    crl_number: u64,
) -> Result<lanyard_pb::FetchRevocationsResponse, ClientError> {
    Ok(AgentRevocationServiceClient::new(channel)
        // CRLs listing many serials outgrow gRPC's default 4 MiB (100,000 serials make about
        // 3.5 MiB per authority).
        .max_decoding_message_size(super::revoke::MAX_FETCH_BYTES)
        .fetch_revocations(lanyard_pb::FetchRevocationsRequest {
            after_sequence,
            crl_number,
        })
        .await
        .map_err(rpc_error(FETCH_REVOCATIONS))?
        .into_inner())
}

/// Tells the server the agent has applied every revocation up to `sequence`, with the
/// X.509-SVIDs they made it drop.
pub(crate) async fn acknowledge_revocations(
    channel: Channel,
    sequence: i64,
    dropped: Vec<lanyard_pb::acknowledge_revocations_request::Dropped>,
) -> Result<lanyard_pb::AcknowledgeRevocationsResponse, ClientError> {
    Ok(AgentRevocationServiceClient::new(channel)
        .acknowledge_revocations(lanyard_pb::AcknowledgeRevocationsRequest { sequence, dropped })
        .await
        .map_err(rpc_error(ACKNOWLEDGE_REVOCATIONS))?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_reason(reason: Reason) -> Status {
        let any = prost_types::Any::from_msg(&PermissionDeniedDetails {
            reason: reason as i32,
        })
        .unwrap();
        let details = RpcStatus {
            code: Code::PermissionDenied as i32,
            message: "authorization denied for method /m".into(),
            details: vec![any],
        };
        Status::with_details(
            Code::PermissionDenied,
            "authorization denied for method /m",
            details.encode_to_vec().into(),
        )
    }

    #[test]
    fn denial_reasons_are_read_from_the_status_details() {
        for reason in [
            Reason::AgentBanned,
            Reason::AgentExpired,
            Reason::AgentNotActive,
            Reason::AgentNotAttested,
            Reason::AgentMustReattest,
        ] {
            assert_eq!(denial_reason(&with_reason(reason)), Some(reason));
        }
        assert_eq!(
            denial_reason(&Status::permission_denied("no details")),
            None
        );
        // Only PermissionDenied counts, as in SPIRE's agent.
        let other = Status::with_details(
            Code::Internal,
            "x",
            with_reason(Reason::AgentBanned).details().to_vec().into(),
        );
        assert_eq!(denial_reason(&other), None);
        let garbage = Status::with_details(Code::PermissionDenied, "x", vec![1, 2, 3].into());
        assert_eq!(denial_reason(&garbage), None);
    }

    fn local(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn the_address_that_answered_last_is_tried_first() {
        let resolved = vec![local(1), local(2), local(3)];
        assert_eq!(
            answered_first(resolved.clone(), Some(local(3))),
            [local(3), local(1), local(2)]
        );
        assert_eq!(answered_first(resolved.clone(), None), resolved);
        // A name that no longer resolves to it: the resolver's order.
        assert_eq!(answered_first(resolved.clone(), Some(local(9))), resolved);
    }

    #[tokio::test]
    async fn a_hung_address_costs_its_own_timeout_and_the_next_one_answers() {
        // The first address accepts and then never answers (a hung server); the second
        // refuses; the third answers. One timeout for all of them would end at the first.
        let addresses = [local(1), local(2), local(3)];
        let mut tried = Vec::new();
        let answer = first_answering(&addresses, Duration::from_millis(50), |address| {
            tried.push(address);
            async move {
                match address.port() {
                    1 => std::future::pending().await,
                    2 => Err(io::Error::from(io::ErrorKind::ConnectionRefused)),
                    _ => Ok("answered"),
                }
            }
        })
        .await;
        assert_eq!(answer.unwrap(), (local(3), "answered"));
        assert_eq!(tried, addresses);
    }

    #[tokio::test]
    async fn when_no_address_answers_the_error_names_the_last() {
        let addresses = [local(1), local(2)];
        let error = first_answering(
            &addresses,
            Duration::from_millis(50),
            |address| async move {
                if address.port() == 1 {
                    Err(io::Error::from(io::ErrorKind::ConnectionRefused))
                } else {
                    std::future::pending::<io::Result<()>>().await
                }
            },
        )
        .await
        .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(error.to_string().contains("127.0.0.1:2"), "{error}");
        let none = first_answering(&[], Duration::from_millis(50), |_| async { Ok(()) })
            .await
            .unwrap_err();
        assert_eq!(none.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("127.0.0.1:8081"), Some("127.0.0.1"));
        assert_eq!(host_of("spire.example.org:443"), Some("spire.example.org"));
        assert_eq!(host_of("[::1]:8081"), Some("::1"));
        assert_eq!(host_of("no-port"), None);
        assert_eq!(host_of(":8081"), None);
        assert_eq!(host_of("host:http"), None);
    }
}
