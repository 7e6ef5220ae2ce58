//! Real FUSE mounts: two `elea mount` processes of one volume (one metadata voter, one cache
//! node) show each other's changes as the consistency contract says (docs/SEMANTICS.md), and
//! `elea up` keeps every fsynced file across a crash and a restart.
//!
//! These need root and /dev/fuse. Without them each test prints SKIPPED and passes having run
//! nothing, unless `ELEA_REQUIRE_FUSE=1`, which makes that a failure; scripts/test.sh (and so
//! CI, which runs it) sets it.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use elea_common::pattern::pattern;
use elea_integration::{MetaProc, MountProc, elea_cli, free_port, fuse_available};
use nix::fcntl::{FcntlArg, fcntl};

struct TwoMounts {
    a: MountProc,
    b: MountProc,
    _site: Site,
}

/// One metadata voter and one cache node serving volume `v` (one copy per block, a local
/// directory as its store), the cache node registered.
struct Site {
    dir: tempfile::TempDir,
    meta_addr: String,
    _meta: MetaProc,
    _cache: MetaProc,
}

impl Site {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let meta_addr = format!("127.0.0.1:{}", free_port());
        let meta = MetaProc::start(
            1,
            &meta_addr,
            &dir.path().join("meta"),
            &["--initial-cluster".into(), format!("1={meta_addr}")],
        );
        let cache_addr = format!("127.0.0.1:{}", free_port());
        let cache = MetaProc::start_cache(
            1,
            &cache_addr,
            &dir.path().join("cache"),
            "local",
            &meta_addr,
            &["--staging-size", "1G"],
        );
        let objects = dir.path().join("objects");
        std::fs::create_dir_all(&objects).unwrap();
        let store = format!("file://{}", objects.display());
        // The metadata service may still be electing itself: retry the volume creation.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (ok, _, err) = elea_cli(&[
                "volume",
                "create",
                "v",
                "--meta",
                &meta_addr,
                "--store",
                &store,
                "--replicas",
                "1",
            ]);
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "volume create: {err}");
            std::thread::sleep(Duration::from_millis(200));
        }
        // Writes need the cache node registered; they would wait for it, but start mounts
        // only once it is alive.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (ok, out, _) = elea_cli(&["status", "--json", "--meta", &meta_addr]);
            if ok && out.contains("\"alive\":true") {
                break;
            }
            assert!(Instant::now() < deadline, "cache node did not register");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { dir, meta_addr, _meta: meta, _cache: cache }
    }
}

impl TwoMounts {
    fn start() -> Self {
        let site = Site::start();
        let (dir, meta_addr) = (site.dir.path(), &site.meta_addr);
        let mount = |name: &str| {
            let mp = dir.join(name);
            let args: Vec<String> = ["mount", "--meta", meta_addr, "--volume", "v", mp.to_str().unwrap()]
                .iter()
                .map(|s| s.to_string())
                .collect();
            MountProc::start(&args, &mp, &dir.join(format!("{name}.log")))
        };
        let a = mount("a");
        let b = mount("b");
        Self { a, b, _site: site }
    }

    fn pa(&self, rel: &str) -> PathBuf {
        self.a.mountpoint.join(rel)
    }

    fn pb(&self, rel: &str) -> PathBuf {
        self.b.mountpoint.join(rel)
    }
}

fn write_close(p: &Path, data: &[u8]) {
    let mut f = File::create(p).unwrap();
    f.write_all(data).unwrap();
    drop(f);
}

#[test]
fn close_to_open_and_namespace_visibility_across_mounts() {
    if !fuse_available("close_to_open_and_namespace_visibility_across_mounts") {
        return;
    }
    let m = TwoMounts::start();
    // Close-to-open: after write+close on A, open+read on B returns the new bytes, every
    // time, including overwrites that shrink and grow the file.
    for (i, len) in [0usize, 1, 4096, 100_000, 5 << 20, 3, 1 << 20].into_iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        write_close(&m.pa("f"), &data);
        let got = std::fs::read(m.pb("f")).unwrap();
        assert!(got == data, "round {i}: B read {} bytes, A wrote {len}", got.len());
    }
    // And the other way round.
    write_close(&m.pb("g"), b"from b");
    assert_eq!(std::fs::read(m.pa("g")).unwrap(), b"from b");

    // Namespace changes are visible at once on the other mount.
    std::fs::create_dir(m.pa("d")).unwrap();
    assert!(std::fs::metadata(m.pb("d")).unwrap().is_dir());
    std::fs::rename(m.pa("f"), m.pa("d/f2")).unwrap();
    assert_eq!(std::fs::metadata(m.pb("f")).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(std::fs::read(m.pb("d/f2")).unwrap(), pattern(7, 1 << 20));
    std::fs::remove_file(m.pa("d/f2")).unwrap();
    assert_eq!(std::fs::metadata(m.pb("d/f2")).unwrap_err().kind(), ErrorKind::NotFound);
    let names: Vec<String> = std::fs::read_dir(m.pb("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.is_empty(), "{names:?}");
    std::fs::remove_dir(m.pb("d")).unwrap();
    assert_eq!(std::fs::metadata(m.pa("d")).unwrap_err().kind(), ErrorKind::NotFound);
    // Permissions and ownership changes too.
    std::fs::set_permissions(m.pa("g"), std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(m.pb("g")).unwrap().permissions()) & 0o777,
        0o640
    );
}

#[test]
fn open_reader_sees_fsynced_writes_from_the_other_mount() {
    if !fuse_available("open_reader_sees_fsynced_writes_from_the_other_mount") {
        return;
    }
    let m = TwoMounts::start();
    write_close(&m.pa("f"), &pattern(0, 64 << 10));
    // B opens the file once and keeps it open; it reads it, so its page cache holds it.
    let reader = File::open(m.pb("f")).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    reader.read_exact_at(&mut buf, 0).unwrap();
    let writer = OpenOptions::new().write(true).open(m.pa("f")).unwrap();
    let mut lat = Vec::new();
    for round in 1..=20u64 {
        // Overwrite the first 64 KiB and grow the file by 4 KiB each round.
        let data = pattern(round, 64 << 10);
        writer.write_all_at(&data, 0).unwrap();
        let size = (64 << 10) + round * 4096;
        writer.write_all_at(&pattern(100 + round, 4096), size - 4096).unwrap();
        writer.sync_all().unwrap();
        let t = Instant::now();
        loop {
            let fresh_size = reader.metadata().unwrap().len() == size;
            let mut got = vec![0u8; 64 << 10];
            reader.read_exact_at(&mut got, 0).unwrap();
            if fresh_size && got == data {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "round {round}: the open reader never saw the new data"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    let median = lat[lat.len() / 2];
    eprintln!(
        "open reader on another mount saw fsynced data after: median {:?}, max {:?}",
        median,
        lat[lat.len() - 1]
    );
    // The contract: within 50 ms (docs/SEMANTICS.md). The median is held to it; single
    // rounds on a loaded test machine get more room.
    assert!(median <= Duration::from_millis(50), "median {median:?} > 50 ms: {lat:?}");
    assert!(lat[lat.len() - 1] <= Duration::from_secs(1), "{lat:?}");
}

fn flock(kind: i32, start: i64, len: i64) -> libc::flock {
    libc::flock { l_type: kind as i16, l_whence: libc::SEEK_SET as i16, l_start: start, l_len: len, l_pid: 0 }
}

#[test]
fn record_locks_exclude_across_mounts() {
    if !fuse_available("record_locks_exclude_across_mounts") {
        return;
    }
    let m = TwoMounts::start();
    write_close(&m.pa("lk"), &[0u8; 1000]);
    let fa = OpenOptions::new().read(true).write(true).open(m.pa("lk")).unwrap();
    let fb = OpenOptions::new().read(true).write(true).open(m.pb("lk")).unwrap();
    fcntl(&fa, FcntlArg::F_SETLK(&flock(libc::F_WRLCK, 0, 100))).unwrap();
    // B conflicts on an overlapping range, not on a disjoint one.
    let e = fcntl(&fb, FcntlArg::F_SETLK(&flock(libc::F_WRLCK, 50, 10))).unwrap_err();
    assert!(matches!(e, nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES), "{e}");
    fcntl(&fb, FcntlArg::F_SETLK(&flock(libc::F_RDLCK, 200, 100))).unwrap();
    let mut q = flock(libc::F_WRLCK, 0, 0);
    fcntl(&fb, FcntlArg::F_GETLK(&mut q)).unwrap();
    assert_eq!(i32::from(q.l_type), libc::F_WRLCK, "B sees A's lock");
    assert_eq!((q.l_start, q.l_len), (0, 100));
    assert_eq!(q.l_pid as u32, std::process::id());
    // A waiting lock on B is granted once A closes its descriptor (which drops its locks).
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        fcntl(&fb, FcntlArg::F_SETLKW(&flock(libc::F_WRLCK, 0, 100))).unwrap();
        (t.elapsed(), fb)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "F_SETLKW must wait while A holds the lock");
    drop(fa);
    let (waited, fb) = waiter.join().unwrap();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    // Now A cannot take it.
    let fa = OpenOptions::new().read(true).write(true).open(m.pa("lk")).unwrap();
    let e = fcntl(&fa, FcntlArg::F_SETLK(&flock(libc::F_RDLCK, 10, 1))).unwrap_err();
    assert!(matches!(e, nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES), "{e}");
    drop(fb);
    fcntl(&fa, FcntlArg::F_SETLK(&flock(libc::F_RDLCK, 10, 1))).unwrap();
}

fn up_args(data: &Path, mp: &Path, meta_port: u16, cache_port: u16) -> Vec<String> {
    vec![
        "up".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{meta_port}"),
        "--cache-listen".into(),
        format!("127.0.0.1:{cache_port}"),
        "--staging-size".into(),
        "1G".into(),
        mp.display().to_string(),
    ]
}

#[test]
fn up_keeps_fsynced_files_across_crash_and_restart() {
    if !fuse_available("up_keeps_fsynced_files_across_crash_and_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mnt");
    let args = up_args(&dir.path().join("data"), &mp, free_port(), free_port());
    let mut up = MountProc::start(&args, &mp, &dir.path().join("up.log"));
    let mut files = Vec::new();
    std::fs::create_dir_all(mp.join("a/b")).unwrap();
    for (i, len) in [0usize, 10, 4096, 1 << 20, 9 << 20, 70 << 20].into_iter().enumerate() {
        let rel = if i % 2 == 0 { format!("a/f{i}") } else { format!("a/b/f{i}") };
        let data = pattern(i as u64 + 40, len);
        let mut f = File::create(mp.join(&rel)).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        // Kept open (never closed) for the crash: only the fsync vouches for it.
        std::mem::forget(f);
        files.push((rel, data));
    }
    std::os::unix::fs::symlink("a/f0", mp.join("link")).unwrap();
    // Crash: kill -9 of the whole embedded stack.
    up.restart();
    for (rel, data) in &files {
        let got = std::fs::read(mp.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}\n{}", up.log_tail()));
        assert!(got == *data, "{rel}: {} bytes back, {} written", got.len(), data.len());
    }
    assert_eq!(std::fs::read_link(mp.join("link")).unwrap(), Path::new("a/f0"));
    // A clean stop (SIGTERM) flushes buffered writes that were never fsynced.
    let data = pattern(99, 3 << 20);
    let mut f = File::create(mp.join("unsynced")).unwrap();
    f.write_all(&data).unwrap();
    // The file stays open: the stop must not wait for it, and must flush it first.
    let status = up.terminate(Duration::from_secs(30)).expect("elea up did not stop on SIGTERM");
    assert!(status.success(), "elea up exit status {status}: {}", up.log_tail());
    drop(f);
    elea_integration::force_unmount(&mp);
    let mut up = MountProc::start(&args, &mp, &dir.path().join("up.log"));
    assert!(std::fs::read(mp.join("unsynced")).unwrap() == data);
    for (rel, data) in &files {
        assert!(std::fs::read(mp.join(rel)).unwrap() == *data, "{rel}");
    }
    let status = up.terminate(Duration::from_secs(30)).expect("elea up did not stop on SIGTERM");
    assert!(status.success());
}

/// Runs `python3 -c SCRIPT ARGS...` with piped output (the lock tests need a process of its
/// own per lock owner; Python's `fcntl.lockf` is `F_SETLKW`).
fn python(script: &str, args: &[&Path]) -> std::process::Child {
    std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (the lock tests run a helper process in it)")
}

fn wait_exit(c: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(s) = c.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Read-your-writes on the writing mount: bytes written without fsync through one descriptor
/// are seen, size included, by every other descriptor and process on that mount (the kernel
/// takes the size from the mount's answers, and clips reads and places appends by it).
#[test]
fn every_descriptor_on_the_writing_mount_sees_buffered_writes() {
    if !fuse_available("every_descriptor_on_the_writing_mount_sees_buffered_writes") {
        return;
    }
    let m = TwoMounts::start();
    for round in 0..20u64 {
        let p = m.pa(&format!("ryw{round}"));
        let block = pattern(round + 100, 8192);
        let w = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        w.write_all_at(&block, 0).unwrap();
        // Another descriptor of this process, read at once (no stat first: the kernel clips
        // the read to the size the open's lookup reported).
        let r = File::open(&p).unwrap();
        let mut got = vec![0u8; 8192];
        let n = r.read_at(&mut got, 0).unwrap();
        assert_eq!(n, 8192, "round {round}: pread through a second descriptor");
        assert!(got == block, "round {round}: bytes through a second descriptor");
        // Another process does the same.
        let pread = "import os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\nsys.stdout.buffer.write(os.pread(fd, 8192, 0))\n";
        let out = python(pread, &[&p]).wait_with_output().unwrap();
        assert!(out.stdout == block, "round {round}: another process read {} bytes", out.stdout.len());
        // And appends to it.
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg("printf tail >> \"$1\"")
            .arg("sh")
            .arg(&p)
            .status()
            .unwrap();
        assert!(ok.success());
        let end = std::fs::metadata(&p).unwrap().len();
        assert_eq!(end, 8196, "round {round}: the append landed after the buffered bytes");
        drop((w, r));
        let mut want = block.clone();
        want.extend_from_slice(b"tail");
        assert!(
            std::fs::read(m.pb(&format!("ryw{round}"))).unwrap() == want,
            "round {round}: the other mount"
        );
    }
}

/// A process blocked in `F_SETLKW` that is killed goes away at once and never ends up
/// holding the lock; one interrupted by `alarm()` gets `EINTR`.
#[test]
fn killed_or_interrupted_lock_waiters() {
    if !fuse_available("killed_or_interrupted_lock_waiters") {
        return;
    }
    let m = TwoMounts::start();
    write_close(&m.pa("lk"), &[0u8; 100]);
    let holder = OpenOptions::new().read(true).write(true).open(m.pa("lk")).unwrap();
    fcntl(&holder, FcntlArg::F_SETLK(&flock(libc::F_WRLCK, 0, 0))).unwrap();
    let wait_lock = "import fcntl, sys\nf = open(sys.argv[1], 'r+')\nfcntl.lockf(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\nimport time\ntime.sleep(60)\n";
    for path in [m.pa("lk"), m.pb("lk")] {
        let mut waiter = python(wait_lock, &[&path]);
        std::thread::sleep(Duration::from_millis(1500));
        if let Some(s) = waiter.try_wait().unwrap() {
            let out = waiter.wait_with_output().unwrap();
            panic!(
                "{}: the waiter did not wait ({s}): {}{}",
                path.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        waiter.kill().unwrap();
        let t = Instant::now();
        assert!(wait_exit(&mut waiter, Duration::from_secs(5)).is_some(), "a killed waiter stays stuck");
        eprintln!("{}: killed waiter gone after {:?}", path.display(), t.elapsed());
    }
    // An alarm interrupts the wait.
    let alarm = "import fcntl, signal, sys\nclass Alarm(Exception): pass\ndef on_alarm(*_): raise Alarm()\nsignal.signal(signal.SIGALRM, on_alarm)\nf = open(sys.argv[1], 'r+')\nsignal.alarm(1)\ntry:\n    fcntl.lockf(f, fcntl.LOCK_EX)\n    print('locked', flush=True)\nexcept Alarm:\n    print('interrupted', flush=True)\n";
    let mut c = python(alarm, &[&m.pb("lk")]);
    assert!(wait_exit(&mut c, Duration::from_secs(5)).is_some(), "alarm() did not interrupt the wait");
    let out = c.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "interrupted");
    // The holder lets go: nobody holds the lock now (the dead waiters did not get it).
    drop(holder);
    let try_lock = "import fcntl, sys\nf = open(sys.argv[1], 'r+')\nfcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nprint('locked', flush=True)\n";
    let t = Instant::now();
    loop {
        let out = python(try_lock, &[&m.pb("lk")]).wait_with_output().unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the lock stays taken: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Mounts ignore set-id bits and device nodes unless asked (`--suid`, `--dev`).
#[test]
fn mounts_are_nosuid_and_nodev() {
    if !fuse_available("mounts_are_nosuid_and_nodev") {
        return;
    }
    let m = TwoMounts::start();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mp = m.a.mountpoint.canonicalize().unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap()))
        .expect("the mount is listed");
    let opts = line.split(' ').nth(5).unwrap();
    assert!(opts.split(',').any(|o| o == "nosuid") && opts.split(',').any(|o| o == "nodev"), "{line}");
}

/// `st_blocks` counts allocated bytes: it shrinks when a hole is punched.
#[test]
fn st_blocks_shrink_when_a_hole_is_punched() {
    if !fuse_available("st_blocks_shrink_when_a_hole_is_punched") {
        return;
    }
    use std::os::unix::fs::MetadataExt as _;
    let m = TwoMounts::start();
    let p = m.pa("sparse");
    write_close(&p, &pattern(5, 1 << 20));
    assert_eq!(std::fs::metadata(&p).unwrap().blocks(), 2048);
    let ok = std::process::Command::new("fallocate")
        .args(["--punch-hole", "--offset", "0", "--length", "524288"])
        .arg(&p)
        .status()
        .expect("fallocate (util-linux)");
    assert!(ok.success());
    assert_eq!(std::fs::metadata(&p).unwrap().blocks(), 1024);
    assert_eq!(std::fs::metadata(m.pb("sparse")).unwrap().blocks(), 1024);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
}

/// Runs `args` as user `nobody` (no supplementary groups); returns whether it succeeded, its
/// stdout and its stderr.
fn as_nobody(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run setpriv");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `/dev/fuse` with another mode for as long as this lives (then its old mode again).
struct DevFuseMode(u32);

impl DevFuseMode {
    fn set(mode: u32) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let old = std::fs::metadata("/dev/fuse").unwrap().permissions().mode() & 0o7777;
        std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(mode)).unwrap();
        Self(old)
    }
}

impl Drop for DevFuseMode {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(self.0));
    }
}

/// A user who is not root mounts a volume (through `fusermount3`, without `allow_other`
/// unless /etc/fuse.conf allows it), uses it, and unmounts it with `fusermount3 -u`.
/// `fusermount3` opens `/dev/fuse` with the user's rights: Debian's udev rule makes it 0666;
/// machines without udev leave it root's (0600), where the mount must say why it cannot
/// work. The test tries both modes and puts the device's own mode back.
#[test]
fn a_user_mounts_and_unmounts_with_fusermount3() {
    if !fuse_available("a_user_mounts_and_unmounts_with_fusermount3") {
        return;
    }
    let site = Site::start();
    let dir = site.dir.path();
    // nobody needs to reach the binary and own the mount point.
    let shared = dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    for d in [dir, shared.as_path()] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let bin = shared.join("elea");
    std::fs::copy(elea_integration::elea_bin(), &bin).unwrap();
    let mp = shared.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    assert!(std::process::Command::new("chown").args(["nobody"]).arg(&mp).status().unwrap().success());
    let nobody: u32 =
        String::from_utf8(std::process::Command::new("id").args(["-u", "nobody"]).output().unwrap().stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    // Root's own mount gives the user a directory of its own on the volume.
    let root_mp = dir.join("root-mnt");
    let args: Vec<String> = ["mount", "--meta", &site.meta_addr, "--volume", "v", root_mp.to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let root_mount = MountProc::start(&args, &root_mp, &dir.join("root-mount.log"));
    std::fs::create_dir(root_mp.join("home")).unwrap();
    std::os::unix::fs::chown(root_mp.join("home"), Some(nobody), None).unwrap();
    let log_path = dir.join("user-mount.log");
    let user_mount = || {
        let log = File::create(&log_path).unwrap();
        std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(&bin)
            .args(["mount", "--meta", &site.meta_addr, "--volume", "v"])
            .arg(&mp)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    // A device only root may open: a clear error, not a mount.
    let mode = DevFuseMode::set(0o600);
    let status = user_mount().wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!status.success() && log.contains("cannot open /dev/fuse as this user"), "{status}: {log}");
    assert!(!elea_integration::is_mounted(&mp));
    drop(mode);
    // Open to users, as on a Debian machine with udev.
    let _mode = DevFuseMode::set(0o666);
    let mut child = user_mount();
    struct Cleanup<'a>(&'a Path, &'a mut std::process::Child);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = self.1.kill();
            let _ = self.1.wait();
            elea_integration::force_unmount(self.0);
        }
    }
    let guard = Cleanup(&mp, &mut child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !elea_integration::is_mounted(&mp) {
        assert!(
            Instant::now() < deadline && guard.1.try_wait().unwrap().is_none(),
            "the user's mount did not come up: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Mounted by nobody: the kernel records the mounting user.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mounts.lines().find(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap())).expect("listed");
    assert!(line.contains(&format!("user_id={nobody}")), "{line}");
    assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");
    // Without user_allow_other in fuse.conf, the mount says why others cannot use it.
    let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    let allowed = conf.lines().any(|l| l.split('#').next().is_some_and(|l| l.trim() == "user_allow_other"));
    if !allowed {
        let log = std::fs::read_to_string(&log_path).unwrap();
        assert!(log.contains("user_allow_other"), "no word on allow_other: {log}");
    }
    // The user writes, reads back and owns what it creates; root's mount sees it too. The
    // volume's root stays root's.
    let f = mp.join("home/f");
    let f = f.to_str().unwrap();
    let (ok, out, err) =
        as_nobody(&["sh", "-c", &format!("printf hello > {f} && cat {f} && stat -c %u {f}")]);
    assert!(ok, "{err}");
    assert_eq!(out, format!("hello{nobody}\n"));
    let (ok, _, err) = as_nobody(&["touch", mp.join("g").to_str().unwrap()]);
    assert!(!ok && err.contains("Permission denied"), "{err}");
    assert_eq!(std::fs::read(root_mp.join("home/f")).unwrap(), b"hello");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(root_mp.join("home/f")).unwrap()),
        nobody
    );
    // fusermount3 -u by the user ends the mount, and the daemon exits cleanly.
    let (ok, _, err) = as_nobody(&["fusermount3", "-u", mp.to_str().unwrap()]);
    assert!(ok, "fusermount3 -u: {err}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = guard.1.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the mount process did not exit after fusermount3 -u");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}: {}", std::fs::read_to_string(&log_path).unwrap_or_default());
    assert!(!elea_integration::is_mounted(&mp));
    drop(root_mount);
}

/// A cluster whose processes all use certificates: a mount with a gateway certificate serves
/// the volume the certificate names (writes, fsync, reads back, and the cache node stages the
/// data), and mounting another volume with it, or any volume without a certificate, fails
/// with the reason.
#[test]
fn a_gateway_certificate_mounts_its_volume_and_no_other() {
    if !fuse_available("a_gateway_certificate_mounts_its_volume_and_no_other") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = d.join("ca");
    assert!(elea_cli(&["certs", "init", "--dir", ca.to_str().unwrap()]).0);
    let issue = |role: &str, name: &str, vol: Option<&str>| -> Vec<(String, String)> {
        let prefix = d.join(format!("{role}-{name}"));
        let mut args = vec!["certs", "issue", "--dir", ca.to_str().unwrap(), "--role", role, "--name", name];
        args.extend(vol.map(|v| ["--volume", v]).into_iter().flatten());
        args.extend(["--out", prefix.to_str().unwrap()]);
        let (ok, _, err) = elea_cli(&args);
        assert!(ok, "{err}");
        vec![
            ("ELEA_CA".into(), ca.join("ca.pem").display().to_string()),
            ("ELEA_CERT".into(), prefix.with_extension("pem").display().to_string()),
            ("ELEA_KEY".into(), prefix.with_extension("key").display().to_string()),
        ]
    };
    let flags = |env: &[(String, String)]| -> Vec<String> {
        env.iter().flat_map(|(k, v)| [format!("--{}", k[5..].to_lowercase()), v.clone()]).collect()
    };
    let meta_addr = format!("127.0.0.1:{}", free_port());
    let mut meta_args = vec!["--initial-cluster".to_string(), format!("1={meta_addr}")];
    meta_args.extend(flags(&issue("meta", "1", None)));
    let _meta = MetaProc::start(1, &meta_addr, &d.join("meta"), &meta_args);
    let cache_flags = flags(&issue("cache", "c1", None));
    let mut cache_args: Vec<&str> = vec!["--staging-size", "1G"];
    cache_args.extend(cache_flags.iter().map(String::as_str));
    let _cache = MetaProc::start_cache(
        1,
        &format!("127.0.0.1:{}", free_port()),
        &d.join("cache"),
        "local",
        &meta_addr,
        &cache_args,
    );
    let admin = issue("admin", "ops", None);
    let gateway = issue("gateway", "host1", Some("v"));
    let store = format!("file://{}", d.join("objects").display());
    std::fs::create_dir_all(d.join("objects")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    for vol in ["v", "w"] {
        loop {
            let args = ["volume", "create", vol, "--meta", &meta_addr, "--store", &store, "--replicas", "1"];
            let (ok, _, err) = elea_integration::elea_cli_env(&args, &admin);
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "volume create: {err}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    loop {
        let (ok, out, _) =
            elea_integration::elea_cli_env(&["status", "--json", "--meta", &meta_addr], &admin);
        if ok && out.contains("\"alive\":true") {
            break;
        }
        assert!(Instant::now() < deadline, "cache node did not register");
        std::thread::sleep(Duration::from_millis(100));
    }

    let mp = d.join("mnt");
    let args: Vec<String> = ["mount", "--meta", &meta_addr, "--volume", "v", mp.to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mount = MountProc::start_wrapped(&args, &mp, &d.join("mount.log"), &[], &gateway);
    let data = pattern(3, 5 << 20);
    let mut f = File::create(mp.join("f")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert!(std::fs::read(mp.join("f")).unwrap() == data, "the file read back differs");
    // The cache node staged it (it reports with its next heartbeat).
    loop {
        let (ok, out, err) =
            elea_integration::elea_cli_env(&["status", "--json", "--meta", &meta_addr], &admin);
        if ok && out.contains("\"staged_bytes\":") && !out.contains("\"staged_bytes\":0,") {
            break;
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(30),
            "the cache node staged nothing: {out}{err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The same certificate on another volume, and no certificate at all: refused, with why.
    for (vol, env, want) in
        [("w", gateway.clone(), "may not use volume \"w\""), ("v", vec![], "hint: the service may require")]
    {
        let mp2 = d.join(format!("mnt-{vol}-{}", env.len()));
        std::fs::create_dir_all(&mp2).unwrap();
        let mut c = std::process::Command::new(elea_integration::elea_bin())
            .args(["mount", "--meta", &meta_addr, "--volume", vol, mp2.to_str().unwrap()])
            .env_remove("ELEA_CA")
            .env_remove("ELEA_CERT")
            .env_remove("ELEA_KEY")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_exit(&mut c, Duration::from_secs(60));
        if status.is_none() {
            let _ = c.kill();
        }
        let mut err = String::new();
        std::io::Read::read_to_string(&mut c.stderr.take().unwrap(), &mut err).unwrap();
        assert!(
            status.is_some_and(|s| !s.success()) && err.contains(want),
            "mount of {vol}: {status:?} {err}"
        );
        assert!(!elea_integration::is_mounted(&mp2));
    }
    drop(mount);
}
