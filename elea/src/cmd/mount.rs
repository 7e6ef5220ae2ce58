//! `elea mount`, and the mount of `elea up`: a gateway (VFS + FUSE) for one volume, served in
//! the foreground until SIGINT/SIGTERM, then flushed and unmounted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use elea_cache::{DataClient, DataConfig};
use elea_fsm::VolumeInfo;
use elea_gateway::{Vfs, VfsConfig};
use elea_metadata::MetaApi as _;
use elea_metadata::client::MetaClient;

use super::shutdown_signal;
use crate::cli::{MountArgs, MountFlags, client};

/// Gateway settings shared by `elea mount` and `elea up`.
#[derive(Debug, Clone)]
pub struct MountOpts {
    pub site: String,
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
    pub suid: bool,
    pub dev: bool,
    /// Calls to the cache nodes (TLS).
    pub blocks: elea_cache::client::blocks::BlockClientConfig,
}

impl MountOpts {
    pub fn new(site: impl Into<String>, f: &MountFlags) -> Self {
        Self {
            site: site.into(),
            attr_ttl: f.attr_ttl,
            entry_ttl: f.entry_ttl,
            suid: f.suid,
            dev: f.dev,
            blocks: Default::default(),
        }
    }
}

/// A mount point left behind by a process that died ("Transport endpoint is not
/// connected") is detached so the new mount can take its place.
fn clear_stale_mount(mp: &Path) {
    if let Err(e) = std::fs::metadata(mp)
        && e.raw_os_error() == Some(libc::ENOTCONN)
    {
        tracing::warn!(mountpoint = %mp.display(), "detaching a stale mount left by an earlier process");
        // Requests still waiting on the dead connection (and a killed daemon stuck on one)
        // are released first.
        elea_gateway::mount::abort_connection(mp);
        for cmd in [&["fusermount3", "-uz"][..], &["umount", "-l"][..]] {
            let ok = std::process::Command::new(cmd[0])
                .args(&cmd[1..])
                .arg(mp)
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
        }
    }
}

/// Mounts `vol` at `mountpoint` and serves it until `stop` resolves or the mount goes away
/// (an external `umount`). Everything buffered is flushed before the mount is detached.
pub async fn serve_mount(
    meta: MetaClient,
    vol: &VolumeInfo,
    mountpoint: &Path,
    opts: &MountOpts,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    clear_stale_mount(mountpoint);
    let md =
        std::fs::metadata(mountpoint).with_context(|| format!("mount point {}", mountpoint.display()))?;
    if !md.is_dir() {
        bail!("mount point {} is not a directory", mountpoint.display());
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: this machine cannot mount FUSE file systems (load the fuse module)");
    }
    let mp: PathBuf = std::fs::canonicalize(mountpoint)?;
    let mut data_cfg = DataConfig::new(&opts.site);
    data_cfg.blocks = opts.blocks.clone();
    let data = DataClient::new(meta.clone(), data_cfg);
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let cfg = VfsConfig {
        attr_ttl: opts.attr_ttl,
        entry_ttl: opts.entry_ttl,
        session_name: format!("mount {}:{}", host.trim(), mp.display()),
        ..VfsConfig::default()
    };
    let vfs = Vfs::new(meta, data, vol.id, cfg)
        .await
        .map_err(|e| anyhow::anyhow!("opening a gateway session for volume {:?}: {e}", vol.name))?;
    let mcfg = elea_gateway::MountConfig {
        suid: opts.suid,
        dev: opts.dev,
        ..elea_gateway::MountConfig::new(&format!("elea:{}", vol.name))
    };
    let mounted = elea_gateway::mount(vfs.clone(), &mp, tokio::runtime::Handle::current(), &mcfg)
        .with_context(|| format!("mounting volume {:?} at {}", vol.name, mp.display()))?;
    println!("elea: volume {:?} mounted at {} (site {:?})", vol.name, mp.display(), opts.site);
    let gone = async {
        while !mounted.is_finished() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let external = tokio::select! {
        () = stop => false,
        () = gone => true,
    };
    if external {
        tracing::warn!(mountpoint = %mp.display(), "the mount went away (unmounted from outside)");
    } else {
        tracing::info!(mountpoint = %mp.display(), "unmounting");
    }
    // Flush while still mounted, detach, then end the session (final flush included).
    let flushed = vfs.flush_all().await;
    let mut mounted = mounted;
    if !external && let Err(e) = mounted.detach() {
        tracing::warn!(error = %e, "unmount");
    }
    // Files still open keep a detached mount alive; they get a few seconds to close, then
    // the session ends with this process (their later calls fail with ENOTCONN).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !mounted.is_finished() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !mounted.is_finished() {
        tracing::warn!("files are still open on the detached mount; ending the session anyway");
    }
    let closed = vfs.shutdown().await;
    flushed.and(closed).map_err(|e| anyhow::anyhow!("flushing buffered writes at unmount failed: {e}"))?;
    println!("elea: {} unmounted", mp.display());
    Ok(())
}

pub(crate) async fn run_mount(a: MountArgs) -> anyhow::Result<()> {
    let control = client(&a.meta)?;
    // A volume in a Raft group of its own is served by that group.
    let (c, vol) =
        control.volume_client(&a.volume).await.with_context(|| format!("volume {:?}", a.volume))?;
    // A mistyped site would leave the mount with no cache node to write to.
    let map = control.sites().await.context("reading the site map")?;
    if !map.sites.is_empty() && !map.sites.contains(&a.site) {
        bail!(
            "--site {:?}: the cluster has no such site (sites: {}); `elea site add` declares one, and \
             its cache nodes take this mount's writes",
            a.site,
            map.sites.join(", ")
        );
    }
    let mut opts = MountOpts::new(a.site.clone(), &a.ttls);
    opts.blocks = a.meta.tls.block_clients()?.config().clone();
    serve_mount(c, &vol, &a.mountpoint, &opts, shutdown_signal()).await
}
