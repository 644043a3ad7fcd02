//! Lanyard's `lanyard.api.v1.EntryMetadataService`: the governance fields of registration
//! entries (who owns an entry, why it exists, which ticket approved it), kept apart from
//! SPIRE's Entry API so that API stays exactly SPIRE's.
//!
//! The fields live on the entry record itself. Setting them is an entry update, so it bumps the
//! entry's revision like any other update; a set that changes nothing writes nothing.

use std::sync::Arc;

use lanyard_core::RegistrationEntry;
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
use crate::datastore::{EntryFilter, PageRequest};
use crate::state::ServerState;
use crate::writes::EntryWriter;

const SET_ENTRY_METADATA: &str = "/lanyard.api.v1.EntryMetadataService/SetEntryMetadata";
const GET_ENTRY_METADATA: &str = "/lanyard.api.v1.EntryMetadataService/GetEntryMetadata";
const LIST_ENTRY_METADATA: &str = "/lanyard.api.v1.EntryMetadataService/ListEntryMetadata";

/// Items per `ListEntryMetadata` page when the client does not choose.
pub const DEFAULT_LIST_PAGE_SIZE: u32 = 500;

/// The entry metadata service.
#[derive(Debug, Clone)]
pub struct EntryMetadataService {
    state: Arc<ServerState>,
    auth: Authorizer,
    writer: EntryWriter,
}

impl EntryMetadataService {
    /// A service over `state`'s datastore.
    pub fn new(state: Arc<ServerState>) -> Self {
        let auth = Authorizer::new(Arc::clone(&state));
        Self {
            writer: EntryWriter::new(Arc::clone(&state)),
            state,
            auth,
        }
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
        match self.set_metadata(caller, metadata).await {
            Ok(entry) => set_entry_metadata_response::Result {
                status: Some(ok_status()),
                metadata: Some(metadata_of(&entry)),
            },
            Err(error) => set_entry_metadata_response::Result {
                status: Some(error.to_proto_status()),
                metadata: None,
            },
        }
    }

    /// Replaces the entry's three fields (an empty string clears one) through the one write
    /// path (structure, policy, commit, index, audit). Returns the stored entry.
    async fn set_metadata(
        &self,
        caller: &Caller,
        metadata: &EntryMetadata,
    ) -> Result<RegistrationEntry, ApiError> {
        if metadata.entry_id.is_empty() {
            return Err(ApiError::InvalidArgument("missing entry_id".to_owned()));
        }
        let id = entry_id_from_proto(&metadata.entry_id)
            .map_err(|e| ApiError::InvalidArgument(format!("invalid entry_id: {e}")))?;
        let written = self
            .writer
            .update_if_changed(caller, &id, SET_ENTRY_METADATA, |current| {
                let mut updated = current.clone();
                updated.owner = non_empty(&metadata.owner);
                updated.reason = non_empty(&metadata.reason);
                updated.ticket = non_empty(&metadata.ticket);
                Ok(updated)
            })
            .await?;
        Ok(written.entry)
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
