//! `lanyard entry create|show|update|delete|count`: registration entries through SPIRE's Entry
//! API, and their owner, reason and ticket through Lanyard's EntryMetadataService (they are
//! not fields of SPIRE's `Entry` message).
//!
//! Creates and updates go through Lanyard's GovernedEntryService, which stores an entry and
//! its metadata together, so that the policy judges the entry as it will be stored. A server
//! without it (SPIRE) answers UNIMPLEMENTED, and the command falls back to SPIRE's
//! BatchCreateEntry/BatchUpdateEntry followed by SetEntryMetadata.

pub(crate) mod data;

use std::collections::HashMap;
use std::io::{Read as _, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Subcommand};
use lanyard_proto::convert::{
    entry_to_proto, ok_status, status_from_tonic, stored_entry_from_proto,
};
use lanyard_proto::lanyard::api::v1::{
    CreateGovernedEntriesRequest, EntryMetadata, EntryMetadataMask, GovernedEntry,
    GovernedEntryUpdate, SetEntryMetadataRequest, UpdateGovernedEntriesRequest,
    update_governed_entries_response,
};
use lanyard_proto::spire::api::server::entry::v1::{
    BatchCreateEntryRequest, BatchDeleteEntryRequest, BatchUpdateEntryRequest, CountEntriesRequest,
    GetEntryRequest, count_entries_request, list_entries_request,
};
use lanyard_proto::spire::api::types;
use serde_json::{Value, json};

use crate::admin::{
    Admin, describe_status, fetch_metadata, is_unimplemented, item_code, list_all_entries,
    rpc_error,
};
use crate::cli::client::SocketArgs;
use crate::cli::output::{
    OutputArgs, count_noun, entry_json, status_json, status_text, write_entry_pretty, write_field,
    write_json,
};
use crate::cli::parse::{self, MatchMode};
use crate::cli::usage_error;

/// The flags that `--data` replaces. (Naming them rather than their group keeps clap's
/// conflict message to the flags actually given.)
const ENTRY_FIELD_ARGS: [&str; 17] = [
    "spiffe_id",
    "parent_id",
    "node",
    "selectors",
    "x509_svid_ttl",
    "jwt_svid_ttl",
    "dns_names",
    "federates_with",
    "admin",
    "downstream",
    "expires_at",
    "hint",
    "store_svid",
    "owner",
    "reason",
    "ticket",
    "entry_id",
];

/// The filters that `--entry-id` replaces in `entry show`.
const ENTRY_FILTER_ARGS: [&str; 8] = [
    "spiffe_id",
    "parent_id",
    "selectors",
    "match_mode",
    "federates_with",
    "match_federates_with",
    "hint",
    "downstream",
];

/// How many entry IDs go into one GetEntryMetadata call.

#[derive(Debug, Subcommand)]
pub(crate) enum EntryCommand {
    /// Create registration entries, from flags or from a JSON batch file.
    Create(CreateArgs),
    /// Show one entry by ID, or every entry matching the filters.
    Show(ShowArgs),
    /// Change the given fields of an entry (fields not given are left as they are).
    Update(UpdateArgs),
    /// Delete entries by ID.
    Delete(DeleteArgs),
    /// Count the entries matching the filters.
    Count(CountArgs),
}

impl EntryCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Create(_) => "create",
            Self::Show(_) => "show",
            Self::Update(_) => "update",
            Self::Delete(_) => "delete",
            Self::Count(_) => "count",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::Create(args) => create(&args, out).await,
            Self::Show(args) => show(&args, out).await,
            Self::Update(args) => update(&args, out).await,
            Self::Delete(args) => delete(&args, out).await,
            Self::Count(args) => count(&args, out).await,
        }
    }
}

/// The fields of an entry as flags, shared by `create` and `update`. Values are kept as text
/// and parsed by [`EntryFields::to_spec`], so that bad values are reported like other errors.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct EntryFields {
    /// SPIFFE ID that the entry issues, e.g. spiffe://example.org/web.
    #[arg(long, value_name = "ID")]
    spiffe_id: Option<String>,
    /// SPIFFE ID of the parent: an agent, the server (a node entry) or another entry's ID.
    #[arg(long, value_name = "ID", conflicts_with = "node")]
    parent_id: Option<String>,
    /// Make this a node entry: its parent is the server, spiffe://<trust domain>/spire/server.
    #[arg(long)]
    node: bool,
    /// Selector the workload or node must have, as type:value (repeatable).
    #[arg(long = "selector", value_name = "TYPE:VALUE")]
    selectors: Vec<String>,
    /// X.509-SVID lifetime: seconds or a duration such as 1h (0: the server's default).
    #[arg(long, value_name = "DURATION")]
    x509_svid_ttl: Option<String>,
    /// JWT-SVID lifetime: seconds or a duration such as 5m (0: the server's default).
    #[arg(long, value_name = "DURATION")]
    jwt_svid_ttl: Option<String>,
    /// DNS name for the X.509-SVID; the first is also the subject common name (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    dns_names: Vec<String>,
    /// Trust domain whose bundle workloads of this entry also get (repeatable).
    #[arg(long = "federates-with", value_name = "TRUST_DOMAIN")]
    federates_with: Vec<String>,
    /// SVIDs of this entry may call the admin API (--admin=false to clear).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    admin: Option<bool>,
    /// SVIDs of this entry belong to a downstream server (--downstream=false to clear).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    downstream: Option<bool>,
    /// When the entry is removed: RFC 3339 or Unix seconds (0: never).
    #[arg(long, value_name = "TIME")]
    expires_at: Option<String>,
    /// Hint returned with the SVIDs in the Workload API.
    #[arg(long, value_name = "TEXT")]
    hint: Option<String>,
    /// Deliver the SVID to the agent's SVID store instead of to workloads (--store-svid=false
    /// to clear).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    store_svid: Option<bool>,
    /// Person or team accountable for the entry.
    #[arg(long, value_name = "TEXT")]
    owner: Option<String>,
    /// Why the entry exists.
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
    /// Change or approval ticket for the entry.
    #[arg(long, value_name = "TEXT")]
    ticket: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// ID of the new entry (default: the server generates one).
    #[arg(long, value_name = "ID")]
    entry_id: Option<String>,
    #[command(flatten)]
    fields: EntryFields,
    /// Create the entries of a JSON batch file ({"entries": [...]}, SPIRE's format plus owner,
    /// reason and ticket); - reads standard input.
    #[arg(long, value_name = "FILE", conflicts_with_all = ENTRY_FIELD_ARGS)]
    data: Option<PathBuf>,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct UpdateArgs {
    /// ID of the entry to change.
    #[arg(long, value_name = "ID", required_unless_present = "data")]
    entry_id: Option<String>,
    #[command(flatten)]
    fields: EntryFields,
    /// Update the entries of a JSON batch file; each must have its "id", and only the
    /// members it has are changed. - reads standard input.
    #[arg(long, value_name = "FILE", conflicts_with_all = ENTRY_FIELD_ARGS)]
    data: Option<PathBuf>,
    /// Write only if the entry is still at this revision (its "revision_number" as `entry
    /// show` printed it); otherwise nothing is written and the command fails. Without it, the
    /// update goes over the revision just read, and is retried once if someone else changed
    /// other fields meanwhile.
    #[arg(long, value_name = "N")]
    revision: Option<i64>,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct DeleteArgs {
    /// ID of an entry to delete (repeatable).
    #[arg(long = "entry-id", value_name = "ID", required = true)]
    entry_ids: Vec<String>,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Entry filters shared by `show` and `count`.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct EntryFilterArgs {
    /// Only entries with this SPIFFE ID.
    #[arg(long, value_name = "ID")]
    spiffe_id: Option<String>,
    /// Only entries with this parent ID.
    #[arg(long, value_name = "ID")]
    parent_id: Option<String>,
    /// Only entries whose selectors match these, per --match (repeatable).
    #[arg(long = "selector", value_name = "TYPE:VALUE")]
    selectors: Vec<String>,
    /// How --selector (and, unless --match-federates-with is given, --federates-with) match.
    #[arg(long = "match", value_name = "MODE", value_enum, default_value_t)]
    match_mode: MatchMode,
    /// Only entries whose federated trust domains match these (repeatable).
    #[arg(long = "federates-with", value_name = "TRUST_DOMAIN")]
    federates_with: Vec<String>,
    /// How --federates-with matches (default: as --match).
    #[arg(long, value_name = "MODE", value_enum)]
    match_federates_with: Option<MatchMode>,
    /// Only entries with this hint.
    #[arg(long, value_name = "TEXT")]
    hint: Option<String>,
    /// Only entries for downstream servers.
    #[arg(long)]
    downstream: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    /// Show only the entry with this ID.
    #[arg(long, value_name = "ID", conflicts_with_all = ENTRY_FILTER_ARGS)]
    entry_id: Option<String>,
    #[command(flatten)]
    filter: EntryFilterArgs,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct CountArgs {
    #[command(flatten)]
    filter: EntryFilterArgs,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
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
    fn merged_onto(&self, entry_id: &str, existing: Option<&EntryMetadata>) -> EntryMetadata {
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
    fn as_given(&self, entry_id: &str) -> Option<EntryMetadata> {
        (!self.is_empty()).then(|| self.merged_onto(entry_id, None))
    }
}

fn mask_is_empty(mask: &types::EntryMask) -> bool {
    *mask == types::EntryMask::default()
}

impl EntryFields {
    /// Parses the flags into a spec. Flags not given stay unset in the mask.
    fn to_spec(&self, entry_id: Option<&str>) -> anyhow::Result<EntrySpec> {
        let mut spec = EntrySpec::default();
        let entry = &mut spec.entry;
        let mask = &mut spec.fields;
        if let Some(id) = entry_id {
            entry.id = id.to_owned();
        }
        if let Some(value) = &self.spiffe_id {
            entry.spiffe_id = Some(parse::spiffe_id(value).context("spiffe_id is invalid")?);
            mask.spiffe_id = true;
        }
        if let Some(value) = &self.parent_id {
            entry.parent_id = Some(parse::spiffe_id(value).context("parent_id is invalid")?);
            mask.parent_id = true;
        }
        if self.node {
            let Some(spiffe_id) = &entry.spiffe_id else {
                return Err(usage_error(
                    "--node needs --spiffe-id, whose trust domain names the server",
                ));
            };
            entry.parent_id = Some(types::Spiffeid {
                trust_domain: spiffe_id.trust_domain.clone(),
                path: "/spire/server".to_owned(),
            });
            mask.parent_id = true;
        }
        if !self.selectors.is_empty() {
            entry.selectors = parse::selectors(&self.selectors)?;
            mask.selectors = true;
        }
        if let Some(value) = &self.x509_svid_ttl {
            entry.x509_svid_ttl = parse::ttl_seconds(value).context("x509_svid_ttl is invalid")?;
            mask.x509_svid_ttl = true;
        }
        if let Some(value) = &self.jwt_svid_ttl {
            entry.jwt_svid_ttl = parse::ttl_seconds(value).context("jwt_svid_ttl is invalid")?;
            mask.jwt_svid_ttl = true;
        }
        if !self.dns_names.is_empty() {
            entry.dns_names = self.dns_names.clone();
            mask.dns_names = true;
        }
        if !self.federates_with.is_empty() {
            entry.federates_with = self
                .federates_with
                .iter()
                .map(|td| parse::trust_domain(td))
                .collect::<anyhow::Result<_>>()
                .context("federates_with is invalid")?;
            mask.federates_with = true;
        }
        if let Some(admin) = self.admin {
            entry.admin = admin;
            mask.admin = true;
        }
        if let Some(downstream) = self.downstream {
            entry.downstream = downstream;
            mask.downstream = true;
        }
        if let Some(store_svid) = self.store_svid {
            entry.store_svid = store_svid;
            mask.store_svid = true;
        }
        if let Some(value) = &self.expires_at {
            entry.expires_at = parse::unix_time(value).context("expires_at is invalid")?;
            mask.expires_at = true;
        }
        if let Some(hint) = &self.hint {
            entry.hint = hint.clone();
            mask.hint = true;
        }
        spec.metadata = MetadataSpec {
            owner: self.owner.clone(),
            reason: self.reason.clone(),
            ticket: self.ticket.clone(),
        };
        Ok(spec)
    }
}

/// Reads a file, or standard input for `-`.
pub(crate) fn read_input(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read standard input")?;
        Ok(bytes)
    } else {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    }
}

fn read_data_file(path: &Path) -> anyhow::Result<Vec<EntrySpec>> {
    let bytes = read_input(path)?;
    data::parse_entries(&bytes).with_context(|| format!("{}", path.display()))
}

/// The entry fields that `create` requires, named as flags or as JSON members.
fn check_create_fields(spec: &EntrySpec, from_flags: bool) -> anyhow::Result<()> {
    let missing = if spec.entry.spiffe_id.is_none() {
        Some(("--spiffe-id", "spiffe_id"))
    } else if spec.entry.parent_id.is_none() {
        Some(("--parent-id (or --node)", "parent_id"))
    } else if spec.entry.selectors.is_empty() {
        Some(("--selector", "selectors"))
    } else {
        None
    };
    match missing {
        Some((flag, _)) if from_flags => Err(usage_error(format!(
            "{flag} is required (or use --data FILE)"
        ))),
        Some((_, member)) => bail!("{member} is required"),
        None => Ok(()),
    }
}

impl CreateArgs {
    /// The entries to create, checked for the required fields.
    fn specs(&self) -> anyhow::Result<Vec<EntrySpec>> {
        match &self.data {
            Some(path) => {
                let specs = read_data_file(path)?;
                for (index, spec) in specs.iter().enumerate() {
                    check_create_fields(spec, false)
                        .with_context(|| format!("{}: entries[{index}]", path.display()))?;
                }
                Ok(specs)
            }
            None => {
                let spec = self.fields.to_spec(self.entry_id.as_deref())?;
                check_create_fields(&spec, true)?;
                Ok(vec![spec])
            }
        }
    }
}

impl UpdateArgs {
    /// The entries to update; each has an ID and at least one field to change.
    fn specs(&self) -> anyhow::Result<Vec<EntrySpec>> {
        let (specs, from_flags) = match &self.data {
            Some(path) => (read_data_file(path)?, false),
            None => (vec![self.fields.to_spec(self.entry_id.as_deref())?], true),
        };
        for (index, spec) in specs.iter().enumerate() {
            let place = if from_flags {
                String::new()
            } else {
                format!("entries[{index}]: ")
            };
            if spec.entry.id.is_empty() {
                bail!("{place}the entry ID is required");
            }
            if mask_is_empty(&spec.fields) && spec.metadata.is_empty() {
                let message =
                    format!("{place}nothing to update; give at least one field to change");
                return Err(if from_flags {
                    usage_error(message)
                } else {
                    anyhow!(message)
                });
            }
        }
        Ok(specs)
    }
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
struct ItemOutcome {
    /// The entry as requested.
    requested: types::Entry,
    requested_metadata: MetadataSpec,
    /// The entry call's status for this item.
    status: types::Status,
    /// The entry as stored, when the call succeeded.
    entry: Option<types::Entry>,
    /// The stored metadata, when some was set or already present.
    metadata: Option<EntryMetadata>,
    /// The metadata call's status, when metadata was to be set.
    metadata_status: Option<types::Status>,
    /// The exceptions the entry was accepted under.
    exception_ids: Vec<String>,
}

impl ItemOutcome {
    fn new(spec: &EntrySpec) -> Self {
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
    fn failure(&self) -> Option<&types::Status> {
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

    fn succeeded(&self) -> bool {
        is_ok(Some(&self.status)) && self.metadata_status.as_ref().is_none_or(|s| is_ok(Some(s)))
    }

    /// The ID of the stored entry when the entry call succeeded.
    fn stored_id(&self) -> Option<&str> {
        if !is_ok(Some(&self.status)) {
            return None;
        }
        self.entry.as_ref().map(|entry| entry.id.as_str())
    }
}

fn is_ok(status: Option<&types::Status>) -> bool {
    item_code(status) == tonic::Code::Ok
}

async fn create(args: &CreateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let specs = args.specs()?;
    let client = args.socket.connect().await?;
    let outcomes = match create_governed(&client, &specs).await? {
        Some(outcomes) => outcomes,
        None => create_through_spire(&client, &specs).await?,
    };
    report_outcomes(out, &outcomes, "create", args.output.is_json())
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

/// Creates the entries with their metadata in one governed call; `None` when the server has
/// no GovernedEntryService.
async fn create_governed(
    client: &Admin,
    specs: &[EntrySpec],
) -> anyhow::Result<Option<Vec<ItemOutcome>>> {
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
        Err(status) if is_unimplemented(&status) => return Ok(None),
        Err(status) => return Err(rpc_error("CreateGovernedEntries failed", &status)),
    };
    check_result_count(results.len(), specs.len())?;
    let mut outcomes: Vec<ItemOutcome> = specs.iter().map(ItemOutcome::new).collect();
    for (outcome, result) in outcomes.iter_mut().zip(results) {
        outcome.record_governed(result.status, result.entry, result.exception_ids);
    }
    Ok(Some(outcomes))
}

fn check_result_count(results: usize, sent: usize) -> anyhow::Result<()> {
    if results != sent {
        bail!("the server answered {results} results for {sent} entries");
    }
    Ok(())
}

/// SPIRE's path: BatchCreateEntry, then SetEntryMetadata for entries given metadata.
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
    store_metadata(client, &mut outcomes, false).await;
    Ok(outcomes)
}

async fn update(args: &UpdateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let specs = args.specs()?;
    let client = args.socket.connect().await?;
    let outcomes = match update_governed(&client, &specs, args.revision).await? {
        Some(outcomes) => outcomes,
        None if args.revision.is_some() => bail!(
            "--revision needs Lanyard's GovernedEntryService; this server (SPIRE's API only) cannot write conditionally"
        ),
        None => update_through_spire(&client, &specs).await?,
    };
    report_outcomes(out, &outcomes, "update", args.output.is_json())
}

/// The message for an update or delete refused because the entry moved on since it was read.
pub(crate) const CHANGED_SINCE_READ: &str = "changed by someone else since you read it; re-run";

/// How many times `entry update` sends an update whose entry other writers keep changing in
/// fields it does not touch. Each refusal means another writer's change landed, so this bounds
/// how many writers at once still all get through.
const DISJOINT_ATTEMPTS: usize = 16;

/// The governance fields an update gives.
fn metadata_mask(spec: &MetadataSpec) -> EntryMetadataMask {
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
/// the entry is not written and is reported as [`CHANGED_SINCE_READ`]. `None` when the server
/// has no GovernedEntryService.
async fn update_governed(
    client: &Admin,
    specs: &[EntrySpec],
    revision: Option<i64>,
) -> anyhow::Result<Option<Vec<ItemOutcome>>> {
    let mut outcomes: Vec<ItemOutcome> = specs.iter().map(ItemOutcome::new).collect();
    let mut read: Vec<Option<GovernedEntry>> = Vec::with_capacity(specs.len());
    for (outcome, spec) in outcomes.iter_mut().zip(specs) {
        match read_governed(client, &spec.entry.id).await {
            Ok(entry) => read.push(Some(entry)),
            Err(status) if is_unimplemented(&status) => return Ok(None),
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
        return Ok(Some(outcomes));
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
        Err(status) if is_unimplemented(&status) => return Ok(None),
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
    Ok(Some(outcomes))
}

/// SPIRE's path: BatchUpdateEntry with the given fields as the input mask, then
/// SetEntryMetadata merged onto the stored metadata.
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
    store_metadata(client, &mut outcomes, true).await;
    // Print updated entries whole: with the metadata they already had.
    let unchanged: Vec<String> = outcomes
        .iter()
        .filter(|o| o.metadata.is_none())
        .filter_map(|o| o.stored_id().map(str::to_owned))
        .collect();
    if let Ok(stored) = fetch_metadata(client, &unchanged).await {
        for outcome in &mut outcomes {
            if outcome.metadata.is_none()
                && let Some(id) = outcome.stored_id()
            {
                outcome.metadata = stored.get(id).cloned();
            }
        }
    }
    Ok(outcomes)
}

/// Sets the metadata of the items whose entry call succeeded and that were given metadata.
/// With `merge`, values not given keep what the server has. Failures are recorded per item.
async fn store_metadata(client: &Admin, outcomes: &mut [ItemOutcome], merge: bool) {
    let targets: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| o.stored_id().is_some() && !o.requested_metadata.is_empty())
        .map(|(i, _)| i)
        .collect();
    if targets.is_empty() {
        return;
    }
    let existing = if merge {
        let ids: Vec<String> = targets
            .iter()
            .filter_map(|&i| outcomes[i].stored_id().map(str::to_owned))
            .collect();
        match fetch_metadata(client, &ids).await {
            Ok(existing) => existing,
            Err(status) => {
                for &i in &targets {
                    outcomes[i].metadata_status = Some(status_from_tonic(&status));
                }
                return;
            }
        }
    } else {
        HashMap::new()
    };
    let metadata: Vec<EntryMetadata> = targets
        .iter()
        .map(|&i| {
            let id = outcomes[i].stored_id().unwrap_or_default();
            outcomes[i]
                .requested_metadata
                .merged_onto(id, existing.get(id))
        })
        .collect();
    let request = SetEntryMetadataRequest {
        metadata: metadata.clone(),
    };
    match client.entry_metadata().set_entry_metadata(request).await {
        Ok(response) => {
            let results = response.into_inner().results;
            if results.len() != targets.len() {
                let status = types::Status {
                    code: tonic::Code::Internal as i32,
                    message: format!(
                        "the server answered {} metadata results for {} entries",
                        results.len(),
                        targets.len()
                    ),
                };
                for &i in &targets {
                    outcomes[i].metadata_status = Some(status.clone());
                }
                return;
            }
            for ((&i, result), sent) in targets.iter().zip(results).zip(metadata) {
                let status = result.status.unwrap_or_else(ok_status);
                if is_ok(Some(&status)) {
                    outcomes[i].metadata = Some(result.metadata.unwrap_or(sent));
                }
                outcomes[i].metadata_status = Some(status);
            }
        }
        Err(status) => {
            let mut status = status_from_tonic(&status);
            if status.code == tonic::Code::Unimplemented as i32 {
                status.message =
                    "this server does not store owner, reason and ticket (it has no lanyard.api.v1.EntryMetadataService)"
                        .to_owned();
            }
            for &i in &targets {
                outcomes[i].metadata_status = Some(status.clone());
            }
        }
    }
}

/// Prints every item of a create or update batch, then fails if any item failed.
fn report_outcomes(
    out: &mut dyn Write,
    outcomes: &[ItemOutcome],
    verb: &str,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let results: Vec<Value> = outcomes.iter().map(outcome_json).collect();
        write_json(out, &json!({ "results": results }))?;
    } else {
        for outcome in outcomes {
            write_outcome_pretty(out, outcome, verb)?;
            writeln!(out)?;
        }
    }
    let failed = outcomes.iter().filter(|o| !o.succeeded()).count();
    if failed > 0 {
        let counted = format!(
            "{failed} of {} failed",
            count_noun(outcomes.len(), "entry", "entries")
        );
        // A lone entry's failure (a policy refusal names the rule and its fix) belongs on
        // the error line itself.
        match outcomes {
            [single] => {
                let status = single.failure().cloned().unwrap_or_else(ok_status);
                bail!(
                    "{counted}: {}",
                    describe_status(tonic::Code::from_i32(status.code), &status.message)
                );
            }
            _ => bail!("{counted}"),
        }
    }
    Ok(())
}

fn outcome_json(outcome: &ItemOutcome) -> Value {
    let mut item = serde_json::Map::new();
    item.insert("status".into(), status_json(Some(&outcome.status)));
    let entry = match &outcome.entry {
        Some(entry) if is_ok(Some(&outcome.status)) => entry_json(entry, outcome.metadata.as_ref()),
        _ => entry_json(
            &outcome.requested,
            outcome
                .requested_metadata
                .as_given(&outcome.requested.id)
                .as_ref(),
        ),
    };
    item.insert("entry".into(), entry);
    if let Some(source) = outcome.metadata.as_ref().map(|m| &m.source)
        && !source.is_empty()
    {
        item.insert("source".into(), json!(source));
    }
    if !outcome.exception_ids.is_empty() {
        item.insert("exception_ids".into(), json!(outcome.exception_ids));
    }
    if let Some(status) = &outcome.metadata_status {
        item.insert("metadata_status".into(), status_json(Some(status)));
    }
    Value::Object(item)
}

fn write_outcome_pretty(
    out: &mut dyn Write,
    outcome: &ItemOutcome,
    verb: &str,
) -> anyhow::Result<()> {
    match &outcome.entry {
        Some(entry) if is_ok(Some(&outcome.status)) => {
            write_entry_pretty(out, entry, outcome.metadata.as_ref())?;
            write_source_pretty(out, outcome.metadata.as_ref())?;
            if !outcome.exception_ids.is_empty() {
                write_field(
                    out,
                    "Exceptions",
                    &format!("{} (accepted under)", outcome.exception_ids.join(", ")),
                )?;
            }
            if let Some(status) = &outcome.metadata_status
                && !is_ok(Some(status))
            {
                writeln!(
                    out,
                    "Failed to set the owner, reason and ticket of entry {} {}",
                    entry.id,
                    status_text(Some(status))
                )?;
            }
        }
        _ => {
            writeln!(
                out,
                "Failed to {verb} the following entry {}:",
                status_text(Some(&outcome.status))
            )?;
            let metadata = outcome.requested_metadata.as_given(&outcome.requested.id);
            write_entry_pretty(out, &outcome.requested, metadata.as_ref())?;
        }
    }
    Ok(())
}

/// The `Source` line of an entry created by `apply` or `grant`.
fn write_source_pretty(
    out: &mut dyn Write,
    metadata: Option<&EntryMetadata>,
) -> anyhow::Result<()> {
    if let Some(metadata) = metadata
        && !metadata.source.is_empty()
    {
        write_field(out, "Source", &metadata.source)?;
    }
    Ok(())
}

impl EntryFilterArgs {
    /// The ListEntries filter for these flags.
    fn to_filter(&self) -> anyhow::Result<list_entries_request::Filter> {
        let mut filter = list_entries_request::Filter::default();
        if let Some(id) = &self.spiffe_id {
            filter.by_spiffe_id = Some(parse::spiffe_id(id).context("--spiffe-id is invalid")?);
        }
        if let Some(id) = &self.parent_id {
            filter.by_parent_id = Some(parse::spiffe_id(id).context("--parent-id is invalid")?);
        }
        if !self.selectors.is_empty() {
            filter.by_selectors = Some(types::SelectorMatch {
                selectors: parse::selectors(&self.selectors)?,
                r#match: self.match_mode.selector_match() as i32,
            });
        }
        if !self.federates_with.is_empty() {
            let mode = self.match_federates_with.unwrap_or(self.match_mode);
            filter.by_federates_with = Some(types::FederatesWithMatch {
                trust_domains: self
                    .federates_with
                    .iter()
                    .map(|td| parse::trust_domain(td))
                    .collect::<anyhow::Result<_>>()
                    .context("--federates-with is invalid")?,
                r#match: mode.federates_with_match() as i32,
            });
        }
        filter.by_hint = self.hint.clone();
        if self.downstream {
            filter.by_downstream = Some(true);
        }
        Ok(filter)
    }

    /// The CountEntries filter: the same criteria in CountEntries' own message type.
    fn to_count_filter(&self) -> anyhow::Result<count_entries_request::Filter> {
        let filter = self.to_filter()?;
        Ok(count_entries_request::Filter {
            by_spiffe_id: filter.by_spiffe_id,
            by_parent_id: filter.by_parent_id,
            by_selectors: filter.by_selectors,
            by_federates_with: filter.by_federates_with,
            by_hint: filter.by_hint,
            by_downstream: filter.by_downstream,
        })
    }
}

async fn show(args: &ShowArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    // Check the arguments before connecting, so that a typo is reported as such.
    let filter = match &args.entry_id {
        Some(_) => None,
        None => Some(args.filter.to_filter()?),
    };
    let client = args.socket.connect().await?;
    let entries = match (&args.entry_id, filter) {
        (Some(id), _) => {
            let request = GetEntryRequest {
                id: id.clone(),
                output_mask: None,
            };
            let entry = client
                .entry_service()
                .get_entry(request)
                .await
                .map_err(|status| rpc_error(&format!("cannot get entry {id}"), &status))?
                .into_inner();
            vec![entry]
        }
        (None, filter) => list_all_entries(&client, filter.unwrap_or_default()).await?,
    };
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    let metadata = fetch_metadata(&client, &ids)
        .await
        .map_err(|status| rpc_error("GetEntryMetadata failed", &status))?;
    write_entries(out, &entries, &metadata, args.output.is_json())
}

/// Prints a list of entries with their metadata.
fn write_entries(
    out: &mut dyn Write,
    entries: &[types::Entry],
    metadata: &HashMap<String, EntryMetadata>,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let entries: Vec<Value> = entries
            .iter()
            .map(|entry| entry_json(entry, metadata.get(&entry.id)))
            .collect();
        return write_json(out, &json!({ "entries": entries }));
    }
    writeln!(
        out,
        "Found {}",
        count_noun(entries.len(), "entry", "entries")
    )?;
    for entry in entries {
        write_entry_pretty(out, entry, metadata.get(&entry.id))?;
        write_source_pretty(out, metadata.get(&entry.id))?;
        writeln!(out)?;
    }
    Ok(())
}

async fn delete(args: &DeleteArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let client = args.socket.connect().await?;
    let request = BatchDeleteEntryRequest {
        ids: args.entry_ids.clone(),
    };
    let results = client
        .entry_service()
        .batch_delete_entry(request)
        .await
        .map_err(|status| rpc_error("BatchDeleteEntry failed", &status))?
        .into_inner()
        .results;
    if args.output.is_json() {
        let items: Vec<Value> = results
            .iter()
            .map(|r| json!({ "status": status_json(r.status.as_ref()), "id": r.id }))
            .collect();
        write_json(out, &json!({ "results": items }))?;
    } else {
        for result in &results {
            if is_ok(result.status.as_ref()) {
                writeln!(out, "Deleted entry with ID: {}", result.id)?;
            } else {
                writeln!(
                    out,
                    "Failed to delete entry with ID {} {}",
                    result.id,
                    status_text(result.status.as_ref())
                )?;
            }
        }
    }
    let failed = results.iter().filter(|r| !is_ok(r.status.as_ref())).count();
    if failed > 0 {
        bail!(
            "{failed} of {} failed",
            count_noun(results.len(), "entry", "entries")
        );
    }
    if results.len() != args.entry_ids.len() {
        return Err(anyhow!(
            "the server answered {} results for {} entries",
            results.len(),
            args.entry_ids.len()
        ));
    }
    Ok(())
}

async fn count(args: &CountArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let filter = args.filter.to_count_filter()?;
    let client = args.socket.connect().await?;
    let request = CountEntriesRequest {
        filter: Some(filter),
    };
    let count = client
        .entry_service()
        .count_entries(request)
        .await
        .map_err(|status| rpc_error("CountEntries failed", &status))?
        .into_inner()
        .count;
    if args.output.is_json() {
        write_json(out, &json!({ "count": count }))
    } else {
        let n = usize::try_from(count).unwrap_or_default();
        writeln!(
            out,
            "{}",
            count_noun(n, "registration entry", "registration entries")
        )?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use clap::Parser as _;
    use lanyard_proto::spire::api::types::{federates_with_match, selector_match};

    use super::*;
    use crate::cli::output::tests::{sample_entry, sample_metadata};
    use crate::cli::{Cli, Command};

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

    pub(crate) fn metadata(owner: &str, reason: &str, ticket: &str) -> MetadataSpec {
        let some = |text: &str| (!text.is_empty()).then(|| text.to_owned());
        MetadataSpec {
            owner: some(owner),
            reason: some(reason),
            ticket: some(ticket),
        }
    }

    fn parse(args: &[&str]) -> Result<EntryCommand, clap::Error> {
        let cli = Cli::try_parse_from(["lanyard", "entry"].iter().chain(args))?;
        match cli.command {
            Command::Entry(command) => Ok(command),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn create_args(args: &[&str]) -> CreateArgs {
        match parse(&[&["create"], args].concat()).expect("parses") {
            EntryCommand::Create(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn update_args(args: &[&str]) -> UpdateArgs {
        match parse(&[&["update"], args].concat()).expect("parses") {
            EntryCommand::Update(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn show_args(args: &[&str]) -> ShowArgs {
        match parse(&[&["show"], args].concat()).expect("parses") {
            EntryCommand::Show(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn id(trust_domain: &str, path: &str) -> types::Spiffeid {
        types::Spiffeid {
            trust_domain: trust_domain.into(),
            path: path.into(),
        }
    }

    fn selector(kind: &str, value: &str) -> types::Selector {
        types::Selector {
            r#type: kind.into(),
            value: value.into(),
        }
    }

    #[test]
    fn create_flags_become_the_request() {
        let args = create_args(&[
            "--spiffe-id",
            "spiffe://example.org/web",
            "--parent-id",
            "spiffe://example.org/spire/agent/join_token/abc",
            "--selector",
            "unix:uid:1000",
            "--selector",
            "k8s:pod-label:app:web",
            "--x509-svid-ttl",
            "1h",
            "--jwt-svid-ttl",
            "300",
            "--dns",
            "web.example.org",
            "--federates-with",
            "partner.org",
            "--admin",
            "--downstream",
            "--expires-at",
            "2030-01-01T00:00:00Z",
            "--hint",
            "external",
            "--store-svid",
            "--entry-id",
            "web-1",
            "--owner",
            "team-web",
            "--reason",
            "serves the storefront",
            "--ticket",
            "CHG-42",
        ]);
        let specs = args.specs().expect("valid");
        let request = create_request(&specs);
        assert_eq!(
            request,
            BatchCreateEntryRequest {
                entries: vec![types::Entry {
                    id: "web-1".into(),
                    spiffe_id: Some(id("example.org", "/web")),
                    parent_id: Some(id("example.org", "/spire/agent/join_token/abc")),
                    selectors: vec![
                        selector("unix", "uid:1000"),
                        selector("k8s", "pod-label:app:web"),
                    ],
                    x509_svid_ttl: 3600,
                    federates_with: vec!["partner.org".into()],
                    admin: true,
                    downstream: true,
                    expires_at: 1_893_456_000,
                    dns_names: vec!["web.example.org".into()],
                    revision_number: 0,
                    store_svid: true,
                    jwt_svid_ttl: 300,
                    hint: "external".into(),
                    created_at: 0,
                }],
                output_mask: None,
            }
        );
        assert_eq!(
            specs[0].metadata,
            metadata("team-web", "serves the storefront", "CHG-42")
        );
    }

    #[test]
    fn node_entries_take_the_server_as_parent() {
        let specs = create_args(&[
            "--node",
            "--spiffe-id",
            "spiffe://example.org/nodes/rack-1",
            "--selector",
            "x509pop:subject:cn:rack-1",
            "--expires-at",
            "1893456000",
        ])
        .specs()
        .expect("valid");
        assert_eq!(
            specs[0].entry.parent_id,
            Some(id("example.org", "/spire/server"))
        );
        assert_eq!(specs[0].entry.expires_at, 1_893_456_000);
        assert!(specs[0].metadata.is_empty());
        assert!(
            parse(&["create", "--node", "--parent-id", "spiffe://example.org/x",]).is_err(),
            "--node and --parent-id conflict"
        );
    }

    #[test]
    fn create_flag_errors_are_one_clear_line() {
        let base = [
            "--spiffe-id",
            "spiffe://example.org/web",
            "--parent-id",
            "spiffe://example.org/agent",
        ];
        let cases: &[(&[&str], &str)] = &[
            (
                &["--selector", "unix:uid:1"],
                "--spiffe-id is required (or use --data FILE)",
            ),
            (
                &[
                    "--spiffe-id",
                    "spiffe://example.org/web",
                    "--selector",
                    "unix:uid:1",
                ],
                "--parent-id (or --node) is required",
            ),
            (&base, "--selector is required"),
            (
                &[
                    "--spiffe-id",
                    "example.org/web",
                    "--parent-id",
                    "spiffe://example.org/a",
                    "--selector",
                    "unix:uid:1",
                ],
                "spiffe_id is invalid: \"example.org/web\" is not a valid SPIFFE ID: scheme is missing or invalid",
            ),
        ];
        for (args, expected) in cases {
            let err = create_args(args).specs().expect_err("invalid");
            let message = format!("{err:#}");
            assert!(message.starts_with(expected), "{args:?}: {message}");
        }
        let bad_values: &[(&[&str], &str)] = &[
            (
                &["--selector", "unix"],
                "invalid selector \"unix\": selector \"unix\" must have the form type:value",
            ),
            (
                &["--selector", "unix:uid:1", "--x509-svid-ttl", "an hour"],
                "x509_svid_ttl is invalid: invalid duration \"an hour\"",
            ),
            (
                &["--selector", "unix:uid:1", "--jwt-svid-ttl", "1.5s"],
                "jwt_svid_ttl is invalid: duration \"1.5s\" is not a whole number of seconds",
            ),
            (
                &["--selector", "unix:uid:1", "--expires-at", "next week"],
                "expires_at is invalid: invalid time \"next week\"",
            ),
            (
                &[
                    "--selector",
                    "unix:uid:1",
                    "--federates-with",
                    "Partner.org",
                ],
                "federates_with is invalid: ",
            ),
        ];
        for (args, expected) in bad_values {
            let all = [&base[..], args].concat();
            let err = create_args(&all).specs().expect_err("invalid");
            let message = format!("{err:#}");
            assert!(message.starts_with(expected), "{args:?}: {message}");
            assert!(!message.contains('\n'));
        }
    }

    #[test]
    fn data_files_conflict_with_entry_flags() {
        assert!(parse(&["create", "--data", "x.json", "--spiffe-id", "spiffe://a/b"]).is_err());
        assert!(parse(&["create", "--data", "x.json", "--owner", "me"]).is_err());
        assert!(parse(&["create", "--data", "x.json", "--entry-id", "e"]).is_err());
        assert!(parse(&["update", "--data", "x.json", "--hint", "h"]).is_err());
        assert!(parse(&["create", "--data", "x.json"]).is_ok());
        assert!(
            parse(&["update"]).is_err(),
            "update needs --entry-id or --data"
        );
    }

    #[test]
    fn data_files_with_governance_fields_become_the_request() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("entries.json");
        std::fs::write(
            &path,
            r#"{"entries": [
                {"spiffe_id": "spiffe://example.org/a", "parent_id": "spiffe://example.org/spire/server",
                 "selectors": ["unix:uid:1"], "owner": "team-a", "ticket": "CHG-1"},
                {"spiffe_id": {"trust_domain": "example.org", "path": "/b"},
                 "parent_id": {"trust_domain": "example.org", "path": "/a"},
                 "selectors": [{"type": "unix", "value": "uid:2"}], "reason": "batch job"}
            ]}"#,
        )
        .expect("write");
        let args = create_args(&["--data", path.to_str().expect("utf-8")]);
        let specs = args.specs().expect("valid");
        let request = create_request(&specs);
        assert_eq!(request.entries.len(), 2);
        assert_eq!(request.entries[0].spiffe_id, Some(id("example.org", "/a")));
        assert_eq!(request.entries[1].parent_id, Some(id("example.org", "/a")));
        assert_eq!(request.entries[1].selectors, [selector("unix", "uid:2")]);
        assert_eq!(specs[0].metadata, metadata("team-a", "", "CHG-1"));
        assert_eq!(specs[1].metadata, metadata("", "batch job", ""));

        std::fs::write(
            &path,
            r#"{"entries": [{"spiffe_id": "spiffe://example.org/a"}]}"#,
        )
        .expect("write");
        let err = create_args(&["--data", path.to_str().expect("utf-8")])
            .specs()
            .expect_err("missing fields");
        assert!(
            format!("{err:#}").ends_with("entries[0]: parent_id is required"),
            "{err:#}"
        );
    }

    #[test]
    fn updates_send_only_the_given_fields() {
        let args = update_args(&[
            "--entry-id",
            "web-1",
            "--selector",
            "unix:uid:1001",
            "--admin=false",
            "--hint",
            "",
            "--owner",
            "team-web",
        ]);
        let specs = args.specs().expect("valid");
        let requests = update_requests(&specs);
        assert_eq!(requests.len(), 1);
        let (request, members) = &requests[0];
        assert_eq!(members, &[0]);
        assert_eq!(
            request.input_mask,
            Some(types::EntryMask {
                selectors: true,
                admin: true,
                hint: true,
                ..Default::default()
            })
        );
        assert_eq!(request.entries[0].id, "web-1");
        assert_eq!(request.entries[0].selectors, [selector("unix", "uid:1001")]);
        assert!(!request.entries[0].admin);
        assert_eq!(specs[0].metadata, metadata("team-web", "", ""));

        // Metadata alone sends no entry update.
        let specs = update_args(&["--entry-id", "web-1", "--ticket", "CHG-9"])
            .specs()
            .expect("valid");
        assert!(update_requests(&specs).is_empty());

        let err = update_args(&["--entry-id", "web-1"])
            .specs()
            .expect_err("empty");
        assert_eq!(
            format!("{err:#}"),
            "nothing to update; give at least one field to change"
        );
    }

    #[test]
    fn data_updates_need_an_id_and_a_change_per_entry() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("updates.json");
        let path_text = path.to_str().expect("utf-8");
        let cases = [
            (
                r#"{"entries": [{"hint": "h"}]}"#,
                "entries[0]: the entry ID is required",
            ),
            (
                r#"{"entries": [{"id": "a", "hint": "h"}, {"id": "b"}]}"#,
                "entries[1]: nothing to update",
            ),
        ];
        for (json, expected) in cases {
            std::fs::write(&path, json).expect("write");
            let err = update_args(&["--data", path_text])
                .specs()
                .expect_err("invalid");
            assert!(format!("{err:#}").starts_with(expected), "{err:#}");
        }
        std::fs::write(&path, r#"{"entries": [{"id": "a", "owner": "me"}]}"#).expect("write");
        let specs = update_args(&["--data", path_text]).specs().expect("valid");
        assert_eq!(specs[0].metadata, metadata("me", "", ""));
    }

    #[test]
    fn batch_updates_group_entries_by_their_fields() {
        let mut hint_only = EntrySpec::default();
        hint_only.entry.id = "a".into();
        hint_only.fields.hint = true;
        let mut ttl_only = EntrySpec::default();
        ttl_only.entry.id = "b".into();
        ttl_only.fields.x509_svid_ttl = true;
        let mut hint_again = hint_only.clone();
        hint_again.entry.id = "c".into();
        let requests = update_requests(&[hint_only, ttl_only, hint_again]);
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0].1, [0, 2]);
        assert_eq!(requests[1].1, [1]);
        let ids: Vec<&str> = requests[0]
            .0
            .entries
            .iter()
            .map(|e| e.id.as_str())
            .collect();
        assert_eq!(ids, ["a", "c"]);
    }

    #[test]
    fn metadata_updates_keep_stored_values_not_given() {
        let stored = sample_metadata();
        let merged = metadata("", "", "CHG-99").merged_onto(&stored.entry_id, Some(&stored));
        assert_eq!(merged.owner, "team-web");
        assert_eq!(merged.reason, "serves the storefront");
        assert_eq!(merged.ticket, "CHG-99");
        let fresh = metadata("me", "", "").merged_onto("e", None);
        assert_eq!((fresh.owner.as_str(), fresh.reason.as_str()), ("me", ""));
    }

    #[test]
    fn show_filters_become_the_list_filter() {
        let args = show_args(&[
            "--spiffe-id",
            "spiffe://example.org/web",
            "--parent-id",
            "spiffe://example.org/agent",
            "--selector",
            "unix:uid:1000",
            "--match",
            "exact",
            "--federates-with",
            "partner.org",
            "--match-federates-with",
            "any",
            "--hint",
            "external",
            "--downstream",
        ]);
        let filter = args.filter.to_filter().expect("valid");
        assert_eq!(filter.by_spiffe_id, Some(id("example.org", "/web")));
        assert_eq!(filter.by_parent_id, Some(id("example.org", "/agent")));
        assert_eq!(
            filter.by_selectors,
            Some(types::SelectorMatch {
                selectors: vec![selector("unix", "uid:1000")],
                r#match: selector_match::MatchBehavior::MatchExact as i32,
            })
        );
        assert_eq!(
            filter.by_federates_with,
            Some(types::FederatesWithMatch {
                trust_domains: vec!["partner.org".into()],
                r#match: federates_with_match::MatchBehavior::MatchAny as i32,
            })
        );
        assert_eq!(filter.by_hint.as_deref(), Some("external"));
        assert_eq!(filter.by_downstream, Some(true));

        // SPIRE's default match is superset, and unset filters stay unset.
        let filter = show_args(&["--selector", "unix:uid:1"])
            .filter
            .to_filter()
            .expect("valid");
        assert_eq!(
            filter.by_selectors.map(|m| m.r#match),
            Some(selector_match::MatchBehavior::MatchSuperset as i32)
        );
        assert_eq!(filter.by_hint, None);
        assert_eq!(filter.by_downstream, None);
        assert_eq!(filter.by_spiffe_id, None);

        assert!(parse(&["show", "--entry-id", "e", "--hint", "h"]).is_err());
        assert!(parse(&["show", "--entry-id", "e"]).is_ok());
        assert!(parse(&["show", "--match", "most"]).is_err());
    }

    #[test]
    fn entry_lists_print_pretty_and_json() {
        let entry = sample_entry();
        let mut metadata = HashMap::new();
        metadata.insert(entry.id.clone(), sample_metadata());
        let mut other = sample_entry();
        other.id = "no-metadata".into();

        let mut pretty = Vec::new();
        write_entries(
            &mut pretty,
            &[entry.clone(), other.clone()],
            &metadata,
            false,
        )
        .expect("writes");
        let pretty = String::from_utf8(pretty).expect("utf-8");
        assert!(pretty.starts_with("Found 2 entries\nEntry ID         : 6f0b7c1e"));
        assert_eq!(pretty.matches("Owner            : team-web").count(), 1);

        let mut json = Vec::new();
        write_entries(&mut json, &[entry, other], &metadata, true).expect("writes");
        let value: Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(value["entries"][0]["owner"], "team-web");
        assert_eq!(value["entries"][1]["id"], "no-metadata");
        assert!(value["entries"][1].get("owner").is_none());
        // The document feeds back into `entry create --data`.
        let specs = data::parse_entries(&json).expect("parses");
        assert_eq!(specs.len(), 2);
    }

    #[test]
    fn batch_results_print_every_item_then_fail() {
        let created = sample_entry();
        let mut ok = ItemOutcome::new(&EntrySpec {
            entry: created.clone(),
            fields: types::EntryMask::default(),
            metadata: metadata("team-web", "", ""),
        });
        ok.entry = Some(created.clone());
        ok.metadata = Some(sample_metadata());
        ok.metadata_status = Some(ok_status());
        let mut failed = ItemOutcome::new(&EntrySpec {
            entry: created,
            ..Default::default()
        });
        failed.status = types::Status {
            code: tonic::Code::AlreadyExists as i32,
            message: "similar entry already exists".into(),
        };

        let mut out = Vec::new();
        let err = report_outcomes(&mut out, &[ok.clone(), failed.clone()], "create", false)
            .expect_err("one failed");
        assert_eq!(format!("{err:#}"), "1 of 2 entries failed");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains("Owner            : team-web\n"));
        assert!(text.contains(
            "Failed to create the following entry (code: AlreadyExists, msg: \"similar entry already exists\"):\n"
        ));

        let mut out = Vec::new();
        report_outcomes(&mut out, &[ok.clone()], "create", true).expect("all succeeded");
        let value: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(value["results"][0]["status"]["code"], 0);
        assert_eq!(value["results"][0]["entry"]["owner"], "team-web");
        assert_eq!(value["results"][0]["metadata_status"]["code"], 0);

        let mut metadata_failed = ok;
        metadata_failed.metadata = None;
        metadata_failed.metadata_status = Some(types::Status {
            code: tonic::Code::InvalidArgument as i32,
            message: "owner is too long".into(),
        });
        let mut out = Vec::new();
        report_outcomes(&mut out, &[metadata_failed], "create", false)
            .expect_err("metadata failed");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains("Failed to set the owner, reason and ticket of entry 6f0b7c1e-2b1a-4c7e-9d62-0c4b3f1a9e10 (code: InvalidArgument, msg: \"owner is too long\")"), "{text}");
    }
}
