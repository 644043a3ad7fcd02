//! SPIRE's Entry service (`spire.api.server.entry.v1.Entry`): registration entry management for
//! admins, and the authorized-entry sync that agents run every few seconds.
//!
//! Batch RPCs answer every item, in request order, with a `status`; SPIRE's CLI and agent read
//! it without a nil check. Every write goes through [`EntryWriter`], the one write path,
//! which has the authorization index catch up with it before it answers, so the next agent
//! sync sees it.
//!
//! `SyncAuthorizedEntries` follows SPIRE v1.13's protocol: when the agent is authorized for at
//! most a page of entries they go out in one message and the RPC ends; otherwise the server
//! sends pages of `{id, revision_number, created_at}` and then answers the agent's requests for
//! the entries it lacks, until the agent cancels the stream. The paging is [`EntrySync`], which
//! does no I/O.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use lanyard_core::{EntryId, RegistrationEntry, SpiffeId, TrustDomain};
use lanyard_proto::convert::{
    entry_from_proto, entry_id_from_proto, entry_mask_all, entry_to_proto, entry_update_from_proto,
    selectors_from_proto, spiffe_id_field_from_proto, trust_domain_from_proto,
};
use lanyard_proto::spire::api::server::entry::v1::entry_server::{Entry, EntryServer};
use lanyard_proto::spire::api::server::entry::v1::{
    BatchCreateEntryRequest, BatchCreateEntryResponse, BatchDeleteEntryRequest,
    BatchDeleteEntryResponse, BatchUpdateEntryRequest, BatchUpdateEntryResponse,
    CountEntriesRequest, CountEntriesResponse, EntryRevision, GetAuthorizedEntriesRequest,
    GetAuthorizedEntriesResponse, GetEntryRequest, ListEntriesRequest, ListEntriesResponse,
    SyncAuthorizedEntriesRequest, SyncAuthorizedEntriesResponse, batch_create_entry_response,
    batch_delete_entry_response, batch_update_entry_response, list_entries_request,
};
use lanyard_proto::spire::api::types;
use lanyard_proto::spire::api::types::{federates_with_match, selector_match};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::errors::{ENTRY_NOT_FOUND, ok_status};
use super::paging::requested_page;
use super::{ApiError, Authorizer, Caller};
use crate::datastore::{EntryFilter, FederatesWithFilter, MatchMode, SelectorFilter};
use crate::state::ServerState;
use crate::writes::{EntryWriter, WriteError};

const COUNT_ENTRIES: &str = "/spire.api.server.entry.v1.Entry/CountEntries";
const LIST_ENTRIES: &str = "/spire.api.server.entry.v1.Entry/ListEntries";
const GET_ENTRY: &str = "/spire.api.server.entry.v1.Entry/GetEntry";
const BATCH_CREATE_ENTRY: &str = "/spire.api.server.entry.v1.Entry/BatchCreateEntry";
const BATCH_UPDATE_ENTRY: &str = "/spire.api.server.entry.v1.Entry/BatchUpdateEntry";
const BATCH_DELETE_ENTRY: &str = "/spire.api.server.entry.v1.Entry/BatchDeleteEntry";
const GET_AUTHORIZED_ENTRIES: &str = "/spire.api.server.entry.v1.Entry/GetAuthorizedEntries";
const SYNC_AUTHORIZED_ENTRIES: &str = "/spire.api.server.entry.v1.Entry/SyncAuthorizedEntries";

/// Entries (or revisions) per `SyncAuthorizedEntries` message: SPIRE's default. SPIRE's agent
/// takes the length of the first revision page as the page size for its ID requests.
pub const DEFAULT_SYNC_PAGE_SIZE: usize = 500;

/// Messages buffered between the sync task and the transport.
const SYNC_CHANNEL_CAPACITY: usize = 4;

/// The Entry service.
#[derive(Debug, Clone)]
pub struct EntryService {
    state: Arc<ServerState>,
    auth: Authorizer,
    writer: EntryWriter,
    sync_page_size: usize,
}

impl EntryService {
    /// A service over `state`'s datastore and authorization index.
    pub fn new(state: Arc<ServerState>) -> Self {
        let auth = Authorizer::new(Arc::clone(&state));
        Self {
            writer: EntryWriter::new(Arc::clone(&state)),
            state,
            auth,
            sync_page_size: DEFAULT_SYNC_PAGE_SIZE,
        }
    }

    /// Uses pages of `page_size` (at least 1) in `SyncAuthorizedEntries` instead of
    /// [`DEFAULT_SYNC_PAGE_SIZE`], so that tests can reach the paged path with few entries.
    pub fn with_sync_page_size(mut self, page_size: usize) -> Self {
        self.sync_page_size = page_size.max(1);
        self
    }

    /// The tonic service.
    pub fn into_server(self) -> EntryServer<Self> {
        EntryServer::new(self)
    }

    pub(crate) fn trust_domain(&self) -> &TrustDomain {
        self.state.trust_domain()
    }

    /// Parses and checks an entry to create. The server assigns `created_at` and the revision
    /// (0), and an ID when the client gave none.
    pub(crate) fn entry_to_create(
        &self,
        proto: &types::Entry,
    ) -> Result<RegistrationEntry, ApiError> {
        let mut input = entry_from_proto(proto).map_err(|e| convert_failed(&e))?;
        input.created_at = None;
        input.revision_number = 0;
        let entry = input.into_entry(EntryId::generate, self.state.now());
        entry
            .validate(self.trust_domain())
            .map_err(|e| convert_failed(&e))?;
        Ok(entry)
    }

    async fn create_one(
        &self,
        caller: &Caller,
        proto: &types::Entry,
        output_mask: Option<&types::EntryMask>,
    ) -> batch_create_entry_response::Result {
        let entry = match self.entry_to_create(proto) {
            Ok(entry) => entry,
            Err(error) => return create_failed(&error),
        };
        match self.writer.create(caller, entry, BATCH_CREATE_ENTRY).await {
            Ok(written) => batch_create_entry_response::Result {
                status: Some(ok_status()),
                entry: Some(entry_to_proto(&written.entry, output_mask)),
            },
            Err(error) => {
                let existing = match &error {
                    WriteError::Duplicate { existing } => existing.as_deref().cloned(),
                    _ => None,
                };
                batch_create_entry_response::Result {
                    status: Some(ApiError::from(error).to_proto_status()),
                    entry: existing.map(|existing| entry_to_proto(&existing, output_mask)),
                }
            }
        }
    }

    async fn update_one(
        &self,
        caller: &Caller,
        proto: &types::Entry,
        input_mask: Option<&types::EntryMask>,
        output_mask: Option<&types::EntryMask>,
    ) -> batch_update_entry_response::Result {
        let result = match parse_entry_id(&proto.id) {
            Ok(id) => self
                .writer
                .update(caller, &id, BATCH_UPDATE_ENTRY, |current| {
                    entry_update_from_proto(current, proto, input_mask)
                        .map_err(|e| WriteError::Invalid(format!("failed to convert entry: {e}")))
                })
                .await
                .map_err(ApiError::from),
            Err(error) => Err(error),
        };
        match result {
            Ok(written) => batch_update_entry_response::Result {
                status: Some(ok_status()),
                entry: Some(entry_to_proto(&written.entry, output_mask)),
            },
            Err(error) => batch_update_entry_response::Result {
                status: Some(error.to_proto_status()),
                entry: None,
            },
        }
    }

    async fn delete_one(&self, caller: &Caller, id: &str) -> batch_delete_entry_response::Result {
        let result = |status: types::Status| batch_delete_entry_response::Result {
            status: Some(status),
            id: id.to_owned(),
        };
        if id.is_empty() {
            return result(
                ApiError::InvalidArgument("missing entry ID".to_owned()).to_proto_status(),
            );
        }
        let entry_id = match entry_id_from_proto(id) {
            Ok(entry_id) => entry_id,
            Err(error) => {
                return result(ApiError::InvalidArgument(error.to_string()).to_proto_status());
            }
        };
        match self
            .writer
            .delete(caller, &entry_id, BATCH_DELETE_ENTRY)
            .await
        {
            Ok(_) => result(ok_status()),
            Err(error) => result(ApiError::from(error).to_proto_status()),
        }
    }
}

#[tonic::async_trait]
impl Entry for EntryService {
    async fn count_entries(
        &self,
        request: Request<CountEntriesRequest>,
    ) -> Result<Response<CountEntriesResponse>, Status> {
        self.auth.admin(&request, COUNT_ENTRIES)?;
        let filter = request
            .into_inner()
            .filter
            .map(list_entries_request::Filter::from);
        let filter = entry_filter(self.trust_domain(), filter.as_ref())?;
        let count = self
            .state
            .store
            .count_entries(&filter)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(CountEntriesResponse {
            count: i32::try_from(count).unwrap_or(i32::MAX),
        }))
    }

    async fn list_entries(
        &self,
        request: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        self.auth.admin(&request, LIST_ENTRIES)?;
        let request = request.into_inner();
        let filter = entry_filter(self.trust_domain(), request.filter.as_ref())?;
        // As in SPIRE, a page size of 0 (or less) lists everything and ignores the token.
        let page = requested_page(request.page_size, &request.page_token);
        let (entries, next) = self
            .state
            .store
            .list_entries(&filter, page)
            .await
            .map_err(ApiError::from)?;
        let mask = request.output_mask.as_ref();
        Ok(Response::new(ListEntriesResponse {
            entries: entries.iter().map(|e| entry_to_proto(e, mask)).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_entry(
        &self,
        request: Request<GetEntryRequest>,
    ) -> Result<Response<types::Entry>, Status> {
        self.auth.admin(&request, GET_ENTRY)?;
        let request = request.into_inner();
        if request.id.is_empty() {
            return Err(ApiError::InvalidArgument("missing ID".to_owned()).into());
        }
        // A malformed ID names no entry.
        let id = entry_id_from_proto(&request.id).map_err(|_| entry_not_found())?;
        let entry = self
            .state
            .store
            .get_entry(&id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(entry_not_found)?;
        Ok(Response::new(entry_to_proto(
            &entry,
            request.output_mask.as_ref(),
        )))
    }

    async fn batch_create_entry(
        &self,
        request: Request<BatchCreateEntryRequest>,
    ) -> Result<Response<BatchCreateEntryResponse>, Status> {
        let caller = self.auth.admin(&request, BATCH_CREATE_ENTRY)?;
        let request = request.into_inner();
        super::check_batch(request.entries.len())?;
        let mut results = Vec::with_capacity(request.entries.len());
        for entry in &request.entries {
            results.push(
                self.create_one(&caller, entry, request.output_mask.as_ref())
                    .await,
            );
        }
        Ok(Response::new(BatchCreateEntryResponse { results }))
    }

    async fn batch_update_entry(
        &self,
        request: Request<BatchUpdateEntryRequest>,
    ) -> Result<Response<BatchUpdateEntryResponse>, Status> {
        let caller = self.auth.admin(&request, BATCH_UPDATE_ENTRY)?;
        let request = request.into_inner();
        super::check_batch(request.entries.len())?;
        let mut results = Vec::with_capacity(request.entries.len());
        for entry in &request.entries {
            results.push(
                self.update_one(
                    &caller,
                    entry,
                    request.input_mask.as_ref(),
                    request.output_mask.as_ref(),
                )
                .await,
            );
        }
        Ok(Response::new(BatchUpdateEntryResponse { results }))
    }

    async fn batch_delete_entry(
        &self,
        request: Request<BatchDeleteEntryRequest>,
    ) -> Result<Response<BatchDeleteEntryResponse>, Status> {
        let caller = self.auth.admin(&request, BATCH_DELETE_ENTRY)?;
        let request = request.into_inner();
        super::check_batch(request.ids.len())?;
        let mut results = Vec::with_capacity(request.ids.len());
        for id in &request.ids {
            results.push(self.delete_one(&caller, id).await);
        }
        Ok(Response::new(BatchDeleteEntryResponse { results }))
    }

    async fn get_authorized_entries(
        &self,
        request: Request<GetAuthorizedEntriesRequest>,
    ) -> Result<Response<GetAuthorizedEntriesResponse>, Status> {
        let agent = self.auth.agent(&request, GET_AUTHORIZED_ENTRIES).await?;
        let mask = request.get_ref().output_mask;
        let entries = self
            .state
            .authorized_entries(agent.id())
            .iter()
            .map(|entry| entry_to_proto(entry, mask.as_ref()))
            .collect();
        Ok(Response::new(GetAuthorizedEntriesResponse { entries }))
    }

    type SyncAuthorizedEntriesStream =
        ReceiverStream<Result<SyncAuthorizedEntriesResponse, Status>>;

    async fn sync_authorized_entries(
        &self,
        request: Request<Streaming<SyncAuthorizedEntriesRequest>>,
    ) -> Result<Response<Self::SyncAuthorizedEntriesStream>, Status> {
        let agent = self.auth.agent(&request, SYNC_AUTHORIZED_ENTRIES).await?;
        let mut inbound = request.into_inner();
        let Some(first) = inbound.message().await? else {
            return Err(Status::invalid_argument(
                "the stream ended before the initial request",
            ));
        };
        let mask = initial_sync_mask(&first)?;
        // One view of the agent's entries for the whole exchange, taken after the request
        // arrived; expired entries are not in it.
        let entries = self.state.authorized_entries(agent.id());
        let sync = EntrySync::new(entries, mask, self.sync_page_size);
        let (sender, receiver) = mpsc::channel(SYNC_CHANNEL_CAPACITY);
        tokio::spawn(run_sync(sync, inbound, sender, agent.id().clone()));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// Checks the first `SyncAuthorizedEntries` request and returns the output mask to use for the
/// whole exchange. IDs are refused, and so is a mask that drops `revision_number`, which the
/// agent needs to detect changes. No mask means every field, revision number included.
fn initial_sync_mask(request: &SyncAuthorizedEntriesRequest) -> Result<types::EntryMask, Status> {
    if !request.ids.is_empty() {
        return Err(Status::invalid_argument(
            "specifying IDs on initial request is not supported",
        ));
    }
    let mask = request.output_mask.unwrap_or_else(entry_mask_all);
    if !mask.revision_number {
        return Err(Status::invalid_argument(
            "revision number is required in the output mask",
        ));
    }
    Ok(mask)
}

/// Drives one sync exchange: sends the opening messages and, in revision mode, answers each
/// request for IDs until the agent cancels or closes its side. Either is a normal end.
async fn run_sync(
    sync: EntrySync,
    mut inbound: Streaming<SyncAuthorizedEntriesRequest>,
    sender: mpsc::Sender<Result<SyncAuthorizedEntriesResponse, Status>>,
    agent_id: SpiffeId,
) {
    let opening = sync.opening();
    for message in opening.messages {
        if sender.send(Ok(message)).await.is_err() {
            return;
        }
    }
    if !opening.awaits_requests {
        // Dropping the sender ends the RPC with OK after the single full message.
        return;
    }
    loop {
        let request = match inbound.message().await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(status) => {
                // SPIRE's agent cancels the stream when it has what it needs.
                tracing::debug!(agent_id = %agent_id, %status, "entry sync ended by the agent");
                return;
            }
        };
        for message in sync.answer(&request.ids) {
            if sender.send(Ok(message)).await.is_err() {
                return;
            }
        }
    }
}

/// What the server sends first in a sync exchange.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SyncOpening {
    /// The messages, in order.
    pub(crate) messages: Vec<SyncAuthorizedEntriesResponse>,
    /// Whether the server then answers requests for IDs (revision mode) rather than ending.
    pub(crate) awaits_requests: bool,
}

/// The paging and selection of one `SyncAuthorizedEntries` exchange, without I/O: the entries
/// the agent is authorized for (a snapshot), the agent's output mask and the page size.
#[derive(Debug, Clone)]
pub(crate) struct EntrySync {
    entries: BTreeMap<EntryId, Arc<RegistrationEntry>>,
    mask: types::EntryMask,
    page_size: usize,
}

impl EntrySync {
    /// An exchange over `entries` with pages of `page_size` (at least 1).
    pub(crate) fn new(
        entries: impl IntoIterator<Item = Arc<RegistrationEntry>>,
        mask: types::EntryMask,
        page_size: usize,
    ) -> Self {
        Self {
            entries: entries
                .into_iter()
                .map(|entry| (entry.id.clone(), entry))
                .collect(),
            mask,
            page_size: page_size.max(1),
        }
    }

    /// Up to a page of entries: all of them in one message (possibly empty, meaning "none"),
    /// and the exchange ends. More: pages of revisions ordered by entry ID, `more` on all but
    /// the last, and the exchange goes on.
    pub(crate) fn opening(&self) -> SyncOpening {
        if self.entries.len() <= self.page_size {
            let entries = self
                .entries
                .values()
                .map(|entry| entry_to_proto(entry, Some(&self.mask)))
                .collect();
            return SyncOpening {
                messages: vec![SyncAuthorizedEntriesResponse {
                    entry_revisions: Vec::new(),
                    entries,
                    more: false,
                }],
                awaits_requests: false,
            };
        }
        let revisions: Vec<EntryRevision> = self
            .entries
            .values()
            .map(|entry| EntryRevision {
                id: entry.id.as_str().to_owned(),
                revision_number: entry.revision_number,
                created_at: entry
                    .created_at
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |since| {
                        i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
                    }),
            })
            .collect();
        let n_pages = revisions.len().div_ceil(self.page_size);
        let messages = revisions
            .chunks(self.page_size)
            .enumerate()
            .map(|(index, page)| SyncAuthorizedEntriesResponse {
                entry_revisions: page.to_vec(),
                entries: Vec::new(),
                more: index + 1 < n_pages,
            })
            .collect();
        SyncOpening {
            messages,
            awaits_requests: true,
        }
    }

    /// The answer to a request for `ids`: the full entries under the initial mask, in pages,
    /// `more` on all but the last. Unknown and unauthorized IDs are left out; if none is left
    /// the answer is one empty message.
    pub(crate) fn answer(&self, ids: &[String]) -> Vec<SyncAuthorizedEntriesResponse> {
        let mut seen = HashSet::new();
        let found: Vec<types::Entry> = ids
            .iter()
            .filter(|id| seen.insert(id.as_str()))
            .filter_map(|id| EntryId::new(id).ok())
            .filter_map(|id| self.entries.get(&id))
            .map(|entry| entry_to_proto(entry, Some(&self.mask)))
            .collect();
        if found.is_empty() {
            return vec![SyncAuthorizedEntriesResponse::default()];
        }
        let n_pages = found.len().div_ceil(self.page_size);
        found
            .chunks(self.page_size)
            .enumerate()
            .map(|(index, page)| SyncAuthorizedEntriesResponse {
                entry_revisions: Vec::new(),
                entries: page.to_vec(),
                more: index + 1 < n_pages,
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Filters

/// The datastore filter for a list or count request.
fn entry_filter(
    trust_domain: &TrustDomain,
    filter: Option<&list_entries_request::Filter>,
) -> Result<EntryFilter, ApiError> {
    let mut out = EntryFilter::default();
    let Some(filter) = filter else {
        return Ok(out);
    };
    if let Some(id) = &filter.by_spiffe_id {
        out.by_spiffe_id = Some(
            member_id(trust_domain, "by_spiffe_id", id)
                .map_err(|e| invalid(format!("malformed SPIFFE ID filter: {e}")))?,
        );
    }
    if let Some(id) = &filter.by_parent_id {
        out.by_parent_id = Some(
            member_id(trust_domain, "by_parent_id", id)
                .map_err(|e| invalid(format!("malformed parent ID filter: {e}")))?,
        );
    }
    if let Some(by_selectors) = &filter.by_selectors {
        let malformed =
            |why: &dyn std::fmt::Display| invalid(format!("malformed selectors filter: {why}"));
        let selectors = selectors_from_proto("by_selectors", &by_selectors.selectors)
            .map_err(|e| malformed(&e))?;
        if selectors.is_empty() {
            return Err(malformed(&"empty selector set"));
        }
        let mode = match selector_match::MatchBehavior::try_from(by_selectors.r#match) {
            Ok(selector_match::MatchBehavior::MatchExact) => MatchMode::Exact,
            Ok(selector_match::MatchBehavior::MatchSubset) => MatchMode::Subset,
            Ok(selector_match::MatchBehavior::MatchSuperset) => MatchMode::Superset,
            Ok(selector_match::MatchBehavior::MatchAny) => MatchMode::Any,
            Err(_) => {
                return Err(malformed(&format!(
                    "unknown match behavior {}",
                    by_selectors.r#match
                )));
            }
        };
        out.by_selectors = Some(SelectorFilter { selectors, mode });
    }
    if let Some(by_federates_with) = &filter.by_federates_with {
        let malformed = |why: &dyn std::fmt::Display| {
            invalid(format!("malformed federates with filter: {why}"))
        };
        let trust_domains = by_federates_with
            .trust_domains
            .iter()
            .map(|td| trust_domain_from_proto("by_federates_with", td))
            .collect::<Result<_, _>>()
            .map_err(|e| malformed(&e))?;
        let mode = match federates_with_match::MatchBehavior::try_from(by_federates_with.r#match) {
            Ok(federates_with_match::MatchBehavior::MatchExact) => MatchMode::Exact,
            Ok(federates_with_match::MatchBehavior::MatchSubset) => MatchMode::Subset,
            Ok(federates_with_match::MatchBehavior::MatchSuperset) => MatchMode::Superset,
            Ok(federates_with_match::MatchBehavior::MatchAny) => MatchMode::Any,
            Err(_) => {
                return Err(malformed(&format!(
                    "unknown match behavior {}",
                    by_federates_with.r#match
                )));
            }
        };
        let filter = FederatesWithFilter {
            trust_domains,
            mode,
        };
        if filter.trust_domains.is_empty() {
            return Err(malformed(&"empty trust domain set"));
        }
        out.by_federates_with = Some(filter);
    }
    out.by_hint.clone_from(&filter.by_hint);
    // SPIRE's CLI always sends `by_downstream`; SPIRE reads false as "no filter".
    out.by_downstream = filter.by_downstream.filter(|downstream| *downstream);
    Ok(out)
}

/// A SPIFFE ID filter value, which must be in the server's trust domain.
fn member_id(
    trust_domain: &TrustDomain,
    field: &'static str,
    id: &types::Spiffeid,
) -> Result<SpiffeId, String> {
    let id = spiffe_id_field_from_proto(field, Some(id)).map_err(|e| e.to_string())?;
    if !id.is_member_of(trust_domain) {
        return Err(format!(
            "{field} {id} is not a member of trust domain {trust_domain}"
        ));
    }
    Ok(id)
}

// ---------------------------------------------------------------------------------------------
// Errors

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument(message.into())
}

/// An entry the client sent does not parse or is not valid; the message names the field.
fn convert_failed(error: &dyn std::fmt::Display) -> ApiError {
    invalid(format!("failed to convert entry: {error}"))
}

/// The entry ID of an update, which must be present.
pub(crate) fn parse_entry_id(id: &str) -> Result<EntryId, ApiError> {
    if id.is_empty() {
        return Err(ApiError::InvalidArgument(
            "failed to convert entry: missing id".to_owned(),
        ));
    }
    entry_id_from_proto(id).map_err(|e| convert_failed(&e))
}

fn entry_not_found() -> ApiError {
    ApiError::NotFound(ENTRY_NOT_FOUND.to_owned())
}

fn create_failed(error: &ApiError) -> batch_create_entry_response::Result {
    batch_create_entry_response::Result {
        status: Some(error.to_proto_status()),
        entry: None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use lanyard_core::SelectorSet;

    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn entry(id: &str, revision: i64) -> Arc<RegistrationEntry> {
        let selectors: SelectorSet = ["unix:uid:1000".parse().unwrap()].into_iter().collect();
        let mut entry = RegistrationEntry::new(
            EntryId::new(id).unwrap(),
            SpiffeId::from_path(&td(), &format!("/workload/{id}")).unwrap(),
            SpiffeId::from_path(&td(), "/spire/agent/join_token/t").unwrap(),
            selectors,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        );
        entry.revision_number = revision;
        entry.dns_names = vec!["web.example.org".to_owned()];
        Arc::new(entry)
    }

    /// The mask SPIRE's v1.13 agent sends: no parent, TTLs, DNS names or expiry.
    fn agent_mask() -> types::EntryMask {
        types::EntryMask {
            spiffe_id: true,
            selectors: true,
            federates_with: true,
            admin: true,
            downstream: true,
            revision_number: true,
            store_svid: true,
            hint: true,
            created_at: true,
            ..types::EntryMask::default()
        }
    }

    fn entries(n: usize) -> Vec<Arc<RegistrationEntry>> {
        (0..n)
            .map(|i| entry(&format!("e{i}"), i64::try_from(i).unwrap()))
            .collect()
    }

    fn ids(message: &SyncAuthorizedEntriesResponse) -> Vec<&str> {
        message.entries.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn up_to_a_page_goes_out_in_one_full_message() {
        for n in [0, 1, 3] {
            let opening = EntrySync::new(entries(n), agent_mask(), 3).opening();
            assert!(!opening.awaits_requests);
            assert_eq!(opening.messages.len(), 1, "{n} entries");
            let message = &opening.messages[0];
            assert!(!message.more);
            assert!(message.entry_revisions.is_empty());
            assert_eq!(message.entries.len(), n);
        }
        let opening = EntrySync::new(entries(2), agent_mask(), 500).opening();
        let sent = &opening.messages[0].entries[1];
        assert_eq!(sent.id, "e1");
        assert_eq!(sent.revision_number, 1);
        assert_eq!(sent.created_at, 1_700_000_000);
        assert_eq!(sent.selectors.len(), 1);
        // The mask is applied: the agent never asks for these.
        assert!(sent.parent_id.is_none());
        assert!(sent.dns_names.is_empty());
    }

    #[test]
    fn more_than_a_page_goes_out_as_revision_pages() {
        let sync = EntrySync::new(entries(7), agent_mask(), 3);
        let opening = sync.opening();
        assert!(opening.awaits_requests);
        let pages: Vec<(Vec<&str>, bool)> = opening
            .messages
            .iter()
            .map(|m| {
                assert!(m.entries.is_empty());
                (
                    m.entry_revisions.iter().map(|r| r.id.as_str()).collect(),
                    m.more,
                )
            })
            .collect();
        assert_eq!(
            pages,
            [
                (vec!["e0", "e1", "e2"], true),
                (vec!["e3", "e4", "e5"], true),
                (vec!["e6"], false),
            ]
        );
        let revision = &opening.messages[1].entry_revisions[1];
        assert_eq!(revision.revision_number, 4);
        assert_eq!(revision.created_at, 1_700_000_000);

        // An exact multiple of the page size has no empty trailing page.
        let opening = EntrySync::new(entries(6), agent_mask(), 3).opening();
        assert_eq!(opening.messages.len(), 2);
        assert!(opening.messages[0].more);
        assert!(!opening.messages[1].more);
    }

    #[test]
    fn id_requests_get_full_entries_in_pages() {
        let sync = EntrySync::new(entries(7), agent_mask(), 3);
        let request: Vec<String> = ["e0", "e2", "e3", "e5", "e6"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let answer = sync.answer(&request);
        assert_eq!(answer.len(), 2);
        assert_eq!(ids(&answer[0]), ["e0", "e2", "e3"]);
        assert!(answer[0].more);
        assert_eq!(ids(&answer[1]), ["e5", "e6"]);
        assert!(!answer[1].more);
        for message in &answer {
            assert!(message.entry_revisions.is_empty());
            for entry in &message.entries {
                assert!(entry.spiffe_id.is_some());
                assert!(entry.parent_id.is_none(), "initial mask applies");
            }
        }
    }

    #[test]
    fn unknown_and_unauthorized_ids_are_skipped() {
        let sync = EntrySync::new(entries(5), agent_mask(), 2);
        let request: Vec<String> = ["nope", "e1", "not/valid", "e1", "e4", ""]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let answer = sync.answer(&request);
        assert_eq!(answer.len(), 1);
        assert_eq!(ids(&answer[0]), ["e1", "e4"]);
        assert!(!answer[0].more);

        let answer = sync.answer(&["gone".to_owned()]);
        assert_eq!(answer, [SyncAuthorizedEntriesResponse::default()]);
        assert_eq!(sync.answer(&[]), [SyncAuthorizedEntriesResponse::default()]);
    }

    #[test]
    fn initial_request_rules() {
        let ok = SyncAuthorizedEntriesRequest {
            output_mask: Some(agent_mask()),
            ids: Vec::new(),
        };
        assert_eq!(initial_sync_mask(&ok).unwrap(), agent_mask());

        let with_ids = SyncAuthorizedEntriesRequest {
            ids: vec!["e1".to_owned()],
            ..ok.clone()
        };
        assert_eq!(
            initial_sync_mask(&with_ids).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );

        let no_revision = SyncAuthorizedEntriesRequest {
            output_mask: Some(types::EntryMask {
                revision_number: false,
                ..agent_mask()
            }),
            ids: Vec::new(),
        };
        assert_eq!(
            initial_sync_mask(&no_revision).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );

        let no_mask = SyncAuthorizedEntriesRequest::default();
        assert_eq!(initial_sync_mask(&no_mask).unwrap(), entry_mask_all());
    }

    #[test]
    fn filters() {
        let td = td();
        assert_eq!(entry_filter(&td, None).unwrap(), EntryFilter::default());
        let filter = list_entries_request::Filter {
            by_downstream: Some(false),
            ..Default::default()
        };
        assert_eq!(
            entry_filter(&td, Some(&filter)).unwrap().by_downstream,
            None
        );

        let foreign = list_entries_request::Filter {
            by_parent_id: Some(types::Spiffeid {
                trust_domain: "other.org".to_owned(),
                path: "/agent".to_owned(),
            }),
            ..Default::default()
        };
        let error = entry_filter(&td, Some(&foreign)).unwrap_err();
        assert!(matches!(error, ApiError::InvalidArgument(_)));
        assert!(error.to_string().contains("by_parent_id"), "{error}");

        let empty = list_entries_request::Filter {
            by_selectors: Some(types::SelectorMatch::default()),
            ..Default::default()
        };
        assert!(entry_filter(&td, Some(&empty)).is_err());

        let federates = list_entries_request::Filter {
            by_federates_with: Some(types::FederatesWithMatch {
                trust_domains: vec!["spiffe://fed.org".to_owned(), "fed2.org".to_owned()],
                r#match: federates_with_match::MatchBehavior::MatchAny as i32,
            }),
            ..Default::default()
        };
        let parsed = entry_filter(&td, Some(&federates)).unwrap();
        let parsed = parsed.by_federates_with.unwrap();
        assert_eq!(parsed.mode, MatchMode::Any);
        assert_eq!(parsed.trust_domains.len(), 2);
    }
}
