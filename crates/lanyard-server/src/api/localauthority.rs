//! SPIRE's LocalAuthority service (`spire.api.server.localauthority.v1.LocalAuthority`):
//! forced rotation of the server's own X.509 CA and JWT key — show, prepare, activate,
//! taint, revoke — for admins. The CA manager does the work ([`crate::ca::AuthorityKind`]);
//! every change is audited. Lanyard has no upstream authority, so the upstream RPCs answer
//! `FailedPrecondition` as SPIRE's do without one.

use std::sync::Arc;

use lanyard_core::policy::unix_seconds;
use lanyard_proto::spire::api::server::localauthority::v1 as pb;
use lanyard_proto::spire::api::server::localauthority::v1::local_authority_server::{
    LocalAuthority, LocalAuthorityServer,
};
use tonic::{Request, Response, Status};

use super::{ApiError, Authorizer, Caller};
use crate::ca::{AuthorityError, AuthorityInfo, AuthorityKind, AuthorityStates};
use crate::state::ServerState;

const SERVICE: &str = "/spire.api.server.localauthority.v1.LocalAuthority/";

/// The LocalAuthority service.
#[derive(Debug, Clone)]
pub struct LocalAuthorityService {
    state: Arc<ServerState>,
    auth: Authorizer,
}

impl LocalAuthorityService {
    /// A service over `state`'s CA.
    pub fn new(state: Arc<ServerState>) -> Self {
        let auth = Authorizer::new(Arc::clone(&state));
        Self { state, auth }
    }

    /// The tonic service.
    pub fn into_server(self) -> LocalAuthorityServer<Self> {
        LocalAuthorityServer::new(self)
    }

    fn admin<T>(&self, request: &Request<T>, method: &str) -> Result<Caller, Status> {
        self.auth.admin(request, &format!("{SERVICE}{method}"))
    }

    fn states(
        &self,
        kind: AuthorityKind,
    ) -> (
        Option<pb::AuthorityState>,
        Option<pb::AuthorityState>,
        Option<pb::AuthorityState>,
    ) {
        let AuthorityStates {
            active,
            prepared,
            old,
        } = self.state.ca.authority_states(kind);
        (
            active.as_ref().map(to_proto),
            prepared.as_ref().map(to_proto),
            old.as_ref().map(to_proto),
        )
    }

    /// Runs `operation`, audits what it did and returns the authority it acted on.
    async fn change(
        &self,
        caller: &Caller,
        action: &str,
        kind: AuthorityKind,
        operation: impl std::future::Future<Output = Result<AuthorityInfo, AuthorityError>>,
    ) -> Result<pb::AuthorityState, Status> {
        let _audited = self.state.audit.guard();
        let info = operation.await.map_err(|error| match error {
            AuthorityError::InvalidArgument(message) => ApiError::InvalidArgument(message),
            AuthorityError::FailedPrecondition(message) => ApiError::FailedPrecondition(message),
            AuthorityError::Ca(error) => ApiError::from(error),
        })?;
        // The server's own SVID follows an activated authority at once, not at the next tick.
        self.state.request_rotation();
        if kind == AuthorityKind::X509 {
            // The authorities that sign CRLs changed (one prepared, retired or removed).
            self.state.refresh_revocations().await;
        }
        self.state.audit.record(
            &caller.describe(),
            action,
            serde_json::json!({
                "kind": match kind { AuthorityKind::X509 => "x509", AuthorityKind::Jwt => "jwt" },
                "authority_id": info.authority_id,
                "expires_at": unix_seconds(info.expires_at),
            }),
        );
        Ok(to_proto(&info))
    }
}

fn to_proto(info: &AuthorityInfo) -> pb::AuthorityState {
    pb::AuthorityState {
        authority_id: info.authority_id.clone(),
        expires_at: i64::try_from(unix_seconds(info.expires_at)).unwrap_or(i64::MAX),
        upstream_authority_subject_key_id: String::new(),
    }
}

fn no_upstream() -> Status {
    Status::failed_precondition("no upstream authority is configured")
}

#[tonic::async_trait]
impl LocalAuthority for LocalAuthorityService {
    async fn get_jwt_authority_state(
        &self,
        request: Request<pb::GetJwtAuthorityStateRequest>,
    ) -> Result<Response<pb::GetJwtAuthorityStateResponse>, Status> {
        self.admin(&request, "GetJWTAuthorityState")?;
        let (active, prepared, old) = self.states(AuthorityKind::Jwt);
        Ok(Response::new(pb::GetJwtAuthorityStateResponse {
            active,
            prepared,
            old,
        }))
    }

    async fn prepare_jwt_authority(
        &self,
        request: Request<pb::PrepareJwtAuthorityRequest>,
    ) -> Result<Response<pb::PrepareJwtAuthorityResponse>, Status> {
        let caller = self.admin(&request, "PrepareJWTAuthority")?;
        let now = self.state.now();
        let prepared = self
            .change(
                &caller,
                "JWT authority prepared",
                AuthorityKind::Jwt,
                self.state.ca.prepare_authority(AuthorityKind::Jwt, now),
            )
            .await?;
        Ok(Response::new(pb::PrepareJwtAuthorityResponse {
            prepared_authority: Some(prepared),
        }))
    }

    async fn activate_jwt_authority(
        &self,
        request: Request<pb::ActivateJwtAuthorityRequest>,
    ) -> Result<Response<pb::ActivateJwtAuthorityResponse>, Status> {
        let caller = self.admin(&request, "ActivateJWTAuthority")?;
        let id = request.into_inner().authority_id;
        let now = self.state.now();
        let activated = self
            .change(
                &caller,
                "JWT authority activated",
                AuthorityKind::Jwt,
                self.state
                    .ca
                    .activate_authority(AuthorityKind::Jwt, &id, now),
            )
            .await?;
        Ok(Response::new(pb::ActivateJwtAuthorityResponse {
            activated_authority: Some(activated),
        }))
    }

    async fn taint_jwt_authority(
        &self,
        request: Request<pb::TaintJwtAuthorityRequest>,
    ) -> Result<Response<pb::TaintJwtAuthorityResponse>, Status> {
        let caller = self.admin(&request, "TaintJWTAuthority")?;
        let id = request.into_inner().authority_id;
        let tainted = self
            .change(
                &caller,
                "JWT authority tainted",
                AuthorityKind::Jwt,
                self.state.ca.taint_authority(AuthorityKind::Jwt, &id),
            )
            .await?;
        Ok(Response::new(pb::TaintJwtAuthorityResponse {
            tainted_authority: Some(tainted),
        }))
    }

    async fn revoke_jwt_authority(
        &self,
        request: Request<pb::RevokeJwtAuthorityRequest>,
    ) -> Result<Response<pb::RevokeJwtAuthorityResponse>, Status> {
        let caller = self.admin(&request, "RevokeJWTAuthority")?;
        let id = request.into_inner().authority_id;
        let revoked = self
            .change(
                &caller,
                "JWT authority revoked",
                AuthorityKind::Jwt,
                self.state.ca.revoke_authority(AuthorityKind::Jwt, &id),
            )
            .await?;
        Ok(Response::new(pb::RevokeJwtAuthorityResponse {
            revoked_authority: Some(revoked),
        }))
    }

    async fn get_x509_authority_state(
        &self,
        request: Request<pb::GetX509AuthorityStateRequest>,
    ) -> Result<Response<pb::GetX509AuthorityStateResponse>, Status> {
        self.admin(&request, "GetX509AuthorityState")?;
        let (active, prepared, old) = self.states(AuthorityKind::X509);
        Ok(Response::new(pb::GetX509AuthorityStateResponse {
            active,
            prepared,
            old,
        }))
    }

    async fn prepare_x509_authority(
        &self,
        request: Request<pb::PrepareX509AuthorityRequest>,
    ) -> Result<Response<pb::PrepareX509AuthorityResponse>, Status> {
        let caller = self.admin(&request, "PrepareX509Authority")?;
        let now = self.state.now();
        let prepared = self
            .change(
                &caller,
                "X.509 authority prepared",
                AuthorityKind::X509,
                self.state.ca.prepare_authority(AuthorityKind::X509, now),
            )
            .await?;
        Ok(Response::new(pb::PrepareX509AuthorityResponse {
            prepared_authority: Some(prepared),
        }))
    }

    async fn activate_x509_authority(
        &self,
        request: Request<pb::ActivateX509AuthorityRequest>,
    ) -> Result<Response<pb::ActivateX509AuthorityResponse>, Status> {
        let caller = self.admin(&request, "ActivateX509Authority")?;
        let id = request.into_inner().authority_id;
        let now = self.state.now();
        let activated = self
            .change(
                &caller,
                "X.509 authority activated",
                AuthorityKind::X509,
                self.state
                    .ca
                    .activate_authority(AuthorityKind::X509, &id, now),
            )
            .await?;
        Ok(Response::new(pb::ActivateX509AuthorityResponse {
            activated_authority: Some(activated),
        }))
    }

    async fn taint_x509_authority(
        &self,
        request: Request<pb::TaintX509AuthorityRequest>,
    ) -> Result<Response<pb::TaintX509AuthorityResponse>, Status> {
        let caller = self.admin(&request, "TaintX509Authority")?;
        let id = request.into_inner().authority_id;
        let tainted = self
            .change(
                &caller,
                "X.509 authority tainted",
                AuthorityKind::X509,
                self.state.ca.taint_authority(AuthorityKind::X509, &id),
            )
            .await?;
        Ok(Response::new(pb::TaintX509AuthorityResponse {
            tainted_authority: Some(tainted),
        }))
    }

    async fn taint_x509_upstream_authority(
        &self,
        request: Request<pb::TaintX509UpstreamAuthorityRequest>,
    ) -> Result<Response<pb::TaintX509UpstreamAuthorityResponse>, Status> {
        self.admin(&request, "TaintX509UpstreamAuthority")?;
        Err(no_upstream())
    }

    async fn revoke_x509_authority(
        &self,
        request: Request<pb::RevokeX509AuthorityRequest>,
    ) -> Result<Response<pb::RevokeX509AuthorityResponse>, Status> {
        let caller = self.admin(&request, "RevokeX509Authority")?;
        let id = request.into_inner().authority_id;
        let revoked = self
            .change(
                &caller,
                "X.509 authority revoked",
                AuthorityKind::X509,
                self.state.ca.revoke_authority(AuthorityKind::X509, &id),
            )
            .await?;
        Ok(Response::new(pb::RevokeX509AuthorityResponse {
            revoked_authority: Some(revoked),
        }))
    }

    async fn revoke_x509_upstream_authority(
        &self,
        request: Request<pb::RevokeX509UpstreamAuthorityRequest>,
    ) -> Result<Response<pb::RevokeX509UpstreamAuthorityResponse>, Status> {
        self.admin(&request, "RevokeX509UpstreamAuthority")?;
        Err(no_upstream())
    }
}
