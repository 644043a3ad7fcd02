//! Lanyard's revocation services: `RevocationService` for admins (revoke, with a dry run;
//! show, with which agents have applied it; list) and `AgentRevocationService` for agents
//! (fetch the revocations after the ones applied, with the CRLs; acknowledge).
//!
//! A revocation is stored with the serials it puts on the CRLs: the one it names, or those the
//! issuance ledger holds for its target that have not expired. Agents add the serials they
//! drop when they acknowledge, which covers what the ledger did not record (its queue is
//! bounded and it coalesces repeated issuances). Every revocation is audited; revoking an
//! agent bans it in the same call.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use lanyard_core::EntryId;
use lanyard_core::ledger::IssuanceKind;
use lanyard_core::revocation::{Revocation, RevocationTarget, RevokedSerial};
use lanyard_proto::convert::{revocation_to_proto, revoked_serial_to_proto};
use lanyard_proto::lanyard::api::v1::agent_revocation_service_server::{
    AgentRevocationService as AgentRevocationRpc, AgentRevocationServiceServer,
};
use lanyard_proto::lanyard::api::v1::revocation_service_server::{
    RevocationService as RevocationRpc, RevocationServiceServer,
};
use lanyard_proto::lanyard::api::v1::{
    AcknowledgeRevocationsRequest, AcknowledgeRevocationsResponse, AgentAcknowledgement,
    FetchRevocationsRequest, FetchRevocationsResponse, GetRevocationRequest, GetRevocationResponse,
    ListRevocationsRequest, ListRevocationsResponse, RevokeRequest, RevokeResponse,
};
use tonic::{Request, Response, Status};

use super::{ApiError, Authorizer, Caller};
use crate::datastore::{AgentFilter, DatastoreError, IssuanceFilter, PageRequest};
use crate::state::ServerState;

const REVOKE: &str = "/lanyard.api.v1.RevocationService/Revoke";
const GET_REVOCATION: &str = "/lanyard.api.v1.RevocationService/GetRevocation";
const LIST_REVOCATIONS: &str = "/lanyard.api.v1.RevocationService/ListRevocations";
const FETCH_REVOCATIONS: &str = "/lanyard.api.v1.AgentRevocationService/FetchRevocations";
const ACKNOWLEDGE_REVOCATIONS: &str =
    "/lanyard.api.v1.AgentRevocationService/AcknowledgeRevocations";

/// The longest owner, reason or ticket accepted.
const MAX_TEXT: usize = lanyard_core::revocation::MAX_TEXT_LEN;

/// Serials one acknowledgement may report, at most.
pub const MAX_DROPPED_PER_ACK: usize = 10_000;

/// Revocations one fetch returns, at most; the agent asks again from the last.
pub const MAX_REVOCATIONS_PER_FETCH: usize = 1_000;

/// The admin service.
#[derive(Debug, Clone)]
pub struct RevocationService {
    state: Arc<ServerState>,
    auth: Authorizer,
}

impl RevocationService {
    /// A service over `state`.
    pub fn new(state: Arc<ServerState>) -> Self {
        let auth = Authorizer::new(Arc::clone(&state));
        Self { state, auth }
    }

    /// The tonic service.
    pub fn into_server(self) -> RevocationServiceServer<Self> {
        RevocationServiceServer::new(self)
    }

    /// The revocation a request asks for, checked, with the serials it lists.
    async fn prepare(
        &self,
        request: &RevokeRequest,
        caller: &Caller,
    ) -> Result<(Revocation, Vec<RevokedSerial>), ApiError> {
        let now = self.state.now();
        let target = RevocationTarget::parse(request.kind.trim(), request.value.trim())
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let trust_domain = self.state.trust_domain();
        if let RevocationTarget::SpiffeId(id) | RevocationTarget::Agent(id) = &target
            && !id.is_member_of(trust_domain)
        {
            return Err(ApiError::InvalidArgument(format!(
                "{id} is not in trust domain {trust_domain}"
            )));
        }
        let missing = match &target {
            RevocationTarget::Entry(id) => self
                .state
                .store
                .get_entry(id)
                .await?
                .is_none()
                .then(|| format!("entry {id} not found")),
            RevocationTarget::Agent(id) => self
                .state
                .store
                .get_agent(id)
                .await?
                .is_none()
                .then(|| format!("agent {id} not found")),
            _ => None,
        };
        if let Some(missing) = missing {
            return Err(ApiError::NotFound(missing));
        }
        let serials = self.covered_serials(&target, now).await?;
        let expires_at = self.expiry(&target, &serials, now).await?;
        let revocation = Revocation {
            id: EntryId::generate().as_str().to_owned(),
            target,
            owner: text("owner", &request.owner, true)?,
            reason: text("reason", &request.reason, true)?,
            ticket: text("ticket", &request.ticket, false)?,
            created_at: now,
            created_by: caller.describe(),
            expires_at,
            sequence: 0,
        };
        revocation
            .validate()
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let serials = serials
            .into_iter()
            .map(|(serial, authority_id, _)| RevokedSerial {
                serial,
                authority_id,
                revoked_at: now,
            })
            .collect();
        Ok((revocation, serials))
    }

    /// The unexpired X.509-SVIDs the ledger holds for `target` up to `now`: serial,
    /// authority and expiry. A serial the ledger does not know is listed on every
    /// authority's CRL.
    async fn covered_serials(
        &self,
        target: &RevocationTarget,
        now: SystemTime,
    ) -> Result<Vec<(String, String, Option<SystemTime>)>, ApiError> {
        let mut filter = IssuanceFilter {
            valid_after: Some(now),
            ..IssuanceFilter::default()
        };
        match target {
            RevocationTarget::JwtId(_) => return Ok(Vec::new()),
            RevocationTarget::X509Serial(serial) => {
                let known = self
                    .ledger_issuances(&filter)
                    .await?
                    .into_iter()
                    .find(|i| i.kind != IssuanceKind::JwtSvid && &i.serial == serial);
                return Ok(vec![match known {
                    Some(issuance) => (
                        serial.clone(),
                        issuance.authority_id,
                        Some(issuance.not_after),
                    ),
                    None => (serial.clone(), String::new(), None),
                }]);
            }
            RevocationTarget::SpiffeId(id) => filter.spiffe_id = Some(id.clone()),
            RevocationTarget::Entry(id) => filter.entry_id = Some(id.as_str().to_owned()),
            RevocationTarget::Agent(id) => filter.agent_id = Some(id.clone()),
        }
        let mut seen = BTreeSet::new();
        Ok(self
            .ledger_issuances(&filter)
            .await?
            .into_iter()
            .filter(|i| i.kind != IssuanceKind::JwtSvid && i.issued_at <= now)
            .filter(|i| seen.insert(i.serial.clone()))
            .map(|i| (i.serial, i.authority_id, Some(i.not_after)))
            .collect())
    }

    /// Every issuance matching `filter`, page by page.
    async fn ledger_issuances(
        &self,
        filter: &IssuanceFilter,
    ) -> Result<Vec<lanyard_core::ledger::Issuance>, ApiError> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let (page, next) = self
                .state
                .store
                .list_issuances(
                    filter,
                    Some(PageRequest {
                        token: token.take(),
                        size: 1000,
                    }),
                )
                .await?;
            out.extend(page);
            match next {
                Some(next) => token = Some(next),
                None => return Ok(out),
            }
        }
    }

    /// When every credential the revocation can cover has expired: a serial the ledger knows
    /// expires when it says; anything else by the latest expiry among the trust domain's
    /// authorities of its kind (nothing outlives its authority), and never before `now`.
    async fn expiry(
        &self,
        target: &RevocationTarget,
        serials: &[(String, String, Option<SystemTime>)],
        now: SystemTime,
    ) -> Result<SystemTime, ApiError> {
        if let (RevocationTarget::X509Serial(_), [(_, _, Some(not_after))]) = (target, serials) {
            return Ok((*not_after).max(now));
        }
        let bundle = self.state.bundle();
        let latest = if target.is_x509() {
            bundle
                .x509_authorities()
                .iter()
                .filter_map(|a| lanyard_core::x509::validity_of(a.der()).ok())
                .map(|(_, not_after)| not_after)
                .max()
        } else {
            bundle
                .jwt_authorities()
                .iter()
                .filter_map(lanyard_core::JwtAuthority::expires_at)
                .max()
        };
        let latest = latest.unwrap_or(now).max(now);
        Ok(latest)
    }

    async fn load(&self, id: &str) -> Result<Revocation, ApiError> {
        if id.is_empty() {
            return Err(ApiError::InvalidArgument(
                "missing revocation ID".to_owned(),
            ));
        }
        self.state
            .store
            .get_revocation(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("revocation {id:?} not found")))
    }

    fn audit(&self, caller: &Caller, revocation: &Revocation, serials: usize, banned: bool) {
        self.state.audit.record(
            &caller.describe(),
            "revocation created",
            serde_json::json!({
                "revocation_id": revocation.id,
                "sequence": revocation.sequence,
                "kind": revocation.target.kind(),
                "value": revocation.target.value(),
                "owner": revocation.owner,
                "reason": revocation.reason,
                "ticket": revocation.ticket,
                "expires_at": lanyard_core::policy::unix_seconds(revocation.expires_at),
                "serials": serials,
                "agent_banned": banned,
            }),
        );
    }
}

#[tonic::async_trait]
impl RevocationRpc for RevocationService {
    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let caller = self.auth.admin(&request, REVOKE)?;
        let request = request.into_inner();
        let (revocation, serials) = self.prepare(&request, &caller).await?;
        if request.dry_run {
            return Ok(Response::new(RevokeResponse {
                revocation: Some(revocation_to_proto(&revocation)),
                serials: serials.iter().map(revoked_serial_to_proto).collect(),
                banned: false,
            }));
        }
        let _audited = self.state.audit.guard();
        let stored = self
            .state
            .store
            .create_revocation(revocation, &serials)
            .await
            .map_err(ApiError::from)?;
        let mut banned = false;
        if let RevocationTarget::Agent(id) = &stored.target {
            let was_banned = self
                .state
                .store
                .get_agent(id)
                .await
                .map_err(ApiError::from)?
                .is_some_and(|agent| agent.is_banned());
            match self.state.store.ban_agent(id).await {
                Ok(_) => banned = !was_banned,
                // Deleted meanwhile: nothing left to ban.
                Err(DatastoreError::NotFound(_)) => {}
                Err(error) => return Err(ApiError::from(error).into()),
            }
        }
        // The index (the ban), the CRLs and the agents' change streams take it before the
        // answer: the catch-up sees the revocation in the change log and signs anew (unless a
        // periodic catch-up took the change first and has not signed yet).
        self.state.written().await;
        if self.state.revocations.sequence() < stored.sequence {
            self.state.refresh_revocations().await;
            self.state.written().await;
        }
        self.audit(&caller, &stored, serials.len(), banned);
        Ok(Response::new(RevokeResponse {
            revocation: Some(revocation_to_proto(&stored)),
            serials: serials.iter().map(revoked_serial_to_proto).collect(),
            banned,
        }))
    }

    async fn get_revocation(
        &self,
        request: Request<GetRevocationRequest>,
    ) -> Result<Response<GetRevocationResponse>, Status> {
        self.auth.admin(&request, GET_REVOCATION)?;
        let revocation = self.load(&request.get_ref().id).await?;
        let serials = self
            .state
            .store
            .list_revoked_serials(Some(&revocation.id))
            .await
            .map_err(ApiError::from)?;
        let acks = self
            .state
            .store
            .list_revocation_acks()
            .await
            .map_err(ApiError::from)?;
        let acknowledged: Vec<AgentAcknowledgement> = acks
            .iter()
            .filter(|ack| ack.sequence >= revocation.sequence)
            .map(|ack| AgentAcknowledgement {
                agent_id: ack.agent_id.to_string(),
                sequence: ack.sequence,
                acknowledged_at: i64::try_from(lanyard_core::policy::unix_seconds(ack.acked_at))
                    .unwrap_or(i64::MAX),
            })
            .collect();
        let done: BTreeSet<&str> = acknowledged.iter().map(|a| a.agent_id.as_str()).collect();
        let mut pending = Vec::new();
        let mut token = None;
        loop {
            let (agents, next) = self
                .state
                .store
                .list_agents(
                    &AgentFilter::default(),
                    Some(PageRequest {
                        token: token.take(),
                        size: 1000,
                    }),
                )
                .await
                .map_err(ApiError::from)?;
            pending.extend(
                agents
                    .iter()
                    .filter(|agent| !agent.is_banned() && !done.contains(agent.spiffe_id.as_str()))
                    .map(|agent| agent.spiffe_id.to_string()),
            );
            match next {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        Ok(Response::new(GetRevocationResponse {
            revocation: Some(revocation_to_proto(&revocation)),
            serials: serials.iter().map(revoked_serial_to_proto).collect(),
            acknowledged,
            pending_agent_ids: pending,
        }))
    }

    async fn list_revocations(
        &self,
        request: Request<ListRevocationsRequest>,
    ) -> Result<Response<ListRevocationsResponse>, Status> {
        self.auth.admin(&request, LIST_REVOCATIONS)?;
        let revocations = self
            .state
            .store
            .list_revocations(0)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListRevocationsResponse {
            revocations: revocations.iter().map(revocation_to_proto).collect(),
        }))
    }
}

/// The agent service.
#[derive(Debug, Clone)]
pub struct AgentRevocationService {
    state: Arc<ServerState>,
    auth: Authorizer,
}

impl AgentRevocationService {
    /// A service over `state`.
    pub fn new(state: Arc<ServerState>) -> Self {
        let auth = Authorizer::new(Arc::clone(&state));
        Self { state, auth }
    }

    /// The tonic service.
    pub fn into_server(self) -> AgentRevocationServiceServer<Self> {
        AgentRevocationServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl AgentRevocationRpc for AgentRevocationService {
    async fn fetch_revocations(
        &self,
        request: Request<FetchRevocationsRequest>,
    ) -> Result<Response<FetchRevocationsResponse>, Status> {
        self.auth.agent(&request, FETCH_REVOCATIONS).await?;
        let after = request.get_ref().after_sequence.max(0);
        // Agents ask at every sync: one that has applied everything this server knows of is
        // answered from memory, without a datastore read.
        let mut revocations = if after >= self.state.revocations.sequence() {
            Vec::new()
        } else {
            self.state
                .store
                .list_revocations(after)
                .await
                .map_err(ApiError::from)?
        };
        let now = self.state.now();
        let sequence = if revocations.len() > MAX_REVOCATIONS_PER_FETCH {
            // The agent asks again from the last one it is given.
            revocations.truncate(MAX_REVOCATIONS_PER_FETCH);
            revocations.last().map_or(after, |r| r.sequence)
        } else {
            revocations
                .last()
                .map_or(after, |r| r.sequence)
                .max(self.state.revocations.sequence())
        };
        let crls = self.state.revocations.crls();
        let held = request.get_ref().crl_number;
        Ok(Response::new(FetchRevocationsResponse {
            revocations: revocations
                .iter()
                .filter(|r| r.is_live(now))
                .map(revocation_to_proto)
                .collect(),
            sequence,
            crls: if held == crls.version {
                Vec::new()
            } else {
                crls.lists.iter().map(|list| list.der.clone()).collect()
            },
            crl_number: crls.version,
        }))
    }

    async fn acknowledge_revocations(
        &self,
        request: Request<AcknowledgeRevocationsRequest>,
    ) -> Result<Response<AcknowledgeRevocationsResponse>, Status> {
        let caller = self.auth.agent(&request, ACKNOWLEDGE_REVOCATIONS).await?;
        let request = request.into_inner();
        if request.dropped.len() > MAX_DROPPED_PER_ACK {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_DROPPED_PER_ACK} dropped SVIDs per acknowledgement"
            )));
        }
        let known = self.state.revocations.sequence();
        if request.sequence < 0 || request.sequence > known {
            return Err(Status::invalid_argument(format!(
                "sequence {} is not one this server has made (the newest is {known})",
                request.sequence
            )));
        }
        let now = self.state.now();
        let previous = self
            .state
            .store
            .get_revocation_ack(caller.id())
            .await
            .map_err(ApiError::from)?
            .map_or(0, |ack| ack.sequence);
        // Drops count only for the revocations this acknowledgement newly applies, so that an
        // agent reports each revocation's SVIDs once.
        let newly: BTreeMap<String, Revocation> = if request.dropped.is_empty() {
            BTreeMap::new()
        } else {
            self.state
                .store
                .list_revocations(previous)
                .await
                .map_err(ApiError::from)?
                .into_iter()
                .filter(|r| r.sequence <= request.sequence)
                .map(|r| (r.id.clone(), r))
                .collect()
        };
        let bundle = self.state.bundle();
        let authorities: Vec<&[u8]> = bundle.x509_authorities().iter().map(|a| a.der()).collect();
        let mut by_revocation: BTreeMap<&str, Vec<RevokedSerial>> = BTreeMap::new();
        let mut refused: Vec<(&str, DropRefused)> = Vec::new();
        for dropped in &request.dropped {
            let checked = newly
                .get(&dropped.revocation_id)
                .ok_or(DropRefused::NotNewlyApplied)
                .and_then(|revocation| {
                    check_drop(
                        &self.state,
                        &authorities,
                        caller.id(),
                        revocation,
                        &dropped.certificates,
                        now,
                    )
                });
            match checked {
                Ok(serial) => by_revocation
                    .entry(dropped.revocation_id.as_str())
                    .or_default()
                    .push(serial),
                Err(reason) => refused.push((dropped.revocation_id.as_str(), reason)),
            }
        }
        if let Some((revocation_id, reason)) = refused.first() {
            tracing::warn!(
                agent_id = %caller.id(),
                refused = refused.len(),
                %revocation_id,
                %reason,
                "dropped SVIDs an agent reported were left off the CRLs (the first one's reason)"
            );
        }
        let listed: usize = by_revocation.values().map(Vec::len).sum();
        let _audited = self.state.audit.guard();
        let mut added = false;
        for (revocation_id, serials) in &by_revocation {
            match self
                .state
                .store
                .add_revoked_serials(revocation_id, serials)
                .await
            {
                Ok(()) => added = true,
                // Pruned, or never there: nothing to add to.
                Err(DatastoreError::NotFound(_)) => {}
                Err(error) => return Err(ApiError::from(error).into()),
            }
        }
        self.state
            .store
            .acknowledge_revocations(caller.id(), request.sequence, now)
            .await
            .map_err(ApiError::from)?;
        if request.sequence > previous || listed > 0 {
            // The governance record: which agent applied which revocations, and what it
            // dropped. Retries of an acknowledgement already recorded add nothing.
            self.state.audit.record(
                caller.id().as_ref(),
                "revocations acknowledged",
                serde_json::json!({
                    "sequence": request.sequence,
                    "previous_sequence": previous,
                    "dropped_listed": listed,
                    "dropped_refused": refused.len(),
                }),
            );
        }
        if added {
            self.state.written().await;
            self.state.refresh_revocations().await;
        }
        Ok(Response::new(AcknowledgeRevocationsResponse {
            listed: u32::try_from(listed).unwrap_or(u32::MAX),
            refused: u32::try_from(refused.len()).unwrap_or(u32::MAX),
        }))
    }
}

/// Why a dropped SVID an agent reported is not put on the CRLs.
#[derive(Debug)]
enum DropRefused {
    NotNewlyApplied,
    NoCertificate,
    TooLong,
    Unverified(lanyard_core::x509::X509Error),
    IssuedAfter,
    EntryNotTheCallers,
    NotCovered,
}

impl std::fmt::Display for DropRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotNewlyApplied => {
                f.write_str("not a revocation this acknowledgement newly applies")
            }
            Self::NoCertificate => f.write_str("no certificate"),
            Self::TooLong => f.write_str("a chain longer than an X.509-SVID's"),
            Self::Unverified(error) => {
                write!(f, "not an X.509-SVID of this trust domain: {error}")
            }
            Self::IssuedAfter => f.write_str("issued after the revocation was made"),
            Self::EntryNotTheCallers => f.write_str(
                "the revoked entry is not one the agent is authorized for, with this SPIFFE ID",
            ),
            Self::NotCovered => f.write_str("not covered by the revocation"),
        }
    }
}

/// Certificates in a dropped SVID's chain, at most.
const MAX_DROPPED_CHAIN: usize = 8;

/// The CRL entry for an X.509-SVID (`chain`) that `caller` reports having dropped for
/// `revocation`, if it is one the revocation covers: an SVID of this trust domain
/// (`authorities`) valid now, issued before the revocation was made, and covered for this
/// caller. Certificates are public, so an agent could report anyone's: an entry's revocation
/// takes only SVIDs with the SPIFFE ID of an entry the caller is authorized for, and an
/// agent's only the caller's own (an agent revoked is banned, so never the caller).
fn check_drop(
    state: &ServerState,
    authorities: &[&[u8]],
    caller: &lanyard_core::SpiffeId,
    revocation: &Revocation,
    chain: &[Vec<u8>],
    now: SystemTime,
) -> Result<RevokedSerial, DropRefused> {
    let leaf = chain.first().ok_or(DropRefused::NoCertificate)?;
    if chain.len() > MAX_DROPPED_CHAIN {
        return Err(DropRefused::TooLong);
    }
    let verified =
        lanyard_core::x509::verify_svid_chain(chain, &state.config.trust_domain, authorities, now)
            .map_err(DropRefused::Unverified)?;
    if !revocation.predates(verified.not_before()) {
        return Err(DropRefused::IssuedAfter);
    }
    let entry_id = match &revocation.target {
        RevocationTarget::Entry(id) => {
            let authorized = state
                .authorized_entry(caller, id)
                .is_some_and(|entry| &entry.spiffe_id == verified.spiffe_id());
            if !authorized {
                return Err(DropRefused::EntryNotTheCallers);
            }
            id.as_str()
        }
        _ => "",
    };
    if !revocation
        .target
        .covers_x509(verified.serial(), verified.spiffe_id(), entry_id, caller)
    {
        return Err(DropRefused::NotCovered);
    }
    let authority_id = lanyard_core::x509::authority_key_id_hex(leaf)
        .ok()
        .flatten()
        .unwrap_or_default();
    Ok(RevokedSerial {
        serial: verified.serial().to_owned(),
        authority_id,
        revoked_at: revocation.created_at,
    })
}

/// A trimmed governance text: required or optional, bounded, without control characters.
fn text(field: &str, value: &str, required: bool) -> Result<String, ApiError> {
    let value = value.trim();
    if required && value.is_empty() {
        return Err(ApiError::InvalidArgument(format!("missing {field}")));
    }
    if value.len() > MAX_TEXT {
        return Err(ApiError::InvalidArgument(format!(
            "{field} is longer than {MAX_TEXT} bytes"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::InvalidArgument(format!(
            "{field} contains control characters"
        )));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn governance_texts_are_trimmed_bounded_and_printable() {
        assert_eq!(text("owner", "  team-a ", true).unwrap(), "team-a");
        assert!(text("owner", "   ", true).is_err());
        assert_eq!(text("ticket", "", false).unwrap(), "");
        assert!(text("reason", &"x".repeat(MAX_TEXT + 1), true).is_err());
        assert!(text("reason", "a\u{7}b", true).is_err());
    }
}
