//! Volume policies and their object stores, fetched from metadata and kept per process.
//!
//! A volume's store list only ever grows (tiered blocks index it), so a cached entry is
//! refreshed only when a block names a store index it does not know yet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use elea_fsm::{BlockCodec, DataIdentity, VolumeConfig};
use elea_metadata::MetaApi as _;
use elea_metadata::client::MetaClient;
use elea_store::{BlockKey, Compression, Store, StoreConfig};
use futures::StreamExt as _;

use crate::error::CacheError;

/// A volume's policy and its opened stores.
pub struct VolumeEntry {
    pub name: String,
    pub config: VolumeConfig,
    pub stores: Vec<Store>,
    /// The cluster part of its object keys (`DataIdentity::key_tag`).
    pub key_tag: u128,
}

impl VolumeEntry {
    pub fn compression(&self) -> Compression {
        match self.config.compression {
            BlockCodec::None => Compression::None,
            BlockCodec::Zstd(l) => Compression::Zstd(l),
        }
    }
}

/// How long the cluster's data identity is waited for from one group.
const IDENTITY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// See the module docs.
#[derive(Clone)]
pub struct Volumes {
    meta: MetaClient,
    store_cfg: StoreConfig,
    map: Arc<Mutex<HashMap<u64, Arc<VolumeEntry>>>>,
    /// The cluster's identity in data, once known (it never changes after).
    identity: Arc<Mutex<Option<DataIdentity>>>,
}

impl Volumes {
    pub fn new(meta: MetaClient, store_cfg: StoreConfig) -> Self {
        Self { meta, store_cfg, map: Arc::default(), identity: Arc::default() }
    }

    /// The cluster's identity in data (`None` before its first volume).
    pub async fn identity(&self) -> Result<Option<DataIdentity>, CacheError> {
        if let Some(i) = *self.identity.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(Some(i));
        }
        let i = match tokio::time::timeout(IDENTITY_WAIT, self.meta.data_identity()).await {
            Ok(Ok(i)) => i,
            failed => {
                // The control group cannot answer (its site lost): every volume's own group
                // holds the same identity, copied when it was made. All are asked at once
                // (some may have lost their quorum with the site); the first answer counts.
                let groups = self.meta.all_groups_cached();
                let mut asks: futures::stream::FuturesUnordered<_> =
                    groups.iter().skip(1).map(|g| g.data_identity()).collect();
                let first = async {
                    while let Some(r) = asks.next().await {
                        if let Ok(Some(i)) = r {
                            return Some(i);
                        }
                    }
                    None
                };
                let found = tokio::time::timeout(IDENTITY_WAIT, first).await.ok().flatten();
                match (found, failed) {
                    (Some(i), _) => Some(i),
                    (None, Ok(Err(e))) => return Err(e.into()),
                    (None, _) => {
                        return Err(CacheError::Meta(elea_metadata::client::ClientError::Unavailable(
                            "the cluster's data identity: no group answered in time".into(),
                        )));
                    }
                }
            }
        };
        *self.identity.lock().unwrap_or_else(|p| p.into_inner()) = i;
        Ok(i)
    }

    async fn load(&self, vol: u64) -> Result<Arc<VolumeEntry>, CacheError> {
        // From the volume's own group when it has one.
        let info = self.meta.volume_info(vol).await?;
        // Read after the volume: a volume that exists has the identity it was created under.
        let key_tag = DataIdentity::key_tag(self.identity().await?.as_ref(), vol);
        let stores = info
            .config
            .stores
            .iter()
            .map(|u| Store::open(u, &self.store_cfg))
            .collect::<Result<Vec<_>, _>>()?;
        let e = Arc::new(VolumeEntry { name: info.name, config: info.config, stores, key_tag });
        self.map.lock().unwrap_or_else(|p| p.into_inner()).insert(vol, e.clone());
        Ok(e)
    }

    /// The volume's entry (cached).
    pub async fn get(&self, vol: u64) -> Result<Arc<VolumeEntry>, CacheError> {
        let cached = self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&vol).cloned();
        match cached {
            Some(e) => Ok(e),
            None => self.load(vol).await,
        }
    }

    /// The object key of block `index` (`len` bytes) of `slice` in volume `vol`.
    pub async fn key(&self, vol: u64, slice: u64, index: u32, len: u32) -> Result<BlockKey, CacheError> {
        Ok(BlockKey { cluster: self.get(vol).await?.key_tag, vol, slice, index, len })
    }

    /// Store `idx` of the volume.
    pub async fn store(&self, vol: u64, idx: u16) -> Result<Store, CacheError> {
        let mut e = self.get(vol).await?;
        if usize::from(idx) >= e.stores.len() {
            e = self.load(vol).await?;
        }
        e.stores
            .get(usize::from(idx))
            .cloned()
            .ok_or_else(|| CacheError::NotFound(format!("volume {vol} has no store #{idx}")))
    }
}
