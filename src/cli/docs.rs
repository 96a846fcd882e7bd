//! Shell completions and the man page, generated from the clap definitions.

use clap::CommandFactory;

use super::Cli;

pub fn completions(shell: clap_complete::Shell) -> Result<(), String> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "virtgate", &mut std::io::stdout());
    Ok(())
}

pub fn man() -> Result<(), String> {
    let cmd = Cli::command();
    // section 8: a command for root, in /usr/sbin
    clap_mangen::Man::new(cmd)
        .section("8")
        .render(&mut std::io::stdout())
        .map_err(super::output_error)
}
