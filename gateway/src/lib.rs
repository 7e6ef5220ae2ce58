//! The gateway: the POSIX VFS every front end shares ([`vfs`], with Linux permission rules
//! in [`perm`]) and the FUSE adapter ([`fuse`]).

pub mod fuse;
pub mod perm;
pub mod vfs;

pub use fuse::{Mounted, mount};
pub use perm::Creds;
pub use vfs::{Inval, SetAttrReq, Vfs, VfsConfig};
