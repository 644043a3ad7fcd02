//! `lanyard`: the one Lanyard binary. Today it administers a running server over its admin
//! Unix socket (entries, agents, join tokens, bundles, one-off SVIDs, health); `server run`,
//! `agent run` and `dev` join it as further subcommands.
//!
//! Every failure ends as one line on stderr, `error: <command>: <what went wrong>`, usage
//! errors included, so scripts need to handle only one shape. The exit status is 0 for
//! success, 1 for an error, 2 for a usage error and 3 for `plan --exit-code` with changes
//! (`cli::Exit`).
//!
//! The command lives in this library so that the fuzz targets (`fuzz/`) can reach the parsers
//! of operator-supplied files through [`fuzzing`]; `src/main.rs` only calls [`main`].

mod admin;
mod cli;

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;

/// Runs the command line: parses the arguments, runs the command, reports any failure.
pub fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return cli::report_usage_error(&err),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if cli.command.serves_workloads() {
        // A node's workloads start with its agent: their first calls come at once, and each
        // runtime thread's heap grows by their streams (see `lanyard_agent::heap`).
        builder.on_thread_park(lanyard_agent::heap::reserve_worker_heap);
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(err) => return cli::finish("lanyard", Err(anyhow::Error::new(err))),
    };
    let command_name = cli.command.name();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = runtime.block_on(cli.command.run(&mut out));
    let flushed = out.flush();
    cli::finish(
        &command_name,
        result.and_then(|()| flushed.map_err(anyhow::Error::from)),
    )
}

/// The parsers of the files an operator hands the command, for the fuzz targets in `fuzz/`.
/// Not an API: each returns the number of entries (or relationships) parsed or the one-line
/// error the command would print.
#[doc(hidden)]
pub mod fuzzing {
    /// Parses a `entry create --data`/`entry update --data` batch file.
    pub fn parse_entry_data(json: &[u8]) -> Result<usize, String> {
        crate::cli::entry::data::parse_entries(json)
            .map(|specs| specs.len())
            .map_err(|err| format!("{err:#}"))
    }

    /// Parses a `federation create --data`/`federation update --data` file and builds each
    /// relationship it holds (bundles included), as the command does before sending them.
    pub fn parse_federation_data(json: &[u8]) -> Result<usize, String> {
        let configs = crate::cli::federation::data::parse_relationships(json)
            .map_err(|err| format!("{err:#}"))?;
        for config in &configs {
            config.relationship().map_err(|err| format!("{err:#}"))?;
        }
        Ok(configs.len())
    }

    /// Parses a declared entries file of `plan` and `apply`.
    pub fn parse_declared_entries(text: &str) -> Result<usize, String> {
        crate::cli::declare::parse_file(text)
            .map(|file| file.entries.len())
            .map_err(|err| format!("{err:#}"))
    }
}
