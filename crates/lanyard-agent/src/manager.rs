//! The agent's side of the server relationship: node attestation, the persisted agent SVID,
//! entry and bundle sync, workload SVID minting and rotation, and JWT-SVID minting, all
//! over SPIRE v1.13's agent↔server protocol so that the agent works against a Lanyard server
//! and a real `spire-server` alike.
//!
//! [`Manager::start`] loads the agent SVID from `data_dir` or attests the node (join token or
//! x509pop, k8s_psat), then a background task syncs every `sync_interval` and publishes a complete
//! [`Snapshot`] through a `watch` channel after every change. It renews the agent SVID at
//! half its life (`RenewAgent`, or re-attestation for re-attestable agents), re-mints
//! workload SVIDs at half their life or when their entry or the CA changes, and withdraws
//! SVIDs when they expire. After each sync it reports to the server when workloads were last
//! served each entry (`report`, from the [`UsageTracker`] the Workload API records into), unless
//! the server lacks the service. When the server is unreachable it keeps serving what is still
//! valid and retries with backoff. A ban, or a demand to re-attest that the agent cannot
//! meet, stops the manager with an error ([`ManagerHandle::failed`]).
//!
//! When to sync, renew, re-attest, back off or stop, and which workload SVIDs to mint (in
//! which batches) or drop over capacity, is decided by `machine::Machine`, which does no I/O
//! and reads no clock; `runner::Runner` feeds it events and performs its actions.

mod attest;
mod client;
mod jwt;
mod machine;
mod push;
mod report;
mod revoke;
mod runner;
mod storage;
mod sync;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lanyard_core::{SpiffeId, TrustBundle};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::attest::{attest_at_start, bootstrap_trust, usable_svid};
use self::client::{ServerClient, ServerTrust};
use self::jwt::ManagerJwtMinter;
use self::runner::Runner;
use self::storage::{StoredState, StoredSvid};
use crate::cache::{JwtMinter, Snapshot};
use crate::config::AgentConfig;
use crate::metrics::AgentMetrics;
use crate::usage::UsageTracker;

/// Where the manager reads the time. Tests pass a clock they control.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(SystemTime::now)
}

/// SPIRE's agent treats its own SVID as expired this long before `NotAfter`.
const AGENT_SVID_EXPIRY_MARGIN: Duration = Duration::from_secs(1);

/// Why the manager could not start, or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// The data directory or the state file in it could not be used.
    #[error("agent state: {0}")]
    Storage(String),
    /// `server_address` cannot be dialled.
    #[error("{0}")]
    ServerAddress(String),
    /// The bootstrap bundle could not be read.
    #[error("reading trust_bundle_path {path}: {reason}")]
    TrustBundle {
        /// The configured file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The x509pop certificate or key could not be read.
    #[error("reading node_attestor.x509pop.{key} {path}: {reason}")]
    X509Pop {
        /// `certificate_path` or `private_key_path`.
        key: &'static str,
        /// The configured file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The k8s_psat token could not be read.
    #[error("reading node_attestor.k8s_psat.token_path {path}: {reason}")]
    K8sPsatToken {
        /// The configured file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Neither a join token nor a node attestor is configured.
    #[error(
        "the agent has no SVID and no way to attest: configure join_token, [node_attestor.x509pop] or [node_attestor.k8s_psat]"
    )]
    NoAttestor,
    /// Nothing to authenticate the server with on first contact.
    #[error(
        "the agent has no trust bundle to authenticate the server: configure trust_bundle_path or insecure_bootstrap"
    )]
    NoBootstrapTrust,
    /// The server refused the node's attestation, or attestation kept failing.
    #[error("node attestation failed: {0}")]
    Attestation(String),
    /// The server says the agent is banned.
    #[error("agent is banned")]
    Banned,
    /// The server demands a new attestation that this agent cannot perform in place.
    #[error(
        "the server requires the agent to attest again ({reason}), but this agent cannot re-attest in place; join tokens work only once: configure a new join_token and restart"
    )]
    MustReattest {
        /// SPIRE's denial reason, e.g. `AGENT_NOT_ATTESTED`.
        reason: String,
    },
    /// The agent SVID expired because it could not be renewed in time.
    #[error(
        "the agent SVID expired at {} and could not be renewed",
        humantime::format_rfc3339_seconds(*.expired_at)
    )]
    AgentSvidExpired {
        /// The SVID's `NotAfter`.
        expired_at: SystemTime,
    },
    /// The manager's task ended unexpectedly.
    #[error("the manager task ended unexpectedly: {0}")]
    Crashed(String),
}

/// Starts the agent's manager. See the [module documentation](self).
#[derive(Debug)]
pub struct Manager {
    _private: (),
}

impl Manager {
    /// Loads or obtains the agent SVID, then starts syncing in the background.
    ///
    /// Returns once the agent has a valid SVID: from `data_dir`, or from attesting the node
    /// (retried for up to a minute on transient errors; a refusal is final). The first
    /// snapshot has the bundle and no entries (`synced` false); the first sync starts at
    /// once.
    pub async fn start(config: AgentConfig, clock: Clock) -> Result<ManagerHandle, ManagerError> {
        let client = Arc::new(
            ServerClient::new(config.server_address.as_slice(), &config.trust_domain)
                .map_err(|e| ManagerError::ServerAddress(e.to_string()))?,
        );
        let data_dir = config.data_dir.clone();
        let trust_domain = config.trust_domain.clone();
        let stored = blocking(move || {
            storage::prepare_data_dir(&data_dir)?;
            storage::load(&data_dir, &trust_domain)
        })
        .await?;

        let now = clock();
        let (stored_svid, stored_bundle, stored_reattestable) = match stored {
            Some(state) => (state.svid, Some(state.bundle), state.reattestable),
            None => (None, None, false),
        };
        let reused = match (stored_svid, &stored_bundle) {
            (Some(svid), Some(bundle)) => usable_svid(svid, bundle, now),
            _ => None,
        };
        let (credentials, reattestable, bundle) = match reused {
            Some(credentials) => {
                let bundle =
                    stored_bundle.unwrap_or_else(|| TrustBundle::new(config.trust_domain.clone()));
                tracing::info!(
                    agent_id = %credentials.svid.spiffe_id(),
                    expires_at = %humantime::format_rfc3339_seconds(credentials.svid.not_after()),
                    "using the stored agent SVID"
                );
                client.set_bundle(&bundle);
                (credentials, stored_reattestable, bundle)
            }
            None => {
                let trust = bootstrap_trust(&config, stored_bundle)?;
                if let (ServerTrust::Bundle, Some(bundle)) = (&trust.0, &trust.1) {
                    client.set_bundle(bundle);
                }
                let attested = attest_at_start(&client, &config, trust.0, &clock).await?;
                let state = StoredState {
                    svid: Some(StoredSvid {
                        chain: attested.credentials.svid.cert_chain().to_vec(),
                        key: Arc::clone(&attested.credentials.key),
                    }),
                    reattestable: attested.reattestable,
                    bundle: attested.bundle.clone(),
                };
                let data_dir = config.data_dir.clone();
                blocking(move || storage::save(&data_dir, &state)).await?;
                tracing::info!(
                    agent_id = %attested.credentials.svid.spiffe_id(),
                    reattestable = attested.reattestable,
                    "node attested"
                );
                client.set_bundle(&attested.bundle);
                (attested.credentials, attested.reattestable, attested.bundle)
            }
        };

        let credentials = Arc::new(credentials);
        client.set_credentials(Arc::clone(&credentials));
        let bundle = Arc::new(bundle);
        let (snapshot_tx, snapshots) = watch::channel(Arc::new(Snapshot::new(
            config.trust_domain.clone(),
            Arc::clone(&bundle),
        )));
        let (agent_id_tx, agent_id) = watch::channel(credentials.svid.spiffe_id().clone());
        let jwt_minter = Arc::new(ManagerJwtMinter::new(
            Arc::clone(&client),
            Arc::clone(&clock),
            snapshots.clone(),
            config.jwt_svid_cache_size,
        ));
        let usage = Arc::new(UsageTracker::new());
        let metrics = AgentMetrics::new();
        let (health_tx, health) = watch::channel(AgentHealth {
            last_sync: None,
            svid_expires_at: credentials.svid.not_after(),
            poll_interval: config.sync_interval,
        });
        let runner = Runner::new(
            config,
            clock,
            client,
            snapshot_tx,
            agent_id_tx,
            credentials,
            reattestable,
            bundle,
            Arc::clone(&usage),
            health_tx,
            metrics.clone(),
        );

        let (stop, stopped) = watch::channel(false);
        let (failure_tx, failure) = watch::channel(None);
        let inner = tokio::spawn(runner.run(stopped));
        let task = tokio::spawn(async move {
            let outcome = match inner.await {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(error),
                Err(join_error) => Some(ManagerError::Crashed(join_error.to_string())),
            };
            if let Some(error) = outcome {
                tracing::error!(%error, "the agent manager stopped");
                failure_tx.send_replace(Some(Arc::new(error)));
            }
        });
        Ok(ManagerHandle {
            snapshots,
            health,
            agent_id,
            jwt_minter,
            usage,
            metrics,
            failure,
            stop,
            task,
        })
    }
}

/// A running manager. Dropping it stops the manager too, without waiting.
pub struct ManagerHandle {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    health: watch::Receiver<AgentHealth>,
    agent_id: watch::Receiver<SpiffeId>,
    jwt_minter: Arc<ManagerJwtMinter>,
    usage: Arc<UsageTracker>,
    metrics: AgentMetrics,
    failure: watch::Receiver<Option<Arc<ManagerError>>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl fmt::Debug for ManagerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagerHandle")
            .field("agent_id", &*self.agent_id.borrow())
            .finish_non_exhaustive()
    }
}

impl ManagerHandle {
    /// The snapshots the manager publishes; the current one is available at once.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// What the agent's health checks look at: when it last synced, and its SVID's expiry.
    pub fn health(&self) -> AgentHealth {
        *self.health.borrow()
    }

    /// What the HTTP health checks read, for as long as they run.
    pub fn health_source(&self) -> Arc<dyn crate::health::HealthSource> {
        Arc::new(ManagerHealth {
            health: self.health.clone(),
            failure: self.failure.clone(),
        })
    }

    /// Mints JWT-SVIDs through the server, with a cache.
    pub fn jwt_minter(&self) -> Arc<dyn JwtMinter> {
        Arc::clone(&self.jwt_minter) as Arc<dyn JwtMinter>
    }

    /// Where the Workload API records what it serves; the manager reports it to the server
    /// after each sync.
    pub fn usage(&self) -> Arc<UsageTracker> {
        Arc::clone(&self.usage)
    }

    /// The counters the manager keeps; the Workload API counts into them too.
    pub fn metrics(&self) -> AgentMetrics {
        self.metrics.clone()
    }

    /// What the metrics read at each scrape: the snapshots and the JWT-SVID cache's size.
    pub fn scrape_sources(&self) -> crate::metrics::ScrapeSources {
        let jwt_minter = Arc::clone(&self.jwt_minter);
        crate::metrics::ScrapeSources {
            snapshots: self.snapshots.clone(),
            jwt_svids: Box::new(move || jwt_minter.cached_tokens()),
        }
    }

    /// The agent's SPIFFE ID.
    pub fn agent_id(&self) -> SpiffeId {
        self.agent_id.borrow().clone()
    }

    /// Completes when the manager has stopped on its own, with the reason (for example
    /// [`ManagerError::Banned`]); the agent should then exit with an error. Never completes
    /// while the manager runs. Cancel-safe.
    pub async fn failed(&self) -> Arc<ManagerError> {
        let mut failure = self.failure.clone();
        match failure.wait_for(Option::is_some).await {
            Ok(failure) => match failure.as_ref() {
                Some(error) => Arc::clone(error),
                None => std::future::pending().await,
            },
            // Stopped without a failure: only through `shutdown`, which consumed the handle.
            Err(_) => std::future::pending().await,
        }
    }

    /// The reason the manager stopped on its own, if it has.
    pub fn failure(&self) -> Option<Arc<ManagerError>> {
        self.failure.borrow().clone()
    }

    /// Stops the manager and waits for its task to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// What the agent's health checks look at (`health_address`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentHealth {
    /// When a sync with the server last succeeded; `None` before the first.
    pub last_sync: Option<SystemTime>,
    /// When the agent's current SVID expires.
    pub svid_expires_at: SystemTime,
    /// How often the agent syncs when nothing calls for it sooner: `sync_interval`, or longer
    /// while the server pushes changes. `Duration::ZERO` until the manager has said.
    pub poll_interval: std::time::Duration,
}

/// The manager's health and failure, read by the HTTP health checks.
struct ManagerHealth {
    health: watch::Receiver<AgentHealth>,
    failure: watch::Receiver<Option<Arc<ManagerError>>>,
}

impl crate::health::HealthSource for ManagerHealth {
    fn health(&self) -> AgentHealth {
        *self.health.borrow()
    }

    fn failure(&self) -> Option<String> {
        self.failure.borrow().as_ref().map(ToString::to_string)
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, storage::StorageError> + Send + 'static,
) -> Result<T, ManagerError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ManagerError::Storage(e.to_string()))?
        .map_err(|e| ManagerError::Storage(e.to_string()))
}

/// The path of the agent's state file in `data_dir`.
pub fn state_file(data_dir: &Path) -> PathBuf {
    data_dir.join(storage::STATE_FILE)
}
