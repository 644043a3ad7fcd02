//! `lanyard grant create|list|revoke`: just-in-time grants. A grant is an ordinary entry
//! with an expiry, created through GovernedEntryService with the source `grant`; the server
//! caps every SVID at its entry's expiry and an expired entry authorizes nothing, so a grant
//! ends on its own. Revoking one moves its expiry to now.

use std::io::Write;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Subcommand};
use lanyard_core::RegistrationEntry;
use lanyard_proto::convert::{entry_metadata_to_proto, entry_to_proto};
use lanyard_proto::lanyard::api::v1::{
    EntryMetadata, EntryMetadataMask, GovernedEntry, GovernedEntryUpdate,
};
use lanyard_proto::spire::api::server::entry::v1::list_entries_request;
use lanyard_proto::spire::api::types;
use serde_json::{Value, json};

use crate::admin::{Admin, CHANGED_SINCE_READ, describe_status, governed_entry};
use crate::cli::client::SocketArgs;
use crate::cli::exception::{unix_seconds, write_columns};
use crate::cli::output::{OutputArgs, count_noun, stored_entry_json, unix_time, write_json};
use crate::cli::parse::{self, format_unix_time};

/// The `source` label of grants.
pub(crate) const GRANT_SOURCE: &str = "grant";

#[derive(Debug, Subcommand)]
pub(crate) enum GrantCommand {
    /// Create a grant: an entry that ends on its own after --duration.
    Create(CreateArgs),
    /// List grants, active and ended.
    List(ListArgs),
    /// End a grant now.
    Revoke(RevokeArgs),
}

impl GrantCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Create(_) => "create",
            Self::List(_) => "list",
            Self::Revoke(_) => "revoke",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::Create(args) => create(&args, out).await,
            Self::List(args) => list(&args, out).await,
            Self::Revoke(args) => revoke(&args, out).await,
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// SPIFFE ID the grant issues.
    #[arg(long, value_name = "ID")]
    spiffe_id: String,
    /// SPIFFE ID of the parent (the agent that serves it).
    #[arg(long, value_name = "ID")]
    parent_id: String,
    /// Selector the workload must have, as type:value (repeatable).
    #[arg(long = "selector", value_name = "TYPE:VALUE", required = true)]
    selectors: Vec<String>,
    /// How long the grant lasts, e.g. 1h, 30m.
    #[arg(long, value_name = "DURATION")]
    duration: String,
    /// Why the grant is needed.
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// Change or approval ticket.
    #[arg(long, value_name = "TEXT")]
    ticket: Option<String>,
    /// Who answers for the grant (default: the current user, from $USER or $LOGNAME).
    #[arg(long, value_name = "TEXT")]
    owner: Option<String>,
    /// X.509-SVID lifetime (default: the server's).
    #[arg(long, value_name = "DURATION")]
    x509_svid_ttl: Option<String>,
    /// JWT-SVID lifetime (default: the server's).
    #[arg(long, value_name = "DURATION")]
    jwt_svid_ttl: Option<String>,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct RevokeArgs {
    /// ID of the grant's entry.
    #[arg(value_name = "ENTRY_ID")]
    entry_id: String,
    /// Why it ends early (printed with the result; the server's audit log records the
    /// update).
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// The current user's name: `$USER`, else `$LOGNAME`, else `uid-<uid>`.
fn current_user() -> String {
    for variable in ["USER", "LOGNAME"] {
        if let Ok(name) = std::env::var(variable)
            && !name.trim().is_empty()
        {
            return name.trim().to_owned();
        }
    }
    use std::os::unix::fs::MetadataExt as _;
    match std::fs::metadata("/proc/self") {
        Ok(metadata) => format!("uid-{}", metadata.uid()),
        Err(_) => "unknown".to_owned(),
    }
}

impl CreateArgs {
    /// The grant's entry and metadata, ending `duration` after `now`.
    fn to_grant(&self, now: SystemTime) -> anyhow::Result<GovernedEntry> {
        let duration = parse::duration(&self.duration).context("--duration is invalid")?;
        if duration < Duration::from_secs(1) {
            bail!("--duration must be at least one second");
        }
        let ends = now
            .checked_add(duration)
            .ok_or_else(|| anyhow!("--duration is too long"))?;
        let mut entry = types::Entry {
            spiffe_id: Some(parse::spiffe_id(&self.spiffe_id).context("--spiffe-id is invalid")?),
            parent_id: Some(parse::spiffe_id(&self.parent_id).context("--parent-id is invalid")?),
            selectors: parse::selectors(&self.selectors)?,
            expires_at: unix_seconds(ends)?,
            ..Default::default()
        };
        if let Some(ttl) = &self.x509_svid_ttl {
            entry.x509_svid_ttl = parse::ttl_seconds(ttl).context("--x509-svid-ttl is invalid")?;
        }
        if let Some(ttl) = &self.jwt_svid_ttl {
            entry.jwt_svid_ttl = parse::ttl_seconds(ttl).context("--jwt-svid-ttl is invalid")?;
        }
        let owner = match &self.owner {
            Some(owner) => parse::non_empty("--owner", owner)?,
            None => current_user(),
        };
        let metadata = EntryMetadata {
            entry_id: String::new(),
            owner,
            reason: parse::non_empty("--reason", &self.reason)?,
            ticket: self.ticket.clone().unwrap_or_default(),
            source: GRANT_SOURCE.to_owned(),
        };
        Ok(governed_entry(entry, metadata))
    }
}

/// `in 1h`, or `ended 5m ago`, from `now`.
fn relative(expires_at: i64, now: i64) -> String {
    let distance = |seconds: i64| {
        humantime::format_duration(Duration::from_secs(seconds.unsigned_abs())).to_string()
    };
    if expires_at > now {
        format!("in {}", distance(expires_at.saturating_sub(now)))
    } else {
        format!("{} ago", distance(now.saturating_sub(expires_at)))
    }
}

async fn create(args: &CreateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let grant = args.to_grant(SystemTime::now())?;
    let client = args.socket.connect().await?;
    client.require_lanyard("grants are not supported").await?;
    let mut results = client.create_governed(vec![grant]).await?;
    let result = results.pop().context("the server answered no result")?;
    let entry = match result.entry {
        Some(entry) if result.is_ok() => entry,
        _ => bail!(
            "{}",
            describe_status(
                tonic::Code::from_i32(result.status.code),
                &result.status.message
            )
        ),
    };
    let now = SystemTime::now();
    let ends_at = entry.expires_at.map_or(0, unix_time);
    if args.output.is_json() {
        return write_json(
            out,
            &json!({
                "entry": stored_entry_json(&entry),
                "source": entry.source.as_deref().unwrap_or_default(),
                "ends_at": ends_at,
                "exception_ids": result.exception_ids,
            }),
        );
    }
    writeln!(
        out,
        "Granted {} to {} as entry {}",
        entry.spiffe_id,
        args.selectors.join(" "),
        entry.id
    )?;
    writeln!(
        out,
        "Ends at {} ({}); owner {}",
        format_unix_time(ends_at),
        relative(ends_at, unix_time(now)),
        entry.owner.as_deref().unwrap_or_default()
    )?;
    if !result.exception_ids.is_empty() {
        writeln!(
            out,
            "Accepted under exceptions: {}",
            result.exception_ids.join(", ")
        )?;
    }
    Ok(())
}

/// Every grant: the entries with the grant source, soonest ending first.
async fn list_grants(client: &Admin) -> anyhow::Result<Vec<RegistrationEntry>> {
    let mut grants: Vec<RegistrationEntry> = client
        .entries(list_entries_request::Filter::default())
        .await?
        .into_iter()
        .filter(|entry| entry.source.as_deref() == Some(GRANT_SOURCE))
        .collect();
    grants.sort_by(|a, b| (a.expires_at, &a.id).cmp(&(b.expires_at, &b.id)));
    Ok(grants)
}

fn grant_state(entry: &RegistrationEntry, now: SystemTime) -> &'static str {
    if entry.is_expired(now) {
        "ended"
    } else {
        "active"
    }
}

async fn list(args: &ListArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let client = args.socket.connect().await?;
    let grants = list_grants(&client).await?;
    let now = SystemTime::now();
    if args.output.is_json() {
        let items: Vec<Value> = grants
            .iter()
            .map(|grant| {
                json!({
                    "entry": stored_entry_json(grant),
                    "status": grant_state(grant, now),
                    "ends_at": grant.expires_at.map_or(0, unix_time),
                })
            })
            .collect();
        return write_json(out, &json!({ "grants": items }));
    }
    if grants.is_empty() {
        writeln!(out, "No grants")?;
        return Ok(());
    }
    let mut rows = vec![
        ["ENTRY ID", "SPIFFE ID", "OWNER", "STATUS", "ENDS"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for grant in &grants {
        let ends_at = grant.expires_at.map_or(0, unix_time);
        rows.push(vec![
            grant.id.to_string(),
            grant.spiffe_id.to_string(),
            grant.owner.clone().unwrap_or_default(),
            grant_state(grant, now).to_owned(),
            format!(
                "{} ({})",
                format_unix_time(ends_at),
                relative(ends_at, unix_time(now))
            ),
        ]);
    }
    write_columns(out, &rows)?;
    writeln!(out, "{}", count_noun(grants.len(), "grant", "grants"))?;
    Ok(())
}

async fn revoke(args: &RevokeArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let client = args.socket.connect().await?;
    client.require_lanyard("grants are not supported").await?;
    let mut entry = client.entry(&args.entry_id).await?;
    if entry.source.as_deref() != Some(GRANT_SOURCE) {
        let source = match &entry.source {
            None => "no source".to_owned(),
            Some(source) => format!("source {source:?}"),
        };
        bail!(
            "entry {} is not a grant (it has {source}); end it with `lanyard entry update --expires-at` or `lanyard entry delete`",
            entry.id
        );
    }
    let now = SystemTime::now();
    if let Some(ended) = entry.expires_at.filter(|_| entry.is_expired(now)) {
        bail!(
            "grant {} already ended at {}",
            entry.id,
            format_unix_time(unix_time(ended))
        );
    }
    // Whole seconds, as the wire carries them.
    entry.expires_at =
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(unix_time(now).unsigned_abs()));
    // Only its expiry, and only over the revision just read: a grant changed meanwhile (say,
    // extended by someone else) is reported rather than overwritten.
    let read_at = entry.revision_number;
    let update = GovernedEntryUpdate {
        entry: Some(governed_entry(
            entry_to_proto(&entry, None),
            entry_metadata_to_proto(&entry),
        )),
        entry_mask: Some(types::EntryMask {
            expires_at: true,
            ..types::EntryMask::default()
        }),
        metadata_mask: Some(EntryMetadataMask::default()),
        expected_revision: Some(read_at),
    };
    let mut results = client.update_governed(vec![update]).await?;
    let result = results.pop().context("the server answered no result")?;
    if result.status.code == tonic::Code::Aborted as i32 {
        bail!(
            "grant {} was {CHANGED_SINCE_READ} (read at revision {read_at}, now at {})",
            args.entry_id,
            result.current_revision
        );
    }
    let Some(entry) = result.entry.clone().filter(|_| result.is_ok()) else {
        bail!(
            "{}",
            describe_status(
                tonic::Code::from_i32(result.status.code),
                &result.status.message
            )
        );
    };
    let ended_at = entry.expires_at.map_or(0, unix_time);
    if args.output.is_json() {
        return write_json(
            out,
            &json!({
                "entry": stored_entry_json(&entry),
                "ended_at": ended_at,
                "reason": args.reason,
            }),
        );
    }
    let reason = args
        .reason
        .as_deref()
        .map(|reason| format!(": {reason}"))
        .unwrap_or_default();
    writeln!(
        out,
        "Revoked grant {} for {}; it ended at {}{reason}",
        entry.id,
        entry.spiffe_id,
        format_unix_time(ended_at)
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn create_args(args: &[&str]) -> CreateArgs {
        let cli =
            Cli::try_parse_from(["lanyard", "grant", "create"].iter().chain(args)).expect("parses");
        match cli.command {
            Command::Grant(GrantCommand::Create(args)) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    const BASE: [&str; 8] = [
        "--spiffe-id",
        "spiffe://example.org/debug",
        "--parent-id",
        "spiffe://example.org/spire/agent/join_token/t",
        "--selector",
        "unix:uid:1000",
        "--reason",
        "incident 7",
    ];

    #[test]
    fn a_grant_is_an_entry_with_the_grant_source_ending_after_its_duration() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let grant = create_args(
            &[
                &BASE[..],
                &[
                    "--duration",
                    "1h",
                    "--owner",
                    "alice",
                    "--x509-svid-ttl",
                    "5m",
                ],
            ]
            .concat(),
        )
        .to_grant(now)
        .expect("valid");
        let entry = grant.entry.expect("entry");
        let metadata = grant.metadata.expect("metadata");
        assert_eq!(entry.expires_at, 1_700_003_600);
        assert_eq!(entry.x509_svid_ttl, 300);
        assert_eq!(entry.jwt_svid_ttl, 0);
        assert_eq!(metadata.source, "grant");
        assert_eq!(metadata.owner, "alice");
        assert_eq!(metadata.reason, "incident 7");

        let grant = create_args(&[&BASE[..], &["--duration", "1h"]].concat())
            .to_grant(now)
            .expect("valid");
        assert!(!grant.metadata.expect("metadata").owner.is_empty());

        let err = create_args(&[&BASE[..], &["--duration", "0"]].concat())
            .to_grant(now)
            .expect_err("zero");
        assert!(format!("{err:#}").contains("at least one second"));
    }

    #[test]
    fn ends_read_relative_to_now() {
        assert_eq!(relative(3700, 100), "in 1h");
        assert_eq!(relative(100, 160), "1m ago");
    }
}
