//! `lanyard policy test|check`: run a policy's own Rego tests, and evaluate every entry on a
//! server against a candidate policy before deploying it. `lanyard audit verify`: check the
//! hash chain of an audit log.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use lanyard_core::policy::{EntryInput, EntryView, Operation, Policy, unix_seconds};
use lanyard_proto::spire::api::server::entry::v1::list_entries_request;
use serde_json::json;

use crate::cli::client::SocketArgs;
use crate::cli::output::{OutputArgs, count_noun, write_json};
use crate::cli::parse;

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Run the `test_*` rules of the given Rego files (a policy and its tests).
    Test(TestArgs),
    /// Evaluate every entry on the server against a candidate policy and list what would
    /// break, without changing anything.
    Check(CheckArgs),
}

impl PolicyCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Test(_) => "test",
            Self::Check(_) => "check",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::Test(args) => test(&args, out),
            Self::Check(args) => check(&args, out).await,
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct TestArgs {
    /// Rego files: the policy and its tests (package `lanyard` or below).
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The candidate policy: one or more Rego files.
    #[arg(long = "policy", required = true, value_name = "FILE")]
    policy: Vec<PathBuf>,
    /// The server's `default_x509_svid_ttl`, for entries without their own TTL.
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    default_x509_svid_ttl: String,
    /// The server's `default_jwt_svid_ttl`, for entries without their own TTL.
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    default_jwt_svid_ttl: String,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Reads and compiles `files` into one policy.
pub(crate) fn load_policy(files: &[PathBuf]) -> anyhow::Result<Policy> {
    let mut modules = Vec::new();
    for file in files {
        let source =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        modules.push((file.display().to_string(), source));
    }
    Policy::compile(
        modules
            .iter()
            .map(|(name, source)| (name.as_str(), source.as_str())),
    )
    .map_err(Into::into)
}

fn test(args: &TestArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let policy = load_policy(&args.files)?;
    let outcomes = policy.run_tests()?;
    if outcomes.is_empty() {
        bail!("no test_* rules in {}", policy.module_names().join(", "));
    }
    let failed = outcomes.iter().filter(|outcome| !outcome.passed).count();
    if args.output.is_json() {
        let tests: Vec<_> = outcomes
            .iter()
            .map(|outcome| {
                json!({"name": outcome.name, "passed": outcome.passed, "detail": outcome.detail})
            })
            .collect();
        write_json(out, &json!({"tests": tests, "failed": failed}))?;
    } else {
        for outcome in &outcomes {
            match &outcome.detail {
                None => writeln!(out, "PASS {}", outcome.name)?,
                Some(detail) => writeln!(out, "FAIL {}: {detail}", outcome.name)?,
            }
        }
        writeln!(out, "{} passed, {} failed", outcomes.len() - failed, failed)?;
    }
    if failed > 0 {
        bail!(
            "{} failed",
            count_noun(failed, "policy test", "policy tests")
        );
    }
    Ok(())
}

async fn check(args: &CheckArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let policy = load_policy(&args.policy)?;
    let default_x509 = ttl_flag("--default-x509-svid-ttl", &args.default_x509_svid_ttl)?;
    let default_jwt = ttl_flag("--default-jwt-svid-ttl", &args.default_jwt_svid_ttl)?;
    let client = args.socket.connect().await?;
    let entries = client
        .entries(list_entries_request::Filter::default())
        .await?;
    let now = SystemTime::now();

    let checked = entries.len();
    let mut broken = Vec::new();
    for entry in entries {
        let decision = policy.evaluate_entry(&EntryInput {
            operation: Operation::Check,
            now: unix_seconds(now),
            caller: None,
            entry: EntryView::new(&entry, default_x509, default_jwt),
            exceptions: Vec::new(),
        })?;
        if !decision.passes() {
            broken.push((entry, decision.violations));
        }
    }

    if args.output.is_json() {
        let items: Vec<_> = broken
            .iter()
            .map(|(entry, violations)| {
                json!({
                    "entry_id": entry.id.as_str(),
                    "spiffe_id": entry.spiffe_id.to_string(),
                    "violations": violations,
                })
            })
            .collect();
        write_json(
            out,
            &json!({"checked": checked, "failing": items.len(), "entries": items}),
        )?;
    } else {
        for (entry, violations) in &broken {
            writeln!(out, "{} {}", entry.id.as_str(), entry.spiffe_id)?;
            for violation in violations {
                writeln!(out, "  {violation}")?;
            }
        }
        writeln!(
            out,
            "{} checked, {} would fail",
            count_noun(checked, "entry", "entries"),
            broken.len()
        )?;
    }
    if !broken.is_empty() {
        bail!(
            "{} would fail the candidate policy",
            count_noun(broken.len(), "entry", "entries")
        );
    }
    Ok(())
}

fn ttl_flag(flag: &str, value: &str) -> anyhow::Result<Duration> {
    parse::duration(value).with_context(|| format!("{flag} is invalid"))
}

// ---------------------------------------------------------------------------------------------
// lanyard audit

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the hash chain of an audit log: every line must carry the hash of the one
    /// before it. Names the first line that was edited, removed or reordered.
    Verify(VerifyArgs),
}

impl AuditCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Verify(_) => "verify",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::Verify(args) => verify(&args, out),
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// The audit log (the server's `audit_log_path`).
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The head the log must end at (`<lines>:<sha256>`, as printed by a previous verify or
    /// kept by the server), to catch lines removed from the end.
    #[arg(long, value_name = "LINES:HASH")]
    head: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
}

fn verify(args: &VerifyArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let head = lanyard_core::audit::verify(&text)
        .with_context(|| format!("{} has been tampered with", args.file.display()))?;
    if let Some(expected) = &args.head {
        let (lines, hash) = expected
            .split_once(':')
            .context("--head must be <lines>:<sha256>")?;
        let lines: u64 = lines.parse().context("--head must be <lines>:<sha256>")?;
        if lines != head.lines || hash != head.hash {
            bail!(
                "{} ends at {}:{}, not at the expected {expected}: lines were removed from \
                 its end or the last line was edited",
                args.file.display(),
                head.lines,
                head.hash
            );
        }
    }
    if args.output.is_json() {
        write_json(
            out,
            &json!({"lines": head.lines, "head": head.hash, "valid": true}),
        )?;
    } else {
        writeln!(
            out,
            "{}: {} intact, head {}:{}",
            args.file.display(),
            count_noun(
                usize::try_from(head.lines).unwrap_or(usize::MAX),
                "line",
                "lines"
            ),
            head.lines,
            head.hash
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn check_defaults_are_the_servers_defaults() {
        let cli = Cli::try_parse_from(["lanyard", "policy", "check", "--policy", "p.rego"])
            .expect("parses");
        let Command::Policy(PolicyCommand::Check(args)) = cli.command else {
            panic!("not policy check");
        };
        assert_eq!(
            ttl_flag("x", &args.default_x509_svid_ttl).expect("valid"),
            lanyard_server::config::DEFAULT_X509_SVID_TTL
        );
        assert_eq!(
            ttl_flag("x", &args.default_jwt_svid_ttl).expect("valid"),
            lanyard_server::config::DEFAULT_JWT_SVID_TTL
        );
    }
}
