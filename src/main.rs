//! The `portcullis` binary: parse the command line, call into the library.

use clap::Parser;
use portcullis::cli::{self, Cli, Command};

/// The shipped build's allocator (docs/performance.md, "The allocator"): per new tunnel about 3k
/// fewer instructions than glibc's malloc, whose aligned allocations (tokio's tasks and I/O
/// registrations) take its slow path, and less memory per idle tunnel.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let cli = Cli::parse();
    // Diagnostics go to stderr; stdout is the connection log's by default.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = cli.config.as_deref();
    let code = match cli.command.unwrap_or(Command::Run) {
        Command::Run => match cli::runtime(
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        ) {
            Ok(rt) => rt.block_on(cli::run(config)),
            Err(e) => {
                eprintln!("cannot start runtime: {e}");
                1
            }
        },
        Command::Check => cli::check(config),
        Command::PrintRuleset => cli::print_ruleset(config),
        Command::Kill { agent, reason } => cli::kill(config, agent.as_deref(), reason.as_deref()),
        Command::Revive { totp, agent } => cli::revive(config, agent.as_deref(), &totp),
        Command::Status => cli::status(config),
        Command::UnlockRevive => cli::unlock_revive(config),
        Command::Reload => cli::reload(config),
        Command::ApplyRuleset => cli::apply_ruleset(config),
        Command::Explain {
            agent,
            target,
            address,
        } => cli::explain(config, &agent, &target, &address),
        Command::Selftest(args) => cli::selftest(*args),
    };
    std::process::exit(code);
}
