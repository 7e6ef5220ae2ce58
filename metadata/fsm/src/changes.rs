//! Collects the change events of one command, per volume and without duplicates, and turns
//! them into [`ChangeSet`]s stamped with each volume's new change sequence.

use std::collections::{BTreeMap, BTreeSet};

use elea_common::{Ino, VolumeId};

use crate::state::State;
use crate::types::{Change, ChangeSet};

#[derive(Debug, Default)]
struct VolChanges {
    list: Vec<Change>,
    seen: BTreeSet<(u8, Ino, Vec<u8>)>,
}

/// The changes one command made so far.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    per_vol: BTreeMap<VolumeId, VolChanges>,
}

impl Changes {
    /// The attributes, data, xattrs or locks of `ino` changed.
    pub fn inode(&mut self, vol: VolumeId, ino: Ino) {
        let v = self.per_vol.entry(vol).or_default();
        if v.seen.insert((0, ino, Vec::new())) {
            v.list.push(Change::Inode(ino));
        }
    }

    /// The entry `parent/name` was added, removed or replaced.
    pub fn entry(&mut self, vol: VolumeId, parent: Ino, name: &[u8]) {
        let v = self.per_vol.entry(vol).or_default();
        if v.seen.insert((1, parent, name.to_vec())) {
            v.list.push(Change::Entry { parent, name: name.to_vec() });
        }
    }

    /// Bump the change sequence of every touched volume and build the change sets.
    pub fn commit(self, st: &mut State, client: u64) -> Vec<ChangeSet> {
        let mut out = Vec::new();
        for (vol, v) in self.per_vol {
            if v.list.is_empty() {
                continue;
            }
            let Some(volume) = st.volumes.get_mut(&vol) else {
                continue;
            };
            volume.change_seq = volume.change_seq.saturating_add(1);
            out.push(ChangeSet { vol, seq: volume.change_seq, changes: v.list, client });
        }
        out
    }
}
