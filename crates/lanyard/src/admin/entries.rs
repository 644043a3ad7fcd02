//! Entries and their governance metadata: SPIRE's Entry API for the entries, Lanyard's
//! EntryMetadataService for owner, reason, ticket and source (a SPIRE server has none).

use std::collections::HashMap;

use anyhow::Context as _;
use lanyard_core::RegistrationEntry;
use lanyard_proto::convert::{ok_status, stored_entry_from_proto};
use lanyard_proto::lanyard::api::v1::{EntryMetadata, GetEntryMetadataRequest};
use lanyard_proto::spire::api::server::entry::v1::{
    BatchDeleteEntryRequest, CountEntriesRequest, GetEntryRequest, ListEntriesRequest,
    count_entries_request, list_entries_request,
};
use lanyard_proto::spire::api::types;

use super::{Admin, Flavor, Page, list_all, rpc_error};

/// How many entry IDs one GetEntryMetadata call carries.
const METADATA_BATCH: usize = 500;

impl Admin {
    /// Every entry matching `filter`, with its governance fields, as `lanyard-core` entries.
    pub(crate) async fn entries(
        &self,
        filter: list_entries_request::Filter,
    ) -> anyhow::Result<Vec<RegistrationEntry>> {
        let entries = list_all_entries(self, filter).await?;
        let ids: Vec<String> = entries.iter().map(|entry| entry.id.clone()).collect();
        let metadata = fetch_metadata(self, &ids)
            .await
            .map_err(|status| rpc_error("GetEntryMetadata failed", &status))?;
        stored_entries(&entries, &metadata)
    }

    /// The entry with `id`, with its governance fields.
    pub(crate) async fn entry(&self, id: &str) -> anyhow::Result<RegistrationEntry> {
        let entry = self
            .entry_service()
            .get_entry(GetEntryRequest {
                id: id.to_owned(),
                output_mask: None,
            })
            .await
            .map_err(|status| rpc_error(&format!("cannot get entry {id}"), &status))?
            .into_inner();
        let metadata = fetch_metadata(self, std::slice::from_ref(&entry.id))
            .await
            .map_err(|status| rpc_error("GetEntryMetadata failed", &status))?;
        Ok(stored_entries(std::slice::from_ref(&entry), &metadata)?.remove(0))
    }
}

impl Admin {
    /// Deletes entries by ID (SPIRE's BatchDeleteEntry, unconditional): each ID's status, in
    /// the server's order.
    pub(crate) async fn delete_entries(
        &self,
        ids: &[String],
    ) -> anyhow::Result<Vec<(String, types::Status)>> {
        let results = self
            .entry_service()
            .batch_delete_entry(BatchDeleteEntryRequest { ids: ids.to_vec() })
            .await
            .map_err(|status| rpc_error("BatchDeleteEntry failed", &status))?
            .into_inner()
            .results;
        Ok(results
            .into_iter()
            .map(|result| (result.id, result.status.unwrap_or_else(ok_status)))
            .collect())
    }

    /// How many entries match `filter`.
    pub(crate) async fn count_entries(
        &self,
        filter: count_entries_request::Filter,
    ) -> anyhow::Result<i32> {
        Ok(self
            .entry_service()
            .count_entries(CountEntriesRequest {
                filter: Some(filter),
            })
            .await
            .map_err(|status| rpc_error("CountEntries failed", &status))?
            .into_inner()
            .count)
    }
}

/// The server's entries and their metadata as `lanyard-core` entries. An entry the server
/// encodes in a way no entry can be stored (no ID, a malformed SPIFFE ID) is an error naming
/// it: what a command decides about an entry it cannot read would be a guess.
fn stored_entries(
    entries: &[types::Entry],
    metadata: &HashMap<String, EntryMetadata>,
) -> anyhow::Result<Vec<RegistrationEntry>> {
    entries
        .iter()
        .map(|entry| {
            stored_entry_from_proto(entry, metadata.get(&entry.id))
                .with_context(|| format!("the server returned an unreadable entry {:?}", entry.id))
        })
        .collect()
}

/// The stored metadata of the given entries, keyed by entry ID. A server without the
/// metadata service (SPIRE) has none.
pub(crate) async fn fetch_metadata(
    client: &Admin,
    entry_ids: &[String],
) -> Result<HashMap<String, EntryMetadata>, tonic::Status> {
    let mut found = HashMap::new();
    if client.probe_flavor().await? == Flavor::Spire {
        return Ok(found);
    }
    for chunk in entry_ids.chunks(METADATA_BATCH) {
        let request = GetEntryMetadataRequest {
            entry_ids: chunk.to_vec(),
        };
        let response = client.entry_metadata().get_entry_metadata(request).await?;
        for metadata in response.into_inner().metadata {
            found.insert(metadata.entry_id.clone(), metadata);
        }
    }
    Ok(found)
}

/// Every entry matching `filter`, page by page, as the server encodes it.
async fn list_all_entries(
    client: &Admin,
    filter: list_entries_request::Filter,
) -> anyhow::Result<Vec<types::Entry>> {
    list_all(|page_size, page_token| {
        let request = ListEntriesRequest {
            filter: Some(filter.clone()),
            output_mask: None,
            page_size,
            page_token,
        };
        async move {
            let response = client
                .entry_service()
                .list_entries(request)
                .await
                .map_err(|status| rpc_error("ListEntries failed", &status))?
                .into_inner();
            Ok(Page {
                items: response.entries,
                next_page_token: response.next_page_token,
            })
        }
    })
    .await
}
