//! Safe retries: per client, the results of applied commands by sequence number, so a retried
//! command returns its first result instead of being applied twice. Results below the
//! client's acknowledged floor are dropped, and such old seqs are refused with `ESTALE`.

use elea_common::{Errno, Timespec};

use crate::state::{Client, State};
use crate::types::OpResult;

/// What to do with a command of a de-duplicated client.
pub(crate) enum Dedup {
    /// Not seen before: apply it and record the result.
    Apply,
    /// Already applied: this was its result.
    Hit(OpResult),
}

impl State {
    /// Look `(client, seq)` up, pruning results the client acknowledged.
    pub(crate) fn dedup_check(
        &mut self,
        client: u64,
        seq: u64,
        acked_below: u64,
        now: Timespec,
    ) -> Result<Dedup, Errno> {
        let c = self.clients.entry(client).or_insert_with(|| Client { floor: 1, ..Client::default() });
        c.last_active = c.last_active.max(now);
        if acked_below > c.floor {
            c.floor = acked_below;
            c.results = c.results.split_off(&acked_below);
        }
        if seq < c.floor {
            return Err(Errno::ESTALE);
        }
        match c.results.get(&seq) {
            Some(r) => Ok(Dedup::Hit(r.clone())),
            None => Ok(Dedup::Apply),
        }
    }

    /// Remember the result of `(client, seq)`.
    pub(crate) fn dedup_record(&mut self, client: u64, seq: u64, result: &OpResult) {
        if let Some(c) = self.clients.get_mut(&client) {
            c.results.insert(seq, result.clone());
        }
    }
}
