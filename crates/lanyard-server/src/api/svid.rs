//! SPIRE's SVID service (`spire.api.server.svid.v1.SVID`): one-off SVIDs for admins, SVIDs for
//! the entries an agent is authorized for, and intermediate CAs for downstream servers.
//!
//! Agents send a CSR per entry; only its key is used (after its signature is checked). The
//! SPIFFE ID, DNS names and lifetime come from the entry, and every lifetime is capped at the
//! signing authority's expiry. Every issuance is logged under the `issuance` target with its
//! serial (or `jti`), entry, SPIFFE ID, caller and expiry: at INFO for admins' mints, at DEBUG
//! for agents' SVIDs, which the usage ledger records and which come at up to hundreds a second
//! per agent. Agents' signing calls are rate limited ([`crate::ratelimit`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lanyard_core::jwt::{JwtError, JwtSigningKey, JwtSvid, JwtSvidParams, mint_jwt_svid};
use lanyard_core::x509::{self, CaSubject, SvidParams, X509Ca, X509Error, X509Svid};
use lanyard_core::{EntryId, RegistrationEntry, SpiffeId};
use lanyard_proto::convert::{jwt_svid_to_proto, spiffe_id_from_proto, x509_svid_to_proto};
use lanyard_proto::spire::api::server::svid::v1::svid_server::Svid;
use lanyard_proto::spire::api::server::svid::v1::{
    BatchNewX509svidRequest, BatchNewX509svidResponse, MintJwtsvidRequest, MintJwtsvidResponse,
    MintX509svidRequest, MintX509svidResponse, NewDownstreamX509caRequest,
    NewDownstreamX509caResponse, NewJwtsvidRequest, NewJwtsvidResponse, NewX509svidParams,
    batch_new_x509svid_response,
};
use lanyard_proto::spire::api::types;
use tonic::{Request, Response, Status};

use super::errors::ok_status;
use super::{ApiError, Authorizer};
use crate::datastore::{Issuance, IssuanceKind};
use crate::metrics::SignedKind;
use crate::ratelimit::RateLimits;
use crate::state::ServerState;

/// The most CSRs one `BatchNewX509SVID` call may carry: SPIRE's per-call signing burst. The
/// agent sends at most this many and halves its batch after a failure.
pub const MAX_CSRS_PER_BATCH: usize = 500;

/// The status message for an entry the agent may not use, word for word SPIRE's.
const ENTRY_NOT_AUTHORIZED: &str = "entry not found or not authorized";

const MINT_X509_SVID: &str = "/spire.api.server.svid.v1.SVID/MintX509SVID";
const MINT_JWT_SVID: &str = "/spire.api.server.svid.v1.SVID/MintJWTSVID";
const BATCH_NEW_X509_SVID: &str = "/spire.api.server.svid.v1.SVID/BatchNewX509SVID";
const NEW_JWT_SVID: &str = "/spire.api.server.svid.v1.SVID/NewJWTSVID";
const NEW_DOWNSTREAM_X509_CA: &str = "/spire.api.server.svid.v1.SVID/NewDownstreamX509CA";

/// Logs an issuance under the `issuance` target: DEBUG when `$by_agent` (an agent's SVID for
/// an entry; admins' mints have no entry), INFO otherwise.
macro_rules! issuance_event {
    ($by_agent:expr, $($field:tt)+) => {
        if $by_agent {
            tracing::debug!(target: "issuance", $($field)+)
        } else {
            tracing::info!(target: "issuance", $($field)+)
        }
    };
}

/// The SVID service.
#[derive(Debug, Clone)]
pub struct SvidService {
    state: Arc<ServerState>,
    auth: Authorizer,
    rate_limits: Arc<RateLimits>,
}

impl SvidService {
    /// A service issuing from `state`'s CA.
    pub fn new(state: Arc<ServerState>) -> Self {
        let auth = Authorizer::new(Arc::clone(&state));
        Self {
            state,
            auth,
            rate_limits: Arc::new(RateLimits::unlimited()),
        }
    }

    /// Applies `rate_limits` to the agents' signing calls.
    pub fn with_rate_limits(mut self, rate_limits: Arc<RateLimits>) -> Self {
        self.rate_limits = rate_limits;
        self
    }
}

#[tonic::async_trait]
impl Svid for SvidService {
    async fn mint_x509svid(
        &self,
        request: Request<MintX509svidRequest>,
    ) -> Result<Response<MintX509svidResponse>, Status> {
        let caller = self.auth.admin(&request, MINT_X509_SVID)?;
        let request = request.into_inner();
        let svid = counted(
            &self.state,
            SignedKind::X509Svid,
            mint_x509_svid(&self.state, &request.csr, request.ttl),
        )?;
        log_x509_issuance(&svid, "", &caller.describe());
        Ok(Response::new(MintX509svidResponse {
            svid: Some(x509_svid_to_proto(&svid, "")),
        }))
    }

    async fn mint_jwtsvid(
        &self,
        request: Request<MintJwtsvidRequest>,
    ) -> Result<Response<MintJwtsvidResponse>, Status> {
        let caller = self.auth.admin(&request, MINT_JWT_SVID)?;
        let request = request.into_inner();
        let minted = (|| {
            let id = request
                .id
                .as_ref()
                .ok_or_else(|| invalid("invalid SPIFFE ID: request must specify SPIFFE ID"))
                .and_then(|id| {
                    spiffe_id_from_proto(id).map_err(|e| invalid(format!("invalid SPIFFE ID: {e}")))
                })?;
            check_workload_id(&self.state, &id)
                .map_err(|e| invalid(format!("invalid SPIFFE ID: {e}")))?;
            let ttl = ttl_or(request.ttl, self.state.config.default_jwt_svid_ttl);
            sign_jwt_svid(
                &self.state,
                &id,
                &request.audience,
                ttl,
                "",
                &caller.describe(),
            )
        })();
        let svid = counted(&self.state, SignedKind::JwtSvid, minted)?;
        Ok(Response::new(MintJwtsvidResponse {
            svid: Some(jwt_svid_to_proto(&svid, "")),
        }))
    }

    async fn batch_new_x509svid(
        &self,
        request: Request<BatchNewX509svidRequest>,
    ) -> Result<Response<BatchNewX509svidResponse>, Status> {
        let source = crate::caller::remote_ip(&request);
        let count = request.get_ref().params.len();
        self.rate_limits.signing_from(source, count).await?;
        let agent = self.auth.agent(&request, BATCH_NEW_X509_SVID).await?;
        self.rate_limits.signing_for(agent.id(), count).await?;
        let results = batch_new_x509_svid(&self.state, agent.id(), &request.get_ref().params)?;
        Ok(Response::new(BatchNewX509svidResponse { results }))
    }

    async fn new_jwtsvid(
        &self,
        request: Request<NewJwtsvidRequest>,
    ) -> Result<Response<NewJwtsvidResponse>, Status> {
        self.rate_limits
            .signing_from(crate::caller::remote_ip(&request), 1)
            .await?;
        let agent = self.auth.agent(&request, NEW_JWT_SVID).await?;
        self.rate_limits.signing_for(agent.id(), 1).await?;
        let request = request.get_ref();
        let svid = new_jwt_svid(
            &self.state,
            agent.id(),
            &request.entry_id,
            &request.audience,
        )?;
        Ok(Response::new(NewJwtsvidResponse { svid: Some(svid) }))
    }

    async fn new_downstream_x509ca(
        &self,
        request: Request<NewDownstreamX509caRequest>,
    ) -> Result<Response<NewDownstreamX509caResponse>, Status> {
        let caller = self.auth.downstream(&request, NEW_DOWNSTREAM_X509_CA)?;
        let request = request.into_inner();
        let response = counted(
            &self.state,
            SignedKind::DownstreamX509Ca,
            new_downstream_x509_ca(
                &self.state,
                &request.csr,
                request.preferred_ttl,
                &caller.describe(),
            ),
        )?;
        Ok(Response::new(response))
    }
}

/// `BatchNewX509SVID` for the agent `agent_id`, after authentication: one result per
/// parameter, in request order, each with a status.
///
/// The whole call fails with `InvalidArgument` when `params` is empty and with
/// `ResourceExhausted` when it holds more than [`MAX_CSRS_PER_BATCH`] CSRs.
pub fn batch_new_x509_svid(
    state: &ServerState,
    agent_id: &SpiffeId,
    params: &[NewX509svidParams],
) -> Result<Vec<batch_new_x509svid_response::Result>, ApiError> {
    if params.is_empty() {
        return Err(ApiError::InvalidArgument("missing parameters".to_owned()));
    }
    if params.len() > MAX_CSRS_PER_BATCH {
        return Err(ApiError::ResourceExhausted(format!(
            "rejecting request due to certificate signing rate limiting: {} CSRs in one call; the limit is {MAX_CSRS_PER_BATCH}",
            params.len()
        )));
    }
    let ca = state.ca.x509_ca();
    let now = state.now();
    Ok(params
        .iter()
        .map(|param| {
            let result = counted(
                state,
                SignedKind::X509Svid,
                new_x509_svid(state, agent_id, ca.as_deref(), param, now),
            );
            match result {
                Ok(svid) => batch_new_x509svid_response::Result {
                    status: Some(ok_status()),
                    svid: Some(svid),
                },
                Err(error) => batch_new_x509svid_response::Result {
                    status: Some(error.to_proto_status()),
                    svid: None,
                },
            }
        })
        .collect())
}

/// `result` of a signing request for `kind`, counted in the signing metrics.
pub(crate) fn counted<T>(
    state: &ServerState,
    kind: SignedKind,
    result: Result<T, ApiError>,
) -> Result<T, ApiError> {
    let outcome = result
        .as_ref()
        .map_or_else(ApiError::outcome, |_| lanyard_metrics::Outcome::Ok);
    state.metrics.signing.record(kind, outcome);
    result
}

/// One item of `BatchNewX509SVID`, checked in SPIRE's order: entry ID and CSR present, entry
/// authorized (looked up alone, not by listing the agent's entries), CSR well-formed and
/// signed by its key.
fn new_x509_svid(
    state: &ServerState,
    agent_id: &SpiffeId,
    ca: Option<&X509Ca>,
    param: &NewX509svidParams,
    now: SystemTime,
) -> Result<types::X509svid, ApiError> {
    if param.entry_id.is_empty() {
        return Err(invalid("missing entry ID"));
    }
    if param.csr.is_empty() {
        return Err(invalid("missing CSR"));
    }
    let entry = authorized_entry(state, agent_id, &param.entry_id)?;
    let entry = entry.as_ref();
    let csr = x509::parse_csr(&param.csr).map_err(|e| csr_error(&e, "invalid CSR signature"))?;
    let ca = ca.ok_or_else(|| ApiError::Internal("no X.509 CA is active".to_owned()))?;
    let ttl = capped_at_entry_expiry(
        entry,
        entry
            .x509_svid_ttl
            .unwrap_or(state.config.default_x509_svid_ttl),
        now,
    );
    let mut params = SvidParams::new(entry.spiffe_id.clone(), csr.public_key_der().to_vec(), ttl);
    params.dns_names = entry.dns_names.clone();
    let svid = ca
        .mint_svid(&params, now)
        .map_err(|e| ApiError::Internal(format!("failed to sign X509-SVID: {e}")))?;
    log_x509_issuance(&svid, entry.id.as_str(), agent_id.as_str());
    state.record_issuance(Issuance {
        kind: IssuanceKind::X509Svid,
        serial: svid.serial().to_owned(),
        entry_id: entry.id.as_str().to_owned(),
        spiffe_id: entry.spiffe_id.clone(),
        agent_id: agent_id.clone(),
        authority_id: ca.authority_id(),
        issued_at: now,
        not_after: svid.not_after(),
        exception_ids: state.judge.exceptions_used(entry),
    });
    Ok(x509_svid_to_proto(&svid, &entry.hint))
}

/// The entry `entry_id` if `agent_id` may obtain SVIDs for it, else `NotFound` (an ID that is
/// not even well-formed cannot be authorized either).
fn authorized_entry(
    state: &ServerState,
    agent_id: &SpiffeId,
    entry_id: &str,
) -> Result<Arc<RegistrationEntry>, ApiError> {
    EntryId::new(entry_id)
        .ok()
        .and_then(|id| state.authorized_entry(agent_id, &id))
        .ok_or_else(|| ApiError::NotFound(ENTRY_NOT_AUTHORIZED.to_owned()))
}

/// `NewJWTSVID` for the agent `agent_id`, after authentication: a JWT-SVID for the entry
/// `entry_id`, which the agent must be authorized for (else `NotFound`), for `audience`
/// (at least one), living the entry's `jwt_svid_ttl` or the server default.
pub fn new_jwt_svid(
    state: &ServerState,
    agent_id: &SpiffeId,
    entry_id: &str,
    audience: &[String],
) -> Result<types::Jwtsvid, ApiError> {
    counted(
        state,
        SignedKind::JwtSvid,
        authorized_jwt_svid(state, agent_id, entry_id, audience),
    )
}

fn authorized_jwt_svid(
    state: &ServerState,
    agent_id: &SpiffeId,
    entry_id: &str,
    audience: &[String],
) -> Result<types::Jwtsvid, ApiError> {
    let entry = authorized_entry(state, agent_id, entry_id)?;
    let now = state.now();
    let ttl = capped_at_entry_expiry(
        &entry,
        entry
            .jwt_svid_ttl
            .unwrap_or(state.config.default_jwt_svid_ttl),
        now,
    );
    let svid = sign_jwt_svid(
        state,
        &entry.spiffe_id,
        audience,
        ttl,
        entry.id.as_str(),
        agent_id.as_str(),
    )?;
    state.record_issuance(Issuance {
        kind: IssuanceKind::JwtSvid,
        serial: svid.jti.clone(),
        entry_id: entry.id.as_str().to_owned(),
        spiffe_id: entry.spiffe_id.clone(),
        agent_id: agent_id.clone(),
        authority_id: svid.key_id.clone(),
        issued_at: now,
        not_after: svid.expires_at,
        exception_ids: state.judge.exceptions_used(&entry),
    });
    Ok(jwt_svid_to_proto(&svid, &entry.hint))
}

/// `ttl`, shortened so that an SVID never outlives its entry: an entry's expiry (a grant's
/// end) is the end of every credential issued under it.
fn capped_at_entry_expiry(entry: &RegistrationEntry, ttl: Duration, now: SystemTime) -> Duration {
    match entry.expires_at {
        Some(expires_at) => ttl.min(expires_at.duration_since(now).unwrap_or(Duration::ZERO)),
        None => ttl,
    }
}

/// `MintX509SVID`: an SVID for the one URI SAN of `csr_der`, with the CSR's DNS names.
fn mint_x509_svid(state: &ServerState, csr_der: &[u8], ttl: i32) -> Result<X509Svid, ApiError> {
    if csr_der.is_empty() {
        return Err(invalid("missing CSR"));
    }
    let csr =
        x509::parse_csr(csr_der).map_err(|e| csr_error(&e, "failed to verify CSR signature"))?;
    let uri = match csr.uri_sans() {
        [] => return Err(invalid("CSR URI SAN is required")),
        [uri] => uri,
        _ => return Err(invalid("only one URI SAN is expected")),
    };
    let id: SpiffeId = uri
        .parse()
        .map_err(|e| invalid(format!("CSR URI SAN is not a valid SPIFFE ID: {e}")))?;
    check_workload_id(state, &id).map_err(|e| invalid(format!("CSR URI SAN is invalid: {e}")))?;
    for name in csr.dns_names() {
        lanyard_core::entry::validate_dns_name(name)
            .map_err(|e| invalid(format!("CSR DNS name is not valid: {e}")))?;
    }
    let ca = state
        .ca
        .x509_ca()
        .ok_or_else(|| ApiError::Internal("no X.509 CA is active".to_owned()))?;
    let ttl = ttl_or(ttl, state.config.default_x509_svid_ttl);
    let mut params = SvidParams::new(id, csr.public_key_der().to_vec(), ttl);
    params.dns_names = csr.dns_names().to_vec();
    ca.mint_svid(&params, state.now()).map_err(|e| match e {
        X509Error::InvalidDnsName(_) => invalid(format!("CSR DNS name is not valid: {e}")),
        other => ApiError::Internal(format!("failed to sign X509-SVID: {other}")),
    })
}

/// Signs a JWT-SVID with the active JWT key and logs it.
fn sign_jwt_svid(
    state: &ServerState,
    id: &SpiffeId,
    audience: &[String],
    ttl: Duration,
    entry_id: &str,
    caller: &str,
) -> Result<JwtSvid, ApiError> {
    if audience.is_empty() {
        return Err(invalid("at least one audience is required"));
    }
    let key = state
        .ca
        .jwt_key()
        .ok_or_else(|| ApiError::Internal("no JWT key is active".to_owned()))?;
    let signer = JwtSigningKey {
        key: &key.key,
        key_id: &key.key_id,
        expires_at: Some(key.not_after),
    };
    let params = JwtSvidParams {
        spiffe_id: id,
        audiences: audience,
        ttl,
        issuer: state.config.jwt_issuer.as_deref(),
    };
    let svid = mint_jwt_svid(&signer, &params, state.now()).map_err(|e| match e {
        JwtError::NoAudience => invalid("audience cannot be empty"),
        other => ApiError::Internal(format!("failed to sign JWT-SVID: {other}")),
    })?;
    issuance_event!(
        !entry_id.is_empty(),
        kind = "jwt-svid",
        jti = %svid.jti,
        key_id = %svid.key_id,
        entry_id,
        spiffe_id = %svid.spiffe_id,
        audience = ?svid.audiences,
        caller,
        not_after = %humantime::format_rfc3339_seconds(svid.expires_at),
        "issued JWT-SVID"
    );
    Ok(svid)
}

/// `NewDownstreamX509CA`: an intermediate CA for the CSR's key, signed by the active CA,
/// living `preferred_ttl` seconds (the CA TTL when 0), capped at the signer's expiry.
fn new_downstream_x509_ca(
    state: &ServerState,
    csr_der: &[u8],
    preferred_ttl: i32,
    caller: &str,
) -> Result<NewDownstreamX509caResponse, ApiError> {
    if csr_der.is_empty() {
        return Err(invalid("missing CSR"));
    }
    let csr = x509::parse_csr(csr_der).map_err(|e| csr_error(&e, "invalid CSR signature"))?;
    let ca = state
        .ca
        .x509_ca()
        .ok_or_else(|| ApiError::Internal("no X.509 CA is active".to_owned()))?;
    let subject = CaSubject {
        country: state.config.ca_subject.country.clone(),
        organization: state.config.ca_subject.organization.clone(),
        common_name: state.config.ca_subject.common_name.clone(),
    };
    let ttl = ttl_or(preferred_ttl, state.config.ca_ttl);
    let der = x509::create_intermediate_ca(
        state.trust_domain(),
        csr.public_key_der(),
        &subject,
        &ca,
        state.now(),
        ttl,
    )
    .map_err(|e| ApiError::Internal(format!("failed to sign downstream X.509 CA: {e}")))?;
    let serial = x509::serial_decimal(&der).unwrap_or_default();
    let not_after = x509::validity_of(&der).map(|(_, not_after)| not_after);
    tracing::info!(
        target: "issuance",
        kind = "downstream-x509-ca",
        serial = %serial,
        spiffe_id = %state.trust_domain().id(),
        caller,
        not_after = %not_after.map_or_else(|_| "unknown".to_owned(), |t| humantime::format_rfc3339_seconds(t).to_string()),
        "issued downstream X.509 CA"
    );
    let mut ca_cert_chain = vec![der];
    ca_cert_chain.extend(ca.issued_chain());
    let x509_authorities = state
        .bundle()
        .x509_authorities()
        .iter()
        .map(|authority| authority.der().to_vec())
        .collect();
    Ok(NewDownstreamX509caResponse {
        ca_cert_chain,
        x509_authorities,
    })
}

/// SPIRE's rule for IDs minted without an entry: in our trust domain, with a path, and not
/// under the reserved `/spire/` namespace.
fn check_workload_id(state: &ServerState, id: &SpiffeId) -> Result<(), String> {
    let trust_domain = state.trust_domain();
    if !id.is_member_of(trust_domain) {
        return Err(format!(
            "{id} is not a member of trust domain {}",
            trust_domain.name()
        ));
    }
    if id.is_trust_domain_id() {
        return Err(format!(
            "{id} is not a workload in trust domain {}; path is empty",
            trust_domain.name()
        ));
    }
    if id.is_reserved() {
        return Err(format!(
            "{id} is not a workload in trust domain {}; path is in the reserved namespace",
            trust_domain.name()
        ));
    }
    Ok(())
}

/// A TTL field in seconds, where zero (or, as in SPIRE, a negative value) means `default`.
fn ttl_or(seconds: i32, default: Duration) -> Duration {
    match u64::try_from(seconds) {
        Ok(seconds) if seconds > 0 => Duration::from_secs(seconds),
        _ => default,
    }
}

/// The status for a CSR that [`x509::parse_csr`] refused.
fn csr_error(error: &X509Error, bad_signature: &str) -> ApiError {
    match error {
        X509Error::CsrSignature => invalid(bad_signature),
        other => invalid(format!("malformed CSR: {other}")),
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument(message.into())
}

fn log_x509_issuance(svid: &X509Svid, entry_id: &str, caller: &str) {
    issuance_event!(
        !entry_id.is_empty(),
        kind = "x509-svid",
        serial = svid.serial(),
        entry_id,
        spiffe_id = %svid.spiffe_id(),
        caller,
        not_after = %humantime::format_rfc3339_seconds(svid.not_after()),
        "issued X509-SVID"
    );
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use lanyard_core::bundle::TrustBundle;
    use lanyard_core::x509::build_csr;
    use lanyard_core::{EntryId, KeyPair, KeyType, TrustDomain};
    use tonic::Code;

    use super::*;
    use crate::ca::{CaConfig, CaManager};
    use crate::config::ServerConfig;
    use crate::datastore::{Datastore, MemoryStore};
    use crate::keymanager::MemoryKeyManager;
    use crate::state::system_clock;

    const HOUR: Duration = Duration::from_secs(3600);

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn id(path: &str) -> SpiffeId {
        SpiffeId::from_path(&td(), path).unwrap()
    }

    async fn state() -> ServerState {
        let store: Arc<dyn Datastore> = Arc::new(MemoryStore::new());
        let ca_config = CaConfig {
            trust_domain: td(),
            ca_ttl: 24 * HOUR,
            x509_key_type: KeyType::EcP256,
            jwt_key_type: KeyType::EcP256,
            subject: CaSubject::default(),
            new_trust_domain: false,
            instance: "local".to_owned(),
        };
        let ca = CaManager::load(
            ca_config,
            Arc::new(MemoryKeyManager::new()),
            Arc::clone(&store),
            SystemTime::now(),
        )
        .await
        .unwrap();
        let config = ServerConfig::new(td(), std::env::temp_dir());
        ServerState::new(config, store, Arc::new(ca), system_clock())
            .await
            .unwrap()
    }

    fn agent() -> SpiffeId {
        id("/spire/agent/join_token/abc")
    }

    /// Registers an entry under `parent` in the authorization index.
    async fn register(
        state: &ServerState,
        entry_id: &str,
        spiffe: &str,
        parent: &SpiffeId,
    ) -> RegistrationEntry {
        let entry = RegistrationEntry::new(
            EntryId::new(entry_id).unwrap(),
            id(spiffe),
            parent.clone(),
            ["unix:uid:1000".parse().unwrap()].into_iter().collect(),
            SystemTime::now(),
        );
        let entry = state.store.create_entry(entry).await.unwrap();
        state.catch_up().await.unwrap();
        entry
    }

    /// Stores a changed entry; the index learns of it from the change log.
    async fn save(state: &ServerState, entry: &RegistrationEntry) {
        state.store.update_entry(entry.clone(), None).await.unwrap();
        state.catch_up().await.unwrap();
    }

    fn csr_for(spiffe: &str) -> Vec<u8> {
        let key = KeyPair::generate(KeyType::EcP256).unwrap();
        build_csr(&key, Some(&id(spiffe))).unwrap()
    }

    fn param(entry_id: &str, csr: Vec<u8>) -> NewX509svidParams {
        NewX509svidParams {
            entry_id: entry_id.to_owned(),
            csr,
        }
    }

    fn roots(bundle: &TrustBundle) -> Vec<Vec<u8>> {
        bundle
            .x509_authorities()
            .iter()
            .map(|a| a.der().to_vec())
            .collect()
    }

    fn code(status: Option<&types::Status>) -> Code {
        Code::from(status.expect("every result has a status").code)
    }

    #[tokio::test]
    async fn authorized_entry_gets_its_id_dns_names_ttl_and_hint() {
        let state = state().await;
        let mut entry = register(&state, "web", "/web", &agent()).await;
        entry.dns_names = vec!["web.example.org".to_owned(), "www.example.org".to_owned()];
        entry.x509_svid_ttl = Some(Duration::from_secs(600));
        entry.hint = "frontend".to_owned();
        save(&state, &entry).await;

        // The CSR asks for another ID; the entry's wins, as in SPIRE.
        let results =
            batch_new_x509_svid(&state, &agent(), &[param("web", csr_for("/other"))]).unwrap();
        assert_eq!(results.len(), 1);
        assert_eq!(code(results[0].status.as_ref()), Code::Ok);
        let svid = results[0].svid.as_ref().unwrap();
        assert_eq!(svid.hint, "frontend");
        let verified = x509::verify_svid_chain(
            &svid.cert_chain,
            &td(),
            &roots(&state.bundle()),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(verified.spiffe_id(), &id("/web"));
        let lifetime = verified
            .not_after()
            .duration_since(verified.not_before())
            .unwrap();
        // NotBefore is backdated by 10 s.
        assert_eq!(lifetime, Duration::from_secs(610));
        let (_, leaf) =
            x509_parser::parse_x509_certificate(&svid.cert_chain[0]).expect("leaf parses");
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        let dns: Vec<String> = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(dns, entry.dns_names);
        assert_eq!(
            svid.expires_at,
            i64::try_from(
                verified
                    .not_after()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
            )
            .unwrap()
        );
    }

    #[tokio::test]
    async fn ttl_defaults_and_is_capped_at_the_ca() {
        let state = state().await;
        register(&state, "default-ttl", "/a", &agent()).await;
        let mut long = register(&state, "long-ttl", "/b", &agent()).await;
        long.x509_svid_ttl = Some(1000 * HOUR);
        save(&state, &long).await;

        let results = batch_new_x509_svid(
            &state,
            &agent(),
            &[
                param("default-ttl", csr_for("/a")),
                param("long-ttl", csr_for("/b")),
            ],
        )
        .unwrap();
        let ca_not_after = state.ca.x509_ca().unwrap().not_after();
        let not_after = |i: usize| {
            let chain = &results[i].svid.as_ref().unwrap().cert_chain;
            x509::validity_of(&chain[0]).unwrap().1
        };
        let default_lifetime = not_after(0)
            .duration_since(SystemTime::now())
            .unwrap()
            .as_secs();
        assert!(
            (3590..=3600).contains(&default_lifetime),
            "default TTL is one hour, got {default_lifetime} s"
        );
        assert_eq!(not_after(1), ca_not_after);
    }

    #[tokio::test]
    async fn per_item_failures_keep_request_order() {
        let state = state().await;
        register(&state, "mine", "/mine", &agent()).await;
        let other_agent = id("/spire/agent/join_token/other");
        register(&state, "theirs", "/theirs", &other_agent).await;
        let mut expired = register(&state, "expired", "/expired", &agent()).await;
        expired.expires_at = Some(SystemTime::now() - HOUR);
        save(&state, &expired).await;

        let mut bad_signature = csr_for("/mine");
        let last = bad_signature.len() - 1;
        bad_signature[last] ^= 0x01;

        let params = [
            param("theirs", csr_for("/theirs")),
            param("mine", b"not a csr".to_vec()),
            param("expired", csr_for("/expired")),
            param("mine", bad_signature),
            param("", csr_for("/mine")),
            param("mine", Vec::new()),
            param("nonexistent", csr_for("/mine")),
            param("mine", csr_for("/mine")),
            param("mine", vec![0x30; x509::MAX_CSR_LEN + 1]),
        ];
        let results = batch_new_x509_svid(&state, &agent(), &params).unwrap();
        let codes: Vec<Code> = results.iter().map(|r| code(r.status.as_ref())).collect();
        assert_eq!(
            codes,
            [
                Code::NotFound,
                Code::InvalidArgument,
                Code::NotFound,
                Code::InvalidArgument,
                Code::InvalidArgument,
                Code::InvalidArgument,
                Code::NotFound,
                Code::Ok,
                Code::InvalidArgument,
            ]
        );
        let too_large = results[8].status.as_ref().unwrap();
        assert!(
            too_large.message.contains("at most 8192"),
            "{}",
            too_large.message
        );
        let status = results[0].status.as_ref().unwrap();
        assert_eq!(status.message, "entry not found or not authorized");
        assert_eq!(
            results[3].status.as_ref().unwrap().message,
            "invalid CSR signature"
        );
        assert!(results[..7].iter().all(|r| r.svid.is_none()));
        assert!(results[7].svid.is_some());
    }

    #[tokio::test]
    async fn nested_entries_are_authorized() {
        let state = state().await;
        register(&state, "parent", "/node-group", &agent()).await;
        register(&state, "child", "/node-group/web", &id("/node-group")).await;
        let results =
            batch_new_x509_svid(&state, &agent(), &[param("child", csr_for("/x"))]).unwrap();
        assert_eq!(code(results[0].status.as_ref()), Code::Ok);
    }

    #[tokio::test]
    async fn batch_size_limits() {
        let state = state().await;
        register(&state, "mine", "/mine", &agent()).await;
        let error = batch_new_x509_svid(&state, &agent(), &[]).unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);

        let csr = csr_for("/mine");
        let too_many = vec![param("mine", csr.clone()); MAX_CSRS_PER_BATCH + 1];
        let error = batch_new_x509_svid(&state, &agent(), &too_many).unwrap_err();
        assert_eq!(error.code(), Code::ResourceExhausted);

        let just_enough = vec![param("mine", csr); MAX_CSRS_PER_BATCH];
        let results = batch_new_x509_svid(&state, &agent(), &just_enough).unwrap();
        assert_eq!(results.len(), MAX_CSRS_PER_BATCH);
        assert!(results.iter().all(|r| code(r.status.as_ref()) == Code::Ok));
    }

    #[tokio::test]
    async fn jwt_svid_for_an_authorized_entry() {
        let mut state = state().await;
        state.config.jwt_issuer = Some("https://oidc.example.org".to_owned());
        let mut entry = register(&state, "web", "/web", &agent()).await;
        entry.jwt_svid_ttl = Some(Duration::from_secs(120));
        entry.hint = "frontend".to_owned();
        save(&state, &entry).await;

        let audience = vec!["db".to_owned(), "cache".to_owned()];
        let svid = new_jwt_svid(&state, &agent(), "web", &audience).unwrap();
        assert_eq!(svid.hint, "frontend");
        assert_eq!(svid.expires_at - svid.issued_at, 120);
        assert!(svid.issued_at > 0 && svid.issued_at <= svid.expires_at);

        let bundle = state.bundle();
        let validated = lanyard_core::jwt::validate_jwt_svid_with_bundle(
            &svid.token,
            "cache",
            &bundle,
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(validated.spiffe_id, id("/web"));
        assert_eq!(validated.audiences, audience);
        assert_eq!(validated.claims["iss"], "https://oidc.example.org");
        assert_eq!(validated.key_id, state.ca.jwt_key().unwrap().key_id);
    }

    #[tokio::test]
    async fn jwt_svid_refusals() {
        let state = state().await;
        register(&state, "web", "/web", &agent()).await;
        register(
            &state,
            "theirs",
            "/theirs",
            &id("/spire/agent/join_token/other"),
        )
        .await;
        let mut expired = register(&state, "expired", "/expired", &agent()).await;
        expired.expires_at = Some(SystemTime::now() - HOUR);
        save(&state, &expired).await;
        let audience = vec!["db".to_owned()];

        for entry_id in ["theirs", "expired", "nonexistent", ""] {
            let error = new_jwt_svid(&state, &agent(), entry_id, &audience).unwrap_err();
            assert_eq!(error.code(), Code::NotFound, "{entry_id}");
            assert_eq!(error.to_string(), "entry not found or not authorized");
        }
        let error = new_jwt_svid(&state, &agent(), "web", &[]).unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        let error = new_jwt_svid(&state, &agent(), "web", &[String::new()]).unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn downstream_ca_chains_to_the_bundle() {
        let state = state().await;
        let key = KeyPair::generate(KeyType::EcP256).unwrap();
        let csr = build_csr(&key, None).unwrap();
        let response = new_downstream_x509_ca(&state, &csr, 3600, "test").unwrap();
        assert_eq!(response.ca_cert_chain.len(), 1);
        assert_eq!(response.x509_authorities, roots(&state.bundle()));
        let (_, not_after) = x509::validity_of(&response.ca_cert_chain[0]).unwrap();
        let lifetime = not_after
            .duration_since(SystemTime::now())
            .unwrap()
            .as_secs();
        assert!((3590..=3600).contains(&lifetime), "{lifetime}");

        // The downstream CA can mint SVIDs that verify against our bundle.
        let downstream = X509Ca::new(response.ca_cert_chain[0].clone(), key, Vec::new()).unwrap();
        let leaf_key = KeyPair::generate(KeyType::EcP256).unwrap();
        let svid = downstream
            .mint_svid(
                &SvidParams::new(id("/nested"), leaf_key.public_key_der(), HOUR),
                SystemTime::now(),
            )
            .unwrap();
        let mut chain = svid.cert_chain().to_vec();
        chain.extend(response.ca_cert_chain.iter().cloned());
        x509::verify_svid_chain(&chain, &td(), &response.x509_authorities, SystemTime::now())
            .unwrap();

        let error = new_downstream_x509_ca(&state, b"junk", 0, "test").unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
    }
}
