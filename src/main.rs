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
    let config = cli.config.as_deref();
    // Diagnostics go to stderr; stdout is the connection log's by default.
    cli::init_tracing(config, matches!(cli.command, None | Some(Command::Run)));
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
            method,
        } => cli::explain(config, &agent, &target, &address, &method),
        Command::Ca(cli::CaCommand::Init { permit }) => cli::ca_init(config, &permit),
        Command::Ca(cli::CaCommand::Show) => cli::ca_show(config),
        Command::Selftest(args) => cli::selftest(*args),
    };
    std::process::exit(code);
}
