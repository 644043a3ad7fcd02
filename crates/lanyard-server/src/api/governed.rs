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
    CreateGovernedEntriesRequest, CreateGovernedEntriesResponse, DeleteGovernedEntriesRequest,
    DeleteGovernedEntriesResponse, EntryMetadata, EntryMetadataMask, GovernedEntry,
    GovernedEntryUpdate, UpdateGovernedEntriesRequest, UpdateGovernedEntriesResponse,
    create_governed_entries_response, delete_governed_entries_response,
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
const DELETE_GOVERNED_ENTRIES: &str = "/lanyard.api.v1.GovernedEntryService/DeleteGovernedEntries";

/// Every governance field, for a replacement.
const ALL_METADATA: EntryMetadataMask = EntryMetadataMask {
    owner: true,
    reason: true,
    ticket: true,
    source: true,
};

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
        apply_metadata(&mut entry, item.metadata.as_ref(), ALL_METADATA);
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

    /// One update: `item` replaces the fields named by the masks (all when absent), only
    /// while the entry is at `expected_revision` (0: any revision).
    async fn update_one(
        &self,
        caller: &Caller,
        item: &GovernedEntryUpdate,
    ) -> update_governed_entries_response::Result {
        let mut current_revision = 0;
        let result = match item.entry.as_ref().and_then(|g| g.entry.as_ref()) {
            None => Err(ApiError::InvalidArgument("missing entry".to_owned())),
            Some(proto) => match parse_entry_id(&proto.id) {
                Err(error) => Err(error),
                Ok(id) => {
                    let entry_mask = item.entry_mask.unwrap_or_else(entry_mask_all);
                    let metadata_mask = item.metadata_mask.unwrap_or(ALL_METADATA);
                    let metadata = item.entry.as_ref().and_then(|g| g.metadata.as_ref());
                    self.writer
                        .update_at(
                            caller,
                            &id,
                            UPDATE_GOVERNED_ENTRIES,
                            item.expected_revision,
                            |current| {
                                let mut updated =
                                    entry_update_from_proto(current, proto, Some(&entry_mask))
                                        .map_err(|e| {
                                            WriteError::Invalid(format!(
                                                "failed to convert entry: {e}"
                                            ))
                                        })?;
                                apply_metadata(&mut updated, metadata, metadata_mask);
                                Ok(updated)
                            },
                        )
                        .await
                        .map_err(|error| {
                            if let WriteError::Changed { current, .. } = &error {
                                current_revision = *current;
                            }
                            ApiError::from(error)
                        })
                }
            },
        };
        match result {
            Ok(written) => update_governed_entries_response::Result {
                status: Some(ok_status()),
                entry: Some(governed(&written.entry)),
                exception_ids: written.exception_ids,
                current_revision: 0,
            },
            Err(error) => update_governed_entries_response::Result {
                status: Some(error.to_proto_status()),
                entry: None,
                exception_ids: Vec::new(),
                current_revision,
            },
        }
    }

    async fn delete_one(
        &self,
        caller: &Caller,
        id: &str,
        expected_revision: Option<i64>,
    ) -> delete_governed_entries_response::Result {
        let mut current_revision = 0;
        let result = match parse_entry_id(id) {
            Err(error) => Err(error),
            Ok(entry_id) => self
                .writer
                .delete_at(
                    caller,
                    &entry_id,
                    DELETE_GOVERNED_ENTRIES,
                    expected_revision,
                )
                .await
                .map_err(|error| {
                    if let WriteError::Changed { current, .. } = &error {
                        current_revision = *current;
                    }
                    ApiError::from(error)
                }),
        };
        delete_governed_entries_response::Result {
            status: Some(match result {
                Ok(_) => ok_status(),
                Err(error) => error.to_proto_status(),
            }),
            id: id.to_owned(),
            current_revision,
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
        check_batch(request.entries.len().saturating_add(request.updates.len()))?;
        let replacements = request
            .entries
            .into_iter()
            .map(|entry| GovernedEntryUpdate {
                entry: Some(entry),
                ..GovernedEntryUpdate::default()
            });
        let items: Vec<GovernedEntryUpdate> = replacements.chain(request.updates).collect();
        let mut results = Vec::with_capacity(items.len());
        for item in &items {
            results.push(self.update_one(&caller, item).await);
        }
        Ok(Response::new(UpdateGovernedEntriesResponse { results }))
    }

    async fn delete_governed_entries(
        &self,
        request: Request<DeleteGovernedEntriesRequest>,
    ) -> Result<Response<DeleteGovernedEntriesResponse>, Status> {
        let caller = self.auth.admin(&request, DELETE_GOVERNED_ENTRIES)?;
        let request = request.into_inner();
        check_batch(request.entries.len())?;
        let mut results = Vec::with_capacity(request.entries.len());
        for item in &request.entries {
            results.push(
                self.delete_one(&caller, &item.id, item.expected_revision)
                    .await,
            );
        }
        Ok(Response::new(DeleteGovernedEntriesResponse { results }))
    }
}

/// Sets the governance fields named by `mask` from `metadata` (an empty string clears one).
fn apply_metadata(
    entry: &mut RegistrationEntry,
    metadata: Option<&EntryMetadata>,
    mask: EntryMetadataMask,
) {
    let text = |value: Option<&String>| value.filter(|v| !v.is_empty()).cloned();
    if mask.owner {
        entry.owner = text(metadata.map(|m| &m.owner));
    }
    if mask.reason {
        entry.reason = text(metadata.map(|m| &m.reason));
    }
    if mask.ticket {
        entry.ticket = text(metadata.map(|m| &m.ticket));
    }
    if mask.source {
        entry.source = text(metadata.map(|m| &m.source));
    }
}

fn governed(entry: &RegistrationEntry) -> GovernedEntry {
    GovernedEntry {
        entry: Some(entry_to_proto(entry, None)),
        metadata: Some(metadata_of(entry)),
    }
}
