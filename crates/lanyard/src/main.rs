//! `lanyard`: the one Lanyard binary. Today it administers a running server over its admin
//! Unix socket (entries, agents, join tokens, bundles, one-off SVIDs, health); `server run`,
//! `agent run` and `dev` join it as further subcommands.
//!
//! Every failure ends as one line on stderr, `error: <command>: <what went wrong>`, and exit
//! status 1; usage errors included, so scripts need to handle only one shape.

mod cli;

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return cli::report_usage_error(&err),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            cli::report_error("lanyard", &anyhow::Error::new(err));
            return ExitCode::FAILURE;
        }
    };
    let command_name = cli.command.name();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = runtime.block_on(cli.command.run(&mut out));
    let flushed = out.flush();
    match result.and_then(|()| flushed.map_err(anyhow::Error::from)) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that stopped reading (`lanyard entry show | head`) is not a failure.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            cli::report_error(&command_name, &err);
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.downcast_ref::<std::io::Error>()
        .is_some_and(|err| err.kind() == std::io::ErrorKind::BrokenPipe)
}
