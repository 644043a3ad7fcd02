//! Federation relationships through SPIRE's TrustDomain API, as `lanyard-core`'s
//! [`FederationRelationship`].

use anyhow::{Context as _, bail};
use lanyard_core::{FederationRelationship, TrustDomain};
use lanyard_proto::convert::{
    federation_relationship_from_proto, federation_relationship_to_proto, ok_status,
};
use lanyard_proto::spire::api::server::trustdomain::v1 as pb;
use lanyard_proto::spire::api::types;

use super::{Admin, Page, list_all, rpc_error};

/// One item of a batch write: its status, and the relationship as stored when it succeeded.
pub(crate) type RelationshipResult = (types::Status, Option<FederationRelationship>);

impl Admin {
    /// Every federation relationship, page by page.
    pub(crate) async fn federation_relationships(
        &self,
    ) -> anyhow::Result<Vec<FederationRelationship>> {
        let relationships = list_all(|page_size, page_token| {
            let request = pb::ListFederationRelationshipsRequest {
                output_mask: None,
                page_size,
                page_token,
            };
            async move {
                let response = self
                    .trust_domain()
                    .list_federation_relationships(request)
                    .await
                    .map_err(|status| rpc_error("ListFederationRelationships failed", &status))?
                    .into_inner();
                Ok(Page {
                    items: response.federation_relationships,
                    next_page_token: response.next_page_token,
                })
            }
        })
        .await?;
        relationships.iter().map(read_relationship).collect()
    }

    /// The relationship with `trust_domain`.
    pub(crate) async fn federation_relationship(
        &self,
        trust_domain: &TrustDomain,
    ) -> anyhow::Result<FederationRelationship> {
        let relationship = self
            .trust_domain()
            .get_federation_relationship(pb::GetFederationRelationshipRequest {
                trust_domain: trust_domain.name().to_owned(),
                output_mask: None,
            })
            .await
            .map_err(|status| {
                rpc_error(
                    &format!("cannot show the federation relationship with {trust_domain}"),
                    &status,
                )
            })?
            .into_inner();
        read_relationship(&relationship)
    }

    /// Creates the relationships: one result each, in order.
    pub(crate) async fn create_federation_relationships(
        &self,
        relationships: &[FederationRelationship],
    ) -> anyhow::Result<Vec<RelationshipResult>> {
        let results = self
            .trust_domain()
            .batch_create_federation_relationship(pb::BatchCreateFederationRelationshipRequest {
                federation_relationships: to_proto(relationships),
                output_mask: None,
            })
            .await
            .map_err(|status| rpc_error("BatchCreateFederationRelationship failed", &status))?
            .into_inner()
            .results
            .into_iter()
            .map(|r| (r.status, r.federation_relationship))
            .collect();
        read_results(results, relationships.len())
    }

    /// Replaces the relationships (every field): one result each, in order.
    pub(crate) async fn update_federation_relationships(
        &self,
        relationships: &[FederationRelationship],
    ) -> anyhow::Result<Vec<RelationshipResult>> {
        let results = self
            .trust_domain()
            .batch_update_federation_relationship(pb::BatchUpdateFederationRelationshipRequest {
                federation_relationships: to_proto(relationships),
                input_mask: None,
                output_mask: None,
            })
            .await
            .map_err(|status| rpc_error("BatchUpdateFederationRelationship failed", &status))?
            .into_inner()
            .results
            .into_iter()
            .map(|r| (r.status, r.federation_relationship))
            .collect();
        read_results(results, relationships.len())
    }

    /// Deletes the relationship with `trust_domain`: the item's status.
    pub(crate) async fn delete_federation_relationship(
        &self,
        trust_domain: &TrustDomain,
    ) -> anyhow::Result<types::Status> {
        let result = self
            .trust_domain()
            .batch_delete_federation_relationship(pb::BatchDeleteFederationRelationshipRequest {
                trust_domains: vec![trust_domain.name().to_owned()],
            })
            .await
            .map_err(|status| rpc_error("BatchDeleteFederationRelationship failed", &status))?
            .into_inner()
            .results
            .into_iter()
            .next()
            .context("the server answered no result")?;
        Ok(result.status.unwrap_or_else(ok_status))
    }

    /// Asks the server to fetch the bundle of `trust_domain` from its endpoint now.
    pub(crate) async fn refresh_bundle(&self, trust_domain: &TrustDomain) -> anyhow::Result<()> {
        match self
            .trust_domain()
            .refresh_bundle(pb::RefreshBundleRequest {
                trust_domain: trust_domain.name().to_owned(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(status) if status.code() == tonic::Code::NotFound => {
                bail!("there is no federation relationship with trust domain {trust_domain}")
            }
            Err(status) => Err(rpc_error("RefreshBundle failed", &status)),
        }
    }
}

fn to_proto(relationships: &[FederationRelationship]) -> Vec<types::FederationRelationship> {
    relationships
        .iter()
        .map(|r| federation_relationship_to_proto(r, None))
        .collect()
}

fn read_results(
    results: Vec<(Option<types::Status>, Option<types::FederationRelationship>)>,
    sent: usize,
) -> anyhow::Result<Vec<RelationshipResult>> {
    if results.len() != sent {
        bail!(
            "the server answered {} results for {sent} federation relationships",
            results.len()
        );
    }
    results
        .into_iter()
        .map(|(status, stored)| {
            let status = status.unwrap_or_else(ok_status);
            let ok = status.code == tonic::Code::Ok as i32;
            let stored = match stored {
                Some(stored) if ok => Some(read_relationship(&stored)?),
                _ => None,
            };
            Ok((status, stored))
        })
        .collect()
}

fn read_relationship(
    relationship: &types::FederationRelationship,
) -> anyhow::Result<FederationRelationship> {
    federation_relationship_from_proto(relationship).with_context(|| {
        format!(
            "the server returned an unreadable federation relationship {:?}",
            relationship.trust_domain
        )
    })
}
