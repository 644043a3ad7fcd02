//! A real server on a temporary directory, an ephemeral port and a temporary socket, plus
//! clients for its admin socket and its TLS endpoint, and a clock tests can move.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use lanyard_core::keys::{KeyPair, KeyType};
use lanyard_core::tls::{InsecureBootstrapVerifier, SpiffeServerVerifier, client_config};
use lanyard_core::{SpiffeId, TrustDomain};
use lanyard_proto::spire::api::server::agent::v1 as agent_pb;
use lanyard_proto::spire::api::server::agent::v1::agent_client::AgentClient;
use lanyard_server::state::Clock;
use lanyard_server::{Server, ServerConfig};
use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint};

/// A clock that starts at the real time and moves only when told.
#[derive(Clone)]
pub struct TestClock {
    base: SystemTime,
    offset_secs: Arc<AtomicU64>,
}

impl TestClock {
    pub fn new() -> Self {
        Self {
            base: SystemTime::now(),
            offset_secs: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn advance(&self, by: Duration) {
        self.offset_secs.fetch_add(by.as_secs(), Ordering::SeqCst);
    }

    pub fn clock(&self) -> Clock {
        let this = self.clone();
        Arc::new(move || this.base + Duration::from_secs(this.offset_secs.load(Ordering::SeqCst)))
    }
}

pub struct TestServer {
    pub server: Option<Server>,
    pub _dir: tempfile::TempDir,
    pub clock: TestClock,
    pub config: ServerConfig,
}

pub fn trust_domain() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

pub fn config_in(dir: &Path) -> ServerConfig {
    let mut config = ServerConfig::new(trust_domain(), dir.join("data"));
    config.bind_address = "127.0.0.1:0".parse().unwrap();
    config.socket_path = dir.join("admin").join("api.sock");
    // Tests attest and sign in quick succession from one address; those about the rate limits
    // set them.
    config.limits = lanyard_server::config::LimitsConfig::without_rate_limits();
    config
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(edit: impl FnOnce(&mut ServerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_in(dir.path());
        edit(&mut config);
        let clock = TestClock::new();
        let server = Server::start(config.clone(), clock.clock()).await.unwrap();
        Self {
            server: Some(server),
            _dir: dir,
            clock,
            config,
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    pub fn addr(&self) -> SocketAddr {
        self.server().tcp_addr()
    }

    pub fn socket(&self) -> PathBuf {
        self.server().socket_path().to_owned()
    }

    /// Stops the server and starts a new one on the same data directory and socket.
    pub async fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        let server = Server::start(self.config.clone(), self.clock.clock())
            .await
            .unwrap();
        self.server = Some(server);
    }

    pub async fn admin(&self) -> Channel {
        uds_channel(&self.socket()).await
    }

    /// The trust domain's X.509 authorities, as the server currently publishes them.
    pub fn authorities(&self) -> Vec<Vec<u8>> {
        self.server()
            .state()
            .bundle()
            .x509_authorities()
            .iter()
            .map(|a| a.der().to_vec())
            .collect()
    }

    /// A TLS channel that verifies the server SVID against the bundle and presents `identity`.
    pub async fn tls(&self, identity: Option<(&[Vec<u8>], &KeyPair)>) -> Channel {
        self.try_tls(identity).await.unwrap()
    }

    /// Like [`TestServer::tls`], handing back a failed handshake.
    pub async fn try_tls(
        &self,
        identity: Option<(&[Vec<u8>], &KeyPair)>,
    ) -> Result<Channel, tonic::transport::Error> {
        let authorities = self.authorities();
        let verifier = SpiffeServerVerifier::new(
            trust_domain().server_id(),
            Arc::new(move || authorities.clone()),
        );
        let config = client_config(Arc::new(verifier), identity).unwrap();
        try_tls_channel(self.addr(), config).await
    }

    /// A TLS channel that only checks the server's ID (SPIRE's insecure bootstrap).
    pub async fn bootstrap_tls(&self) -> Channel {
        let verifier = InsecureBootstrapVerifier::new(trust_domain().server_id());
        let config = client_config(Arc::new(verifier), None).unwrap();
        tls_channel(self.addr(), config).await
    }

    pub async fn join_token(&self, ttl_secs: i32) -> String {
        AgentClient::new(self.admin().await)
            .create_join_token(agent_pb::CreateJoinTokenRequest {
                ttl: ttl_secs,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .value
    }

    /// Attests with a fresh join token; returns the agent's SVID chain, key and ID.
    pub async fn attest_new_agent(&self) -> AttestedAgentIdentity {
        let token = self.join_token(600).await;
        attest_join_token(self.bootstrap_tls().await, &token)
            .await
            .unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Tasks end with the runtime; remove the socket so nothing lingers.
        let _ = std::fs::remove_file(self.config.socket_path.as_path());
    }
}

pub struct AttestedAgentIdentity {
    pub id: SpiffeId,
    pub chain: Vec<Vec<u8>>,
    pub key: KeyPair,
    pub reattestable: bool,
}

pub async fn uds_channel(path: &Path) -> Channel {
    let path = path.to_owned();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

pub async fn tls_channel(addr: SocketAddr, config: rustls::ClientConfig) -> Channel {
    try_tls_channel(addr, config).await.unwrap()
}

/// Like [`tls_channel`], handing back a failed connection or handshake.
pub async fn try_tls_channel(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    Endpoint::try_from(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = ServerName::try_from("lanyard-server").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
}

/// Runs the join-token attestation exchange as SPIRE's agent does.
pub async fn attest_join_token(
    channel: Channel,
    token: &str,
) -> Result<AttestedAgentIdentity, tonic::Status> {
    attest(channel, "join_token", token.as_bytes().to_vec(), |_| None).await
}

/// Runs an attestation exchange, answering challenges with `answer`.
pub async fn attest(
    channel: Channel,
    kind: &str,
    payload: Vec<u8>,
    answer: impl Fn(&[u8]) -> Option<Vec<u8>>,
) -> Result<AttestedAgentIdentity, tonic::Status> {
    attest_with_key(
        channel,
        kind,
        payload,
        KeyPair::generate(KeyType::EcP256).unwrap(),
        answer,
    )
    .await
}

pub async fn attest_with_key(
    channel: Channel,
    kind: &str,
    payload: Vec<u8>,
    key: KeyPair,
    answer: impl Fn(&[u8]) -> Option<Vec<u8>>,
) -> Result<AttestedAgentIdentity, tonic::Status> {
    use agent_pb::attest_agent_request::Step as ReqStep;
    use agent_pb::attest_agent_response::Step as RespStep;

    let csr = lanyard_core::x509::build_csr(&key, None).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(agent_pb::AttestAgentRequest {
        step: Some(ReqStep::Params(agent_pb::attest_agent_request::Params {
            data: Some(lanyard_proto::spire::api::types::AttestationData {
                r#type: kind.to_owned(),
                payload,
            }),
            params: Some(agent_pb::AgentX509svidParams { csr }),
        })),
    })
    .await
    .unwrap();
    let mut responses = AgentClient::new(channel)
        .attest_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    loop {
        let response = responses
            .message()
            .await?
            .ok_or_else(|| tonic::Status::internal("stream ended without a result"))?;
        match response.step {
            Some(RespStep::Challenge(challenge)) => {
                let reply = answer(&challenge)
                    .ok_or_else(|| tonic::Status::internal("unexpected challenge"))?;
                tx.send(agent_pb::AttestAgentRequest {
                    step: Some(ReqStep::ChallengeResponse(reply)),
                })
                .await
                .unwrap();
            }
            Some(RespStep::Result(result)) => {
                let svid = result.svid.unwrap();
                let id = lanyard_core::x509::spiffe_id_of(&svid.cert_chain[0]).unwrap();
                return Ok(AttestedAgentIdentity {
                    id,
                    chain: svid.cert_chain,
                    key,
                    reattestable: result.reattestable,
                });
            }
            None => return Err(tonic::Status::internal("empty response")),
        }
    }
}
