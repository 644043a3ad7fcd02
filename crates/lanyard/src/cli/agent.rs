//! `lanyard agent list|show|ban|evict|count`: attested agents through SPIRE's Agent API.
//! (`agent run`, the node agent itself, joins this group as one more variant.)

use std::io::Write;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use lanyard_core::SpiffeId;
use lanyard_core::agent::AttestedAgent;
use lanyard_proto::spire::api::server::agent::v1::{count_agents_request, list_agents_request};
use lanyard_proto::spire::api::types;
use serde_json::{Value, json};

use crate::cli::client::SocketArgs;
use crate::cli::output::{OutputArgs, agent_json, count_noun, write_agent_pretty, write_json};
use crate::cli::parse::{self, MatchMode};

#[derive(Debug, Subcommand)]
pub(crate) enum AgentCommand {
    /// Run the node agent until Ctrl-C or SIGTERM (SIGHUP re-reads log_level).
    Run(crate::cli::server::RunArgs),
    /// Check that the agent answers on its Workload API socket and reports itself serving.
    Healthcheck(crate::cli::workload::WorkloadSocketArgs),
    /// List attested agents.
    List(ListArgs),
    /// Show one attested agent.
    Show(AgentIdArgs),
    /// Ban an agent: it can neither renew its SVID nor attest again until evicted.
    Ban(AgentIdArgs),
    /// Evict an agent: delete its record, so that it must attest again.
    Evict(AgentIdArgs),
    /// Count attested agents.
    Count(CountArgs),
}

impl AgentCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Run(_) => "run",
            Self::Healthcheck(_) => "healthcheck",
            Self::List(_) => "list",
            Self::Show(_) => "show",
            Self::Ban(_) => "ban",
            Self::Evict(_) => "evict",
            Self::Count(_) => "count",
        }
    }

    pub(crate) async fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::Run(args) => run_agent(&args).await,
            Self::Healthcheck(socket) => {
                crate::cli::workload::agent_healthcheck(&socket, out).await
            }
            Self::List(args) => list(&args, out).await,
            Self::Show(args) => show(&args, out).await,
            Self::Ban(args) => ban(&args, out).await,
            Self::Evict(args) => evict(&args, out).await,
            Self::Count(args) => count(&args, out).await,
        }
    }
}

async fn run_agent(args: &crate::cli::server::RunArgs) -> anyhow::Result<()> {
    use crate::cli::logging;
    use anyhow::Context as _;
    let signals = logging::Signals::register()?;
    let config = lanyard_agent::AgentConfig::load(&args.config)
        .with_context(|| format!("config {}", args.config.display()))?;
    let log_level = logging::init(&config.log_level, &config.log_format)?;
    let config_path = args.config.clone();
    let shutdown = signals.handle(move || {
        tracing::info!("SIGHUP received: re-reading log_level from the config");
        log_level.reload_from(&config_path, |path| {
            lanyard_agent::AgentConfig::load(path).map(|config| config.log_level)
        });
    });
    lanyard_agent::run(config, shutdown).await?;
    Ok(())
}

/// Agent filters shared by `list` and `count`.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct AgentFilterArgs {
    /// Only agents admitted by this node attestor (e.g. join_token, x509pop).
    #[arg(long, value_name = "TYPE")]
    attestation_type: Option<String>,
    /// Only agents whose selectors match these, per --match (repeatable).
    #[arg(long = "selector", value_name = "TYPE:VALUE")]
    selectors: Vec<String>,
    /// How --selector matches.
    #[arg(long = "match", value_name = "MODE", value_enum, default_value_t)]
    match_mode: MatchMode,
    /// Only banned agents (--banned=false: only agents not banned).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    banned: Option<bool>,
    /// Only agents that renew by attesting again (--can-reattest=false: the others).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    can_reattest: Option<bool>,
    /// Only agents whose SVID expires before this time: RFC 3339 or Unix seconds.
    #[arg(long, value_name = "TIME")]
    expires_before: Option<String>,
}

impl AgentFilterArgs {
    fn to_filter(&self) -> anyhow::Result<list_agents_request::Filter> {
        let mut filter = list_agents_request::Filter {
            by_attestation_type: self.attestation_type.clone().unwrap_or_default(),
            by_banned: self.banned,
            by_can_reattest: self.can_reattest,
            by_expires_before: match &self.expires_before {
                Some(time) => parse::spire_filter_time(time)?,
                None => String::new(),
            },
            ..Default::default()
        };
        if !self.selectors.is_empty() {
            filter.by_selector_match = Some(types::SelectorMatch {
                selectors: parse::selectors(&self.selectors)?,
                r#match: self.match_mode.selector_match() as i32,
            });
        }
        Ok(filter)
    }

    fn to_count_filter(&self) -> anyhow::Result<count_agents_request::Filter> {
        Ok(self.to_filter()?.into())
    }
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    filter: AgentFilterArgs,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct CountArgs {
    #[command(flatten)]
    filter: AgentFilterArgs,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct AgentIdArgs {
    /// The agent's SPIFFE ID, e.g. spiffe://example.org/spire/agent/join_token/<token>.
    #[arg(long, value_name = "ID")]
    spiffe_id: String,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

impl AgentIdArgs {
    fn id(&self) -> anyhow::Result<SpiffeId> {
        parse::core_spiffe_id(&self.spiffe_id).context("--spiffe-id is invalid")
    }
}

async fn list(args: &ListArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let filter = args.filter.to_filter()?;
    let client = args.socket.connect().await?;
    let agents = client.agents(filter).await?;
    write_agents(out, &agents, args.output.is_json())
}

/// Prints a list of agents.
fn write_agents(out: &mut dyn Write, agents: &[AttestedAgent], json: bool) -> anyhow::Result<()> {
    if json {
        let agents: Vec<Value> = agents.iter().map(agent_json).collect();
        return write_json(out, &json!({ "agents": agents }));
    }
    if agents.is_empty() {
        writeln!(out, "No attested agents found")?;
        return Ok(());
    }
    writeln!(
        out,
        "Found {}:",
        count_noun(agents.len(), "attested agent", "attested agents")
    )?;
    for agent in agents {
        writeln!(out)?;
        write_agent_pretty(out, agent, false)?;
    }
    Ok(())
}

async fn show(args: &AgentIdArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let id = args.id()?;
    let client = args.socket.connect().await?;
    let agent = client.agent_by_id(&id).await?;
    if args.output.is_json() {
        write_json(out, &agent_json(&agent))
    } else {
        writeln!(out, "Found an attested agent given its SPIFFE ID")?;
        writeln!(out)?;
        write_agent_pretty(out, &agent, true)
    }
}

async fn ban(args: &AgentIdArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let id = args.id()?;
    let client = args.socket.connect().await?;
    client.ban_agent(&id).await?;
    if args.output.is_json() {
        write_json(out, &json!({}))
    } else {
        writeln!(out, "Agent banned successfully")?;
        Ok(())
    }
}

async fn evict(args: &AgentIdArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let id = args.id()?;
    let client = args.socket.connect().await?;
    client.evict_agent(&id).await?;
    if args.output.is_json() {
        write_json(out, &json!({}))
    } else {
        writeln!(out, "Agent evicted successfully")?;
        Ok(())
    }
}

async fn count(args: &CountArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let filter = args.filter.to_count_filter()?;
    let client = args.socket.connect().await?;
    let count = client.count_agents(filter).await?;
    if args.output.is_json() {
        write_json(out, &json!({ "count": count }))
    } else {
        let n = usize::try_from(count).unwrap_or_default();
        writeln!(
            out,
            "{}",
            count_noun(n, "attested agent", "attested agents")
        )?;
        Ok(())
    }
}
