//! `elea warmup`: fetch files into a site's cache nodes before they are read there.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use elea_cache::client::BlockClients;
use elea_cache::placement::rank;
use elea_cache::proto::{BlockRef, GetRequest};
use elea_common::ids::{BLOCK_SIZE, CHUNK_SIZE};
use elea_common::{Ino, ROOT_INO, SliceId};
use elea_fsm::{Attr, FileType, VolumeInfo, mode};
use elea_metadata::MetaApi as _;
use elea_metadata::client::MetaClient;
use futures::StreamExt as _;
use serde_json::json;

use crate::cli::{WarmupArgs, client};
use crate::progress::{Progress, bytes, duration};

/// Blocks per warm call.
const BATCH: usize = 16;
/// Warm calls in flight per cache node.
const CALLS_PER_NODE: usize = 2;
/// Chunk lists read at once.
const READS: usize = 16;

/// A path of a volume: `VOLUME:/dir/file`, or a path under an Elea mount on this host.
fn split_path(arg: &str) -> anyhow::Result<(String, String)> {
    if let Some((vol, path)) = arg.split_once(':')
        && !vol.is_empty()
        && !vol.contains('/')
    {
        return Ok((vol.to_string(), path.to_string()));
    }
    let abs =
        std::fs::canonicalize(arg).with_context(|| format!("{arg}: not VOLUME:/PATH nor a path here"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut best: Option<(PathBuf, String)> = None;
    for line in mounts.lines() {
        // id parent dev root MOUNTPOINT options... - FSTYPE SOURCE superoptions
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else { continue };
        let (Some(point), Some(fstype), Some(source)) =
            (fields.get(4), fields.get(dash + 1), fields.get(dash + 2))
        else {
            continue;
        };
        let Some(name) = source.strip_prefix("elea:") else { continue };
        if !fstype.starts_with("fuse") {
            continue;
        }
        let point = PathBuf::from(point.replace("\\040", " "));
        if abs.starts_with(&point)
            && best.as_ref().is_none_or(|(b, _)| point.as_os_str().len() > b.as_os_str().len())
        {
            best = Some((point, name.to_string()));
        }
    }
    let Some((point, vol)) = best else { bail!("{arg} is not under an Elea mount (name it VOLUME:/PATH)") };
    let rel = abs.strip_prefix(&point).unwrap_or(Path::new(""));
    Ok((vol, format!("/{}", rel.display())))
}

/// The attributes of `path` in the volume.
async fn resolve(c: &MetaClient, vol: &VolumeInfo, path: &str) -> anyhow::Result<Attr> {
    let mut attr = c.getattr(vol.id, ROOT_INO).await?;
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        attr = c
            .lookup(vol.id, attr.ino, part.as_bytes())
            .await
            .with_context(|| format!("{}:{path}: no {part:?}", vol.name))?;
    }
    Ok(attr)
}

/// A regular file: (inode, size).
type FileRef = (Ino, u64);

/// Regular files under `attr` (itself when it is one).
async fn files(
    c: &MetaClient,
    vol: &VolumeInfo,
    attr: Attr,
    recursive: bool,
    path: &str,
) -> anyhow::Result<Vec<FileRef>> {
    match attr.mode & mode::S_IFMT {
        mode::S_IFREG => return Ok(vec![(attr.ino, attr.size)]),
        mode::S_IFDIR if recursive => {}
        mode::S_IFDIR => bail!("{}:{path} is a directory (add --recursive)", vol.name),
        _ => return Ok(vec![]),
    }
    let mut out = Vec::new();
    let mut dirs = vec![attr.ino];
    while let Some(dir) = dirs.pop() {
        let mut cookie = 0;
        loop {
            let (entries, eof) = c.readdir(vol.id, dir, cookie, 1024, true).await?;
            for e in &entries {
                cookie = e.cookie;
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                match (e.kind, &e.attr) {
                    (FileType::Directory, _) => dirs.push(e.ino),
                    (FileType::Regular, Some(a)) => out.push((e.ino, a.size)),
                    (FileType::Regular, None) => out.push((e.ino, c.getattr(vol.id, e.ino).await?.size)),
                    _ => {}
                }
            }
            if eof || entries.is_empty() {
                break;
            }
        }
    }
    Ok(out)
}

/// The blocks the file's chunks reference: (slice, block index).
async fn blocks_of_file(
    c: &MetaClient,
    vol: u64,
    ino: Ino,
    size: u64,
) -> anyhow::Result<BTreeSet<(SliceId, u32)>> {
    let mut out = BTreeSet::new();
    for chunk in 0..size.div_ceil(CHUNK_SIZE) {
        for s in c.read_chunk(vol, ino, chunk).await? {
            if s.id == 0 || s.len == 0 {
                continue;
            }
            let first = u64::from(s.slice_offset) / BLOCK_SIZE;
            let last = (u64::from(s.slice_offset) + u64::from(s.len) - 1) / BLOCK_SIZE;
            out.extend((first..=last).map(|i| (s.id, i as u32)));
        }
    }
    Ok(out)
}

/// Tries a warm call again while its node cannot be reached (restarting, say), for up to
/// about ten seconds.
async fn warm_call(
    peers: &BlockClients,
    addr: &str,
    reqs: Vec<GetRequest>,
    wait: bool,
) -> Result<Vec<elea_cache::proto::WarmResult>, elea_cache::CacheError> {
    let mut delay = std::time::Duration::from_millis(100);
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match peers.warm(addr, reqs.clone(), wait).await {
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tracing::debug!(addr, error = %e, "warming: the cache node did not answer; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

pub(crate) async fn warmup(a: WarmupArgs) -> anyhow::Result<()> {
    let root = client(&a.meta)?;
    let peers: BlockClients = a.meta.tls.block_clients()?;
    let started = Instant::now();
    // Files by volume.
    let mut by_vol: Vec<(MetaClient, VolumeInfo, Vec<FileRef>)> = Vec::new();
    for arg in &a.paths {
        let (name, path) = split_path(arg)?;
        let (c, vol) = root.volume_client(&name).await.with_context(|| format!("volume {name:?}"))?;
        let attr = resolve(&c, &vol, &path).await?;
        let found = files(&c, &vol, attr, a.recursive, &path).await?;
        match by_vol.iter_mut().find(|(_, v, _)| v.id == vol.id) {
            Some((_, _, f)) => f.extend(found),
            None => by_vol.push((c, vol, found)),
        }
    }
    let nodes = root.cache_nodes().await.context("listing the cache nodes")?;
    let sites: BTreeSet<&str> = nodes.iter().map(|n| n.site.as_str()).collect();
    let site = match (&a.site, sites.len()) {
        (Some(s), _) => s.clone(),
        (None, 1) => sites.first().map(|s| s.to_string()).unwrap_or_default(),
        (None, _) => bail!("the cluster's cache nodes are in several sites: name the one to warm (--site)"),
    };
    let here: Vec<u64> = nodes.iter().filter(|n| n.alive && n.site == site).map(|n| n.id).collect();
    if here.is_empty() {
        bail!("site {site:?} has no live cache node");
    }
    let addr = |id: u64| nodes.iter().find(|n| n.id == id).map(|n| n.addr.clone());
    // Every block to fetch, as a request to its node.
    let mut calls: HashMap<String, Vec<GetRequest>> = HashMap::new();
    let (mut file_count, mut total) = (0usize, 0u64);
    for (c, vol, files) in &by_vol {
        file_count += files.len();
        let sets: Vec<BTreeSet<(SliceId, u32)>> = futures::stream::iter(files.iter().copied())
            .map(|(ino, size)| blocks_of_file(c, vol.id, ino, size))
            .buffer_unordered(READS)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let wanted: BTreeSet<(SliceId, u32)> = sets.into_iter().flatten().collect();
        let ids: Vec<SliceId> = wanted.iter().map(|(s, _)| *s).collect::<BTreeSet<_>>().into_iter().collect();
        let locs: HashMap<SliceId, elea_fsm::SliceLoc> =
            c.slice_locs(&ids).await?.into_iter().filter_map(|(id, l)| l.map(|l| (id, l))).collect();
        for (slice, index) in wanted {
            let Some(b) = locs.get(&slice).and_then(|l| l.blocks.get(index as usize).map(|b| (l, b))) else {
                continue;
            };
            let (l, b) = b;
            if b.nodes.is_empty() && b.tiered.is_empty() {
                // Its bytes are kept in metadata: nothing to fetch.
                continue;
            }
            let len = elea_fsm::block_len(l.len, index);
            total += u64::from(len);
            let Some(to) = rank(slice, index, &here).first().and_then(|id| addr(*id)) else { continue };
            calls.entry(to).or_default().push(GetRequest {
                block: Some(BlockRef { vol: vol.id, slice, index }),
                len,
                tiered_stores: b.tiered.iter().map(u32::from).collect(),
                peers: b.nodes.iter().filter_map(|id| addr(*id)).collect(),
                cache: true,
                range: None,
            });
        }
    }
    let blocks: usize = calls.values().map(Vec::len).sum();
    let batches: Vec<(String, Vec<GetRequest>)> = calls
        .iter()
        .flat_map(|(addr, reqs)| reqs.chunks(BATCH).map(move |c| (addr.clone(), c.to_vec())))
        .collect();
    if !a.wait {
        let sent: Vec<anyhow::Result<()>> = futures::stream::iter(batches)
            .map(|(addr, reqs)| {
                let peers = &peers;
                async move {
                    warm_call(peers, &addr, reqs, false)
                        .await
                        .with_context(|| format!("cache node {addr}"))?;
                    Ok(())
                }
            })
            .buffer_unordered(CALLS_PER_NODE * calls.len().max(1))
            .collect()
            .await;
        sent.into_iter().collect::<anyhow::Result<()>>()?;
        if a.json {
            println!(
                "{}",
                json!({ "site": site, "files": file_count, "blocks": blocks, "bytes": total, "queued": true })
            );
        } else {
            println!(
                "site {site:?}: {blocks} blocks ({}) of {file_count} files are being fetched by {} cache nodes",
                bytes(total),
                calls.len()
            );
        }
        return Ok(());
    }
    let mut progress = Progress::new(&format!("warmup {site}"), a.json);
    let (mut done, mut present, mut fetched) = (0u64, 0usize, 0usize);
    let mut failures: Vec<String> = Vec::new();
    let mut stream = futures::stream::iter(batches)
        .map(|(addr, reqs)| {
            let peers = &peers;
            async move {
                let r = warm_call(peers, &addr, reqs.clone(), true).await;
                (addr, reqs, r)
            }
        })
        .buffer_unordered(CALLS_PER_NODE * calls.len().max(1));
    while let Some((addr, reqs, r)) = stream.next().await {
        match r {
            Ok(results) => {
                for (req, res) in reqs.iter().zip(results) {
                    done += u64::from(req.len);
                    match (res.ok, res.present) {
                        (true, true) => present += 1,
                        (true, false) => fetched += 1,
                        _ => {
                            let b = req.block.unwrap_or_default();
                            failures.push(format!("block {}/{} at {addr}: {}", b.slice, b.index, res.error));
                        }
                    }
                }
            }
            Err(e) => {
                done += reqs.iter().map(|r| u64::from(r.len)).sum::<u64>();
                failures.extend(reqs.iter().map(|r| {
                    let b = r.block.unwrap_or_default();
                    format!("block {}/{} at {addr}: {e}", b.slice, b.index)
                }));
            }
        }
        progress.update(done, total, &format!("{} blocks, {} failed", present + fetched, failures.len()));
    }
    progress.finish();
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            json!({
                "site": site, "files": file_count, "blocks": blocks, "bytes": total,
                "fetched": fetched, "present": present, "failed": failures.len(),
                "failures": failures.iter().take(20).collect::<Vec<_>>(), "seconds": secs,
            })
        );
    } else {
        println!(
            "site {site:?}: {blocks} blocks ({}) of {file_count} files warm in {}: {fetched} fetched, {present} \
             there already, {} failed",
            bytes(total),
            duration(started.elapsed()),
            failures.len()
        );
        for f in failures.iter().take(20) {
            println!("  {f}");
        }
    }
    if !failures.is_empty() {
        bail!("{} blocks could not be warmed", failures.len());
    }
    Ok(())
}
