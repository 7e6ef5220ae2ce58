//! Object key layout: where a block of a slice lives in the object store.
//!
//! A block is named `c{cluster:032x}/v{vol}/{hh}/{slice:016x}_{index}_{len}`: the cluster's
//! identity in data (so that clusters sharing a bucket and prefix never touch each other's
//! objects), the volume, and `hh`, two hex digits of a hash of `(slice, index)`, so consecutive
//! slices spread over 256 prefixes (object stores partition and rate-limit by key prefix).
//! Volumes created before clusters had an identity (cluster 0) keep the older layout without
//! the first part, `v{vol}/{hh}/...`. The layout is stable forever: objects written by one
//! version must be found by every later one, and a test pins exact examples.

use std::fmt;

/// The address of one stored block: block `index` of slice `slice` in volume `vol`, `len` bytes
/// long once decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    /// The cluster's identity (0: a volume older than cluster identities).
    pub cluster: u128,
    /// Volume id.
    pub vol: u64,
    /// Slice id (unique within the cluster).
    pub slice: u64,
    /// Index of the block within the slice.
    pub index: u32,
    /// Decoded length of the block in bytes.
    pub len: u32,
}

/// 64-bit FNV-1a. Part of the stable key layout: never change it.
fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

impl BlockKey {
    /// The spreading prefix: the top 8 bits of FNV-1a 64 over `slice` (LE) then `index` (LE).
    pub fn prefix(&self) -> u8 {
        let mut buf = [0u8; 12];
        buf[..8].copy_from_slice(&self.slice.to_le_bytes());
        buf[8..].copy_from_slice(&self.index.to_le_bytes());
        (fnv1a64(&buf) >> 56) as u8
    }

    /// The object path, relative to the store's root:
    /// `c{cluster:032x}/v{vol}/{hh}/{slice:016x}_{index}_{len}` (without the first part for
    /// cluster 0).
    pub fn path(&self) -> String {
        format!(
            "{}{:02x}/{:016x}_{}_{}",
            Self::volume_dir(self.cluster, self.vol),
            self.prefix(),
            self.slice,
            self.index,
            self.len
        )
    }

    /// The directory holding all blocks of volume `vol` of `cluster`.
    pub fn volume_dir(cluster: u128, vol: u64) -> String {
        if cluster == 0 { format!("v{vol}/") } else { format!("c{cluster:032x}/v{vol}/") }
    }

    /// Parses a path made by [`BlockKey::path`] (a leading `/` is accepted). Returns `None` for
    /// anything else, including a non-canonical spelling or a wrong prefix.
    pub fn parse(path: &str) -> Option<BlockKey> {
        let path = path.strip_prefix('/').unwrap_or(path);
        let mut parts = path.split('/').peekable();
        let cluster = match parts.next_if(|p| p.starts_with('c')) {
            Some(c) if c.len() == 33 => u128::from_str_radix(&c[1..], 16).ok().filter(|c| *c != 0)?,
            Some(_) => return None,
            None => 0,
        };
        let (v, hh, name) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let vol = v.strip_prefix('v')?.parse().ok()?;
        let mut fields = name.split('_');
        let (slice, index, len) = (fields.next()?, fields.next()?, fields.next()?);
        if fields.next().is_some() || slice.len() != 16 || hh.len() != 2 {
            return None;
        }
        let key = BlockKey {
            cluster,
            vol,
            slice: u64::from_str_radix(slice, 16).ok()?,
            index: index.parse().ok()?,
            len: len.parse().ok()?,
        };
        // Only the canonical spelling is a block key: this rejects "+1", leading zeros,
        // upper-case hex and a prefix that does not match the hash.
        (key.path() == path).then_some(key)
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn layout_is_pinned() {
        // These strings are what is in object stores: they must never change.
        let k = BlockKey { cluster: 0, vol: 1, slice: 0x1234, index: 0, len: 4 << 20 };
        assert_eq!(k.path(), "v1/d5/0000000000001234_0_4194304");
        let k = BlockKey { cluster: 0, vol: 42, slice: u64::MAX, index: 15, len: 17 };
        assert_eq!(k.path(), "v42/2f/ffffffffffffffff_15_17");
        let k = BlockKey {
            cluster: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            vol: 1,
            slice: 0x1234,
            index: 0,
            len: 4 << 20,
        };
        assert_eq!(k.path(), "c0123456789abcdef0011223344556677/v1/d5/0000000000001234_0_4194304");
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn parse_round_trips() {
        for k in [
            BlockKey { cluster: 0, vol: 1, slice: 0, index: 0, len: 0 },
            BlockKey { cluster: 0, vol: u64::MAX, slice: u64::MAX, index: u32::MAX, len: u32::MAX },
            BlockKey { cluster: 0, vol: 7, slice: 0xdead_beef, index: 3, len: 4096 },
            BlockKey { cluster: 1, vol: 7, slice: 0xdead_beef, index: 3, len: 4096 },
            BlockKey { cluster: u128::MAX, vol: 1, slice: 2, index: 3, len: 4 },
        ] {
            assert_eq!(BlockKey::parse(&k.path()), Some(k));
            assert_eq!(BlockKey::parse(&format!("/{}", k.path())), Some(k));
        }
    }

    #[test]
    fn parse_rejects_non_keys() {
        let good = BlockKey { cluster: 0, vol: 1, slice: 0x1234, index: 0, len: 5 }.path();
        assert!(BlockKey::parse(&good).is_some());
        let wrong_prefix = {
            let (v, rest) = good.split_once('/').unwrap_or_default();
            let (hh, name) = rest.split_once('/').unwrap_or_default();
            let other = if hh == "00" { "01" } else { "00" };
            format!("{v}/{other}/{name}")
        };
        for bad in [
            "",
            "v1",
            "v1/",
            "v1/ab/",
            "x1/ab/0000000000001234_0_5",
            "v+1/ab/0000000000001234_0_5",
            "v01/ab/0000000000001234_0_5",
            &wrong_prefix,
            &good.to_uppercase(),
            &format!("{good}/x"),
            &format!("{good}_1"),
            &good.replace("_0_", "_00_"),
            ".elea-tmp/foo",
            // A cluster part that is not 32 lower-case hex digits, or is zero.
            &format!("c1/{good}"),
            &format!("c{}/{good}", "0".repeat(32)),
            &format!("c{}/{good}", "A".repeat(32)),
            &format!("x{}/{good}", "1".repeat(32)),
        ] {
            assert_eq!(BlockKey::parse(bad), None, "{bad:?} parsed");
        }
    }

    #[test]
    fn keys_spread_over_all_prefixes() {
        let mut seen = HashSet::new();
        for slice in 1..=4096u64 {
            seen.insert(BlockKey { cluster: 0, vol: 1, slice, index: 0, len: 1 }.prefix());
        }
        assert_eq!(seen.len(), 256, "sequential slices must cover all prefixes");
        let mut seen = HashSet::new();
        for index in 0..4096u32 {
            seen.insert(BlockKey { cluster: 0, vol: 1, slice: 9, index, len: 1 }.prefix());
        }
        assert_eq!(seen.len(), 256, "blocks of one slice must cover all prefixes");
    }
}
