//! Wall-clock time stamps with nanoseconds, as POSIX attributes carry them.

use serde::{Deserialize, Serialize};

/// Seconds and nanoseconds since the Unix epoch. `nsec` is always below 1e9.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

impl Timespec {
    pub const fn new(sec: i64, nsec: u32) -> Self {
        Self { sec, nsec }
    }

    /// Now, from the system clock (a clock before 1970 reads as the epoch).
    pub fn now() -> Self {
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Self { sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), nsec: d.subsec_nanos() },
            Err(_) => Self::default(),
        }
    }

    /// This time plus `ms` milliseconds (saturating).
    pub fn plus_millis(self, ms: u64) -> Self {
        let total = u128::from(self.nsec) + u128::from(ms % 1000) * 1_000_000;
        let carry = i64::try_from(total / 1_000_000_000).unwrap_or(0);
        let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
        Self {
            sec: self.sec.saturating_add(secs).saturating_add(carry),
            nsec: u32::try_from(total % 1_000_000_000).unwrap_or(0),
        }
    }

    /// True when `nsec` is in range.
    pub fn is_valid(self) -> bool {
        self.nsec < 1_000_000_000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plus_millis_carries() {
        let t = Timespec::new(10, 999_000_000).plus_millis(1_500);
        assert_eq!(t, Timespec::new(12, 499_000_000));
        assert!(t.is_valid());
        assert!(Timespec::now().is_valid());
    }
}
