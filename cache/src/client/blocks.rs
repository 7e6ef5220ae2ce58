//! Client of the block service: connections to cache nodes, chunked put and get with
//! end-to-end checksums. A node of this process is called directly, through the
//! [`BlockService`](crate::wire::BlockService) it registered (`crate::local`), never over
//! loopback.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use elea_common::ids::BLOCK_SIZE;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

use crate::error::{CacheError, from_status};
use crate::proto::block_client::BlockClient;
use crate::proto::{BlockRef, GetRequest, PutChunk, PutHeader};
use crate::wire::{BLOCK_WINDOW, CHUNK, FRAME, MAX_MESSAGE};

/// Timeouts of block calls.
#[derive(Debug, Clone)]
pub struct BlockClientConfig {
    pub connect_timeout: Duration,
    /// Per call. A put waits on the far side while its staging is full, so this is long.
    pub put_timeout: Duration,
    pub get_timeout: Duration,
    /// While a call is in flight, an HTTP/2 ping every `keepalive_interval`; one not answered
    /// within `keepalive_timeout` ends the connection and fails the call, so a node that
    /// vanished without a reset (its site cut off) costs seconds, not the call's timeout.
    /// Generous: a ping waits behind the block data queued on a slow WAN link.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Mutual TLS to the cache nodes (plaintext when none).
    pub tls: Option<elea_auth::tls::Connector>,
}

impl Default for BlockClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            put_timeout: Duration::from_secs(120),
            get_timeout: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// A pool of connections to cache nodes, by address.
#[derive(Clone)]
pub struct BlockClients {
    cfg: BlockClientConfig,
    conns: Arc<Mutex<HashMap<String, BlockClient<Channel>>>>,
}

impl Default for BlockClients {
    fn default() -> Self {
        Self::new(BlockClientConfig::default())
    }
}

impl BlockClients {
    pub fn new(cfg: BlockClientConfig) -> Self {
        Self { cfg, conns: Arc::default() }
    }

    /// The settings the pool was made with.
    pub fn config(&self) -> &BlockClientConfig {
        &self.cfg
    }

    /// Connections the pool has opened (nodes of this process reached directly need none).
    pub fn connections(&self) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn conn(&self, addr: &str) -> Result<BlockClient<Channel>, CacheError> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = conns.get(addr) {
            return Ok(c.clone());
        }
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| CacheError::BadRequest(format!("bad cache node address {addr:?}: {e}")))?
            .connect_timeout(self.cfg.connect_timeout)
            .http2_keep_alive_interval(self.cfg.keepalive_interval)
            .keep_alive_timeout(self.cfg.keepalive_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(BLOCK_WINDOW)
            .initial_connection_window_size(4 * BLOCK_WINDOW)
            .max_frame_size(FRAME);
        let channel = match &self.cfg.tls {
            Some(tls) => ep.connect_with_connector_lazy(tls.clone()),
            None => ep.connect_lazy(),
        };
        let c = BlockClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        conns.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Stores a block on `addr`; succeeds once it is durable there.
    pub async fn put(&self, addr: &str, block: BlockRef, data: Bytes, crc: u32) -> Result<(), CacheError> {
        let len = u32::try_from(data.len())
            .ok()
            .filter(|l| u64::from(*l) <= BLOCK_SIZE)
            .ok_or_else(|| CacheError::BadRequest(format!("block of {} bytes is too large", data.len())))?;
        if let Some(node) = crate::local::node_at(addr) {
            let put = node.put(block, data, crc);
            return match tokio::time::timeout(self.cfg.put_timeout, put).await {
                Ok(r) => r.map_err(|e| as_remote(addr, e)),
                Err(_) => Err(timed_out(addr)),
            };
        }
        let mut c = self.conn(addr)?;
        let mut msgs = Vec::with_capacity(data.len() / CHUNK + 1);
        let mut header = Some(PutHeader { block: Some(block), len, crc32c: crc });
        let mut off = 0;
        loop {
            let end = (off + CHUNK).min(data.len());
            msgs.push(PutChunk { header: header.take(), data: data.slice(off..end) });
            off = end;
            if off >= data.len() {
                break;
            }
        }
        let mut req = tonic::Request::new(tokio_stream::iter(msgs));
        req.set_timeout(self.cfg.put_timeout);
        c.put(req).await.map_err(|s| from_status(addr, &s))?;
        Ok(())
    }

    /// Reads a block, or the range of it `req` names, from `addr`, checking the length and
    /// checksum of what arrives. A node that predates ranges sends the whole block: it is
    /// checked and the range cut from it.
    pub async fn get(&self, addr: &str, req: GetRequest) -> Result<Vec<u8>, CacheError> {
        if let Some(node) = crate::local::node_at(addr) {
            // The node verified every byte against its checksums on the way out.
            let want = req.range.map_or(req.len, |r| r.len);
            let d = match tokio::time::timeout(self.cfg.get_timeout, node.get(&req)).await {
                Ok(r) => r.map_err(|e| as_remote(addr, e))?,
                Err(_) => return Err(timed_out(addr)),
            };
            if d.len() != want as usize {
                return Err(CacheError::Checksum(format!(
                    "{addr} returned {} bytes where {want} were asked for",
                    d.len()
                )));
            }
            return Ok(d);
        }
        let mut c = self.conn(addr)?;
        let block_len = req.len;
        let range = req.range.map(|r| (r.offset, r.len));
        let want = range.map_or(block_len, |r| r.1);
        let mut r = tonic::Request::new(req);
        r.set_timeout(self.cfg.get_timeout);
        let mut stream = c.get(r).await.map_err(|s| from_status(addr, &s))?.into_inner();
        let mut out = Vec::new();
        let mut head: Option<(u32, u32)> = None;
        while let Some(m) = stream.next().await {
            let m = m.map_err(|s| from_status(addr, &s))?;
            if head.is_none() {
                head = Some((m.len, m.crc32c));
                out.reserve(m.len.min(block_len) as usize);
            }
            out.extend_from_slice(&m.data);
            if out.len() > block_len as usize {
                break;
            }
        }
        let (len, crc) = head.ok_or_else(|| CacheError::Peer {
            addr: addr.to_string(),
            msg: "empty block stream".into(),
            retryable: true,
        })?;
        let whole_for_range = range.is_some() && len == block_len && len != want;
        let expect = if whole_for_range { block_len } else { want };
        if len != expect || out.len() != expect as usize {
            return Err(CacheError::Checksum(format!(
                "{addr} sent {} bytes (announced {len}) where {want} were asked for",
                out.len()
            )));
        }
        if crc32c::crc32c(&out) != crc {
            return Err(CacheError::Checksum(format!("block from {addr} does not match its checksum")));
        }
        if let (true, Some((off, n))) = (whole_for_range, range) {
            let (off, n) = (off as usize, n as usize);
            if off + n > out.len() {
                return Err(CacheError::BadRequest(format!("range {off}+{n} is outside the block")));
            }
            return Ok(out[off..off + n].to_vec());
        }
        Ok(out)
    }

    pub async fn has(&self, addr: &str, block: BlockRef) -> Result<crate::proto::HasReply, CacheError> {
        let mut c = self.conn(addr)?;
        let mut r = tonic::Request::new(block);
        r.set_timeout(self.cfg.get_timeout);
        Ok(c.has(r).await.map_err(|s| from_status(addr, &s))?.into_inner())
    }

    pub async fn delete(&self, addr: &str, block: BlockRef) -> Result<(), CacheError> {
        let mut c = self.conn(addr)?;
        let mut r = tonic::Request::new(block);
        r.set_timeout(self.cfg.get_timeout);
        c.delete(r).await.map_err(|s| from_status(addr, &s))?;
        Ok(())
    }

    /// Asks a node to tier the volume's staged blocks it is primary for now.
    pub async fn tier(&self, addr: &str, vol: u64) -> Result<(), CacheError> {
        let mut c = self.conn(addr)?;
        c.tier(crate::proto::TierRequest { vol }).await.map_err(|s| from_status(addr, &s))?;
        Ok(())
    }

    /// Has a node fetch these blocks into its read cache (`Warm`); with `wait`, the outcome of
    /// each, else nothing (the node fetches in the background).
    pub async fn warm(
        &self,
        addr: &str,
        blocks: Vec<crate::proto::GetRequest>,
        wait: bool,
    ) -> Result<Vec<crate::proto::WarmResult>, CacheError> {
        let mut c = self.conn(addr)?;
        let r =
            c.warm(crate::proto::WarmRequest { blocks, wait }).await.map_err(|s| from_status(addr, &s))?;
        Ok(r.into_inner().results)
    }

    /// The state of a node's background workers.
    pub async fn workers(&self, addr: &str) -> Result<Vec<crate::proto::WorkerState>, CacheError> {
        let mut c = self.conn(addr)?;
        let r = c.workers(crate::proto::WorkersRequest {}).await.map_err(|s| from_status(addr, &s))?;
        Ok(r.into_inner().workers)
    }

    /// What a node fetched from other sites, by site: (site, bytes, blocks).
    pub async fn from_sites(&self, addr: &str) -> Result<Vec<(String, u64, u64)>, CacheError> {
        let mut c = self.conn(addr)?;
        let r = c.workers(crate::proto::WorkersRequest {}).await.map_err(|s| from_status(addr, &s))?;
        Ok(r.into_inner().from_sites.into_iter().map(|s| (s.site, s.bytes, s.blocks)).collect())
    }

    /// Empties a node's read cache.
    pub async fn drop_cache(&self, addr: &str) -> Result<(), CacheError> {
        let mut c = self.conn(addr)?;
        c.drop_cache(crate::proto::DropCacheRequest {}).await.map_err(|s| from_status(addr, &s))?;
        Ok(())
    }
}

/// An error of a node in this process, classified as the same error from across the wire
/// would be (so retries and failover behave alike).
fn as_remote(addr: &str, e: CacheError) -> CacheError {
    from_status(addr, &tonic::Status::from(e))
}

fn timed_out(addr: &str) -> CacheError {
    CacheError::Peer { addr: addr.to_string(), msg: "timed out".into(), retryable: true }
}
