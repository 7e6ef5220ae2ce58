//! The gateway's error: the errno a front end reports, what caused it, and how loudly it is
//! worth logging. Every VFS operation returns it; the front ends (FUSE today) log and count
//! failed operations in one place ([`VfsError::report`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use elea_cache::CacheError;
use elea_common::Errno;
use elea_metadata::client::ClientError;

/// How a failure is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// An answer the caller asked for (`ENOENT` from a lookup, `EEXIST`, `EACCES`, ...).
    Expected,
    /// Something went wrong below the VFS (metadata unreachable, a cache node failing).
    Fault,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct VfsError {
    errno: Errno,
    level: Level,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl VfsError {
    /// The errno a front end reports.
    pub fn errno(&self) -> Errno {
        self.errno
    }

    pub fn level(&self) -> Level {
        self.level
    }

    /// Logs a failed operation `op` (faults as warnings, expected answers at debug level)
    /// and counts it; returns the errno to reply with.
    pub fn report(&self, op: &'static str) -> Errno {
        FAILED.fetch_add(1, Ordering::Relaxed);
        match (self.level, &self.source) {
            (Level::Fault, Some(s)) => {
                tracing::warn!(op, errno = %self.errno, error = %s, "operation failed")
            }
            (Level::Fault, None) => tracing::warn!(op, errno = %self.errno, "operation failed"),
            (Level::Expected, _) => tracing::debug!(op, errno = %self.errno, "operation refused"),
        }
        self.errno
    }
}

static FAILED: AtomicU64 = AtomicU64::new(0);

/// Operations failed through [`VfsError::report`] since the process started.
pub fn failed_ops() -> u64 {
    FAILED.load(Ordering::Relaxed)
}

impl std::fmt::Display for VfsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Some(s) => write!(f, "{}: {s}", self.errno),
            None => write!(f, "{}", self.errno),
        }
    }
}

impl std::error::Error for VfsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Errnos that mean a fault rather than an answer.
fn fault(e: Errno) -> bool {
    [Errno::EIO, Errno::ETIMEDOUT, Errno::ENOSPC].contains(&e)
}

impl From<Errno> for VfsError {
    fn from(errno: Errno) -> Self {
        Self { errno, level: if fault(errno) { Level::Fault } else { Level::Expected }, source: None }
    }
}

impl From<ClientError> for VfsError {
    fn from(e: ClientError) -> Self {
        let errno = e.errno();
        let level = match &e {
            ClientError::Fs(x) if !fault(*x) => Level::Expected,
            _ => Level::Fault,
        };
        Self { errno, level, source: Some(Arc::new(e)) }
    }
}

impl From<CacheError> for VfsError {
    fn from(e: CacheError) -> Self {
        if let CacheError::Meta(m) = e {
            return m.into();
        }
        Self { errno: e.errno(), level: Level::Fault, source: Some(Arc::new(e)) }
    }
}

impl From<VfsError> for Errno {
    fn from(e: VfsError) -> Self {
        e.errno
    }
}

impl PartialEq<Errno> for VfsError {
    fn eq(&self, other: &Errno) -> bool {
        self.errno == *other
    }
}

/// Results of the VFS.
pub type VfsResult<T> = Result<T, VfsError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_and_levels() {
        let e: VfsError = Errno::ENOENT.into();
        assert_eq!((e.errno(), e.level()), (Errno::ENOENT, Level::Expected));
        let e: VfsError = ClientError::Unavailable("no leader".into()).into();
        assert_eq!((e.errno(), e.level()), (Errno::ETIMEDOUT, Level::Fault));
        assert!(e.to_string().contains("no leader"), "{e}");
        let e: VfsError = CacheError::Meta(ClientError::Fs(Errno::EEXIST)).into();
        assert_eq!((e.errno(), e.level()), (Errno::EEXIST, Level::Expected));
        let e: VfsError = CacheError::NoNodes("none".into()).into();
        assert_eq!((e.errno(), e.level()), (Errno::EIO, Level::Fault));
    }
}
