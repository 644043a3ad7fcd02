//! SPIRE's TrustDomain service (`spire.api.server.trustdomain.v1.TrustDomain`): federation
//! relationships with foreign trust domains, for admins, with SPIRE v1.13's rules and texts.
//!
//! Writes go through [`RelationshipWriter`] (audited, in the change log). As in SPIRE, a
//! relationship in a create or an update is checked whole, whatever the update's input mask
//! leaves out; a bundle given with it becomes the trust domain's federated bundle; deleting a
//! relationship keeps that bundle; reads carry the bundle as stored now. Two answers differ
//! from SPIRE's in code only, not in meaning: a duplicate is `AlreadyExists` (SPIRE passes on
//! its SQL error as `Internal`) and an update of a trust domain without a relationship is
//! `NotFound` with SPIRE's text (SPIRE: `Internal`). `RefreshBundle` returns once the refresh
//! is asked for ([`crate::relationships::BundleRefresh`]); SPIRE's returns after the fetch.

use std::sync::Arc;

use lanyard_core::TrustDomain;
use lanyard_proto::convert::{
    federation_relationship_from_proto, federation_relationship_to_proto,
    relationship_mask_from_proto,
};
use lanyard_proto::spire::api::server::trustdomain::v1 as pb;
use lanyard_proto::spire::api::server::trustdomain::v1::trust_domain_server::{
    TrustDomain as TrustDomainApi, TrustDomainServer,
};
use lanyard_proto::spire::api::types;
use tonic::{Request, Response, Status};

use super::errors::ok_status;
use super::paging::requested_page;
use super::{ApiError, Authorizer, Caller, MAX_ENTRIES_PER_BATCH};
use crate::relationships::RelationshipWriter;
use crate::state::ServerState;

const SERVICE: &str = "/spire.api.server.trustdomain.v1.TrustDomain/";

/// The TrustDomain service.
#[derive(Debug, Clone)]
pub struct TrustDomainService {
    state: Arc<ServerState>,
    auth: Authorizer,
    writer: RelationshipWriter,
}

impl TrustDomainService {
    /// A service over `state`'s datastore.
    pub fn new(state: Arc<ServerState>) -> Self {
        let auth = Authorizer::new(Arc::clone(&state));
        let writer = RelationshipWriter::new(Arc::clone(&state));
        Self {
            state,
            auth,
            writer,
        }
    }

    /// The tonic service.
    pub fn into_server(self) -> TrustDomainServer<Self> {
        TrustDomainServer::new(self)
    }

    fn admin<T>(&self, request: &Request<T>, method: &str) -> Result<Caller, Status> {
        self.auth.admin(request, &format!("{SERVICE}{method}"))
    }

    async fn create(
        &self,
        caller: &Caller,
        relationship: &types::FederationRelationship,
        output_mask: Option<&types::FederationRelationshipMask>,
    ) -> Result<types::FederationRelationship, ApiError> {
        let relationship = federation_relationship_from_proto(relationship).map_err(|e| {
            ApiError::InvalidArgument(format!("failed to convert federation relationship: {e}"))
        })?;
        let created = self
            .writer
            .create(
                caller,
                relationship,
                &format!("{SERVICE}BatchCreateFederationRelationship"),
            )
            .await?;
        tracing::info!(trust_domain = %created.trust_domain(), "federation relationship created");
        Ok(federation_relationship_to_proto(&created, output_mask))
    }

    async fn update(
        &self,
        caller: &Caller,
        update: &types::FederationRelationship,
        input_mask: Option<&types::FederationRelationshipMask>,
        output_mask: Option<&types::FederationRelationshipMask>,
    ) -> Result<types::FederationRelationship, ApiError> {
        let update = federation_relationship_from_proto(update).map_err(|e| {
            ApiError::InvalidArgument(format!("failed to convert federation relationship: {e}"))
        })?;
        let updated = self
            .writer
            .update(
                caller,
                update,
                relationship_mask_from_proto(input_mask),
                &format!("{SERVICE}BatchUpdateFederationRelationship"),
            )
            .await?;
        tracing::info!(trust_domain = %updated.trust_domain(), "federation relationship updated");
        Ok(federation_relationship_to_proto(&updated, output_mask))
    }

    async fn delete(&self, caller: &Caller, trust_domain: &str) -> Result<String, ApiError> {
        if trust_domain.is_empty() {
            return Err(ApiError::InvalidArgument("missing trust domain".to_owned()));
        }
        let trust_domain = parse_trust_domain(trust_domain)?;
        let deleted = self
            .writer
            .delete(
                caller,
                &trust_domain,
                &format!("{SERVICE}BatchDeleteFederationRelationship"),
            )
            .await?;
        tracing::info!(trust_domain = %deleted.trust_domain(), "federation relationship deleted");
        Ok(trust_domain.name().to_owned())
    }
}

/// A trust domain named in a request, bare or in `spiffe://` form, as go-spiffe's
/// `TrustDomainFromString` takes it.
fn parse_trust_domain(value: &str) -> Result<TrustDomain, ApiError> {
    value
        .parse()
        .map_err(|e| ApiError::InvalidArgument(format!("failed to parse trust domain: {e}")))
}

/// Refuses a batch of more than [`MAX_ENTRIES_PER_BATCH`] relationships, before any is
/// applied.
fn check_batch(len: usize) -> Result<(), Status> {
    if len > MAX_ENTRIES_PER_BATCH {
        return Err(Status::invalid_argument(format!(
            "{len} federation relationships in one call; the limit is {MAX_ENTRIES_PER_BATCH}"
        )));
    }
    Ok(())
}

/// A batch item's status and, when it succeeded, its relationship.
fn split(
    result: Result<types::FederationRelationship, ApiError>,
) -> (Option<types::Status>, Option<types::FederationRelationship>) {
    match result {
        Ok(relationship) => (Some(ok_status()), Some(relationship)),
        Err(error) => (Some(error.to_proto_status()), None),
    }
}

#[tonic::async_trait]
impl TrustDomainApi for TrustDomainService {
    async fn list_federation_relationships(
        &self,
        request: Request<pb::ListFederationRelationshipsRequest>,
    ) -> Result<Response<pb::ListFederationRelationshipsResponse>, Status> {
        self.admin(&request, "ListFederationRelationships")?;
        let request = request.into_inner();
        // A page size of zero (SPIRE's CLI sends none) lists everything, as in SPIRE.
        let page = requested_page(request.page_size, &request.page_token);
        let (relationships, next) = self
            .state
            .store
            .list_federation_relationships(page)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ListFederationRelationshipsResponse {
            federation_relationships: relationships
                .iter()
                .map(|r| federation_relationship_to_proto(r, request.output_mask.as_ref()))
                .collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_federation_relationship(
        &self,
        request: Request<pb::GetFederationRelationshipRequest>,
    ) -> Result<Response<types::FederationRelationship>, Status> {
        self.admin(&request, "GetFederationRelationship")?;
        let request = request.into_inner();
        let trust_domain = parse_trust_domain(&request.trust_domain)?;
        let relationship = self
            .state
            .store
            .get_federation_relationship(&trust_domain)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| {
                ApiError::NotFound(super::errors::RELATIONSHIP_DOES_NOT_EXIST.to_owned())
            })?;
        Ok(Response::new(federation_relationship_to_proto(
            &relationship,
            request.output_mask.as_ref(),
        )))
    }

    async fn batch_create_federation_relationship(
        &self,
        request: Request<pb::BatchCreateFederationRelationshipRequest>,
    ) -> Result<Response<pb::BatchCreateFederationRelationshipResponse>, Status> {
        let caller = self.admin(&request, "BatchCreateFederationRelationship")?;
        let request = request.into_inner();
        check_batch(request.federation_relationships.len())?;
        let mut results = Vec::with_capacity(request.federation_relationships.len());
        for relationship in &request.federation_relationships {
            let result = self
                .create(&caller, relationship, request.output_mask.as_ref())
                .await;
            let (status, federation_relationship) = split(result);
            results.push(pb::batch_create_federation_relationship_response::Result {
                status,
                federation_relationship,
            });
        }
        Ok(Response::new(
            pb::BatchCreateFederationRelationshipResponse { results },
        ))
    }

    async fn batch_update_federation_relationship(
        &self,
        request: Request<pb::BatchUpdateFederationRelationshipRequest>,
    ) -> Result<Response<pb::BatchUpdateFederationRelationshipResponse>, Status> {
        let caller = self.admin(&request, "BatchUpdateFederationRelationship")?;
        let request = request.into_inner();
        check_batch(request.federation_relationships.len())?;
        let mut results = Vec::with_capacity(request.federation_relationships.len());
        for relationship in &request.federation_relationships {
            let result = self
                .update(
                    &caller,
                    relationship,
                    request.input_mask.as_ref(),
                    request.output_mask.as_ref(),
                )
                .await;
            let (status, federation_relationship) = split(result);
            results.push(pb::batch_update_federation_relationship_response::Result {
                status,
                federation_relationship,
            });
        }
        Ok(Response::new(
            pb::BatchUpdateFederationRelationshipResponse { results },
        ))
    }

    async fn batch_delete_federation_relationship(
        &self,
        request: Request<pb::BatchDeleteFederationRelationshipRequest>,
    ) -> Result<Response<pb::BatchDeleteFederationRelationshipResponse>, Status> {
        let caller = self.admin(&request, "BatchDeleteFederationRelationship")?;
        let request = request.into_inner();
        check_batch(request.trust_domains.len())?;
        let mut results = Vec::with_capacity(request.trust_domains.len());
        for trust_domain in &request.trust_domains {
            let result = match self.delete(&caller, trust_domain).await {
                Ok(name) => pb::batch_delete_federation_relationship_response::Result {
                    status: Some(ok_status()),
                    trust_domain: name,
                },
                Err(error) => pb::batch_delete_federation_relationship_response::Result {
                    status: Some(error.to_proto_status()),
                    // SPIRE names the trust domain as parsed when it parsed.
                    trust_domain: trust_domain
                        .parse::<TrustDomain>()
                        .map_or_else(|_| trust_domain.clone(), |td| td.name().to_owned()),
                },
            };
            results.push(result);
        }
        Ok(Response::new(
            pb::BatchDeleteFederationRelationshipResponse { results },
        ))
    }

    async fn refresh_bundle(
        &self,
        request: Request<pb::RefreshBundleRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = self.admin(&request, "RefreshBundle")?;
        let trust_domain = parse_trust_domain(&request.get_ref().trust_domain)?;
        self.writer
            .request_refresh(&caller, &trust_domain, &format!("{SERVICE}RefreshBundle"))
            .await
            .map_err(ApiError::from)?;
        tracing::info!(%trust_domain, "bundle refresh requested");
        Ok(Response::new(()))
    }
}
