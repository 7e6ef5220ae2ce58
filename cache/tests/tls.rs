//! The block service with mutual TLS: who may connect, and what each role may call.

#[allow(unused_imports)] // shared with the data path tests
mod common;

use std::path::Path;

use bytes::Bytes;
use common::TestCluster;
use elea_auth::Role;
use elea_auth::certs::{self, Request, with_ext};
use elea_auth::tls::Tls;
use elea_cache::client::BlockClients;
use elea_cache::client::blocks::BlockClientConfig;
use elea_cache::proto::{BlockRef, GetRequest};

fn issue(dir: &Path, out: &Path, role: Role, name: &str, volumes: &[&str]) -> Tls {
    let req = Request {
        role,
        name: name.into(),
        volumes: volumes.iter().map(|v| v.to_string()).collect(),
        days: 1,
    };
    certs::issue(dir, &req, out).unwrap();
    Tls::load(&dir.join(certs::CA_CERT), &with_ext(out, "pem"), &with_ext(out, "key")).unwrap()
}

fn clients(tls: Option<&Tls>) -> BlockClients {
    let tls = tls.map(|t| t.connector(&[Role::Cache]).unwrap());
    BlockClients::new(BlockClientConfig { tls, ..BlockClientConfig::default() })
}

fn get(r: BlockRef, len: u32) -> GetRequest {
    GetRequest { block: Some(r), len, tiered_stores: vec![], peers: vec![], cache: false, range: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_this_clusters_certificates_connect_and_each_role_calls_only_what_it_may() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    certs::init(&a).unwrap();
    certs::init(&b).unwrap();
    let node_tls = issue(&a, &tmp.path().join("node"), Role::Cache, "node1", &[]);
    let gateway = issue(&a, &tmp.path().join("gw"), Role::Gateway, "host1", &["v1"]);
    let peer = issue(&a, &tmp.path().join("peer"), Role::Cache, "node2", &[]);
    let admin = issue(&a, &tmp.path().join("ops"), Role::Admin, "ops", &[]);
    let stranger = issue(&b, &tmp.path().join("other"), Role::Gateway, "host1", &["v1"]);
    // A gateway certificate of this cluster posing as a cache node.
    let impostor = issue(&a, &tmp.path().join("impostor"), Role::Gateway, "node1", &["v1"]);

    let mut c = TestCluster::start(0).await;
    c.start_node_with(1, |cfg| cfg.tls = Some(node_tls.clone())).await;
    let addr = c.nodes[0].addr.clone();
    let v1 = c.volume("v1", 1, 3_600_000).await;
    let v2 = c.volume("v2", 1, 3_600_000).await;
    let data = Bytes::from(vec![7u8; 4096]);
    let crc = crc32c::crc32c(&data);
    let r1 = BlockRef { vol: v1, slice: 1_000_001, index: 0 };
    let r2 = BlockRef { vol: v2, slice: 1_000_002, index: 0 };

    // Serving (until it has registered, a node closes every connection it accepts).
    let gw = clients(Some(&gateway));
    common::wait_until(std::time::Duration::from_secs(20), "the node serves", || async {
        gw.has(&addr, r1).await.is_ok()
    })
    .await;
    // No certificate, or one of another cluster's CA: the connection is refused.
    for (who, p) in [("no certificate", clients(None)), ("another cluster", clients(Some(&stranger)))] {
        let e = p.put(&addr, r1, data.clone(), crc).await.unwrap_err();
        assert!(!e.to_string().contains("denied"), "{who}: refused at connect, not per call: {e}");
        assert!(p.has(&addr, r1).await.is_err(), "{who}");
    }
    // A client that expects a cache node does not talk to a server with another role's
    // certificate (here the node presents a gateway's).
    let mut fake = TestCluster::start(0).await;
    fake.start_node_with(1, |cfg| cfg.tls = Some(impostor.clone())).await;
    let fake_addr = fake.nodes[0].addr.clone();
    // A client that would accept a gateway's certificate (an operator's) gets through once
    // it serves...
    let lenient = BlockClients::new(BlockClientConfig {
        tls: Some(admin.connector(&[Role::Gateway]).unwrap()),
        ..BlockClientConfig::default()
    });
    common::wait_until(std::time::Duration::from_secs(20), "the impostor serves", || async {
        lenient.has(&fake_addr, r1).await.is_ok()
    })
    .await;
    // ... one that wants a cache node does not.
    let e = clients(Some(&gateway)).has(&fake_addr, r1).await.unwrap_err();
    assert!(!e.to_string().contains("denied"), "refused at connect: {e}");

    // A gateway: its volume's blocks, nothing else.
    gw.put(&addr, r1, data.clone(), crc).await.unwrap();
    assert_eq!(gw.get(&addr, get(r1, 4096)).await.unwrap(), data.to_vec());
    assert!(gw.has(&addr, r1).await.unwrap().staged);
    for (what, e) in [
        ("put to another volume", gw.put(&addr, r2, data.clone(), crc).await.unwrap_err()),
        ("get from another volume", gw.get(&addr, get(r2, 4096)).await.unwrap_err()),
        ("delete", gw.delete(&addr, r1).await.unwrap_err()),
        ("tier", gw.tier(&addr, v1).await.unwrap_err()),
        ("drop its cache", gw.drop_cache(&addr).await.unwrap_err()),
        ("read its workers", gw.workers(&addr).await.map(|_| ()).unwrap_err()),
    ] {
        assert!(e.to_string().contains("may not"), "a gateway's {what}: {e}");
    }
    assert!(gw.has(&addr, r1).await.unwrap().staged, "the refused delete deleted nothing");

    // Another cache node and an operator may do everything.
    let p = clients(Some(&peer));
    p.put(&addr, r2, data.clone(), crc).await.unwrap();
    p.delete(&addr, r2).await.unwrap();
    let ops = clients(Some(&admin));
    ops.tier(&addr, v1).await.unwrap();
    assert!(!ops.workers(&addr).await.unwrap().is_empty());
    ops.delete(&addr, r1).await.unwrap();
    assert!(!p.has(&addr, r1).await.unwrap().staged);
    // The node counts a refusal when its side of the handshake ends, which may be after the
    // client has given up.
    common::wait_until(std::time::Duration::from_secs(20), "refused connections are counted", || async {
        node_tls.refused() >= 2
    })
    .await;
}
