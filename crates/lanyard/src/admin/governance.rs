//! Lanyard's governance records: exceptions to the policy and the usage ledger, as
//! `lanyard-core` types. A SPIRE server has neither; asking one is an error that says so.

use anyhow::{Context as _, anyhow};
use lanyard_core::ledger::{EntryUsage, Issuance};
use lanyard_core::policy::Exception;
use lanyard_proto::convert::{exception_from_proto, issuance_from_proto, usage_from_proto};
use lanyard_proto::lanyard::api::v1::{
    CreateExceptionRequest, ExtendExceptionRequest, GetExceptionRequest, ListExceptionsRequest,
    ListIssuancesRequest, ListUsageRequest, PolicyException, RevokeExceptionRequest,
};

use super::{Admin, Flavor, Page, list_all, rpc_error};

impl Admin {
    /// Fails, naming `what`, unless the server offers Lanyard's governance services.
    pub(crate) async fn require_lanyard(&self, what: &str) -> anyhow::Result<()> {
        match self.flavor().await? {
            Flavor::Lanyard => Ok(()),
            Flavor::Spire => Err(anyhow!(
                "{what}: the server has no Lanyard governance services (is it a SPIRE server?)"
            )),
        }
    }

    /// Creates `exception` (the server assigns its ID and judges it), and returns it stored.
    pub(crate) async fn create_exception(
        &self,
        exception: PolicyException,
    ) -> anyhow::Result<Exception> {
        self.require_lanyard("CreateException failed").await?;
        let created = self
            .exception()
            .create_exception(CreateExceptionRequest {
                exception: Some(exception),
            })
            .await
            .map_err(|status| rpc_error("CreateException failed", &status))?
            .into_inner();
        read_exception(&created)
    }

    /// The exception with `id`.
    pub(crate) async fn exception_by_id(&self, id: &str) -> anyhow::Result<Exception> {
        let what = format!("cannot get exception {id}");
        self.require_lanyard(&what).await?;
        let exception = self
            .exception()
            .get_exception(GetExceptionRequest { id: id.to_owned() })
            .await
            .map_err(|status| rpc_error(&what, &status))?
            .into_inner();
        read_exception(&exception)
    }

    /// Moves an exception's expiry; `Err` carries the server's status so that a revision
    /// that moved on (`Aborted`) can be told apart.
    pub(crate) async fn extend_exception(
        &self,
        request: ExtendExceptionRequest,
    ) -> anyhow::Result<Result<Exception, tonic::Status>> {
        self.require_lanyard(&format!("cannot extend exception {}", request.id))
            .await?;
        match self.exception().extend_exception(request).await {
            Ok(response) => Ok(Ok(read_exception(&response.into_inner())?)),
            Err(status) => Ok(Err(status)),
        }
    }

    /// Revokes an exception; `Err` carries the server's status, as for
    /// [`Admin::extend_exception`].
    pub(crate) async fn revoke_exception(
        &self,
        request: RevokeExceptionRequest,
    ) -> anyhow::Result<Result<Exception, tonic::Status>> {
        self.require_lanyard(&format!("cannot revoke exception {}", request.id))
            .await?;
        match self.exception().revoke_exception(request).await {
            Ok(response) => Ok(Ok(read_exception(&response.into_inner())?)),
            Err(status) => Ok(Err(status)),
        }
    }

    /// Every exception, active or not (`include_inactive`), page by page.
    pub(crate) async fn exceptions(
        &self,
        include_inactive: bool,
    ) -> anyhow::Result<Vec<Exception>> {
        self.require_lanyard("ListExceptions failed").await?;
        let exceptions = list_all(|page_size, page_token| async move {
            let response = self
                .exception()
                .list_exceptions(ListExceptionsRequest {
                    include_inactive,
                    page_size,
                    page_token,
                })
                .await
                .map_err(|status| rpc_error("ListExceptions failed", &status))?
                .into_inner();
            Ok(Page {
                items: response.exceptions,
                next_page_token: response.next_page_token,
            })
        })
        .await?;
        exceptions
            .iter()
            .map(|exception| {
                exception_from_proto(exception).with_context(|| {
                    format!(
                        "the server returned an unreadable exception {:?}",
                        exception.id
                    )
                })
            })
            .collect()
    }

    /// The usage of `entry_ids` (of every entry when empty), page by page.
    pub(crate) async fn usage(&self, entry_ids: Vec<String>) -> anyhow::Result<Vec<EntryUsage>> {
        self.require_lanyard("ListUsage failed").await?;
        let usage = list_all(|page_size, page_token| {
            let request = ListUsageRequest {
                entry_ids: entry_ids.clone(),
                page_size,
                page_token,
            };
            async move {
                let response = self
                    .usage_service()
                    .list_usage(request)
                    .await
                    .map_err(|status| rpc_error("ListUsage failed", &status))?
                    .into_inner();
                Ok(Page {
                    items: response.usage,
                    next_page_token: response.next_page_token,
                })
            }
        })
        .await?;
        usage
            .iter()
            .map(|record| {
                usage_from_proto(record).with_context(|| {
                    format!(
                        "the server returned an unreadable usage record of entry {:?}",
                        record.entry_id
                    )
                })
            })
            .collect()
    }

    /// The first page of issuances matching `request` (newest first), at most its page size.
    pub(crate) async fn issuances_page(
        &self,
        request: ListIssuancesRequest,
    ) -> anyhow::Result<Vec<Issuance>> {
        self.require_lanyard("ListIssuances failed").await?;
        let response = self
            .usage_service()
            .list_issuances(request)
            .await
            .map_err(|status| rpc_error("ListIssuances failed", &status))?
            .into_inner();
        issuances_from_proto(&response.issuances)
    }

    /// Every issuance matching `request`, page by page.
    pub(crate) async fn issuances(
        &self,
        request: ListIssuancesRequest,
    ) -> anyhow::Result<Vec<Issuance>> {
        self.require_lanyard("ListIssuances failed").await?;
        let issuances = list_all(|page_size, page_token| {
            let request = ListIssuancesRequest {
                page_size,
                page_token,
                ..request.clone()
            };
            async move {
                let response = self
                    .usage_service()
                    .list_issuances(request)
                    .await
                    .map_err(|status| rpc_error("ListIssuances failed", &status))?
                    .into_inner();
                Ok(Page {
                    items: response.issuances,
                    next_page_token: response.next_page_token,
                })
            }
        })
        .await?;
        issuances_from_proto(&issuances)
    }
}

fn read_exception(exception: &PolicyException) -> anyhow::Result<Exception> {
    exception_from_proto(exception).with_context(|| {
        format!(
            "the server returned an unreadable exception {:?}",
            exception.id
        )
    })
}

fn issuances_from_proto(
    issuances: &[lanyard_proto::lanyard::api::v1::Issuance],
) -> anyhow::Result<Vec<Issuance>> {
    issuances
        .iter()
        .map(|issuance| {
            issuance_from_proto(issuance).with_context(|| {
                format!(
                    "the server returned an unreadable issuance {:?}",
                    issuance.serial
                )
            })
        })
        .collect()
}
