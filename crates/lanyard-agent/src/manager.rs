//! The agent's side of the server relationship: node attestation, the persisted agent SVID,
//! entry and bundle sync, workload SVID minting and rotation, and JWT-SVID minting, all
//! over SPIRE v1.13's agent↔server protocol so that the agent works against a Lanyard server
//! and a real `spire-server` alike.
//!
//! [`Manager::start`] loads the agent SVID from `data_dir` or attests the node (join token or
//! x509pop), then a background task syncs every `sync_interval` and publishes a complete
//! [`Snapshot`] through a `watch` channel after every change. It renews the agent SVID at
//! half its life (`RenewAgent`, or re-attestation for re-attestable agents), re-mints
//! workload SVIDs at half their life or when their entry or the CA changes, and withdraws
//! SVIDs when they expire. When the server is unreachable it keeps serving what is still
//! valid and retries with backoff. A ban, or a demand to re-attest that the agent cannot
//! meet, stops the manager with an error ([`ManagerHandle::failed`]).

mod client;
mod jwt;
mod storage;
mod sync;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lanyard_core::keys::{KeyPair, KeyType};
use lanyard_core::rotation::{self, Jitter};
use lanyard_core::x509::{self, X509Svid};
use lanyard_core::{EntryId, SpiffeId, TrustBundle, TrustDomain};
use lanyard_proto::convert::x509_svid_from_proto;
use lanyard_proto::spire::api::server::svid::v1::NewX509svidParams;
use lanyard_proto::spire::api::types::permission_denied_details::Reason;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use self::client::{AgentCredentials, Attestor, ClientError, ServerClient, ServerTrust};
use self::jwt::ManagerJwtMinter;
use self::storage::{StoredState, StoredSvid};
use crate::cache::{CachedEntry, Identity, JwtMinter, Snapshot};
use crate::config::AgentConfig;

/// Where the manager reads the time. Tests pass a clock they control.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(SystemTime::now)
}

/// SPIRE's agent treats its own SVID as expired this long before `NotAfter`.
const AGENT_SVID_EXPIRY_MARGIN: Duration = Duration::from_secs(1);

/// The longest wait between failed syncs (SPIRE: min(8 min, 48 × sync interval)).
const MAX_SYNC_BACKOFF: Duration = Duration::from_secs(8 * 60);

/// How long the first attestation is retried on transient errors before the agent gives up
/// (SPIRE: one minute).
const ATTESTATION_RETRY_PERIOD: Duration = Duration::from_secs(60);

/// The first and the longest wait between attestation attempts at start.
const ATTESTATION_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(10));

/// The most CSRs in one `BatchNewX509SVID` call (the server's per-call limit).
const MAX_CSRS_PER_CALL: usize = 500;

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
    /// Neither a join token nor a node attestor is configured.
    #[error(
        "the agent has no SVID and no way to attest: configure join_token or [node_attestor.x509pop]"
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
    #[error("the agent SVID expired at {} and could not be renewed", humantime::format_rfc3339_seconds(*.expired_at))]
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
            ServerClient::new(&config.server_address, &config.trust_domain)
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
        let agent_renew_at = agent_renewal_time(&credentials);
        let runner = Runner {
            config,
            clock,
            client,
            snapshot_tx,
            agent_id_tx,
            credentials,
            agent_renew_at,
            reattestable,
            bundle,
            federated: BTreeMap::new(),
            entries: BTreeMap::new(),
            svids: BTreeMap::new(),
            synced: false,
            dirty: false,
            batch_limit: MAX_CSRS_PER_CALL,
            n_over_capacity: 0,
        };

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
            agent_id,
            jwt_minter,
            failure,
            stop,
            task,
        })
    }
}

/// A running manager. Dropping it stops the manager too, without waiting.
pub struct ManagerHandle {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    agent_id: watch::Receiver<SpiffeId>,
    jwt_minter: Arc<ManagerJwtMinter>,
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

    /// Mints JWT-SVIDs through the server, with a cache.
    pub fn jwt_minter(&self) -> Arc<dyn JwtMinter> {
        Arc::clone(&self.jwt_minter) as Arc<dyn JwtMinter>
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

/// An attestation's outcome.
struct Attestation {
    credentials: AgentCredentials,
    reattestable: bool,
    bundle: TrustBundle,
}

/// The stored SVID if it is still good for at least a moment and chains to the stored
/// bundle.
fn usable_svid(
    svid: StoredSvid,
    bundle: &TrustBundle,
    now: SystemTime,
) -> Option<AgentCredentials> {
    let credentials = credentials_from_chain(svid.chain, svid.key, bundle, now)
        .map_err(|reason| tracing::info!(%reason, "the stored agent SVID cannot be used; attesting again"))
        .ok()?;
    if now + AGENT_SVID_EXPIRY_MARGIN >= credentials.svid.not_after() {
        tracing::info!("the stored agent SVID has expired; attesting again");
        return None;
    }
    Some(credentials)
}

/// Checks an agent SVID chain against the trust domain's bundle.
fn credentials_from_chain(
    chain: Vec<Vec<u8>>,
    key: Arc<KeyPair>,
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<AgentCredentials, String> {
    let verified = x509::verify_svid_chain(
        &chain,
        bundle.trust_domain(),
        &authorities(bundle, false),
        now,
    )
    .map_err(|e| format!("the agent SVID does not verify against the bundle: {e}"))?;
    let svid = X509Svid::from_chain(chain).map_err(|e| e.to_string())?;
    Ok(AgentCredentials {
        svid,
        not_before: verified.not_before(),
        key,
    })
}

fn authorities(bundle: &TrustBundle, untainted_only: bool) -> Vec<Vec<u8>> {
    bundle
        .x509_authorities()
        .iter()
        .filter(|a| !(untainted_only && a.is_tainted()))
        .map(|a| a.der().to_vec())
        .collect()
}

fn agent_renewal_time(credentials: &AgentCredentials) -> SystemTime {
    rotation::renewal_time(
        credentials.not_before,
        credentials.svid.not_after(),
        Jitter::random(),
    )
}

/// How to authenticate the server for the first attestation, in SPIRE's order: the stored
/// bundle, the configured bootstrap bundle, or (insecure) the server's ID alone.
fn bootstrap_trust(
    config: &AgentConfig,
    stored_bundle: Option<TrustBundle>,
) -> Result<(ServerTrust, Option<TrustBundle>), ManagerError> {
    if let Some(bundle) = stored_bundle.filter(|b| !b.x509_authorities().is_empty()) {
        return Ok((ServerTrust::Bundle, Some(bundle)));
    }
    if let Some(path) = &config.trust_bundle_path {
        let error = |reason: String| ManagerError::TrustBundle {
            path: path.clone(),
            reason,
        };
        let pem = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let bundle = TrustBundle::from_pem_certificates(config.trust_domain.clone(), &pem)
            .map_err(|e| error(e.to_string()))?;
        return Ok((ServerTrust::Bundle, Some(bundle)));
    }
    if config.insecure_bootstrap {
        tracing::warn!(
            "insecure_bootstrap: the server is not authenticated on first contact, only its SPIFFE ID is checked"
        );
        return Ok((ServerTrust::InsecureBootstrap, None));
    }
    Err(ManagerError::NoBootstrapTrust)
}

/// The configured way to attest. x509pop files are read anew each time, so a renewed node
/// certificate is picked up at the next re-attestation.
fn load_attestor(config: &AgentConfig) -> Result<Attestor, ManagerError> {
    if let Some(x509pop) = &config.node_attestor.x509pop {
        let cert_error = |reason: String| ManagerError::X509Pop {
            key: "certificate_path",
            path: x509pop.certificate_path.clone(),
            reason,
        };
        let pem =
            std::fs::read(&x509pop.certificate_path).map_err(|e| cert_error(e.to_string()))?;
        let chain = CertificateDer::pem_slice_iter(&pem)
            .map(|cert| cert.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| cert_error(e.to_string()))?;
        if chain.is_empty() {
            return Err(cert_error("no CERTIFICATE block found".into()));
        }
        let key_error = |reason: String| ManagerError::X509Pop {
            key: "private_key_path",
            path: x509pop.private_key_path.clone(),
            reason,
        };
        let key_pem = std::fs::read_to_string(&x509pop.private_key_path)
            .map_err(|e| key_error(e.to_string()))?;
        // The error names the problem, never the key's bytes.
        let key = KeyPair::from_pkcs8_pem(&key_pem).map_err(|e| key_error(e.to_string()))?;
        return Ok(Attestor::X509Pop {
            chain,
            key: Box::new(key),
        });
    }
    match &config.join_token {
        Some(token) => Ok(Attestor::JoinToken(token.clone())),
        None => Err(ManagerError::NoAttestor),
    }
}

/// One attestation: `AttestAgent` on a connection without a client certificate, then
/// `GetBundle` on the same connection.
async fn attest_once(
    client: &ServerClient,
    attestor: &Attestor,
    trust: ServerTrust,
    trust_domain: &TrustDomain,
    now: impl Fn() -> SystemTime,
) -> Result<Attestation, ClientError> {
    let key = KeyPair::generate(KeyType::EcP256)
        .map_err(|e| ClientError::Local(format!("generating the agent key: {e}")))?;
    let channel = client.bootstrap_channel(trust)?;
    let attested = client::with_deadline(
        "AttestAgent",
        client::attest_agent(channel.clone(), attestor, &key),
    )
    .await?;
    let bundle =
        client::with_deadline("GetBundle", client::get_bundle(channel, trust_domain)).await?;
    let credentials = credentials_from_chain(attested.chain, Arc::new(key), &bundle, now())
        .map_err(|reason| ClientError::InvalidResponse {
            rpc: "AttestAgent",
            reason,
        })?;
    Ok(Attestation {
        credentials,
        reattestable: attested.reattestable,
        bundle,
    })
}

/// Whether an attestation error is the server's final word (SPIRE's agent exits at once on
/// `PermissionDenied`); anything else is worth retrying.
fn attestation_refused(error: &ClientError) -> bool {
    matches!(
        error.code(),
        Some(
            Code::PermissionDenied
                | Code::InvalidArgument
                | Code::Unauthenticated
                | Code::Unimplemented
                | Code::FailedPrecondition
        )
    )
}

async fn attest_at_start(
    client: &ServerClient,
    config: &AgentConfig,
    trust: ServerTrust,
    clock: &Clock,
) -> Result<Attestation, ManagerError> {
    let attestor = load_attestor(config)?;
    let give_up_at = Instant::now() + ATTESTATION_RETRY_PERIOD;
    let mut attempt = 0;
    loop {
        match attest_once(client, &attestor, trust, &config.trust_domain, || clock()).await {
            Ok(attestation) => return Ok(attestation),
            Err(error) if attestation_refused(&error) || Instant::now() >= give_up_at => {
                return Err(ManagerError::Attestation(error.to_string()));
            }
            Err(error) => {
                let delay = rotation::backoff(
                    attempt,
                    ATTESTATION_BACKOFF.0,
                    ATTESTATION_BACKOFF.1,
                    Jitter::random(),
                );
                tracing::warn!(%error, retry_in = ?delay, "node attestation failed; retrying");
                attempt += 1;
                tokio::time::sleep(delay).await;
            }
        }
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

/// A workload SVID the agent minted, with its key and when to renew it.
struct MintedSvid {
    entry: Arc<CachedEntry>,
    svid: Arc<X509Svid>,
    key: Arc<KeyPair>,
    renew_at: SystemTime,
    /// Set when the SVID chains to a tainted authority: renew at the next opportunity.
    force_renew: bool,
}

/// What to do after a server error.
enum NextStep {
    /// Back off and try again.
    Retry,
    /// Attest again, for this reason.
    Reattest(&'static str),
}

/// The manager's background task and everything it owns.
struct Runner {
    config: AgentConfig,
    clock: Clock,
    client: Arc<ServerClient>,
    snapshot_tx: watch::Sender<Arc<Snapshot>>,
    agent_id_tx: watch::Sender<SpiffeId>,
    credentials: Arc<AgentCredentials>,
    agent_renew_at: SystemTime,
    reattestable: bool,
    bundle: Arc<TrustBundle>,
    federated: BTreeMap<TrustDomain, Arc<TrustBundle>>,
    entries: BTreeMap<EntryId, Arc<CachedEntry>>,
    svids: BTreeMap<EntryId, MintedSvid>,
    synced: bool,
    /// Something changed since the last published snapshot.
    dirty: bool,
    /// CSRs per `BatchNewX509SVID` call: halved after a failed call, like SPIRE's agent.
    batch_limit: usize,
    /// Entries left without SVIDs because of `x509_svid_cache_size`, last time we warned.
    n_over_capacity: usize,
}

impl Runner {
    fn now(&self) -> SystemTime {
        (self.clock)()
    }

    /// The monotonic instant at which the clock will show `at`.
    fn instant_at(&self, at: SystemTime) -> Instant {
        Instant::now() + at.duration_since(self.now()).unwrap_or_default()
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), ManagerError> {
        let interval = self.config.sync_interval;
        let max_backoff = MAX_SYNC_BACKOFF
            .min(interval.saturating_mul(48))
            .max(interval);
        let mut next_sync = Instant::now();
        let mut sync_failures: u32 = 0;
        let mut next_rotation = Instant::now();
        let mut rotation_failures: u32 = 0;
        let mut must_reattest: Option<&'static str> = None;

        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let now = self.now();
            self.withdraw_expired(now);

            if now + AGENT_SVID_EXPIRY_MARGIN >= self.credentials.svid.not_after() {
                if !self.can_reattest() {
                    return Err(ManagerError::AgentSvidExpired {
                        expired_at: self.credentials.svid.not_after(),
                    });
                }
                must_reattest.get_or_insert("the agent SVID expired");
            }

            let rotation_due = must_reattest.is_some() || now >= self.agent_renew_at;
            if rotation_due && Instant::now() >= next_rotation {
                let reattest_reason = must_reattest.take();
                let result = tokio::select! {
                    result = self.rotate(reattest_reason) => result,
                    _ = stop.changed() => return Ok(()),
                };
                match result {
                    Ok(()) => {
                        rotation_failures = 0;
                        // Never rotate twice within an interval, even if the server hands
                        // out SVIDs that are due at once.
                        next_rotation = Instant::now() + interval;
                        // A re-attestation may follow a failed sync; sync again now.
                        if reattest_reason.is_some() {
                            next_sync = Instant::now();
                        }
                    }
                    Err(error) => {
                        self.client.reset();
                        let reattest = match self.next_step(&error, reattest_reason.is_some())? {
                            NextStep::Reattest(reason) => Some(reason),
                            NextStep::Retry => reattest_reason,
                        };
                        must_reattest = reattest;
                        let delay = rotation::backoff(
                            rotation_failures,
                            interval,
                            max_backoff,
                            Jitter::random(),
                        );
                        rotation_failures = rotation_failures.saturating_add(1);
                        next_rotation = Instant::now() + delay;
                        tracing::warn!(%error, retry_in = ?delay, "agent SVID rotation failed");
                    }
                }
            }

            if must_reattest.is_none() && Instant::now() >= next_sync {
                let result = tokio::select! {
                    result = self.sync() => result,
                    _ = stop.changed() => return Ok(()),
                };
                match result {
                    Ok(()) => {
                        if sync_failures > 0 {
                            tracing::info!("sync with the server resumed");
                        }
                        sync_failures = 0;
                        next_sync = Instant::now() + interval;
                    }
                    Err(error) => {
                        self.client.reset();
                        match self.next_step(&error, false)? {
                            NextStep::Reattest(reason) => {
                                must_reattest = Some(reason);
                                next_rotation = next_rotation.max(Instant::now());
                                next_sync = Instant::now();
                            }
                            NextStep::Retry => {
                                let delay = rotation::backoff(
                                    sync_failures,
                                    interval,
                                    max_backoff,
                                    Jitter::random(),
                                );
                                sync_failures = sync_failures.saturating_add(1);
                                next_sync = Instant::now() + delay;
                                tracing::warn!(%error, retry_in = ?delay, "sync with the server failed");
                            }
                        }
                    }
                }
            }

            self.publish();

            let mut wake = next_sync;
            if must_reattest.is_some() {
                wake = wake.min(next_rotation);
            } else {
                wake = wake.min(self.instant_at(self.agent_renew_at).max(next_rotation));
            }
            // Wake when the agent SVID is about to expire, unless that has happened already
            // (a re-attestation is then pending and paced by `next_rotation`).
            let agent_expiry = self
                .credentials
                .svid
                .not_after()
                .checked_sub(AGENT_SVID_EXPIRY_MARGIN)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            if agent_expiry > self.now() {
                wake = wake.min(self.instant_at(agent_expiry));
            }
            if let Some(first_expiry) = self.svids.values().map(|s| s.svid.not_after()).min() {
                wake = wake.min(self.instant_at(first_expiry));
            }
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = stop.changed() => return Ok(()),
            }
        }
    }

    fn can_reattest(&self) -> bool {
        self.reattestable && self.config.node_attestor.x509pop.is_some()
    }

    /// Decides how to go on after `error`, or stops: banned, or told to re-attest when the
    /// agent cannot (SPIRE's agent then deletes its SVID and exits). A refused re-attestation
    /// is final too.
    fn next_step(&self, error: &ClientError, reattesting: bool) -> Result<NextStep, ManagerError> {
        let reason = match error.denial_reason() {
            Some(Reason::AgentBanned) => {
                self.forget_svid();
                return Err(ManagerError::Banned);
            }
            Some(
                reason @ (Reason::AgentExpired
                | Reason::AgentNotAttested
                | Reason::AgentNotActive
                | Reason::AgentMustReattest),
            ) => reason.as_str_name(),
            _ => {
                if reattesting && attestation_refused(error) {
                    self.forget_svid();
                    return Err(ManagerError::Attestation(error.to_string()));
                }
                return Ok(NextStep::Retry);
            }
        };
        if !self.can_reattest() {
            self.forget_svid();
            return Err(ManagerError::MustReattest {
                reason: reason.to_owned(),
            });
        }
        tracing::warn!(reason, "the server requires the agent to attest again");
        Ok(NextStep::Reattest(reason))
    }

    /// Deletes the stored SVID (keeping the bundle), so that the next start attests anew.
    fn forget_svid(&self) {
        let state = StoredState {
            svid: None,
            reattestable: self.reattestable,
            bundle: (*self.bundle).clone(),
        };
        if let Err(error) = storage::save(&self.config.data_dir, &state) {
            tracing::error!(%error, "could not delete the stored agent SVID");
        }
    }

    /// Saves the agent SVID, key and bundle.
    async fn persist(&self) {
        let state = StoredState {
            svid: Some(StoredSvid {
                chain: self.credentials.svid.cert_chain().to_vec(),
                key: Arc::clone(&self.credentials.key),
            }),
            reattestable: self.reattestable,
            bundle: (*self.bundle).clone(),
        };
        let data_dir = self.config.data_dir.clone();
        if let Err(error) = blocking(move || storage::save(&data_dir, &state)).await {
            tracing::error!(%error, "could not save the agent state");
        }
    }

    /// Renews the agent SVID: re-attestation when `reattest` gives a reason or the agent is
    /// re-attestable, else `RenewAgent` with a new key.
    async fn rotate(&mut self, reattest: Option<&'static str>) -> Result<(), ClientError> {
        if reattest.is_some() || self.can_reattest() {
            return self.reattest(reattest.unwrap_or("rotation")).await;
        }
        let key = KeyPair::generate(KeyType::EcP256)
            .map_err(|e| ClientError::Local(format!("generating the agent key: {e}")))?;
        let csr = x509::build_csr(&key, None)
            .map_err(|e| ClientError::Local(format!("building the agent CSR: {e}")))?;
        let channel = self.client.channel()?;
        let chain = client::with_deadline("RenewAgent", client::renew_agent(channel, csr)).await?;
        let credentials = credentials_from_chain(chain, Arc::new(key), &self.bundle, self.now())
            .map_err(|reason| ClientError::InvalidResponse {
                rpc: "RenewAgent",
                reason,
            })?;
        if credentials.svid.spiffe_id() != self.credentials.svid.spiffe_id() {
            return Err(ClientError::InvalidResponse {
                rpc: "RenewAgent",
                reason: format!(
                    "the renewed SVID is for {}, not {}",
                    credentials.svid.spiffe_id(),
                    self.credentials.svid.spiffe_id()
                ),
            });
        }
        tracing::info!(
            agent_id = %credentials.svid.spiffe_id(),
            expires_at = %humantime::format_rfc3339_seconds(credentials.svid.not_after()),
            "agent SVID renewed"
        );
        self.install_credentials(credentials).await;
        Ok(())
    }

    async fn reattest(&mut self, reason: &str) -> Result<(), ClientError> {
        let attestor =
            load_attestor(&self.config).map_err(|e| ClientError::Local(e.to_string()))?;
        let clock = Arc::clone(&self.clock);
        let attestation = attest_once(
            &self.client,
            &attestor,
            ServerTrust::Bundle,
            &self.config.trust_domain,
            move || clock(),
        )
        .await?;
        tracing::info!(
            agent_id = %attestation.credentials.svid.spiffe_id(),
            reason,
            "node attested again"
        );
        self.reattestable = attestation.reattestable;
        let now = self.now();
        self.apply_bundle(attestation.bundle, now);
        self.install_credentials(attestation.credentials).await;
        Ok(())
    }

    /// Switches to new agent credentials at once (the server makes a renewed SVID current on
    /// its first use) and saves them.
    async fn install_credentials(&mut self, credentials: AgentCredentials) {
        let credentials = Arc::new(credentials);
        self.agent_renew_at = agent_renewal_time(&credentials);
        self.client.set_credentials(Arc::clone(&credentials));
        self.agent_id_tx.send_if_modified(|id| {
            if id == credentials.svid.spiffe_id() {
                return false;
            }
            *id = credentials.svid.spiffe_id().clone();
            true
        });
        self.credentials = credentials;
        self.persist().await;
    }

    /// One sync: entries, the bundle, federated bundles, then SVIDs for what needs one.
    async fn sync(&mut self) -> Result<(), ClientError> {
        let channel = self.client.channel()?;
        let entries = {
            let mut stream = sync::GrpcSync::new(channel.clone());
            let result = client::with_deadline(
                sync::SYNC_AUTHORIZED_ENTRIES,
                sync::sync_entries(&mut stream, &self.entries),
            )
            .await;
            // Dropping the stream cancels it, as SPIRE's agent does.
            drop(stream);
            result?
        };
        let bundle = client::with_deadline(
            "GetBundle",
            client::get_bundle(channel.clone(), &self.config.trust_domain),
        )
        .await?;
        let federated_domains: BTreeSet<TrustDomain> = entries
            .values()
            .flat_map(|entry| entry.federates_with.iter().cloned())
            .filter(|td| *td != self.config.trust_domain)
            .collect();
        let mut federated = BTreeMap::new();
        for trust_domain in federated_domains {
            let fetched = client::with_deadline(
                "GetFederatedBundle",
                client::get_federated_bundle(channel.clone(), &trust_domain),
            )
            .await?;
            match fetched {
                Some(bundle) => {
                    federated.insert(trust_domain, Arc::new(bundle));
                }
                None => tracing::warn!(
                    trust_domain = %trust_domain,
                    "the server has no bundle for a federated trust domain"
                ),
            }
        }

        let now = self.now();
        if self.apply_bundle(bundle, now) {
            self.persist().await;
        }
        if self.federated != federated {
            self.federated = federated;
            self.dirty = true;
        }
        self.apply_entries(entries);
        self.mint(channel, now).await?;
        if !self.synced {
            self.synced = true;
            self.dirty = true;
        }
        Ok(())
    }

    /// Takes a new bundle of the trust domain; returns whether it changed. When the X.509
    /// authorities change, SVIDs that no longer chain to the bundle are withdrawn, and those
    /// that chain only to a tainted authority are renewed early (the agent's own too).
    fn apply_bundle(&mut self, bundle: TrustBundle, now: SystemTime) -> bool {
        if *self.bundle == bundle {
            return false;
        }
        let authorities_changed = self.bundle.x509_authorities() != bundle.x509_authorities();
        self.bundle = Arc::new(bundle);
        self.client.set_bundle(&self.bundle);
        self.dirty = true;
        if !authorities_changed {
            return true;
        }
        let trust_domain = self.config.trust_domain.clone();
        let all = authorities(&self.bundle, false);
        let untainted = authorities(&self.bundle, true);
        let chains_to = |chain: &[Vec<u8>], roots: &[Vec<u8>]| {
            x509::verify_svid_chain(chain, &trust_domain, roots, now).is_ok()
        };
        self.svids.retain(|entry_id, minted| {
            if !chains_to(minted.svid.cert_chain(), &all) {
                tracing::info!(entry_id = %entry_id, "withdrawing an SVID whose authority left the bundle");
                return false;
            }
            if !chains_to(minted.svid.cert_chain(), &untainted) {
                tracing::info!(entry_id = %entry_id, "renewing an SVID of a tainted authority");
                minted.force_renew = true;
            }
            true
        });
        if !chains_to(self.credentials.svid.cert_chain(), &untainted) {
            tracing::info!("the agent SVID's authority is tainted or gone; renewing it now");
            self.agent_renew_at = now;
        }
        true
    }

    /// Takes the new set of authorized entries. SVIDs of entries that are gone, or whose
    /// SPIFFE ID changed, are withdrawn at once.
    fn apply_entries(&mut self, entries: BTreeMap<EntryId, Arc<CachedEntry>>) {
        self.svids.retain(|id, minted| match entries.get(id) {
            Some(entry) if entry.spiffe_id == minted.entry.spiffe_id => {
                if entry.revision_number == minted.entry.revision_number
                    && entry.created_at == minted.entry.created_at
                {
                    minted.entry = Arc::clone(entry);
                }
                true
            }
            _ => false,
        });
        if self.entries != entries {
            self.entries = entries;
            self.dirty = true;
        }
    }

    /// Mints SVIDs for entries that have none, whose entry changed, that are due for
    /// renewal or chain to a tainted authority, in calls of at most `batch_limit` CSRs. At
    /// most `x509_svid_cache_size` entries (the first by ID) get SVIDs.
    async fn mint(&mut self, channel: Channel, now: SystemTime) -> Result<(), ClientError> {
        let servable: Vec<Arc<CachedEntry>> = self
            .entries
            .values()
            .filter(|entry| !entry.store_svid)
            .cloned()
            .collect();
        let capacity = self.config.x509_svid_cache_size.max(1);
        let n_over = servable.len().saturating_sub(capacity);
        if n_over != self.n_over_capacity {
            if n_over > 0 {
                tracing::warn!(
                    n_entries = servable.len(),
                    x509_svid_cache_size = capacity,
                    "more entries than x509_svid_cache_size; only the first by entry ID get SVIDs"
                );
            }
            self.n_over_capacity = n_over;
        }
        let eligible: Vec<Arc<CachedEntry>> = servable.into_iter().take(capacity).collect();
        let eligible_ids: BTreeSet<&EntryId> = eligible.iter().map(|e| &e.id).collect();
        let n_before = self.svids.len();
        self.svids.retain(|id, _| eligible_ids.contains(id));
        if self.svids.len() != n_before {
            self.dirty = true;
        }

        let stale: Vec<Arc<CachedEntry>> = eligible
            .iter()
            .filter(|entry| match self.svids.get(&entry.id) {
                None => true,
                Some(minted) => {
                    minted.force_renew
                        || now >= minted.renew_at
                        || minted.entry.revision_number != entry.revision_number
                        || minted.entry.created_at != entry.created_at
                }
            })
            .cloned()
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        for batch in stale.chunks(self.batch_limit.max(1)) {
            let mut keys = Vec::with_capacity(batch.len());
            let mut params = Vec::with_capacity(batch.len());
            for entry in batch {
                let key = KeyPair::generate(self.config.workload_key_type)
                    .map_err(|e| ClientError::Local(format!("generating a workload key: {e}")))?;
                let csr = x509::build_csr(&key, Some(&entry.spiffe_id))
                    .map_err(|e| ClientError::Local(format!("building a workload CSR: {e}")))?;
                params.push(NewX509svidParams {
                    entry_id: entry.id.as_str().to_owned(),
                    csr,
                });
                keys.push(key);
            }
            let results = match client::with_deadline(
                "BatchNewX509SVID",
                client::batch_new_x509_svid(channel.clone(), params),
            )
            .await
            {
                Ok(results) => results,
                Err(error) => {
                    self.batch_limit = (self.batch_limit / 2).max(1);
                    return Err(error);
                }
            };
            for ((entry, key), result) in batch.iter().zip(keys).zip(results) {
                let (code, message) = result
                    .status
                    .as_ref()
                    .map_or((Code::Unknown as i32, "the result has no status"), |s| {
                        (s.code, s.message.as_str())
                    });
                if code != Code::Ok as i32 {
                    tracing::warn!(
                        entry_id = %entry.id,
                        spiffe_id = %entry.spiffe_id,
                        code = ?Code::from(code),
                        message,
                        "failed to mint X509-SVID"
                    );
                    continue;
                }
                match self.accept_svid(entry, result.svid.as_ref(), now) {
                    Ok((svid, not_before)) => {
                        let renew_at =
                            rotation::renewal_time(not_before, svid.not_after(), Jitter::random());
                        self.svids.insert(
                            entry.id.clone(),
                            MintedSvid {
                                entry: Arc::clone(entry),
                                svid: Arc::new(svid),
                                key: Arc::new(key),
                                renew_at,
                                force_renew: false,
                            },
                        );
                        self.dirty = true;
                    }
                    Err(reason) => tracing::warn!(
                        entry_id = %entry.id,
                        %reason,
                        "the server returned an unusable X509-SVID"
                    ),
                }
            }
        }
        self.batch_limit = (self.batch_limit * 2).min(MAX_CSRS_PER_CALL);
        Ok(())
    }

    /// Checks a minted SVID: it must chain to the bundle and carry the entry's SPIFFE ID.
    fn accept_svid(
        &self,
        entry: &CachedEntry,
        svid: Option<&lanyard_proto::spire::api::types::X509svid>,
        now: SystemTime,
    ) -> Result<(X509Svid, SystemTime), String> {
        let svid = x509_svid_from_proto(svid.ok_or("an OK result without an SVID")?)
            .map_err(|e| e.to_string())?;
        let verified = x509::verify_svid_chain(
            svid.cert_chain(),
            &self.config.trust_domain,
            &authorities(&self.bundle, false),
            now,
        )
        .map_err(|e| format!("it does not verify against the bundle: {e}"))?;
        if verified.spiffe_id() != &entry.spiffe_id {
            return Err(format!(
                "it is for {}, not {}",
                verified.spiffe_id(),
                entry.spiffe_id
            ));
        }
        Ok((svid, verified.not_before()))
    }

    /// Withdraws SVIDs that have expired; they are never served.
    fn withdraw_expired(&mut self, now: SystemTime) {
        let n_before = self.svids.len();
        self.svids.retain(|entry_id, minted| {
            let alive = minted.svid.not_after() > now;
            if !alive {
                tracing::warn!(entry_id = %entry_id, "an X509-SVID expired before it could be renewed");
            }
            alive
        });
        if self.svids.len() != n_before {
            self.dirty = true;
        }
    }

    /// Publishes a snapshot if anything changed since the last one.
    fn publish(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let identities = self
            .svids
            .iter()
            .map(|(id, minted)| {
                (
                    id.clone(),
                    Identity {
                        entry: Arc::clone(&minted.entry),
                        svid: Arc::clone(&minted.svid),
                        key: Arc::clone(&minted.key),
                    },
                )
            })
            .collect();
        let snapshot = Snapshot {
            trust_domain: self.config.trust_domain.clone(),
            bundle: Arc::clone(&self.bundle),
            federated_bundles: self.federated.clone(),
            entries: self.entries.values().cloned().collect(),
            identities,
            synced: self.synced,
        };
        self.snapshot_tx.send_replace(Arc::new(snapshot));
    }
}

/// The path of the agent's state file in `data_dir`.
pub fn state_file(data_dir: &Path) -> PathBuf {
    data_dir.join(storage::STATE_FILE)
}
