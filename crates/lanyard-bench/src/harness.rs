//! What the benchmarks drive: a server (in-process Lanyard on its own named runtime, or any
//! SPIRE-compatible server reached through its admin socket and TLS port), simulated agents
//! that attest with join tokens and speak the server API over mTLS, and Workload API clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use lanyard_core::keys::{KeyPair, KeyType};
use lanyard_core::tls::{InsecureBootstrapVerifier, SpiffeServerVerifier, client_config};
use lanyard_core::{SpiffeId, TrustDomain};
use lanyard_proto::spire::api::server::agent::v1 as agent_pb;
use lanyard_proto::spire::api::server::agent::v1::agent_client::AgentClient;
use lanyard_proto::spire::api::server::bundle::v1::GetBundleRequest;
use lanyard_proto::spire::api::server::bundle::v1::bundle_client::BundleClient;
use lanyard_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use lanyard_proto::spire::api::server::entry::v1::{
    BatchCreateEntryRequest, BatchDeleteEntryRequest, BatchUpdateEntryRequest,
    GetAuthorizedEntriesRequest,
};
use lanyard_proto::spire::api::types;
use lanyard_server::{Server, ServerConfig};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::{Channel, Endpoint};

use crate::cpu::{CpuMeter, SERVER_THREADS};

/// The trust domain every benchmark uses.
pub(crate) const TRUST_DOMAIN: &str = "example.org";
/// Entries per `BatchCreateEntry` call when loading a server.
const CREATE_BATCH: usize = 200;

pub(crate) fn trust_domain() -> TrustDomain {
    TrustDomain::new(TRUST_DOMAIN).expect("the benchmark trust domain is valid")
}

/// A directory for benchmark state: tmpfs when there is one, so that fsync latency of the
/// disk does not dominate figures about CPU paths.
pub(crate) fn scratch_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix(prefix);
        b
    };
    if shm.is_dir()
        && let Ok(dir) = builder.tempdir_in(shm)
    {
        return Ok(dir);
    }
    Ok(builder.tempdir()?)
}

/// A server the benchmarks can reach: its TLS port, its admin socket and how to measure its
/// CPU time.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    pub(crate) admin_socket: PathBuf,
    pub(crate) cpu: CpuMeter,
    /// Which node agent pairs with this server.
    pub(crate) agent: AgentKind,
    /// With metrics on: what scrapes the server's `/metrics`, and its agents' too.
    pub(crate) scraper: Option<Arc<Scraper>>,
}

/// Scrapes `/metrics` on every address it is given, every second, as Prometheus does, so
/// that a run with metrics on pays for the exposition too.
#[derive(Debug)]
pub(crate) struct Scraper {
    targets: std::sync::Mutex<Vec<SocketAddr>>,
    scrapes: AtomicU64,
}

impl Scraper {
    /// Scrapes `first` (and whatever is added) every second until dropped by every holder.
    pub(crate) fn start(first: SocketAddr) -> Arc<Self> {
        let scraper = Arc::new(Self {
            targets: std::sync::Mutex::new(vec![first]),
            scrapes: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&scraper);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(scraper) = weak.upgrade() else {
                    return;
                };
                let targets = scraper
                    .targets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                for target in targets {
                    if scrape(target).await.is_ok() {
                        scraper.scrapes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        scraper
    }

    /// Scrapes `target` too.
    pub(crate) fn add(&self, target: SocketAddr) {
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(target);
    }

    /// Successful scrapes so far.
    pub(crate) fn scrapes(&self) -> u64 {
        self.scrapes.load(Ordering::Relaxed)
    }
}

/// One `GET /metrics`, read to the end.
async fn scrape(target: SocketAddr) -> std::io::Result<usize> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(target).await?;
    tcp.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut body = Vec::new();
    tcp.read_to_end(&mut body).await?;
    if body.starts_with(b"HTTP/1.1 200") {
        Ok(body.len())
    } else {
        Err(std::io::Error::other("not 200"))
    }
}

/// A node agent implementation.
#[derive(Debug, Clone)]
pub(crate) enum AgentKind {
    /// This binary as `agent-child`.
    Lanyard,
    /// `spire-agent` from this directory.
    Spire(PathBuf),
}

/// A Lanyard server in this process, on a runtime of its own whose threads are named
/// [`SERVER_THREADS`] so its CPU time can be told apart from the load generator's.
#[derive(Debug)]
pub(crate) struct LanyardServer {
    runtime: Option<tokio::runtime::Runtime>,
    server: Option<Server>,
}

impl LanyardServer {
    /// A server config on `dir` with an ephemeral port and a socket inside `dir`.
    pub(crate) fn config_in(dir: &Path) -> ServerConfig {
        let mut config = ServerConfig::new(trust_domain(), dir.join("data"));
        config.bind_address = SocketAddr::from(([127, 0, 0, 1], 0));
        config.socket_path = dir.join("admin").join("api.sock");
        // The benchmarks measure the server, not its rate limits (SPIRE runs with its own off).
        config.limits = lanyard_server::config::LimitsConfig::without_rate_limits();
        config
    }

    /// A server config on `dir` whose datastore is the PostgreSQL database at `url`, as
    /// server `instance` of the servers sharing it.
    pub(crate) fn postgres_config_in(dir: &Path, instance: &str, url: &str) -> ServerConfig {
        let mut config = Self::config_in(dir);
        config.instance = instance.to_owned();
        config.datastore.kind = lanyard_server::config::DatastoreKind::Postgres;
        config.datastore.connection_string =
            Some(lanyard_server::config::ConnectionString::new(url));
        config
    }

    /// Starts a server with `config` on its own two-thread runtime.
    pub(crate) async fn start(config: ServerConfig) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(SERVER_THREADS)
            .enable_all()
            .build()?;
        let started = runtime
            .spawn(Server::start(config, lanyard_server::state::system_clock()))
            .await??;
        Ok(Self {
            runtime: Some(runtime),
            server: Some(started),
        })
    }

    pub(crate) fn server(&self) -> &Server {
        self.server
            .as_ref()
            .expect("the server runs until shut down")
    }

    pub(crate) fn target(&self) -> Target {
        Target {
            name: "lanyard".to_owned(),
            addr: self.server().tcp_addr(),
            admin_socket: self.server().socket_path().to_owned(),
            cpu: CpuMeter::in_process_server(),
            agent: AgentKind::Lanyard,
            scraper: None,
        }
    }

    /// Stops the server and its runtime.
    pub(crate) async fn shutdown(mut self) {
        if let (Some(server), Some(runtime)) = (self.server.take(), self.runtime.as_ref()) {
            let _ = runtime.spawn(server.shutdown()).await;
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for LanyardServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Bytes a connection sent and received, counted below TLS.
#[derive(Debug, Default)]
pub(crate) struct ByteCounter {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
}

impl ByteCounter {
    pub(crate) fn total(&self) -> u64 {
        self.sent.load(Ordering::Relaxed) + self.received.load(Ordering::Relaxed)
    }
}

/// A stream that counts the bytes through it.
struct Counted<T> {
    inner: T,
    counter: Arc<ByteCounter>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        self.counter
            .received
            .fetch_add(read as u64, Ordering::Relaxed);
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            self.counter.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TLS channel to `addr` with `config`, counting bytes into `counter`.
pub(crate) async fn tls_channel(
    addr: SocketAddr,
    config: rustls::ClientConfig,
    counter: Arc<ByteCounter>,
) -> anyhow::Result<Channel> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let channel = Endpoint::try_from(format!("http://{addr}"))?
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            let counter = Arc::clone(&counter);
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let counted = Counted {
                    inner: tcp,
                    counter,
                };
                let name = ServerName::try_from("lanyard-server")
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let tls = connector.connect(name, counted).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(channel)
}

/// A channel over a Unix socket.
pub(crate) async fn uds_channel(path: &Path) -> anyhow::Result<Channel> {
    let shown = path.display().to_string();
    let path = path.to_owned();
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .with_context(|| format!("connecting to {shown}"))?;
    Ok(channel)
}

/// An attested agent simulated by this process: its SVID, key and an mTLS channel.
#[derive(Debug, Clone)]
pub(crate) struct SimAgent {
    pub(crate) id: SpiffeId,
    chain: Vec<Vec<u8>>,
    key: Arc<KeyPair>,
    authorities: Arc<Vec<Vec<u8>>>,
    pub(crate) channel: Channel,
    pub(crate) bytes: Arc<ByteCounter>,
}

impl SimAgent {
    /// Waits until the server authorizes this agent for at least `n` entries (SPIRE's
    /// server sees new entries only when its entry cache next reloads).
    pub(crate) async fn wait_authorized(&self, n: usize) -> anyhow::Result<()> {
        let channel = self.channel.clone();
        wait_until("entries to be authorized", Duration::from_secs(60), || {
            let mut client = EntryClient::new(channel.clone());
            async move {
                client
                    .get_authorized_entries(GetAuthorizedEntriesRequest { output_mask: None })
                    .await
                    .is_ok_and(|r| r.into_inner().entries.len() >= n)
            }
        })
        .await
    }

    /// Drops this agent's connection: the channel is replaced by one that connects only
    /// when used (e.g. before its server is stopped, so that nothing reconnects on its own).
    pub(crate) fn disconnect(&mut self) {
        self.channel = Endpoint::from_static("http://[::]:1").connect_lazy();
    }

    /// A new mTLS channel to a server at `addr` (e.g. the same server after a restart).
    pub(crate) async fn connect(&self, addr: SocketAddr) -> anyhow::Result<Channel> {
        let authorities = Arc::clone(&self.authorities);
        let verifier = SpiffeServerVerifier::new(
            trust_domain().server_id(),
            Arc::new(move || authorities.as_ref().clone()),
        );
        let config = client_config(Arc::new(verifier), Some((&self.chain, &self.key)))?;
        tls_channel(addr, config, Arc::clone(&self.bytes)).await
    }
}

impl Target {
    pub(crate) async fn admin(&self) -> anyhow::Result<Channel> {
        uds_channel(&self.admin_socket).await
    }

    /// The trust domain's X.509 authorities, from `GetBundle` on the admin socket.
    pub(crate) async fn authorities(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        let bundle = BundleClient::new(self.admin().await?)
            .get_bundle(GetBundleRequest { output_mask: None })
            .await?
            .into_inner();
        Ok(bundle
            .x509_authorities
            .into_iter()
            .map(|c| c.asn1)
            .collect())
    }

    pub(crate) async fn join_token(&self, admin: &Channel) -> anyhow::Result<String> {
        Ok(AgentClient::new(admin.clone())
            .create_join_token(agent_pb::CreateJoinTokenRequest {
                ttl: 3600,
                ..Default::default()
            })
            .await?
            .into_inner()
            .value)
    }

    /// Attests `n` agents with join tokens, `parallel` at a time.
    pub(crate) async fn attest_agents(
        &self,
        n: usize,
        parallel: usize,
    ) -> anyhow::Result<Vec<SimAgent>> {
        let admin = self.admin().await?;
        let authorities = Arc::new(self.authorities().await?);
        let semaphore = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let permit = Arc::clone(&semaphore).acquire_owned().await?;
            let target = self.clone();
            let admin = admin.clone();
            let authorities = Arc::clone(&authorities);
            tasks.spawn(async move {
                let _permit = permit;
                let agent = target.attest_agent(&admin, authorities).await;
                (i, agent)
            });
        }
        let mut agents: Vec<Option<SimAgent>> = vec![None; n];
        while let Some(joined) = tasks.join_next().await {
            let (i, agent) = joined?;
            if let Some(slot) = agents.get_mut(i) {
                *slot = Some(agent?);
            }
        }
        agents
            .into_iter()
            .map(|a| a.ok_or_else(|| anyhow!("an agent was not attested")))
            .collect()
    }

    async fn attest_agent(
        &self,
        admin: &Channel,
        authorities: Arc<Vec<Vec<u8>>>,
    ) -> anyhow::Result<SimAgent> {
        let token = self.join_token(admin).await?;
        let bootstrap = client_config(
            Arc::new(InsecureBootstrapVerifier::new(trust_domain().server_id())),
            None,
        )?;
        let channel = tls_channel(self.addr, bootstrap, Arc::default()).await?;
        let key = KeyPair::generate(KeyType::EcP256)?;
        let chain = attest_join_token(channel, &token, &key).await?;
        let id = lanyard_core::x509::spiffe_id_of(
            chain
                .first()
                .ok_or_else(|| anyhow!("empty agent SVID chain"))?,
        )?;
        let mut agent = SimAgent {
            id,
            chain,
            key: Arc::new(key),
            authorities,
            channel: Endpoint::from_static("http://[::]:1").connect_lazy(),
            bytes: Arc::new(ByteCounter::default()),
        };
        agent.channel = agent.connect(self.addr).await?;
        Ok(agent)
    }

    /// Creates entries through the admin socket, in batches; returns their IDs in order.
    pub(crate) async fn create_entries(
        &self,
        entries: Vec<types::Entry>,
    ) -> anyhow::Result<Vec<String>> {
        let mut client = EntryClient::new(self.admin().await?);
        let mut ids = Vec::with_capacity(entries.len());
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let batch: Vec<types::Entry> = entries.by_ref().take(CREATE_BATCH).collect();
            let results = client
                .batch_create_entry(BatchCreateEntryRequest {
                    entries: batch,
                    output_mask: None,
                })
                .await?
                .into_inner()
                .results;
            for result in results {
                let status = result.status.unwrap_or_default();
                if status.code != 0 {
                    bail!("creating an entry failed: {}", status.message);
                }
                ids.push(result.entry.map(|e| e.id).unwrap_or_default());
            }
        }
        Ok(ids)
    }

    /// Deletes the entries `ids` through the admin socket.
    pub(crate) async fn delete_entries(&self, ids: Vec<String>) -> anyhow::Result<()> {
        let results = EntryClient::new(self.admin().await?)
            .batch_delete_entry(BatchDeleteEntryRequest { ids })
            .await?
            .into_inner()
            .results;
        for result in results {
            let status = result.status.unwrap_or_default();
            if status.code != 0 {
                bail!("deleting an entry failed: {}", status.message);
            }
        }
        Ok(())
    }

    /// Replaces an entry (e.g. to make agents re-mint its SVID).
    pub(crate) async fn update_entry(&self, entry: types::Entry) -> anyhow::Result<()> {
        let results = EntryClient::new(self.admin().await?)
            .batch_update_entry(BatchUpdateEntryRequest {
                entries: vec![entry],
                input_mask: None,
                output_mask: None,
            })
            .await?
            .into_inner()
            .results;
        let status = results
            .into_iter()
            .next()
            .and_then(|r| r.status)
            .unwrap_or_default();
        if status.code != 0 {
            bail!("updating an entry failed: {}", status.message);
        }
        Ok(())
    }
}

/// An entry message for `spiffe://example.org<path>` under `parent` with `selectors`
/// (`type:value`).
pub(crate) fn entry_message(parent: &str, path: &str, selectors: &[String]) -> types::Entry {
    let parent: SpiffeId = parent.parse().expect("benchmark parent IDs are valid");
    types::Entry {
        parent_id: Some(lanyard_proto::convert::spiffe_id_to_proto(&parent)),
        spiffe_id: Some(types::Spiffeid {
            trust_domain: TRUST_DOMAIN.into(),
            path: path.to_owned(),
        }),
        selectors: selectors
            .iter()
            .map(|s| {
                let (kind, value) = s.split_once(':').unwrap_or((s.as_str(), ""));
                types::Selector {
                    r#type: kind.to_owned(),
                    value: value.to_owned(),
                }
            })
            .collect(),
        x509_svid_ttl: 3600,
        ..Default::default()
    }
}

/// SPIRE's join-token attestation exchange; returns the agent's SVID chain.
async fn attest_join_token(
    channel: Channel,
    token: &str,
    key: &KeyPair,
) -> anyhow::Result<Vec<Vec<u8>>> {
    use agent_pb::attest_agent_request::Step as ReqStep;
    use agent_pb::attest_agent_response::Step as RespStep;

    let csr = lanyard_core::x509::build_csr(key, None)?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(agent_pb::AttestAgentRequest {
        step: Some(ReqStep::Params(agent_pb::attest_agent_request::Params {
            data: Some(types::AttestationData {
                r#type: "join_token".to_owned(),
                payload: token.as_bytes().to_vec(),
            }),
            params: Some(agent_pb::AgentX509svidParams { csr }),
        })),
    })
    .await?;
    let mut responses = AgentClient::new(channel)
        .attest_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(response) = responses.message().await? {
        if let Some(RespStep::Result(result)) = response.step {
            let svid = result
                .svid
                .ok_or_else(|| anyhow!("attestation result without an SVID"))?;
            return Ok(svid.cert_chain);
        }
    }
    bail!("attestation ended without a result")
}

/// A pool of CSRs for fresh P-256 keys. The server does not care that they repeat, and
/// generating them is the agent's cost, not the server's.
pub(crate) fn csr_pool(n: usize) -> anyhow::Result<Arc<Vec<Vec<u8>>>> {
    let mut csrs = Vec::with_capacity(n);
    for _ in 0..n {
        let key = KeyPair::generate(KeyType::EcP256)?;
        csrs.push(lanyard_core::x509::build_csr(&key, None)?);
    }
    Ok(Arc::new(csrs))
}

/// The uid of this process, for `unix:uid` selectors.
pub(crate) fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
}

/// Polls `ready` every 20 ms until it returns true or `timeout` passes.
pub(crate) async fn wait_until<F, Fut>(
    what: &str,
    timeout: Duration,
    mut ready: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if ready().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
