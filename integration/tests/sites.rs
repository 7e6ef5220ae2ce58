//! Two sites on one machine (`elea_integration::sites`): each site's processes in a network
//! namespace of its own, every byte between the sites across a WAN link with a 20 ms round
//! trip and a bandwidth cap. Checks the site-local data path: a write in a site is staged on
//! that site's cache nodes and tiered to that site's store without crossing the link; a read
//! in the other site crosses it once, is counted, and is then served from that site's read
//! cache; and the loss of a site that is not the volume's home, with its links cut, leaves the
//! home site serving, with nothing lost when the site comes back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use elea_integration::sites::SiteBed;
use elea_integration::wan::LinkConfig;
use elea_integration::{MetaProc, MountProc, elea_cli, fuse_available, network_available};

const META_PORT: u16 = 7001;
/// A second metadata node's port in a site.
const EXTRA_META_PORT: u16 = 7003;
const CACHE_PORTS: [u16; 2] = [7101, 7102];
const MIB: usize = 1 << 20;

/// Runs blocking work (file I/O through a mount, the CLI) off the runtime: the relays that
/// carry the sites' traffic are tasks of this test's runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn cli(args: Vec<String>) -> serde_json::Value {
    let (ok, out, err) =
        blocking(move || elea_cli(&args.iter().map(String::as_str).collect::<Vec<_>>())).await;
    assert!(ok, "elea {out}{err}");
    if out.trim_start().starts_with('{') {
        serde_json::from_str(&out).expect("json")
    } else {
        serde_json::Value::Null
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

async fn write_file(path: PathBuf, data: Vec<u8>) {
    blocking(move || {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(&data).expect("write");
        f.sync_all().expect("fsync");
    })
    .await
}

async fn read_file(path: PathBuf) -> Vec<u8> {
    blocking(move || std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))).await
}

/// Bytes the cache nodes of site `to` fetched from site `from`, as `elea status` reports.
async fn fetched(meta: &str, from: &str, to: &str) -> u64 {
    let s = cli(args(&["status", "--json", "--meta", meta])).await;
    s["transfers"]
        .as_array()
        .expect("transfers")
        .iter()
        .filter(|t| t["from"] == from && t["to"] == to)
        .map(|t| t["bytes"].as_u64().unwrap_or(0))
        .sum()
}

/// Staged bytes of the cache nodes of `site`, once the heartbeats report at least `want`.
async fn wait_staged(meta: &str, site: &str, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = cli(args(&["status", "--json", "--meta", meta])).await;
        let staged: u64 = s["cache_nodes"]
            .as_array()
            .expect("cache nodes")
            .iter()
            .filter(|n| n["site"] == site)
            .map(|n| n["staged_bytes"].as_u64().unwrap_or(0))
            .sum();
        if staged >= want || Instant::now() > deadline {
            return staged;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn files_under(dir: &Path) -> usize {
    fn walk(d: &Path, n: &mut usize) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), n);
            } else {
                *n += 1;
            }
        }
    }
    let mut n = 0;
    walk(dir, &mut n);
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_local_writes_counted_cross_site_reads_and_the_loss_of_a_site() {
    if !fuse_available("two_sites") || !network_available("two_sites") {
        return;
    }
    let rtt = Duration::from_millis(20);
    let cap = 64 * MIB as u64;
    let ports: Vec<u16> = std::iter::once(META_PORT).chain(CACHE_PORTS).collect();
    let bed = SiteBed::create(&["a", "b"], LinkConfig::rtt(rtt, Some(cap)), &ports).expect("site bed");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (bed.site("a").clone(), bed.site("b").clone());
    let meta = a.addr(META_PORT);

    // Site a: the metadata voter and two cache nodes; site b: two cache nodes.
    let m = MetaProc::start_wrapped(
        "meta",
        1,
        &meta,
        &dir.path().join("meta1"),
        &args(&["--initial-cluster", &format!("1={meta}"), "--site", "a"]),
        &a.command_prefix(),
        &[],
    );
    let mut caches = Vec::new();
    for (site, first) in [(&a, 1u64), (&b, 3)] {
        for (i, port) in CACHE_PORTS.iter().enumerate() {
            let id = first + i as u64;
            let extra = args(&["--site", &site.name, "--meta", &meta, "--staging-size", "1G"]);
            let d = dir.path().join(format!("cache{id}"));
            caches.push(MetaProc::start_wrapped(
                "cache",
                id,
                &site.addr(*port),
                &d,
                &extra,
                &site.command_prefix(),
                &[],
            ));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Fails until the metadata node answers.
        let st = args(&["status", "--json", "--meta", &meta]);
        let (_, out, _) =
            blocking(move || elea_cli(&st.iter().map(String::as_str).collect::<Vec<_>>())).await;
        let s: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let alive =
            s["cache_nodes"].as_array().map_or(0, |n| n.iter().filter(|n| n["alive"] == true).count());
        if alive == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "cache nodes did not all register: {s}\n{}", m.log_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let store = |s: &str| format!("file://{}", dir.path().join(format!("store-{s}")).display());
    cli(args(&[
        "volume",
        "create",
        "v",
        "--meta",
        &meta,
        "--home-site",
        "a",
        "--store",
        &store("a"),
        "--shared-file-store",
        "--tier-after",
        "1h",
    ]))
    .await;
    cli(args(&["volume", "add-store", "v", "--site", "b", &store("b"), "--meta", &meta])).await;
    let sites = cli(args(&["site", "list", "--json", "--meta", &meta])).await;
    let site_b =
        sites["sites"].as_array().unwrap().iter().find(|s| s["name"] == "b").expect("site b").clone();
    assert_eq!(site_b["cache_nodes"], serde_json::json!([3, 4]), "{sites}");
    let st = cli(args(&["status", "--json", "--meta", &meta])).await;
    let v = &st["volumes"][0];
    assert_eq!(
        (v["name"].as_str(), v["home_site"].as_str(), v["leader_site"].as_str()),
        (Some("v"), Some("a"), Some("a")),
        "{st}"
    );

    // A mount in a site the cluster does not know is refused, saying so.
    let bad = args(&["mount", "--meta", &meta, "--volume", "v", "--site", "nowhere", "/nonexistent"]);
    let (ok, _, err) = blocking(move || elea_cli(&bad.iter().map(String::as_str).collect::<Vec<_>>())).await;
    assert!(!ok && err.contains("no such site"), "{err}");

    let mount = |site: &elea_integration::sites::Site, name: &str| {
        let mp = dir.path().join(name);
        let a = args(&[
            "mount",
            "--meta",
            &meta,
            "--volume",
            "v",
            "--site",
            &site.name,
            &mp.display().to_string(),
        ]);
        MountProc::start_wrapped(
            &a,
            &mp,
            &dir.path().join(format!("{name}.log")),
            &site.command_prefix(),
            &[],
        )
    };
    let (ma, mb) = (mount(&a, "mnt-a"), mount(&b, "mnt-b"));
    let (ma_p, mb_p) = (ma.mountpoint.clone(), mb.mountpoint.clone());

    // Written in a: staged in a, nothing of it crosses to b.
    let f1 = elea_common::pattern::pattern(1, 8 * MIB);
    let before = bed.carried("a", "b") + bed.carried("b", "a");
    write_file(ma_p.join("f1"), f1.clone()).await;
    assert!(wait_staged(&meta, "a", f1.len() as u64 * 2).await >= f1.len() as u64 * 2);
    assert_eq!(wait_staged(&meta, "b", 0).await, 0, "a's write was staged in b");
    let crossed = bed.carried("a", "b") + bed.carried("b", "a") - before;
    assert!(crossed < MIB as u64, "a write in a sent {crossed} bytes across the link");

    // Read in b: once across the link, counted, and kept in b's read cache.
    let t = Instant::now();
    assert!(read_file(mb_p.join("f1")).await == f1, "b read other bytes than a wrote");
    let first_read = t.elapsed();
    let moved = bed.carried("a", "b");
    assert!(moved >= f1.len() as u64, "only {moved} bytes crossed from a to b");
    assert!(fetched(&meta, "a", "b").await >= f1.len() as u64, "the transfer is not counted");
    // A second reader in b (a fresh gateway) finds it in b's cache nodes.
    let mb2 = mount(&b, "mnt-b2");
    let before = bed.carried("a", "b");
    assert!(read_file(mb2.mountpoint.join("f1")).await == f1);
    let again = bed.carried("a", "b") - before;
    assert!(again < MIB as u64, "a second read in b pulled {again} bytes from a again");
    eprintln!("8 MiB written in a, read in b: first read {first_read:?}");

    // Written in b: staged on b's nodes, tiered to b's store.
    let f2 = elea_common::pattern::pattern(2, 8 * MIB);
    let before = bed.carried("b", "a");
    write_file(mb_p.join("f2"), f2.clone()).await;
    assert!(wait_staged(&meta, "b", f2.len() as u64 * 2).await >= f2.len() as u64 * 2);
    assert!(bed.carried("b", "a") - before < MIB as u64, "b's write crossed to a");
    cli(args(&["tier", "--volume", "v", "--wait", "--meta", &meta])).await;
    let (in_a, in_b) = (files_under(&dir.path().join("store-a")), files_under(&dir.path().join("store-b")));
    assert!(in_a >= 2 && in_b >= 2, "objects in a's store {in_a}, in b's {in_b}");

    // Site b is lost: its processes killed, its links cut. a goes on serving.
    drop(mb2);
    let mut mb = mb;
    mb.kill9();
    for c in caches.iter_mut().skip(2) {
        c.kill9();
    }
    bed.set_site_cut("b", true);
    let f3 = elea_common::pattern::pattern(3, 4 * MIB);
    let t = Instant::now();
    write_file(ma_p.join("f3"), f3.clone()).await;
    assert!(read_file(ma_p.join("f1")).await == f1);
    // f2 lives in b's store, which a's cache nodes still reach (a store is not a site's
    // process: here it is a directory both see).
    assert!(read_file(ma_p.join("f2")).await == f2);
    eprintln!("site a served a write and two reads {:?} after b was lost", t.elapsed());

    // b comes back: everything is there.
    bed.set_site_cut("b", false);
    for c in caches.iter_mut().skip(2) {
        c.restart();
    }
    mb.restart();
    for (name, data) in [("f1", &f1), ("f2", &f2), ("f3", &f3)] {
        assert!(read_file(mb_p.join(name)).await == *data, "{name} differs in b after its return");
    }
    drop((ma, mb, m, caches));
}

/// Each volume in a Raft group of its own homed in a site: a volume homed in a has its
/// voter in a, one homed in b has its voter in b, each with the other site's metadata node as
/// a learner. With the link between the sites cut, each site's mount of its own volume goes
/// on creating, writing and reading (its commits need no other site), and once the link is
/// back each site reads what the other wrote meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_homed_in_each_site_commit_there_and_outlive_a_cut_link() {
    if !fuse_available("volume_groups") || !network_available("volume_groups") {
        return;
    }
    let ports: Vec<u16> = [META_PORT, EXTRA_META_PORT].into_iter().chain(CACHE_PORTS).collect();
    let bed = SiteBed::create(&["a", "b"], LinkConfig::rtt(Duration::from_millis(20), None), &ports)
        .expect("site bed");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (bed.site("a").clone(), bed.site("b").clone());
    let (meta_a, meta_b) = (a.addr(META_PORT), b.addr(META_PORT));
    let m1 = MetaProc::start_wrapped(
        "meta",
        1,
        &meta_a,
        &dir.path().join("meta1"),
        &args(&["--initial-cluster", &format!("1={meta_a}"), "--site", "a"]),
        &a.command_prefix(),
        &[],
    );
    // b's metadata node: a learner of the control group.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let add =
            args(&["cluster", "add", "--meta", &meta_a, "--node-id", "2", "--addr", &meta_b, "--learner"]);
        let (ok, out, err) =
            blocking(move || elea_cli(&add.iter().map(String::as_str).collect::<Vec<_>>())).await;
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "adding node 2: {out}{err}\n{}", m1.log_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m2 = MetaProc::start_wrapped(
        "meta",
        2,
        &meta_b,
        &dir.path().join("meta2"),
        &args(&["--join", &meta_a, "--site", "b"]),
        &b.command_prefix(),
        &[],
    );
    let mut caches = Vec::new();
    for (site, first) in [(&a, 1u64), (&b, 3)] {
        for (i, port) in CACHE_PORTS.iter().enumerate() {
            let id = first + i as u64;
            let extra = args(&["--site", &site.name, "--meta", &format!("{meta_a},{meta_b}")]);
            let d = dir.path().join(format!("cache{id}"));
            caches.push(MetaProc::start_wrapped(
                "cache",
                id,
                &site.addr(*port),
                &d,
                &extra,
                &site.command_prefix(),
                &[],
            ));
        }
    }
    // Both metadata nodes have recorded their sites, and every cache node is up.
    wait_sites_filled(&meta_a, 2, 1, 2, || format!("{}\n{}", m1.log_tail(), m2.log_tail())).await;
    let store = |s: &str| format!("file://{}", dir.path().join(format!("store-{s}")).display());
    for (vol, home) in [("va", "a"), ("vb", "b")] {
        cli(args(&[
            "volume",
            "create",
            vol,
            "--meta",
            &meta_a,
            "--home-site",
            home,
            "--store",
            &store(home),
            "--shared-file-store",
        ]))
        .await;
    }
    let st = cli(args(&["status", "--json", "--meta", &meta_a])).await;
    let placed: Vec<(String, String, u64, u64)> = st["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or("").to_string(),
                v["leader_site"].as_str().unwrap_or("").to_string(),
                v["group"].as_u64().unwrap_or(0),
                v["leader_node"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(placed, [("va".into(), "a".into(), 2, 1), ("vb".into(), "b".into(), 3, 2)], "{st}");

    let mount = |site: &elea_integration::sites::Site, vol: &str, name: &str| {
        let mp = dir.path().join(name);
        let meta = if site.name == "a" { &meta_a } else { &meta_b };
        let a = args(&[
            "mount",
            "--meta",
            meta,
            "--volume",
            vol,
            "--site",
            &site.name,
            &mp.display().to_string(),
        ]);
        MountProc::start_wrapped(
            &a,
            &mp,
            &dir.path().join(format!("{name}.log")),
            &site.command_prefix(),
            &[],
        )
    };
    let (ma, mb) = (mount(&a, "va", "mnt-a"), mount(&b, "vb", "mnt-b"));
    let before = (elea_common::pattern::pattern(1, MIB), elea_common::pattern::pattern(2, MIB));
    write_file(ma.mountpoint.join("before"), before.0.clone()).await;
    write_file(mb.mountpoint.join("before"), before.1.clone()).await;

    // The link is cut: each site serves its own volume.
    bed.set_site_cut("b", true);
    let t = Instant::now();
    for (m, seed) in [(&ma, 10u64), (&mb, 20)] {
        let root = m.mountpoint.clone();
        blocking(move || {
            let d = root.join("during");
            std::fs::create_dir(&d).expect("mkdir while cut");
            for i in 0..20 {
                std::fs::write(d.join(format!("f{i}")), elea_common::pattern::pattern(seed + i, 4096))
                    .expect("write while cut");
            }
            std::fs::rename(d.join("f0"), d.join("renamed")).expect("rename while cut");
        })
        .await;
        let big = elea_common::pattern::pattern(seed, 2 * MIB);
        write_file(m.mountpoint.join("during-big"), big.clone()).await;
        assert!(read_file(m.mountpoint.join("during-big")).await == big);
    }
    eprintln!("both sites served their own volume with the link cut: {:?}", t.elapsed());

    // The link is back: a mount of each volume in the other site sees everything.
    bed.set_site_cut("b", false);
    let (xa, xb) = (mount(&b, "va", "mnt-va-in-b"), mount(&a, "vb", "mnt-vb-in-a"));
    for (m, seed, first) in [(&xa, 10u64, &before.0), (&xb, 20, &before.1)] {
        assert!(read_file(m.mountpoint.join("before")).await == *first);
        let root = m.mountpoint.clone();
        let names = blocking(move || {
            let mut n: Vec<String> = std::fs::read_dir(root.join("during"))
                .expect("readdir")
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        })
        .await;
        assert_eq!(names.len(), 20, "{names:?}");
        assert!(names.contains(&"renamed".to_string()));
        for i in 1..20 {
            let got = read_file(m.mountpoint.join("during").join(format!("f{i}"))).await;
            assert!(got == elea_common::pattern::pattern(seed + i, 4096), "during/f{i} differs");
        }
        assert!(
            read_file(m.mountpoint.join("during-big")).await == elea_common::pattern::pattern(seed, 2 * MIB)
        );
    }

    // va's group moves to b online, with a member that joins it empty: node 5 (a new
    // metadata node in a) and b's node 2 (a learner until now) become voters, node 1 (the
    // leader) leaves. The mount of va in a goes on writing throughout.
    let meta_5 = a.addr(EXTRA_META_PORT);
    add_learner(&meta_a, 5, &meta_5).await;
    let m5 = MetaProc::start_wrapped(
        "meta",
        5,
        &meta_5,
        &dir.path().join("meta5"),
        &args(&["--join", &meta_a, "--site", "a"]),
        &a.command_prefix(),
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = args(&["site", "list", "--json", "--meta", &meta_a]);
        let (_, out, _) =
            blocking(move || elea_cli(&st.iter().map(String::as_str).collect::<Vec<_>>())).await;
        let s: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let metas_a = s["sites"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["name"] == "a"))
            .map(|x| x["meta_nodes"].clone());
        if metas_a == Some(serde_json::json!([1, 5])) {
            break;
        }
        assert!(Instant::now() < deadline, "node 5 did not register: {s}\n{}", m5.log_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let writer = {
        let root = ma.mountpoint.clone();
        tokio::task::spawn_blocking(move || {
            let d = root.join("moving");
            std::fs::create_dir(&d).expect("mkdir");
            let mut n = 0u64;
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(6) {
                std::fs::write(d.join(format!("f{n}")), elea_common::pattern::pattern(100 + n, 8192))
                    .unwrap_or_else(|e| panic!("write {n} while the group moved: {e}"));
                n += 1;
            }
            n
        })
    };
    cli(args(&["volume", "add-member", "va", "--node-id", "5", "--meta", &meta_a])).await;
    cli(args(&["volume", "add-member", "va", "--node-id", "2", "--meta", &meta_a])).await;
    cli(args(&["volume", "remove-member", "va", "--node-id", "1", "--meta", &meta_a])).await;
    let written = writer.await.expect("writer");
    assert!(written > 0);
    for i in 0..written {
        let got = read_file(ma.mountpoint.join("moving").join(format!("f{i}"))).await;
        assert!(got == elea_common::pattern::pattern(100 + i, 8192), "moving/f{i} differs");
    }
    assert!(read_file(ma.mountpoint.join("before")).await == before.0);
    let st = cli(args(&["status", "--json", "--meta", &meta_a])).await;
    let va = st["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "va").expect("va").clone();
    assert!(va["leader_node"] == 2 || va["leader_node"] == 5, "{st}");
    eprintln!(
        "va's group moved with {written} files written through it meanwhile; leader now {}",
        va["leader_node"]
    );
    drop((xa, xb, ma, mb, caches, m1, m2, m5));
}

/// Waits until `elea site list` shows `sites` sites, each with `metas` metadata nodes and
/// `caches` cache nodes (`logs` is shown if they never do).
async fn wait_sites_filled(meta: &str, sites: usize, metas: usize, caches: usize, logs: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = args(&["site", "list", "--json", "--meta", meta]);
        let (_, out, _) =
            blocking(move || elea_cli(&st.iter().map(String::as_str).collect::<Vec<_>>())).await;
        let s: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let ready = s["sites"].as_array().is_some_and(|l| {
            l.len() == sites
                && l.iter().all(|x| {
                    x["meta_nodes"].as_array().is_some_and(|m| m.len() == metas)
                        && x["cache_nodes"].as_array().is_some_and(|c| c.len() == caches)
                })
        });
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "the sites did not fill: {s}\n{}", logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until each `(volume, site)` of `want` is led from that site, as `elea status` says.
async fn wait_led_from_home(meta: &str, want: &[(&str, &str)]) {
    let want: Vec<(String, String)> = want.iter().map(|(v, s)| (v.to_string(), s.to_string())).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = cli(args(&["status", "--json", "--meta", meta])).await;
        let leaders: Vec<(String, String)> = st["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .map(|v| {
                (v["name"].as_str().unwrap_or("").into(), v["leader_site"].as_str().unwrap_or("").into())
            })
            .filter(|(v, _)| want.iter().any(|(w, _)| w == v))
            .collect();
        if leaders == want {
            return;
        }
        assert!(Instant::now() < deadline, "volumes not led from their home sites: {leaders:?}\n{st}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Sites a, b and c with a 10 ms round trip between each pair, for a metadata node and a
/// cache node each.
fn three_site_bed() -> SiteBed {
    SiteBed::create(
        &["a", "b", "c"],
        LinkConfig::rtt(Duration::from_millis(10), None),
        &[META_PORT, CACHE_PORTS[0]],
    )
    .expect("site bed")
}

/// Starts a metadata node and a cache node in each site of `bed` (a's metadata node
/// founds the cluster, the others join its control group as learners) and waits until the
/// cluster knows them all. Returns the sites, their metadata addresses, and the processes:
/// site `i`'s metadata node at `2 * i`, its cache node at `2 * i + 1`.
async fn start_three_sites(
    bed: &SiteBed,
    dir: &Path,
) -> (Vec<elea_integration::sites::Site>, Vec<String>, Vec<MetaProc>) {
    let cache_port = CACHE_PORTS[0];
    let sites: Vec<_> = ["a", "b", "c"].iter().map(|s| bed.site(s).clone()).collect();
    let metas: Vec<String> = sites.iter().map(|s| s.addr(META_PORT)).collect();
    let all_meta = metas.join(",");
    let mut procs = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        let id = i as u64 + 1;
        let how = if i == 0 {
            args(&["--initial-cluster", &format!("1={}", metas[0]), "--site", &site.name])
        } else {
            add_learner(&metas[0], id, &metas[i]).await;
            args(&["--join", &metas[0], "--site", &site.name])
        };
        let d = dir.join(format!("meta{id}"));
        procs.push(MetaProc::start_wrapped("meta", id, &metas[i], &d, &how, &site.command_prefix(), &[]));
        let extra = args(&["--site", &site.name, "--meta", &all_meta]);
        let d = dir.join(format!("cache{id}"));
        let addr = site.addr(cache_port);
        procs.push(MetaProc::start_wrapped("cache", id, &addr, &d, &extra, &site.command_prefix(), &[]));
    }
    wait_sites_filled(&metas[0], 3, 1, 1, || {
        procs.iter().map(MetaProc::log_tail).collect::<Vec<_>>().join("\n")
    })
    .await;
    (sites, metas, procs)
}

/// Creates volume `vol` homed in `home` (a Raft group of its own) on the shared `store`, one
/// copy of each staged block, with `extra` flags.
async fn create_volume(meta: &str, vol: &str, home: &str, store: &str, extra: &[&str]) {
    let mut a = args(&[
        "volume",
        "create",
        vol,
        "--meta",
        meta,
        "--home-site",
        home,
        "--store",
        store,
        "--shared-file-store",
        "--replicas",
        "1",
    ]);
    a.extend(args(extra));
    cli(a).await;
}

/// Mounts `vol` in `site` (through its metadata node at `meta`) at `dir/name`, logging to
/// `dir/name.log`.
fn mount_in(
    dir: &Path,
    site: &elea_integration::sites::Site,
    meta: &str,
    vol: &str,
    name: &str,
) -> MountProc {
    let mp = dir.join(name);
    let a =
        args(&["mount", "--meta", meta, "--volume", vol, "--site", &site.name, &mp.display().to_string()]);
    MountProc::start_wrapped(&a, &mp, &dir.join(format!("{name}.log")), &site.command_prefix(), &[])
}

/// Adds metadata node `id` at `addr` to the control group as a learner (retried until the
/// group has a leader).
async fn add_learner(meta: &str, id: u64, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let id_s = id.to_string();
        let add = args(&["cluster", "add", "--meta", meta, "--node-id", &id_s, "--addr", addr, "--learner"]);
        let (ok, out, err) =
            blocking(move || elea_cli(&add.iter().map(String::as_str).collect::<Vec<_>>())).await;
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "adding node {id}: {out}{err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Three sites, a metadata node and a cache node in each. A volume homed in c (its voter in c),
/// one homed in a, and one homed in a with `--spread-voters` (a voter in each site). Site c is
/// lost (its processes killed, its link cut): the volume homed in a and the spread one go on
/// serving writes and reads in a; the one homed in c cannot be mounted, with an error that
/// says the metadata service is unavailable; when c returns, everything written before and
/// during the loss is there, in every site. Then site a is lost, and with it the control
/// group: c's volume goes on in c and the spread one in b, for longer than a cache node's
/// liveness timeout, and all is there when a returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loss_of_a_site_stops_only_the_volumes_whose_voters_it_held() {
    if !fuse_available("site_loss") || !network_available("site_loss") {
        return;
    }
    let bed = three_site_bed();
    let dir = tempfile::tempdir().unwrap();
    let (sites, metas, mut procs) = start_three_sites(&bed, dir.path()).await;
    let store = format!("file://{}", dir.path().join("store").display());
    for (vol, home, spread) in [("va", "a", false), ("vs", "a", true), ("vc", "c", false)] {
        let extra: &[&str] = if spread { &["--spread-voters"] } else { &[] };
        create_volume(&metas[0], vol, home, &store, extra).await;
    }
    // Every volume's group is led from its home site, the spread one included (whichever
    // voter won its first election hands the leadership to a's).
    wait_led_from_home(&metas[0], &[("va", "a"), ("vs", "a"), ("vc", "c")]).await;

    let mount =
        |site: usize, vol: &str, name: &str| mount_in(dir.path(), &sites[site], &metas[site], vol, name);
    let (ma, ms, mut mc) = (mount(0, "va", "va-a"), mount(0, "vs", "vs-a"), mount(2, "vc", "vc-c"));
    let data = |seed| elea_common::pattern::pattern(seed, MIB);
    for (m, seed) in [(&ma, 1), (&ms, 2), (&mc, 3)] {
        write_file(m.mountpoint.join("before"), data(seed)).await;
    }

    // Site c is lost.
    mc.kill9();
    for p in procs.iter_mut().skip(4) {
        p.kill9();
    }
    bed.set_site_cut("c", true);
    let t = Instant::now();
    for (m, seed) in [(&ma, 11), (&ms, 12)] {
        write_file(m.mountpoint.join("during"), data(seed)).await;
        assert!(read_file(m.mountpoint.join("during")).await == data(seed));
        assert!(read_file(m.mountpoint.join("before")).await == data(seed - 10));
    }
    eprintln!("a's volumes, the spread one included, served {:?} after c was lost", t.elapsed());
    let mp = dir.path().join("vc-a");
    std::fs::create_dir_all(&mp).unwrap();
    let try_mount =
        args(&["mount", "--meta", &metas[0], "--volume", "vc", "--site", "a", &mp.display().to_string()]);
    let prefix = sites[0].command_prefix();
    let t = Instant::now();
    let (ok, out, err) = blocking(move || {
        let mut cmd: Vec<String> = prefix;
        cmd.push(elea_integration::elea_bin().display().to_string());
        cmd.extend(try_mount);
        let o = std::process::Command::new(&cmd[0]).args(&cmd[1..]).output().expect("run elea mount");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    })
    .await;
    assert!(!ok && err.contains("unavailable"), "mounting vc while c is lost: {out}{err}");
    eprintln!("a mount of vc failed after {:?}: {}", t.elapsed(), err.lines().last().unwrap_or(""));

    // c returns: everything is there, in every site.
    bed.set_site_cut("c", false);
    for p in procs.iter_mut().skip(4) {
        p.restart();
    }
    mc.restart();
    assert!(read_file(mc.mountpoint.join("before")).await == data(3));
    let (va_c, vs_b) = (mount(2, "va", "va-c"), mount(1, "vs", "vs-b"));
    for (m, seed) in [(&va_c, 1), (&vs_b, 2)] {
        assert!(read_file(m.mountpoint.join("before")).await == data(seed));
        assert!(read_file(m.mountpoint.join("during")).await == data(seed + 10));
    }

    // Site a is lost: the control group's voter and va's with it. The volume homed in c goes
    // on in c, and the spread one in b (its voters in b and c are a quorum).
    let (mut ma, mut ms) = (ma, ms);
    ma.kill9();
    ms.kill9();
    for p in procs.iter_mut().take(2) {
        p.kill9();
    }
    bed.set_site_cut("a", true);
    let t = Instant::now();
    for (m, seed, what) in [(&mc, 23, "c's volume"), (&vs_b, 22, "the spread one")] {
        let w = Instant::now();
        write_file(m.mountpoint.join("without-a"), data(seed)).await;
        let r = Instant::now();
        assert!(read_file(m.mountpoint.join("without-a")).await == data(seed));
        eprintln!(
            "{what} wrote {:?}, read {:?}, {:?} after a (the control group's site) was lost",
            r - w,
            r.elapsed(),
            t.elapsed()
        );
    }
    // Long enough for every cache node of b and c to have been declared dead had their
    // heartbeats waited for the control group: writes still find them.
    tokio::time::sleep(Duration::from_secs(12)).await;
    for (m, seed) in [(&mc, 33), (&vs_b, 32)] {
        write_file(m.mountpoint.join("still-without-a"), data(seed)).await;
        assert!(read_file(m.mountpoint.join("still-without-a")).await == data(seed));
    }

    // a returns: its volumes and what the others wrote meanwhile are there.
    bed.set_site_cut("a", false);
    for p in procs.iter_mut().take(2) {
        p.restart();
    }
    ma.restart();
    ms.restart();
    assert!(read_file(ma.mountpoint.join("during")).await == data(11));
    assert!(read_file(ms.mountpoint.join("without-a")).await == data(22));
    assert!(read_file(ms.mountpoint.join("still-without-a")).await == data(32));
    assert!(read_file(va_c.mountpoint.join("during")).await == data(11));
    drop((va_c, vs_b, ma, ms, mc, procs));
}

/// How long a lost site stays lost in the checked scenario: 6 s, or `CHAOS_SECS` when set
/// (the long version, run by hand).
fn outage() -> Duration {
    Duration::from_secs(std::env::var("CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(6))
}

/// How long the checked workload runs before the loss and after the return: 3 s, or
/// `CHAOS_SECS`.
fn phase() -> Duration {
    Duration::from_secs(std::env::var("CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3))
}

/// Every regular file under `root` (relative path → contents).
fn tree(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, d: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let e = e.expect("directory entry");
            if e.file_type().expect("file type").is_dir() {
                walk(root, &e.path(), out);
            } else {
                let rel = e.path().strip_prefix(root).expect("under root").display().to_string();
                let bytes = std::fs::read(e.path()).unwrap_or_else(|err| panic!("{rel}: {err}"));
                out.insert(rel, bytes);
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The loss of a site under the chaos scenarios' checked workload (writers creating,
/// replacing, renaming and deleting fsynced files, readers checking every read against every
/// acknowledged write, appenders on a shared log under `F_SETLKW`), on two volumes at once,
/// each mounted in sites b and c: one homed in b, one homed in a with `--spread-voters`.
/// Site a, which holds the control group's only voter and the spread volume's leader, is
/// lost (every process killed, its links cut) and comes back. Neither workload sees a failed
/// call, both go on through the loss, nothing acknowledged is lost, and once a is back a
/// mount of each volume in a reads exactly what b's mount reads. `CHAOS_SECS` stretches the
/// phases and the loss (the long version, run by hand).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checked_workload_outlives_the_loss_and_return_of_a_site() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use elea_integration::chaos::{Events, Workload};

    if !fuse_available("site_loss_checked") || !network_available("site_loss_checked") {
        return;
    }
    let bed = three_site_bed();
    let dir = tempfile::tempdir().unwrap();
    let (sites, metas, mut procs) = start_three_sites(&bed, dir.path()).await;
    let store = format!("file://{}", dir.path().join("store").display());
    create_volume(&metas[0], "vb", "b", &store, &[]).await;
    // Its small files are staged in a (its home), on one node: tiered at once, they stay
    // readable from the store while a is lost.
    create_volume(&metas[0], "vs", "a", &store, &["--spread-voters", "--tier-after", "1s"]).await;
    wait_led_from_home(&metas[0], &[("vb", "b"), ("vs", "a")]).await;

    let mount = |site: usize, vol: &str| {
        mount_in(dir.path(), &sites[site], &metas[site], vol, &format!("{vol}-{}", sites[site].name))
    };
    let mounts = [mount(1, "vb"), mount(2, "vb"), mount(1, "vs"), mount(2, "vs")];
    let events = Arc::new(Events::new(&dir.path().join("events.log")));
    let start = |vol: usize| {
        let mps: Vec<PathBuf> = mounts[2 * vol..2 * vol + 2].iter().map(|m| m.mountpoint.clone()).collect();
        let events = events.clone();
        blocking(move || {
            let gens = Arc::new(vec![AtomicU64::new(0), AtomicU64::new(0)]);
            Workload::on_mounts(mps, events, gens, 2, 1, 64 << 10)
        })
    };
    let (wb, ws) = (start(0).await, start(1).await);
    tokio::time::sleep(phase()).await;

    // Site a is lost: the control group's voter, the spread volume's leader, a's cache node.
    for p in procs.iter_mut().take(2) {
        p.kill9();
    }
    bed.set_site_cut("a", true);
    events.log("site a lost: its metadata and cache node killed, its links cut");
    let lost_at = events.now();
    tokio::time::sleep(outage()).await;
    let back_at = events.now();

    // a returns.
    bed.set_site_cut("a", false);
    for p in procs.iter_mut().take(2) {
        p.restart();
    }
    events.log("site a back: links restored, its processes restarted");
    tokio::time::sleep(phase()).await;
    let (rb, rs) = blocking(move || (wb.finish(), ws.finish())).await;
    let logs = || {
        let mut l: Vec<String> = procs.iter().map(MetaProc::log_tail).collect();
        l.extend(mounts.iter().map(MountProc::log_tail));
        l.join("\n")
    };
    for (name, r) in [("volume homed in b", &rb), ("spread volume homed in a", &rs)] {
        let name = format!("loss of site a, {name}");
        r.assert_clean(&name, logs);
        assert!(r.errors.is_empty(), "{name}: calls failed: {:?}\n{}", r.errors, logs());
        let during =
            r.all_calls.iter().filter(|c| c.error.is_none() && c.start > lost_at && c.end < back_at).count();
        assert!(during > 10, "{name}: service did not go on while a was lost ({during} calls)");
    }

    // Everything caught up in a: its mounts of both volumes read what b's read.
    wait_led_from_home(&metas[0], &[("vb", "b"), ("vs", "a")]).await;
    for (vol, b_side) in [("vb", &mounts[0]), ("vs", &mounts[2])] {
        let in_a = mount(0, vol);
        let (a_mp, b_mp) = (in_a.mountpoint.clone(), b_side.mountpoint.clone());
        let (ta, tb) = blocking(move || (tree(&a_mp), tree(&b_mp))).await;
        assert!(tb.len() > 10, "{vol}: only {} files", tb.len());
        let differ: Vec<&String> = tb.keys().filter(|k| ta.get(*k) != tb.get(*k)).collect();
        assert!(
            ta.len() == tb.len() && differ.is_empty(),
            "{vol}: a sees {} files, b {}; differing: {differ:?}",
            ta.len(),
            tb.len()
        );
        eprintln!("{vol}: a's mount reads the same {} files as b's", tb.len());
    }
    drop((mounts, procs));
}

/// Three sites, a metadata node and a cache node in each. A volume homed in a, with a store in
/// a and one in b, holds files tiered to a's store; a checked workload runs on mounts of it in
/// a and in b while `elea volume move --to-site b --wait` moves it: its group gains b's node as
/// a voter, a's becomes a learner, the leadership moves to b, and a's store moves into b's.
/// No call fails and nothing acknowledged is lost; afterwards the volume is led from b, its
/// home is b, and with a's store gone every file reads back in b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_moves_home_while_a_checked_workload_runs_on_it() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use elea_integration::chaos::{Events, Workload};

    if !fuse_available("volume_move") || !network_available("volume_move") {
        return;
    }
    let bed = three_site_bed();
    let dir = tempfile::tempdir().unwrap();
    let (sites, metas, procs) = start_three_sites(&bed, dir.path()).await;
    let store = |s: &str| format!("file://{}", dir.path().join(format!("store-{s}")).display());
    for s in ["a", "b"] {
        std::fs::create_dir_all(dir.path().join(format!("store-{s}"))).unwrap();
    }
    create_volume(&metas[0], "vm", "a", &store("a"), &["--tier-after", "1s"]).await;
    cli(args(&["volume", "add-store", "vm", "--site", "b", &store("b"), "--meta", &metas[0]])).await;
    wait_led_from_home(&metas[0], &[("vm", "a")]).await;
    let mount = |site: usize, name: &str| mount_in(dir.path(), &sites[site], &metas[site], "vm", name);
    let (ma, mb) = (mount(0, "vm-a"), mount(1, "vm-b"));
    // Files big enough to be tiered to a's store before the move.
    let big: Vec<(String, Vec<u8>)> = (0..6u64)
        .map(|i| (format!("big-{i}"), elea_common::pattern::pattern(100 + i, 3 * MIB + 7)))
        .collect();
    for (name, data) in &big {
        write_file(ma.mountpoint.join(name), data.clone()).await;
    }
    cli(args(&["tier", "--volume", "vm", "--wait", "--meta", &metas[0]])).await;
    assert!(files_under(&dir.path().join("store-a")) > big.len(), "the files were not tiered to a's store");

    // What a metadata call costs in b (one create and one unlink of an empty file, fsynced
    // directory not asked): printed before and after the move, for the record.
    let creates_in_b = |mp: PathBuf, tag: &'static str| {
        blocking(move || {
            let t = Instant::now();
            for i in 0..50 {
                let p = mp.join(format!("lat-{tag}-{i}"));
                std::fs::File::create(&p).expect("create");
                std::fs::remove_file(&p).expect("unlink");
            }
            t.elapsed() / 100
        })
    };
    let before_move = creates_in_b(mb.mountpoint.clone(), "before").await;
    let events = Arc::new(Events::new(&dir.path().join("events.log")));
    let mps = vec![ma.mountpoint.clone(), mb.mountpoint.clone()];
    let ev = events.clone();
    let work = blocking(move || {
        let gens = Arc::new(vec![AtomicU64::new(0), AtomicU64::new(0)]);
        Workload::on_mounts(mps, ev, gens, 2, 1, 64 << 10)
    })
    .await;
    tokio::time::sleep(phase()).await;
    events.log("moving the volume to b");
    let moved =
        cli(args(&["volume", "move", "vm", "--to-site", "b", "--wait", "--json", "--meta", &metas[0]])).await;
    events.log("the volume moved");
    tokio::time::sleep(phase()).await;
    let report = blocking(move || work.finish()).await;
    let logs = || {
        let mut l: Vec<String> = procs.iter().map(MetaProc::log_tail).collect();
        l.extend([ma.log_tail(), mb.log_tail()]);
        l.join("\n")
    };
    report.assert_clean("volume move", logs);
    assert!(report.errors.is_empty(), "calls failed during the move: {:?}\n{}", report.errors, logs());
    assert_eq!(moved["state"], "done", "{moved}");
    assert_eq!(moved["objects_left"], 0, "{moved}");
    assert!(moved["objects_done"].as_u64() >= Some(big.len() as u64), "{moved}");

    // Led from b, homed in b.
    wait_led_from_home(&metas[0], &[("vm", "b")]).await;
    let after_move = creates_in_b(mb.mountpoint.clone(), "after").await;
    eprintln!(
        "volume move: {} objects ({} bytes) moved in {:.1} s; a create or unlink in b took {before_move:?} \
         before the move, {after_move:?} after",
        moved["objects_done"],
        moved["bytes_done"],
        moved["elapsed_secs"].as_f64().unwrap_or(0.0)
    );
    let st = cli(args(&["status", "--json", "--meta", &metas[0]])).await;
    let v = st["volumes"].as_array().and_then(|l| l.iter().find(|v| v["name"] == "vm").cloned()).unwrap();
    assert_eq!(v["home_site"], "b", "{st}");
    // What a's node tiers from now on goes to b's store; then a's store goes away, and a new
    // mount in b reads every file the workload and the big writes left.
    cli(args(&["tier", "--volume", "vm", "--wait", "--meta", &metas[0]])).await;
    std::fs::rename(dir.path().join("store-a"), dir.path().join("store-a.gone")).unwrap();
    let b_mp = mb.mountpoint.clone();
    let fresh = mount(1, "vm-b2");
    let f_mp = fresh.mountpoint.clone();
    let (t_old, t_new) = blocking(move || (tree(&b_mp), tree(&f_mp))).await;
    for (name, data) in &big {
        assert!(t_new.get(name) == Some(data), "{name} reads back wrong in b after the move");
    }
    assert!(
        t_new.len() > big.len() + 10 && t_new == t_old,
        "b's mounts disagree: {} / {}",
        t_old.len(),
        t_new.len()
    );
    drop((ma, mb, fresh));
}

/// PostgreSQL from Debian's packages (installed by `scripts/ensure-postgres.sh` when missing),
/// run as the `postgres` user on a data directory in `dir`, listening on a socket only.
struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    sock: tempfile::TempDir,
    port: u16,
}

impl Postgres {
    fn bin() -> PathBuf {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ensure-postgres.sh");
        let out = std::process::Command::new("bash").arg(&script).output().expect("ensure-postgres.sh");
        assert!(out.status.success(), "installing PostgreSQL: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    }

    fn as_pg(&self, tool: &str, args: &[&str]) -> (bool, String) {
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .args(args)
            .output()
            .expect("runuser");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// A new cluster in `data` (made and owned by `postgres`).
    fn init(bin: PathBuf, data: PathBuf) -> Self {
        std::fs::create_dir_all(&data).unwrap();
        std::process::Command::new("chown").arg("postgres").arg(&data).status().unwrap();
        std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let pg = Self::on(bin, data);
        let (ok, out) =
            pg.as_pg("initdb", &["-D", &pg.data.display().to_string(), "-A", "trust", "-U", "postgres"]);
        assert!(ok, "initdb: {out}");
        pg
    }

    /// The cluster in `data` (not started).
    fn on(bin: PathBuf, data: PathBuf) -> Self {
        let sock = tempfile::tempdir().unwrap();
        std::process::Command::new("chown").arg("postgres").arg(sock.path()).status().unwrap();
        Self { bin, data, sock, port: elea_integration::free_port() }
    }

    fn start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses='' -c fsync=on -c synchronous_commit=on",
            self.port,
            self.sock.path().display()
        );
        let log = self.sock.path().join("server.log");
        let (ok, out) = self.as_pg(
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-l",
                &log.display().to_string(),
                "-w",
                "-t",
                "120",
                "-o",
                &opts,
                "start",
            ],
        );
        assert!(ok, "pg_ctl start: {out}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }

    /// Stopped as a killed container's server would be: no shutdown checkpoint.
    fn kill(&self) {
        let (ok, out) =
            self.as_pg("pg_ctl", &["-D", &self.data.display().to_string(), "-m", "immediate", "stop"]);
        assert!(ok, "pg_ctl stop: {out}");
    }

    fn conn(&self) -> Vec<String> {
        args(&["-h", &self.sock.path().display().to_string(), "-p", &self.port.to_string()])
    }

    fn sql(&self, q: &str) -> String {
        let mut a = self.conn();
        a.extend(args(&["-At", "-c", q, "postgres"]));
        let (ok, out) = self.as_pg("psql", &a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "psql {q}: {out}");
        out.trim().to_string()
    }

    /// `pgbench` with `extra` flags; returns (transactions processed, TPS).
    fn pgbench(&self, extra: &[&str]) -> (u64, f64) {
        let mut a = self.conn();
        a.extend(args(extra));
        a.push("postgres".into());
        let (ok, out) = self.as_pg("pgbench", &a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "pgbench {extra:?}: {out}");
        let field = |key: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        };
        let n =
            field("number of transactions actually processed: ").and_then(|v| v.parse().ok()).unwrap_or(0);
        let tps = field("tps = ").and_then(|v| v.parse().ok()).unwrap_or(0.0);
        (n, tps)
    }

    /// What every committed TPC-B transaction leaves: (history rows, sum of their deltas, and
    /// the sums of the account, teller and branch balances, each equal to that sum).
    fn ledger(&self) -> (u64, i64, i64, i64, i64) {
        let row = self.sql(
            "select (select count(*) from pgbench_history), (select coalesce(sum(delta),0) from pgbench_history), \
             (select sum(abalance) from pgbench_accounts), (select sum(tbalance) from pgbench_tellers), \
             (select sum(bbalance) from pgbench_branches)",
        );
        let v: Vec<i64> = row.split('|').map(|x| x.parse().unwrap_or(i64::MIN)).collect();
        assert_eq!(v.len(), 5, "{row}");
        (v[0] as u64, v[1], v[2], v[3], v[4])
    }
}

/// Seconds pgbench runs while the volume moves (`PG_MOVE_SECS`, default 15; the long version
/// of the test sets more).
fn pg_move_secs() -> u64 {
    std::env::var("PG_MOVE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15)
}

/// The stateful-container move: PostgreSQL runs pgbench on a mount in site a while `elea
/// volume move` moves its volume to b; then it is killed in a (as a container's server would
/// be) and started on a mount of the same volume in b. It recovers with every committed
/// transaction (the history holds exactly the transactions pgbench counted, and every balance
/// sums to the history's deltas), and pgbench runs in b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_moves_to_another_site_with_its_volume() {
    if !fuse_available("postgres_move") || !network_available("postgres_move") {
        return;
    }
    let bin = blocking(Postgres::bin).await;
    let bed = three_site_bed();
    let dir = tempfile::tempdir().unwrap();
    let (sites, metas, procs) = start_three_sites(&bed, dir.path()).await;
    let store = |s: &str| format!("file://{}", dir.path().join(format!("store-{s}")).display());
    for s in ["a", "b"] {
        std::fs::create_dir_all(dir.path().join(format!("store-{s}"))).unwrap();
    }
    create_volume(&metas[0], "pg", "a", &store("a"), &["--tier-after", "2s"]).await;
    cli(args(&["volume", "add-store", "pg", "--site", "b", &store("b"), "--meta", &metas[0]])).await;
    wait_led_from_home(&metas[0], &[("pg", "a")]).await;
    let ma = mount_in(dir.path(), &sites[0], &metas[0], "pg", "pg-a");
    let mb = mount_in(dir.path(), &sites[1], &metas[1], "pg", "pg-b");

    use std::sync::Arc;
    let pg_a = {
        let (bin, data) = (bin.clone(), ma.mountpoint.join("pgdata"));
        Arc::new(blocking(move || Postgres::init(bin, data)).await)
    };
    let on = |pg: &Arc<Postgres>| pg.clone();
    let p = on(&pg_a);
    let (first, tps_a) = blocking(move || {
        p.start();
        p.pgbench(&["-i", "-s", "2", "-q"]);
        p.pgbench(&["-n", "-c", "2", "-j", "2", "-T", "5"])
    })
    .await;

    // pgbench runs while the volume moves to b.
    let p = on(&pg_a);
    let secs = pg_move_secs().to_string();
    let bench = tokio::task::spawn_blocking(move || p.pgbench(&["-n", "-c", "2", "-j", "2", "-T", &secs]));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let moved =
        cli(args(&["volume", "move", "pg", "--to-site", "b", "--wait", "--json", "--meta", &metas[0]])).await;
    let (during, tps_during) = bench.await.expect("pgbench");
    assert_eq!(moved["state"], "done", "{moved}");
    wait_led_from_home(&metas[0], &[("pg", "b")]).await;
    let p = on(&pg_a);
    let ledger_a = blocking(move || {
        let l = p.ledger();
        p.kill();
        l
    })
    .await;

    // The same data directory, through the mount in b.
    let pg_b = {
        let (bin, data) = (bin.clone(), mb.mountpoint.join("pgdata"));
        Arc::new(blocking(move || Postgres::on(bin, data)).await)
    };
    let p = on(&pg_b);
    let (ledger_b, tps_b) = blocking(move || {
        p.start();
        let l = p.ledger();
        let tps = p.pgbench(&["-c", "2", "-j", "2", "-T", "5"]).1;
        (l, tps)
    })
    .await;
    let logs = || {
        let mut l: Vec<String> = procs.iter().map(MetaProc::log_tail).collect();
        l.extend([ma.log_tail(), mb.log_tail()]);
        l.join("\n")
    };
    assert!(during > 0, "pgbench committed nothing during the move\n{}", logs());
    assert_eq!(ledger_b, ledger_a, "the database in b is not the one a committed\n{}", logs());
    let (rows, delta, accounts, tellers, branches) = ledger_b;
    // Each committed transaction left one history row (`-n`: pgbench does not empty the
    // history before a run): those of the run before the move and of the run during it.
    assert_eq!(rows, first + during, "{rows} history rows for {first} + {during} committed transactions");
    assert!(
        accounts == delta && tellers == delta && branches == delta,
        "balances do not add up: {ledger_b:?}"
    );
    eprintln!(
        "postgres move: {during} transactions during the move ({tps_during:.0} TPS), {rows} in all; TPS in a \
         before the move {tps_a:.0}, in b after {tps_b:.0}; the move: {} objects in {:.1} s",
        moved["objects_done"],
        moved["elapsed_secs"].as_f64().unwrap_or(0.0)
    );
    let p = on(&pg_b);
    blocking(move || p.kill()).await;
    drop((procs, ma, mb));
}
