//! Rendezvous (highest random weight) placement of blocks on cache nodes.
//!
//! Every block ranks every node by a hash of (slice, index, node); the first `R` live nodes
//! hold its copies. When a node joins or leaves, only the blocks that rank it first move,
//! and every client computes the same order without talking to anyone.

/// A 64-bit mix (splitmix64 finaliser): well spread, cheap, stable forever.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The weight of `node` for block (`slice`, `index`).
pub fn score(slice: u64, index: u32, node: u64) -> u64 {
    mix(mix(slice ^ mix(u64::from(index).wrapping_add(0x9e37_79b9_7f4a_7c15))) ^ node)
}

/// `nodes` in placement order for the block: highest weight first (ties by node id).
pub fn rank(slice: u64, index: u32, nodes: &[u64]) -> Vec<u64> {
    let mut v: Vec<(u64, u64)> = nodes.iter().map(|n| (score(slice, index, *n), *n)).collect();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v.into_iter().map(|(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_is_stable_and_moves_little() {
        let nodes: Vec<u64> = (1..=5).collect();
        assert_eq!(rank(7, 1, &nodes), rank(7, 1, &[5, 4, 3, 2, 1]));
        // Roughly even spread of primaries.
        let mut firsts = [0u32; 6];
        for s in 0..5000u64 {
            firsts[rank(s, 0, &nodes)[0] as usize] += 1;
        }
        assert!(firsts[1..].iter().all(|c| (700..1300).contains(c)), "{firsts:?}");
        // Removing node 3 only moves blocks whose primary was 3.
        let without: Vec<u64> = vec![1, 2, 4, 5];
        for s in 0..2000u64 {
            let a = rank(s, 2, &nodes);
            let b = rank(s, 2, &without);
            let a_wo: Vec<u64> = a.into_iter().filter(|n| *n != 3).collect();
            assert_eq!(a_wo, b);
        }
    }
}
