//! Volumes in Raft groups of their own. The control group (group 1) hands out each such
//! volume's id and group id and picks its first members ([`Op::CreateVolumeGroup`]); every
//! member then starts the group from that record with the same first state
//! ([`crate::StateMachine::for_group`]): the volume, its root, its home and stores, and a
//! range of slice ids of its own, so a block's slice id names the group that records it.
//!
//! Kept apart from the rest of the state and written after the site table in a snapshot
//! (format 7 on), so older snapshots read as they are, with no such volumes.

use std::collections::BTreeMap;

use elea_common::{Errno, GroupId, Timespec, VolumeId};
use serde::{Deserialize, Serialize};

use crate::changes::Changes;
use crate::state::State;
use crate::types::{GroupRecord, OpResult, Reply, SLICE_GROUP_SHIFT, VolumeConfig, limits};

type R<T> = Result<T, Errno>;

/// Voters of a volume's group when the command names no number.
pub const DEFAULT_GROUP_VOTERS: u8 = 3;

/// The replicated group table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct GroupTable {
    /// Control group: the highest group id handed out (0: none; the first is 2).
    pub allocated: u64,
    /// Control group: the volumes that live in groups of their own.
    pub volumes: BTreeMap<VolumeId, GroupRecord>,
    /// A volume's own group: its record.
    pub own: Option<GroupRecord>,
}

impl GroupTable {
    /// The first slice id past this group's range.
    pub fn slice_limit(&self) -> u64 {
        let g = self.own.as_ref().map_or(1, |r| r.group);
        g.saturating_add(1).saturating_mul(1 << SLICE_GROUP_SHIFT)
    }

    /// Whether slice id `id` is in this group's range: a write of a slice another group
    /// handed out (a client that asked the wrong group) is refused.
    pub fn owns_slice(&self, id: elea_common::SliceId) -> bool {
        let start = self.own.as_ref().map_or(0, |r| r.group << SLICE_GROUP_SHIFT);
        id > start && id < self.slice_limit()
    }

    pub fn records(&self) -> Vec<GroupRecord> {
        match &self.own {
            Some(r) => vec![r.clone()],
            None => self.volumes.values().cloned().collect(),
        }
    }
}

impl State {
    pub(crate) fn create_volume_group(
        &mut self,
        name: &str,
        config: &VolumeConfig,
        home: &str,
        voters: u8,
        spread: bool,
        now: Timespec,
    ) -> OpResult {
        if self.groups.own.is_some() {
            return Err(Errno::EPERM);
        }
        crate::sites::check_site(home)?;
        crate::namespace::check_volume_name(name)?;
        crate::data::check_config(config)?;
        if !self.sites.sites.contains(home) {
            return Err(Errno::ENOENT);
        }
        let want = if voters == 0 { DEFAULT_GROUP_VOTERS } else { voters };
        if want > limits::GROUP_VOTERS_MAX {
            return Err(Errno::EINVAL);
        }
        if self.volume_names.contains_key(name) || self.groups.volumes.values().any(|r| r.name == name) {
            return Err(Errno::EEXIST);
        }
        if self.groups.volumes.len() >= limits::VOLUME_GROUPS_MAX {
            return Err(Errno::ENOSPC);
        }
        let chosen = self.pick_voters(home, usize::from(want), spread);
        if chosen.is_empty() {
            return Err(Errno::ENODEV);
        }
        let addr = |id: &u64| self.sites.meta_nodes.get(id).map(|(_, a)| a.clone()).unwrap_or_default();
        let voters: Vec<(u64, String)> = chosen.iter().map(|id| (*id, addr(id))).collect();
        let learners: Vec<(u64, String)> = self
            .sites
            .meta_nodes
            .keys()
            .filter(|id| !chosen.contains(id))
            .map(|id| (*id, addr(id)))
            .collect();
        let vol = self.volumes_allocated.checked_add(1).ok_or(Errno::ENOSPC)?;
        // Group 1 is the control group; volumes' groups start at 2.
        let group = self.groups.allocated.max(1).checked_add(1).ok_or(Errno::ENOSPC)?;
        if group.checked_add(1).and_then(|g| g.checked_mul(1 << SLICE_GROUP_SHIFT)).is_none() {
            return Err(Errno::ENOSPC);
        }
        self.volumes_allocated = vol;
        self.groups.allocated = group;
        let rec = GroupRecord {
            group,
            vol,
            name: name.to_string(),
            config: config.clone(),
            home: home.to_string(),
            voters,
            learners,
            spread,
            created: now,
            identity: self.identity,
            sites: self.sites.sites.iter().cloned().collect(),
            added: Vec::new(),
        };
        self.sites.homes.insert(vol, home.to_string());
        self.groups.volumes.insert(vol, rec.clone());
        Ok(Reply::Group(Box::new(rec)))
    }

    pub(crate) fn add_group_member(&mut self, vol: VolumeId, id: u64, learner: bool) -> OpResult {
        if self.groups.own.is_some() {
            return Err(Errno::EPERM);
        }
        let addr = self.sites.meta_nodes.get(&id).map(|(_, a)| a.clone()).ok_or(Errno::ENOENT)?;
        let rec = self.groups.volumes.get_mut(&vol).ok_or(Errno::ENOENT)?;
        if rec.has_member(id) {
            return Err(Errno::EEXIST);
        }
        if rec.members().len() >= limits::META_NODES_MAX {
            return Err(Errno::ENOSPC);
        }
        rec.added.push((id, addr, learner));
        Ok(Reply::Group(Box::new(rec.clone())))
    }

    pub(crate) fn remove_group_member(&mut self, vol: VolumeId, id: u64) -> OpResult {
        if self.groups.own.is_some() {
            return Err(Errno::EPERM);
        }
        let rec = self.groups.volumes.get_mut(&vol).ok_or(Errno::ENOENT)?;
        if !rec.has_member(id) {
            return Err(Errno::ENOENT);
        }
        if rec.members().len() == 1 {
            return Err(Errno::EBUSY);
        }
        rec.voters.retain(|(n, _)| *n != id);
        rec.learners.retain(|(n, _)| *n != id);
        rec.added.retain(|(n, _, _)| *n != id);
        Ok(Reply::Group(Box::new(rec.clone())))
    }

    /// Up to `want` metadata nodes: of `home` by id, or with `spread` one of each site in
    /// turn (home first, then the others by name) until `want` are taken.
    fn pick_voters(&self, home: &str, want: usize, spread: bool) -> Vec<u64> {
        let mut by_site: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (id, (site, _)) in &self.sites.meta_nodes {
            by_site.entry(site.as_str()).or_default().push(*id);
        }
        if !spread {
            return by_site.get(home).map(|ids| ids.iter().copied().take(want).collect()).unwrap_or_default();
        }
        let mut order: Vec<std::vec::IntoIter<u64>> = Vec::new();
        if let Some(ids) = by_site.remove(home) {
            order.push(ids.into_iter());
        }
        order.extend(by_site.into_values().map(Vec::into_iter));
        let mut out = Vec::new();
        while out.len() < want {
            let before = out.len();
            for it in &mut order {
                if out.len() == want {
                    break;
                }
                if let Some(id) = it.next() {
                    out.push(id);
                }
            }
            if out.len() == before {
                break;
            }
        }
        out
    }

    /// The first state of the group `rec` describes.
    pub(crate) fn for_group(rec: &GroupRecord) -> R<Self> {
        let mut st = State { identity: rec.identity, clock: rec.created, ..State::default() };
        st.volumes_allocated = rec.vol.checked_sub(1).ok_or(Errno::EINVAL)?;
        st.slices_allocated = rec.group.checked_mul(1 << SLICE_GROUP_SHIFT).ok_or(Errno::EINVAL)?;
        let mut ch = Changes::default();
        st.create_volume(&rec.name, &rec.config, rec.created, &mut ch)?;
        for s in &rec.sites {
            st.sites.ensure(s)?;
        }
        st.sites.ensure(&rec.home)?;
        st.sites.homes.insert(rec.vol, rec.home.clone());
        for i in 0..rec.config.stores.len() {
            // At most STORES_MAX stores (checked by create_volume), so the index fits.
            st.sites.stores.insert((rec.vol, i as u16), rec.home.clone());
        }
        st.groups.own = Some(rec.clone());
        Ok(st)
    }
}

/// The group of volume `vol` according to a group list (the control group's answer to
/// [`crate::Query::Groups`]); volumes not in it live in the control group.
pub fn group_of_volume(groups: &[GroupRecord], vol: VolumeId) -> GroupId {
    groups.iter().find(|r| r.vol == vol).map_or(elea_common::ids::DEFAULT_GROUP, |r| r.group)
}
