//! The command tree and its dispatch. Each top-level subcommand lives in its own module with
//! its clap types and its handlers; adding one (`server run`, `dev`) is one variant here plus
//! one module.

mod agent;
mod bundle;
mod client;
mod datastore;
pub(crate) mod declare;
mod dev;
pub(crate) mod entry;
mod exception;
pub(crate) mod federation;
mod files;
mod generate;
mod grant;
mod health;
mod helper;
mod logging;
pub(crate) mod output;
mod parse;
mod policy;
mod report;
mod revoke;
mod server;
mod svid;
mod token;
mod workload;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Issue and manage SPIFFE workload identities.
#[derive(Debug, Parser)]
#[command(name = "lanyard", version, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

// Parsed once per process; boxing the larger argument sets would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create, show, update, delete and count registration entries.
    #[command(subcommand)]
    Entry(entry::EntryCommand),
    /// List, show, ban, evict and count attested agents.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Generate join tokens for node attestation.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Show the server's trust bundle and manage federated bundles.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Create, list, show, update and delete federation relationships with other trust
    /// domains, and ask for a federated bundle to be fetched now.
    #[command(subcommand)]
    Federation(federation::FederationCommand),
    /// Mint one-off X.509-SVIDs.
    #[command(subcommand)]
    X509(svid::X509Command),
    /// Mint one-off JWT-SVIDs.
    #[command(subcommand)]
    Jwt(svid::JwtCommand),
    /// Operate the server.
    #[command(subcommand)]
    Server(server::ServerCommand),
    /// Check a datastore, or move it from SQLite to PostgreSQL (offline).
    #[command(subcommand)]
    Datastore(datastore::DatastoreCommand),
    /// Fetch this process's SVIDs and bundles from the agent's Workload API.
    #[command(subcommand)]
    Fetch(workload::FetchCommand),
    /// Validate credentials through the agent's Workload API.
    #[command(subcommand)]
    Validate(workload::ValidateCommand),
    /// Print every X.509-SVID rotation the agent pushes, until Ctrl-C.
    Watch(workload::WatchArgs),
    /// Keep this process's SVIDs written as files for software that speaks no SPIFFE, and
    /// tell it when they change (spiffe-helper's job).
    Helper(helper::HelperArgs),
    /// Run a server and an agent in this process and register the current user: the
    /// one-command tour.
    Dev(dev::DevArgs),
    /// Test a policy, and check existing entries against a candidate policy.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Verify the tamper-evident audit log.
    #[command(subcommand)]
    Audit(policy::AuditCommand),
    /// Create, list, show, extend and revoke exceptions to the policy.
    #[command(subcommand)]
    Exception(exception::ExceptionCommand),
    /// Revoke SVIDs before they expire (by serial, SPIFFE ID, entry, agent or JWT ID), and
    /// list and show revocations with who has applied them.
    #[command(subcommand)]
    Revoke(revoke::RevokeCommand),
    /// Create and revoke just-in-time grants: entries that end on their own.
    #[command(subcommand)]
    Grant(grant::GrantCommand),
    /// Show what `apply` would change to reach a declared entries file.
    Plan(declare::PlanArgs),
    /// Reconcile the server's entries with a declared entries file.
    Apply(declare::ApplyArgs),
    /// Governance reports: stale, expiring, exceptions, ownerless, usage, holders.
    #[command(subcommand)]
    Report(report::ReportCommand),
    /// Print a shell completion script for bash, zsh, fish, elvish or PowerShell.
    Completions(generate::CompletionsArgs),
    /// Print the man page, or write one page per command and subcommand with --dir.
    Man(generate::ManArgs),
}

impl Command {
    /// The command's words as typed (`entry create`), for error messages.
    pub(crate) fn name(&self) -> String {
        let (group, leaf) = match self {
            Self::Entry(command) => ("entry", command.name()),
            Self::Agent(command) => ("agent", command.name()),
            Self::Token(command) => ("token", command.name()),
            Self::Bundle(command) => ("bundle", command.name()),
            Self::Federation(command) => ("federation", command.name()),
            Self::X509(command) => ("x509", command.name()),
            Self::Jwt(command) => ("jwt", command.name()),
            Self::Server(command) => ("server", command.name()),
            Self::Datastore(command) => ("datastore", command.name()),
            Self::Fetch(command) => ("fetch", command.name()),
            Self::Validate(command) => ("validate", command.name()),
            Self::Policy(command) => ("policy", command.name()),
            Self::Audit(command) => ("audit", command.name()),
            Self::Exception(command) => ("exception", command.name()),
            Self::Grant(command) => ("grant", command.name()),
            Self::Revoke(command) => ("revoke", command.name()),
            Self::Report(command) => ("report", command.name()),
            Self::Plan(_) => return "plan".to_owned(),
            Self::Apply(_) => return "apply".to_owned(),
            Self::Watch(_) => return "watch".to_owned(),
            Self::Helper(_) => return "helper".to_owned(),
            Self::Dev(_) => return "dev".to_owned(),
            Self::Completions(_) => return "completions".to_owned(),
            Self::Man(_) => return "man".to_owned(),
        };
        format!("{group} {leaf}")
    }

    /// Whether the command runs an agent serving the Workload API (`agent run`, `dev`).
    pub(crate) fn serves_workloads(&self) -> bool {
        matches!(
            self,
            Self::Agent(agent::AgentCommand::Run(_)) | Self::Dev(_)
        )
    }

    /// Runs the command, writing its results to `out`. An error is reported by the caller as
    /// the command's one stderr line; a batch whose items partly failed prints every item
    /// first and then returns an error that counts the failures.
    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::Entry(command) => command.run(out).await,
            Self::Agent(command) => command.run(out).await,
            Self::Token(command) => command.run(out).await,
            Self::Bundle(command) => command.run(out).await,
            Self::Federation(command) => command.run(out).await,
            Self::X509(command) => command.run(out).await,
            Self::Jwt(command) => command.run(out).await,
            Self::Server(command) => command.run(out).await,
            Self::Datastore(command) => command.run(out).await,
            Self::Fetch(command) => command.run(out).await,
            Self::Validate(command) => command.run(out).await,
            Self::Watch(args) => args.run(out).await,
            Self::Helper(args) => helper::run(args, out).await,
            Self::Dev(args) => dev::run(args, out).await,
            Self::Policy(command) => command.run(out).await,
            Self::Audit(command) => command.run(out).await,
            Self::Exception(command) => command.run(out).await,
            Self::Grant(command) => command.run(out).await,
            Self::Revoke(command) => command.run(out).await,
            Self::Plan(args) => declare::plan(args, out).await,
            Self::Apply(args) => declare::apply(args, out).await,
            Self::Report(command) => command.run(out).await,
            Self::Completions(args) => generate::completions(&args, out),
            Self::Man(args) => generate::man(&args, out),
        }
    }
}

/// The exit statuses of `lanyard`, the same for every command, decided only here.
///
/// `plan --exit-code` answers [`Exit::Changes`] (3) when the plan has changes: terraform's
/// `plan -detailed-exitcode` uses 2 for that, but 2 is the usage status here, as it is for
/// clap and most Unix commands, so a script cannot mistake a mistyped flag for pending changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// The command did what it was asked (`plan --exit-code`: and there is nothing to change).
    Success = 0,
    /// The command failed: the server refused or could not be reached, a file or a value did
    /// not parse, an item of a batch failed, a policy test failed, a plan has conflicts…
    Failure = 1,
    /// The command line is wrong: an unknown subcommand or flag, a missing or conflicting
    /// flag, a value clap refuses; `--help` says how to call it.
    Usage = 2,
    /// `plan --exit-code`: the plan has changes to apply.
    Changes = 3,
}

impl Exit {
    /// The status as the process returns it.
    pub(crate) fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

/// A mistake in the command line that clap cannot see (flags that only make sense together,
/// checked in code): reported as one `error:` line like any error, but with exit status
/// [`Exit::Usage`], as clap's own usage errors.
#[derive(Debug)]
pub(crate) struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A [`UsageError`] saying `message`.
pub(crate) fn usage_error(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(message.into()))
}

/// Ends a command that has printed its whole answer with a status other than 0 and no error
/// line (`plan --exit-code` with changes pending).
#[derive(Debug)]
pub(crate) struct QuietExit(pub(crate) Exit);

impl std::fmt::Display for QuietExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0.code())
    }
}

impl std::error::Error for QuietExit {}

/// The exit status of a command that ended with `result`, its error (if any) reported on
/// stderr.
pub(crate) fn finish(command_name: &str, result: anyhow::Result<()>) -> ExitCode {
    let exit = match result {
        Ok(()) => Exit::Success,
        // A reader that stopped reading (`lanyard entry show | head`) is not a failure.
        Err(err) if is_broken_pipe(&err) => Exit::Success,
        Err(err) => {
            if let Some(QuietExit(exit)) = find_cause::<QuietExit>(&err) {
                *exit
            } else {
                report_error(command_name, &err);
                exit_status(&err)
            }
        }
    };
    exit.into()
}

/// The status of a failed command: [`Exit::Usage`] for a [`UsageError`], else
/// [`Exit::Failure`].
pub(crate) fn exit_status(err: &anyhow::Error) -> Exit {
    if find_cause::<UsageError>(err).is_some() {
        Exit::Usage
    } else {
        Exit::Failure
    }
}

/// The first error of type `E` in `err`'s chain, whatever context was added around it.
fn find_cause<E: std::error::Error + 'static>(err: &anyhow::Error) -> Option<&E> {
    err.chain().find_map(|cause| cause.downcast_ref::<E>())
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.downcast_ref::<std::io::Error>()
        .is_some_and(|err| err.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Prints a failed command's error as one line on stderr.
#[allow(clippy::print_stderr)] // The binary's one place that writes errors.
pub(crate) fn report_error(command_name: &str, err: &anyhow::Error) {
    let line = if let Some(unhealthy) = err.downcast_ref::<health::Unhealthy>() {
        // `healthcheck` has its own wording, like SPIRE's, for probes that grep for it.
        unhealthy.to_string()
    } else if find_cause::<UsageError>(err).is_some() {
        format!("error: {command_name}: {err:#} (see --help)")
    } else {
        format!("error: {command_name}: {err:#}")
    };
    eprintln!("{}", one_line(&line));
}

/// Prints a command-line parsing error as one line on stderr, or help and version text as
/// clap renders it, and returns the exit status: [`Exit::Usage`] for every error, as clap
/// itself would.
#[allow(clippy::print_stderr)]
pub(crate) fn report_usage_error(err: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let exit = match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Help asked for explicitly goes to stdout and succeeds; help shown because a
            // subcommand is missing goes to stderr and is a usage error.
            let _ = err.print();
            if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                Exit::Usage
            } else {
                Exit::Success
            }
        }
        _ => {
            // clap's message runs up to its usage block; keep that part, on one line.
            let rendered = err.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.starts_with("Usage:"))
                .filter(|line| !line.starts_with("For more information"))
                .collect();
            let message = one_line(&message.join("\n"));
            let first = if message.starts_with("error:") {
                message
            } else {
                format!("error: {message}")
            };
            eprintln!("{} (see --help)", one_line(&first));
            Exit::Usage
        }
    };
    exit.into()
}

/// Collapses a message onto one line: server-supplied text may hold newlines.
fn one_line(message: &str) -> String {
    message
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The commands that print no data, only a status line, a stream or generated text, and
    /// so take no `--output`. Every other command must take it.
    const NO_DATA_COMMANDS: &[&str] = &[
        // Long-running processes: they log, they print nothing to parse.
        "server run",
        "agent run",
        "dev",
        "helper",
        // Streams a line per rotation until Ctrl-C.
        "watch",
        // Probes: the exit status is the answer.
        "server healthcheck",
        "agent healthcheck",
        // Generated scripts and roff pages.
        "completions",
        "man",
    ];

    /// The words of every leaf command (`entry create`), walking the clap tree.
    fn leaf_commands() -> Vec<(String, clap::Command)> {
        fn walk(
            command: &clap::Command,
            words: &[&str],
            leaves: &mut Vec<(String, clap::Command)>,
        ) {
            for subcommand in command.get_subcommands() {
                if subcommand.get_name() == "help" || subcommand.is_hide_set() {
                    continue;
                }
                let mut path = words.to_vec();
                path.push(subcommand.get_name());
                if subcommand.has_subcommands() {
                    walk(subcommand, &path, leaves);
                } else {
                    leaves.push((path.join(" "), subcommand.clone()));
                }
            }
        }
        let mut leaves = Vec::new();
        walk(&Cli::command(), &[], &mut leaves);
        leaves
    }

    #[test]
    fn every_command_that_prints_data_takes_output_json() {
        let leaves = leaf_commands();
        for name in NO_DATA_COMMANDS {
            assert!(
                leaves.iter().any(|(leaf, _)| leaf == name),
                "{name} is allowed no --output but is not a command"
            );
        }
        let mut missing = Vec::new();
        for (name, command) in &leaves {
            let output = command
                .get_arguments()
                .find(|arg| arg.get_long() == Some("output"));
            if NO_DATA_COMMANDS.contains(&name.as_str()) {
                assert!(
                    output.is_none(),
                    "{name} is allowed no --output but has one"
                );
                continue;
            }
            let Some(output) = output else {
                missing.push(name.clone());
                continue;
            };
            let values: Vec<String> = output
                .get_possible_values()
                .iter()
                .map(|value| value.get_name().to_owned())
                .collect();
            assert_eq!(values, ["pretty", "json"], "{name} --output");
        }
        assert!(
            missing.is_empty(),
            "these commands print data but take no --output (add `OutputArgs`, or list them in \
             NO_DATA_COMMANDS if they print none): {missing:?}"
        );
    }

    #[test]
    fn exit_statuses_are_distinct() {
        assert_eq!(
            [Exit::Success, Exit::Failure, Exit::Usage, Exit::Changes].map(Exit::code),
            [0, 1, 2, 3]
        );
        let usage = usage_error("--node needs --spiffe-id").context("entry create");
        assert_eq!(exit_status(&usage), Exit::Usage);
        assert_eq!(exit_status(&anyhow::anyhow!("refused")), Exit::Failure);
    }

    #[test]
    fn one_line_joins_lines() {
        assert_eq!(one_line("a\nb\r\n  c\n"), "a b c");
    }

    #[test]
    fn names_are_the_typed_words() {
        let cli = Cli::try_parse_from(["lanyard", "entry", "count"]).expect("parses");
        assert_eq!(cli.command.name(), "entry count");
        let cli = Cli::try_parse_from(["lanyard", "server", "healthcheck"]).expect("parses");
        assert_eq!(cli.command.name(), "server healthcheck");
        assert!(!cli.command.serves_workloads());
        for serving in [
            &["lanyard", "agent", "run", "--config", "agent.conf"][..],
            &["lanyard", "dev"],
        ] {
            let cli = Cli::try_parse_from(serving).expect("parses");
            assert!(cli.command.serves_workloads(), "{serving:?}");
        }
    }
}
