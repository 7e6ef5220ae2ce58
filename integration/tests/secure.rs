//! A metadata cluster of three processes with certificates: Raft links, snapshots and every
//! client over mutual TLS, and each role refused what is not its own.

use std::io::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use elea_auth::rustls;
use elea_auth::tls::Tls;
use elea_auth::{Role, certs};
use elea_common::ROOT_INO;
use elea_integration::{MetaProc, elea_cli, free_port, wait_leader, wait_status};
use elea_metadata::MetaApi as _;
use elea_metadata::client::{ClientConfig, ClientError, MetaClient};
use elea_metadata::proto::{self, raft_peer_client::RaftPeerClient};
use elea_metadata::raft::link::{self, Hello};

/// Issues a certificate with the CLI (as an operator would), unless it was issued before, and
/// loads it; returns it and the flags that give it to a process.
fn issue(ca: &Path, role: &str, name: &str, volumes: &[&str]) -> (Tls, Vec<String>) {
    let prefix = ca.join(format!("{role}-{name}"));
    if !certs::with_ext(&prefix, "pem").exists() {
        let mut args = vec!["certs", "issue", "--dir", ca.to_str().unwrap(), "--role", role, "--name", name];
        for v in volumes {
            args.extend(["--volume", v]);
        }
        args.extend(["--out", prefix.to_str().unwrap()]);
        let (ok, _, err) = elea_cli(&args);
        assert!(ok, "elea certs issue: {err}");
    }
    load(ca, &prefix)
}

fn load(ca: &Path, prefix: &Path) -> (Tls, Vec<String>) {
    let (cert, key) = (certs::with_ext(prefix, "pem"), certs::with_ext(prefix, "key"));
    let flags = vec![
        "--ca".into(),
        ca.join(certs::CA_CERT).display().to_string(),
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
    ];
    (Tls::load(&ca.join(certs::CA_CERT), &cert, &key).expect("load"), flags)
}

fn init(dir: &Path) -> PathBuf {
    let (ok, _, err) = elea_cli(&["certs", "init", "--dir", dir.to_str().unwrap()]);
    assert!(ok, "elea certs init: {err}");
    dir.to_path_buf()
}

fn client(addrs: &[String], tls: Option<&Tls>, deadline: Duration) -> MetaClient {
    let tls = tls.map(|t| t.connector(&[Role::Meta]).expect("connector"));
    let cfg = ClientConfig {
        tls,
        deadline,
        attempt_timeout: deadline.min(Duration::from_secs(5)),
        ..Default::default()
    };
    MetaClient::connect(addrs, cfg).expect("client")
}

fn refused(r: Result<impl std::fmt::Debug, ClientError>, want: &str) {
    match r {
        Err(ClientError::Rejected(m)) if m.contains(want) => {}
        other => panic!("expected a refusal saying {want:?}, got {other:?}"),
    }
}

/// Opens a Raft peer link over TLS with `tls`'s certificate and sends `hello`; returns the
/// node's answer.
fn tls_link(addr: &str, tls: &Tls, hello: &Hello) -> Result<(), String> {
    let name = rustls::pki_types::ServerName::try_from("elea").unwrap();
    let mut session = rustls::ClientConnection::new(tls.link_client_config().unwrap(), name).unwrap();
    let mut sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut s = rustls::Stream::new(&mut session, &mut sock);
    s.write_all(&hello.encode()).map_err(|e| e.to_string())?;
    s.flush().map_err(|e| e.to_string())?;
    link::read_answer(&mut s).map_err(|e| e.to_string())
}

async fn raft_send(addr: &str, tls: &Tls, from: u64) -> Result<(), tonic::Status> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let mut peer = RaftPeerClient::new(ep.connect_with_connector_lazy(tls.connector(&[Role::Meta]).unwrap()));
    peer.send(proto::RaftBatch {
        group_id: 1,
        from,
        from_addr: "127.0.0.1:9".into(),
        to: 1,
        messages: vec![],
    })
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_certificates_serves_its_roles_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let ca = init(&dir.path().join("ca"));
    let addrs: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let ic = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
    let mut nodes: Vec<MetaProc> = (1..=3u64)
        .map(|id| {
            let (_, mut flags) = issue(&ca, "meta", &id.to_string(), &[]);
            flags.extend(["--initial-cluster".into(), ic.clone()]);
            // Small snapshots, so that a node that was down catches up from one (over TLS).
            flags.extend(["--snapshot-every", "40", "--compact-margin", "5"].map(String::from));
            MetaProc::start(id, &addrs[id as usize - 1], &dir.path().join(format!("n{id}")), &flags)
        })
        .collect();
    let (admin, _) = issue(&ca, "admin", "ops", &[]);
    let (gateway, _) = issue(&ca, "gateway", "host1", &["v1"]);
    let (cache, _) = issue(&ca, "cache", "c1", &[]);
    let (meta3, _) = issue(&ca, "meta", "3", &[]);
    let other_ca = init(&dir.path().join("other"));
    let (stranger, _) = issue(&other_ca, "admin", "ops", &[]);

    // The admin sets the cluster up: the voters elected a leader over TLS links.
    let a = client(&addrs, Some(&admin), Duration::from_secs(30));
    let leader = wait_leader(&a, &addrs, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no leader: {}", nodes.iter().map(MetaProc::log_tail).collect::<String>()));
    let v1 = a.create_volume("v1", Default::default()).await.expect("v1");
    let v2 = a.create_volume("v2", Default::default()).await.expect("v2");
    a.mkdir(v2.id, ROOT_INO, b"private", 0o700, 0, 0).await.expect("mkdir in v2");

    // Without a certificate, or with another cluster's, nothing gets through.
    let quick = Duration::from_secs(2);
    assert!(client(&addrs, None, quick).status_of(&addrs[0]).await.is_err());
    assert!(client(&addrs, Some(&stranger), quick).list_volumes().await.is_err());

    // A gateway works in its volume, and is refused everywhere else.
    let g = client(&addrs, Some(&gateway), Duration::from_secs(10));
    g.mkdir(v1.id, ROOT_INO, b"mine", 0o755, 0, 0).await.expect("the gateway's own volume");
    let listed: Vec<String> = g.list_volumes().await.expect("list").into_iter().map(|v| v.name).collect();
    assert_eq!(listed, ["v1"], "a gateway sees only its volumes");
    refused(g.lookup(v2.id, ROOT_INO, b"private").await, "may not use volume \"v2\"");
    refused(g.mkdir(v2.id, ROOT_INO, b"x", 0o755, 0, 0).await, "may not use volume \"v2\"");
    refused(g.volume("v2").await, "may not use volume \"v2\"");
    refused(g.mark_tiered(0, vec![(1, 0)]).await, "may not make the cache nodes' bookkeeping calls");
    refused(g.create_volume("v3", Default::default()).await, "admin only");
    refused(g.transfer_leader(2).await, "admin only");
    // Bytes of another volume's inline slices do not reach it, nor the spill worker's calls.
    let secret = a.create(v2.id, ROOT_INO, b"secret", 0o600).await.expect("create in v2");
    let id = a.alloc_slices(1).await.expect("slice id");
    let piece = elea_fsm::Slice { id, offset: 0, len: 6, slice_len: 6, slice_offset: 0 };
    a.write_inline(v2.id, secret.ino, 0, vec![piece], b"hidden".to_vec()).await.expect("inline write in v2");
    assert_eq!(a.slice_data(&[id]).await.expect("admin")[0].inline.as_deref(), Some(&b"hidden"[..]));
    let seen = g.slice_data(&[id]).await.expect("slice data");
    assert_eq!((seen[0].loc.is_none(), seen[0].inline.is_none()), (true, true), "{seen:?}");
    refused(
        g.write_inline(v2.id, secret.ino, 0, vec![piece], b"hidden".to_vec()).await,
        "may not use volume \"v2\"",
    );
    refused(g.inline_slices(0, 10).await, "may not make the cache nodes' bookkeeping calls");
    refused(g.spill_inline(vec![(id, vec![1])]).await, "may not make the cache nodes' bookkeeping calls");
    // A cache node does its bookkeeping and changes no namespace or volume.
    let c = client(&addrs, Some(&cache), Duration::from_secs(10));
    c.cache_nodes().await.expect("a cache node lists cache nodes");
    refused(c.mkdir(v1.id, ROOT_INO, b"y", 0o755, 0, 0).await, "may not change a volume's namespace");
    refused(c.create_volume("v4", Default::default()).await, "admin only");

    // Raft traffic only from the meta node the certificate names.
    let to_leader = &addrs[leader.node_id as usize - 1];
    let hello = |from| Hello { group: 1, from, to: leader.node_id, from_addr: "127.0.0.1:9".into() };
    let other = if leader.node_id == 2 { 1 } else { 2 };
    let e = tls_link(to_leader, &cache, &hello(other)).unwrap_err();
    assert!(e.contains("may not send as node"), "{e}");
    if leader.node_id != 3 {
        let e = tls_link(to_leader, &meta3, &hello(other)).unwrap_err();
        assert!(e.contains("may not send as node"), "{e}");
        let s = raft_send(to_leader, &meta3, other).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    }
    let s = raft_send(to_leader, &gateway, other).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    let now = a.status_of(to_leader).await.expect("status");
    assert_eq!((now.role.as_str(), now.term), ("leader", leader.term), "{now:?}");

    // The leader dies: the others elect one over their TLS links and go on; the old leader
    // comes back and catches up.
    let old = leader.node_id;
    nodes[old as usize - 1].kill9();
    let rest: Vec<String> =
        addrs.iter().enumerate().filter(|(i, _)| *i as u64 + 1 != old).map(|(_, a)| a.clone()).collect();
    let new = wait_leader(&a, &rest, Duration::from_secs(30)).await.expect("a new leader");
    assert_ne!(new.node_id, old);
    g.mkdir(v1.id, ROOT_INO, b"after-failover", 0o755, 0, 0).await.expect("served after the failover");
    for i in 0..120 {
        a.mkdir(v2.id, ROOT_INO, format!("d{i}").as_bytes(), 0o755, 0, 0).await.expect("mkdir");
    }
    nodes[old as usize - 1].restart();
    let done = a.status_of(&addrs[new.node_id as usize - 1]).await.expect("status").commit_index;
    let back = &addrs[old as usize - 1];
    let caught_up = wait_status(&a, back, Duration::from_secs(30), |s| s.applied_index >= done)
        .await
        .unwrap_or_else(|| panic!("node {old} did not catch up: {}", nodes[old as usize - 1].log_tail()));
    assert!(caught_up.snapshot_index > leader.commit_index, "caught up from a snapshot: {caught_up:?}");
    for n in &nodes {
        let tail = n.log_tail();
        assert!(!tail.contains("panicked"), "{tail}");
    }
}
