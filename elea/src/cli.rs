//! Subcommands and their flags.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use elea_metadata::client::{ClientConfig, MetaClient, parse_addrs};
use elea_metadata::proto::change_membership_request::Kind;
use elea_metadata::server::{MetaNodeConfig, parse_initial_cluster, serve};
use serde_json::json;

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
    /// Start the embedded default: today a one-node metadata service with a default volume.
    Up(UpArgs),
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
        matches!(self, Self::Meta(_) | Self::Up(_))
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
pub struct UpArgs {
    /// Where Elea keeps its state.
    #[arg(long, default_value = "./elea-data")]
    pub data_dir: PathBuf,
    /// Address of the embedded metadata service.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub listen: String,
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
        Command::Up(a) => run_up(a).await,
        Command::Status(a) => status(a).await,
        Command::Cluster(c) => cluster(c).await,
        Command::Volume(v) => volume(v).await,
        Command::Bench(BenchCmd::Meta(a)) => crate::bench::run_meta_bench(a).await,
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
    let meta_dir = a.data_dir.join("meta");
    let mut cfg = MetaNodeConfig::new(1, a.listen.clone(), meta_dir.clone());
    cfg.initial_cluster = parse_initial_cluster(&format!("1={}", a.listen))?;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(cfg, listener, async move {
        let _ = stop_rx.await;
    }));
    let meta = MetaAddr { meta: a.listen.clone() };
    let c = client(&meta)?;
    // Wait for the one-voter group to elect itself, then make sure the default volume exists;
    // if the server fails to start, say why at once.
    let ensure = async {
        match c.volume("default").await {
            Ok(v) => Ok(v),
            Err(elea_metadata::client::ClientError::Fs(e)) if e == elea_common::Errno::ENOENT => {
                c.create_volume("default", elea_fsm::VolumeConfig { replicas: 1, ..Default::default() }).await
            }
            Err(e) => Err(e),
        }
    };
    let mut server = server;
    let vol = tokio::select! {
        v = ensure => v?,
        r = &mut server => {
            r.context("server task")??;
            bail!("the metadata service stopped during start-up");
        }
    };
    println!("elea up: metadata service (one voter) at {} with data in {}", a.listen, meta_dir.display());
    println!("elea up: volume {:?} (id {}), {} inodes", vol.name, vol.id, vol.inodes);
    println!("elea up: the FUSE mount and the cache node are not part of this release yet");
    print_status(&c, std::slice::from_ref(&a.listen), false).await?;
    println!("elea up: running; Ctrl-C to stop (state is kept in {})", a.data_dir.display());
    shutdown_signal().await;
    let _ = stop_tx.send(());
    server.await.context("server task")??;
    Ok(())
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
        println!("{}", json!({ "leader_id": leader, "nodes": nodes, "members": members }));
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
        VolumeCmd::Create { name, meta } => {
            let vol = client(&meta)?
                .create_volume(&name, elea_fsm::VolumeConfig::default())
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
                                    "change_seq": v.change_seq, "created": v.created.sec})
                    })
                    .collect();
                println!("{}", json!({ "volumes": list }));
            } else {
                println!("{:>4}  {:<24} {:>10} {:>14}", "id", "name", "inodes", "used bytes");
                for v in vols {
                    println!("{:>4}  {:<24} {:>10} {:>14}", v.id, v.name, v.inodes, v.used_bytes);
                }
            }
        }
    }
    Ok(())
}
