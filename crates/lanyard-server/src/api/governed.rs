//! Lanyard's `lanyard.api.v1.GovernedEntryService`: registration entries created and updated
//! together with their governance metadata (owner, reason, ticket, source), so that the
//! policy judges each entry exactly as it will be stored. The checks, the write, the index
//! update and the audit record are the one write path's ([`EntryWriter`]); only the metadata is
//! added here.

use std::sync::Arc;

use lanyard_core::RegistrationEntry;
use lanyard_proto::convert::{entry_mask_all, entry_to_proto, entry_update_from_proto};
use lanyard_proto::lanyard::api::v1::governed_entry_service_server::{
    GovernedEntryService as GovernedEntryRpc, GovernedEntryServiceServer,
};
use lanyard_proto::lanyard::api::v1::{
    CreateGovernedEntriesRequest, CreateGovernedEntriesResponse, EntryMetadata, GovernedEntry,
    UpdateGovernedEntriesRequest, UpdateGovernedEntriesResponse, create_governed_entries_response,
    update_governed_entries_response,
};
use tonic::{Request, Response, Status};

use super::entry::{EntryService, parse_entry_id};
use super::errors::ok_status;
use super::metadata::metadata_of;
use super::{ApiError, Authorizer, Caller};
use crate::state::ServerState;
use crate::writes::{EntryWriter, WriteError};

use super::check_batch;

const CREATE_GOVERNED_ENTRIES: &str = "/lanyard.api.v1.GovernedEntryService/CreateGovernedEntries";
const UPDATE_GOVERNED_ENTRIES: &str = "/lanyard.api.v1.GovernedEntryService/UpdateGovernedEntries";

/// The governed entry service.
#[derive(Debug, Clone)]
pub struct GovernedEntryService {
    entries: EntryService,
    writer: EntryWriter,
    auth: Authorizer,
}

impl GovernedEntryService {
    /// A service over `state`.
    pub fn new(state: Arc<ServerState>) -> Self {
        let auth = Authorizer::new(Arc::clone(&state));
        Self {
            writer: EntryWriter::new(Arc::clone(&state)),
            entries: EntryService::new(state),
            auth,
        }
    }

    /// The tonic service.
    pub fn into_server(self) -> GovernedEntryServiceServer<Self> {
        GovernedEntryServiceServer::new(self)
    }

    async fn create_one(
        &self,
        caller: &Caller,
        item: &GovernedEntry,
    ) -> create_governed_entries_response::Result {
        let failed = |error: ApiError, existing: Option<RegistrationEntry>| {
            create_governed_entries_response::Result {
                status: Some(error.to_proto_status()),
                entry: existing.as_ref().map(governed),
                exception_ids: Vec::new(),
            }
        };
        let Some(proto) = &item.entry else {
            return failed(ApiError::InvalidArgument("missing entry".to_owned()), None);
        };
        let mut entry = match self.entries.entry_to_create(proto) {
            Ok(entry) => entry,
            Err(error) => return failed(error, None),
        };
        apply_metadata(&mut entry, item.metadata.as_ref());
        // The metadata too must be well-formed (lengths, no control characters).
        if let Err(error) = entry.validate(self.entries.trust_domain()) {
            return failed(ApiError::InvalidArgument(error.to_string()), None);
        }
        match self
            .writer
            .create(caller, entry, CREATE_GOVERNED_ENTRIES)
            .await
        {
            Ok(written) => create_governed_entries_response::Result {
                status: Some(ok_status()),
                entry: Some(governed(&written.entry)),
                exception_ids: written.exception_ids,
            },
            Err(error) => {
                let existing = match &error {
                    WriteError::Duplicate { existing } => existing.as_deref().cloned(),
                    _ => None,
                };
                failed(error.into(), existing)
            }
        }
    }

    async fn update_one(
        &self,
        caller: &Caller,
        item: &GovernedEntry,
    ) -> update_governed_entries_response::Result {
        let result = match &item.entry {
            None => Err(ApiError::InvalidArgument("missing entry".to_owned())),
            Some(proto) => match parse_entry_id(&proto.id) {
                Err(error) => Err(error),
                Ok(id) => {
                    let mask = entry_mask_all();
                    self.writer
                        .update(caller, &id, UPDATE_GOVERNED_ENTRIES, |current| {
                            let mut updated = entry_update_from_proto(current, proto, Some(&mask))
                                .map_err(|e| {
                                    WriteError::Invalid(format!("failed to convert entry: {e}"))
                                })?;
                            apply_metadata(&mut updated, item.metadata.as_ref());
                            Ok(updated)
                        })
                        .await
                        .map_err(ApiError::from)
                }
            },
        };
        match result {
            Ok(written) => update_governed_entries_response::Result {
                status: Some(ok_status()),
                entry: Some(governed(&written.entry)),
                exception_ids: written.exception_ids,
            },
            Err(error) => update_governed_entries_response::Result {
                status: Some(error.to_proto_status()),
                entry: None,
                exception_ids: Vec::new(),
            },
        }
    }
}

#[tonic::async_trait]
impl GovernedEntryRpc for GovernedEntryService {
    async fn create_governed_entries(
        &self,
        request: Request<CreateGovernedEntriesRequest>,
    ) -> Result<Response<CreateGovernedEntriesResponse>, Status> {
        let caller = self.auth.admin(&request, CREATE_GOVERNED_ENTRIES)?;
        let request = request.into_inner();
        check_batch(request.entries.len())?;
        let mut results = Vec::with_capacity(request.entries.len());
        for item in &request.entries {
            results.push(self.create_one(&caller, item).await);
        }
        Ok(Response::new(CreateGovernedEntriesResponse { results }))
    }

    async fn update_governed_entries(
        &self,
        request: Request<UpdateGovernedEntriesRequest>,
    ) -> Result<Response<UpdateGovernedEntriesResponse>, Status> {
        let caller = self.auth.admin(&request, UPDATE_GOVERNED_ENTRIES)?;
        let request = request.into_inner();
        check_batch(request.entries.len())?;
        let mut results = Vec::with_capacity(request.entries.len());
        for item in &request.entries {
            results.push(self.update_one(&caller, item).await);
        }
        Ok(Response::new(UpdateGovernedEntriesResponse { results }))
    }
}

/// Sets the entry's four governance fields from `metadata` (an empty string clears one).
fn apply_metadata(entry: &mut RegistrationEntry, metadata: Option<&EntryMetadata>) {
    let text = |value: Option<&String>| value.filter(|v| !v.is_empty()).cloned();
    entry.owner = text(metadata.map(|m| &m.owner));
    entry.reason = text(metadata.map(|m| &m.reason));
    entry.ticket = text(metadata.map(|m| &m.ticket));
    entry.source = text(metadata.map(|m| &m.source));
}

fn governed(entry: &RegistrationEntry) -> GovernedEntry {
    GovernedEntry {
        entry: Some(entry_to_proto(entry, None)),
        metadata: Some(metadata_of(entry)),
    }
}
