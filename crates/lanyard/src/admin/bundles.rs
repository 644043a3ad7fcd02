//! Trust bundles through SPIRE's Bundle API: the server's own and the federated ones, as
//! `lanyard-core`'s [`TrustBundle`].

use anyhow::Context as _;
use lanyard_core::{TrustBundle, TrustDomain};
use lanyard_proto::convert::{bundle_from_proto, bundle_to_proto, ok_status};
use lanyard_proto::spire::api::server::bundle::v1::{
    BatchDeleteFederatedBundleRequest, BatchSetFederatedBundleRequest, GetBundleRequest,
    GetFederatedBundleRequest, ListFederatedBundlesRequest, batch_delete_federated_bundle_request,
};
use lanyard_proto::spire::api::types;

use super::{Admin, Page, list_all, rpc_error};

impl Admin {
    /// The server's own trust bundle.
    pub(crate) async fn bundle(&self) -> anyhow::Result<TrustBundle> {
        let bundle = self
            .bundle_service()
            .get_bundle(GetBundleRequest { output_mask: None })
            .await
            .map_err(|status| rpc_error("GetBundle failed", &status))?
            .into_inner();
        read_bundle(&bundle)
    }

    /// The federated bundle of `trust_domain`.
    pub(crate) async fn federated_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> anyhow::Result<TrustBundle> {
        let bundle = self
            .bundle_service()
            .get_federated_bundle(GetFederatedBundleRequest {
                trust_domain: trust_domain.name().to_owned(),
                output_mask: None,
            })
            .await
            .map_err(|status| {
                rpc_error(&format!("cannot get the bundle of {trust_domain}"), &status)
            })?
            .into_inner();
        read_bundle(&bundle)
    }

    /// Every federated bundle, page by page.
    pub(crate) async fn federated_bundles(&self) -> anyhow::Result<Vec<TrustBundle>> {
        let bundles = list_all(|page_size, page_token| {
            let request = ListFederatedBundlesRequest {
                output_mask: None,
                page_size,
                page_token,
            };
            async move {
                let response = self
                    .bundle_service()
                    .list_federated_bundles(request)
                    .await
                    .map_err(|status| rpc_error("ListFederatedBundles failed", &status))?
                    .into_inner();
                Ok(Page {
                    items: response.bundles,
                    next_page_token: response.next_page_token,
                })
            }
        })
        .await?;
        bundles.iter().map(read_bundle).collect()
    }

    /// Creates or replaces a federated bundle: the item's status, and the bundle as stored.
    pub(crate) async fn set_federated_bundle(
        &self,
        bundle: &TrustBundle,
    ) -> anyhow::Result<(types::Status, Option<TrustBundle>)> {
        let result = self
            .bundle_service()
            .batch_set_federated_bundle(BatchSetFederatedBundleRequest {
                bundle: vec![bundle_to_proto(bundle)],
                output_mask: None,
            })
            .await
            .map_err(|status| rpc_error("BatchSetFederatedBundle failed", &status))?
            .into_inner()
            .results
            .into_iter()
            .next()
            .context("the server answered no result")?;
        let stored = result.bundle.as_ref().map(read_bundle).transpose()?;
        Ok((result.status.unwrap_or_else(ok_status), stored))
    }

    /// Deletes the federated bundle of `trust_domain` in `mode`: the item's status.
    pub(crate) async fn delete_federated_bundle(
        &self,
        trust_domain: &TrustDomain,
        mode: batch_delete_federated_bundle_request::Mode,
    ) -> anyhow::Result<types::Status> {
        let result = self
            .bundle_service()
            .batch_delete_federated_bundle(BatchDeleteFederatedBundleRequest {
                trust_domains: vec![trust_domain.name().to_owned()],
                mode: mode as i32,
            })
            .await
            .map_err(|status| rpc_error("BatchDeleteFederatedBundle failed", &status))?
            .into_inner()
            .results
            .into_iter()
            .next()
            .context("the server answered no result")?;
        Ok(result.status.unwrap_or_else(ok_status))
    }
}

fn read_bundle(bundle: &types::Bundle) -> anyhow::Result<TrustBundle> {
    bundle_from_proto(bundle).with_context(|| {
        format!(
            "the server sent an invalid bundle for {:?}",
            bundle.trust_domain
        )
    })
}
