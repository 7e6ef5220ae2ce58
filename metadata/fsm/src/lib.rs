//! The metadata state machine: one volume namespace per volume, sessions, locks and id
//! allocation, as a pure and deterministic function of the Raft log.
//!
//! `apply(command) -> (result, changes)` does no I/O and reads no clock: every "now" comes from
//! the command's leader-stamped time, so every replica that applies the same log reaches the
//! same state, byte for byte ([`StateMachine::snapshot`] is deterministic).

pub mod types;

pub use types::*;

use elea_common::Errno;

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error("snapshot is corrupt: {0}")]
    Corrupt(String),
    #[error("snapshot format version {0} is not supported")]
    Version(u32),
}

/// The replicated namespace. See the crate docs.
#[derive(Debug, Default, Clone)]
pub struct StateMachine {
    // Implementation to come: volumes, inodes, entries, sessions, locks, dedup table.
}

impl StateMachine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Apply one command. Never panics on any input; invalid ops return an errno and leave
    /// the state unchanged.
    pub fn apply(&mut self, cmd: &Command) -> (OpResult, Vec<ChangeSet>) {
        let _ = cmd;
        (Err(Errno::ENOSYS), Vec::new())
    }

    /// Answer a query from the current state.
    pub fn query(&self, q: &Query) -> OpResult {
        let _ = q;
        Err(Errno::ENOSYS)
    }

    /// Serialize the whole state (deterministic bytes).
    pub fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Rebuild a state machine from [`StateMachine::snapshot`] bytes.
    pub fn restore(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let _ = bytes;
        Ok(Self::default())
    }
}
