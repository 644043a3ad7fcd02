//! Revocations through Lanyard's `RevocationService`, as `lanyard-core` types. A SPIRE server
//! has no revocations; asking one is an error that says so.

use anyhow::Context as _;
use lanyard_core::revocation::{Revocation, RevokedSerial};
use lanyard_proto::convert::{revocation_from_proto, revoked_serial_from_proto};
use lanyard_proto::lanyard::api::v1::{
    GetRevocationRequest, ListRevocationsRequest, RevokeRequest,
    revocation_service_client::RevocationServiceClient,
};

use super::{Admin, rpc_error};

/// What a revoke made (or, in a dry run, would make).
#[derive(Debug, Clone)]
pub(crate) struct Revoked {
    pub(crate) revocation: Revocation,
    pub(crate) serials: Vec<RevokedSerial>,
    pub(crate) banned: bool,
}

/// One revocation with its serials and who has applied it.
#[derive(Debug, Clone)]
pub(crate) struct RevocationDetail {
    pub(crate) revocation: Revocation,
    pub(crate) serials: Vec<RevokedSerial>,
    /// Agent ID, the sequence it applied, when (Unix seconds).
    pub(crate) acknowledged: Vec<(String, i64, i64)>,
    pub(crate) pending: Vec<String>,
}

impl Admin {
    fn revocation_service(&self) -> RevocationServiceClient<tonic::transport::Channel> {
        RevocationServiceClient::new(self.channel.clone())
    }

    /// Revokes (or, with `request.dry_run`, says what it would revoke).
    pub(crate) async fn revoke(&self, request: RevokeRequest) -> anyhow::Result<Revoked> {
        self.require_lanyard("Revoke failed").await?;
        let response = self
            .revocation_service()
            .revoke(request)
            .await
            .map_err(|status| rpc_error("Revoke failed", &status))?
            .into_inner();
        let revocation = response
            .revocation
            .as_ref()
            .context("the server answered without the revocation")?;
        Ok(Revoked {
            revocation: read(revocation)?,
            serials: read_serials(&response.serials)?,
            banned: response.banned,
        })
    }

    /// One revocation, with its serials and acknowledgements.
    pub(crate) async fn revocation(&self, id: &str) -> anyhow::Result<RevocationDetail> {
        let what = format!("cannot get revocation {id}");
        self.require_lanyard(&what).await?;
        let response = self
            .revocation_service()
            .get_revocation(GetRevocationRequest { id: id.to_owned() })
            .await
            .map_err(|status| rpc_error(&what, &status))?
            .into_inner();
        let revocation = response
            .revocation
            .as_ref()
            .context("the server answered without the revocation")?;
        Ok(RevocationDetail {
            revocation: read(revocation)?,
            serials: read_serials(&response.serials)?,
            acknowledged: response
                .acknowledged
                .iter()
                .map(|ack| (ack.agent_id.clone(), ack.sequence, ack.acknowledged_at))
                .collect(),
            pending: response.pending_agent_ids,
        })
    }

    /// Every revocation kept, in sequence order.
    pub(crate) async fn revocations(&self) -> anyhow::Result<Vec<Revocation>> {
        self.require_lanyard("ListRevocations failed").await?;
        let response = self
            .revocation_service()
            .list_revocations(ListRevocationsRequest {})
            .await
            .map_err(|status| rpc_error("ListRevocations failed", &status))?
            .into_inner();
        response.revocations.iter().map(read).collect()
    }
}

fn read(revocation: &lanyard_proto::lanyard::api::v1::Revocation) -> anyhow::Result<Revocation> {
    revocation_from_proto(revocation).with_context(|| {
        format!(
            "the server returned an unreadable revocation {:?}",
            revocation.id
        )
    })
}

fn read_serials(
    serials: &[lanyard_proto::lanyard::api::v1::RevokedSerial],
) -> anyhow::Result<Vec<RevokedSerial>> {
    serials
        .iter()
        .map(|serial| {
            revoked_serial_from_proto(serial)
                .with_context(|| format!("the server returned an unreadable serial {serial:?}"))
        })
        .collect()
}
