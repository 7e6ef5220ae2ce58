//! Deterministic, incompressible byte patterns for benchmarks and tests: every (seed, length)
//! gives the same bytes, and different seeds give unrelated bytes, so data read back can be
//! checked without keeping a copy.

/// `len` bytes of an xorshift64 stream seeded by `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn deterministic_and_distinct() {
        assert_eq!(super::pattern(1, 100), super::pattern(1, 100));
        assert_ne!(super::pattern(1, 100), super::pattern(2, 100));
        assert_eq!(super::pattern(3, 13).len(), 13);
    }
}
