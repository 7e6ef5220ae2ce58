//! A linearizability checker for the fault-scenario workload's history.
//!
//! Every path the workload uses is a register: a writer creates it (a file id at version 1),
//! replaces its content (higher versions), and moves or deletes it (absent), then never uses it
//! again; readers on other mounts read it concurrently. Each path has one writer, whose calls
//! are sequential, and every value written to a path is unique, so the writes of a path are
//! totally ordered by real time. For such a register a history is linearizable exactly when
//! every read returned
//!
//! 1. a value that some write of that path put there (or "absent"),
//! 2. whose write began before the read ended (nothing from the future),
//! 3. with no later write of the path completed before the read began (nothing stale), and
//! 4. no older a value than any read of the path that completed before this read began (no
//!    new-then-old inversion between readers, on any mounts).
//!
//! A write whose call failed may or may not have happened: it is kept, with no end (it may
//! take effect at any time after it began), and reads may see it or not. Linearizability is
//! local, so checking each path's register is checking the whole history of these objects;
//! a rename is two writes (the source becomes absent, the target gets the file), and that
//! both happen at once is what the final-tree check of the workload shows.

use std::collections::BTreeMap;
use std::time::Duration;

/// A value of a path: a file id at a version, or `None` (absent).
pub type Value = Option<(u64, u32)>;

/// A write of one path.
#[derive(Debug, Clone)]
pub struct Write {
    pub value: Value,
    pub start: Duration,
    /// `None`: the call failed, the write may have taken effect at any time after `start`.
    pub end: Option<Duration>,
    pub who: String,
}

/// A completed read of one path and what it returned.
#[derive(Debug, Clone)]
pub struct Read {
    pub value: Value,
    pub start: Duration,
    pub end: Duration,
    pub who: String,
}

/// The history of every path.
#[derive(Debug, Default)]
pub struct History {
    writes: BTreeMap<String, Vec<Write>>,
    reads: BTreeMap<String, Vec<Read>>,
}

impl History {
    /// Records a write; a path's writes must be recorded in the order its writer made them.
    pub fn write(&mut self, path: &str, w: Write) {
        self.writes.entry(path.to_string()).or_default().push(w);
    }

    pub fn read(&mut self, path: &str, r: Read) {
        self.reads.entry(path.to_string()).or_default().push(r);
    }

    /// Reads recorded.
    pub fn reads(&self) -> usize {
        self.reads.values().map(Vec::len).sum()
    }

    /// Every violation of the four rules, one line each.
    pub fn check(&self) -> Vec<String> {
        let mut out = Vec::new();
        let none = Vec::new();
        for (path, reads) in &self.reads {
            let writes = self.writes.get(path).unwrap_or(&none);
            check_path(path, writes, reads, &mut out);
        }
        out
    }
}

fn show(v: &Value) -> String {
    match v {
        Some((id, version)) => format!("file {id} v{version}"),
        None => "absent".into(),
    }
}

/// Which write a read saw, as an index into the path's states: 0 is "absent before the first
/// write", i + 1 is the state after write i. An absent value matches the last removal that
/// began before the read ended, else the initial state.
fn state_of(writes: &[Write], r: &Read) -> Option<usize> {
    match r.value {
        Some(_) => writes.iter().position(|w| w.value == r.value).map(|i| i + 1),
        None => Some(writes.iter().rposition(|w| w.value.is_none() && w.start < r.end).map_or(0, |i| i + 1)),
    }
}

fn check_path(path: &str, writes: &[Write], reads: &[Read], out: &mut Vec<String>) {
    let mut seen: Vec<(&Read, usize)> = Vec::new();
    for r in reads {
        let at = format!("{}: {path} read {} at {:?}..{:?}", r.who, show(&r.value), r.start, r.end);
        let Some(s) = state_of(writes, r) else {
            out.push(format!("{at}: never written there"));
            continue;
        };
        if s > 0 && writes[s - 1].start >= r.end {
            out.push(format!("{at}: its write began only at {:?}", writes[s - 1].start));
            continue;
        }
        if let Some(w) = writes.iter().skip(s).find(|w| w.end.is_some_and(|e| e < r.start)) {
            out.push(format!(
                "{at}: stale, {} ({}) was acknowledged at {:?}, before the read began",
                show(&w.value),
                w.who,
                w.end.unwrap_or_default()
            ));
            continue;
        }
        seen.push((r, s));
    }
    // Rule 4: sweep reads by start; every read that ended before it began sets a floor.
    let mut by_end: Vec<(Duration, usize, &Read)> = seen.iter().map(|(r, s)| (r.end, *s, *r)).collect();
    by_end.sort_by_key(|x| x.0);
    let mut by_start: Vec<(&Read, usize)> = seen;
    by_start.sort_by_key(|x| x.0.start);
    let (mut next, mut floor): (usize, Option<(usize, &Read)>) = (0, None);
    for (r, s) in by_start {
        while next < by_end.len() && by_end[next].0 < r.start {
            let (_, fs, fr) = by_end[next];
            if floor.is_none_or(|(f, _)| fs > f) {
                floor = Some((fs, fr));
            }
            next += 1;
        }
        if let Some((f, fr)) = floor
            && s < f
        {
            out.push(format!(
                "{}: {path} read {} at {:?}..{:?}, older than {} read by {} at {:?}..{:?}",
                r.who,
                show(&r.value),
                r.start,
                r.end,
                show(&fr.value),
                fr.who,
                fr.start,
                fr.end
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn w(value: Value, start: u64, end: Option<u64>) -> Write {
        Write { value, start: ms(start), end: end.map(ms), who: "writer".into() }
    }

    fn r(value: Value, start: u64, end: u64) -> Read {
        Read { value, start: ms(start), end: ms(end), who: "reader".into() }
    }

    fn history(writes: Vec<Write>, reads: Vec<Read>) -> Vec<String> {
        let mut h = History::default();
        for x in writes {
            h.write("p", x);
        }
        for x in reads {
            h.read("p", x);
        }
        h.check()
    }

    /// create at 0..10, replace at 20..30, unlink at 40..50.
    fn lifecycle() -> Vec<Write> {
        vec![w(Some((7, 1)), 0, Some(10)), w(Some((7, 2)), 20, Some(30)), w(None, 40, Some(50))]
    }

    #[test]
    fn concurrent_reads_may_see_either_side_of_a_write() {
        let reads = vec![
            r(Some((7, 1)), 11, 25),
            r(Some((7, 2)), 21, 25),
            r(Some((7, 1)), 22, 29),
            r(Some((7, 2)), 31, 35),
            r(None, 45, 46),
            r(Some((7, 2)), 44, 47),
            r(None, 51, 52),
        ];
        assert_eq!(history(lifecycle(), reads), Vec::<String>::new());
    }

    #[test]
    fn a_stale_read_is_found() {
        let v = history(lifecycle(), vec![r(Some((7, 1)), 31, 32)]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("stale"), "{v:?}");
        // Absent after the unlink was acknowledged: reading the file is stale.
        assert_eq!(history(lifecycle(), vec![r(Some((7, 2)), 51, 52)]).len(), 1);
    }

    #[test]
    fn a_read_from_the_future_or_of_nothing_written_is_found() {
        assert!(history(lifecycle(), vec![r(Some((7, 2)), 11, 19)])[0].contains("began only"));
        assert!(history(lifecycle(), vec![r(Some((7, 3)), 11, 19)])[0].contains("never written"));
        assert!(history(lifecycle(), vec![r(Some((8, 1)), 11, 19)])[0].contains("never written"));
    }

    #[test]
    fn a_new_then_old_inversion_between_readers_is_found() {
        // Both reads overlap the replace, but the first ended before the second began.
        let v = history(lifecycle(), vec![r(Some((7, 2)), 21, 23), r(Some((7, 1)), 24, 28)]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("older than"), "{v:?}");
        // Absent (the unlink) then the file again.
        let v = history(lifecycle(), vec![r(None, 41, 42), r(Some((7, 2)), 43, 44)]);
        assert_eq!(v.len(), 1, "{v:?}");
    }

    #[test]
    fn a_failed_write_may_show_up_late_or_never() {
        // The replace failed: reads may see it at any time after it began, or never.
        let writes = vec![w(Some((7, 1)), 0, Some(10)), w(Some((7, 2)), 20, None)];
        assert!(history(writes.clone(), vec![r(Some((7, 1)), 100, 101)]).is_empty());
        assert!(history(writes.clone(), vec![r(Some((7, 2)), 100, 101)]).is_empty());
        // But once seen, it stays.
        assert_eq!(history(writes, vec![r(Some((7, 2)), 30, 31), r(Some((7, 1)), 40, 41)]).len(), 1);
    }

    #[test]
    fn absent_before_the_create_was_acknowledged_only() {
        let writes = vec![w(Some((7, 1)), 0, Some(10))];
        assert!(history(writes.clone(), vec![r(None, 5, 11)]).is_empty());
        assert_eq!(history(writes, vec![r(None, 11, 12)]).len(), 1);
    }
}
