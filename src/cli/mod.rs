//! The command line: global options, subcommands, and dispatch. Each command is a thin
//! function over the library (config, facts, reconcile).

mod check;
mod diagnose;
pub mod docs;
mod edit;
mod import;
mod install;
mod metadata_edit;
mod render;
mod status;
mod unit;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, BackendChoice, Config};
use crate::daemon::control;
use crate::facts::LibvirtPaths;
use crate::reconcile::{self, Context};
use crate::state;

/// Exit code for usage errors (clap uses 2 as well).
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "virtgate",
    version,
    about = "Publish ports of libvirt guests on NAT-ed networks, and keep them working",
    long_about = "virtgate publishes ports of libvirt virtual machines on NAT-ed networks \
(DNAT from outside and from the host, an accept placed where libvirt's firewall needs it, \
hairpin for guests) and keeps those forwards working through libvirt and firewall reloads.\n\n\
Exit codes: 0 ok, 1 failure, 2 usage."
)]
pub struct Cli {
    /// Main config file (TOML, or a libvirt-hook-qemu hooks.json); conf.d/*.toml beside it is read too
    #[arg(long, global = true, env = "VIRTGATE_CONFIG", default_value = config::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Directory for virtgate's state and lock
    #[arg(long, global = true, env = "VIRTGATE_STATE_DIR", default_value = state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Firewall backend for virtgate's own rules
    #[arg(long, global = true, env = "VIRTGATE_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Prefix for libvirt's /etc, /var/lib and /run files (for tests)
    #[arg(
        long,
        global = true,
        env = "VIRTGATE_LIBVIRT_ROOT",
        default_value = "/"
    )]
    pub libvirt_root: PathBuf,
    /// More log output (repeat for more)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the config; errors name file:line:col; exit 1 on any error
    #[command(
        after_help = "With the daemon running, also says whether it runs this config.\nExample:\n  virtgate check\n  virtgate --config /etc/libvirt/hooks/hooks.json check"
    )]
    Check,
    /// Print the exact ruleset apply would load, changing nothing
    #[command(after_help = "Example:\n  virtgate render --backend iptables")]
    Render,
    /// Make the kernel match the config now, in one atomic change
    #[command(
        after_help = "With the daemon running the same config and backend, the daemon reloads the config\nand applies it at once (one writer); without one, apply works alone.\nExample:\n  virtgate apply"
    )]
    Apply,
    /// Add a forward to a domain's entry in the config file (or its <metadata>), then apply
    #[command(
        after_help = "Keeps the file's comments and layout; the whole config is checked as it would be\nfirst: an invalid or conflicting forward writes nothing. With --metadata the forward goes\nin the domain's own XML (virsh metadata, live and persistent), and travels with it.\nExample:\n  virtgate add web 8080:80\n  virtgate add web 203.0.113.1:2222:22 --description \"ssh for the web team\"\n  virtgate add --metadata web 8443:443"
    )]
    Add {
        /// The libvirt domain's name
        #[arg(add = clap_complete::ArgValueCandidates::new(docs::domain_candidates))]
        domain: String,
        /// The forward, short form: [LISTEN_IP:]HOST[-END]:GUEST[-END][/tcp|udp|sctp]
        spec: String,
        /// Written as a long-form [[domain.NAME.forward]] entry with this description
        #[arg(long)]
        description: Option<String>,
        /// In the domain's <metadata> (through virsh), not in the config file
        #[arg(long)]
        metadata: bool,
    },
    /// Remove a forward from a domain's entry in the config file (or its <metadata>), then apply
    #[command(
        after_help = "Example:\n  virtgate remove web 8080:80\n  virtgate remove --metadata web 8443:443"
    )]
    Remove {
        /// The libvirt domain's name
        #[arg(add = clap_complete::ArgValueCandidates::new(docs::domain_candidates))]
        domain: String,
        /// The forward as `add` took it (short form)
        spec: String,
        /// From the domain's <metadata> (through virsh), not from the config file
        #[arg(long)]
        metadata: bool,
    },
    /// Print the TOML equivalent of a libvirt-hook-qemu hooks.json (or --write it to conf.d/)
    #[command(
        after_help = "Short form where it can be, long form otherwise; every difference in meaning is a\ncomment. virtgate also reads a hooks.json as it is (--config /etc/libvirt/hooks/hooks.json).\nExample:\n  virtgate import-hooks-json /etc/libvirt/hooks/hooks.json\n  virtgate import-hooks-json /etc/libvirt/hooks/hooks.json --write"
    )]
    ImportHooksJson {
        /// The hooks.json to convert
        file: PathBuf,
        /// Write it to conf.d/hooks-json.toml beside the config (never over an existing file)
        #[arg(long)]
        write: bool,
    },
    /// Walk the path to a domain's forwards and say what holds, what blocks, and the fix
    #[command(
        after_help = "Steps: config entry, domain running, guest address and its source, virtgate's rules\nand accept placement in the kernel, ip_forward, route_localnet (localhost forwards), hairpin\nmode (br_netfilter), other tables' drops in a forward hook (Docker's FORWARD policy, a\nfirewalld zone, any table), the guest listening (a TCP connect from the host), counters\nand whether they move. Exit 0: clear; 1: something blocks.\nExample:\n  virtgate diagnose web\n  virtgate diagnose web 8080 --json"
    )]
    Diagnose {
        /// The libvirt domain's name
        #[arg(add = clap_complete::ArgValueCandidates::new(docs::domain_candidates))]
        domain: String,
        /// Only the forwards of this host port
        port: Option<u16>,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Show every forward: guest address and its source, state, counters
    #[command(
        after_help = "The daemon's line is live when it answers on its control socket.\nExample:\n  virtgate status\n  virtgate status --json | jq '.forwards[] | select(.state != \"active\")'"
    )]
    Status {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Keep the forwards working: reconcile whenever the ruleset, libvirt's files or the
    /// config change (systemd Type=notify; SIGHUP reloads, SIGTERM leaves forwards in place)
    #[command(
        after_help = "Repairs within a second what a firewall reload, `nft flush ruleset` or libvirt's own
reload removed, and turns a forward live as soon as its guest's address is known: its
DHCP lease, the neighbour table, or what it snoops on the guest's tap (a DHCP ACK, an ARP,
its first packet). Hooks keep working with or without it.
Example:
  virtgate install --daemon && systemctl enable --now virtgate
  virtgate -v daemon    # in the foreground
  virtgate daemon --metrics 127.0.0.1:9465    # Prometheus metrics at /metrics"
    )]
    Daemon {
        /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR:PORT/metrics; off
        /// unless given
        #[arg(long, value_name = "ADDR:PORT")]
        metrics: Option<std::net::SocketAddr>,
        /// Follow this libvirt's events (read-only; `none`: follow only its files)
        #[arg(long, value_name = "URI", default_value = "qemu:///system")]
        libvirt_uri: String,
    },
    /// libvirt hook entry point: `hook qemu|network|daemon OBJECT OP SUBOP EXTRA`, XML on stdin
    #[command(
        after_help = "libvirt runs it as /etc/libvirt/hooks/qemu.d/virtgate NAME OP SUBOP EXTRA.\nExample (by hand):\n  virsh dumpxml web | virtgate hook qemu web started begin -"
    )]
    Hook {
        /// qemu, network or daemon
        driver: String,
        /// OBJECT OP SUBOP EXTRA, as libvirt passes them
        #[arg(num_args = 0.., allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install the libvirt hooks (qemu.d, network.d, daemon.d); never touches foreign hooks
    #[command(
        after_help = "Example:\n  virtgate install && systemctl reload libvirtd\n  virtgate install --daemon    # also the daemon's systemd unit, enabled and started\n  virtgate install --refresh   # after an upgrade: the hook copies become this binary"
    )]
    Install {
        /// Also install the daemon's systemd unit (virtgate.service) and, where systemd
        /// runs, enable and start it
        #[arg(long)]
        daemon: bool,
        /// Where the unit goes
        #[arg(long, value_name = "DIR", default_value = unit::DEFAULT_DIR, requires = "daemon")]
        unit_dir: PathBuf,
        /// Only replace the hook copies (and the unit) an earlier install wrote with this
        /// binary; nothing is installed where there were none (the .deb's postinst runs it)
        #[arg(long, conflicts_with = "daemon")]
        refresh: bool,
    },
    /// Remove virtgate's hook files and all its rules; keep the config
    #[command(after_help = "Example:\n  virtgate uninstall")]
    Uninstall,
    /// Print a shell completion script
    #[command(
        after_help = "Example:\n  virtgate completions bash > /etc/bash_completion.d/virtgate"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff)
    #[command(after_help = "Example:\n  virtgate man > /usr/local/share/man/man8/virtgate.8")]
    Man,
}

impl Cli {
    pub fn context(&self) -> Context {
        Context {
            config_path: self.config.clone(),
            state_dir: self.state_dir.clone(),
            backend: self.backend,
            libvirt: LibvirtPaths::new(&self.libvirt_root),
        }
    }
}

/// Loads the config or explains why not.
pub(crate) fn load_config(ctx: &Context) -> Result<Config, String> {
    config::load(&ctx.config_path).map_err(|e| format!("config unusable, nothing changed: {e}"))
}

/// Asks the running daemon (if one answers on its control socket).
pub(crate) fn ask_daemon(
    ctx: &Context,
    command: control::Command,
    timeout: std::time::Duration,
) -> Option<control::Answer> {
    let request = control::Request {
        command,
        config: ctx.config_path.clone(),
        backend: ctx.backend,
    };
    control::ask(&ctx.state_dir, &request, timeout)
}

/// Applies what is valid; Ok(false) (exit 1) if the config had errors. With a daemon
/// running this config, the daemon applies (it reloads the config first).
fn apply(ctx: &Context) -> Result<bool, String> {
    let cfg = load_config(ctx)?;
    for d in &cfg.diagnostics {
        eprintln!("{d}");
    }
    // a reconcile at 10,000 forwards from empty takes a fraction of this
    match ask_daemon(
        ctx,
        control::Command::Apply,
        std::time::Duration::from_secs(120),
    ) {
        Some(control::Answer {
            applied: Some(a),
            report,
            ..
        }) => return applied_by_daemon(&a, report.pid),
        Some(other) => eprintln!(
            "virtgate: the daemon (pid {}) runs {} with the {:?} backend: applying here; the daemon puts its own config back at its next reconcile",
            other.report.pid,
            other.config.display(),
            other.backend
        ),
        None => {}
    }
    let out = reconcile::reconcile(ctx, &cfg, |st| reconcile::facts_for(ctx, st), |_| {})
        .map_err(|e| format!("apply failed, the kernel keeps its previous ruleset: {e}"))?;
    let active = out.rules;
    println!(
        "{} ({} backend): {active} rule(s) for {} forward(s)",
        if out.changed { "applied" } else { "unchanged" },
        out.backend,
        out.active
    );
    let errors = cfg.errors().count();
    if errors > 0 {
        eprintln!(
            "virtgate: {errors} config error(s): the domains concerned were left as they were"
        );
    }
    // the process ends here: freeing every rule and forward one by one costs more than
    // the exit does (a tenth of an `apply` at 10,000 forwards)
    std::mem::forget(out);
    std::mem::forget(cfg);
    Ok(errors == 0)
}

/// What the daemon said it did for `apply`.
fn applied_by_daemon(a: &control::Applied, pid: u32) -> Result<bool, String> {
    if let Some(e) = &a.error {
        return Err(format!("the daemon (pid {pid}): {e}"));
    }
    println!(
        "{} ({} backend, by the daemon, pid {pid}): {} rule(s) for {} forward(s)",
        if a.changed { "applied" } else { "unchanged" },
        a.backend,
        a.rules,
        a.active
    );
    if a.config_errors > 0 {
        eprintln!(
            "virtgate: {} config error(s): the domains concerned were left as they were",
            a.config_errors
        );
    }
    Ok(a.config_errors == 0)
}

/// If this binary was started by libvirt as `<hooks>/<driver>.d/virtgate`, the command
/// line for the hook: settings from the file `virtgate install` wrote.
pub fn hook_invocation(argv: &[std::ffi::OsString]) -> Option<(Context, String, Vec<String>)> {
    let p = std::path::Path::new(argv.first()?);
    let driver_dir = p.parent()?;
    let driver = driver_dir.file_name()?.to_str()?.strip_suffix(".d")?;
    if p.file_name()? != "virtgate" || !install::DRIVERS.contains(&driver) {
        return None;
    }
    let hooks = driver_dir.parent()?;
    // before the settings are read: what is wrong with them is logged
    crate::logging::init(0, true);
    let default = Cli::parse_from(["virtgate", "check"]).context();
    let ctx = crate::hook::settings::load(hooks, default);
    let args = argv[1..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    Some((ctx, driver.to_string(), args))
}

/// A short-lived run (a hook or a command, not the daemon): its heap grows in one step,
/// and `main` hands its nf_tables sockets over at exit ([`crate::firewall::nfnl::release`]).
fn one_shot() {
    crate::heap::for_one_shot();
    crate::firewall::nfnl::exits_soon();
}

/// Runs a hook invocation found by [`hook_invocation`].
pub fn run_hook(ctx: Context, driver: &str, args: &[String]) -> ExitCode {
    one_shot();
    crate::logging::init(0, true);
    ExitCode::from(crate::hook::run(
        &ctx,
        driver,
        args,
        std::io::stdin().lock(),
    ))
}

/// `virtgate status | head -1`: a closed stdout ends the command quietly (exit 141, as a
/// tool killed by SIGPIPE), where `println!` would panic. SIGPIPE itself stays ignored:
/// a child that exits without reading its stdin (a failing `iptables-restore`) must give
/// an error, not kill virtgate mid-change.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("");
        // println! says "failed printing to stdout"; clap_complete's writer its own words
        if msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info)
    }));
}

/// An error writing the command's output: a closed stdout ends it quietly (see
/// [`quiet_on_closed_stdout`]); anything else is an error.
pub(crate) fn output_error(e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    format!("writing the output: {e}")
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let hook = matches!(cli.command, Command::Hook { .. });
    let daemon = matches!(cli.command, Command::Daemon { .. });
    if !daemon {
        one_shot();
    }
    if !hook && !daemon {
        quiet_on_closed_stdout();
    }
    crate::logging::init(cli.verbose.max(u8::from(daemon)), hook);
    let ctx = cli.context();
    let result = match &cli.command {
        Command::Hook { driver, args } => {
            return ExitCode::from(crate::hook::run(
                &ctx,
                driver,
                args,
                std::io::stdin().lock(),
            ));
        }
        Command::Install { refresh: true, .. } => install::refresh(&ctx),
        Command::Install {
            daemon, unit_dir, ..
        } => install::install(&ctx, daemon.then_some(unit_dir.as_path())),
        Command::Uninstall => install::uninstall(&ctx),
        Command::Check => check::run(&ctx),
        Command::Add {
            domain,
            spec,
            description,
            metadata: false,
        } => edit::add(&ctx, domain, spec, description.as_deref()),
        Command::Add {
            domain,
            spec,
            description,
            metadata: true,
        } => metadata_edit::add(&ctx, domain, spec, description.as_deref()),
        Command::Remove {
            domain,
            spec,
            metadata: false,
        } => edit::remove(&ctx, domain, spec),
        Command::Remove {
            domain,
            spec,
            metadata: true,
        } => metadata_edit::remove(&ctx, domain, spec),
        Command::Diagnose { domain, port, json } => diagnose::run(&ctx, domain, *port, *json),
        Command::ImportHooksJson { file, write } => import::run(&ctx, file, *write),
        Command::Render => render::run(&ctx),
        Command::Apply => apply(&ctx),
        Command::Daemon {
            metrics,
            libvirt_uri,
        } => {
            let opts = crate::daemon::Options {
                metrics: *metrics,
                libvirt_uri: (libvirt_uri != "none").then(|| libvirt_uri.clone()),
            };
            crate::daemon::run(&ctx, &opts).map(|_| true)
        }
        Command::Status { json } => status::run(&ctx, *json).map(|_| true),
        Command::Completions { shell } => docs::completions(*shell).map(|_| true),
        Command::Man => docs::man().map(|_| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("virtgate: {e}");
            ExitCode::from(1)
        }
    }
}
