//! `spire.api.server.agent.v1.Agent`: node attestation (join token, x509pop, k8s_psat), agent SVID
//! renewal, and agent administration (list, show, ban, evict, join tokens).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::k8s_psat;
use lanyard_core::policy::Operation;
use lanyard_core::x509::{self, SvidParams, X509Svid};
use lanyard_core::x509pop::{self, ServerAttestation};
use lanyard_core::{EntryId, RegistrationEntry, Selector, SelectorSet, SpiffeId};
use lanyard_proto::convert::{
    agent_to_proto, selectors_from_proto, spiffe_id_from_proto, x509_svid_to_proto,
};
use lanyard_proto::spire::api::server::agent::v1 as pb;
use lanyard_proto::spire::api::server::agent::v1::agent_server::{Agent, AgentServer};
use lanyard_proto::spire::api::types;
use lanyard_proto::spire::api::types::permission_denied_details::Reason;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use super::errors::{
    AGENT_BANNED, AGENT_IS_SERVER, AGENT_NOT_FOUND, JOIN_TOKEN_EXPIRED, JOIN_TOKEN_UNKNOWN,
};
use super::{ApiError, Authorizer, Caller, not_authorized};
use crate::datastore::{
    AgentFilter, AttestedAgent, DatastoreError, Issuance, IssuanceKind, MatchMode, PageRequest,
    SelectorFilter,
};
use crate::k8s_psat::K8sPsat;
use crate::metrics::{AttestationType, SignedKind};
use crate::ratelimit::RateLimits;
use crate::state::ServerState;
use crate::writes::EntryWriter;

const SERVICE: &str = "/spire.api.server.agent.v1.Agent/";
/// The longest attestation exchange allowed, so a silent client cannot hold a stream open.
const ATTESTATION_TIMEOUT: Duration = Duration::from_secs(30);
/// The default and largest page of `ListAgents`.
const MAX_PAGE_SIZE: u32 = 1000;

fn method(name: &str) -> String {
    format!("{SERVICE}{name}")
}

/// The agent service.
#[derive(Debug, Clone)]
pub struct AgentService {
    state: Arc<ServerState>,
    auth: Authorizer,
    x509pop_anchors: Option<Arc<Vec<Vec<u8>>>>,
    k8s_psat: Option<Arc<K8sPsat>>,
    rate_limits: Arc<RateLimits>,
    writer: EntryWriter,
}

impl AgentService {
    /// A service over `state`; `x509pop_anchors` enables x509pop with these CA certificates.
    pub fn new(state: Arc<ServerState>, x509pop_anchors: Option<Vec<Vec<u8>>>) -> Self {
        Self {
            auth: Authorizer::new(Arc::clone(&state)),
            writer: EntryWriter::new(Arc::clone(&state)),
            state,
            x509pop_anchors: x509pop_anchors.map(Arc::new),
            k8s_psat: None,
            rate_limits: Arc::new(RateLimits::unlimited()),
        }
    }

    /// Enables k8s_psat attestation with these clusters.
    pub fn with_k8s_psat(mut self, k8s_psat: Option<Arc<K8sPsat>>) -> Self {
        self.k8s_psat = k8s_psat;
        self
    }

    /// Applies `rate_limits` to attestation.
    pub fn with_rate_limits(mut self, rate_limits: Arc<RateLimits>) -> Self {
        self.rate_limits = rate_limits;
        self
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> AgentServer<Self> {
        AgentServer::new(self)
    }

    /// Signs an agent SVID for `agent_id` over the public key of `csr`.
    fn sign_agent_svid(&self, agent_id: &SpiffeId, csr: &[u8]) -> Result<X509Svid, ApiError> {
        super::svid::counted(
            &self.state,
            SignedKind::AgentSvid,
            self.sign_agent_svid_uncounted(agent_id, csr),
        )
    }

    fn sign_agent_svid_uncounted(
        &self,
        agent_id: &SpiffeId,
        csr: &[u8],
    ) -> Result<X509Svid, ApiError> {
        let csr = x509::parse_csr(csr)
            .map_err(|e| ApiError::InvalidArgument(format!("invalid CSR: {e}")))?;
        let ca = self
            .state
            .ca
            .x509_ca()
            .ok_or_else(|| ApiError::Internal("no active X.509 authority".into()))?;
        let params = SvidParams::new(
            agent_id.clone(),
            csr.public_key_der().to_vec(),
            self.state.config.agent_ttl(),
        );
        let now = self.state.now();
        let svid = ca
            .mint_svid(&params, now)
            .map_err(|e| ApiError::Internal(format!("signing agent SVID: {e}")))?;
        self.state.record_issuance(Issuance {
            kind: IssuanceKind::AgentSvid,
            serial: svid.serial().to_owned(),
            entry_id: String::new(),
            spiffe_id: agent_id.clone(),
            agent_id: agent_id.clone(),
            authority_id: ca.authority_id(),
            issued_at: now,
            not_after: svid.not_after(),
            exception_ids: Vec::new(),
        });
        Ok(svid)
    }

    /// Runs the attestation exchange and returns the result to send.
    /// `attestation_type` is set as soon as the request names its type, for the metrics.
    async fn attest(
        &self,
        mut requests: Streaming<pb::AttestAgentRequest>,
        challenges: tokio::sync::mpsc::Sender<Result<pb::AttestAgentResponse, Status>>,
        attestation_type: &mut AttestationType,
    ) -> Result<pb::AttestAgentResponse, ApiError> {
        let first = requests
            .message()
            .await?
            .ok_or_else(|| ApiError::InvalidArgument("missing attestation parameters".into()))?;
        let Some(pb::attest_agent_request::Step::Params(params)) = first.step else {
            return Err(ApiError::InvalidArgument("missing params".into()));
        };
        let data = params
            .data
            .ok_or_else(|| ApiError::InvalidArgument("missing attestation data".into()))?;
        let csr = params
            .params
            .map(|p| p.csr)
            .filter(|csr| !csr.is_empty())
            .ok_or_else(|| ApiError::InvalidArgument("missing CSR".into()))?;
        if data.r#type.is_empty() {
            return Err(ApiError::InvalidArgument(
                "missing attestation data type".into(),
            ));
        }
        let served = match data.r#type.as_str() {
            "join_token" => self.state.config.node_attestor.join_token_enabled(),
            "x509pop" => self.x509pop_anchors.is_some(),
            k8s_psat::ATTESTOR_NAME => self.k8s_psat.is_some(),
            _ => false,
        };
        *attestation_type = AttestationType::served(&data.r#type, served);
        if data.payload.is_empty() {
            return Err(ApiError::InvalidArgument(
                "missing attestation data payload".into(),
            ));
        }
        // The whole request is checked before anything is redeemed: a join token is used up
        // only by an attestation that can succeed.
        x509::parse_csr(&csr)
            .map_err(|e| ApiError::InvalidArgument(format!("invalid CSR: {e}")))?;

        let trust_domain = self.state.trust_domain().clone();
        let now = self.state.now();
        let (agent_id, selectors, can_reattest) = match data.r#type.as_str() {
            "join_token" if self.state.config.node_attestor.join_token_enabled() => {
                let token = String::from_utf8(data.payload)
                    .map_err(|_| ApiError::InvalidArgument("join token is not UTF-8".into()))?;
                let agent_id = trust_domain.join_token_agent_id(&token).map_err(|e| {
                    ApiError::InvalidArgument(format!("join token cannot form an agent ID: {e}"))
                })?;
                let record = match self.state.store.take_join_token(&token).await {
                    Ok(record) => record,
                    Err(DatastoreError::NotFound(_)) => {
                        return Err(ApiError::AttestationFailed(JOIN_TOKEN_UNKNOWN.into()));
                    }
                    Err(e) => return Err(e.into()),
                };
                if record.expires_at <= now {
                    return Err(ApiError::AttestationFailed(JOIN_TOKEN_EXPIRED.into()));
                }
                (agent_id, SelectorSet::new(), false)
            }
            "x509pop" if self.x509pop_anchors.is_some() => {
                let anchors = self
                    .x509pop_anchors
                    .as_deref()
                    .map_or(&[][..], Vec::as_slice);
                let (attestation, challenge) =
                    ServerAttestation::begin(&data.payload, anchors, &trust_domain, now)
                        .map_err(x509pop_error)?;
                challenges
                    .send(Ok(pb::AttestAgentResponse {
                        step: Some(pb::attest_agent_response::Step::Challenge(challenge)),
                    }))
                    .await
                    .map_err(|_| ApiError::Cancelled("agent went away".into()))?;
                let answer = requests.message().await?.ok_or_else(|| {
                    ApiError::InvalidArgument("missing challenge response".into())
                })?;
                let Some(pb::attest_agent_request::Step::ChallengeResponse(response)) = answer.step
                else {
                    return Err(ApiError::InvalidArgument(
                        "expected a challenge response".into(),
                    ));
                };
                let result = attestation.finish(&response).map_err(x509pop_error)?;
                let selectors: SelectorSet = result.selectors().iter().cloned().collect();
                (result.agent_id().clone(), selectors, x509pop::CAN_REATTEST)
            }
            k8s_psat::ATTESTOR_NAME if self.k8s_psat.is_some() => {
                let Some(psat) = self.k8s_psat.as_deref() else {
                    return Err(ApiError::Internal("k8s_psat is not configured".into()));
                };
                let attested = psat.attest(&data.payload, &trust_domain).await?;
                (
                    attested.agent_id,
                    attested.selectors,
                    k8s_psat::CAN_REATTEST,
                )
            }
            other => {
                return Err(ApiError::InvalidArgument(format!(
                    "could not find node attestor type {other:?}"
                )));
            }
        };

        if agent_id.is_server_id() {
            return Err(ApiError::AttestationFailed(AGENT_IS_SERVER.into()));
        }
        let existing = self
            .state
            .store
            .get_agent(&agent_id)
            .await
            .map_err(|e| ApiError::from(e).into_status())?;
        if existing.as_ref().is_some_and(AttestedAgent::is_banned) {
            return Err(ApiError::AttestationFailed(AGENT_BANNED.into()));
        }

        let svid = self.sign_agent_svid(&agent_id, &csr)?;
        let _audited = self.state.audit.guard();
        let record = match existing {
            Some(mut agent) => {
                agent.attestation_type = data.r#type.clone();
                agent.serial = svid.serial().to_owned();
                agent.not_after = svid.not_after();
                agent.new_serial.clear();
                agent.new_not_after = None;
                agent.can_reattest = can_reattest;
                agent.selectors = selectors.clone();
                self.state.store.update_agent(agent).await
            }
            None => {
                let mut agent = AttestedAgent::new(
                    agent_id.clone(),
                    data.r#type.clone(),
                    svid.serial(),
                    svid.not_after(),
                );
                agent.can_reattest = can_reattest;
                agent.selectors = selectors.clone();
                self.state.store.create_agent(agent).await
            }
        };
        record.map_err(|e| ApiError::from(e).into_status())?;
        self.state.written().await;
        self.state.audit.record(
            agent_id.as_ref(),
            "agent attested",
            serde_json::json!({
                "agent_id": agent_id.to_string(),
                "attestation_type": data.r#type,
                "serial": svid.serial(),
            }),
        );
        Ok(pb::AttestAgentResponse {
            step: Some(pb::attest_agent_response::Step::Result(
                pb::attest_agent_response::Result {
                    svid: Some(x509_svid_to_proto(&svid, "")),
                    reattestable: can_reattest,
                },
            )),
        })
    }

    fn agent_id_from(&self, id: Option<&types::Spiffeid>) -> Result<SpiffeId, ApiError> {
        let id = id.ok_or_else(|| ApiError::InvalidArgument("invalid agent ID: missing".into()))?;
        let id = spiffe_id_from_proto(id)
            .map_err(|e| ApiError::InvalidArgument(format!("invalid agent ID: {e}")))?;
        if !id.is_member_of(self.state.trust_domain()) {
            return Err(ApiError::InvalidArgument(format!(
                "invalid agent ID: {id} is not in trust domain {}",
                self.state.trust_domain()
            )));
        }
        Ok(id)
    }

    fn audit(&self, caller: &Caller, action: &str, agent_id: &SpiffeId) {
        self.state.audit.record(
            &caller.describe(),
            action,
            serde_json::json!({"agent_id": agent_id.to_string()}),
        );
    }
}

fn x509pop_error(e: x509pop::X509PopError) -> ApiError {
    if e.is_verification_failure() {
        ApiError::AttestationFailed(e.to_string())
    } else {
        ApiError::InvalidArgument(format!("failed to attest: {e}"))
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `by_expires_before` of ListAgents and CountAgents. SPIRE's CLI sends it in Go's layout
/// `2006-01-02 15:04:05 -0700 -07` (what `spire-server agent list -expiresBefore` takes);
/// Unix seconds and RFC 3339 are accepted too.
fn parse_time_filter(value: &str) -> Result<Option<SystemTime>, ApiError> {
    if value.is_empty() {
        return Ok(None);
    }
    if let Ok(secs) = value.parse::<u64>() {
        return Ok(Some(UNIX_EPOCH + Duration::from_secs(secs)));
    }
    if let Some(time) = parse_spire_cli_time(value) {
        return Ok(Some(time));
    }
    humantime::parse_rfc3339_weak(value)
        .map(Some)
        .map_err(|e| ApiError::InvalidArgument(format!("invalid by_expires_before {value:?}: {e}")))
}

/// A time in Go's `2006-01-02 15:04:05 -0700 -07` layout: date, time of day, a `±hhmm`
/// offset and the same offset again as `±hh`. `None` if `value` has another shape.
fn parse_spire_cli_time(value: &str) -> Option<SystemTime> {
    let mut parts = value.split(' ');
    let (date, clock, offset, offset_hours) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let offset_seconds = signed_offset(offset, 4)?;
    if signed_offset(offset_hours, 2)? != offset_seconds - offset_seconds % 3600 {
        return None;
    }
    let utc_wall_clock = humantime::parse_rfc3339(&format!("{date}T{clock}Z")).ok()?;
    let magnitude = Duration::from_secs(offset_seconds.unsigned_abs());
    // Local time = UTC + offset, so UTC = local - offset.
    if offset_seconds >= 0 {
        utc_wall_clock.checked_sub(magnitude)
    } else {
        utc_wall_clock.checked_add(magnitude)
    }
}

/// `±hh` (`digits` 2) or `±hhmm` (`digits` 4) as signed seconds.
fn signed_offset(text: &str, digits: usize) -> Option<i64> {
    let (sign, number) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    if number.len() != digits || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let hours: i64 = number.get(..2)?.parse().ok()?;
    let minutes: i64 = if digits == 4 {
        number.get(2..)?.parse().ok()?
    } else {
        0
    };
    if minutes >= 60 {
        return None;
    }
    Some(sign * (hours * 3600 + minutes * 60))
}

fn agent_filter(
    by_attestation_type: String,
    by_selector_match: Option<&types::SelectorMatch>,
    by_banned: Option<bool>,
    by_can_reattest: Option<bool>,
    by_expires_before: &str,
) -> Result<AgentFilter, Status> {
    let by_selectors = match by_selector_match {
        None => None,
        Some(m) => {
            let selectors = selectors_from_proto("by_selector_match", &m.selectors)
                .map_err(|e| ApiError::InvalidArgument(format!("invalid selector filter: {e}")))?;
            if selectors.is_empty() {
                return Err(ApiError::InvalidArgument(
                    "invalid selector filter: empty selector set".into(),
                )
                .into());
            }
            let mode = match types::selector_match::MatchBehavior::try_from(m.r#match) {
                Ok(types::selector_match::MatchBehavior::MatchExact) => MatchMode::Exact,
                Ok(types::selector_match::MatchBehavior::MatchSubset) => MatchMode::Subset,
                Ok(types::selector_match::MatchBehavior::MatchSuperset) => MatchMode::Superset,
                Ok(types::selector_match::MatchBehavior::MatchAny) => MatchMode::Any,
                Err(_) => {
                    return Err(ApiError::InvalidArgument(
                        "invalid selector filter: unknown match behavior".into(),
                    )
                    .into());
                }
            };
            Some(SelectorFilter { selectors, mode })
        }
    };
    Ok(AgentFilter {
        by_attestation_type: Some(by_attestation_type).filter(|t| !t.is_empty()),
        by_selectors,
        by_banned,
        by_can_reattest,
        by_expires_before: parse_time_filter(by_expires_before)?,
    })
}

type AttestStream = Pin<Box<dyn Stream<Item = Result<pb::AttestAgentResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn count_agents(
        &self,
        request: Request<pb::CountAgentsRequest>,
    ) -> Result<Response<pb::CountAgentsResponse>, Status> {
        self.auth.admin(&request, &method("CountAgents"))?;
        let filter = match request.into_inner().filter {
            Some(f) => agent_filter(
                f.by_attestation_type,
                f.by_selector_match.as_ref(),
                f.by_banned,
                f.by_can_reattest,
                &f.by_expires_before,
            )?,
            None => AgentFilter::default(),
        };
        let count = self
            .state
            .store
            .count_agents(&filter)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::CountAgentsResponse {
            count: i32::try_from(count).unwrap_or(i32::MAX),
        }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.auth.admin(&request, &method("ListAgents"))?;
        let req = request.into_inner();
        let filter = match req.filter {
            Some(f) => agent_filter(
                f.by_attestation_type,
                f.by_selector_match.as_ref(),
                f.by_banned,
                f.by_can_reattest,
                &f.by_expires_before,
            )?,
            None => AgentFilter::default(),
        };
        if req.page_size < 0 {
            return Err(ApiError::InvalidArgument("page_size cannot be negative".into()).into());
        }
        let size = u32::try_from(req.page_size)
            .unwrap_or(0)
            .clamp(0, MAX_PAGE_SIZE);
        let page = (size > 0 || !req.page_token.is_empty()).then(|| PageRequest {
            token: Some(req.page_token.clone()).filter(|t| !t.is_empty()),
            size: if size == 0 { MAX_PAGE_SIZE } else { size },
        });
        let (agents, next) = self
            .state
            .store
            .list_agents(&filter, page)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents
                .iter()
                .map(|a| agent_to_proto(a, req.output_mask.as_ref()))
                .collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<types::Agent>, Status> {
        self.auth.admin(&request, &method("GetAgent"))?;
        let req = request.into_inner();
        let id = self.agent_id_from(req.id.as_ref())?;
        let agent = self
            .state
            .store
            .get_agent(&id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(AGENT_NOT_FOUND.into()))?;
        Ok(Response::new(agent_to_proto(
            &agent,
            req.output_mask.as_ref(),
        )))
    }

    async fn delete_agent(
        &self,
        request: Request<pb::DeleteAgentRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = self.auth.admin(&request, &method("DeleteAgent"))?;
        let id = self.agent_id_from(request.get_ref().id.as_ref())?;
        let _audited = self.state.audit.guard();
        match self.state.store.delete_agent(&id).await {
            Ok(_) => {}
            Err(DatastoreError::NotFound(_)) => {
                return Err(ApiError::NotFound(AGENT_NOT_FOUND.into()).into());
            }
            Err(e) => return Err(ApiError::from(e).into()),
        }
        self.state.written().await;
        self.audit(&caller, "agent evicted", &id);
        Ok(Response::new(()))
    }

    async fn ban_agent(
        &self,
        request: Request<pb::BanAgentRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = self.auth.admin(&request, &method("BanAgent"))?;
        let id = self.agent_id_from(request.get_ref().id.as_ref())?;
        let _audited = self.state.audit.guard();
        match self.state.store.ban_agent(&id).await {
            Ok(_) => {}
            Err(DatastoreError::NotFound(_)) => {
                return Err(ApiError::NotFound(AGENT_NOT_FOUND.into()).into());
            }
            Err(e) => return Err(ApiError::from(e).into()),
        }
        // The agent authorizer reads the index: the ban holds there before it is acknowledged.
        self.state.written().await;
        self.audit(&caller, "agent banned", &id);
        Ok(Response::new(()))
    }

    type AttestAgentStream = AttestStream;

    async fn attest_agent(
        &self,
        request: Request<Streaming<pb::AttestAgentRequest>>,
    ) -> Result<Response<Self::AttestAgentStream>, Status> {
        // Refused before anything else, and logged per address per interval, not per call.
        self.rate_limits
            .attestation(crate::caller::remote_ip(&request))
            .await?;
        let requests = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let service = self.clone();
        tokio::spawn(async move {
            let mut attestation_type = AttestationType::Unknown;
            let outcome = tokio::time::timeout(
                ATTESTATION_TIMEOUT,
                service.attest(requests, tx.clone(), &mut attestation_type),
            )
            .await
            .unwrap_or_else(|_| Err(ApiError::DeadlineExceeded("attestation timed out".into())));
            service.state.metrics.attestation.record(
                attestation_type,
                outcome
                    .as_ref()
                    .map_or_else(ApiError::outcome, |_| lanyard_metrics::Outcome::Ok),
            );
            if let Err(error) = &outcome {
                tracing::info!(code = ?error.code(), message = %error, "attestation refused");
            }
            let _ = tx.send(outcome.map_err(ApiError::into_status)).await;
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream.map(|item| item))))
    }

    async fn renew_agent(
        &self,
        request: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let caller = self.auth.agent(&request, &method("RenewAgent")).await?;
        if caller.agent.can_reattest {
            return Err(not_authorized(
                &method("RenewAgent"),
                Some(Reason::AgentMustReattest),
            ));
        }
        let csr = request
            .into_inner()
            .params
            .map(|p| p.csr)
            .filter(|csr| !csr.is_empty())
            .ok_or_else(|| ApiError::InvalidArgument("missing CSR".into()))?;
        let svid = self.sign_agent_svid(caller.id(), &csr)?;
        let mut agent = (*caller.agent).clone();
        agent.new_serial = svid.serial().to_owned();
        agent.new_not_after = Some(svid.not_after());
        let _audited = self.state.audit.guard();
        self.state
            .store
            .update_agent(agent)
            .await
            .map_err(ApiError::from)?;
        self.state.written().await;
        self.state.audit.record(
            caller.id().as_ref(),
            "agent SVID renewed",
            serde_json::json!({"agent_id": caller.id().to_string(), "serial": svid.serial()}),
        );
        Ok(Response::new(pb::RenewAgentResponse {
            svid: Some(x509_svid_to_proto(&svid, "")),
        }))
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<types::JoinToken>, Status> {
        let caller = self.auth.admin(&request, &method("CreateJoinToken"))?;
        let req = request.into_inner();
        if req.ttl < 1 {
            return Err(
                ApiError::InvalidArgument("ttl is required, you must provide one".into()).into(),
            );
        }
        let token = if req.token.is_empty() {
            EntryId::generate().as_str().to_owned()
        } else {
            req.token.clone()
        };
        let trust_domain = self.state.trust_domain().clone();
        let token_agent_id = trust_domain
            .join_token_agent_id(&token)
            .map_err(|e| ApiError::InvalidArgument(format!("invalid token: {e}")))?;
        let alias_id = match req.agent_id.as_ref() {
            Some(id) if !id.trust_domain.is_empty() || !id.path.is_empty() => {
                let id = self.agent_id_from(Some(id))?;
                if id.is_trust_domain_id() {
                    return Err(ApiError::InvalidArgument(
                        "invalid agent ID: the path cannot be empty".into(),
                    )
                    .into());
                }
                // SPIRE's rule: the alias must be a workload ID, never the server's own or
                // an agent's (an agent holding the server's SVID could impersonate it).
                if id.is_reserved() {
                    return Err(ApiError::InvalidArgument(format!(
                        "invalid agent ID: {id} is reserved; the ID given to a join token must \
                         be a workload ID, not under /spire/"
                    ))
                    .into());
                }
                Some(id)
            }
            _ => None,
        };
        let now = self.state.now();
        let expires_at = now + Duration::from_secs(u64::try_from(req.ttl).unwrap_or(0));
        // SPIRE's convenience: an entry giving the token's agent the chosen ID as an alias. It
        // is an entry like any other, so it takes the one write path (structure, policy,
        // store, index, audit); it is judged before the token exists, so that a refused alias
        // leaves no token behind.
        let alias = match alias_id {
            Some(alias_id) => {
                let selector = Selector::new("spiffe_id", token_agent_id.as_str())
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
                let entry = RegistrationEntry::new(
                    EntryId::generate(),
                    alias_id,
                    token_agent_id,
                    [selector].into_iter().collect(),
                    now,
                );
                entry
                    .validate(&trust_domain)
                    .map_err(|e| ApiError::InvalidArgument(format!("invalid agent ID: {e}")))?;
                self.writer
                    .judge(&entry, Operation::Create, &caller)
                    .map_err(|e| ApiError::from(e).into_status())?;
                Some(entry)
            }
            None => None,
        };
        self.state
            .store
            .create_join_token(&token, expires_at)
            .await
            .map_err(ApiError::from)?;
        if let Some(entry) = alias
            && let Err(error) = self
                .writer
                .create(&caller, entry, &method("CreateJoinToken"))
                .await
        {
            // The caller never learns the token; make sure nobody else can use it.
            let _ = self.state.store.take_join_token(&token).await;
            return Err(ApiError::from(error).into_status());
        }
        self.state.audit.record(
            &caller.describe(),
            "join token created",
            serde_json::json!({"expires_at": unix_secs(expires_at)}),
        );
        Ok(Response::new(types::JoinToken {
            value: token,
            expires_at: unix_secs(expires_at),
        }))
    }

    async fn post_status(
        &self,
        _request: Request<pb::PostStatusRequest>,
    ) -> Result<Response<pb::PostStatusResponse>, Status> {
        // SPIRE v1.13 answers Unimplemented and its agent never calls this.
        Err(ApiError::Unimplemented("PostStatus is not implemented".into()).into())
    }
}
