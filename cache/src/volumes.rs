//! Volume policies and their object stores, fetched from metadata and kept per process.
//!
//! A volume's store list only ever grows (tiered blocks index it), so a cached entry is
//! refreshed only when a block names a store index it does not know yet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use elea_fsm::{BlockCodec, VolumeConfig};
use elea_metadata::MetaApi as _;
use elea_metadata::client::MetaClient;
use elea_store::{Compression, Store, StoreConfig};

use crate::error::CacheError;

/// A volume's policy and its opened stores.
pub struct VolumeEntry {
    pub name: String,
    pub config: VolumeConfig,
    pub stores: Vec<Store>,
}

impl VolumeEntry {
    pub fn compression(&self) -> Compression {
        match self.config.compression {
            BlockCodec::None => Compression::None,
            BlockCodec::Zstd(l) => Compression::Zstd(l),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Volumes {
    meta: MetaClient,
    store_cfg: StoreConfig,
    map: Arc<Mutex<HashMap<u64, Arc<VolumeEntry>>>>,
}

impl Volumes {
    pub fn new(meta: MetaClient, store_cfg: StoreConfig) -> Self {
        Self { meta, store_cfg, map: Arc::default() }
    }

    async fn load(&self, vol: u64) -> Result<Arc<VolumeEntry>, CacheError> {
        let info = self.meta.volume_by_id(vol).await?;
        let stores = info
            .config
            .stores
            .iter()
            .map(|u| Store::open(u, &self.store_cfg))
            .collect::<Result<Vec<_>, _>>()?;
        let e = Arc::new(VolumeEntry { name: info.name, config: info.config, stores });
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
