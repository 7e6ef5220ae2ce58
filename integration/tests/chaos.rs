//! Fault scenarios on a whole deployment of real processes (three metadata voters, cache
//! nodes, two FUSE gateways), under a checked workload: nothing acknowledged is lost, no read
//! returns bytes that were never written or older than an acknowledged write, and service
//! goes on. Each prints its figures (operations acknowledged, failed calls and how long they
//! waited, the longest call, time until full redundancy). `CHAOS_SECS` stretches the load
//! phases (default 3 s each) for the long versions run by hand.

use std::time::{Duration, Instant};

use elea_integration::chaos::{Report, Topology, TopologyConfig, Workload};
use elea_integration::fuse_available;

/// Scenarios share two cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn phase() -> Duration {
    let secs = std::env::var("CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    Duration::from_secs(secs)
}

async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
}

fn check(name: &str, t: &Topology, r: &Report) {
    println!("{name}: {}", r.summary());
    for e in r.errors.iter().take(20) {
        println!("  {} {} failed after {:?} at {:?}: {:?}", e.who, e.op, e.end - e.start, e.start, e.error);
    }
    assert!(
        r.violations.is_empty() && r.lost == 0,
        "{name}: {} violations, {} lost:\n{}\n{}",
        r.violations.len(),
        r.lost,
        r.violations.iter().take(30).cloned().collect::<Vec<_>>().join("\n"),
        t.logs()
    );
    assert!(r.acked.values().sum::<u64>() > 20, "{name}: too little was acknowledged: {:?}", r.acked);
    assert!(r.reads_checked > 10, "{name}: too few reads were checked ({})", r.reads_checked);
}

/// Acknowledged calls that ended after `t`: service went on.
fn acked_after(r: &Report, t: Duration) -> usize {
    r.all_calls.iter().filter(|c| c.error.is_none() && c.end > t).count()
}

fn config(caches: u64, replicas: u8) -> TopologyConfig {
    TopologyConfig { metas: 3, caches, mounts: 2, replicas }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_leader_kill9_under_load() {
    if !fuse_available("metadata_leader_kill9_under_load") {
        return;
    }
    let _g = SERIAL.lock().await;
    let mut t = Topology::start(config(2, 2)).await;
    let wl = Workload::start(&t, 3, 2, 64 << 10);
    run_for(phase()).await;
    let leader = t.leader().await;
    let t0 = Instant::now();
    t.kill9_meta(leader);
    let killed_at = t.events.now();
    let next = t.leader().await;
    t.events.log(&format!("node {next} leads, {:?} after the kill", t0.elapsed()));
    run_for(phase()).await;
    t.restart_meta(leader);
    run_for(phase()).await;
    let r = wl.finish();
    check("metadata leader kill -9", &t, &r);
    let after = acked_after(&r, killed_at);
    assert!(after > 10, "service did not go on after the kill: {after} calls acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_leader_paused_for_ten_seconds() {
    if !fuse_available("metadata_leader_paused_for_ten_seconds") {
        return;
    }
    let _g = SERIAL.lock().await;
    let mut t = Topology::start(config(2, 2)).await;
    let wl = Workload::start(&t, 3, 2, 64 << 10);
    run_for(phase()).await;
    let leader = t.leader().await;
    t.pause_meta(leader, true);
    let paused_at = t.events.now();
    run_for(Duration::from_secs(10)).await;
    t.pause_meta(leader, false);
    run_for(phase()).await;
    let r = wl.finish();
    check("metadata leader SIGSTOP 10 s", &t, &r);
    let after = acked_after(&r, paused_at + Duration::from_secs(5));
    assert!(after > 10, "service did not go on while the leader was stopped: {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_node_kill9_then_rejoins_with_an_empty_disk() {
    if !fuse_available("cache_node_kill9_then_rejoins_with_an_empty_disk") {
        return;
    }
    let _g = SERIAL.lock().await;
    let mut t = Topology::start(config(3, 2)).await;
    let wl = Workload::start(&t, 3, 2, 256 << 10);
    run_for(phase()).await;
    t.kill9_cache(1);
    let killed_at = t.events.now();
    run_for(phase()).await;
    t.restart_cache(1, true).await;
    // Under load: blocks that had a copy on the wiped node get one elsewhere.
    let back = t.wait_redundancy(2, Duration::from_secs(180)).await;
    t.events.log(&format!(
        "every staged block has 2 live copies again, {back:?} after the node registered again"
    ));
    run_for(phase()).await;
    let r = wl.finish();
    check("cache node kill -9, rejoin empty", &t, &r);
    assert!(acked_after(&r, killed_at) > 10, "service did not go on after the cache node died");
    assert!(back.is_some(), "redundancy was not restored\n{}", t.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_everything_then_restart() {
    if !fuse_available("kill9_of_everything_then_restart") {
        return;
    }
    let _g = SERIAL.lock().await;
    let mut t = Topology::start(config(2, 2)).await;
    let wl = Workload::start(&t, 3, 2, 64 << 10);
    run_for(phase()).await;
    t.kill9_everything();
    run_for(Duration::from_secs(1)).await;
    t.restart_everything().await;
    run_for(phase()).await;
    let r = wl.finish();
    check("kill -9 of everything", &t, &r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_every_process_under_load() {
    if !fuse_available("rolling_restart_of_every_process_under_load") {
        return;
    }
    let _g = SERIAL.lock().await;
    let mut t = Topology::start(config(3, 2)).await;
    let wl = Workload::start(&t, 3, 2, 64 << 10);
    run_for(phase()).await;
    t.rolling_restart().await;
    run_for(phase()).await;
    let r = wl.finish();
    check("rolling restart", &t, &r);
}

/// Links can only be cut when every process has its own network namespace (root and
/// iproute2); otherwise the scenario says so and is skipped.
fn network_available(name: &str, t: &Topology) -> bool {
    if !t.has_network() {
        eprintln!("SKIPPED {name}: needs network namespaces (root, ip, tc, nsenter)");
    }
    t.has_network()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_voters_minority_partition_then_a_slow_link() {
    let name = "five_voters_minority_partition_then_a_slow_link";
    if !fuse_available(name) {
        return;
    }
    let _g = SERIAL.lock().await;
    let mut cfg = config(2, 2);
    cfg.metas = 5;
    let t = Topology::start(cfg).await;
    if !network_available(name, &t) {
        return;
    }
    let wl = Workload::start(&t, 3, 2, 64 << 10);
    run_for(phase()).await;
    let leader = t.leader().await;
    let minority: Vec<u64> = (1..=5).filter(|id| *id != leader).take(2).collect();
    let side_a: Vec<String> = minority.iter().map(|id| format!("meta{id}")).collect();
    let side_b: Vec<String> = t.names().into_iter().filter(|n| !side_a.contains(n)).collect();
    t.partition(&side_a, &side_b);
    let cut_at = t.events.now();
    run_for(phase() * 2).await;
    t.heal();
    for id in &minority {
        t.wait_caught_up(*id, Duration::from_secs(30)).await;
    }
    // Pre-vote: the healed nodes, behind and with no quorum of their own, disrupt nothing.
    let after = t.wait_new_leader(0, Duration::from_secs(10)).await;
    t.events.log(&format!("leader after the heal: node {after} (before: node {leader})"));
    let slow_at = t.events.now();
    t.throttle(&format!("meta{leader}"), Some(2_000));
    run_for(phase()).await;
    t.throttle(&format!("meta{leader}"), None);
    run_for(Duration::from_secs(1)).await;
    let r = wl.finish();
    check("five voters: minority partition, then a slow leader link", &t, &r);
    let during: usize =
        r.all_calls.iter().filter(|c| c.error.is_none() && c.start > cut_at && c.end < slow_at).count();
    assert!(during > 10, "service did not go on while two of five voters were cut off: {during}");
    assert_eq!(after, leader, "the healed minority took leadership away\n{}", t.logs());
    assert!(acked_after(&r, slow_at) > 10, "service did not go on over the slow link");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_leader_cut_off_from_the_other_voters() {
    let name = "metadata_leader_cut_off_from_the_other_voters";
    if !fuse_available(name) {
        return;
    }
    let _g = SERIAL.lock().await;
    let t = Topology::start(config(2, 2)).await;
    if !network_available(name, &t) {
        return;
    }
    let wl = Workload::start(&t, 3, 2, 64 << 10);
    run_for(phase()).await;
    let old = t.leader().await;
    // Gateways and cache nodes still reach the old leader; only the voters lose it.
    let others: Vec<String> = (1..=3).filter(|id| *id != old).map(|id| format!("meta{id}")).collect();
    t.partition(&[format!("meta{old}")], &others);
    let cut_at = t.events.now();
    let t0 = Instant::now();
    let new = t.wait_new_leader(old, Duration::from_secs(20)).await;
    t.events.log(&format!("node {new} leads, {:?} after the cut", t0.elapsed()));
    run_for(phase() * 2).await;
    t.heal();
    t.wait_caught_up(old, Duration::from_secs(30)).await;
    run_for(phase()).await;
    let r = wl.finish();
    check("metadata leader cut off from the other voters", &t, &r);
    let after = acked_after(&r, cut_at + Duration::from_secs(5));
    assert!(after > 10, "service did not go on while the old leader was cut off: {after}");
}
