//! `elea up`: the embedded default, a one-voter metadata node, one cache node, the
//! `default` volume and its mount, in one process. It makes its cluster's certificates on
//! its first start (`DATA_DIR/certs`): its cache node serves only mutual TLS, and an admin
//! certificate there lets the CLI reach it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use elea_auth::Role;
use elea_auth::certs::{self, with_ext};
use elea_auth::tls::Tls;

use anyhow::{Context as _, bail};
use elea_metadata::MetaApi as _;
use elea_metadata::server::{MetaNodeConfig, parse_initial_cluster, serve};

use super::cache::MIN_STAGING;
use super::shutdown_signal;
use super::status::print_status;
use crate::cli::{MetaAddr, UpArgs, client};

/// The certificates of `elea up` under `dir`: the CA (made once), the metadata node's, the
/// cache node's and an admin's (each issued when missing).
struct UpCerts {
    meta: Tls,
    cache: Tls,
    /// The admin's certificate and key (PREFIX.pem, PREFIX.key), for the CLI.
    admin: PathBuf,
}

fn up_certs(dir: &Path) -> anyhow::Result<UpCerts> {
    if !dir.join(certs::CA_KEY).exists() {
        certs::init(dir).with_context(|| format!("making the cluster's CA in {}", dir.display()))?;
    }
    let ca = dir.join(certs::CA_CERT);
    let load = |role: Role, name: &str| -> anyhow::Result<Tls> {
        let prefix = dir.join(name);
        if !with_ext(&prefix, "pem").exists() {
            // A start that stopped half-way may have left the key alone.
            let _ = std::fs::remove_file(with_ext(&prefix, "key"));
            let req = certs::Request { role, name: name.into(), volumes: vec![], days: 3650 };
            certs::issue(dir, &req, &prefix)?;
        }
        Ok(Tls::load(&ca, &with_ext(&prefix, "pem"), &with_ext(&prefix, "key"))?)
    };
    load(Role::Admin, "admin")?;
    Ok(UpCerts {
        meta: load(Role::Meta, "1")?,
        cache: load(Role::Cache, "cache1")?,
        admin: dir.join("admin"),
    })
}

pub(crate) async fn run_up(a: UpArgs) -> anyhow::Result<()> {
    if a.staging_size < MIN_STAGING {
        bail!("--staging-size must be at least 256M (writes in flight hold up to 64 MiB each)");
    }
    std::fs::create_dir_all(&a.data_dir).with_context(|| format!("creating {}", a.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&a.data_dir).with_context(|| format!("{}", a.data_dir.display()))?;
    let meta_dir = data_dir.join("meta");
    let cache_dir = data_dir.join("cache");
    let certs_dir = data_dir.join("certs");
    let up = up_certs(&certs_dir)?;
    let admin_tls = crate::cli::TlsArgs {
        ca: Some(certs_dir.join(certs::CA_CERT)),
        cert: Some(with_ext(&up.admin, "pem")),
        key: Some(with_ext(&up.admin, "key")),
    };
    let store = match &a.store {
        Some(s) => s.clone(),
        None => {
            let dir = data_dir.join("objects");
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            format!("file://{}", dir.display())
        }
    };
    super::volume::check_stores(std::slice::from_ref(&store), 1, false)?;
    super::volume::probe_stores(std::slice::from_ref(&store)).await?;
    let mut cfg = MetaNodeConfig::new(1, a.listen.clone(), meta_dir.clone());
    cfg.initial_cluster = parse_initial_cluster(&format!("1={}", a.listen))?;
    cfg.tls = Some(up.meta);
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
    let meta = MetaAddr { meta: a.listen.clone(), tls: admin_tls.clone() };
    let c = client(&meta)?;
    // Wait for the one-voter group to elect itself, then make sure the default volume exists;
    // if the server fails to start, say why at once.
    let ensure = async {
        let vol = match c.volume("default").await {
            Ok(v) => v,
            Err(elea_metadata::client::ClientError::Fs(e)) if e == elea_common::Errno::ENOENT => {
                super::volume::check_owners(&c, std::slice::from_ref(&store)).await?;
                let config =
                    elea_fsm::VolumeConfig { stores: vec![store.clone()], replicas: 1, ..Default::default() };
                let home = super::volume::home_of(&c, None).await?;
                c.create_volume_in("default", config, &home).await?
            }
            Err(e) => return Err(anyhow::Error::from(e)),
        };
        super::volume::claim_stores(&c, &vol.config.stores).await;
        anyhow::Ok(vol)
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
    cache_cfg.tls = Some(up.cache);
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
    let peers = admin_tls.block_clients()?;
    print_status(&c, &peers, std::slice::from_ref(&a.listen), false).await?;
    println!("elea up: both services take only this cluster's certificates; for the CLI:");
    println!(
        "  export ELEA_META={} ELEA_CA={} ELEA_CERT={} ELEA_KEY={}",
        a.listen,
        certs_dir.join(certs::CA_CERT).display(),
        with_ext(&up.admin, "pem").display(),
        with_ext(&up.admin, "key").display()
    );
    println!("elea up: running; Ctrl-C to stop (state is kept in {})", data_dir.display());
    let mounted = async {
        match &a.mountpoint {
            Some(mp) => {
                std::fs::create_dir_all(mp).with_context(|| format!("creating {}", mp.display()))?;
                let opts = super::mount::MountOpts::new("local", &a.ttls);
                // The client of the volume's group, which sends everything there.
                let (vc, vol) = c.volume_client(&vol.name).await.context("opening the default volume")?;
                super::mount::serve_mount(vc, &vol, mp, &opts, shutdown_signal()).await
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
