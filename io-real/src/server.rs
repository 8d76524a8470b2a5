//! The server: the engine driven by files, TCP and the system clock.
//!
//! One task owns the engine and runs its loop: it takes inputs from a channel (client requests
//! from connection tasks, disk completions from the disk worker, handler failures), feeds them
//! to the engine, and carries out what the engine outputs. The driver makes no decisions:
//! batching, durability, deduplication and redelivery are all the engine's.
//!
//! ```text
//!  connections ──┐                         ┌──▶ disk worker (one thread, operations in order)
//!  disk worker ──┤                         ├──▶ connection writers (replies)
//!  deliveries  ──┼──▶ engine task ─────────┼──▶ delivery tasks (push to handlers)
//!  peer readers ─┘   handle / poll / tick  └──▶ peer writers (one per other member)
//! ```
//!
//! Readers' streams (tails and watches of the ledger) are served by every member, leader or
//! not. Each connection names its streams with numbers of its own; the driver gives each an
//! engine stream id unique in the server, routes the engine's items to the connection, and
//! closes the connection's streams when it closes. No stream item is ever dropped: the engine
//! never has more than a window of them unacknowledged per stream, and a connection whose
//! queued stream items still pass `stream_queue_bytes_max` has its streams ended with that
//! reason (the reader opens them again from where it got to).
//!
//! In a cluster every member listens on its peer address too. Each member keeps one outgoing
//! connection to every other member (a writer task that reconnects with backoff and drops what
//! queued while the peer was unreachable: consensus resends what still matters), and reads the
//! incoming ones into the engine as messages.

use crate::auth::{Authority, Principal};
use crate::config::{Config, ServerLimits};
use crate::disk::Fs;
use crate::identity::{Identity, PeerHello, PEER_HELLO_BYTES_MAX};
use crate::net::Transport;
use crate::wire::{
    self, ClientMsg, FrameError, HandlerToPipe, Hello, MemberAddr, PeerFrame, PipeToHandler, ServerMsg, ServerStatus,
    StreamEnd, StreamRefusal, WireError,
};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};
use truba_engine::{
    ClientId, DiskError, Engine, FailureReason, Handle, Input, Instant, IoId, IoOp, IoReply, Kind, Message, Now,
    Output, Query, QueryReply, ReplicaId, Request, Seq, StreamId, StreamItem, StreamOpen, UnixMs,
};

/// What the engine task hears about.
pub enum ToEngine {
    Request {
        conn: u64,
        client: ClientId,
        seq: Seq,
        request: Request,
    },
    Query {
        conn: u64,
        id: u64,
        query: Query,
    },
    Status {
        conn: u64,
        id: u64,
    },
    IoDone {
        id: IoId,
        result: Result<IoReply, DiskError>,
    },
    DeliveryFailed {
        handle: Handle,
        reason: FailureReason,
    },
    Opened {
        conn: u64,
        link: ConnLink,
        /// Who the connection proved to be by its TLS certificate, or `anonymous`; `None`
        /// when the node has no `[auth]`.
        principal: Option<Principal>,
    },
    /// The connection proved who it is with a token.
    Authenticated {
        conn: u64,
        principal: Principal,
    },
    Closed {
        conn: u64,
    },
    Message {
        from: ReplicaId,
        message: Message,
    },
    /// A client's stream messages; `stream` is the client's own number for the stream.
    StreamOpen {
        conn: u64,
        stream: u64,
        open: StreamOpen,
    },
    StreamAck {
        conn: u64,
        stream: u64,
        seq: u64,
        error: Option<String>,
    },
    StreamClose {
        conn: u64,
        stream: u64,
    },
}

/// What a connection's writer is handed.
pub enum Outgoing {
    /// An answer, encoded by the writer.
    Msg(ServerMsg),
    /// A stream item's frame, encoded by the engine task so that its bytes count against the
    /// connection's queue (see [`ConnLink::queued`]) until the writer has written them.
    Frame(Vec<u8>),
}

/// The engine task's side of one client connection.
pub struct ConnLink {
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Bytes of stream frames handed to the writer and not yet written to the socket.
    queued: Arc<AtomicU64>,
    /// Streams open on the connection: while it has any, it is not idle.
    streams_open: Arc<AtomicU32>,
}

/// Where the server runs: its network, its disk worker, its wall clock and its entropy. The
/// real environment is [`RealEnv`]; tests provide turmoil's.
pub trait Env: Clone + Send + Sync + 'static {
    type Net: Transport;
    fn transport(&self) -> Self::Net;
    /// Starts the worker that carries out disk operations one at a time, in order, sending each
    /// completion back as [`ToEngine::IoDone`].
    fn spawn_disk(
        &self,
        fs: Arc<dyn Fs>,
        ops: mpsc::UnboundedReceiver<(IoId, IoOp)>,
        done: mpsc::UnboundedSender<ToEngine>,
    );
    /// Milliseconds since the Unix epoch.
    fn wall_ms(&self) -> u64;
    /// Seed for the engine's generator.
    fn seed(&self) -> u64;
}

/// The production environment: real TCP (with TLS if configured), a dedicated disk thread, the
/// system clock.
#[derive(Clone, Debug, Default)]
pub struct RealEnv {
    net: crate::net::RealNet,
}

impl RealEnv {
    pub fn with_net(net: crate::net::RealNet) -> RealEnv {
        RealEnv { net }
    }
}

impl Env for RealEnv {
    type Net = crate::net::RealNet;

    fn transport(&self) -> Self::Net {
        self.net.clone()
    }

    fn spawn_disk(
        &self,
        fs: Arc<dyn Fs>,
        mut ops: mpsc::UnboundedReceiver<(IoId, IoOp)>,
        done: mpsc::UnboundedSender<ToEngine>,
    ) {
        // Disk calls block (fsync takes milliseconds), so they get their own thread rather than
        // holding up the network on the runtime's few workers.
        std::thread::Builder::new()
            .name("truba-disk".into())
            .spawn(move || {
                let mut executor = crate::disk::Executor::new(fs);
                while let Some((id, op)) = ops.blocking_recv() {
                    let result = executor.run(&op);
                    if done.send(ToEngine::IoDone { id, result }).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the disk thread");
    }

    fn wall_ms(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    fn seed(&self) -> u64 {
        use rand_core::RngCore;
        rand_core::OsRng.next_u64()
    }
}

/// Replies gathered into one socket write at most.
const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;

/// How long a shutdown waits for work in flight before giving up on it.
const DRAIN_TIME_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: String, reason: String },
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error("the engine stopped: {0}")]
    Fatal(String),
    #[error("auth: {0}")]
    Auth(String),
}

/// Binds the listening address (so callers learn the port before serving).
pub async fn bind<N: Transport>(net: &N, addr: &str) -> Result<N::Listener, ServerError> {
    net.bind(addr).await.map_err(|e| ServerError::Bind { addr: addr.into(), reason: e.to_string() })
}

/// Serves until `shutdown` resolves, then stops accepting, lets every request already received
/// be answered (its batch written and fsynced), and returns.
pub async fn run<E: Env>(
    config: Config,
    env: E,
    fs: Arc<dyn Fs>,
    listener: <E::Net as Transport>::Listener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let identity = if config.joins() {
        let contact = config.cluster.as_ref().and_then(|c| c.join.clone()).unwrap_or_default();
        let (me, _) = config.membership();
        let frame_bytes_max = config.server.frame_bytes_max;
        let net = env.transport();
        crate::identity::joined(fs.as_ref(), me, || ask_cluster_id(net, contact, frame_bytes_max)).await?
    } else {
        crate::identity::configured(&config)
    };
    crate::identity::check_data_dir(fs.as_ref(), identity)?;
    info!(cluster = %identity.cluster, member = %identity.member, "identity");
    let (to_engine, from_world) = mpsc::unbounded_channel::<ToEngine>();
    // Two disk workers: one for the log (and everything small), one for the big background files
    // (snapshots, stored-session sources), so that a group commit's fsync never waits behind a
    // merge's megabytes. The engine orders operations per file, and each file has one worker.
    let (log_tx, log_rx) = mpsc::unbounded_channel();
    env.spawn_disk(fs.clone(), log_rx, to_engine.clone());
    let (bulk_tx, bulk_rx) = mpsc::unbounded_channel();
    env.spawn_disk(fs.clone(), bulk_rx, to_engine.clone());
    let disk_tx = DiskQueues { log: log_tx, bulk: bulk_tx };
    let (stop_tx, stop_rx) = watch::channel(false);
    let connections = Arc::new(AtomicU32::new(0));
    let book: SharedBook = Arc::default();
    if !config.joins() {
        book.lock().expect("book lock").members = config.peers().into_iter().map(|(id, _)| id).collect();
    }
    let peers = match config.peer_listen() {
        Some(addr) => {
            let listener = bind(&env.transport(), &addr).await?;
            info!(peer_listen = addr, members = config.peers().len() + 1, "listening for cluster members");
            let max = config.server.peer_frame_bytes_max;
            let task = peer_accept_loop(
                env.transport(),
                listener,
                to_engine.clone(),
                identity,
                book.clone(),
                max,
                stop_rx.clone(),
            );
            Some(tokio::spawn(task))
        }
        None => None,
    };
    let authority = match &config.auth {
        Some(section) => Some(Arc::new(Authority::new(section).map_err(ServerError::Auth)?)),
        None => None,
    };
    let accept = tokio::spawn(accept_loop(
        env.transport(),
        listener,
        to_engine.clone(),
        config.server.clone(),
        stop_rx,
        connections.clone(),
        authority,
    ));
    let mut driver = Driver::new(config, identity, book, env, fs.clone(), to_engine, disk_tx, connections);
    let result = driver.run(from_world, shutdown, stop_tx).await;
    accept.abort();
    if let Some(p) = peers {
        p.abort();
    }
    // Dropping the driver closes the disk worker's queue and every connection writer's.
    drop(driver);
    // Let the writers send the last replies, and the disk worker let go of the directory (and
    // its lock), before returning: a restart in the same process must find it free.
    tokio::time::sleep(Duration::from_millis(20)).await;
    for _ in 0..500 {
        if Arc::strong_count(&fs) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    result
}

/// A joining member asks a member of the cluster (at its client address) for the cluster's id,
/// for up to [`JOIN_WAIT`].
async fn ask_cluster_id<N: Transport>(
    net: N,
    contact: String,
    frame_bytes_max: u32,
) -> Result<crate::identity::ClusterId, String> {
    let until = tokio::time::Instant::now() + JOIN_WAIT;
    loop {
        match crate::client::connect_member(&net, &contact, Duration::from_secs(2), frame_bytes_max, None).await {
            Ok((_, hello)) => {
                info!(%contact, cluster = %crate::identity::ClusterId(hello.cluster), "joining the cluster");
                return Ok(crate::identity::ClusterId(hello.cluster));
            }
            Err(e) if tokio::time::Instant::now() >= until => {
                return Err(format!("no member answered at {contact} within {} s: {e}", JOIN_WAIT.as_secs()))
            }
            Err(e) => {
                debug!(%contact, %e, "cannot reach the member to join through yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// How long a joining member's first start waits for the member it joins through.
const JOIN_WAIT: Duration = Duration::from_secs(30);

/// The members a server knows of, shared between the engine's task (which keeps it current from
/// the configuration in force) and the tasks that admit member connections.
#[derive(Default)]
struct PeerBook {
    /// The other members; empty while a joining member knows none.
    members: Vec<ReplicaId>,
    /// Peer addresses members gave in their hellos (a joining member answers there until the
    /// cluster's configuration tells it).
    said: BTreeMap<ReplicaId, String>,
}

type SharedBook = Arc<Mutex<PeerBook>>;

/// The two disk workers' queues (see `run`).
struct DiskQueues {
    log: mpsc::UnboundedSender<(IoId, IoOp)>,
    bulk: mpsc::UnboundedSender<(IoId, IoOp)>,
}

impl DiskQueues {
    fn send(&self, id: IoId, op: IoOp) {
        let file = op.file();
        let bulk = file.starts_with("src-") || file.starts_with("snap");
        let _ = if bulk { self.bulk.send((id, op)) } else { self.log.send((id, op)) };
    }
}

/// A client connection as the engine task sees it.
struct Conn {
    link: ConnLink,
    /// Whose permissions its requests are checked against (`None`: no `[auth]`).
    principal: Option<Principal>,
    /// Its open streams, by the client's numbers.
    streams: BTreeMap<u64, Route>,
}

struct Route {
    id: StreamId,
    /// The last item sent (an acknowledgement beyond it is refused).
    sent: u64,
}

struct Driver<E: Env> {
    config: Config,
    env: E,
    fs: Arc<dyn Fs>,
    engine: Engine,
    start: tokio::time::Instant,
    to_engine: mpsc::UnboundedSender<ToEngine>,
    disk: DiskQueues,
    conns: BTreeMap<u64, Conn>,
    /// Every open stream: its connection and the client's number for it.
    streams: BTreeMap<StreamId, (u64, u64)>,
    next_stream: u64,
    /// Which connection waits for the answer to each request in flight.
    routes: BTreeMap<(ClientId, Seq), u64>,
    /// Queries in flight: internal id -> (connection, the client's id, is a status request).
    queries: BTreeMap<u64, (u64, u64, bool)>,
    next_query: u64,
    connections: Arc<AtomicU32>,
    handlers: BTreeMap<Kind, String>,
    /// Outgoing queues to the other members' writer tasks, started when the engine first sends
    /// to a member whose address is known.
    peers: BTreeMap<ReplicaId, mpsc::Sender<Message>>,
    /// Where clients reach every member, told in each client connection's hello.
    client_addrs: Vec<MemberAddr>,
    identity: Identity,
    book: SharedBook,
    /// The configuration version and members the book and `client_addrs` were last made from.
    members_seen: (u64, Vec<ReplicaId>),
}

impl<E: Env> Driver<E> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        config: Config,
        identity: Identity,
        book: SharedBook,
        env: E,
        fs: Arc<dyn Fs>,
        to_engine: mpsc::UnboundedSender<ToEngine>,
        disk: DiskQueues,
        connections: Arc<AtomicU32>,
    ) -> Driver<E> {
        let (me, voters) = config.membership();
        let engine = if config.joins() {
            Engine::joining(config.engine_config(), me, env.seed())
        } else {
            let mut engine = Engine::replica(config.engine_config(), me, voters, env.seed());
            engine.set_bootstrap_addrs(config.member_addrs());
            engine
        };
        let handlers = config.kinds.iter().filter_map(|(k, s)| Some((Kind(*k), s.handler.clone()?))).collect();
        let client_addrs = config.client_addrs().into_iter().map(|(id, client)| MemberAddr { id, client }).collect();
        Driver {
            config,
            env,
            fs,
            engine,
            start: tokio::time::Instant::now(),
            to_engine,
            disk,
            conns: BTreeMap::new(),
            streams: BTreeMap::new(),
            next_stream: 0,
            routes: BTreeMap::new(),
            queries: BTreeMap::new(),
            next_query: 0,
            connections,
            handlers,
            peers: BTreeMap::new(),
            client_addrs,
            identity,
            book,
            members_seen: (0, Vec::new()),
        }
    }

    /// Where member `id` takes member connections: the cluster's configuration, else this
    /// node's file, else what the member said in its hello.
    fn peer_addr(&self, id: ReplicaId) -> Option<String> {
        if let Some(a) = self.engine.state().config().addrs.get(&id) {
            return Some(a.peer.clone());
        }
        if let Some((_, a)) = self.config.peers().into_iter().find(|(p, _)| *p == id) {
            return Some(a);
        }
        self.book.lock().expect("book lock").said.get(&id).cloned()
    }

    /// The engine sends to `to`: through its writer, started now if there is none yet.
    fn send_to_member(&mut self, to: ReplicaId, message: Message) {
        if !self.peers.contains_key(&to) {
            let Some(addr) = self.peer_addr(to) else {
                debug!(%to, "no address known for a member yet; a message is dropped");
                return;
            };
            let (tx, rx) = mpsc::channel(self.config.server.peer_queue_max as usize);
            let mine = self.config.peer_listen().unwrap_or_default();
            tokio::spawn(peer_writer(self.env.transport(), self.identity, mine, to, addr, rx));
            self.peers.insert(to, tx);
        }
        // A full queue means the member is slow or gone; the message may be lost.
        if let Some(tx) = self.peers.get(&to) {
            if tx.try_send(message).is_err() {
                debug!(%to, "peer queue full; a message is dropped");
            }
        }
    }

    /// Keeps the members that may connect, and the addresses clients are told, to the
    /// configuration in force; a removed member's writer is stopped.
    fn refresh_members(&mut self) {
        let version = self.engine.state().config().version;
        let me = self.engine.id();
        let others = || self.engine.members().keys().copied().filter(|m| *m != me);
        if version == self.members_seen.0 && others().eq(self.members_seen.1.iter().copied()) {
            return;
        }
        let members: Vec<ReplicaId> = others().collect();
        if !members.is_empty() {
            self.book.lock().expect("book lock").members = members.clone();
            self.peers.retain(|id, _| members.contains(id));
        }
        let mut addrs: BTreeMap<ReplicaId, String> = self.config.client_addrs().into_iter().collect();
        for (id, a) in &self.engine.state().config().addrs {
            addrs.insert(*id, a.client.clone());
        }
        if self.engine.state().config().version > 0 {
            let known = self.engine.state().config().members.clone();
            addrs.retain(|id, _| known.contains_key(id));
        }
        self.client_addrs = addrs.into_iter().map(|(id, client)| MemberAddr { id, client }).collect();
        self.members_seen = (version, members);
    }

    fn now(&self) -> Now {
        Now { mono: Instant(self.start.elapsed().as_millis() as u64), wall: UnixMs(self.env.wall_ms()) }
    }

    async fn run(
        &mut self,
        mut inbox: mpsc::UnboundedReceiver<ToEngine>,
        shutdown: impl Future<Output = ()>,
        stop: watch::Sender<bool>,
    ) -> Result<(), ServerError> {
        tokio::pin!(shutdown);
        let far = Duration::from_secs(86_400 * 365);
        // Set once shutdown starts: from then on only requests already received and disk
        // completions are fed (no ticks, so the repeater proposes nothing new), until idle.
        let mut stopping: Option<tokio::time::Instant> = None;
        self.feed(Input::Boot);
        self.drain()?;
        loop {
            let deadline = match (stopping, self.engine.next_deadline()) {
                (Some(since), _) => since + DRAIN_TIME_MAX,
                (None, Some(d)) => self.start + Duration::from_millis(d.0),
                (None, None) => self.start + far,
            };
            tokio::select! {
                msg = inbox.recv() => {
                    let Some(msg) = msg else { break };
                    self.on_msg(msg, stopping.is_some());
                    // Take whatever else is waiting before collecting the engine's outputs, so
                    // that everything received together goes into one group-commit batch.
                    for _ in 0..4096 {
                        let Ok(msg) = inbox.try_recv() else { break };
                        self.on_msg(msg, stopping.is_some());
                    }
                    self.drain()?;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if stopping.is_some() {
                        warn!("work still in flight after {} s of draining; stopping anyway (every acknowledged \
                               request is durable)", DRAIN_TIME_MAX.as_secs());
                        return Ok(());
                    }
                    self.feed(Input::Tick);
                    self.drain()?;
                }
                _ = &mut shutdown, if stopping.is_none() => {
                    info!("shutting down: no new connections or requests; finishing work in flight");
                    stopping = Some(tokio::time::Instant::now());
                    // Readers are told before their connections' closing frame, so they know to
                    // go on at another member.
                    let conns: Vec<u64> = self.conns.keys().copied().collect();
                    for conn in conns {
                        self.end_streams(conn, StreamEnd::ShuttingDown);
                    }
                    let _ = stop.send(true);
                    self.drain()?;
                }
            }
            if stopping.is_some() && self.engine.is_idle() {
                info!(applied = self.engine.state().applied().0, "all requests answered and durable; stopped");
                return Ok(());
            }
        }
        Ok(())
    }

    /// Hands one message to the engine; its outputs wait for [`Driver::drain`].
    fn on_msg(&mut self, msg: ToEngine, stopping: bool) {
        match msg {
            // A failed delivery during shutdown is left to the lease: it expires after restart.
            ToEngine::DeliveryFailed { .. } if stopping => {}
            ToEngine::Request { conn, client, seq, request } => {
                let input = match self.conns.get(&conn).and_then(|c| c.principal.clone()) {
                    None => Input::Request { client, seq, request },
                    Some(principal) => {
                        let state = self.engine.state();
                        if let Err(e) = crate::auth::check_request(&principal, &request, |id| state.kind_of(id)) {
                            warn!(conn, principal = principal.name, %e, request = request.name(), "refusing a request");
                            return self.send(conn, ServerMsg::Reply { client, seq, outcome: Err(e) });
                        }
                        Input::RequestAs { client, seq, request, principal: principal.name }
                    }
                };
                self.routes.insert((client, seq), conn);
                self.feed(input)
            }
            ToEngine::Query { conn, id, query } => {
                let principal = self.conns.get(&conn).and_then(|c| c.principal.as_ref());
                let state = self.engine.state();
                if let Some(e) =
                    principal.and_then(|p| crate::auth::check_query(p, &query, |id| state.kind_of(id)).err())
                {
                    warn!(conn, principal = principal.map(|p| p.name.as_str()), %e, "refusing a query");
                    return self.send(conn, ServerMsg::QueryReply { id, reply: refused_query(&query, e) });
                }
                self.next_query += 1;
                self.queries.insert(self.next_query, (conn, id, false));
                self.feed(Input::Query { id: self.next_query, query })
            }
            ToEngine::Status { conn, id } => {
                self.next_query += 1;
                self.queries.insert(self.next_query, (conn, id, true));
                self.feed(Input::Query { id: self.next_query, query: Query::Status })
            }
            ToEngine::IoDone { id, result } => self.feed(Input::IoDone { id, result }),
            ToEngine::DeliveryFailed { handle, reason } => self.feed(Input::DeliveryFailed { handle, reason }),
            ToEngine::Authenticated { conn, principal } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    debug!(conn, principal = principal.name, "a client proved who it is");
                    c.principal = Some(principal);
                }
            }
            ToEngine::Opened { conn, link, principal } => {
                let members = self.client_addrs.clone();
                let cluster = self.identity.cluster.0;
                let hello = Hello {
                    protocol: wire::CLIENT_PROTOCOL_VERSION,
                    cluster,
                    member: self.engine.id(),
                    leader: self.engine.leader(),
                    members,
                };
                let _ = link.tx.send(Outgoing::Msg(ServerMsg::Hello(hello)));
                self.conns.insert(conn, Conn { link, principal, streams: BTreeMap::new() });
            }
            ToEngine::Closed { conn } => {
                if let Some(c) = self.conns.remove(&conn) {
                    for route in c.streams.values() {
                        self.streams.remove(&route.id);
                        self.feed(Input::StreamClose { stream: route.id });
                    }
                }
            }
            ToEngine::Message { from, message } => self.feed(Input::Message { from, message }),
            ToEngine::StreamOpen { conn, stream, open } => self.open_stream(conn, stream, open, stopping),
            ToEngine::StreamAck { conn, stream, seq, error } => {
                let Some(c) = self.conns.get(&conn) else { return };
                match c.streams.get(&stream) {
                    None => self.refuse(conn, stream, StreamRefusal::NotOpen),
                    Some(route) if seq > route.sent => {
                        let refusal = StreamRefusal::AckBeyondSent { seq, sent: route.sent };
                        self.refuse(conn, stream, refusal)
                    }
                    Some(route) => {
                        let id = route.id;
                        self.feed(Input::StreamAck { stream: id, seq, error })
                    }
                }
            }
            ToEngine::StreamClose { conn, stream } => {
                let Some(c) = self.conns.get(&conn) else { return };
                match c.streams.get(&stream) {
                    None => self.refuse(conn, stream, StreamRefusal::NotOpen),
                    Some(route) => {
                        let id = route.id;
                        self.forget_stream(id);
                        self.feed(Input::StreamClose { stream: id });
                    }
                }
            }
        }
    }

    /// Opens a client's stream: a number of its own, unique among its connection's open
    /// streams, becomes an engine stream id unique in the server. The engine answers it (with
    /// items, or an `End` that refuses it).
    fn open_stream(&mut self, conn: u64, stream: u64, open: StreamOpen, stopping: bool) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if stopping {
            let _ = c.link.tx.send(Outgoing::Msg(ServerMsg::StreamEnded { stream, reason: StreamEnd::ShuttingDown }));
            return;
        }
        if c.streams.contains_key(&stream) {
            return self.refuse(conn, stream, StreamRefusal::AlreadyOpen);
        }
        if let Some(e) = c.principal.as_ref().and_then(|p| crate::auth::check_stream(p, &open).err()) {
            warn!(conn, principal = c.principal.as_ref().map(|p| p.name.as_str()), %e, "refusing a stream");
            return self.refuse(conn, stream, StreamRefusal::PermissionDenied(e));
        }
        if matches!(open, StreamOpen::Watch { window: Some(0), .. }) {
            return self.refuse(conn, stream, StreamRefusal::ZeroWindow);
        }
        self.next_stream += 1;
        let id = StreamId(self.next_stream);
        c.streams.insert(stream, Route { id, sent: 0 });
        c.link.streams_open.fetch_add(1, Ordering::Relaxed);
        self.streams.insert(id, (conn, stream));
        self.feed(Input::StreamOpen { stream: id, open });
    }

    fn refuse(&self, conn: u64, stream: u64, refusal: StreamRefusal) {
        debug!(conn, stream, %refusal, "refusing a stream message");
        self.send(conn, ServerMsg::StreamRefused { stream, refusal });
    }

    /// The stream is no longer the server's to route (it ended or was closed).
    fn forget_stream(&mut self, id: StreamId) {
        let Some((conn, number)) = self.streams.remove(&id) else { return };
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.streams.remove(&number).is_some() {
                c.link.streams_open.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Ends every stream of a connection for `reason`: each is closed in the engine and the
    /// client is told.
    fn end_streams(&mut self, conn: u64, reason: StreamEnd) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let routes = std::mem::take(&mut c.streams);
        c.link.streams_open.store(0, Ordering::Relaxed);
        for number in routes.keys() {
            let _ = c.link.tx.send(Outgoing::Msg(ServerMsg::StreamEnded { stream: *number, reason: reason.clone() }));
        }
        for route in routes.into_values() {
            self.streams.remove(&route.id);
            self.feed(Input::StreamClose { stream: route.id });
        }
    }

    /// Carries one stream item to its connection, never dropping it: if the connection's queue
    /// of stream items is past its limit, the connection's streams are ended instead (the
    /// reader opens them again from where it got to).
    fn route_stream(&mut self, id: StreamId, seq: u64, item: StreamItem) {
        let Some(&(conn, number)) = self.streams.get(&id) else {
            return; // closed meanwhile: its connection went, or it was ended
        };
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let end = matches!(item, StreamItem::End(_));
        let frame = wire::encode(&ServerMsg::Stream { stream: number, seq, item });
        let len = frame.len() as u64;
        let queued = c.link.queued.load(Ordering::Relaxed);
        let max = self.config.server.stream_queue_bytes_max;
        // A single item larger than the limit still goes out once the queue is empty.
        if queued > 0 && queued + len > max {
            warn!(conn, queued_bytes = queued + len, max, "a connection fell behind its streams; ending them");
            return self.end_streams(conn, StreamEnd::ConnectionBehind { queued_bytes: queued + len, max });
        }
        if let Some(route) = c.streams.get_mut(&number) {
            route.sent = seq;
        }
        c.link.queued.fetch_add(len, Ordering::Relaxed);
        let _ = c.link.tx.send(Outgoing::Frame(frame));
        if end {
            self.forget_stream(id);
        }
    }

    fn feed(&mut self, input: Input) {
        let now = self.now();
        self.engine.handle(now, input);
    }

    /// Carries out everything the engine has to say, until it has nothing more.
    fn drain(&mut self) -> Result<(), ServerError> {
        while let Some(output) = self.engine.poll() {
            self.carry_out(output)?;
        }
        self.refresh_members();
        Ok(())
    }

    fn send(&self, conn: u64, msg: ServerMsg) {
        // The queue needs no bound of its own for answers: a connection has at most
        // `inflight_per_connection_max` requests waiting for them (more close it), and an
        // answer leaves the count only once the writer takes it.
        if let Some(c) = self.conns.get(&conn) {
            let _ = c.link.tx.send(Outgoing::Msg(msg));
        }
    }

    fn carry_out(&mut self, output: Output) -> Result<(), ServerError> {
        match output {
            Output::Io { id, op } => self.disk.send(id, op),
            Output::Reply { client, seq, outcome } => {
                if let Some(conn) = self.routes.remove(&(client, seq)) {
                    self.send(conn, ServerMsg::Reply { client, seq, outcome });
                }
            }
            Output::QueryReply { id, reply } => {
                let Some((conn, client_id, status)) = self.queries.remove(&id) else { return Ok(()) };
                let msg = match (status, reply) {
                    (true, QueryReply::Status(engine)) => ServerMsg::Status {
                        id: client_id,
                        status: ServerStatus {
                            version: env!("CARGO_PKG_VERSION").into(),
                            role: role_text(&self.config, &engine),
                            engine,
                            disk_bytes: self.fs.usage(),
                            connections: self.connections.load(Ordering::Relaxed),
                        },
                    },
                    (_, reply) => ServerMsg::QueryReply { id: client_id, reply },
                };
                self.send(conn, msg);
            }
            Output::Deliver { kind, handle, due, records, .. } => {
                let msg = PipeToHandler::Deliver { kind, handle, due, records, servers: self.config.advertised() };
                let addr = self.handlers.get(&kind).cloned();
                let timeout = Duration::from_millis(self.config.server.handler_timeout_ms);
                let (net, tx, max) = (self.env.transport(), self.to_engine.clone(), self.config.server.frame_bytes_max);
                tokio::spawn(deliver(net, addr, msg, handle, timeout, max, tx));
            }
            Output::Recovered { applied, state_hash, torn_bytes, damage } => {
                let dir = self.config.data_dir.display().to_string();
                info!(applied = applied.0, state_hash = format!("{state_hash:016x}"), torn_bytes, dir, "recovered");
                if torn_bytes > 0 {
                    warn!(torn_bytes, "cut a torn write off the log tail (a copy is kept in torn-*.bin)");
                }
                for found in damage {
                    error!(dir, "{found}");
                }
            }
            Output::Stopped(fatal) => {
                error!(%fatal, "the engine stopped");
                return Err(ServerError::Fatal(fatal.to_string()));
            }
            Output::PeerMessageRefused { from, message, reason } => {
                warn!(peer = %from, message, %reason, "dropped a member's message that fails its checks")
            }
            Output::Role { role, term, leader } => {
                let leader = leader.map(|l| l.to_string()).unwrap_or_else(|| "none".into());
                info!(%role, term = term.0, %leader, "role")
            }
            Output::ConfigDiffers { version, differences } => {
                warn!(
                    version,
                    differences = %differences.join("; "),
                    "this node's file differs from the cluster's configuration, which it follows (`truba config show` prints it; `truba config apply` changes it)"
                )
            }
            Output::Stream { stream, seq, item } => self.route_stream(stream, seq, item),
            Output::Send { to, message } => self.send_to_member(to, message),
        }
        Ok(())
    }
}

/// "leader of term 3", "follower of r1 in term 3": how the node sees itself.
fn role_text(config: &Config, s: &truba_engine::StatusView) -> String {
    if config.cluster.is_none() {
        return "leader (single node)".into();
    }
    let learner = s.members.iter().any(|m| m.id == s.replica && m.role == truba_engine::MemberRole::Learner);
    match (s.role, s.leader) {
        (truba_engine::RoleName::Follower, Some(l)) if learner => format!("learner following {l} in term {}", s.term.0),
        (_, _) if s.members.is_empty() => "joining (no member has sent it the log yet)".into(),
        (truba_engine::RoleName::Follower, Some(l)) => format!("follower of {l} in term {}", s.term.0),
        (role, _) => format!("{role} in term {}", s.term.0),
    }
}

/// Keeps a connection to one member and writes what the engine sends it, everything queued
/// going out in one write. While the member is unreachable, queued messages are dropped: by the
/// time it is back they are stale, and the protocol sends what is still needed.
/// Keeps a connection to one member and writes the engine's messages to it, batched. The
/// connection is replaced when a connect or a write takes longer than [`PEER_IO_TIMEOUT`] (the
/// member is down or its buffers are full: messages may be lost, and Raft resends what matters).
/// When the other end closes it (an idle link, seen on the otherwise unused read half), the
/// writer reconnects only once it has something to send, so that message is not written into a
/// connection that is already gone.
async fn peer_writer<N: Transport>(
    net: N,
    identity: Identity,
    mine: String,
    to: ReplicaId,
    addr: String,
    mut rx: mpsc::Receiver<Message>,
) {
    let mut backoff = PEER_BACKOFF_MIN;
    let mut pending: Option<Message> = None;
    let mut quiet_reconnect = false;
    loop {
        let stream = match tokio::time::timeout(PEER_IO_TIMEOUT, net.connect(&addr)).await {
            Ok(Ok(s)) => {
                if quiet_reconnect {
                    debug!(%to, %addr, "connected to a member again");
                } else {
                    info!(%to, %addr, "connected to a member");
                }
                backoff = PEER_BACKOFF_MIN;
                s
            }
            failed => {
                let e = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_string(),
                };
                debug!(%to, %addr, %e, "cannot reach a member; retrying");
                pending = None;
                while rx.try_recv().is_ok() {}
                if rx.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(PEER_BACKOFF_MAX);
                continue;
            }
        };
        quiet_reconnect = false;
        let me = identity.member;
        let (mut read_half, mut write_half) = tokio::io::split(stream);
        let mut buf = Vec::with_capacity(64 * 1024);
        // Every connection opens with who we are (it goes out with the first batch).
        buf.extend_from_slice(&wire::encode(&PeerHello::new(identity, &mine)));
        let mut probe = [0u8; 64];
        loop {
            let first = match pending.take() {
                Some(m) => m,
                None => tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => m,
                        None => return,
                    },
                    // Members never write on a connection they accepted: a read that completes
                    // is the other end closing (or resetting) it.
                    _ = tokio::io::AsyncReadExt::read(&mut read_half, &mut probe) => {
                        debug!(%to, %addr, "a member closed the connection; reconnecting when there is something to send");
                        let Some(m) = rx.recv().await else { return };
                        pending = Some(m);
                        quiet_reconnect = true;
                        break;
                    }
                },
            };
            buf.extend_from_slice(&wire::encode(&PeerFrame { from: me, message: first }));
            while buf.len() < WRITE_BATCH_BYTES_MAX {
                let Ok(message) = rx.try_recv() else { break };
                buf.extend_from_slice(&wire::encode(&PeerFrame { from: me, message }));
            }
            let written = tokio::time::timeout(PEER_IO_TIMEOUT, write_half.write_all(&buf)).await;
            buf.clear();
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(%to, %addr, %e, "lost the connection to a member");
                    break;
                }
                Err(_) => {
                    let timeout_ms = PEER_IO_TIMEOUT.as_millis() as u64;
                    warn!(%to, %addr, timeout_ms, "a write to a member blocked; reconnecting");
                    break;
                }
            }
        }
    }
}

const PEER_BACKOFF_MIN: Duration = Duration::from_millis(20);
const PEER_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A connect or a write to a member that takes longer than this gives up the connection.
const PEER_IO_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection from a member that brings nothing for this long is closed; its writer sees the
/// close and reconnects when it next has something to say, so nothing is lost by closing an
/// idle link. A link to or from the leader carries a heartbeat or its answer every heartbeat
/// interval, so a silent one has most likely lost its other end without a word (a host that
/// died, a network that dropped it), which TCP alone would notice only after minutes. A link
/// between two followers is idle until the next election, and costs one connect then.
const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

async fn peer_accept_loop<N: Transport>(
    net: N,
    listener: N::Listener,
    to_engine: mpsc::UnboundedSender<ToEngine>,
    identity: Identity,
    book: SharedBook,
    frame_bytes_max: u32,
    mut stop: watch::Receiver<bool>,
) {
    let refusals = Arc::new(Mutex::new(Refusals::default()));
    loop {
        let accepted = tokio::select! {
            r = net.accept(&listener) => r,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (tx, book, refusals) = (to_engine.clone(), book.clone(), refusals.clone());
                let certificate = net.is_tls().then(|| N::peer_certificate(&stream));
                let gate = PeerGate { identity, book, refusals, certificate };
                tokio::spawn(peer_reader(stream, peer.to_string(), tx, gate, frame_bytes_max));
            }
            Err(e) => {
                warn!(%e, "accepting a member's connection failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Refusals of member connections already logged: (the member id claimed, the reason). A member
/// of another cluster reconnects every second; its refusal is logged once, not every time.
#[derive(Default)]
struct Refusals(BTreeSet<(ReplicaId, String)>);

/// Refusals remembered at most (beyond it, they are logged again: a bound, not a feature).
const REFUSALS_LOGGED_MAX: usize = 256;

impl Refusals {
    /// True the first time this refusal is seen.
    fn first(&mut self, member: ReplicaId, reason: &str) -> bool {
        if self.0.len() >= REFUSALS_LOGGED_MAX {
            self.0.clear();
        }
        self.0.insert((member, reason.to_string()))
    }
}

/// What a member connection is checked against before anything from it reaches the engine.
struct PeerGate {
    identity: Identity,
    /// The other members, and addresses they gave.
    book: SharedBook,
    refusals: Arc<Mutex<Refusals>>,
    /// With TLS: the certificate the connection presented, which must name the member its
    /// hello names (see `net::member_cert_name`). `None` without TLS.
    certificate: Option<Option<Vec<u8>>>,
}

impl PeerGate {
    /// Why the connection's certificate does not prove it comes from `member`, if it does not.
    fn certificate_refusal(&self, member: ReplicaId) -> Option<String> {
        let name = crate::net::member_cert_name(member);
        match &self.certificate {
            None => None,
            Some(None) => Some(format!("it presented no TLS certificate (one naming {name} is required)")),
            Some(Some(cert)) if crate::net::cert_names_member(cert, member) => None,
            Some(Some(_)) => Some(format!("its TLS certificate does not name {name}, the member its hello claims")),
        }
    }
}

impl PeerGate {
    /// Reads and checks the connection's hello: the member it comes from, or `None` (logged,
    /// and the connection is to be closed).
    async fn admit<R: tokio::io::AsyncRead + Unpin>(&self, reader: &mut R, peer: &str) -> Option<ReplicaId> {
        let read = wire::read::<PeerHello, _>(reader, PEER_HELLO_BYTES_MAX);
        let hello = match tokio::time::timeout(PEER_IO_TIMEOUT, read).await {
            Ok(Ok(Some(hello))) => hello,
            Ok(Ok(None)) | Ok(Err(FrameError::Io(_))) => return None,
            Ok(Err(FrameError::Wire(e))) => {
                // Logged once per address (and reason), as refusals are: a scanner that keeps
                // knocking does not fill the log.
                let host = peer.rsplit_once(':').map_or(peer, |(h, _)| h);
                let reason = format!("no member hello from {host}: {e}");
                if self.refusals.lock().expect("refusals lock").first(ReplicaId(0), &reason) {
                    warn!(%peer, %e, "a connection to the member port did not open with a member hello; closing it (logged once per address)");
                }
                return None;
            }
            Err(_) => {
                debug!(%peer, "a connection to the member port said nothing; closing it");
                return None;
            }
        };
        let members = self.book.lock().expect("book lock").members.clone();
        let refusal = hello.refusal(self.identity, &members).or_else(|| self.certificate_refusal(hello.member));
        let Some(reason) = refusal else {
            if !hello.addr.is_empty() && hello.addr.len() <= truba_engine::config::MEMBER_ADDR_BYTES_MAX {
                self.book.lock().expect("book lock").said.insert(hello.member, hello.addr.clone());
            }
            return Some(hello.member);
        };
        if self.refusals.lock().expect("refusals lock").first(hello.member, &reason) {
            warn!(%peer, member = %hello.member, %reason, "refusing a member connection (logged once per member and reason)");
        }
        None
    }
}

/// Reads one member's messages into the engine, once its hello is checked. A frame that is
/// damaged, or that claims to come from another member than the hello said, ends the
/// connection (the member reconnects).
async fn peer_reader<S>(
    stream: S,
    peer: String,
    to_engine: mpsc::UnboundedSender<ToEngine>,
    gate: PeerGate,
    frame_bytes_max: u32,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = tokio::io::BufReader::with_capacity(256 * 1024, stream);
    let Some(member) = gate.admit(&mut reader, &peer).await else { return };
    loop {
        let Ok(frame) =
            tokio::time::timeout(PEER_IDLE_TIMEOUT, wire::read::<PeerFrame, _>(&mut reader, frame_bytes_max)).await
        else {
            debug!(%peer, idle_s = PEER_IDLE_TIMEOUT.as_secs(), "closing an idle connection from a member");
            return;
        };
        match frame {
            Ok(Some(PeerFrame { from, message })) if from == member => {
                if to_engine.send(ToEngine::Message { from, message }).is_err() {
                    return;
                }
            }
            Ok(Some(PeerFrame { from, .. })) => {
                warn!(%peer, %from, %member, "a member connection sent a frame from another member than its hello said; closing it");
                return;
            }
            Ok(None) | Err(FrameError::Io(_)) => return,
            Err(FrameError::Wire(e)) => {
                warn!(%peer, %e, "a member sent a bad frame; closing the connection");
                return;
            }
        }
    }
}

/// Pushes one delivery to its kind's handler. An error answer or an unreachable handler is
/// reported back so the engine stores the session again (with backoff). A handler that is still
/// working when `timeout` runs out is not failed: the pipe stops waiting for its acknowledgement
/// and leaves the session's lease to decide, so a long job that renews its lease keeps its
/// session, and one that hangs without renewing fails when the lease runs out.
async fn deliver<N: Transport>(
    net: N,
    addr: Option<String>,
    msg: PipeToHandler,
    handle: Handle,
    timeout: Duration,
    frame_bytes_max: u32,
    tx: mpsc::UnboundedSender<ToEngine>,
) {
    let result = match &addr {
        None => Err(FailureReason::Unreachable("no handler is configured for this kind".to_string())),
        Some(addr) => match tokio::time::timeout(timeout, push(&net, addr, &msg, handle, frame_bytes_max)).await {
            Ok(r) => r,
            Err(_) => {
                let waited_ms = timeout.as_millis() as u64;
                debug!(
                    session = handle.session.0,
                    attempt = handle.attempt.0,
                    waited_ms,
                    "no acknowledgement yet; the session's lease decides"
                );
                return;
            }
        },
    };
    match result {
        Ok(()) => debug!(session = handle.session.0, attempt = handle.attempt.0, "delivered"),
        Err(reason) => {
            warn!(
                session = handle.session.0,
                attempt = handle.attempt.0,
                handler = addr.unwrap_or_default(),
                %reason,
                "delivery failed; the session will be stored again with backoff (or dead-lettered)"
            );
            let _ = tx.send(ToEngine::DeliveryFailed { handle, reason });
        }
    }
}

/// Pushes a delivery and waits for its acknowledgement. A handler that answers with an error
/// failed; one that cannot be reached or breaks the exchange is unreachable.
async fn push<N: Transport>(
    net: &N,
    addr: &str,
    msg: &PipeToHandler,
    handle: Handle,
    max: u32,
) -> Result<(), FailureReason> {
    let unreachable = FailureReason::Unreachable;
    let mut stream = net.connect(addr).await.map_err(|e| unreachable(format!("cannot connect: {e}")))?;
    wire::write(&mut stream, msg).await.map_err(|e| unreachable(e.to_string()))?;
    match wire::read::<HandlerToPipe, _>(&mut stream, max).await {
        Ok(Some(HandlerToPipe::Ack { handle: h, result })) if h == handle => result.map_err(FailureReason::Handler),
        Ok(Some(other)) => Err(unreachable(format!("unexpected answer {other:?}"))),
        Ok(None) => Err(unreachable("the handler closed the connection".into())),
        Err(e) => Err(unreachable(e.to_string())),
    }
}

async fn accept_loop<N: Transport>(
    net: N,
    listener: N::Listener,
    to_engine: mpsc::UnboundedSender<ToEngine>,
    limits: ServerLimits,
    mut stop: watch::Receiver<bool>,
    connections: Arc<AtomicU32>,
    authority: Option<Arc<Authority>>,
) {
    let mut next_conn = 0u64;
    loop {
        let accepted = tokio::select! {
            r = net.accept(&listener) => r,
            _ = stop.changed() => return,
        };
        let (mut stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                warn!(%e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if connections.load(Ordering::Relaxed) >= limits.connections_max {
            warn!(%peer, max = limits.connections_max, "refusing a connection: at the limit");
            tokio::spawn(async move {
                let error = WireError::TooManyConnections { max: limits.connections_max };
                let _ = wire::write(&mut stream, &ServerMsg::Error { error }).await;
                let _ = stream.shutdown().await;
            });
            continue;
        }
        next_conn += 1;
        connections.fetch_add(1, Ordering::Relaxed);
        let (tx, limits, stop, count) = (to_engine.clone(), limits.clone(), stop.clone(), connections.clone());
        // A TLS client certificate that names a principal proves who the connection is.
        let principal = authority.as_ref().map(|a| {
            let by_cert = N::peer_certificate(&stream).and_then(|c| a.by_certificate(&c).cloned());
            by_cert.unwrap_or_else(|| a.anonymous().clone())
        });
        let auth = authority.clone();
        tokio::spawn(async move {
            connection(stream, next_conn, tx, limits, stop, (auth, principal)).await;
            count.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// The largest frame from a client connection that has not proven who it is, to a node with
/// `[auth]` whose anonymous connections may do nothing.
const UNPROVEN_FRAME_BYTES_MAX: u32 = 16 * 1024;

/// What a connection waits for an answer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Pending {
    Request(ClientId, Seq),
    Query(u64),
}

/// One client connection: a reader forwarding requests and stream messages to the engine, a
/// writer sending answers and stream items. Bad bytes get an error frame and the connection is
/// closed; nothing else is affected.
async fn connection<S>(
    stream: S,
    conn: u64,
    to_engine: mpsc::UnboundedSender<ToEngine>,
    limits: ServerLimits,
    mut stop: watch::Receiver<bool>,
    (authority, principal): (Option<Arc<Authority>>, Option<Principal>),
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (reader, mut writer) = tokio::io::split(stream);
    // Buffered, so a frame's header and payload usually come in with one read.
    let mut reader = tokio::io::BufReader::with_capacity(64 * 1024, reader);
    let max_inflight = limits.inflight_per_connection_max;
    // A connection that has proven nothing, to a node that wants proof, gets a small frame
    // limit until it does: enough for a token and small requests, not for a stranger to make
    // the node buffer megabytes.
    let unproven = principal.as_ref().is_some_and(|p| p.name == "anonymous" && p.grants.is_empty());
    let mut frame_bytes_max =
        if unproven { limits.frame_bytes_max.min(UNPROVEN_FRAME_BYTES_MAX) } else { limits.frame_bytes_max };
    // Unbounded: answers are bounded by the requests a connection may have waiting, and stream
    // items by the engine's windows and `stream_queue_bytes_max` (see `Driver::route_stream`).
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Outgoing>();
    let queued = Arc::new(AtomicU64::new(0));
    let streams_open = Arc::new(AtomicU32::new(0));
    let link = ConnLink { tx: out_tx.clone(), queued: queued.clone(), streams_open: streams_open.clone() };
    if to_engine.send(ToEngine::Opened { conn, link, principal }).is_err() {
        return;
    }
    let pending = Arc::new(Mutex::new(BTreeSet::<Pending>::new()));
    let answered = pending.clone();
    let write_task = tokio::spawn(async move {
        // Everything already queued for this connection goes out in one write: a client that
        // multiplexes many sessions over one connection gets a batch's replies in one send.
        let mut buf = Vec::with_capacity(16 * 1024);
        while let Some(first) = out_rx.recv().await {
            buf.clear();
            let mut last = false;
            let mut stream_bytes = 0u64;
            let mut next = Some(first);
            while let Some(out) = next.take() {
                match out {
                    Outgoing::Frame(frame) => {
                        stream_bytes += frame.len() as u64;
                        buf.extend_from_slice(&frame);
                    }
                    Outgoing::Msg(msg) => {
                        let key = match &msg {
                            ServerMsg::Reply { client, seq, .. } => Some(Pending::Request(*client, *seq)),
                            ServerMsg::QueryReply { id, .. } | ServerMsg::Status { id, .. } => {
                                Some(Pending::Query(*id))
                            }
                            _ => None,
                        };
                        if let Some(key) = key {
                            answered.lock().expect("pending lock").remove(&key);
                        }
                        buf.extend_from_slice(&wire::encode(&msg));
                        // An error frame is the connection's last.
                        last = matches!(msg, ServerMsg::Error { .. });
                    }
                }
                if !last && buf.len() < WRITE_BATCH_BYTES_MAX {
                    next = out_rx.try_recv().ok();
                }
            }
            let written = writer.write_all(&buf).await.is_ok();
            queued.fetch_sub(stream_bytes, Ordering::Relaxed);
            if !written || last {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    loop {
        // The read stays the same future while idle periods pass (a frame's read cut off half
        // way would lose its bytes); a connection waiting for answers or with streams open is
        // not idle, however long it is quiet.
        let frame = {
            let read = wire::read::<ClientMsg, _>(&mut reader, frame_bytes_max);
            tokio::pin!(read);
            loop {
                tokio::select! {
                    f = &mut read => break Some(f),
                    _ = stop.changed() => {
                        let _ = out_tx.send(Outgoing::Msg(ServerMsg::Error { error: WireError::ShuttingDown }));
                        break None;
                    }
                    _ = tokio::time::sleep(idle) => {
                        let waiting = !pending.lock().expect("pending lock").is_empty();
                        if waiting || streams_open.load(Ordering::Relaxed) > 0 {
                            continue;
                        }
                        debug!(conn, idle_ms = limits.idle_timeout_ms, "closing an idle connection");
                        break None;
                    }
                }
            }
        };
        let Some(frame) = frame else { break };
        let msg = match frame {
            Ok(Some(msg)) => msg,
            Ok(None) | Err(FrameError::Io(_)) => break,
            Err(FrameError::Wire(error)) => {
                warn!(conn, %error, "refusing a client's frame and closing its connection");
                let _ = out_tx.send(Outgoing::Msg(ServerMsg::Error { error }));
                break;
            }
        };
        let (key, input) = match msg {
            ClientMsg::Request { client, seq, request } => {
                (Pending::Request(client, seq), ToEngine::Request { conn, client, seq, request })
            }
            ClientMsg::Query { id, query } => (Pending::Query(id), ToEngine::Query { conn, id, query }),
            ClientMsg::Status { id } => (Pending::Query(id), ToEngine::Status { conn, id }),
            // Stream messages are answered by the stream's items (or a refusal), not waited for.
            ClientMsg::StreamOpen { stream, open } => {
                if to_engine.send(ToEngine::StreamOpen { conn, stream, open }).is_err() {
                    break;
                }
                continue;
            }
            ClientMsg::StreamAck { stream, seq, error } => {
                if to_engine.send(ToEngine::StreamAck { conn, stream, seq, error }).is_err() {
                    break;
                }
                continue;
            }
            ClientMsg::StreamClose { stream } => {
                if to_engine.send(ToEngine::StreamClose { conn, stream }).is_err() {
                    break;
                }
                continue;
            }
            ClientMsg::Authenticate { token } => {
                let Some(authority) = &authority else {
                    debug!(conn, "a client sent a token to a node without [auth]; ignoring it");
                    continue;
                };
                let Some(principal) = authority.by_token(&token).cloned() else {
                    warn!(conn, "refusing a client's token and closing its connection");
                    let _ = out_tx.send(Outgoing::Msg(ServerMsg::Error { error: WireError::BadCredentials }));
                    break;
                };
                if to_engine.send(ToEngine::Authenticated { conn, principal }).is_err() {
                    break;
                }
                frame_bytes_max = limits.frame_bytes_max;
                continue;
            }
        };
        let too_many = {
            let mut p = pending.lock().expect("pending lock");
            p.insert(key);
            p.len() > max_inflight as usize
        };
        if too_many {
            let error = WireError::TooManyInflight { max: max_inflight };
            let _ = out_tx.send(Outgoing::Msg(ServerMsg::Error { error }));
            break;
        }
        if to_engine.send(input).is_err() {
            break;
        }
    }
    let _ = to_engine.send(ToEngine::Closed { conn });
    drop(out_tx);
    let _ = write_task.await;
}

/// The answer to a query refused before it reached the engine.
fn refused_query(query: &Query, e: truba_engine::RequestError) -> QueryReply {
    match query {
        Query::Session(_) | Query::SessionLocal(_) => QueryReply::Session(Err(e)),
        Query::Dead { .. } => QueryReply::Dead(Err(e)),
        Query::Checkpoint { .. } | Query::ReadThrough { .. } => QueryReply::Checkpoint(Err(e)),
        Query::Config => QueryReply::Config(Err(e)),
        // Never refused (see `auth::check_query`); answered as the others for completeness.
        Query::Status => QueryReply::Config(Err(e)),
    }
}
