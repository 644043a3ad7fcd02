//! The SPIFFE Workload API on the agent's public Unix socket, wire-compatible with SPIRE's
//! agent so that go-spiffe, py-spiffe, java-spiffe and the `spiffe` crate work unchanged.
//!
//! The caller is identified from the kernel's peer credentials of the connection (never from
//! anything it sends), attested into selectors by a [`WorkloadAttestor`], and served from
//! the manager's latest [`Snapshot`]. Streaming RPCs send the complete state at once and
//! again whenever what this caller would get changes. Status codes and messages are SPIRE's
//! where clients depend on them (`no identity issued`, `security header missing from
//! request`, `audience must be specified`).
//!
//! One caller cannot take the agent down for the others: connections are counted per uid as
//! they are accepted and refused beyond `max_connections_per_uid`, each connection carries at
//! most `max_streams_per_connection` calls, calls are rate-limited per uid
//! (`ResourceExhausted`), a pushed message the workload does not read within
//! `stream_send_timeout` closes its connection (freeing everything it held), and accept
//! errors such as running out of descriptors are retried with backoff, never spun on.
//!
//! Envoy's Secret Discovery Service shares the socket, the caller identification and the
//! limits ([`sds`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use lanyard_core::id::IdError;
use lanyard_core::jwt::{JwtError, validate_jwt_svid};
use lanyard_core::{EntryId, SelectorSet, SpiffeId, TrustBundle, TrustDomain};
use lanyard_metrics::rpc::{RpcMetrics, RpcMetricsLayer};
use lanyard_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use lanyard_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse,
    WitsvidRequest, WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid,
    X509svidRequest, X509svidResponse,
};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::attestor::{AttestError, PeerCredentials, WorkloadAttestor};
use crate::cache::{CachedEntry, JwtMintError, JwtMinter, Snapshot};
use crate::config::WorkloadApiConfig;
use crate::limits::{
    ConnectionLimiter, ConnectionSlot, OFFENDER_LOG_INTERVAL, OffenderLog, RateLimiter,
};
use crate::metrics::AgentMetrics;
use crate::usage::UsageTracker;

mod http2;
pub mod sds;

/// The gRPC metadata key every Workload API request must carry with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// How long a request waits for the agent's first sync, or a stream for the caller's first
/// X.509-SVIDs, before answering Unavailable (which clients retry with backoff).
pub const DEFAULT_INITIAL_WAIT: Duration = Duration::from_secs(10);

/// The Workload API socket's mode: workloads of every UID must be able to connect.
const SOCKET_MODE: u32 = 0o777;
/// Mode of directories created for the socket: anyone may enter, only the agent may write.
const SOCKET_DIR_MODE: u32 = 0o755;

/// The first pause after a failed `accept` (e.g. out of descriptors); it doubles per failure.
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
/// The longest pause between failed `accept`s.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// How long open connections have to finish once shutdown begins before they are closed: a
/// workload that does not read would otherwise keep the agent from stopping.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Claims of a foreign trust domain's JWT-SVID that `ValidateJWTSVID` returns; the others
/// are dropped, as SPIRE does without `allowed_foreign_jwt_claims`.
const FOREIGN_CLAIMS_KEPT: [&str; 3] = ["sub", "aud", "exp"];

/// The source of the current time.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The Workload API service wrapped in its security-header check, ready for a tonic
/// [`Router`]. Only its own paths (`/SpiffeWorkloadAPI/…`) are checked: other services on
/// the same socket (Envoy SDS, health) do not need the header.
pub type WorkloadApiService = InterceptedService<
    SpiffeWorkloadApiServer<WorkloadApi>,
    fn(Request<()>) -> Result<Request<()>, Status>,
>;

/// What the Workload API socket serves: the Workload API and any other gRPC service sharing
/// the socket (Envoy SDS, health), with the per-connection limits and the gRPC call metrics'
/// layer (on or off). Built by [`server_builder`], served by [`serve_router`].
#[derive(Debug)]
pub struct WorkloadRouter {
    routes: RoutesBuilder,
    api: Option<WorkloadApi>,
    metrics: RpcMetricsLayer,
    max_streams: u32,
}

impl WorkloadRouter {
    /// Adds the Workload API (with its security-header check). Its `FetchX509SVID` is
    /// answered on the HTTP/2 stream itself; its other calls go through the router.
    pub fn add_workload_api(mut self, api: WorkloadApi) -> Self {
        self.routes.add_service(api.clone().into_service());
        self.api = Some(api);
        self
    }

    /// Adds another gRPC service for the same socket.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.routes.add_service(service);
        self
    }

    /// Adds `service` if there is one.
    pub fn add_optional_service<S>(self, service: Option<S>) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        match service {
            Some(service) => self.add_service(service),
            None => self,
        }
    }
}

/// Why a Workload API request failed. [`WorkloadError::into_status`] is the one place these
/// become gRPC statuses; the messages that clients match on are SPIRE's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// The request lacks exactly one `workload.spiffe.io: true` metadata entry.
    #[error("security header missing from request")]
    MissingSecurityHeader,
    /// The connection carries no usable peer credentials.
    #[error("{0}")]
    CallerUnknown(String),
    /// The caller could not be attested.
    #[error(transparent)]
    Attestation(AttestError),
    /// The caller matches no registration entry.
    #[error("no identity issued")]
    NoIdentity,
    /// `audience` is empty or has an empty value.
    #[error("audience must be specified")]
    NoAudience,
    /// `ValidateJWTSVID` was called without a token.
    #[error("svid must be specified")]
    NoSvid,
    /// The requested SPIFFE ID does not parse.
    #[error("invalid requested SPIFFE ID: {0}")]
    InvalidSpiffeId(IdError),
    /// The JWT-SVID did not validate.
    #[error("{0}")]
    InvalidToken(JwtError),
    /// The JWT-SVID validated but its ID is revoked.
    #[error("token has been revoked (jti {0:?})")]
    RevokedToken(String),
    /// A JWT-SVID could not be minted.
    #[error("could not fetch JWT-SVID: {0}")]
    JwtMint(JwtMintError),
    /// The agent is not ready to answer yet.
    #[error("{0}")]
    NotReady(&'static str),
    /// The agent is stopping.
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// The RPC is not served.
    #[error("{0} is not supported by this agent")]
    Unimplemented(&'static str),
    /// The caller's uid made more calls than `requests_per_second_per_uid` allows.
    #[error("rate limit exceeded: uid {uid} may make {per_second} Workload API calls per second")]
    RateLimited {
        /// The caller's uid.
        uid: u32,
        /// The sustained rate allowed.
        per_second: u32,
    },
}

impl WorkloadError {
    /// The gRPC status for this error.
    pub fn into_status(self) -> Status {
        let message = self.to_string();
        match self {
            Self::MissingSecurityHeader
            | Self::NoAudience
            | Self::NoSvid
            | Self::InvalidSpiffeId(_)
            | Self::InvalidToken(_)
            | Self::RevokedToken(_) => Status::invalid_argument(message),
            Self::CallerUnknown(_) => Status::internal(message),
            Self::Attestation(error) if error.is_caller_unverified() => Status::unauthenticated(
                format!("could not verify existence of the original caller: {error}"),
            ),
            Self::Attestation(error) => {
                Status::unavailable(format!("workload attestation failed: {error}"))
            }
            Self::NoIdentity | Self::JwtMint(JwtMintError::NotAuthorized(_)) => {
                Status::permission_denied("no identity issued")
            }
            Self::JwtMint(_) | Self::NotReady(_) | Self::ShuttingDown => {
                Status::unavailable(message)
            }
            Self::Unimplemented(_) => Status::unimplemented(message),
            Self::RateLimited { .. } => Status::resource_exhausted(message),
        }
    }
}

impl From<WorkloadError> for Status {
    fn from(error: WorkloadError) -> Self {
        error.into_status()
    }
}

/// The SPIFFE Workload API handler.
#[derive(Clone)]
pub struct WorkloadApi {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    jwt_minter: Arc<dyn JwtMinter>,
    attestor: Arc<dyn WorkloadAttestor>,
    clock: Clock,
    initial_wait: Duration,
    stop: Arc<watch::Sender<bool>>,
    usage: Option<Arc<UsageTracker>>,
    limits: Arc<ApiLimits>,
    metrics: AgentMetrics,
    x509_steps: Arc<Mutex<X509Steps>>,
}

/// The limits a [`WorkloadApi`] applies to each call, shared by its clones.
#[derive(Debug)]
struct ApiLimits {
    config: WorkloadApiConfig,
    rate: RateLimiter,
    /// Connections closed because a stream was not read, per uid.
    stalls: Mutex<OffenderLog<u32>>,
}

impl ApiLimits {
    fn new(config: WorkloadApiConfig) -> Self {
        Self {
            rate: RateLimiter::new(
                config.requests_per_second_per_uid,
                config.request_burst_per_uid,
            ),
            config,
            stalls: Mutex::new(OffenderLog::new(OFFENDER_LOG_INTERVAL)),
        }
    }

    fn check_rate(&self, uid: u32) -> Result<(), WorkloadError> {
        self.rate.check(uid, Instant::now()).map_err(|limited| {
            if let Some(refused) = limited.to_log {
                tracing::warn!(
                    uid,
                    refused,
                    per_second = limited.per_second,
                    "Workload API calls refused: over requests_per_second_per_uid"
                );
            }
            WorkloadError::RateLimited {
                uid,
                per_second: limited.per_second,
            }
        })
    }

    /// Closes the connection of a stream whose workload did not read within the timeout.
    fn stalled(&self, caller: &Caller) {
        caller.connection.close();
        let to_log = self
            .stalls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .offence(caller.peer.uid, Instant::now());
        if let Some(closed) = to_log {
            tracing::warn!(
                uid = caller.peer.uid,
                pid = ?caller.peer.pid,
                closed,
                timeout = ?self.config.stream_send_timeout,
                "closed Workload API connections whose workload did not read its stream"
            );
        }
    }
}

impl std::fmt::Debug for WorkloadApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadApi")
            .field("initial_wait", &self.initial_wait)
            .finish_non_exhaustive()
    }
}

/// Ends every open Workload API stream (with Unavailable, so clients reconnect). A graceful
/// server shutdown waits for open streams, which a workload would otherwise hold forever.
#[derive(Debug, Clone)]
pub struct StreamStopper {
    stop: Arc<watch::Sender<bool>>,
}

impl StreamStopper {
    /// Ends all open streams, and any opened from now on.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl WorkloadApi {
    /// A handler serving snapshots from `snapshots`, minting JWT-SVIDs through `jwt_minter`
    /// and identifying callers with `attestor`, on the system clock.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        jwt_minter: Arc<dyn JwtMinter>,
        attestor: Arc<dyn WorkloadAttestor>,
    ) -> Self {
        Self {
            snapshots,
            jwt_minter,
            attestor,
            clock: Arc::new(SystemTime::now),
            initial_wait: DEFAULT_INITIAL_WAIT,
            stop: Arc::new(watch::channel(false).0),
            usage: None,
            limits: Arc::new(ApiLimits::new(WorkloadApiConfig::default())),
            metrics: AgentMetrics::new(),
            x509_steps: Arc::default(),
        }
    }

    /// The same handler applying `limits` (streams and rates; the connection limits apply
    /// where it is served, see [`serve_router`]).
    pub fn with_limits(mut self, limits: WorkloadApiConfig) -> Self {
        self.limits = Arc::new(ApiLimits::new(limits));
        self
    }

    /// The limits this handler was given.
    pub fn limits(&self) -> &WorkloadApiConfig {
        &self.limits.config
    }

    /// The same handler reading time from `clock`.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The same handler waiting at most `wait` for the first sync or the first X.509-SVIDs.
    pub fn with_initial_wait(mut self, wait: Duration) -> Self {
        self.initial_wait = wait;
        self
    }

    /// The same handler recording into `usage` which entries' SVIDs it serves: every SVID
    /// of each `FetchX509SVID` response sent (initial or pushed), and the entries of each
    /// `FetchJWTSVID` answer.
    pub fn with_usage(mut self, usage: Arc<UsageTracker>) -> Self {
        self.usage = Some(usage);
        self
    }

    /// The same handler counting into `metrics` (callers without an identity, open
    /// streams).
    pub fn with_metrics(mut self, metrics: AgentMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// A handle that ends this handler's open streams.
    pub fn stream_stopper(&self) -> StreamStopper {
        StreamStopper {
            stop: Arc::clone(&self.stop),
        }
    }

    /// The service with its security-header check, for a tonic router (the agent's socket
    /// takes it with [`WorkloadRouter::add_workload_api`]).
    pub fn into_service(self) -> WorkloadApiService {
        SpiffeWorkloadApiServer::with_interceptor(
            self,
            check_security_header as fn(Request<()>) -> Result<Request<()>, Status>,
        )
    }

    /// Identifies the caller, charges the call to its uid's rate, and attests it.
    async fn attest<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(SelectorSet, Caller), WorkloadError> {
        let caller = caller(request)?;
        self.limits.check_rate(caller.peer.uid)?;
        let selectors = self
            .attestor
            .attest(&caller.peer)
            .await
            .map_err(WorkloadError::Attestation)?;
        tracing::debug!(pid = ?caller.peer.pid, uid = caller.peer.uid, ?selectors, "workload attested");
        Ok((selectors, caller))
    }

    /// `FetchX509SVID`'s messages for the caller of `request`, shared with every caller
    /// that has the same selectors (see [`X509Steps`]).
    pub(crate) async fn x509_messages<T>(
        &self,
        request: &Request<T>,
    ) -> Result<Streamed<Arc<X509Message>>, Status> {
        Ok(spawn_watch(self.x509_watch(request).await?))
    }

    /// `FetchX509SVID` for the caller of `request`, attested and ready to run on an
    /// [`Outlet`]; its messages are shared as [`WorkloadApi::x509_messages`]' are.
    async fn x509_watch<T>(&self, request: &Request<T>) -> Result<Watch<X509Stepper>, Status> {
        let (selectors, caller) = self.attest(request).await?;
        let step = X509Stepper {
            steps: Arc::clone(&self.x509_steps),
            selectors,
        };
        Ok(self.watch_on("FetchX509SVID", caller, step))
    }

    /// The latest snapshot once the agent has synced at least once.
    async fn synced_snapshot(&self) -> Result<Arc<Snapshot>, WorkloadError> {
        let mut snapshots = self.snapshots.clone();
        let synced = async move {
            snapshots
                .wait_for(|snapshot| snapshot.synced)
                .await
                .map(|snapshot| Arc::clone(&snapshot))
        };
        match tokio::time::timeout(self.initial_wait, synced).await {
            Ok(Ok(snapshot)) => Ok(snapshot),
            Ok(Err(_)) => Err(WorkloadError::ShuttingDown),
            Err(_) => Err(WorkloadError::NotReady(NOT_SYNCED)),
        }
    }

    /// Runs `step` on the current snapshot and again on every new one (and at the times it
    /// asks for), sending each message that differs from the last one sent, from a task of
    /// its own into the stream returned.
    fn watch<T, F>(&self, method: &'static str, caller: Caller, step: F) -> Streamed<T>
    where
        T: Clone + PartialEq + Send + 'static,
        F: FnMut(&Arc<Snapshot>, SystemTime) -> Step<T> + Send + 'static,
    {
        spawn_watch(self.watch_on(method, caller, step))
    }

    /// A stream of `method` for `caller` running `step`, to be run on an [`Outlet`].
    fn watch_on<F>(&self, method: &'static str, caller: Caller, step: F) -> Watch<F> {
        Watch {
            method,
            caller,
            step,
            snapshots: self.snapshots.clone(),
            stop: self.stop.subscribe(),
            clock: Arc::clone(&self.clock),
            usage: self.usage.clone(),
            give_up_at: tokio::time::Instant::now() + self.initial_wait,
            limits: Arc::clone(&self.limits),
            metrics: self.metrics.clone(),
            _open: self.metrics.stream_opened(),
        }
    }
}

/// Runs `watch` in a task of its own, into the stream returned. The first step runs here,
/// and a first message is queued before the handler returns: the response stream has it
/// when tonic first polls it, rather than after the task is scheduled (behind every other
/// caller's, in a burst).
fn spawn_watch<T, F>(mut watch: Watch<F>) -> Streamed<T>
where
    T: Clone + PartialEq + Send + 'static,
    F: Stepper<T> + 'static,
{
    let (tx, rx) = mpsc::channel(1);
    let first = watch.queue_first(&tx);
    tokio::spawn(watch.run(tx, Some(first)));
    Streamed(ReceiverStream::new(rx))
}

/// What a streaming RPC does with each snapshot.
trait Stepper<T>: Send {
    fn step(&mut self, snapshot: &Arc<Snapshot>, now: SystemTime) -> Step<T>;
}

impl<T, F> Stepper<T> for F
where
    F: FnMut(&Arc<Snapshot>, SystemTime) -> Step<T> + Send,
{
    fn step(&mut self, snapshot: &Arc<Snapshot>, now: SystemTime) -> Step<T> {
        self(snapshot, now)
    }
}

/// `FetchX509SVID`'s step: the caller's messages, shared through [`X509Steps`].
struct X509Stepper {
    steps: Arc<Mutex<X509Steps>>,
    selectors: SelectorSet,
}

impl Stepper<Arc<X509Message>> for X509Stepper {
    fn step(&mut self, snapshot: &Arc<Snapshot>, now: SystemTime) -> Step<Arc<X509Message>> {
        X509Steps::step(&self.steps, snapshot, &self.selectors, now)
    }
}

/// Where a stream's messages go: the channel a tonic response stream reads, or an HTTP/2
/// stream written directly.
trait Outlet<T>: Send {
    /// Hands `item` to the workload, waiting at most `timeout` for it to take it. An error
    /// ends the stream with that status.
    fn deliver(
        &mut self,
        item: Result<T, Status>,
        timeout: Duration,
    ) -> impl Future<Output = Delivery> + Send;

    /// Resolves once the workload is gone.
    fn closed(&mut self) -> impl Future<Output = ()> + Send;
}

impl<T: Send> Outlet<T> for mpsc::Sender<Result<Box<T>, Status>> {
    async fn deliver(&mut self, item: Result<T, Status>, timeout: Duration) -> Delivery {
        match tokio::time::timeout(timeout, self.send(item.map(Box::new))).await {
            Ok(Ok(())) => Delivery::Sent,
            Ok(Err(_)) => Delivery::Gone,
            Err(_) => Delivery::Stalled,
        }
    }

    async fn closed(&mut self) {
        mpsc::Sender::closed(self).await;
    }
}

/// A streaming RPC between snapshots: what it runs on each, and what it waits on for the
/// next.
struct Watch<F> {
    method: &'static str,
    caller: Caller,
    step: F,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stop: watch::Receiver<bool>,
    clock: Clock,
    usage: Option<Arc<UsageTracker>>,
    /// When a stream that has sent nothing yet gives up waiting for its first message.
    give_up_at: tokio::time::Instant,
    limits: Arc<ApiLimits>,
    metrics: AgentMetrics,
    _open: crate::metrics::OpenStream,
}

/// Why a [`Watch`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchEnd {
    /// It sent its final status.
    Finished,
    /// The outlet is gone, or streams are stopping.
    Gone,
    /// The workload did not take a message within the timeout; its connection is closed.
    Stalled,
    /// The workload went away while the stream waited.
    Closed,
}

impl<F> Watch<F> {
    /// Runs the first step now and queues its message on `tx` if there is room.
    fn queue_first<T>(
        &mut self,
        tx: &mpsc::Sender<Result<Box<T>, Status>>,
    ) -> (SystemTime, Taken<T>)
    where
        T: Clone,
        F: Stepper<T>,
    {
        let now = (self.clock)();
        let snapshot = Arc::clone(&self.snapshots.borrow_and_update());
        let taken = match self.step.step(&snapshot, now) {
            Step::Send {
                message,
                recheck_at,
                served,
            } => match tx.try_send(Ok(Box::new(message.clone()))) {
                Ok(()) => {
                    if let Some(usage) = &self.usage {
                        usage.record(&served, now);
                    }
                    Taken::Queued {
                        message,
                        recheck_at,
                    }
                }
                Err(_) => Taken::Step(Step::Send {
                    message,
                    recheck_at,
                    served,
                }),
            },
            other => Taken::Step(other),
        };
        (now, taken)
    }

    /// Sends the stream's messages into `outlet` until it ends: `first` is a step already
    /// taken, or the first step runs here.
    ///
    /// A message the workload does not take within `stream_send_timeout` closes the
    /// caller's connection: HTTP/2 would otherwise hold the stream, and what was queued on
    /// it, for as long as the workload stays connected.
    async fn run<T, O>(self, mut outlet: O, mut first: Option<(SystemTime, Taken<T>)>) -> WatchEnd
    where
        T: Clone + PartialEq + Send,
        O: Outlet<T>,
        F: Stepper<T>,
    {
        let Watch {
            method,
            caller,
            mut step,
            mut snapshots,
            mut stop,
            clock,
            usage,
            give_up_at,
            limits,
            metrics,
            _open,
        } = self;
        let timeout = limits.config.stream_send_timeout;
        let mut last_sent: Option<T> = None;
        loop {
            let (now, taken) = match first.take() {
                Some(first) => first,
                None => {
                    let snapshot = Arc::clone(&snapshots.borrow_and_update());
                    let now = clock();
                    (now, Taken::Step(step.step(&snapshot, now)))
                }
            };
            let (recheck_at, waiting_for) = match taken {
                Taken::Queued {
                    message,
                    recheck_at,
                } => {
                    last_sent = Some(message);
                    (recheck_at, None)
                }
                Taken::Step(Step::Send {
                    message,
                    recheck_at,
                    served,
                }) => {
                    if last_sent.as_ref() != Some(&message) {
                        let item = Ok(message.clone());
                        match deliver(&mut outlet, item, &mut stop, timeout).await {
                            Delivery::Sent => {}
                            Delivery::Gone => return WatchEnd::Gone,
                            Delivery::Stalled => {
                                limits.stalled(&caller);
                                return WatchEnd::Stalled;
                            }
                        }
                        if let Some(usage) = &usage {
                            usage.record(&served, clock());
                        }
                        last_sent = Some(message);
                    }
                    (recheck_at, None)
                }
                Taken::Step(Step::Wait { reason, recheck_at }) => (recheck_at, Some(reason)),
                Taken::Step(Step::Fail(error)) => {
                    if matches!(error, WorkloadError::NoIdentity) {
                        metrics.no_identity(method);
                    }
                    return finish(&mut outlet, error, &mut stop, timeout, &limits, &caller).await;
                }
            };
            // Only the first message has a deadline; later, waiting means the workload
            // keeps what it has until the manager publishes more.
            let give_up = match waiting_for {
                Some(reason) if last_sent.is_none() => Some(reason),
                _ => None,
            };
            let outcome = tokio::select! {
                changed = snapshots.changed() => match changed {
                    Ok(()) => None,
                    Err(_) => Some(WorkloadError::ShuttingDown),
                },
                () = sleep_until_time(recheck_at, now) => None,
                reason = give_up_after(give_up, give_up_at) => {
                    Some(WorkloadError::NotReady(reason))
                }
                () = stopped(&mut stop) => Some(WorkloadError::ShuttingDown),
                () = outlet.closed() => return WatchEnd::Closed,
            };
            if let Some(error) = outcome {
                return finish(&mut outlet, error, &mut stop, timeout, &limits, &caller).await;
            }
        }
    }
}

/// Ends a stream with `error`.
async fn finish<T, O: Outlet<T>>(
    outlet: &mut O,
    error: WorkloadError,
    stop: &mut watch::Receiver<bool>,
    timeout: Duration,
    limits: &ApiLimits,
    caller: &Caller,
) -> WatchEnd {
    match deliver(outlet, Err(error.into_status()), stop, timeout).await {
        Delivery::Sent => WatchEnd::Finished,
        Delivery::Gone => WatchEnd::Gone,
        Delivery::Stalled => {
            limits.stalled(caller);
            WatchEnd::Stalled
        }
    }
}

/// A step as a stream's task finds it.
enum Taken<T> {
    /// The handler's first step, whose message it queued already: kept to compare the next
    /// step's message with.
    Queued {
        message: T,
        recheck_at: Option<SystemTime>,
    },
    /// A step for the task to act on.
    Step(Step<T>),
}

const NOT_SYNCED: &str = "the agent has not synced with the server yet";
const SVIDS_PENDING: &str = "X509-SVIDs for this workload are not available yet";

/// What a streaming RPC does with one snapshot.
enum Step<T> {
    /// Send this (unless it equals the last message), and look again at `recheck_at`.
    Send {
        message: T,
        recheck_at: Option<SystemTime>,
        /// The entries whose SVIDs the message carries.
        served: Vec<EntryId>,
    },
    /// Send nothing yet.
    Wait {
        reason: &'static str,
        recheck_at: Option<SystemTime>,
    },
    /// End the stream with this error.
    Fail(WorkloadError),
}

async fn sleep_until_time(at: Option<SystemTime>, now: SystemTime) {
    match at {
        Some(at) => tokio::time::sleep(at.duration_since(now).unwrap_or_default()).await,
        None => std::future::pending().await,
    }
}

async fn give_up_after(reason: Option<&'static str>, at: tokio::time::Instant) -> &'static str {
    match reason {
        Some(reason) => {
            tokio::time::sleep_until(at).await;
            reason
        }
        None => std::future::pending().await,
    }
}

/// What became of a message for a stream.
enum Delivery {
    /// Handed to the stream.
    Sent,
    /// The stream is gone, or streams are stopping.
    Gone,
    /// The workload did not take it within the timeout.
    Stalled,
}

/// Sends `item` unless the streams are stopped first or the workload does not take it
/// within `timeout`: a workload that does not read must neither keep the server from
/// shutting down nor hold what was queued for it.
async fn deliver<T, O: Outlet<T>>(
    outlet: &mut O,
    item: Result<T, Status>,
    stop: &mut watch::Receiver<bool>,
    timeout: Duration,
) -> Delivery {
    tokio::select! {
        biased;
        delivery = outlet.deliver(item, timeout) => delivery,
        () = stopped(stop) => Delivery::Gone,
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A dropped sender (the handler is gone) stops streams too.
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// The key of a trust domain in the Workload API's bundle maps: its SPIFFE ID.
fn bundle_key(trust_domain: &TrustDomain) -> String {
    trust_domain.id().to_string()
}

/// The caller's full X.509 state: its SVIDs, own bundle and federated bundles.
fn x509_svid_step(
    snapshot: &Snapshot,
    selectors: &SelectorSet,
    now: SystemTime,
) -> Step<X509svidResponse> {
    if !snapshot.synced {
        return Step::Wait {
            reason: NOT_SYNCED,
            recheck_at: None,
        };
    }
    let entries = snapshot.entries_for(selectors);
    if entries.is_empty() {
        return Step::Fail(WorkloadError::NoIdentity);
    }
    let identities = snapshot.identities_for(selectors, now);
    // Wake when the first SVID expires, so an SVID the manager failed to renew is withdrawn
    // rather than left with the workload as current.
    let recheck_at = identities.iter().map(|i| i.svid.not_after()).min();
    if identities.is_empty() {
        return Step::Wait {
            reason: SVIDS_PENDING,
            recheck_at,
        };
    }
    let bundle = snapshot.bundle.x509_authorities_der_concat();
    let svids = identities
        .iter()
        .map(|identity| X509svid {
            spiffe_id: identity.svid.spiffe_id().to_string(),
            x509_svid: identity.svid.chain_concatenated_der(),
            x509_svid_key: identity.key.secret_pkcs8_der().to_vec(),
            bundle: bundle.clone(),
            hint: identity.entry.hint.clone(),
        })
        .collect();
    let federated_bundles = snapshot
        .federated_for(entries.iter().map(AsRef::as_ref))
        .into_iter()
        .filter(|(td, _)| *td != snapshot.trust_domain)
        .map(|(td, b)| (bundle_key(&td), b.x509_authorities_der_concat()))
        .collect();
    Step::Send {
        message: X509svidResponse {
            svids,
            crl: snapshot.crls.as_ref().clone(),
            federated_bundles,
        },
        recheck_at,
        served: identities.iter().map(|i| i.entry.id.clone()).collect(),
    }
}

/// Own and federated bundles of a caller with entries, encoded by `encode`.
fn bundles_step(
    snapshot: &Snapshot,
    selectors: &SelectorSet,
    encode: impl Fn(&TrustBundle) -> Vec<u8>,
) -> Step<BTreeMap<String, Vec<u8>>> {
    if !snapshot.synced {
        return Step::Wait {
            reason: NOT_SYNCED,
            recheck_at: None,
        };
    }
    let entries = snapshot.entries_for(selectors);
    if entries.is_empty() {
        return Step::Fail(WorkloadError::NoIdentity);
    }
    let mut bundles: BTreeMap<String, Vec<u8>> = snapshot
        .federated_for(entries.iter().map(AsRef::as_ref))
        .iter()
        .map(|(td, bundle)| (bundle_key(td), encode(bundle)))
        .collect();
    bundles.insert(bundle_key(&snapshot.trust_domain), encode(&snapshot.bundle));
    Step::Send {
        message: bundles,
        recheck_at: None,
        served: Vec::new(),
    }
}

fn map_step<T, U>(step: Step<T>, f: impl FnOnce(T) -> U) -> Step<U> {
    match step {
        Step::Send {
            message,
            recheck_at,
            served,
        } => Step::Send {
            message: f(message),
            recheck_at,
            served,
        },
        Step::Wait { reason, recheck_at } => Step::Wait { reason, recheck_at },
        Step::Fail(error) => Step::Fail(error),
    }
}

/// The tonic interceptor enforcing the Workload API's security header: exactly one
/// `workload.spiffe.io` entry, equal to `true`.
pub fn check_security_header(request: Request<()>) -> Result<Request<()>, Status> {
    let values = request.metadata().get_all(SECURITY_HEADER).iter();
    if one_true(values.map(|value| value.as_bytes())) {
        Ok(request)
    } else {
        Err(WorkloadError::MissingSecurityHeader.into_status())
    }
}

/// Whether `values` is exactly one value, `true`.
fn one_true<V: AsRef<[u8]>>(mut values: impl Iterator<Item = V>) -> bool {
    match (values.next(), values.next()) {
        (Some(value), None) => value.as_ref() == b"true",
        _ => false,
    }
}

/// Who is calling, from the kernel, and the connection the call came on.
#[derive(Debug, Clone)]
struct Caller {
    peer: PeerCredentials,
    connection: ConnectionHandle,
}

fn caller<T>(request: &Request<T>) -> Result<Caller, WorkloadError> {
    let info = request
        .extensions()
        .get::<WorkloadConnectInfo>()
        .ok_or_else(|| {
            WorkloadError::CallerUnknown(
                "the connection has no peer credentials; the Workload API must be served \
                 through lanyard_agent::workload::serve"
                    .to_owned(),
            )
        })?;
    let peer = info
        .peer()
        .cloned()
        .map_err(|reason| WorkloadError::CallerUnknown(reason.to_owned()))?;
    Ok(Caller {
        peer,
        connection: info.connection.clone(),
    })
}

/// A streaming RPC's messages as its task queues them. They travel boxed: a channel
/// allocates room for 32 items at once, whatever its capacity, and a boxed message takes 16
/// bytes of that room instead of a whole message's.
#[derive(Debug)]
pub struct Streamed<T>(ReceiverStream<Result<Box<T>, Status>>);

impl<T> tokio_stream::Stream for Streamed<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.0)
            .poll_next(cx)
            .map(|item| item.map(|item| item.map(|message| *message)))
    }
}

/// A `FetchX509SVID` response as built once for all callers with the same selectors on the
/// same snapshot, with its gRPC framing made once, when a stream first sends it.
#[derive(Debug)]
pub(crate) struct X509Message {
    response: X509svidResponse,
    framed: std::sync::OnceLock<prost::bytes::Bytes>,
}

impl X509Message {
    fn new(response: X509svidResponse) -> Self {
        Self {
            response,
            framed: std::sync::OnceLock::new(),
        }
    }

    /// The response as one length-prefixed gRPC message.
    pub(crate) fn framed(&self) -> Result<prost::bytes::Bytes, Status> {
        if let Some(framed) = self.framed.get() {
            return Ok(framed.clone());
        }
        let framed = http2::framed(&self.response)?;
        Ok(self.framed.get_or_init(|| framed).clone())
    }
}

impl PartialEq for X509Message {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other) || self.response == other.response
    }
}

/// `FetchX509SVID`'s responses as tonic sends them.
#[derive(Debug)]
pub struct X509Stream(Streamed<Arc<X509Message>>);

impl tokio_stream::Stream for X509Stream {
    type Item = Result<X509svidResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.0)
            .poll_next(cx)
            .map(|item| item.map(|item| item.map(|message| message.response.clone())))
    }
}

/// The most selector sets whose `FetchX509SVID` step is kept for one snapshot.
const MAX_CACHED_X509_STEPS: usize = 1024;

/// `FetchX509SVID` steps of the current snapshot by caller selectors, so that callers with
/// the same selectors (a thousand replicas starting at once, or all of them when an SVID
/// rotates) share one built message and its framing. A step is the same for every time from
/// when it was built until its `recheck_at` (the first of its SVIDs to expire), and is built
/// again after that, for an earlier time (a clock set back) or for another snapshot. Only the
/// streams that were sent a message keep it: once they are gone, so is the message.
#[derive(Debug, Default)]
struct X509Steps {
    /// The snapshot the steps are of; a `Weak` keeps its allocation, so no other snapshot can
    /// take its address while the steps are kept, without keeping its contents.
    snapshot: std::sync::Weak<Snapshot>,
    steps: HashMap<SelectorSet, CachedX509Step>,
}

#[derive(Debug)]
struct CachedX509Step {
    message: std::sync::Weak<X509Message>,
    built_at: SystemTime,
    recheck_at: Option<SystemTime>,
    served: Vec<EntryId>,
}

impl X509Steps {
    fn step(
        shared: &Mutex<Self>,
        snapshot: &Arc<Snapshot>,
        selectors: &SelectorSet,
        now: SystemTime,
    ) -> Step<Arc<X509Message>> {
        let mut this = shared.lock().unwrap_or_else(PoisonError::into_inner);
        if std::ptr::eq(this.snapshot.as_ptr(), Arc::as_ptr(snapshot)) {
            if let Some(cached) = this.steps.get(selectors)
                && cached.built_at <= now
                && cached.recheck_at.is_none_or(|at| now < at)
                && let Some(message) = cached.message.upgrade()
            {
                return Step::Send {
                    message,
                    recheck_at: cached.recheck_at,
                    served: cached.served.clone(),
                };
            }
        } else {
            this.snapshot = Arc::downgrade(snapshot);
            this.steps.clear();
        }
        let step = map_step(x509_svid_step(snapshot, selectors, now), |response| {
            Arc::new(X509Message::new(response))
        });
        if let Step::Send {
            message,
            recheck_at,
            served,
        } = &step
        {
            if this.steps.len() >= MAX_CACHED_X509_STEPS {
                this.steps.clear();
            }
            this.steps.insert(
                selectors.clone(),
                CachedX509Step {
                    message: Arc::downgrade(message),
                    built_at: now,
                    recheck_at: *recheck_at,
                    served: served.clone(),
                },
            );
        }
        step
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = X509Stream;
    type FetchX509BundlesStream = Streamed<X509BundlesResponse>;
    type FetchJWTBundlesStream = Streamed<JwtBundlesResponse>;
    type FetchWITSVIDStream = tokio_stream::Empty<Result<WitsvidResponse, Status>>;
    type FetchWITBundlesStream = tokio_stream::Empty<Result<WitBundlesResponse, Status>>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let messages = self.x509_messages(&request).await?;
        Ok(Response::new(X509Stream(messages)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let (selectors, caller) = self.attest(&request).await?;
        Ok(Response::new(self.watch(
            "FetchX509Bundles",
            caller,
            move |snapshot, _| {
                let crls = Arc::clone(&snapshot.crls);
                map_step(
                    bundles_step(
                        snapshot,
                        &selectors,
                        TrustBundle::x509_authorities_der_concat,
                    ),
                    |bundles| X509BundlesResponse {
                        crl: crls.as_ref().clone(),
                        bundles,
                    },
                )
            },
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let body = request.get_ref();
        if body.audience.is_empty() || body.audience.iter().any(String::is_empty) {
            return Err(WorkloadError::NoAudience.into());
        }
        let requested: Option<SpiffeId> = match body.spiffe_id.as_str() {
            "" => None,
            id => Some(id.parse().map_err(WorkloadError::InvalidSpiffeId)?),
        };
        let (selectors, _) = self.attest(&request).await?;
        let snapshot = self.synced_snapshot().await?;

        let mut seen = BTreeSet::new();
        let entries: Vec<Arc<CachedEntry>> = snapshot
            .entries_for(&selectors)
            .into_iter()
            .filter(|entry| requested.as_ref().is_none_or(|id| entry.spiffe_id == *id))
            // Two entries with one SPIFFE ID would only yield two tokens for the same subject.
            .filter(|entry| seen.insert(entry.spiffe_id.clone()))
            .collect();
        if entries.is_empty() {
            self.metrics.no_identity("FetchJWTSVID");
            return Err(WorkloadError::NoIdentity.into());
        }
        let audiences = &request.get_ref().audience;
        let mut svids = Vec::with_capacity(entries.len());
        for entry in &entries {
            let svid = self
                .jwt_minter
                .jwt_svid(entry, audiences)
                .await
                .map_err(|error| {
                    if matches!(error, JwtMintError::NotAuthorized(_)) {
                        self.metrics.no_identity("FetchJWTSVID");
                    }
                    WorkloadError::JwtMint(error)
                })?;
            svids.push(Jwtsvid {
                spiffe_id: entry.spiffe_id.to_string(),
                svid: svid.token,
                hint: entry.hint.clone(),
            });
        }
        if let Some(usage) = &self.usage {
            usage.record(entries.iter().map(|entry| &entry.id), (self.clock)());
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let (selectors, caller) = self.attest(&request).await?;
        Ok(Response::new(self.watch(
            "FetchJWTBundles",
            caller,
            move |snapshot, _| {
                map_step(
                    bundles_step(snapshot, &selectors, |bundle| {
                        bundle.jwt_only_jwks_json().into_bytes()
                    }),
                    |bundles| JwtBundlesResponse { bundles },
                )
            },
        )))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let body = request.get_ref();
        if body.audience.is_empty() {
            return Err(WorkloadError::NoAudience.into());
        }
        if body.svid.is_empty() {
            return Err(WorkloadError::NoSvid.into());
        }
        // Like SPIRE, validation needs no identity of the caller's own, but it is attested:
        // the federated bundles it may use are those of its entries.
        let (selectors, _) = self.attest(&request).await?;
        let snapshot = self.synced_snapshot().await?;
        let entries = snapshot.entries_for(&selectors);
        let federated = snapshot.federated_for(entries.iter().map(AsRef::as_ref));
        let bundle_for = |trust_domain: &TrustDomain| {
            if *trust_domain == snapshot.trust_domain {
                Some(snapshot.bundle.as_ref())
            } else {
                federated.get(trust_domain).map(AsRef::as_ref)
            }
        };
        let validated = validate_jwt_svid(&body.svid, &body.audience, bundle_for, (self.clock)())
            .map_err(WorkloadError::InvalidToken)?;
        if let Some(Value::String(jti)) = validated.claims.get("jti")
            && snapshot.jti_revoked(jti, (self.clock)())
        {
            return Err(WorkloadError::RevokedToken(jti.clone()).into());
        }

        let mut claims = validated.claims;
        if !validated.spiffe_id.is_member_of(&snapshot.trust_domain) {
            claims.retain(|name, _| FOREIGN_CLAIMS_KEPT.contains(&name.as_str()));
        }
        // `aud` may be a single string in the token; it is always returned as a list.
        claims.insert(
            "aud".to_owned(),
            Value::Array(validated.audiences.into_iter().map(Value::String).collect()),
        );
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: validated.spiffe_id.to_string(),
            claims: Some(json_object_to_struct(claims)),
        }))
    }

    async fn fetch_witsvid(
        &self,
        _request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(WorkloadError::Unimplemented("FetchWITSVID").into())
    }

    async fn fetch_wit_bundles(
        &self,
        _request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(WorkloadError::Unimplemented("FetchWITBundles").into())
    }
}

/// A JSON object as a `google.protobuf.Struct` (numbers become doubles, as in protobuf's
/// JSON mapping).
pub fn json_object_to_struct(object: Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: object
            .into_iter()
            .map(|(name, value)| (name, json_to_value(value)))
            .collect(),
    }
}

fn json_to_value(value: Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(prost_types::NullValue::NullValue.into()),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(values) => Kind::ListValue(prost_types::ListValue {
            values: values.into_iter().map(json_to_value).collect(),
        }),
        Value::Object(object) => Kind::StructValue(json_object_to_struct(object)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Connection info of a Workload API connection, in every request's extensions: the peer's
/// kernel credentials with its process pinned when the connection was accepted (a pidfd, or
/// its start time), and a handle that closes the connection.
#[derive(Debug, Clone)]
pub struct WorkloadConnectInfo {
    peer: Result<PeerCredentials, Arc<str>>,
    connection: ConnectionHandle,
}

impl WorkloadConnectInfo {
    /// The caller's credentials, or why they could not be read.
    pub fn peer(&self) -> Result<&PeerCredentials, &str> {
        self.peer.as_ref().map_err(AsRef::as_ref)
    }
}

/// Closes one connection from the agent's side.
#[derive(Debug, Clone)]
struct ConnectionHandle {
    close: Arc<watch::Sender<bool>>,
}

impl ConnectionHandle {
    fn close(&self) {
        self.close.send_replace(true);
    }
}

/// Completes when the connection is to be closed: by its handle, or by the server after the
/// shutdown grace.
type CloseSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An accepted Workload API connection that remembers who connected, holds its caller's
/// place under `max_connections_per_uid` until it is dropped, and fails its reads and writes
/// once it is to be closed (so that HTTP/2 drops it, and every stream on it, at once).
struct WorkloadConnection {
    stream: UnixStream,
    info: WorkloadConnectInfo,
    _slot: ConnectionSlot,
    close_signal: CloseSignal,
    closed: bool,
}

impl std::fmt::Debug for WorkloadConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadConnection")
            .field("info", &self.info)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl WorkloadConnection {
    /// Admits `stream` under its caller's connection limit, or closes it (by dropping it).
    fn admit(
        stream: UnixStream,
        limiter: &Arc<ConnectionLimiter>,
        server_closing: &watch::Receiver<bool>,
    ) -> Option<Self> {
        let cred = match stream.peer_cred() {
            Ok(cred) => cred,
            Err(error) => {
                tracing::debug!(%error, "closed a workload connection without credentials");
                return None;
            }
        };
        let slot = match limiter.admit(cred.uid(), Instant::now()) {
            Ok(slot) => slot,
            Err(refused) => {
                if let Some(count) = refused.to_log {
                    tracing::warn!(
                        uid = refused.uid,
                        pid = ?cred.pid(),
                        limit = refused.limit,
                        refused = count,
                        "Workload API connections refused: uid at max_connections_per_uid"
                    );
                }
                return None;
            }
        };
        let peer = PeerCredentials::from_ucred(&cred)
            .pinned()
            .map_err(|e| format!("could not identify the calling process: {e}"));
        if let Err(error) = &peer {
            tracing::debug!(%error, "workload connection without usable credentials");
        }
        let (close, mut closing) = watch::channel(false);
        let mut server_closing = server_closing.clone();
        let close_signal = Box::pin(async move {
            tokio::select! {
                _ = closing.wait_for(|close| *close) => {}
                _ = server_closing.wait_for(|close| *close) => {}
            }
        });
        Some(Self {
            stream,
            info: WorkloadConnectInfo {
                peer: peer.map_err(Arc::from),
                connection: ConnectionHandle {
                    close: Arc::new(close),
                },
            },
            _slot: slot,
            close_signal,
            closed: false,
        })
    }

    /// Whether the connection is to be closed; otherwise wakes `cx` when it is.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.closed && self.close_signal.as_mut().poll(cx).is_ready() {
            self.closed = true;
        }
        self.closed
    }
}

fn closed_by_agent() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed by the agent",
    )
}

impl AsyncRead for WorkloadConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_closed(cx) {
            return Poll::Ready(Err(closed_by_agent()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WorkloadConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.poll_closed(cx) {
            return Poll::Ready(Err(closed_by_agent()));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.poll_closed(cx) {
            return Poll::Ready(Err(closed_by_agent()));
        }
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Why the Workload API could not be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The socket or its directory could not be prepared.
    #[error("preparing socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
}

/// Binds the public Workload API socket: creates missing parent directories with mode 0755,
/// replaces a stale socket (but nothing else), and makes the socket connectable by every
/// UID (0777).
pub fn bind_socket(path: &Path) -> Result<UnixListener, ServeError> {
    let socket_error = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        create_public_dirs(dir).map_err(socket_error)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(socket_error)?;
        }
        Ok(_) => return Err(ServeError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(socket_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(socket_error)?;
    Ok(listener)
}

/// Creates `dir` and its missing ancestors with mode 0755 (regardless of the umask). Existing
/// directories are left as they are: the socket may live in a shared directory like `/tmp`.
fn create_public_dirs(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut current = Some(dir);
    while let Some(candidate) = current {
        if candidate.as_os_str().is_empty() || candidate.exists() {
            break;
        }
        missing.push(candidate);
        current = candidate.parent();
    }
    for dir in missing.into_iter().rev() {
        match std::fs::create_dir(dir) {
            Ok(()) => {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(SOCKET_DIR_MODE))?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// An empty router for the Workload API socket with the per-connection limits of `limits`:
/// add the Workload API (and any other service for the same socket) to it and pass it to
/// [`serve_router`]. With `rpc_metrics`, every call is counted and timed.
pub fn server_builder(
    limits: &WorkloadApiConfig,
    rpc_metrics: Option<&Arc<RpcMetrics>>,
) -> WorkloadRouter {
    WorkloadRouter {
        routes: RoutesBuilder::default(),
        api: None,
        metrics: rpc_metrics.map_or_else(RpcMetricsLayer::off, |rpc| rpc.layer(None)),
        max_streams: limits.max_streams_per_connection,
    }
}

/// Serves `router` on `listener` until `shutdown` completes, recording each connection's
/// caller ([`WorkloadConnectInfo`]) as it is accepted and refusing connections beyond
/// `limits.max_connections_per_uid`. Call [`StreamStopper::stop`] before or as `shutdown`
/// completes: connections then take no new calls and end with their open ones, and those
/// still open 5 seconds later are closed.
pub async fn serve_router<F>(
    listener: UnixListener,
    router: WorkloadRouter,
    limits: &WorkloadApiConfig,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()>,
{
    let server = Arc::new(http2::Http2Server::new(
        router.routes.routes().prepare(),
        router.api,
        router.metrics,
        router.max_streams,
    ));
    let limiter = ConnectionLimiter::new(limits.max_connections_per_uid);
    let (close_all, server_closing) = watch::channel(false);
    let (drain, draining) = watch::channel(false);
    let (connections, mut incoming) = mpsc::channel(1);
    tokio::spawn(accept(listener, limiter, server_closing, connections));
    let mut open = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = incoming.recv() => match accepted {
                Some(connection) => {
                    open.spawn(Arc::clone(&server).serve_connection(connection, draining.clone()));
                }
                None => break,
            },
            Some(_) = open.join_next() => {}
            () = &mut shutdown => break,
        }
    }
    // No new connections (the accepting task ends with the receiver), no new calls on open
    // ones; those still open after the grace are closed.
    drop(incoming);
    drain.send_replace(true);
    let drained = async { while open.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drained).await.is_err() {
        tracing::debug!("closing the Workload API connections still open");
        close_all.send_replace(true);
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while open.join_next().await.is_some() {}
        })
        .await;
        open.abort_all();
    }
    Ok(())
}

/// Accepts connections into `connections` until its receiver is gone, closing those over
/// their caller's limit, and pausing (5 ms doubling to 1 s) after each failed accept: with
/// no descriptor left, the pending connection stays queued and retrying at once would spin.
async fn accept(
    listener: UnixListener,
    limiter: Arc<ConnectionLimiter>,
    server_closing: watch::Receiver<bool>,
    connections: mpsc::Sender<WorkloadConnection>,
) {
    let mut backoff = None;
    let mut errors = OffenderLog::new(OFFENDER_LOG_INTERVAL);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = connections.closed() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = None;
                if let Some(connection) =
                    WorkloadConnection::admit(stream, &limiter, &server_closing)
                    && connections.send(connection).await.is_err()
                {
                    return;
                }
            }
            Err(error) => {
                let pause = next_accept_backoff(backoff);
                backoff = Some(pause);
                if let Some(failures) = errors.offence((), Instant::now()) {
                    tracing::warn!(%error, failures, retry_in = ?pause, "accepting Workload API connections failed");
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = connections.closed() => return,
                }
            }
        }
    }
}

/// The pause after a failed accept that follows one of `previous`.
fn next_accept_backoff(previous: Option<Duration>) -> Duration {
    previous.map_or(MIN_ACCEPT_BACKOFF, |pause| {
        pause.saturating_mul(2).min(MAX_ACCEPT_BACKOFF)
    })
}

/// Serves the Workload API alone on `socket_path` (see [`bind_socket`]) until `shutdown`
/// completes, then ends open streams and returns.
pub async fn serve<F>(socket_path: &Path, api: WorkloadApi, shutdown: F) -> Result<(), ServeError>
where
    F: Future<Output = ()>,
{
    let listener = bind_socket(socket_path)?;
    let stopper = api.stream_stopper();
    let limits = api.limits().clone();
    let router = server_builder(&limits, None).add_workload_api(api);
    tracing::info!(socket = %socket_path.display(), "serving the Workload API");
    serve_router(listener, router, &limits, async move {
        shutdown.await;
        stopper.stop();
    })
    .await
}

#[cfg(test)]
mod tests {
    use lanyard_core::x509::{CaSubject, SvidParams, X509Ca};
    use lanyard_core::{EntryId, KeyPair, KeyType, X509Authority};

    use super::*;
    use crate::cache::Identity;

    struct Fixture {
        ca: X509Ca,
        snapshot: Snapshot,
        entry: Arc<CachedEntry>,
        selectors: SelectorSet,
    }

    fn fixture() -> Fixture {
        let td = TrustDomain::new("example.org").unwrap();
        let ca = X509Ca::self_signed(
            &td,
            KeyPair::generate(KeyType::EcP256).unwrap(),
            &CaSubject::default(),
            SystemTime::now() - Duration::from_secs(3600),
            Duration::from_secs(24 * 3600),
        )
        .unwrap();
        let mut bundle = TrustBundle::new(td.clone());
        bundle.add_x509_authority(X509Authority::new(ca.cert_der().to_vec()).unwrap());
        let foreign = TrustDomain::new("foreign.example").unwrap();
        let mut snapshot = Snapshot::new(td, Arc::new(bundle));
        snapshot
            .federated_bundles
            .insert(foreign.clone(), Arc::new(TrustBundle::new(foreign.clone())));
        let selectors: SelectorSet = ["unix:uid:1000".parse().unwrap()].into_iter().collect();
        let entry = Arc::new(CachedEntry {
            id: EntryId::new("web").unwrap(),
            spiffe_id: "spiffe://example.org/web".parse().unwrap(),
            selectors: selectors.clone(),
            federates_with: BTreeSet::from([foreign]),
            revision_number: 1,
            hint: "internal".to_owned(),
            created_at: SystemTime::UNIX_EPOCH,
            admin: false,
            downstream: false,
            store_svid: false,
        });
        Fixture {
            ca,
            snapshot,
            entry,
            selectors,
        }
    }

    fn identity(fixture: &Fixture, issued: SystemTime) -> Identity {
        let key = KeyPair::generate(KeyType::EcP256).unwrap();
        let params = SvidParams::new(
            fixture.entry.spiffe_id.clone(),
            key.public_key_der(),
            Duration::from_secs(600),
        );
        Identity {
            entry: Arc::clone(&fixture.entry),
            svid: Arc::new(fixture.ca.mint_svid(&params, issued).unwrap()),
            key: Arc::new(key),
        }
    }

    #[test]
    fn x509_steps_wait_fail_and_send_as_the_snapshot_allows() {
        let mut f = fixture();
        let now = SystemTime::now();
        let step = |f: &Fixture| x509_svid_step(&f.snapshot, &f.selectors, now);

        assert!(matches!(
            step(&f),
            Step::Wait {
                reason: NOT_SYNCED,
                ..
            }
        ));
        f.snapshot.synced = true;
        assert!(matches!(step(&f), Step::Fail(WorkloadError::NoIdentity)));
        f.snapshot.entries.push(Arc::clone(&f.entry));
        assert!(matches!(
            step(&f),
            Step::Wait {
                reason: SVIDS_PENDING,
                ..
            }
        ));

        // Expired: withheld, as if never minted.
        let expired = identity(&f, now - Duration::from_secs(1200));
        f.snapshot.identities.insert(f.entry.id.clone(), expired);
        assert!(matches!(
            step(&f),
            Step::Wait {
                reason: SVIDS_PENDING,
                ..
            }
        ));

        let fresh = identity(&f, now);
        let not_after = fresh.svid.not_after();
        f.snapshot.identities.insert(f.entry.id.clone(), fresh);
        let Step::Send {
            message,
            recheck_at,
            served,
        } = step(&f)
        else {
            panic!("nothing to send")
        };
        assert_eq!(recheck_at, Some(not_after));
        assert_eq!(served, [f.entry.id.clone()]);
        assert_eq!(message.svids.len(), 1);
        let svid = &message.svids[0];
        assert_eq!(svid.spiffe_id, "spiffe://example.org/web");
        assert_eq!(svid.hint, "internal");
        assert_eq!(svid.bundle, f.ca.cert_der());
        let federated: Vec<&String> = message.federated_bundles.keys().collect();
        assert_eq!(federated, ["spiffe://foreign.example"]);

        let Step::Send { message, .. } = bundles_step(&f.snapshot, &f.selectors, |b| {
            b.jwt_only_jwks_json().into_bytes()
        }) else {
            panic!("no bundles")
        };
        let keys: Vec<&String> = message.keys().collect();
        assert_eq!(keys, ["spiffe://example.org", "spiffe://foreign.example"]);
    }

    #[test]
    fn callers_with_the_same_selectors_share_one_x509_message_while_it_holds() {
        let mut f = fixture();
        f.snapshot.synced = true;
        f.snapshot.entries.push(Arc::clone(&f.entry));
        let now = SystemTime::now();
        let fresh = identity(&f, now);
        let not_after = fresh.svid.not_after();
        f.snapshot.identities.insert(f.entry.id.clone(), fresh);
        let snapshot = Arc::new(f.snapshot.clone());
        let steps = Mutex::new(X509Steps::default());
        let message = |snapshot: &Arc<Snapshot>, selectors: &SelectorSet, at| {
            let Step::Send {
                message,
                recheck_at,
                served,
            } = X509Steps::step(&steps, snapshot, selectors, at)
            else {
                panic!("nothing to send")
            };
            assert_eq!(recheck_at, Some(not_after));
            assert_eq!(served, [f.entry.id.clone()]);
            message
        };

        let first = message(&snapshot, &f.selectors, now);
        let Step::Send { message: built, .. } = x509_svid_step(&snapshot, &f.selectors, now) else {
            panic!("nothing to send")
        };
        assert_eq!(first.response, built);
        // Another caller with the same selectors, later: the same message, framed once.
        let later = now + Duration::from_secs(10);
        assert!(Arc::ptr_eq(
            &first,
            &message(&snapshot, &f.selectors, later)
        ));
        let framed = first.framed().unwrap();
        assert_eq!(framed.as_ptr(), first.framed().unwrap().as_ptr());
        assert_eq!(framed.len(), 5 + prost::Message::encoded_len(&built));

        // Other selectors: a message of their own, equal here.
        let mut more = f.selectors.clone();
        more.insert("unix:gid:1000".parse().unwrap());
        let other = message(&snapshot, &more, later);
        assert!(!Arc::ptr_eq(&first, &other));
        assert!(*first == *other);
        // A clock set back, or another snapshot (even an equal one): built again.
        let earlier = message(&snapshot, &f.selectors, now - Duration::from_secs(1));
        assert!(!Arc::ptr_eq(&first, &earlier));
        let next = Arc::new(f.snapshot.clone());
        let rebuilt = message(&next, &f.selectors, later);
        assert!(!Arc::ptr_eq(&earlier, &rebuilt));
        assert!(Arc::ptr_eq(&rebuilt, &message(&next, &f.selectors, later)));
        // Kept by the streams that hold it, not by the steps.
        let kept = Arc::downgrade(&rebuilt);
        drop((first, other, earlier, rebuilt));
        assert!(kept.upgrade().is_none());
        let _ = message(&next, &f.selectors, later);
        // From the first SVID's expiry nothing built before it is served.
        assert!(matches!(
            X509Steps::step(&steps, &next, &f.selectors, not_after),
            Step::Wait {
                reason: SVIDS_PENDING,
                ..
            }
        ));
    }

    #[test]
    fn security_header_needs_exactly_one_true() {
        let request = |values: &[&str]| {
            let mut request = Request::new(());
            for value in values {
                request
                    .metadata_mut()
                    .append(SECURITY_HEADER, value.parse().unwrap());
            }
            request
        };
        assert!(check_security_header(request(&["true"])).is_ok());
        for values in [&[][..], &["false"], &["TRUE"], &["true", "true"], &["1"]] {
            let status = check_security_header(request(values)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{values:?}");
            assert_eq!(status.message(), "security header missing from request");
        }
    }

    #[test]
    fn claims_become_a_protobuf_struct() {
        let claims = serde_json::json!({
            "sub": "spiffe://example.org/a",
            "aud": ["x", "y"],
            "exp": 1_700_000_000u64,
            "nested": {"ok": true, "none": null},
        });
        let Value::Object(claims) = claims else {
            panic!("not an object")
        };
        let converted = json_object_to_struct(claims);
        use prost_types::value::Kind;
        assert_eq!(
            converted.fields["exp"].kind,
            Some(Kind::NumberValue(1_700_000_000.0))
        );
        let Some(Kind::ListValue(aud)) = &converted.fields["aud"].kind else {
            panic!("aud is not a list")
        };
        assert_eq!(aud.values.len(), 2);
        let Some(Kind::StructValue(nested)) = &converted.fields["nested"].kind else {
            panic!("nested is not a struct")
        };
        assert_eq!(nested.fields["ok"].kind, Some(Kind::BoolValue(true)));
        assert_eq!(nested.fields["none"].kind, Some(Kind::NullValue(0)));
    }

    #[test]
    fn failed_accepts_back_off_up_to_a_second() {
        let pauses: Vec<Duration> = std::iter::successors(Some(next_accept_backoff(None)), |p| {
            Some(next_accept_backoff(Some(*p)))
        })
        .take(12)
        .collect();
        assert_eq!(pauses[0], Duration::from_millis(5));
        assert_eq!(pauses[1], Duration::from_millis(10));
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(pauses[11], MAX_ACCEPT_BACKOFF);
    }

    #[test]
    fn errors_map_to_spire_statuses() {
        let cases = [
            (
                WorkloadError::NoIdentity,
                tonic::Code::PermissionDenied,
                "no identity issued",
            ),
            (
                WorkloadError::NoAudience,
                tonic::Code::InvalidArgument,
                "audience must be specified",
            ),
            (
                WorkloadError::NoSvid,
                tonic::Code::InvalidArgument,
                "svid must be specified",
            ),
            (
                WorkloadError::Attestation(AttestError::ProcessGone { pid: 1 }),
                tonic::Code::Unauthenticated,
                "could not verify existence of the original caller: process 1 has exited",
            ),
            (
                WorkloadError::Unimplemented("FetchWITSVID"),
                tonic::Code::Unimplemented,
                "FetchWITSVID is not supported by this agent",
            ),
            (
                WorkloadError::RateLimited {
                    uid: 1000,
                    per_second: 5,
                },
                tonic::Code::ResourceExhausted,
                "rate limit exceeded: uid 1000 may make 5 Workload API calls per second",
            ),
        ];
        for (error, code, message) in cases {
            let status = error.into_status();
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }
}
