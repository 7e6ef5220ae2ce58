//! An in-process S3 server (s3s-fs over a local directory) for tests of this and other crates.
//!
//! Enabled by the cargo feature `test-server`. Objects land as plain files under
//! `root/<bucket>/<key>`. [`S3TestServer::stop`] simulates an outage (the listener and every
//! open connection are dropped) and [`S3TestServer::start_on`] brings the server back on the
//! same port.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::store::StoreConfig;

/// A running in-process S3 server. Dropping it stops it too (without waiting).
#[derive(Debug)]
pub struct S3TestServer {
    addr: SocketAddr,
    bucket: String,
    root: PathBuf,
    task: Option<JoinHandle<()>>,
}

impl S3TestServer {
    /// Access key the server accepts.
    pub const ACCESS_KEY: &str = "elea-test";
    /// Secret key the server accepts.
    pub const SECRET_KEY: &str = "elea-test-secret";

    /// Starts a server on `127.0.0.1` on an ephemeral port, serving `root` and creating the
    /// bucket directory `root/bucket`. Runs on the current tokio runtime.
    pub async fn start(root: &Path, bucket: &str) -> io::Result<S3TestServer> {
        Self::start_on(root, bucket, 0).await
    }

    /// Like [`S3TestServer::start`] on a given port (0 picks one), e.g. to restart on the port
    /// of a stopped server.
    pub async fn start_on(root: &Path, bucket: &str, port: u16) -> io::Result<S3TestServer> {
        Self::start_at(root, bucket, SocketAddr::from(([127, 0, 0, 1], port))).await
    }

    /// Like [`S3TestServer::start_on`] on a given address (e.g. a network namespace's).
    pub async fn start_at(root: &Path, bucket: &str, at: SocketAddr) -> io::Result<S3TestServer> {
        std::fs::create_dir_all(root.join(bucket))?;
        let fs = s3s_fs::FileSystem::new(root).map_err(|e| io::Error::other(format!("s3s-fs: {e:?}")))?;
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(Self::ACCESS_KEY, Self::SECRET_KEY));
        let service = builder.build();

        let listener = TcpListener::bind(at).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let http = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            // Owning the connections here means aborting this task drops them all.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let conn = http
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service.clone())
                                .into_owned();
                            conns.spawn(async move {
                                let _ = conn.await;
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "test S3 server: accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        }
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(S3TestServer { addr, bucket: bucket.to_string(), root: root.to_path_buf(), task: Some(task) })
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The bucket served.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The directory the server stores objects under (`root/<bucket>/<key>`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A store URL for `prefix` in the bucket:
    /// `s3://{bucket}/{prefix}?endpoint=http://{addr}&region=us-east-1`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}?endpoint=http://{}&region=us-east-1", self.bucket, prefix, self.addr)
    }

    /// A default [`StoreConfig`] carrying this server's credentials.
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            credentials: Some((Self::ACCESS_KEY.to_string(), Self::SECRET_KEY.to_string())),
            ..StoreConfig::default()
        }
    }

    /// Stops accepting and drops every open connection (an outage); the port is free when this
    /// returns.
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // The aborted task's future (listener and connections) is dropped before this
            // resolves.
            let _ = task.await;
        }
    }
}

impl Drop for S3TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
