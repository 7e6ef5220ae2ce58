//! One object store, opened from a URL: the only place Elea talks to opendal.
//!
//! A [`Store`] wraps an opendal [`Operator`] with retry (exponential backoff with jitter),
//! timeout and concurrency-limit layers, and speaks in [`BlockKey`]s and encoded blocks: `get`
//! decodes and verifies what it reads, so a corrupted object surfaces as
//! [`StoreError::Corrupt`] and never as data.
//!
//! Credentials never appear in URLs: they come from [`StoreConfig::credentials`] or from the
//! environment, so [`Store::url`] is safe to log.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use opendal::layers::{ConcurrentLimitLayer, RetryLayer, TimeoutLayer};
use opendal::{ErrorKind, Operator, services};

use crate::codec::{CodecError, decode_block};
use crate::key::BlockKey;
use crate::location::Location;

/// How a [`Store`] talks to its backend. Build with `StoreConfig { .., ..Default::default() }`.
#[derive(Clone)]
pub struct StoreConfig {
    /// Limit for one attempt of a metadata operation (`exists`, i.e. stat). Default 60 s.
    /// (opendal's `TimeoutLayer::with_timeout`.)
    pub timeout: Duration,
    /// Limit for each I/O step of one attempt of a read, write, delete or list (sending the
    /// request, each chunk of a body, each list page). Default 30 s. A call may take longer in
    /// total when it makes progress or is retried. (opendal's `TimeoutLayer::with_io_timeout`.)
    pub io_timeout: Duration,
    /// How many times a temporary failure is retried before it is returned. Default 4.
    pub retries: usize,
    /// First backoff delay; each retry doubles it (plus jitter). Default 200 ms.
    pub retry_min_delay: Duration,
    /// Largest backoff delay. Default 10 s.
    pub retry_max_delay: Duration,
    /// Most operations in flight at once on this store. Default 64.
    pub concurrency: usize,
    /// Static credentials, instead of the environment: `(access key id, secret access key)` for
    /// `s3://`, `(account name, account key)` for `az://`; ignored by the other schemes.
    /// `None` (the default) reads `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`
    /// or `AZURE_STORAGE_ACCOUNT`/`AZURE_STORAGE_KEY`.
    pub credentials: Option<(String, String)>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(30),
            retries: 4,
            retry_min_delay: Duration::from_millis(200),
            retry_max_delay: Duration::from_secs(10),
            concurrency: 64,
            credentials: None,
        }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("timeout", &self.timeout)
            .field("io_timeout", &self.io_timeout)
            .field("retries", &self.retries)
            .field("retry_min_delay", &self.retry_min_delay)
            .field("retry_max_delay", &self.retry_max_delay)
            .field("concurrency", &self.concurrency)
            .field("credentials", &self.credentials.as_ref().map(|(id, _)| (id, "<redacted>")))
            .finish()
    }
}

/// Whether an opendal error may go away if the operation is tried again later.
fn opendal_retryable(e: &opendal::Error) -> bool {
    match e.kind() {
        ErrorKind::NotFound
        | ErrorKind::ConfigInvalid
        | ErrorKind::PermissionDenied
        | ErrorKind::Unsupported
        | ErrorKind::IsADirectory
        | ErrorKind::NotADirectory
        | ErrorKind::AlreadyExists
        | ErrorKind::IsSameFile
        | ErrorKind::ConditionNotMatch
        | ErrorKind::RangeNotSatisfied => false,
        // Unexpected covers network failures, timeouts and server errors; rate limits and
        // conflicts clear up. The error's status says nothing here: the retry layer marks
        // everything it gives up on "persistent", permanent errors included.
        _ => true,
    }
}

fn retry_hint(e: &opendal::Error) -> &'static str {
    if opendal_retryable(e) { "temporary, a later retry may succeed" } else { "permanent" }
}

/// What went wrong with a store operation. [`StoreError::is_retryable`] says whether trying
/// again later can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The URL or configuration is wrong. Not retryable: fix the configuration.
    #[error("invalid object store configuration: {0}")]
    Config(String),
    /// The object does not exist. Not retryable.
    #[error("object not found: {0}")]
    NotFound(String),
    /// The object exists but its bytes are not a valid block for its key. Not retryable:
    /// reading the same object again returns the same bytes.
    #[error("corrupt object {key}: {source}")]
    Corrupt {
        /// Object path.
        key: String,
        /// What the decoder found.
        #[source]
        source: CodecError,
    },
    /// The backend failed (network, timeout, permission, ...).
    #[error("object store {op} of {key:?} failed ({}): {source}", retry_hint(.source))]
    Io {
        /// The operation: "put", "get", "delete", "stat", "list", "open".
        op: &'static str,
        /// Object path (or the URL for "open").
        key: String,
        /// The opendal error, after the retry layer gave up. Boxed: it is large, and a large
        /// error would make every `Result<_, StoreError>` large.
        #[source]
        source: Box<opendal::Error>,
    },
}

impl StoreError {
    /// True if the same operation may succeed later (network trouble, timeouts, throttling,
    /// server errors). False for configuration errors, missing and corrupt objects and
    /// permission errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => opendal_retryable(source),
            StoreError::Config(_) | StoreError::NotFound(_) | StoreError::Corrupt { .. } => false,
        }
    }

    /// Wraps an opendal error from operation `op` on `key`; opendal's `NotFound` becomes
    /// [`StoreError::NotFound`]. For wrappers (e.g. fault injection) that build errors of
    /// their own.
    pub fn io(op: &'static str, key: impl Into<String>, source: opendal::Error) -> StoreError {
        if source.kind() == ErrorKind::NotFound {
            StoreError::NotFound(key.into())
        } else {
            StoreError::Io { op, key: key.into(), source: Box::new(source) }
        }
    }
}

/// The object at a store's root that names the cluster whose store it is
/// ([`Store::check_owner`]). Block keys never start with a dot.
pub const OWNER_OBJECT: &str = ".elea-cluster";

/// An object store opened from a URL. Cheap to clone; clones share connections and limits.
#[derive(Clone)]
pub struct Store {
    op: Operator,
    url: Arc<str>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish_non_exhaustive()
    }
}

/// Registers the services and the default HTTP transport. Needed once before the first
/// s3/gcs/azblob request because opendal's auto-registration is off.
fn install_http_once() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(opendal::install_default);
}

/// Named `memory://NAME` stores of this process: every open of the same name sees the same
/// objects.
fn named_memory(name: &str) -> Result<Operator, opendal::Error> {
    static NAMED: OnceLock<Mutex<HashMap<String, Operator>>> = OnceLock::new();
    let mut map = NAMED.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(op) = map.get(name) {
        return Ok(op.clone());
    }
    let op = Operator::new(services::Memory::default())?;
    map.insert(name.to_string(), op.clone());
    Ok(op)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn root_of(prefix: &str) -> String {
    if prefix.is_empty() { "/".to_string() } else { format!("/{prefix}/") }
}

/// Base64 (standard alphabet, padded) for `GOOGLE_CREDENTIALS` given as raw JSON.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Builds the un-layered operator for a location.
fn base_operator(loc: &Location, cfg: &StoreConfig) -> Result<Operator, StoreError> {
    let built = match loc {
        Location::Memory { name } if name.is_empty() => Operator::new(services::Memory::default()),
        Location::Memory { name } => named_memory(name),
        Location::File { root } => {
            // Writes go to a temporary file first and are renamed into place, so a crash never
            // leaves a partial block under its final name.
            let tmp = format!("{}/.elea-tmp", root.trim_end_matches('/'));
            Operator::new(services::Fs::default().root(root).atomic_write_dir(&tmp))
        }
        Location::S3 { bucket, prefix, endpoint, region, anonymous } => {
            install_http_once();
            let region = region
                .clone()
                .or_else(|| env("AWS_REGION"))
                .or_else(|| env("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".to_string());
            let mut b = services::S3::default().bucket(bucket).root(&root_of(prefix)).region(&region);
            let mut creds = cfg.credentials.clone().map(|(id, secret)| (id, secret, None));
            if let Some(endpoint) = endpoint {
                // A custom endpoint is some S3-compatible server: never probe EC2 metadata or
                // read ~/.aws (either can hang or pick the wrong account); take keys from the
                // config or the environment only.
                b = b.endpoint(endpoint).disable_config_load().disable_ec2_metadata();
                if creds.is_none()
                    && let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
                {
                    creds = Some((id, secret, env("AWS_SESSION_TOKEN")));
                }
                if creds.is_none() && !anonymous {
                    return Err(StoreError::Config(format!(
                        "{}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                         (or add anonymous=true to the URL)",
                        loc_url_hint(loc)
                    )));
                }
            }
            if let Some((id, secret, token)) = &creds {
                b = b.access_key_id(id).secret_access_key(secret);
                if let Some(token) = token {
                    b = b.session_token(token);
                }
            }
            if *anonymous {
                b = b.skip_signature();
            }
            Operator::new(b)
        }
        Location::Gcs { bucket, prefix, endpoint } => {
            install_http_once();
            // GOOGLE_APPLICATION_CREDENTIALS (a path) is read by opendal's default chain.
            let mut b = services::Gcs::default().bucket(bucket).root(&root_of(prefix));
            if let Some(endpoint) = endpoint {
                b = b.endpoint(endpoint);
            }
            if let Some(content) = env("GOOGLE_CREDENTIALS") {
                let content = content.trim();
                // opendal wants base64; accept the JSON key file content as well.
                let encoded =
                    if content.starts_with('{') { base64(content.as_bytes()) } else { content.to_string() };
                b = b.credential(&encoded);
            }
            Operator::new(b)
        }
        Location::Azure { container, prefix, endpoint } => {
            install_http_once();
            let (account, key) = match &cfg.credentials {
                Some((a, k)) => (Some(a.clone()), Some(k.clone())),
                None => (env("AZURE_STORAGE_ACCOUNT"), env("AZURE_STORAGE_KEY")),
            };
            let endpoint = match (endpoint, &account) {
                (Some(e), _) => e.clone(),
                (None, Some(a)) => format!("https://{a}.blob.core.windows.net"),
                (None, None) => {
                    return Err(StoreError::Config(format!(
                        "{}: no Azure account: set AZURE_STORAGE_ACCOUNT or add endpoint=... to the URL",
                        loc_url_hint(loc)
                    )));
                }
            };
            let mut b =
                services::Azblob::default().container(container).root(&root_of(prefix)).endpoint(&endpoint);
            if let Some(a) = &account {
                b = b.account_name(a);
            }
            if let Some(k) = &key {
                b = b.account_key(k);
            }
            Operator::new(b)
        }
    };
    built.map_err(|e| match e.kind() {
        ErrorKind::ConfigInvalid => StoreError::Config(format!("{}: {e}", loc_url_hint(loc))),
        _ => StoreError::Io { op: "open", key: loc_url_hint(loc), source: Box::new(e) },
    })
}

/// A short description of a location for error messages (no credentials in it).
fn loc_url_hint(loc: &Location) -> String {
    match loc {
        Location::File { root } => format!("file://{root}"),
        Location::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}"),
        Location::Gcs { bucket, prefix, .. } => format!("gs://{bucket}/{prefix}"),
        Location::Azure { container, prefix, .. } => format!("az://{container}/{prefix}"),
        Location::Memory { name } => format!("memory://{name}"),
    }
}

impl Store {
    /// Opens the store at `url`:
    ///
    /// - `file:///abs/path`: a local directory (created if missing).
    /// - `s3://bucket/prefix?endpoint=http://HOST:PORT&region=R`: AWS S3 or any S3-compatible
    ///   server (path-style). Region from the URL, else `AWS_REGION`, else `us-east-1`. Keys
    ///   from [`StoreConfig::credentials`] or `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/
    ///   `AWS_SESSION_TOKEN`; with an `endpoint`, config files and EC2 metadata are never read,
    ///   and `anonymous=true` sends unsigned requests.
    /// - `gs://bucket/prefix`: GCS, credentials from `GOOGLE_APPLICATION_CREDENTIALS` (a path)
    ///   or `GOOGLE_CREDENTIALS` (the key file content, JSON or base64). Optional `endpoint`.
    /// - `az://container/prefix`: Azure Blob, account from `AZURE_STORAGE_ACCOUNT`, key from
    ///   `AZURE_STORAGE_KEY` (or [`StoreConfig::credentials`]). Optional `endpoint`.
    /// - `memory://`: a fresh in-process store; `memory://NAME`: shared by every open of `NAME`
    ///   in this process.
    ///
    /// The prefix becomes the root of every path. A bad URL is [`StoreError::Config`] naming
    /// the problem. Opening does no network I/O (a `file://` root is created).
    pub fn open(url: &str, cfg: &StoreConfig) -> Result<Store, StoreError> {
        let loc =
            Location::parse(url).map_err(|e| StoreError::Config(format!("bad store URL {url:?}: {e}")))?;
        if cfg.concurrency == 0 {
            return Err(StoreError::Config("concurrency must be at least 1".into()));
        }
        if cfg.timeout.is_zero() || cfg.io_timeout.is_zero() {
            return Err(StoreError::Config("timeout and io_timeout must be greater than zero".into()));
        }
        let op = base_operator(&loc, cfg)?
            .layer(ConcurrentLimitLayer::new(cfg.concurrency))
            .layer(TimeoutLayer::new().with_timeout(cfg.timeout).with_io_timeout(cfg.io_timeout))
            .layer(
                RetryLayer::new()
                    .with_jitter()
                    .with_max_times(cfg.retries)
                    .with_min_delay(cfg.retry_min_delay)
                    .with_max_delay(cfg.retry_max_delay.max(cfg.retry_min_delay)),
            );
        Ok(Store { op, url: url.into() })
    }

    /// The URL as given to [`Store::open`], for display and logs.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying opendal operator (with the retry, timeout and limit layers).
    pub fn operator(&self) -> &Operator {
        &self.op
    }

    /// Stores an encoded block (see [`crate::encode_block`]) under `key`, replacing any
    /// previous object.
    pub async fn put(&self, key: &BlockKey, encoded: Bytes) -> Result<(), StoreError> {
        self.put_raw(&key.path(), encoded).await
    }

    /// Reads, verifies and decodes the block at `key`. Its decoded length must equal `key.len`.
    /// A missing object is [`StoreError::NotFound`]; bytes that do not decode, or decode to
    /// the wrong length, are [`StoreError::Corrupt`].
    ///
    /// Decoding (CRC32C, and zstd when used) runs on the calling task: a few milliseconds for
    /// a 4 MiB block.
    pub async fn get(&self, key: &BlockKey) -> Result<Vec<u8>, StoreError> {
        let path = key.path();
        let buf = self.get_raw(&path).await?;
        let raw = decode_block(&buf).map_err(|source| StoreError::Corrupt { key: path.clone(), source })?;
        if raw.len() != key.len as usize {
            return Err(StoreError::Corrupt {
                key: path,
                source: CodecError::LengthMismatch {
                    what: "key length",
                    expected: key.len.into(),
                    actual: raw.len() as u64,
                },
            });
        }
        Ok(raw)
    }

    /// The block at `key` as stored (encoded), checked with [`crate::check_encoded`] but not
    /// decoded: what a copy to another store writes. A missing object is
    /// [`StoreError::NotFound`], bytes that fail the check [`StoreError::Corrupt`].
    pub async fn get_encoded(&self, key: &BlockKey) -> Result<Bytes, StoreError> {
        let path = key.path();
        let buf = self.get_raw(&path).await?;
        crate::codec::check_encoded(&buf, key.len)
            .map_err(|source| StoreError::Corrupt { key: path, source })?;
        Ok(buf)
    }

    /// The object's bytes as stored, without decoding.
    pub async fn get_raw(&self, path: &str) -> Result<Bytes, StoreError> {
        let buf = self.op.read(path).await.map_err(|e| StoreError::io("get", path, e))?;
        Ok(buf.to_bytes())
    }

    /// Writes `data` at `path` as is, replacing any previous object.
    pub async fn put_raw(&self, path: &str, data: Bytes) -> Result<(), StoreError> {
        self.op.write(path, data).await.map(drop).map_err(|e| StoreError::Io {
            op: "put",
            key: path.to_string(),
            source: Box::new(e),
        })
    }

    /// The cluster that claimed this store (its data identity as 32 hex digits, from the
    /// [`OWNER_OBJECT`] at the store's root), if any did.
    pub async fn owner(&self) -> Result<Option<String>, StoreError> {
        match self.get_raw(OWNER_OBJECT).await {
            Ok(b) => Ok(Some(String::from_utf8_lossy(&b).trim().to_string())),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Checks that the store is this cluster's, or nobody's: `cluster` is this cluster's data
    /// identity (32 hex digits), `None` for a cluster that has none yet (no volume), which may
    /// not take a store another cluster claimed either. A store claimed by another cluster is a
    /// `Config` error that says whose it is.
    pub async fn check_owner(&self, cluster: Option<&str>) -> Result<(), StoreError> {
        match (self.owner().await?, cluster) {
            (None, _) => Ok(()),
            (Some(o), Some(c)) if o == c => Ok(()),
            (Some(o), c) => Err(StoreError::Config(format!(
                "{} belongs to another Elea cluster ({o}; this one is {}): clusters must not share a \
                 bucket and prefix, so give this one its own",
                self.url,
                c.unwrap_or("new")
            ))),
        }
    }

    /// Claims the store for `cluster` (see [`Store::check_owner`], which should pass first).
    pub async fn claim(&self, cluster: &str) -> Result<(), StoreError> {
        if self.owner().await?.as_deref() == Some(cluster) {
            return Ok(());
        }
        self.put_raw(OWNER_OBJECT, Bytes::from(format!("{cluster}\n"))).await
    }

    /// Checks that the store takes writes, reads and deletes: writes a small object under
    /// `probes/` (named after `who` and the time), reads it back, compares, and deletes it.
    /// What a volume's stores must allow before any block is trusted to them.
    pub async fn probe(&self, who: &str) -> Result<(), StoreError> {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let who: String =
            who.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        let path = format!("probes/{who}-{nanos}");
        let data = Bytes::from(format!("elea store probe {nanos}"));
        self.put_raw(&path, data.clone()).await?;
        let back = self.get_raw(&path).await?;
        let deleted = self.op.delete(&path).await;
        if back != data {
            return Err(StoreError::Config(format!(
                "{}: a probe object read back different bytes ({} instead of {})",
                self.url,
                back.len(),
                data.len()
            )));
        }
        deleted.map_err(|e| StoreError::Io { op: "delete", key: path, source: Box::new(e) })
    }

    /// Deletes the block. Deleting a missing object succeeds.
    pub async fn delete(&self, key: &BlockKey) -> Result<(), StoreError> {
        let path = key.path();
        match self.op.delete(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Io { op: "delete", key: path, source: Box::new(e) }),
        }
    }

    /// Whether the block's object exists (its content is not checked).
    pub async fn exists(&self, key: &BlockKey) -> Result<bool, StoreError> {
        let path = key.path();
        self.op.exists(&path).await.map_err(|e| StoreError::Io { op: "stat", key: path, source: Box::new(e) })
    }

    /// All block keys of volume `vol` of `cluster`, sorted. Objects under its directory that
    /// are not block keys are skipped. For tests and fsck only: the file system itself never
    /// scans the store.
    pub async fn list_volume(&self, cluster: u128, vol: u64) -> Result<Vec<BlockKey>, StoreError> {
        let dir = BlockKey::volume_dir(cluster, vol);
        let entries = match self.op.list_with(&dir).recursive(true).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::Io { op: "list", key: dir, source: Box::new(e) }),
        };
        let mut keys: Vec<BlockKey> = entries
            .iter()
            .filter(|e| e.metadata().is_file())
            .filter_map(|e| BlockKey::parse(e.path()))
            .filter(|k| k.vol == vol && k.cluster == cluster)
            .collect();
        keys.sort_unstable();
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want);
        }
    }

    #[test]
    fn root_of_prefix() {
        assert_eq!(root_of(""), "/");
        assert_eq!(root_of("a/b"), "/a/b/");
    }

    fn open_err(url: &str) -> String {
        match Store::open(url, &StoreConfig::default()) {
            Ok(s) => panic!("{url:?} opened: {s:?}"),
            Err(e) => {
                assert!(matches!(e, StoreError::Config(_)), "{url:?}: {e:?}");
                assert!(!e.is_retryable());
                e.to_string()
            }
        }
    }

    #[test]
    fn bad_urls_are_config_errors() {
        assert!(open_err("nfs://host/x").contains("unknown scheme"));
        assert!(open_err("s3://").contains("missing bucket"));
        assert!(open_err("s3://b?endpoint=localhost:9000").contains("endpoint"));
        assert!(open_err("file://relative").contains("absolute path"));
        assert!(open_err("file://relative").contains("file://relative"), "the URL is named");
    }

    #[test]
    fn bad_configs_are_config_errors() {
        for cfg in [
            StoreConfig { concurrency: 0, ..Default::default() },
            StoreConfig { timeout: Duration::ZERO, ..Default::default() },
            StoreConfig { io_timeout: Duration::ZERO, ..Default::default() },
        ] {
            assert!(matches!(Store::open("memory://", &cfg), Err(StoreError::Config(_))), "{cfg:?}");
        }
    }

    #[test]
    fn s3_endpoint_credentials_must_be_given_or_anonymous() {
        let url = "s3://bkt?endpoint=http://127.0.0.1:1";
        // The environment is only read (set_var is unsafe): skip the negative check where it
        // has keys.
        if env("AWS_ACCESS_KEY_ID").is_none() || env("AWS_SECRET_ACCESS_KEY").is_none() {
            match Store::open(url, &StoreConfig::default()) {
                Err(e @ StoreError::Config(_)) => assert!(e.to_string().contains("no S3 credentials"), "{e}"),
                other => panic!("expected a config error, got {other:?}"),
            }
        }
        let s = Store::open(&format!("{url}&anonymous=true"), &StoreConfig::default());
        assert!(s.is_ok(), "{s:?}");
    }

    #[test]
    fn s3_with_endpoint_and_config_credentials_opens() {
        let cfg = StoreConfig { credentials: Some(("id".into(), "secret".into())), ..Default::default() };
        let s = Store::open("s3://bkt/pre?endpoint=http://127.0.0.1:1&region=us-east-1", &cfg);
        assert!(s.is_ok(), "{s:?}");
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("secret"), "{dbg}");
    }

    #[test]
    fn azure_with_endpoint_opens() {
        let cfg = StoreConfig {
            credentials: Some(("devstoreaccount1".into(), "a2V5".into())),
            ..Default::default()
        };
        let s = Store::open("az://cont/p?endpoint=http://127.0.0.1:10000/devstoreaccount1", &cfg);
        assert!(s.is_ok(), "{s:?}");
    }

    #[tokio::test]
    async fn named_memory_stores_are_shared() {
        let cfg = StoreConfig::default();
        let a = Store::open("memory://store-rs-shared", &cfg).unwrap_or_else(|e| panic!("{e}"));
        let b = Store::open("memory://store-rs-shared", &cfg).unwrap_or_else(|e| panic!("{e}"));
        let c = Store::open("memory://", &cfg).unwrap_or_else(|e| panic!("{e}"));
        a.put_raw("x", Bytes::from_static(b"1")).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.get_raw("x").await.ok(), Some(Bytes::from_static(b"1")));
        assert!(matches!(c.get_raw("x").await, Err(StoreError::NotFound(_))));
    }
}
