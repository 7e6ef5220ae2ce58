//! One file per command: each turns its parsed arguments (`crate::cli`) into configs and
//! calls into the library crates. [`run`] dispatches.

mod bench_data;
mod bench_meta;
mod cache;
mod certs;
mod cluster;
mod demo;
mod meta;
mod migrate;
mod mount;
mod site;
mod status;
mod tier;
mod up;
pub(crate) mod volume;
mod volume_move;
mod warmup;

pub use bench_data::{DataBenchArgs, StoreBenchArgs};
pub use bench_meta::MetaBenchArgs;
pub use demo::DemoArgs;

use crate::cli::{BenchCmd, Cli, Command};

pub(crate) async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Meta(a) => meta::run_meta(a).await,
        Command::Cache(a) => cache::run_cache(a).await,
        Command::Up(a) => up::run_up(a).await,
        Command::Mount(a) => mount::run_mount(a).await,
        Command::Tier(a) => tier::tier(a).await,
        Command::Status(a) => status::status(a).await,
        Command::Cluster(c) => cluster::cluster(c).await,
        Command::Volume(v) => volume::volume(v).await,
        Command::Site(c) => site::site(c).await,
        Command::Bench(BenchCmd::Meta(a)) => bench_meta::run_meta_bench(a).await,
        Command::Bench(BenchCmd::Data(a)) => bench_data::run_data_bench(a).await,
        Command::Bench(BenchCmd::Store(a)) => bench_data::run_store_bench(a).await,
        Command::Certs(c) => certs::certs(c),
        Command::Demo(a) => demo::run_demo(a).await,
        Command::Migrate(a) => migrate::migrate(a).await,
        Command::Warmup(a) => warmup::warmup(a).await,
    }
}
