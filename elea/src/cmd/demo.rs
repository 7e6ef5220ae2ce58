//! `elea demo`: several sites on this machine, each with its metadata nodes, cache nodes and
//! store, joined by WAN links with a delay and a bandwidth cap: a sandbox to try a cluster
//! that spans sites, and a fixture for checks.
//!
//! As root (with iproute2 and nsenter) each site is a network namespace of its own and every
//! byte between sites crosses a link of `elea_sandbox` (see its docs for how). Otherwise the
//! sites share loopback (each its own 127.0.N.1 address) with no delay between them, and the
//! demo says so. The first site's metadata nodes are the control group's voters; the other
//! sites' are its learners (a volume created with `--home-site S` gets a group of its own
//! whose voters are S's). Every process speaks mutual TLS with certificates made in `DIR/certs`; the CLI
//! uses the admin one. Runs in the foreground until Ctrl-C or SIGTERM, then stops everything
//! it started.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use elea_auth::Role;
use elea_auth::certs::{self, with_ext};
use elea_metadata::MetaApi as _;
use elea_metadata::client::{ClientConfig, MetaClient};
use elea_metadata::proto::change_membership_request::Kind;
use elea_sandbox::sites::SiteBed;
use elea_sandbox::wan::LinkConfig;
use serde_json::json;

use crate::units::{parse_duration, parse_size};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where every process keeps its data, logs, certificates and the sites' stores.
    #[arg(long)]
    pub dir: PathBuf,
    /// The sites, comma-separated (1 to 3).
    #[arg(long, default_value = "a,b")]
    pub sites: String,
    /// Metadata nodes per site (the first site's are the control group's voters, the others'
    /// its learners; a volume homed in a site gets that site's as its group's voters): one
    /// count for every site, or one per site (`3,1,0`; the first at least 1).
    #[arg(long, default_value = "1")]
    pub meta_per_site: String,
    /// Cache nodes per site.
    #[arg(long, default_value_t = 2)]
    pub cache_per_site: u16,
    /// Round-trip time of the links between sites.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    pub wan_rtt: Duration,
    /// Bandwidth of each link between sites, each way, in bytes per second.
    #[arg(long, default_value = "100MiB", value_parser = parse_size)]
    pub wan_bandwidth: u64,
    /// Staging capacity of each cache node.
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub staging_size: u64,
    /// Write the sandbox's description (addresses, stores, pids, certificates) here as one
    /// JSON object once every process is up.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Share loopback even when network namespaces could be used (no WAN delay or cap).
    #[arg(long)]
    pub loopback: bool,
}

const META_PORT: u16 = 7001;
const CACHE_PORT: u16 = 7101;

/// One process of the sandbox.
struct Proc {
    site: usize,
    what: String,
    child: Child,
}

/// Where a site's processes run.
struct SitePlace {
    name: String,
    ip: String,
    /// The command prefix that enters its namespace (empty on loopback).
    wrap: Vec<String>,
    netns: Option<String>,
}

pub(crate) async fn run_demo(a: DemoArgs) -> anyhow::Result<()> {
    let names: Vec<String> = a.sites.split(',').map(|s| s.trim().to_string()).collect();
    if names.is_empty() || names.len() > 3 {
        bail!("--sites: 1 to 3 sites, not {}", names.len());
    }
    for (i, n) in names.iter().enumerate() {
        super::meta::check_site_name("--sites", n)?;
        if names[..i].contains(n) {
            bail!("--sites: {n:?} is named twice");
        }
    }
    let metas = meta_counts(&a.meta_per_site, names.len())?;
    if a.cache_per_site == 0 || a.cache_per_site > 8 {
        bail!("--cache-per-site is 1 to 8");
    }
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let dir = std::fs::canonicalize(&a.dir)?;
    let certs_dir = dir.join("certs");
    let cli_cert = demo_certs(&certs_dir, &a, &metas)?;

    // The network: namespaces and WAN links when possible, else loopback.
    let ports: Vec<u16> = (0..metas.iter().copied().max().unwrap_or(1))
        .map(|k| META_PORT + k)
        .chain((0..a.cache_per_site).map(|k| CACHE_PORT + k))
        .collect();
    let link = LinkConfig::rtt(a.wan_rtt, Some(a.wan_bandwidth));
    let why_not =
        if a.loopback { Some("--loopback".to_string()) } else { elea_sandbox::sites::unavailable() };
    let (bed, places) = match &why_not {
        None => {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let bed = SiteBed::create(&refs, link, &ports).map_err(anyhow::Error::msg)?;
            let places = bed
                .sites
                .iter()
                .map(|s| SitePlace {
                    name: s.name.clone(),
                    ip: s.ip.to_string(),
                    wrap: s.command_prefix(),
                    netns: Some(s.netns.clone()),
                })
                .collect::<Vec<_>>();
            (Some(bed), places)
        }
        Some(why) => {
            eprintln!(
                "elea demo: sites share loopback, with no delay or cap between them ({why}; run as \
                 root with iproute2 and nsenter for WAN links)"
            );
            let places = names
                .iter()
                .enumerate()
                .map(|(i, n)| SitePlace {
                    name: n.clone(),
                    ip: format!("127.0.{}.1", i + 1),
                    wrap: vec![],
                    netns: None,
                })
                .collect::<Vec<_>>();
            (None, places)
        }
    };

    let mut procs: Vec<Proc> = Vec::new();
    let started = start_all(&a, &metas, &dir, &certs_dir, &cli_cert, &places, &mut procs).await;
    let summary = match started {
        Ok(s) => s,
        Err(e) => {
            stop_all(&mut procs);
            drop(bed);
            return Err(e);
        }
    };
    let mut desc = summary;
    desc["netns"] = json!(bed.is_some());
    desc["wan"] = match &bed {
        Some(_) => json!({"rtt_ms": a.wan_rtt.as_millis() as u64, "bandwidth": a.wan_bandwidth}),
        None => serde_json::Value::Null,
    };
    for (i, p) in places.iter().enumerate() {
        let pids: Vec<u32> = procs.iter().filter(|x| x.site == i).map(|x| x.child.id()).collect();
        desc["sites"][&p.name]["pids"] = json!(pids);
    }
    if let Some(out) = &a.json_out {
        let tmp = with_ext(out, "tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&desc)?)?;
        std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    }
    print_guide(&desc, &places, &cli_cert);

    // Until asked to stop; a process that dies is reported, the others go on.
    let mut reported = vec![false; procs.len()];
    let stop = super::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                for (i, p) in procs.iter_mut().enumerate() {
                    if !reported[i] && matches!(p.child.try_wait(), Ok(Some(_))) {
                        reported[i] = true;
                        eprintln!("elea demo: {} of site {} exited (its log is in {})", p.what, places[p.site].name, dir.display());
                    }
                }
            }
        }
    }
    eprintln!("elea demo: stopping");
    stop_all(&mut procs);
    drop(bed);
    Ok(())
}

/// Metadata nodes per site from `--meta-per-site`: one count for all, or one per site.
fn meta_counts(arg: &str, sites: usize) -> anyhow::Result<Vec<u16>> {
    let v: Vec<u16> = arg
        .split(',')
        .map(|n| n.trim().parse::<u16>())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("--meta-per-site {arg:?}: a count, or one per site (3,1,0)"))?;
    let v = match v.len() {
        1 => vec![v[0]; sites],
        n if n == sites => v,
        n => bail!("--meta-per-site gives {n} counts for {sites} sites"),
    };
    if v[0] == 0 || v.iter().any(|n| *n > 5) {
        bail!("--meta-per-site: the first site has 1 to 5 metadata nodes, the others 0 to 5");
    }
    Ok(v)
}

/// The CA and every process's certificate (made once; a second start reuses them). Returns
/// the CLI's (admin) certificate prefix.
fn demo_certs(dir: &Path, a: &DemoArgs, metas: &[u16]) -> anyhow::Result<PathBuf> {
    if !dir.join(certs::CA_KEY).exists() {
        certs::init(dir).with_context(|| format!("making the sandbox's CA in {}", dir.display()))?;
    }
    let issue = |role: Role, name: &str| -> anyhow::Result<()> {
        let prefix = dir.join(name);
        if !with_ext(&prefix, "pem").exists() {
            let _ = std::fs::remove_file(with_ext(&prefix, "key"));
            let req = certs::Request { role, name: name.into(), volumes: vec![], days: 3650 };
            certs::issue(dir, &req, &prefix)?;
        }
        Ok(())
    };
    issue(Role::Admin, "admin")?;
    for (s, &m) in metas.iter().enumerate() {
        for k in 0..m {
            issue(Role::Meta, &meta_id(s, k).to_string())?;
        }
        for k in 0..a.cache_per_site {
            issue(Role::Cache, &format!("cache{}", cache_id(s, k)))?;
        }
    }
    Ok(dir.join("admin"))
}

fn meta_id(site: usize, k: u16) -> u64 {
    (site as u64 + 1) * 10 + u64::from(k) + 1
}

fn cache_id(site: usize, k: u16) -> u64 {
    (site as u64 + 1) * 100 + u64::from(k) + 1
}

fn tls_args(certs_dir: &Path, name: &str) -> Vec<String> {
    let prefix = certs_dir.join(name);
    vec![
        "--ca".into(),
        certs_dir.join(certs::CA_CERT).display().to_string(),
        "--cert".into(),
        with_ext(&prefix, "pem").display().to_string(),
        "--key".into(),
        with_ext(&prefix, "key").display().to_string(),
    ]
}

fn spawn(place: &SitePlace, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("finding the elea binary")?;
    let mut cmd = match place.wrap.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    // Every process logs at info, or as `RUST_LOG` asks when it is set.
    let level = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    cmd.args(args)
        .env("RUST_LOG", level)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting elea {}", args.first().map_or("", String::as_str)))
}

/// Starts every process and waits for them; returns the sandbox's description.
async fn start_all(
    a: &DemoArgs,
    metas: &[u16],
    dir: &Path,
    certs_dir: &Path,
    cli_cert: &Path,
    places: &[SitePlace],
    procs: &mut Vec<Proc>,
) -> anyhow::Result<serde_json::Value> {
    let meta_addrs: Vec<Vec<String>> = places
        .iter()
        .zip(metas)
        .map(|(p, &m)| (0..m).map(|k| format!("{}:{}", p.ip, META_PORT + k)).collect())
        .collect();
    let voters = &meta_addrs[0];
    let admin = elea_auth::tls::Tls::load(
        &certs_dir.join(certs::CA_CERT),
        &with_ext(cli_cert, "pem"),
        &with_ext(cli_cert, "key"),
    )?;
    let cfg = ClientConfig { tls: Some(admin.connector(&[Role::Meta])?), ..ClientConfig::default() };
    let client = MetaClient::connect(voters, cfg)?;
    let initial: Vec<String> =
        voters.iter().enumerate().map(|(k, addr)| format!("{}={addr}", meta_id(0, k as u16))).collect();
    for (s, place) in places.iter().enumerate() {
        let site_dir = dir.join(&place.name);
        std::fs::create_dir_all(site_dir.join("store"))?;
        for (k, addr) in meta_addrs[s].iter().enumerate() {
            let id = meta_id(s, k as u16);
            let mut args: Vec<String> = vec![
                "meta".into(),
                "--node-id".into(),
                id.to_string(),
                "--listen".into(),
                addr.clone(),
                "--data-dir".into(),
                site_dir.join(format!("meta{id}")).display().to_string(),
                "--site".into(),
                place.name.clone(),
            ];
            if s == 0 {
                args.extend(["--initial-cluster".into(), initial.join(",")]);
            } else {
                // A learner of the one group: added, then started to join it (again on a
                // later start, which then finds its state and ignores --join).
                wait_ready(&client, "the voters to elect a leader").await?;
                if let Err(e) = client.change_membership(Kind::AddLearner, id, addr).await {
                    let known = client
                        .status_of(&voters[0])
                        .await
                        .is_ok_and(|st| st.members.iter().any(|m| m.node_id == id));
                    if !known {
                        return Err(e).with_context(|| format!("adding metadata node {id} as a learner"));
                    }
                }
                args.extend(["--join".into(), voters.join(",")]);
            }
            args.extend(tls_args(certs_dir, &id.to_string()));
            let log = site_dir.join(format!("meta{id}.log"));
            procs.push(Proc {
                site: s,
                what: format!("metadata node {id}"),
                child: spawn(place, &args, &log)?,
            });
        }
    }
    wait_ready(&client, "the metadata service").await?;
    let all_meta: Vec<String> = meta_addrs.iter().flatten().cloned().collect();
    let mut desc = json!({ "meta": all_meta.join(","), "sites": {}, "certs": {
        "ca": certs_dir.join(certs::CA_CERT), "cert": with_ext(cli_cert, "pem"), "key": with_ext(cli_cert, "key") } });
    for (s, place) in places.iter().enumerate() {
        let site_dir = dir.join(&place.name);
        let mut caches = Vec::new();
        for k in 0..a.cache_per_site {
            let id = cache_id(s, k);
            let addr = format!("{}:{}", place.ip, CACHE_PORT + k);
            let mut args: Vec<String> = vec![
                "cache".into(),
                "--node-id".into(),
                id.to_string(),
                "--site".into(),
                place.name.clone(),
                "--listen".into(),
                addr.clone(),
                "--data-dir".into(),
                site_dir.join(format!("cache{id}")).display().to_string(),
                "--meta".into(),
                all_meta.join(","),
                "--staging-size".into(),
                a.staging_size.to_string(),
            ];
            args.extend(tls_args(certs_dir, &format!("cache{id}")));
            let log = site_dir.join(format!("cache{id}.log"));
            procs.push(Proc { site: s, what: format!("cache node {id}"), child: spawn(place, &args, &log)? });
            caches.push(addr);
        }
        desc["sites"][&place.name] = json!({
            "meta": meta_addrs[s],
            "cache": caches,
            "store": format!("file://{}", site_dir.join("store").display()),
            "netns": place.netns,
            "mount_prefix": place.wrap,
        });
    }
    // Every cache node registered and alive, and every metadata node's site recorded.
    let want = places.len() * usize::from(a.cache_per_site);
    let want_meta = all_meta.len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let alive = client.cache_nodes().await.map(|n| n.iter().filter(|n| n.alive).count()).unwrap_or(0);
        let metas = client.sites().await.map(|m| m.meta_nodes.len()).unwrap_or(0);
        if alive >= want && metas >= want_meta {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "within 60 s, {alive} of {want} cache nodes registered and {metas} of {want_meta} metadata \
                 nodes recorded their sites (the logs are under {})",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(desc)
}

/// Waits up to 60 s for the metadata service to answer a linearizable read.
async fn wait_ready(c: &MetaClient, what: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match c.sites().await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(e).with_context(|| format!("waiting for {what}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// SIGTERM to every process, then SIGKILL to those still running after 10 s.
fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter() {
        let _ = Command::new("kill").args(["-TERM", &p.child.id().to_string()]).status();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for p in procs.iter_mut() {
        while matches!(p.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(p.child.try_wait(), Ok(None)) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

fn print_guide(desc: &serde_json::Value, places: &[SitePlace], cli_cert: &Path) {
    let meta = desc["meta"].as_str().unwrap_or_default();
    println!("elea demo: {} sites are up", places.len());
    for p in places {
        let s = &desc["sites"][&p.name];
        println!(
            "  site {:<8} metadata {}  cache {}  store {}",
            p.name,
            s["meta"]
                .as_array()
                .map(|v| v.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
                .unwrap_or_default(),
            s["cache"]
                .as_array()
                .map(|v| v.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
                .unwrap_or_default(),
            s["store"].as_str().unwrap_or_default()
        );
    }
    let ca = desc["certs"]["ca"].as_str().unwrap_or_default();
    println!();
    println!("Use it (in another shell):");
    println!(
        "  export ELEA_META={meta} ELEA_CA={ca} ELEA_CERT={} ELEA_KEY={}",
        with_ext(cli_cert, "pem").display(),
        with_ext(cli_cert, "key").display()
    );
    println!("  elea site list; elea status");
    if let Some(p) = places.get(1).or(places.first()) {
        let store = desc["sites"][&p.name]["store"].as_str().unwrap_or_default();
        let prefix = if p.wrap.is_empty() { String::new() } else { format!("{} ", p.wrap.join(" ")) };
        println!("  elea volume create vol1 --home-site {} --store {store} --shared-file-store", p.name);
        println!("  mkdir -p /mnt/vol1 && {prefix}elea mount --volume vol1 --site {} /mnt/vol1", p.name);
    }
    println!("Ctrl-C stops every process of the sandbox.");
}
