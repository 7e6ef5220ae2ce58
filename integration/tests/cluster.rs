//! Real three-process metadata clusters on loopback: kill -9 of the leader under write load,
//! membership changes under load, kill -9 of every node at once. The invariant everywhere:
//! every operation the service acknowledged is there afterwards, and retried creates never
//! report a false EEXIST.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use elea_common::{Errno, Ino, ROOT_INO, VolumeId};
use elea_fsm::{Query, Reply};
use elea_integration::{Cluster, MetaProc, elea_cli, free_port, statuses, wait_leader, wait_status};
use elea_metadata::MetaApi as _;
use elea_metadata::client::{ClientError, MetaClient};

/// Cluster tests share two cores: run them one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SNAPSHOT_FLAGS: [&str; 4] = ["--snapshot-every", "300", "--compact-margin", "20"];

struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<LoadResult>>,
}

#[derive(Default)]
struct LoadResult {
    acked: Vec<String>,
    failed: usize,
    false_eexist: usize,
}

/// `workers` tasks creating files `prefix-w-i` in `dir` as fast as they can.
fn start_load(c: &MetaClient, vol: VolumeId, dir: Ino, workers: usize, prefix: &str) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = (0..workers)
        .map(|w| {
            let c = c.clone();
            let stop = stop.clone();
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                let mut r = LoadResult::default();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("{prefix}-{w}-{i}");
                    match c.create(vol, dir, name.as_bytes(), 0o644).await {
                        Ok(_) => r.acked.push(name),
                        Err(ClientError::Fs(e)) if e == Errno::EEXIST => r.false_eexist += 1,
                        Err(_) => r.failed += 1,
                    }
                    i += 1;
                }
                r
            })
        })
        .collect();
    Load { stop, tasks }
}

impl Load {
    async fn finish(self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = LoadResult::default();
        for t in self.tasks {
            let r = t.await.expect("load task");
            all.acked.extend(r.acked);
            all.failed += r.failed;
            all.false_eexist += r.false_eexist;
        }
        all
    }
}

/// Every name in a directory, through the resumable readdir cursor.
async fn list_dir(c: &MetaClient, vol: VolumeId, dir: Ino) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut cookie = 0;
    loop {
        let reply = c.query(Query::ReadDir { vol, ino: dir, cookie, limit: 1000, plus: false }).await;
        let Ok(Reply::Dir { entries, eof }) = reply else { panic!("readdir failed: {reply:?}") };
        for e in &entries {
            cookie = e.cookie;
            names.insert(String::from_utf8_lossy(&e.name).into_owned());
        }
        if eof || entries.is_empty() {
            return names;
        }
    }
}

async fn assert_all_present(c: &MetaClient, vol: VolumeId, dir: Ino, acked: &[String], cl: &Cluster) {
    let names = list_dir(c, vol, dir).await;
    let missing: Vec<&String> = acked.iter().filter(|n| !names.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged creates lost, e.g. {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(5)],
        cl.logs()
    );
}

fn addr_list(cl: &Cluster) -> Vec<String> {
    cl.nodes.iter().map(|n| n.addr.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load_loses_nothing_and_catches_up_by_snapshot() {
    let _g = SERIAL.lock().await;
    let mut cl = Cluster::start(3, &SNAPSHOT_FLAGS);
    let c = cl.client();
    let addrs = addr_list(&cl);
    let leader = wait_leader(&c, &addrs, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("no leader\n{}", cl.logs()));
    let vol = c.create_volume("kill-leader", Default::default()).await.expect("volume");
    let load = start_load(&c, vol.id, ROOT_INO, 4, "a");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let killed = leader.node_id;
    let killed_addr = cl.node(killed).addr.clone();
    let before = c.status_of(&killed_addr).await.expect("leader status");
    let t0 = Instant::now();
    cl.node(killed).kill9();
    let others: Vec<String> = addrs.iter().filter(|a| **a != killed_addr).cloned().collect();
    let new_leader = wait_leader(&c, &others, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no new leader after kill -9\n{}", cl.logs()));
    let failover = t0.elapsed();
    println!("kill -9 of leader {killed}: node {} leads after {failover:?}", new_leader.node_id);
    assert!(failover < Duration::from_secs(3), "failover took {failover:?}");
    // The new leader serves: an acknowledged write right away.
    c.mkdir(vol.id, ROOT_INO, b"after-failover", 0o755, 0, 0).await.expect("write after failover");

    // Keep writing until the survivors have compacted their logs past the dead node's.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = statuses(&c, &others).await;
        if s.iter().all(|s| s.first_index > before.applied_index + 1) {
            break;
        }
        assert!(Instant::now() < deadline, "survivors never compacted past {}: {s:?}", before.applied_index);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cl.node(killed).restart();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let result = load.finish().await;
    assert_eq!(result.false_eexist, 0, "a retried create reported EEXIST");
    assert!(result.acked.len() > 100, "too little load: {}", result.acked.len());

    let target = c.status_of(&new_leader.addr).await.expect("leader status").commit_index;
    let caught_up = wait_status(&c, &killed_addr, Duration::from_secs(30), |s| s.applied_index >= target)
        .await
        .unwrap_or_else(|| panic!("restarted node did not catch up to {target}\n{}", cl.logs()));
    assert!(
        cl.node(killed).log_tail().contains("installed snapshot"),
        "restarted node caught up without a snapshot (status {caught_up:?})"
    );
    assert_all_present(&c, vol.id, ROOT_INO, &result.acked, &cl).await;
    println!("acknowledged {} creates, {} failed attempts", result.acked.len(), result.failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_nodes_under_load() {
    let _g = SERIAL.lock().await;
    let mut cl = Cluster::start(3, &SNAPSHOT_FLAGS);
    let c = cl.client();
    let addrs = addr_list(&cl);
    wait_leader(&c, &addrs, Duration::from_secs(15)).await.expect("leader");
    let vol = c.create_volume("membership", Default::default()).await.expect("volume");
    let load = start_load(&c, vol.id, ROOT_INO, 3, "m");
    tokio::time::sleep(Duration::from_millis(800)).await;

    // A node that was not added first refuses to join.
    let stray_addr = format!("127.0.0.1:{}", free_port());
    let stray_dir = cl.dir.path().join("stray");
    let (ok, _, err) = elea_cli(&[
        "meta",
        "--node-id",
        "9",
        "--listen",
        &stray_addr,
        "--data-dir",
        stray_dir.to_str().unwrap_or("x"),
        "--join",
        &cl.addrs(),
    ]);
    assert!(!ok && err.contains("not a member"), "stray join: {err}");

    // Add node 4, start it with --join: it catches up.
    let addr4 = format!("127.0.0.1:{}", free_port());
    let (ok, out, err) =
        elea_cli(&["cluster", "add", "--meta", &cl.addrs(), "--node-id", "4", "--addr", &addr4]);
    assert!(ok, "cluster add: {out}{err}");
    let join = vec!["--join".to_string(), cl.addrs()];
    let dir4 = cl.dir.path().join("n4");
    cl.nodes.push(MetaProc::start(4, &addr4, &dir4, &join));
    let leader = wait_leader(&c, &addrs, Duration::from_secs(10)).await.expect("leader");
    wait_status(&c, &addr4, Duration::from_secs(30), |s| {
        s.applied_index + 50 >= leader.commit_index && s.leader_id != 0
    })
    .await
    .unwrap_or_else(|| panic!("node 4 did not catch up\n{}", cl.logs()));

    // Remove node 1 (whatever its role) while the load runs.
    let (ok, out, err) = elea_cli(&["cluster", "remove", "--meta", &cl.addrs(), "--node-id", "1"]);
    assert!(ok, "cluster remove: {out}{err}");
    let addr1 = cl.node(1).addr.clone();
    let rest: Vec<String> = cl.nodes.iter().filter(|n| n.id != 1).map(|n| n.addr.clone()).collect();
    let s = wait_leader(&c, &rest, Duration::from_secs(10)).await.expect("leader among the rest");
    let ids: Vec<u64> = s.members.iter().map(|m| m.node_id).collect();
    assert_eq!(ids, vec![2, 3, 4], "members after remove");

    // Hand leadership to the new node.
    let (ok, out, err) = elea_cli(&["cluster", "transfer-leader", "--meta", &rest.join(","), "--to", "4"]);
    assert!(ok, "transfer-leader: {out}{err}");
    wait_status(&c, &addr4, Duration::from_secs(10), |s| s.role == "leader").await.expect("node 4 leads");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let result = load.finish().await;
    assert_eq!(result.false_eexist, 0);
    assert!(result.acked.len() > 50, "too little load: {}", result.acked.len());
    cl.node(1).kill9();
    let c2 = MetaClient::connect(&rest, Default::default()).expect("client");
    assert_all_present(&c2, vol.id, ROOT_INO, &result.acked, &cl).await;

    // The CLI status shows the three members and the leader.
    let (ok, out, err) = elea_cli(&["status", "--meta", &rest.join(","), "--json"]);
    assert!(ok, "status: {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("status --json is one JSON object");
    assert_eq!(v["leader_id"], 4, "{out}");
    assert_eq!(v["members"].as_array().map(Vec::len), Some(3), "{out}");
    let _ = addr1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_all_at_once_and_restart_keeps_every_acknowledged_op() {
    let _g = SERIAL.lock().await;
    let mut cl = Cluster::start(3, &SNAPSHOT_FLAGS);
    let c = cl.client();
    let addrs = addr_list(&cl);
    wait_leader(&c, &addrs, Duration::from_secs(15)).await.expect("leader");
    let vol = c.create_volume("kill-all", Default::default()).await.expect("volume");
    let dir = c.mkdir(vol.id, ROOT_INO, b"d", 0o755, 0, 0).await.expect("mkdir").ino;
    let load = start_load(&c, vol.id, dir, 4, "k");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    for n in &mut cl.nodes {
        n.kill9();
    }
    let result = load.finish().await;
    assert_eq!(result.false_eexist, 0);
    assert!(result.acked.len() > 100, "too little load: {}", result.acked.len());
    for n in &mut cl.nodes {
        n.restart();
    }
    let c = cl.client();
    wait_leader(&c, &addrs, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("no leader after restart\n{}", cl.logs()));
    assert_all_present(&c, vol.id, dir, &result.acked, &cl).await;
    println!("{} acknowledged creates survived kill -9 of every node", result.acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_node_cleanly_and_it_rejoins() {
    let _g = SERIAL.lock().await;
    let mut cl = Cluster::start(3, &[]);
    let c = cl.client();
    let addrs = addr_list(&cl);
    let leader = wait_leader(&c, &addrs, Duration::from_secs(15)).await.expect("leader");
    let vol = c.create_volume("term", Default::default()).await.expect("volume");
    let follower = cl.nodes.iter().map(|n| n.id).find(|id| *id != leader.node_id).expect("a follower");
    // A client that only knows a follower: its first request is forwarded, and the answer
    // tells it where the leader is, so later requests go there directly.
    let fc = MetaClient::connect(&[cl.node(follower).addr.clone()], Default::default()).expect("client");
    fc.mkdir(vol.id, ROOT_INO, b"via-follower", 0o755, 0, 0).await.expect("forwarded write");
    assert_eq!(fc.leader_addr(), Some(leader.addr.clone()), "the forwarded answer did not name the leader");
    fc.query(Query::GetAttr { vol: vol.id, ino: ROOT_INO }).await.expect("read at the leader");
    // Stop a follower with SIGTERM while its peers hold streams open to it.
    let status = cl.node(follower).terminate(Duration::from_secs(10));
    let status = status.unwrap_or_else(|| panic!("node {follower} ignored SIGTERM\n{}", cl.logs()));
    assert!(status.success(), "node {follower} exited with {status}");
    c.mkdir(vol.id, ROOT_INO, b"while-down", 0o755, 0, 0).await.expect("two of three still serve");
    cl.node(follower).restart();
    let addr = cl.node(follower).addr.clone();
    let target = c.status_of(&leader.addr).await.expect("status").commit_index;
    wait_status(&c, &addr, Duration::from_secs(15), |s| s.applied_index >= target)
        .await
        .unwrap_or_else(|| panic!("node {follower} did not rejoin\n{}", cl.logs()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_to_an_idle_cluster_with_default_settings_catches_up() {
    let _g = SERIAL.lock().await;
    // Default snapshot interval: the only snapshot is the bootstrap one, which does not list
    // the new node; adding it must produce one that does.
    let mut cl = Cluster::start(3, &[]);
    let c = cl.client();
    let addrs = addr_list(&cl);
    wait_leader(&c, &addrs, Duration::from_secs(15)).await.expect("leader");
    let vol = c.create_volume("idle", Default::default()).await.expect("volume");
    c.mkdir(vol.id, ROOT_INO, b"before-join", 0o755, 0, 0).await.expect("mkdir");
    let addr4 = format!("127.0.0.1:{}", free_port());
    let (ok, out, err) =
        elea_cli(&["cluster", "add", "--meta", &cl.addrs(), "--node-id", "4", "--addr", &addr4]);
    assert!(ok, "cluster add: {out}{err}");
    // Asking again for what already holds succeeds (a retried add is not a failure).
    let (ok, out, err) =
        elea_cli(&["cluster", "add", "--meta", &cl.addrs(), "--node-id", "4", "--addr", &addr4]);
    assert!(ok, "repeated cluster add: {out}{err}");
    let join = vec!["--join".to_string(), cl.addrs()];
    let dir4 = cl.dir.path().join("n4");
    cl.nodes.push(MetaProc::start(4, &addr4, &dir4, &join));
    let leader = wait_leader(&c, &addrs, Duration::from_secs(10)).await.expect("leader");
    wait_status(&c, &addr4, Duration::from_secs(20), |s| {
        s.applied_index >= leader.commit_index && s.leader_id != 0
    })
    .await
    .unwrap_or_else(|| panic!("node 4 did not catch up on an idle cluster\n{}", cl.logs()));
}
