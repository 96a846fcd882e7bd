use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // started by libvirt as /etc/libvirt/hooks/<driver>.d/virtgate
    if let Some((ctx, driver, args)) = virtgate::cli::hook_invocation(&argv) {
        return virtgate::cli::run_hook(ctx, &driver, &args);
    }
    virtgate::cli::run(virtgate::cli::Cli::parse_from(argv))
}
