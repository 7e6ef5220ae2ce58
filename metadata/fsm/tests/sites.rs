//! Sites: declaring them, where metadata nodes run, volumes' home sites and per-site stores,
//! and the site table across snapshots.

mod common;

use common::*;
use elea_common::Errno;
use elea_fsm::*;

fn sites(h: &H) -> SiteMap {
    match h.q(Query::Sites) {
        Ok(Reply::Sites(m)) => m,
        r => panic!("{r:?}"),
    }
}

fn config(stores: &[&str]) -> VolumeConfig {
    VolumeConfig { stores: stores.iter().map(|s| s.to_string()).collect(), ..VolumeConfig::default() }
}

#[test]
fn sites_are_declared_once_and_named_sanely() {
    let mut h = H::new();
    assert_eq!(sites(&h), SiteMap::default());
    h.ok(Op::AddSite { name: "eu-west".into() });
    assert_eq!(h.err(Op::AddSite { name: "eu-west".into() }), Errno::EEXIST);
    for bad in ["", "a/b", "a b", &"x".repeat(65)] {
        assert_eq!(h.err(Op::AddSite { name: bad.into() }), Errno::EINVAL, "{bad:?}");
    }
    for i in 1..limits::SITES_MAX {
        h.ok(Op::AddSite { name: format!("s{i}") });
    }
    assert_eq!(h.err(Op::AddSite { name: "one-too-many".into() }), Errno::ENOSPC);
    assert_eq!(sites(&h).sites.len(), limits::SITES_MAX);
}

#[test]
fn nodes_name_their_sites() {
    let mut h = H::new();
    h.ok(Op::RegisterMetaNode { id: 1, site: "a".into(), addr: "10.0.0.1:7000".into() });
    h.ok(Op::RegisterCacheNode { id: 5, site: "b".into(), addr: "10.0.1.1:7100".into(), incarnation: 1 });
    // Idempotent, and a node that moved says so.
    h.ok(Op::RegisterMetaNode { id: 1, site: "a".into(), addr: "10.0.0.1:7000".into() });
    h.ok(Op::RegisterMetaNode { id: 2, site: "a".into(), addr: "10.0.0.2:7000".into() });
    h.ok(Op::RegisterMetaNode { id: 2, site: "c".into(), addr: "10.0.2.2:7000".into() });
    let m = sites(&h);
    assert_eq!(m.sites, ["a", "b", "c"]);
    assert_eq!(m.meta_site(1), Some("a"));
    assert_eq!(m.meta_site(2), Some("c"));
    assert_eq!(m.meta_nodes[1], (2, "c".to_string(), "10.0.2.2:7000".to_string()));
    for bad in [
        Op::RegisterMetaNode { id: 0, site: "a".into(), addr: "x:1".into() },
        Op::RegisterMetaNode { id: 3, site: "a b".into(), addr: "x:1".into() },
        Op::RegisterMetaNode { id: 3, site: "a".into(), addr: String::new() },
        Op::RegisterMetaNode { id: 3, site: "a".into(), addr: "x".repeat(300) },
    ] {
        assert_eq!(h.err(bad), Errno::EINVAL);
    }
}

#[test]
fn volumes_have_a_home_and_a_store_per_site() {
    let mut h = H::new();
    h.ok(Op::AddSite { name: "a".into() });
    h.ok(Op::AddSite { name: "b".into() });
    let err = h.err(Op::CreateVolumeIn { name: "v".into(), config: config(&[]), home: "nowhere".into() });
    assert_eq!(err, Errno::ENOENT);
    let err = h.err(Op::CreateVolumeIn { name: "v".into(), config: config(&[]), home: "a b".into() });
    assert_eq!(err, Errno::EINVAL);
    // Nothing of a refused creation stays.
    assert_eq!(h.q(Query::VolumeByName { name: "v".into() }), Err(Errno::ENOENT));
    let Reply::Volume(v) =
        h.ok(Op::CreateVolumeIn { name: "v".into(), config: config(&["s3://a/x"]), home: "a".into() })
    else {
        panic!()
    };
    let m = sites(&h);
    assert_eq!(m.home(v.id), Some("a"));
    assert_eq!(m.store_of(v.id, "a"), Some(0));
    assert_eq!(m.store_of(v.id, "b"), None);
    // A name taken is taken whatever the home.
    let dup = Op::CreateVolumeIn { name: "v".into(), config: config(&[]), home: "b".into() };
    assert_eq!(h.err(dup), Errno::EEXIST);

    let add = |vol, site: &str, url: &str| Op::AddStore { vol, site: site.into(), url: url.into() };
    let Reply::Volume(after) = h.ok(add(v.id, "b", "s3://b/x")) else { panic!() };
    assert_eq!(after.config.stores, ["s3://a/x", "s3://b/x"]);
    let m = sites(&h);
    assert_eq!(m.store_of(v.id, "b"), Some(1));
    assert_eq!(m.site_of_store(v.id, 1), Some("b"));
    assert_eq!(h.err(add(v.id, "b", "s3://b/y")), Errno::EEXIST, "a site has one store per volume");
    h.ok(Op::AddSite { name: "c".into() });
    assert_eq!(h.err(add(v.id, "c", "s3://a/x")), Errno::EEXIST, "a store serves one site");
    assert_eq!(h.err(add(v.id, "nowhere", "s3://n/x")), Errno::ENOENT);
    assert_eq!(h.err(add(99, "c", "s3://c/x")), Errno::ENOENT);
    assert_eq!(h.err(add(v.id, "c", "")), Errno::EINVAL);
    for i in 0..(limits::STORES_MAX - 2) {
        let site = format!("x{i}");
        h.ok(Op::AddSite { name: site.clone() });
        h.ok(add(v.id, &site, &format!("s3://x/{i}")));
    }
    h.ok(Op::AddSite { name: "full".into() });
    assert_eq!(h.err(add(v.id, "full", "s3://full/x")), Errno::ENOSPC);
    // A volume made without a home has none.
    let Reply::Volume(w) = h.ok(Op::CreateVolume { name: "w".into(), config: config(&[]) }) else { panic!() };
    assert_eq!(sites(&h).home(w.id), None);
}

#[test]
fn the_site_table_survives_a_snapshot() {
    let mut h = H::new();
    h.ok(Op::AddSite { name: "b".into() });
    h.ok(Op::RegisterMetaNode { id: 1, site: "a".into(), addr: "m1:1".into() });
    let Reply::Volume(v) =
        h.ok(Op::CreateVolumeIn { name: "v".into(), config: config(&["s3://a/x"]), home: "a".into() })
    else {
        panic!()
    };
    h.ok(Op::AddStore { vol: v.id, site: "b".into(), url: "s3://b/x".into() });
    let bytes = h.sm.snapshot();
    let restored = StateMachine::restore(&bytes).unwrap();
    assert_eq!(restored.query(&Query::Sites), h.q(Query::Sites));
    assert_eq!(restored.fingerprint(), h.sm.fingerprint());
    // A snapshot cut short in its site table is refused, not read as an older format.
    assert!(StateMachine::restore(&bytes[..bytes.len() - 3]).is_err());
}
