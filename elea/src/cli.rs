//! Subcommands and their flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use elea_metadata::client::{ClientConfig, MetaClient, parse_addrs};

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
    /// Create and list volumes, attach stores.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Declare and list sites (the environments a cluster spans).
    #[command(subcommand)]
    Site(SiteCmd),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Make a cluster's certificate authority and issue its certificates.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Fetch files into a site's cache nodes before they are read there.
    Warmup(WarmupArgs),
    /// Move a volume's objects to another store while it is in use (`elea migrate VOLUME
    /// --to URL`), or show a migration (`elea migrate status VOLUME`).
    Migrate(MigrateArgs),
    /// A sandbox of several sites on this machine, joined by WAN links with a delay and a
    /// bandwidth cap (network namespaces as root, loopback otherwise); stops on Ctrl-C.
    Demo(crate::cmd::DemoArgs),
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
    #[command(flatten)]
    pub tls: TlsArgs,
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
    /// The site (data centre, cloud region) this node runs in. Recorded in the cluster's
    /// site map when the node starts; a new name makes a new site.
    #[arg(long, default_value = elea_metadata::server::DEFAULT_SITE)]
    pub site: String,
    /// This node's `meta` certificate (named by its node id): mutual TLS on every connection.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// The certificates of mutual TLS (`elea certs`), for every connection to the metadata service
/// and the cache nodes' block services.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// The cluster's CA certificate (`elea certs init`).
    #[arg(long, env = "ELEA_CA")]
    pub ca: Option<PathBuf>,
    /// This process's certificate (`elea certs issue`).
    #[arg(long, env = "ELEA_CERT")]
    pub cert: Option<PathBuf>,
    /// This process's private key.
    #[arg(long, env = "ELEA_KEY")]
    pub key: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS settings, or none when no certificate flag is given.
    pub fn load(&self) -> anyhow::Result<Option<elea_auth::tls::Tls>> {
        match (&self.ca, &self.cert, &self.key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(elea_auth::tls::Tls::load(ca, cert, key)?)),
            _ => anyhow::bail!("--ca, --cert and --key (ELEA_CA, ELEA_CERT, ELEA_KEY) go together"),
        }
    }

    /// A connector to servers of `role` with these certificates (`None` without).
    pub fn connector(&self, role: elea_auth::Role) -> anyhow::Result<Option<elea_auth::tls::Connector>> {
        Ok(match self.load()? {
            Some(t) => Some(t.connector(&[role])?),
            None => None,
        })
    }

    /// Block service clients with these certificates.
    pub fn block_clients(&self) -> anyhow::Result<elea_cache::client::BlockClients> {
        Ok(elea_cache::client::BlockClients::new(elea_cache::client::blocks::BlockClientConfig {
            tls: self.connector(elea_auth::Role::Cache)?,
            ..Default::default()
        }))
    }
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
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct MigrateArgs {
    #[command(subcommand)]
    pub cmd: Option<MigrateCmd>,
    /// The volume to move.
    #[arg(required = true)]
    pub volume: Option<String>,
    /// The store to move it to (an object store URL, as for `elea volume create --store`).
    #[arg(long, required = true)]
    pub to: Option<String>,
    /// The site whose store of the volume moves (default: the volume's home site); the new
    /// store becomes that site's.
    #[arg(long)]
    pub site: Option<String>,
    /// Bytes per second the copy may use in all, across every cache node (e.g. 100MiB).
    #[arg(long, value_parser = parse_size)]
    pub rate_limit: Option<u64>,
    /// Delete the old store's objects of the volume this long after the move is done (e.g.
    /// 24h; the delay is the window to change one's mind). Without it they are kept.
    #[arg(long, value_parser = parse_duration)]
    pub delete_source: Option<Duration>,
    /// Do not probe the new store from here first (a write, a read and a delete).
    #[arg(long)]
    pub no_probe: bool,
    #[command(flatten)]
    pub watch: WatchArgs,
    /// Metadata node addresses, HOST:PORT[,HOST:PORT...].
    #[arg(long, env = "ELEA_META", required = true)]
    pub meta: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Args, Debug)]
pub struct MoveArgs {
    /// The volume to move.
    pub volume: String,
    /// The new home site (it needs metadata nodes).
    #[arg(long)]
    pub to_site: String,
    /// The new home's store for the volume (default: the one it has already).
    #[arg(long)]
    pub store: Option<String>,
    /// Voters of the group in the new home (default: as many as it has now).
    #[arg(long)]
    pub voters: Option<u8>,
    /// Bytes per second the store's move may use (e.g. 100MiB).
    #[arg(long, value_parser = parse_size)]
    pub rate_limit: Option<u64>,
    /// Delete the old store's objects of the volume this long after the move is done.
    #[arg(long, value_parser = parse_duration)]
    pub delete_source: Option<Duration>,
    /// Do not probe a new store from here first.
    #[arg(long)]
    pub no_probe: bool,
    #[command(flatten)]
    pub watch: WatchArgs,
    #[command(flatten)]
    pub meta: MetaAddr,
}

#[derive(Args, Debug)]
pub struct WarmupArgs {
    /// What to warm: VOLUME:/PATH, or a path under an Elea mount on this host.
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// The site whose cache nodes keep the files (required when the cluster has several).
    #[arg(long)]
    pub site: Option<String>,
    /// Warm directories with everything under them.
    #[arg(long, short)]
    pub recursive: bool,
    /// Wait until every block is fetched, showing the progress (a bar on a terminal, a line
    /// every few seconds otherwise); exit non-zero when any could not be.
    #[arg(long)]
    pub wait: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub meta: MetaAddr,
}

#[derive(Subcommand, Debug)]
pub enum MigrateCmd {
    /// Show a volume's latest migration.
    Status {
        volume: String,
        #[command(flatten)]
        watch: WatchArgs,
        #[command(flatten)]
        meta: MetaAddr,
    },
}

/// How a command that starts or shows a long job reports it.
#[derive(Args, Debug, Clone, Copy)]
pub struct WatchArgs {
    /// Wait until the job is done, showing its progress (a bar on a terminal, a line every
    /// few seconds otherwise); exit non-zero when it fails.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up (non-zero exit) when the job makes no progress for this long
    /// while it reports failures or no cache node is alive.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub stall_timeout: Duration,
    /// Print one JSON object (at the end, with --wait) instead of text.
    #[arg(long)]
    pub json: bool,
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
pub enum CertsCmd {
    /// Make a new cluster: a random cluster id and its CA (DIR/ca.pem, DIR/ca.key,
    /// DIR/cluster-id). Keep ca.key secret; it issues every certificate of the cluster.
    Init {
        /// Where to write them (created if missing; refused if it already holds a CA).
        #[arg(long)]
        dir: std::path::PathBuf,
    },
    /// Issue a certificate and its key (PREFIX.pem, PREFIX.key) with the CA in DIR.
    Issue {
        /// The directory of `elea certs init`.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// meta, cache, gateway or admin.
        #[arg(long)]
        role: String,
        /// The holder: a meta node's id, a cache node's or a host's name, an operator's.
        #[arg(long)]
        name: String,
        /// A volume a gateway certificate may mount (repeatable; gateways only).
        #[arg(long = "volume")]
        volumes: Vec<String>,
        /// Where to write PREFIX.pem and PREFIX.key.
        #[arg(long)]
        out: std::path::PathBuf,
        /// How long the certificate is valid, in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
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
        /// az://container/prefix. Credentials come from the environment. Each is probed
        /// (an object written, read back and deleted) from this host first.
        #[arg(long)]
        store: Vec<String>,
        /// A file:// store is one directory that every cache node sees (one host, or a shared
        /// file system): allow it although several cache nodes are registered.
        #[arg(long)]
        shared_file_store: bool,
        /// Do not probe the stores from this host (when only the cache nodes can reach them).
        #[arg(long)]
        no_probe: bool,
        /// Copies of every staged block, each on a different cache node.
        #[arg(long, default_value_t = 2)]
        replicas: u8,
        /// Staged blocks older than this are tiered.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        tier_after: Duration,
        /// Compression of tiered blocks: zstd:LEVEL or none.
        #[arg(long, default_value = "zstd:3")]
        compression: String,
        /// The site the volume lives in (its stores are that site's). Named, it puts the
        /// volume in a Raft group of its own whose voters are that site's metadata nodes (the
        /// other sites' are learners), so its commits stay in the site. Left out (a cluster of
        /// one site), the volume lives in the control group.
        #[arg(long)]
        home_site: Option<String>,
        /// Voters of the volume's group (with --home-site or --spread-voters): 1 to 7, fewer
        /// when the site has fewer metadata nodes.
        #[arg(long, default_value_t = elea_fsm::DEFAULT_GROUP_VOTERS)]
        voters: u8,
        /// Take the voters from every site in turn (the home site first) instead of from the
        /// home site only: the volume survives the loss of a site, and every commit waits for
        /// a round trip between sites.
        #[arg(long)]
        spread_voters: bool,
    },
    /// Attach an object store to a volume as one site's store: that site's cache nodes tier
    /// the volume's new blocks to it, and readers in that site read them from it.
    AddStore {
        volume: String,
        /// The store's URL (as for `create --store`).
        url: String,
        #[arg(long)]
        site: String,
        #[command(flatten)]
        meta: MetaAddr,
        /// Do not probe the store from this host.
        #[arg(long)]
        no_probe: bool,
    },
    /// Add a metadata node to a volume's Raft group (a volume created with --home-site): it
    /// starts the group empty and catches up from the leader. Add voters in another site, then
    /// remove the old ones, to move the group there.
    AddMember {
        volume: String,
        #[arg(long)]
        node_id: u64,
        /// A learner (a copy that votes in nothing) instead of a voter.
        #[arg(long)]
        learner: bool,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// Remove a metadata node from a volume's Raft group (it stops running the group).
    RemoveMember {
        volume: String,
        #[arg(long)]
        node_id: u64,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// Move a volume's home to another site while it is mounted: its Raft group gains voters
    /// there and its old voters become learners (the leadership moves with them), and the
    /// old home's store of the volume moves into the new home's (`--store URL`, or the store
    /// the site has for the volume from `elea volume add-store`), as `elea migrate` does.
    Move(MoveArgs),
    /// List volumes.
    List {
        #[command(flatten)]
        meta: MetaAddr,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum SiteCmd {
    /// Declare a site, so volumes can be homed in it and stores attached for it before its
    /// nodes start.
    Add {
        name: String,
        #[command(flatten)]
        meta: MetaAddr,
    },
    /// List the sites with their nodes and the volumes homed in each.
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
    Meta(crate::cmd::MetaBenchArgs),
    /// Data benchmark through the data client: write, hot read, tier, cold read.
    Data(crate::cmd::DataBenchArgs),
    /// Object store baseline: plain opendal puts and gets of whole objects.
    Store(crate::cmd::StoreBenchArgs),
}

pub fn client(meta: &MetaAddr) -> anyhow::Result<MetaClient> {
    let addrs = parse_addrs(&meta.meta)?;
    let cfg = ClientConfig { tls: meta.tls.connector(elea_auth::Role::Meta)?, ..ClientConfig::default() };
    Ok(MetaClient::connect(&addrs, cfg)?)
}
