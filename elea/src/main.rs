//! The `elea` binary: command-line parsing ([`cli`]: the argument structs), logging set-up
//! and process wiring ([`cmd`]: one file per command). All logic lives in the library
//! crates; the binary only turns flags into their configs and calls.

mod cli;
mod cmd;
mod progress;
mod units;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    quiet_broken_pipe();
    let args = cli::Cli::parse();
    let default_level = if args.command.is_server() { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.command.runtime_workers() {
        builder.worker_threads(n);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(cmd::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("error: {msg}");
            if msg.contains("h2 protocol error") && std::env::var_os("ELEA_CERT").is_none() {
                // What a plaintext client sees of a server that wants TLS.
                eprintln!(
                    "hint: the service may require this cluster's certificates: give --ca, --cert and \
                     --key (or ELEA_CA, ELEA_CERT, ELEA_KEY; `elea up` prints the export line)"
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// `elea status | head` closes the pipe early: the next print fails with EPIPE (Rust ignores
/// SIGPIPE, and this crate has no unsafe code to restore it), and `println!` panics. End the
/// process quietly then, with the status a shell gives a process killed by SIGPIPE.
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}
