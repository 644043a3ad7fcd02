//! `lanyard dev`: the one-command tour. A server and an agent in this process, on a fresh data
//! directory, the calling user registered as a workload, and the lines to paste printed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, anyhow};
use clap::Args;
use lanyard_core::{EntryId, RegistrationEntry, Selector, SpiffeId, TrustDomain};

use crate::cli::files::{PUBLIC_FILE_MODE, replace_file};
use crate::cli::logging;

/// How long the dev user's entry lives: well inside the baseline policy's 90 days.
const DEV_ENTRY_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Keep state in this directory (created if missing) instead of a temporary one that is
    /// removed on exit.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The trust domain.
    #[arg(long, default_value = "example.org")]
    trust_domain: String,
    /// Where to serve the Workload API. The default is the agent's usual socket, where
    /// `lanyard fetch` and other clients look first.
    #[arg(long, value_name = "PATH", default_value = crate::cli::workload::DEFAULT_AGENT_SOCKET)]
    socket: PathBuf,
    /// Log level.
    #[arg(long, default_value = "warn")]
    log_level: String,
}

/// The uid of this process, from the kernel's view of `/proc/self`.
fn current_uid() -> anyhow::Result<u32> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata("/proc/self")
        .context("reading /proc/self")?
        .uid())
}

/// The user name for `uid` from /etc/passwd, else `$USER`, else `uid-<uid>`; reduced to the
/// characters a SPIFFE path segment allows.
fn user_name(uid: u32) -> String {
    let from_passwd = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let _password = fields.next()?;
                let id: u32 = fields.next()?.parse().ok()?;
                (id == uid).then(|| name.to_owned())
            })
        });
    let raw = from_passwd
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| format!("uid-{uid}"));
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() || clean == "." || clean == ".." {
        format!("uid-{uid}")
    } else {
        clean
    }
}

pub(crate) async fn run(args: DevArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let signals = logging::Signals::register()?;
    // The level comes from a flag: nothing to re-read.
    let _log_level = logging::init(&args.log_level, "text")?;
    let trust_domain = TrustDomain::new(&args.trust_domain)
        .map_err(|e| anyhow!("--trust-domain {:?}: {e}", args.trust_domain))?;

    let (data_dir, _temp) = match &args.data_dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("lanyard-dev-")
                .tempdir()
                .context("creating a temporary data directory")?;
            (temp.path().to_owned(), Some(temp))
        }
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", data_dir.display()))?;

    let mut server_config =
        lanyard_server::ServerConfig::new(trust_domain.clone(), data_dir.join("server"));
    server_config.bind_address = "127.0.0.1:0".parse().context("bind address")?;
    server_config.socket_path = data_dir.join("server-admin").join("api.sock");
    // The shipped baseline policy, applied at issuance: the entry registered below passes it.
    let policy_path = data_dir.join("policy.rego");
    replace_file(&policy_path, BASELINE_POLICY.as_bytes(), PUBLIC_FILE_MODE)?;
    server_config.policy = Some(lanyard_server::config::PolicyConfig::new(policy_path));
    let server =
        lanyard_server::Server::start(server_config, lanyard_server::state::system_clock())
            .await
            .context("starting the server")?;
    let state = std::sync::Arc::clone(server.state());

    // Register the calling user, once: a restart with --data-dir finds the entry in place.
    let uid = current_uid()?;
    let user = user_name(uid);
    let agent_state = data_dir.join("agent");
    let first_start = !lanyard_agent::manager::state_file(&agent_state).exists();
    let token = EntryId::generate().as_str().to_owned();
    let agent_id = trust_domain.join_token_agent_id(&token)?;
    let spiffe_id = SpiffeId::from_segments(&trust_domain, &["user", &user])?;
    let now = SystemTime::now();
    if first_start {
        state
            .store
            .create_join_token(&token, now + Duration::from_secs(600))
            .await
            .context("creating a join token")?;
        let mut entry = RegistrationEntry::new(
            EntryId::generate(),
            spiffe_id.clone(),
            agent_id.clone(),
            [Selector::new("unix", &format!("uid:{uid}"))?]
                .into_iter()
                .collect(),
            now,
        );
        entry.owner = Some(user.clone());
        entry.reason = Some("lanyard dev".to_owned());
        entry.expires_at = Some(now + DEV_ENTRY_LIFETIME);
        state
            .store
            .create_entry(entry)
            .await
            .context("registering the current user")?;
        state.catch_up().await.context("indexing the entry")?;
    }

    let bundle_path = data_dir.join("bundle.pem");
    replace_file(
        &bundle_path,
        state.bundle().x509_authorities_pem().as_bytes(),
        PUBLIC_FILE_MODE,
    )?;
    let mut agent_config = lanyard_agent::AgentConfig::new(
        server.tcp_addr().to_string(),
        trust_domain.clone(),
        agent_state,
    );
    agent_config.trust_bundle_path = Some(bundle_path);
    agent_config.socket_path = args.socket.clone();
    if first_start {
        agent_config.join_token = Some(token);
    }
    let agent = match lanyard_agent::Agent::start(agent_config.clone()).await {
        Ok(agent) => agent,
        Err(error) => {
            server.shutdown().await;
            return Err(error).context("starting the agent");
        }
    };

    print_banner(
        out,
        &trust_domain,
        &spiffe_id,
        &agent.agent_id(),
        server.socket_path(),
        &agent_config.socket_path,
        &data_dir,
        args.data_dir.is_some(),
    )?;
    out.flush()?;

    let outcome = tokio::select! {
        () = signals.handle(|| tracing::info!("SIGHUP received: reloading the policy")) => Ok(()),
        error = agent.failed() => Err(anyhow!("agent stopped: {error}")),
    };
    agent.shutdown().await;
    server.shutdown().await;
    if args.data_dir.is_none() {
        writeln!(out, "Removed {}", data_dir.display())?;
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
fn print_banner(
    out: &mut dyn Write,
    trust_domain: &TrustDomain,
    user_id: &SpiffeId,
    agent_id: &SpiffeId,
    admin_socket: &Path,
    workload_socket: &Path,
    data_dir: &Path,
    kept: bool,
) -> anyhow::Result<()> {
    let admin = admin_socket.display();
    writeln!(
        out,
        "Lanyard dev is running: a server and an agent for trust domain {trust_domain}."
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "  your identity   {user_id}  (selector unix:uid, owner you, reason \"lanyard dev\")"
    )?;
    writeln!(out, "  agent           {agent_id}")?;
    writeln!(
        out,
        "  policy          the baseline (deploy/policy/baseline.rego): entries need an owner, a \
         reason and an expiry within 90 days, or they authorize nothing"
    )?;
    writeln!(
        out,
        "  data            {}{}",
        data_dir.display(),
        if kept {
            ""
        } else {
            "  (removed on exit; --data-dir keeps it)"
        }
    )?;
    writeln!(out)?;
    writeln!(out, "Point SPIFFE clients at the Workload API:")?;
    writeln!(out)?;
    writeln!(
        out,
        "  export SPIFFE_ENDPOINT_SOCKET=unix://{}",
        workload_socket.display()
    )?;
    writeln!(out, "  lanyard fetch x509")?;
    writeln!(out, "  lanyard fetch jwt --audience example")?;
    writeln!(out)?;
    writeln!(out, "Manage entries from another shell:")?;
    writeln!(out)?;
    writeln!(out, "  export LANYARD_SERVER_SOCKET={admin}")?;
    writeln!(out, "  lanyard entry show")?;
    writeln!(
        out,
        "  lanyard entry create --spiffe-id spiffe://{trust_domain}/demo --parent-id {agent_id} \\\n      --selector unix:uid:$(id -u) --owner $USER --reason demo --expires-at $(($(date +%s) + 7*86400))"
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "Governance (README, \"Governance\"): exceptions, grants and who used what:"
    )?;
    writeln!(out)?;
    writeln!(out, "  lanyard exception list --all")?;
    writeln!(out, "  lanyard report usage {user_id}")?;
    writeln!(out)?;
    writeln!(out, "Press Ctrl-C to stop.")?;
    Ok(())
}

/// `deploy/policy/baseline.rego`, the policy `lanyard dev` runs with.
const BASELINE_POLICY: &str = include_str!("../../../../deploy/policy/baseline.rego");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_become_path_segments() {
        let uid = current_uid().unwrap();
        let name = user_name(uid);
        assert!(!name.is_empty());
        assert!(
            SpiffeId::from_segments(&TrustDomain::new("td").unwrap(), &["user", &name]).is_ok()
        );
        // An unknown uid falls back to $USER or uid-N, still a valid segment.
        let other = user_name(4_000_000_000);
        assert!(
            SpiffeId::from_segments(&TrustDomain::new("td").unwrap(), &["user", &other]).is_ok()
        );
    }
}
