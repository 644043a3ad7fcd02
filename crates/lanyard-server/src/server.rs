//! Starting and stopping a server: opening the datastore and keys, loading the CA, serving
//! the API on TCP (TLS, see [`crate::listener`]) and the admin Unix socket, and running the
//! rotation loop and the bundle endpoint client ([`crate::bundle_client`]).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lanyard_core::x509::CaSubject;
use lanyard_metrics::rpc::{RpcMetrics, RpcMetricsLayer};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::server::Router;
use tower::layer::util::{Identity, Stack};

use crate::api::agent::AgentService;
use crate::api::bundle::BundleService;
use crate::api::changes::AgentChangeService;
use crate::api::entry::EntryService;
use crate::api::exception::ExceptionService;
use crate::api::governed::GovernedEntryService;
use crate::api::localauthority::LocalAuthorityService;
use crate::api::metadata::EntryMetadataService;
use crate::api::revocation::{AgentRevocationService, RevocationService};
use crate::api::svid::SvidService;
use crate::api::trustdomain::TrustDomainService;
use crate::api::usage::UsageService;
use crate::ca::{CaConfig, CaError, CaManager};
use crate::config::{BundleEndpointProfile, DatastoreKind, KeyManagerKind, ServerConfig};
use crate::datastore::{Datastore, DatastoreError, MemoryStore, SqlStore};
use crate::endpoints::cert_files::{CertFiles, CertFilesError};
use crate::endpoints::{EndpointLimits, Transport};
use crate::keymanager::{self, DiskKeyManager, KeyManager, KeyManagerError, MemoryKeyManager};
use crate::state::{Clock, ServerState};
use crate::tls::{ServerSvid, TlsError};

/// How often the CA and server SVID rotation is checked.
const ROTATION_INTERVAL: Duration = Duration::from_secs(5);

/// How many current entries a reloaded policy must evaluate before it is put in force.
const POLICY_PROBE_ENTRIES: usize = 256;

/// How often the policy file is checked for changes (SIGHUP reloads at once).
const POLICY_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// How often the certificate and key files of the public endpoints are checked for changes
/// (SIGHUP reloads at once).
const CERT_FILES_CHECK_INTERVAL: Duration = Duration::from_secs(5);

macro_rules! server_error_from {
    ($($variant:ident($error:ty)),* $(,)?) => {
        $(
            impl From<$error> for ServerError {
                fn from(error: $error) -> Self {
                    Self::$variant(error)
                }
            }
        )*
    };
}

server_error_from!(
    Setup(KeyManagerError),
    Datastore(DatastoreError),
    Ca(CaError),
    Tls(TlsError),
    Policy(crate::policy::LoadError),
    Audit(crate::audit::AuditError),
    CertFiles(CertFilesError),
);

/// Why the server could not start or stopped with an error. Each message already includes
/// its cause's, so the variants carry their causes without exposing them as `source()`: a
/// printed chain (`{:#}`) says each thing once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The data directory or a socket directory could not be prepared.
    #[error("{0}")]
    Setup(KeyManagerError),
    /// The datastore could not be opened.
    #[error("datastore: {0}")]
    Datastore(DatastoreError),
    /// The CA could not be loaded or created.
    #[error("CA: {0}")]
    Ca(CaError),
    /// TLS state could not be built.
    #[error("TLS: {0}")]
    Tls(TlsError),
    /// A listener could not be bound.
    #[error("binding {what}: {error}")]
    Bind {
        /// The address or socket path.
        what: String,
        /// The underlying error.
        error: std::io::Error,
    },
    /// The policy could not be loaded.
    #[error("{0}")]
    Policy(crate::policy::LoadError),
    /// The audit log could not be opened, or does not verify.
    #[error("{0}")]
    Audit(crate::audit::AuditError),
    /// The datastore is missing or empty while the data directory holds the rest of an
    /// existing trust domain.
    #[error(
        "the datastore {datastore} is {problem}, but {} of an existing trust domain {} still \
         there; starting would create a new CA and cut off every agent. Restore the datastore \
         from a backup, or start a new trust domain on purpose with --new-trust-domain (the \
         old key files are kept, renamed)",
        .prior.join(", "),
        if .prior.len() == 1 { "is" } else { "are" }
    )]
    DatastoreLost {
        /// The datastore file.
        datastore: PathBuf,
        /// "missing" or "empty".
        problem: &'static str,
        /// What remains of the trust domain.
        prior: Vec<String>,
    },
    /// The certificate or key of a public endpoint (`https_web`, OIDC discovery) is unusable.
    #[error("{0}")]
    CertFiles(CertFilesError),
    /// A public endpoint's configuration, built in code, misses what it needs.
    #[error("{0}")]
    Endpoint(&'static str),
    /// A k8s_psat cluster's API server access (kubeconfig, in-cluster credentials) is unusable.
    #[error("{0}")]
    K8sPsat(String),
    /// A relationship of `[federation.trust_domains]` could not be applied.
    #[error("federation.trust_domains: {0}")]
    ConfiguredRelationship(String),
    /// `federation.https_web_extra_ca_certificates_path` is unusable.
    #[error("federation.https_web_extra_ca_certificates_path: {0}")]
    WebRoots(String),
    /// The x509pop CA bundle could not be read.
    #[error("reading x509pop ca_bundle_path {path}: {reason}")]
    X509PopBundle {
        /// The configured file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    state: Arc<ServerState>,
    tcp_addr: SocketAddr,
    bundle_endpoint_addr: Option<SocketAddr>,
    oidc_discovery_addr: Option<SocketAddr>,
    health_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    socket_path: PathBuf,
    /// Every admin socket, the main one first; removed at shutdown.
    socket_paths: Vec<PathBuf>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Server {
    /// Opens the datastore and keys, loads the CA and starts serving. Binding port 0 picks a
    /// free port; see [`Server::tcp_addr`].
    pub async fn start(config: ServerConfig, clock: Clock) -> Result<Self, ServerError> {
        keymanager::create_private_dir(&config.data_dir)?;
        if !config.new_trust_domain {
            check_datastore_not_lost(&config)?;
        }
        let store: Arc<dyn Datastore> = match config.datastore.kind {
            DatastoreKind::Sqlite => Arc::new(SqlStore::open(&config.datastore_path()).await?),
            DatastoreKind::Memory => Arc::new(MemoryStore::new()),
            DatastoreKind::Postgres => {
                // `ServerConfig::check` requires it; a config built in code may lack it.
                let url = config.datastore.connection_string.as_ref().ok_or_else(|| {
                    DatastoreError::Backend(
                        "kind = \"postgres\" needs datastore.connection_string".into(),
                    )
                })?;
                let max_connections = config
                    .datastore
                    .max_connections
                    .unwrap_or(crate::datastore::postgres::DEFAULT_MAX_CONNECTIONS);
                let mut store =
                    crate::datastore::PgStore::connect(url.expose(), max_connections).await?;
                if let Some(replica) = &config.datastore.read_connection_string {
                    store = store
                        .with_replica(replica.expose(), max_connections)
                        .await?;
                }
                Arc::new(store)
            }
        };
        // With metrics on, every datastore call is timed.
        let datastore_metrics = config
            .metrics_address
            .map(|_| crate::datastore::metered::DatastoreMetrics::new());
        let store: Arc<dyn Datastore> = match &datastore_metrics {
            Some(metrics) => Arc::new(crate::datastore::metered::MeteredStore::new(
                store,
                metrics.clone(),
            )),
            None => store,
        };
        // Before anything else writes: changes committed without an audit record when the
        // last run died are recorded now, from the change log.
        let audit = crate::audit::AuditLog::open(&config.audit_log_path())?;
        crate::audit::recover(&audit, &*store, &config.instance, clock()).await?;
        let keys: Arc<dyn KeyManager> = match config.key_manager.kind {
            KeyManagerKind::Disk => Arc::new(DiskKeyManager::open(config.key_directory())?),
            KeyManagerKind::Memory => Arc::new(MemoryKeyManager::new()),
        };
        let ca_config = CaConfig {
            trust_domain: config.trust_domain.clone(),
            ca_ttl: config.ca_ttl,
            x509_key_type: config.ca_key_type,
            jwt_key_type: config.jwt_key_type(),
            subject: CaSubject {
                country: config.ca_subject.country.clone(),
                organization: config.ca_subject.organization.clone(),
                common_name: config.ca_subject.common_name.clone(),
            },
            new_trust_domain: config.new_trust_domain,
            instance: config.instance.clone(),
        };
        let now = clock();
        let ca = Arc::new(CaManager::load(ca_config, keys, Arc::clone(&store), now).await?);
        let x509pop_anchors = match &config.node_attestor.x509pop {
            Some(x509pop) => Some(read_certificates(&x509pop.ca_bundle_path)?),
            None => None,
        };
        let k8s_psat = match &config.node_attestor.k8s_psat {
            Some(psat) => Some(Arc::new(
                crate::k8s_psat::K8sPsat::from_config(psat).map_err(ServerError::K8sPsat)?,
            )),
            None => None,
        };
        let server_svid = Arc::new(ServerSvid::new(&ca, config.default_x509_svid_ttl, now)?);
        let policy = match &config.policy {
            Some(policy) => Some(Arc::new(crate::policy::PolicyHolder::load_with_time_limit(
                &policy.path,
                policy.evaluation_timeout,
            )?)),
            None => None,
        };
        let (ledger, ledger_queue) = crate::ledger::Ledger::new();
        let mut state = ServerState::new(config, store, Arc::clone(&ca), clock)
            .await?
            .with_audit_log(audit)
            .with_ledger(ledger);
        if let Some(policy) = &policy {
            state = state.with_policy(Arc::clone(policy));
        }
        let state = Arc::new(state);
        state.refresh_revocations().await;
        if let Some(policy) = &policy {
            let weak = Arc::downgrade(&state);
            policy.set_sampler(Box::new(move || {
                weak.upgrade()
                    .map(|state| state.policy_samples(POLICY_PROBE_ENTRIES))
                    .unwrap_or_default()
            }));
        }

        let tcp = TcpListener::bind(state.config.bind_address)
            .await
            .map_err(|error| ServerError::Bind {
                what: state.config.bind_address.to_string(),
                error,
            })?;
        let tcp_addr = tcp.local_addr().map_err(|error| ServerError::Bind {
            what: state.config.bind_address.to_string(),
            error,
        })?;
        let socket_path = state.config.socket_path.clone();
        let mut admin_sockets = vec![(crate::admin_socket::bind(&socket_path)?, None)];
        for named in &state.config.admin_sockets {
            admin_sockets.push((
                crate::admin_socket::bind(&named.path)?,
                Some(Arc::new(named.clone())),
            ));
        }
        let socket_paths: Vec<PathBuf> = std::iter::once(socket_path.clone())
            .chain(state.config.admin_sockets.iter().map(|s| s.path.clone()))
            .collect();

        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();

        let tls = Arc::new(crate::tls::server_config(
            Arc::clone(&server_svid),
            Arc::clone(&ca),
        )?);
        let bundle_endpoint_addr =
            start_bundle_endpoint(&state, &server_svid, &stopped, &mut tasks).await?;
        let oidc_discovery_addr = start_oidc_discovery(&state, &stopped, &mut tasks).await?;
        let datastore_writable = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let health_addr = start_health(&state, &datastore_writable, &stopped, &mut tasks).await?;
        let (metrics_addr, rpc_metrics) =
            start_metrics(&state, datastore_metrics.as_ref(), &stopped, &mut tasks).await?;
        let rpc_layer = |listener| {
            rpc_metrics
                .as_ref()
                .map_or_else(RpcMetricsLayer::off, |rpc| rpc.layer(Some(listener)))
        };

        let tcp_router = routes(
            &state,
            x509pop_anchors.clone(),
            k8s_psat.clone(),
            rpc_layer("tls"),
            &stopped,
        );
        let limits = crate::listener::ListenerLimits::from(&state.config);
        tasks.spawn(crate::listener::serve_tls(
            tcp,
            tls,
            tcp_router,
            limits,
            stopped.clone(),
        ));

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        for (listener, named) in admin_sockets {
            let uds_router = routes(
                &state,
                x509pop_anchors.clone(),
                k8s_psat.clone(),
                rpc_layer("admin"),
                &stopped,
            )
            .add_service(health_service.clone());
            let mut uds_stopped = stopped.clone();
            tasks.spawn(async move {
                let name = named.as_ref().map(|s| s.name.clone());
                let incoming = crate::admin_socket::incoming(listener, named);
                let result = uds_router
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = uds_stopped.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(error) = result {
                    tracing::error!(%error, socket = ?name, "admin socket server failed");
                }
            });
        }

        if let Some(policy) = policy {
            let mut policy_stopped = stopped.clone();
            tasks.spawn(policy.watch(POLICY_CHECK_INTERVAL, async move {
                let _ = policy_stopped.wait_for(|s| *s).await;
            }));
        }
        tasks.spawn(crate::ledger::run(
            ledger_queue,
            Arc::clone(&state.store),
            state.clock(),
            stopped.clone(),
        ));
        tasks.spawn(checkpoint_audit(Arc::clone(&state), stopped.clone()));
        tasks.spawn(follow_changes(Arc::clone(&state), stopped.clone()));
        tasks.spawn(probe_datastore(
            Arc::clone(&state),
            health_reporter,
            datastore_writable,
            stopped.clone(),
        ));
        let configured = configured_relationships(&state.config)?;
        crate::relationships::RelationshipWriter::new(Arc::clone(&state))
            .apply_configured(configured)
            .await
            .map_err(|e| ServerError::ConfiguredRelationship(e.to_string()))?;
        let web_roots = crate::bundle_client::load_web_roots(
            state
                .config
                .federation
                .https_web_extra_ca_certificates_path
                .as_deref(),
        )
        .map_err(ServerError::WebRoots)?;
        tasks.spawn(
            crate::bundle_client::BundleClient::new(Arc::clone(&state), web_roots)
                .run(stopped.clone()),
        );
        tasks.spawn(rotate(Arc::clone(&state), server_svid, stopped));

        tracing::info!(
            trust_domain = %state.trust_domain(),
            address = %tcp_addr,
            socket = %socket_path.display(),
            "server started"
        );
        Ok(Self {
            state,
            tcp_addr,
            bundle_endpoint_addr,
            oidc_discovery_addr,
            health_addr,
            metrics_addr,
            socket_path,
            socket_paths,
            stop,
            tasks,
        })
    }

    /// The shared state, for tests and embedding.
    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// The bound TCP address.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// The bound address of the bundle endpoint, when configured.
    pub fn bundle_endpoint_addr(&self) -> Option<SocketAddr> {
        self.bundle_endpoint_addr
    }

    /// The bound address of OIDC discovery, when configured.
    pub fn oidc_discovery_addr(&self) -> Option<SocketAddr> {
        self.oidc_discovery_addr
    }

    /// Where `/live` and `/ready` are served, if `health_address` is set.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_addr
    }

    /// Where `/metrics` is served, if `metrics_address` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The admin socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Stops serving and waits for every task to finish.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        for path in &self.socket_paths {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("server stopped");
    }
}

/// The relationships of `[federation.trust_domains]`, each with the bundle of its
/// `trust_domain_bundle_path`, if any.
fn configured_relationships(
    config: &ServerConfig,
) -> Result<Vec<lanyard_core::FederationRelationship>, ServerError> {
    let mut relationships = Vec::new();
    for (name, configured) in &config.federation.trust_domains {
        let problem =
            |reason: String| ServerError::ConfiguredRelationship(format!("{name:?}: {reason}"));
        let relationship = configured
            .relationship(name)
            .map_err(|e| problem(e.to_string()))?;
        let relationship = match &configured.trust_domain_bundle_path {
            None => relationship,
            Some(path) => {
                let text = std::fs::read(path)
                    .map_err(|e| problem(format!("reading {}: {e}", path.display())))?;
                let trust_domain = relationship.trust_domain().clone();
                let bundle = match configured.trust_domain_bundle_format {
                    crate::config::BundleFileFormat::Pem => {
                        lanyard_core::TrustBundle::from_pem_certificates(
                            trust_domain,
                            &String::from_utf8_lossy(&text),
                        )
                    }
                    crate::config::BundleFileFormat::Spiffe => {
                        lanyard_core::TrustBundle::from_jwks_json(trust_domain, &text)
                    }
                }
                .map_err(|e| problem(format!("{}: {e}", path.display())))?;
                relationship
                    .with_trust_domain_bundle(bundle)
                    .map_err(|e| problem(e.to_string()))?
            }
        };
        relationships.push(relationship);
    }
    Ok(relationships)
}

/// How often the audit checkpoint moves (see [`crate::audit`]): after a crash, at most this
/// much of the changes already recorded are recorded again, rebuilt from the change log.
const AUDIT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

/// Moves the audit checkpoint every [`AUDIT_CHECKPOINT_INTERVAL`], and once more at shutdown.
async fn checkpoint_audit(state: Arc<ServerState>, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(AUDIT_CHECKPOINT_INTERVAL) => state.checkpoint_audit().await,
            () = async { let _ = stopped.wait_for(|s| *s).await; } => break,
        }
    }
    // The listeners stop with the same signal; give in-flight writes their moment.
    for _ in 0..20 {
        state.checkpoint_audit().await;
        if !state.audit.pending() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How often the authorization index catches up with the change log by itself, for writes
/// Applies the datastore's change log to the authorization index whenever the datastore
/// announces a change (PostgreSQL: another server committed one) and every
/// `[datastore] poll_interval` in any case, for writes that did not go through this server.
/// This server's own writes are applied before they are acknowledged.
async fn follow_changes(state: Arc<ServerState>, mut stopped: watch::Receiver<bool>) {
    let interval = state.config.datastore.poll_interval;
    let signal = match state.store.change_signal().await {
        Ok(signal) => signal,
        Err(error) => {
            tracing::warn!(%error, "the datastore cannot announce changes; polling its change log only");
            None
        }
    };
    let announced = || async {
        match &signal {
            Some(signal) => signal.changed().await,
            None => std::future::pending().await,
        }
    };
    let mut failing = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = announced() => {}
            () = async { let _ = stopped.wait_for(|s| *s).await; } => break,
        }
        match state.catch_up().await {
            Ok(()) if failing => {
                tracing::info!("the authorization index follows the change log again");
                failing = false;
            }
            Ok(()) => {}
            Err(error) if !failing => {
                tracing::warn!(%error, "the authorization index cannot read the change log; retrying every second");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// How often the health service checks that the datastore takes a write.
const HEALTH_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// The datastore meta key the health probe writes.
const HEALTH_PROBE_KEY: &str = "health.write_probe";

/// Writes to the datastore every [`HEALTH_PROBE_INTERVAL`] and reports the server `NOT_SERVING`
/// on the health service (`lanyard server healthcheck`) while that fails — a full disk, a
/// read-only file — and `SERVING` again once it succeeds.
async fn probe_datastore(
    state: Arc<ServerState>,
    health: tonic_health::server::HealthReporter,
    writable: Arc<std::sync::atomic::AtomicBool>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut healthy = true;
    loop {
        let now = state
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let result = state
            .store
            .set_meta(HEALTH_PROBE_KEY, now.as_secs().to_string().as_bytes())
            .await;
        writable.store(result.is_ok(), std::sync::atomic::Ordering::Relaxed);
        match (result, healthy) {
            (Ok(()), false) => {
                tracing::info!("the datastore takes writes again");
                health
                    .set_service_status("", tonic_health::ServingStatus::Serving)
                    .await;
                healthy = true;
            }
            (Err(error), true) => {
                tracing::error!(%error, "the datastore cannot write; reporting NOT_SERVING");
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
                healthy = false;
            }
            _ => {}
        }
        tokio::select! {
            () = tokio::time::sleep(HEALTH_PROBE_INTERVAL) => {}
            () = async { let _ = stopped.wait_for(|s| *s).await; } => break,
        }
    }
}

/// Runs a server until `shutdown` completes.
pub async fn run(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let server = Server::start(config, crate::state::system_clock()).await?;
    shutdown.await;
    server.shutdown().await;
    Ok(())
}

/// The router of the server API, with the gRPC call metrics' layer (on or off).
pub type ApiRouter = Router<Stack<RpcMetricsLayer, Identity>>;

fn routes(
    state: &Arc<ServerState>,
    x509pop_anchors: Option<Vec<Vec<u8>>>,
    k8s_psat: Option<Arc<crate::k8s_psat::K8sPsat>>,
    rpc_metrics: RpcMetricsLayer,
    stopped: &watch::Receiver<bool>,
) -> ApiRouter {
    use lanyard_proto::spire::api::server::bundle::v1::bundle_server::BundleServer;
    use lanyard_proto::spire::api::server::svid::v1::svid_server::SvidServer;

    let rate_limits = Arc::new(crate::ratelimit::RateLimits::new(&state.config.limits));
    tonic::transport::Server::builder()
        .layer(rpc_metrics)
        .add_service(
            AgentService::new(Arc::clone(state), x509pop_anchors)
                .with_k8s_psat(k8s_psat)
                .with_rate_limits(Arc::clone(&rate_limits))
                .into_server(),
        )
        .add_service(EntryService::new(Arc::clone(state)).into_server())
        .add_service(SvidServer::new(
            SvidService::new(Arc::clone(state)).with_rate_limits(rate_limits),
        ))
        .add_service(BundleServer::new(BundleService::new(Arc::clone(state))))
        .add_service(EntryMetadataService::new(Arc::clone(state)).into_server())
        .add_service(GovernedEntryService::new(Arc::clone(state)).into_server())
        .add_service(ExceptionService::new(Arc::clone(state)).into_server())
        .add_service(UsageService::new(Arc::clone(state)).into_server())
        .add_service(LocalAuthorityService::new(Arc::clone(state)).into_server())
        .add_service(TrustDomainService::new(Arc::clone(state)).into_server())
        .add_service(AgentChangeService::new(Arc::clone(state), stopped.clone()).into_server())
        .add_service(RevocationService::new(Arc::clone(state)).into_server())
        .add_service(AgentRevocationService::new(Arc::clone(state)).into_server())
}

/// Binds a public endpoint's listener.
async fn bind_endpoint(address: SocketAddr) -> Result<(TcpListener, SocketAddr), ServerError> {
    let bind_error = |error| ServerError::Bind {
        what: address.to_string(),
        error,
    };
    let listener = TcpListener::bind(address).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    Ok((listener, bound))
}

/// Loads a certificate pair and watches its files until the server stops.
fn watched_cert_files(
    certificate_path: Option<&Path>,
    private_key_path: Option<&Path>,
    stopped: &watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> Result<Arc<CertFiles>, ServerError> {
    // `ServerConfig::check` requires both; a config built in code may lack them.
    let (Some(certificate_path), Some(private_key_path)) = (certificate_path, private_key_path)
    else {
        return Err(ServerError::Endpoint(
            "a TLS endpoint needs certificate_path and private_key_path",
        ));
    };
    let files = Arc::new(CertFiles::load(certificate_path, private_key_path)?);
    let mut files_stopped = stopped.clone();
    tasks.spawn(
        Arc::clone(&files).watch(CERT_FILES_CHECK_INTERVAL, async move {
            let _ = files_stopped.wait_for(|s| *s).await;
        }),
    );
    Ok(files)
}

/// Starts the bundle endpoint if `[federation.bundle_endpoint]` is configured.
async fn start_bundle_endpoint(
    state: &Arc<ServerState>,
    server_svid: &Arc<ServerSvid>,
    stopped: &watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> Result<Option<SocketAddr>, ServerError> {
    let Some(config) = state.config.federation.bundle_endpoint.clone() else {
        return Ok(None);
    };
    let resolver: Arc<dyn rustls::server::ResolvesServerCert> = match config.profile {
        BundleEndpointProfile::HttpsSpiffe => Arc::clone(server_svid) as _,
        BundleEndpointProfile::HttpsWeb => watched_cert_files(
            config.certificate_path.as_deref(),
            config.private_key_path.as_deref(),
            stopped,
            tasks,
        )?,
    };
    let tls = crate::endpoints::tls_config(resolver).map_err(TlsError::Rustls)?;
    if config.refresh_hint < Duration::from_secs(60) {
        tracing::warn!(refresh_hint = ?config.refresh_hint, "the bundle endpoint's refresh_hint is under a minute; SPIRE servers do not refresh more often than once a minute");
    } else if config.refresh_hint >= Duration::from_secs(24 * 3600) {
        tracing::warn!(refresh_hint = ?config.refresh_hint, "the bundle endpoint's refresh_hint is a day or more; federated servers will miss unscheduled bundle changes for that long (5m is usual)");
    }
    let (listener, address) = bind_endpoint(config.address).await?;
    let revocations = Arc::downgrade(state);
    let responder =
        crate::endpoints::bundle::BundleEndpoint::new(Arc::clone(&state.ca), config.refresh_hint)
            .with_crls(Arc::new(move || {
                revocations
                    .upgrade()
                    .map(|state| {
                        state
                            .revocations
                            .crls()
                            .lists
                            .iter()
                            .map(|list| list.der.clone())
                            .collect()
                    })
                    .unwrap_or_default()
            }));
    tasks.spawn(crate::endpoints::serve(
        "bundle endpoint",
        listener,
        Transport::Tls(Arc::new(tls)),
        EndpointLimits {
            max_connections: config.max_connections,
            header_read_timeout: config.header_read_timeout,
        },
        Arc::new(responder),
        stopped.clone(),
    ));
    tracing::info!(%address, profile = config.profile.name(), refresh_hint = ?config.refresh_hint, "bundle endpoint serving");
    Ok(Some(address))
}

/// Serves `/live` and `/ready` on `health_address`, if set (plain HTTP, see
/// [`crate::endpoints::health`]).
async fn start_health(
    state: &Arc<ServerState>,
    datastore_writable: &Arc<std::sync::atomic::AtomicBool>,
    stopped: &watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> Result<Option<SocketAddr>, ServerError> {
    let Some(address) = state.config.health_address else {
        return Ok(None);
    };
    let (listener, address) = bind_endpoint(address).await?;
    let responder =
        crate::endpoints::health::Health::new(Arc::clone(state), Arc::clone(datastore_writable));
    tasks.spawn(crate::endpoints::serve(
        "health",
        listener,
        Transport::InsecureHttp,
        EndpointLimits {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(10),
        },
        Arc::new(responder),
        stopped.clone(),
    ));
    tracing::info!(%address, "health checks serving (/live, /ready)");
    Ok(Some(address))
}

/// Serves `/metrics` on `metrics_address`, if set (plain HTTP, see
/// [`crate::endpoints::metrics`]), and returns the gRPC call metrics for the routers.
async fn start_metrics(
    state: &Arc<ServerState>,
    datastore: Option<&crate::datastore::metered::DatastoreMetrics>,
    stopped: &watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> Result<(Option<SocketAddr>, Option<Arc<RpcMetrics>>), ServerError> {
    let Some(address) = state.config.metrics_address else {
        return Ok((None, None));
    };
    let (listener, address) = bind_endpoint(address).await?;
    let (registry, rpc) = crate::metrics::registry(state, datastore);
    tasks.spawn(crate::endpoints::serve(
        "metrics",
        listener,
        Transport::InsecureHttp,
        EndpointLimits {
            max_connections: 16,
            header_read_timeout: Duration::from_secs(10),
        },
        Arc::new(crate::endpoints::metrics::Metrics::new(Arc::new(registry))),
        stopped.clone(),
    ));
    tracing::info!(%address, "metrics serving (/metrics)");
    Ok((Some(address), Some(rpc)))
}

/// Starts OIDC discovery if `[oidc_discovery]` is configured.
async fn start_oidc_discovery(
    state: &Arc<ServerState>,
    stopped: &watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> Result<Option<SocketAddr>, ServerError> {
    let Some(config) = state.config.oidc_discovery.clone() else {
        return Ok(None);
    };
    // `ServerConfig::check` requires it; a config built in code may lack it.
    let Some(issuer) = state.config.jwt_issuer.clone() else {
        return Err(ServerError::Endpoint("[oidc_discovery] needs jwt_issuer"));
    };
    let transport = if config.insecure_http {
        tracing::warn!(address = %config.address, "OIDC discovery is served over plain HTTP (insecure_http = true); only a TLS-terminating proxy should reach it");
        Transport::InsecureHttp
    } else {
        let files = watched_cert_files(
            config.certificate_path.as_deref(),
            config.private_key_path.as_deref(),
            stopped,
            tasks,
        )?;
        Transport::Tls(Arc::new(
            crate::endpoints::tls_config(files).map_err(TlsError::Rustls)?,
        ))
    };
    let (listener, address) = bind_endpoint(config.address).await?;
    let responder = crate::endpoints::oidc::OidcDiscovery::new(
        Arc::clone(&state.ca),
        &issuer,
        config.cache_max_age,
    );
    tasks.spawn(crate::endpoints::serve(
        "OIDC discovery",
        listener,
        transport,
        EndpointLimits {
            max_connections: config.max_connections,
            header_read_timeout: config.header_read_timeout,
        },
        Arc::new(responder),
        stopped.clone(),
    ));
    tracing::info!(%address, %issuer, "OIDC discovery serving");
    Ok(Some(address))
}

/// Refuses to start on a missing or empty SQLite datastore when the data directory still
/// holds key files or an audit log: that is a trust domain whose datastore was lost, and
/// opening would create an empty one and, with it, a new CA.
fn check_datastore_not_lost(config: &ServerConfig) -> Result<(), ServerError> {
    if config.datastore.kind != DatastoreKind::Sqlite {
        return Ok(());
    }
    let datastore = config.datastore_path();
    let problem = match std::fs::metadata(&datastore) {
        Ok(metadata) if metadata.len() > 0 => return Ok(()),
        Ok(_) => "empty",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "missing",
        // Unreadable for another reason: opening it will say why.
        Err(_) => return Ok(()),
    };
    let mut prior = Vec::new();
    if config.key_manager.kind == KeyManagerKind::Disk {
        let keys = config.key_directory();
        if let Ok(dir) = std::fs::read_dir(&keys) {
            let mut files: Vec<String> = dir
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.ends_with(".key"))
                .map(|name| keys.join(name).display().to_string())
                .collect();
            files.sort();
            prior.extend(files);
        }
    }
    let audit = config.audit_log_path();
    if std::fs::metadata(&audit).is_ok_and(|m| m.len() > 0) {
        prior.push(audit.display().to_string());
    }
    if prior.is_empty() {
        return Ok(());
    }
    Err(ServerError::DatastoreLost {
        datastore,
        problem,
        prior,
    })
}

fn read_certificates(path: &Path) -> Result<Vec<Vec<u8>>, ServerError> {
    let error = |reason: String| ServerError::X509PopBundle {
        path: path.to_owned(),
        reason,
    };
    let certs: Vec<Vec<u8>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(e.to_string()))?
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| error(e.to_string()))?;
    if certs.is_empty() {
        return Err(error("no certificates found".into()));
    }
    Ok(certs)
}

async fn rotate(
    state: Arc<ServerState>,
    svid: Arc<ServerSvid>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut interval = tokio::time::interval(ROTATION_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stop = tokio::select! {
            _ = interval.tick() => false,
            () = state.rotation_requested() => false,
            _ = stopped.wait_for(|s| *s) => true,
        };
        if stop {
            return;
        }
        let now = state.now();
        let rotated = match state.ca.rotate(now).await {
            Ok(report) if report.changed() => {
                tracing::info!(?report, "CA rotated");
                true
            }
            Ok(_) => false,
            Err(error) => {
                tracing::error!(%error, "CA rotation failed");
                false
            }
        };
        if rotated || state.revocations.due(now) {
            state.refresh_revocations().await;
        }
        if let Some(before) = now.checked_sub(crate::revocations::PUBLISHED_CRL_RETENTION)
            && let Err(error) = state.store.prune_published_crls(before).await
        {
            tracing::warn!(%error, "pruning published CRLs failed");
        }
        match state.store.prune_revocations(now).await {
            Ok(0) => {}
            Ok(pruned) => {
                tracing::info!(pruned, "dropped revocations whose SVIDs have all expired")
            }
            Err(error) => tracing::warn!(%error, "pruning revocations failed"),
        }
        if let Err(error) = state.ca.check_key_files() {
            tracing::error!(%error, "checking the CA's key files failed");
        }
        if let Err(error) = svid.rotate_if_needed(&state.ca, now) {
            tracing::error!(%error, "server SVID rotation failed");
        }
        if let Err(error) = state.store.prune_join_tokens(now).await {
            tracing::warn!(%error, "pruning join tokens failed");
        }
        // Exceptions written through another server sharing the datastore.
        if let Err(error) = state.reload_exceptions().await {
            tracing::warn!(%error, "reloading exceptions failed");
        }
        let retention = state.config.ledger_retention;
        if let Some(cutoff) = now.checked_sub(retention) {
            match state.store.prune_issuances(cutoff).await {
                Ok(0) => {}
                Ok(pruned) => tracing::debug!(pruned, "pruned issuance records past retention"),
                Err(error) => tracing::warn!(%error, "pruning the usage ledger failed"),
            }
        }
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    #[test]
    fn a_printed_chain_says_each_cause_once() {
        let errors = [
            ServerError::from(DatastoreError::Backend(
                "cannot connect to PostgreSQL".into(),
            )),
            ServerError::Bind {
                what: "127.0.0.1:8081".into(),
                error: std::io::Error::from(std::io::ErrorKind::AddrInUse),
            },
        ];
        for error in errors {
            let text = error.to_string();
            assert!(std::error::Error::source(&error).is_none(), "{text}");
        }
        let text = ServerError::from(DatastoreError::Backend("no route".into())).to_string();
        assert_eq!(text.matches("no route").count(), 1, "{text}");
    }
}
