//! `lanyard server …`: run the server, or check that a running one is healthy.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::cli::health::{self, HealthcheckArgs};
use crate::cli::logging;

#[derive(Debug, Subcommand)]
pub(crate) enum ServerCommand {
    /// Run the server until Ctrl-C or SIGTERM (SIGHUP re-reads log_level and reloads the policy).
    Run(RunArgs),
    /// Check that the server answers on its admin socket and reports itself serving.
    Healthcheck(HealthcheckArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The TOML configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub(crate) config: PathBuf,
    /// Start a new trust domain even though the data directory holds key files or an audit
    /// log of an earlier one whose datastore is missing. The old key files are renamed, not
    /// deleted. Without this flag the server refuses to start in that state.
    #[arg(long)]
    pub(crate) new_trust_domain: bool,
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
    let mut config = lanyard_server::ServerConfig::load(&args.config)
        .with_context(|| format!("config {}", args.config.display()))?;
    config.new_trust_domain = args.new_trust_domain;
    let format = match config.log_format {
        lanyard_server::config::LogFormat::Text => "text",
        lanyard_server::config::LogFormat::Json => "json",
    };
    let log_level = logging::init(&config.log_level, format)?;
    // The policy holder listens for SIGHUP itself.
    let reloads = match config.policy {
        Some(_) => "re-reading log_level from the config, reloading the policy",
        None => "re-reading log_level from the config",
    };
    let config_path = args.config.clone();
    let shutdown = signals.handle(move || {
        tracing::info!("SIGHUP received: {reloads}");
        log_level.reload_from(&config_path, |path| {
            lanyard_server::ServerConfig::load(path).map(|config| config.log_level)
        });
    });
    lanyard_server::run(config, shutdown).await?;
    Ok(())
}
