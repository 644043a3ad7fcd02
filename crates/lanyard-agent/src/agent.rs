//! Running the whole agent: the manager (attestation, sync, minting, rotation) plus the
//! Workload API on its socket, until shutdown or a fatal manager error (e.g. banned). The
//! socket is removed when the agent stops.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use lanyard_core::SpiffeId;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::attestor::CombinedAttestor;
use crate::attestor::k8s::K8sSetupError;
use crate::config::AgentConfig;
use crate::manager::{Manager, ManagerError, ManagerHandle, system_clock};
use crate::workload::sds::SecretDiscovery;
use crate::workload::{ServeError, StreamStopper, WorkloadApi, bind_socket, server_builder};

/// Why the agent could not start, or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The manager could not start or stopped on its own.
    #[error(transparent)]
    Manager(Arc<ManagerError>),
    /// The Workload API socket could not be served.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// A workload attestor could not be set up.
    #[error(transparent)]
    WorkloadAttestor(#[from] K8sSetupError),
    /// The health checks' address could not be bound.
    #[error("binding health_address {address}: {error}")]
    Health {
        /// The configured address.
        address: std::net::SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// The metrics' address could not be bound.
    #[error("binding metrics_address {address}: {error}")]
    Metrics {
        /// The configured address.
        address: std::net::SocketAddr,
        /// Why.
        error: std::io::Error,
    },
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    manager: ManagerHandle,
    health_addr: Option<std::net::SocketAddr>,
    metrics_addr: Option<std::net::SocketAddr>,
    socket_path: PathBuf,
    stop: watch::Sender<bool>,
    stopper: StreamStopper,
    server: JoinHandle<Result<(), ServeError>>,
}

impl Agent {
    /// Attests (or restores) the agent and starts serving the Workload API. Raises the
    /// process's soft limit on open files to its hard limit first, as Go programs (SPIRE's
    /// agent among them) do: every workload connection is a descriptor.
    pub async fn start(config: AgentConfig) -> Result<Self, AgentError> {
        match crate::limits::raise_open_files_limit() {
            Ok(limit) if limit.before != limit.after => tracing::info!(
                before = ?limit.before,
                after = ?limit.after,
                "raised the open files limit (RLIMIT_NOFILE) to its hard limit"
            ),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "could not raise the open files limit"),
        }
        // Before attesting the node: a workload attestor that cannot work stops the agent.
        let attestor = Arc::new(CombinedAttestor::new(&config.workload_attestor)?);
        let manager = Manager::start(config.clone(), system_clock())
            .await
            .map_err(|e| AgentError::Manager(Arc::new(e)))?;
        let api = WorkloadApi::new(manager.snapshots(), manager.jwt_minter(), attestor)
            .with_usage(manager.usage())
            .with_limits(config.workload_api.clone())
            .with_metrics(manager.metrics());
        let stopper = api.stream_stopper();
        let (stop, mut stopped) = watch::channel(false);
        let (metrics_addr, rpc_metrics) = match config.metrics_address {
            Some(address) => {
                let bind_error = |error| AgentError::Metrics { address, error };
                let listener = tokio::net::TcpListener::bind(address)
                    .await
                    .map_err(bind_error)?;
                let bound = listener.local_addr().map_err(bind_error)?;
                let (registry, rpc) =
                    crate::metrics::registry(&manager.metrics(), manager.scrape_sources());
                tokio::spawn(crate::http::serve(
                    listener,
                    Arc::new(crate::metrics::MetricsPage::new(registry)),
                    stop.subscribe(),
                ));
                tracing::info!(address = %bound, "metrics serving (/metrics)");
                (Some(bound), Some(rpc))
            }
            None => (None, None),
        };
        let listener = bind_socket(&config.socket_path)?;
        // grpc.health.v1 shares the socket (it needs no security header), for probes and
        // `lanyard agent healthcheck`.
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let limits = config.workload_api.clone();
        // Envoy's SDS shares the socket too, as on SPIRE's agent.
        let sds = config
            .sds
            .enabled
            .then(|| SecretDiscovery::new(api.clone(), config.sds.clone()).into_service());
        let router = server_builder(&limits, rpc_metrics.as_ref())
            .add_workload_api(api)
            .add_optional_service(sds)
            .add_service(health_service);
        let server = tokio::spawn(async move {
            crate::workload::serve_router(listener, router, &limits, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
        });
        let health_addr = match config.health_address {
            Some(address) => {
                let listener = tokio::net::TcpListener::bind(address)
                    .await
                    .map_err(|error| AgentError::Health { address, error })?;
                let bound = listener
                    .local_addr()
                    .map_err(|error| AgentError::Health { address, error })?;
                tokio::spawn(crate::health::serve(
                    listener,
                    manager.health_source(),
                    config.sync_interval,
                    stop.subscribe(),
                ));
                tracing::info!(address = %bound, "health checks serving (/live, /ready)");
                Some(bound)
            }
            None => None,
        };
        tracing::info!(
            agent_id = %manager.agent_id(),
            socket = %config.socket_path.display(),
            "agent started"
        );
        Ok(Self {
            manager,
            health_addr,
            metrics_addr,
            socket_path: config.socket_path,
            stop,
            stopper,
            server,
        })
    }

    /// The agent's SPIFFE ID.
    pub fn agent_id(&self) -> SpiffeId {
        self.manager.agent_id()
    }

    /// Where `/live` and `/ready` are served, if `health_address` is set.
    pub fn health_addr(&self) -> Option<std::net::SocketAddr> {
        self.health_addr
    }

    /// Where `/metrics` is served, if `metrics_address` is set.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// The Workload API socket.
    pub fn socket_path(&self) -> &std::path::Path {
        &self.socket_path
    }

    /// The manager, for embedding and tests.
    pub fn manager(&self) -> &ManagerHandle {
        &self.manager
    }

    /// Completes when the agent has failed on its own (e.g. it was banned).
    pub async fn failed(&self) -> Arc<ManagerError> {
        self.manager.failed().await
    }

    /// Stops serving, removes the socket and stops the manager.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.stopper.stop();
        match self.server.await {
            Ok(Err(error)) => tracing::warn!(%error, "Workload API server ended with an error"),
            Err(error) => tracing::warn!(%error, "Workload API server task failed"),
            Ok(Ok(())) => {}
        }
        remove_socket(&self.socket_path);
        self.manager.shutdown().await;
        tracing::info!("agent stopped");
    }
}

/// Removes the Workload API socket, if a socket is still what is there.
fn remove_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            if let Err(error) = std::fs::remove_file(path) {
                tracing::warn!(%error, socket = %path.display(), "could not remove the socket");
            }
        }
        _ => {}
    }
}

/// Runs the agent until `shutdown` completes, or returns the error that stopped it.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let agent = Agent::start(config).await?;
    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        error = agent.failed() => Err(AgentError::Manager(error)),
    };
    agent.shutdown().await;
    outcome
}
