//! Lanyard's `lanyard.api.v1.EntryMetadataService`: the governance fields of registration
//! entries (who owns an entry, why it exists, which ticket approved it), kept apart from
//! SPIRE's Entry API so that API stays exactly SPIRE's.
//!
//! The fields live on the entry record itself. Setting them is an entry update, so it bumps the
//! entry's revision like any other update; a set that changes nothing writes nothing.

use std::sync::Arc;

use lanyard_core::RegistrationEntry;
use lanyard_core::policy::Operation;
use lanyard_proto::convert::entry_id_from_proto;
use lanyard_proto::lanyard::api::v1::entry_metadata_service_server::{
    EntryMetadataService as EntryMetadataRpc, EntryMetadataServiceServer,
};
use lanyard_proto::lanyard::api::v1::{
    EntryMetadata, GetEntryMetadataRequest, GetEntryMetadataResponse, ListEntryMetadataRequest,
    ListEntryMetadataResponse, SetEntryMetadataRequest, SetEntryMetadataResponse,
    set_entry_metadata_response,
};
use tonic::{Request, Response, Status};

use super::errors::ok_status;
use super::paging::MAX_PAGE_SIZE;
use super::{ApiError, Authorizer, Caller};
use crate::datastore::{DatastoreError, EntryFilter, PageRequest};
use crate::state::ServerState;

const SET_ENTRY_METADATA: &str = "/lanyard.api.v1.EntryMetadataService/SetEntryMetadata";
const GET_ENTRY_METADATA: &str = "/lanyard.api.v1.EntryMetadataService/GetEntryMetadata";
const LIST_ENTRY_METADATA: &str = "/lanyard.api.v1.EntryMetadataService/ListEntryMetadata";

/// Items per `ListEntryMetadata` page when the client does not choose.
pub const DEFAULT_LIST_PAGE_SIZE: u32 = 500;

/// How many times a set is retried when the entry changes between read and write.
const SET_ATTEMPTS: usize = 3;

/// The entry metadata service.
#[derive(Debug, Clone)]
pub struct EntryMetadataService {
    state: Arc<ServerState>,
    auth: Authorizer,
}

impl EntryMetadataService {
    /// A service over `state`'s datastore.
    pub fn new(state: Arc<ServerState>) -> Self {
        let auth = Authorizer::new(Arc::clone(&state));
        Self { state, auth }
    }

    /// The tonic service.
    pub fn into_server(self) -> EntryMetadataServiceServer<Self> {
        EntryMetadataServiceServer::new(self)
    }

    async fn set_one(
        &self,
        caller: &Caller,
        metadata: &EntryMetadata,
    ) -> set_entry_metadata_response::Result {
        let _audited = self.state.audited_write();
        match self.set_metadata(caller, metadata).await {
            Ok((entry, changed)) => {
                if changed {
                    self.state.audit(
                        &caller.describe(),
                        "entry metadata set",
                        serde_json::json!({
                            "method": SET_ENTRY_METADATA,
                            "entry_id": entry.id.as_str(),
                            "spiffe_id": entry.spiffe_id.to_string(),
                            "owner": entry.owner,
                            "reason": entry.reason,
                            "ticket": entry.ticket,
                        }),
                    );
                }
                set_entry_metadata_response::Result {
                    status: Some(ok_status()),
                    metadata: Some(metadata_of(&entry)),
                }
            }
            Err(error) => set_entry_metadata_response::Result {
                status: Some(error.to_proto_status()),
                metadata: None,
            },
        }
    }

    /// Replaces the entry's three fields (an empty string clears one). Returns the stored
    /// entry and whether anything changed.
    async fn set_metadata(
        &self,
        caller: &Caller,
        metadata: &EntryMetadata,
    ) -> Result<(RegistrationEntry, bool), ApiError> {
        if metadata.entry_id.is_empty() {
            return Err(ApiError::InvalidArgument("missing entry_id".to_owned()));
        }
        let id = entry_id_from_proto(&metadata.entry_id)
            .map_err(|e| ApiError::InvalidArgument(format!("invalid entry_id: {e}")))?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(current) = self.state.store.get_entry(&id).await? else {
                return Err(entry_not_found());
            };
            let mut updated = current.clone();
            updated.owner = non_empty(&metadata.owner);
            updated.reason = non_empty(&metadata.reason);
            updated.ticket = non_empty(&metadata.ticket);
            if updated == current {
                return Ok((current, false));
            }
            updated
                .validate(self.state.trust_domain())
                .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
            self.state
                .check_entry_write(&updated, Operation::Update, caller)?;
            match self
                .state
                .store
                .update_entry(updated, Some(current.revision_number))
                .await
            {
                Ok(stored) => {
                    self.state.written().await;
                    return Ok((stored, true));
                }
                Err(DatastoreError::Conflict(_)) if attempt < SET_ATTEMPTS => continue,
                Err(DatastoreError::NotFound(_)) => return Err(entry_not_found()),
                Err(error) => return Err(error.into()),
            }
        }
    }
}

#[tonic::async_trait]
impl EntryMetadataRpc for EntryMetadataService {
    async fn set_entry_metadata(
        &self,
        request: Request<SetEntryMetadataRequest>,
    ) -> Result<Response<SetEntryMetadataResponse>, Status> {
        let caller = self.auth.admin(&request, SET_ENTRY_METADATA)?;
        let request = request.into_inner();
        let mut results = Vec::with_capacity(request.metadata.len());
        for metadata in &request.metadata {
            results.push(self.set_one(&caller, metadata).await);
        }
        Ok(Response::new(SetEntryMetadataResponse { results }))
    }

    async fn get_entry_metadata(
        &self,
        request: Request<GetEntryMetadataRequest>,
    ) -> Result<Response<GetEntryMetadataResponse>, Status> {
        self.auth.admin(&request, GET_ENTRY_METADATA)?;
        let mut metadata = Vec::new();
        for id in &request.get_ref().entry_ids {
            // A malformed ID names no entry; like unknown ones, it is left out.
            let Ok(id) = entry_id_from_proto(id) else {
                continue;
            };
            let entry = self
                .state
                .store
                .get_entry(&id)
                .await
                .map_err(ApiError::from)?;
            if let Some(entry) = entry.filter(has_metadata) {
                metadata.push(metadata_of(&entry));
            }
        }
        Ok(Response::new(GetEntryMetadataResponse { metadata }))
    }

    async fn list_entry_metadata(
        &self,
        request: Request<ListEntryMetadataRequest>,
    ) -> Result<Response<ListEntryMetadataResponse>, Status> {
        self.auth.admin(&request, LIST_ENTRY_METADATA)?;
        let request = request.into_inner();
        let size = u32::try_from(request.page_size)
            .ok()
            .filter(|size| *size > 0)
            .unwrap_or(DEFAULT_LIST_PAGE_SIZE)
            .min(MAX_PAGE_SIZE);
        let mut token = Some(request.page_token).filter(|token| !token.is_empty());
        // Entries without metadata are skipped, so a page of entries may yield nothing; read
        // on until something is found or the entries run out, never past one page's worth.
        loop {
            let (entries, next) = self
                .state
                .store
                .list_entries(
                    &EntryFilter::default(),
                    Some(PageRequest {
                        token: token.take(),
                        size,
                    }),
                )
                .await
                .map_err(ApiError::from)?;
            let metadata: Vec<EntryMetadata> = entries
                .iter()
                .filter(|entry| has_metadata(entry))
                .map(metadata_of)
                .collect();
            match next {
                Some(next) if metadata.is_empty() => token = Some(next),
                next => {
                    return Ok(Response::new(ListEntryMetadataResponse {
                        metadata,
                        next_page_token: next.unwrap_or_default(),
                    }));
                }
            }
        }
    }
}

fn non_empty(value: &str) -> Option<String> {
    Some(value.to_owned()).filter(|value| !value.is_empty())
}

fn has_metadata(entry: &RegistrationEntry) -> bool {
    entry.owner.is_some()
        || entry.reason.is_some()
        || entry.ticket.is_some()
        || entry.source.is_some()
}

/// The entry's governance metadata as the API carries it.
pub(crate) fn metadata_of(entry: &RegistrationEntry) -> EntryMetadata {
    EntryMetadata {
        entry_id: entry.id.as_str().to_owned(),
        owner: entry.owner.clone().unwrap_or_default(),
        reason: entry.reason.clone().unwrap_or_default(),
        ticket: entry.ticket.clone().unwrap_or_default(),
        source: entry.source.clone().unwrap_or_default(),
    }
}

fn entry_not_found() -> ApiError {
    ApiError::NotFound("entry not found".to_owned())
}
