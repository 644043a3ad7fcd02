//! The one place where server errors become gRPC statuses.

use lanyard_proto::spire::api::types::PermissionDeniedDetails;
use lanyard_proto::spire::api::types::permission_denied_details::Reason;
use prost::Message as _;
use tonic::{Code, Status};

use crate::ca::CaError;
use crate::datastore::DatastoreError;
use crate::k8s_psat::K8sPsatError;
use crate::ratelimit::RateLimited;
use crate::relationships::{RelationshipError, RelationshipOperation};
use crate::writes::WriteError;

/// SPIRE's answer to an agent ID that names no attested agent.
pub const AGENT_NOT_FOUND: &str = "agent not found";
/// SPIRE's attestation refusal for a join token never issued or already redeemed.
pub const JOIN_TOKEN_UNKNOWN: &str = "join token does not exist or has already been used";
/// SPIRE's attestation refusal for a join token past its expiry.
pub const JOIN_TOKEN_EXPIRED: &str = "join token expired";
/// SPIRE's attestation refusal for a banned agent.
pub const AGENT_BANNED: &str = "agent is banned";
/// Attestation refused because the attested ID would be the server's own.
pub const AGENT_IS_SERVER: &str = "agent ID may not be the server ID";

/// The prefix SPIRE puts before a node attestor's messages, e.g. `nodeattestor(k8s_psat): `.
pub fn node_attestor_prefix(attestor: &str) -> String {
    format!("nodeattestor({attestor}): ")
}

/// SPIRE's answer to an entry ID that names no entry.
pub const ENTRY_NOT_FOUND: &str = "entry not found";
/// SPIRE's answer to an entry whose SPIFFE ID, parent and selectors another entry has.
pub const SIMILAR_ENTRY_EXISTS: &str = "similar entry already exists";

/// SPIRE's answer to `GetFederationRelationship` for a trust domain without a relationship.
pub const RELATIONSHIP_DOES_NOT_EXIST: &str = "federation relationship does not exist";
/// SPIRE's answer to a `BatchDeleteFederationRelationship` item for a trust domain without a
/// relationship.
pub const RELATIONSHIP_NOT_FOUND: &str = "federation relationship not found";
/// SPIRE's answer to a `BatchUpdateFederationRelationship` item for a trust domain without a
/// relationship (SPIRE's code is `Internal`; Lanyard's is `NotFound`).
pub const RELATIONSHIP_UPDATE_NOT_FOUND: &str = "failed to update federation relationship: unable to fetch federation relationship: record not found";
/// The prefix of SPIRE's answer to a relationship that could not be created.
pub const RELATIONSHIP_CREATE_FAILED: &str = "failed to create federation relationship";

/// An error from a service handler, before it becomes a [`Status`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The thing asked for does not exist (or is not visible to the caller).
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The thing to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state that allows the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request exceeds a limit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A datastore failure.
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    /// A CA failure.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// An agent's attestation evidence was checked and refused (PermissionDenied).
    #[error("failed to attest: {0}")]
    AttestationFailed(String),
    /// The caller is not authorized for `method` (PermissionDenied, with SPIRE's
    /// `PermissionDeniedDetails` when there is a `reason`).
    #[error("authorization denied for method {method}")]
    NotAuthorized {
        /// The full gRPC method name.
        method: String,
        /// Why, in SPIRE's terms, when the agent should act on it.
        reason: Option<Reason>,
    },
    /// Something the server depends on (such as a cluster's API server) cannot be reached
    /// now; worth retrying.
    #[error("{0}")]
    Unavailable(String),
    /// The call took longer than the server allows.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The peer went away mid-call.
    #[error("{0}")]
    Cancelled(String),
    /// The method exists but is not served.
    #[error("{0}")]
    Unimplemented(String),
    /// The peer's request stream failed; its status is passed on as it is.
    #[error("{}", .0.message())]
    Stream(Status),
    /// Anything else that is the server's fault.
    #[error("{0}")]
    Internal(String),
    /// A conditional write found the record at another revision than the one read.
    #[error("{0}")]
    Aborted(String),
}

impl From<RateLimited> for ApiError {
    fn from(error: RateLimited) -> Self {
        Self::ResourceExhausted(error.0)
    }
}

impl From<RateLimited> for Status {
    fn from(error: RateLimited) -> Self {
        ApiError::from(error).into_status()
    }
}

impl From<WriteError> for ApiError {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::Invalid(message) => Self::InvalidArgument(message),
            refused @ WriteError::Refused { .. } => Self::InvalidArgument(refused.to_string()),
            failed @ WriteError::PolicyFailed(_) => Self::Internal(failed.to_string()),
            WriteError::Duplicate { .. } => Self::AlreadyExists(SIMILAR_ENTRY_EXISTS.to_owned()),
            taken @ WriteError::IdTaken(_) => Self::AlreadyExists(taken.to_string()),
            WriteError::NotFound => Self::NotFound(ENTRY_NOT_FOUND.to_owned()),
            changed @ WriteError::Changed { .. } => Self::Aborted(changed.to_string()),
            WriteError::Datastore(error) => Self::Datastore(error),
        }
    }
}

impl From<RelationshipError> for ApiError {
    /// SPIRE's texts; a duplicate is `AlreadyExists` and an update of an unknown trust domain
    /// `NotFound` (SPIRE: `Internal` for both).
    fn from(error: RelationshipError) -> Self {
        match error {
            RelationshipError::Invalid(error) => Self::InvalidArgument(error.to_string()),
            exists @ RelationshipError::Exists(_) => {
                Self::AlreadyExists(format!("{RELATIONSHIP_CREATE_FAILED}: {exists}"))
            }
            RelationshipError::NotFound {
                trust_domain,
                during,
            } => Self::NotFound(match during {
                RelationshipOperation::Update => RELATIONSHIP_UPDATE_NOT_FOUND.to_owned(),
                RelationshipOperation::Delete => RELATIONSHIP_NOT_FOUND.to_owned(),
                RelationshipOperation::Refresh => format!(
                    "no relationship with trust domain {:?}",
                    trust_domain.name()
                ),
            }),
            RelationshipError::Datastore(error) => Self::Datastore(error),
        }
    }
}

impl From<K8sPsatError> for ApiError {
    /// SPIRE's codes and texts, except that a token the API server refuses is
    /// `PermissionDenied` (SPIRE: `Internal`), so that an agent stops instead of retrying, and
    /// an unreachable API server is `Unavailable`, so that it retries.
    fn from(error: K8sPsatError) -> Self {
        let prefix = node_attestor_prefix(lanyard_core::k8s_psat::ATTESTOR_NAME);
        match error {
            K8sPsatError::Payload(e) => Self::InvalidArgument(format!("{prefix}{e}")),
            e @ K8sPsatError::UnknownCluster(_) => Self::InvalidArgument(format!("{prefix}{e}")),
            K8sPsatError::Refused(m) => Self::PermissionDenied(format!("{prefix}{m}")),
            K8sPsatError::Unavailable(m) => Self::Unavailable(format!("{prefix}{m}")),
            K8sPsatError::Internal(m) => Self::Internal(format!("{prefix}{m}")),
        }
    }
}

impl ApiError {
    /// How a call that failed with this error counts in the metrics' `result` labels.
    pub fn outcome(&self) -> lanyard_metrics::Outcome {
        lanyard_metrics::Outcome::of_grpc_code(self.code() as i32)
    }

    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::AttestationFailed(_) | Self::NotAuthorized { .. } => Code::PermissionDenied,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Cancelled(_) => Code::Cancelled,
            Self::Unimplemented(_) => Code::Unimplemented,
            Self::Aborted(_) => Code::Aborted,
            Self::Stream(status) => status.code(),
            Self::Datastore(e) => match e {
                DatastoreError::NotFound(_) => Code::NotFound,
                DatastoreError::AlreadyExists { .. } => Code::AlreadyExists,
                DatastoreError::Conflict(_) => Code::Aborted,
                DatastoreError::FailedPrecondition(_) => Code::FailedPrecondition,
                DatastoreError::Invalid(_) => Code::InvalidArgument,
                _ => Code::Internal,
            },
            Self::Ca(CaError::FailedPrecondition(_)) => Code::FailedPrecondition,
            Self::Ca(_) | Self::Internal(_) => Code::Internal,
        }
    }

    /// The status to return to the caller. Internal details are logged, not sent.
    pub fn into_status(self) -> Status {
        match self {
            Self::NotAuthorized { method, reason } => return permission_denied(&method, reason),
            Self::Stream(status) => return status,
            _ => {}
        }
        let code = self.code();
        if code == Code::Internal {
            tracing::error!(error = %self, "internal error");
            return Status::internal("internal error; see the server log");
        }
        Status::new(code, self.to_string())
    }

    /// The per-item status of a batch RPC.
    pub fn to_proto_status(&self) -> lanyard_proto::spire::api::types::Status {
        let status = match self.code() {
            Code::Internal => {
                tracing::error!(error = %self, "internal error");
                "internal error; see the server log".to_owned()
            }
            _ => self.to_string(),
        };
        lanyard_proto::spire::api::types::Status {
            code: self.code() as i32,
            message: status,
        }
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        Self::Stream(status)
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        e.into_status()
    }
}

/// The per-item status of a successful batch item.
pub fn ok_status() -> lanyard_proto::spire::api::types::Status {
    lanyard_proto::spire::api::types::Status {
        code: Code::Ok as i32,
        message: "OK".to_owned(),
    }
}

/// `google.rpc.Status`, the payload of the `grpc-status-details-bin` trailer.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// SPIRE's authorization failure: PermissionDenied "authorization denied for method <m>",
/// carrying a `PermissionDeniedDetails` with `reason` when there is one (SPIRE's agent reads
/// it to decide whether to re-attest).
pub fn permission_denied(method: &str, reason: Option<Reason>) -> Status {
    let message = format!("authorization denied for method {method}");
    let Some(reason) = reason else {
        return Status::permission_denied(message);
    };
    let details = PermissionDeniedDetails {
        reason: reason as i32,
    };
    let any = match prost_types::Any::from_msg(&details) {
        Ok(any) => any,
        Err(_) => return Status::permission_denied(message),
    };
    let rpc_status = RpcStatus {
        code: Code::PermissionDenied as i32,
        message: message.clone(),
        details: vec![any],
    };
    Status::with_details(
        Code::PermissionDenied,
        message,
        rpc_status.encode_to_vec().into(),
    )
}

/// The `PermissionDeniedDetails` reason carried by a status, if any.
pub fn denial_reason(status: &Status) -> Option<Reason> {
    let rpc = RpcStatus::decode(status.details()).ok()?;
    rpc.details.iter().find_map(|any| {
        let details = any.to_msg::<PermissionDeniedDetails>().ok()?;
        Reason::try_from(details.reason).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denial_carries_the_reason() {
        let status = permission_denied(
            "/spire.api.server.entry.v1.Entry/SyncAuthorizedEntries",
            Some(Reason::AgentBanned),
        );
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(
            status.message(),
            "authorization denied for method /spire.api.server.entry.v1.Entry/SyncAuthorizedEntries"
        );
        assert_eq!(denial_reason(&status), Some(Reason::AgentBanned));
        assert_eq!(denial_reason(&permission_denied("/m", None)), None);
    }

    #[test]
    fn domain_errors_become_spires_statuses() {
        let status = ApiError::NotAuthorized {
            method: "/spire.api.server.agent.v1.Agent/RenewAgent".into(),
            reason: Some(Reason::AgentMustReattest),
        }
        .into_status();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(
            status.message(),
            "authorization denied for method /spire.api.server.agent.v1.Agent/RenewAgent"
        );
        assert_eq!(denial_reason(&status), Some(Reason::AgentMustReattest));

        let status = ApiError::AttestationFailed(JOIN_TOKEN_UNKNOWN.into()).into_status();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(
            status.message(),
            "failed to attest: join token does not exist or has already been used"
        );

        let status = ApiError::from(WriteError::Refused { violations: vec![] }).into_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("entry violates policy"));
        let status = ApiError::from(WriteError::NotFound).into_status();
        assert_eq!(
            (status.code(), status.message()),
            (Code::NotFound, ENTRY_NOT_FOUND)
        );
        let status = ApiError::from(WriteError::PolicyFailed("boom".into())).into_status();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("boom"));

        // A failed request stream keeps its own status.
        let status = ApiError::from(Status::cancelled("peer left")).into_status();
        assert_eq!(
            (status.code(), status.message()),
            (Code::Cancelled, "peer left")
        );
    }

    #[test]
    fn internal_details_stay_in_the_log() {
        let status = ApiError::Internal("disk on fire at /secret/path".into()).into_status();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("/secret/path"));
        let status = ApiError::from(DatastoreError::NotFound("entry \"x\"".into())).into_status();
        assert_eq!(status.code(), Code::NotFound);
    }
}
