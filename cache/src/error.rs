//! Errors of the cache node and the data client, and their mapping to gRPC statuses.

use elea_metadata::client::ClientError;
use elea_store::StoreError;

/// A failed cache or data-path operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("a block of {len} bytes can never fit a staging store of {capacity} bytes")]
    TooLarge { len: u64, capacity: u64 },
    #[error("checksum mismatch: {0}")]
    Checksum(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("cache node {addr}: {msg}")]
    Peer { addr: String, msg: String, retryable: bool },
    #[error("object store: {0}")]
    Store(#[from] StoreError),
    #[error("metadata: {0}")]
    Meta(#[from] ClientError),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not enough cache nodes: {0}")]
    NoNodes(String),
    #[error("object stores fail their probe: {0}")]
    StoresFailing(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl CacheError {
    pub fn io(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io { what, path: path.display().to_string(), source }
    }

    /// Whether trying again (maybe elsewhere) can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Io { .. }
            | Self::NoNodes(_)
            | Self::StoresFailing(_)
            | Self::Internal(_)
            | Self::Checksum(_) => true,
            Self::Peer { retryable, .. } => *retryable,
            Self::Store(e) => e.is_retryable(),
            Self::Meta(e) => matches!(e, ClientError::Unavailable(_)),
            Self::TooLarge { .. } | Self::Conflict(_) | Self::NotFound(_) | Self::BadRequest(_) => false,
        }
    }

    /// The errno a file system front end reports.
    pub fn errno(&self) -> elea_common::Errno {
        use elea_common::Errno;
        match self {
            Self::Meta(e) => e.errno(),
            Self::NoNodes(_) => Errno::EIO,
            Self::TooLarge { .. } => Errno::EFBIG,
            Self::BadRequest(_) => Errno::EINVAL,
            _ => Errno::EIO,
        }
    }
}

impl From<CacheError> for tonic::Status {
    fn from(e: CacheError) -> Self {
        let msg = e.to_string();
        match e {
            CacheError::NotFound(_) => tonic::Status::not_found(msg),
            CacheError::BadRequest(_) | CacheError::TooLarge { .. } => tonic::Status::invalid_argument(msg),
            CacheError::Conflict(_) => tonic::Status::already_exists(msg),
            CacheError::Checksum(_) | CacheError::Store(StoreError::Corrupt { .. }) => {
                tonic::Status::data_loss(msg)
            }
            e if e.is_retryable() => tonic::Status::unavailable(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

/// A gRPC failure from a peer, as an error that says whether to retry.
pub(crate) fn from_status(addr: &str, s: &tonic::Status) -> CacheError {
    use tonic::Code;
    match s.code() {
        Code::NotFound => CacheError::NotFound(format!("{addr}: {}", s.message())),
        Code::InvalidArgument => CacheError::BadRequest(format!("{addr}: {}", s.message())),
        Code::AlreadyExists => CacheError::Conflict(format!("{addr}: {}", s.message())),
        code => CacheError::Peer {
            addr: addr.to_string(),
            msg: format!("{code:?}: {}", s.message()),
            // DataLoss: the node found every copy it could reach corrupt (a retry finds the same).
            retryable: !matches!(
                code,
                Code::Unimplemented | Code::PermissionDenied | Code::Unauthenticated | Code::DataLoss
            ),
        },
    }
}
