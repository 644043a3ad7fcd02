//! Agent configuration, read from TOML. Unknown keys are rejected with their name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lanyard_core::TrustDomain;
use lanyard_core::keys::KeyType;
use serde::Deserialize;

/// Default Workload API socket.
pub const DEFAULT_SOCKET_PATH: &str = "/tmp/lanyard/agent/public/api.sock";
/// Default interval between syncs with the server.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(5);
/// Default interval between syncs while the server pushes changes (the safety net for a lost
/// notice).
pub const DEFAULT_PUSH_SYNC_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Default bound on cached X.509-SVIDs.
pub const DEFAULT_X509_SVID_CACHE_SIZE: usize = 1000;
/// Default bound on cached JWT-SVIDs.
pub const DEFAULT_JWT_SVID_CACHE_SIZE: usize = 1000;
/// Default cap on open Workload API connections per caller uid.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 128;
/// Default cap on concurrent HTTP/2 streams (calls) per Workload API connection.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// Default time a workload has to take a pushed message before its connection is closed.
pub const DEFAULT_STREAM_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default sustained rate of Workload API calls per caller uid.
pub const DEFAULT_REQUESTS_PER_SECOND_PER_UID: u32 = 500;
/// Default burst of Workload API calls per caller uid above the sustained rate.
pub const DEFAULT_REQUEST_BURST_PER_UID: u32 = 1000;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key, or a value of the wrong type.
    #[error("{0}")]
    Parse(String),
    /// A value parsed but is not acceptable.
    #[error("invalid value for {key}: {reason}")]
    Invalid {
        /// The offending key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The server addresses an agent may use, `host:port` each, in the order it tries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddresses(Vec<String>);

impl ServerAddresses {
    /// Several addresses, tried in this order.
    pub fn new(addresses: Vec<String>) -> Self {
        Self(addresses)
    }

    /// The addresses, in order.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |reason: String| {
            Err(ConfigError::Invalid {
                key: "server_address",
                reason,
            })
        };
        if self.0.is_empty() {
            return invalid("names no server".into());
        }
        for address in &self.0 {
            let port_ok = address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return invalid(format!("{address:?} is not host:port"));
            }
        }
        Ok(())
    }
}

impl From<String> for ServerAddresses {
    fn from(address: String) -> Self {
        Self(vec![address])
    }
}

impl From<&str> for ServerAddresses {
    fn from(address: &str) -> Self {
        Self(vec![address.to_owned()])
    }
}

impl From<Vec<String>> for ServerAddresses {
    fn from(addresses: Vec<String>) -> Self {
        Self(addresses)
    }
}

impl std::fmt::Display for ServerAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl<'de> Deserialize<'de> for ServerAddresses {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        match OneOrMany::deserialize(deserializer) {
            Ok(OneOrMany::One(address)) => Ok(Self(vec![address])),
            Ok(OneOrMany::Many(addresses)) => Ok(Self(addresses)),
            Err(_) => Err(serde::de::Error::custom(
                "expected \"host:port\" or a list of them",
            )),
        }
    }
}

/// The agent's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The server's TCP address, `host:port`, or several (a list), tried in order: the agent
    /// stays with the one it reached and moves on when a connection fails. A host name is
    /// resolved at every connection, and each address it resolves to is tried in turn with
    /// its own 3 s, the one that answered last first.
    pub server_address: ServerAddresses,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// PEM file with the trust domain's CA certificates, used to authenticate the server
    /// before the first attestation.
    #[serde(default)]
    pub trust_bundle_path: Option<PathBuf>,
    /// Skip server authentication on first contact (check only the server's SPIFFE ID).
    /// Insecure: anyone on the network path could impersonate the server once.
    #[serde(default)]
    pub insecure_bootstrap: bool,
    /// Where the agent keeps its SVID, key and bundle; made owner-only.
    pub data_dir: PathBuf,
    /// The Workload API socket; its directory is world-accessible.
    #[serde(default = "default_socket_path")]
    pub socket_path: PathBuf,
    /// Plain-HTTP `/live` and `/ready` for probes (a DaemonSet's `httpGet`); off when absent.
    #[serde(default)]
    pub health_address: Option<std::net::SocketAddr>,
    /// Plain-HTTP `GET /metrics` in the Prometheus text format; off when absent.
    #[serde(default)]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// A join token for the first attestation.
    #[serde(default)]
    pub join_token: Option<String>,
    /// How to attest the node.
    #[serde(default)]
    pub node_attestor: NodeAttestorConfig,
    /// How to identify workloads.
    #[serde(default)]
    pub workload_attestor: WorkloadAttestorConfig,
    /// What one caller may take of the Workload API.
    #[serde(default)]
    pub workload_api: WorkloadApiConfig,
    /// Envoy's Secret Discovery Service on the Workload API socket.
    #[serde(default)]
    pub sds: SdsConfig,
    /// How often to sync entries and bundles.
    #[serde(default = "default_sync_interval", with = "duration")]
    pub sync_interval: Duration,
    /// How often to sync while the server pushes changes (a Lanyard server's change stream):
    /// the safety net for a lost notice. Never more often than `sync_interval`.
    #[serde(default = "default_push_sync_interval", with = "duration")]
    pub push_sync_interval: Duration,
    /// The most X.509-SVIDs kept.
    #[serde(default = "default_x509_cache")]
    pub x509_svid_cache_size: usize,
    /// The most JWT-SVIDs kept.
    #[serde(default = "default_jwt_cache")]
    pub jwt_svid_cache_size: usize,
    /// Key type of workload SVID keys.
    #[serde(default, with = "key_type")]
    pub workload_key_type: KeyType,
    /// Log level.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Log format: `text` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
}

/// Node attestor configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAttestorConfig {
    /// Attest with an x509pop certificate and key.
    #[serde(default)]
    pub x509pop: Option<X509PopConfig>,
    /// Attest with a Kubernetes projected service account token.
    #[serde(default)]
    pub k8s_psat: Option<K8sPsatConfig>,
}

/// Where SPIRE's agent reads its projected service account token by default.
pub const DEFAULT_K8S_PSAT_TOKEN_PATH: &str = "/var/run/secrets/tokens/spire-agent";

/// k8s_psat agent settings, in SPIRE's terms.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sPsatConfig {
    /// The cluster's name, as the server knows it.
    pub cluster: String,
    /// The projected service account token, read anew at every attestation (the kubelet
    /// rotates it).
    #[serde(default = "default_k8s_psat_token_path")]
    pub token_path: PathBuf,
}

fn default_k8s_psat_token_path() -> PathBuf {
    PathBuf::from(DEFAULT_K8S_PSAT_TOKEN_PATH)
}

/// x509pop agent settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509PopConfig {
    /// PEM certificate (leaf first, then intermediates).
    pub certificate_path: PathBuf,
    /// PEM PKCS#8 private key.
    pub private_key_path: PathBuf,
}

/// Limits on the Workload API, so that one local process (or all the processes of one uid)
/// cannot exhaust the agent's descriptors, memory or CPU and starve the other workloads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadApiConfig {
    /// Connections one uid may hold open at once; more are closed as they are accepted.
    #[serde(default = "default_max_connections_per_uid")]
    pub max_connections_per_uid: usize,
    /// Concurrent calls (HTTP/2 streams) per connection; clients queue the rest.
    #[serde(default = "default_max_streams_per_connection")]
    pub max_streams_per_connection: u32,
    /// How long a streamed message may wait for the workload to read it before the
    /// connection is closed (and its memory freed). A workload reading its stream never
    /// waits more than a moment.
    #[serde(default = "default_stream_send_timeout", with = "duration")]
    pub stream_send_timeout: Duration,
    /// Sustained Workload API calls per second per uid (0: no limit); calls over the limit
    /// fail with `ResourceExhausted`.
    #[serde(default = "default_requests_per_second_per_uid")]
    pub requests_per_second_per_uid: u32,
    /// Calls per uid allowed at once above the sustained rate.
    #[serde(default = "default_request_burst_per_uid")]
    pub request_burst_per_uid: u32,
}

impl Default for WorkloadApiConfig {
    fn default() -> Self {
        Self {
            max_connections_per_uid: DEFAULT_MAX_CONNECTIONS_PER_UID,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            stream_send_timeout: DEFAULT_STREAM_SEND_TIMEOUT,
            requests_per_second_per_uid: DEFAULT_REQUESTS_PER_SECOND_PER_UID,
            request_burst_per_uid: DEFAULT_REQUEST_BURST_PER_UID,
        }
    }
}

impl WorkloadApiConfig {
    /// Checks that every limit lets a workload through.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.max_connections_per_uid == 0 {
            return invalid(
                "workload_api.max_connections_per_uid",
                "must be greater than zero",
            );
        }
        if self.max_streams_per_connection == 0 {
            return invalid(
                "workload_api.max_streams_per_connection",
                "must be greater than zero",
            );
        }
        if self.stream_send_timeout.is_zero() {
            return invalid(
                "workload_api.stream_send_timeout",
                "must be greater than zero",
            );
        }
        if self.requests_per_second_per_uid > 0 && self.request_burst_per_uid == 0 {
            return invalid(
                "workload_api.request_burst_per_uid",
                "must be at least 1 while requests_per_second_per_uid is set",
            );
        }
        Ok(())
    }
}

/// Envoy's Secret Discovery Service (SDS v3), served on the Workload API socket beside the
/// Workload API, with SPIRE's agent's `sds` keys and defaults.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdsConfig {
    /// Serve SDS at all (on by default, as in SPIRE).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The resource name that means "the caller's first X.509-SVID".
    #[serde(default = "default_sds_svid_name")]
    pub default_svid_name: String,
    /// The resource name that means "the caller's own trust domain's bundle".
    #[serde(default = "default_sds_bundle_name")]
    pub default_bundle_name: String,
    /// The resource name that means "every bundle the caller may trust: its own trust
    /// domain's and those its entries federate with", as one SPIFFE validator config.
    #[serde(default = "default_sds_all_bundles_name")]
    pub default_all_bundles_name: String,
    /// Send validation contexts as plain trusted CAs instead of Envoy's SPIFFE certificate
    /// validator (`envoy.tls.cert_validator.spiffe`, Envoy 1.18 and later). An Envoy may
    /// also ask for either through its node metadata key `disable_spiffe_cert_validation`.
    #[serde(default)]
    pub disable_spiffe_cert_validation: bool,
}

fn default_true() -> bool {
    true
}

fn default_sds_svid_name() -> String {
    "default".to_owned()
}

fn default_sds_bundle_name() -> String {
    "ROOTCA".to_owned()
}

fn default_sds_all_bundles_name() -> String {
    "ALL".to_owned()
}

impl Default for SdsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            default_svid_name: default_sds_svid_name(),
            default_bundle_name: default_sds_bundle_name(),
            default_all_bundles_name: default_sds_all_bundles_name(),
            disable_spiffe_cert_validation: false,
        }
    }
}

impl SdsConfig {
    /// Checks that the three default names are set and distinct, so that a request for one
    /// can never be answered with another.
    pub fn check(&self) -> Result<(), ConfigError> {
        let names = [
            ("sds.default_svid_name", &self.default_svid_name),
            ("sds.default_bundle_name", &self.default_bundle_name),
            (
                "sds.default_all_bundles_name",
                &self.default_all_bundles_name,
            ),
        ];
        for (i, (key, name)) in names.iter().enumerate() {
            if name.is_empty() {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "cannot be empty".into(),
                });
            }
            if name.starts_with("spiffe://") {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{name:?} would shadow a SPIFFE ID; choose a plain name"),
                });
            }
            if let Some((other, _)) = names[..i].iter().find(|(_, n)| n == name) {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{name:?} is already the value of {other}"),
                });
            }
        }
        Ok(())
    }
}

/// Workload attestor configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadAttestorConfig {
    /// The Unix attestor (always on; this table tunes it).
    #[serde(default)]
    pub unix: UnixAttestorConfig,
    /// SPIRE's `k8s` attestor: pod and container selectors from the kubelet, for callers
    /// whose cgroups place them in a pod. Off when the table is absent.
    #[serde(default)]
    pub k8s: Option<K8sAttestorConfig>,
}

impl WorkloadAttestorConfig {
    /// Checks the attestors' settings.
    pub fn check(&self) -> Result<(), ConfigError> {
        match &self.k8s {
            Some(k8s) => k8s.check(),
            None => Ok(()),
        }
    }
}

/// The kubelet's HTTPS port, where SPIRE's agent asks for `/pods` by default.
pub const DEFAULT_KUBELET_SECURE_PORT: u16 = 10250;
/// The cluster CA that a pod sees, which SPIRE's agent verifies the kubelet against.
pub const DEFAULT_KUBELET_CA_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The pod's service account token, which SPIRE's agent presents to the kubelet.
pub const DEFAULT_KUBELET_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The environment variable holding the node name (set from the downward API).
pub const DEFAULT_NODE_NAME_ENV: &str = "MY_NODE_NAME";
/// How many times the pod list is searched for a caller's container before giving up.
pub const DEFAULT_MAX_POLL_ATTEMPTS: u32 = 60;
/// The time between two searches, and the least time between two kubelet requests.
pub const DEFAULT_POLL_RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// k8s workload attestor settings, with SPIRE's names. `kubelet_host` is Lanyard's own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sAttestorConfig {
    /// The kubelet's HTTPS port (default 10250).
    #[serde(default)]
    pub kubelet_secure_port: Option<u16>,
    /// The kubelet's read-only HTTP port, reached on 127.0.0.1 without credentials; 0 or
    /// absent: not used. Excludes `kubelet_secure_port`.
    #[serde(default)]
    pub kubelet_read_only_port: Option<u16>,
    /// The host to reach the kubelet's secure port on, and the name its certificate must
    /// carry. Default as in SPIRE: the node name, or 127.0.0.1 when there is none (and then
    /// the certificate's chain is verified but not its name).
    #[serde(default)]
    pub kubelet_host: Option<String>,
    /// Accept any certificate from the kubelet. Insecure: whoever answers on the kubelet's
    /// address gets the token and decides every pod's selectors.
    #[serde(default)]
    pub skip_kubelet_verification: bool,
    /// CA certificates (PEM) to verify the kubelet's certificate with, read at every request.
    #[serde(default = "default_kubelet_ca_path")]
    pub kubelet_ca_path: PathBuf,
    /// The bearer token for the kubelet, read at every request (projected tokens rotate).
    #[serde(default = "default_kubelet_token_path")]
    pub token_path: PathBuf,
    /// The environment variable holding the node name.
    #[serde(default = "default_node_name_env")]
    pub node_name_env: String,
    /// The node name; takes precedence over `node_name_env`.
    #[serde(default)]
    pub node_name: Option<String>,
    /// How many times the pod list is searched for the caller's container (a container just
    /// started may not be in it yet) before attestation fails.
    #[serde(default = "default_max_poll_attempts")]
    pub max_poll_attempts: u32,
    /// The time between searches; also how long a pod list is reused, and the least time
    /// between two requests to the kubelet, however many callers wait.
    #[serde(default = "default_poll_retry_interval", with = "duration")]
    pub poll_retry_interval: Duration,
    /// Leave out the container selectors (`container-name`, `container-image`), and attest
    /// with the pod's alone even before the caller's container shows in the pod's status.
    #[serde(default)]
    pub disable_container_selectors: bool,
}

impl Default for K8sAttestorConfig {
    fn default() -> Self {
        Self {
            kubelet_secure_port: None,
            kubelet_read_only_port: None,
            kubelet_host: None,
            skip_kubelet_verification: false,
            kubelet_ca_path: default_kubelet_ca_path(),
            token_path: default_kubelet_token_path(),
            node_name_env: default_node_name_env(),
            node_name: None,
            max_poll_attempts: DEFAULT_MAX_POLL_ATTEMPTS,
            poll_retry_interval: DEFAULT_POLL_RETRY_INTERVAL,
            disable_container_selectors: false,
        }
    }
}

/// Where and how the k8s attestor asks the kubelet for its pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeletEndpoint {
    /// HTTPS with the bearer token from `token_path`.
    Secure {
        /// The host connected to.
        host: String,
        /// The port.
        port: u16,
        /// What the certificate is checked against.
        verification: KubeletVerification,
    },
    /// Plain HTTP to 127.0.0.1 without credentials (the read-only port).
    ReadOnly {
        /// The port.
        port: u16,
    },
}

/// How the kubelet's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeletVerification {
    /// Chained to `kubelet_ca_path` and valid for this name (DNS name or IP address).
    ChainAndName(String),
    /// Chained to `kubelet_ca_path`, whatever names it holds: SPIRE's rule when it reaches
    /// the kubelet on 127.0.0.1 for want of a node name.
    ChainOnly,
    /// Not checked (`skip_kubelet_verification`).
    Skip,
}

impl K8sAttestorConfig {
    /// Checks values that parse but cannot work.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.kubelet_secure_port == Some(0) {
            return invalid(
                "workload_attestor.k8s.kubelet_secure_port",
                "must be greater than zero",
            );
        }
        if self.read_only_port().is_some() {
            if self.kubelet_secure_port.is_some() {
                return invalid(
                    "workload_attestor.k8s.kubelet_read_only_port",
                    "cannot be used with kubelet_secure_port",
                );
            }
            if self.kubelet_host.is_some() {
                return invalid(
                    "workload_attestor.k8s.kubelet_host",
                    "applies to the secure port; the read-only port is only reached on 127.0.0.1",
                );
            }
        }
        if let Some(host) = &self.kubelet_host
            && let Err(reason) = check_host(host)
        {
            return invalid("workload_attestor.k8s.kubelet_host", &reason);
        }
        if let Some(node_name) = &self.node_name
            && let Err(reason) = check_host(node_name)
        {
            return invalid("workload_attestor.k8s.node_name", &reason);
        }
        if self.node_name_env.is_empty() {
            return invalid("workload_attestor.k8s.node_name_env", "cannot be empty");
        }
        if self.max_poll_attempts == 0 {
            return invalid(
                "workload_attestor.k8s.max_poll_attempts",
                "must be greater than zero",
            );
        }
        if self.poll_retry_interval.is_zero() {
            return invalid(
                "workload_attestor.k8s.poll_retry_interval",
                "must be greater than zero",
            );
        }
        Ok(())
    }

    fn read_only_port(&self) -> Option<u16> {
        self.kubelet_read_only_port.filter(|port| *port > 0)
    }

    /// The node name: `node_name`, or else the value of the variable `node_name_env` names,
    /// looked up with `env` (empty counts as unset).
    pub fn resolve_node_name(&self, env: impl Fn(&str) -> Option<String>) -> Option<String> {
        self.node_name
            .clone()
            .or_else(|| env(&self.node_name_env))
            .filter(|name| !name.is_empty())
    }

    /// Where the kubelet is asked, as SPIRE's agent decides it: the read-only port on
    /// 127.0.0.1 when set; otherwise HTTPS on the secure port of `kubelet_host`, or of the
    /// node name, or of 127.0.0.1; the certificate must name the host connected to, except on
    /// the 127.0.0.1 fallback, where only its chain is verified.
    pub fn kubelet_endpoint(&self, node_name: Option<&str>) -> KubeletEndpoint {
        if let Some(port) = self.read_only_port() {
            return KubeletEndpoint::ReadOnly { port };
        }
        let port = self
            .kubelet_secure_port
            .unwrap_or(DEFAULT_KUBELET_SECURE_PORT);
        let named = self.kubelet_host.as_deref().or(node_name);
        let verification = match (self.skip_kubelet_verification, named) {
            (true, _) => KubeletVerification::Skip,
            (false, Some(host)) => KubeletVerification::ChainAndName(host.to_owned()),
            (false, None) => KubeletVerification::ChainOnly,
        };
        KubeletEndpoint::Secure {
            host: named.unwrap_or("127.0.0.1").to_owned(),
            port,
            verification,
        }
    }
}

/// A host the kubelet can be reached on and its certificate checked against: a DNS name or
/// an IP address.
pub fn check_host(host: &str) -> Result<(), String> {
    rustls::pki_types::ServerName::try_from(host)
        .map(|_| ())
        .map_err(|_| format!("{host:?} is not a DNS name or an IP address"))
}

/// Unix workload attestor settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnixAttestorConfig {
    /// Also emit `unix:path` and `unix:sha256` of the caller's executable.
    #[serde(default)]
    pub discover_workload_path: bool,
    /// Don't hash executables larger than this many bytes (0 = no limit).
    #[serde(default)]
    pub workload_size_limit: u64,
}

impl AgentConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.check()?;
        Ok(config)
    }

    /// A configuration with defaults for everything but the essentials.
    pub fn new(
        server_address: impl Into<ServerAddresses>,
        trust_domain: TrustDomain,
        data_dir: PathBuf,
    ) -> Self {
        Self {
            server_address: server_address.into(),
            trust_domain,
            trust_bundle_path: None,
            insecure_bootstrap: false,
            data_dir,
            socket_path: default_socket_path(),
            health_address: None,
            metrics_address: None,
            join_token: None,
            node_attestor: NodeAttestorConfig::default(),
            workload_attestor: WorkloadAttestorConfig::default(),
            workload_api: WorkloadApiConfig::default(),
            sds: SdsConfig::default(),
            sync_interval: DEFAULT_SYNC_INTERVAL,
            push_sync_interval: DEFAULT_PUSH_SYNC_INTERVAL,
            x509_svid_cache_size: DEFAULT_X509_SVID_CACHE_SIZE,
            jwt_svid_cache_size: DEFAULT_JWT_SVID_CACHE_SIZE,
            workload_key_type: KeyType::EcP256,
            log_level: default_log_level(),
            log_format: default_log_format(),
        }
    }

    /// Checks values that parse but make no sense together.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.server_address.check()?;
        if self.trust_bundle_path.is_some() && self.insecure_bootstrap {
            return Err(ConfigError::Invalid {
                key: "insecure_bootstrap",
                reason: "set either trust_bundle_path or insecure_bootstrap, not both".into(),
            });
        }
        let n_attestors = usize::from(self.join_token.is_some())
            + usize::from(self.node_attestor.x509pop.is_some())
            + usize::from(self.node_attestor.k8s_psat.is_some());
        if n_attestors > 1 {
            return Err(ConfigError::Invalid {
                key: "join_token",
                reason: "set one of join_token, [node_attestor.x509pop] or \
                         [node_attestor.k8s_psat], not several"
                    .into(),
            });
        }
        if self
            .node_attestor
            .k8s_psat
            .as_ref()
            .is_some_and(|psat| psat.cluster.is_empty())
        {
            return Err(ConfigError::Invalid {
                key: "node_attestor.k8s_psat.cluster",
                reason: "cannot be empty".into(),
            });
        }
        if self.sync_interval.is_zero() {
            return Err(ConfigError::Invalid {
                key: "sync_interval",
                reason: "must be greater than zero".into(),
            });
        }
        if self.push_sync_interval.is_zero() {
            return Err(ConfigError::Invalid {
                key: "push_sync_interval",
                reason: "must be greater than zero".into(),
            });
        }
        if self.x509_svid_cache_size == 0 || self.jwt_svid_cache_size == 0 {
            return Err(ConfigError::Invalid {
                key: "x509_svid_cache_size",
                reason: "cache sizes must be greater than zero".into(),
            });
        }
        if matches!(self.workload_key_type, KeyType::Rsa2048 | KeyType::Rsa4096) {
            return Err(ConfigError::Invalid {
                key: "workload_key_type",
                reason: "RSA keys cannot be generated by this build; use ec-p256 or ec-p384".into(),
            });
        }
        self.workload_api.check()?;
        self.sds.check()?;
        self.workload_attestor.check()?;
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid {
                key: "log_format",
                reason: format!("{:?} is not text or json", self.log_format),
            });
        }
        Ok(())
    }
}

fn default_socket_path() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET_PATH)
}
fn default_sync_interval() -> Duration {
    DEFAULT_SYNC_INTERVAL
}
fn default_push_sync_interval() -> Duration {
    DEFAULT_PUSH_SYNC_INTERVAL
}
fn default_x509_cache() -> usize {
    DEFAULT_X509_SVID_CACHE_SIZE
}
fn default_jwt_cache() -> usize {
    DEFAULT_JWT_SVID_CACHE_SIZE
}
fn default_max_connections_per_uid() -> usize {
    DEFAULT_MAX_CONNECTIONS_PER_UID
}
fn default_max_streams_per_connection() -> u32 {
    DEFAULT_MAX_STREAMS_PER_CONNECTION
}
fn default_stream_send_timeout() -> Duration {
    DEFAULT_STREAM_SEND_TIMEOUT
}
fn default_requests_per_second_per_uid() -> u32 {
    DEFAULT_REQUESTS_PER_SECOND_PER_UID
}
fn default_request_burst_per_uid() -> u32 {
    DEFAULT_REQUEST_BURST_PER_UID
}
fn default_kubelet_ca_path() -> PathBuf {
    PathBuf::from(DEFAULT_KUBELET_CA_PATH)
}
fn default_kubelet_token_path() -> PathBuf {
    PathBuf::from(DEFAULT_KUBELET_TOKEN_PATH)
}
fn default_node_name_env() -> String {
    DEFAULT_NODE_NAME_ENV.to_owned()
}
fn default_max_poll_attempts() -> u32 {
    DEFAULT_MAX_POLL_ATTEMPTS
}
fn default_poll_retry_interval() -> Duration {
    DEFAULT_POLL_RETRY_INTERVAL
}
fn default_log_level() -> String {
    "info".to_owned()
}
fn default_log_format() -> String {
    "text".to_owned()
}

mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration ({e})")))
    }
}

mod key_type {
    use lanyard_core::keys::KeyType;
    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<KeyType, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k8s_psat_in_spire_terms() {
        let base = "server_address = \"127.0.0.1:8081\"\ntrust_domain = \"example.org\"\n\
                    data_dir = \"/d\"\ninsecure_bootstrap = true\n";
        let c = AgentConfig::parse(&format!(
            "{base}[node_attestor.k8s_psat]\ncluster = \"demo\"\n"
        ))
        .expect("parses");
        let psat = c.node_attestor.k8s_psat.expect("k8s_psat");
        assert_eq!(psat.cluster, "demo");
        assert_eq!(psat.token_path, Path::new(DEFAULT_K8S_PSAT_TOKEN_PATH));
        for (bad, expected) in [
            (
                "[node_attestor.k8s_psat]\ncluster = \"\"\n",
                "cannot be empty",
            ),
            (
                "[node_attestor.k8s_psat]\ntoken_path = \"/t\"\n",
                "missing field `cluster`",
            ),
            (
                "join_token = \"x\"\n[node_attestor.k8s_psat]\ncluster = \"demo\"\n",
                "not several",
            ),
        ] {
            let error = AgentConfig::parse(&format!("{base}{bad}"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(error.contains(expected), "{bad}: {error}");
        }
    }

    #[test]
    fn k8s_workload_attestor_in_spire_terms() {
        let base = "server_address = \"a:1\"\ntrust_domain = \"td\"\ndata_dir = \"/d\"\n";
        assert!(
            AgentConfig::parse(base)
                .unwrap()
                .workload_attestor
                .k8s
                .is_none(),
            "off unless configured"
        );
        let c = AgentConfig::parse(&format!("{base}[workload_attestor.k8s]\n")).unwrap();
        let k8s = c.workload_attestor.k8s.expect("k8s on");
        assert_eq!(k8s.kubelet_secure_port, None);
        assert_eq!(k8s.read_only_port(), None);
        assert!(!k8s.skip_kubelet_verification);
        assert_eq!(k8s.kubelet_ca_path, Path::new(DEFAULT_KUBELET_CA_PATH));
        assert_eq!(k8s.token_path, Path::new(DEFAULT_KUBELET_TOKEN_PATH));
        assert_eq!(k8s.node_name_env, "MY_NODE_NAME");
        assert_eq!(k8s.max_poll_attempts, 60);
        assert_eq!(k8s.poll_retry_interval, Duration::from_millis(500));
        assert!(!k8s.disable_container_selectors);

        let c = AgentConfig::parse(&format!(
            "{base}[workload_attestor.k8s]\nkubelet_secure_port = 11250\n\
             kubelet_host = \"127.0.0.1\"\nkubelet_ca_path = \"/t/ca.pem\"\n\
             token_path = \"/t/token\"\nnode_name = \"node-a\"\nnode_name_env = \"NODE\"\n\
             max_poll_attempts = 3\npoll_retry_interval = \"20ms\"\n\
             disable_container_selectors = true\nskip_kubelet_verification = false\n"
        ))
        .unwrap();
        let k8s = c.workload_attestor.k8s.unwrap();
        assert_eq!(k8s.kubelet_ca_path, Path::new("/t/ca.pem"));
        assert_eq!(k8s.token_path, Path::new("/t/token"));
        assert_eq!(k8s.max_poll_attempts, 3);
        assert_eq!(k8s.poll_retry_interval, Duration::from_millis(20));
        assert!(k8s.disable_container_selectors);
        assert_eq!(
            k8s.resolve_node_name(|_| Some("from-env".into()))
                .as_deref(),
            Some("node-a"),
            "node_name wins over the environment"
        );
        assert_eq!(
            k8s.kubelet_endpoint(Some("node-a")),
            KubeletEndpoint::Secure {
                host: "127.0.0.1".into(),
                port: 11250,
                verification: KubeletVerification::ChainAndName("127.0.0.1".into()),
            }
        );

        for (lines, key, says) in [
            (
                "kubelet_secure_port = 0",
                "kubelet_secure_port",
                "greater than zero",
            ),
            (
                "kubelet_secure_port = 10250\nkubelet_read_only_port = 10255",
                "kubelet_read_only_port",
                "cannot be used with kubelet_secure_port",
            ),
            (
                "kubelet_read_only_port = 10255\nkubelet_host = \"node-a\"",
                "kubelet_host",
                "127.0.0.1",
            ),
            ("kubelet_host = \"\"", "kubelet_host", "not a DNS name"),
            ("kubelet_host = \"a b\"", "kubelet_host", "not a DNS name"),
            ("node_name = \"no/de\"", "node_name", "not a DNS name"),
            ("node_name_env = \"\"", "node_name_env", "cannot be empty"),
            (
                "max_poll_attempts = 0",
                "max_poll_attempts",
                "greater than zero",
            ),
            (
                "poll_retry_interval = \"0s\"",
                "poll_retry_interval",
                "greater than zero",
            ),
            (
                "poll_retry_interval = \"soon\"",
                "poll_retry_interval",
                "not a duration",
            ),
            ("kubelet_secure_port = 70000", "kubelet_secure_port", ""),
            ("kubelet_port = 10250", "kubelet_port", "unknown field"),
        ] {
            let err = AgentConfig::parse(&format!("{base}[workload_attestor.k8s]\n{lines}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(says), "{lines}: {err}");
        }
    }

    #[test]
    fn the_kubelet_is_reached_as_spire_reaches_it() {
        let config = K8sAttestorConfig::default();
        // No node name: 127.0.0.1, the chain verified but not the name.
        assert_eq!(
            config.kubelet_endpoint(None),
            KubeletEndpoint::Secure {
                host: "127.0.0.1".into(),
                port: 10250,
                verification: KubeletVerification::ChainOnly,
            }
        );
        // The node name is the host and the name its certificate must hold.
        let env = |name: &str| (name == "MY_NODE_NAME").then(|| "node-a".to_owned());
        let node = config.resolve_node_name(env);
        assert_eq!(node.as_deref(), Some("node-a"));
        assert_eq!(
            config.kubelet_endpoint(node.as_deref()),
            KubeletEndpoint::Secure {
                host: "node-a".into(),
                port: 10250,
                verification: KubeletVerification::ChainAndName("node-a".into()),
            }
        );
        assert_eq!(config.resolve_node_name(|_| Some(String::new())), None);
        let skip = K8sAttestorConfig {
            skip_kubelet_verification: true,
            ..K8sAttestorConfig::default()
        };
        assert_eq!(
            skip.kubelet_endpoint(Some("node-a")),
            KubeletEndpoint::Secure {
                host: "node-a".into(),
                port: 10250,
                verification: KubeletVerification::Skip,
            }
        );
        let read_only = K8sAttestorConfig {
            kubelet_read_only_port: Some(10255),
            ..K8sAttestorConfig::default()
        };
        assert_eq!(
            read_only.kubelet_endpoint(Some("node-a")),
            KubeletEndpoint::ReadOnly { port: 10255 }
        );
        // 0 means the read-only port is not used.
        let zero = K8sAttestorConfig {
            kubelet_read_only_port: Some(0),
            ..K8sAttestorConfig::default()
        };
        assert!(matches!(
            zero.kubelet_endpoint(None),
            KubeletEndpoint::Secure { port: 10250, .. }
        ));
        zero.check().unwrap();
    }

    #[test]
    fn sample_parses() {
        let c = AgentConfig::parse(
            r#"
            server_address = "127.0.0.1:8081"
            trust_domain = "example.org"
            trust_bundle_path = "/etc/lanyard/bundle.pem"
            data_dir = "/var/lib/lanyard/agent"
            join_token = "abc"
            sync_interval = "10s"
            [workload_attestor.unix]
            discover_workload_path = true
            "#,
        )
        .unwrap();
        assert_eq!(c.socket_path, Path::new(DEFAULT_SOCKET_PATH));
        assert_eq!(c.sync_interval, Duration::from_secs(10));
        assert!(c.workload_attestor.unix.discover_workload_path);
        assert_eq!(c.join_token.as_deref(), Some("abc"));
    }

    /// The block under `key: |` in a YAML manifest of ours (its lines indented four spaces).
    fn embedded(manifest: &str, key: &str) -> String {
        let mut lines = manifest
            .lines()
            .skip_while(|line| line.trim() != format!("{key}: |"));
        assert!(lines.next().is_some(), "no {key} in the manifest");
        lines
            .take_while(|line| line.is_empty() || line.starts_with("    "))
            .map(|line| line.strip_prefix("    ").unwrap_or(line))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_kubernetes_config_map_parses() {
        let manifest = include_str!("../../../deploy/kubernetes/agent-config.yaml");
        let c = AgentConfig::parse(&embedded(manifest, "agent.toml")).unwrap();
        // The port of the DaemonSet's httpGet probes.
        assert_eq!(c.health_address.map(|a| a.port()), Some(8080));
        assert!(
            include_str!("../../../deploy/kubernetes/agent.yaml").contains("containerPort: 8080")
        );
        let psat = c
            .node_attestor
            .k8s_psat
            .as_ref()
            .expect("k8s_psat configured");
        assert_eq!(psat.cluster, "demo");
        // Where deploy/kubernetes/agent.yaml projects the token.
        assert_eq!(
            psat.token_path,
            std::path::Path::new("/var/run/secrets/tokens/lanyard-agent")
        );

        // The k8s workload attestor asks the kubelet at the node name the DaemonSet sets from
        // the downward API, with the service account token and CA mounted by default.
        let k8s = c.workload_attestor.k8s.as_ref().expect("k8s attestor on");
        let daemon_set = include_str!("../../../deploy/kubernetes/agent.yaml");
        let env_block = format!(
            "- name: {}\n              valueFrom:\n                fieldRef:\n                  \
             fieldPath: spec.nodeName\n",
            k8s.node_name_env
        );
        assert!(
            daemon_set.contains(&env_block),
            "agent.yaml does not set {} from spec.nodeName",
            k8s.node_name_env
        );
        assert!(!daemon_set.contains("automountServiceAccountToken: false"));
        assert_eq!(k8s.token_path, Path::new(DEFAULT_KUBELET_TOKEN_PATH));
        assert_eq!(k8s.kubelet_ca_path, Path::new(DEFAULT_KUBELET_CA_PATH));
        assert!(!k8s.skip_kubelet_verification);
        let node = k8s.resolve_node_name(|name| (name == "MY_NODE_NAME").then(|| "node-a".into()));
        assert_eq!(
            k8s.kubelet_endpoint(node.as_deref()),
            KubeletEndpoint::Secure {
                host: "node-a".into(),
                port: 10250,
                verification: KubeletVerification::ChainAndName("node-a".into()),
            }
        );
    }

    #[test]
    fn metrics_address_parses_and_is_off_when_absent() {
        let base = "server_address = \"a:1\"\ntrust_domain = \"td\"\ndata_dir = \"/d\"\n";
        let c =
            AgentConfig::parse(&format!("{base}metrics_address = \"127.0.0.1:9989\"\n")).unwrap();
        assert_eq!(c.metrics_address, Some("127.0.0.1:9989".parse().unwrap()));
        assert_eq!(AgentConfig::parse(base).unwrap().metrics_address, None);
        assert!(AgentConfig::parse(&format!("{base}metrics_address = \"9989\"\n")).is_err());
    }

    #[test]
    fn the_shipped_example_parses() {
        let c = AgentConfig::parse(include_str!("../../../deploy/agent.toml")).unwrap();
        assert_eq!(c.server_address.as_slice(), ["127.0.0.1:8081"]);
        assert!(!c.insecure_bootstrap);
        // The example states the defaults.
        let limits = &c.workload_api;
        let defaults = WorkloadApiConfig::default();
        assert_eq!(
            limits.max_connections_per_uid,
            defaults.max_connections_per_uid
        );
        assert_eq!(
            limits.max_streams_per_connection,
            defaults.max_streams_per_connection
        );
        assert_eq!(limits.stream_send_timeout, defaults.stream_send_timeout);
        assert_eq!(
            limits.requests_per_second_per_uid,
            defaults.requests_per_second_per_uid
        );
        assert_eq!(limits.request_burst_per_uid, defaults.request_burst_per_uid);
    }

    #[test]
    fn the_shipped_k8s_example_states_the_defaults() {
        let example = include_str!("../../../deploy/agent.toml");
        let block: String = example
            .lines()
            .skip_while(|line| *line != "# [workload_attestor.k8s]")
            .take_while(|line| line.starts_with('#'))
            .map(|line| format!("{}\n", line.trim_start_matches('#').trim_start()))
            .collect();
        assert!(block.starts_with("[workload_attestor.k8s]\n"), "{block}");
        let base = "server_address = \"a:1\"\ntrust_domain = \"td\"\ndata_dir = \"/d\"\n";
        let k8s = AgentConfig::parse(&format!("{base}{block}"))
            .unwrap()
            .workload_attestor
            .k8s
            .unwrap();
        let defaults = K8sAttestorConfig::default();
        assert_eq!(k8s.kubelet_host.as_deref(), Some("node-a"));
        assert_eq!(k8s.node_name.as_deref(), Some("node-a"));
        let without_host = K8sAttestorConfig {
            kubelet_host: None,
            ..k8s.clone()
        };
        assert_eq!(
            without_host.kubelet_endpoint(None),
            defaults.kubelet_endpoint(None)
        );
        assert_eq!(
            k8s.skip_kubelet_verification,
            defaults.skip_kubelet_verification
        );
        assert_eq!(k8s.kubelet_ca_path, defaults.kubelet_ca_path);
        assert_eq!(k8s.token_path, defaults.token_path);
        assert_eq!(k8s.node_name_env, defaults.node_name_env);
        assert_eq!(k8s.max_poll_attempts, defaults.max_poll_attempts);
        assert_eq!(k8s.poll_retry_interval, defaults.poll_retry_interval);
        assert_eq!(
            k8s.disable_container_selectors,
            defaults.disable_container_selectors
        );
    }

    #[test]
    fn sds_names_default_to_spires_and_must_be_distinct_plain_names() {
        let base = "server_address = \"a:1\"\ntrust_domain = \"td\"\ndata_dir = \"/d\"\n";
        let c = AgentConfig::parse(base).unwrap();
        assert_eq!(c.sds, SdsConfig::default());
        assert!(c.sds.enabled);
        assert_eq!(
            (
                c.sds.default_svid_name.as_str(),
                c.sds.default_bundle_name.as_str(),
                c.sds.default_all_bundles_name.as_str()
            ),
            ("default", "ROOTCA", "ALL")
        );
        let c = AgentConfig::parse(&format!(
            "{base}[sds]\ndefault_bundle_name = \"null\"\ndisable_spiffe_cert_validation = true\n"
        ))
        .unwrap();
        assert_eq!(c.sds.default_bundle_name, "null");
        assert!(c.sds.disable_spiffe_cert_validation);
        for (line, key) in [
            (
                "default_all_bundles_name = \"ROOTCA\"",
                "default_all_bundles_name",
            ),
            ("default_svid_name = \"\"", "default_svid_name"),
            (
                "default_bundle_name = \"spiffe://td\"",
                "default_bundle_name",
            ),
            ("default_name = \"x\"", "default_name"),
        ] {
            let err = AgentConfig::parse(&format!("{base}[sds]\n{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
    }

    #[test]
    fn workload_api_limits_are_checked() {
        let base = "server_address = \"a:1\"\ntrust_domain = \"td\"\ndata_dir = \"/d\"\n";
        let c = AgentConfig::parse(&format!(
            "{base}[workload_api]\nmax_connections_per_uid = 4\nstream_send_timeout = \"2s\"\nrequests_per_second_per_uid = 0\n"
        ))
        .unwrap();
        assert_eq!(c.workload_api.max_connections_per_uid, 4);
        assert_eq!(c.workload_api.stream_send_timeout, Duration::from_secs(2));
        assert_eq!(c.workload_api.requests_per_second_per_uid, 0);
        assert_eq!(
            c.workload_api.max_streams_per_connection,
            DEFAULT_MAX_STREAMS_PER_CONNECTION
        );
        for (line, key) in [
            ("max_connections_per_uid = 0", "max_connections_per_uid"),
            (
                "max_streams_per_connection = 0",
                "max_streams_per_connection",
            ),
            ("stream_send_timeout = \"0s\"", "stream_send_timeout"),
            ("request_burst_per_uid = 0", "request_burst_per_uid"),
            ("max_connection_per_uid = 3", "max_connection_per_uid"),
        ] {
            let err = AgentConfig::parse(&format!("{base}[workload_api]\n{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
    }

    #[test]
    fn unknown_and_conflicting_keys_are_named() {
        let base = "server_address = \"a:1\"\ntrust_domain = \"td\"\ndata_dir = \"/d\"\n";
        let err = AgentConfig::parse(&format!("{base}sync_intervall = \"1s\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sync_intervall"), "{err}");
        let err = AgentConfig::parse(&format!(
            "{base}insecure_bootstrap = true\ntrust_bundle_path = \"/b\""
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("insecure_bootstrap"), "{err}");
        let err = AgentConfig::parse(&format!("{base}sync_interval = \"0s\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sync_interval"), "{err}");
        let err = AgentConfig::parse(&format!("{base}push_sync_interval = \"0s\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("push_sync_interval"), "{err}");
        let c = AgentConfig::parse(base).unwrap();
        assert_eq!(c.push_sync_interval, DEFAULT_PUSH_SYNC_INTERVAL);
        let c = AgentConfig::parse(&format!("{base}push_sync_interval = \"1m\"")).unwrap();
        assert_eq!(c.push_sync_interval, Duration::from_secs(60));
    }

    #[test]
    fn server_address_is_one_address_or_a_list() {
        let rest = "trust_domain = \"td\"\ndata_dir = \"/d\"\n";
        let c = AgentConfig::parse(&format!(
            "server_address = [\"a.example:8081\", \"[::1]:8081\", \"10.0.0.2:8081\"]\n{rest}"
        ))
        .unwrap();
        assert_eq!(
            c.server_address.as_slice(),
            ["a.example:8081", "[::1]:8081", "10.0.0.2:8081"]
        );
        for (value, says) in [
            ("[]", "names no server"),
            ("[\"a:1\", \"b\"]", "\"b\" is not host:port"),
            ("\":8081\"", "is not host:port"),
            ("8081", "host:port"),
        ] {
            let err = AgentConfig::parse(&format!("server_address = {value}\n{rest}"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("server_address") && err.contains(says),
                "{value}: {err}"
            );
        }
    }
}
