//! One behaviour suite run against every backend: `memory://`, `file://` (a temp dir) and the
//! in-process S3 server. Plus S3-only tests: objects land under the prefix, an outage is a
//! retryable error within a bounded time, and the store recovers when the server comes back.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use elea_store::testing::S3TestServer;
use elea_store::{BlockKey, CodecError, Compression, Store, StoreConfig, StoreError, encode_block};
use tempfile::TempDir;

/// Deterministic pseudo-random bytes; `compressible` repeats short runs.
fn data(len: usize, mut seed: u64, compressible: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let run = if compressible { 1 + (seed % 32) as usize } else { 1 };
        out.extend(std::iter::repeat_n((seed >> 24) as u8, run.min(len - out.len())));
    }
    out
}

fn key(vol: u64, slice: u64, index: u32, len: usize) -> BlockKey {
    BlockKey { cluster: 0, vol, slice, index, len: u32::try_from(len).unwrap_or(u32::MAX) }
}

fn must<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

async fn put_block(store: &Store, k: &BlockKey, raw: &[u8], c: Compression) {
    must(store.put(k, Bytes::from(encode_block(raw, c))).await);
}

/// A store plus whatever must live as long as it.
struct Backend {
    store: Store,
    _dir: Option<TempDir>,
    _server: Option<S3TestServer>,
}

impl Backend {
    async fn memory() -> Backend {
        Backend { store: must(Store::open("memory://", &StoreConfig::default())), _dir: None, _server: None }
    }

    async fn fs() -> Backend {
        let dir = must(tempfile::tempdir());
        let url = format!("file://{}/store", dir.path().display());
        Backend { store: must(Store::open(&url, &StoreConfig::default())), _dir: Some(dir), _server: None }
    }

    async fn s3() -> Backend {
        let dir = must(tempfile::tempdir());
        let server = must(S3TestServer::start(dir.path(), "elea").await);
        let store = must(Store::open(&server.url("pre/fix"), &server.store_config()));
        Backend { store, _dir: Some(dir), _server: Some(server) }
    }
}

async fn put_get_4mib(store: &Store) {
    for (i, (compressible, c)) in
        [(true, Compression::Zstd(3)), (false, Compression::Zstd(3)), (true, Compression::None)]
            .into_iter()
            .enumerate()
    {
        let raw = data(4 << 20, 11 + i as u64, compressible);
        let k = key(1, 100 + i as u64, 0, raw.len());
        put_block(store, &k, &raw, c).await;
        let got = must(store.get(&k).await);
        assert!(got == raw, "4 MiB block {i} did not round trip");
    }
}

async fn get_missing_is_not_found(store: &Store) {
    let k = key(1, 424242, 3, 10);
    match store.get(&k).await {
        Err(e @ StoreError::NotFound(_)) => {
            assert!(!e.is_retryable());
            assert!(e.to_string().contains(&k.path()), "{e}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(matches!(store.get_raw("nope/nothing").await, Err(StoreError::NotFound(_))));
}

async fn delete_is_idempotent(store: &Store) {
    let k = key(1, 7, 0, 100);
    must(store.delete(&k).await);
    put_block(store, &k, &data(100, 1, false), Compression::default()).await;
    assert!(must(store.exists(&k).await));
    must(store.delete(&k).await);
    assert!(!must(store.exists(&k).await));
    assert!(matches!(store.get(&k).await, Err(StoreError::NotFound(_))));
    must(store.delete(&k).await);
}

async fn exists(store: &Store) {
    let k = key(2, 8, 1, 5);
    assert!(!must(store.exists(&k).await));
    put_block(store, &k, b"hello", Compression::None).await;
    assert!(must(store.exists(&k).await));
    assert!(!must(store.exists(&key(2, 8, 2, 5)).await));
}

async fn list_volume(store: &Store) {
    assert!(must(store.list_volume(0, 1).await).is_empty(), "empty volume");
    let mut want = BTreeSet::new();
    for slice in 1..=20u64 {
        for index in 0..2u32 {
            let k = key(1, slice, index, 3);
            put_block(store, &k, b"abc", Compression::None).await;
            want.insert(k);
        }
    }
    // Other volumes (v11 shares the "v1" text prefix) and stray objects are not listed.
    put_block(store, &key(11, 1, 0, 3), b"abc", Compression::None).await;
    put_block(store, &key(2, 1, 0, 3), b"abc", Compression::None).await;
    must(store.put_raw("v1/junk", Bytes::from_static(b"x")).await);
    must(store.put_raw("v1/zz/not_a_key", Bytes::from_static(b"x")).await);
    let got = must(store.list_volume(0, 1).await);
    assert_eq!(got, want.iter().copied().collect::<Vec<_>>());
    assert_eq!(must(store.list_volume(0, 11).await), vec![key(11, 1, 0, 3)]);
    assert!(must(store.list_volume(0, 3).await).is_empty());
}

async fn corrupt_object_is_corrupt(store: &Store) {
    let raw = data(64 << 10, 5, true);
    let k = key(3, 9, 0, raw.len());
    put_block(store, &k, &raw, Compression::Zstd(3)).await;
    let mut bytes = must(store.get_raw(&k.path()).await).to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    must(store.put_raw(&k.path(), Bytes::from(bytes)).await);
    match store.get(&k).await {
        Err(e @ StoreError::Corrupt { .. }) => {
            assert!(!e.is_retryable());
            assert!(e.to_string().contains("checksum mismatch"), "{e}");
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|v| v.len())),
    }

    // Garbage that is not a block at all.
    must(store.put_raw(&k.path(), Bytes::from_static(b"definitely not a block")).await);
    assert!(matches!(
        store.get(&k).await,
        Err(StoreError::Corrupt { source: CodecError::BadMagic { .. }, .. })
    ));

    // A valid block under a key that says another length.
    let short = key(3, 10, 0, 11);
    put_block(store, &short, &data(10, 1, false), Compression::None).await;
    assert!(matches!(
        store.get(&short).await,
        Err(StoreError::Corrupt { source: CodecError::LengthMismatch { what: "key length", .. }, .. })
    ));
}

async fn keys_spread_over_prefixes(store: &Store) {
    for slice in 1000..1064u64 {
        put_block(store, &key(4, slice, 0, 1), b"x", Compression::None).await;
    }
    let listed = must(store.list_volume(0, 4).await);
    assert_eq!(listed.len(), 64);
    let dirs: BTreeSet<String> =
        listed.iter().map(|k| k.path().split('/').nth(1).map(str::to_string).unwrap_or_default()).collect();
    assert!(dirs.len() >= 40, "64 sequential slices landed in only {} prefixes", dirs.len());
    for k in &listed {
        assert!(must(store.exists(k).await));
    }
}

async fn raw_round_trip(store: &Store) {
    let body = Bytes::from(data(1 << 20, 3, false));
    must(store.put_raw("raw/object", body.clone()).await);
    assert_eq!(must(store.get_raw("raw/object").await), body);
    must(store.put_raw("raw/object", Bytes::from_static(b"replaced")).await);
    assert_eq!(must(store.get_raw("raw/object").await), Bytes::from_static(b"replaced"));
}

async fn probe_leaves_nothing_behind(store: &Store) {
    must(store.probe("node 1/a").await);
    must(store.probe("node 1/a").await);
    let left = must(store.operator().list_with("probes/").recursive(true).await);
    assert!(
        left.iter().all(|e| e.metadata().is_dir()),
        "probe objects left: {:?}",
        left.iter().map(|e| e.path()).collect::<Vec<_>>()
    );
}

macro_rules! suite {
    ($backend:ident: $($case:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test]
                async fn $case() {
                    let b = super::Backend::$backend().await;
                    super::$case(&b.store).await;
                }
            )*
        }
    };
}

macro_rules! all_backends {
    ($($case:ident),* $(,)?) => {
        suite!(memory: $($case),*);
        suite!(fs: $($case),*);
        suite!(s3: $($case),*);
    };
}

all_backends!(
    put_get_4mib,
    get_missing_is_not_found,
    delete_is_idempotent,
    exists,
    list_volume,
    corrupt_object_is_corrupt,
    keys_spread_over_prefixes,
    raw_round_trip,
    probe_leaves_nothing_behind,
);

#[tokio::test]
async fn s3_objects_land_under_the_prefix() {
    let dir = must(tempfile::tempdir());
    let server = must(S3TestServer::start(dir.path(), "elea").await);
    let store = must(Store::open(&server.url("a/b"), &server.store_config()));
    let k = key(1, 5, 0, 3);
    put_block(&store, &k, b"abc", Compression::None).await;
    let on_disk = dir.path().join("elea").join("a/b").join(k.path());
    let bytes = must(std::fs::read(&on_disk));
    assert_eq!(must(elea_store::decode_block(&bytes)), b"abc");
    assert_eq!(store.url(), server.url("a/b"));
}

#[tokio::test]
async fn s3_wrong_credentials_are_permanent() {
    let dir = must(tempfile::tempdir());
    let server = must(S3TestServer::start(dir.path(), "elea").await);
    let cfg = StoreConfig {
        credentials: Some((S3TestServer::ACCESS_KEY.into(), "wrong-secret".into())),
        retries: 1,
        retry_min_delay: Duration::from_millis(10),
        ..StoreConfig::default()
    };
    let store = must(Store::open(&server.url(""), &cfg));
    match store.put_raw("x", Bytes::from_static(b"x")).await {
        Err(e) => assert!(!e.is_retryable(), "{e}"),
        Ok(()) => panic!("a wrong secret was accepted"),
    }
}

fn outage_config(server: &S3TestServer, timeout: Duration) -> StoreConfig {
    StoreConfig {
        timeout,
        io_timeout: timeout,
        retries: 2,
        retry_min_delay: Duration::from_millis(20),
        retry_max_delay: Duration::from_millis(100),
        ..server.store_config()
    }
}

#[tokio::test]
async fn s3_outage_is_retryable_and_recovers() {
    let dir = must(tempfile::tempdir());
    let server = must(S3TestServer::start(dir.path(), "elea").await);
    let port = server.port();
    let store = must(Store::open(&server.url("p"), &outage_config(&server, Duration::from_secs(2))));
    let raw = data(1 << 20, 9, true);
    let k = key(1, 1, 0, raw.len());
    put_block(&store, &k, &raw, Compression::default()).await;
    assert_eq!(must(store.get(&k).await), raw);

    server.stop().await;
    let started = Instant::now();
    let err = match store.get(&k).await {
        Err(e) => e,
        Ok(_) => panic!("read succeeded with the server stopped"),
    };
    assert!(err.is_retryable(), "outage must be retryable: {err}");
    assert!(matches!(err, StoreError::Io { op: "get", .. }), "{err:?}");
    let k2 = key(1, 2, 0, 3);
    let put_err = store.put(&k2, Bytes::from(encode_block(b"new", Compression::None))).await;
    assert!(put_err.as_ref().is_err_and(StoreError::is_retryable), "{put_err:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());

    let server = must(S3TestServer::start_on(dir.path(), "elea", port).await);
    assert_eq!(server.port(), port);
    assert_eq!(must(store.get(&k).await), raw, "data written before the outage is back");
    put_block(&store, &k2, b"new", Compression::None).await;
    assert_eq!(must(store.get(&k2).await), b"new");
    server.stop().await;
}

#[tokio::test]
async fn s3_hung_server_times_out_as_retryable() {
    let dir = must(tempfile::tempdir());
    let server = must(S3TestServer::start(dir.path(), "elea").await);
    let store = must(Store::open(&server.url(""), &outage_config(&server, Duration::from_millis(300))));
    let port = server.port();
    server.stop().await;

    // Something that accepts connections and never answers.
    let listener = must(tokio::net::TcpListener::bind(("127.0.0.1", port)).await);
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            conns.push(s);
        }
    });
    let started = Instant::now();
    let err = match store.get(&key(1, 1, 0, 1)).await {
        Err(e) => e,
        Ok(_) => panic!("a hung server answered"),
    };
    assert!(err.is_retryable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    hold.abort();
}

/// A store that cannot be reached fails its probe with an error that names it.
#[tokio::test]
async fn probe_of_an_unreachable_store_fails() {
    let cfg =
        StoreConfig { retries: 0, timeout: std::time::Duration::from_secs(2), ..StoreConfig::default() };
    let store =
        must(Store::open("s3://b/p?endpoint=http://127.0.0.1:9&region=us-east-1&anonymous=true", &cfg));
    let e = store.probe("t").await.unwrap_err().to_string();
    assert!(e.contains("probes/"), "{e}");
}
