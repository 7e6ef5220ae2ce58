//! Malformed, oversized and misdirected requests get clear errors, and the node keeps serving
//! with its state intact. Also: a retried command is applied once, and the watch stream
//! delivers changes. Bad peer links are refused or closed.

use std::time::Duration;

use elea_common::{Errno, ROOT_INO, Timespec};
use elea_fsm::{Change, Command, Op, Reply};
use elea_integration::{Cluster, elea_cli, wait_leader};
use elea_metadata::MetaApi as _;
use elea_metadata::client::{ClientError, WatchItem};
use elea_metadata::proto::{self, meta_client::MetaClient as Raw, raft_peer_client::RaftPeerClient};
use tokio_stream::StreamExt as _;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_the_node_keeps_serving() {
    let cl = Cluster::start(1, &[]);
    let c = cl.client();
    let addr = cl.nodes[0].addr.clone();
    wait_leader(&c, std::slice::from_ref(&addr), Duration::from_secs(15)).await.expect("leader");
    let vol = c.create_volume("bad", Default::default()).await.expect("volume");
    let mut raw = Raw::connect(format!("http://{addr}")).await.expect("connect");

    // Garbage instead of a command.
    let e =
        raw.write(proto::WriteRequest { group_id: 1, command: vec![0xff; 64], hops: 0 }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("malformed"), "{}", e.message());
    let e = raw.read(proto::ReadRequest { group_id: 1, query: vec![], hops: 0 }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // A group this node does not serve.
    let cmd = Command {
        client: 0,
        seq: 0,
        acked_below: 0,
        time: Timespec::default(),
        op: Op::AllocSlices { count: 1 },
    };
    let bytes = postcard::to_allocvec(&cmd).expect("encode");
    let e =
        raw.write(proto::WriteRequest { group_id: 42, command: bytes.clone(), hops: 0 }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("serves no raft group 42"), "{}", e.message());

    // Oversized request.
    let e =
        raw.write(proto::WriteRequest { group_id: 1, command: vec![0; 8 << 20], hops: 0 }).await.unwrap_err();
    assert!(matches!(e.code(), Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument), "{e:?}");

    // Unknown volume, bad names: precise errnos.
    let e = c.mkdir(999, ROOT_INO, b"x", 0o755, 0, 0).await.unwrap_err();
    assert!(matches!(e, ClientError::Fs(_)), "{e:?}");
    let e = c.mkdir(vol.id, ROOT_INO, b"a/b", 0o755, 0, 0).await.unwrap_err();
    assert!(matches!(e, ClientError::Fs(Errno::EINVAL)), "{e:?}");
    let e = c.mkdir(vol.id, ROOT_INO, &[b'n'; 256], 0o755, 0, 0).await.unwrap_err();
    assert!(matches!(e, ClientError::Fs(Errno::ENAMETOOLONG)), "{e:?}");

    // Raft peer RPCs: garbage and misaddressed messages are refused.
    let mut peer = RaftPeerClient::connect(format!("http://{addr}")).await.expect("connect peer");
    let e = peer
        .send(proto::RaftBatch {
            group_id: 1,
            from: 7,
            from_addr: "x".into(),
            to: 1,
            messages: vec![vec![0xff; 10]],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = peer
        .send(proto::RaftBatch { group_id: 1, from: 7, from_addr: "x".into(), to: 5, messages: vec![] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Membership requests that make no sense.
    let e = c.change_membership(proto::change_membership_request::Kind::Remove, 77, "").await.unwrap_err();
    assert!(e.to_string().contains("not a member"), "{e}");
    let e =
        c.change_membership(proto::change_membership_request::Kind::AddVoter, 5, "nohost").await.unwrap_err();
    assert!(e.to_string().contains("bad address"), "{e}");

    // Still serving, state intact.
    c.mkdir(vol.id, ROOT_INO, b"still-here", 0o755, 0, 0).await.expect("node still serves");
    let vols = c.list_volumes().await.expect("list");
    assert_eq!(vols.len(), 1);

    // Bad command lines fail with a message, not a panic.
    let (ok, _, err) = elea_cli(&[
        "meta",
        "--node-id",
        "1",
        "--listen",
        "127.0.0.1:1",
        "--data-dir",
        "/nonexistent/x",
        "--initial-cluster",
        "1=nohost",
    ]);
    assert!(!ok && err.contains("HOST:PORT"), "{err}");
    let (ok, _, err) = elea_cli(&["status", "--meta", "127.0.0.1:1"]);
    assert!(!ok && err.contains("no metadata node answered"), "{err}");
}

/// Opens a raw peer link to `addr` and writes `bytes`.
fn raw_link(addr: &str, bytes: &[u8]) -> std::net::TcpStream {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(bytes).expect("write");
    s
}

/// Reads until the node closes the connection; panics if it stays open.
fn assert_closed(mut s: std::net::TcpStream, what: &str) {
    use std::io::Read as _;
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: link still open ({e})"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peer_links_are_refused_and_the_node_keeps_serving() {
    use elea_metadata::raft::link::{self, Hello, LinkError};
    let cl = Cluster::start(1, &[]);
    let c = cl.client();
    let addr = cl.nodes[0].addr.clone();
    wait_leader(&c, std::slice::from_ref(&addr), Duration::from_secs(15)).await.expect("leader");
    let vol = c.create_volume("links", Default::default()).await.expect("volume");
    let hello =
        |group, from, to, from_addr: &str| Hello { group, from, to, from_addr: from_addr.into() }.encode();
    let refused = |bytes: Vec<u8>, want: &str| {
        let mut s = raw_link(&addr, &bytes);
        match link::read_answer(&mut s) {
            Err(LinkError::Refused(why)) => assert!(why.contains(want), "{why:?} lacks {want:?}"),
            r => panic!("want a refusal containing {want:?}, got {r:?}"),
        }
        assert_closed(s, want);
    };
    refused(hello(1, 2, 5, "127.0.0.1:9"), "this is node 1, not node 5");
    refused(hello(42, 2, 1, "127.0.0.1:9"), "serves no raft group 42");
    refused(hello(1, 1, 1, "127.0.0.1:9"), "from node 1 makes no sense");
    refused(hello(1, 2, 1, "nohost"), "bad address");

    // A bad magic (after the NUL that marks a link), then a hello cut short.
    let mut bad = hello(1, 2, 1, "127.0.0.1:9");
    bad[4] = b'X';
    assert_closed(raw_link(&addr, &bad), "bad magic");
    let good = hello(1, 2, 1, "127.0.0.1:9");
    let s = raw_link(&addr, &good[..good.len() - 3]);
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    assert_closed(s, "short hello");

    // Accepted links that carry a well-formed message (from a stale term, so the node only
    // answers it) and stay open, then send an oversized frame, garbage, or a message that
    // claims another sender: closed.
    let frame = |body: &[u8]| {
        let mut f = u32::try_from(body.len()).expect("len").to_le_bytes().to_vec();
        f.extend_from_slice(body);
        f
    };
    // eraftpb.Message { msg_type: MsgHeartbeat, to: 1, from: 2, term: 1 } in protobuf-2.
    let heartbeat = frame(&[0x08, 0x08, 0x10, 0x01, 0x18, 0x02, 0x20, 0x01]);
    let accepted = |frames: &[u8], what: &str| {
        use std::io::{Read as _, Write as _};
        let mut s = raw_link(&addr, &good);
        link::read_answer(&mut s).unwrap_or_else(|e| panic!("{what}: hello refused: {e}"));
        s.write_all(&heartbeat).expect("write a good frame");
        s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        match s.read(&mut [0u8; 16]) {
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            r => panic!("{what}: a link that sent a well-formed frame ended: {r:?}"),
        }
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.write_all(frames).expect("write frames");
        assert_closed(s, what);
    };
    accepted(&u32::try_from(link::MAX_FRAME + 1).expect("len").to_le_bytes(), "oversized frame");
    accepted(&frame(&[0xff; 5]), "garbage frame");
    // eraftpb.Message { msg_type: MsgHeartbeat, to: 1, from: 9, term: 1 } in protobuf-2.
    accepted(&frame(&[0x08, 0x08, 0x10, 0x01, 0x18, 0x09, 0x20, 0x01]), "sender other than the hello's");

    // Still serving, state intact, and still the leader of its own cluster.
    c.mkdir(vol.id, ROOT_INO, b"after-bad-links", 0o755, 0, 0).await.expect("node still serves");
    let st = c.status_of(&addr).await.expect("status");
    assert_eq!(st.leader_id, 1, "{st:?}");
    assert_eq!(st.members.len(), 1, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_command_is_applied_once() {
    let cl = Cluster::start(1, &[]);
    let c = cl.client();
    let addr = cl.nodes[0].addr.clone();
    wait_leader(&c, std::slice::from_ref(&addr), Duration::from_secs(15)).await.expect("leader");
    let vol = c.create_volume("retry", Default::default()).await.expect("volume");
    let mut raw = Raw::connect(format!("http://{addr}")).await.expect("connect");
    let cmd = Command {
        client: 4242,
        seq: 1,
        acked_below: 1,
        time: Timespec::default(),
        op: Op::Mkdir {
            vol: vol.id,
            parent: ROOT_INO,
            name: b"once".to_vec(),
            mode: 0o755,
            uid: 0,
            gid: 0,
            ino: None,
        },
    };
    let bytes = postcard::to_allocvec(&cmd).expect("encode");
    let mut results = Vec::new();
    for _ in 0..3 {
        let r = raw
            .write(proto::WriteRequest { group_id: 1, command: bytes.clone(), hops: 0 })
            .await
            .expect("write");
        let res: Result<Reply, Errno> = postcard::from_bytes(&r.into_inner().result).expect("decode");
        results.push(res);
    }
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert_eq!(results[0], results[1], "a retry must return the first result, not EEXIST");
    assert_eq!(results[0], results[2]);
    let v = c.volume("retry").await.expect("volume");
    assert_eq!(v.inodes, 2, "the directory was created once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_changes_with_sequence_numbers() {
    let cl = Cluster::start(1, &[]);
    let c = cl.client();
    let addr = cl.nodes[0].addr.clone();
    wait_leader(&c, std::slice::from_ref(&addr), Duration::from_secs(15)).await.expect("leader");
    let vol = c.create_volume("watch", Default::default()).await.expect("volume");
    let mut stream = Box::pin(c.watch(vol.id, 0).await.expect("watch"));
    let d = c.mkdir(vol.id, ROOT_INO, b"w", 0o755, 0, 0).await.expect("mkdir");
    let item =
        tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("an event").expect("item");
    let WatchItem::Changes { seq, changes, client } = item.expect("ok") else { panic!("unexpected reset") };
    assert!(seq > vol.change_seq, "sequence advances");
    assert_eq!(client, elea_metadata::MetaApi::client_id(&c), "a change names the client that made it");
    assert_ne!(client, 0);
    assert!(changes.contains(&Change::Entry { parent: ROOT_INO, name: b"w".to_vec() }), "{changes:?}");
    // Resuming from an old sequence replays what was missed.
    let mut resumed = Box::pin(c.watch(vol.id, seq - 1).await.expect("watch"));
    let again =
        tokio::time::timeout(Duration::from_secs(5), resumed.next()).await.expect("replayed").expect("item");
    assert_eq!(again.expect("ok"), WatchItem::Changes { seq, changes, client });
    let _ = d;
}

/// A raft-rs `eraftpb.Message` in protobuf-2 wire format, from its varint fields (field
/// number, value): msg_type 1, to 2, from 3, term 4, log_term 5, index 6, commit 8.
fn raft_message(fields: &[(u32, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    let varint = |out: &mut Vec<u8>, mut v: u64| loop {
        if v < 0x80 {
            out.push(v as u8);
            break;
        }
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    };
    for &(field, value) in fields {
        varint(&mut out, u64::from(field) << 3);
        varint(&mut out, value);
    }
    out
}

/// The audit's C1: one forged heartbeat whose commit index is past the end of the log (and a
/// higher term, so that the leader would first follow the forger) made raft-rs panic and the
/// node exit. Such messages, and the others hostile-peer simulation found raft-rs panicking
/// on, sent over the gRPC peer service and over a peer link, are refused before raft-rs sees
/// them: the node stays up, keeps its term and stays the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_raft_messages_neither_crash_nor_depose_the_leader() {
    use elea_metadata::raft::link::{self, Hello};
    use std::io::Write as _;
    let cl = Cluster::start(1, &[]);
    let c = cl.client();
    let addr = cl.nodes[0].addr.clone();
    wait_leader(&c, std::slice::from_ref(&addr), Duration::from_secs(15)).await.expect("leader");
    let vol = c.create_volume("forged", Default::default()).await.expect("volume");
    let before = c.status_of(&addr).await.expect("status");
    let t = before.term;
    const HEARTBEAT: u64 = 8;
    const READ_INDEX: u64 = 15;
    const PROPOSE: u64 = 2;
    let forged = vec![
        // C1: commit past the end of the log, with a higher term.
        raft_message(&[(1, HEARTBEAT), (2, 1), (3, 2), (4, t + 1000), (8, u64::MAX)]),
        // A heartbeat without a term (raft-rs takes it for its own message).
        raft_message(&[(1, HEARTBEAT), (2, 1), (3, 2), (8, 1)]),
        // A read request without its context, and an empty proposal.
        raft_message(&[(1, READ_INDEX), (2, 1), (3, 2)]),
        raft_message(&[(1, PROPOSE), (2, 1), (3, 2), (4, t)]),
    ];
    let mut peer = RaftPeerClient::connect(format!("http://{addr}")).await.expect("connect peer");
    peer.send(proto::RaftBatch {
        group_id: 1,
        from: 2,
        from_addr: "127.0.0.1:9".into(),
        to: 1,
        messages: forged.clone(),
    })
    .await
    .expect("the batch is taken (and its messages dropped)");
    let mut s =
        raw_link(&addr, &Hello { group: 1, from: 2, to: 1, from_addr: "127.0.0.1:9".into() }.encode());
    link::read_answer(&mut s).expect("hello");
    for m in &forged {
        let mut f = u32::try_from(m.len()).expect("len").to_le_bytes().to_vec();
        f.extend_from_slice(m);
        s.write_all(&f).expect("write a forged frame");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.mkdir(vol.id, ROOT_INO, b"after-forged", 0o755, 0, 0).await.expect("the node still serves");
    let after = c.status_of(&addr).await.expect("status");
    assert_eq!((after.leader_id, after.term), (1, t), "still the leader, in the same term: {after:?}");
    assert!(after.commit_index > before.commit_index, "{after:?}");
}

/// A reader that stops early (`elea status | head -1`) ends the CLI quietly, as SIGPIPE would,
/// instead of a panic and its backtrace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_the_cli_quietly() {
    let cl = Cluster::start(1, &[]);
    let c = cl.client();
    let addr = cl.nodes[0].addr.clone();
    wait_leader(&c, std::slice::from_ref(&addr), Duration::from_secs(15)).await.expect("leader");
    for i in 0..40 {
        c.create_volume(&format!("v{i}"), Default::default()).await.expect("volume");
    }
    let mut child = std::process::Command::new(elea_integration::elea_bin())
        .args(["volume", "list", "--meta", &addr])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Close the reading end before the CLI writes anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(matches!(out.status.code(), Some(141) | Some(0)), "{:?} {err}", out.status);
}
