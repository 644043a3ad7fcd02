//! Node agents as child processes (this binary re-executed as `agent-child`, or a SPIRE
//! agent) and Workload API clients that stream X.509-SVIDs from them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use lanyard_core::SpiffeId;
use lanyard_proto::workload::X509svidRequest;
use lanyard_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::time::Instant;

use crate::harness::{Target, trust_domain, uds_channel};

/// A node agent running as a child process, serving the Workload API on `socket`.
#[derive(Debug)]
pub(crate) struct AgentProcess {
    child: Child,
    pub(crate) socket: PathBuf,
    pub(crate) agent_id: SpiffeId,
    /// Where the agent's log lines go, when this benchmark chose.
    log: Option<PathBuf>,
}

impl AgentProcess {
    /// Starts this binary as a Lanyard agent attesting to `target` with a fresh join token.
    pub(crate) async fn start_lanyard(
        target: &Target,
        dir: &Path,
        sync_interval: Duration,
    ) -> anyhow::Result<Self> {
        let admin = target.admin().await?;
        let token = target.join_token(&admin).await?;
        let bundle = dir.join("bootstrap.pem");
        let pem: String = target
            .authorities()
            .await?
            .iter()
            .map(|der| lanyard_core::keys::pem_encode("CERTIFICATE", der))
            .collect();
        std::fs::write(&bundle, pem)?;
        let socket = dir.join("workload").join("api.sock");
        let log = dir.join("agent.log");
        let mut command = Command::new(std::env::current_exe()?);
        command.arg("agent-child");
        if let Some(scraper) = &target.scraper {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            command.arg("--metrics-address").arg(address.to_string());
            scraper.add(address);
        }
        let child = command
            .arg("--server-address")
            .arg(target.addr.to_string())
            .arg("--trust-bundle")
            .arg(&bundle)
            .arg("--data-dir")
            .arg(dir.join("agent"))
            .arg("--socket")
            .arg(&socket)
            .arg("--join-token")
            .arg(&token)
            .arg("--sync-interval-ms")
            .arg(sync_interval.as_millis().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).context("creating the agent's log")?)
            .spawn()
            .context("starting the agent process")?;
        let agent_id = trust_domain().join_token_agent_id(&token)?;
        Ok(Self {
            child,
            socket,
            agent_id,
            log: Some(log),
        })
    }

    /// Wraps an agent process started elsewhere (e.g. a SPIRE agent).
    pub(crate) fn adopt(child: Child, socket: PathBuf, agent_id: SpiffeId) -> Self {
        Self {
            child,
            socket,
            agent_id,
            log: None,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited.
    pub(crate) fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let last_lines = self
                .log
                .as_ref()
                .and_then(|log| std::fs::read_to_string(log).ok())
                .map(|text| {
                    let lines: Vec<&str> = text.lines().collect();
                    let start = lines.len().saturating_sub(20);
                    lines.get(start..).unwrap_or_default().join("\n")
                })
                .unwrap_or_default();
            anyhow::bail!("the agent process exited: {status}\n{last_lines}");
        }
        Ok(())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Workload API client on its own connection, as a separate workload process would have.
pub(crate) type WorkloadClient = SpiffeWorkloadApiClient<
    tonic::service::interceptor::InterceptedService<
        Http2Connection,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

/// Connects a [`WorkloadClient`] to the Workload API on `socket`: one HTTP/2 connection
/// straight over the socket, as go-spiffe's or a Rust workload's client has, rather than a
/// `tonic` channel, whose request queue (a task and a buffer per channel) and reconnection
/// layers would make a thousand clients on the agent's own two cores spend more CPU in a burst
/// than the agent they measure.
pub(crate) async fn workload_client(socket: &Path) -> anyhow::Result<WorkloadClient> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .with_context(|| format!("HTTP/2 handshake on {}", socket.display()))?;
    // Runs until the client and its streams are gone, or the agent closes the connection.
    tokio::spawn(connection);
    Ok(SpiffeWorkloadApiClient::with_origin(
        tonic::service::interceptor::InterceptedService::new(
            Http2Connection(sender),
            add_security_header as fn(_) -> _,
        ),
        http::Uri::from_static("http://localhost"),
    ))
}

/// One HTTP/2 connection as the service a generated `tonic` client calls.
#[derive(Debug, Clone)]
pub(crate) struct Http2Connection(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower::Service<http::Request<tonic::body::Body>> for Http2Connection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

fn add_security_header(
    mut request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    request.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(request)
}

/// Where a burst of workload clients waits: each connects, then [`Gate::pass`]es; the
/// benchmark waits until all are [`Gate::connected`] and the agent has settled, takes its
/// readings, and [`Gate::release`]s them at once, so that what it reads for the burst is the
/// calls and not the connections.
#[derive(Debug, Clone)]
pub(crate) struct Gate {
    connected: Arc<tokio::sync::Barrier>,
    released: Arc<tokio::sync::Barrier>,
}

/// How long the connections are left to settle (the agent reads each one's HTTP/2 preface
/// and settings) before the burst is released.
const SETTLE: Duration = Duration::from_millis(250);

impl Gate {
    pub(crate) fn new(clients: usize) -> Self {
        Self {
            connected: Arc::new(tokio::sync::Barrier::new(clients + 1)),
            released: Arc::new(tokio::sync::Barrier::new(clients + 1)),
        }
    }

    /// A client: connected (or failed to), waits for the release.
    pub(crate) async fn pass(&self) {
        self.connected.wait().await;
        self.released.wait().await;
    }

    /// The benchmark: returns once every client is connected and the connections settled.
    pub(crate) async fn connected(&self) {
        self.connected.wait().await;
        tokio::time::sleep(SETTLE).await;
    }

    /// The benchmark: lets every client go.
    pub(crate) async fn release(&self) {
        self.released.wait().await;
    }
}

/// When each SPIFFE ID first reached a streaming workload, and when it first left it again.
#[derive(Debug, Clone, Default)]
pub(crate) struct Arrivals {
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    gone: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Arrivals {
    /// When a message to the workload first lacked `spiffe_id` after it had come.
    pub(crate) fn first_gone(&self, spiffe_id: &str) -> Option<Instant> {
        self.gone
            .lock()
            .ok()
            .and_then(|gone| gone.get(spiffe_id).copied())
    }

    pub(crate) fn first_seen(&self, spiffe_id: &str) -> Option<Instant> {
        self.seen
            .lock()
            .ok()
            .and_then(|seen| seen.get(spiffe_id).copied())
    }

    pub(crate) fn count(&self) -> usize {
        self.seen.lock().map_or(0, |seen| seen.len())
    }
}

/// Opens a `FetchX509SVID` stream on `socket` and records when each SPIFFE ID first
/// arrives, until the task is aborted.
pub(crate) async fn watch_arrivals(
    socket: &Path,
) -> anyhow::Result<(Arrivals, tokio::task::JoinHandle<()>)> {
    let mut client = workload_client(socket).await?;
    let arrivals = Arrivals::default();
    let recorder = arrivals.clone();
    let task = tokio::spawn(async move {
        // The agent refuses the stream until it has an identity for us; ask again.
        loop {
            if let Ok(response) = client.fetch_x509svid(X509svidRequest {}).await {
                let mut stream = response.into_inner();
                while let Ok(Some(message)) = stream.message().await {
                    let now = Instant::now();
                    if let (Ok(mut seen), Ok(mut gone)) =
                        (recorder.seen.lock(), recorder.gone.lock())
                    {
                        let present: std::collections::HashSet<&str> =
                            message.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
                        for id in seen.keys() {
                            if !present.contains(id.as_str()) && !gone.contains_key(id) {
                                gone.insert(id.clone(), now);
                            }
                        }
                        for svid in message.svids {
                            seen.entry(svid.spiffe_id).or_insert(now);
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    Ok((arrivals, task))
}

/// Waits until the agent's socket accepts connections.
pub(crate) async fn wait_for_socket(
    agent: &mut AgentProcess,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        agent.check_running()?;
        if agent.socket.exists() && uds_channel(&agent.socket).await.is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "the agent socket {} did not come up",
                agent.socket.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
