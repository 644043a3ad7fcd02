//! `lanyard revoke x509|jwt|list|show`: revocations through Lanyard's RevocationService. A
//! revocation stops X.509-SVIDs (one by serial, or every one of a SPIFFE ID, an entry or an
//! agent issued before now) or a JWT-SVID (by `jti`) before they expire: agents drop and
//! replace what they hold, and the CRLs list the serials for TLS verifiers. `--dry-run` asks
//! the server which serials it would list, and stores nothing.

use std::io::Write;
use std::time::SystemTime;

use clap::{ArgGroup, Args, Subcommand};
use lanyard_core::revocation::{Revocation, RevokedSerial};
use lanyard_proto::lanyard::api::v1::RevokeRequest;
use serde_json::{Value, json};

use crate::admin::{RevocationDetail, Revoked};
use crate::cli::client::SocketArgs;
use crate::cli::exception::write_columns;
use crate::cli::output::{OutputArgs, count_noun, unix_time, write_field, write_json};
use crate::cli::parse::{self, format_unix_time};

#[derive(Debug, Subcommand)]
pub(crate) enum RevokeCommand {
    /// Revoke X.509-SVIDs: one by serial, or every one of a SPIFFE ID, an entry or an agent
    /// issued before now (an agent is banned too).
    X509(X509Args),
    /// Revoke one JWT-SVID by its jti.
    Jwt(JwtArgs),
    /// List the revocations the server keeps.
    List(ListArgs),
    /// Show one revocation: its serials, and which agents have and have not applied it.
    Show(ShowArgs),
}

impl RevokeCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::X509(_) => "x509",
            Self::Jwt(_) => "jwt",
            Self::List(_) => "list",
            Self::Show(_) => "show",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::X509(args) => {
                let (kind, value) = args.target();
                revoke(kind, value, &args.record, out).await
            }
            Self::Jwt(args) => revoke("jwt-id", &args.jti, &args.record, out).await,
            Self::List(args) => list(&args, out).await,
            Self::Show(args) => show(&args, out).await,
        }
    }
}

/// The governance fields every revocation carries, and the dry run.
#[derive(Debug, Args)]
pub(crate) struct RecordArgs {
    /// Person or team accountable for the revocation.
    #[arg(long, value_name = "TEXT")]
    owner: String,
    /// Why (recorded with the revocation and in the audit log).
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// Incident or change ticket.
    #[arg(long, value_name = "TEXT")]
    ticket: Option<String>,
    /// Show what would be revoked (the serials the CRLs would list) and store nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["serial", "spiffe_id", "entry_id", "agent"])))]
pub(crate) struct X509Args {
    /// One X.509-SVID, by its decimal serial number (as `lanyard report holders` shows it).
    #[arg(long, value_name = "SERIAL")]
    serial: Option<String>,
    /// Every X.509-SVID of this SPIFFE ID issued before now.
    #[arg(long, value_name = "SPIFFE_ID")]
    spiffe_id: Option<String>,
    /// Every X.509-SVID of this entry issued before now.
    #[arg(long, value_name = "ID")]
    entry_id: Option<String>,
    /// Every X.509-SVID issued to this agent before now, its own included; the agent is
    /// banned.
    #[arg(long, value_name = "SPIFFE_ID")]
    agent: Option<String>,
    #[command(flatten)]
    record: RecordArgs,
}

impl X509Args {
    fn target(&self) -> (&'static str, &str) {
        let pick = [
            ("x509-serial", &self.serial),
            ("spiffe-id", &self.spiffe_id),
            ("entry", &self.entry_id),
            ("agent", &self.agent),
        ];
        pick.into_iter()
            .find_map(|(kind, value)| value.as_deref().map(|value| (kind, value)))
            .unwrap_or(("x509-serial", ""))
    }
}

#[derive(Debug, Args)]
pub(crate) struct JwtArgs {
    /// The JWT-SVID's jti.
    #[arg(long, value_name = "JTI")]
    jti: String,
    #[command(flatten)]
    record: RecordArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    /// The revocation's ID.
    #[arg(value_name = "ID")]
    id: String,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

async fn revoke(
    kind: &str,
    value: &str,
    record: &RecordArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let request = RevokeRequest {
        kind: kind.to_owned(),
        value: parse::non_empty("the target", value)?,
        owner: parse::non_empty("--owner", &record.owner)?,
        reason: parse::non_empty("--reason", &record.reason)?,
        ticket: record.ticket.clone().unwrap_or_default(),
        dry_run: record.dry_run,
    };
    let client = record.socket.connect().await?;
    let revoked = client.revoke(request).await?;
    if record.output.is_json() {
        return write_json(out, &revoked_json(&revoked, record.dry_run));
    }
    if record.dry_run {
        writeln!(out, "Dry run: nothing was revoked.")?;
    }
    write_revocation_pretty(out, &revoked.revocation)?;
    if revoked.banned {
        write_field(out, "Agent banned", "yes")?;
    }
    write_serials(out, &revoked.serials)
}

async fn list(args: &ListArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let client = args.socket.connect().await?;
    let revocations = client.revocations().await?;
    if args.output.is_json() {
        let items: Vec<Value> = revocations.iter().map(revocation_json).collect();
        return write_json(out, &json!({ "revocations": items }));
    }
    if revocations.is_empty() {
        writeln!(out, "No revocations")?;
        return Ok(());
    }
    let mut rows = vec![
        ["ID", "SEQ", "KIND", "TARGET", "OWNER", "CREATED"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for revocation in &revocations {
        rows.push(vec![
            revocation.id.clone(),
            revocation.sequence.to_string(),
            revocation.target.kind().to_owned(),
            revocation.target.value(),
            revocation.owner.clone(),
            format_unix_time(unix_time(revocation.created_at)),
        ]);
    }
    write_columns(out, &rows)
}

async fn show(args: &ShowArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let client = args.socket.connect().await?;
    let detail = client.revocation(&args.id).await?;
    if args.output.is_json() {
        return write_json(out, &detail_json(&detail));
    }
    write_revocation_pretty(out, &detail.revocation)?;
    write_serials(out, &detail.serials)?;
    write_field(
        out,
        "Applied by",
        &count_noun(detail.acknowledged.len(), "agent", "agents"),
    )?;
    for (agent, sequence, at) in &detail.acknowledged {
        writeln!(
            out,
            "  {agent} (sequence {sequence}, {})",
            format_unix_time(*at)
        )?;
    }
    write_field(
        out,
        "Not yet applied by",
        &count_noun(detail.pending.len(), "agent", "agents"),
    )?;
    for agent in &detail.pending {
        writeln!(out, "  {agent}")?;
    }
    Ok(())
}

fn write_revocation_pretty(out: &mut dyn Write, revocation: &Revocation) -> anyhow::Result<()> {
    let time = |at: SystemTime| format_unix_time(unix_time(at));
    if !revocation.id.is_empty() && revocation.sequence != 0 {
        write_field(out, "Revocation ID", &revocation.id)?;
        write_field(out, "Sequence", &revocation.sequence.to_string())?;
    }
    write_field(out, "Revokes", &revocation.target.to_string())?;
    write_field(out, "Owner", &revocation.owner)?;
    write_field(out, "Reason", &revocation.reason)?;
    if !revocation.ticket.is_empty() {
        write_field(out, "Ticket", &revocation.ticket)?;
    }
    write_field(out, "Created at", &time(revocation.created_at))?;
    if !revocation.created_by.is_empty() {
        write_field(out, "Created by", &revocation.created_by)?;
    }
    write_field(out, "Kept until", &time(revocation.expires_at))?;
    Ok(())
}

fn write_serials(out: &mut dyn Write, serials: &[RevokedSerial]) -> anyhow::Result<()> {
    write_field(
        out,
        "CRL serials",
        &count_noun(serials.len(), "serial", "serials"),
    )?;
    for serial in serials {
        let authority = if serial.authority_id.is_empty() {
            "every authority"
        } else {
            serial.authority_id.as_str()
        };
        writeln!(out, "  {} ({authority})", serial.serial)?;
    }
    Ok(())
}

/// A revocation as JSON (times in Unix seconds).
pub(crate) fn revocation_json(revocation: &Revocation) -> Value {
    json!({
        "id": revocation.id,
        "sequence": revocation.sequence,
        "kind": revocation.target.kind(),
        "value": revocation.target.value(),
        "owner": revocation.owner,
        "reason": revocation.reason,
        "ticket": revocation.ticket,
        "created_at": unix_time(revocation.created_at),
        "created_by": revocation.created_by,
        "expires_at": unix_time(revocation.expires_at),
    })
}

fn serials_json(serials: &[RevokedSerial]) -> Value {
    serials
        .iter()
        .map(|serial| {
            json!({
                "serial": serial.serial,
                "authority_id": serial.authority_id,
                "revoked_at": unix_time(serial.revoked_at),
            })
        })
        .collect()
}

fn revoked_json(revoked: &Revoked, dry_run: bool) -> Value {
    json!({
        "dry_run": dry_run,
        "revocation": revocation_json(&revoked.revocation),
        "serials": serials_json(&revoked.serials),
        "banned": revoked.banned,
    })
}

fn detail_json(detail: &RevocationDetail) -> Value {
    json!({
        "revocation": revocation_json(&detail.revocation),
        "serials": serials_json(&detail.serials),
        "acknowledged": detail.acknowledged.iter().map(|(agent, sequence, at)| json!({
            "agent_id": agent,
            "sequence": sequence,
            "acknowledged_at": at,
        })).collect::<Vec<_>>(),
        "pending_agent_ids": detail.pending,
    })
}
