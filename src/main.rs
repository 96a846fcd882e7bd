use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // started by libvirt as /etc/libvirt/hooks/<driver>.d/virtgate
    let code = match virtgate::cli::hook_invocation(&argv) {
        Some((ctx, driver, args)) => virtgate::cli::run_hook(ctx, &driver, &args),
        None => {
            virtgate::cli::docs::complete_if_asked();
            virtgate::cli::run(virtgate::cli::Cli::parse_from(argv))
        }
    };
    // what was deleted is freed by the kernel after this process is gone
    virtgate::firewall::nfnl::release();
    code
}
