//! `lanyard report`: governance reports over a server's entries, their metadata, the
//! exceptions to the policy and the usage ledger. Each is a table for people, or one JSON
//! document with `--output json` (times in Unix seconds, 0 for none; durations in seconds).
//!
//! - `stale`: entries not used (issued or served to a workload) for a while.
//! - `expiring`: entries and exceptions that expire soon.
//! - `exceptions`: every exception, its status, and how many current entries it covers.
//! - `ownerless`: entries nobody answers for.
//! - `usage`: how one entry is used, per agent, with its latest issuances.
//! - `holders`: who holds unexpired SVIDs of each signing authority — the blast radius of a
//!   compromised CA key.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Subcommand};
use lanyard_core::RegistrationEntry;
use lanyard_core::ledger::{EntryUsage, Issuance};
use lanyard_core::policy::Exception;
use lanyard_proto::lanyard::api::v1::ListIssuancesRequest;
use lanyard_proto::spire::api::server::entry::v1::list_entries_request;
use serde_json::{Value, json};

use crate::cli::client::SocketArgs;
use crate::cli::output::{OutputArgs, unix_time, unix_time_or_zero, write_json};
use crate::cli::parse::{self, format_unix_time};

#[derive(Debug, Subcommand)]
pub(crate) enum ReportCommand {
    /// Entries whose SVIDs were neither issued nor served to a workload for a while (or
    /// never, and that are older than that).
    Stale(StaleArgs),
    /// Entries and active exceptions that expire within a given time.
    Expiring(ExpiringArgs),
    /// Every exception, active, expired or revoked, with how many current entries it covers.
    Exceptions(CommonArgs),
    /// Entries without an owner.
    Ownerless(CommonArgs),
    /// How an entry is used: last issued and served per agent, and its latest issuances.
    Usage(UsageArgs),
    /// Who holds unexpired SVIDs: per signing authority, or the agents holding one
    /// authority's SVIDs (what a compromise of that CA key exposes).
    Holders(HoldersArgs),
}

impl ReportCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Stale(_) => "stale",
            Self::Expiring(_) => "expiring",
            Self::Exceptions(_) => "exceptions",
            Self::Ownerless(_) => "ownerless",
            Self::Usage(_) => "usage",
            Self::Holders(_) => "holders",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        let now = SystemTime::now();
        match self {
            Self::Stale(args) => stale(&args, now, out).await,
            Self::Expiring(args) => expiring(&args, now, out).await,
            Self::Exceptions(args) => exceptions(&args, now, out).await,
            Self::Ownerless(args) => ownerless(&args, out).await,
            Self::Usage(args) => usage(&args, out).await,
            Self::Holders(args) => holders(&args, out).await,
        }
    }
}

/// The admin socket and the output format, which every report takes.
#[derive(Debug, Args)]
pub(crate) struct CommonArgs {
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct StaleArgs {
    /// How long an entry must have gone unused (e.g. 30d, 12h; bare numbers are seconds).
    #[arg(long, value_name = "DURATION", default_value = "30d")]
    unused_for: String,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ExpiringArgs {
    /// How far ahead to look (e.g. 7d, 24h; bare numbers are seconds).
    #[arg(long, value_name = "DURATION", default_value = "7d")]
    within: String,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Debug, Args)]
pub(crate) struct UsageArgs {
    /// An entry ID, or a SPIFFE ID (every entry with that ID is reported).
    #[arg(value_name = "ENTRY_ID|SPIFFE_ID")]
    target: String,
    /// How many of each entry's latest issuances to list.
    #[arg(long, value_name = "N", default_value_t = 10)]
    issuances: u32,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Debug, Args)]
pub(crate) struct HoldersArgs {
    /// Only this authority: an X.509 CA's subject key ID in hex (colons allowed) or a JWT
    /// key ID.
    #[arg(long, value_name = "ID")]
    authority: Option<String>,
    #[command(flatten)]
    common: CommonArgs,
}

// ----- stale -----

/// An entry that has not been used since before the cutoff.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StaleEntry {
    entry_id: String,
    spiffe_id: String,
    owner: String,
    /// The latest issuance or serve over all agents; `None` if never.
    last_used_at: Option<SystemTime>,
    created_at: SystemTime,
}

/// The most recent use of each entry: the latest of its last issuance and last serve over
/// every agent.
fn last_used(usage: &[EntryUsage]) -> HashMap<&str, SystemTime> {
    let mut last: HashMap<&str, SystemTime> = HashMap::new();
    for record in usage {
        let Some(used) = record.last_issued_at.max(record.last_served_at) else {
            continue;
        };
        let slot = last.entry(record.entry_id.as_str()).or_insert(used);
        *slot = (*slot).max(used);
    }
    last
}

/// The entries last used before `cutoff`, or never used and created before it.
fn stale_entries(
    entries: &[RegistrationEntry],
    usage: &[EntryUsage],
    cutoff: SystemTime,
) -> Vec<StaleEntry> {
    let last_used = last_used(usage);
    entries
        .iter()
        .filter_map(|entry| {
            let last_used_at = last_used.get(entry.id.as_str()).copied();
            let stale = last_used_at.unwrap_or(entry.created_at) < cutoff;
            stale.then(|| StaleEntry {
                entry_id: entry.id.to_string(),
                spiffe_id: entry.spiffe_id.to_string(),
                owner: owner_of(entry).to_owned(),
                last_used_at,
                created_at: entry.created_at,
            })
        })
        .collect()
}

async fn stale(args: &StaleArgs, now: SystemTime, out: &mut dyn Write) -> anyhow::Result<()> {
    let unused_for = duration_seconds("--unused-for", &args.unused_for)?;
    let client = args.common.socket.connect().await?;
    let entries = client
        .entries(list_entries_request::Filter::default())
        .await?;
    let usage = client.usage(Vec::new()).await?;
    let cutoff = now
        .checked_sub(Duration::from_secs(unused_for.unsigned_abs()))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut stale = stale_entries(&entries, &usage, cutoff);
    stale.sort_by(|a, b| {
        (a.last_used_at, a.created_at, &a.entry_id).cmp(&(
            b.last_used_at,
            b.created_at,
            &b.entry_id,
        ))
    });

    if args.common.output.is_json() {
        let entries: Vec<Value> = stale
            .iter()
            .map(|entry| {
                json!({
                    "entry_id": entry.entry_id,
                    "spiffe_id": entry.spiffe_id,
                    "owner": entry.owner,
                    "last_used_at": unix_time_or_zero(entry.last_used_at),
                    "created_at": unix_time(entry.created_at),
                })
            })
            .collect();
        return write_json(
            out,
            &json!({ "unused_for": unused_for, "cutoff": unix_time(cutoff), "entries": entries }),
        );
    }
    let mut table = Table::new(["ENTRY ID", "SPIFFE ID", "OWNER", "LAST USED", "CREATED"]);
    for entry in &stale {
        table.row([
            entry.entry_id.clone(),
            entry.spiffe_id.clone(),
            or_dash(&entry.owner),
            format_unix_time(unix_time_or_zero(entry.last_used_at)),
            time_or_dash(unix_time(entry.created_at)),
        ]);
    }
    table.write(
        out,
        &format!(
            "No entry has gone unused for {}.",
            humanise_seconds(unused_for)
        ),
    )
}

// ----- expiring -----

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expiring {
    Entry {
        id: String,
        spiffe_id: String,
        owner: String,
        expires_at: i64,
    },
    Exception {
        id: String,
        spiffe_id_pattern: String,
        entry_ids: Vec<String>,
        owner: String,
        expires_at: i64,
    },
}

impl Expiring {
    fn expires_at(&self) -> i64 {
        match self {
            Self::Entry { expires_at, .. } | Self::Exception { expires_at, .. } => *expires_at,
        }
    }

    fn id(&self) -> &str {
        match self {
            Self::Entry { id, .. } | Self::Exception { id, .. } => id,
        }
    }
}

/// Entries and exceptions (neither revoked nor already expired) whose expiry falls in
/// `(now, now + within]`, soonest first.
fn expiring_items(
    entries: &[RegistrationEntry],
    exceptions: &[Exception],
    now: SystemTime,
    within: Duration,
) -> Vec<Expiring> {
    let horizon = now.checked_add(within).unwrap_or(now);
    let in_window = |expires_at: SystemTime| expires_at > now && expires_at <= horizon;
    let mut items: Vec<Expiring> = entries
        .iter()
        .filter_map(|entry| {
            let expires_at = entry.expires_at.filter(|at| in_window(*at))?;
            Some(Expiring::Entry {
                id: entry.id.to_string(),
                spiffe_id: entry.spiffe_id.to_string(),
                owner: owner_of(entry).to_owned(),
                expires_at: unix_time(expires_at),
            })
        })
        .collect();
    items.extend(
        exceptions
            .iter()
            .filter(|e| e.is_active(now) && in_window(e.expires_at))
            .map(|e| Expiring::Exception {
                id: e.id.clone(),
                spiffe_id_pattern: e.spiffe_id_pattern.clone().unwrap_or_default(),
                entry_ids: e.entry_ids.iter().cloned().collect(),
                owner: e.owner.clone(),
                expires_at: unix_time(e.expires_at),
            }),
    );
    items.sort_by(|a, b| (a.expires_at(), a.id()).cmp(&(b.expires_at(), b.id())));
    items
}

async fn expiring(args: &ExpiringArgs, now: SystemTime, out: &mut dyn Write) -> anyhow::Result<()> {
    let within = duration_seconds("--within", &args.within)?;
    let client = args.common.socket.connect().await?;
    let entries = client
        .entries(list_entries_request::Filter::default())
        .await?;
    let exceptions = client.exceptions(true).await?;
    let items = expiring_items(
        &entries,
        &exceptions,
        now,
        Duration::from_secs(within.unsigned_abs()),
    );
    let now = unix_time(now);

    if args.common.output.is_json() {
        let items: Vec<Value> = items
            .iter()
            .map(|item| match item {
                Expiring::Entry {
                    id,
                    spiffe_id,
                    owner,
                    expires_at,
                } => json!({
                    "kind": "entry",
                    "id": id,
                    "spiffe_id": spiffe_id,
                    "owner": owner,
                    "expires_at": expires_at,
                    "expires_in": expires_at.saturating_sub(now),
                }),
                Expiring::Exception {
                    id,
                    spiffe_id_pattern,
                    entry_ids,
                    owner,
                    expires_at,
                } => json!({
                    "kind": "exception",
                    "id": id,
                    "spiffe_id_pattern": spiffe_id_pattern,
                    "entry_ids": entry_ids,
                    "owner": owner,
                    "expires_at": expires_at,
                    "expires_in": expires_at.saturating_sub(now),
                }),
            })
            .collect();
        return write_json(out, &json!({ "within": within, "expiring": items }));
    }
    let mut table = Table::new([
        "KIND",
        "ID",
        "SPIFFE ID / SCOPE",
        "OWNER",
        "EXPIRES AT",
        "EXPIRES IN",
    ]);
    for item in &items {
        let (kind, subject, owner) = match item {
            Expiring::Entry {
                spiffe_id, owner, ..
            } => ("entry", spiffe_id.clone(), owner),
            Expiring::Exception {
                spiffe_id_pattern,
                entry_ids,
                owner,
                ..
            } => ("exception", scope_text(spiffe_id_pattern, entry_ids), owner),
        };
        table.row([
            kind.to_owned(),
            item.id().to_owned(),
            subject,
            or_dash(owner),
            format_unix_time(item.expires_at()),
            humanise_seconds(item.expires_at().saturating_sub(now)),
        ]);
    }
    table.write(
        out,
        &format!("Nothing expires within {}.", humanise_seconds(within)),
    )
}

// ----- exceptions -----

/// How many of `entries` the exception's scope includes (by entry ID or SPIFFE ID pattern).
fn n_covered(exception: &Exception, entries: &[RegistrationEntry]) -> usize {
    entries
        .iter()
        .filter(|entry| exception.covers(entry.id.as_str(), entry.spiffe_id.as_ref()))
        .count()
}

async fn exceptions(args: &CommonArgs, now: SystemTime, out: &mut dyn Write) -> anyhow::Result<()> {
    let client = args.socket.connect().await?;
    let exceptions = client.exceptions(true).await?;
    let entries = client
        .entries(list_entries_request::Filter::default())
        .await?;

    if args.output.is_json() {
        let items: Vec<Value> = exceptions
            .iter()
            .map(|e| {
                json!({
                    "id": e.id,
                    "status": e.status(now).as_str(),
                    "owner": e.owner,
                    "reason": e.reason,
                    "ticket": e.ticket.as_deref().unwrap_or_default(),
                    "rules": e.rules,
                    "entry_ids": e.entry_ids,
                    "spiffe_id_pattern": e.spiffe_id_pattern.as_deref().unwrap_or_default(),
                    "expires_at": unix_time(e.expires_at),
                    "created_at": unix_time(e.created_at),
                    "created_by": e.created_by,
                    "revoked_at": unix_time_or_zero(e.revoked_at),
                    "covered_entries": n_covered(e, &entries),
                })
            })
            .collect();
        return write_json(out, &json!({ "exceptions": items }));
    }
    let mut table = Table::new([
        "ID",
        "STATUS",
        "OWNER",
        "RULES",
        "SCOPE",
        "EXPIRES AT",
        "COVERS",
    ]);
    for e in &exceptions {
        let entry_ids: Vec<String> = e.entry_ids.iter().cloned().collect();
        let rules: Vec<&str> = e.rules.iter().map(String::as_str).collect();
        table.row([
            e.id.clone(),
            e.status(now).as_str().to_owned(),
            or_dash(&e.owner),
            or_dash(&rules.join(", ")),
            scope_text(
                e.spiffe_id_pattern.as_deref().unwrap_or_default(),
                &entry_ids,
            ),
            format_unix_time(unix_time(e.expires_at)),
            n_covered(e, &entries).to_string(),
        ]);
    }
    table.write(out, "No exceptions.")
}

// ----- ownerless -----

/// The entries nobody answers for: no owner, or an empty one.
fn ownerless_entries(entries: &[RegistrationEntry]) -> Vec<&RegistrationEntry> {
    entries
        .iter()
        .filter(|entry| owner_of(entry).trim().is_empty())
        .collect()
}

/// The usage records of `entry`, one per agent that was issued or served it.
fn usage_of<'a>(usage: &'a [EntryUsage], entry: &RegistrationEntry) -> Vec<&'a EntryUsage> {
    usage
        .iter()
        .filter(|record| record.entry_id == entry.id.as_str())
        .collect()
}

async fn ownerless(args: &CommonArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let client = args.socket.connect().await?;
    let entries = client
        .entries(list_entries_request::Filter::default())
        .await?;
    let ownerless = ownerless_entries(&entries);
    let source_of = |entry: &RegistrationEntry| entry.source.clone().unwrap_or_default();

    if args.output.is_json() {
        let items: Vec<Value> = ownerless
            .iter()
            .map(|entry| {
                json!({
                    "entry_id": entry.id.as_str(),
                    "spiffe_id": entry.spiffe_id.to_string(),
                    "parent_id": entry.parent_id.to_string(),
                    "source": source_of(entry),
                    "created_at": unix_time(entry.created_at),
                })
            })
            .collect();
        return write_json(out, &json!({ "entries": items }));
    }
    let mut table = Table::new(["ENTRY ID", "SPIFFE ID", "PARENT ID", "SOURCE", "CREATED"]);
    for entry in &ownerless {
        table.row([
            entry.id.to_string(),
            entry.spiffe_id.to_string(),
            entry.parent_id.to_string(),
            or_dash(&source_of(entry)),
            time_or_dash(unix_time(entry.created_at)),
        ]);
    }
    table.write(out, "Every entry has an owner.")
}

// ----- usage -----

async fn usage(args: &UsageArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let by_spiffe_id = args.target.starts_with("spiffe://");
    let spiffe_id_filter = if by_spiffe_id {
        Some(parse::spiffe_id(&args.target)?)
    } else {
        None
    };
    let page_size = i32::try_from(args.issuances).context("--issuances is too large")?;
    let client = args.common.socket.connect().await?;
    let entries = match spiffe_id_filter {
        Some(id) => {
            let filter = list_entries_request::Filter {
                by_spiffe_id: Some(id),
                ..Default::default()
            };
            let entries = client.entries(filter).await?;
            if entries.is_empty() {
                bail!("no entry has SPIFFE ID {}", args.target);
            }
            entries
        }
        None => vec![client.entry(&args.target).await?],
    };
    let ids: Vec<String> = entries.iter().map(|entry| entry.id.to_string()).collect();
    let usage = client.usage(ids).await?;
    let mut reports = Vec::with_capacity(entries.len());
    for entry in &entries {
        let agents = usage_of(&usage, entry);
        let issuances = if page_size == 0 {
            Vec::new()
        } else {
            let request = ListIssuancesRequest {
                entry_id: entry.id.to_string(),
                page_size,
                ..Default::default()
            };
            let mut issuances = client.issuances_page(request).await?;
            issuances.truncate(args.issuances as usize);
            issuances
        };
        reports.push((entry, agents, issuances));
    }
    let latest = |agents: &[&EntryUsage], at: fn(&EntryUsage) -> Option<SystemTime>| {
        unix_time_or_zero(agents.iter().filter_map(|u| at(u)).max())
    };
    let issued_at = |u: &EntryUsage| u.last_issued_at;
    let served_at = |u: &EntryUsage| u.last_served_at;

    if args.common.output.is_json() {
        let items: Vec<Value> = reports
            .iter()
            .map(|(entry, agents, issuances)| {
                json!({
                    "entry_id": entry.id.as_str(),
                    "spiffe_id": entry.spiffe_id.to_string(),
                    "last_issued_at": latest(agents, issued_at),
                    "last_served_at": latest(agents, served_at),
                    "agents": agents.iter().map(|u| json!({
                        "agent_id": u.agent_id,
                        "issued": u.issued,
                        "last_issued_at": unix_time_or_zero(u.last_issued_at),
                        "last_served_at": unix_time_or_zero(u.last_served_at),
                    })).collect::<Vec<_>>(),
                    "issuances": issuances.iter().map(issuance_json).collect::<Vec<_>>(),
                })
            })
            .collect();
        return write_json(out, &json!({ "entries": items }));
    }
    for (index, (entry, agents, issuances)) in reports.iter().enumerate() {
        if index > 0 {
            writeln!(out)?;
        }
        let last_issued = latest(agents, issued_at);
        let last_served = latest(agents, served_at);
        writeln!(out, "Entry ID    : {}", entry.id)?;
        writeln!(out, "SPIFFE ID   : {}", entry.spiffe_id)?;
        writeln!(out, "Last issued : {}", format_unix_time(last_issued))?;
        writeln!(out, "Last served : {}", format_unix_time(last_served))?;
        writeln!(out)?;
        let mut table = Table::new(["AGENT ID", "ISSUED", "LAST ISSUED", "LAST SERVED"]);
        for u in agents {
            table.row([
                u.agent_id.clone(),
                u.issued.to_string(),
                format_unix_time(unix_time_or_zero(u.last_issued_at)),
                format_unix_time(unix_time_or_zero(u.last_served_at)),
            ]);
        }
        table.write(out, "No agent was issued or served this entry.")?;
        if args.issuances > 0 {
            writeln!(out)?;
            let mut table = Table::new([
                "KIND",
                "SERIAL",
                "AGENT ID",
                "ISSUED AT",
                "NOT AFTER",
                "EXCEPTIONS",
            ]);
            for issuance in issuances {
                table.row([
                    issuance.kind.as_str().to_owned(),
                    issuance.serial.clone(),
                    issuance.agent_id.to_string(),
                    format_unix_time(unix_time(issuance.issued_at)),
                    format_unix_time(unix_time(issuance.not_after)),
                    or_dash(&issuance.exception_ids.join(", ")),
                ]);
            }
            table.write(out, "No issuances recorded.")?;
        }
    }
    Ok(())
}

fn issuance_json(issuance: &Issuance) -> Value {
    json!({
        "kind": issuance.kind.as_str(),
        "serial": issuance.serial,
        "entry_id": issuance.entry_id,
        "spiffe_id": issuance.spiffe_id.to_string(),
        "agent_id": issuance.agent_id.to_string(),
        "authority_id": issuance.authority_id,
        "issued_at": unix_time(issuance.issued_at),
        "not_after": unix_time(issuance.not_after),
        "exception_ids": issuance.exception_ids,
    })
}

// ----- holders -----

/// Unexpired SVIDs held, per authority or per agent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Holding {
    agents: BTreeSet<String>,
    n_svids: u64,
    latest_not_after: i64,
}

impl Holding {
    fn add(&mut self, issuance: &Issuance) {
        self.agents.insert(issuance.agent_id.to_string());
        self.n_svids += 1;
        self.latest_not_after = self.latest_not_after.max(unix_time(issuance.not_after));
    }
}

/// Groups issuances by `key`.
fn holdings(
    issuances: &[Issuance],
    key: impl Fn(&Issuance) -> String,
) -> BTreeMap<String, Holding> {
    let mut grouped: BTreeMap<String, Holding> = BTreeMap::new();
    for issuance in issuances {
        grouped.entry(key(issuance)).or_default().add(issuance);
    }
    grouped
}

/// An authority ID as the ledger stores it: a subject key ID pasted as `AB:CD:…` or in
/// upper case becomes lowercase hex; anything else (a JWT key ID) is kept as given.
fn normalise_authority_id(value: &str) -> String {
    let value = value.trim();
    let hex_or_colon = |c: char| c.is_ascii_hexdigit() || c == ':';
    let looks_like_ski = !value.is_empty()
        && value.chars().all(hex_or_colon)
        && (value.contains(':') || !value.chars().any(|c| c.is_ascii_lowercase()));
    if looks_like_ski {
        value.replace(':', "").to_ascii_lowercase()
    } else {
        value.to_owned()
    }
}

async fn holders(args: &HoldersArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let authority = args.authority.as_deref().map(normalise_authority_id);
    if authority.as_deref() == Some("") {
        bail!("--authority is empty");
    }
    let client = args.common.socket.connect().await?;
    let request = ListIssuancesRequest {
        authority_id: authority.clone().unwrap_or_default(),
        unexpired_only: true,
        ..Default::default()
    };
    let issuances = client.issuances(request).await?;
    let json_output = args.common.output.is_json();

    match authority {
        None => {
            let by_authority = holdings(&issuances, |i| i.authority_id.clone());
            if json_output {
                let items: Vec<Value> = by_authority
                    .iter()
                    .map(|(authority_id, holding)| {
                        json!({
                            "authority_id": authority_id,
                            "agents": holding.agents.len(),
                            "svids": holding.n_svids,
                            "latest_not_after": holding.latest_not_after,
                        })
                    })
                    .collect();
                return write_json(out, &json!({ "authorities": items }));
            }
            let mut table = Table::new(["AUTHORITY ID", "AGENTS", "SVIDS", "LATEST NOT AFTER"]);
            for (authority_id, holding) in &by_authority {
                table.row([
                    or_dash(authority_id),
                    holding.agents.len().to_string(),
                    holding.n_svids.to_string(),
                    format_unix_time(holding.latest_not_after),
                ]);
            }
            table.write(out, "No unexpired SVIDs are recorded.")
        }
        Some(authority_id) => {
            let by_agent = holdings(&issuances, |i| i.agent_id.to_string());
            if json_output {
                let items: Vec<Value> = by_agent
                    .iter()
                    .map(|(agent_id, holding)| {
                        json!({
                            "agent_id": agent_id,
                            "svids": holding.n_svids,
                            "latest_not_after": holding.latest_not_after,
                        })
                    })
                    .collect();
                return write_json(
                    out,
                    &json!({ "authority_id": authority_id, "agents": items }),
                );
            }
            let mut table = Table::new(["AGENT ID", "SVIDS", "LATEST NOT AFTER"]);
            for (agent_id, holding) in &by_agent {
                table.row([
                    or_dash(agent_id),
                    holding.n_svids.to_string(),
                    format_unix_time(holding.latest_not_after),
                ]);
            }
            table.write(
                out,
                &format!("No agent holds an unexpired SVID of authority {authority_id}."),
            )
        }
    }
}

// ----- formatting -----

/// Columns aligned with two spaces between them, under a header row; `empty` instead when
/// there are no rows.
struct Table<const N: usize> {
    headers: [&'static str; N],
    rows: Vec<[String; N]>,
}

impl<const N: usize> Table<N> {
    fn new(headers: [&'static str; N]) -> Self {
        Self {
            headers,
            rows: Vec::new(),
        }
    }

    fn row(&mut self, row: [String; N]) {
        self.rows.push(row);
    }

    fn write(&self, out: &mut dyn Write, empty: &str) -> anyhow::Result<()> {
        if self.rows.is_empty() {
            writeln!(out, "{empty}")?;
            return Ok(());
        }
        let mut widths = self.headers.map(|header| header.chars().count());
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut write_line = |cells: &mut dyn Iterator<Item = &str>| -> anyhow::Result<()> {
            let mut line = String::new();
            for (index, (cell, width)) in cells.zip(widths).enumerate() {
                if index > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if index + 1 < N {
                    let pad = width.saturating_sub(cell.chars().count());
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            writeln!(out, "{}", line.trim_end())?;
            Ok(())
        };
        write_line(&mut self.headers.iter().copied())?;
        for row in &self.rows {
            write_line(&mut row.iter().map(String::as_str))?;
        }
        Ok(())
    }
}

fn owner_of(entry: &RegistrationEntry) -> &str {
    entry.owner.as_deref().unwrap_or_default()
}

fn or_dash(value: &str) -> String {
    if value.is_empty() {
        "-".to_owned()
    } else {
        value.to_owned()
    }
}

fn time_or_dash(seconds: i64) -> String {
    if seconds == 0 {
        "-".to_owned()
    } else {
        format_unix_time(seconds)
    }
}

/// An exception's scope in one line: its SPIFFE ID pattern, then its entry IDs.
fn scope_text(spiffe_id_pattern: &str, entry_ids: &[String]) -> String {
    let parts: Vec<&str> = std::iter::once(spiffe_id_pattern)
        .filter(|pattern| !pattern.is_empty())
        .chain(entry_ids.iter().map(String::as_str))
        .collect();
    or_dash(&parts.join(", "))
}

/// A span of seconds for people, to the two largest units (`6days 23h`, `45m 10s`).
fn humanise_seconds(seconds: i64) -> String {
    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    let Ok(seconds) = u64::try_from(seconds) else {
        return format!("{seconds}s");
    };
    let unit = if seconds >= DAY {
        HOUR
    } else if seconds >= HOUR {
        MINUTE
    } else {
        1
    };
    let rounded = seconds - seconds % unit;
    humantime::format_duration(Duration::from_secs(rounded)).to_string()
}

/// A duration flag in whole seconds.
fn duration_seconds(flag: &str, value: &str) -> anyhow::Result<i64> {
    let duration = parse::duration(value).with_context(|| format!("{flag} is invalid"))?;
    i64::try_from(duration.as_secs()).map_err(|_| anyhow!("{flag} {value:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    use lanyard_core::ledger::IssuanceKind;
    use lanyard_core::{EntryId, SpiffeId};

    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = 86_400;

    /// The instant `seconds` after the Unix epoch; 0 is "unset" in these helpers.
    fn at(seconds: i64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds.unsigned_abs())
    }

    fn id(path: &str) -> SpiffeId {
        format!("spiffe://example.org{path}").parse().unwrap()
    }

    fn entry(entry_id: &str, path: &str, created_at: i64, expires_at: i64) -> RegistrationEntry {
        let mut entry = RegistrationEntry::new(
            EntryId::new(entry_id).unwrap(),
            id(path),
            id("/spire/agent/x"),
            ["unix:uid:1000".parse().unwrap()].into_iter().collect(),
            at(created_at),
        );
        entry.expires_at = (expires_at != 0).then(|| at(expires_at));
        entry
    }

    fn usage(entry_id: &str, agent: &str, issued: i64, served: i64) -> EntryUsage {
        EntryUsage {
            entry_id: entry_id.into(),
            agent_id: format!("spiffe://example.org/spire/agent/{agent}"),
            last_issued_at: (issued != 0).then(|| at(issued)),
            last_served_at: (served != 0).then(|| at(served)),
            issued: u64::from(issued != 0),
        }
    }

    fn exception(id: &str, expires_at: i64, revoked_at: i64) -> Exception {
        Exception {
            id: id.into(),
            owner: "team-x".into(),
            reason: String::new(),
            ticket: None,
            rules: BTreeSet::new(),
            entry_ids: BTreeSet::new(),
            spiffe_id_pattern: None,
            expires_at: at(expires_at),
            created_at: at(1),
            created_by: String::new(),
            revoked_at: (revoked_at != 0).then(|| at(revoked_at)),
            revision: 1,
        }
    }

    #[test]
    fn stale_entries_are_those_unused_since_the_cutoff_or_never_used_and_old() {
        let mut entries = [
            entry("recently-served", "/a", NOW - 90 * DAY, 0),
            entry("issued-long-ago", "/b", NOW - 90 * DAY, 0),
            entry("never-used-old", "/c", NOW - 90 * DAY, 0),
            entry("never-used-new", "/d", NOW - DAY, 0),
        ];
        entries[1].owner = Some("team-b".into());
        let usage = [
            // Issued long ago, but one agent served it recently: in use.
            usage("recently-served", "a1", NOW - 60 * DAY, 0),
            usage("recently-served", "a2", 0, NOW - DAY),
            usage("issued-long-ago", "a1", NOW - 40 * DAY, NOW - 45 * DAY),
        ];
        let stale = stale_entries(&entries, &usage, at(NOW - 30 * DAY));
        let ids: Vec<&str> = stale.iter().map(|s| s.entry_id.as_str()).collect();
        assert_eq!(ids, ["issued-long-ago", "never-used-old"]);
        assert_eq!(stale[0].last_used_at, Some(at(NOW - 40 * DAY)));
        assert_eq!(stale[0].owner, "team-b");
        assert_eq!(stale[1].last_used_at, None);
    }

    #[test]
    fn expiring_items_fall_in_the_window_and_skip_inactive_exceptions() {
        let entries = [
            entry("soon", "/soon", NOW - DAY, NOW + DAY),
            entry("edge", "/edge", NOW - DAY, NOW + 7 * DAY),
            entry("later", "/later", NOW - DAY, NOW + 8 * DAY),
            entry("past", "/past", NOW - DAY, NOW - 1),
            entry("forever", "/forever", NOW - DAY, 0),
        ];
        let exceptions = [
            exception("x-soon", NOW + 2 * DAY, 0),
            exception("x-revoked", NOW + 2 * DAY, NOW - 10),
            exception("x-expired", NOW - 10, 0),
            exception("x-later", NOW + 30 * DAY, 0),
        ];
        let within = Duration::from_secs(7 * DAY.unsigned_abs());
        let items = expiring_items(&entries, &exceptions, at(NOW), within);
        let ids: Vec<&str> = items.iter().map(Expiring::id).collect();
        assert_eq!(ids, ["soon", "x-soon", "edge"]);
        assert!(matches!(items[1], Expiring::Exception { .. }));
    }

    #[test]
    fn coverage_counts_entries_by_id_and_by_pattern() {
        let entries = [
            entry("e1", "/ci", 1, 0),
            entry("e2", "/ci/build", 1, 0),
            entry("e3", "/ci/build/deep", 1, 0),
            entry("e4", "/web", 1, 0),
        ];
        let mut by_pattern = exception("p", NOW + DAY, 0);
        by_pattern.spiffe_id_pattern = Some("spiffe://example.org/ci/*".into());
        // Strictly below the prefix: /ci itself is not covered.
        assert_eq!(n_covered(&by_pattern, &entries), 2);
        by_pattern.entry_ids = ["e4".to_owned(), "gone".to_owned()].into();
        assert_eq!(n_covered(&by_pattern, &entries), 3);
        let mut exact = exception("x", NOW + DAY, 0);
        exact.spiffe_id_pattern = Some("spiffe://example.org/ci".into());
        assert_eq!(n_covered(&exact, &entries), 1);
        assert_eq!(n_covered(&exception("none", NOW, 0), &entries), 0);
    }

    #[test]
    fn ownerless_entries_and_usage_per_entry() {
        let mut entries = [
            entry("owned", "/a", 1, 0),
            entry("blank", "/b", 1, 0),
            entry("none", "/c", 1, 0),
        ];
        entries[0].owner = Some("team-a".into());
        entries[1].owner = Some("  ".into());
        let ids: Vec<&str> = ownerless_entries(&entries)
            .iter()
            .map(|e| e.id.as_str())
            .collect();
        assert_eq!(ids, ["blank", "none"]);

        let usage = [
            usage("owned", "a1", NOW, 0),
            usage("owned", "a2", 0, NOW),
            usage("none", "a1", NOW, NOW),
        ];
        let agents: Vec<&str> = usage_of(&usage, &entries[0])
            .iter()
            .map(|u| u.agent_id.as_str())
            .collect();
        assert_eq!(
            agents,
            [
                "spiffe://example.org/spire/agent/a1",
                "spiffe://example.org/spire/agent/a2"
            ]
        );
        assert!(usage_of(&usage, &entries[1]).is_empty());
    }

    #[test]
    fn holdings_count_agents_and_svids() {
        let issuance = |authority: &str, agent: &str, not_after: i64| Issuance {
            kind: IssuanceKind::X509Svid,
            serial: "1".into(),
            entry_id: "e".into(),
            spiffe_id: id("/w"),
            agent_id: id(&format!("/spire/agent/{agent}")),
            authority_id: authority.into(),
            issued_at: at(1),
            not_after: at(not_after),
            exception_ids: Vec::new(),
        };
        let issuances = [
            issuance("aa", "agent-1", 10),
            issuance("aa", "agent-1", 30),
            issuance("aa", "agent-2", 20),
            issuance("bb", "agent-2", 40),
        ];
        let by_authority = holdings(&issuances, |i| i.authority_id.clone());
        assert_eq!(by_authority["aa"].agents.len(), 2);
        assert_eq!(by_authority["aa"].n_svids, 3);
        assert_eq!(by_authority["aa"].latest_not_after, 30);
        assert_eq!(by_authority["bb"].agents.len(), 1);
        let by_agent = holdings(&issuances, |i| i.agent_id.to_string());
        let agent_2 = &by_agent["spiffe://example.org/spire/agent/agent-2"];
        assert_eq!(agent_2.n_svids, 2);
        assert_eq!(agent_2.latest_not_after, 40);
    }

    #[test]
    fn authority_ids_as_openssl_prints_them_become_ledger_ids() {
        assert_eq!(normalise_authority_id("AB:CD:0e"), "abcd0e");
        assert_eq!(normalise_authority_id("ABCD0E"), "abcd0e");
        assert_eq!(normalise_authority_id("abcd0e"), "abcd0e");
        // JWT key IDs are kept as they are.
        assert_eq!(normalise_authority_id("Kx9vQ2"), "Kx9vQ2");
    }

    #[test]
    fn durations_are_rounded_to_two_units() {
        assert_eq!(humanise_seconds(45), "45s");
        assert_eq!(humanise_seconds(3 * 60 + 5), "3m 5s");
        assert_eq!(humanise_seconds(2 * 3600 + 5 * 60 + 7), "2h 5m");
        assert_eq!(humanise_seconds(6 * DAY + 23 * 3600 + 59 * 60), "6days 23h");
    }

    #[test]
    fn tables_align_columns_and_say_when_empty() {
        let mut table = Table::new(["ID", "OWNER", "NOTE"]);
        table.row(["a".into(), "team-long".into(), "x".into()]);
        table.row(["bbbb".into(), "-".into(), String::new()]);
        let mut out = Vec::new();
        table.write(&mut out, "nothing").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ID    OWNER      NOTE\na     team-long  x\nbbbb  -\n"
        );
        let mut out = Vec::new();
        Table::new(["ID"]).write(&mut out, "nothing").unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "nothing\n");
    }
}
