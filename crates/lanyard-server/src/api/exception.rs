//! Lanyard's `lanyard.api.v1.ExceptionService`: exceptions to the policy as records with an
//! owner, a reason, a scope, the rules they waive and an expiry. Creating and extending one
//! is judged by the policy's `exception_violations` (the baseline caps the length and wants
//! a ticket for admin and downstream waivers); every change is audited. An exception lapses
//! by itself: issuance compares its expiry with the clock, so nothing has to sweep it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::entry::{MAX_OWNER_LEN, MAX_REASON_LEN, validate_expiry};
use lanyard_core::policy::{Exception, ExceptionInput, describe_violations, unix_seconds};
use lanyard_core::{EntryId, SpiffeId};
use lanyard_proto::convert::exception_to_proto;
use lanyard_proto::lanyard::api::v1::exception_service_server::{
    ExceptionService as ExceptionRpc, ExceptionServiceServer,
};
use lanyard_proto::lanyard::api::v1::{
    CreateExceptionRequest, ExtendExceptionRequest, GetExceptionRequest, ListExceptionsRequest,
    ListExceptionsResponse, PolicyException, RevokeExceptionRequest,
};
use tonic::{Request, Response, Status};

use super::paging::{page_of, requested_page};
use super::{ApiError, Authorizer, Caller};
use crate::caller::caller_input;
use crate::datastore::DatastoreError;
use crate::state::ServerState;

const CREATE_EXCEPTION: &str = "/lanyard.api.v1.ExceptionService/CreateException";
const GET_EXCEPTION: &str = "/lanyard.api.v1.ExceptionService/GetException";
const LIST_EXCEPTIONS: &str = "/lanyard.api.v1.ExceptionService/ListExceptions";
const EXTEND_EXCEPTION: &str = "/lanyard.api.v1.ExceptionService/ExtendException";
const REVOKE_EXCEPTION: &str = "/lanyard.api.v1.ExceptionService/RevokeException";

/// Rules and entry IDs one exception may list, at most.
const MAX_ITEMS: usize = 100;

/// The exception service.
#[derive(Debug, Clone)]
pub struct ExceptionService {
    state: Arc<ServerState>,
    auth: Authorizer,
}

impl ExceptionService {
    /// A service over `state`.
    pub fn new(state: Arc<ServerState>) -> Self {
        let auth = Authorizer::new(Arc::clone(&state));
        Self { state, auth }
    }

    /// The tonic service.
    pub fn into_server(self) -> ExceptionServiceServer<Self> {
        ExceptionServiceServer::new(self)
    }

    /// Asks the policy (if any) about `exception` as it would be after `operation`.
    fn judge(
        &self,
        exception: &Exception,
        operation: &str,
        caller: &Caller,
    ) -> Result<(), ApiError> {
        let Some(policy) = self.state.judge.policy() else {
            return Ok(());
        };
        let input = ExceptionInput {
            operation: operation.to_owned(),
            now: unix_seconds(self.state.now()),
            caller: Some(caller_input(caller)),
            exception: exception.view(),
        };
        let violations = policy
            .current()
            .evaluate_exception(&input)
            .map_err(|e| ApiError::Internal(format!("the policy failed to evaluate: {e}")))?;
        if violations.is_empty() {
            Ok(())
        } else {
            Err(ApiError::InvalidArgument(format!(
                "exception violates policy: {}",
                describe_violations(&violations)
            )))
        }
    }

    /// Applies a committed change to the decisions issuance relies on, and audits it.
    async fn changed(&self, caller: &Caller, action: &str, exception: &Exception, why: &str) {
        if let Err(error) = self.state.reload_exceptions().await {
            tracing::error!(%error, "reloading exceptions failed; the change applies at the next reload");
        }
        self.state.audit.record(
            &caller.describe(),
            action,
            serde_json::json!({
                "exception_id": exception.id,
                "owner": exception.owner,
                "reason": why,
                "ticket": exception.ticket,
                "rules": exception.rules,
                "entry_ids": exception.entry_ids,
                "spiffe_id_pattern": exception.spiffe_id_pattern,
                "expires_at": unix_seconds(exception.expires_at),
                "revoked_at": exception.revoked_at.map(unix_seconds),
            }),
        );
    }

    async fn load(&self, id: &str) -> Result<Exception, ApiError> {
        if id.is_empty() {
            return Err(ApiError::InvalidArgument("missing exception ID".to_owned()));
        }
        self.state
            .store
            .get_exception(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("exception {id:?} not found")))
    }

    /// The exception `id`, which must still be in force (`FailedPrecondition` naming it with
    /// `refusal` otherwise).
    async fn load_active(&self, id: &str, refusal: &str) -> Result<Exception, ApiError> {
        let exception = self.load(id).await?;
        if !exception.is_active(self.state.now()) {
            return Err(ApiError::FailedPrecondition(format!(
                "exception {:?} {refusal}",
                exception.id
            )));
        }
        Ok(exception)
    }

    /// Stores a changed exception, then applies and audits the change.
    async fn store_change(
        &self,
        caller: &Caller,
        action: &str,
        exception: Exception,
        why: &str,
    ) -> Result<Exception, ApiError> {
        let _audited = self.state.audit.guard();
        // Written only over the revision it was read at: a change in between is a conflict.
        let stored = self.state.store.update_exception(exception).await.map_err(
            |error| match error {
                DatastoreError::Conflict(message) => ApiError::Aborted(format!(
                    "{message}; it was changed while this request was handled, nothing was written"
                )),
                other => ApiError::Datastore(other),
            },
        )?;
        self.changed(caller, action, &stored, why).await;
        Ok(stored)
    }

    fn parse_new(&self, proto: &PolicyException, caller: &Caller) -> Result<Exception, ApiError> {
        let now = self.state.now();
        let owner = required_text("owner", &proto.owner, MAX_OWNER_LEN)?;
        let reason = required_text("reason", &proto.reason, MAX_REASON_LEN)?;
        let ticket = optional_text("ticket", &proto.ticket, MAX_OWNER_LEN)?;
        let rules: BTreeSet<String> = proto.rules.iter().map(|r| r.trim().to_owned()).collect();
        if rules.is_empty() || rules.iter().any(String::is_empty) {
            return invalid("an exception waives at least one rule, each named");
        }
        if rules.len() > MAX_ITEMS || proto.entry_ids.len() > MAX_ITEMS {
            return invalid(format!(
                "at most {MAX_ITEMS} rules and {MAX_ITEMS} entry IDs"
            ));
        }
        let mut entry_ids = BTreeSet::new();
        for id in &proto.entry_ids {
            let id = EntryId::new(id).map_err(|e| invalid_arg(format!("entry ID {id:?}: {e}")))?;
            entry_ids.insert(id.as_str().to_owned());
        }
        let pattern = optional_text("spiffe_id_pattern", &proto.spiffe_id_pattern, 2048)?;
        if let Some(pattern) = &pattern {
            check_pattern(pattern, self.state.trust_domain())?;
        }
        if entry_ids.is_empty() && pattern.is_none() {
            return invalid("an exception needs a scope: entry IDs or a SPIFFE ID pattern");
        }
        let expires_at = from_unix(proto.expires_at)?;
        if expires_at <= now {
            return invalid("expires_at must be in the future");
        }
        Ok(Exception {
            id: EntryId::generate().as_str().to_owned(),
            owner,
            reason,
            ticket,
            rules,
            entry_ids,
            spiffe_id_pattern: pattern,
            expires_at,
            created_at: now,
            created_by: caller.describe(),
            revoked_at: None,
            revision: 0,
        })
    }
}

#[tonic::async_trait]
impl ExceptionRpc for ExceptionService {
    async fn create_exception(
        &self,
        request: Request<CreateExceptionRequest>,
    ) -> Result<Response<PolicyException>, Status> {
        let caller = self.auth.admin(&request, CREATE_EXCEPTION)?;
        let proto = request
            .into_inner()
            .exception
            .ok_or_else(|| Status::invalid_argument("missing exception"))?;
        let exception = self.parse_new(&proto, &caller)?;
        self.judge(&exception, "create", &caller)?;
        let _audited = self.state.audit.guard();
        let stored = self
            .state
            .store
            .create_exception(exception)
            .await
            .map_err(ApiError::from)?;
        let why = stored.reason.clone();
        self.changed(&caller, "exception created", &stored, &why)
            .await;
        Ok(Response::new(exception_to_proto(&stored)))
    }

    async fn get_exception(
        &self,
        request: Request<GetExceptionRequest>,
    ) -> Result<Response<PolicyException>, Status> {
        self.auth.admin(&request, GET_EXCEPTION)?;
        let exception = self.load(&request.into_inner().id).await?;
        Ok(Response::new(exception_to_proto(&exception)))
    }

    async fn list_exceptions(
        &self,
        request: Request<ListExceptionsRequest>,
    ) -> Result<Response<ListExceptionsResponse>, Status> {
        self.auth.admin(&request, LIST_EXCEPTIONS)?;
        let request = request.into_inner();
        let page = requested_page(request.page_size, &request.page_token);
        let now = self.state.now();
        let mut exceptions: Vec<Exception> = self
            .state
            .store
            .list_exceptions()
            .await
            .map_err(ApiError::from)?
            .into_iter()
            .filter(|exception| request.include_inactive || exception.is_active(now))
            .collect();
        exceptions.sort_by(|a, b| a.id.cmp(&b.id));
        let (exceptions, next) = page_of(exceptions, |e| e.id.as_str(), page.as_ref());
        Ok(Response::new(ListExceptionsResponse {
            exceptions: exceptions.iter().map(exception_to_proto).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn extend_exception(
        &self,
        request: Request<ExtendExceptionRequest>,
    ) -> Result<Response<PolicyException>, Status> {
        let caller = self.auth.admin(&request, EXTEND_EXCEPTION)?;
        let request = request.into_inner();
        let why = required_text("reason", &request.reason, MAX_REASON_LEN)?;
        let mut exception = self
            .load_active(&request.id, "is no longer active; create a new one")
            .await?;
        check_revision(&exception, request.expected_revision)?;
        let expires_at = from_unix(request.expires_at)?;
        if expires_at <= exception.expires_at {
            return Err(
                invalid_arg("the new expires_at must be later than the current one").into_status(),
            );
        }
        exception.expires_at = expires_at;
        self.judge(&exception, "extend", &caller)?;
        let stored = self
            .store_change(&caller, "exception extended", exception, &why)
            .await?;
        Ok(Response::new(exception_to_proto(&stored)))
    }

    async fn revoke_exception(
        &self,
        request: Request<RevokeExceptionRequest>,
    ) -> Result<Response<PolicyException>, Status> {
        let caller = self.auth.admin(&request, REVOKE_EXCEPTION)?;
        let request = request.into_inner();
        let why = required_text("reason", &request.reason, MAX_REASON_LEN)?;
        let mut exception = self
            .load_active(&request.id, "is already revoked or expired")
            .await?;
        check_revision(&exception, request.expected_revision)?;
        exception.revoked_at = Some(self.state.now());
        let stored = self
            .store_change(&caller, "exception revoked", exception, &why)
            .await?;
        Ok(Response::new(exception_to_proto(&stored)))
    }
}

/// Refuses a change conditional on a revision (`expected`) the exception has left.
fn check_revision(exception: &Exception, expected: Option<i64>) -> Result<(), ApiError> {
    if let Some(expected) = expected
        && expected != exception.revision
    {
        return Err(ApiError::Aborted(format!(
            "exception {:?} was changed since revision {expected} was read (it is at revision {}); nothing was written",
            exception.id, exception.revision
        )));
    }
    Ok(())
}

/// A SPIFFE ID pattern: an ID of the trust domain, or one followed by `/*`.
fn check_pattern(pattern: &str, trust_domain: &lanyard_core::TrustDomain) -> Result<(), ApiError> {
    let id = pattern.strip_suffix("/*").unwrap_or(pattern);
    let id: SpiffeId = id
        .parse()
        .map_err(|e| invalid_arg(format!("spiffe_id_pattern {pattern:?}: {e}")))?;
    if !id.is_member_of(trust_domain) {
        return invalid(format!(
            "spiffe_id_pattern {pattern:?} is not in trust domain {trust_domain}"
        ));
    }
    Ok(())
}

/// An exception's `expires_at`: a positive Unix time no later than entries may expire.
fn from_unix(seconds: i64) -> Result<SystemTime, ApiError> {
    let expires_at = u64::try_from(seconds)
        .ok()
        .filter(|s| *s > 0)
        .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .ok_or_else(|| invalid_arg("expires_at must be a positive Unix time"))?;
    validate_expiry(expires_at).map_err(|e| invalid_arg(e.to_string()))?;
    Ok(expires_at)
}

fn required_text(field: &str, value: &str, max: usize) -> Result<String, ApiError> {
    optional_text(field, value, max)?.ok_or_else(|| invalid_arg(format!("missing {field}")))
}

fn optional_text(field: &str, value: &str, max: usize) -> Result<Option<String>, ApiError> {
    let value = value.trim();
    if value.len() > max {
        return invalid(format!("{field} is longer than {max} bytes"));
    }
    if value.chars().any(char::is_control) {
        return invalid(format!("{field} contains control characters"));
    }
    Ok(Some(value.to_owned()).filter(|v| !v.is_empty()))
}

fn invalid_arg(message: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument(message.into())
}

fn invalid<T>(message: impl Into<String>) -> Result<T, ApiError> {
    Err(invalid_arg(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expiry_a_certificate_cannot_hold_is_refused() {
        // 9999-12-31T23:59:59Z is the last; 10000-01-01T00:00:00Z and beyond are refused.
        assert!(from_unix(253_402_300_799).is_ok());
        for seconds in [253_402_300_800, i64::MAX] {
            let err = from_unix(seconds).expect_err("beyond year 9999");
            assert!(err.to_string().contains("9999-12-31T23:59:59Z"), "{err}");
        }
        for seconds in [0, -1, i64::MIN] {
            assert!(from_unix(seconds).is_err(), "{seconds}");
        }
    }
}
