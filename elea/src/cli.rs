//! Subcommands and their flags.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use elea_metadata::MetaApi as _;
use elea_metadata::client::{ClientConfig, MetaClient, parse_addrs};
use elea_metadata::proto::change_membership_request::Kind;
use elea_metadata::server::{MetaNodeConfig, parse_initial_cluster, serve};
use serde_json::json;

use crate::units::{parse_duration, parse_size};

#[derive(Parser, Debug)]
#[command(name = "elea", version, about = "Elea: a strongly consistent, tiered POSIX file system")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a metadata server (one Raft voter or learner).
    Meta(MetaArgs),
    /// Run a cache node of one site: replicated flash staging, read cache, tiering.
    Cache(CacheArgs),
    /// Start the embedded default: a one-voter metadata service, one cache node and a
    /// local-directory object store, with a default volume.
    Up(UpArgs),
    /// Mount a volume with FUSE (in the foreground; SIGINT/SIGTERM flushes and unmounts).
    Mount(MountArgs),
    /// Tier a volume's staged blocks to its object store now.
    Tier(TierArgs),
    /// Show every metadata node's view of the cluster.
    Status(StatusArgs),
    /// Change the metadata cluster's membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Create and list volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
}

impl Command {
    pub fn is_server(&self) -> bool {
        matches!(self, Self::Meta(_) | Self::Up(_) | Self::Cache(_) | Self::Mount(_))
    }

    /// Runtime worker threads for this command (`None`: tokio's default, one per core, or
    /// `TOKIO_WORKER_THREADS` when set). A metadata node keeps one core free of them: its
    /// Raft group thread and log writer are threads of their own, and with a worker per core
    /// as well they kept preempting each other. Three voters on two cores, 16 threads, three
    /// alternating pairs: creates 6,639 / 6,241 / 6,461 against 5,990 / 6,206 / 6,203 per
    /// second, renames and unlinks 1.03-1.14x, stats unchanged beyond noise.
    pub fn runtime_workers(&self) -> Option<usize> {
        if !matches!(self, Self::Meta(_)) || std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
            return None;
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Some(cores.saturating_sub(1).max(1))
    }
}

#[derive(Args, Debug)]
pub struct MetaAddr {
    /// Metadata node addresses, HOST:PORT[,HOST:PORT...].
    #[arg(long, env = "ELEA_META")]
    pub meta: String,
}

#[derive(Args, Debug)]
pub struct MetaArgs {
    /// This node's id (a positive integer, unique in the cluster).
    #[arg(long)]
    pub node_id: u64,
    /// Address to listen on, HOST:PORT; also the address peers and clients use unless
    /// --advertise is given.
    #[arg(long)]
    pub listen: String,
    /// Address others reach this node at, when it differs from --listen.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Where the Raft log and snapshots live.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Initial voters of a new cluster: 1=HOST:PORT,2=HOST:PORT,... (only this node = a
    /// one-voter cluster). Ignored when the data dir already holds state.
    #[arg(long, conflicts_with = "join")]
    pub initial_cluster: Option<String>,
    /// Join an existing cluster (after `elea cluster add`) through these addresses.
    #[arg(long)]
    pub join: Option<String>,
    /// Take a snapshot and compact the log every this many applied entries.
    #[arg(long, default_value_t = 20_000)]
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot for slightly lagging followers.
    #[arg(long, default_value_t = 2_000)]
    pub compact_margin: u64,
}

#[derive(Args, Debug)]
pub struct CacheArgs {
    /// This node's id (a positive integer, unique among cache nodes).
    #[arg(long)]
    pub node_id: u64,
    /// The site (environment) this node serves.
    #[arg(long)]
    pub site: String,
    /// Block service address, HOST:PORT.
    #[arg(long)]
    pub listen: String,
    /// Address others reach this node at, when it differs from --listen.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Where staging and the read cache live.
    #[arg(long)]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub meta: MetaAddr,
    /// Staging capacity; writers wait when it is full.
    #[arg(long, default_value = "10G", value_parser = parse_size)]
    pub staging_size: u64,
    /// Read cache in memory.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub cache_mem: u64,
    /// Read cache on disk (0 = memory only; otherwise at least 64M).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub cache_disk: u64,
    /// How long a deleted file's blocks are kept before garbage collection removes them.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub gc_delay: Duration,
    /// How often staged blocks are checked against metadata (stale copies dropped, lost ones
    /// reported for repair).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,
    /// Grace before a staged copy metadata does not list here is dropped, and before a newly
    /// committed block listed here is checked.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub stale_grace: Duration,
}

/// Kernel cache lifetimes and trust settings of a mount.
#[derive(Args, Debug, Clone)]
pub struct MountFlags {
    /// How long the kernel may cache attributes. 0 (the default) keeps every stat
    /// linearizable; a longer time trades that for fewer metadata reads.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub attr_ttl: Duration,
    /// How long the kernel may cache name lookups (0 by default, for the same reason).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub entry_ttl: Duration,
    /// Honour set-user-id and set-group-id bits on the mount. Off by default: anyone who can
    /// write to the volume from any host could otherwise plant a set-id program here.
    #[arg(long)]
    pub suid: bool,
    /// Honour device nodes on the mount (off by default, for the same reason).
    #[arg(long)]
    pub dev: bool,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    #[command(flatten)]
    pub meta: MetaAddr,
    /// The volume to mount.
    #[arg(long)]
    pub volume: String,
    /// The site whose cache nodes take this mount's writes.
    #[arg(long, default_value = "local")]
    pub site: String,
    #[command(flatten)]
    pub ttls: MountFlags,
    /// Where to mount it (an existing directory).
    pub mountpoint: PathBuf,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Where Elea keeps its state.
    #[arg(long, default_value = "./elea-data")]
    pub data_dir: PathBuf,
    /// Address of the embedded metadata service.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub listen: String,
    /// Address of the embedded cache node's block service.
    #[arg(long, default_value = "127.0.0.1:7401")]
    pub cache_listen: String,
    /// Object store for the default volume (default: a directory under the data dir).
    #[arg(long)]
    pub store: Option<String>,
    /// Staging capacity of the embedded cache node.
    #[arg(long, default_value = "10G", value_parser = parse_size)]
    pub staging_size: u64,
    #[command(flatten)]
    pub ttls: MountFlags,
    /// Where to mount the default volume (created when missing). Without it, the services
    /// run without a mount.
    pub mountpoint: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct TierArgs {
    #[command(flatten)]
    pub meta: MetaAddr,
    #[arg(long)]
    pub volume: String,
    /// Wait until no block of the volume is staged any more.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub meta: MetaAddr,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Add a voter (or a learner) at ADDR; then start it with `elea meta --join`.
    Add {
        #[command(flatten)]
        meta: MetaAddr,
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        addr: String,
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node from the cluster.
    Remove {
        #[command(flatten)]
        meta: MetaAddr,
        #[arg(long)]
        node_id: u64,
    },
    /// Hand leadership to another voter and wait until it has it.
    TransferLeader {
        #[command(flatten)]
        meta: MetaAddr,
        #[arg(long)]
        to: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a volume.
    Create {
        name: String,
        #[command(flatten)]
        meta: MetaAddr,
        /// Object store URL (repeatable; tiering writes to the first): file:///path,
        /// s3://bucket/prefix?endpoint=http://HOST:PORT&region=R, gs://bucket/prefix,
        /// az://container/prefix, memory://NAME. Credentials come from the environment.
        #[arg(long)]
        store: Vec<String>,
        /// Copies of every staged block, each on a different cache node.
        #[arg(long, default_value_t = 2)]
        replicas: u8,
        /// Staged blocks older than this are tiered.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        tier_after: Duration,
        /// Compression of tiered blocks: zstd:LEVEL or none.
        #[arg(long, default_value = "zstd:3")]
        compression: String,
    },
    /// List volumes.
    List {
        #[command(flatten)]
        meta: MetaAddr,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Metadata benchmark through the client library: mkdir, create, stat, rename, unlink.
    Meta(crate::bench::MetaBenchArgs),
    /// Data benchmark through the data client: write, hot read, tier, cold read.
    Data(crate::databench::DataBenchArgs),
    /// Object store baseline: plain opendal puts and gets of whole objects.
    Store(crate::databench::StoreBenchArgs),
}

pub fn client(meta: &MetaAddr) -> anyhow::Result<MetaClient> {
    let addrs = parse_addrs(&meta.meta)?;
    Ok(MetaClient::connect(&addrs, ClientConfig::default())?)
}

async fn shutdown_signal() {
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
        Command::Meta(a) => run_meta(a).await,
        Command::Cache(a) => run_cache(a).await,
        Command::Up(a) => run_up(a).await,
        Command::Mount(a) => run_mount(a).await,
        Command::Tier(a) => tier(a).await,
        Command::Status(a) => status(a).await,
        Command::Cluster(c) => cluster(c).await,
        Command::Volume(v) => volume(v).await,
        Command::Bench(BenchCmd::Meta(a)) => crate::bench::run_meta_bench(a).await,
        Command::Bench(BenchCmd::Data(a)) => crate::databench::run_data_bench(a).await,
        Command::Bench(BenchCmd::Store(a)) => crate::databench::run_store_bench(a).await,
    }
}

async fn run_meta(a: MetaArgs) -> anyhow::Result<()> {
    let advertise = a.advertise.clone().unwrap_or_else(|| a.listen.clone());
    let mut cfg = MetaNodeConfig::new(a.node_id, advertise, a.data_dir.clone());
    if let Some(ic) = &a.initial_cluster {
        cfg.initial_cluster = parse_initial_cluster(ic)?;
    }
    if let Some(j) = &a.join {
        cfg.join = parse_addrs(j)?;
    }
    if a.snapshot_every == 0 {
        bail!("--snapshot-every must be positive");
    }
    cfg.snapshot_every = a.snapshot_every;
    cfg.compact_margin = a.compact_margin;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    tracing::info!(node = a.node_id, listen = %a.listen, dir = %a.data_dir.display(), "metadata server starting");
    serve(cfg, listener, shutdown_signal()).await?;
    Ok(())
}

async fn run_up(a: UpArgs) -> anyhow::Result<()> {
    if a.staging_size < MIN_STAGING {
        bail!("--staging-size must be at least 256M (writes in flight hold up to 64 MiB each)");
    }
    std::fs::create_dir_all(&a.data_dir).with_context(|| format!("creating {}", a.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&a.data_dir).with_context(|| format!("{}", a.data_dir.display()))?;
    let meta_dir = data_dir.join("meta");
    let cache_dir = data_dir.join("cache");
    let store = match &a.store {
        Some(s) => s.clone(),
        None => {
            let dir = data_dir.join("objects");
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            format!("file://{}", dir.display())
        }
    };
    elea_store::Store::open(&store, &elea_store::StoreConfig::default())
        .with_context(|| format!("object store {store}"))?;
    let mut cfg = MetaNodeConfig::new(1, a.listen.clone(), meta_dir.clone());
    cfg.initial_cluster = parse_initial_cluster(&format!("1={}", a.listen))?;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let cache_listener = tokio::net::TcpListener::bind(&a.cache_listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.cache_listen))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut server = tokio::spawn(serve(cfg, listener, stopped(stop_rx.clone())));
    let meta = MetaAddr { meta: a.listen.clone() };
    let c = client(&meta)?;
    // Wait for the one-voter group to elect itself, then make sure the default volume exists;
    // if the server fails to start, say why at once.
    let ensure = async {
        match c.volume("default").await {
            Ok(v) => Ok(v),
            Err(elea_metadata::client::ClientError::Fs(e)) if e == elea_common::Errno::ENOENT => {
                let config =
                    elea_fsm::VolumeConfig { stores: vec![store.clone()], replicas: 1, ..Default::default() };
                c.create_volume("default", config).await
            }
            Err(e) => Err(e),
        }
    };
    let vol = tokio::select! {
        v = ensure => v?,
        r = &mut server => {
            r.context("server task")??;
            bail!("the metadata service stopped during start-up");
        }
    };
    let mut cache_cfg = elea_cache::CacheNodeConfig::new(
        1,
        "local",
        &a.cache_listen,
        cache_dir.clone(),
        vec![a.listen.clone()],
    );
    cache_cfg.staging_size = a.staging_size;
    cache_cfg.in_process = true;
    let mut cache = tokio::spawn(elea_cache::serve(cache_cfg, cache_listener, stopped(stop_rx)));
    // The cache node is up once it is in the registry.
    let registered = async {
        loop {
            if let Ok(n) = c.cache_nodes().await
                && n.iter().any(|n| n.id == 1 && n.alive)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = registered => {}
        r = &mut cache => {
            r.context("cache node task")??;
            bail!("the cache node stopped during start-up");
        }
    }
    println!("elea up: metadata service (one voter) at {} with data in {}", a.listen, meta_dir.display());
    println!(
        "elea up: cache node 1 (site \"local\") at {} with staging in {}",
        a.cache_listen,
        cache_dir.display()
    );
    println!(
        "elea up: volume {:?} (id {}), {} inodes, stores {}",
        vol.name,
        vol.id,
        vol.inodes,
        vol.config.stores.join(",")
    );
    print_status(&c, std::slice::from_ref(&a.listen), false).await?;
    println!("elea up: running; Ctrl-C to stop (state is kept in {})", data_dir.display());
    let mounted = async {
        match &a.mountpoint {
            Some(mp) => {
                std::fs::create_dir_all(mp).with_context(|| format!("creating {}", mp.display()))?;
                let opts = crate::mount::MountOpts::new("local", &a.ttls);
                crate::mount::serve_mount(c.clone(), &vol, mp, &opts, shutdown_signal()).await
            }
            None => {
                println!("elea up: no mount point given, serving without a mount");
                shutdown_signal().await;
                Ok(())
            }
        }
    };
    tokio::select! {
        r = mounted => r?,
        r = &mut server => {
            r.context("server task")??;
            bail!("the metadata service stopped");
        }
        r = &mut cache => {
            r.context("cache node task")??;
            bail!("the cache node stopped");
        }
    }
    let _ = stop_tx.send(true);
    cache.await.context("cache node task")??;
    server.await.context("server task")??;
    Ok(())
}

async fn run_mount(a: MountArgs) -> anyhow::Result<()> {
    let c = client(&a.meta)?;
    let vol = c.volume(&a.volume).await.with_context(|| format!("volume {:?}", a.volume))?;
    let opts = crate::mount::MountOpts::new(a.site.clone(), &a.ttls);
    crate::mount::serve_mount(c, &vol, &a.mountpoint, &opts, shutdown_signal()).await
}

async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let c = client(&a.meta)?;
    let addrs = parse_addrs(&a.meta.meta)?;
    let any_up = print_status(&c, &addrs, a.json).await?;
    if !any_up {
        bail!("no metadata node answered at {}", a.meta.meta);
    }
    Ok(())
}

/// Prints every node's status (the given addresses plus every member any node knows).
/// Returns whether any node answered.
async fn print_status(c: &MetaClient, addrs: &[String], as_json: bool) -> anyhow::Result<bool> {
    let mut seen: Vec<String> = addrs.to_vec();
    let mut rows = Vec::new();
    let mut i = 0;
    while i < seen.len() {
        let addr = seen[i].clone();
        i += 1;
        match c.status_of(&addr).await {
            Ok(s) => {
                for m in &s.members {
                    if !seen.contains(&m.addr) {
                        seen.push(m.addr.clone());
                    }
                }
                rows.push((addr, Ok(s)));
            }
            Err(e) => rows.push((addr, Err(e))),
        }
    }
    // Members that did not answer are listed by id from whoever knows them.
    let book: Vec<(u64, String, bool)> = rows
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .flat_map(|s| s.members.iter().map(|m| (m.node_id, m.addr.clone(), m.learner)))
        .collect();
    let id_of = |addr: &str| book.iter().find(|(_, a, _)| a == addr).map(|(id, _, _)| *id);
    let leader = rows
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.term)
        .map(|s| s.node_id);
    let any_up = rows.iter().any(|(_, r)| r.is_ok());
    if as_json {
        let nodes: Vec<_> = rows
            .iter()
            .map(|(addr, r)| match r {
                Ok(s) => json!({
                    "node_id": s.node_id, "addr": addr, "reachable": true, "role": s.role,
                    "term": s.term, "commit_index": s.commit_index, "applied_index": s.applied_index,
                    "leader_id": s.leader_id, "first_index": s.first_index, "last_index": s.last_index,
                    "snapshot_index": s.snapshot_index,
                    "learner": s.members.iter().any(|m| m.node_id == s.node_id && m.learner),
                }),
                Err(e) => json!({
                    "node_id": id_of(addr), "addr": addr, "reachable": false, "error": e.to_string(),
                }),
            })
            .collect();
        let members: Vec<_> = dedup_book(&book)
            .into_iter()
            .map(|(id, a, l)| json!({"node_id": id, "addr": a, "learner": l}))
            .collect();
        let cache = if any_up { print_cache_nodes(c, true).await.unwrap_or(json!([])) } else { json!([]) };
        println!(
            "{}",
            json!({ "leader_id": leader, "nodes": nodes, "members": members, "cache_nodes": cache })
        );
    } else {
        println!(
            "{:>4}  {:<22} {:<10} {:>6} {:>10} {:>10} {:>6}  reachable",
            "node", "address", "role", "term", "commit", "applied", "leader"
        );
        for (addr, r) in &rows {
            match r {
                Ok(s) => println!(
                    "{:>4}  {:<22} {:<10} {:>6} {:>10} {:>10} {:>6}  yes",
                    s.node_id, addr, s.role, s.term, s.commit_index, s.applied_index, s.leader_id
                ),
                Err(_) => println!(
                    "{:>4}  {:<22} {:<10} {:>6} {:>10} {:>10} {:>6}  no",
                    id_of(addr).map(|i| i.to_string()).unwrap_or_else(|| "?".into()),
                    addr,
                    "-",
                    "-",
                    "-",
                    "-",
                    "-"
                ),
            }
        }
        if any_up && let Err(e) = print_cache_nodes(c, false).await {
            println!("cache nodes: unknown ({e})");
        }
    }
    Ok(any_up)
}

fn dedup_book(book: &[(u64, String, bool)]) -> Vec<(u64, String, bool)> {
    let mut out: Vec<(u64, String, bool)> = Vec::new();
    for b in book {
        if !out.iter().any(|o| o.0 == b.0) {
            out.push(b.clone());
        }
    }
    out.sort();
    out
}

async fn cluster(c: ClusterCmd) -> anyhow::Result<()> {
    match c {
        ClusterCmd::Add { meta, node_id, addr, learner } => {
            let kind = if learner { Kind::AddLearner } else { Kind::AddVoter };
            let members = client(&meta)?.change_membership(kind, node_id, &addr).await?;
            println!("added node {node_id} at {addr}{}", if learner { " as a learner" } else { "" });
            print_members(&members);
        }
        ClusterCmd::Remove { meta, node_id } => {
            let members = client(&meta)?.change_membership(Kind::Remove, node_id, "").await?;
            println!("removed node {node_id}");
            print_members(&members);
        }
        ClusterCmd::TransferLeader { meta, to } => {
            let c = client(&meta)?;
            c.transfer_leader(to).await?;
            let addrs = parse_addrs(&meta.meta)?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                for a in &addrs {
                    if let Ok(s) = c.status_of(a).await
                        && s.leader_id == to
                    {
                        println!("node {to} is the leader (term {})", s.term);
                        return Ok(());
                    }
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("node {to} did not become the leader within 10 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(())
}

fn print_members(members: &[elea_metadata::proto::Member]) {
    for m in members {
        println!("  node {:>3}  {}{}", m.node_id, m.addr, if m.learner { "  (learner)" } else { "" });
    }
}

async fn volume(v: VolumeCmd) -> anyhow::Result<()> {
    match v {
        VolumeCmd::Create { name, meta, store, replicas, tier_after, compression } => {
            let compression = match compression.parse::<elea_store::Compression>() {
                Ok(elea_store::Compression::None) => elea_fsm::BlockCodec::None,
                Ok(elea_store::Compression::Zstd(l)) => elea_fsm::BlockCodec::Zstd(l),
                Err(e) => bail!("--compression: {e}"),
            };
            if replicas == 0 || replicas > elea_fsm::limits::REPLICAS_MAX {
                bail!("--replicas must be between 1 and {}", elea_fsm::limits::REPLICAS_MAX);
            }
            for url in &store {
                elea_store::Store::open(url, &elea_store::StoreConfig::default())
                    .with_context(|| format!("--store {url}"))?;
            }
            let config = elea_fsm::VolumeConfig {
                stores: store,
                replicas,
                tier_after_ms: u64::try_from(tier_after.as_millis()).unwrap_or(u64::MAX),
                compression,
            };
            let vol = client(&meta)?
                .create_volume(&name, config)
                .await
                .with_context(|| format!("creating volume {name:?}"))?;
            println!("created volume {:?} (id {})", vol.name, vol.id);
        }
        VolumeCmd::List { meta, json: as_json } => {
            let vols = client(&meta)?.list_volumes().await?;
            if as_json {
                let list: Vec<_> = vols
                    .iter()
                    .map(|v| {
                        json!({"id": v.id, "name": v.name, "inodes": v.inodes, "used_bytes": v.used_bytes,
                                    "change_seq": v.change_seq, "created": v.created.sec,
                                    "stores": v.config.stores, "replicas": v.config.replicas,
                                    "tier_after_ms": v.config.tier_after_ms,
                                    "compression": codec_name(v.config.compression)})
                    })
                    .collect();
                println!("{}", json!({ "volumes": list }));
            } else {
                println!(
                    "{:>4}  {:<24} {:>10} {:>14} {:>3} {:>10} {:<8} stores",
                    "id", "name", "inodes", "used bytes", "R", "tier after", "codec"
                );
                for v in vols {
                    println!(
                        "{:>4}  {:<24} {:>10} {:>14} {:>3} {:>9}s {:<8} {}",
                        v.id,
                        v.name,
                        v.inodes,
                        v.used_bytes,
                        v.config.replicas,
                        v.config.tier_after_ms / 1000,
                        codec_name(v.config.compression),
                        v.config.stores.join(",")
                    );
                }
            }
        }
    }
    Ok(())
}

fn codec_name(c: elea_fsm::BlockCodec) -> String {
    match c {
        elea_fsm::BlockCodec::None => "none".into(),
        elea_fsm::BlockCodec::Zstd(l) => format!("zstd:{l}"),
    }
}

/// Smallest staging store: writes in flight hold uncommitted blocks (up to a 64 MiB slice
/// each) that tiering cannot free, so staging must hold several of them.
const MIN_STAGING: u64 = 256 << 20;

fn cache_config(a: &CacheArgs) -> anyhow::Result<elea_cache::CacheNodeConfig> {
    if a.staging_size < MIN_STAGING {
        bail!("--staging-size must be at least 256M (writes in flight hold up to 64 MiB each)");
    }
    let advertise = a.advertise.clone().unwrap_or_else(|| a.listen.clone());
    let mut cfg = elea_cache::CacheNodeConfig::new(
        a.node_id,
        &a.site,
        &advertise,
        a.data_dir.clone(),
        parse_addrs(&a.meta.meta)?,
    );
    cfg.staging_size = a.staging_size;
    cfg.cache_mem = a.cache_mem;
    cfg.cache_disk = a.cache_disk;
    cfg.gc_delay = a.gc_delay;
    cfg.reconcile_interval = a.reconcile_interval;
    cfg.stale_grace = a.stale_grace;
    Ok(cfg)
}

async fn run_cache(a: CacheArgs) -> anyhow::Result<()> {
    let cfg = cache_config(&a)?;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    tracing::info!(node = a.node_id, site = %a.site, listen = %a.listen, dir = %a.data_dir.display(), "cache node starting");
    elea_cache::serve(cfg, listener, shutdown_signal()).await?;
    Ok(())
}

/// Asks every live cache node to tier the volume now; with `wait`, returns once no block of
/// the volume is staged any more.
pub async fn tier_volume(c: &MetaClient, vol: &elea_fsm::VolumeInfo, wait: bool) -> anyhow::Result<()> {
    if vol.config.stores.is_empty() {
        bail!("volume {:?} has no object store: its blocks stay staged", vol.name);
    }
    let peers = elea_cache::client::BlockClients::default();
    let mut last_print = std::time::Instant::now();
    loop {
        let nodes = c.cache_nodes().await?;
        let alive: Vec<_> = nodes.iter().filter(|n| n.alive).collect();
        if alive.is_empty() {
            bail!("no cache node is alive");
        }
        for n in &alive {
            if let Err(e) = peers.tier(&n.addr, vol.id).await {
                tracing::warn!(node = n.id, error = %e, "asking a cache node to tier");
            }
        }
        let left: Vec<_> = c.staged_blocks().await?.into_iter().filter(|b| b.vol == vol.id).collect();
        if !wait || left.is_empty() {
            if wait {
                println!("volume {:?}: every block is tiered", vol.name);
            } else {
                println!("volume {:?}: tiering requested ({} blocks staged)", vol.name, left.len());
            }
            return Ok(());
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            let bytes: u64 = left.iter().map(|b| u64::from(b.len)).sum();
            println!("volume {:?}: {} blocks ({} MiB) still staged", vol.name, left.len(), bytes >> 20);
            last_print = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn tier(a: TierArgs) -> anyhow::Result<()> {
    let c = client(&a.meta)?;
    let vol = c.volume(&a.volume).await.with_context(|| format!("volume {:?}", a.volume))?;
    tier_volume(&c, &vol, a.wait).await
}

/// Prints the cache node registry; returns it as JSON.
async fn print_cache_nodes(c: &MetaClient, as_json: bool) -> anyhow::Result<serde_json::Value> {
    let nodes = c.cache_nodes().await?;
    let list: Vec<_> = nodes
        .iter()
        .map(|n| {
            let s = &n.stats;
            let reads = s.read_hits + s.read_misses;
            json!({
                "node_id": n.id, "site": n.site, "addr": n.addr, "alive": n.alive,
                "staged_bytes": s.staged_bytes, "staged_blocks": s.staged_blocks,
                "staging_capacity": s.staging_capacity, "oldest_staged_ms": s.oldest_staged_ms,
                "read_hits": s.read_hits, "read_misses": s.read_misses,
                "read_hit_ratio": if reads == 0 { serde_json::Value::Null } else { json!(s.read_hits as f64 / reads as f64) },
                "tier_backlog_blocks": s.tier_backlog_blocks, "tier_backlog_bytes": s.tier_backlog_bytes,
            })
        })
        .collect();
    if !as_json && !nodes.is_empty() {
        println!();
        println!(
            "{:>5}  {:<10} {:<22} {:<5} {:>12} {:>10} {:>9} {:>14}",
            "cache", "site", "address", "alive", "staged MiB", "oldest s", "hit %", "backlog blocks"
        );
        for n in &nodes {
            let s = &n.stats;
            let reads = s.read_hits + s.read_misses;
            println!(
                "{:>5}  {:<10} {:<22} {:<5} {:>12} {:>10} {:>9} {:>14}",
                n.id,
                n.site,
                n.addr,
                if n.alive { "yes" } else { "no" },
                s.staged_bytes >> 20,
                s.oldest_staged_ms / 1000,
                if reads == 0 {
                    "-".to_string()
                } else {
                    format!("{:.1}", 100.0 * s.read_hits as f64 / reads as f64)
                },
                s.tier_backlog_blocks
            );
        }
    }
    Ok(json!(list))
}
