//! The network, behind a trait so that the same server and client code runs over real TCP and,
//! in tests, over turmoil's simulated network (`turmoil::net`), which has the same shape.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncWrite};

pub trait Transport: Clone + Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Listener: Send + Sync + 'static;

    fn bind(&self, addr: &str) -> impl Future<Output = io::Result<Self::Listener>> + Send;
    fn accept(&self, listener: &Self::Listener) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
    fn connect(&self, addr: &str) -> impl Future<Output = io::Result<Self::Stream>> + Send;
    fn local_addr(&self, listener: &Self::Listener) -> io::Result<SocketAddr>;

    /// Whether connections are TLS (then the member port requires member certificates).
    fn is_tls(&self) -> bool {
        false
    }

    /// The leaf certificate (DER) the other end of an accepted connection presented, if any.
    fn peer_certificate(_stream: &Self::Stream) -> Option<Vec<u8>> {
        None
    }
}

/// Real TCP through tokio, with Nagle off (requests and replies are small and latency-bound).
#[derive(Clone, Copy, Debug, Default)]
pub struct Tcp;

impl Transport for Tcp {
    type Stream = tokio::net::TcpStream;
    type Listener = tokio::net::TcpListener;

    async fn bind(&self, addr: &str) -> io::Result<Self::Listener> {
        tokio::net::TcpListener::bind(addr).await
    }

    async fn accept(&self, listener: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)> {
        let (s, a) = listener.accept().await?;
        s.set_nodelay(true)?;
        Ok((s, a))
    }

    async fn connect(&self, addr: &str) -> io::Result<Self::Stream> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    fn local_addr(&self, listener: &Self::Listener) -> io::Result<SocketAddr> {
        listener.local_addr()
    }
}

// ---- TLS ------------------------------------------------------------------------------------

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::ReadBuf;
use tokio::sync::{mpsc, Mutex, Semaphore};

/// The DNS name a member's certificate carries for member `id` (beside the addresses it is
/// reached at): what the member port checks against the member a connection's hello names.
pub fn member_cert_name(id: truba_engine::ReplicaId) -> String {
    format!("truba-member-{}", id.0)
}

/// How long a connection may take over its TLS handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes under way at once on one listener; beyond it, new connections are dropped
/// (a flood of half-open handshakes costs a bounded amount of memory).
const HANDSHAKES_MAX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: cannot read {what} {path}: {reason}")]
    File { what: &'static str, path: PathBuf, reason: String },
    #[error("TLS: {0}")]
    Config(String),
}

/// Where a node's or a client's certificate, key and trusted CA are.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain (PEM), leaf first. Optional for a client.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// The CA certificates (PEM) that peers' certificates must chain to.
    pub ca: PathBuf,
    /// The name the server's certificate must carry, instead of the host dialed.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// TLS for one node or client: the server side (a node's listeners: clients' certificates are
/// asked for and checked against the CA when given, and required on the member port, see
/// `server.rs`) and the client side (dialing members, handlers or servers).
#[derive(Clone)]
pub struct Tls {
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    connector: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("serves", &self.acceptor.is_some()).finish()
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::File { what, path: path.into(), reason };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        what: "key",
        path: path.into(),
        reason: e.to_string(),
    })
}

impl Tls {
    /// A node's TLS: it serves with `cert` and `key`, and presents them when it dials.
    pub fn node(files: &TlsFiles) -> Result<Tls, TlsError> {
        let (Some(cert), Some(key)) = (&files.cert, &files.key) else {
            return Err(TlsError::Config("a node needs tls.cert and tls.key beside tls.ca".into()));
        };
        Tls::build(files, Some((read_certs("certificate", cert)?, read_key(key)?)), true)
    }

    /// A client's TLS: it trusts `ca`, and presents `cert` and `key` if given.
    pub fn client(files: &TlsFiles) -> Result<Tls, TlsError> {
        let identity = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => Some((read_certs("certificate", cert)?, read_key(key)?)),
            (None, None) => None,
            _ => return Err(TlsError::Config("a client certificate needs its key, and a key its certificate".into())),
        };
        Tls::build(files, identity, false)
    }

    fn build(
        files: &TlsFiles,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        serves: bool,
    ) -> Result<Tls, TlsError> {
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        // The crypto provider is chosen here, explicitly, rather than from whatever a process
        // happens to install as its default.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in read_certs("CA certificate", &files.ca)? {
            roots.add(ca).map_err(|e| TlsError::File {
                what: "CA certificate",
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_root_certificates(roots.clone());
        let client = match &identity {
            Some((certs, key)) => client.with_client_auth_cert(certs.clone(), key.clone_key()).map_err(config)?,
            None => client.with_no_client_auth(),
        };
        let acceptor = match identity.filter(|_| serves) {
            Some((certs, key)) => {
                // Clients may come without a certificate (a bearer token, or nothing, proves
                // who they are there); one that presents a certificate must chain to the CA.
                // The member port requires one that names the member (see `server.rs`).
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?;
                let server = rustls::ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(config)?
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(certs, key)
                    .map_err(config)?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
            }
            None => None,
        };
        let server_name = match &files.server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|e| TlsError::Config(format!("tls.server_name {name:?}: {e}")))?,
            ),
            None => None,
        };
        Ok(Tls { acceptor, connector: tokio_rustls::TlsConnector::from(Arc::new(client)), server_name })
    }

    /// The name a dialed server's certificate must carry: the configured one, else the host.
    fn name_for(&self, addr: &str) -> io::Result<ServerName<'static>> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host:?} is no TLS server name: {e}")))
    }
}

/// Whether `cert` (a peer's leaf certificate, DER) names member `id` (see [`member_cert_name`]).
pub fn cert_names_member(cert: &[u8], id: truba_engine::ReplicaId) -> bool {
    let der = CertificateDer::from(cert);
    let Ok(parsed) = webpki::EndEntityCert::try_from(&der) else { return false };
    let Ok(name) = ServerName::try_from(member_cert_name(id)) else { return false };
    parsed.verify_is_valid_for_subject_name(&name).is_ok()
}

/// The real network: TCP, with TLS when configured. Plain TCP is the default, for a node that
/// listens on loopback only (see `server.rs` for the warning a node gives otherwise).
#[derive(Clone, Debug, Default)]
pub struct RealNet {
    tls: Option<Tls>,
}

impl RealNet {
    pub fn plain() -> RealNet {
        RealNet { tls: None }
    }

    pub fn with_tls(tls: Tls) -> RealNet {
        RealNet { tls: Some(tls) }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// A connection of [`RealNet`].
pub enum RealStream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::TlsStream<tokio::net::TcpStream>>),
}

impl AsyncRead for RealStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RealStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            RealStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for RealStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            RealStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            RealStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RealStream::Plain(s) => Pin::new(s).poll_flush(cx),
            RealStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RealStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            RealStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

type Handshaken = io::Result<(RealStream, SocketAddr)>;

/// A listener of [`RealNet`]. With TLS, a task accepts connections and runs each handshake in a
/// task of its own (bounded, with a timeout), so that a slow or silent handshake never holds up
/// the next connection; finished ones wait here to be taken.
pub enum RealListener {
    Plain(tokio::net::TcpListener),
    Tls { addr: SocketAddr, done: Mutex<mpsc::Receiver<Handshaken>> },
}

async fn handshakes(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    done: mpsc::Sender<Handshaken>,
) {
    let permits = Arc::new(Semaphore::new(HANDSHAKES_MAX));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = done.closed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                if done.send(Err(e)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = HANDSHAKES_MAX, "too many TLS handshakes under way; dropping a connection");
            continue;
        };
        let (acceptor, done) = (acceptor.clone(), done.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ =
                        done.send(Ok((RealStream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls))), peer))).await;
                }
                Ok(Err(e)) => {
                    tracing::info!(%peer, %e, "a TLS handshake failed (a plaintext client, or a certificate not trusted?)")
                }
                Err(_) => tracing::info!(%peer, "a TLS handshake did not finish in time; dropping the connection"),
            }
        });
    }
}

impl Transport for RealNet {
    type Stream = RealStream;
    type Listener = RealListener;

    async fn bind(&self, addr: &str) -> io::Result<Self::Listener> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let Some(acceptor) = self.tls.as_ref().and_then(|t| t.acceptor.clone()) else {
            return Ok(RealListener::Plain(listener));
        };
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(handshakes(listener, acceptor, tx));
        Ok(RealListener::Tls { addr, done: Mutex::new(rx) })
    }

    async fn accept(&self, listener: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)> {
        match listener {
            RealListener::Plain(l) => {
                let (s, a) = Tcp.accept(l).await?;
                Ok((RealStream::Plain(s), a))
            }
            RealListener::Tls { done, .. } => match done.lock().await.recv().await {
                Some(r) => r,
                None => Err(io::Error::other("the TLS listener stopped")),
            },
        }
    }

    async fn connect(&self, addr: &str) -> io::Result<Self::Stream> {
        let tcp = Tcp.connect(addr).await?;
        let Some(tls) = &self.tls else { return Ok(RealStream::Plain(tcp)) };
        let name = tls.name_for(addr)?;
        let stream = tls.connector.connect(name, tcp).await?;
        Ok(RealStream::Tls(Box::new(tokio_rustls::TlsStream::Client(stream))))
    }

    fn local_addr(&self, listener: &Self::Listener) -> io::Result<SocketAddr> {
        match listener {
            RealListener::Plain(l) => l.local_addr(),
            RealListener::Tls { addr, .. } => Ok(*addr),
        }
    }

    fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    fn peer_certificate(stream: &Self::Stream) -> Option<Vec<u8>> {
        let RealStream::Tls(tls) = stream else { return None };
        tls.get_ref().1.peer_certificates()?.first().map(|c| c.to_vec())
    }
}
