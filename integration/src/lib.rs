//! Multi-process cluster harness: starts real `elea meta` processes on loopback ports, kills
//! them with SIGKILL, restarts them on their data directories, and waits for cluster states.
//! The tests live in `tests/`.

pub mod appends;
pub mod chaos;
pub mod history;
pub mod netns;

pub use elea_sandbox::{sites, wan};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use elea_metadata::client::{ClientConfig, MetaClient};
use elea_metadata::proto::StatusReply;

/// The `elea` binary under test: `$ELEA_BIN`, or the one next to this test executable's
/// target directory (`cargo build -p elea` builds it; `cargo test --workspace` does too).
pub fn elea_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ELEA_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("elea");
    assert!(bin.exists(), "{} is missing: run `cargo build -p elea` first (or set ELEA_BIN)", bin.display());
    bin
}

/// A free loopback port (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// One `elea meta` (or `elea cache`) process.
pub struct MetaProc {
    /// The subcommand: "meta" or "cache".
    pub role: &'static str,
    pub id: u64,
    pub addr: String,
    pub dir: PathBuf,
    pub args: Vec<String>,
    /// Command prefix the process runs under (e.g. `nsenter --net=...`), empty for none.
    pub wrap: Vec<String>,
    /// Extra environment variables of the process (object store credentials), kept across
    /// restarts.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
}

/// `elea` run under an optional command prefix (`nsenter --net=... --` for a namespace).
fn elea_command(wrap: &[String]) -> Command {
    match wrap.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(elea_bin());
            c
        }
        None => Command::new(elea_bin()),
    }
}

impl MetaProc {
    /// Starts `elea meta --node-id ID --listen ADDR --data-dir DIR <extra>`.
    pub fn start(id: u64, addr: &str, dir: &Path, extra: &[String]) -> Self {
        Self::start_role("meta", id, addr, dir, extra)
    }

    /// Starts `elea cache --node-id ID --listen ADDR --data-dir DIR --site SITE --meta META <extra>`.
    pub fn start_cache(id: u64, addr: &str, dir: &Path, site: &str, meta: &str, extra: &[&str]) -> Self {
        let mut args: Vec<String> = vec!["--site".into(), site.into(), "--meta".into(), meta.into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_role("cache", id, addr, dir, &args)
    }

    fn start_role(role: &'static str, id: u64, addr: &str, dir: &Path, extra: &[String]) -> Self {
        Self::start_wrapped(role, id, addr, dir, extra, &[], &[])
    }

    /// Starts `elea ROLE --node-id ID --listen ADDR --data-dir DIR <extra>` under the command
    /// prefix `wrap` (see [`netns::Host::command_prefix`]) with extra environment variables.
    pub fn start_wrapped(
        role: &'static str,
        id: u64,
        addr: &str,
        dir: &Path,
        extra: &[String],
        wrap: &[String],
        env: &[(String, String)],
    ) -> Self {
        let mut p = Self {
            role,
            id,
            addr: addr.to_string(),
            dir: dir.to_path_buf(),
            args: extra.to_vec(),
            wrap: wrap.to_vec(),
            env: env.to_vec(),
            child: None,
            log: dir.with_extension("log"),
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = elea_command(&self.wrap)
            .arg(self.role)
            .args(["--node-id", &self.id.to_string(), "--listen", &self.addr])
            .arg("--data-dir")
            .arg(&self.dir)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn elea");
        self.child = Some(child);
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `timeout` for the process to exit; returns its exit status
    /// (`None` if it is still running, in which case it is killed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        terminate_child(self.child.take()?, timeout)
    }

    /// Starts the process again on the same data directory and flags.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn is_running(&mut self) -> bool {
        child_running(&mut self.child)
    }

    /// Sends a signal by name ("STOP", "CONT", ...) to the running process.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").arg(format!("-{sig}")).arg(c.id().to_string()).status();
        }
    }

    /// The last lines of this node's log (for failure messages).
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// How many lines of this node's log (all its runs) contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().filter(|l| l.contains(needle)).count()
    }
}

/// SIGTERM, then waits up to `timeout` for the exit status (`None`: it did not stop and was
/// killed).
fn terminate_child(mut child: Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn child_running(child: &mut Option<Child>) -> bool {
    child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
}

/// The last 30 lines of a process log (for failure messages).
fn log_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Drop for MetaProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A cluster of metadata processes in a temporary directory.
pub struct Cluster {
    pub nodes: Vec<MetaProc>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` voters (ids 1..=n) with `extra` flags for every node.
    pub fn start(n: u64, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let addrs: Vec<String> = (1..=n).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let ic =
            addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
        let mut args: Vec<String> = vec!["--initial-cluster".into(), ic];
        args.extend(extra.iter().map(|s| s.to_string()));
        let nodes = (1..=n)
            .map(|id| {
                let i = usize::try_from(id - 1).unwrap_or(0);
                MetaProc::start(id, &addrs[i], &dir.path().join(format!("n{id}")), &args)
            })
            .collect();
        Self { nodes, dir }
    }

    /// Comma-separated addresses of every node (running or not).
    pub fn addrs(&self) -> String {
        self.nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",")
    }

    pub fn client(&self) -> MetaClient {
        let addrs: Vec<String> = self.nodes.iter().map(|n| n.addr.clone()).collect();
        MetaClient::connect(&addrs, ClientConfig::default()).expect("client")
    }

    pub fn node(&mut self, id: u64) -> &mut MetaProc {
        self.nodes.iter_mut().find(|n| n.id == id).expect("no such node")
    }

    /// Every node's log tail, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- node {} ---\n{}", n.id, n.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Status of every reachable address.
pub async fn statuses(c: &MetaClient, addrs: &[String]) -> Vec<StatusReply> {
    let mut out = Vec::new();
    for a in addrs {
        if let Ok(s) = c.status_of(a).await {
            out.push(s);
        }
    }
    out
}

/// Waits until some node among `addrs` reports being the leader; returns its status.
pub async fn wait_leader(c: &MetaClient, addrs: &[String], timeout: Duration) -> Option<StatusReply> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(s) = statuses(c, addrs).await.into_iter().find(|s| s.role == "leader") {
            return Some(s);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Waits until `pred` holds for the status of the node at `addr`.
pub async fn wait_status(
    c: &MetaClient,
    addr: &str,
    timeout: Duration,
    pred: impl Fn(&StatusReply) -> bool,
) -> Option<StatusReply> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(s) = c.status_of(addr).await
            && pred(&s)
        {
            return Some(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Runs the `elea` CLI with arguments; returns (success, stdout, stderr).
pub fn elea_cli(args: &[&str]) -> (bool, String, String) {
    elea_cli_env(args, &[])
}

/// Like [`elea_cli`], with extra environment variables (e.g. object store credentials).
pub fn elea_cli_env(args: &[&str], env: &[(String, String)]) -> (bool, String, String) {
    let out = Command::new(elea_bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .expect("run elea");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether FUSE mounts can be tested here (root and `/dev/fuse`). When they cannot, the
/// reason is printed and the test returns early (it passes having checked nothing); with
/// `ELEA_REQUIRE_FUSE=1`, which scripts/test.sh (and so CI) sets, it fails instead.
pub fn fuse_available(test: &str) -> bool {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let dev = Path::new("/dev/fuse").exists();
    if root && dev {
        return true;
    }
    let why = if root { "/dev/fuse is missing" } else { "not running as root" };
    assert!(
        std::env::var("ELEA_REQUIRE_FUSE").as_deref() != Ok("1"),
        "{test}: FUSE tests required (ELEA_REQUIRE_FUSE=1), but {why}"
    );
    eprintln!("SKIPPED {test}: needs root and /dev/fuse ({why})");
    false
}

/// Whether every process of a fault scenario can get a network namespace of its own (root,
/// iproute2's `ip` and `tc`, util-linux's `nsenter`, and not turned off with
/// `CHAOS_NETNS=0`; see [`netns::unavailable`]), which the scenarios that cut or slow links
/// need. When they cannot, the reason is printed and the test returns early (it passes having
/// checked nothing); with `ELEA_REQUIRE_NETNS=1`, which scripts/test.sh (and so CI) sets, it
/// fails instead.
pub fn network_available(test: &str) -> bool {
    let Some(why) = netns::unavailable() else {
        return true;
    };
    assert!(
        std::env::var("ELEA_REQUIRE_NETNS").as_deref() != Ok("1"),
        "{test}: network namespaces required (ELEA_REQUIRE_NETNS=1), but {why}"
    );
    eprintln!("SKIPPED {test}: needs network namespaces (root, ip, tc, nsenter; {why})");
    false
}

/// Whether `path` is a mount point (from /proc/mounts).
pub fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
}

/// Detaches a mount point (a crashed mount leaves it "not connected"), aborting its FUSE
/// connection first so nothing stays blocked on it.
pub fn force_unmount(path: &Path) {
    if is_mounted(path) {
        elea_gateway::mount::abort_connection(path);
        let _ = Command::new("umount").arg("-l").arg(path).status();
    }
}

/// An `elea mount` or `elea up MOUNTPOINT` process: started, waited for until its mount
/// point is mounted, stopped with SIGTERM (a clean unmount) or SIGKILL.
pub struct MountProc {
    pub mountpoint: PathBuf,
    args: Vec<String>,
    wrap: Vec<String>,
    /// Extra environment variables (object store credentials), kept across restarts.
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
}

impl MountProc {
    /// Runs `elea <args...>` (whose last argument is the mount point) and waits up to 30 s
    /// for the mount.
    pub fn start(args: &[String], mountpoint: &Path, log: &Path) -> Self {
        Self::start_wrapped(args, mountpoint, log, &[], &[])
    }

    /// Like [`Self::start`], under the command prefix `wrap` (a network namespace), with extra
    /// environment variables (e.g. object store credentials).
    pub fn start_wrapped(
        args: &[String],
        mountpoint: &Path,
        log: &Path,
        wrap: &[String],
        env: &[(String, String)],
    ) -> Self {
        std::fs::create_dir_all(mountpoint).expect("mount point");
        let mut p = Self {
            mountpoint: mountpoint.to_path_buf(),
            args: args.to_vec(),
            wrap: wrap.to_vec(),
            env: env.to_vec(),
            child: None,
            log: log.into(),
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = elea_command(&self.wrap)
            .args(&self.args)
            // The caller's environment may ask for more (or less) logging.
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn elea");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&self.mountpoint) {
            assert!(
                Instant::now() < deadline && self.is_running(),
                "{} was not mounted: {}",
                self.mountpoint.display(),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        child_running(&mut self.child)
    }

    /// SIGTERM and wait for a clean exit (flush, unmount); returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let status = terminate_child(self.child.take()?, timeout);
        if status.is_none() {
            force_unmount(&self.mountpoint);
        }
        status
    }

    /// SIGKILL: nothing is flushed; the mount is left dead and then detached.
    pub fn kill9(&mut self) {
        self.crash();
        force_unmount(&self.mountpoint);
    }

    /// SIGKILL, leaving the dead mount in place as a crash does (its connection is aborted,
    /// so applications get `ENOTCONN` instead of waiting); [`Self::restart`] replaces it.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            elea_gateway::mount::abort_connection(&self.mountpoint);
            let _ = c.wait();
        }
    }

    /// Starts the same command again.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

impl Drop for MountProc {
    fn drop(&mut self) {
        self.kill9();
    }
}
