//! `s4t`: the command-line client of the Stack4Things cloud. The commands live in
//! `iotronic/src/cli/` (binary-only code: the cloud library does not link the HTTP client).

#[path = "../cli/mod.rs"]
mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let json = cli.global.json;
    // One thread: the CLI waits on the network; the spinner and the proxy pumps are tasks.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("s4t: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(cli::run(cli));
    // A blocked read of stdin (ssh-proxy) must not keep the process alive.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if json {
                eprintln!("{}", f.to_json());
            } else {
                eprintln!("s4t: {f}");
            }
            ExitCode::from(f.kind.exit_code())
        }
    }
}
