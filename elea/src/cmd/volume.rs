//! `elea volume`: create and list volumes.

use anyhow::{Context as _, bail};
use elea_metadata::MetaApi as _;
use serde_json::json;

use crate::cli::{VolumeCmd, client};

pub(crate) async fn volume(v: VolumeCmd) -> anyhow::Result<()> {
    match v {
        VolumeCmd::Create { name, meta, store, replicas, tier_after, compression } => {
            let compression = match compression.parse::<elea_store::Compression>() {
                Ok(elea_store::Compression::None) => elea_fsm::BlockCodec::None,
                Ok(elea_store::Compression::Zstd(l)) => elea_fsm::BlockCodec::Zstd(l),
                Err(e) => bail!("--compression: {e}"),
            };
            if replicas == 0 || replicas > elea_fsm::limits::REPLICAS_MAX {
                bail!("--replicas must be between 1 and {}", elea_fsm::limits::REPLICAS_MAX);
            }
            for url in &store {
                elea_store::Store::open(url, &elea_store::StoreConfig::default())
                    .with_context(|| format!("--store {url}"))?;
            }
            let config = elea_fsm::VolumeConfig {
                stores: store,
                replicas,
                tier_after_ms: u64::try_from(tier_after.as_millis()).unwrap_or(u64::MAX),
                compression,
            };
            let vol = client(&meta)?
                .create_volume(&name, config)
                .await
                .with_context(|| format!("creating volume {name:?}"))?;
            println!("created volume {:?} (id {})", vol.name, vol.id);
        }
        VolumeCmd::List { meta, json: as_json } => {
            let vols = client(&meta)?.list_volumes().await?;
            if as_json {
                let list: Vec<_> = vols
                    .iter()
                    .map(|v| {
                        json!({"id": v.id, "name": v.name, "inodes": v.inodes, "used_bytes": v.used_bytes,
                                    "change_seq": v.change_seq, "created": v.created.sec,
                                    "stores": v.config.stores, "replicas": v.config.replicas,
                                    "tier_after_ms": v.config.tier_after_ms,
                                    "compression": codec_name(v.config.compression)})
                    })
                    .collect();
                println!("{}", json!({ "volumes": list }));
            } else {
                println!(
                    "{:>4}  {:<24} {:>10} {:>14} {:>3} {:>10} {:<8} stores",
                    "id", "name", "inodes", "used bytes", "R", "tier after", "codec"
                );
                for v in vols {
                    println!(
                        "{:>4}  {:<24} {:>10} {:>14} {:>3} {:>9}s {:<8} {}",
                        v.id,
                        v.name,
                        v.inodes,
                        v.used_bytes,
                        v.config.replicas,
                        v.config.tier_after_ms / 1000,
                        codec_name(v.config.compression),
                        v.config.stores.join(",")
                    );
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn codec_name(c: elea_fsm::BlockCodec) -> String {
    match c {
        elea_fsm::BlockCodec::None => "none".into(),
        elea_fsm::BlockCodec::Zstd(l) => format!("zstd:{l}"),
    }
}
