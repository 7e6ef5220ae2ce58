//! `elea bench data`: the data path benchmark. Writes a file through the data client (every
//! write durable on the volume's replica count of cache nodes and committed to metadata),
//! reads it back hot, tiers the volume and waits for it, drops every cache, and reads it
//! again cold from the object store. Every byte read is checked.

use std::time::Instant;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Args;
use elea_cache::{DataClient, DataConfig};
use elea_common::ROOT_INO;
use elea_common::pattern::pattern as content;
use elea_metadata::MetaApi as _;
use futures::StreamExt as _;
use serde_json::json;

use super::tier::tier_volume;
use crate::cli::{MetaAddr, client};
use crate::units::parse_size;

#[derive(Args, Debug)]
pub struct DataBenchArgs {
    #[command(flatten)]
    pub meta: MetaAddr,
    /// Volume to write in (must exist, with an object store for the cold phase).
    #[arg(long)]
    pub volume: String,
    /// File size.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Bytes per write and per read call.
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    pub block: u64,
    /// Calls in flight.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Site of the cache nodes to write to.
    #[arg(long, default_value = "local")]
    pub site: String,
    /// Skip tiering and the cold read.
    #[arg(long)]
    pub no_cold: bool,
    /// Keep the file at the end (for what is measured next, a migration say).
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

struct Phase {
    name: &'static str,
    secs: f64,
}

pub async fn run_data_bench(a: DataBenchArgs) -> anyhow::Result<()> {
    if a.size == 0 || a.block == 0 || a.threads == 0 {
        bail!("--size, --block and --threads must be positive");
    }
    if a.block > 64 << 20 {
        bail!("--block must be at most 64M");
    }
    // A volume in a Raft group of its own is served by that group (slice ids included).
    let (meta, vol) =
        client(&a.meta)?.volume_client(&a.volume).await.with_context(|| format!("volume {:?}", a.volume))?;
    let peers = a.meta.tls.block_clients()?;
    let mut cfg = DataConfig::new(&a.site);
    cfg.blocks = peers.config().clone();
    let data = DataClient::new(meta.clone(), cfg);
    let stamp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let name = format!("bench-data-{stamp}");
    let file =
        meta.create(vol.id, ROOT_INO, name.as_bytes(), 0o644).await.context("creating the benchmark file")?;
    let offsets: Vec<u64> = (0..a.size.div_ceil(a.block)).map(|i| i * a.block).collect();
    let len_at = |off: u64| (a.size - off).min(a.block) as usize;
    let mut phases = Vec::new();
    // Generated before the clock starts, so the figures are the data path's alone.
    let blocks: std::collections::HashMap<u64, Bytes> =
        offsets.iter().map(|off| (*off, Bytes::from(content(*off, len_at(*off))))).collect();
    let blocks = std::sync::Arc::new(blocks);

    let t = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(offsets.iter().copied())
        .map(|off| {
            let data = data.clone();
            let bytes = blocks[&off].clone();
            async move {
                data.write_extents(vol.id, file.ino, &[(off, bytes)])
                    .await
                    .with_context(|| format!("write at {off}"))?;
                Ok(())
            }
        })
        .buffer_unordered(a.threads)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<()>>()?;
    phases.push(Phase { name: "write", secs: t.elapsed().as_secs_f64() });

    let read_all = |label: &'static str| {
        let data = data.clone();
        let offsets = offsets.clone();
        let blocks = blocks.clone();
        async move {
            let t = Instant::now();
            let results: Vec<anyhow::Result<()>> = futures::stream::iter(offsets)
                .map(|off| {
                    let data = data.clone();
                    let want = blocks[&off].clone();
                    async move {
                        let got = data
                            .read_file(vol.id, file.ino, off, len_at(off))
                            .await
                            .with_context(|| format!("{label} read at {off}"))?;
                        if got != want {
                            bail!("{label} read at {off}: the bytes differ from what was written");
                        }
                        Ok(())
                    }
                })
                .buffer_unordered(a.threads)
                .collect()
                .await;
            results.into_iter().collect::<anyhow::Result<()>>()?;
            Ok::<_, anyhow::Error>(Phase { name: label, secs: t.elapsed().as_secs_f64() })
        }
    };
    data.clear_cache();
    phases.push(read_all("hot-read").await?);

    if !a.no_cold {
        let t = Instant::now();
        tier_volume(&meta, &peers, &vol, true).await?;
        let tier_secs = t.elapsed().as_secs_f64();
        for n in meta.cache_nodes().await?.iter().filter(|n| n.alive) {
            peers
                .drop_cache(&n.addr)
                .await
                .with_context(|| format!("dropping the read cache of node {}", n.id))?;
        }
        data.clear_cache();
        phases.push(Phase { name: "tier", secs: tier_secs });
        phases.push(read_all("cold-read").await?);
        // The cold read filled the cache nodes' read caches: read once more from them.
        data.clear_cache();
        phases.push(read_all("cached-read").await?);
    }
    if !a.keep {
        let _ = meta.unlink(vol.id, ROOT_INO, name.as_bytes()).await;
    }
    let mib = a.size as f64 / (1 << 20) as f64;
    if a.json {
        let list: Vec<_> = phases
            .iter()
            .map(|p| json!({"phase": p.name, "secs": p.secs, "mib_per_s": mib / p.secs.max(1e-9)}))
            .collect();
        println!(
            "{}",
            json!({"volume": a.volume, "size": a.size, "block": a.block, "threads": a.threads,
                   "replicas": vol.config.replicas, "phases": list})
        );
    } else {
        println!(
            "elea bench data: {} MiB in {} KiB calls, {} in flight, R={}",
            mib,
            a.block >> 10,
            a.threads,
            vol.config.replicas
        );
        for p in &phases {
            println!("{:<12} {:>9.1} MiB/s  ({:.2} s)", p.name, mib / p.secs.max(1e-9), p.secs);
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct StoreBenchArgs {
    /// Object store URL (credentials from the environment).
    #[arg(long)]
    pub store: String,
    /// Total bytes.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Object size.
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    pub block: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Also copy the objects to this store with plain opendal GETs and PUTs (`--threads` in
    /// flight): the baseline of `elea migrate` between the same two stores.
    #[arg(long)]
    pub copy_to: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// `elea bench store`: the baseline for cold reads. Puts objects of `--block` bytes, then
/// reads them back with plain opendal GETs (no codec, no cache node), then deletes them.
pub async fn run_store_bench(a: StoreBenchArgs) -> anyhow::Result<()> {
    if a.size == 0 || a.block == 0 || a.threads == 0 {
        bail!("--size, --block and --threads must be positive");
    }
    let store = elea_store::Store::open(&a.store, &elea_store::StoreConfig::default())?;
    let op = store.operator().clone();
    let stamp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let n = a.size.div_ceil(a.block);
    let path = |i: u64| format!("bench-store-{stamp}/{i:08}");
    let t = Instant::now();
    let puts: Vec<anyhow::Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let op = op.clone();
            let p = path(i);
            async move {
                op.write(&p, content(i, a.block as usize)).await.with_context(|| format!("put {p}"))?;
                Ok(())
            }
        })
        .buffer_unordered(a.threads)
        .collect()
        .await;
    puts.into_iter().collect::<anyhow::Result<()>>()?;
    let put_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let gets: Vec<anyhow::Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let op = op.clone();
            let p = path(i);
            async move {
                let b = op.read(&p).await.with_context(|| format!("get {p}"))?;
                if b.len() as u64 != a.block {
                    bail!("get {p}: {} bytes", b.len());
                }
                Ok(())
            }
        })
        .buffer_unordered(a.threads)
        .collect()
        .await;
    gets.into_iter().collect::<anyhow::Result<()>>()?;
    let get_secs = t.elapsed().as_secs_f64();
    let copy_secs = match &a.copy_to {
        Some(url) => {
            let to = elea_store::Store::open(url, &elea_store::StoreConfig::default())?.operator().clone();
            let t = Instant::now();
            let copies: Vec<anyhow::Result<()>> = futures::stream::iter(0..n)
                .map(|i| {
                    let (op, to) = (op.clone(), to.clone());
                    let p = path(i);
                    async move {
                        let b = op.read(&p).await.with_context(|| format!("get {p}"))?;
                        to.write(&p, b).await.with_context(|| format!("put {p} to the copy"))?;
                        Ok(())
                    }
                })
                .buffer_unordered(a.threads)
                .collect()
                .await;
            copies.into_iter().collect::<anyhow::Result<()>>()?;
            let secs = t.elapsed().as_secs_f64();
            for i in 0..n {
                let _ = to.delete(&path(i)).await;
            }
            Some(secs)
        }
        None => None,
    };
    for i in 0..n {
        let _ = op.delete(&path(i)).await;
    }
    let mib = (n * a.block) as f64 / (1 << 20) as f64;
    if a.json {
        println!(
            "{}",
            json!({"store": a.store, "size": n * a.block, "block": a.block, "threads": a.threads,
                   "put_mib_per_s": mib / put_secs, "get_mib_per_s": mib / get_secs,
                   "copy_to": a.copy_to, "copy_mib_per_s": copy_secs.map(|s| mib / s)})
        );
    } else {
        println!("elea bench store: {} objects of {} KiB, {} in flight", n, a.block >> 10, a.threads);
        println!("{:<12} {:>9.1} MiB/s  ({:.2} s)", "put", mib / put_secs, put_secs);
        println!("{:<12} {:>9.1} MiB/s  ({:.2} s)", "get", mib / get_secs, get_secs);
        if let Some(s) = copy_secs {
            println!("{:<12} {:>9.1} MiB/s  ({:.2} s)", "copy", mib / s, s);
        }
    }
    Ok(())
}
