//! Sites: the environments a cluster spans (data centres, cloud regions), where each metadata
//! node runs, the home site of each volume, and which site each of a volume's stores serves.
//!
//! Kept apart from the rest of the state and written after it in a snapshot (format 6 on),
//! so older snapshots read as they are and get a site table derived from their cache node
//! registry ([`SiteTable::derive`]), the same one replaying their log would build.

use std::collections::{BTreeMap, BTreeSet};

use elea_common::{Errno, VolumeId};
use serde::{Deserialize, Serialize};

use crate::changes::Changes;
use crate::state::State;
use crate::types::{OpResult, Reply, SiteMap, VolumeConfig, limits};

type R<T> = Result<T, Errno>;

/// The replicated site table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct SiteTable {
    pub sites: BTreeSet<String>,
    /// Metadata node id → (site, address).
    pub meta_nodes: BTreeMap<u64, (String, String)>,
    pub homes: BTreeMap<VolumeId, String>,
    /// (volume, store index) → the site whose cache nodes tier to that store.
    pub stores: BTreeMap<(VolumeId, u16), String>,
}

impl SiteTable {
    /// The table an older state implies: the sites its cache nodes are registered in (what
    /// replaying its log builds, but for a site a node left by registering in another).
    pub fn derive(st: &State) -> Self {
        Self { sites: st.cache_nodes.values().map(|n| n.site.clone()).collect(), ..Self::default() }
    }

    /// Adds `site` unless known; `ENOSPC` past [`limits::SITES_MAX`].
    pub fn ensure(&mut self, site: &str) -> R<()> {
        check_site(site)?;
        if !self.sites.contains(site) {
            if self.sites.len() >= limits::SITES_MAX {
                return Err(Errno::ENOSPC);
            }
            self.sites.insert(site.to_string());
        }
        Ok(())
    }
}

/// A site name: 1..=64 bytes of ASCII letters, digits, `.`, `_` and `-`.
pub(crate) fn check_site(site: &str) -> R<()> {
    let ok = !site.is_empty()
        && site.len() <= limits::SITE_NAME_MAX
        && site.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(Errno::EINVAL) }
}

impl State {
    /// The site map, with the store roles of the volumes whose roles are not the default ones.
    pub(crate) fn site_map(&self) -> SiteMap {
        let t = &self.sites;
        SiteMap {
            sites: t.sites.iter().cloned().collect(),
            meta_nodes: t.meta_nodes.iter().map(|(id, (s, a))| (*id, s.clone(), a.clone())).collect(),
            homes: t.homes.iter().map(|(v, s)| (*v, s.clone())).collect(),
            stores: t.stores.iter().map(|((v, i), s)| (*v, *i, s.clone())).collect(),
            roles: self.mobility.roles.iter().map(|(v, r)| (*v, *r)).collect(),
        }
    }

    pub(crate) fn add_site(&mut self, name: &str) -> OpResult {
        check_site(name)?;
        if self.sites.sites.contains(name) {
            return Err(Errno::EEXIST);
        }
        self.sites.ensure(name)?;
        Ok(Reply::Ok)
    }

    pub(crate) fn register_meta_node(&mut self, id: u64, site: &str, addr: &str) -> OpResult {
        check_site(site)?;
        if id == 0 || addr.is_empty() || addr.len() > limits::NODE_ADDR_MAX {
            return Err(Errno::EINVAL);
        }
        if !self.sites.meta_nodes.contains_key(&id) && self.sites.meta_nodes.len() >= limits::META_NODES_MAX {
            return Err(Errno::ENOSPC);
        }
        self.sites.ensure(site)?;
        self.sites.meta_nodes.insert(id, (site.to_string(), addr.to_string()));
        Ok(Reply::Ok)
    }

    pub(crate) fn create_volume_in(
        &mut self,
        name: &str,
        config: &VolumeConfig,
        home: &str,
        now: elea_common::Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        check_site(home)?;
        if !self.sites.sites.contains(home) {
            return Err(Errno::ENOENT);
        }
        let r = self.create_volume(name, config, now, ch)?;
        let Reply::Volume(v) = &r else { return Ok(r) };
        self.sites.homes.insert(v.id, home.to_string());
        for i in 0..config.stores.len() {
            // At most STORES_MAX stores (checked by create_volume), so the index fits.
            self.sites.stores.insert((v.id, i as u16), home.to_string());
        }
        Ok(r)
    }

    pub(crate) fn add_store(&mut self, vol: VolumeId, site: &str, url: &str) -> OpResult {
        check_site(site)?;
        if url.is_empty() || url.len() > limits::STORE_URL_MAX {
            return Err(Errno::EINVAL);
        }
        if !self.sites.sites.contains(site) {
            return Err(Errno::ENOENT);
        }
        let v = self.volumes.get(&vol).ok_or(Errno::ENOENT)?;
        // A site's former stores (a migration's source, detached) do not count.
        let roles = self.mobility.roles(vol);
        let taken = self.sites.stores.iter().any(|((v, i), s)| *v == vol && s == site && roles.writable(*i));
        if taken || v.config.stores.iter().any(|s| s == url) {
            return Err(Errno::EEXIST);
        }
        if v.config.stores.len() >= limits::STORES_MAX {
            return Err(Errno::ENOSPC);
        }
        let index = v.config.stores.len() as u16;
        if let Some(v) = self.volumes.get_mut(&vol) {
            v.config.stores.push(url.to_string());
        }
        self.sites.stores.insert((vol, index), site.to_string());
        let v = self.vol(vol)?;
        Ok(Reply::Volume(v.info(vol)))
    }
}

#[cfg(test)]
mod tests {
    use elea_common::Timespec;

    use crate::types::{Command, Op, Query};
    use crate::{SNAPSHOT_MAGIC, StateMachine};

    /// A format 5 snapshot (a header and the state, no site table) restores with the sites its
    /// cache nodes registered in, and is written back in the current format.
    #[test]
    fn format_5_snapshots_get_their_sites_from_the_cache_registry() {
        let mut sm = StateMachine::new();
        for (id, site) in [(1, "east"), (2, "west"), (3, "east")] {
            let op = Op::RegisterCacheNode { id, site: site.into(), addr: format!("h:{id}"), incarnation: 1 };
            let cmd = Command { client: 0, seq: 0, acked_below: 0, time: Timespec::new(10, 0), op };
            assert!(sm.apply(&cmd).0.is_ok());
        }
        let mut v5 = postcard::to_stdvec(&(SNAPSHOT_MAGIC, 5u32)).unwrap();
        v5.extend(postcard::to_stdvec(&sm.st).unwrap());
        let restored = StateMachine::restore(&v5).unwrap();
        assert_eq!(restored.query(&Query::Sites), sm.query(&Query::Sites));
        let Ok(crate::Reply::Sites(m)) = restored.query(&Query::Sites) else { panic!() };
        assert_eq!(m.sites, ["east", "west"]);
        assert_eq!(restored.snapshot(), sm.snapshot());
    }
}
