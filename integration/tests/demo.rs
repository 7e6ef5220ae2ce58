//! `elea demo`: two sites on this machine come up in network namespaces joined by WAN links,
//! the JSON it writes describes them truly (the CLI reaches them with its certificates, a
//! volume homed in the second site mounts there and works), and SIGTERM stops every process
//! and removes the namespaces.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use elea_integration::{MountProc, elea_bin, elea_cli_env, fuse_available, network_available};

/// The `elea demo` process; stopped (SIGTERM, then SIGKILL) when dropped, so a failed check
/// leaves no sandbox behind.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn cli(args: &[&str], env: &[(String, String)]) -> serde_json::Value {
    let (ok, out, err) = elea_cli_env(args, env);
    assert!(ok, "elea {args:?}: {out}{err}");
    if out.trim_start().starts_with('{') {
        serde_json::from_str(&out).expect("json")
    } else {
        serde_json::Value::Null
    }
}

#[test]
fn demo_starts_two_sites_describes_them_and_stops_everything() {
    if !fuse_available("demo") || !network_available("demo") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo.json");
    let log = tmp.path().join("demo.log");
    let logf = std::fs::File::create(&log).unwrap();
    let dir = tmp.path().join("d");
    let demo = Command::new(elea_bin())
        .arg("demo")
        .arg("--dir")
        .arg(&dir)
        .args(["--sites", "a,b", "--cache-per-site", "2", "--staging-size", "512M", "--json-out"])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .unwrap();
    let mut demo = Demo(demo);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.exists() {
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        assert!(demo.0.try_wait().unwrap().is_none(), "elea demo exited: {}", log_text());
        assert!(Instant::now() < deadline, "elea demo did not describe its sites: {}", log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    let desc: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(desc["netns"], true, "{desc}");
    let env: Vec<(String, String)> = [
        ("ELEA_META", &desc["meta"]),
        ("ELEA_CA", &desc["certs"]["ca"]),
        ("ELEA_CERT", &desc["certs"]["cert"]),
        ("ELEA_KEY", &desc["certs"]["key"]),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.as_str().expect("a string").to_string()))
    .collect();
    let mut pids = Vec::new();
    for site in ["a", "b"] {
        let s = &desc["sites"][site];
        assert_eq!(s["meta"].as_array().map(Vec::len), Some(1), "{desc}");
        assert_eq!(s["cache"].as_array().map(Vec::len), Some(2), "{desc}");
        pids.extend(s["pids"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()));
    }
    assert_eq!(pids.len(), 6);

    // The CLI sees both sites with their nodes; the voter, and so the leader, is in a.
    let sites = cli(&["site", "list", "--json"], &env);
    let ids = |site: &str, key: &str| -> Vec<u64> {
        let s = sites["sites"].as_array().unwrap().iter().find(|s| s["name"] == site).expect("site").clone();
        s[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
    };
    assert_eq!((ids("a", "meta_nodes"), ids("b", "meta_nodes")), (vec![11], vec![21]), "{sites}");
    assert_eq!(
        (ids("a", "cache_nodes"), ids("b", "cache_nodes")),
        (vec![101, 102], vec![201, 202]),
        "{sites}"
    );

    // A volume homed in b, mounted in b's namespace: it works. Its Raft group's voter is b's
    // metadata node, so its leader is in b (the control group's is in a).
    let store_b = desc["sites"]["b"]["store"].as_str().unwrap();
    cli(&["volume", "create", "v", "--home-site", "b", "--store", store_b, "--shared-file-store"], &env);
    let status = cli(&["status", "--json"], &env);
    assert_eq!(status["volumes"][0]["home_site"], "b", "{status}");
    assert_eq!(status["volumes"][0]["leader_site"], "b", "{status}");
    assert_eq!(status["volumes"][0]["group"], 2, "{status}");
    let wrap: Vec<String> = desc["sites"]["b"]["mount_prefix"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mp = tmp.path().join("mnt");
    let args: Vec<String> = ["mount", "--volume", "v", "--site", "b"]
        .iter()
        .map(|s| s.to_string())
        .chain([mp.display().to_string()])
        .collect();
    let mut m = MountProc::start_wrapped(&args, &mp, &tmp.path().join("mount.log"), &wrap, &env);
    let data = elea_common::pattern::pattern(7, 3 << 20);
    std::fs::write(mp.join("f"), &data).unwrap();
    assert!(std::fs::read(mp.join("f")).unwrap() == data);
    assert!(m.terminate(Duration::from_secs(20)).is_some_and(|s| s.success()), "{}", m.log_tail());

    // SIGTERM: every process stops, the namespaces go.
    let netns: Vec<String> =
        ["a", "b"].iter().map(|s| desc["sites"][s]["netns"].as_str().unwrap().to_string()).collect();
    assert!(Command::new("kill").args(["-TERM", &demo.0.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = demo.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "elea demo did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "elea demo: {status}: {}", std::fs::read_to_string(&log).unwrap_or_default());
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie not reaped yet by its parent (which exited: init reaps it).
        assert!(stat.is_empty() || stat.contains(") Z "), "process {pid} still runs: {stat}");
    }
    for ns in netns {
        assert!(!Path::new("/run/netns").join(&ns).exists(), "namespace {ns} is left");
    }
}
