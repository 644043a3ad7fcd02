//! The `--socket` option of every command that talks to the server.

use std::path::PathBuf;

use clap::Args;

use crate::admin::{Admin, DEFAULT_SERVER_SOCKET};

/// The `--socket` option shared by every command that talks to the server.
#[derive(Debug, Clone, Args)]
pub(crate) struct SocketArgs {
    /// Path to the server's admin API socket.
    #[arg(
        long = "socket",
        value_name = "PATH",
        env = "LANYARD_SERVER_SOCKET",
        default_value = DEFAULT_SERVER_SOCKET
    )]
    pub(crate) socket: PathBuf,
}

impl SocketArgs {
    /// Connects to the socket.
    pub(crate) async fn connect(&self) -> anyhow::Result<Admin> {
        Admin::connect(&self.socket).await
    }
}
