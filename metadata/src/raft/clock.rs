//! State-machine time: the clock a leader stamps its commands with (`Command::time`, which
//! every replica uses for timestamps, lease expiry and liveness).
//!
//! One node's wall clock must not move the cluster's time by much. Within a term of its
//! leadership a leader's stamps follow its wall clock only while that stays between half and
//! twice the time elapsed on its monotonic clock since the term began (plus a second), counted
//! from where the term started: a clock that is stepped, or runs fast or slow, mid-term moves
//! the cluster's time at most that fast or that slowly, never in a jump, and never freezes it.
//! A term starts from the later of the state's clock (the previous leader's last stamp) and the
//! new leader's wall clock, so time catches up after an outage at once; the jump a wrong clock
//! makes there is absorbed by the grace period every new leader gives the sessions
//! (`Op::ExtendSessions`). Stamps never go backwards.

use std::time::Instant;

use elea_common::Timespec;

/// How far a stamp may run ahead of twice the elapsed time.
const SLACK_NS: i128 = 1_000_000_000;

fn nanos(t: Timespec) -> i128 {
    i128::from(t.sec) * 1_000_000_000 + i128::from(t.nsec)
}

fn timespec(ns: i128) -> Timespec {
    let sec = ns.div_euclid(1_000_000_000);
    let nsec = ns.rem_euclid(1_000_000_000);
    Timespec::new(i64::try_from(sec).unwrap_or(i64::MAX), u32::try_from(nsec).unwrap_or(0))
}

/// See the module docs.
#[derive(Debug)]
pub struct LeaderClock {
    /// The term these bounds belong to (0: none yet).
    term: u64,
    base: i128,
    at: Instant,
    last: i128,
}

impl Default for LeaderClock {
    fn default() -> Self {
        Self { term: 0, base: 0, at: Instant::now(), last: 0 }
    }
}

impl LeaderClock {
    /// The term of leadership the clock was last started for.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Starts a term of leadership at `mono`: time goes on from the later of `state_clock`
    /// (the state's time, the previous leader's last stamp) and `wall`.
    pub fn start_term(&mut self, term: u64, state_clock: Timespec, wall: Timespec, mono: Instant) {
        self.term = term;
        self.base = nanos(state_clock).max(nanos(wall));
        self.at = mono;
        self.last = self.last.max(nanos(state_clock));
    }

    /// The time of a command proposed at `wall` / `mono` (see the module docs).
    pub fn stamp(&mut self, wall: Timespec, mono: Instant) -> Timespec {
        let elapsed =
            i128::try_from(mono.saturating_duration_since(self.at).as_nanos()).unwrap_or(i128::MAX / 4);
        let lo = self.base + elapsed / 2;
        let hi = self.base + elapsed * 2 + SLACK_NS;
        let t = nanos(wall).clamp(lo, hi).max(self.last);
        self.last = t;
        timespec(t)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const T0: i64 = 1_800_000_000;

    fn at(sec: i64, ms: u32) -> Timespec {
        Timespec::new(sec, ms * 1_000_000)
    }

    #[test]
    fn an_honest_clock_is_followed() {
        let mono = Instant::now();
        let mut c = LeaderClock::default();
        c.start_term(2, at(T0 - 5, 0), at(T0, 0), mono);
        assert_eq!(c.stamp(at(T0, 0), mono), at(T0, 0));
        for s in 1..100 {
            let t = at(T0 + s, 250);
            assert_eq!(c.stamp(t, mono + Duration::from_millis(s as u64 * 1000 + 250)), t);
        }
    }

    #[test]
    fn a_clock_stepped_mid_term_moves_time_at_most_twice_as_fast_and_never_freezes_it() {
        let mono = Instant::now();
        let mut c = LeaderClock::default();
        c.start_term(3, at(T0, 0), at(T0, 0), mono);
        // Ten seconds in, the wall clock jumps a day ahead: time runs at most twice as fast.
        let t = c.stamp(at(T0 + 86_400, 0), mono + Duration::from_secs(10));
        assert_eq!(t, at(T0 + 21, 0));
        // Then a day behind: time still runs, at least half as fast, and never backwards.
        let later = c.stamp(at(T0 - 86_400, 0), mono + Duration::from_secs(60));
        assert_eq!(later, at(T0 + 30, 0).max(t));
        let much_later = c.stamp(at(T0 - 86_400, 0), mono + Duration::from_secs(100));
        assert_eq!(much_later, at(T0 + 50, 0));
    }

    #[test]
    fn a_term_starts_from_the_later_of_the_state_and_the_wall_clock() {
        let mono = Instant::now();
        let mut c = LeaderClock::default();
        // After an outage: the wall clock is ahead of the state, and time catches up at once.
        c.start_term(4, at(T0, 0), at(T0 + 3600, 0), mono);
        assert_eq!(c.stamp(at(T0 + 3600, 0), mono), at(T0 + 3600, 0));
        // A leader whose clock is behind the state's starts from the state's time.
        let mut c = LeaderClock::default();
        c.start_term(5, at(T0, 0), at(T0 - 3600, 0), mono);
        assert_eq!(c.stamp(at(T0 - 3600, 0), mono), at(T0, 0));
        assert_eq!(c.stamp(at(T0 - 3590, 0), mono + Duration::from_secs(10)), at(T0 + 5, 0));
    }
}
