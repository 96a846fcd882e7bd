use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    virtgate::cli::run(virtgate::cli::Cli::parse())
}
