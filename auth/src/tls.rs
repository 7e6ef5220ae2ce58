//! Mutual TLS between the processes of one cluster (TLS 1.3 only). A server asks every
//! client for a certificate of the cluster's CA and refuses the connection without one,
//! before any request is read; a client checks that the server's certificate is of the same
//! CA and cluster and of the role it expects (a block service is a cache node, a metadata
//! service a meta node). Host names are not checked: the CA is the cluster's own, so a
//! certificate it issued is a member of the cluster wherever it is reached.
//!
//! For gRPC with tonic: [`Tls::incoming`] turns a listener into accepted, verified TLS
//! connections whose [`Peer`] each request carries in its extensions (`request.extensions()
//! .get::<Peer>()`), and [`Tls::connector`] makes a client connector for
//! `Endpoint::connect_with_connector_lazy`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::{AuthError, ClusterId, Credentials, Identity, Role};

/// The ALPN protocol of a metadata node's Raft peer links, which share the port of its gRPC
/// service (`h2`): the server's handshake tells the two apart.
pub const LINK_ALPN: &[u8] = b"elea-link/1";
const H2_ALPN: &[u8] = b"h2";

/// How long a client has to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes a server runs at once; more connections wait in the listen queue.
const MAX_HANDSHAKES: usize = 256;
/// Connections a server keeps open at once (see [`Tls::accept`]); past it, new ones wait in
/// the listen queue until one closes.
pub const MAX_CONNECTIONS: usize = 4096;

/// A process's TLS settings: its credentials and the configurations made from them.
#[derive(Clone)]
pub struct Tls {
    identity: Arc<Identity>,
    cluster: ClusterId,
    server: Arc<ServerConfig>,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    creds: Arc<Credentials>,
    refused: Arc<AtomicU64>,
    /// Open accepted connections (each holds a permit until it closes).
    connections: Arc<tokio::sync::Semaphore>,
    max_connections: usize,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("identity", &self.identity).finish_non_exhaustive()
    }
}

/// Who is at the other end of an accepted connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    pub identity: Arc<Identity>,
}

impl Tls {
    pub fn new(creds: Credentials) -> Result<Self, AuthError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(creds.ca.clone()).map_err(|e| AuthError::Invalid(format!("the CA certificate: {e}")))?;
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| AuthError::Invalid(format!("client verifier: {e}")))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| AuthError::Invalid(format!("TLS: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![creds.cert.clone()], creds.key.clone_key())
            .map_err(|e| AuthError::Invalid(format!("server certificate: {e}")))?;
        server.alpn_protocols = vec![H2_ALPN.to_vec(), LINK_ALPN.to_vec()];
        // Peer links carry data one way only after the handshake: no tickets come back.
        server.send_tls13_tickets = 0;
        Ok(Self {
            identity: Arc::new(creds.identity.clone()),
            cluster: creds.cluster.clone(),
            server: Arc::new(server),
            provider,
            roots,
            creds: Arc::new(creds),
            refused: Arc::default(),
            connections: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
            max_connections: MAX_CONNECTIONS,
        })
    }

    /// Loads the credentials from PEM files (see [`Credentials::load`]).
    pub fn load(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<Self, AuthError> {
        Self::new(Credentials::load(ca, cert, key)?)
    }

    /// This process's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn cluster(&self) -> &ClusterId {
        &self.cluster
    }

    /// Connections refused so far (no certificate, another CA or cluster, a failed or slow
    /// handshake).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// A client configuration for gRPC (`h2`) that accepts servers of one of `roles`.
    pub fn client_config(&self, roles: &[Role]) -> Result<Arc<ClientConfig>, AuthError> {
        self.client_config_for(roles, H2_ALPN)
    }

    /// A client configuration for the Raft peer links of metadata nodes.
    pub fn link_client_config(&self) -> Result<Arc<ClientConfig>, AuthError> {
        self.client_config_for(&[Role::Meta], LINK_ALPN)
    }

    fn client_config_for(&self, roles: &[Role], alpn: &[u8]) -> Result<Arc<ClientConfig>, AuthError> {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| AuthError::Invalid(format!("server verifier: {e}")))?;
        let verifier =
            Arc::new(ClusterVerifier { inner, cluster: self.cluster.clone(), roles: roles.to_vec() });
        let mut c = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| AuthError::Invalid(format!("TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(vec![self.creds.cert.clone()], self.creds.key.clone_key())
            .map_err(|e| AuthError::Invalid(format!("client certificate: {e}")))?;
        c.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(c))
    }

    /// A tonic client connector to servers of one of `roles`.
    pub fn connector(&self, roles: &[Role]) -> Result<Connector, AuthError> {
        Ok(Connector { config: self.client_config(roles)? })
    }

    /// Accepts connections on `listener`, completes each handshake on a task of its own, and
    /// yields only those whose client presented a valid certificate of this cluster; the
    /// others are logged, counted and closed.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<TlsConn>>(64);
        let tls = self.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                    () = tx.closed() => return,
                };
                let slot = tokio::select! {
                    s = tls.connection_slot() => s,
                    () = tx.closed() => return,
                };
                let (tcp, addr) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, say: do not spin.
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some(conn) = tls.accept(tcp, addr, slot).await {
                        let _ = tx.send(Ok(conn)).await;
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// The same settings with at most `n` connections open at once (instead of
    /// [`MAX_CONNECTIONS`]).
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.connections = Arc::new(tokio::sync::Semaphore::new(n));
        self.max_connections = n;
        self
    }

    /// A place for one more open connection, waiting while [`MAX_CONNECTIONS`] are open (a
    /// server takes it before it accepts, so that past the cap connections wait in the
    /// kernel's listen queue).
    pub async fn connection_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.connections.clone().acquire_owned().await.ok()
    }

    /// Connections accepted and not yet closed.
    pub fn open_connections(&self) -> usize {
        self.max_connections - self.connections.available_permits()
    }

    /// The server's side of one accepted connection: the handshake (within
    /// [`HANDSHAKE_TIMEOUT`]) and the check of the client's certificate. A refused connection
    /// is logged, counted and closed (`None`). The connection keeps `slot` (see
    /// [`Tls::connection_slot`]) until it closes.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Option<TlsConn> {
        match self.handshake(tcp, addr).await {
            Ok(mut conn) => {
                conn.slot = slot;
                Some(conn)
            }
            Err(why) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %addr, "refused a connection: {why}");
                None
            }
        }
    }

    async fn handshake(&self, tcp: TcpStream, addr: SocketAddr) -> Result<TlsConn, String> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server.clone());
        let io = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Err(_) => return Err("no TLS handshake within 10 s".into()),
            Ok(Err(e)) => return Err(format!("TLS handshake: {e}")),
            Ok(Ok(io)) => io,
        };
        let cert =
            io.get_ref().1.peer_certificates().and_then(|c| c.first()).ok_or("no client certificate")?;
        let identity = Identity::of(cert).map_err(|e| e.to_string())?;
        if identity.cluster != self.cluster {
            return Err(format!("a certificate of cluster {}, not {}", identity.cluster, self.cluster));
        }
        Ok(TlsConn { io, peer: Peer { addr: Some(addr), identity: Arc::new(identity) }, slot: None })
    }
}

/// An accepted, verified connection.
pub struct TlsConn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Peer,
    /// Its place among the server's open connections, given back when it closes.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl TlsConn {
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Whether the client asked for a Raft peer link ([`LINK_ALPN`]) rather than gRPC.
    pub fn is_link(&self) -> bool {
        self.io.get_ref().1.alpn_protocol() == Some(LINK_ALPN)
    }

    /// The socket and the TLS session, for a caller that drives the session itself (a
    /// session may already hold application data read with the handshake).
    pub fn into_parts(self) -> (TcpStream, rustls::ServerConnection, Peer) {
        // A peer link leaves the server's connections: the transport caps links itself.
        let (tcp, session) = self.io.into_inner();
        (tcp, session, self.peer)
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Connects to `HOST:PORT` of a request's URI over TLS (for tonic's
/// `Endpoint::connect_with_connector_lazy`; the URI's scheme stays `http`).
#[derive(Clone)]
pub struct Connector {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector")
    }
}

type Connecting = Pin<
    Box<
        dyn Future<Output = io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>>
            + Send,
    >,
>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            // Host names are not checked (see the module's notes); any valid name will do.
            let name =
                ServerName::try_from("elea").map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let connect = async {
                let tcp = TcpStream::connect((host, port)).await?;
                tcp.set_nodelay(true)?;
                tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
            };
            let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect).await.map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "connecting and the TLS handshake took over 10 s")
            })??;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// Checks a server's certificate: issued by the cluster's CA (chain, validity, usage), of
/// this cluster and of an expected role; its host names are not compared.
#[derive(Debug)]
struct ClusterVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    cluster: ClusterId,
    roles: Vec<Role>,
}

impl ServerCertVerifier for ClusterVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Ok(_)
            | Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let id = Identity::of(end_entity).map_err(|e| {
            Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
        })?;
        if id.cluster != self.cluster || !self.roles.contains(&id.role) {
            return Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt as _;

    use super::*;
    use crate::certs::{self, Request, with_ext};

    fn issue(dir: &std::path::Path, role: Role, name: &str) -> Tls {
        let out = dir.join(name);
        certs::issue(dir, &Request { role, name: name.into(), volumes: vec![], days: 1 }, &out).unwrap();
        Tls::load(&dir.join(certs::CA_CERT), &with_ext(&out, "pem"), &with_ext(&out, "key")).unwrap()
    }

    async fn connect(
        addr: SocketAddr,
        client: &Tls,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let config = client.client_config(&[Role::Cache]).unwrap();
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("elea").unwrap();
        tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
    }

    /// Past its cap a server completes no more handshakes until a connection closes; then the
    /// one that waited gets in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_past_the_cap_wait_until_one_closes() {
        let dir = tempfile::tempdir().unwrap();
        certs::init(dir.path()).unwrap();
        let server = issue(dir.path(), Role::Cache, "node").with_max_connections(2);
        let client = issue(dir.path(), Role::Admin, "ops");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = server.incoming(listener);
        let (held_tx, mut held_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(conn)) = incoming.next().await {
                let _ = held_tx.send(conn);
            }
        });
        let _a = connect(addr, &client).await.unwrap();
        let _b = connect(addr, &client).await.unwrap();
        let first = held_rx.recv().await.unwrap();
        let _second = held_rx.recv().await.unwrap();
        assert_eq!(server.open_connections(), 2);
        let third = tokio::spawn({
            let client = client.clone();
            async move { connect(addr, &client).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!third.is_finished(), "a third connection got through past the cap");
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), third).await.unwrap().unwrap().unwrap();
        let _third = tokio::time::timeout(Duration::from_secs(5), held_rx.recv()).await.unwrap().unwrap();
        assert_eq!(server.open_connections(), 2);
    }
}
