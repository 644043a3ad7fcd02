//! Log output for the long-running commands (`server run`, `agent run`, `dev`): text or JSON
//! lines on stderr through `tracing`, with the level from the config unless `RUST_LOG` says
//! otherwise; and their signals.

use std::future::Future;

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `format` is `text` or `json`.
pub(crate) fn init(level: &str, format: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .with_context(|| format!("invalid log level {level:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|e| anyhow::anyhow!("installing the logger: {e}"))
}

/// What a SIGHUP does to a process whose policy file is reloaded on SIGHUP (by the server's
/// policy holder, which listens for it too).
pub(crate) const HANGUP_RELOADS_POLICY: &str = "reloading the policy";
/// What a SIGHUP does to a process with nothing to reload.
pub(crate) const HANGUP_RELOADS_NOTHING: &str = "nothing to reload";

/// The signals of the long-running commands, handled from the moment this is built: SIGINT
/// and SIGTERM shut down cleanly (sockets removed) and SIGHUP is logged and survived. Build
/// it first thing, before a socket exists: an unhandled SIGHUP or SIGTERM would end the
/// process on the spot, leaving its sockets behind.
#[derive(Debug)]
pub(crate) struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    pub(crate) fn register() -> anyhow::Result<Self> {
        let listen = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("listening for {name}"))
        };
        Ok(Self {
            interrupt: listen(SignalKind::interrupt(), "SIGINT")?,
            terminate: listen(SignalKind::terminate(), "SIGTERM")?,
            hangup: listen(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// Logs every SIGHUP from now on with what it `reloads`, and returns what resolves at
    /// the first SIGINT or SIGTERM.
    pub(crate) fn handle(self, reloads: &'static str) -> impl Future<Output = ()> + Send {
        let Self {
            mut interrupt,
            mut terminate,
            mut hangup,
        } = self;
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP received: {reloads}");
            }
        });
        async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            tracing::info!("shutting down");
        }
    }
}
