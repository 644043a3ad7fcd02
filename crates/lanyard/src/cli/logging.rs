//! Log output for the long-running commands (`server run`, `agent run`, `dev`): text or JSON
//! lines on stderr through `tracing`, with the level from the config unless `RUST_LOG` says
//! otherwise.

use anyhow::Context as _;
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

/// Resolves when the process receives Ctrl-C (SIGINT) or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
