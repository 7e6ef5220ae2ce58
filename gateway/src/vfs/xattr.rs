//! Extended attributes, with Linux's rules per namespace.

use elea_cache::DataPath;
use elea_common::{Errno, Ino};
use elea_fsm::{FileType, mode};
use elea_metadata::MetaApi;

use super::{Vfs, is_dir};
use crate::error::VfsResult;
use crate::perm::{self, Creds, MAY_READ, MAY_WRITE};

impl<M: MetaApi, D: DataPath> Vfs<M, D> {
    /// Checks an xattr access by namespace, as Linux does: `user.` follows the file's
    /// permissions (regular files and directories only; in a sticky directory only its
    /// owner may write), `trusted.` is root's, `security.` is open, and `system.` (ACLs)
    /// is not supported.
    async fn xattr_access(&self, c: &Creds, ino: Ino, name: &[u8], write: bool) -> VfsResult<()> {
        if name.starts_with(b"user.") {
            let a = self.attr_of(ino).await?;
            let t = a.file_type();
            if !matches!(t, Some(FileType::Regular | FileType::Directory)) {
                return Err(if write { Errno::EPERM } else { Errno::ENODATA }.into());
            }
            if write && is_dir(&a) && a.mode & mode::S_ISVTX != 0 && !perm::owner_or_root(c, &a) {
                return Err(Errno::EPERM.into());
            }
            Ok(perm::check(c, &a, if write { MAY_WRITE } else { MAY_READ })?)
        } else if name.starts_with(b"trusted.") {
            if c.is_root() { Ok(()) } else { Err(Errno::EPERM.into()) }
        } else if name.starts_with(b"security.") {
            if write {
                let a = self.attr_of(ino).await?;
                if !perm::owner_or_root(c, &a) {
                    return Err(Errno::EPERM.into());
                }
            }
            Ok(())
        } else {
            Err(Errno::EOPNOTSUPP.into())
        }
    }

    pub async fn setxattr(
        &self,
        c: &Creds,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: u32,
    ) -> VfsResult<()> {
        self.xattr_access(c, ino, name, true).await?;
        Ok(self.inner.meta.setxattr(self.inner.vol, ino, name, value, flags).await?)
    }

    pub async fn getxattr(&self, c: &Creds, ino: Ino, name: &[u8]) -> VfsResult<Vec<u8>> {
        self.xattr_access(c, ino, name, false).await?;
        Ok(self.inner.meta.getxattr(self.inner.vol, ino, name).await?)
    }

    /// Names of the inode's xattrs that `c` may see (`trusted.` ones only for root).
    pub async fn listxattr(&self, c: &Creds, ino: Ino) -> VfsResult<Vec<Vec<u8>>> {
        let names = self.inner.meta.listxattr(self.inner.vol, ino).await?;
        Ok(names.into_iter().filter(|n| c.is_root() || !n.starts_with(b"trusted.")).collect())
    }

    pub async fn removexattr(&self, c: &Creds, ino: Ino, name: &[u8]) -> VfsResult<()> {
        self.xattr_access(c, ino, name, true).await?;
        Ok(self.inner.meta.removexattr(self.inner.vol, ino, name).await?)
    }
}
