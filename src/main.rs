//! `access`: parse the command line, run it, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's malloc: the request path allocates and frees small objects on
/// both worker threads, and glibc's arenas spent about a tenth of the gateway's CPU on it
/// (`scripts/bench-gateway.sh`, perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = access::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(access::cli::EXIT_FAILURE);
        }
    };
    runtime.block_on(access::cli::run(cli, std::env::vars().collect()))
}
