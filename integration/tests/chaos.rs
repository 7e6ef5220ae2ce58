//! Fault scenarios on a whole deployment of real processes (three metadata voters, cache
//! nodes, two FUSE gateways), under a checked workload: nothing acknowledged is lost, no read
//! returns bytes that were never written or older than an acknowledged write, and service
//! goes on. Each prints its figures (operations acknowledged, failed calls and how long they
//! waited, the longest call, time until full redundancy). `CHAOS_SECS` stretches the load
//! phases (default 3 s each) for the long versions run by hand.
//!
//! Every scenario needs root and /dev/fuse; the two that cut and slow links also need network
//! namespaces (root, `ip`, `tc`, `nsenter`). Without them a scenario prints SKIPPED and
//! passes having run nothing, unless `ELEA_REQUIRE_FUSE=1` / `ELEA_REQUIRE_NETNS=1` make that
//! a failure; scripts/test.sh (and so CI) sets both.

use std::time::{Duration, Instant};

use elea_integration::appends::FsyncAppends;
use elea_integration::chaos::{Report, StoreKind, Topology, TopologyConfig, Workload};
use elea_integration::{fuse_available, network_available};

/// Scenarios share two cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the object store is down: 5 s, or `CHAOS_SECS` when set (the long version).
fn outage() -> Duration {
    let secs = std::env::var("CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    Duration::from_secs(secs)
}

fn phase() -> Duration {
    let secs = std::env::var("CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    Duration::from_secs(secs)
}

async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
}

fn check(name: &str, t: &Topology, r: &Report) {
    r.assert_clean(name, || t.logs());
}

fn config(caches: u64, replicas: u8) -> TopologyConfig {
    TopologyConfig { metas: 3, caches, mounts: 2, replicas, ..TopologyConfig::default() }
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
    let after = r.acked_after(killed_at);
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
    let after = r.acked_after(paused_at + Duration::from_secs(5));
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
    let back = t.wait_redundancy_of_short(2, Duration::from_secs(180)).await;
    t.events
        .log(&format!("every block that lost a copy has 2 again, {back:?} after the node registered again"));
    run_for(phase()).await;
    let r = wl.finish();
    check("cache node kill -9, rejoin empty", &t, &r);
    assert!(r.acked_after(killed_at) > 10, "service did not go on after the cache node died");
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

/// Many small appends, each fsynced, on several files through two mounts; kill -9 of every
/// process while they run. After the restart every file holds exactly its acknowledged
/// records (and at most the one in flight), read through both mounts; then the writers go on
/// from there and the same holds after a second kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_everything_during_fsync_appends() {
    if !fuse_available("kill9_of_everything_during_fsync_appends") {
        return;
    }
    let _g = SERIAL.lock().await;
    let mut t = Topology::start(config(2, 2)).await;
    let mut wl = FsyncAppends::start(&t.mount_points(), 3);
    let mut total = 0;
    for round in 1..=2 {
        run_for(phase()).await;
        let before = wl.acked();
        t.kill9_everything();
        run_for(Duration::from_secs(1)).await;
        wl.stop();
        t.restart_everything().await;
        let c = wl.check();
        println!(
            "fsync appends, kill -9 {round}: {} records acknowledged ({} before the kill signal), \
             records per file {:?}, {} in-flight records present",
            c.acked, before, c.records, c.in_flight_present
        );
        assert!(c.violations.is_empty(), "kill -9 {round}:\n{}\n{}", c.violations.join("\n"), t.logs());
        assert!(
            c.acked > total + 30,
            "kill -9 {round}: too few appends were acknowledged ({})",
            c.acked - total
        );
        total = c.records.iter().sum();
        wl.resume(&t.mount_points());
    }
    wl.stop();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_voters_minority_partition_then_a_slow_link() {
    let name = "five_voters_minority_partition_then_a_slow_link";
    if !fuse_available(name) || !network_available(name) {
        return;
    }
    let _g = SERIAL.lock().await;
    let mut cfg = config(2, 2);
    cfg.metas = 5;
    let t = Topology::start(cfg).await;
    assert!(t.has_network(), "{name}: started without network namespaces");
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
    assert!(r.acked_after(slow_at) > 10, "service did not go on over the slow link");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_leader_cut_off_from_the_other_voters() {
    let name = "metadata_leader_cut_off_from_the_other_voters";
    if !fuse_available(name) || !network_available(name) {
        return;
    }
    let _g = SERIAL.lock().await;
    let t = Topology::start(config(2, 2)).await;
    assert!(t.has_network(), "{name}: started without network namespaces");
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
    let after = r.acked_after(cut_at + Duration::from_secs(5));
    assert!(after > 10, "service did not go on while the old leader was cut off: {after}");
}

/// Acknowledged and failed calls that both started and ended within `[from, to]`.
fn calls_within(r: &Report, from: Duration, to: Duration) -> (usize, usize) {
    let within: Vec<_> = r.all_calls.iter().filter(|c| c.start >= from && c.end <= to).collect();
    (within.iter().filter(|c| c.error.is_none()).count(), within.iter().filter(|c| c.error.is_some()).count())
}

/// The object store down (kill -9) or hung (SIGSTOP) under the write load, then back: writes
/// go on into staging, and the backlog is tiered once the store is back.
async fn object_store_fault(name: &str, hang: bool) {
    let cfg = TopologyConfig { store: StoreKind::S3, tier_after: Duration::from_secs(1), ..config(2, 2) };
    let mut t = Topology::start(cfg).await;
    let wl = Workload::start(&t, 3, 2, 64 << 10);
    run_for(phase()).await;
    // Tiering works before the fault.
    let deadline = Instant::now() + Duration::from_secs(20);
    while t.store_objects() == 0 {
        assert!(Instant::now() < deadline, "{name}: nothing was tiered before the fault\n{}", t.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let objects_before = t.store_objects();
    if hang {
        t.store_hang(true);
    } else {
        t.store_outage(true);
    }
    let down_at = t.events.now();
    run_for(outage()).await;
    let backlog: Vec<(u64, u32)> = t.staged_blocks().await.iter().map(|b| (b.slice, b.index)).collect();
    let up_at = t.events.now();
    if hang {
        t.store_hang(false);
    } else {
        t.store_outage(false);
    }
    let drained = t.wait_tiered(&backlog, Duration::from_secs(120)).await;
    t.events.log(&format!(
        "{} blocks staged at the end of the fault, all tiered {drained:?} after the store came back",
        backlog.len()
    ));
    run_for(phase()).await;
    let r = wl.finish();
    check(name, &t, &r);
    // Nothing is written any more: every staged block gets tiered.
    let rest: Vec<(u64, u32)> = t.staged_blocks().await.iter().map(|b| (b.slice, b.index)).collect();
    let all_tiered = t.wait_tiered(&rest, Duration::from_secs(60)).await;
    let (acked, failed) = calls_within(&r, down_at, up_at);
    println!(
        "{name}: store down {:?}; {acked} calls acknowledged and {failed} failed while it was down; \
         {} blocks staged at its end, tiered {drained:?} after it was back; objects {objects_before} \
         before, {} at the end ({} staged blocks left at the end, tiered within {all_tiered:?})",
        up_at - down_at,
        backlog.len(),
        t.store_objects(),
        rest.len(),
    );
    assert!(acked > 10, "{name}: service did not go on during the fault: {acked} calls acknowledged");
    assert_eq!(failed, 0, "{name}: application calls failed during the fault");
    assert!(!backlog.is_empty(), "{name}: nothing was staged during the fault");
    assert!(drained.is_some(), "{name}: the backlog was not tiered after the store came back\n{}", t.logs());
    assert!(all_tiered.is_some(), "{name}: staged blocks left untiered\n{}", t.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_outage_under_write_load() {
    if !fuse_available("object_store_outage_under_write_load") {
        return;
    }
    let _g = SERIAL.lock().await;
    object_store_fault("object store kill -9, then back", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_hung_under_write_load() {
    if !fuse_available("object_store_hung_under_write_load") {
        return;
    }
    let _g = SERIAL.lock().await;
    object_store_fault("object store SIGSTOP, then SIGCONT", true).await;
}

fn wall_ms(t: elea_common::Timespec) -> u64 {
    u64::try_from(t.sec).unwrap_or(0) * 1000 + u64::from(t.nsec) / 1_000_000
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_node_staging_disk_full() {
    // The small disk is a tmpfs: root, as for the mounts.
    if !fuse_available("cache_node_staging_disk_full") {
        return;
    }
    let _g = SERIAL.lock().await;
    let cfg = TopologyConfig { small_disks: vec![(1, 256 << 20)], ..config(3, 2) };
    let mut t = Topology::start(cfg).await;
    let wl = Workload::start(&t, 3, 2, 256 << 10);
    run_for(phase()).await;
    t.fill_disk(1);
    let full_at = t.events.now();
    run_for(phase().max(Duration::from_secs(5))).await;
    // The full node keeps running and serving what it holds.
    let (tried, read, err) = t.read_staged_from(1, 32).await;
    t.events.log(&format!("cache node 1 (disk full) served {read} of {tried} staged blocks read from it"));
    let running = t.cache(1).is_running();
    t.free_disk(1);
    let freed_at = t.events.now();
    let freed_ms = now_ms();
    // It takes writes again: blocks committed after the disk was freed list it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let back = loop {
        let fresh = t
            .staged_blocks()
            .await
            .iter()
            .filter(|b| b.nodes.contains(&1) && wall_ms(b.created) > freed_ms)
            .count();
        if fresh > 0 {
            break Some(t.events.now() - freed_at);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    t.events.log(&format!("cache node 1 holds new blocks again, {back:?} after the disk was freed"));
    run_for(phase()).await;
    let r = wl.finish();
    check("cache node staging disk full", &t, &r);
    let redundancy = t.wait_redundancy(2, Duration::from_secs(60)).await;
    let (acked, failed) = calls_within(&r, full_at, freed_at);
    let enospc = t.cache(1).log_count("No space left on device");
    println!(
        "cache node staging disk full: {acked} calls acknowledged and {failed} failed while the disk was \
         full; the full node served {read}/{tried} staged blocks; its log names the full disk {enospc} \
         times; it took writes again {back:?} after the disk was freed; every block had 2 copies \
         {redundancy:?} after the workload stopped"
    );
    assert!(running, "cache node 1 died when its disk filled up\n{}", t.logs());
    assert!(tried > 0 && read == tried, "the full node did not serve its blocks: {err:?}\n{}", t.logs());
    assert!(acked > 10, "service did not go on while the disk was full: {acked}");
    assert!(
        r.errors.is_empty(),
        "application calls failed: {:?}",
        r.errors.iter().take(5).collect::<Vec<_>>()
    );
    assert!(enospc > 0, "cache node 1 did not log the full disk\n{}", t.cache(1).log_tail());
    assert!(back.is_some(), "cache node 1 took no writes after its disk was freed\n{}", t.logs());
    assert!(redundancy.is_some(), "redundancy was not restored\n{}", t.logs());
}
