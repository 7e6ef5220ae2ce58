//! The gateway: the POSIX VFS every front end shares ([`vfs`], with Linux permission rules
//! in [`perm`] and one error type in [`error`]), the FUSE adapter ([`fuse`]) and its mounts
//! ([`mount`]).

pub mod error;
pub mod fuse;
pub mod mount;
pub mod perm;
pub mod vfs;

pub use error::{VfsError, VfsResult};
pub use mount::{MountConfig, Mounted, mount};
pub use perm::Creds;
pub use vfs::{Inval, SetAttrReq, Vfs, VfsConfig};
