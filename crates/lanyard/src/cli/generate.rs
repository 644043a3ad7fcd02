//! `lanyard completions <shell>` and `lanyard man [--dir DIR]`: shell completion scripts
//! (clap_complete) and roff man pages (clap_mangen) generated from the command's own clap
//! definitions, so they cannot drift from it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, CommandFactory as _};
use clap_complete::Shell;

use crate::cli::Cli;
use crate::cli::files::{PUBLIC_FILE_MODE, replace_file};

#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell to complete for. Load the script, e.g. `source <(lanyard completions bash)`,
    /// or install it where the shell looks for completions.
    #[arg(value_name = "SHELL", value_enum)]
    shell: Shell,
}

#[derive(Debug, Args)]
pub(crate) struct ManArgs {
    /// Write one page per command and subcommand into this directory (lanyard.1,
    /// lanyard-entry.1, lanyard-entry-create.1, …) instead of printing the top page.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Prints the completion script for `args.shell`.
pub(crate) fn completions(args: &CompletionsArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "lanyard", &mut script);
    out.write_all(&script)?;
    Ok(())
}

/// Prints the top page, or writes every page into `args.dir`.
pub(crate) fn man(args: &ManArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut command = Cli::command();
    // Building gives every subcommand its full name (`lanyard entry create`), which its page's
    // title and synopsis use.
    command.build();
    let Some(dir) = &args.dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(command).render(&mut page)?;
        out.write_all(&page)?;
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    write_pages(&command, dir, &mut written)?;
    writeln!(
        out,
        "Wrote {} man pages to {}",
        written.len(),
        dir.display()
    )?;
    Ok(())
}

/// Writes the page of `command` and of each of its subcommands, recursively.
fn write_pages(
    command: &clap::Command,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    // Named by the command's words: lanyard-entry-create.1.
    let man = clap_mangen::Man::new(command.clone());
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)?;
    replace_file(&path, &page, PUBLIC_FILE_MODE)?;
    written.push(path);
    for subcommand in command.get_subcommands() {
        if subcommand.is_hide_set() || subcommand.get_name() == "help" {
            continue;
        }
        write_pages(subcommand, dir, written)?;
    }
    Ok(())
}
