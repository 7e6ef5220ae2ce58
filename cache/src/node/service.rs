//! The block service over gRPC: [`Svc`] adapts tonic's `Block` trait to a [`Node`]. It
//! reassembles and checks a streamed put, streams a get back in [`CHUNK`]s with the crc32c
//! of what it sends, and answers the small calls (has, delete, tier, drop-cache, workers).
//!
//! With TLS every call is checked against the caller's certificate: a gateway may put, get
//! and look up blocks of the volumes its certificate names, and nothing else; cache nodes,
//! metadata nodes and operators may call everything. A refusal is `PERMISSION_DENIED` with
//! the reason, logged and counted.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use elea_auth::{Identity, Role};

use bytes::{Bytes, BytesMut};
use elea_common::ids::BLOCK_SIZE;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use crate::node::staging::now_ms;
use crate::node::{Node, check_ref};
use crate::proto::block_server::Block;
use crate::proto::{
    BlockRef, DeleteReply, DropCacheReply, DropCacheRequest, GetChunk, GetRequest, HasReply, PutChunk,
    PutReply, TierReply, TierRequest, WarmReply, WarmRequest, WorkerState, WorkersReply, WorkersRequest,
};
use crate::wire::CHUNK;

/// Most blocks one warm call may name.
const WARM_MAX: usize = 1024;

pub(crate) struct Svc(pub(crate) Arc<Node>);

impl Svc {
    /// Who calls, when the service runs with TLS (`None`: plaintext, every call allowed).
    fn caller<T>(&self, req: &Request<T>) -> Result<Option<Arc<Identity>>, Status> {
        if self.0.cfg.tls.is_none() {
            return Ok(None);
        }
        match req.extensions().get::<elea_auth::tls::Peer>() {
            Some(p) => Ok(Some(p.identity.clone())),
            None => Err(self.refuse("no client certificate".into())),
        }
    }

    /// Calls that change or report a node's own state (delete, tier, drop-cache, workers):
    /// not for gateways.
    fn internal<T>(&self, req: &Request<T>, call: &str) -> Result<(), Status> {
        match self.caller(req)? {
            Some(id) if id.role == Role::Gateway => Err(self.refuse(format!("{id} may not call {call}"))),
            _ => Ok(()),
        }
    }

    /// Calls on a volume's blocks: a gateway only on the volumes its certificate names.
    async fn on_volume(&self, caller: Option<&Identity>, vol: u64) -> Result<(), Status> {
        let Some(id) = caller.filter(|id| id.role == Role::Gateway) else { return Ok(()) };
        let name = self.0.vols.get(vol).await?.name.clone();
        if id.may_use_volume(&name) {
            Ok(())
        } else {
            Err(self.refuse(format!("{id} may not use volume {name:?}")))
        }
    }

    fn refuse(&self, why: String) -> Status {
        self.0.refused_calls.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("refused a block call: {why}");
        Status::permission_denied(why)
    }
}

type GetStream = Pin<Box<dyn Stream<Item = Result<GetChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Block for Svc {
    async fn put(&self, req: Request<Streaming<PutChunk>>) -> Result<Response<PutReply>, Status> {
        let node = &self.0;
        let caller = self.caller(&req)?;
        let mut stream = req.into_inner();
        let first = stream.next().await.ok_or_else(|| Status::invalid_argument("empty put"))??;
        let h = first
            .header
            .ok_or_else(|| Status::invalid_argument("the first message must carry the header"))?;
        let b = h.block.ok_or_else(|| Status::invalid_argument("missing block"))?;
        check_ref(&b)?;
        self.on_volume(caller.as_deref(), b.vol).await?;
        if h.len == 0 || u64::from(h.len) > BLOCK_SIZE {
            return Err(Status::invalid_argument(format!("bad block length {}", h.len)));
        }
        let mut buf = BytesMut::with_capacity(h.len as usize);
        buf.extend_from_slice(&first.data);
        while let Some(m) = stream.next().await {
            let m = m?;
            if buf.len() + m.data.len() > h.len as usize {
                return Err(Status::invalid_argument("more bytes than the announced length"));
            }
            buf.extend_from_slice(&m.data);
        }
        if buf.len() != h.len as usize {
            return Err(Status::invalid_argument(format!("got {} of {} bytes", buf.len(), h.len)));
        }
        node.store_block(b, buf.freeze(), h.crc32c).await?;
        Ok(Response::new(PutReply {}))
    }

    type GetStream = GetStream;

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetStream>, Status> {
        let vol = req.get_ref().block.as_ref().map_or(0, |b| b.vol);
        self.on_volume(self.caller(&req)?.as_deref(), vol).await?;
        let data = Bytes::from(self.0.read_block(req.get_ref()).await?);
        let crc = crc32c::crc32c(&data);
        let len = data.len() as u32;
        let chunks: Vec<Result<GetChunk, Status>> = (0..data.len())
            .step_by(CHUNK)
            .enumerate()
            .map(|(i, off)| {
                let end = (off + CHUNK).min(data.len());
                Ok(GetChunk {
                    data: data.slice(off..end),
                    len: if i == 0 { len } else { 0 },
                    crc32c: if i == 0 { crc } else { 0 },
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn has(&self, req: Request<BlockRef>) -> Result<Response<HasReply>, Status> {
        let id = check_ref(req.get_ref())?;
        self.on_volume(self.caller(&req)?.as_deref(), req.get_ref().vol).await?;
        Ok(Response::new(HasReply { staged: self.0.staging.contains(id), cached: self.0.cache.contains(id) }))
    }

    async fn delete(&self, req: Request<BlockRef>) -> Result<Response<DeleteReply>, Status> {
        self.internal(&req, "Delete")?;
        let id = check_ref(req.get_ref())?;
        self.0.staging.remove(id).await?;
        self.0.cache.remove(id);
        Ok(Response::new(DeleteReply {}))
    }

    async fn tier(&self, req: Request<TierRequest>) -> Result<Response<TierReply>, Status> {
        self.internal(&req, "Tier")?;
        let vol = req.get_ref().vol;
        self.0.tier_now.lock().unwrap_or_else(|p| p.into_inner()).insert(vol, now_ms());
        self.0.tier_wake.notify_one();
        Ok(Response::new(TierReply {}))
    }

    async fn warm(&self, req: Request<WarmRequest>) -> Result<Response<WarmReply>, Status> {
        self.internal(&req, "Warm")?;
        let WarmRequest { blocks, wait } = req.into_inner();
        if blocks.len() > WARM_MAX {
            return Err(Status::invalid_argument(format!(
                "{} blocks in one warm call (at most {WARM_MAX})",
                blocks.len()
            )));
        }
        let node = self.0.clone();
        if wait {
            return Ok(Response::new(WarmReply { results: node.warm(blocks).await }));
        }
        tokio::spawn(async move {
            let results = node.warm(blocks).await;
            let failed = results.iter().filter(|r| !r.ok).count();
            if failed > 0 {
                tracing::warn!(failed, "warming blocks in the background: some failed");
            }
        });
        Ok(Response::new(WarmReply { results: vec![] }))
    }

    async fn drop_cache(&self, req: Request<DropCacheRequest>) -> Result<Response<DropCacheReply>, Status> {
        self.internal(&req, "DropCache")?;
        self.0.cache.clear().await?;
        Ok(Response::new(DropCacheReply {}))
    }

    async fn workers(&self, req: Request<WorkersRequest>) -> Result<Response<WorkersReply>, Status> {
        self.internal(&req, "Workers")?;
        let workers = self
            .0
            .workers
            .snapshot()
            .into_iter()
            .map(|(name, w)| WorkerState {
                name: name.to_string(),
                state: w.phase.as_str().to_string(),
                rounds: w.rounds,
                last_items: w.last_items,
                consecutive_errors: w.consecutive_errors,
                last_error_age_ms: w
                    .last_error
                    .as_ref()
                    .map_or(0, |(_, t)| t.elapsed().as_millis().max(1) as u64),
                last_error: w.last_error.map(|(e, _)| e).unwrap_or_default(),
            })
            .collect();
        let from_sites = self
            .0
            .from_sites
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(site, (bytes, blocks))| crate::proto::SiteBytes {
                site: site.clone(),
                bytes: *bytes,
                blocks: *blocks,
            })
            .collect();
        Ok(Response::new(WorkersReply { workers, from_sites }))
    }
}
