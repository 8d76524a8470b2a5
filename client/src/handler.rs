//! The handler side: the pipe connects to a kind's handler and pushes it sessions that came due
//! ([`PipeToHandler::Deliver`]); the handler works on each through the servers named in the
//! delivery, like any client, and answers [`HandlerToPipe::Ack`].
//!
//! ```no_run
//! use truba_client::handler::{serve, Handler, RepeatData};
//!
//! struct Mailer;
//! impl Handler for Mailer {
//!     async fn handle(&self, data: RepeatData) -> Result<(), String> {
//!         // ... work on data.records ...
//!         data.session.delete().await.map_err(|e| e.to_string()) // done: never delivered again
//!     }
//! }
//! # async fn demo() { serve("127.0.0.1:7071", Mailer).await.unwrap(); }
//! ```
//!
//! [`Handler`] is generic over the [`Transport`] with [`Tcp`] as the default, so `impl Handler for
//! X` is the real-network handler and tests implement `Handler<T>` for a simulated transport.
//! Deliveries on one connection are handled one at a time; connections are served concurrently.
//! One [`Pipe`] is kept per distinct list of servers and shared by all deliveries naming it.

use crate::client::{ClientOptions, Pipe, Session};
use crate::net::{Tcp, Transport};
use crate::wire::{self, HandlerToPipe, PipeToHandler};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::Semaphore;
use truba_engine::{Handle, Kind, UnixSecs};

/// Connections from pipes served at once; further ones wait to be accepted.
pub const HANDLER_CONNECTIONS_MAX: usize = 256;
/// Distinct server lists with a cached [`Pipe`].
const PIPES_MAX: usize = 64;
/// Pause after a failed accept (out of file descriptors, say) before the next.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// A session delivered to a handler.
pub struct RepeatData<T: Transport = Tcp> {
    /// The session's records, oldest first.
    pub records: Vec<Vec<u8>>,
    /// The session at this delivery's attempt: `delete()` it when the work is done, or `store()`
    /// it for a later attempt. Older handles are fenced off (`StaleAttempt`).
    pub session: Session<T>,
    pub kind: u32,
    /// The repeat time the session was stored with.
    pub due: UnixSecs,
}

/// Works on delivered sessions. `T` is the transport to the servers (real TCP by default).
pub trait Handler<T: Transport = Tcp>: Send + Sync + 'static {
    /// Work on a delivered session: finish it (`session.delete()`) or store it again. An `Err`
    /// (or a panic) makes the pipe store the session again for a later attempt, with backoff;
    /// after the kind's `max_attempts` failures in a row it goes to the dead-letter set.
    fn handle(&self, data: RepeatData<T>) -> impl Future<Output = Result<(), String>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
}

/// Listens on `addr` (real TCP) and serves the pipe's deliveries with `handler`. Runs until the
/// task is dropped; fails only if it cannot listen.
pub async fn serve<H: Handler>(addr: &str, handler: H) -> Result<(), HandlerError> {
    let listener = Tcp.bind(addr).await.map_err(|source| HandlerError::Bind { addr: addr.to_string(), source })?;
    tracing::info!(addr = ?Tcp.local_addr(&listener).ok(), "handler listening");
    serve_with(Tcp, listener, handler).await
}

/// [`serve`] on any transport and an already bound listener, with [`handler_options`].
pub async fn serve_with<T: Transport, H: Handler<T>>(
    transport: T,
    listener: T::Listener,
    handler: H,
) -> Result<(), HandlerError> {
    serve_with_options(transport, listener, handler, handler_options()).await
}

/// The default options of a handler's pipes: the client's, but giving up after 10 s in all, so
/// that a delivery whose servers cannot be reached is acknowledged as failed well within the
/// pipe's default `handler_timeout_ms` (30 s), rather than after the pipe stopped waiting.
pub fn handler_options() -> ClientOptions {
    ClientOptions { retry_for: Duration::from_secs(10), ..ClientOptions::default() }
}

/// [`serve_with`], with the options of the pipes that reach the servers. `options.frame_bytes_max`
/// also bounds the delivery frames accepted from the pipe.
pub async fn serve_with_options<T: Transport, H: Handler<T>>(
    transport: T,
    listener: T::Listener,
    handler: H,
    options: ClientOptions,
) -> Result<(), HandlerError> {
    let shared = Arc::new(Shared { transport, handler, options, pipes: Mutex::new(HashMap::new()) });
    let slots = Arc::new(Semaphore::new(HANDLER_CONNECTIONS_MAX));
    loop {
        let slot = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        match shared.transport.accept(&listener).await {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    shared.serve_connection(stream, peer).await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection from the pipe failed");
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
        }
    }
}

struct Shared<T: Transport, H> {
    transport: T,
    handler: H,
    options: ClientOptions,
    pipes: Mutex<HashMap<Vec<String>, Pipe<T>>>,
}

impl<T: Transport, H: Handler<T>> Shared<T, H> {
    async fn serve_connection(self: Arc<Self>, stream: T::Stream, peer: SocketAddr) {
        let (reader, mut writer) = tokio::io::split(stream);
        let mut reader = BufReader::new(reader);
        loop {
            let msg = match wire::read::<PipeToHandler, _>(&mut reader, self.options.frame_bytes_max).await {
                Ok(Some(msg)) => msg,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "bad frame from the pipe; closing the connection");
                    return;
                }
            };
            let PipeToHandler::Deliver { kind, handle, due, records, servers } = msg;
            tracing::debug!(%peer, %handle, %kind, records = records.len(), "delivery");
            let result = self.clone().deliver(kind, handle, due, records, servers).await;
            if let Err(e) = &result {
                tracing::info!(%handle, error = %e, "delivery failed; the pipe stores it again");
            }
            let ack = HandlerToPipe::Ack { handle, result };
            let sent = async {
                wire::write(&mut writer, &ack).await?;
                writer.flush().await.map_err(wire::FrameError::from)
            };
            if let Err(e) = sent.await {
                tracing::debug!(%peer, %handle, error = %e, "could not acknowledge; the pipe will redeliver");
                return;
            }
        }
    }

    async fn deliver(
        self: Arc<Self>,
        kind: Kind,
        handle: Handle,
        due: UnixSecs,
        records: Vec<Vec<u8>>,
        servers: Vec<String>,
    ) -> Result<(), String> {
        let pipe = self.pipe_for(servers).await?;
        let data = RepeatData { records, session: pipe.session(handle), kind: kind.0, due };
        // In a task of its own, so that a panic becomes a failed delivery rather than a lost
        // connection.
        let shared = self.clone();
        match tokio::spawn(async move { shared.handler.handle(data).await }).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(format!("the handler panicked: {e}")),
            Err(e) => Err(format!("the handler did not finish: {e}")),
        }
    }

    /// The cached pipe for this list of servers, connecting one if there is none.
    async fn pipe_for(&self, servers: Vec<String>) -> Result<Pipe<T>, String> {
        if let Some(pipe) = self.pipes.lock().expect("not poisoned").get(&servers) {
            return Ok(pipe.clone());
        }
        let pipe = Pipe::connect_with(self.transport.clone(), servers.clone(), self.options.clone())
            .await
            .map_err(|e| e.to_string())?;
        let mut pipes = self.pipes.lock().expect("not poisoned");
        if pipes.len() >= PIPES_MAX && !pipes.contains_key(&servers) {
            let evict = pipes.keys().next().cloned().expect("the map is full");
            pipes.remove(&evict);
        }
        Ok(pipes.entry(servers).or_insert(pipe).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::tests::{ordinary, Act, FakeServer};
    use truba_engine::{Attempt, Request, SessionId};

    type Seen = Arc<Mutex<Vec<(u32, UnixSecs, Handle, Vec<Vec<u8>>)>>>;

    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Delete,
        Fail,
        Panic,
    }

    struct Recorder {
        seen: Seen,
        mode: Mode,
    }

    impl<T: Transport> Handler<T> for Recorder {
        async fn handle(&self, data: RepeatData<T>) -> Result<(), String> {
            self.seen.lock().unwrap().push((data.kind, data.due, data.session.handle(), data.records.clone()));
            match self.mode {
                Mode::Delete => data.session.delete().await.map_err(|e| e.to_string()),
                Mode::Fail => Err("cannot do it now".into()),
                Mode::Panic => panic!("handler bug"),
            }
        }
    }

    /// Starts `serve_with` for a recorder; returns its address and what it saw.
    async fn start(mode: Mode) -> (String, Seen) {
        let listener = Tcp.bind("127.0.0.1:0").await.unwrap();
        let addr = Tcp.local_addr(&listener).unwrap().to_string();
        let seen = Seen::default();
        let handler = Recorder { seen: seen.clone(), mode };
        // Quick to give up: one test gives the handler no server that answers.
        let options = ClientOptions { retry_for: Duration::from_millis(500), ..handler_options() };
        tokio::spawn(async move { serve_with_options(Tcp, listener, handler, options).await.unwrap() });
        (addr, seen)
    }

    /// Plays the pipe: sends one delivery on `conn` and returns the acknowledgement.
    async fn deliver(
        conn: &mut tokio::net::TcpStream,
        handle: Handle,
        records: &[&[u8]],
        servers: Vec<String>,
    ) -> HandlerToPipe {
        let records = records.iter().map(|r| r.to_vec()).collect();
        let msg = PipeToHandler::Deliver { kind: Kind(3), handle, due: UnixSecs(77), records, servers };
        wire::write(conn, &msg).await.unwrap();
        wire::read(conn, 1 << 20).await.unwrap().expect("an ack")
    }

    fn handle(session: u64, attempt: u32) -> Handle {
        Handle { session: SessionId(session), attempt: Attempt(attempt) }
    }

    #[tokio::test]
    async fn deliveries_reach_the_handler_and_are_acknowledged() {
        let server = FakeServer::start(|msg, _| Act::Answer(ordinary(msg))).await;
        let (addr, seen) = start(Mode::Delete).await;
        let mut conn = Tcp.connect(&addr).await.unwrap();

        let h1 = handle(42, 1);
        let ack = deliver(&mut conn, h1, &[b"a", b"bc"], vec![server.addr.clone()]).await;
        assert_eq!(ack, HandlerToPipe::Ack { handle: h1, result: Ok(()) });
        // A second delivery on the same connection, through the same cached pipe.
        let h2 = handle(43, 2);
        let ack = deliver(&mut conn, h2, &[], vec![server.addr.clone()]).await;
        assert_eq!(ack, HandlerToPipe::Ack { handle: h2, result: Ok(()) });

        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![(3, UnixSecs(77), h1, vec![b"a".to_vec(), b"bc".to_vec()]), (3, UnixSecs(77), h2, vec![])]
        );
        let reqs = server.requests();
        assert_eq!(
            reqs.iter().map(|r| r.2.clone()).collect::<Vec<_>>(),
            vec![Request::Delete { handle: h1 }, Request::Delete { handle: h2 }]
        );
        assert_ne!(reqs[0].0, reqs[1].0, "each delivered session has its own client id");
        assert_eq!(server.connections.load(std::sync::atomic::Ordering::Relaxed), 1, "one cached pipe");
    }

    #[tokio::test]
    async fn a_failing_handler_is_acknowledged_with_its_error() {
        let server = FakeServer::start(|msg, _| Act::Answer(ordinary(msg))).await;
        let (addr, seen) = start(Mode::Fail).await;
        let mut conn = Tcp.connect(&addr).await.unwrap();
        let h = handle(7, 1);
        let ack = deliver(&mut conn, h, &[b"x"], vec![server.addr.clone()]).await;
        assert_eq!(ack, HandlerToPipe::Ack { handle: h, result: Err("cannot do it now".into()) });
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert!(server.requests().is_empty());
    }

    #[tokio::test]
    async fn a_panicking_handler_fails_the_delivery_and_the_connection_goes_on() {
        let server = FakeServer::start(|msg, _| Act::Answer(ordinary(msg))).await;
        let (addr, _) = start(Mode::Panic).await;
        let mut conn = Tcp.connect(&addr).await.unwrap();
        for i in 0..2 {
            let h = handle(8 + i, 1);
            match deliver(&mut conn, h, &[b"x"], vec![server.addr.clone()]).await {
                HandlerToPipe::Ack { handle, result: Err(e) } => {
                    assert_eq!(handle, h);
                    assert!(e.contains("panicked"), "{e}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn unreachable_servers_fail_the_delivery() {
        let dead = {
            let l = Tcp.bind("127.0.0.1:0").await.unwrap();
            Tcp.local_addr(&l).unwrap().to_string()
        };
        let (addr, seen) = start(Mode::Delete).await;
        let mut conn = Tcp.connect(&addr).await.unwrap();
        let h = handle(9, 1);
        match deliver(&mut conn, h, &[b"x"], vec![dead.clone()]).await {
            HandlerToPipe::Ack { result: Err(e), .. } => assert!(e.contains(&dead), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn many_pipe_connections_are_served_at_once() {
        let server = FakeServer::start(|msg, _| Act::Answer(ordinary(msg))).await;
        let (addr, seen) = start(Mode::Delete).await;
        let mut tasks = Vec::new();
        for i in 0..20u64 {
            let (addr, servers) = (addr.clone(), vec![server.addr.clone()]);
            tasks.push(tokio::spawn(async move {
                let mut conn = Tcp.connect(&addr).await.unwrap();
                let h = handle(100 + i, 1);
                deliver(&mut conn, h, &[b"r"], servers).await
            }));
        }
        for t in tasks {
            assert!(matches!(t.await.unwrap(), HandlerToPipe::Ack { result: Ok(()), .. }));
        }
        assert_eq!(seen.lock().unwrap().len(), 20);
    }
}
