//! Server configuration, read from TOML. Unknown keys are rejected with their name, so a typo
//! never silently falls back to a default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lanyard_core::keys::KeyType;
use lanyard_core::{SpiffeId, TrustDomain};
use serde::Deserialize;

/// Default TCP address of the server API.
pub const DEFAULT_BIND_ADDRESS: &str = "0.0.0.0:8081";
/// Default path of the admin socket.
pub const DEFAULT_SOCKET_PATH: &str = "/tmp/lanyard/server/private/api.sock";
/// Default lifetime of a CA authority.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default X.509-SVID lifetime.
pub const DEFAULT_X509_SVID_TTL: Duration = Duration::from_secs(3600);
/// Default JWT-SVID lifetime.
pub const DEFAULT_JWT_SVID_TTL: Duration = Duration::from_secs(300);

/// How long the usage ledger keeps issuance records by default.
pub const DEFAULT_LEDGER_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Default `AttestAgent` calls per second from one source address (SPIRE's `AttestLimitPerIP`).
pub const DEFAULT_ATTESTATIONS_PER_IP_PER_SECOND: f64 = 1.0;
/// Default SVIDs signed per second for one source address (SPIRE's `SignLimitPerIP`).
pub const DEFAULT_SIGNINGS_PER_IP_PER_SECOND: f64 = 500.0;
/// Default SVIDs signed per second for one agent: one full `BatchNewX509SVID` a second.
pub const DEFAULT_SIGNINGS_PER_AGENT_PER_SECOND: f64 = 500.0;
/// Default number of TLS connections that may be open without a client certificate.
pub const DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS: usize = 512;
/// Default `[limits] max_unauthenticated_connections_per_ip`.
pub const DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP: usize = 64;
/// Default time a client has to send its PROXY header (if any) and finish the TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a TLS connection may carry no bytes either way before it is closed.
pub const DEFAULT_CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Default `spiffe_refresh_hint` of the bundle endpoint (SPIRE's).
pub const DEFAULT_BUNDLE_REFRESH_HINT: Duration = Duration::from_secs(5 * 60);
/// Default connections one public HTTP endpoint (bundle endpoint, OIDC discovery) holds at
/// once; more are closed as soon as they are accepted.
pub const DEFAULT_ENDPOINT_MAX_CONNECTIONS: usize = 256;
/// Default time a client of a public HTTP endpoint has to finish the TLS handshake and send
/// its request headers, and the longest a kept-alive connection may wait for the next request
/// (SPIRE's bundle endpoint allows 10 s for the headers).
pub const DEFAULT_ENDPOINT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `max-age` of the OIDC discovery document and keys.
pub const DEFAULT_OIDC_CACHE_MAX_AGE: Duration = Duration::from_secs(60);

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

/// The server's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The trust domain this server is the authority for.
    pub trust_domain: TrustDomain,
    /// This server's name among the servers sharing one datastore (default `local`): it keys
    /// the server's CA journal and audit checkpoint in the datastore, so each server keeps its
    /// own CA keys. Letters, digits, `.`, `_` and `-`, at most 64.
    #[serde(default = "default_instance")]
    pub instance: String,
    /// TCP address for the TLS server API (agents and remote admins).
    #[serde(default = "default_bind_address")]
    pub bind_address: SocketAddr,
    /// Unix socket for the local admin API; its directory is made owner-only.
    #[serde(default = "default_socket_path")]
    pub socket_path: PathBuf,
    /// `[[admin_socket]]`: further admin sockets, each giving its callers a name, for
    /// programs that speak SPIRE's API (which carries no owner or reason), such as
    /// spire-controller-manager: what they create is attributed to the socket.
    #[serde(default, rename = "admin_socket")]
    pub admin_sockets: Vec<AdminSocketConfig>,
    /// Directory for the datastore and keys; made owner-only.
    pub data_dir: PathBuf,
    /// Lifetime of each X.509 CA and JWT signing authority.
    #[serde(default = "default_ca_ttl", with = "duration")]
    pub ca_ttl: Duration,
    /// Key type of the CA and JWT signing keys.
    #[serde(default, with = "key_type")]
    pub ca_key_type: KeyType,
    /// Key type of the JWT signing keys; defaults to `ca_key_type`.
    #[serde(default, with = "opt_key_type")]
    pub jwt_key_type: Option<KeyType>,
    /// Subject of the self-signed CA certificates.
    #[serde(default)]
    pub ca_subject: CaSubjectConfig,
    /// X.509-SVID lifetime for entries that do not set one.
    #[serde(default = "default_x509_svid_ttl", with = "duration")]
    pub default_x509_svid_ttl: Duration,
    /// JWT-SVID lifetime for entries that do not set one.
    #[serde(default = "default_jwt_svid_ttl", with = "duration")]
    pub default_jwt_svid_ttl: Duration,
    /// Lifetime of agent SVIDs; defaults to `default_x509_svid_ttl`.
    #[serde(default, with = "opt_duration")]
    pub agent_ttl: Option<Duration>,
    /// The `iss` claim of JWT-SVIDs, if any.
    #[serde(default)]
    pub jwt_issuer: Option<String>,
    /// SPIFFE IDs allowed to call the admin API over TLS.
    #[serde(default)]
    pub admin_ids: Vec<SpiffeId>,
    /// Log level: `error`, `warn`, `info`, `debug` or `trace`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Log format.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Where registrations and agents are stored.
    #[serde(default)]
    pub datastore: DatastoreConfig,
    /// Where private keys are kept.
    #[serde(default)]
    pub key_manager: KeyManagerConfig,
    /// Enabled node attestors.
    #[serde(default)]
    pub node_attestor: NodeAttestorConfig,
    /// The tamper-evident audit log (hash-chained JSON lines, 0600); defaults to
    /// `<data_dir>/audit.log`.
    #[serde(default)]
    pub audit_log_path: Option<PathBuf>,
    /// Policy as code; without it every entry that passes validation is allowed.
    #[serde(default)]
    pub policy: Option<PolicyConfig>,
    /// How long the usage ledger keeps each issuance record.
    #[serde(default = "default_ledger_retention", with = "duration")]
    pub ledger_retention: Duration,
    /// Start a new trust domain although the data directory holds state of an earlier one
    /// whose datastore is gone (`lanyard server run --new-trust-domain`); never read from the
    /// file, so that it cannot stay switched on by accident.
    #[serde(skip)]
    pub new_trust_domain: bool,
    /// Whether every connection to `bind_address` starts with a PROXY protocol v2 header (a
    /// load balancer in front), whose source address then counts as the client's.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Rate limits on the server API and limits on its TLS connections.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// SPIFFE federation: this server's bundle endpoint.
    #[serde(default)]
    pub federation: FederationConfig,
    /// An OIDC discovery endpoint for the trust domain's JWT authorities, at `jwt_issuer`.
    #[serde(default)]
    pub oidc_discovery: Option<OidcDiscoveryConfig>,
    /// Plain-HTTP `/live` and `/ready` for probes (Kubernetes `httpGet`, load balancers); off
    /// when absent. Keep it on loopback or a private network: it says nothing secret, but
    /// nobody outside needs it.
    #[serde(default)]
    pub health_address: Option<SocketAddr>,
    /// Plain-HTTP `GET /metrics` in the Prometheus text format; off when absent. Like
    /// `health_address`, keep it on loopback or a private network.
    #[serde(default)]
    pub metrics_address: Option<SocketAddr>,
}

/// `[federation]`: this server's part in SPIFFE federation: its bundle endpoint, from which
/// other trust domains fetch this one's bundle, and what its bundle endpoint client needs.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// The bundle endpoint; off when absent.
    #[serde(default)]
    pub bundle_endpoint: Option<BundleEndpointConfig>,
    /// A PEM file of CA certificates that `https_web` bundle endpoints may chain to, besides
    /// the system's (for a private CA, or tests). Lanyard's own key; SPIRE has none.
    #[serde(default)]
    pub https_web_extra_ca_certificates_path: Option<PathBuf>,
    /// `[federation.trust_domains."<name>"]`: federation relationships kept in the
    /// configuration file (SPIRE's `federates_with`), written to the datastore at start.
    #[serde(default)]
    pub trust_domains: BTreeMap<String, ConfiguredRelationshipConfig>,
}

/// `[federation.trust_domains."<name>"]`: a federation relationship with the trust domain
/// `<name>`, in SPIRE's words. At start the server creates it, or updates the stored one to
/// match, through the one relationship writer; the API shows it like any other.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfiguredRelationshipConfig {
    /// The `https` URL of the trust domain's SPIFFE bundle endpoint.
    pub bundle_endpoint_url: String,
    /// `https_spiffe` or `https_web`.
    pub bundle_endpoint_profile: String,
    /// `https_spiffe`: the SPIFFE ID the endpoint's X509-SVID carries.
    #[serde(default)]
    pub endpoint_spiffe_id: Option<String>,
    /// The trust domain's bundle to start from (`https_spiffe` needs one to authenticate
    /// the endpoint the first time); used only while the server holds none of its own.
    #[serde(default)]
    pub trust_domain_bundle_path: Option<PathBuf>,
    /// The format of `trust_domain_bundle_path`: `pem` (the default, as in SPIRE's CLI) or
    /// `spiffe`.
    #[serde(default)]
    pub trust_domain_bundle_format: BundleFileFormat,
}

/// The format of a bundle file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleFileFormat {
    /// PEM `CERTIFICATE` blocks: the X.509 authorities.
    #[default]
    Pem,
    /// A SPIFFE bundle (JWK Set).
    Spiffe,
}

impl ConfiguredRelationshipConfig {
    /// The relationship with `trust_domain` (the table's name), without its bundle, checked
    /// by the rules of SPIRE's TrustDomain API; a refusal names the key at fault.
    pub fn relationship(
        &self,
        trust_domain: &str,
    ) -> Result<lanyard_core::FederationRelationship, ConfigError> {
        use lanyard_core::federation::FederationError;
        let invalid = |error: FederationError| ConfigError::Invalid {
            key: "federation.trust_domains",
            reason: format!("{trust_domain:?}: {error}"),
        };
        let name =
            TrustDomain::new(trust_domain).map_err(|e| invalid(FederationError::TrustDomain(e)))?;
        let url: lanyard_core::BundleEndpointUrl =
            self.bundle_endpoint_url.parse().map_err(invalid)?;
        let profile = lanyard_core::BundleEndpointProfile::from_name(
            &self.bundle_endpoint_profile,
            self.endpoint_spiffe_id.as_deref(),
        )
        .map_err(invalid)?;
        if profile == lanyard_core::BundleEndpointProfile::HttpsWeb
            && self.endpoint_spiffe_id.is_some()
        {
            return Err(ConfigError::Invalid {
                key: "federation.trust_domains",
                reason: format!(
                    "{trust_domain:?}: endpoint_spiffe_id is for bundle_endpoint_profile = \"https_spiffe\" only"
                ),
            });
        }
        Ok(lanyard_core::FederationRelationship::new(
            name, url, profile,
        ))
    }
}

/// `[federation.bundle_endpoint]`: an HTTPS listener serving the trust domain's bundle as
/// SPIFFE bundle JSON (SPIRE's `federation.bundle_endpoint`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleEndpointConfig {
    /// Where to listen, e.g. `0.0.0.0:8443`.
    pub address: SocketAddr,
    /// The `spiffe_refresh_hint` served: how often federated servers should fetch again.
    #[serde(default = "default_bundle_refresh_hint", with = "duration")]
    pub refresh_hint: Duration,
    /// How clients authenticate the endpoint.
    #[serde(default)]
    pub profile: BundleEndpointProfile,
    /// `https_web`: the PEM certificate chain to serve, leaf first.
    #[serde(default)]
    pub certificate_path: Option<PathBuf>,
    /// `https_web`: the PEM private key of the leaf; refused if others can read it.
    #[serde(default)]
    pub private_key_path: Option<PathBuf>,
    /// Connections held at once; more are closed at once.
    #[serde(default = "default_endpoint_max_connections")]
    pub max_connections: usize,
    /// Time to finish the TLS handshake and send request headers.
    #[serde(default = "default_endpoint_header_read_timeout", with = "duration")]
    pub header_read_timeout: Duration,
}

/// The SPIFFE Federation endpoint profiles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BundleEndpointProfile {
    /// The server's own X.509-SVID (`spiffe://<td>/spire/server`), which clients verify
    /// against this trust domain's bundle.
    #[default]
    HttpsSpiffe,
    /// A Web PKI certificate from `certificate_path` and `private_key_path`.
    HttpsWeb,
}

impl BundleEndpointProfile {
    /// The profile's name as configured and as SPIRE names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::HttpsSpiffe => "https_spiffe",
            Self::HttpsWeb => "https_web",
        }
    }
}

/// `[oidc_discovery]`: an OpenID Connect discovery document and JWKS for the trust domain's JWT
/// authorities, so that OIDC relying parties verify JWT-SVIDs given only `jwt_issuer`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcDiscoveryConfig {
    /// Where to listen, e.g. `0.0.0.0:8444`.
    pub address: SocketAddr,
    /// Serve plain HTTP, for a TLS-terminating proxy in front; never on an open network.
    #[serde(default)]
    pub insecure_http: bool,
    /// The PEM certificate chain to serve, leaf first (unless `insecure_http`).
    #[serde(default)]
    pub certificate_path: Option<PathBuf>,
    /// The PEM private key of the leaf; refused if others can read it.
    #[serde(default)]
    pub private_key_path: Option<PathBuf>,
    /// The `max-age` of the discovery document and keys; `0s` forbids caching.
    #[serde(default = "default_oidc_cache_max_age", with = "duration")]
    pub cache_max_age: Duration,
    /// Connections held at once; more are closed at once.
    #[serde(default = "default_endpoint_max_connections")]
    pub max_connections: usize,
    /// Time to finish the TLS handshake and send request headers.
    #[serde(default = "default_endpoint_header_read_timeout", with = "duration")]
    pub header_read_timeout: Duration,
}

fn default_bundle_refresh_hint() -> Duration {
    DEFAULT_BUNDLE_REFRESH_HINT
}
fn default_endpoint_max_connections() -> usize {
    DEFAULT_ENDPOINT_MAX_CONNECTIONS
}
fn default_endpoint_header_read_timeout() -> Duration {
    DEFAULT_ENDPOINT_HEADER_READ_TIMEOUT
}
fn default_oidc_cache_max_age() -> Duration {
    DEFAULT_OIDC_CACHE_MAX_AGE
}

/// Checks a public endpoint's certificate pair (both when `wanted` is `Ok`, neither when it
/// names what they are for) and its limits; `keys` name them in messages.
fn check_endpoint(
    keys: [&'static str; 4],
    wanted: Result<(), &'static str>,
    certificate: Option<&Path>,
    private_key: Option<&Path>,
    max_connections: usize,
    header_read_timeout: Duration,
) -> Result<(), ConfigError> {
    let [
        certificate_key,
        private_key_key,
        max_connections_key,
        timeout_key,
    ] = keys;
    match (wanted, certificate, private_key) {
        (Ok(()), None, _) => {
            return Err(ConfigError::Invalid {
                key: certificate_key,
                reason: "is required".into(),
            });
        }
        (Ok(()), Some(_), None) => {
            return Err(ConfigError::Invalid {
                key: private_key_key,
                reason: "is required".into(),
            });
        }
        (Err(only_with), Some(_), _) => {
            return Err(ConfigError::Invalid {
                key: certificate_key,
                reason: format!("is for {only_with} only"),
            });
        }
        (Err(only_with), None, Some(_)) => {
            return Err(ConfigError::Invalid {
                key: private_key_key,
                reason: format!("is for {only_with} only"),
            });
        }
        _ => {}
    }
    if max_connections == 0 {
        return Err(ConfigError::Invalid {
            key: max_connections_key,
            reason: "must be greater than zero".into(),
        });
    }
    if header_read_timeout.is_zero() {
        return Err(ConfigError::Invalid {
            key: timeout_key,
            reason: "must be greater than zero".into(),
        });
    }
    Ok(())
}

impl BundleEndpointConfig {
    /// A bundle endpoint on `address` with the `https_spiffe` profile and every default.
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            refresh_hint: DEFAULT_BUNDLE_REFRESH_HINT,
            profile: BundleEndpointProfile::HttpsSpiffe,
            certificate_path: None,
            private_key_path: None,
            max_connections: DEFAULT_ENDPOINT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_ENDPOINT_HEADER_READ_TIMEOUT,
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.refresh_hint < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                key: "federation.bundle_endpoint.refresh_hint",
                reason: "must be at least 1s (it is served in whole seconds)".into(),
            });
        }
        let wanted = match self.profile {
            BundleEndpointProfile::HttpsWeb => Ok(()),
            BundleEndpointProfile::HttpsSpiffe => Err("profile = \"https_web\""),
        };
        check_endpoint(
            [
                "federation.bundle_endpoint.certificate_path",
                "federation.bundle_endpoint.private_key_path",
                "federation.bundle_endpoint.max_connections",
                "federation.bundle_endpoint.header_read_timeout",
            ],
            wanted,
            self.certificate_path.as_deref(),
            self.private_key_path.as_deref(),
            self.max_connections,
            self.header_read_timeout,
        )
    }
}

impl OidcDiscoveryConfig {
    /// Plain HTTP on `address` with every default (for tests and a proxy in front).
    pub fn insecure_http(address: SocketAddr) -> Self {
        Self {
            address,
            insecure_http: true,
            certificate_path: None,
            private_key_path: None,
            cache_max_age: DEFAULT_OIDC_CACHE_MAX_AGE,
            max_connections: DEFAULT_ENDPOINT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_ENDPOINT_HEADER_READ_TIMEOUT,
        }
    }

    fn check(&self, jwt_issuer: Option<&str>) -> Result<(), ConfigError> {
        let Some(issuer) = jwt_issuer else {
            return Err(ConfigError::Invalid {
                key: "jwt_issuer",
                reason: "is required with [oidc_discovery]: it is the issuer the discovery \
                         document names and where relying parties look for it"
                    .into(),
            });
        };
        check_issuer(issuer, self.insecure_http).map_err(|reason| ConfigError::Invalid {
            key: "jwt_issuer",
            reason: format!("{issuer:?} {reason} (for [oidc_discovery])"),
        })?;
        let wanted = if self.insecure_http {
            Err("TLS (without insecure_http)")
        } else {
            Ok(())
        };
        check_endpoint(
            [
                "oidc_discovery.certificate_path",
                "oidc_discovery.private_key_path",
                "oidc_discovery.max_connections",
                "oidc_discovery.header_read_timeout",
            ],
            wanted,
            self.certificate_path.as_deref(),
            self.private_key_path.as_deref(),
            self.max_connections,
            self.header_read_timeout,
        )
    }
}

/// An OIDC issuer: an `https` URL (`http` only when served as plain HTTP) with a host, and no
/// user info, query or fragment (OpenID Connect Discovery 1.0, section 2).
fn check_issuer(issuer: &str, insecure_http: bool) -> Result<(), &'static str> {
    let rest = match (
        issuer.strip_prefix("https://"),
        issuer.strip_prefix("http://"),
    ) {
        (Some(rest), _) => rest,
        (None, Some(rest)) if insecure_http => rest,
        (None, Some(_)) => {
            return Err("must be an https URL (http only with insecure_http = true)");
        }
        (None, None) => return Err("must be an https URL"),
    };
    if rest.contains(['?', '#']) {
        return Err("must have no query or fragment");
    }
    if issuer.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must have no spaces or control characters");
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err("has no host");
    }
    if authority.contains('@') {
        return Err("must have no user info");
    }
    Ok(())
}

/// `[[admin_socket]]`: an admin socket of its own for one program. A caller is an admin
/// there as on `socket_path` (the kernel's peer credentials; its directory is owner-only),
/// and is known by the socket's `name`: the audit log names it, the policy sees it as
/// `input.caller.socket`, and an entry created through it with none of owner, reason and
/// source gets the socket's. Its `source` is kept for it: no other caller may create an
/// entry with that source or give it to one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSocketConfig {
    /// The name its callers are known by: letters, digits, `.`, `_` and `-`, at most 64.
    pub name: String,
    /// The socket's path; not `socket_path` nor another admin socket's.
    pub path: PathBuf,
    /// The owner given to entries created through it without metadata.
    #[serde(default)]
    pub owner: Option<String>,
    /// The reason given to entries created through it without metadata.
    #[serde(default)]
    pub reason: Option<String>,
    /// The source given to entries created through it without metadata; defaults to `name`.
    #[serde(default)]
    pub source: Option<String>,
}

impl AdminSocketConfig {
    /// The source in effect.
    pub fn source(&self) -> &str {
        self.source.as_deref().unwrap_or(&self.name)
    }
}

/// `[limits]`: rate limits on the TLS server API and limits on its connections. A rate of 0
/// turns that limit off; each rate allows a burst of one second's worth (at least one call).
/// Calls over the admin socket are never rate limited.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// `AttestAgent` calls per second from one source address.
    pub attestations_per_ip_per_second: f64,
    /// SVIDs signed per second (each CSR of `BatchNewX509SVID`, each `NewJWTSVID`) for one
    /// source address.
    pub signings_per_ip_per_second: f64,
    /// SVIDs signed per second for one agent.
    pub signings_per_agent_per_second: f64,
    /// TLS connections open at once without a client certificate, handshakes included;
    /// connections beyond it are closed at once.
    pub max_unauthenticated_connections: usize,
    /// The same, from one client address (the PROXY header's, when there is one); 0 for no
    /// limit per address.
    pub max_unauthenticated_connections_per_ip: usize,
    /// Time a client has to send its PROXY header (if any) and finish the TLS handshake.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// Time a TLS connection may carry no bytes either way before it is closed.
    #[serde(with = "duration")]
    pub connection_idle_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            attestations_per_ip_per_second: DEFAULT_ATTESTATIONS_PER_IP_PER_SECOND,
            signings_per_ip_per_second: DEFAULT_SIGNINGS_PER_IP_PER_SECOND,
            signings_per_agent_per_second: DEFAULT_SIGNINGS_PER_AGENT_PER_SECOND,
            max_unauthenticated_connections: DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS,
            max_unauthenticated_connections_per_ip: DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            connection_idle_timeout: DEFAULT_CONNECTION_IDLE_TIMEOUT,
        }
    }
}

impl LimitsConfig {
    /// No rate limits and no limit per address, for benchmarks that measure the server rather
    /// than its limits (every client is on one address); the other connection limits keep
    /// their defaults.
    pub fn without_rate_limits() -> Self {
        Self {
            attestations_per_ip_per_second: 0.0,
            signings_per_ip_per_second: 0.0,
            signings_per_agent_per_second: 0.0,
            max_unauthenticated_connections_per_ip: 0,
            ..Self::default()
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        for (key, rate) in [
            (
                "limits.attestations_per_ip_per_second",
                self.attestations_per_ip_per_second,
            ),
            (
                "limits.signings_per_ip_per_second",
                self.signings_per_ip_per_second,
            ),
            (
                "limits.signings_per_agent_per_second",
                self.signings_per_agent_per_second,
            ),
        ] {
            if !rate.is_finite() || rate < 0.0 {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{rate} is not a rate (0 turns the limit off)"),
                });
            }
        }
        if self.max_unauthenticated_connections == 0 {
            return Err(ConfigError::Invalid {
                key: "limits.max_unauthenticated_connections",
                reason: "must be greater than zero".into(),
            });
        }
        for (key, timeout) in [
            ("limits.handshake_timeout", self.handshake_timeout),
            (
                "limits.connection_idle_timeout",
                self.connection_idle_timeout,
            ),
        ] {
            if timeout.is_zero() {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be greater than zero".into(),
                });
            }
        }
        Ok(())
    }
}

/// `[policy]`: the Rego policy every entry must pass at issuance.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The policy file (package `lanyard`); reloaded on SIGHUP and when it changes.
    pub path: PathBuf,
    /// The longest one evaluation may take; a slower one fails (closed).
    #[serde(default = "default_policy_evaluation_timeout", with = "duration")]
    pub evaluation_timeout: Duration,
}

impl PolicyConfig {
    /// The policy in `path`, with the default evaluation timeout.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            evaluation_timeout: default_policy_evaluation_timeout(),
        }
    }
}

fn default_policy_evaluation_timeout() -> Duration {
    crate::policy::DEFAULT_EVALUATION_TIMEOUT
}

/// Subject fields of CA certificates (SPIRE's `ca_subject`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSubjectConfig {
    /// `C` values.
    #[serde(default = "default_country")]
    pub country: Vec<String>,
    /// `O` values.
    #[serde(default = "default_organization")]
    pub organization: Vec<String>,
    /// `CN`, if any.
    #[serde(default)]
    pub common_name: Option<String>,
}

impl Default for CaSubjectConfig {
    fn default() -> Self {
        Self {
            country: default_country(),
            organization: default_organization(),
            common_name: None,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Datastore selection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreConfig {
    /// The backend.
    #[serde(default)]
    pub kind: DatastoreKind,
    /// SQLite file; defaults to `<data_dir>/datastore.sqlite3`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// PostgreSQL: the database URL, `postgres://user:password@host:port/database` (required
    /// with `kind = "postgres"`, refused otherwise). Never logged.
    #[serde(default)]
    pub connection_string: Option<ConnectionString>,
    /// PostgreSQL: a read-only replica for admin listings and counts, which may lag (optional;
    /// never logged). Authorization, sync and writes always use `connection_string`.
    #[serde(default)]
    pub read_connection_string: Option<ConnectionString>,
    /// PostgreSQL: connections in the pool (default 8).
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// How often the server reads the change log for writes made by other servers sharing
    /// the datastore (default 1 s). On PostgreSQL they are announced and applied within
    /// milliseconds; the poll is the safety net.
    #[serde(default = "default_poll_interval", with = "duration")]
    pub poll_interval: Duration,
}

impl Default for DatastoreConfig {
    fn default() -> Self {
        Self {
            kind: DatastoreKind::default(),
            path: None,
            connection_string: None,
            read_connection_string: None,
            max_connections: None,
            poll_interval: default_poll_interval(),
        }
    }
}

/// The instance name of a server that does not set one.
pub const DEFAULT_INSTANCE: &str = "local";

fn default_instance() -> String {
    DEFAULT_INSTANCE.to_owned()
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(1)
}

/// A database URL, which may hold a password: its `Debug` form shows neither the password nor
/// anything else of it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct ConnectionString(String);

impl ConnectionString {
    /// A connection string.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionString(redacted)")
    }
}

/// Datastore backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatastoreKind {
    /// Embedded SQLite under the data directory.
    #[default]
    Sqlite,
    /// In memory; everything is lost on exit. For tests and demos.
    Memory,
    /// PostgreSQL at `connection_string`, which several servers may share.
    Postgres,
}

/// Key manager selection.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyManagerConfig {
    /// The backend.
    #[serde(default)]
    pub kind: KeyManagerKind,
    /// Key directory for `disk`; defaults to `<data_dir>/keys`.
    #[serde(default)]
    pub directory: Option<PathBuf>,
}

/// Key manager backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyManagerKind {
    /// PKCS#8 files, mode 0600.
    #[default]
    Disk,
    /// In memory; a restart creates a new CA.
    Memory,
}

/// Node attestor configuration; absent tables disable the attestor.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAttestorConfig {
    /// Join tokens (enabled unless `enabled = false`).
    #[serde(default)]
    pub join_token: Option<JoinTokenConfig>,
    /// x509pop: agents prove possession of a certificate's key.
    #[serde(default)]
    pub x509pop: Option<X509PopConfig>,
    /// k8s_psat: agents in Kubernetes pods present a projected service account token.
    #[serde(default)]
    pub k8s_psat: Option<K8sPsatConfig>,
}

impl NodeAttestorConfig {
    /// Whether join-token attestation is on: it is unless explicitly disabled.
    pub fn join_token_enabled(&self) -> bool {
        self.join_token.as_ref().is_none_or(|c| c.enabled)
    }
}

/// Join token attestor settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenConfig {
    /// Set to false to refuse join tokens.
    #[serde(default = "yes")]
    pub enabled: bool,
}

/// x509pop attestor settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509PopConfig {
    /// PEM file of CA certificates that agent certificates must chain to.
    pub ca_bundle_path: PathBuf,
}

/// k8s_psat attestor settings, in SPIRE's terms.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sPsatConfig {
    /// The clusters agents may attest from, by the name agents give in their payload (also
    /// a segment of their agent ID).
    #[serde(default)]
    pub clusters: BTreeMap<String, K8sPsatClusterConfig>,
}

/// The audience `k8s_psat` tokens must carry unless configured otherwise (SPIRE's default).
pub const DEFAULT_K8S_PSAT_AUDIENCE: &str = "spire-server";

/// One cluster of the k8s_psat attestor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sPsatClusterConfig {
    /// Service accounts allowed to attest, as `namespace:name`.
    pub service_account_allow_list: Vec<String>,
    /// Audiences a token must have one of; empty means the API server's own audiences.
    #[serde(default = "default_k8s_psat_audience")]
    pub audience: Vec<String>,
    /// Kubeconfig (YAML or JSON) for the cluster's API server; absent means the pod's own service
    /// account (in-cluster).
    #[serde(default)]
    pub kube_config_file: Option<PathBuf>,
    /// Node label keys whose labels become `agent_node_label` selectors.
    #[serde(default)]
    pub allowed_node_label_keys: Vec<String>,
    /// Pod label keys whose labels become `agent_pod_label` selectors.
    #[serde(default)]
    pub allowed_pod_label_keys: Vec<String>,
}

fn default_k8s_psat_audience() -> Vec<String> {
    vec![DEFAULT_K8S_PSAT_AUDIENCE.to_owned()]
}

impl ServerConfig {
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

    /// A configuration with every default, for tests and `lanyard dev`.
    pub fn new(trust_domain: TrustDomain, data_dir: PathBuf) -> Self {
        Self {
            trust_domain,
            instance: default_instance(),
            bind_address: default_bind_address(),
            socket_path: default_socket_path(),
            admin_sockets: Vec::new(),
            data_dir,
            ca_ttl: DEFAULT_CA_TTL,
            ca_key_type: KeyType::default(),
            jwt_key_type: None,
            ca_subject: CaSubjectConfig::default(),
            default_x509_svid_ttl: DEFAULT_X509_SVID_TTL,
            default_jwt_svid_ttl: DEFAULT_JWT_SVID_TTL,
            agent_ttl: None,
            jwt_issuer: None,
            admin_ids: Vec::new(),
            log_level: default_log_level(),
            log_format: LogFormat::Text,
            datastore: DatastoreConfig::default(),
            key_manager: KeyManagerConfig::default(),
            node_attestor: NodeAttestorConfig::default(),
            audit_log_path: None,
            policy: None,
            ledger_retention: DEFAULT_LEDGER_RETENTION,
            new_trust_domain: false,
            proxy_protocol: false,
            limits: LimitsConfig::default(),
            federation: FederationConfig::default(),
            oidc_discovery: None,
            health_address: None,
            metrics_address: None,
        }
    }

    /// Checks values that parse but make no sense together.
    pub fn check(&self) -> Result<(), ConfigError> {
        let positive = |key, d: Duration| {
            if d.is_zero() {
                Err(ConfigError::Invalid {
                    key,
                    reason: "must be greater than zero".into(),
                })
            } else {
                Ok(())
            }
        };
        positive("ca_ttl", self.ca_ttl)?;
        positive("default_x509_svid_ttl", self.default_x509_svid_ttl)?;
        positive("default_jwt_svid_ttl", self.default_jwt_svid_ttl)?;
        positive("ledger_retention", self.ledger_retention)?;
        if let Some(ttl) = self.agent_ttl {
            positive("agent_ttl", ttl)?;
        }
        self.limits.check()?;
        match (self.datastore.kind, &self.datastore.connection_string) {
            (DatastoreKind::Postgres, None) => {
                return Err(ConfigError::Invalid {
                    key: "datastore.connection_string",
                    reason: "is required with kind = \"postgres\"".into(),
                });
            }
            (DatastoreKind::Sqlite | DatastoreKind::Memory, Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "datastore.connection_string",
                    reason: "is for kind = \"postgres\" only".into(),
                });
            }
            _ => {}
        }
        if self.datastore.kind != DatastoreKind::Postgres
            && self.datastore.read_connection_string.is_some()
        {
            return Err(ConfigError::Invalid {
                key: "datastore.read_connection_string",
                reason: "is for kind = \"postgres\" only".into(),
            });
        }
        positive("datastore.poll_interval", self.datastore.poll_interval)?;
        if !is_name(&self.instance) {
            return Err(ConfigError::Invalid {
                key: "instance",
                reason: format!(
                    "{:?} must be 1 to 64 letters, digits, '.', '_' or '-'",
                    self.instance
                ),
            });
        }
        if self.datastore.max_connections == Some(0) {
            return Err(ConfigError::Invalid {
                key: "datastore.max_connections",
                reason: "must be greater than zero".into(),
            });
        }
        if !matches!(
            self.log_level.as_str(),
            "error" | "warn" | "info" | "debug" | "trace"
        ) {
            return Err(ConfigError::Invalid {
                key: "log_level",
                reason: format!(
                    "{:?} is not one of error, warn, info, debug, trace",
                    self.log_level
                ),
            });
        }
        for key_type in [Some(self.ca_key_type), self.jwt_key_type]
            .into_iter()
            .flatten()
        {
            if matches!(key_type, KeyType::Rsa2048 | KeyType::Rsa4096) {
                return Err(ConfigError::Invalid {
                    key: "ca_key_type",
                    reason: format!(
                        "{key_type} keys cannot be generated by this build; use ec-p256 or ec-p384"
                    ),
                });
            }
        }
        if let Some(psat) = &self.node_attestor.k8s_psat {
            check_k8s_psat(psat, &self.trust_domain)?;
        }
        self.check_admin_sockets()?;
        if let Some(endpoint) = &self.federation.bundle_endpoint {
            endpoint.check()?;
        }
        for (name, configured) in &self.federation.trust_domains {
            let relationship = configured.relationship(name)?;
            relationship
                .check_foreign(&self.trust_domain)
                .map_err(|error| ConfigError::Invalid {
                    key: "federation.trust_domains",
                    reason: format!("{name:?}: {error}"),
                })?;
        }
        if let Some(oidc) = &self.oidc_discovery {
            oidc.check(self.jwt_issuer.as_deref())?;
        }
        for id in &self.admin_ids {
            if id.is_trust_domain_id() {
                return Err(ConfigError::Invalid {
                    key: "admin_ids",
                    reason: format!("{id} has no path"),
                });
            }
        }
        Ok(())
    }

    /// Names, paths and sources of the `[[admin_socket]]`s: each well formed and its own.
    fn check_admin_sockets(&self) -> Result<(), ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            key: "admin_socket",
            reason,
        };
        let mut paths = vec![self.socket_path.clone()];
        let mut names = Vec::new();
        let mut sources = Vec::new();
        for socket in &self.admin_sockets {
            if !is_name(&socket.name) {
                return Err(invalid(format!(
                    "name {:?} must be 1 to 64 letters, digits, '.', '_' or '-'",
                    socket.name
                )));
            }
            if names.contains(&socket.name) {
                return Err(invalid(format!("two sockets are named {:?}", socket.name)));
            }
            if paths.contains(&socket.path) {
                return Err(invalid(format!(
                    "{:?}: {} is already the path of another admin socket",
                    socket.name,
                    socket.path.display()
                )));
            }
            for (field, value) in [
                ("owner", &socket.owner),
                ("reason", &socket.reason),
                ("source", &socket.source),
            ] {
                if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                    return Err(invalid(format!(
                        "{:?}: {field} is empty; leave it out instead",
                        socket.name
                    )));
                }
            }
            if sources.contains(&socket.source()) {
                return Err(invalid(format!(
                    "{:?}: source {:?} is already another socket's",
                    socket.name,
                    socket.source()
                )));
            }
            names.push(socket.name.clone());
            paths.push(socket.path.clone());
            sources.push(socket.source());
        }
        Ok(())
    }

    /// The agent SVID lifetime in effect.
    pub fn agent_ttl(&self) -> Duration {
        self.agent_ttl.unwrap_or(self.default_x509_svid_ttl)
    }

    /// The JWT key type in effect.
    pub fn jwt_key_type(&self) -> KeyType {
        self.jwt_key_type.unwrap_or(self.ca_key_type)
    }

    /// The audit log in effect.
    pub fn audit_log_path(&self) -> PathBuf {
        self.audit_log_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit.log"))
    }

    /// The SQLite file in effect.
    pub fn datastore_path(&self) -> PathBuf {
        self.datastore
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("datastore.sqlite3"))
    }

    /// The key directory in effect.
    pub fn key_directory(&self) -> PathBuf {
        self.key_manager
            .directory
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys"))
    }
}

/// The cluster names, allow lists and label keys of the k8s_psat attestor.
fn check_k8s_psat(config: &K8sPsatConfig, trust_domain: &TrustDomain) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        key: "node_attestor.k8s_psat.clusters",
        reason,
    };
    if config.clusters.is_empty() {
        return Err(invalid(
            "no cluster configured; add [node_attestor.k8s_psat.clusters.<name>]".into(),
        ));
    }
    for (name, cluster) in &config.clusters {
        // The name is a segment of every agent ID from this cluster.
        trust_domain
            .agent_id(lanyard_core::k8s_psat::ATTESTOR_NAME, &[name])
            .map_err(|e| {
                invalid(format!(
                    "cluster name {name:?} cannot be in an agent ID: {e}"
                ))
            })?;
        if cluster.service_account_allow_list.is_empty() {
            return Err(invalid(format!(
                "cluster {name:?} must allow at least one service account in \
                 service_account_allow_list"
            )));
        }
        for account in &cluster.service_account_allow_list {
            let valid = account
                .split_once(':')
                .is_some_and(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'));
            if !valid {
                return Err(invalid(format!(
                    "cluster {name:?}: service account {account:?} is not \"namespace:name\""
                )));
            }
        }
        if cluster.audience.iter().any(String::is_empty) {
            return Err(invalid(format!("cluster {name:?} has an empty audience")));
        }
    }
    Ok(())
}

fn default_bind_address() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8081))
}
/// 1 to 64 letters, digits, `.`, `_` and `-`: a server's instance, an admin socket's name.
fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn default_socket_path() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET_PATH)
}
fn default_ca_ttl() -> Duration {
    DEFAULT_CA_TTL
}
fn default_x509_svid_ttl() -> Duration {
    DEFAULT_X509_SVID_TTL
}
fn default_jwt_svid_ttl() -> Duration {
    DEFAULT_JWT_SVID_TTL
}
fn default_ledger_retention() -> Duration {
    DEFAULT_LEDGER_RETENTION
}
fn default_log_level() -> String {
    "info".to_owned()
}
fn default_country() -> Vec<String> {
    vec!["US".to_owned()]
}
fn default_organization() -> Vec<String> {
    vec!["SPIFFE".to_owned()]
}
fn yes() -> bool {
    true
}

/// Durations written as `"90s"`, `"1h30m"`, `"7d"` (humantime syntax).
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// Deserializes a humantime duration string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration ({e})")))
    }
}

mod opt_duration {
    use std::time::Duration;

    use serde::Deserializer;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
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

mod opt_key_type {
    use lanyard_core::keys::KeyType;
    use serde::Deserializer;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<KeyType>, D::Error> {
        super::key_type::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k8s_psat_clusters_in_spire_terms() {
        let base = "trust_domain = \"example.org\"\ndata_dir = \"/d\"\n";
        let config = ServerConfig::parse(&format!(
            "{base}[node_attestor.k8s_psat.clusters.demo]\n\
             service_account_allow_list = [\"spire:spire-agent\"]\n\
             kube_config_file = \"/etc/lanyard/kubeconfig\"\n\
             allowed_node_label_keys = [\"zone\"]\n\
             [node_attestor.k8s_psat.clusters.prod]\n\
             service_account_allow_list = [\"spire:spire-agent\", \"infra:agent\"]\n\
             audience = []\n"
        ))
        .expect("parses");
        let psat = config.node_attestor.k8s_psat.expect("k8s_psat");
        let demo = &psat.clusters["demo"];
        assert_eq!(demo.audience, ["spire-server"]);
        assert_eq!(
            demo.kube_config_file.as_deref(),
            Some(Path::new("/etc/lanyard/kubeconfig"))
        );
        assert_eq!(demo.allowed_node_label_keys, ["zone"]);
        assert!(demo.allowed_pod_label_keys.is_empty());
        let prod = &psat.clusters["prod"];
        assert!(prod.audience.is_empty());
        assert!(prod.kube_config_file.is_none());

        for (bad, expected) in [
            ("[node_attestor.k8s_psat]\n", "no cluster configured"),
            (
                "[node_attestor.k8s_psat.clusters.demo]\nservice_account_allow_list = []\n",
                "at least one service account",
            ),
            (
                "[node_attestor.k8s_psat.clusters.demo]\nservice_account_allow_list = [\"spire-agent\"]\n",
                "not \"namespace:name\"",
            ),
            (
                "[node_attestor.k8s_psat.clusters.\"a/b\"]\nservice_account_allow_list = [\"a:b\"]\n",
                "cannot be in an agent ID",
            ),
            (
                "[node_attestor.k8s_psat.clusters.demo]\nservice_account_allow_list = [\"a:b\"]\nuse_pod_uid_for_agent_id = true\n",
                "unknown field",
            ),
        ] {
            let error = ServerConfig::parse(&format!("{base}{bad}"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(error.contains(expected), "{bad}: {error}");
        }
    }

    #[test]
    fn admin_sockets_have_names_paths_and_sources_of_their_own() {
        let base = "trust_domain = \"example.org\"\ndata_dir = \"/d\"\nsocket_path = \"/run/a/api.sock\"\n";
        let config = ServerConfig::parse(&format!(
            "{base}[[admin_socket]]\n\
             name = \"spire-controller-manager\"\n\
             path = \"/run/c/api.sock\"\n\
             owner = \"platform\"\n\
             reason = \"kept from the cluster\"\n\
             [[admin_socket]]\n\
             name = \"ci\"\n\
             path = \"/run/ci/api.sock\"\n\
             source = \"deploy-pipeline\"\n"
        ))
        .expect("parses");
        let [controller, ci] = config.admin_sockets.as_slice() else {
            panic!("two sockets: {:?}", config.admin_sockets);
        };
        assert_eq!(controller.source(), "spire-controller-manager");
        assert_eq!(controller.owner.as_deref(), Some("platform"));
        assert_eq!(ci.source(), "deploy-pipeline");
        assert_eq!(ci.owner, None);

        let socket = |name: &str, path: &str, extra: &str| {
            format!("[[admin_socket]]\nname = \"{name}\"\npath = \"{path}\"\n{extra}")
        };
        for (bad, expected) in [
            (socket("a b", "/run/x.sock", ""), "must be 1 to 64"),
            (socket("x", "/run/a/api.sock", ""), "already the path"),
            (
                socket("x", "/run/x.sock", "") + &socket("x", "/run/y.sock", ""),
                "two sockets are named",
            ),
            (
                socket("x", "/run/x.sock", "") + &socket("y", "/run/y.sock", "source = \"x\"\n"),
                "already another socket's",
            ),
            (
                socket("x", "/run/x.sock", "owner = \" \"\n"),
                "owner is empty",
            ),
            (socket("x", "/run/x.sock", "uid = 3\n"), "unknown field"),
        ] {
            let error = ServerConfig::parse(&format!("{base}{bad}"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(error.contains(expected), "{bad}: {error}");
        }
    }

    const SAMPLE: &str = r#"
        trust_domain = "example.org"
        bind_address = "127.0.0.1:8081"
        socket_path  = "/tmp/lanyard/server/private/api.sock"
        data_dir     = "/var/lib/lanyard/server"
        ca_ttl = "48h"
        default_x509_svid_ttl = "30m"
        default_jwt_svid_ttl = "2m"
        ca_key_type = "ec-p384"
        jwt_issuer = "https://oidc.example.org"
        log_format = "json"

        [datastore]
        kind = "sqlite"

        [node_attestor.join_token]

        [node_attestor.x509pop]
        ca_bundle_path = "/etc/lanyard/agent-ca.pem"
    "#;

    #[test]
    fn the_documented_sample_parses() {
        let c = ServerConfig::parse(SAMPLE).unwrap();
        assert_eq!(c.trust_domain.name(), "example.org");
        assert_eq!(c.bind_address.port(), 8081);
        assert_eq!(c.ca_ttl, Duration::from_secs(48 * 3600));
        assert_eq!(c.default_x509_svid_ttl, Duration::from_secs(1800));
        assert_eq!(c.agent_ttl(), Duration::from_secs(1800));
        assert_eq!(c.ca_key_type, KeyType::EcP384);
        assert_eq!(c.jwt_key_type(), KeyType::EcP384);
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(c.node_attestor.join_token_enabled());
        assert!(c.node_attestor.x509pop.is_some());
        assert_eq!(
            c.datastore_path(),
            Path::new("/var/lib/lanyard/server/datastore.sqlite3")
        );
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
        let manifest = include_str!("../../../deploy/kubernetes/server-config.yaml");
        let c = ServerConfig::parse(&embedded(manifest, "server.toml")).unwrap();
        // The port of the StatefulSet's httpGet probes.
        assert_eq!(c.health_address.map(|a| a.port()), Some(8080));
        assert!(
            include_str!("../../../deploy/kubernetes/server.yaml").contains("containerPort: 8080")
        );
        let psat = c
            .node_attestor
            .k8s_psat
            .as_ref()
            .expect("k8s_psat configured");
        let demo = &psat.clusters["demo"];
        // The agents' service account of deploy/kubernetes/agent-rbac.yaml, in-cluster.
        assert_eq!(demo.service_account_allow_list, ["lanyard:lanyard-agent"]);
        assert_eq!(demo.audience, [DEFAULT_K8S_PSAT_AUDIENCE]);
        assert!(demo.kube_config_file.is_none());
        // spire-controller-manager's socket (deploy/kubernetes/controller-manager-config.yaml
        // names the same path), and the baseline policy from the same ConfigMap.
        let [controller] = c.admin_sockets.as_slice() else {
            panic!("one admin socket: {:?}", c.admin_sockets);
        };
        assert_eq!(controller.source(), "spire-controller-manager");
        assert_eq!(
            controller.path,
            Path::new("/run/lanyard/controller/api.sock")
        );
        assert!(controller.owner.is_some() && controller.reason.is_some());
        let policy = c.policy.as_ref().expect("a policy");
        assert_eq!(policy.path, Path::new("/etc/lanyard/policy.rego"));
        assert_eq!(
            embedded(manifest, "policy.rego").trim_end(),
            include_str!("../../../deploy/policy/baseline.rego").trim_end(),
            "the ConfigMap's policy.rego is deploy/policy/baseline.rego"
        );
        let controller_config =
            include_str!("../../../deploy/kubernetes/controller-manager-config.yaml");
        assert!(
            controller_config.contains(&format!(
                "spireServerSocketPath: {}",
                controller.path.display()
            )),
            "the controller manager writes through its socket"
        );
    }

    #[test]
    fn the_shipped_example_parses() {
        let c = ServerConfig::parse(include_str!("../../../deploy/server.toml")).unwrap();
        assert_eq!(c.trust_domain.name(), "example.org");
        assert!(c.node_attestor.join_token_enabled());
        assert_eq!(
            c.limits,
            LimitsConfig::default(),
            "the example shows the defaults"
        );
        assert_eq!(
            c.audit_log_path(),
            c.data_dir.join("audit.log"),
            "the example keeps the audit log under data_dir"
        );
    }

    #[test]
    fn metrics_address_parses_and_is_off_when_absent() {
        let c = ServerConfig::parse(
            "trust_domain = \"td\"\ndata_dir = \"/d\"\nmetrics_address = \"127.0.0.1:9988\"\n",
        )
        .unwrap();
        assert_eq!(c.metrics_address, Some("127.0.0.1:9988".parse().unwrap()));
        let c = ServerConfig::parse("trust_domain = \"td\"\ndata_dir = \"/d\"").unwrap();
        assert_eq!(c.metrics_address, None);
        assert!(
            ServerConfig::parse(
                "trust_domain = \"td\"\ndata_dir = \"/d\"\nmetrics_address = \"localhost\"\n"
            )
            .is_err(),
            "an address needs a port"
        );
    }

    #[test]
    fn policy_and_audit_log_paths_parse() {
        let c = ServerConfig::parse(
            "trust_domain = \"td\"\ndata_dir = \"/d\"\naudit_log_path = \"/l/audit.log\"\n[policy]\npath = \"/p/policy.rego\"\n",
        )
        .unwrap();
        assert_eq!(c.policy.as_ref().unwrap().path, Path::new("/p/policy.rego"));
        assert_eq!(c.audit_log_path(), Path::new("/l/audit.log"));
        let c = ServerConfig::parse("trust_domain = \"td\"\ndata_dir = \"/d\"").unwrap();
        assert!(c.policy.is_none());
        assert_eq!(c.audit_log_path(), Path::new("/d/audit.log"));
        let error = ServerConfig::parse(
            "trust_domain = \"td\"\ndata_dir = \"/d\"\n[policy]\npath = \"/p\"\nfile = \"/q\"\n",
        )
        .unwrap_err();
        assert!(error.to_string().contains("file"), "{error}");
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let c = ServerConfig::parse("trust_domain = \"td\"\ndata_dir = \"/d\"").unwrap();
        assert_eq!(c.bind_address, default_bind_address());
        assert_eq!(c.socket_path, Path::new(DEFAULT_SOCKET_PATH));
        assert_eq!(c.ca_ttl, DEFAULT_CA_TTL);
        assert_eq!(c.default_jwt_svid_ttl, DEFAULT_JWT_SVID_TTL);
        assert_eq!(c.ca_key_type, KeyType::EcP256);
        assert_eq!(c.key_directory(), Path::new("/d/keys"));
    }

    #[test]
    fn limits_take_defaults_and_refuse_zero() {
        let c = ServerConfig::parse("trust_domain = \"td\"\ndata_dir = \"/d\"").unwrap();
        assert_eq!(c.limits, LimitsConfig::default());
        let c = ServerConfig::parse(
            "trust_domain = \"td\"\ndata_dir = \"/d\"\n[limits]\nhandshake_timeout = \"3s\"\n",
        )
        .unwrap();
        assert_eq!(c.limits.handshake_timeout, Duration::from_secs(3));
        assert!(!c.proxy_protocol);
        let c = ServerConfig::parse(
            "trust_domain = \"td\"\ndata_dir = \"/d\"\nproxy_protocol = true\n[limits]\nattestations_per_ip_per_second = 0.5\nsignings_per_ip_per_second = 0\n",
        )
        .unwrap();
        assert!(c.proxy_protocol);
        assert_eq!(c.limits.attestations_per_ip_per_second, 0.5);
        assert_eq!(c.limits.signings_per_ip_per_second, 0.0);
        assert_eq!(
            c.limits.connection_idle_timeout,
            DEFAULT_CONNECTION_IDLE_TIMEOUT
        );
        for (text, key) in [
            (
                "[limits]\nmax_unauthenticated_connections = 0",
                "limits.max_unauthenticated_connections",
            ),
            (
                "[limits]\nconnection_idle_timeout = \"0s\"",
                "limits.connection_idle_timeout",
            ),
            ("[limits]\nidle_timeout = \"1s\"", "idle_timeout"),
            ("instance = \"a b\"", "instance"),
            ("instance = \"\"", "instance"),
            (
                "[limits]\nsignings_per_agent_per_second = -1",
                "limits.signings_per_agent_per_second",
            ),
        ] {
            let err =
                ServerConfig::parse(&format!("trust_domain = \"td\"\ndata_dir = \"/d\"\n{text}"))
                    .unwrap_err()
                    .to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_bundle_endpoint_is_off_by_default_and_takes_spire_s_defaults() {
        let base = "trust_domain = \"td\"\ndata_dir = \"/d\"\n";
        let c = ServerConfig::parse(base).unwrap();
        assert_eq!(c.federation, FederationConfig::default());
        assert!(c.federation.bundle_endpoint.is_none() && c.oidc_discovery.is_none());
        let c = ServerConfig::parse(&format!(
            "{base}[federation.bundle_endpoint]\naddress = \"0.0.0.0:8443\"\n"
        ))
        .unwrap();
        let endpoint = c.federation.bundle_endpoint.unwrap();
        assert_eq!(
            endpoint,
            BundleEndpointConfig::new("0.0.0.0:8443".parse().unwrap())
        );
        assert_eq!(endpoint.refresh_hint, Duration::from_secs(300));
        assert_eq!(endpoint.profile, BundleEndpointProfile::HttpsSpiffe);
        let c = ServerConfig::parse(&format!(
            "{base}[federation.bundle_endpoint]\naddress = \"127.0.0.1:8443\"\n\
             refresh_hint = \"90s\"\nprofile = \"https_web\"\n\
             certificate_path = \"/c.pem\"\nprivate_key_path = \"/k.pem\"\n\
             max_connections = 8\nheader_read_timeout = \"2s\"\n"
        ))
        .unwrap();
        let endpoint = c.federation.bundle_endpoint.unwrap();
        assert_eq!(endpoint.profile, BundleEndpointProfile::HttpsWeb);
        assert_eq!(endpoint.refresh_hint, Duration::from_secs(90));
        assert_eq!(
            endpoint.certificate_path.as_deref(),
            Some(Path::new("/c.pem"))
        );
        assert_eq!(endpoint.max_connections, 8);
        assert_eq!(endpoint.header_read_timeout, Duration::from_secs(2));

        let table = "[federation.bundle_endpoint]\naddress = \"127.0.0.1:8443\"\n";
        for (text, key) in [
            (
                "profile = \"https_web\"\n",
                "federation.bundle_endpoint.certificate_path",
            ),
            (
                "profile = \"https_web\"\ncertificate_path = \"/c\"\n",
                "federation.bundle_endpoint.private_key_path",
            ),
            (
                "certificate_path = \"/c\"\nprivate_key_path = \"/k\"\n",
                "federation.bundle_endpoint.certificate_path",
            ),
            (
                "private_key_path = \"/k\"\n",
                "federation.bundle_endpoint.private_key_path",
            ),
            (
                "refresh_hint = \"500ms\"\n",
                "federation.bundle_endpoint.refresh_hint",
            ),
            (
                "max_connections = 0\n",
                "federation.bundle_endpoint.max_connections",
            ),
            (
                "header_read_timeout = \"0s\"\n",
                "federation.bundle_endpoint.header_read_timeout",
            ),
            ("profile = \"https\"\n", "https_spiffe"),
            ("port = 8443\n", "port"),
        ] {
            let err = ServerConfig::parse(&format!("{base}{table}{text}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
        let err = ServerConfig::parse(&format!("{base}[federation]\nbundle_endpoints = {{}}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bundle_endpoints"), "{err}");
    }

    #[test]
    fn federation_relationships_in_the_file_take_spire_s_keys_and_rules() {
        let base = "trust_domain = \"a.org\"\ndata_dir = \"/d\"\n";
        let c = ServerConfig::parse(&format!(
            "{base}[federation]\n\
             https_web_extra_ca_certificates_path = \"/etc/partner-ca.pem\"\n\
             [federation.trust_domains.\"b.org\"]\n\
             bundle_endpoint_url = \"https://b.example:8443\"\n\
             bundle_endpoint_profile = \"https_spiffe\"\n\
             endpoint_spiffe_id = \"spiffe://b.org/spire/server\"\n\
             trust_domain_bundle_path = \"/etc/b.org.json\"\n\
             trust_domain_bundle_format = \"spiffe\"\n\
             [federation.trust_domains.\"c.org\"]\n\
             bundle_endpoint_url = \"https://c.example/bundle\"\n\
             bundle_endpoint_profile = \"https_web\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.federation.https_web_extra_ca_certificates_path,
            Some(PathBuf::from("/etc/partner-ca.pem"))
        );
        let names: Vec<&str> = c
            .federation
            .trust_domains
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(names, ["b.org", "c.org"]);
        let b = &c.federation.trust_domains["b.org"];
        assert_eq!(b.trust_domain_bundle_format, BundleFileFormat::Spiffe);
        let relationship = b.relationship("b.org").unwrap();
        assert_eq!(relationship.trust_domain().name(), "b.org");
        assert_eq!(
            relationship
                .profile()
                .endpoint_spiffe_id()
                .map(SpiffeId::as_str),
            Some("spiffe://b.org/spire/server")
        );
        let c_org = &c.federation.trust_domains["c.org"];
        assert_eq!(c_org.trust_domain_bundle_format, BundleFileFormat::Pem);
        assert_eq!(
            c_org.relationship("c.org").unwrap().profile(),
            &lanyard_core::BundleEndpointProfile::HttpsWeb
        );

        let table =
            |name: &str, body: &str| format!("{base}[federation.trust_domains.\"{name}\"]\n{body}");
        let spiffe = "bundle_endpoint_profile = \"https_spiffe\"\n\
                      endpoint_spiffe_id = \"spiffe://b.org/spire/server\"\n";
        for (text, expected) in [
            (
                table(
                    "b.org",
                    &format!("bundle_endpoint_url = \"http://b.example\"\n{spiffe}"),
                ),
                "bundle endpoint URL must use the https scheme",
            ),
            (
                table(
                    "B.org",
                    &format!("bundle_endpoint_url = \"https://b.example\"\n{spiffe}"),
                ),
                "failed to parse trust domain",
            ),
            (
                table(
                    "a.org",
                    &format!("bundle_endpoint_url = \"https://a.example\"\n{spiffe}"),
                ),
                "unable to create federation relationship for server trust domain",
            ),
            (
                table(
                    "b.org",
                    "bundle_endpoint_url = \"https://b.example\"\n\
                     bundle_endpoint_profile = \"https_spiffe\"\n",
                ),
                "failed to parse endpoint SPIFFE ID",
            ),
            (
                table(
                    "b.org",
                    "bundle_endpoint_url = \"https://b.example\"\n\
                     bundle_endpoint_profile = \"https_web\"\n\
                     endpoint_spiffe_id = \"spiffe://b.org/x\"\n",
                ),
                "endpoint_spiffe_id is for bundle_endpoint_profile = \"https_spiffe\" only",
            ),
            (
                table(
                    "b.org",
                    "bundle_endpoint_url = \"https://b.example\"\n\
                     bundle_endpoint_profile = \"https\"\n",
                ),
                "unknown bundle endpoint profile type",
            ),
            (
                table(
                    "b.org",
                    &format!(
                        "bundle_endpoint_url = \"https://b.example\"\n{spiffe}trust_domain_bundle_format = \"der\"\n"
                    ),
                ),
                "trust_domain_bundle_format",
            ),
            (
                table(
                    "b.org",
                    &format!(
                        "bundle_endpoint_url = \"https://b.example\"\n{spiffe}endpoint = \"x\"\n"
                    ),
                ),
                "endpoint",
            ),
            (table("b.org", spiffe), "bundle_endpoint_url"),
        ] {
            let err = ServerConfig::parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn oidc_discovery_needs_jwt_issuer_and_tls_unless_insecure_http_is_said() {
        let base = "trust_domain = \"td\"\ndata_dir = \"/d\"\n";
        let tls = "[oidc_discovery]\naddress = \"0.0.0.0:8444\"\n\
                   certificate_path = \"/c.pem\"\nprivate_key_path = \"/k.pem\"\n";
        let c = ServerConfig::parse(&format!(
            "{base}jwt_issuer = \"https://oidc.example.org\"\n{tls}"
        ))
        .unwrap();
        let oidc = c.oidc_discovery.unwrap();
        assert!(!oidc.insecure_http);
        assert_eq!(oidc.cache_max_age, DEFAULT_OIDC_CACHE_MAX_AGE);
        assert_eq!(oidc.max_connections, DEFAULT_ENDPOINT_MAX_CONNECTIONS);
        let c = ServerConfig::parse(&format!(
            "{base}jwt_issuer = \"http://127.0.0.1:8444\"\n\
             [oidc_discovery]\naddress = \"127.0.0.1:8444\"\ninsecure_http = true\n\
             cache_max_age = \"0s\"\n"
        ))
        .unwrap();
        let oidc = c.oidc_discovery.unwrap();
        assert!(oidc.insecure_http);
        assert_eq!(oidc.cache_max_age, Duration::ZERO);

        let insecure = "[oidc_discovery]\naddress = \"127.0.0.1:8444\"\ninsecure_http = true\n";
        for (text, keys) in [
            (tls.to_owned(), &["jwt_issuer", "[oidc_discovery]"][..]),
            (
                format!("jwt_issuer = \"http://oidc.example.org\"\n{tls}"),
                &["jwt_issuer", "insecure_http"],
            ),
            (
                format!("jwt_issuer = \"oidc.example.org\"\n{insecure}"),
                &["jwt_issuer", "https URL"],
            ),
            (
                format!("jwt_issuer = \"https://\"\n{insecure}"),
                &["jwt_issuer", "no host"],
            ),
            (
                format!("jwt_issuer = \"https://a.org/?x=1\"\n{insecure}"),
                &["jwt_issuer", "query"],
            ),
            (
                format!("jwt_issuer = \"https://u@a.org\"\n{insecure}"),
                &["jwt_issuer", "user info"],
            ),
            (
                "jwt_issuer = \"https://a.org\"\n[oidc_discovery]\naddress = \"127.0.0.1:1\"\n"
                    .to_owned(),
                &["oidc_discovery.certificate_path"],
            ),
            (
                format!("jwt_issuer = \"https://a.org\"\n{insecure}certificate_path = \"/c\"\n"),
                &["oidc_discovery.certificate_path", "insecure_http"],
            ),
            (
                format!("jwt_issuer = \"https://a.org\"\n{insecure}max_connections = 0\n"),
                &["oidc_discovery.max_connections"],
            ),
            (
                format!("jwt_issuer = \"https://a.org\"\n{insecure}insecure = true\n"),
                &["unknown field", "insecure"],
            ),
        ] {
            let err = ServerConfig::parse(&format!("{base}{text}"))
                .unwrap_err()
                .to_string();
            for key in keys {
                assert!(err.contains(key), "{text:?}: {err}");
            }
        }
    }

    #[test]
    fn postgres_needs_a_connection_string_that_is_never_shown() {
        let base = "trust_domain = \"td\"\ndata_dir = \"/d\"\n[datastore]\n";
        let config = ServerConfig::parse(&format!(
            "{base}kind = \"postgres\"\nconnection_string = \"postgres://u:hunter2@db/lanyard\"\n\
             max_connections = 16"
        ))
        .unwrap();
        assert_eq!(config.datastore.kind, DatastoreKind::Postgres);
        assert_eq!(config.datastore.max_connections, Some(16));
        assert_eq!(
            config
                .datastore
                .connection_string
                .as_ref()
                .unwrap()
                .expose(),
            "postgres://u:hunter2@db/lanyard"
        );
        assert!(!format!("{config:?}").contains("hunter2"));
        let err = ServerConfig::parse(&format!(
            "{base}kind = \"sqlite\"\nread_connection_string = \"postgres://replica/x\""
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("datastore.read_connection_string"), "{err}");
        for (text, key) in [
            ("kind = \"postgres\"", "datastore.connection_string"),
            (
                "kind = \"sqlite\"\nconnection_string = \"postgres://db/x\"",
                "datastore.connection_string",
            ),
            (
                "kind = \"postgres\"\nconnection_string = \"postgres://db/x\"\nmax_connections = 0",
                "datastore.max_connections",
            ),
        ] {
            let err = ServerConfig::parse(&format!("{base}{text}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = ServerConfig::parse("trust_domain = \"td\"\ndata_dir = \"/d\"\nca_tll = \"1h\"")
            .unwrap_err();
        assert!(err.to_string().contains("ca_tll"), "{err}");
        let err = ServerConfig::parse(
            "trust_domain = \"td\"\ndata_dir = \"/d\"\n[datastore]\nknd = \"sqlite\"",
        )
        .unwrap_err();
        assert!(err.to_string().contains("knd"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("trust_domain = \"Bad\"\ndata_dir = \"/d\"", "trust domain"),
            (
                "trust_domain = \"td\"\ndata_dir = \"/d\"\nca_ttl = \"soon\"",
                "soon",
            ),
            (
                "trust_domain = \"td\"\ndata_dir = \"/d\"\nca_ttl = \"0s\"",
                "ca_ttl",
            ),
            (
                "trust_domain = \"td\"\ndata_dir = \"/d\"\nca_key_type = \"ed25519\"",
                "ed25519",
            ),
            (
                "trust_domain = \"td\"\ndata_dir = \"/d\"\nca_key_type = \"rsa-2048\"",
                "ca_key_type",
            ),
            (
                "trust_domain = \"td\"\ndata_dir = \"/d\"\nlog_level = \"loud\"",
                "log_level",
            ),
            (
                "trust_domain = \"td\"\ndata_dir = \"/d\"\nbind_address = \"nowhere\"",
                "bind_address",
            ),
            ("data_dir = \"/d\"", "trust_domain"),
        ];
        for (text, needle) in cases {
            let err = ServerConfig::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
