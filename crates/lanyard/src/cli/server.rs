//! `lanyard server …`: run the server, or check that a running one is healthy.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::cli::health::{self, HealthcheckArgs};
use crate::cli::logging;

#[derive(Debug, Subcommand)]
pub(crate) enum ServerCommand {
    /// Run the server until Ctrl-C or SIGTERM (SIGHUP reloads the policy, if any).
    Run(RunArgs),
    /// Check that the server answers on its admin socket and reports itself serving.
    Healthcheck(HealthcheckArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The TOML configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub(crate) config: PathBuf,
}

impl ServerCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Run(_) => "run",
            Self::Healthcheck(_) => "healthcheck",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::Run(args) => run(&args).await,
            Self::Healthcheck(args) => health::healthcheck(&args, out).await,
        }
    }
}

async fn run(args: &RunArgs) -> anyhow::Result<()> {
    let signals = logging::Signals::register()?;
    let config = lanyard_server::ServerConfig::load(&args.config)
        .with_context(|| format!("config {}", args.config.display()))?;
    let format = match config.log_format {
        lanyard_server::config::LogFormat::Text => "text",
        lanyard_server::config::LogFormat::Json => "json",
    };
    logging::init(&config.log_level, format)?;
    let reloads = match config.policy {
        Some(_) => logging::HANGUP_RELOADS_POLICY,
        None => logging::HANGUP_RELOADS_NOTHING,
    };
    lanyard_server::run(config, signals.handle(reloads)).await?;
    Ok(())
}
