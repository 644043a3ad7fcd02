//! `lanyard entry create|show|update|delete|count`: registration entries through SPIRE's Entry
//! API, and their owner, reason and ticket through Lanyard's EntryMetadataService (they are
//! not fields of SPIRE's `Entry` message).
//!
//! Creates and updates go through Lanyard's GovernedEntryService, which stores an entry and
//! its metadata together, so that the policy judges the entry as it will be stored. A server
//! without it (SPIRE) answers UNIMPLEMENTED, and the command falls back to SPIRE's
//! BatchCreateEntry/BatchUpdateEntry followed by SetEntryMetadata.

pub(crate) mod data;

use std::io::{Read as _, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Subcommand};
use lanyard_core::RegistrationEntry;
use lanyard_proto::convert::ok_status;
use lanyard_proto::convert::{entry_metadata_to_proto, entry_to_proto};
use lanyard_proto::lanyard::api::v1::EntryMetadata;
use lanyard_proto::spire::api::server::entry::v1::{count_entries_request, list_entries_request};
use lanyard_proto::spire::api::types;
use serde_json::{Value, json};

use crate::admin::{EntrySpec, ItemOutcome, MetadataSpec, describe_status, is_ok, mask_is_empty};
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

async fn create(args: &CreateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let specs = args.specs()?;
    let client = args.socket.connect().await?;
    let outcomes = client.create_entries(&specs).await?;
    report_outcomes(out, &outcomes, "create", args.output.is_json())
}

async fn update(args: &UpdateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let specs = args.specs()?;
    let client = args.socket.connect().await?;
    let outcomes = client.update_entries(&specs, args.revision).await?;
    report_outcomes(out, &outcomes, "update", args.output.is_json())
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
        Ok(self.to_filter()?.into())
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
        (Some(id), _) => vec![client.entry(id).await?],
        (None, filter) => client.entries(filter.unwrap_or_default()).await?,
    };
    write_entries(out, &entries, args.output.is_json())
}

/// The governance metadata of a stored entry, when it has any.
fn metadata_of(entry: &RegistrationEntry) -> Option<EntryMetadata> {
    let has_any = entry.owner.is_some()
        || entry.reason.is_some()
        || entry.ticket.is_some()
        || entry.source.is_some();
    has_any.then(|| entry_metadata_to_proto(entry))
}

/// Prints a list of entries with their metadata.
fn write_entries(
    out: &mut dyn Write,
    entries: &[RegistrationEntry],
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let entries: Vec<Value> = entries
            .iter()
            .map(|entry| entry_json(&entry_to_proto(entry, None), metadata_of(entry).as_ref()))
            .collect();
        return write_json(out, &json!({ "entries": entries }));
    }
    writeln!(
        out,
        "Found {}",
        count_noun(entries.len(), "entry", "entries")
    )?;
    for entry in entries {
        let metadata = metadata_of(entry);
        write_entry_pretty(out, &entry_to_proto(entry, None), metadata.as_ref())?;
        write_source_pretty(out, metadata.as_ref())?;
        writeln!(out)?;
    }
    Ok(())
}

async fn delete(args: &DeleteArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let client = args.socket.connect().await?;
    let results = client.delete_entries(&args.entry_ids).await?;
    if args.output.is_json() {
        let items: Vec<Value> = results
            .iter()
            .map(|(id, status)| json!({ "status": status_json(Some(status)), "id": id }))
            .collect();
        write_json(out, &json!({ "results": items }))?;
    } else {
        for (id, status) in &results {
            if is_ok(Some(status)) {
                writeln!(out, "Deleted entry with ID: {id}")?;
            } else {
                writeln!(
                    out,
                    "Failed to delete entry with ID {id} {}",
                    status_text(Some(status))
                )?;
            }
        }
    }
    let failed = results
        .iter()
        .filter(|(_, status)| !is_ok(Some(status)))
        .count();
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
    let count = client.count_entries(filter).await?;
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
    use lanyard_proto::spire::api::server::entry::v1::BatchCreateEntryRequest;

    use crate::admin::{create_request, update_requests};
    use crate::cli::output::tests::{sample_entry, sample_metadata};
    use crate::cli::{Cli, Command};

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
        let metadata = sample_metadata();
        let entry =
            lanyard_proto::convert::stored_entry_from_proto(&sample_entry(), Some(&metadata))
                .expect("readable");
        let mut other = entry.clone();
        other.id = lanyard_core::EntryId::new("no-metadata").unwrap();
        other.owner = None;
        other.reason = None;
        other.ticket = None;
        other.source = None;

        let mut pretty = Vec::new();
        write_entries(&mut pretty, &[entry.clone(), other.clone()], false).expect("writes");
        let pretty = String::from_utf8(pretty).expect("utf-8");
        assert!(pretty.starts_with("Found 2 entries\nEntry ID         : 6f0b7c1e"));
        assert_eq!(pretty.matches("Owner            : team-web").count(), 1);

        let mut json = Vec::new();
        write_entries(&mut json, &[entry, other], true).expect("writes");
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
