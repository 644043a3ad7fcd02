//! `lanyard plan|apply -f entries.toml`: declared entries. A file declares the entries one
//! source (a label such as `payments`) should have; `plan` compares them with the server and
//! `apply` makes the server match, through GovernedEntryService so that every entry is
//! judged by the policy with its owner, reason and ticket, and stored with the label.
//!
//! An entry's identity is SPIRE's similarity key: SPIFFE ID, parent ID and selector set. A
//! server entry with the same key but another source, or none, is a conflict and is left
//! alone. With `--prune`, server entries carrying this file's label that the file no longer
//! declares are deleted; entries with another label or none never are.
//!
//! The file:
//!
//! ```toml
//! source = "payments"
//!
//! [[entry]]
//! spiffe_id = "spiffe://example.org/payments/api"
//! parent_id = "spiffe://example.org/spire/agent/join_token/node-1"
//! selectors = ["unix:uid:1000"]
//! owner = "team-payments"
//! reason = "serves the payments API"
//! expires_at = "2030-01-01T00:00:00Z"
//! x509_svid_ttl = "1h"
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use lanyard_core::entry::SimilarityKey;
use lanyard_core::{RegistrationEntry, SpiffeId};
use lanyard_proto::convert::{entry_from_proto, entry_to_proto};
use lanyard_proto::lanyard::api::v1::{
    EntryMetadata, EntryMetadataMask, GovernedEntryUpdate, delete_governed_entries_request,
};
use lanyard_proto::spire::api::server::entry::v1::list_entries_request;
use lanyard_proto::spire::api::types;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admin::{Admin, CHANGED_SINCE_READ, describe_status, governed_entry};
use crate::cli::client::SocketArgs;
use crate::cli::grant::GRANT_SOURCE;
use crate::cli::output::{OutputArgs, count_noun, write_json};
use crate::cli::parse::{self, format_ttl, format_unix_time};
use crate::cli::{Exit, QuietExit};

#[derive(Debug, Args)]
pub(crate) struct PlanArgs {
    /// The declared entries file (TOML).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: PathBuf,
    /// Also plan deleting entries with this file's source that it no longer declares.
    #[arg(long)]
    prune: bool,
    /// Save the plan (the file, and the revision of every entry it would change or delete) to
    /// this file, for `apply --plan`.
    #[arg(long, value_name = "PLAN_FILE")]
    out: Option<PathBuf>,
    /// Exit 3 when there are changes to apply and 0 when there are none (an error, conflicts
    /// included, is still 1).
    #[arg(long)]
    exit_code: bool,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ApplyArgs {
    /// The declared entries file (TOML).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: PathBuf,
    /// Also delete entries with this file's source that it no longer declares.
    #[arg(long)]
    prune: bool,
    /// Apply exactly the plan that `plan --out` saved: if the file, or any entry the plan
    /// would change or delete, changed since, nothing is applied. (`--prune` comes from the
    /// saved plan.)
    #[arg(long, value_name = "PLAN_FILE", conflicts_with = "prune")]
    plan: Option<PathBuf>,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

// ---------------------------------------------------------------------------------------------
// The file.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    source: Option<String>,
    #[serde(default)]
    entry: Vec<toml::Spanned<RawEntry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    spiffe_id: String,
    parent_id: String,
    selectors: Vec<String>,
    owner: Option<String>,
    reason: Option<String>,
    ticket: Option<String>,
    expires_at: Option<toml::Value>,
    x509_svid_ttl: Option<toml::Value>,
    jwt_svid_ttl: Option<toml::Value>,
    #[serde(default)]
    dns_names: Vec<String>,
    hint: Option<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    downstream: bool,
    #[serde(default)]
    federates_with: Vec<String>,
    #[serde(default)]
    store_svid: bool,
}

/// A checked declared entries file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DeclaredFile {
    pub(crate) source: String,
    pub(crate) entries: Vec<Declared>,
    /// The file's text, which a saved plan keeps.
    pub(crate) text: String,
}

/// One declared entry: the entry as it should be stored (without ID), its similarity key and
/// its metadata.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Declared {
    pub(crate) entry: types::Entry,
    pub(crate) key: EntryKey,
    pub(crate) owner: String,
    pub(crate) reason: String,
    pub(crate) ticket: String,
    /// Where it is in the file, for messages.
    pub(crate) line: usize,
}

/// An entry's similarity key (`lanyard-core`'s: same SPIFFE ID, parent and selector set, the
/// same entry), with the ways a plan shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct EntryKey(SimilarityKey);

impl EntryKey {
    fn of(entry: &RegistrationEntry) -> Self {
        Self(entry.similarity_key())
    }

    fn spiffe_id(&self) -> &SpiffeId {
        &self.0.spiffe_id
    }

    fn parent_id(&self) -> &SpiffeId {
        &self.0.parent_id
    }

    fn selectors(&self) -> Vec<String> {
        self.0.selectors.iter().map(ToString::to_string).collect()
    }

    fn selectors_text(&self) -> String {
        self.selectors().join(" ")
    }

    fn json(&self) -> Value {
        json!({
            "spiffe_id": self.spiffe_id().to_string(),
            "parent_id": self.parent_id().to_string(),
            "selectors": self.selectors(),
        })
    }

    /// `spiffe://…/web (parent spiffe://…, unix:uid:1000)`.
    fn text(&self) -> String {
        format!(
            "{} (parent {}, {})",
            self.spiffe_id(),
            self.parent_id(),
            self.selectors_text()
        )
    }
}

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |before| before.matches('\n').count())
        + 1
}

fn line_of_span(text: &str, span: Option<Range<usize>>) -> Option<usize> {
    span.map(|span| line_of(text, span.start))
}

/// Reads and checks a declared entries file; nothing is sent to a server before the whole
/// file is valid.
pub(crate) fn read_file(path: &Path) -> anyhow::Result<DeclaredFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_file(&text).with_context(|| path.display().to_string())
}

pub(crate) fn parse_file(text: &str) -> anyhow::Result<DeclaredFile> {
    let raw: RawFile = toml::from_str(text).map_err(|err| {
        let message = err.message().trim().to_owned();
        match line_of_span(text, err.span()) {
            Some(line) => anyhow!("line {line}: {message}"),
            None => anyhow!("{message}"),
        }
    })?;
    let source = raw
        .source
        .ok_or_else(|| anyhow!("`source` is required: the label of the entries this file owns"))?;
    let source = source.trim().to_owned();
    if source.is_empty() {
        bail!("`source` must not be empty");
    }
    if source == GRANT_SOURCE {
        bail!("`source` must not be {GRANT_SOURCE:?}, the label of just-in-time grants");
    }
    let mut entries = Vec::with_capacity(raw.entry.len());
    let mut seen: HashMap<EntryKey, usize> = HashMap::new();
    for (index, spanned) in raw.entry.into_iter().enumerate() {
        let line = line_of(text, spanned.span().start);
        let declared = check_entry(spanned.into_inner(), line)
            .with_context(|| format!("entry[{index}] (line {line})"))?;
        let key = declared.key.clone();
        if let Some(first) = seen.insert(key.clone(), line) {
            bail!(
                "entry[{index}] (line {line}) declares the same entry as line {first}: {}",
                key.text()
            );
        }
        entries.push(declared);
    }
    Ok(DeclaredFile {
        source,
        entries,
        text: text.to_owned(),
    })
}

fn optional_text(value: Option<String>) -> String {
    value.unwrap_or_default()
}

fn ttl_value(value: &toml::Value) -> anyhow::Result<i32> {
    match value {
        toml::Value::String(text) => parse::ttl_seconds(text),
        toml::Value::Integer(seconds) => i32::try_from(*seconds)
            .ok()
            .filter(|s| *s >= 0)
            .ok_or_else(|| anyhow!("{seconds} is not a number of seconds")),
        other => bail!(
            "expected a duration such as \"1h\" or seconds, found {}",
            other.type_str()
        ),
    }
}

fn time_value(value: &toml::Value) -> anyhow::Result<i64> {
    match value {
        toml::Value::String(text) => parse::unix_time(text),
        toml::Value::Datetime(datetime) => parse::unix_time(&datetime.to_string()),
        toml::Value::Integer(seconds) => Ok(*seconds),
        other => bail!("expected an RFC 3339 time, found {}", other.type_str()),
    }
}

fn check_entry(raw: RawEntry, line: usize) -> anyhow::Result<Declared> {
    if raw.selectors.is_empty() {
        bail!("selectors: at least one selector is required");
    }
    let mut entry = types::Entry {
        spiffe_id: Some(parse::spiffe_id(&raw.spiffe_id).context("spiffe_id")?),
        parent_id: Some(parse::spiffe_id(&raw.parent_id).context("parent_id")?),
        selectors: parse::selectors(&raw.selectors).context("selectors")?,
        admin: raw.admin,
        downstream: raw.downstream,
        store_svid: raw.store_svid,
        hint: optional_text(raw.hint),
        ..Default::default()
    };
    if let Some(value) = &raw.expires_at {
        entry.expires_at = time_value(value).context("expires_at")?;
    }
    if let Some(value) = &raw.x509_svid_ttl {
        entry.x509_svid_ttl = ttl_value(value).context("x509_svid_ttl")?;
    }
    if let Some(value) = &raw.jwt_svid_ttl {
        entry.jwt_svid_ttl = ttl_value(value).context("jwt_svid_ttl")?;
    }
    for name in &raw.dns_names {
        if name.trim().is_empty() {
            bail!("dns_names: a DNS name is empty");
        }
    }
    entry.dns_names = raw.dns_names;
    entry.federates_with = raw
        .federates_with
        .iter()
        .map(|td| parse::trust_domain(td))
        .collect::<anyhow::Result<_>>()
        .context("federates_with")?;
    let key = EntryKey(entry_from_proto(&entry)?.similarity_key());
    Ok(Declared {
        entry,
        key,
        owner: optional_text(raw.owner),
        reason: optional_text(raw.reason),
        ticket: optional_text(raw.ticket),
        line,
    })
}

// ---------------------------------------------------------------------------------------------
// The plan.

/// One field that differs: its name and the stored and declared values.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FieldChange {
    pub(crate) field: &'static str,
    pub(crate) old: Value,
    pub(crate) new: Value,
}

#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) declared: usize,
    pub(crate) stored: RegistrationEntry,
    pub(crate) fields: Vec<FieldChange>,
}

#[derive(Debug, Clone)]
pub(crate) struct Conflict {
    pub(crate) declared: usize,
    pub(crate) entry_id: String,
    /// The other source, or `None` for an unlabelled entry.
    pub(crate) owned_by: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Plan {
    /// Declared entries not on the server (indexes into the file's entries).
    pub(crate) creates: Vec<usize>,
    pub(crate) changes: Vec<Change>,
    /// With `--prune`: this source's entries that the file no longer declares.
    pub(crate) deletes: Vec<RegistrationEntry>,
    /// Without `--prune`: the same entries, left alone.
    pub(crate) undeclared: Vec<RegistrationEntry>,
    pub(crate) conflicts: Vec<Conflict>,
    pub(crate) unchanged: usize,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.creates.is_empty() && self.changes.is_empty() && self.deletes.is_empty()
    }
}

fn sorted(values: &[String]) -> Vec<String> {
    let mut values = values.to_vec();
    values.sort();
    values
}

/// The fields of `declared` that differ from the stored entry, compared in the entry's wire
/// encoding (what `apply` sends), and its governance fields.
fn differences(declared: &Declared, stored: &RegistrationEntry) -> Vec<FieldChange> {
    let mut fields = Vec::new();
    let mut compare = |field: &'static str, old: Value, new: Value| {
        if old != new {
            fields.push(FieldChange { field, old, new });
        }
    };
    let want = &declared.entry;
    let have = entry_to_proto(stored, None);
    compare(
        "x509_svid_ttl",
        json!(have.x509_svid_ttl),
        json!(want.x509_svid_ttl),
    );
    compare(
        "jwt_svid_ttl",
        json!(have.jwt_svid_ttl),
        json!(want.jwt_svid_ttl),
    );
    compare("expires_at", json!(have.expires_at), json!(want.expires_at));
    compare("dns_names", json!(have.dns_names), json!(want.dns_names));
    compare(
        "federates_with",
        json!(sorted(&have.federates_with)),
        json!(sorted(&want.federates_with)),
    );
    compare("admin", json!(have.admin), json!(want.admin));
    compare("downstream", json!(have.downstream), json!(want.downstream));
    compare("store_svid", json!(have.store_svid), json!(want.store_svid));
    compare("hint", json!(have.hint), json!(want.hint));
    let text = |value: &Option<String>| json!(value.clone().unwrap_or_default());
    compare("owner", text(&stored.owner), json!(declared.owner));
    compare("reason", text(&stored.reason), json!(declared.reason));
    compare("ticket", text(&stored.ticket), json!(declared.ticket));
    fields
}

/// Compares the declared entries with the server's (with their governance fields).
pub(crate) fn make_plan(
    file: &DeclaredFile,
    server_entries: &[RegistrationEntry],
    prune: bool,
) -> Plan {
    let mut by_key: BTreeMap<EntryKey, &RegistrationEntry> = BTreeMap::new();
    for entry in server_entries {
        by_key.entry(EntryKey::of(entry)).or_insert(entry);
    }
    let mut plan = Plan::default();
    let mut declared_keys = BTreeSet::new();
    for (index, declared) in file.entries.iter().enumerate() {
        declared_keys.insert(declared.key.clone());
        let Some(stored) = by_key.get(&declared.key) else {
            plan.creates.push(index);
            continue;
        };
        let source = stored.source.as_deref().unwrap_or_default();
        if source != file.source {
            plan.conflicts.push(Conflict {
                declared: index,
                entry_id: stored.id.to_string(),
                owned_by: (!source.is_empty()).then(|| source.to_owned()),
            });
            continue;
        }
        let fields = differences(declared, stored);
        if fields.is_empty() {
            plan.unchanged += 1;
        } else {
            plan.changes.push(Change {
                declared: index,
                stored: (*stored).clone(),
                fields,
            });
        }
    }
    for entry in server_entries {
        let labelled = entry.source.as_deref() == Some(file.source.as_str());
        if labelled && !declared_keys.contains(&EntryKey::of(entry)) {
            if prune {
                plan.deletes.push(entry.clone());
            } else {
                plan.undeclared.push(entry.clone());
            }
        }
    }
    plan
}

/// Which SPIFFE IDs gain a holder (a new entry: parent and selectors that can now obtain
/// it) and which lose one. Changes keep the key, so only creates and deletes count.
fn holders(file: &DeclaredFile, plan: &Plan) -> (Vec<EntryKey>, Vec<EntryKey>) {
    let gained = plan
        .creates
        .iter()
        .map(|&i| file.entries[i].key.clone())
        .collect();
    let lost = plan.deletes.iter().map(EntryKey::of).collect();
    (gained, lost)
}

fn value_text(field: &str, value: &Value) -> String {
    match (field, value) {
        ("x509_svid_ttl" | "jwt_svid_ttl", Value::Number(n)) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .map_or_else(|| n.to_string(), format_ttl),
        ("expires_at", Value::Number(n)) => {
            n.as_i64().map_or_else(|| n.to_string(), format_unix_time)
        }
        (_, Value::String(text)) => format!("{text:?}"),
        (_, Value::Array(items)) => {
            let items: Vec<String> = items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map_or_else(|| item.to_string(), str::to_owned)
                })
                .collect();
            format!("[{}]", items.join(", "))
        }
        (_, other) => other.to_string(),
    }
}

fn plan_json(file: &DeclaredFile, plan: &Plan) -> Value {
    let key_of = |i: usize| file.entries[i].key.clone();
    let with_id = |key: EntryKey, id: &str| {
        let mut value = key.json();
        value["entry_id"] = json!(id);
        value
    };
    let (gained, lost) = holders(file, plan);
    json!({
        "source": file.source,
        "creates": plan.creates.iter().map(|&i| key_of(i).json()).collect::<Vec<_>>(),
        "changes": plan.changes.iter().map(|change| {
            let mut value = with_id(key_of(change.declared), change.stored.id.as_str());
            value["revision"] = json!(change.stored.revision_number);
            value["fields"] = change.fields.iter().map(|f| json!({
                "field": f.field, "old": f.old, "new": f.new,
            })).collect();
            value
        }).collect::<Vec<_>>(),
        "deletes": plan.deletes.iter().map(|e| {
            let mut value = with_id(EntryKey::of(e), e.id.as_str());
            value["revision"] = json!(e.revision_number);
            value
        }).collect::<Vec<_>>(),
        "undeclared": plan.undeclared.iter().map(|e| with_id(EntryKey::of(e), e.id.as_str())).collect::<Vec<_>>(),
        "conflicts": plan.conflicts.iter().map(|c| {
            let mut value = with_id(key_of(c.declared), &c.entry_id);
            value["owned_by"] = json!(c.owned_by);
            value
        }).collect::<Vec<_>>(),
        "unchanged": plan.unchanged,
        "holders": {
            "gained": gained.iter().map(EntryKey::json).collect::<Vec<_>>(),
            "lost": lost.iter().map(EntryKey::json).collect::<Vec<_>>(),
        },
    })
}

fn conflict_text(conflict: &Conflict) -> String {
    match &conflict.owned_by {
        Some(source) => format!(
            "entry {} is owned by source {source:?}; left alone",
            conflict.entry_id
        ),
        None => format!(
            "entry {} is unlabelled (created outside this file); left alone",
            conflict.entry_id
        ),
    }
}

fn write_plan(out: &mut dyn Write, file: &DeclaredFile, plan: &Plan) -> anyhow::Result<()> {
    let key_of = |i: usize| file.entries[i].key.clone();
    writeln!(
        out,
        "Plan for source {:?}: {} to create, {} to change, {} to delete, {} unchanged, {}",
        file.source,
        plan.creates.len(),
        plan.changes.len(),
        plan.deletes.len(),
        plan.unchanged,
        count_noun(plan.conflicts.len(), "conflict", "conflicts"),
    )?;
    for &index in &plan.creates {
        writeln!(out, "+ create {}", key_of(index).text())?;
    }
    for change in &plan.changes {
        writeln!(
            out,
            "~ change {} [{}]",
            key_of(change.declared).text(),
            change.stored.id
        )?;
        for field in &change.fields {
            writeln!(
                out,
                "    {}: {} -> {}",
                field.field,
                value_text(field.field, &field.old),
                value_text(field.field, &field.new)
            )?;
        }
    }
    for entry in &plan.deletes {
        writeln!(
            out,
            "- delete {} [{}]",
            EntryKey::of(entry).text(),
            entry.id
        )?;
    }
    for conflict in &plan.conflicts {
        writeln!(
            out,
            "! conflict {}: {}",
            key_of(conflict.declared).text(),
            conflict_text(conflict)
        )?;
    }
    if !plan.undeclared.is_empty() {
        writeln!(
            out,
            "{} with source {:?} not in the file (--prune deletes them):",
            count_noun(plan.undeclared.len(), "entry", "entries"),
            file.source
        )?;
        for entry in &plan.undeclared {
            writeln!(out, "  {} [{}]", EntryKey::of(entry).text(), entry.id)?;
        }
    }
    let (gained, lost) = holders(file, plan);
    if !gained.is_empty() || !lost.is_empty() {
        writeln!(out, "SPIFFE IDs that gain or lose holders:")?;
        for key in &gained {
            writeln!(
                out,
                "  + {} to parent {} with {}",
                key.spiffe_id(),
                key.parent_id(),
                key.selectors_text()
            )?;
        }
        for key in &lost {
            writeln!(
                out,
                "  - {} from parent {} with {}",
                key.spiffe_id(),
                key.parent_id(),
                key.selectors_text()
            )?;
        }
    }
    if plan.is_empty() {
        writeln!(out, "No changes.")?;
    }
    Ok(())
}

/// Reads the file, then the server's entries and metadata, and plans.
async fn load(
    file: &Path,
    socket: &SocketArgs,
    prune: bool,
) -> anyhow::Result<(Admin, DeclaredFile, Plan)> {
    let declared = read_file(file)?;
    let client = socket.connect().await?;
    let entries = client
        .entries(list_entries_request::Filter::default())
        .await?;
    let plan = make_plan(&declared, &entries, prune);
    Ok((client, declared, plan))
}

fn conflicts_error(plan: &Plan) -> anyhow::Error {
    anyhow!(
        "{} left alone (same SPIFFE ID, parent and selectors as an entry this file does not own)",
        count_noun(plan.conflicts.len(), "conflict", "conflicts")
    )
}

pub(crate) async fn plan(args: PlanArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let (_, file, plan) = load(&args.file, &args.socket, args.prune).await?;
    if let Some(path) = &args.out {
        let saved = SavedPlan::of(&file.text, &file, &plan, args.prune);
        write_saved_plan(path, &saved)?;
    }
    if args.output.is_json() {
        write_json(out, &plan_json(&file, &plan))?;
    } else {
        write_plan(out, &file, &plan)?;
    }
    if !plan.conflicts.is_empty() {
        return Err(conflicts_error(&plan));
    }
    if args.exit_code && !plan.is_empty() {
        return Err(QuietExit(Exit::Changes).into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Saved plans.

/// What `plan --out` saves and `apply --plan` holds the server to: the declared file as it
/// was planned, and each planned action with the revision it was planned against.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub(crate) struct SavedPlan {
    /// The format of this file.
    pub(crate) version: u32,
    /// The declared entries file's text when it was planned.
    pub(crate) file_text: String,
    pub(crate) prune: bool,
    /// The keys of the entries to create (`EntryKey::text`).
    pub(crate) creates: Vec<String>,
    /// Entry ID and revision of each entry to change.
    pub(crate) changes: Vec<(String, i64)>,
    /// Entry ID and revision of each entry to delete.
    pub(crate) deletes: Vec<(String, i64)>,
}

const SAVED_PLAN_VERSION: u32 = 1;

impl SavedPlan {
    pub(crate) fn of(file_text: &str, file: &DeclaredFile, plan: &Plan, prune: bool) -> Self {
        let mut creates: Vec<String> = plan
            .creates
            .iter()
            .map(|&i| file.entries[i].key.text())
            .collect();
        creates.sort();
        let mut changes: Vec<(String, i64)> = plan
            .changes
            .iter()
            .map(|c| (c.stored.id.to_string(), c.stored.revision_number))
            .collect();
        changes.sort();
        let mut deletes: Vec<(String, i64)> = plan
            .deletes
            .iter()
            .map(|e| (e.id.to_string(), e.revision_number))
            .collect();
        deletes.sort();
        Self {
            version: SAVED_PLAN_VERSION,
            file_text: file_text.to_owned(),
            prune,
            creates,
            changes,
            deletes,
        }
    }

    /// What differs between this saved plan and `fresh` (the same file planned against the
    /// server now), one line each; empty when the saved plan can be applied as it is.
    pub(crate) fn drift(&self, fresh: &Self) -> Vec<String> {
        let mut drift = Vec::new();
        if self.version != SAVED_PLAN_VERSION {
            drift.push(format!(
                "the saved plan has format {}, this lanyard reads {SAVED_PLAN_VERSION}",
                self.version
            ));
            return drift;
        }
        if self.file_text != fresh.file_text {
            drift.push("the declared entries file changed since the plan".to_owned());
            return drift;
        }
        let revisions = |actions: &[(String, i64)]| -> BTreeMap<String, i64> {
            actions.iter().cloned().collect()
        };
        for (what, saved, now) in [
            (
                "change",
                revisions(&self.changes),
                revisions(&fresh.changes),
            ),
            (
                "delete",
                revisions(&self.deletes),
                revisions(&fresh.deletes),
            ),
        ] {
            for (id, revision) in &saved {
                match now.get(id) {
                    Some(current) if current == revision => {}
                    Some(current) => drift.push(format!(
                        "entry {id} was {CHANGED_SINCE_READ} (planned at revision {revision}, now at {current})"
                    )),
                    None => drift.push(format!(
                        "entry {id} was {CHANGED_SINCE_READ}: the planned {what} no longer applies"
                    )),
                }
            }
            for id in now.keys().filter(|id| !saved.contains_key(*id)) {
                drift.push(format!(
                    "entry {id} was {CHANGED_SINCE_READ}: it now needs a {what} the plan does not have"
                ));
            }
        }
        if self.creates != fresh.creates {
            drift.push(
                "the entries to create differ from the plan (someone created or deleted one since)"
                    .to_owned(),
            );
        }
        drift
    }
}

fn write_saved_plan(path: &Path, saved: &SavedPlan) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(saved)?;
    crate::cli::files::replace_file(path, text.as_bytes(), 0o600)
        .with_context(|| format!("cannot write the plan to {}", path.display()))
}

fn read_saved_plan(path: &Path) -> anyhow::Result<SavedPlan> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the saved plan {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a plan saved by `lanyard plan --out`",
            path.display()
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Applying.

/// What became of one action of `apply`.
#[derive(Debug, Clone)]
struct ActionOutcome {
    action: &'static str,
    key: EntryKey,
    entry_id: String,
    status: types::Status,
    exception_ids: Vec<String>,
}

impl ActionOutcome {
    fn ok(&self) -> bool {
        self.status.code == tonic::Code::Ok as i32
    }

    fn json(&self) -> Value {
        let mut value = self.key.json();
        value["action"] = json!(self.action);
        value["entry_id"] = json!(self.entry_id);
        value["status"] = json!({ "code": self.status.code, "message": self.status.message });
        value["exception_ids"] = json!(self.exception_ids);
        value
    }

    fn write(&self, out: &mut dyn Write) -> anyhow::Result<()> {
        if self.ok() {
            let past = match self.action {
                "create" => "created",
                "update" => "updated",
                _ => "deleted",
            };
            write!(out, "{past} {} [{}]", self.key.text(), self.entry_id)?;
            if !self.exception_ids.is_empty() {
                write!(out, " under exceptions {}", self.exception_ids.join(", "))?;
            }
            writeln!(out)?;
        } else {
            writeln!(
                out,
                "failed to {} {}: {}",
                self.action,
                self.key.text(),
                describe_status(
                    tonic::Code::from_i32(self.status.code),
                    &self.status.message
                )
            )?;
        }
        Ok(())
    }
}

fn declared_metadata(declared: &Declared, source: &str) -> EntryMetadata {
    EntryMetadata {
        entry_id: String::new(),
        owner: declared.owner.clone(),
        reason: declared.reason.clone(),
        ticket: declared.ticket.clone(),
        source: source.to_owned(),
    }
}

/// The stored entry with the declared fields over it.
fn updated_entry(stored: &types::Entry, declared: &types::Entry) -> types::Entry {
    types::Entry {
        x509_svid_ttl: declared.x509_svid_ttl,
        jwt_svid_ttl: declared.jwt_svid_ttl,
        expires_at: declared.expires_at,
        dns_names: declared.dns_names.clone(),
        federates_with: declared.federates_with.clone(),
        admin: declared.admin,
        downstream: declared.downstream,
        store_svid: declared.store_svid,
        hint: declared.hint.clone(),
        ..stored.clone()
    }
}

/// The masks of a planned change: exactly the fields the plan showed as different.
fn change_masks(change: &Change) -> (types::EntryMask, EntryMetadataMask) {
    let mut entry = types::EntryMask::default();
    let mut metadata = EntryMetadataMask {
        // The label is always (re)written: it is what makes the entry this file's.
        source: true,
        ..EntryMetadataMask::default()
    };
    for field in &change.fields {
        match field.field {
            "x509_svid_ttl" => entry.x509_svid_ttl = true,
            "jwt_svid_ttl" => entry.jwt_svid_ttl = true,
            "expires_at" => entry.expires_at = true,
            "dns_names" => entry.dns_names = true,
            "federates_with" => entry.federates_with = true,
            "admin" => entry.admin = true,
            "downstream" => entry.downstream = true,
            "store_svid" => entry.store_svid = true,
            "hint" => entry.hint = true,
            "owner" => metadata.owner = true,
            "reason" => metadata.reason = true,
            "ticket" => metadata.ticket = true,
            _ => {}
        }
    }
    (entry, metadata)
}

/// A write refused because the entry moved on since the plan read it, said so.
fn changed_since_plan(status: types::Status, planned: i64, current: i64) -> types::Status {
    if status.code != tonic::Code::Aborted as i32 {
        return status;
    }
    types::Status {
        code: status.code,
        message: format!(
            "{CHANGED_SINCE_READ} (planned at revision {planned}, now at {current}); left as it is"
        ),
    }
}

async fn perform(
    client: &Admin,
    file: &DeclaredFile,
    plan: &Plan,
) -> anyhow::Result<Vec<ActionOutcome>> {
    let mut outcomes = Vec::new();
    if !plan.creates.is_empty() {
        let entries = plan
            .creates
            .iter()
            .map(|&i| {
                let declared = &file.entries[i];
                governed_entry(
                    declared.entry.clone(),
                    declared_metadata(declared, &file.source),
                )
            })
            .collect();
        let results = client.create_governed(entries).await?;
        for (&index, result) in plan.creates.iter().zip(results) {
            outcomes.push(ActionOutcome {
                action: "create",
                key: file.entries[index].key.clone(),
                entry_id: result.entry.map(|e| e.id.to_string()).unwrap_or_default(),
                status: result.status,
                exception_ids: result.exception_ids,
            });
        }
    }
    if !plan.changes.is_empty() {
        // Only the fields the plan showed, and only over the revision it read: an entry
        // changed since is reported, not overwritten.
        let updates = plan
            .changes
            .iter()
            .map(|change| {
                let declared = &file.entries[change.declared];
                let mut metadata = declared_metadata(declared, &file.source);
                metadata.entry_id = change.stored.id.to_string();
                let (entry_mask, metadata_mask) = change_masks(change);
                GovernedEntryUpdate {
                    entry: Some(governed_entry(
                        updated_entry(&entry_to_proto(&change.stored, None), &declared.entry),
                        metadata,
                    )),
                    entry_mask: Some(entry_mask),
                    metadata_mask: Some(metadata_mask),
                    expected_revision: Some(change.stored.revision_number),
                }
            })
            .collect();
        let results = client.update_governed(updates).await?;
        for (change, result) in plan.changes.iter().zip(results) {
            outcomes.push(ActionOutcome {
                action: "update",
                key: EntryKey::of(&change.stored),
                entry_id: change.stored.id.to_string(),
                status: changed_since_plan(
                    result.status,
                    change.stored.revision_number,
                    result.current_revision,
                ),
                exception_ids: result.exception_ids,
            });
        }
    }
    if !plan.deletes.is_empty() {
        let entries = plan
            .deletes
            .iter()
            .map(|entry| delete_governed_entries_request::Item {
                id: entry.id.to_string(),
                expected_revision: Some(entry.revision_number),
            })
            .collect();
        let results = client.delete_governed(entries).await?;
        for (entry, result) in plan.deletes.iter().zip(results) {
            outcomes.push(ActionOutcome {
                action: "delete",
                key: EntryKey::of(entry),
                entry_id: entry.id.to_string(),
                status: changed_since_plan(
                    result.status,
                    entry.revision_number,
                    result.current_revision,
                ),
                exception_ids: Vec::new(),
            });
        }
    }
    Ok(outcomes)
}

pub(crate) async fn apply(args: ApplyArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let saved = args.plan.as_deref().map(read_saved_plan).transpose()?;
    let prune = saved.as_ref().map_or(args.prune, |s| s.prune);
    let (client, file, plan) = load(&args.file, &args.socket, prune).await?;
    if let Some(saved) = &saved {
        let drift = saved.drift(&SavedPlan::of(&file.text, &file, &plan, prune));
        if !drift.is_empty() {
            for line in &drift {
                writeln!(out, "conflict: {line}")?;
            }
            bail!(
                "nothing was applied: the server or the file changed since the plan ({}); run `lanyard plan` again",
                count_noun(drift.len(), "difference", "differences")
            );
        }
    }
    if !args.output.is_json() {
        write_plan(out, &file, &plan)?;
    }
    client
        .require_lanyard("declared entries cannot be applied")
        .await?;
    let outcomes = perform(&client, &file, &plan).await?;
    let failed = outcomes.iter().filter(|o| !o.ok()).count();
    if args.output.is_json() {
        write_json(
            out,
            &json!({
                "plan": plan_json(&file, &plan),
                "results": outcomes.iter().map(ActionOutcome::json).collect::<Vec<_>>(),
                "failed": failed,
                "conflicts": plan.conflicts.len(),
            }),
        )?;
    } else if !outcomes.is_empty() {
        writeln!(out, "Applying:")?;
        for outcome in &outcomes {
            outcome.write(out)?;
        }
        writeln!(
            out,
            "{} of {} done",
            outcomes.len() - failed,
            count_noun(outcomes.len(), "change", "changes")
        )?;
    }
    match (failed, plan.conflicts.is_empty()) {
        (0, true) => Ok(()),
        (0, false) => Err(conflicts_error(&plan)),
        (_, conflicts_empty) => {
            let first = outcomes
                .iter()
                .find(|o| !o.ok())
                .map(|o| describe_status(tonic::Code::from_i32(o.status.code), &o.status.message))
                .unwrap_or_default();
            let conflicts = if conflicts_empty {
                String::new()
            } else {
                format!(
                    "; {}",
                    count_noun(plan.conflicts.len(), "conflict", "conflicts")
                )
            };
            bail!(
                "{failed} of {} failed{conflicts}; first: {first}",
                count_noun(outcomes.len(), "change", "changes")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
source = "payments"

[[entry]]
spiffe_id = "spiffe://example.org/payments/api"
parent_id = "spiffe://example.org/spire/agent/join_token/n1"
selectors = ["unix:uid:1000", "unix:gid:1000"]
owner = "team-payments"
reason = "serves the API"
ticket = "CHG-1"
expires_at = 2030-01-01T00:00:00Z
x509_svid_ttl = "1h"
jwt_svid_ttl = 300
dns_names = ["api.payments.example.org"]
hint = "api"
federates_with = ["partner.org"]

[[entry]]
spiffe_id = "spiffe://example.org/payments/worker"
parent_id = "spiffe://example.org/spire/agent/join_token/n1"
selectors = ["unix:uid:1001"]
expires_at = "2030-01-01T00:00:00Z"
"#;

    fn entry(id: &str, path: &str, uid: &str) -> types::Entry {
        types::Entry {
            id: id.into(),
            spiffe_id: Some(parse::spiffe_id(&format!("spiffe://example.org{path}")).unwrap()),
            parent_id: Some(
                parse::spiffe_id("spiffe://example.org/spire/agent/join_token/n1").unwrap(),
            ),
            selectors: vec![parse::selector(&format!("unix:uid:{uid}")).unwrap()],
            expires_at: 1_893_456_000,
            ..Default::default()
        }
    }

    /// The server's entries as the admin client reads them: with their metadata.
    fn stored(
        server: &[types::Entry],
        metadata: &HashMap<String, EntryMetadata>,
    ) -> Vec<RegistrationEntry> {
        server
            .iter()
            .map(|entry| {
                lanyard_proto::convert::stored_entry_from_proto(entry, metadata.get(&entry.id))
                    .expect("a readable entry")
            })
            .collect()
    }

    fn labelled(id: &str, source: &str) -> EntryMetadata {
        EntryMetadata {
            entry_id: id.into(),
            source: source.into(),
            ..Default::default()
        }
    }

    #[test]
    fn files_parse_into_entries() {
        let file = parse_file(FILE).expect("valid");
        assert_eq!(file.source, "payments");
        assert_eq!(file.entries.len(), 2);
        let api = &file.entries[0];
        assert_eq!(api.entry.expires_at, 1_893_456_000);
        assert_eq!(api.entry.x509_svid_ttl, 3600);
        assert_eq!(api.entry.jwt_svid_ttl, 300);
        assert_eq!(api.entry.selectors.len(), 2);
        assert_eq!(api.entry.federates_with, ["partner.org"]);
        assert_eq!(
            (api.owner.as_str(), api.ticket.as_str()),
            ("team-payments", "CHG-1")
        );
        assert_eq!(api.line, 4);
        assert_eq!(file.entries[1].entry.expires_at, 1_893_456_000);
        assert_eq!(file.entries[1].owner, "");
    }

    #[test]
    fn bad_files_are_refused_with_the_place_named() {
        let cases: &[(&str, &str)] = &[
            ("x = 1\n", "unknown field `x`"),
            ("", "`source` is required"),
            ("source = \"\"\n", "`source` must not be empty"),
            ("source = \"grant\"\n", "must not be \"grant\""),
            (
                "source = \"s\"\ncolour = 1\n",
                "line 2: unknown field `colour`",
            ),
            (
                "source = \"s\"\n[[entry]]\nspiffe_id = \"spiffe://example.org/a\"\nparent_id = \"spiffe://example.org/b\"\nselectors = [\"unix:uid:1\"]\nttl = 5\n",
                "unknown field `ttl`",
            ),
            (
                "source = \"s\"\n[[entry]]\nspiffe_id = \"spiffe://example.org/a\"\nparent_id = \"spiffe://example.org/b\"\nselectors = []\n",
                "entry[0] (line 2): selectors: at least one",
            ),
            (
                "source = \"s\"\n[[entry]]\nspiffe_id = \"example.org/a\"\nparent_id = \"spiffe://example.org/b\"\nselectors = [\"unix:uid:1\"]\n",
                "entry[0] (line 2): spiffe_id: \"example.org/a\" is not a valid SPIFFE ID",
            ),
            (
                "source = \"s\"\n[[entry]]\nspiffe_id = \"spiffe://example.org/a\"\nparent_id = \"spiffe://example.org/b\"\nselectors = [\"unix:uid:1\"]\nx509_svid_ttl = \"soon\"\n",
                "entry[0] (line 2): x509_svid_ttl: invalid duration",
            ),
            (
                "source = \"s\"\n[[entry]]\nspiffe_id = \"spiffe://example.org/a\"\nparent_id = \"spiffe://example.org/b\"\nselectors = [\"unix:uid:1\"]\n[[entry]]\nspiffe_id = \"spiffe://example.org/a\"\nparent_id = \"spiffe://example.org/b\"\nselectors = [\"unix:uid:1\"]\n",
                "entry[1] (line 6) declares the same entry as line 2",
            ),
            (
                "source = \"s\"\n[[entry]]\nparent_id = \"spiffe://example.org/b\"\nselectors = [\"unix:uid:1\"]\n",
                "missing field `spiffe_id`",
            ),
        ];
        for (text, expected) in cases {
            let err = parse_file(text).expect_err(text);
            let message = format!("{err:#}");
            assert!(message.contains(expected), "{text:?}: {message}");
        }
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/entries.example.toml");
        let file = read_file(&path).expect("the example is valid");
        assert!(!file.entries.is_empty());
        assert!(
            file.entries
                .iter()
                .all(|d| !d.owner.is_empty() && !d.reason.is_empty())
        );
    }

    #[test]
    fn plans_create_change_delete_and_leave_others_alone() {
        let file = parse_file(FILE).expect("valid");
        // The worker exists with this label but another TTL; a retired entry has the label;
        // a hand-made entry has none; another file's entry has another label.
        let mut worker = entry("w", "/payments/worker", "1001");
        worker.x509_svid_ttl = 600;
        let retired = entry("r", "/payments/old", "1002");
        let by_hand = entry("h", "/payments/tool", "1003");
        let other = entry("o", "/billing", "1004");
        let server = vec![worker, retired.clone(), by_hand, other];
        let metadata: HashMap<String, EntryMetadata> = [
            labelled("w", "payments"),
            labelled("r", "payments"),
            labelled("o", "billing"),
        ]
        .into_iter()
        .map(|m| (m.entry_id.clone(), m))
        .collect();

        let plan = make_plan(&file, &stored(&server, &metadata), false);
        assert_eq!(plan.creates, [0]);
        assert_eq!(plan.changes.len(), 1);
        assert_eq!(plan.changes[0].stored.id.as_str(), "w");
        assert_eq!(
            plan.changes[0].fields,
            [FieldChange {
                field: "x509_svid_ttl",
                old: json!(600),
                new: json!(0)
            }]
        );
        assert!(plan.deletes.is_empty());
        assert_eq!(plan.undeclared.len(), 1);
        assert!(plan.conflicts.is_empty());

        let plan = make_plan(&file, &stored(&server, &metadata), true);
        let deleted: Vec<&str> = plan.deletes.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(deleted, ["r"], "only this source's undeclared entries");
        let (gained, lost) = holders(&file, &plan);
        assert_eq!(
            gained[0].spiffe_id().to_string(),
            "spiffe://example.org/payments/api"
        );
        assert_eq!(lost, [EntryKey::of(&stored(&[retired], &metadata)[0])]);

        let mut text = Vec::new();
        write_plan(&mut text, &file, &plan).expect("writes");
        let text = String::from_utf8(text).expect("utf-8");
        assert!(
            text.contains("1 to create, 1 to change, 1 to delete, 0 unchanged, 0 conflicts"),
            "{text}"
        );
        assert!(
            text.contains("    x509_svid_ttl: 10m -> default\n"),
            "{text}"
        );
        assert!(
            text.contains("- delete spiffe://example.org/payments/old"),
            "{text}"
        );
    }

    #[test]
    fn an_entry_owned_elsewhere_is_a_conflict() {
        let file = parse_file(FILE).expect("valid");
        let server = vec![entry("w", "/payments/worker", "1001")];
        let plan = make_plan(&file, &stored(&server, &HashMap::new()), true);
        assert_eq!(plan.conflicts.len(), 1);
        assert_eq!(plan.conflicts[0].owned_by, None);
        assert!(plan.deletes.is_empty());
        let metadata = HashMap::from([("w".to_owned(), labelled("w", "billing"))]);
        let plan = make_plan(&file, &stored(&server, &metadata), true);
        assert_eq!(plan.conflicts[0].owned_by.as_deref(), Some("billing"));
        assert!(conflict_text(&plan.conflicts[0]).contains("owned by source \"billing\""));
    }

    #[test]
    fn an_applied_file_plans_nothing() {
        let file = parse_file(FILE).expect("valid");
        let mut server = Vec::new();
        let mut metadata = HashMap::new();
        for (i, declared) in file.entries.iter().enumerate() {
            let id = format!("e{i}");
            let mut entry = declared.entry.clone();
            entry.id.clone_from(&id);
            server.push(entry);
            let mut stored = declared_metadata(declared, &file.source);
            stored.entry_id.clone_from(&id);
            metadata.insert(id, stored);
        }
        let plan = make_plan(&file, &stored(&server, &metadata), true);
        assert!(plan.is_empty(), "{plan:?}");
        assert_eq!(plan.unchanged, 2);
        // Updating keeps the stored identity and takes the declared fields.
        let mut stored = server[0].clone();
        stored.revision_number = 4;
        stored.hint = "old".into();
        let updated = updated_entry(&stored, &file.entries[0].entry);
        assert_eq!(updated.hint, "api");
        assert_eq!(updated.revision_number, 4);
        assert_eq!(updated.id, "e0");
    }

    #[test]
    fn a_saved_plan_holds_its_revisions_and_any_drift_is_named() {
        let file = parse_file(FILE).expect("valid");
        let mut server = Vec::new();
        let mut metadata = HashMap::new();
        for (i, declared) in file.entries.iter().enumerate() {
            let id = format!("e{i}");
            let mut entry = declared.entry.clone();
            entry.id.clone_from(&id);
            entry.hint = "stale".into();
            entry.revision_number = 3;
            server.push(entry);
            let mut stored = declared_metadata(declared, &file.source);
            stored.entry_id.clone_from(&id);
            metadata.insert(id, stored);
        }
        let plan = make_plan(&file, &stored(&server, &metadata), true);
        assert_eq!(plan.changes.len(), 2, "{plan:?}");
        let saved = SavedPlan::of(FILE, &file, &plan, true);
        assert_eq!(
            saved.changes,
            vec![("e0".to_owned(), 3), ("e1".to_owned(), 3)]
        );
        // The masks write exactly what the plan showed, and the label.
        let (entry_mask, metadata_mask) = change_masks(&plan.changes[0]);
        assert_eq!(
            entry_mask,
            types::EntryMask {
                hint: true,
                ..Default::default()
            }
        );
        assert!(metadata_mask.source && !metadata_mask.owner);
        // Nothing moved: no drift. The file read back from JSON is the same plan.
        let round_trip: SavedPlan =
            serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        assert!(round_trip.drift(&saved).is_empty());
        // One entry edited since: its revision moved, and the drift names it.
        server[1].revision_number = 4;
        let fresh = SavedPlan::of(
            FILE,
            &file,
            &make_plan(&file, &stored(&server, &metadata), true),
            true,
        );
        let drift = saved.drift(&fresh);
        assert_eq!(drift.len(), 1, "{drift:?}");
        assert!(
            drift[0].contains("e1") && drift[0].contains("revision 3, now at 4"),
            "{drift:?}"
        );
        // An entry edited into the declared state: the planned change no longer applies.
        server[1].hint = file.entries[1].entry.hint.clone();
        let fresh = SavedPlan::of(
            FILE,
            &file,
            &make_plan(&file, &stored(&server, &metadata), true),
            true,
        );
        assert!(saved.drift(&fresh)[0].contains("no longer applies"));
        // Another file.
        let other = SavedPlan::of(&format!("{FILE}\n"), &file, &plan, true);
        assert_eq!(
            saved.drift(&other),
            vec!["the declared entries file changed since the plan"]
        );
    }
}
