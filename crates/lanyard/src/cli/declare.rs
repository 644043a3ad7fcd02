//! `lanyard plan|apply`: declared entries.

use std::io::Write;

use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct PlanArgs {}

#[derive(Debug, Args)]
pub(crate) struct ApplyArgs {}

pub(crate) async fn plan(_args: PlanArgs, _out: &mut dyn Write) -> anyhow::Result<()> {
    anyhow::bail!("not available yet")
}

pub(crate) async fn apply(_args: ApplyArgs, _out: &mut dyn Write) -> anyhow::Result<()> {
    anyhow::bail!("not available yet")
}
