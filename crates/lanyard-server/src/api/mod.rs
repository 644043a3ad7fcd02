//! The server API: SPIRE's `spire.api.server.*` services and Lanyard's own, plus the caller
//! identification, authorization and error mapping they share.
//!
//! Authorization follows SPIRE's policy: admin RPCs need a local (Unix socket) caller or an
//! admin SVID; agent RPCs need the agent's *current* SVID; attestation and `GetBundle` are
//! open to anyone.

pub mod agent;
pub mod bundle;
pub mod changes;
pub mod entry;
pub mod errors;
pub mod exception;
pub mod governed;
pub mod localauthority;
pub mod metadata;
pub mod paging;
pub mod revocation;
pub mod svid;
pub mod trustdomain;
pub mod usage;

use std::sync::Arc;

use lanyard_core::SpiffeId;
use lanyard_proto::spire::api::types::permission_denied_details::Reason;
use tonic::{Request, Status};

use crate::datastore::{AttestedAgent, DatastoreError};
use crate::state::ServerState;

pub use crate::caller::{Caller, PeerSvid};
pub use errors::{ApiError, permission_denied};

/// Entries per batch call, at most, on SPIRE's entry API and ours (SPIRE's CLI sends entries
/// in batches of 50).
pub const MAX_ENTRIES_PER_BATCH: usize = 500;

/// Refuses a batch of more than [`MAX_ENTRIES_PER_BATCH`] items, before any is applied.
pub(crate) fn check_batch(len: usize) -> Result<(), Status> {
    if len > MAX_ENTRIES_PER_BATCH {
        return Err(Status::invalid_argument(format!(
            "{len} entries in one call; the limit is {MAX_ENTRIES_PER_BATCH}"
        )));
    }
    Ok(())
}

/// The caller may not call `method`; `reason` tells an agent what to do about it.
fn not_authorized(method: &str, reason: Option<Reason>) -> Status {
    ApiError::NotAuthorized {
        method: method.to_owned(),
        reason,
    }
    .into_status()
}

/// Authorization checks shared by the services.
#[derive(Debug, Clone)]
pub struct Authorizer {
    state: Arc<ServerState>,
}

impl Authorizer {
    /// Checks against `state`.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }

    /// A local caller or an admin SVID.
    pub fn admin<T>(&self, request: &Request<T>, method: &str) -> Result<Caller, Status> {
        let caller = Caller::of(request);
        match &caller {
            Caller::Local { .. } => Ok(caller),
            Caller::Svid(svid) if self.state.is_admin_id(&svid.id) => Ok(caller),
            _ => Err(not_authorized(method, None)),
        }
    }

    /// A local caller, an admin SVID or a downstream SVID.
    pub fn downstream<T>(&self, request: &Request<T>, method: &str) -> Result<Caller, Status> {
        let caller = Caller::of(request);
        match &caller {
            Caller::Local { .. } => Ok(caller),
            Caller::Svid(svid)
                if self.state.is_admin_id(&svid.id) || self.state.is_downstream_id(&svid.id) =>
            {
                Ok(caller)
            }
            _ => Err(not_authorized(method, None)),
        }
    }

    /// An attested agent presenting its current SVID (SPIRE's agent authorizer): an expired
    /// SVID, an unknown agent, a banned agent or a superseded SVID is refused with the
    /// matching `PermissionDeniedDetails` reason. Presenting the SVID issued by `RenewAgent`
    /// makes it the current one.
    ///
    /// The agent's record comes from the authorization index, which every agent write on
    /// this server updates before it is acknowledged and the change feed updates for writes
    /// through other servers. Only a record there that accepts the SVID as it stands is
    /// trusted; anything else (no record yet, a renewed SVID to promote, a refusal) is decided
    /// on the datastore's record, as if there were no index.
    pub async fn agent<T>(
        &self,
        request: &Request<T>,
        method: &str,
    ) -> Result<AgentCaller, Status> {
        let Caller::Svid(svid) = Caller::of(request) else {
            return Err(not_authorized(method, None));
        };
        let now = self.state.now();
        if svid.not_after <= now {
            return Err(not_authorized(method, Some(Reason::AgentExpired)));
        }
        if let Some(agent) = self.state.index.read().agent(&svid.id)
            && !agent.is_banned()
            && agent.serial == svid.serial
        {
            return Ok(AgentCaller { svid, agent });
        }
        let Some(mut agent) = self
            .state
            .store
            .get_agent(&svid.id)
            .await
            .map_err(|e| ApiError::from(e).into_status())?
        else {
            return Err(not_authorized(method, Some(Reason::AgentNotAttested)));
        };
        if agent.is_banned() {
            return Err(not_authorized(method, Some(Reason::AgentBanned)));
        }
        if agent.serial == svid.serial {
            return Ok(AgentCaller {
                svid,
                agent: Arc::new(agent),
            });
        }
        if !agent.new_serial.is_empty() && agent.new_serial == svid.serial {
            agent.serial = std::mem::take(&mut agent.new_serial);
            agent.not_after = agent.new_not_after.take().unwrap_or(svid.not_after);
            let agent = match self.state.store.update_agent(agent).await {
                Ok(agent) => agent,
                // Banned since it was read.
                Err(DatastoreError::FailedPrecondition(_)) => {
                    return Err(not_authorized(method, Some(Reason::AgentBanned)));
                }
                Err(e) => return Err(ApiError::from(e).into_status()),
            };
            self.state.written().await;
            return Ok(AgentCaller {
                svid,
                agent: Arc::new(agent),
            });
        }
        Err(not_authorized(method, Some(Reason::AgentNotActive)))
    }

    /// Either an agent or an admin (SPIRE allows both on `GetFederatedBundle`).
    pub async fn agent_or_admin<T>(
        &self,
        request: &Request<T>,
        method: &str,
    ) -> Result<(), Status> {
        if self.admin(request, method).is_ok() {
            return Ok(());
        }
        self.agent(request, method).await.map(|_| ())
    }
}

/// An authenticated agent and its record.
#[derive(Debug, Clone)]
pub struct AgentCaller {
    /// The SVID it presented.
    pub svid: PeerSvid,
    /// Its attested-agent record.
    pub agent: Arc<AttestedAgent>,
}

impl AgentCaller {
    /// The agent's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.svid.id
    }
}
