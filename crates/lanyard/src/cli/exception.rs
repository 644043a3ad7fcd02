//! `lanyard exception`: exceptions to the policy.

use std::io::Write;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum ExceptionCommand {
    /// Not available yet.
    Placeholder,
}

impl ExceptionCommand {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Placeholder => "placeholder",
        }
    }

    pub(crate) async fn run(self, _out: &mut dyn Write) -> anyhow::Result<()> {
        anyhow::bail!("not available yet")
    }
}
