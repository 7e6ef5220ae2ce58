//! The data path with real processes: one `elea meta`, two `elea cache` nodes with R=2. Every
//! acknowledged write stays readable after kill -9 of either cache node, and a cache node's
//! staging survives kill -9 during writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use elea_cache::{DataClient, DataConfig};
use elea_common::ROOT_INO;
use elea_common::pattern::pattern as content;
use elea_integration::{MetaProc, elea_cli, free_port};
use elea_metadata::MetaApi as _;
use elea_metadata::client::{ClientConfig, MetaClient};

async fn wait_alive(meta: &MetaClient, want: &[u64], dead: &[u64]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(n) = meta.cache_nodes().await {
            let alive = |id: &u64| n.iter().any(|x| x.id == *id && x.alive);
            if want.iter().all(alive) && !dead.iter().any(alive) {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cache nodes {want:?} alive / {dead:?} dead: timed out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_blocks_survive_kill9_of_either_cache_node() {
    let dir = tempfile::tempdir().unwrap();
    let meta_addr = format!("127.0.0.1:{}", free_port());
    let _m = MetaProc::start(
        1,
        &meta_addr,
        &dir.path().join("meta"),
        &["--initial-cluster".into(), format!("1={meta_addr}")],
    );
    let addrs: Vec<String> = (0..2).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let mut caches: Vec<MetaProc> = (1..=2u64)
        .map(|id| {
            let d = dir.path().join(format!("cache{id}"));
            MetaProc::start_cache(id, &addrs[id as usize - 1], &d, "a", &meta_addr, &["--staging-size", "1G"])
        })
        .collect();
    let meta = MetaClient::connect(std::slice::from_ref(&meta_addr), ClientConfig::default()).unwrap();
    wait_alive(&meta, &[1, 2], &[]).await;
    let store = format!("file://{}", dir.path().join("objects").display());
    std::fs::create_dir_all(dir.path().join("objects")).unwrap();
    // Stores that would lose tiered blocks, or that do not answer, are refused with the
    // reason; nothing is created.
    let unreachable = "s3://b/p?endpoint=http://127.0.0.1:9&region=us-east-1&anonymous=true";
    for (args, want) in [
        (vec!["--store", "memory://x"], "memory://"),
        (vec!["--store", store.as_str()], "--shared-file-store"),
        (vec!["--store", unreachable], "probing store"),
    ] {
        let mut cmd = vec!["volume", "create", "refused", "--meta", &meta_addr];
        cmd.extend(args);
        let (ok, out, err) = elea_cli(&cmd);
        assert!(!ok && err.contains(want), "{cmd:?}: {out}{err}");
    }
    let (ok, out, err) = elea_cli(&["volume", "list", "--meta", &meta_addr]);
    assert!(ok && !out.contains("refused"), "{out}{err}");
    // Two cache nodes on this one host see the same directory.
    let (ok, out, err) = elea_cli(&[
        "volume",
        "create",
        "v",
        "--meta",
        &meta_addr,
        "--store",
        &store,
        "--shared-file-store",
        "--replicas",
        "2",
        "--tier-after",
        "1h",
    ]);
    assert!(ok, "{out}{err}");
    let vol = meta.volume("v").await.unwrap().id;
    let mut cfg = DataConfig::new("a");
    cfg.node_refresh = Duration::from_millis(200);
    let data = DataClient::new(meta.clone(), cfg);

    // Writers run while node 1 is killed with SIGKILL; only acknowledged writes count.
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (data, meta, acked, stop) = (data.clone(), meta.clone(), acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..1000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let name = format!("w{w}-{i}");
                let Ok(f) = meta.create(vol, ROOT_INO, name.as_bytes(), 0o644).await else { continue };
                let len = 300_000 + ((w * 7919 + i * 104_729) % 5_000_000) as usize;
                let seed = w * 1_000_000 + i;
                if data.write_extents(vol, f.ino, &[(0, Bytes::from(content(seed, len)))]).await.is_ok() {
                    acked.lock().unwrap().push((f.ino, seed, len));
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    caches[0].kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked: Vec<(u64, u64, usize)> = acked.lock().unwrap().clone();
    assert!(acked.len() >= 8, "too few writes were acknowledged: {}", acked.len());
    let log1 = dir.path().join("cache1.log");
    let check = |label: &'static str| {
        let log1 = log1.clone();
        let data = data.clone();
        let acked = acked.clone();
        async move {
            for (ino, seed, len) in &acked {
                let got = data.read_file(vol, *ino, 0, *len).await;
                let got = got.unwrap_or_else(|e| {
                    let log = std::fs::read_to_string(&log1).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    panic!(
                        "{label}: reading inode {ino}: {e}\nnode 1 log (newest first):\n{}",
                        tail.join("\n")
                    )
                });
                assert!(got == content(*seed, *len), "{label}: inode {ino} has the wrong bytes");
            }
        }
    };
    // Node 1 is dead: node 2 serves everything.
    check("node 1 killed").await;
    // Node 1 restarts on its staging (kill -9 mid-write must not have lost an acknowledged
    // block); then node 2 is killed and node 1 alone serves everything.
    caches[0].restart();
    wait_alive(&meta, &[1, 2], &[]).await;
    caches[1].kill9();
    check("node 2 killed").await;
    let log = caches[0].log_tail();
    assert!(!log.contains("panicked"), "{log}");
    // `elea status` lists both cache nodes.
    let (ok, out, err) = elea_cli(&["status", "--meta", &meta_addr, "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["cache_nodes"].as_array().map(Vec::len), Some(2), "{out}");
}

/// Two clusters pointed at one bucket and prefix, or one cache data directory: the second is
/// refused with a clear error, and the first cluster's data reads back intact. The first
/// cluster's objects carry its identity in their keys, and its store and data directory name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_cluster_on_the_same_store_or_disk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    std::fs::create_dir_all(&objects).unwrap();
    let store = format!("file://{}", objects.display());
    let cluster = |name: &str| {
        let addr = format!("127.0.0.1:{}", free_port());
        let m = MetaProc::start(
            1,
            &addr,
            &dir.path().join(format!("meta-{name}")),
            &["--initial-cluster".into(), format!("1={addr}")],
        );
        (m, addr)
    };
    let (_ma, a) = cluster("a");
    let cache_dir = dir.path().join("cache-a");
    let cache_addr = format!("127.0.0.1:{}", free_port());
    let mut cache = MetaProc::start_cache(1, &cache_addr, &cache_dir, "a", &a, &["--staging-size", "1G"]);
    let meta = MetaClient::connect(std::slice::from_ref(&a), ClientConfig::default()).unwrap();
    wait_alive(&meta, &[1], &[]).await;
    let (ok, out, err) =
        elea_cli(&["volume", "create", "v", "--meta", &a, "--store", &store, "--replicas", "1"]);
    assert!(ok, "{out}{err}");
    let vol = meta.volume("v").await.unwrap().id;
    let id = meta.data_identity().await.unwrap().expect("the first volume made the identity");
    let data = DataClient::new(meta.clone(), DataConfig::new("a"));
    let f = meta.create(vol, ROOT_INO, b"f", 0o644).await.unwrap();
    let bytes = Bytes::from(content(7, 9 << 20));
    data.write_extents(vol, f.ino, &[(0, bytes.clone())]).await.unwrap();
    let (ok, out, err) = elea_cli(&["tier", "--meta", &a, "--volume", "v", "--wait"]);
    assert!(ok, "{out}{err}");
    let owner = std::fs::read_to_string(objects.join(elea_store::OWNER_OBJECT)).unwrap();
    assert_eq!(owner.trim(), id.cluster_hex());
    assert!(objects.join(format!("c{}/v{vol}", id.cluster_hex())).is_dir(), "keys carry the cluster");
    assert_eq!(std::fs::read_to_string(cache_dir.join("cluster-id")).unwrap().trim(), id.cluster_hex());

    // A second cluster: its volume on the same store is refused, and so is a cache node on the
    // first one's data directory.
    let (_mb, b) = cluster("b");
    let (ok, out, err) = elea_cli(&["volume", "create", "v", "--meta", &b, "--store", &store]);
    assert!(!ok && err.contains("belongs to another Elea cluster"), "{out}{err}");
    cache.kill9();
    let mut wrong = MetaProc::start_cache(1, &cache_addr, &cache_dir, "a", &b, &[]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while wrong.is_running() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!wrong.is_running(), "a cache node on another cluster's data directory kept running");
    assert!(
        wrong.log_tail().contains("holds the staged blocks of another Elea cluster"),
        "{}",
        wrong.log_tail()
    );
    // With its own store, the second cluster works.
    let other = format!("file://{}", dir.path().join("objects-b").display());
    let (ok, out, err) = elea_cli(&["volume", "create", "v", "--meta", &b, "--store", &other]);
    assert!(ok, "{out}{err}");

    // The first cluster's data is intact, read back from its store.
    cache.restart();
    wait_alive(&meta, &[1], &[]).await;
    let got = data.read_file(vol, f.ino, 0, bytes.len()).await.unwrap();
    assert!(got == bytes, "the first cluster's file changed");
}
