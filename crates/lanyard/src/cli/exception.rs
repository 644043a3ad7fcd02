//! `lanyard exception create|list|show|extend|revoke`: exceptions to the policy through
//! Lanyard's ExceptionService. An exception waives named rules for some entries (by entry ID
//! or SPIFFE ID pattern) until it expires or is revoked; the server assigns its ID, judges it
//! with the policy's exception rules and audits every change.

use std::io::Write;
use std::time::SystemTime;

use anyhow::{Context as _, anyhow, bail};
use clap::{ArgGroup, Args, Subcommand};
use lanyard_core::policy::Exception;
use lanyard_proto::lanyard::api::v1::{
    ExtendExceptionRequest, PolicyException, RevokeExceptionRequest,
};
use serde_json::{Value, json};

use crate::admin::{CHANGED_SINCE_READ, rpc_error};
use crate::cli::client::SocketArgs;
use crate::cli::output::{
    OutputArgs, count_noun, unix_time, unix_time_or_zero, write_field, write_json,
};
use crate::cli::parse::{self, format_unix_time};

#[derive(Debug, Subcommand)]
pub(crate) enum ExceptionCommand {
    /// Create an exception: an owned, expiring waiver of policy rules for some entries.
    Create(CreateArgs),
    /// List active exceptions (--all: also expired and revoked ones).
    List(ListArgs),
    /// Show one exception.
    Show(ShowArgs),
    /// Move an active exception's expiry later (the policy caps how far).
    Extend(ExtendArgs),
    /// End an exception now.
    Revoke(RevokeArgs),
}

impl ExceptionCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Create(_) => "create",
            Self::List(_) => "list",
            Self::Show(_) => "show",
            Self::Extend(_) => "extend",
            Self::Revoke(_) => "revoke",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::Create(args) => create(&args, out).await,
            Self::List(args) => list(&args, out).await,
            Self::Show(args) => show(&args, out).await,
            Self::Extend(args) => extend(&args, out).await,
            Self::Revoke(args) => revoke(&args, out).await,
        }
    }
}

/// When an exception ends: a point in time or a duration from now.
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("expiry").required(true).args(["expires_at", "duration"])))]
pub(crate) struct ExpiryArgs {
    /// When it ends: RFC 3339 or Unix seconds.
    #[arg(long, value_name = "TIME")]
    expires_at: Option<String>,
    /// How long from now it lasts, e.g. 7d, 12h.
    #[arg(long, value_name = "DURATION")]
    duration: Option<String>,
}

impl ExpiryArgs {
    /// The expiry in Unix seconds.
    fn unix_seconds(&self, now: SystemTime) -> anyhow::Result<i64> {
        match (&self.expires_at, &self.duration) {
            (Some(time), _) => parse::unix_time(time).context("--expires-at is invalid"),
            (None, Some(duration)) => {
                let duration = parse::duration(duration).context("--duration is invalid")?;
                let end = now
                    .checked_add(duration)
                    .ok_or_else(|| anyhow!("--duration is too long"))?;
                unix_seconds(end)
            }
            (None, None) => bail!("give --expires-at or --duration"),
        }
    }
}

pub(crate) fn unix_seconds(time: SystemTime) -> anyhow::Result<i64> {
    let seconds = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| anyhow!("the clock is before 1970"))?
        .as_secs();
    i64::try_from(seconds).map_err(|_| anyhow!("time is out of range"))
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("scope").required(true).multiple(true).args(["entry_ids", "spiffe_id"])))]
pub(crate) struct CreateArgs {
    /// Person or team accountable for the exception.
    #[arg(long, value_name = "TEXT")]
    owner: String,
    /// Why the exception is needed.
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// Change or approval ticket.
    #[arg(long, value_name = "TEXT")]
    ticket: Option<String>,
    /// Policy rule it waives, e.g. admin-needs-exception (repeatable).
    #[arg(long = "rule", value_name = "RULE", required = true)]
    rules: Vec<String>,
    /// ID of an entry it covers (repeatable).
    #[arg(long = "entry-id", value_name = "ID")]
    entry_ids: Vec<String>,
    /// SPIFFE ID it covers: exact, or a prefix ending in /* (spiffe://example.org/ci/*).
    #[arg(long, value_name = "PATTERN")]
    spiffe_id: Option<String>,
    #[command(flatten)]
    expiry: ExpiryArgs,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Also list expired and revoked exceptions.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    /// The exception's ID.
    #[arg(value_name = "ID")]
    id: String,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ExtendArgs {
    /// The exception's ID.
    #[arg(value_name = "ID")]
    id: String,
    #[command(flatten)]
    expiry: ExpiryArgs,
    /// Why it is extended (recorded in the audit log).
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// Only if the exception is still at this revision (as `exception show` printed it);
    /// otherwise nothing changes and the command fails.
    #[arg(long, value_name = "N")]
    revision: Option<i64>,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct RevokeArgs {
    /// The exception's ID.
    #[arg(value_name = "ID")]
    id: String,
    /// Why it is revoked (recorded in the audit log).
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// Only if the exception is still at this revision (as `exception show` printed it);
    /// otherwise nothing changes and the command fails.
    #[arg(long, value_name = "N")]
    revision: Option<i64>,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

impl CreateArgs {
    /// The exception to send, checked as far as the CLI can.
    fn to_exception(&self, now: SystemTime) -> anyhow::Result<PolicyException> {
        let rules = self
            .rules
            .iter()
            .map(|rule| parse::non_empty("--rule", rule))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let entry_ids = self
            .entry_ids
            .iter()
            .map(|id| parse::non_empty("--entry-id", id))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let spiffe_id_pattern = match &self.spiffe_id {
            Some(pattern) => check_pattern(pattern)?,
            None => String::new(),
        };
        Ok(PolicyException {
            owner: parse::non_empty("--owner", &self.owner)?,
            reason: parse::non_empty("--reason", &self.reason)?,
            ticket: self.ticket.clone().unwrap_or_default(),
            rules,
            entry_ids,
            spiffe_id_pattern,
            expires_at: self.expiry.unix_seconds(now)?,
            ..Default::default()
        })
    }
}

/// Checks a SPIFFE ID pattern: an exact SPIFFE ID, or one followed by `/*`.
fn check_pattern(pattern: &str) -> anyhow::Result<String> {
    let base = pattern.strip_suffix("/*").unwrap_or(pattern);
    parse::spiffe_id(base).with_context(|| {
        format!("--spiffe-id {pattern:?} is not a SPIFFE ID or a prefix ending in /*")
    })?;
    Ok(pattern.to_owned())
}

async fn create(args: &CreateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let exception = args.to_exception(SystemTime::now())?;
    let client = args.socket.connect().await?;
    let created = client.create_exception(exception).await?;
    write_one(out, &created, args.output.is_json())
}

async fn list(args: &ListArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let client = args.socket.connect().await?;
    let exceptions = client.exceptions(args.all).await?;
    let now = SystemTime::now();
    if args.output.is_json() {
        let items: Vec<Value> = exceptions
            .iter()
            .map(|exception| exception_json(exception, now))
            .collect();
        return write_json(out, &json!({ "exceptions": items }));
    }
    write_table(out, &exceptions, now)
}

async fn show(args: &ShowArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let client = args.socket.connect().await?;
    let exception = client.exception_by_id(&args.id).await?;
    write_one(out, &exception, args.output.is_json())
}

async fn extend(args: &ExtendArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let expires_at = args.expiry.unix_seconds(SystemTime::now())?;
    let reason = parse::non_empty("--reason", &args.reason)?;
    let client = args.socket.connect().await?;
    let extended = client
        .extend_exception(ExtendExceptionRequest {
            id: args.id.clone(),
            expires_at,
            reason,
            expected_revision: args.revision,
        })
        .await?
        .map_err(|status| {
            conditional_error(&format!("cannot extend exception {}", args.id), &status)
        })?;
    write_one(out, &extended, args.output.is_json())
}

async fn revoke(args: &RevokeArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let reason = parse::non_empty("--reason", &args.reason)?;
    let client = args.socket.connect().await?;
    let revoked = client
        .revoke_exception(RevokeExceptionRequest {
            id: args.id.clone(),
            reason,
            expected_revision: args.revision,
        })
        .await?
        .map_err(|status| {
            conditional_error(&format!("cannot revoke exception {}", args.id), &status)
        })?;
    write_one(out, &revoked, args.output.is_json())
}

/// A failed change, with an exception that moved past `--revision` said plainly.
fn conditional_error(what: &str, status: &tonic::Status) -> anyhow::Error {
    if status.code() == tonic::Code::Aborted {
        anyhow::anyhow!("{what}: {CHANGED_SINCE_READ} ({})", status.message())
    } else {
        rpc_error(what, status)
    }
}

fn write_one(out: &mut dyn Write, exception: &Exception, json: bool) -> anyhow::Result<()> {
    let now = SystemTime::now();
    if json {
        write_json(out, &exception_json(exception, now))
    } else {
        write_exception_pretty(out, exception, now)
    }
}

/// An exception as JSON: its fields (times in Unix seconds, 0 for none) plus its `status`.
pub(crate) fn exception_json(exception: &Exception, now: SystemTime) -> Value {
    json!({
        "id": exception.id,
        "status": exception.status(now).as_str(),
        "owner": exception.owner,
        "reason": exception.reason,
        "ticket": exception.ticket.as_deref().unwrap_or_default(),
        "rules": exception.rules,
        "entry_ids": exception.entry_ids,
        "spiffe_id_pattern": exception.spiffe_id_pattern.as_deref().unwrap_or_default(),
        "expires_at": unix_time(exception.expires_at),
        "created_at": unix_time(exception.created_at),
        "created_by": exception.created_by,
        "revoked_at": unix_time_or_zero(exception.revoked_at),
        "revision": exception.revision,
    })
}

/// What an exception covers, in one phrase.
fn scope_text(exception: &Exception) -> String {
    let mut parts = Vec::new();
    if let Some(pattern) = &exception.spiffe_id_pattern {
        parts.push(pattern.clone());
    }
    if !exception.entry_ids.is_empty() {
        let ids: Vec<&str> = exception.entry_ids.iter().map(String::as_str).collect();
        parts.push(format!("entries {}", ids.join(",")));
    }
    parts.join("; ")
}

fn rules_text(exception: &Exception, separator: &str) -> String {
    let rules: Vec<&str> = exception.rules.iter().map(String::as_str).collect();
    rules.join(separator)
}

fn write_exception_pretty(
    out: &mut dyn Write,
    exception: &Exception,
    now: SystemTime,
) -> anyhow::Result<()> {
    let time = |at: SystemTime| format_unix_time(unix_time(at));
    write_field(out, "Exception ID", &exception.id)?;
    write_field(out, "Status", exception.status(now).as_str())?;
    write_field(out, "Rules", &rules_text(exception, ", "))?;
    if let Some(pattern) = &exception.spiffe_id_pattern {
        write_field(out, "SPIFFE ID", pattern)?;
    }
    for entry_id in &exception.entry_ids {
        write_field(out, "Entry ID", entry_id)?;
    }
    write_field(out, "Owner", &exception.owner)?;
    write_field(out, "Reason", &exception.reason)?;
    if let Some(ticket) = &exception.ticket {
        write_field(out, "Ticket", ticket)?;
    }
    write_field(out, "Expires at", &time(exception.expires_at))?;
    if let Some(revoked_at) = exception.revoked_at {
        write_field(out, "Revoked at", &time(revoked_at))?;
    }
    if exception.revision != 0 {
        write_field(out, "Revision", &exception.revision.to_string())?;
    }
    if exception.created_at > SystemTime::UNIX_EPOCH {
        write_field(out, "Created at", &time(exception.created_at))?;
    }
    if !exception.created_by.is_empty() {
        write_field(out, "Created by", &exception.created_by)?;
    }
    Ok(())
}

/// Writes rows as columns padded to their widest cell.
pub(crate) fn write_columns(out: &mut dyn Write, rows: &[Vec<String>]) -> anyhow::Result<()> {
    let n_columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n_columns)
        .map(|column| {
            rows.iter()
                .filter_map(|row| row.get(column))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column + 1 == row.len() {
                line.push_str(cell);
            } else {
                let width = widths.get(column).copied().unwrap_or(0);
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

fn write_table(
    out: &mut dyn Write,
    exceptions: &[Exception],
    now: SystemTime,
) -> anyhow::Result<()> {
    if exceptions.is_empty() {
        writeln!(out, "No exceptions")?;
        return Ok(());
    }
    let mut rows = vec![
        ["ID", "STATUS", "RULES", "SCOPE", "OWNER", "EXPIRES"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for exception in exceptions {
        rows.push(vec![
            exception.id.clone(),
            exception.status(now).as_str().to_owned(),
            rules_text(exception, ","),
            scope_text(exception),
            exception.owner.clone(),
            format_unix_time(unix_time(exception.expires_at)),
        ]);
    }
    write_columns(out, &rows)?;
    writeln!(
        out,
        "{}",
        count_noun(exceptions.len(), "exception", "exceptions")
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<ExceptionCommand, clap::Error> {
        let cli = Cli::try_parse_from(["lanyard", "exception"].iter().chain(args))?;
        match cli.command {
            Command::Exception(command) => Ok(command),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn create_args(args: &[&str]) -> CreateArgs {
        match parse(&[&["create"], args].concat()).expect("parses") {
            ExceptionCommand::Create(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    const BASE: [&str; 6] = [
        "--owner",
        "team-a",
        "--reason",
        "migration",
        "--rule",
        "admin-needs-exception",
    ];

    #[test]
    fn create_needs_a_scope_an_expiry_and_a_rule() {
        let with = |extra: &[&str]| parse(&[&["create"], &BASE[..], extra].concat());
        assert!(with(&["--spiffe-id", "spiffe://example.org/a"]).is_err());
        assert!(with(&["--duration", "1d"]).is_err());
        assert!(with(&["--duration", "1d", "--expires-at", "1", "--entry-id", "e"]).is_err());
        assert!(with(&["--duration", "1d", "--entry-id", "e"]).is_ok());
        assert!(
            with(&[
                "--duration",
                "1d",
                "--entry-id",
                "e",
                "--spiffe-id",
                "spiffe://example.org/a"
            ])
            .is_ok()
        );
        assert!(
            parse(&[
                "create",
                "--owner",
                "o",
                "--reason",
                "r",
                "--entry-id",
                "e",
                "--duration",
                "1d"
            ])
            .is_err(),
            "at least one rule"
        );
    }

    #[test]
    fn create_builds_the_exception() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let args = create_args(
            &[
                &BASE[..],
                &[
                    "--rule",
                    "downstream-needs-exception",
                    "--spiffe-id",
                    "spiffe://example.org/ci/*",
                    "--entry-id",
                    "e1",
                    "--ticket",
                    "CHG-1",
                    "--duration",
                    "7d",
                ],
            ]
            .concat(),
        );
        let exception = args.to_exception(now).expect("valid");
        assert_eq!(exception.owner, "team-a");
        assert_eq!(
            exception.rules,
            ["admin-needs-exception", "downstream-needs-exception"]
        );
        assert_eq!(exception.spiffe_id_pattern, "spiffe://example.org/ci/*");
        assert_eq!(exception.entry_ids, ["e1"]);
        assert_eq!(exception.ticket, "CHG-1");
        assert_eq!(exception.expires_at, 1_700_000_000 + 7 * 86_400);
        assert!(exception.id.is_empty(), "the server assigns the ID");

        let args = create_args(
            &[
                &BASE[..],
                &[
                    "--spiffe-id",
                    "example.org/ci",
                    "--expires-at",
                    "2030-01-01T00:00:00Z",
                ],
            ]
            .concat(),
        );
        let err = args.to_exception(now).expect_err("bad pattern");
        assert!(format!("{err:#}").starts_with("--spiffe-id \"example.org/ci\""));
        let args =
            create_args(&[&BASE[..], &["--entry-id", "e", "--expires-at", "next week"]].concat());
        let err = args.to_exception(now).expect_err("bad time");
        assert!(format!("{err:#}").starts_with("--expires-at is invalid"));
    }

    #[test]
    fn tables_align_columns() {
        let at = |seconds| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
        let exception = Exception {
            id: "ex-1".into(),
            owner: "team-a".into(),
            reason: "r".into(),
            ticket: None,
            rules: ["admin-needs-exception".to_owned()].into(),
            entry_ids: Default::default(),
            spiffe_id_pattern: Some("spiffe://example.org/a".into()),
            expires_at: at(1_700_000_000),
            created_at: at(1_600_000_000),
            created_by: String::new(),
            revoked_at: None,
            revision: 1,
        };
        let mut out = Vec::new();
        write_table(&mut out, &[exception], at(1_800_000_000)).expect("writes");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID    STATUS   RULES"), "{text}");
        assert!(
            lines[1].starts_with("ex-1  expired  admin-needs-exception"),
            "{text}"
        );
        assert_eq!(lines[2], "1 exception");
    }
}
