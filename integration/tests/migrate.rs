//! Moving a volume between two S3 protocol servers while it is written, with real processes:
//! three metadata voters, two cache nodes (R=2) and two `elea-s3-test-server`s. The migrating
//! CLI, the copying cache node and the metadata leader are each killed with SIGKILL during the
//! copy; the migration still finishes with every block in the new store, the old store's
//! objects are deleted after the asked delay, and with the old server gone and the cache
//! nodes' read caches dropped, every acknowledged file reads back whole; after `elea warmup`
//! it does so with the new server gone too.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use elea_cache::{DataClient, DataConfig};
use elea_common::ROOT_INO;
use elea_common::pattern::pattern as content;
use elea_integration::chaos::S3Proc;
use elea_integration::{Cluster, MetaProc, elea_bin, elea_cli_env, free_port, wait_leader};
use elea_metadata::MetaApi as _;
use elea_metadata::client::MetaClient;
use elea_store::testing::S3TestServer;

const SITE: &str = "local";

async fn wait_alive(meta: &MetaClient, want: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(n) = meta.cache_nodes().await
            && want.iter().all(|id| n.iter().any(|x| x.id == *id && x.alive))
        {
            return;
        }
        assert!(Instant::now() < deadline, "cache nodes {want:?} alive: timed out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `elea migrate status v --json` as JSON.
fn status(meta: &str, env: &[(String, String)]) -> serde_json::Value {
    let (ok, out, err) = elea_cli_env(&["migrate", "status", "v", "--json", "--meta", meta], env);
    assert!(ok, "migrate status: {out}{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_outlives_kill9_of_its_cli_its_copier_and_the_metadata_leader() {
    let mut cluster = Cluster::start(3, &[]);
    let meta_addrs = cluster.addrs();
    let dir = cluster.dir.path().to_path_buf();
    let mut src = S3Proc::start(&dir.join("s3-src"), "127.0.0.1", free_port(), &dir.join("s3-src.log"), &[]);
    let mut dst = S3Proc::start(&dir.join("s3-dst"), "127.0.0.1", free_port(), &dir.join("s3-dst.log"), &[]);
    let env = S3Proc::env();
    let mut caches: Vec<MetaProc> = (1..=2u64)
        .map(|id| {
            let addr = format!("127.0.0.1:{}", free_port());
            let args: Vec<String> =
                ["--site", SITE, "--meta", &meta_addrs, "--staging-size", "1G"].map(String::from).into();
            MetaProc::start_wrapped("cache", id, &addr, &dir.join(format!("cache{id}")), &args, &[], &env)
        })
        .collect();
    let meta = cluster.client();
    wait_alive(&meta, &[1, 2]).await;
    let src_url = src.url();
    let (ok, out, err) = elea_cli_env(
        &[
            "volume",
            "create",
            "v",
            "--meta",
            &meta_addrs,
            "--store",
            &src_url,
            "--replicas",
            "2",
            "--tier-after",
            "1s",
            "--compression",
            "none",
        ],
        &env,
    );
    assert!(ok, "{out}{err}");
    let vol = meta.volume("v").await.unwrap().id;
    let mut cfg = DataConfig::new(SITE);
    cfg.node_refresh = Duration::from_millis(200);
    cfg.store.credentials =
        Some((S3TestServer::ACCESS_KEY.to_string(), S3TestServer::SECRET_KEY.to_string()));
    let data = DataClient::new(meta.clone(), cfg);

    // 48 MiB in 24 files, tiered to the first store.
    let mut acked: Vec<(u64, u64, usize)> = Vec::new();
    for i in 0..24u64 {
        let f = meta.create(vol, ROOT_INO, format!("before-{i}").as_bytes(), 0o644).await.unwrap();
        let len = 1_000_000 + ((i * 104_729) % 3_200_000) as usize;
        data.write_extents(vol, f.ino, &[(0, Bytes::from(content(i, len)))]).await.unwrap();
        acked.push((f.ino, i, len));
    }
    let (ok, out, err) = elea_cli_env(&["tier", "--volume", "v", "--wait", "--meta", &meta_addrs], &env);
    assert!(ok, "{out}{err}");
    let before_objects = src.objects();
    assert!(before_objects >= 24, "{before_objects} objects in the first store");

    // Writers and deleters keep going through the whole migration.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (data, meta, stop) = (data.clone(), meta.clone(), stop.clone());
        tokio::spawn(async move {
            let mut kept = Vec::new();
            let mut i = 1000u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let name = format!("during-{i}");
                let Ok(f) = meta.create(vol, ROOT_INO, name.as_bytes(), 0o644).await else { continue };
                let len = 200_000 + ((i * 7919) % 2_000_000) as usize;
                if data.write_extents(vol, f.ino, &[(0, Bytes::from(content(i, len)))]).await.is_err() {
                    continue;
                }
                // Every third file is deleted again: its blocks become garbage mid-copy.
                if i.is_multiple_of(3) && meta.unlink(vol, ROOT_INO, name.as_bytes()).await.is_ok() {
                    continue;
                }
                kept.push((f.ino, i, len));
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            kept
        })
    };

    // The migrating CLI is killed while it waits; the job goes on without it.
    let dst_url = dst.url();
    let mut cli = Command::new(elea_bin())
        .args(["migrate", "v", "--to", &dst_url, "--rate-limit", "8MiB", "--delete-source", "2s"])
        .args(["--wait", "--json", "--meta", &meta_addrs])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("migrate.out")).unwrap())
        .stderr(std::fs::File::create(dir.join("migrate.err")).unwrap())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        cli.try_wait().unwrap().is_none(),
        "the CLI ended before it was killed: {}{}",
        std::fs::read_to_string(dir.join("migrate.out")).unwrap_or_default(),
        std::fs::read_to_string(dir.join("migrate.err")).unwrap_or_default()
    );
    cli.kill().unwrap();
    let _ = cli.wait();
    let s = status(&meta_addrs, &env);
    assert_eq!(s["state"], "copying", "{s}");

    // The cache node that copies is killed, and comes back later.
    let deadline = Instant::now() + Duration::from_secs(20);
    let copier = loop {
        if let Some(i) = caches.iter().position(|c| c.log_count("migrating") > 0) {
            break i;
        }
        assert!(Instant::now() < deadline, "no cache node started copying");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    caches[copier].kill9();
    let at_kill = status(&meta_addrs, &env);
    assert!(at_kill["state"] == "copying" && at_kill["objects_left"].as_u64() > Some(0), "{at_kill}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    caches[copier].restart();

    // Then the metadata leader.
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.addr.clone()).collect();
    let leader = wait_leader(&meta, &addrs, Duration::from_secs(20)).await.expect("a leader");
    let at_leader_kill = status(&meta_addrs, &env);
    assert!(at_leader_kill["state"] == "copying", "{at_leader_kill}");
    cluster.node(leader.node_id).kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.node(leader.node_id).restart();

    // A new CLI follows the job to its end.
    let (ok, out, err) =
        elea_cli_env(&["migrate", "status", "v", "--wait", "--json", "--meta", &meta_addrs], &env);
    assert!(ok, "migrate status --wait: {out}{err}\n{}", cluster.logs());
    let done: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    eprintln!("at the copier's kill: {at_kill}\nat the leader's kill: {at_leader_kill}\ndone: {done}");
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["objects_left"], 0, "{done}");
    assert!(
        done["objects_done"].as_u64() >= at_kill["objects_done"].as_u64(),
        "progress went back: {at_kill} then {done}"
    );
    stop.store(true, Ordering::Relaxed);
    acked.extend(writer.await.unwrap());

    // The old store's objects of the volume are deleted two seconds after the move.
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&meta_addrs, &env)["source_deleted"].is_null() {
        assert!(Instant::now() < deadline, "the source was not deleted: {}", status(&meta_addrs, &env));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(src.objects(), 0, "objects left in the old store");

    // Every block lives in the new store alone: with the old server gone and the cache
    // nodes restarted (their read caches are in memory), every acknowledged file reads back.
    let (ok, out, err) = elea_cli_env(&["tier", "--volume", "v", "--wait", "--meta", &meta_addrs], &env);
    assert!(ok, "{out}{err}");
    src.kill9();
    for c in &mut caches {
        c.restart();
    }
    wait_alive(&meta, &[1, 2]).await;
    data.clear_cache();
    // `elea warmup` fetches every block into the cache nodes' read caches: after it, the
    // files read back with the new store gone as well.
    let warm = |meta: &str| {
        let (ok, out, err) =
            elea_cli_env(&["warmup", "v:/", "--recursive", "--wait", "--json", "--meta", meta], &env);
        assert!(ok, "warmup: {out}{err}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()
    };
    let w = warm(&meta_addrs);
    assert_eq!(w["files"].as_u64(), Some(acked.len() as u64), "{w}");
    assert!(w["blocks"].as_u64() >= Some(acked.len() as u64) && w["failed"] == 0, "{w}");
    // Present: still staged there (a tiered block's staged copies go within moments).
    assert_eq!(
        w["fetched"].as_u64().zip(w["present"].as_u64()).map(|(f, p)| f + p),
        w["blocks"].as_u64(),
        "{w}"
    );
    let again = warm(&meta_addrs);
    assert!(again["present"] == w["blocks"] && again["fetched"] == 0, "{again}");
    assert!(
        dst.objects() >= acked.len(),
        "{} objects in the new store for {} files",
        dst.objects(),
        acked.len()
    );
    dst.kill9();
    for (ino, seed, len) in &acked {
        let got = data.read_file(vol, *ino, 0, *len).await.unwrap_or_else(|e| {
            panic!("reading inode {ino}: {e}\n{}\n{}", caches[0].log_tail(), caches[1].log_tail())
        });
        assert!(got == content(*seed, *len), "inode {ino} has the wrong bytes");
    }
    assert!(
        dst.objects() >= acked.len(),
        "{} objects in the new store for {} files",
        dst.objects(),
        acked.len()
    );
    for c in &caches {
        let log = c.log_tail();
        assert!(!log.contains("panicked"), "{log}");
    }
}
