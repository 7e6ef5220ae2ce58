//! `elea bench meta`: the metadata benchmark. T concurrent workers, each in its own directory,
//! run the phases mkdir, create, stat, rename and unlink through the client library; every
//! operation is acknowledged by the service (committed and applied, or read linearizably).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use elea_common::{Ino, ROOT_INO, VolumeId};
use elea_metadata::MetaApi as _;
use elea_metadata::client::{ClientError, MetaClient};
use serde_json::json;

use crate::cli::{MetaAddr, client};

#[derive(Args, Debug)]
pub struct MetaBenchArgs {
    #[command(flatten)]
    pub meta: MetaAddr,
    /// Volume to run in (created if missing); default: a new volume for this run.
    #[arg(long)]
    pub volume: Option<String>,
    /// Concurrent workers.
    #[arg(long, default_value_t = 16)]
    pub threads: usize,
    /// Operations per phase, split between the workers.
    #[arg(long, default_value_t = 10_000)]
    pub files: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

const PHASES: [&str; 5] = ["mkdir", "create", "stat", "rename", "unlink"];

struct PhaseResult {
    name: &'static str,
    ops: usize,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
}

async fn one_op(c: &MetaClient, vol: VolumeId, dir: Ino, phase: &str, i: usize) -> Result<(), ClientError> {
    let name = |p: &str| format!("{p}{i}").into_bytes();
    match phase {
        "mkdir" => c.mkdir(vol, dir, &name("d"), 0o755, 0, 0).await.map(drop),
        "create" => c.create(vol, dir, &name("f"), 0o644).await.map(drop),
        "stat" => c.lookup(vol, dir, &name("f")).await.map(drop),
        "rename" => c.rename(vol, dir, &name("f"), dir, &name("r"), 0).await.map(drop),
        "unlink" => c.unlink(vol, dir, &name("r")).await.map(drop),
        _ => Ok(()),
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub async fn run_meta_bench(a: MetaBenchArgs) -> anyhow::Result<()> {
    if a.threads == 0 || a.files == 0 {
        bail!("--threads and --files must be positive");
    }
    let c = client(&a.meta)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let vol_name = a.volume.clone().unwrap_or_else(|| format!("bench-{stamp}"));
    let (c, vol) = match c.volume_client(&vol_name).await {
        Ok(found) => found,
        Err(ClientError::Fs(e)) if e == elea_common::Errno::ENOENT => {
            let v = c
                .create_volume(&vol_name, elea_fsm::VolumeConfig::default())
                .await
                .context("creating the benchmark volume")?;
            (c, v)
        }
        Err(e) => return Err(e).context("looking up the benchmark volume"),
    };
    let top = c
        .mkdir(vol.id, ROOT_INO, format!("bench-{stamp}-{}", std::process::id()).as_bytes(), 0o755, 0, 0)
        .await?;
    let mut dirs = Vec::with_capacity(a.threads);
    for t in 0..a.threads {
        dirs.push(c.mkdir(vol.id, top.ino, format!("w{t}").as_bytes(), 0o755, 0, 0).await?.ino);
    }
    let per = a.files.div_ceil(a.threads);
    let mut results = Vec::new();
    for phase in PHASES {
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(a.threads);
        for (t, dir) in dirs.iter().copied().enumerate() {
            let c = c.clone();
            let n = per.min(a.files.saturating_sub(t * per));
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(n);
                for i in 0..n {
                    let s = Instant::now();
                    one_op(&c, vol.id, dir, phase, i)
                        .await
                        .map_err(|e| anyhow::anyhow!("{phase} #{i}: {e}"))?;
                    lat.push(u64::try_from(s.elapsed().as_micros()).unwrap_or(u64::MAX));
                }
                anyhow::Ok(lat)
            }));
        }
        let mut all = Vec::with_capacity(a.files);
        for t in tasks {
            all.extend(t.await.context("worker")??);
        }
        let secs = start.elapsed().as_secs_f64().max(Duration::from_micros(1).as_secs_f64());
        all.sort_unstable();
        results.push(PhaseResult {
            name: phase,
            ops: all.len(),
            secs,
            p50_us: percentile(&all, 0.50),
            p99_us: percentile(&all, 0.99),
        });
    }
    if a.json {
        let phases: Vec<_> = results
            .iter()
            .map(|r| {
                json!({"phase": r.name, "ops": r.ops, "seconds": r.secs,
                            "ops_per_sec": r.ops as f64 / r.secs, "p50_us": r.p50_us, "p99_us": r.p99_us})
            })
            .collect();
        println!(
            "{}",
            json!({"benchmark": "meta", "volume": vol.name, "threads": a.threads, "files": a.files, "phases": phases})
        );
    } else {
        println!("elea bench meta: volume {:?}, {} workers, {} ops per phase", vol.name, a.threads, a.files);
        println!(
            "{:<8} {:>8} {:>9} {:>11} {:>9} {:>9}",
            "phase", "ops", "seconds", "ops/s", "p50 us", "p99 us"
        );
        for r in &results {
            println!(
                "{:<8} {:>8} {:>9.3} {:>11.0} {:>9} {:>9}",
                r.name,
                r.ops,
                r.secs,
                r.ops as f64 / r.secs,
                r.p50_us,
                r.p99_us
            );
        }
    }
    Ok(())
}
