//! `lanyard grant`: just-in-time grants.

use std::io::Write;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum GrantCommand {
    /// Not available yet.
    Placeholder,
}

impl GrantCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Placeholder => "placeholder",
        }
    }

    pub(crate) async fn run(self, _out: &mut dyn Write) -> anyhow::Result<()> {
        anyhow::bail!("not available yet")
    }
}
