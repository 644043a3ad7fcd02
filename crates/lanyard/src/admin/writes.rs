//! Entry writes: creates and updates of entries with their owner, reason and ticket.
//!
//! On a Lanyard server they go through GovernedEntryService, which stores an entry and its
//! metadata together, so that the policy judges the entry as it will be stored; an update
//! sends only the given fields (masks) over the revision it read. On a SPIRE server
//! ([`Flavor::Spire`]) they go through SPIRE's BatchCreateEntry/BatchUpdateEntry; owner,
//! reason and ticket have no place there, and an entry given them is reported as failed in
//! that part. The choice is made here, from the connection's flavor, and nowhere else.

use anyhow::{Context as _, bail};
use lanyard_core::RegistrationEntry;
use lanyard_proto::convert::{
    entry_to_proto, ok_status, status_from_tonic, stored_entry_from_proto,
};
use lanyard_proto::lanyard::api::v1::{
    CreateGovernedEntriesRequest, DeleteGovernedEntriesRequest, EntryMetadata, EntryMetadataMask,
    GovernedEntry, GovernedEntryUpdate, UpdateGovernedEntriesRequest,
    delete_governed_entries_request, update_governed_entries_response,
};
use lanyard_proto::spire::api::server::entry::v1::{
    BatchCreateEntryRequest, BatchUpdateEntryRequest, GetEntryRequest,
};
use lanyard_proto::spire::api::types;

use super::{Admin, Flavor, fetch_metadata, item_code, rpc_error};

impl Admin {
    /// Creates entries with their metadata.
    pub(crate) async fn create_entries(
        &self,
        specs: &[EntrySpec],
    ) -> anyhow::Result<Vec<ItemOutcome>> {
        match self.flavor().await? {
            Flavor::Lanyard => create_governed(self, specs).await,
            Flavor::Spire => create_through_spire(self, specs).await,
        }
    }

    /// Updates the given fields of entries, each over the revision read just before or over
    /// `revision`; the latter needs a Lanyard server.
    pub(crate) async fn update_entries(
        &self,
        specs: &[EntrySpec],
        revision: Option<i64>,
    ) -> anyhow::Result<Vec<ItemOutcome>> {
        match self.flavor().await? {
            Flavor::Lanyard => update_governed(self, specs, revision).await,
            Flavor::Spire if revision.is_some() => bail!(
                "--revision needs Lanyard's GovernedEntryService; this server (SPIRE's API only) cannot write conditionally"
            ),
            Flavor::Spire => update_through_spire(self, specs).await,
        }
    }
}

/// What became of one governed write: its status, the entry as stored (with its governance
/// fields) when it succeeded, the exceptions it was accepted under, and the entry's revision
/// now (what a refused conditional write met).
#[derive(Debug, Clone)]
pub(crate) struct GovernedResult {
    pub(crate) status: types::Status,
    pub(crate) entry: Option<RegistrationEntry>,
    pub(crate) exception_ids: Vec<String>,
    pub(crate) current_revision: i64,
}

impl GovernedResult {
    pub(crate) fn is_ok(&self) -> bool {
        is_ok(Some(&self.status))
    }

    fn read(
        status: Option<types::Status>,
        stored: Option<GovernedEntry>,
        exception_ids: Vec<String>,
        current_revision: i64,
    ) -> anyhow::Result<Self> {
        let status = status.unwrap_or_else(ok_status);
        let entry = match stored.filter(|_| is_ok(Some(&status))) {
            Some(GovernedEntry {
                entry: Some(entry),
                metadata,
            }) => Some(
                stored_entry_from_proto(&entry, metadata.as_ref()).with_context(|| {
                    format!("the server returned an unreadable entry {:?}", entry.id)
                })?,
            ),
            _ => None,
        };
        Ok(Self {
            status,
            entry,
            exception_ids,
            current_revision,
        })
    }
}

impl Admin {
    /// Creates entries with their metadata through GovernedEntryService (a Lanyard server's
    /// only): one result each, in order.
    pub(crate) async fn create_governed(
        &self,
        entries: Vec<GovernedEntry>,
    ) -> anyhow::Result<Vec<GovernedResult>> {
        self.require_lanyard("CreateGovernedEntries failed").await?;
        let sent = entries.len();
        let results = self
            .governed_entry()
            .create_governed_entries(CreateGovernedEntriesRequest { entries })
            .await
            .map_err(|status| rpc_error("CreateGovernedEntries failed", &status))?
            .into_inner()
            .results;
        check_result_count(results.len(), sent)?;
        results
            .into_iter()
            .map(|r| GovernedResult::read(r.status, r.entry, r.exception_ids, 0))
            .collect()
    }

    /// Applies masked, conditional updates through GovernedEntryService: one result each.
    pub(crate) async fn update_governed(
        &self,
        updates: Vec<GovernedEntryUpdate>,
    ) -> anyhow::Result<Vec<GovernedResult>> {
        self.require_lanyard("UpdateGovernedEntries failed").await?;
        let sent = updates.len();
        let results = self
            .governed_entry()
            .update_governed_entries(UpdateGovernedEntriesRequest {
                entries: Vec::new(),
                updates,
            })
            .await
            .map_err(|status| rpc_error("UpdateGovernedEntries failed", &status))?
            .into_inner()
            .results;
        check_result_count(results.len(), sent)?;
        results
            .into_iter()
            .map(|r| GovernedResult::read(r.status, r.entry, r.exception_ids, r.current_revision))
            .collect()
    }

    /// Deletes entries, each only at the revision given: one result each.
    pub(crate) async fn delete_governed(
        &self,
        entries: Vec<delete_governed_entries_request::Item>,
    ) -> anyhow::Result<Vec<GovernedResult>> {
        self.require_lanyard("DeleteGovernedEntries failed").await?;
        let sent = entries.len();
        let results = self
            .governed_entry()
            .delete_governed_entries(DeleteGovernedEntriesRequest { entries })
            .await
            .map_err(|status| rpc_error("DeleteGovernedEntries failed", &status))?
            .into_inner()
            .results;
        check_result_count(results.len(), sent)?;
        results
            .into_iter()
            .map(|r| GovernedResult::read(r.status, None, Vec::new(), r.current_revision))
            .collect()
    }
}

/// One entry to write: its fields, which of them were given (the input mask of an update),
/// and its governance metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct EntrySpec {
    pub(crate) entry: types::Entry,
    pub(crate) fields: types::EntryMask,
    pub(crate) metadata: MetadataSpec,
}

/// Owner, reason and ticket as given; `None` leaves a stored value unchanged on update.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct MetadataSpec {
    pub(crate) owner: Option<String>,
    pub(crate) reason: Option<String>,
    pub(crate) ticket: Option<String>,
}

impl MetadataSpec {
    pub(crate) fn is_empty(&self) -> bool {
        self.owner.is_none() && self.reason.is_none() && self.ticket.is_none()
    }

    /// The metadata to store: the given values over the `existing` ones.
    pub(crate) fn merged_onto(
        &self,
        entry_id: &str,
        existing: Option<&EntryMetadata>,
    ) -> EntryMetadata {
        let pick = |given: &Option<String>, stored: Option<&String>| {
            given
                .clone()
                .or_else(|| stored.cloned())
                .unwrap_or_default()
        };
        EntryMetadata {
            entry_id: entry_id.to_owned(),
            owner: pick(&self.owner, existing.map(|m| &m.owner)),
            reason: pick(&self.reason, existing.map(|m| &m.reason)),
            ticket: pick(&self.ticket, existing.map(|m| &m.ticket)),
            source: existing.map(|m| m.source.clone()).unwrap_or_default(),
        }
    }

    /// The metadata as given, for printing an entry that was not stored.
    pub(crate) fn as_given(&self, entry_id: &str) -> Option<EntryMetadata> {
        (!self.is_empty()).then(|| self.merged_onto(entry_id, None))
    }
}

pub(crate) fn mask_is_empty(mask: &types::EntryMask) -> bool {
    *mask == types::EntryMask::default()
}

/// The request `entry create` sends for the given specs.
pub(crate) fn create_request(specs: &[EntrySpec]) -> BatchCreateEntryRequest {
    BatchCreateEntryRequest {
        entries: specs.iter().map(|spec| spec.entry.clone()).collect(),
        output_mask: None,
    }
}

/// The requests `entry update` sends: one per distinct set of given fields, because an input
/// mask applies to a whole batch. Each comes with the positions of its entries in `specs`.
/// Specs that change only metadata send no update.
pub(crate) fn update_requests(specs: &[EntrySpec]) -> Vec<(BatchUpdateEntryRequest, Vec<usize>)> {
    let mut groups: Vec<(types::EntryMask, Vec<usize>)> = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        if mask_is_empty(&spec.fields) {
            continue;
        }
        match groups.iter_mut().find(|(mask, _)| *mask == spec.fields) {
            Some((_, members)) => members.push(index),
            None => groups.push((spec.fields, vec![index])),
        }
    }
    groups
        .into_iter()
        .map(|(mask, members)| {
            let request = BatchUpdateEntryRequest {
                entries: members.iter().map(|&i| specs[i].entry.clone()).collect(),
                input_mask: Some(mask),
                output_mask: None,
            };
            (request, members)
        })
        .collect()
}

/// What became of one entry of a create or update batch.
#[derive(Debug, Clone)]
pub(crate) struct ItemOutcome {
    /// The entry as requested.
    pub(crate) requested: types::Entry,
    pub(crate) requested_metadata: MetadataSpec,
    /// The entry call's status for this item.
    pub(crate) status: types::Status,
    /// The entry as stored, when the call succeeded.
    pub(crate) entry: Option<types::Entry>,
    /// The stored metadata, when some was set or already present.
    pub(crate) metadata: Option<EntryMetadata>,
    /// The metadata call's status, when metadata was to be set.
    pub(crate) metadata_status: Option<types::Status>,
    /// The exceptions the entry was accepted under.
    pub(crate) exception_ids: Vec<String>,
}

impl ItemOutcome {
    pub(crate) fn new(spec: &EntrySpec) -> Self {
        Self {
            requested: spec.entry.clone(),
            requested_metadata: spec.metadata.clone(),
            status: ok_status(),
            entry: None,
            metadata: None,
            metadata_status: None,
            exception_ids: Vec::new(),
        }
    }

    /// The first failed status of this item: the entry's, else the metadata's.
    pub(crate) fn failure(&self) -> Option<&types::Status> {
        if !is_ok(Some(&self.status)) {
            return Some(&self.status);
        }
        self.metadata_status.as_ref().filter(|s| !is_ok(Some(s)))
    }

    /// Records the result of a governed create or update.
    fn record_governed(
        &mut self,
        status: Option<types::Status>,
        stored: Option<GovernedEntry>,
        exception_ids: Vec<String>,
    ) {
        self.status = status.unwrap_or_else(ok_status);
        if let Some(stored) = stored {
            self.entry = stored.entry;
            self.metadata = stored.metadata.filter(|m| !metadata_is_empty(m));
        }
        self.exception_ids = exception_ids;
    }

    pub(crate) fn succeeded(&self) -> bool {
        is_ok(Some(&self.status)) && self.metadata_status.as_ref().is_none_or(|s| is_ok(Some(s)))
    }

    /// The ID of the stored entry when the entry call succeeded.
    pub(crate) fn stored_id(&self) -> Option<&str> {
        if !is_ok(Some(&self.status)) {
            return None;
        }
        self.entry.as_ref().map(|entry| entry.id.as_str())
    }
}

pub(crate) fn is_ok(status: Option<&types::Status>) -> bool {
    item_code(status) == tonic::Code::Ok
}

/// An entry with its metadata as GovernedEntryService takes it.
pub(crate) fn governed_entry(entry: types::Entry, metadata: EntryMetadata) -> GovernedEntry {
    GovernedEntry {
        entry: Some(entry),
        metadata: Some(metadata),
    }
}

pub(crate) fn metadata_is_empty(metadata: &EntryMetadata) -> bool {
    metadata.owner.is_empty()
        && metadata.reason.is_empty()
        && metadata.ticket.is_empty()
        && metadata.source.is_empty()
}

/// Creates the entries with their metadata in one governed call.
async fn create_governed(client: &Admin, specs: &[EntrySpec]) -> anyhow::Result<Vec<ItemOutcome>> {
    let request = CreateGovernedEntriesRequest {
        entries: specs
            .iter()
            .map(|spec| {
                governed_entry(
                    spec.entry.clone(),
                    spec.metadata.merged_onto(&spec.entry.id, None),
                )
            })
            .collect(),
    };
    let results = match client
        .governed_entry()
        .create_governed_entries(request)
        .await
    {
        Ok(response) => response.into_inner().results,
        Err(status) => return Err(rpc_error("CreateGovernedEntries failed", &status)),
    };
    check_result_count(results.len(), specs.len())?;
    let mut outcomes: Vec<ItemOutcome> = specs.iter().map(ItemOutcome::new).collect();
    for (outcome, result) in outcomes.iter_mut().zip(results) {
        outcome.record_governed(result.status, result.entry, result.exception_ids);
    }
    Ok(outcomes)
}

fn check_result_count(results: usize, sent: usize) -> anyhow::Result<()> {
    if results != sent {
        bail!("the server answered {results} results for {sent} entries");
    }
    Ok(())
}

/// SPIRE's path: BatchCreateEntry; owner, reason and ticket cannot be stored.
async fn create_through_spire(
    client: &Admin,
    specs: &[EntrySpec],
) -> anyhow::Result<Vec<ItemOutcome>> {
    let response = client
        .entry_service()
        .batch_create_entry(create_request(specs))
        .await
        .map_err(|status| rpc_error("BatchCreateEntry failed", &status))?
        .into_inner();
    check_result_count(response.results.len(), specs.len())?;
    let mut outcomes: Vec<ItemOutcome> = specs.iter().map(ItemOutcome::new).collect();
    for (outcome, result) in outcomes.iter_mut().zip(response.results) {
        outcome.status = result.status.unwrap_or_else(ok_status);
        outcome.entry = result.entry;
    }
    refuse_metadata(&mut outcomes);
    Ok(outcomes)
}

/// The message for an update or delete refused because the entry moved on since it was read.
pub(crate) const CHANGED_SINCE_READ: &str = "changed by someone else since you read it; re-run";

/// How many times `entry update` sends an update whose entry other writers keep changing in
/// fields it does not touch. Each refusal means another writer's change landed, so this bounds
/// how many writers at once still all get through.
const DISJOINT_ATTEMPTS: usize = 16;

/// The governance fields an update gives.
pub(crate) fn metadata_mask(spec: &MetadataSpec) -> EntryMetadataMask {
    EntryMetadataMask {
        owner: spec.owner.is_some(),
        reason: spec.reason.is_some(),
        ticket: spec.ticket.is_some(),
        source: false,
    }
}

/// Whether another writer changed any of the fields an update gives (`mask`, `metadata`)
/// between `read` and `now`: if not, the two changes are disjoint and the update can be
/// applied over the new revision without losing either.
pub(crate) fn overlaps(
    read: &GovernedEntry,
    now: &GovernedEntry,
    mask: &types::EntryMask,
    metadata: EntryMetadataMask,
) -> bool {
    let stored = |governed: &GovernedEntry| {
        governed
            .entry
            .as_ref()
            .and_then(|entry| stored_entry_from_proto(entry, governed.metadata.as_ref()).ok())
    };
    // An entry that cannot be read is taken to have changed everywhere.
    let (Some(a), Some(b)) = (stored(read), stored(now)) else {
        return true;
    };
    // The masked encoding holds exactly the fields the mask names.
    entry_to_proto(&a, Some(mask)) != entry_to_proto(&b, Some(mask))
        || (metadata.owner && a.owner != b.owner)
        || (metadata.reason && a.reason != b.reason)
        || (metadata.ticket && a.ticket != b.ticket)
        || (metadata.source && a.source != b.source)
}

/// Reads entry `id` and its metadata as they are now.
async fn read_governed(client: &Admin, id: &str) -> Result<GovernedEntry, tonic::Status> {
    let entry = client
        .entry_service()
        .get_entry(GetEntryRequest {
            id: id.to_owned(),
            output_mask: None,
        })
        .await?
        .into_inner();
    let metadata = fetch_metadata(client, std::slice::from_ref(&entry.id))
        .await?
        .remove(&entry.id);
    Ok(GovernedEntry {
        entry: Some(entry),
        metadata,
    })
}

fn aborted(result: &update_governed_entries_response::Result) -> bool {
    item_code(result.status.as_ref()) == tonic::Code::Aborted
}

/// Updates through GovernedEntryService: only the given fields (an entry mask and a metadata
/// mask), each entry only over the revision read just before (or `revision`, when given).
/// When another writer got in between and changed none of the given fields, the update is
/// sent again over the new revision (up to [`DISJOINT_ATTEMPTS`] in all); when it changed one of them, or `revision` was given,
/// the entry is not written and is reported as [`CHANGED_SINCE_READ`].
async fn update_governed(
    client: &Admin,
    specs: &[EntrySpec],
    revision: Option<i64>,
) -> anyhow::Result<Vec<ItemOutcome>> {
    let mut outcomes: Vec<ItemOutcome> = specs.iter().map(ItemOutcome::new).collect();
    let mut read: Vec<Option<GovernedEntry>> = Vec::with_capacity(specs.len());
    for (outcome, spec) in outcomes.iter_mut().zip(specs) {
        match read_governed(client, &spec.entry.id).await {
            Ok(entry) => read.push(Some(entry)),
            Err(status) => {
                outcome.status = status_from_tonic(&status);
                read.push(None);
            }
        }
    }
    let update_of = |spec: &EntrySpec, expected_revision: i64| GovernedEntryUpdate {
        entry: Some(governed_entry(
            spec.entry.clone(),
            spec.metadata.merged_onto(&spec.entry.id, None),
        )),
        entry_mask: Some(spec.fields),
        metadata_mask: Some(metadata_mask(&spec.metadata)),
        expected_revision: Some(expected_revision),
    };
    let mut members = Vec::new();
    let mut updates = Vec::new();
    for (index, (spec, read)) in specs.iter().zip(&read).enumerate() {
        let Some(read) = read else { continue };
        let at = read.entry.as_ref().map_or(0, |e| e.revision_number);
        updates.push(update_of(spec, revision.unwrap_or(at)));
        members.push(index);
    }
    if updates.is_empty() {
        return Ok(outcomes);
    }
    let send = async |updates: Vec<GovernedEntryUpdate>| {
        client
            .governed_entry()
            .update_governed_entries(UpdateGovernedEntriesRequest {
                entries: Vec::new(),
                updates,
            })
            .await
            .map(tonic::Response::into_inner)
    };
    let results = match send(updates).await {
        Ok(response) => response.results,
        Err(status) => return Err(rpc_error("UpdateGovernedEntries failed", &status)),
    };
    check_result_count(results.len(), members.len())?;
    for (&index, result) in members.iter().zip(results) {
        let spec = &specs[index];
        let mut result = result;
        let mut attempts = 1;
        while aborted(&result) && revision.is_none() && attempts < DISJOINT_ATTEMPTS {
            // Someone else wrote in between: go again over their revision as long as none of
            // the fields given here moved since this command read the entry. A short pause,
            // different for each process, keeps writers that keep colliding apart.
            attempts += 1;
            let pause = 5 + u64::from(std::process::id() % 7) * 3 + attempts as u64 * 5;
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            let retried = match (read_governed(client, &spec.entry.id).await, &read[index]) {
                (Ok(now), Some(before))
                    if !overlaps(before, &now, &spec.fields, metadata_mask(&spec.metadata)) =>
                {
                    let at = now.entry.as_ref().map_or(0, |e| e.revision_number);
                    send(vec![update_of(spec, at)])
                        .await
                        .ok()
                        .and_then(|mut response| response.results.pop())
                }
                _ => None,
            };
            match retried {
                Some(retried) => result = retried,
                None => break,
            }
        }
        if aborted(&result) {
            let read_at = read[index]
                .as_ref()
                .and_then(|g| g.entry.as_ref())
                .map_or(0, |e| e.revision_number);
            let expected = revision.unwrap_or(read_at);
            result.status = Some(types::Status {
                code: tonic::Code::Aborted as i32,
                message: format!(
                    "entry {} was {CHANGED_SINCE_READ} (read at revision {expected}, now at {})",
                    spec.entry.id, result.current_revision
                ),
            });
        }
        outcomes[index].record_governed(result.status, result.entry, result.exception_ids);
    }
    Ok(outcomes)
}

/// SPIRE's path: BatchUpdateEntry with the given fields as the input mask; owner, reason and
/// ticket cannot be stored.
async fn update_through_spire(
    client: &Admin,
    specs: &[EntrySpec],
) -> anyhow::Result<Vec<ItemOutcome>> {
    let mut outcomes: Vec<ItemOutcome> = specs.iter().map(ItemOutcome::new).collect();
    for (request, members) in update_requests(specs) {
        let response = client
            .entry_service()
            .batch_update_entry(request)
            .await
            .map_err(|status| rpc_error("BatchUpdateEntry failed", &status))?
            .into_inner();
        check_result_count(response.results.len(), members.len())?;
        for (&index, result) in members.iter().zip(response.results) {
            outcomes[index].status = result.status.unwrap_or_else(ok_status);
            outcomes[index].entry = result.entry;
        }
    }
    // Entries whose metadata alone changes: fetch them, both to check that they exist and to
    // print them.
    for (outcome, spec) in outcomes.iter_mut().zip(specs) {
        if !mask_is_empty(&spec.fields) {
            continue;
        }
        let request = GetEntryRequest {
            id: spec.entry.id.clone(),
            output_mask: None,
        };
        match client.entry_service().get_entry(request).await {
            Ok(response) => outcome.entry = Some(response.into_inner()),
            Err(status) => outcome.status = status_from_tonic(&status),
        }
    }
    refuse_metadata(&mut outcomes);
    Ok(outcomes)
}

/// Marks the items whose entry call succeeded and that were given owner, reason or ticket as
/// failed in that part: a SPIRE server has no place to store them.
fn refuse_metadata(outcomes: &mut [ItemOutcome]) {
    let status = types::Status {
        code: tonic::Code::Unimplemented as i32,
        message: "this server does not store owner, reason and ticket (it has no lanyard.api.v1.EntryMetadataService)".to_owned(),
    };
    for outcome in outcomes {
        if outcome.stored_id().is_some() && !outcome.requested_metadata.is_empty() {
            outcome.metadata_status = Some(status.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::output::tests::sample_entry;

    #[test]
    fn overlaps_says_whether_another_writer_touched_the_fields_given() {
        let read = GovernedEntry {
            entry: Some(types::Entry {
                hint: "a".into(),
                x509_svid_ttl: 60,
                ..sample_entry()
            }),
            metadata: Some(EntryMetadata {
                owner: "team".into(),
                ..Default::default()
            }),
        };
        let hint = types::EntryMask {
            hint: true,
            ..Default::default()
        };
        let no_metadata = EntryMetadataMask::default();
        let mut now = read.clone();
        now.entry.as_mut().unwrap().x509_svid_ttl = 120;
        now.entry.as_mut().unwrap().revision_number = 1;
        assert!(!overlaps(&read, &now, &hint, no_metadata), "another field");
        now.entry.as_mut().unwrap().hint = "b".into();
        assert!(overlaps(&read, &now, &hint, no_metadata), "the same field");
        let mut renamed = read.clone();
        renamed.metadata.as_mut().unwrap().owner = "other".into();
        let owner = EntryMetadataMask {
            owner: true,
            ..Default::default()
        };
        assert!(overlaps(
            &read,
            &renamed,
            &types::EntryMask::default(),
            owner
        ));
        assert!(!overlaps(&read, &renamed, &hint, no_metadata));
        // An entry the server encodes unreadably counts as changed.
        let mut unreadable = read.clone();
        unreadable.entry.as_mut().unwrap().spiffe_id = None;
        assert!(overlaps(&read, &unreadable, &hint, no_metadata));
    }
}
