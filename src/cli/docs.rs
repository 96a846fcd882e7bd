//! Shell completions and the man page, generated from the clap definitions.
//!
//! Completions are clap_complete's dynamic ones: the script a shell sources (what
//! `virtgate completions SHELL` prints) asks the binary itself at each TAB
//! (`COMPLETE=SHELL virtgate -- WORDS`), so they know what only the binary knows: the
//! domains of the config (for `add`, `remove`, `diagnose`). They follow the binary's
//! version: the script and the binary come from the same package.

use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::CompletionCandidate;
use clap_complete::env::Shells;

use super::Cli;
use crate::config;

/// Answers a shell's completion request (`COMPLETE` set in the environment) and exits;
/// returns at once otherwise. Not for hooks: libvirt runs those.
pub fn complete_if_asked() {
    clap_complete::CompleteEnv::with_factory(Cli::command)
        .bin("virtgate")
        .completer("virtgate")
        .complete();
}

/// The domains of the config (the `--config` on the line being completed, else
/// `VIRTGATE_CONFIG`, else the default), each with its number of forwards.
pub fn domain_candidates() -> Vec<CompletionCandidate> {
    let args: Vec<String> = std::env::args().collect();
    let from_line = args.windows(2).rev().find_map(|w| {
        (w[0] == "--config")
            .then(|| w[1].clone())
            .or_else(|| w[0].strip_prefix("--config=").map(str::to_string))
    });
    let path = from_line
        .or_else(|| std::env::var("VIRTGATE_CONFIG").ok())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG));
    let Ok(cfg) = config::load_unchecked(&path) else {
        return Vec::new();
    };
    let mut out: Vec<CompletionCandidate> = cfg
        .domains
        .iter()
        .map(|(name, d)| {
            CompletionCandidate::new(name).help(Some(
                format!("{} forward(s)", d.domain.forwards.len()).into(),
            ))
        })
        .collect();
    out.extend(
        cfg.invalid_domains
            .iter()
            .map(|name| CompletionCandidate::new(name).help(Some("config error".into()))),
    );
    out
}

/// The script that registers virtgate's completions with a shell.
pub fn completions(shell: clap_complete::Shell) -> Result<(), String> {
    let name = shell.to_string();
    let shells = Shells::builtins();
    let c = shells
        .completer(&name)
        .ok_or_else(|| format!("no completions for {name}"))?;
    c.write_registration(
        "COMPLETE",
        "virtgate",
        "virtgate",
        "virtgate",
        &mut std::io::stdout(),
    )
    .map_err(super::output_error)
}

pub fn man() -> Result<(), String> {
    let cmd = Cli::command();
    // section 8: a command for root, in /usr/sbin
    clap_mangen::Man::new(cmd)
        .section("8")
        .render(&mut std::io::stdout())
        .map_err(super::output_error)
}
