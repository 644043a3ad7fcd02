//! Log output for the long-running commands (`server run`, `agent run`, `dev`): text or JSON
//! lines on stderr through `tracing`, with the level from the config unless `RUST_LOG` says
//! otherwise, changeable while running; and their signals.

use std::fmt::Display;
use std::future::Future;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// The installed logger's level: set from the config, and again when the config is re-read,
/// unless `RUST_LOG` chose the filter (then it stays).
#[derive(Debug)]
pub(crate) struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
    from_env: bool,
    current: Mutex<String>,
}

impl LogLevel {
    /// Applies `level` (a level or `EnvFilter` directives) if it differs from the one in
    /// force and `RUST_LOG` is not set.
    pub(crate) fn set(&self, level: &str) -> anyhow::Result<()> {
        if self.from_env {
            tracing::debug!("RUST_LOG is set; log_level from the config is not used");
            return Ok(());
        }
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if *current == level {
            return Ok(());
        }
        let filter =
            EnvFilter::try_new(level).with_context(|| format!("invalid log level {level:?}"))?;
        // Said before the change, so that a quieter level does not swallow it.
        tracing::info!(from = %*current, to = level, "changing the log level");
        self.handle
            .reload(filter)
            .context("changing the log level")?;
        level.clone_into(&mut current);
        Ok(())
    }

    /// Re-reads the level from the config file at `path` with `read_level`, and applies it;
    /// a config that no longer reads keeps the level in force, with a warning.
    pub(crate) fn reload_from<E: Display>(
        &self,
        path: &Path,
        read_level: impl FnOnce(&Path) -> Result<String, E>,
    ) {
        let applied = read_level(path)
            .map_err(|error| anyhow::anyhow!("{error}"))
            .and_then(|level| self.set(&level));
        if let Err(error) = applied {
            tracing::warn!(
                config = %path.display(),
                "keeping the log level: {error:#}"
            );
        }
    }
}

/// Installs the global subscriber. `format` is `text` or `json`.
pub(crate) fn init(level: &str, format: &str) -> anyhow::Result<LogLevel> {
    let (filter, from_env) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, true),
        Err(_) => (
            EnvFilter::try_new(level).with_context(|| format!("invalid log level {level:?}"))?,
            false,
        ),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let output = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let subscriber = tracing_subscriber::registry().with(filter);
    let result = if format == "json" {
        subscriber.with(output.json()).try_init()
    } else {
        subscriber.with(output).try_init()
    };
    result.map_err(|e| anyhow::anyhow!("installing the logger: {e}"))?;
    Ok(LogLevel {
        handle,
        from_env,
        current: Mutex::new(level.to_owned()),
    })
}

/// The signals of the long-running commands, handled from the moment this is built: SIGINT
/// and SIGTERM shut down cleanly (sockets removed) and SIGHUP reloads what can be reloaded,
/// never fatal. Build
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

    /// Calls `on_hangup` at every SIGHUP from now on, and returns what resolves at the first
    /// SIGINT or SIGTERM.
    pub(crate) fn handle(
        self,
        mut on_hangup: impl FnMut() + Send + 'static,
    ) -> impl Future<Output = ()> + Send {
        let Self {
            mut interrupt,
            mut terminate,
            mut hangup,
        } = self;
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                on_hangup();
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
