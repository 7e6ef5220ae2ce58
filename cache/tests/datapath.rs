//! The data path end to end, in one process: a metadata voter, cache nodes and an S3 protocol
//! server. Writes through the data client, tiering, reads from every tier, store outages,
//! garbage collection, corruption and re-replication.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{CacheProc, TestCluster, content, wait_until};
use elea_cache::client::BlockClients;
use elea_cache::proto::BlockRef;
use elea_common::ROOT_INO;
use elea_metadata::MetaApi as _;
use elea_store::BlockKey;

const MIB: usize = 1 << 20;

async fn staged_count(c: &TestCluster, vol: u64) -> usize {
    c.meta.staged_blocks().await.unwrap().iter().filter(|b| b.vol == vol).count()
}

async fn tier_now(c: &TestCluster, vol: u64) {
    let p = BlockClients::default();
    for n in &c.nodes {
        p.tier(&n.addr, vol).await.unwrap();
    }
}

async fn drop_caches(c: &TestCluster) {
    let p = BlockClients::default();
    for n in &c.nodes {
        p.drop_cache(&n.addr).await.unwrap();
    }
}

async fn staged_anywhere(c: &TestCluster, r: BlockRef) -> usize {
    let p = BlockClients::default();
    let mut n = 0;
    for node in &c.nodes {
        if p.has(&node.addr, r).await.unwrap().staged {
            n += 1;
        }
    }
    n
}

fn staged_path(n: &CacheProc, slice: u64, index: u32) -> std::path::PathBuf {
    n.dir.join("staging").join(format!("{:02x}", slice & 0xff)).join(format!("{slice:016x}_{index}"))
}

/// Metadata lists exactly `want` live holders of the block, and each of them really holds
/// it: its block service says so and its staged file carries exactly `bytes`.
async fn really_held(c: &TestCluster, vol: u64, slice: u64, index: u32, bytes: &[u8], want: usize) -> bool {
    let Some(b) =
        c.meta.staged_blocks().await.unwrap().into_iter().find(|b| (b.slice, b.index) == (slice, index))
    else {
        return false;
    };
    let nodes = c.meta.cache_nodes().await.unwrap();
    if b.nodes.len() != want || !b.nodes.iter().all(|id| nodes.iter().any(|n| n.id == *id && n.alive)) {
        return false;
    }
    let p = BlockClients::default();
    for id in &b.nodes {
        let Some(n) = c.nodes.iter().find(|n| n.id == *id) else { return false };
        let has = p.has(&n.addr, BlockRef { vol, slice, index }).await.is_ok_and(|h| h.staged);
        // A large block is a file of its own; a small one a record of the staging log, read
        // through the node (it serves a staged copy from disk, verified).
        let on_disk = match std::fs::read(staged_path(n, slice, index)) {
            Ok(f) => f.len() > data_offset(bytes) && f[data_offset(bytes)..] == *bytes,
            Err(_) => p
                .get(&n.addr, ranged(BlockRef { vol, slice, index }, bytes.len() as u32, None))
                .await
                .is_ok_and(|d| d == bytes),
        };
        if !has || !on_disk {
            return false;
        }
    }
    true
}

/// Bytes of block `index` of a file written in one piece from offset 0 (under one chunk).
fn block_of(data: &[u8], index: u32) -> &[u8] {
    let start = index as usize * BLOCK;
    &data[start..(start + BLOCK).min(data.len())]
}

const BLOCK: usize = 4 * MIB;
/// Where a staged file of `bytes` keeps them.
fn data_offset(bytes: &[u8]) -> usize {
    elea_cache::node::staging::data_offset(bytes.len() as u32)
}

/// `n` cache nodes, reached through gRPC or, `in_process`, directly by this process's clients.
async fn cluster_of(n: u64, in_process: bool) -> TestCluster {
    let mut c = TestCluster::start(0).await;
    for id in 1..=n {
        c.start_node_with(id, |cfg| cfg.in_process = in_process).await;
    }
    c.wait_alive(n as usize).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_tier_and_read_from_every_tier() {
    write_tier_and_read(false).await;
}

/// The same through the in-process path `elea up` uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_tier_and_read_from_every_tier_in_process() {
    write_tier_and_read(true).await;
}

async fn write_tier_and_read(in_process: bool) {
    let c = cluster_of(2, in_process).await;
    let vol = c.volume("t", 2, 3_600_000).await;
    let f = c.meta.create(vol, ROOT_INO, b"f", 0o644).await.unwrap();
    let d = c.data();
    let a = content(1, 10 * MIB);
    d.write_extents(vol, f.ino, &[(0, Bytes::from(a.clone()))]).await.unwrap();
    // A write across the first chunk boundary (two slices).
    let b_off = (64 * MIB - MIB) as u64;
    let b = content(2, 3 * MIB);
    let attr =
        d.write_extents(vol, f.ino, &[(b_off, Bytes::from(b.clone()))]).await.unwrap().expect("committed");
    assert_eq!(attr.size, b_off + b.len() as u64);
    // Every block is staged on both nodes.
    let blocks = c.meta.staged_blocks().await.unwrap();
    assert_eq!(blocks.len(), 5, "{blocks:?}");
    for bl in &blocks {
        assert_eq!(bl.nodes.len(), 2);
        assert_eq!(staged_anywhere(&c, BlockRef { vol, slice: bl.slice, index: bl.index }).await, 2);
    }
    // Hot reads, unaligned, and the hole between the writes reads as zeros.
    assert_eq!(d.read_file(vol, f.ino, 0, 10 * MIB).await.unwrap(), a);
    assert_eq!(d.read_file(vol, f.ino, 12345, 5 * MIB).await.unwrap(), a[12345..12345 + 5 * MIB]);
    assert_eq!(d.read_file(vol, f.ino, 20 * MIB as u64, 100).await.unwrap(), vec![0; 100]);
    assert_eq!(d.read_file(vol, f.ino, b_off, 4 * MIB).await.unwrap(), b);
    // Tier on demand: objects land in the store, metadata records them, staging empties.
    tier_now(&c, vol).await;
    wait_until(Duration::from_secs(20), "everything tiered", || async { staged_count(&c, vol).await == 0 })
        .await;
    let keys = c.stored_keys(vol).await;
    assert_eq!(keys.len(), 5, "{keys:?}");
    for bl in &blocks {
        let r = BlockRef { vol, slice: bl.slice, index: bl.index };
        wait_until(Duration::from_secs(10), "staged copies freed", || async {
            staged_anywhere(&c, r).await == 0
        })
        .await;
    }
    // Cold: no staging, no read cache, a new client.
    drop_caches(&c).await;
    let cold = c.data();
    assert_eq!(cold.read_file(vol, f.ino, 0, 10 * MIB).await.unwrap(), a);
    assert_eq!(cold.read_file(vol, f.ino, b_off, 3 * MIB).await.unwrap(), b);
}

/// A sequential reader gets the file fetched ahead of it by file offset: past the end of the
/// slice it reads and into the next chunk's slices, nearest first; a reader that jumps
/// around gets nothing fetched ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_ahead_crosses_slices_and_chunks() {
    let c = cluster_of(1, false).await;
    let vol = c.volume("ra", 1, 3_600_000).await;
    let f = c.meta.create(vol, ROOT_INO, b"f", 0o644).await.unwrap();
    let d = c.data();
    // Three slices: [56, 60) MiB, and [60, 64) plus [64, 69) MiB from one write across the
    // chunk boundary.
    let start = 56 * MIB;
    let a = content(7, 4 * MIB);
    let b = content(8, 9 * MIB);
    d.write_extents(vol, f.ino, &[(start as u64, Bytes::from(a.clone()))]).await.unwrap();
    d.write_extents(vol, f.ino, &[((start + 4 * MIB) as u64, Bytes::from(b.clone()))]).await.unwrap();
    let (first, next) = (slice_ids(&c, vol, f.ino, 0).await, slice_ids(&c, vol, f.ino, 1).await);
    assert_eq!((first.len(), next.len()), (2, 1), "{first:?} {next:?}");
    let (sa, sb, sc) = (first[0], first[1], next[0]);

    // Random reads: nothing is due.
    let cold = c.data();
    for off in [start + 3 * MIB, start + MIB, start + 2 * MIB + 5] {
        let got = cold.read_file(vol, f.ino, off as u64, 4096).await.unwrap();
        assert_eq!(got, a[off - start..off - start + 4096]);
    }
    assert_eq!(cold.readahead_due(vol, f.ino, (start + 13 * MIB) as u64), None);
    assert!(!cold.holds(sb, 0) && !cold.holds(sc, 0));

    // Two reads in a row from the start of the first slice: sequential. Everything up to the
    // end of the file (within the window) is fetched, across both boundaries.
    let r = c.data();
    for i in 0..2 {
        let off = start + i * 128 * 1024;
        assert_eq!(
            r.read_file(vol, f.ino, off as u64, 128 * 1024).await.unwrap(),
            a[off - start..off - start + 128 * 1024]
        );
    }
    // The window reached the end of the file at once: nothing more is due.
    assert_eq!(r.readahead_due(vol, f.ino, (start + 13 * MIB) as u64), None);
    wait_until(Duration::from_secs(10), "read-ahead into the next slice and chunk", || async {
        r.holds(sa, 0) && r.holds(sb, 0) && r.holds(sc, 0) && r.holds(sc, 1)
    })
    .await;
    assert_eq!(r.read_file(vol, f.ino, (start + 4 * MIB) as u64, 9 * MIB).await.unwrap(), b);
}

async fn slice_ids(c: &TestCluster, vol: u64, ino: u64, chunk: u64) -> Vec<u64> {
    match c.meta.query(elea_fsm::Query::ReadChunk { vol, ino, chunk }).await.unwrap() {
        elea_fsm::Reply::Slices(s) => s.iter().map(|s| s.id).collect(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_outage_keeps_writes_acknowledged_and_the_backlog_drains() {
    let mut c = TestCluster::start(2).await;
    // Tiered as soon as staged (tier-after 0).
    let vol = c.volume("o", 2, 0).await;
    c.stop_s3().await;
    // The store's port answers nothing but shows every request that reaches it.
    let dead = c.dead_store().await;
    let d = c.data();
    let mut files = Vec::new();
    for i in 0..3u64 {
        let f = c.meta.create(vol, ROOT_INO, format!("f{i}").as_bytes(), 0o644).await.unwrap();
        let data = content(10 + i, 5 * MIB + 7);
        d.write_extents(vol, f.ino, &[(0, Bytes::from(data.clone()))]).await.unwrap();
        files.push((f.ino, data));
    }
    // Every write was acknowledged: six blocks staged.
    let staged: Vec<_> = c.meta.staged_blocks().await.unwrap().into_iter().filter(|b| b.vol == vol).collect();
    assert_eq!(staged.len(), 6, "{staged:?}");
    // The tiering worker tries to upload every one of them, and each upload fails. One upload
    // sends at most 1 + retries requests; more PUTs of a block than that mean a later round
    // tried it again, so the round before ended and left it staged.
    let tag = c.key_tag(vol).await;
    assert_ne!(tag, 0, "a new cluster's volumes carry its identity in their keys");
    let keys: Vec<String> = staged
        .iter()
        .map(|b| BlockKey { cluster: tag, vol, slice: b.slice, index: b.index, len: b.len }.path())
        .collect();
    let per_upload = 1 + c.store_cfg().retries;
    let tried_again = |reqs: &[String]| {
        keys.iter().all(|k| {
            reqs.iter().filter(|r| r.starts_with("PUT ") && r.contains(k.as_str())).count() > per_upload
        })
    };
    wait_until(Duration::from_secs(30), "two tiering rounds to try every staged block", || async {
        tried_again(&dead.requests())
    })
    .await;
    // Failed uploads record nothing: every block stays staged, on both copies.
    assert_eq!(staged_count(&c, vol).await, 6, "a block was recorded tiered though its upload failed");
    for (ino, data) in &files {
        assert_eq!(&d.read_file(vol, *ino, 0, data.len()).await.unwrap(), data);
    }
    for b in &staged {
        let r = BlockRef { vol, slice: b.slice, index: b.index };
        assert_eq!(staged_anywhere(&c, r).await, 2, "block {}/{} lost a staged copy", b.slice, b.index);
    }
    println!("{} requests reached the store while it was down", dead.requests().len());
    assert_eq!(staged_count(&c, vol).await, 6, "a block was recorded tiered though its upload failed");
    dead.stop().await;
    c.start_s3().await;
    wait_until(Duration::from_secs(60), "backlog drained", || async { staged_count(&c, vol).await == 0 })
        .await;
    drop_caches(&c).await;
    let cold = c.data();
    for (ino, data) in &files {
        assert_eq!(&cold.read_file(vol, *ino, 0, data.len()).await.unwrap(), data);
    }
    assert_eq!(c.stored_keys(vol).await.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_collection_removes_deleted_data_only() {
    let c = TestCluster::start(2).await;
    let vol = c.volume("g", 2, 0).await;
    let d = c.data();
    let fa = c.meta.create(vol, ROOT_INO, b"a", 0o644).await.unwrap();
    let fb = c.meta.create(vol, ROOT_INO, b"b", 0o644).await.unwrap();
    let a = content(3, 6 * MIB);
    let b = content(4, MIB);
    d.write_extents(vol, fa.ino, &[(0, Bytes::from(a))]).await.unwrap();
    d.write_extents(vol, fb.ino, &[(0, Bytes::from(b.clone()))]).await.unwrap();
    wait_until(Duration::from_secs(20), "tiered", || async { staged_count(&c, vol).await == 0 }).await;
    assert_eq!(c.stored_keys(vol).await.len(), 3);
    // Unlink a; overwrite b (its first slice becomes garbage too).
    c.meta.unlink(vol, ROOT_INO, b"a").await.unwrap();
    let b2 = content(5, MIB);
    d.write_extents(vol, fb.ino, &[(0, Bytes::from(b2.clone()))]).await.unwrap();
    wait_until(Duration::from_secs(20), "garbage collected", || async {
        let (pending, _) = c.meta.pending_deletes(0, 100).await.unwrap();
        pending.is_empty() && staged_count(&c, vol).await == 0
    })
    .await;
    wait_until(Duration::from_secs(20), "only live objects remain", || async {
        c.stored_keys(vol).await.len() == 1
    })
    .await;
    drop_caches(&c).await;
    assert_eq!(c.data().read_file(vol, fb.ino, 0, MIB).await.unwrap(), b2);
    // Staged-only data (never tiered) is collected too.
    let vol2 = c.volume("g2", 2, 3_600_000).await;
    let fc = c.meta.create(vol2, ROOT_INO, b"c", 0o644).await.unwrap();
    d.write_extents(vol2, fc.ino, &[(0, Bytes::from(content(6, MIB)))]).await.unwrap();
    let bl = c.meta.staged_blocks().await.unwrap().into_iter().find(|b| b.vol == vol2).unwrap();
    let r = BlockRef { vol: vol2, slice: bl.slice, index: bl.index };
    assert_eq!(staged_anywhere(&c, r).await, 2);
    c.meta.unlink(vol2, ROOT_INO, b"c").await.unwrap();
    wait_until(Duration::from_secs(20), "staged copies collected", || async {
        staged_anywhere(&c, r).await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corruption_is_detected_never_returned() {
    // (A corrupt staged copy: see `a_corrupt_staged_copy_is_replaced`.)
    let c = TestCluster::start(2).await;
    // A corrupt object: reading it fails, it never returns wrong bytes.
    let vol2 = c.volume("c2", 2, 0).await;
    let g = c.meta.create(vol2, ROOT_INO, b"g", 0o644).await.unwrap();
    c.data().write_extents(vol2, g.ino, &[(0, Bytes::from(content(8, MIB)))]).await.unwrap();
    wait_until(Duration::from_secs(20), "tiered", || async { staged_count(&c, vol2).await == 0 }).await;
    let key: BlockKey = c.stored_keys(vol2).await[0];
    let mut obj = c.store().get_raw(&key.path()).await.unwrap().to_vec();
    let n = obj.len();
    obj[n - 1] ^= 1;
    c.store().put_raw(&key.path(), Bytes::from(obj)).await.unwrap();
    drop_caches(&c).await;
    let r = c.data().read_file(vol2, g.ino, 0, MIB).await;
    assert!(r.is_err(), "a corrupt object must not be returned as data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_node_blocks_are_re_replicated() {
    let mut c = TestCluster::start(3).await;
    let vol = c.volume("r", 2, 3_600_000).await;
    let f = c.meta.create(vol, ROOT_INO, b"f", 0o644).await.unwrap();
    let data = content(9, 24 * MIB);
    c.data().write_extents(vol, f.ino, &[(0, Bytes::from(data.clone()))]).await.unwrap();
    let blocks = c.meta.staged_blocks().await.unwrap();
    // Kill the node holding the most copies.
    let victim = (1..=3u64).max_by_key(|id| blocks.iter().filter(|b| b.nodes.contains(id)).count()).unwrap();
    c.kill_node(victim);
    wait_until(Duration::from_secs(30), "the killed node declared dead", || async {
        c.meta.cache_nodes().await.unwrap().iter().any(|n| n.id == victim && !n.alive)
    })
    .await;
    wait_until(Duration::from_secs(40), "two live copies of every block", || async {
        let nodes = c.meta.cache_nodes().await.unwrap();
        let alive = |id: &u64| nodes.iter().any(|n| n.id == *id && n.alive);
        let b = c.meta.staged_blocks().await.unwrap();
        b.iter().filter(|b| b.vol == vol).all(|b| b.nodes.iter().filter(|n| alive(n)).count() >= 2)
    })
    .await;
    for b in c.meta.staged_blocks().await.unwrap().iter().filter(|b| b.vol == vol) {
        assert!(!b.nodes.contains(&victim));
        assert_eq!(staged_anywhere(&c, BlockRef { vol, slice: b.slice, index: b.index }).await, 2);
    }
    assert_eq!(c.data().read_file(vol, f.ino, 0, data.len()).await.unwrap(), data);
    // The node comes back with an empty disk: it registers as a new incarnation and takes
    // new blocks.
    std::fs::remove_dir_all(c.tmp.path().join(format!("cache{victim}"))).unwrap();
    c.start_node(victim).await;
    c.wait_alive(3).await;
    let g = c.meta.create(vol, ROOT_INO, b"g", 0o644).await.unwrap();
    c.data().write_extents(vol, g.ino, &[(0, Bytes::from(content(10, 8 * MIB)))]).await.unwrap();
    assert_eq!(c.data().read_file(vol, g.ino, 0, 8 * MIB).await.unwrap(), content(10, 8 * MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_clear_errors_and_the_node_keeps_serving() {
    bad_requests(false).await;
}

/// In process, every error is the one the same request gets over gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_in_process_get_the_same_errors() {
    bad_requests(true).await;
}

async fn bad_requests(in_process: bool) {
    use elea_cache::CacheError;
    use elea_cache::proto::block_client::BlockClient;
    use elea_cache::proto::{GetRequest, PutChunk, PutHeader};

    let c = cluster_of(1, in_process).await;
    let addr = c.nodes[0].addr.clone();
    let p = BlockClients::default();
    let r = BlockRef { vol: 1, slice: 77, index: 0 };
    let data = Bytes::from(content(11, 1000));
    let crc = crc32c::crc32c(&data);
    // Bytes that do not match their checksum.
    assert!(matches!(p.put(&addr, r, data.clone(), crc ^ 1).await, Err(CacheError::Peer { .. })));
    // Bad references and lengths.
    let bad = BlockRef { vol: 1, slice: 77, index: 99 };
    assert!(matches!(p.put(&addr, bad, data.clone(), crc).await, Err(CacheError::BadRequest(_))));
    let get = |block, len| GetRequest {
        block: Some(block),
        len,
        tiered_stores: vec![],
        peers: vec![],
        cache: false,
        range: None,
    };
    assert!(matches!(p.get(&addr, get(bad, 1000)).await, Err(CacheError::BadRequest(_))));
    assert!(matches!(p.get(&addr, get(r, 0)).await, Err(CacheError::BadRequest(_))));
    assert!(matches!(p.get(&addr, get(r, 1000)).await, Err(CacheError::NotFound(_))));
    // In process, none of that went through a connection.
    assert_eq!(p.connections(), usize::from(!in_process));
    // Raw streams: no header, more bytes than announced, an oversized block.
    let mut raw = BlockClient::connect(format!("http://{addr}")).await.unwrap();
    let no_header = vec![PutChunk { header: None, data: data.clone() }];
    let e = raw.put(tokio_stream::iter(no_header)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let h = |len| Some(PutHeader { block: Some(r), len, crc32c: crc });
    let too_many = vec![PutChunk { header: h(10), data: data.clone() }];
    assert_eq!(raw.put(tokio_stream::iter(too_many)).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let huge = vec![PutChunk { header: h(5 << 20), data: data.clone() }];
    assert_eq!(raw.put(tokio_stream::iter(huge)).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    // Still serving: a good put and get.
    p.put(&addr, r, data.clone(), crc).await.unwrap();
    assert_eq!(p.get(&addr, get(r, 1000)).await.unwrap(), data.to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn staging_above_its_high_watermark_tiers_early() {
    let mut c = TestCluster::start(0).await;
    // One node with 24 MiB of staging: 20 MiB staged is above the 80 % watermark, so blocks
    // are tiered long before their hour is up.
    c.start_node_with(1, |cfg| cfg.staging_size = 24 << 20).await;
    c.wait_alive(1).await;
    let vol = c.volume("w", 1, 3_600_000).await;
    let f = c.meta.create(vol, ROOT_INO, b"f", 0o644).await.unwrap();
    let d = c.data();
    let a = content(12, 20 * MIB);
    d.write_extents(vol, f.ino, &[(0, Bytes::from(a.clone()))]).await.unwrap();
    wait_until(Duration::from_secs(20), "staging drained below the watermark", || async {
        staged_count(&c, vol).await <= 4
    })
    .await;
    assert!(!c.stored_keys(vol).await.is_empty());
    // More than the whole staging capacity can still be written, slice by slice: writers
    // wait for tiering to make room.
    let b = content(13, 40 * MIB);
    for i in 0..10 {
        let part = Bytes::from(b[i * 4 * MIB..(i + 1) * 4 * MIB].to_vec());
        d.write_extents(vol, f.ino, &[((20 * MIB + i * 4 * MIB) as u64, part)]).await.unwrap();
    }
    drop_caches(&c).await;
    let all = c.data().read_file(vol, f.ino, 0, 60 * MIB).await.unwrap();
    assert!(all[..20 * MIB] == a[..] && all[20 * MIB..] == b[..]);
}

/// Nodes whose periodic reconcile (and scrub) never runs again after start: only the
/// immediate report of a discarded copy can heal.
async fn cluster_without_scrub(n: u64) -> TestCluster {
    let mut c = TestCluster::start(0).await;
    for id in 1..=n {
        c.start_node_with(id, |cfg| cfg.reconcile_interval = Duration::from_secs(3600)).await;
    }
    c.wait_alive(n as usize).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_staged_copy_deleted_behind_the_nodes_back_is_restored() {
    let c = TestCluster::start(2).await;
    let vol = c.volume("l", 2, 3_600_000).await;
    let f = c.meta.create(vol, ROOT_INO, b"f", 0o644).await.unwrap();
    let data = content(14, 6 * MIB);
    c.data().write_extents(vol, f.ino, &[(0, Bytes::from(data.clone()))]).await.unwrap();
    let bl =
        c.meta.staged_blocks().await.unwrap().into_iter().find(|b| b.vol == vol && b.index == 1).unwrap();
    let bytes = block_of(&data, 1);
    assert!(really_held(&c, vol, bl.slice, 1, bytes, 2).await);
    // The node keeps running and still believes it has the copy; metadata still lists it.
    let victim = c.nodes.iter().find(|n| n.id == bl.nodes[0]).unwrap();
    std::fs::remove_file(staged_path(victim, bl.slice, 1)).unwrap();
    assert!(!really_held(&c, vol, bl.slice, 1, bytes, 2).await);
    // The scrub notices, the node leaves the holder list, repair copies the block back.
    wait_until(Duration::from_secs(30), "two real copies again", || async {
        really_held(&c, vol, bl.slice, 1, bytes, 2).await
    })
    .await;
    assert!(really_held(&c, vol, bl.slice, 0, block_of(&data, 0), 2).await);
    drop_caches(&c).await;
    assert_eq!(c.data().read_file(vol, f.ino, 0, data.len()).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_restarted_without_its_staged_files_gets_them_back() {
    // Its incarnation survives, so the registry does not know the copies are gone.
    let mut c = TestCluster::start(2).await;
    let vol = c.volume("w", 2, 3_600_000).await;
    let f = c.meta.create(vol, ROOT_INO, b"f", 0o644).await.unwrap();
    let data = content(15, 9 * MIB);
    c.data().write_extents(vol, f.ino, &[(0, Bytes::from(data.clone()))]).await.unwrap();
    let slice = c.meta.staged_blocks().await.unwrap().into_iter().find(|b| b.vol == vol).unwrap().slice;
    c.stop_node(2).await;
    std::fs::remove_dir_all(c.tmp.path().join("cache2").join("staging")).unwrap();
    c.start_node(2).await;
    c.wait_alive(2).await;
    wait_until(Duration::from_secs(30), "two real copies of every block", || async {
        let mut ok = true;
        for i in 0..3 {
            ok &= really_held(&c, vol, slice, i, block_of(&data, i), 2).await;
        }
        ok
    })
    .await;
    c.stop_node(1).await;
    drop_caches(&c).await;
    assert_eq!(c.data().read_file(vol, f.ino, 0, data.len()).await.unwrap(), data, "node 2 alone serves it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_staged_copy_is_replaced() {
    let c = cluster_without_scrub(2).await;
    let vol = c.volume("c", 2, 3_600_000).await;
    let f = c.meta.create(vol, ROOT_INO, b"f", 0o644).await.unwrap();
    let data = content(7, 2 * MIB);
    c.data().write_extents(vol, f.ino, &[(0, Bytes::from(data.clone()))]).await.unwrap();
    let bl = c.meta.staged_blocks().await.unwrap().into_iter().find(|b| b.vol == vol).unwrap();
    // The first holder is the one a reader asks first.
    let first = c.nodes.iter().find(|n| n.id == bl.nodes[0]).unwrap();
    let path = staged_path(first, bl.slice, bl.index);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    // Served from the other copy; the corrupt one is discarded and reported at once.
    assert_eq!(c.data().read_file(vol, f.ino, 0, data.len()).await.unwrap(), data);
    wait_until(Duration::from_secs(30), "two real copies again", || async {
        really_held(&c, vol, bl.slice, bl.index, &data, 2).await
    })
    .await;
    drop_caches(&c).await;
    assert_eq!(c.data().read_file(vol, f.ino, 0, data.len()).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_torn_copy_found_at_restart_is_replaced() {
    let mut c = cluster_without_scrub(2).await;
    let vol = c.volume("t", 2, 3_600_000).await;
    let f = c.meta.create(vol, ROOT_INO, b"f", 0o644).await.unwrap();
    let data = content(16, 3 * MIB);
    c.data().write_extents(vol, f.ino, &[(0, Bytes::from(data.clone()))]).await.unwrap();
    let bl = c.meta.staged_blocks().await.unwrap().into_iter().find(|b| b.vol == vol).unwrap();
    let victim = bl.nodes[1];
    c.stop_node(victim).await;
    let dir = c.tmp.path().join(format!("cache{victim}"));
    let path =
        dir.join("staging").join(format!("{:02x}", bl.slice & 0xff)).join(format!("{:016x}_0", bl.slice));
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 1000).unwrap();
    c.start_node_with(victim, |cfg| cfg.reconcile_interval = Duration::from_secs(3600)).await;
    c.wait_alive(2).await;
    wait_until(Duration::from_secs(30), "two real copies again", || async {
        really_held(&c, vol, bl.slice, 0, &data, 2).await
    })
    .await;
    drop_caches(&c).await;
    assert_eq!(c.data().read_file(vol, f.ino, 0, data.len()).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_collection_retries_after_a_store_outage() {
    let mut c = TestCluster::start(2).await;
    let vol = c.volume("b", 2, 0).await;
    let f = c.meta.create(vol, ROOT_INO, b"f", 0o644).await.unwrap();
    c.data().write_extents(vol, f.ino, &[(0, Bytes::from(content(17, 5 * MIB)))]).await.unwrap();
    wait_until(Duration::from_secs(20), "tiered", || async { staged_count(&c, vol).await == 0 }).await;
    assert_eq!(c.stored_keys(vol).await.len(), 2);
    // Deletes fail while the store is down: the slice waits, with growing delays.
    c.stop_s3().await;
    c.meta.unlink(vol, ROOT_INO, b"f").await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (pending, _) = c.meta.pending_deletes(0, 100).await.unwrap();
    assert_eq!(pending.len(), 1, "nothing is forgotten while its objects cannot be deleted");
    c.start_s3().await;
    wait_until(Duration::from_secs(30), "collected once the store is back", || async {
        c.meta.pending_deletes(0, 100).await.unwrap().0.is_empty()
    })
    .await;
    assert!(c.stored_keys(vol).await.is_empty());
}

/// A small deterministic generator for random offsets.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn ranged(block: BlockRef, len: u32, range: Option<(u32, u32)>) -> elea_cache::proto::GetRequest {
    elea_cache::proto::GetRequest {
        block: Some(block),
        len,
        tiered_stores: vec![],
        peers: vec![],
        cache: false,
        range: range.map(|(offset, len)| elea_cache::proto::ByteRange { offset, len }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn range_gets_from_staging_the_read_cache_and_the_store() {
    use elea_cache::CacheError;

    let c = TestCluster::start(1).await;
    let addr = c.nodes[0].addr.clone();
    let vol = c.volume("g", 1, 3_600_000).await;
    let f = c.meta.create(vol, ROOT_INO, b"f", 0o644).await.unwrap();
    // A full block and a short one.
    let data = content(21, 6 * MIB + 12345);
    c.data().write_extents(vol, f.ino, &[(0, Bytes::from(data.clone()))]).await.unwrap();
    let blocks = c.meta.staged_blocks().await.unwrap();
    assert_eq!(blocks.len(), 2);
    let slice = blocks[0].slice;
    let p = BlockClients::default();
    let seg = elea_cache::node::staging::SEGMENT as u32;
    let check = |index: u32, len: u32| {
        let p = p.clone();
        let addr = addr.clone();
        let want = block_of(&data, index).to_vec();
        let cases = [
            (0, 4096),
            (seg - 100, 200),
            (3 * seg + 1, 2 * seg + 5),
            (len - 4096, 4096),
            (len - 1, 1),
            (0, len),
        ];
        async move {
            for (off, n) in cases {
                let r = ranged(BlockRef { vol, slice, index }, len, Some((off, n)));
                let got = p.get(&addr, r).await.unwrap();
                assert!(got == want[off as usize..(off + n) as usize], "block {index} range {off}+{n}");
            }
            let whole = p.get(&addr, ranged(BlockRef { vol, slice, index }, len, None)).await.unwrap();
            assert!(whole == want, "block {index} whole");
        }
    };
    let (full, short) = (BLOCK as u32, (data.len() - BLOCK) as u32);
    check(0, full).await;
    check(1, short).await;
    // Empty, past the end, huge: clear errors, and the node keeps serving.
    let r = BlockRef { vol, slice, index: 1 };
    for (off, n) in [(0, 0), (short, 1), (short - 1, 2), (1, u32::MAX), (u32::MAX, u32::MAX)] {
        let e = p.get(&addr, ranged(r, short, Some((off, n)))).await;
        assert!(matches!(e, Err(CacheError::BadRequest(_))), "range {off}+{n}: {e:?}");
    }
    check(1, short).await;
    // Tiered and freed: a range asked with the store index is served from the whole
    // object, which the node keeps in its read cache; then ranges come from that cache.
    tier_now(&c, vol).await;
    wait_until(Duration::from_secs(20), "everything tiered", || async { staged_count(&c, vol).await == 0 })
        .await;
    wait_until(Duration::from_secs(10), "staged copies freed", || async {
        staged_anywhere(&c, BlockRef { vol, slice, index: 0 }).await == 0
            && staged_anywhere(&c, BlockRef { vol, slice, index: 1 }).await == 0
    })
    .await;
    drop_caches(&c).await;
    for index in [0u32, 1] {
        let len = if index == 0 { full } else { short };
        let b = BlockRef { vol, slice, index };
        assert!(matches!(p.get(&addr, ranged(b, len, Some((0, 10)))).await, Err(CacheError::NotFound(_))));
        let mut r = ranged(b, len, Some((len - 5000, 5000)));
        r.tiered_stores = vec![0];
        r.cache = true;
        let got = p.get(&addr, r).await.unwrap();
        assert!(got == block_of(&data, index)[len as usize - 5000..], "tiered block {index}");
        assert!(p.has(&addr, b).await.unwrap().cached);
    }
    check(0, full).await;
    check(1, short).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_small_reads_match_the_written_bytes_on_every_tier() {
    let c = TestCluster::start(2).await;
    let vol = c.volume("r", 2, 3_600_000).await;
    let f = c.meta.create(vol, ROOT_INO, b"f", 0o644).await.unwrap();
    let d = c.data();
    // Two chunks' worth of slices: 70 MiB written in two pieces, plus an overwrite in the
    // middle so reads cross slice boundaries.
    let mut reference = content(31, 70 * MIB);
    d.write_extents(vol, f.ino, &[(0, Bytes::from(reference[..40 * MIB].to_vec()))]).await.unwrap();
    d.write_extents(vol, f.ino, &[(40 * MIB as u64, Bytes::from(reference[40 * MIB..].to_vec()))])
        .await
        .unwrap();
    let patch = content(32, 3 * MIB + 777);
    let at = 10 * MIB + 4321;
    d.write_extents(vol, f.ino, &[(at as u64, Bytes::from(patch.clone()))]).await.unwrap();
    reference[at..at + patch.len()].copy_from_slice(&patch);
    let size = reference.len() as u64;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let read_some = |d: elea_cache::DataClient, seed: u64, rounds: usize| {
        let reference = &reference;
        let mut rng = Rng(seed);
        async move {
            for i in 0..rounds {
                // Mostly 4 KiB reads, some larger and unaligned, some at the end of the file.
                let len = match i % 5 {
                    0 => 1 + rng.below(300_000) as usize,
                    1 => 4096 + rng.below(9) as usize,
                    _ => 4096,
                };
                let off = match i % 7 {
                    0 => size - rng.below(10_000).min(size),
                    _ => rng.below(size),
                };
                let got = d.read_file(vol, f.ino, off, len).await.unwrap();
                let end = (off + len as u64).min(size) as usize;
                assert!(got == reference[off as usize..end], "read {len} at {off}: wrong bytes");
            }
        }
    };
    read_some(d.clone(), rng.below(u64::MAX) | 1, 300).await;
    // A sequential pass with the same client mixes whole blocks into its cache.
    let mut off = 0u64;
    while off < size {
        let got = d.read_file(vol, f.ino, off, 1 << 20).await.unwrap();
        assert!(got == reference[off as usize..(off as usize + got.len())], "sequential at {off}");
        off += got.len() as u64;
    }
    // Tiered, staged copies freed, node caches dropped. `d` still remembers the slices as
    // staged on nodes that no longer hold them, and a fresh client starts cold.
    tier_now(&c, vol).await;
    wait_until(Duration::from_secs(30), "everything tiered", || async { staged_count(&c, vol).await == 0 })
        .await;
    wait_until(Duration::from_secs(20), "staged copies freed", || async {
        let p = BlockClients::default();
        for n in &c.nodes {
            for k in c.stored_keys(vol).await {
                let r = BlockRef { vol, slice: k.slice, index: k.index };
                if p.has(&n.addr, r).await.unwrap().staged {
                    return false;
                }
            }
        }
        true
    })
    .await;
    drop_caches(&c).await;
    d.clear_cache();
    read_some(d.clone(), rng.below(u64::MAX) | 1, 300).await;
    read_some(c.data(), rng.below(u64::MAX) | 1, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_segment_is_read_from_the_other_copy() {
    let c = cluster_without_scrub(2).await;
    let vol = c.volume("s", 2, 3_600_000).await;
    let f = c.meta.create(vol, ROOT_INO, b"f", 0o644).await.unwrap();
    let data = content(41, 4 * MIB);
    c.data().write_extents(vol, f.ino, &[(0, Bytes::from(data.clone()))]).await.unwrap();
    let bl = c.meta.staged_blocks().await.unwrap().into_iter().find(|b| b.vol == vol).unwrap();
    // Damage one byte of the copy a reader asks first.
    let first = c.nodes.iter().find(|n| n.id == bl.nodes[0]).unwrap();
    let path = staged_path(first, bl.slice, bl.index);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = 3 * MIB + 5000;
    bytes[data_offset(&data) + at] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let d = c.data();
    // Small reads elsewhere come from the damaged copy's good segments.
    for off in [0usize, MIB, 2 * MIB + 100] {
        assert_eq!(d.read_file(vol, f.ino, off as u64, 4096).await.unwrap(), data[off..off + 4096]);
    }
    let p = BlockClients::default();
    let r = BlockRef { vol, slice: bl.slice, index: bl.index };
    assert!(p.has(&first.addr, r).await.unwrap().staged);
    // The damaged range is served from the other copy, and the damaged one is dropped.
    assert_eq!(d.read_file(vol, f.ino, (at - 100) as u64, 4096).await.unwrap(), data[at - 100..at + 3996]);
    assert!(!p.has(&first.addr, r).await.unwrap().staged);
    wait_until(Duration::from_secs(30), "two real copies again", || async {
        really_held(&c, vol, bl.slice, bl.index, &data, 2).await
    })
    .await;
}

/// Every background worker reports its state over the block service (what `elea status`
/// shows): each runs rounds, and tiering against a store that is down counts failed rounds
/// with the error, then recovers when the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_report_their_state() {
    let mut c = TestCluster::start(1).await;
    let vol = c.volume("w", 1, 0).await;
    let addr = c.nodes[0].addr.clone();
    let peers = elea_cache::client::BlockClients::default();
    let names = |w: &[elea_cache::proto::WorkerState]| {
        let mut n: Vec<String> = w.iter().map(|w| w.name.clone()).collect();
        n.sort();
        n
    };
    wait_until(Duration::from_secs(20), "every worker ran a round", || async {
        let w = peers.workers(&addr).await.unwrap();
        names(&w) == ["gc", "lost-copies", "migrate", "reconcile", "repair", "spill", "stores", "tiering"]
            && w.iter().all(|w| w.rounds > 0)
    })
    .await;
    c.stop_s3().await;
    let f = c.meta.create(vol, ROOT_INO, b"f", 0o644).await.unwrap();
    c.data().write_extents(vol, f.ino, &[(0, Bytes::from(content(3, MIB)))]).await.unwrap();
    wait_until(Duration::from_secs(30), "tiering reports its failures", || async {
        let w = peers.workers(&addr).await.unwrap();
        w.iter().any(|w| w.name == "tiering" && w.consecutive_errors > 0 && !w.last_error.is_empty())
    })
    .await;
    wait_until(Duration::from_secs(30), "the store prober names the failing store", || async {
        let w = peers.workers(&addr).await.unwrap();
        w.iter().any(|w| {
            w.name == "stores" && w.consecutive_errors > 0 && w.last_error.contains("volume \"w\" store")
        })
    })
    .await;
    c.start_s3().await;
    wait_until(Duration::from_secs(60), "tiering recovers", || async {
        let w = peers.workers(&addr).await.unwrap();
        w.iter().any(|w| w.name == "tiering" && w.consecutive_errors == 0)
            && w.iter().any(|w| w.name == "stores" && w.consecutive_errors == 0)
            && staged_count(&c, vol).await == 0
    })
    .await;
}

/// A small write travels in its metadata commit: nothing is staged before it commits, it
/// reads back from metadata, and the spill worker later stages it on the volume's replica
/// count of nodes like any other slice. Once metadata holds all the inline bytes it may,
/// writes are staged before their commit instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_writes_commit_inline_and_spill_to_their_replicas() {
    let mut c = TestCluster::start(0).await;
    // No spill yet: the nodes run one round at their start and then wait an hour.
    for id in 1..=2 {
        c.start_node_with(id, |cfg| cfg.spill_interval = Duration::from_secs(3600)).await;
    }
    c.wait_alive(2).await;
    let vol = c.volume("s", 2, 3_600_000).await;
    let d = c.data();
    let f = c.meta.create(vol, ROOT_INO, b"small", 0o644).await.unwrap();
    let small = content(1, 5000);
    d.write_extents(vol, f.ino, &[(100, Bytes::from(small.clone()))]).await.unwrap();
    let (inline, more) = c.meta.inline_slices(0, 100).await.unwrap();
    assert!(!more);
    assert_eq!(inline.len(), 1);
    let slice = inline[0].slice;
    assert_eq!(inline[0].data, small);
    assert_eq!(
        staged_anywhere(&c, BlockRef { vol, slice, index: 0 }).await,
        0,
        "not staged before the spill"
    );
    // Another client (nothing cached) reads it from metadata.
    let fresh = c.data();
    let want = [vec![0u8; 100], small.clone()].concat();
    assert_eq!(fresh.read_file(vol, f.ino, 0, 10_000).await.unwrap(), want);

    // Fill metadata's room for inline bytes: the next write is staged first, as any other.
    let max = elea_fsm::limits::INLINE_MAX as usize;
    let filler = c.meta.create(vol, ROOT_INO, b"filler", 0o644).await.unwrap();
    let n = (elea_fsm::limits::INLINE_TOTAL_MAX / max as u64) as usize;
    for i in 0..n {
        let b = Bytes::from(content(i as u64, max));
        d.write_extents(vol, filler.ino, &[((i * max) as u64, b)]).await.unwrap();
    }
    // One read of all of it: a thousand inline slices, their bytes asked for in pages.
    let all = c.data().read_file(vol, filler.ino, 0, n * max).await.unwrap();
    let want_all: Vec<u8> = (0..n).flat_map(|i| content(i as u64, max)).collect();
    assert!(all == want_all, "the filler file reads back other bytes");
    let g = c.meta.create(vol, ROOT_INO, b"staged", 0o644).await.unwrap();
    // Metadata holds the first file's bytes and all fillers but the last: no room for this.
    let late = content(9, max);
    d.write_extents(vol, g.ino, &[(0, Bytes::from(late.clone()))]).await.unwrap();
    let late_slice = c.meta.read_chunk(vol, g.ino, 0).await.unwrap()[0].id;
    assert!(really_held(&c, vol, late_slice, 0, &late, 2).await, "staged on two nodes before its commit");
    assert_eq!(fresh.read_file(vol, g.ino, 0, max).await.unwrap(), late);

    // Nodes that spill: every inline slice leaves metadata for two staged copies.
    for id in 1..=2 {
        c.kill_node(id);
        c.start_node_with(id, |cfg| cfg.spill_interval = Duration::from_millis(100)).await;
    }
    wait_until(Duration::from_secs(60), "every inline slice spilled", || async {
        c.meta.inline_slices(0, 100).await.is_ok_and(|(s, _)| s.is_empty())
    })
    .await;
    assert!(really_held(&c, vol, slice, 0, &small, 2).await);
    let fresh = c.data();
    assert_eq!(fresh.read_file(vol, f.ino, 0, 10_000).await.unwrap(), want);
    let last = n - 1;
    let got = fresh.read_file(vol, filler.ino, (last * max) as u64, max).await.unwrap();
    assert_eq!(got, content(last as u64, max));
    // And there is room for inline writes again.
    let h = c.meta.create(vol, ROOT_INO, b"again", 0o644).await.unwrap();
    d.write_extents(vol, h.ino, &[(0, Bytes::from_static(b"again"))]).await.unwrap();
    let s = c.meta.read_chunk(vol, h.ino, 0).await.unwrap()[0].id;
    let data = c.meta.slice_data(&[s]).await.unwrap();
    assert!(data[0].inline.is_some() || really_held(&c, vol, s, 0, b"again", 2).await);
}
