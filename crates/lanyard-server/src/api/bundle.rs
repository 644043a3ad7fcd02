//! SPIRE's Bundle service (`spire.api.server.bundle.v1.Bundle`): the trust domain's own bundle
//! and the federated bundles of foreign trust domains.
//!
//! The own bundle is owned by the CA manager; edits go through [`CaManager::edit_bundle`] so
//! that they cannot race a rotation. Federated bundles live in the datastore's bundle table,
//! keyed by trust domain; no federated-bundle RPC ever reads or writes the own trust domain's.
//!
//! [`CaManager::edit_bundle`]: crate::ca::CaManager::edit_bundle

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use lanyard_core::bundle::{BundleError, JwtAuthority, X509Authority};
use lanyard_core::{TrustBundle, TrustDomain};
use lanyard_proto::convert::{
    bundle_from_proto, bundle_mask_all, bundle_to_proto_masked, trust_domain_from_proto,
};
use lanyard_proto::spire::api::server::bundle::v1::batch_delete_federated_bundle_request::Mode;
use lanyard_proto::spire::api::server::bundle::v1::bundle_server::Bundle;
use lanyard_proto::spire::api::server::bundle::v1::{
    AppendBundleRequest, BatchCreateFederatedBundleRequest, BatchCreateFederatedBundleResponse,
    BatchDeleteFederatedBundleRequest, BatchDeleteFederatedBundleResponse,
    BatchSetFederatedBundleRequest, BatchSetFederatedBundleResponse,
    BatchUpdateFederatedBundleRequest, BatchUpdateFederatedBundleResponse, CountBundlesRequest,
    CountBundlesResponse, GetBundleRequest, GetFederatedBundleRequest, ListFederatedBundlesRequest,
    ListFederatedBundlesResponse, PublishJwtAuthorityRequest, PublishJwtAuthorityResponse,
    batch_create_federated_bundle_response, batch_delete_federated_bundle_response,
    batch_set_federated_bundle_response, batch_update_federated_bundle_response,
};
use lanyard_proto::spire::api::types;
use tonic::{Request, Response, Status};

use super::errors::ok_status;
use super::paging::requested_page;
use super::{ApiError, Authorizer};
use crate::ca::CaError;
use crate::datastore::{BundleDeleteMode, DatastoreError};
use crate::state::ServerState;

const COUNT_BUNDLES: &str = "/spire.api.server.bundle.v1.Bundle/CountBundles";
const APPEND_BUNDLE: &str = "/spire.api.server.bundle.v1.Bundle/AppendBundle";
const PUBLISH_JWT_AUTHORITY: &str = "/spire.api.server.bundle.v1.Bundle/PublishJWTAuthority";
const LIST_FEDERATED_BUNDLES: &str = "/spire.api.server.bundle.v1.Bundle/ListFederatedBundles";
const GET_FEDERATED_BUNDLE: &str = "/spire.api.server.bundle.v1.Bundle/GetFederatedBundle";
const BATCH_CREATE_FEDERATED_BUNDLE: &str =
    "/spire.api.server.bundle.v1.Bundle/BatchCreateFederatedBundle";
const BATCH_UPDATE_FEDERATED_BUNDLE: &str =
    "/spire.api.server.bundle.v1.Bundle/BatchUpdateFederatedBundle";
const BATCH_SET_FEDERATED_BUNDLE: &str =
    "/spire.api.server.bundle.v1.Bundle/BatchSetFederatedBundle";
const BATCH_DELETE_FEDERATED_BUNDLE: &str =
    "/spire.api.server.bundle.v1.Bundle/BatchDeleteFederatedBundle";

/// The Bundle service.
#[derive(Debug, Clone)]
pub struct BundleService {
    state: Arc<ServerState>,
    auth: Authorizer,
}

impl BundleService {
    /// One audit record for a bundle change, naming the caller and the method.
    fn audit(&self, caller: &super::Caller, method: &str) {
        self.state.audit.record(
            &caller.describe(),
            "bundle changed",
            serde_json::json!({"method": method}),
        );
    }

    /// A service over `state`'s CA manager and datastore.
    pub fn new(state: Arc<ServerState>) -> Self {
        let auth = Authorizer::new(Arc::clone(&state));
        Self { state, auth }
    }

    /// The trust domain in a federated-bundle request, refusing our own (`own_td_message`).
    fn foreign_trust_domain(
        &self,
        value: &str,
        own_td_message: &str,
    ) -> Result<TrustDomain, ApiError> {
        let trust_domain = trust_domain_from_proto("trust_domain", value)
            .map_err(|e| invalid(format!("trust domain argument is not valid: {e}")))?;
        if &trust_domain == self.state.trust_domain() {
            return Err(invalid(own_td_message));
        }
        Ok(trust_domain)
    }

    async fn create_federated_bundle(
        &self,
        bundle: &types::Bundle,
        mask: Option<&types::BundleMask>,
    ) -> Result<types::Bundle, ApiError> {
        self.foreign_trust_domain(
            &bundle.trust_domain,
            "creating a federated bundle for the server's own trust domain is not allowed",
        )?;
        let bundle = bundle_from_proto(bundle)
            .map_err(|e| invalid(format!("failed to convert bundle: {e}")))?;
        let created = self
            .state
            .store
            .create_bundle(bundle)
            .await
            .map_err(|e| match e {
                DatastoreError::AlreadyExists { .. } => {
                    ApiError::AlreadyExists("bundle already exists".to_owned())
                }
                other => ApiError::from(other),
            })?;
        tracing::info!(trust_domain = %created.trust_domain(), "federated bundle created");
        Ok(bundle_to_proto_masked(&created, mask))
    }

    async fn update_federated_bundle(
        &self,
        update: &types::Bundle,
        input_mask: &types::BundleMask,
        output_mask: Option<&types::BundleMask>,
    ) -> Result<types::Bundle, ApiError> {
        let trust_domain = self.foreign_trust_domain(
            &update.trust_domain,
            "updating a federated bundle for the server's own trust domain is not allowed",
        )?;
        // Fields outside the input mask are neither read nor validated, as in SPIRE.
        let mut masked = types::Bundle {
            trust_domain: update.trust_domain.clone(),
            ..types::Bundle::default()
        };
        if input_mask.x509_authorities {
            masked.x509_authorities.clone_from(&update.x509_authorities);
        }
        if input_mask.jwt_authorities {
            masked.jwt_authorities.clone_from(&update.jwt_authorities);
        }
        if input_mask.refresh_hint {
            masked.refresh_hint = update.refresh_hint;
        }
        if input_mask.sequence_number {
            masked.sequence_number = update.sequence_number;
        }
        let update = bundle_from_proto(&masked)
            .map_err(|e| invalid(format!("failed to convert bundle: {e}")))?;
        let stored = self
            .state
            .store
            .get_bundle(&trust_domain)
            .await?
            .ok_or_else(|| ApiError::NotFound("bundle not found".to_owned()))?;

        let pick = |in_mask: bool| if in_mask { &update } else { &stored };
        let mut merged = TrustBundle::new(trust_domain);
        for authority in pick(input_mask.x509_authorities).x509_authorities() {
            merged.add_x509_authority(authority.clone());
        }
        for authority in pick(input_mask.jwt_authorities).jwt_authorities() {
            merged
                .add_jwt_authority(authority.clone())
                .map_err(|e| invalid(format!("failed to convert bundle: {e}")))?;
        }
        merged.set_refresh_hint(pick(input_mask.refresh_hint).refresh_hint());
        merged.set_sequence_number(pick(input_mask.sequence_number).sequence_number());

        let updated = self
            .state
            .store
            .update_bundle(merged)
            .await
            .map_err(|e| match e {
                DatastoreError::NotFound(_) => ApiError::NotFound("bundle not found".to_owned()),
                other => ApiError::from(other),
            })?;
        tracing::info!(trust_domain = %updated.trust_domain(), "federated bundle updated");
        Ok(bundle_to_proto_masked(&updated, output_mask))
    }

    async fn set_federated_bundle(
        &self,
        bundle: &types::Bundle,
        mask: Option<&types::BundleMask>,
    ) -> Result<types::Bundle, ApiError> {
        self.foreign_trust_domain(
            &bundle.trust_domain,
            "setting a federated bundle for the server's own trust domain is not allowed",
        )?;
        let bundle = bundle_from_proto(bundle)
            .map_err(|e| invalid(format!("failed to convert bundle: {e}")))?;
        let stored = self.state.store.set_bundle(bundle).await?;
        tracing::info!(trust_domain = %stored.trust_domain(), "federated bundle set");
        Ok(bundle_to_proto_masked(&stored, mask))
    }

    async fn delete_federated_bundle(
        &self,
        trust_domain: &str,
        mode: BundleDeleteMode,
    ) -> Result<String, ApiError> {
        let trust_domain = trust_domain_from_proto("trust_domain", trust_domain)
            .map_err(|e| invalid(format!("malformed trust domain: {e}")))?;
        if &trust_domain == self.state.trust_domain() {
            return Err(invalid(
                "removing the bundle for the server trust domain is not allowed",
            ));
        }
        self.state
            .store
            .delete_bundle(&trust_domain, mode)
            .await
            .map_err(|e| match e {
                DatastoreError::NotFound(_) => ApiError::NotFound("no such bundle".to_owned()),
                other => ApiError::from(other),
            })?;
        // The entries it deleted or dissociated reach the index through the change log.
        self.state.written().await;
        tracing::info!(trust_domain = %trust_domain, ?mode, "federated bundle deleted");
        Ok(trust_domain.name().to_owned())
    }

    /// Adds authorities to the own bundle through the CA manager. A key ID already naming a
    /// different key is the caller's error, not ours.
    async fn append_authorities(
        &self,
        x509: Vec<X509Authority>,
        jwt: Vec<JwtAuthority>,
    ) -> Result<Arc<TrustBundle>, ApiError> {
        let mut conflict: Option<BundleError> = None;
        let conflict_slot = &mut conflict;
        let result = self
            .state
            .ca
            .edit_bundle(move |bundle| {
                for authority in x509 {
                    bundle.add_x509_authority(authority);
                }
                for authority in jwt {
                    if let Err(error) = bundle.add_jwt_authority(authority) {
                        let message = error.to_string();
                        *conflict_slot = Some(error);
                        return Err(CaError::FailedPrecondition(message));
                    }
                }
                Ok(())
            })
            .await;
        match (result, conflict) {
            (Ok(bundle), _) => Ok(bundle),
            (Err(_), Some(conflict)) => Err(invalid(format!(
                "failed to convert JWT authority: {conflict}"
            ))),
            (Err(error), None) => Err(ApiError::from(error)),
        }
    }
}

#[tonic::async_trait]
impl Bundle for BundleService {
    async fn count_bundles(
        &self,
        request: Request<CountBundlesRequest>,
    ) -> Result<Response<CountBundlesResponse>, Status> {
        self.auth.admin(&request, COUNT_BUNDLES)?;
        let count = self
            .state
            .store
            .count_bundles()
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(CountBundlesResponse {
            count: i32::try_from(count).unwrap_or(i32::MAX),
        }))
    }

    async fn get_bundle(
        &self,
        request: Request<GetBundleRequest>,
    ) -> Result<Response<types::Bundle>, Status> {
        // Open to anyone: agents fetch it before they have an SVID.
        let bundle = self
            .state
            .ca
            .bundle()
            .ok_or_else(|| ApiError::NotFound("bundle not found".to_owned()))?;
        Ok(Response::new(bundle_to_proto_masked(
            &bundle,
            request.get_ref().output_mask.as_ref(),
        )))
    }

    async fn append_bundle(
        &self,
        request: Request<AppendBundleRequest>,
    ) -> Result<Response<types::Bundle>, Status> {
        let caller = self.auth.admin(&request, APPEND_BUNDLE)?;
        let _audited = self.state.audit.guard();
        let request = request.into_inner();
        if request.x509_authorities.is_empty() && request.jwt_authorities.is_empty() {
            return Err(invalid("no authorities to append").into());
        }
        let x509 = request
            .x509_authorities
            .iter()
            .map(|authority| {
                X509Authority::new(authority.asn1.clone())
                    .map_err(|e| invalid(format!("failed to convert X.509 authority: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let jwt = request
            .jwt_authorities
            .iter()
            .map(|authority| {
                jwt_authority_from_proto(authority)
                    .map_err(|e| invalid(format!("failed to convert JWT authority: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bundle = self.append_authorities(x509, jwt).await?;
        tracing::info!(
            n_x509_authorities = request.x509_authorities.len(),
            n_jwt_authorities = request.jwt_authorities.len(),
            sequence_number = bundle.sequence_number(),
            "authorities appended to the bundle"
        );
        self.audit(&caller, APPEND_BUNDLE);
        Ok(Response::new(bundle_to_proto_masked(
            &bundle,
            request.output_mask.as_ref(),
        )))
    }

    async fn publish_jwt_authority(
        &self,
        request: Request<PublishJwtAuthorityRequest>,
    ) -> Result<Response<PublishJwtAuthorityResponse>, Status> {
        let caller = self.auth.downstream(&request, PUBLISH_JWT_AUTHORITY)?;
        let _audited = self.state.audit.guard();
        let authority = request
            .get_ref()
            .jwt_authority
            .as_ref()
            .ok_or_else(|| invalid("missing JWT authority"))?;
        let authority = jwt_authority_from_proto(authority)
            .map_err(|e| invalid(format!("invalid JWT authority: {e}")))?;
        let key_id = authority.key_id().to_owned();
        let bundle = self.append_authorities(Vec::new(), vec![authority]).await?;
        tracing::info!(caller = %caller.describe(), key_id, "JWT authority published");
        let jwt_authorities = bundle_to_proto_masked(
            &bundle,
            Some(&types::BundleMask {
                jwt_authorities: true,
                ..types::BundleMask::default()
            }),
        )
        .jwt_authorities;
        self.audit(&caller, PUBLISH_JWT_AUTHORITY);
        Ok(Response::new(PublishJwtAuthorityResponse {
            jwt_authorities,
        }))
    }

    async fn list_federated_bundles(
        &self,
        request: Request<ListFederatedBundlesRequest>,
    ) -> Result<Response<ListFederatedBundlesResponse>, Status> {
        self.auth.admin(&request, LIST_FEDERATED_BUNDLES)?;
        let request = request.into_inner();
        // A page size of zero (the SPIRE CLI sends none) lists everything, as in SPIRE.
        let page = requested_page(request.page_size, &request.page_token);
        let (bundles, next) = self
            .state
            .store
            .list_bundles(page)
            .await
            .map_err(ApiError::from)?;
        let own = self.state.trust_domain();
        let bundles = bundles
            .iter()
            .filter(|bundle| bundle.trust_domain() != own)
            .map(|bundle| bundle_to_proto_masked(bundle, request.output_mask.as_ref()))
            .collect();
        Ok(Response::new(ListFederatedBundlesResponse {
            bundles,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_federated_bundle(
        &self,
        request: Request<GetFederatedBundleRequest>,
    ) -> Result<Response<types::Bundle>, Status> {
        self.auth
            .agent_or_admin(&request, GET_FEDERATED_BUNDLE)
            .await?;
        let request = request.get_ref();
        let trust_domain = self.foreign_trust_domain(
            &request.trust_domain,
            "getting a federated bundle for the server's own trust domain is not allowed",
        )?;
        let bundle = self
            .state
            .store
            .get_bundle(&trust_domain)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound("bundle not found".to_owned()))?;
        Ok(Response::new(bundle_to_proto_masked(
            &bundle,
            request.output_mask.as_ref(),
        )))
    }

    async fn batch_create_federated_bundle(
        &self,
        request: Request<BatchCreateFederatedBundleRequest>,
    ) -> Result<Response<BatchCreateFederatedBundleResponse>, Status> {
        let caller = self.auth.admin(&request, BATCH_CREATE_FEDERATED_BUNDLE)?;
        let _audited = self.state.audit.guard();
        let request = request.into_inner();
        let mut results = Vec::with_capacity(request.bundle.len());
        for bundle in &request.bundle {
            let result = self
                .create_federated_bundle(bundle, request.output_mask.as_ref())
                .await;
            let (status, bundle) = split(result);
            results.push(batch_create_federated_bundle_response::Result { status, bundle });
        }
        self.audit(&caller, BATCH_CREATE_FEDERATED_BUNDLE);
        Ok(Response::new(BatchCreateFederatedBundleResponse {
            results,
        }))
    }

    async fn batch_update_federated_bundle(
        &self,
        request: Request<BatchUpdateFederatedBundleRequest>,
    ) -> Result<Response<BatchUpdateFederatedBundleResponse>, Status> {
        let caller = self.auth.admin(&request, BATCH_UPDATE_FEDERATED_BUNDLE)?;
        let _audited = self.state.audit.guard();
        let request = request.into_inner();
        let input_mask = request.input_mask.unwrap_or_else(bundle_mask_all);
        let mut results = Vec::with_capacity(request.bundle.len());
        for bundle in &request.bundle {
            let result = self
                .update_federated_bundle(bundle, &input_mask, request.output_mask.as_ref())
                .await;
            let (status, bundle) = split(result);
            results.push(batch_update_federated_bundle_response::Result { status, bundle });
        }
        self.audit(&caller, BATCH_UPDATE_FEDERATED_BUNDLE);
        Ok(Response::new(BatchUpdateFederatedBundleResponse {
            results,
        }))
    }

    async fn batch_set_federated_bundle(
        &self,
        request: Request<BatchSetFederatedBundleRequest>,
    ) -> Result<Response<BatchSetFederatedBundleResponse>, Status> {
        let caller = self.auth.admin(&request, BATCH_SET_FEDERATED_BUNDLE)?;
        let _audited = self.state.audit.guard();
        let request = request.into_inner();
        let mut results = Vec::with_capacity(request.bundle.len());
        for bundle in &request.bundle {
            let result = self
                .set_federated_bundle(bundle, request.output_mask.as_ref())
                .await;
            let (status, bundle) = split(result);
            results.push(batch_set_federated_bundle_response::Result { status, bundle });
        }
        self.audit(&caller, BATCH_SET_FEDERATED_BUNDLE);
        Ok(Response::new(BatchSetFederatedBundleResponse { results }))
    }

    async fn batch_delete_federated_bundle(
        &self,
        request: Request<BatchDeleteFederatedBundleRequest>,
    ) -> Result<Response<BatchDeleteFederatedBundleResponse>, Status> {
        let caller = self.auth.admin(&request, BATCH_DELETE_FEDERATED_BUNDLE)?;
        let _audited = self.state.audit.guard();
        let request = request.into_inner();
        let mode = match Mode::try_from(request.mode) {
            Ok(Mode::Restrict) => BundleDeleteMode::Restrict,
            Ok(Mode::Delete) => BundleDeleteMode::Delete,
            Ok(Mode::Dissociate) => BundleDeleteMode::Dissociate,
            Err(_) => {
                return Err(invalid(format!(
                    "failed to parse deletion mode: unknown mode {}",
                    request.mode
                ))
                .into());
            }
        };
        let mut results = Vec::with_capacity(request.trust_domains.len());
        for trust_domain in &request.trust_domains {
            let result = match self.delete_federated_bundle(trust_domain, mode).await {
                Ok(name) => batch_delete_federated_bundle_response::Result {
                    status: Some(ok_status()),
                    trust_domain: name,
                },
                Err(error) => batch_delete_federated_bundle_response::Result {
                    status: Some(error.to_proto_status()),
                    trust_domain: trust_domain.clone(),
                },
            };
            results.push(result);
        }
        self.audit(&caller, BATCH_DELETE_FEDERATED_BUNDLE);
        Ok(Response::new(BatchDeleteFederatedBundleResponse {
            results,
        }))
    }
}

/// A `JWTKey` message as a JWT authority; `expires_at` 0 means no expiry.
fn jwt_authority_from_proto(key: &types::JwtKey) -> Result<JwtAuthority, String> {
    let expires_at = match u64::try_from(key.expires_at) {
        Ok(0) => None,
        Ok(seconds) => Some(
            UNIX_EPOCH
                .checked_add(Duration::from_secs(seconds))
                .ok_or_else(|| format!("expires_at is out of range, got {seconds}"))?,
        ),
        Err(_) => {
            return Err(format!(
                "expires_at cannot be negative, got {}",
                key.expires_at
            ));
        }
    };
    JwtAuthority::new(key.key_id.clone(), &key.public_key, expires_at).map_err(|e| e.to_string())
}

/// A batch item's status and, when it succeeded, its bundle.
fn split(
    result: Result<types::Bundle, ApiError>,
) -> (Option<types::Status>, Option<types::Bundle>) {
    match result {
        Ok(bundle) => (Some(ok_status()), Some(bundle)),
        Err(error) => (Some(error.to_proto_status()), None),
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument(message.into())
}
