//! Envoy's Secret Discovery Service (SDS v3) on the Workload API socket, served the way
//! SPIRE's agent serves it, so that an Envoy configured for SPIRE works unchanged.
//!
//! The caller is identified and attested exactly as for the Workload API (peer credentials,
//! then selectors); SDS calls carry no `workload.spiffe.io` header. Resource names are:
//! - a SPIFFE ID of one of the caller's entries, or `default_svid_name` (`default`) for its
//!   first one: a `TlsCertificate` with the X.509-SVID chain and its key;
//! - a trust domain's ID (`spiffe://example.org`): the caller's own trust domain, or one its
//!   entries federate with; `default_bundle_name` (`ROOTCA`) for its own: a validation
//!   context with that trust domain's X.509 authorities;
//! - `default_all_bundles_name` (`ALL`): one validation context for its own trust domain and
//!   every one its entries federate with.
//!
//! No names means everything the caller has. Validation contexts use Envoy's SPIFFE
//! certificate validator (each trust domain bound to its own authorities), or plain trusted
//! CAs for an Envoy older than 1.18 or when `disable_spiffe_cert_validation` is set (in the
//! configuration, or by the Envoy in its node metadata). `ALL` has no plain form: a flat CA
//! list would let one federated authority vouch for another trust domain's IDs, so it is
//! refused there.
//!
//! `StreamSecrets` follows xDS's state-of-the-world rules: a request whose nonce is not the
//! last one sent is stale and ignored; an ACK or a NACK (which is logged) with unchanged
//! names gets no answer, so a rejected response is never sent again in a loop; a change of
//! names, or a change in what those names resolve to (a rotation, a new bundle), sends a
//! response with the next version and a fresh nonce. `FetchSecrets` answers once;
//! `DeltaSecrets` is Unimplemented, as in SPIRE.
//!
//! The decisions ([`StreamState`], [`build`]) are pure functions of the request, the
//! snapshot and the clock; [`SecretDiscovery`] drives them from the stream and the agent's
//! snapshots.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use lanyard_core::keys::pem_encode;
use lanyard_core::{EntryId, SelectorSet, TrustBundle, TrustDomain};
use lanyard_proto::envoy::config::core::v3::{
    DataSource, Node, TypedExtensionConfig, data_source, node,
};
use lanyard_proto::envoy::extensions::transport_sockets::tls::v3::Secret;
use lanyard_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use lanyard_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use lanyard_proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use prost_types::Any;
use ring::rand::{SecureRandom as _, SystemRandom};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{
    Caller, Delivery, NOT_SYNCED, SVIDS_PENDING, Streamed, WorkloadApi, WorkloadError, deliver,
    sleep_until_time, stopped,
};
use crate::cache::{Identity, Snapshot};
use crate::config::SdsConfig;

/// The type URL of SDS resources, the only one this service serves.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The name of Envoy's SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";

/// The node metadata key with which an Envoy turns the SPIFFE validator off (or on).
pub const DISABLE_SPIFFE_VALIDATION_KEY: &str = "disable_spiffe_cert_validation";

/// The most resource names one request may carry.
pub const MAX_RESOURCE_NAMES: usize = 1024;

/// The SDS handler: the Workload API's caller identification, limits and snapshots, with
/// SPIRE's resource naming.
#[derive(Debug, Clone)]
pub struct SecretDiscovery {
    api: WorkloadApi,
    config: Arc<SdsConfig>,
}

impl SecretDiscovery {
    /// Serves SDS from the same snapshots, attestor and limits as `api`.
    pub fn new(api: WorkloadApi, config: SdsConfig) -> Self {
        Self {
            api,
            config: Arc::new(config),
        }
    }

    /// The service, for [`tonic::transport::server::Router::add_service`] on the Workload
    /// API's router (no security header: Envoy sends none).
    pub fn into_service(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self)
    }
}

/// Why a response could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The caller matches no entry: it gets nothing, not even a bundle.
    NoIdentity,
    /// Names the caller may not have (sorted).
    NotAuthorized(Vec<String>),
    /// A request for another resource type.
    WrongType(String),
    /// Too many names in one request.
    TooManyNames(usize),
    /// `ALL` was asked for without the SPIFFE validator.
    AllNeedsSpiffeValidator(String),
}

impl Refusal {
    fn into_status(self) -> Status {
        match self {
            Self::NoIdentity => WorkloadError::NoIdentity.into_status(),
            Self::NotAuthorized(names) => Status::invalid_argument(format!(
                "workload is not authorized for the requested identities {names:?}"
            )),
            Self::WrongType(type_url) => Status::invalid_argument(format!(
                "this agent serves {SECRET_TYPE_URL} over SDS, not {type_url:?}"
            )),
            Self::TooManyNames(n) => Status::invalid_argument(format!(
                "{n} resource names in one request; at most {MAX_RESOURCE_NAMES} are served"
            )),
            Self::AllNeedsSpiffeValidator(name) => Status::invalid_argument(format!(
                "{name:?} (every trust domain's bundle) needs Envoy's SPIFFE certificate \
                 validator (Envoy 1.18 or later, disable_spiffe_cert_validation off): as \
                 plain trusted CAs one trust domain's authorities would vouch for another's \
                 IDs; ask for each trust domain's ID instead"
            )),
        }
    }
}

/// What a request resolves to against one snapshot.
#[derive(Debug, Clone, PartialEq)]
pub enum Built {
    /// These resources, in a stable order.
    Ready {
        /// The secrets, each packed as an `Any`.
        resources: Vec<Any>,
        /// The entries whose SVIDs are among them.
        served: Vec<EntryId>,
        /// When to look again (the first SVID sent expires).
        recheck_at: Option<SystemTime>,
    },
    /// Not yet: the agent has not synced, or a requested SVID is not minted yet.
    Wait {
        /// Why, for the log.
        reason: &'static str,
        /// When to look again even without a new snapshot.
        recheck_at: Option<SystemTime>,
    },
    /// Never: the request is refused.
    Refused(Refusal),
}

/// Whether `node` can take Envoy's SPIFFE certificate validator: Envoy 1.18 or later, or a
/// client that does not say.
fn supports_spiffe_validator(node: Option<&Node>) -> bool {
    match node.and_then(|n| n.user_agent_version_type.as_ref()) {
        Some(node::UserAgentVersionType::UserAgentBuildVersion(build)) => build
            .version
            .as_ref()
            .is_none_or(|v| v.major_number > 1 || (v.major_number == 1 && v.minor_number >= 18)),
        _ => true,
    }
}

/// Go's `strconv.ParseBool`, which is what an Envoy configured for SPIRE writes.
fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Whether validation contexts go out as the SPIFFE validator for this request.
fn use_spiffe_validator(config: &SdsConfig, node: Option<&Node>) -> bool {
    let mut disabled = config.disable_spiffe_cert_validation;
    let metadata = node.and_then(|n| n.metadata.as_ref());
    if let Some(value) = metadata.and_then(|m| m.fields.get(DISABLE_SPIFFE_VALIDATION_KEY)) {
        use prost_types::value::Kind;
        let parsed = match &value.kind {
            Some(Kind::BoolValue(b)) => Some(*b),
            Some(Kind::StringValue(s)) => parse_bool(s),
            _ => None,
        };
        if let Some(parsed) = parsed {
            disabled = parsed;
        }
    }
    !disabled && supports_spiffe_validator(node)
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
    })
}

fn pack<M: prost::Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

fn validation_context(name: String, context: CertificateValidationContext) -> Any {
    pack(&Secret {
        name,
        r#type: Some(secret::Type::ValidationContext(context)),
    })
}

/// A validation context for `bundles`: the SPIFFE validator with one trust domain per bundle,
/// or (one bundle only) its authorities as trusted CAs.
fn bundles_context(
    spiffe: bool,
    bundles: &[(&TrustDomain, &TrustBundle)],
) -> CertificateValidationContext {
    if spiffe {
        let trust_domains = bundles
            .iter()
            .map(|(td, bundle)| spiffe_cert_validator_config::TrustDomain {
                name: td.name().to_owned(),
                trust_bundle: inline(bundle.x509_authorities_pem().into_bytes()),
            })
            .collect();
        CertificateValidationContext {
            custom_validator_config: Some(TypedExtensionConfig {
                name: SPIFFE_VALIDATOR.to_owned(),
                typed_config: Some(pack(&SpiffeCertValidatorConfig { trust_domains })),
            }),
            ..CertificateValidationContext::default()
        }
    } else {
        let pem: String = bundles
            .iter()
            .map(|(_, bundle)| bundle.x509_authorities_pem())
            .collect();
        CertificateValidationContext {
            trusted_ca: inline(pem.into_bytes()),
            ..CertificateValidationContext::default()
        }
    }
}

fn tls_certificate(name: String, identity: &Identity) -> Any {
    let chain: String = identity
        .svid
        .cert_chain()
        .iter()
        .map(|der| pem_encode("CERTIFICATE", der))
        .collect();
    pack(&Secret {
        name,
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain.into_bytes()),
            private_key: inline(identity.key.secret_pkcs8_pem().into_bytes()),
        })),
    })
}

/// What `names` (empty: everything) resolve to for a caller with `selectors` in `snapshot`
/// at `now`, for an Envoy described by `node`.
pub fn build(
    config: &SdsConfig,
    snapshot: &Snapshot,
    selectors: &SelectorSet,
    names: &[String],
    node: Option<&Node>,
    now: SystemTime,
) -> Built {
    if names.len() > MAX_RESOURCE_NAMES {
        return Built::Refused(Refusal::TooManyNames(names.len()));
    }
    if !snapshot.synced {
        return Built::Wait {
            reason: NOT_SYNCED,
            recheck_at: None,
        };
    }
    let entries = snapshot.entries_for(selectors);
    if entries.is_empty() {
        return Built::Refused(Refusal::NoIdentity);
    }
    let identities = snapshot.identities_for(selectors, now);
    let recheck_at = identities.iter().map(|i| i.svid.not_after()).min();
    let mut wanted: BTreeSet<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !n.is_empty())
        .collect();
    let everything = wanted.is_empty();
    let spiffe = use_spiffe_validator(config, node);
    let own_td = &snapshot.trust_domain;
    let own: (&TrustDomain, &TrustBundle) = (own_td, &snapshot.bundle);
    let federated = snapshot.federated_for(entries.iter().map(AsRef::as_ref));
    let federated: Vec<(&TrustDomain, &TrustBundle)> = federated
        .iter()
        .filter(|(td, _)| *td != own_td)
        .map(|(td, bundle)| (td, bundle.as_ref()))
        .collect();

    let mut resources = Vec::new();
    let own_id = own_td.id().to_string();
    if everything || wanted.remove(own_id.as_str()) {
        resources.push(validation_context(
            own_id.clone(),
            bundles_context(spiffe, &[own]),
        ));
    }
    if wanted.remove(config.default_bundle_name.as_str()) {
        resources.push(validation_context(
            config.default_bundle_name.clone(),
            bundles_context(spiffe, &[own]),
        ));
    }
    if wanted.contains(config.default_all_bundles_name.as_str()) {
        if !spiffe {
            return Built::Refused(Refusal::AllNeedsSpiffeValidator(
                config.default_all_bundles_name.clone(),
            ));
        }
        wanted.remove(config.default_all_bundles_name.as_str());
        let mut all = vec![own];
        all.extend(federated.iter().copied());
        all.sort_by(|a, b| a.0.name().cmp(b.0.name()));
        resources.push(validation_context(
            config.default_all_bundles_name.clone(),
            bundles_context(true, &all),
        ));
    }
    for &(td, bundle) in &federated {
        let id = td.id().to_string();
        if everything || wanted.remove(id.as_str()) {
            resources.push(validation_context(
                id,
                bundles_context(spiffe, &[(td, bundle)]),
            ));
        }
    }

    let mut served = Vec::new();
    let mut named = BTreeSet::new();
    let minted = |entry_id: &EntryId| identities.iter().find(|i| &i.entry.id == entry_id);
    for entry in &entries {
        let id = entry.spiffe_id.to_string();
        if !(everything || wanted.contains(id.as_str())) || !named.insert(id.clone()) {
            continue;
        }
        match minted(&entry.id) {
            Some(identity) => {
                wanted.remove(id.as_str());
                resources.push(tls_certificate(id, identity));
                served.push(entry.id.clone());
            }
            // Named, authorized and not minted yet: wait for it. Asked for everything: send
            // what is minted, and the rest when it comes.
            None if !everything => {
                return Built::Wait {
                    reason: SVIDS_PENDING,
                    recheck_at,
                };
            }
            None => {}
        }
    }
    if wanted.remove(config.default_svid_name.as_str()) {
        let Some(first) = identities.first() else {
            return Built::Wait {
                reason: SVIDS_PENDING,
                recheck_at,
            };
        };
        resources.push(tls_certificate(config.default_svid_name.clone(), first));
        served.push(first.entry.id.clone());
    }
    if everything && identities.is_empty() {
        return Built::Wait {
            reason: SVIDS_PENDING,
            recheck_at,
        };
    }
    if !wanted.is_empty() {
        return Built::Refused(Refusal::NotAuthorized(
            wanted.into_iter().map(str::to_owned).collect(),
        ));
    }
    Built::Ready {
        resources,
        served,
        recheck_at,
    }
}

/// What a stream should do after an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Nothing to send.
    Nothing,
    /// Send this response.
    Send(DiscoveryResponse, Vec<EntryId>),
    /// End the stream with this status.
    End(Refusal),
}

/// A `StreamSecrets` stream's state: the last request accepted, what was last sent, under
/// which version and nonce.
#[derive(Debug, Default)]
pub struct StreamState {
    /// Names and node of the last request that was not stale (a request without a node
    /// keeps the previous one).
    names: Option<Vec<String>>,
    node: Option<Node>,
    /// The nonce of the last response sent.
    last_nonce: Option<String>,
    /// Versions are counted per stream; each response sent takes the next.
    version: u64,
    /// The resources last sent.
    last_sent: Option<Vec<Any>>,
    /// A response is owed (names changed) but could not be built yet.
    owed: bool,
    /// When to build again without a new snapshot: the first SVID resolved expires.
    recheck_at: Option<SystemTime>,
}

/// What one incoming request means for the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// The first request, or one naming other resources.
    New,
    /// An acknowledgement of the last response.
    Ack,
    /// A rejection of the last response (it carries an error, or another version).
    Nack,
    /// Its nonce is not the last one sent: ignored.
    Stale,
}

impl StreamState {
    /// The version string of the last response sent ("" before any).
    pub fn version_info(&self) -> String {
        if self.version == 0 {
            String::new()
        } else {
            self.version.to_string()
        }
    }

    /// Takes a request from the client; `nonce` supplies the next response's nonce.
    pub fn on_request(
        &mut self,
        request: DiscoveryRequest,
        build_now: impl FnOnce(&[String], Option<&Node>) -> Built,
        nonce: impl FnOnce() -> String,
    ) -> (RequestKind, Action) {
        if !request.type_url.is_empty() && request.type_url != SECRET_TYPE_URL {
            return (
                RequestKind::New,
                Action::End(Refusal::WrongType(request.type_url)),
            );
        }
        let mut kind = RequestKind::New;
        if let Some(last_nonce) = &self.last_nonce {
            if *last_nonce != request.response_nonce {
                return (RequestKind::Stale, Action::Nothing);
            }
            kind = if request.error_detail.is_some() || request.version_info != self.version_info()
            {
                RequestKind::Nack
            } else {
                RequestKind::Ack
            };
        }
        let changed = self
            .names
            .as_ref()
            .is_none_or(|names| !same_names(names, &request.resource_names));
        if request.node.is_some() {
            self.node = request.node;
        }
        self.names = Some(request.resource_names);
        if !changed {
            return (kind, Action::Nothing);
        }
        self.owed = true;
        let built = build_now(
            self.names.as_deref().unwrap_or_default(),
            self.node.as_ref(),
        );
        (RequestKind::New, self.respond(built, nonce))
    }

    /// Looks at a new snapshot (or the clock); sends only what changed, or what is owed.
    pub fn on_update(
        &mut self,
        build_now: impl FnOnce(&[String], Option<&Node>) -> Built,
        nonce: impl FnOnce() -> String,
    ) -> Action {
        let Some(names) = &self.names else {
            return Action::Nothing;
        };
        let built = build_now(names, self.node.as_ref());
        self.respond(built, nonce)
    }

    /// When the stream should build again even without a new snapshot.
    pub fn recheck_at(&self) -> Option<SystemTime> {
        self.recheck_at
    }

    fn respond(&mut self, built: Built, nonce: impl FnOnce() -> String) -> Action {
        match built {
            Built::Refused(refusal) => Action::End(refusal),
            Built::Wait { recheck_at, .. } => {
                self.recheck_at = recheck_at;
                Action::Nothing
            }
            Built::Ready {
                resources,
                served,
                recheck_at,
            } => {
                self.recheck_at = recheck_at;
                if !self.owed && self.last_sent.as_ref() == Some(&resources) {
                    return Action::Nothing;
                }
                self.owed = false;
                self.version += 1;
                let nonce = nonce();
                self.last_nonce = Some(nonce.clone());
                self.last_sent = Some(resources.clone());
                Action::Send(
                    DiscoveryResponse {
                        version_info: self.version_info(),
                        resources,
                        type_url: SECRET_TYPE_URL.to_owned(),
                        nonce,
                        ..DiscoveryResponse::default()
                    },
                    served,
                )
            }
        }
    }
}

/// Whether two name lists ask for the same set.
fn same_names(a: &[String], b: &[String]) -> bool {
    let a: BTreeSet<&String> = a.iter().collect();
    let b: BTreeSet<&String> = b.iter().collect();
    a == b
}

/// A fresh nonce: 16 hex digits from the system's CSPRNG.
fn fresh_nonce(random: &SystemRandom) -> String {
    let mut bytes = [0u8; 8];
    // The system generator does not fail on Linux; a zero nonce would still be unique
    // enough within a stream, since versions differ.
    let _ = random.fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl SecretDiscovery {
    fn build_for(
        &self,
        snapshot: &Snapshot,
        selectors: &SelectorSet,
        names: &[String],
        node: Option<&Node>,
    ) -> Built {
        build(
            &self.config,
            snapshot,
            selectors,
            names,
            node,
            (self.api.clock)(),
        )
    }

    /// Drives one `StreamSecrets` stream: requests from `inbound`, snapshots from the
    /// manager, responses into the returned stream.
    fn stream(
        &self,
        caller: Caller,
        selectors: SelectorSet,
        mut inbound: Streaming<DiscoveryRequest>,
    ) -> Streamed<DiscoveryResponse> {
        let (mut tx, rx) = mpsc::channel(1);
        let this = self.clone();
        let mut snapshots = self.api.snapshots.clone();
        let mut stop = self.api.stop.subscribe();
        let limits = Arc::clone(&self.api.limits);
        let timeout = limits.config.stream_send_timeout;
        let open = self.api.metrics.stream_opened();
        tokio::spawn(async move {
            let _open = open;
            let random = SystemRandom::new();
            let mut state = StreamState::default();
            let mut nack_logged_for: Option<String> = None;
            loop {
                let recheck_at = state.recheck_at();
                let now = (this.api.clock)();
                let action = tokio::select! {
                    received = inbound.message() => match received {
                        Ok(Some(request)) => {
                            if let Err(error) = limits.check_rate(caller.peer.uid) {
                                let _ = deliver(&mut tx, Err(error.into_status()), &mut stop, timeout).await;
                                return;
                            }
                            // One warning per response rejected: a client repeating its
                            // NACK cannot fill the log.
                            if let Some(detail) = &request.error_detail
                                && nack_logged_for != Some(state.version_info())
                            {
                                nack_logged_for = Some(state.version_info());
                                tracing::warn!(
                                    pid = ?caller.peer.pid,
                                    names = ?request.resource_names,
                                    version = %request.version_info,
                                    error = %detail.message,
                                    "Envoy rejected the secrets it was sent"
                                );
                            }
                            let snapshot = Arc::clone(&snapshots.borrow_and_update());
                            let (kind, action) = state.on_request(
                                request,
                                |names, node| this.build_for(&snapshot, &selectors, names, node),
                                || fresh_nonce(&random),
                            );
                            if kind == RequestKind::Stale {
                                tracing::debug!(pid = ?caller.peer.pid, "ignoring an SDS request with a stale nonce");
                            }
                            action
                        }
                        // The client closed its side, or the connection went away.
                        Ok(None) | Err(_) => return,
                    },
                    changed = snapshots.changed() => match changed {
                        Ok(()) => {
                            let snapshot = Arc::clone(&snapshots.borrow_and_update());
                            state.on_update(
                                |names, node| this.build_for(&snapshot, &selectors, names, node),
                                || fresh_nonce(&random),
                            )
                        }
                        Err(_) => {
                            let _ = deliver(&mut tx, Err(WorkloadError::ShuttingDown.into_status()), &mut stop, timeout).await;
                            return;
                        }
                    },
                    () = sleep_until_time(recheck_at, now) => {
                        let snapshot = Arc::clone(&snapshots.borrow());
                        state.on_update(
                            |names, node| this.build_for(&snapshot, &selectors, names, node),
                            || fresh_nonce(&random),
                        )
                    }
                    () = stopped(&mut stop) => {
                        let _ = tx.try_send(Err(WorkloadError::ShuttingDown.into_status()));
                        return;
                    }
                    () = tx.closed() => return,
                };
                match action {
                    Action::Nothing => {}
                    Action::Send(response, served) => {
                        tracing::debug!(
                            pid = ?caller.peer.pid,
                            version = %response.version_info,
                            resources = response.resources.len(),
                            "sending secrets"
                        );
                        match deliver(&mut tx, Ok(response), &mut stop, timeout).await {
                            Delivery::Sent => {}
                            Delivery::Gone => return,
                            Delivery::Stalled => {
                                limits.stalled(&caller);
                                return;
                            }
                        }
                        if let Some(usage) = &this.api.usage {
                            usage.record(&served, (this.api.clock)());
                        }
                    }
                    Action::End(refusal) => {
                        if refusal == Refusal::NoIdentity {
                            this.api.metrics.no_identity("StreamSecrets");
                        }
                        let _ =
                            deliver(&mut tx, Err(refusal.into_status()), &mut stop, timeout).await;
                        return;
                    }
                }
            }
        });
        Streamed(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SecretDiscovery {
    type DeltaSecretsStream = tokio_stream::Empty<Result<DeltaDiscoveryResponse, Status>>;
    type StreamSecretsStream = Streamed<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(WorkloadError::Unimplemented("DeltaSecrets").into_status())
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (selectors, caller) = self.api.attest(&request).await?;
        Ok(Response::new(self.stream(
            caller,
            selectors,
            request.into_inner(),
        )))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let (selectors, _caller) = self.api.attest(&request).await?;
        let request = request.into_inner();
        if !request.type_url.is_empty() && request.type_url != SECRET_TYPE_URL {
            return Err(Refusal::WrongType(request.type_url).into_status());
        }
        let snapshot = self.api.synced_snapshot().await?;
        match self.build_for(
            &snapshot,
            &selectors,
            &request.resource_names,
            request.node.as_ref(),
        ) {
            Built::Ready {
                resources, served, ..
            } => {
                if let Some(usage) = &self.api.usage {
                    usage.record(&served, (self.api.clock)());
                }
                Ok(Response::new(DiscoveryResponse {
                    resources,
                    type_url: SECRET_TYPE_URL.to_owned(),
                    ..DiscoveryResponse::default()
                }))
            }
            Built::Wait { reason, .. } => Err(WorkloadError::NotReady(reason).into_status()),
            Built::Refused(refusal) => {
                if refusal == Refusal::NoIdentity {
                    self.api.metrics.no_identity("FetchSecrets");
                }
                Err(refusal.into_status())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use lanyard_core::x509::{CaSubject, SvidParams, X509Ca};
    use lanyard_core::{EntryId, KeyPair, KeyType, X509Authority};
    use lanyard_proto::envoy::config::core::v3::BuildVersion;
    use lanyard_proto::envoy::r#type::v3::SemanticVersion;
    use lanyard_proto::google::rpc::Status as RpcStatus;
    use prost::Message as _;

    use super::*;
    use crate::cache::CachedEntry;

    struct Fixture {
        ca: X509Ca,
        snapshot: Snapshot,
        entry: Arc<CachedEntry>,
        selectors: SelectorSet,
        now: SystemTime,
    }

    fn ca_of(td: &TrustDomain, now: SystemTime) -> X509Ca {
        X509Ca::self_signed(
            td,
            KeyPair::generate(KeyType::EcP256).unwrap(),
            &CaSubject::default(),
            now - Duration::from_secs(3600),
            Duration::from_secs(24 * 3600),
        )
        .unwrap()
    }

    fn bundle_of(td: &TrustDomain, ca: &X509Ca) -> TrustBundle {
        let mut bundle = TrustBundle::new(td.clone());
        bundle.add_x509_authority(X509Authority::new(ca.cert_der().to_vec()).unwrap());
        bundle
    }

    /// A synced snapshot of example.org, with partner.org's bundle, and an entry for
    /// `spiffe://example.org/web` federating with partner.org (no SVID minted yet).
    fn fixture() -> Fixture {
        let now = SystemTime::now();
        let td = TrustDomain::new("example.org").unwrap();
        let ca = ca_of(&td, now);
        let partner = TrustDomain::new("partner.org").unwrap();
        let mut snapshot = Snapshot::new(td.clone(), Arc::new(bundle_of(&td, &ca)));
        snapshot.federated_bundles.insert(
            partner.clone(),
            Arc::new(bundle_of(&partner, &ca_of(&partner, now))),
        );
        let selectors: SelectorSet = ["unix:uid:1000".parse().unwrap()].into_iter().collect();
        let entry = Arc::new(CachedEntry {
            id: EntryId::new("web").unwrap(),
            spiffe_id: "spiffe://example.org/web".parse().unwrap(),
            selectors: selectors.clone(),
            federates_with: BTreeSet::from([partner]),
            revision_number: 1,
            hint: String::new(),
            created_at: SystemTime::UNIX_EPOCH,
            admin: false,
            downstream: false,
            store_svid: false,
        });
        snapshot.entries.push(Arc::clone(&entry));
        snapshot.synced = true;
        Fixture {
            ca,
            snapshot,
            entry,
            selectors,
            now,
        }
    }

    impl Fixture {
        fn mint(&mut self) -> Identity {
            let key = KeyPair::generate(KeyType::EcP256).unwrap();
            let params = SvidParams::new(
                self.entry.spiffe_id.clone(),
                key.public_key_der(),
                Duration::from_secs(600),
            );
            let identity = Identity {
                entry: Arc::clone(&self.entry),
                svid: Arc::new(self.ca.mint_svid(&params, self.now).unwrap()),
                key: Arc::new(key),
            };
            self.snapshot
                .identities
                .insert(self.entry.id.clone(), identity.clone());
            identity
        }

        fn build(&self, names: &[&str], node: Option<&Node>) -> Built {
            let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
            build(
                &SdsConfig::default(),
                &self.snapshot,
                &self.selectors,
                &names,
                node,
                self.now,
            )
        }

        fn secrets(&self, names: &[&str], node: Option<&Node>) -> Vec<Secret> {
            match self.build(names, node) {
                Built::Ready { resources, .. } => resources.iter().map(unpack).collect(),
                other => panic!("not ready: {other:?}"),
            }
        }
    }

    fn unpack(any: &Any) -> Secret {
        assert_eq!(any.type_url, SECRET_TYPE_URL);
        Secret::decode(any.value.as_slice()).unwrap()
    }

    fn inline_bytes(source: Option<&DataSource>) -> String {
        match source.and_then(|s| s.specifier.as_ref()) {
            Some(data_source::Specifier::InlineBytes(bytes)) => {
                String::from_utf8(bytes.clone()).unwrap()
            }
            other => panic!("not inline bytes: {other:?}"),
        }
    }

    /// The trust domains and PEM bundles of a SPIFFE validator context, or `None` for a
    /// plain one (then its trusted CA PEM in the second slot).
    fn context_of(secret: &Secret) -> (Option<Vec<(String, String)>>, Option<String>) {
        let Some(secret::Type::ValidationContext(context)) = &secret.r#type else {
            panic!("{} is not a validation context", secret.name);
        };
        match &context.custom_validator_config {
            Some(validator) => {
                assert_eq!(validator.name, SPIFFE_VALIDATOR);
                let typed = validator.typed_config.as_ref().unwrap();
                assert_eq!(
                    typed.type_url,
                    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
                );
                let config = SpiffeCertValidatorConfig::decode(typed.value.as_slice()).unwrap();
                let domains = config
                    .trust_domains
                    .iter()
                    .map(|td| (td.name.clone(), inline_bytes(td.trust_bundle.as_ref())))
                    .collect();
                (Some(domains), None)
            }
            None => (None, Some(inline_bytes(context.trusted_ca.as_ref()))),
        }
    }

    fn envoy(major: u32, minor: u32) -> Node {
        Node {
            id: "sidecar".into(),
            user_agent_name: "envoy".into(),
            user_agent_version_type: Some(node::UserAgentVersionType::UserAgentBuildVersion(
                BuildVersion {
                    version: Some(SemanticVersion {
                        major_number: major,
                        minor_number: minor,
                        patch: 0,
                    }),
                    metadata: None,
                },
            )),
            ..Node::default()
        }
    }

    fn with_metadata(mut node: Node, key: &str, value: prost_types::value::Kind) -> Node {
        node.metadata = Some(prost_types::Struct {
            fields: [(key.to_owned(), prost_types::Value { kind: Some(value) })]
                .into_iter()
                .collect(),
        });
        node
    }

    #[test]
    fn nothing_before_the_first_sync_and_no_secret_for_a_caller_without_entries() {
        let mut f = fixture();
        f.snapshot.synced = false;
        assert!(matches!(f.build(&[], None), Built::Wait { .. }));
        f.snapshot.synced = true;
        f.mint();
        let stranger: SelectorSet = ["unix:uid:0".parse().unwrap()].into_iter().collect();
        for names in [vec![], vec!["ROOTCA".to_owned()]] {
            let built = build(
                &SdsConfig::default(),
                &f.snapshot,
                &stranger,
                &names,
                None,
                f.now,
            );
            assert_eq!(built, Built::Refused(Refusal::NoIdentity), "{names:?}");
        }
        assert_eq!(
            Refusal::NoIdentity.into_status().code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn a_named_svid_waits_until_minted_then_comes_with_its_chain_and_key() {
        let mut f = fixture();
        let wanted = ["spiffe://example.org/web"];
        assert!(matches!(f.build(&wanted, None), Built::Wait { .. }));
        assert!(matches!(f.build(&["default"], None), Built::Wait { .. }));
        let identity = f.mint();
        for (name, expected_name) in [
            ("spiffe://example.org/web", "spiffe://example.org/web"),
            ("default", "default"),
        ] {
            let secrets = f.secrets(&[name], None);
            assert_eq!(secrets.len(), 1);
            assert_eq!(secrets[0].name, expected_name);
            let Some(secret::Type::TlsCertificate(certificate)) = &secrets[0].r#type else {
                panic!("not a certificate");
            };
            assert_eq!(
                inline_bytes(certificate.certificate_chain.as_ref()),
                pem_encode("CERTIFICATE", &identity.svid.cert_chain()[0])
            );
            assert_eq!(
                inline_bytes(certificate.private_key.as_ref()),
                identity.key.secret_pkcs8_pem()
            );
        }
        match f.build(&wanted, None) {
            Built::Ready {
                served, recheck_at, ..
            } => {
                assert_eq!(served, vec![f.entry.id.clone()]);
                assert_eq!(recheck_at, Some(identity.svid.not_after()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_names_means_own_and_federated_bundles_and_every_svid() {
        let mut f = fixture();
        f.mint();
        let names: Vec<String> = f.secrets(&[], None).into_iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "spiffe://example.org",
                "spiffe://partner.org",
                "spiffe://example.org/web"
            ]
        );
    }

    #[test]
    fn bundles_go_out_as_the_spiffe_validator_or_as_trusted_cas() {
        let mut f = fixture();
        f.mint();
        let own_pem = f.snapshot.bundle.x509_authorities_pem();
        let partner_pem = f
            .snapshot
            .federated_bundles
            .values()
            .next()
            .unwrap()
            .x509_authorities_pem();
        let recent = envoy(1, 30);
        for node in [None, Some(&recent)] {
            let secrets = f.secrets(&["ROOTCA", "spiffe://partner.org", "ALL"], node);
            let by_name: BTreeMap<&str, &Secret> =
                secrets.iter().map(|s| (s.name.as_str(), s)).collect();
            assert_eq!(
                context_of(by_name["ROOTCA"]).0.unwrap(),
                vec![("example.org".to_owned(), own_pem.clone())]
            );
            assert_eq!(
                context_of(by_name["spiffe://partner.org"]).0.unwrap(),
                vec![("partner.org".to_owned(), partner_pem.clone())]
            );
            assert_eq!(
                context_of(by_name["ALL"]).0.unwrap(),
                vec![
                    ("example.org".to_owned(), own_pem.clone()),
                    ("partner.org".to_owned(), partner_pem.clone())
                ]
            );
        }
        // Envoy 1.17 has no SPIFFE validator; a node may turn it off, as may the config.
        let old = envoy(1, 17);
        let opted_out = with_metadata(
            envoy(1, 30),
            DISABLE_SPIFFE_VALIDATION_KEY,
            prost_types::value::Kind::StringValue("true".into()),
        );
        let opted_out_bool = with_metadata(
            envoy(1, 30),
            DISABLE_SPIFFE_VALIDATION_KEY,
            prost_types::value::Kind::BoolValue(true),
        );
        for node in [&old, &opted_out, &opted_out_bool] {
            let secrets = f.secrets(&["ROOTCA", "spiffe://partner.org"], Some(node));
            assert_eq!(context_of(&secrets[0]).1.unwrap(), own_pem);
            assert_eq!(context_of(&secrets[1]).1.unwrap(), partner_pem);
            assert!(matches!(
                f.build(&["ALL"], Some(node)),
                Built::Refused(Refusal::AllNeedsSpiffeValidator(_))
            ));
        }
        // A node's "false" overrides a configuration that disables the validator.
        let config = SdsConfig {
            disable_spiffe_cert_validation: true,
            ..SdsConfig::default()
        };
        let opted_in = with_metadata(
            envoy(1, 30),
            DISABLE_SPIFFE_VALIDATION_KEY,
            prost_types::value::Kind::StringValue("false".into()),
        );
        assert!(use_spiffe_validator(&config, Some(&opted_in)));
        assert!(!use_spiffe_validator(&config, Some(&envoy(1, 30))));
        // Garbage in the metadata leaves the configuration in charge.
        let garbage = with_metadata(
            envoy(1, 30),
            DISABLE_SPIFFE_VALIDATION_KEY,
            prost_types::value::Kind::StringValue("maybe".into()),
        );
        assert!(use_spiffe_validator(&SdsConfig::default(), Some(&garbage)));
    }

    #[test]
    fn names_the_caller_may_not_have_are_refused_by_name() {
        let mut f = fixture();
        f.mint();
        assert_eq!(
            f.build(
                &[
                    "spiffe://example.org/web",
                    "spiffe://example.org/db",
                    "spiffe://other.org",
                    "spiffe://example.org/web"
                ],
                None
            ),
            Built::Refused(Refusal::NotAuthorized(vec![
                "spiffe://example.org/db".into(),
                "spiffe://other.org".into()
            ]))
        );
        // A bundle the agent holds but the caller's entries do not federate with.
        Arc::make_mut(&mut f.entry).federates_with.clear();
        f.snapshot.entries = vec![Arc::clone(&f.entry)];
        assert_eq!(
            f.build(&["spiffe://partner.org"], None),
            Built::Refused(Refusal::NotAuthorized(vec!["spiffe://partner.org".into()]))
        );
        let too_many: Vec<String> = (0..=MAX_RESOURCE_NAMES).map(|i| format!("n{i}")).collect();
        let built = build(
            &SdsConfig::default(),
            &f.snapshot,
            &f.selectors,
            &too_many,
            None,
            f.now,
        );
        assert!(matches!(built, Built::Refused(Refusal::TooManyNames(_))));
    }

    fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.to_owned(),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            type_url: SECRET_TYPE_URL.to_owned(),
            response_nonce: nonce.to_owned(),
            ..DiscoveryRequest::default()
        }
    }

    fn sent(action: Action) -> DiscoveryResponse {
        match action {
            Action::Send(response, _) => response,
            other => panic!("nothing sent: {other:?}"),
        }
    }

    #[test]
    fn acks_and_nacks_get_no_answer_and_only_changes_are_pushed() {
        let mut f = fixture();
        f.mint();
        let mut nonces = (1..).map(|n| format!("nonce-{n}"));
        let mut state = StreamState::default();
        let names = ["spiffe://example.org/web", "ROOTCA"];
        let (kind, action) = state.on_request(
            request(&names, "", ""),
            |n, node| f.build(&n.iter().map(String::as_str).collect::<Vec<_>>(), node),
            || nonces.next().unwrap(),
        );
        assert_eq!(kind, RequestKind::New);
        let first = sent(action);
        assert_eq!(
            (first.version_info.as_str(), first.nonce.as_str()),
            ("1", "nonce-1")
        );
        assert_eq!(first.type_url, SECRET_TYPE_URL);
        assert_eq!(first.resources.len(), 2);

        let build_names = |state: &mut StreamState, req: DiscoveryRequest| {
            state.on_request(
                req,
                |n, node| f.build(&n.iter().map(String::as_str).collect::<Vec<_>>(), node),
                || "unused".to_owned(),
            )
        };
        // ACK: nothing. NACK with the same names: nothing either, so no loop.
        assert_eq!(
            build_names(&mut state, request(&names, "1", "nonce-1")),
            (RequestKind::Ack, Action::Nothing)
        );
        let mut nack = request(&names, "", "nonce-1");
        nack.error_detail = Some(RpcStatus {
            code: 3,
            message: "bad key".into(),
            details: vec![],
        });
        assert_eq!(
            build_names(&mut state, nack),
            (RequestKind::Nack, Action::Nothing)
        );
        // A request answering an older nonce is stale, even with new names.
        assert_eq!(
            build_names(&mut state, request(&["default"], "1", "nonce-0")),
            (RequestKind::Stale, Action::Nothing)
        );
        // A snapshot that changes nothing for this caller sends nothing.
        let unchanged = state.on_update(
            |n, node| f.build(&n.iter().map(String::as_str).collect::<Vec<_>>(), node),
            || "unused".to_owned(),
        );
        assert_eq!(unchanged, Action::Nothing);
        // A rotation is pushed with the next version and a fresh nonce.
        f.mint();
        let rotated = sent(state.on_update(
            |n, node| f.build(&n.iter().map(String::as_str).collect::<Vec<_>>(), node),
            || nonces.next().unwrap(),
        ));
        assert_eq!(
            (rotated.version_info.as_str(), rotated.nonce.as_str()),
            ("2", "nonce-2")
        );
        assert_ne!(rotated.resources, first.resources);
        // New names are answered at once, even when an earlier response was not ACKed.
        let (kind, action) = state.on_request(
            request(&["ALL"], "1", "nonce-2"),
            |n, node| f.build(&n.iter().map(String::as_str).collect::<Vec<_>>(), node),
            || nonces.next().unwrap(),
        );
        assert_eq!(kind, RequestKind::New);
        assert_eq!(sent(action).version_info, "3");
        // An unauthorized name ends the stream.
        let (_, action) = state.on_request(
            request(&["spiffe://example.org/db"], "3", "nonce-3"),
            |n, node| f.build(&n.iter().map(String::as_str).collect::<Vec<_>>(), node),
            || nonces.next().unwrap(),
        );
        assert!(matches!(action, Action::End(Refusal::NotAuthorized(_))));
    }

    #[test]
    fn a_request_before_the_svid_is_answered_when_it_arrives() {
        let mut f = fixture();
        let mut state = StreamState::default();
        let names = ["spiffe://example.org/web"];
        let (_, action) = state.on_request(
            request(&names, "", ""),
            |n, node| f.build(&n.iter().map(String::as_str).collect::<Vec<_>>(), node),
            || "n1".to_owned(),
        );
        assert_eq!(action, Action::Nothing);
        f.mint();
        let response = sent(state.on_update(
            |n, node| f.build(&n.iter().map(String::as_str).collect::<Vec<_>>(), node),
            || "n1".to_owned(),
        ));
        assert_eq!(response.version_info, "1");
        assert_eq!(response.resources.len(), 1);
    }

    #[test]
    fn another_resource_type_is_refused() {
        let f = fixture();
        let mut state = StreamState::default();
        let mut req = request(&[], "", "");
        req.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        let (_, action) = state.on_request(
            req,
            |n, node| f.build(&n.iter().map(String::as_str).collect::<Vec<_>>(), node),
            || "n".to_owned(),
        );
        let Action::End(refusal) = action else {
            panic!("{action:?}");
        };
        assert_eq!(refusal.into_status().code(), tonic::Code::InvalidArgument);
    }
}
