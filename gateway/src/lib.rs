//! The gateway: the POSIX VFS every front end shares ([`vfs`], with Linux permission rules
//! in [`perm`] and one error type in [`error`]) and the FUSE adapter ([`fuse`]).

pub mod error;
pub mod fuse;
pub mod perm;
pub mod vfs;

pub use error::{VfsError, VfsResult};
pub use fuse::{MountConfig, Mounted, mount};
pub use perm::Creds;
pub use vfs::{Inval, SetAttrReq, Vfs, VfsConfig};
