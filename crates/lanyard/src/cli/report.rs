//! `lanyard report`: governance reports.

use std::io::Write;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum ReportCommand {
    /// Not available yet.
    Placeholder,
}

impl ReportCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Placeholder => "placeholder",
        }
    }

    pub(crate) async fn run(self, _out: &mut dyn Write) -> anyhow::Result<()> {
        anyhow::bail!("not available yet")
    }
}
