//! `lanyard completions` and `lanyard man`: generated from the clap definitions, so every
//! command shows up in them.

use std::process::Command;

use crate::exceptions::{lanyard, succeed, text};

/// The top-level subcommands, as `lanyard --help` lists them.
fn top_level_commands() -> Vec<String> {
    let help = succeed(&["--help"]);
    let commands: Vec<String> = help
        .lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect();
    assert!(commands.len() > 20, "{help}");
    commands
}

#[test]
fn completions_cover_every_top_level_command() {
    let commands = top_level_commands();
    for expected in ["entry", "plan", "report", "completions", "man"] {
        assert!(commands.iter().any(|c| c == expected), "{commands:?}");
    }
    let bash = succeed(&["completions", "bash"]);
    assert!(bash.contains("complete -F _lanyard"), "{bash}");
    for command in &commands {
        // bash's script names each subcommand as a case of its state machine.
        assert!(
            bash.contains(&format!("lanyard,{command})")),
            "the bash script lacks {command}"
        );
    }
    // A subcommand's flags are completed too.
    assert!(bash.contains("--spiffe-id"));
    assert!(bash.contains("--exit-code"));

    let zsh = succeed(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef lanyard"), "{zsh}");
    let fish = succeed(&["completions", "fish"]);
    assert!(fish.contains("complete -c lanyard"), "{fish}");
    for shell in ["elvish", "powershell"] {
        let script = succeed(&["completions", shell]);
        assert!(script.contains("lanyard"), "{shell}: {script}");
    }
}

#[test]
fn man_writes_a_page_per_command() {
    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("man1");
    let said = succeed(&["man", "--dir", pages.to_str().unwrap()]);
    assert!(said.starts_with("Wrote "), "{said}");

    let create = std::fs::read_to_string(pages.join("lanyard-entry-create.1"))
        .expect("a page for entry create");
    assert!(create.starts_with(".ie"), "roff: {create}");
    assert!(create.contains(".TH lanyard-entry-create 1"), "{create}");
    // roff writes a flag's dashes as \-.
    for flag in ["spiffe\\-id", "parent\\-id", "selector", "output", "socket"] {
        assert!(create.contains(&format!("\\-\\-{flag}")), "lacks --{flag}");
    }
    assert!(
        create.contains("lanyard entry create"),
        "its synopsis names it"
    );

    for name in [
        "lanyard.1",
        "lanyard-entry.1",
        "lanyard-plan.1",
        "lanyard-report-holders.1",
        "lanyard-completions.1",
    ] {
        assert!(pages.join(name).is_file(), "{name} missing");
    }
    assert!(!pages.join("lanyard-help.1").exists(), "no page for `help`");
    let plan = std::fs::read_to_string(pages.join("lanyard-plan.1")).unwrap();
    assert!(plan.contains("\\-\\-exit\\-code"), "{plan}");
    let written = std::fs::read_dir(&pages).unwrap().count();
    assert!(
        said.contains(&format!("Wrote {written} man pages")),
        "{said}"
    );

    // Again: the pages are replaced, not refused.
    succeed(&["man", "--dir", pages.to_str().unwrap()]);
}

#[test]
fn the_top_page_renders() {
    let out = lanyard(&["man"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(page.contains(".TH lanyard 1"), "{page}");
    assert!(page.contains("SUBCOMMANDS"), "{page}");
    for command in top_level_commands() {
        assert!(page.contains(&command), "the page lacks {command}");
    }
    // Rendered as `man` would, where nroff is installed.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lanyard.1");
    std::fs::write(&file, &page).unwrap();
    let Ok(rendered) = Command::new("nroff").args(["-man"]).arg(&file).output() else {
        return;
    };
    assert!(rendered.status.success(), "{}", text(&rendered.stderr));
    // Bold is printed by overstriking: drop each character a backspace takes back.
    let mut plain = String::new();
    for c in text(&rendered.stdout).chars() {
        if c == '\u{8}' {
            plain.pop();
        } else {
            plain.push(c);
        }
    }
    for expected in ["NAME", "SYNOPSIS", "SUBCOMMANDS", "lanyard-entry(1)"] {
        assert!(plain.contains(expected), "{expected}: {plain}");
    }
    assert!(
        plain.contains("Issue and manage SPIFFE workload identities"),
        "{plain}"
    );
}
