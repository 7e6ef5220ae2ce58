//! Mounting a VFS with FUSE: the mount options (`nosuid,nodev` unless asked, `allow_other`
//! only where the kernel allows it), the session's threads, the invalidation thread, and
//! freeing a dead mount left behind by a killed process.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::sync::mpsc;

use fuser::{Config, INodeNo, MountOption, Notifier, SessionACL};

use crate::fuse::EleaFs;
use crate::vfs::{Inval, Vfs};

/// Sends invalidations to the kernel from a thread of its own (a notification may wait on
/// a kernel lock that a request in flight holds).
fn start_notifier(vfs: &Vfs, notifier: Notifier) {
    let (tx, rx) = mpsc::channel::<Inval>();
    vfs.set_invalidator(move |i| {
        let _ = tx.send(i);
    });
    let spawned = std::thread::Builder::new().name("elea-inval".into()).spawn(move || {
        for i in rx {
            let r = match &i {
                Inval::Inode(ino) => notifier.inval_inode(INodeNo(*ino), 0, 0),
                // A negative offset: the attributes only, no cached pages.
                Inval::Attrs(ino) => notifier.inval_inode(INodeNo(*ino), -1, 0),
                Inval::Entry(parent, name) => notifier.inval_entry(INodeNo(*parent), OsStr::from_bytes(name)),
                Inval::All => Ok(()),
            };
            // ENOENT: the kernel does not cache it. Anything else is worth a line.
            if let Err(e) = r
                && e.raw_os_error() != Some(libc::ENOENT)
            {
                tracing::debug!(?i, error = %e, "kernel invalidation failed");
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the invalidation thread: other nodes' changes reach this mount only through its cache timeouts");
    }
}

/// A mounted volume. [`Mounted::detach`] unmounts it; the session ends when the kernel has
/// let go of it (or when this process exits).
pub struct Mounted {
    thread: std::thread::JoinHandle<std::io::Result<()>>,
    unmounter: fuser::SessionUnmounter,
}

impl Mounted {
    /// Whether the kernel ended the session (for example an external `umount`).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Detaches the mount (lazily, as `umount -l`: processes with files still open keep
    /// them until they close them or this process exits).
    pub fn detach(&mut self) -> std::io::Result<()> {
        self.unmounter.unmount()
    }
}

/// How a volume is mounted.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// The name `mount` and `/proc/mounts` show.
    pub fsname: String,
    /// Honour set-user-id and set-group-id bits of files on the mount. Off by default: any
    /// host that can write to the volume could otherwise plant a set-id binary that runs
    /// with its owner's rights here.
    pub suid: bool,
    /// Honour device nodes on the mount (off by default, for the same reason).
    pub dev: bool,
}

impl MountConfig {
    pub fn new(fsname: &str) -> Self {
        Self { fsname: fsname.to_string(), suid: false, dev: false }
    }
}

/// Whether every local user may use the mount (`allow_other`), and why not when not. Root
/// may always ask for it; anyone else mounts through `fusermount3`, which refuses it unless
/// `/etc/fuse.conf` has a `user_allow_other` line.
fn allow_other(root: bool) -> Result<(), String> {
    if root || fuse_conf_allows_other(&std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default()) {
        Ok(())
    } else {
        Err("not running as root and /etc/fuse.conf has no `user_allow_other` line: only this user \
             can use the mount (add the line to share it with other users)"
            .into())
    }
}

/// Whether a fuse.conf text enables `user_allow_other` (a line of its own, not commented out).
fn fuse_conf_allows_other(conf: &str) -> bool {
    conf.lines().any(|l| l.split('#').next().is_some_and(|l| l.trim() == "user_allow_other"))
}

/// The kernel mount options for `cfg` (`allow_other` is the session's ACL, not listed here).
fn mount_options(cfg: &MountConfig) -> Vec<MountOption> {
    vec![
        MountOption::FSName(cfg.fsname.clone()),
        MountOption::Subtype("elea".into()),
        MountOption::RW,
        if cfg.dev { MountOption::Dev } else { MountOption::NoDev },
        if cfg.suid { MountOption::Suid } else { MountOption::NoSuid },
        MountOption::Exec,
    ]
}

/// Mounts `vfs` at `mountpoint`. Every local user may use the mount (`allow_other`) when the
/// process may ask for that (root, or `user_allow_other` in `/etc/fuse.conf`); permissions
/// are then checked by the VFS itself. Otherwise only the mounting user may use it, and a
/// warning says why. A user who is not root mounts through the set-user-id `fusermount3`,
/// which opens `/dev/fuse` with the user's own rights: that needs the device open to users
/// (Debian's udev rule makes it 0666), and says so clearly when it is not.
pub fn mount(
    vfs: Vfs,
    mountpoint: &Path,
    rt: tokio::runtime::Handle,
    mcfg: &MountConfig,
) -> std::io::Result<Mounted> {
    let root = is_root();
    if !root && let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        return Err(std::io::Error::new(
            e.kind(),
            format!(
                "cannot open /dev/fuse as this user ({e}): a mount by a user who is not root needs \
                 read and write access to it (mode 0666, as Debian's udev rule sets it), or run as root"
            ),
        ));
    }
    let mut cfg = Config::default();
    cfg.mount_options = mount_options(mcfg);
    cfg.acl = match allow_other(root) {
        Ok(()) => SessionACL::All,
        Err(why) => {
            tracing::warn!("{why}");
            SessionACL::Owner
        }
    };
    // Namespace requests run on these threads, and reads and writes start on them (see
    // `EleaFs::inline` and `EleaFs::fast_or_spawn`): enough of them that a few waiting on a
    // slow metadata answer do not hold up reads and writes.
    cfg.n_threads = Some(4);
    let fs = EleaFs::new(vfs.clone(), rt);
    let mut session = fuser::Session::new(fs, mountpoint, &cfg)?;
    start_notifier(&vfs, session.notifier());
    let unmounter = session.unmount_callable();
    let thread = std::thread::Builder::new().name("elea-fuse".into()).spawn(move || session.run())?;
    Ok(Mounted { thread, unmounter })
}

/// Whether this process runs as root (its effective uid, from /proc: the crate forbids the
/// unsafe call to geteuid).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().nth(1).map(str::to_owned))
        })
        .is_some_and(|euid| euid == "0")
}

/// Aborts the FUSE connection mounted at `mountpoint` (through the fusectl file system,
/// mounted on `/sys/fs/fuse/connections` first if needed; root only). Every request still
/// waiting on it fails with `ENOTCONN`. This is what frees applications and a killed daemon
/// when the daemon died while the kernel waited on both: an invalidation the daemon was
/// writing waits for a directory lock that an application's request holds, and that
/// request waits for a daemon that can no longer answer. Returns whether it aborted one.
pub fn abort_connection(mountpoint: &Path) -> bool {
    let Some(minor) = fuse_minor(mountpoint) else { return false };
    let ctl = Path::new("/sys/fs/fuse/connections");
    let abort = ctl.join(minor.to_string()).join("abort");
    if !abort.exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "fusectl"])
            .arg(ctl)
            .stderr(std::process::Stdio::null())
            .status();
    }
    std::fs::write(&abort, b"1").is_ok()
}

/// The device minor number of the FUSE mount at `mountpoint` (its connection and
/// backing-device name), from /proc/self/mountinfo.
fn fuse_minor(mountpoint: &Path) -> Option<u32> {
    // mountinfo lists absolute paths; the mount point itself may be dead (not statable), so
    // only its parent is resolved.
    let abs = match (mountpoint.parent(), mountpoint.file_name()) {
        (Some(p), Some(name)) => {
            let p = if p.as_os_str().is_empty() { Path::new(".") } else { p };
            std::fs::canonicalize(p).map(|p| p.join(name)).unwrap_or_else(|_| mountpoint.to_path_buf())
        }
        _ => mountpoint.to_path_buf(),
    };
    let want = abs.to_string_lossy().replace(' ', "\\040");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let f: Vec<&str> = left.split(' ').collect();
        let fuse = right.split(' ').next().is_some_and(|t| t == "fuse" || t.starts_with("fuse."));
        (fuse && f.get(4) == Some(&want.as_str()))
            .then(|| f.get(2)?.split_once(':')?.1.parse::<u32>().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuse_conf_user_allow_other() {
        assert!(fuse_conf_allows_other("user_allow_other\n"));
        assert!(fuse_conf_allows_other("# comment\nmount_max = 1000\n  user_allow_other  # shared\n"));
        assert!(!fuse_conf_allows_other("#user_allow_other\n"));
        assert!(!fuse_conf_allows_other("# user_allow_other\nmount_max = 1000\n"));
        assert!(!fuse_conf_allows_other(""));
    }

    #[test]
    fn mounts_are_nosuid_and_nodev_unless_asked() {
        let opts = mount_options(&MountConfig::new("elea:v"));
        assert!(opts.contains(&MountOption::NoSuid) && opts.contains(&MountOption::NoDev));
        assert!(!opts.contains(&MountOption::Suid) && !opts.contains(&MountOption::Dev));
        let opts = mount_options(&MountConfig { suid: true, dev: true, ..MountConfig::new("elea:v") });
        assert!(opts.contains(&MountOption::Suid) && opts.contains(&MountOption::Dev));
    }
}
