//! Lanyard's `lanyard.api.v1.UsageService`: the usage ledger. The server records every SVID
//! it issues (see [`crate::ledger`]); agents report when they last served each entry to a
//! workload; admins ask who used an identity, and which agents hold SVIDs from a given
//! authority.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanyard_core::{EntryId, SpiffeId};
use lanyard_proto::convert::{issuance_to_proto, usage_to_proto};
use lanyard_proto::lanyard::api::v1::usage_service_server::{
    UsageService as UsageRpc, UsageServiceServer,
};
use lanyard_proto::lanyard::api::v1::{
    ListIssuancesRequest, ListIssuancesResponse, ListUsageRequest, ListUsageResponse,
    ReportUsageRequest, ReportUsageResponse,
};
use tonic::{Request, Response, Status};

use super::paging::{page_of, requested_page};
use super::{ApiError, Authorizer};
use crate::datastore::{EntryFilter, IssuanceFilter, PageRequest};
use crate::state::ServerState;

const REPORT_USAGE: &str = "/lanyard.api.v1.UsageService/ReportUsage";
const LIST_USAGE: &str = "/lanyard.api.v1.UsageService/ListUsage";
const LIST_ISSUANCES: &str = "/lanyard.api.v1.UsageService/ListIssuances";

/// Items per `ListIssuances` page when the client does not choose, and at most.
const DEFAULT_PAGE_SIZE: u32 = 500;
const MAX_PAGE_SIZE: u32 = 5_000;

/// Served entries one report may carry, at most.
const MAX_REPORTED: usize = 10_000;

/// How far in the future a reported time may be (clock skew between agent and server).
const MAX_SKEW: Duration = Duration::from_secs(300);

/// The usage service.
#[derive(Debug, Clone)]
pub struct UsageService {
    state: Arc<ServerState>,
    auth: Authorizer,
}

impl UsageService {
    /// A service over `state`.
    pub fn new(state: Arc<ServerState>) -> Self {
        let auth = Authorizer::new(Arc::clone(&state));
        Self { state, auth }
    }

    /// The tonic service.
    pub fn into_server(self) -> UsageServiceServer<Self> {
        UsageServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl UsageRpc for UsageService {
    async fn report_usage(
        &self,
        request: Request<ReportUsageRequest>,
    ) -> Result<Response<ReportUsageResponse>, Status> {
        let caller = self.auth.agent(&request, REPORT_USAGE).await?;
        let served = request.into_inner().served;
        if served.len() > MAX_REPORTED {
            return Err(Status::resource_exhausted(format!(
                "{} entries in one report; the limit is {MAX_REPORTED}",
                served.len()
            )));
        }
        let now = self.state.now();
        // Only entries the agent may hold count: an agent cannot claim use of others'.
        let authorized: std::collections::HashSet<String> = self
            .state
            .authorized_entries(caller.id())
            .iter()
            .map(|entry| entry.id.as_str().to_owned())
            .collect();
        let records: Vec<(String, SystemTime)> = served
            .into_iter()
            .filter(|item| authorized.contains(&item.entry_id))
            .filter_map(|item| {
                let at = u64::try_from(item.last_served_at)
                    .ok()
                    .filter(|s| *s > 0)
                    .map(|s| UNIX_EPOCH + Duration::from_secs(s))?;
                Some((item.entry_id, at.min(now + MAX_SKEW)))
            })
            .collect();
        self.state
            .store
            .record_served(caller.id(), &records)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ReportUsageResponse {}))
    }

    async fn list_usage(
        &self,
        request: Request<ListUsageRequest>,
    ) -> Result<Response<ListUsageResponse>, Status> {
        self.auth.admin(&request, LIST_USAGE)?;
        let request = request.into_inner();
        let mut entry_ids = request.entry_ids;
        for id in &entry_ids {
            EntryId::new(id).map_err(|e| {
                ApiError::InvalidArgument(format!("entry ID {id:?}: {e}")).into_status()
            })?;
        }
        // A page is the usage of a page of entries: those asked for, or those that exist.
        let page = requested_page(request.page_size, &request.page_token);
        let paged = page.is_some();
        let (entry_ids, next) = match page {
            None => (entry_ids, None),
            Some(page) if entry_ids.is_empty() => {
                let (entries, next) = self
                    .state
                    .store
                    .list_entries(&EntryFilter::default(), Some(page))
                    .await
                    .map_err(ApiError::from)?;
                let ids = entries.iter().map(|e| e.id.as_str().to_owned()).collect();
                (ids, next)
            }
            Some(page) => {
                entry_ids.sort();
                entry_ids.dedup();
                page_of(entry_ids, String::as_str, Some(&page))
            }
        };
        // No IDs means every entry to the datastore, but an empty page means none.
        let usage = if paged && entry_ids.is_empty() {
            Vec::new()
        } else {
            self.state
                .store
                .list_usage(&entry_ids)
                .await
                .map_err(ApiError::from)?
                .iter()
                .map(usage_to_proto)
                .collect()
        };
        Ok(Response::new(ListUsageResponse {
            usage,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn list_issuances(
        &self,
        request: Request<ListIssuancesRequest>,
    ) -> Result<Response<ListIssuancesResponse>, Status> {
        self.auth.admin(&request, LIST_ISSUANCES)?;
        let request = request.into_inner();
        let id = |field: &str, value: &str| -> Result<Option<SpiffeId>, Status> {
            if value.is_empty() {
                return Ok(None);
            }
            value.parse().map(Some).map_err(|e| {
                ApiError::InvalidArgument(format!("{field} {value:?}: {e}")).into_status()
            })
        };
        let text = |value: &str| Some(value.to_owned()).filter(|v| !v.is_empty());
        let filter = IssuanceFilter {
            entry_id: text(&request.entry_id),
            spiffe_id: id("spiffe_id", &request.spiffe_id)?,
            agent_id: id("agent_id", &request.agent_id)?,
            authority_id: text(&request.authority_id),
            valid_after: request.unexpired_only.then(|| self.state.now()),
        };
        let size = u32::try_from(request.page_size)
            .ok()
            .filter(|s| *s > 0)
            .unwrap_or(DEFAULT_PAGE_SIZE)
            .min(MAX_PAGE_SIZE);
        let page = PageRequest {
            token: text(&request.page_token),
            size,
        };
        let (issuances, next) = self
            .state
            .store
            .list_issuances(&filter, Some(page))
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListIssuancesResponse {
            issuances: issuances.iter().map(issuance_to_proto).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }
}
