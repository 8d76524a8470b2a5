//! The client library: a [`Pipe`] is one multiplexed connection to a truba server (with
//! reconnection and retries), and a [`Session`] is one session worked on through it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), truba_client::client::ClientError> {
//! let pipe = truba_client::client::Pipe::connect("127.0.0.1:7070").await?;
//! let mut session = pipe.new(1).await?;
//! session.append(b"first step".to_vec()).await?;
//! let due = session.store(60).await?; // unfinished: the kind's handler gets it at `due`
//! # let _ = due; Ok(()) }
//! ```
//!
//! How requests travel:
//! - One background task per `Pipe` owns the connection. Callers hand it an encoded frame and a
//!   responder; it writes the frame and matches answers by `(client, seq)` for requests and by
//!   id for queries and status. At most [`PENDING_MAX`] requests wait for answers at once.
//! - The engine deduplicates by `(ClientId, Seq)` and expects one outstanding request per client
//!   id, so every [`Session`] has its own client id (a random per-pipe base plus a counter) and
//!   its own sequence numbers starting at 1.
//! - A request with no answer within [`ClientOptions::request_timeout`], or whose connection
//!   breaks, is sent again with the same `(client, seq, request)` (over a new connection when the
//!   old one went silent); the server answers a retry from its dedup table, so nothing is
//!   applied twice. Refusals that mean "not now" (`NotReady`, `Overloaded`, `Stopped`,
//!   `NotLeader`, `LeaderLost`) are retried the same way after a short backoff; after the last two the
//!   connection moves on to the next of the pipe's addresses, so a pipe given every member of a
//!   cluster finds the leader and follows it when it changes. After [`ClientOptions::retry_for`] in total the
//!   caller gets [`ClientError::Timeout`]: the outcome is then unknown. If the request never
//!   reached any server, the error is [`ClientError::Connect`] instead (it certainly did not
//!   happen).

use crate::net::{Tcp, Transport};
use crate::wire::{self, ClientMsg, Hello, ServerMsg, ServerStatus, WireError};
use rand_core::{OsRng, RngCore};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// A request's send state (see `Call::written`).
const NOT_SENT: u8 = 0;
const SENT: u8 = 1;
const ABANDONED: u8 = 2;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use truba_engine::{
    AppliedLimits, Checkpoint, ClientId, ClusterConfig, DeadPage, Filter, Handle, Index, Kind, KindConfig, Query,
    QueryReply, RedriveTarget, ReplicaId, Reply, Request, RequestError, Seq, SessionId, SessionView, StreamError,
    TailFrom, UnixSecs,
};

pub use crate::reading::{Change, Consumer, Records, Tail, TailItem, Watch, WatchItem, WatchOptions};

/// Default largest frame a client accepts from the server. Larger than the server's request
/// frame limit because session views carry whole sessions (up to the kind's `session_bytes_max`,
/// 4 MiB by default).
pub const CLIENT_FRAME_BYTES_MAX_DEFAULT: u32 = (64 << 20) + 4096;
/// Requests (and queries) one pipe may have waiting for answers; further callers wait their turn.
/// Kept under the server's default per-connection limit (1024).
pub const PENDING_MAX: usize = 512;
/// Calls queued for the connection task.
const CALL_QUEUE_MAX: usize = 256;
/// Backoff between attempts after a refusal or a broken connection: doubles from min to max,
/// with up to half again of random jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// After a failed round of connection attempts, calls fail at once for this long (their callers
/// back off and retry) instead of each waiting for its own round.
const CONNECT_QUIET: Duration = Duration::from_millis(20);
/// How long a connection attempt to one member goes on alone before the next member is tried
/// beside it (see `connect_any`).
const CONNECT_STAGGER: Duration = Duration::from_millis(250);
/// Addresses a pipe tries at most, given and learned from the members' `Hello`s together (a
/// cluster has at most a handful of members; this only bounds what a confused server can add).
const LEARNED_ADDRS_MAX: usize = 32;
/// How often answers nobody waits for any more (callers gave up) are forgotten.
const PURGE_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// How long connecting to one member may take, until its `Hello` (the first frame, sent by
    /// the thread that runs its engine). A member that accepts connections but does not answer
    /// (a paused process, say) is given up on after this and the next one is tried. Default 1 s.
    pub connect_timeout: Duration,
    /// How long one attempt waits for its answer before the request is sent again (a connection
    /// on which nothing at all was heard meanwhile is then taken for dead, and the next member
    /// is tried). Default 5 s.
    pub request_timeout: Duration,
    /// How long a request is retried in total before [`ClientError::Timeout`]. Default 30 s.
    pub retry_for: Duration,
    /// Largest frame accepted from the server. Default [`CLIENT_FRAME_BYTES_MAX_DEFAULT`].
    pub frame_bytes_max: u32,
    /// Add the members' addresses that they tell in their `Hello` to the ones given, so that a
    /// pipe given one member reaches the others when it fails. Default true; false keeps the
    /// pipe on exactly the addresses given (asking one member for its own status, say).
    pub learn_members: bool,
    /// A bearer token proving who this client is, for a cluster with `[auth]` (sent once on
    /// each connection, right after the member's hello). Default none.
    pub token: Option<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(30),
            frame_bytes_max: CLIENT_FRAME_BYTES_MAX_DEFAULT,
            learn_members: true,
            token: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The engine refused the request; it changed nothing.
    #[error("refused: {0}")]
    Refused(RequestError),
    #[error("no answer after {waited_ms} ms; the request may or may not have been applied")]
    Timeout { waited_ms: u64 },
    /// No server could be reached; the request was never sent, so it did not take effect.
    #[error("cannot reach {addrs}: {reason}")]
    Connect { addrs: String, reason: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server answered with a reply of the wrong type.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
    /// A reader's stream ended for a reason that opening it again would not change (the index
    /// was compacted away, an unknown kind, a reader too slow for the server).
    #[error("the stream ended: {0}")]
    Stream(StreamError),
    /// The server refused a reader's stream.
    #[error("the stream was refused: {0}")]
    StreamRefused(crate::wire::StreamRefusal),
}

impl ClientError {
    fn refusal(&self) -> Option<&RequestError> {
        match self {
            ClientError::Refused(e) => Some(e),
            _ => None,
        }
    }

    /// The session does not exist (never did, or is long gone).
    pub fn is_unknown(&self) -> bool {
        matches!(self.refusal(), Some(RequestError::SessionUnknown(_)))
    }

    /// The session was deleted.
    pub fn is_deleted(&self) -> bool {
        matches!(self.refusal(), Some(RequestError::SessionDeleted(_)))
    }

    /// The handle's attempt is old: the session was delivered to someone else since.
    pub fn is_stale(&self) -> bool {
        matches!(self.refusal(), Some(RequestError::StaleAttempt { .. }))
    }

    /// The session is in its kind's dead-letter set: its deliveries failed the kind's maximum
    /// attempts in a row, and nothing happens to it until an operator redrives it.
    pub fn is_dead(&self) -> bool {
        matches!(self.refusal(), Some(RequestError::SessionDead(_)))
    }

    /// A configured limit refused the request (record, session or store timeout too large, or
    /// too many records or sessions).
    pub fn is_limit(&self) -> bool {
        matches!(
            self.refusal(),
            Some(
                RequestError::RecordTooLarge { .. }
                    | RequestError::SessionTooLarge { .. }
                    | RequestError::TooManyRecords { .. }
                    | RequestError::TimeoutTooLong { .. }
                    | RequestError::TooManySessions { .. }
            )
        )
    }
}

/// What one redrive did: `count` dead sessions went back to the stored set (due at once; the
/// kind's handler slots pace them), and `remaining` sessions of that kind are still dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redriven {
    pub count: u32,
    pub remaining: u64,
}

/// A connection to a truba server, shared by every clone (one background task owns it).
pub struct Pipe<T: Transport = Tcp> {
    inner: Arc<Inner>,
    /// Readers' streams open connections of their own (see [`crate::reading`]).
    transport: T,
}

struct Inner {
    calls: mpsc::Sender<Call>,
    options: ClientOptions,
    addrs: Vec<String>,
    /// The members and their client addresses, as the members connected to said (shared with
    /// the connection task, which learns them).
    members: Members,
    /// Random per pipe; client ids are this plus a counter.
    id_base: u64,
    next_client: AtomicU64,
    next_query: AtomicU64,
}

impl<T: Transport> Clone for Pipe<T> {
    fn clone(&self) -> Self {
        Pipe { inner: self.inner.clone(), transport: self.transport.clone() }
    }
}

impl<T: Transport> fmt::Debug for Pipe<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipe").field("addrs", &self.inner.addrs).finish_non_exhaustive()
    }
}

/// Splits "a:1, b:2" (or a list of such strings) into addresses.
fn split_addrs<S: AsRef<str>>(addrs: impl IntoIterator<Item = S>) -> Vec<String> {
    addrs
        .into_iter()
        .flat_map(|s| s.as_ref().split(',').map(|a| a.trim().to_string()).collect::<Vec<_>>())
        .filter(|a| !a.is_empty())
        .collect()
}

impl Pipe<Tcp> {
    /// Connects over TCP with default options. `addrs`: one or more "host:port", tried in order
    /// (comma-separated).
    pub async fn connect(addrs: &str) -> Result<Pipe<Tcp>, ClientError> {
        Pipe::connect_with(Tcp, vec![addrs.to_string()], ClientOptions::default()).await
    }
}

impl<T: Transport> Pipe<T> {
    /// Connects to the first of `addrs` that answers (each entry may itself be comma-separated),
    /// trying them again with a short backoff for up to `options.retry_for` (a member restarting
    /// for a second is waited for). Fails with [`ClientError::Connect`] if none answers by then;
    /// later breaks reconnect by themselves.
    pub async fn connect_with(
        transport: T,
        addrs: Vec<String>,
        options: ClientOptions,
    ) -> Result<Pipe<T>, ClientError> {
        let addrs = split_addrs(addrs);
        if addrs.is_empty() {
            return Err(ClientError::Connect { addrs: String::new(), reason: "no server address given".into() });
        }
        let deadline = Instant::now() + options.retry_for;
        let mut backoff = BACKOFF_MIN;
        let (stream, addr, hello) = loop {
            match connect_any(&transport, &addrs, &options).await {
                Ok(connected) => break connected,
                Err(reason) if Instant::now() + backoff >= deadline => {
                    return Err(ClientError::Connect { addrs: addrs.join(","), reason });
                }
                Err(reason) => {
                    tracing::debug!(%reason, "no member answered; trying again");
                    tokio::time::sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        };
        let (calls_tx, calls_rx) = mpsc::channel(CALL_QUEUE_MAX);
        let members = Members::default();
        let mut task = ConnTask::new(transport.clone(), addrs.clone(), options.clone(), calls_rx, members.clone());
        task.adopt(stream, addr, hello);
        tokio::spawn(task.run());
        Ok(Pipe {
            inner: Arc::new(Inner {
                calls: calls_tx,
                options,
                addrs,
                members,
                id_base: OsRng.next_u64(),
                next_client: AtomicU64::new(0),
                next_query: AtomicU64::new(1),
            }),
            transport,
        })
    }

    /// The server addresses, in the order they are tried.
    pub fn addrs(&self) -> &[String] {
        &self.inner.addrs
    }

    /// The cluster's members and where clients reach them, as the members this pipe connected
    /// to said in their hellos (a single node lists itself).
    pub fn members(&self) -> Vec<(ReplicaId, String)> {
        let members = self.inner.members.lock().expect("members lock");
        members.iter().map(|(id, addr)| (*id, addr.clone())).collect()
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    pub(crate) fn transport(&self) -> &T {
        &self.transport
    }

    fn fresh_client(&self) -> ClientId {
        ClientId(self.inner.id_base.wrapping_add(self.inner.next_client.fetch_add(1, Ordering::Relaxed)))
    }

    /// Opens a session of `kind` with no records.
    #[allow(clippy::new_ret_no_self)] // `pipe.new(kind)` opens a new session, as the protocol names it
    pub async fn new(&self, kind: u32) -> Result<Session<T>, ClientError> {
        self.open(kind, None).await
    }

    /// Opens a session of `kind` holding `first` as its first record.
    pub async fn new_with(&self, kind: u32, first: Vec<u8>) -> Result<Session<T>, ClientError> {
        self.open(kind, Some(first)).await
    }

    async fn open(&self, kind: u32, record: Option<Vec<u8>>) -> Result<Session<T>, ClientError> {
        let client = self.fresh_client();
        match self.request(client, Seq(1), Request::New { kind: Kind(kind), record }).await? {
            Reply::Created { handle } => Ok(Session { pipe: self.clone(), handle, client, next_seq: 2 }),
            other => Err(ClientError::Unexpected(format!("{other:?} to a new session request"))),
        }
    }

    /// A session handle obtained elsewhere (a command line, a delivery). It gets its own client id.
    pub fn session(&self, handle: Handle) -> Session<T> {
        Session { pipe: self.clone(), handle, client: self.fresh_client(), next_seq: 1 }
    }

    /// Where a session stands and its records.
    pub async fn get(&self, id: SessionId) -> Result<SessionView, ClientError> {
        self.session_query(Query::Session(id)).await
    }

    /// A session as the member this pipe is connected to has applied it, answered at once by
    /// any member (a learner too): possibly behind the leader, never ahead of what is committed.
    /// Use a pipe with `learn_members: false` on one address to choose the member.
    pub async fn get_local(&self, id: SessionId) -> Result<SessionView, ClientError> {
        self.session_query(Query::SessionLocal(id)).await
    }

    async fn session_query(&self, query: Query) -> Result<SessionView, ClientError> {
        let qid = self.inner.next_query.fetch_add(1, Ordering::Relaxed);
        let msg = ClientMsg::Query { id: qid, query };
        match self.call(Key::Query(qid), &msg, Duration::ZERO).await? {
            ServerMsg::QueryReply { reply: QueryReply::Session(Ok(view)), .. } => Ok(view),
            ServerMsg::QueryReply { reply: QueryReply::Session(Err(e)), .. } => Err(ClientError::Refused(e)),
            other => Err(ClientError::Unexpected(format!("{other:?} to a session query"))),
        }
    }

    /// A page of `kind`'s dead-letter set, oldest first: at most `limit` sessions (the server
    /// caps it at its `list_max`, 1000 by default) after `after`, the last id of the previous
    /// page (`None` for the first), and how many sessions of the kind are dead in all. Answered
    /// by the leader, like [`Pipe::get`].
    pub async fn dead_page(&self, kind: u32, after: Option<SessionId>, limit: u32) -> Result<DeadPage, ClientError> {
        let qid = self.inner.next_query.fetch_add(1, Ordering::Relaxed);
        let msg = ClientMsg::Query { id: qid, query: Query::Dead { kind: Kind(kind), after, limit } };
        match self.call(Key::Query(qid), &msg, Duration::ZERO).await? {
            ServerMsg::QueryReply { reply: QueryReply::Dead(Ok(page)), .. } => Ok(page),
            ServerMsg::QueryReply { reply: QueryReply::Dead(Err(e)), .. } => Err(ClientError::Refused(e)),
            other => Err(ClientError::Unexpected(format!("{other:?} to a dead-letter query"))),
        }
    }

    /// Moves one dead session back to the stored set, due at once, with its failure count
    /// cleared. Refused with `NotDead` if it is not in a dead-letter set.
    pub async fn redrive_session(&self, id: SessionId) -> Result<Redriven, ClientError> {
        self.redrive(RedriveTarget::Session(id)).await
    }

    /// Moves the oldest dead sessions of `kind` back to the stored set, at most the server's
    /// `redrive_batch_max` (1024 by default) per call: repeat it until `remaining` is 0 (or a
    /// call moves none).
    pub async fn redrive_kind(&self, kind: u32) -> Result<Redriven, ClientError> {
        self.redrive(RedriveTarget::Kind(Kind(kind))).await
    }

    /// Deletes a dead session without delivering it. Refused with `NotDead` for any other.
    pub async fn drop_dead(&self, id: SessionId) -> Result<(), ClientError> {
        let client = self.fresh_client();
        match self.request(client, Seq(1), Request::DropDead { session: id }).await? {
            Reply::Done => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?} to a drop request"))),
        }
    }

    /// A redrive is a replicated request like any other: a client id of its own, sequence 1,
    /// retried with both unchanged, so a retry never moves a second batch.
    async fn redrive(&self, target: RedriveTarget) -> Result<Redriven, ClientError> {
        let client = self.fresh_client();
        match self.request(client, Seq(1), Request::Redrive { target }).await? {
            Reply::Redriven { count, remaining } => Ok(Redriven { count, remaining }),
            other => Err(ClientError::Unexpected(format!("{other:?} to a redrive request"))),
        }
    }

    /// A tail of the ledger: every committed entry's events that pass `filter`, in index order,
    /// from `from` on, then new ones as they commit; see [`Tail`]. Any member serves it (it
    /// starts with the first of the pipe's addresses that answers, and goes on at the next one
    /// if that member stops). Nothing is sent until the first [`Tail::next`].
    pub fn tail(&self, from: TailFrom, filter: Filter) -> Tail<T> {
        Tail::new(self, from, filter, false)
    }

    /// A watch of the sessions of `kinds` (every kind if empty): a resync of every live one,
    /// then their changes, acknowledged by the application; see [`Watch`].
    pub fn watch(&self, options: WatchOptions) -> Watch<T> {
        Watch::new(self, options)
    }

    /// A consumer's checkpoint: the epoch it was last opened at, and the index through which it
    /// has committed. A linearizable read, answered by the leader.
    pub async fn checkpoint(&self, consumer: &str) -> Result<Checkpoint, ClientError> {
        let qid = self.inner.next_query.fetch_add(1, Ordering::Relaxed);
        let msg = ClientMsg::Query { id: qid, query: Query::Checkpoint { consumer: consumer.into() } };
        checkpoint_reply(self.call(Key::Query(qid), &msg, Duration::ZERO).await?)
    }

    /// Waits until the consumer's checkpoint covers `index` (it has processed everything
    /// through it: read-your-writes across a pipeline), at most `timeout`; then
    /// `Refused(TimedOut)`. Any member answers, from what it has applied.
    pub async fn read_through(
        &self,
        consumer: &str,
        index: Index,
        timeout: Duration,
    ) -> Result<Checkpoint, ClientError> {
        let qid = self.inner.next_query.fetch_add(1, Ordering::Relaxed);
        let timeout_ms = timeout.as_millis() as u64;
        let query = Query::ReadThrough { consumer: consumer.into(), index, timeout_ms };
        // Each attempt waits for the server's own deadline, plus the usual time for an answer.
        checkpoint_reply(self.call(Key::Query(qid), &ClientMsg::Query { id: qid, query }, timeout).await?)
    }

    /// Removes a consumer and its checkpoint (an operator's call).
    pub async fn consumer_drop(&self, consumer: &str) -> Result<(), ClientError> {
        let client = self.fresh_client();
        match self.request(client, Seq(1), Request::ConsumerDrop { consumer: consumer.into() }).await? {
            Reply::Done => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?} to a consumer drop"))),
        }
    }

    /// The cluster's replicated configuration (kinds, applied limits, members, version). A
    /// linearizable read, answered by the leader.
    pub async fn config(&self) -> Result<ClusterConfig, ClientError> {
        let qid = self.inner.next_query.fetch_add(1, Ordering::Relaxed);
        let msg = ClientMsg::Query { id: qid, query: Query::Config };
        match self.call(Key::Query(qid), &msg, Duration::ZERO).await? {
            ServerMsg::QueryReply { reply: QueryReply::Config(Ok(c)), .. } => Ok(c),
            ServerMsg::QueryReply { reply: QueryReply::Config(Err(e)), .. } => Err(ClientError::Refused(e)),
            other => Err(ClientError::Unexpected(format!("{other:?} to a configuration query"))),
        }
    }

    /// Replaces the cluster's kinds and applied limits (an operator's call), if its
    /// configuration is still at `expect_version`; answers the new version. Refused whole with
    /// `ConfigVersion` if someone changed it meanwhile, `InvalidConfig`, or `KindInUse` if a
    /// removed kind still has sessions.
    pub async fn configure(
        &self,
        expect_version: u64,
        kinds: BTreeMap<Kind, KindConfig>,
        limits: AppliedLimits,
    ) -> Result<u64, ClientError> {
        let client = self.fresh_client();
        match self.request(client, Seq(1), Request::Configure { expect_version, kinds, limits }).await? {
            Reply::Configured { version } => Ok(version),
            other => Err(ClientError::Unexpected(format!("{other:?} to a configuration change"))),
        }
    }

    /// Changes the cluster's membership by one member (an operator's call); answers the new
    /// configuration version. The leader refuses while another change is in flight or before it
    /// has committed an entry of its term (retried here until the timeout), a promotion of a
    /// learner that is behind (`LearnerBehind`), and the removal of itself (`RemoveLeader`).
    pub async fn change_members(
        &self,
        change: truba_engine::MemberChange,
        addrs: Option<truba_engine::MemberAddrs>,
    ) -> Result<u64, ClientError> {
        let client = self.fresh_client();
        match self.request(client, Seq(1), Request::ChangeMembers { change, addrs }).await? {
            Reply::MembersChanged { version } => Ok(version),
            other => Err(ClientError::Unexpected(format!("{other:?} to a membership change"))),
        }
    }

    /// Asks the leader to hand leadership to voter `to`; answers once the leader has told `to`
    /// to stand (the caller watches for the new leader).
    pub async fn transfer_leader(&self, to: ReplicaId) -> Result<(), ClientError> {
        let client = self.fresh_client();
        match self.request(client, Seq(1), Request::TransferLeader { to }).await? {
            Reply::LeaderTransferring { .. } => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?} to a leadership transfer"))),
        }
    }

    pub(crate) fn fresh_client_id(&self) -> ClientId {
        self.fresh_client()
    }

    /// The server's status (engine state, disk use, connections).
    pub async fn status(&self) -> Result<ServerStatus, ClientError> {
        let id = self.inner.next_query.fetch_add(1, Ordering::Relaxed);
        match self.call(Key::Status(id), &ClientMsg::Status { id }, Duration::ZERO).await? {
            ServerMsg::Status { status, .. } => Ok(status),
            other => Err(ClientError::Unexpected(format!("{other:?} to a status request"))),
        }
    }

    /// Sends one request (retrying it as described in the module docs) and returns its reply.
    pub(crate) async fn request(&self, client: ClientId, seq: Seq, request: Request) -> Result<Reply, ClientError> {
        let msg = ClientMsg::Request { client, seq, request };
        match self.call(Key::Request(client, seq), &msg, Duration::ZERO).await? {
            ServerMsg::Reply { outcome: Ok(reply), .. } => Ok(reply),
            ServerMsg::Reply { outcome: Err(e), .. } => Err(ClientError::Refused(e)),
            other => Err(ClientError::Unexpected(format!("{other:?} to a request"))),
        }
    }

    /// The retry loop: the same frame is sent until it is answered (with something other than a
    /// "not now" refusal), or `retry_for` has passed. `waits`: how long the server itself may
    /// take to answer (a read-through's deadline), added to each attempt's wait and the total.
    async fn call(&self, key: Key, msg: &ClientMsg, waits: Duration) -> Result<ServerMsg, ClientError> {
        let options = &self.inner.options;
        let frame: Arc<[u8]> = wire::encode(msg).into();
        let started = Instant::now();
        let deadline = started + options.retry_for + waits;
        let written = Arc::new(AtomicU8::new(NOT_SENT));
        let mut backoff = BACKOFF_MIN;
        let mut last_problem = String::from("no attempt was made");
        loop {
            let now = Instant::now();
            if now >= deadline {
                // "Never sent" must stay true after we say it: abandoning and sending race on
                // one atomic, so the connection task cannot write the request afterwards.
                return Err(match written.compare_exchange(NOT_SENT, ABANDONED, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => ClientError::Connect { addrs: self.inner.addrs.join(","), reason: last_problem },
                    Err(_) => ClientError::Timeout { waited_ms: started.elapsed().as_millis() as u64 },
                });
            }
            let (reply_tx, reply_rx) = oneshot::channel();
            let call = Call { key, frame: frame.clone(), written: written.clone(), reply: reply_tx };
            let attempt = async {
                self.inner.calls.send(call).await.map_err(|_| ())?;
                reply_rx.await.map_err(|_| ())
            };
            let wait = (options.request_timeout + waits).min(deadline - now);
            match tokio::time::timeout(wait, attempt).await {
                Err(_) => {
                    // Sent again at once (the connection task reconnects if the old one went silent).
                    last_problem = format!("no answer within {} ms", wait.as_millis());
                    continue;
                }
                Ok(Err(())) => return Err(ClientError::Protocol("the pipe's connection task has stopped".into())),
                Ok(Ok(Answer::Msg(m))) => match not_now(&m) {
                    None => return Ok(m),
                    // The connection has moved on to the next member: try it at once, and
                    // keep the pause short while an election finds a leader.
                    Some(e @ (RequestError::NotLeader { .. } | RequestError::LeaderLost { .. })) => {
                        last_problem = format!("server answered: {e}");
                        tokio::time::sleep(jittered(BACKOFF_MIN)).await;
                        continue;
                    }
                    Some(e) => last_problem = format!("server answered: {e}"),
                },
                Ok(Ok(Answer::Lost(reason))) => last_problem = reason,
                Ok(Ok(Answer::Failed(e))) => return Err(e),
            }
            let pause = jittered(backoff).min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// The refusal an answer carries, if it is one.
fn refusal_in(msg: &ServerMsg) -> Option<&RequestError> {
    match msg {
        ServerMsg::Reply { outcome: Err(e), .. }
        | ServerMsg::QueryReply {
            reply:
                QueryReply::Session(Err(e))
                | QueryReply::Dead(Err(e))
                | QueryReply::Checkpoint(Err(e))
                | QueryReply::Config(Err(e)),
            ..
        } => Some(e),
        _ => None,
    }
}

fn checkpoint_reply(msg: ServerMsg) -> Result<Checkpoint, ClientError> {
    match msg {
        ServerMsg::QueryReply { reply: QueryReply::Checkpoint(Ok(c)), .. } => Ok(c),
        ServerMsg::QueryReply { reply: QueryReply::Checkpoint(Err(e)), .. } => Err(ClientError::Refused(e)),
        other => Err(ClientError::Unexpected(format!("{other:?} to a checkpoint query"))),
    }
}

/// A refusal that means "try again shortly".
fn not_now(msg: &ServerMsg) -> Option<&RequestError> {
    let e = refusal_in(msg)?;
    let not_now = matches!(
        e,
        RequestError::NotReady
            | RequestError::Overloaded { .. }
            | RequestError::Stopped(_)
            | RequestError::NotLeader { .. }
            | RequestError::LeaderLost { .. }
            | RequestError::NotConfigured
    );
    not_now.then_some(e)
}

fn jittered(d: Duration) -> Duration {
    let half = d.as_micros() as u64 / 2;
    d + Duration::from_micros(if half == 0 { 0 } else { OsRng.next_u64() % half })
}

/// One session worked on through a [`Pipe`]: its handle, its own client id and its next sequence
/// number. Requests on one session go one at a time (`&mut self`).
pub struct Session<T: Transport = Tcp> {
    pipe: Pipe<T>,
    handle: Handle,
    client: ClientId,
    next_seq: u64,
}

impl<T: Transport> fmt::Debug for Session<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("handle", &self.handle)
            .field("client", &self.client)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

impl<T: Transport> Session<T> {
    pub fn id(&self) -> SessionId {
        self.handle.session
    }

    pub fn handle(&self) -> Handle {
        self.handle
    }

    pub fn pipe(&self) -> &Pipe<T> {
        &self.pipe
    }

    /// The client id and sequence number of the last request sent on this session (what the
    /// ledger's audit shows for its entry); `None` before the first.
    pub fn last_request(&self) -> Option<(ClientId, Seq)> {
        (self.next_seq > 1).then(|| (self.client, Seq(self.next_seq - 1)))
    }

    async fn send(&mut self, request: Request) -> Result<Reply, ClientError> {
        let seq = Seq(self.next_seq);
        self.next_seq += 1;
        self.pipe.request(self.client, seq, request).await
    }

    async fn expect_done(&mut self, request: Request) -> Result<(), ClientError> {
        match self.send(request).await? {
            Reply::Done => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?} where Done was expected"))),
        }
    }

    /// Adds one record at the end.
    pub async fn append(&mut self, record: impl Into<Vec<u8>>) -> Result<(), ClientError> {
        self.expect_done(Request::Append { handle: self.handle, record: record.into() }).await
    }

    /// Drops all records and keeps this one.
    pub async fn replace(&mut self, record: impl Into<Vec<u8>>) -> Result<(), ClientError> {
        self.expect_done(Request::Replace { handle: self.handle, record: record.into() }).await
    }

    /// The work is done: the session is gone and never delivered again.
    pub async fn delete(mut self) -> Result<(), ClientError> {
        self.expect_done(Request::Delete { handle: self.handle }).await
    }

    /// The work is unfinished: the kind's handler gets the session after `timeout_s` (plus the
    /// kind's jitter). Returns the repeat time.
    pub async fn store(mut self, timeout_s: u32) -> Result<UnixSecs, ClientError> {
        match self.send(Request::Store { handle: self.handle, timeout_s }).await? {
            Reply::Stored { due } => Ok(due),
            other => Err(ClientError::Unexpected(format!("{other:?} where Stored was expected"))),
        }
    }

    /// Renews the lease without changing anything else.
    pub async fn keep_alive(&mut self) -> Result<(), ClientError> {
        self.expect_done(Request::KeepAlive { handle: self.handle }).await
    }

    /// Renews the lease every `every` in the background until the returned guard is dropped, so
    /// that a job longer than the kind's lease is not redelivered under its feet. Pick `every`
    /// well under the lease (a third of it, say). The renewals use a client id of their own, so
    /// they do not disturb this session's own requests. They stop by themselves once the handle
    /// is refused (stale, stored, deleted, dead): the session is no longer this holder's.
    pub fn keep_alive_every(&self, every: Duration) -> KeepAliveGuard {
        let mut renewer = self.pipe.session(self.handle);
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match renewer.keep_alive().await {
                    Ok(()) => {}
                    Err(ClientError::Refused(e)) => {
                        tracing::warn!(handle = %renewer.handle, error = %e, "lease renewal refused; no longer renewing");
                        return;
                    }
                    // Unanswered: the next tick tries again (a renewal is idempotent).
                    Err(e) => {
                        tracing::debug!(handle = %renewer.handle, error = %e, "lease renewal not answered");
                        renewer = renewer.pipe.session(renewer.handle);
                    }
                }
            }
        });
        KeepAliveGuard { task }
    }
}

/// Renews a session's lease in the background while it lives ([`Session::keep_alive_every`]).
#[must_use = "the renewals stop when the guard is dropped"]
pub struct KeepAliveGuard {
    task: JoinHandle<()>,
}

impl Drop for KeepAliveGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// The connection task.

/// What an answer is matched by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    Request(ClientId, Seq),
    Query(u64),
    Status(u64),
}

struct Call {
    key: Key,
    frame: Arc<[u8]>,
    /// Set once the frame has been handed to a connection (the request may then have been
    /// applied); shared by every attempt of one call.
    /// NOT_SENT, SENT (written to some connection at least once) or ABANDONED (the caller gave
    /// up before it was ever sent, and said so: it must never be sent).
    written: Arc<AtomicU8>,
    reply: oneshot::Sender<Answer>,
}

enum Answer {
    Msg(ServerMsg),
    /// The connection broke or could not be made; try again.
    Lost(String),
    /// Give up with this error.
    Failed(ClientError),
}

struct Pending {
    reply: oneshot::Sender<Answer>,
    sent_at: Instant,
    payload_len: u32,
}

struct Event {
    generation: u64,
    msg: Result<ServerMsg, String>,
}

struct Conn<T: Transport> {
    generation: u64,
    addr: String,
    /// Buffered: frames queued back to back go out in one write (see `ConnTask::run`).
    writer: BufWriter<WriteHalf<T::Stream>>,
    reader: JoinHandle<()>,
    /// When a frame last arrived: a connection silent since a timed-out request was sent is
    /// taken for dead.
    last_rx: Instant,
}

struct ConnTask<T: Transport> {
    transport: T,
    addrs: Vec<String>,
    options: ClientOptions,
    calls: mpsc::Receiver<Call>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    conn: Option<Conn<T>>,
    generation: u64,
    pending: HashMap<Key, Pending>,
    connect_failed: Option<(Instant, String)>,
    /// Where clients reach each member, as the members said in their `Hello`s: a `NotLeader`
    /// hint names a member, and this says where to find it (shared with the pipe).
    members: Members,
}

/// Member id -> client address, learned from hellos.
type Members = Arc<std::sync::Mutex<BTreeMap<ReplicaId, String>>>;

/// Connects to `addr` and waits for the member's `Hello`, both within `timeout`. A member that
/// accepts connections but whose engine does not run (a paused process: the kernel still
/// accepts) is given up on here, instead of holding every request for a request timeout.
pub async fn connect_member<T: Transport>(
    transport: &T,
    addr: &str,
    timeout: Duration,
    frame_bytes_max: u32,
    token: Option<&str>,
) -> Result<(T::Stream, Hello), String> {
    let attempt = async {
        let mut stream = transport.connect(addr).await.map_err(|e| e.to_string())?;
        match wire::read::<ServerMsg, _>(&mut stream, frame_bytes_max).await {
            Ok(Some(ServerMsg::Hello(hello))) if hello.protocol == wire::CLIENT_PROTOCOL_VERSION => {
                if let Some(token) = token {
                    let auth = ClientMsg::Authenticate { token: token.to_string() };
                    wire::write(&mut stream, &auth).await.map_err(|e| e.to_string())?;
                }
                Ok((stream, hello))
            }
            Ok(Some(ServerMsg::Hello(hello))) => Err(format!(
                "the member speaks client protocol version {}, this client version {} (upgrade the older side)",
                hello.protocol,
                wire::CLIENT_PROTOCOL_VERSION
            )),
            Ok(Some(ServerMsg::Error { error })) => Err(format!("refused: {error}")),
            Ok(Some(_)) => Err("the server did not open with a hello (an older or foreign server?)".into()),
            Ok(None) => Err("the server closed the connection".into()),
            Err(e) => Err(e.to_string()),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no hello within {} ms (is the member paused or overloaded?)", timeout.as_millis())),
    }
}

/// Tries the addresses in order, staggered as "happy eyeballs" (RFC 8305) does: the next one is
/// tried as soon as the one before fails, or after [`CONNECT_STAGGER`] without a hello while it
/// is still trying; the first member to say hello wins and the other attempts are dropped. So a
/// silent member (paused, or cut off) listed first costs a new connection the stagger, not its
/// whole connect timeout.
async fn connect_any<T: Transport>(
    transport: &T,
    addrs: &[String],
    options: &ClientOptions,
) -> Result<(T::Stream, String, Hello), String> {
    let mut attempts = tokio::task::JoinSet::new();
    let mut problems = Vec::new();
    let mut next = 0;
    loop {
        if next < addrs.len() {
            let (t, addr) = (transport.clone(), addrs[next].clone());
            let (timeout, max, token) = (options.connect_timeout, options.frame_bytes_max, options.token.clone());
            attempts.spawn(async move {
                let result = connect_member(&t, &addr, timeout, max, token.as_deref()).await;
                (addr, result)
            });
            next += 1;
        }
        let done = if next < addrs.len() {
            tokio::select! {
                done = attempts.join_next() => done,
                _ = tokio::time::sleep(CONNECT_STAGGER) => continue,
            }
        } else {
            attempts.join_next().await
        };
        match done {
            // Dropping `attempts` aborts the others.
            Some(Ok((addr, Ok((stream, hello))))) => return Ok((stream, addr, hello)),
            Some(Ok((addr, Err(e)))) => problems.push(format!("{addr}: {e}")),
            Some(Err(e)) => problems.push(format!("a connection attempt failed: {e}")),
            None if next < addrs.len() => {}
            None => return Err(problems.join("; ")),
        }
    }
}

impl<T: Transport> ConnTask<T> {
    fn new(
        transport: T,
        addrs: Vec<String>,
        options: ClientOptions,
        calls: mpsc::Receiver<Call>,
        members: Members,
    ) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        ConnTask {
            transport,
            addrs,
            options,
            calls,
            events_tx,
            events,
            conn: None,
            generation: 0,
            pending: HashMap::new(),
            connect_failed: None,
            members,
        }
    }

    async fn run(mut self) {
        let mut purge = tokio::time::interval(PURGE_EVERY);
        purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                call = self.calls.recv(), if self.pending.len() < PENDING_MAX => match call {
                    Some(call) => {
                        self.on_call(call).await;
                        // Many sessions share this connection: their frames queued together
                        // go out in one write, sent once nothing more is waiting.
                        if self.calls.is_empty() {
                            self.flush().await;
                        }
                    }
                    None => break, // every Pipe is gone
                },
                Some(event) = self.events.recv() => self.on_event(event),
                _ = purge.tick() => self.pending.retain(|_, p| !p.reply.is_closed()),
            }
        }
        self.drop_conn("the pipe was dropped".into());
    }

    fn adopt(&mut self, stream: T::Stream, addr: String, hello: Hello) {
        self.learn(&hello);
        self.generation += 1;
        let generation = self.generation;
        let (reader, writer) = tokio::io::split(stream);
        let reader = tokio::spawn(read_loop(reader, generation, self.options.frame_bytes_max, self.events_tx.clone()));
        tracing::debug!(%addr, generation, "connected");
        let writer = BufWriter::with_capacity(64 * 1024, writer);
        self.conn = Some(Conn { generation, addr, writer, reader, last_rx: Instant::now() });
    }

    /// Closes the connection; everything waiting on it is told to try again.
    async fn flush(&mut self) {
        let Some(conn) = self.conn.as_mut() else { return };
        let result = tokio::time::timeout(self.options.request_timeout, conn.writer.flush()).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.drop_conn(format!("write failed: {e}")),
            Err(_) => self.drop_conn(format!("write blocked for {} ms", self.options.request_timeout.as_millis())),
        }
    }

    fn drop_conn(&mut self, reason: String) {
        if let Some(conn) = self.conn.take() {
            conn.reader.abort();
            tracing::debug!(addr = %conn.addr, generation = conn.generation, %reason, "connection dropped");
            let reason = format!("connection to {} lost: {reason}", conn.addr);
            for (_, p) in self.pending.drain() {
                let _ = p.reply.send(Answer::Lost(reason.clone()));
            }
        }
    }

    async fn connect(&mut self) -> Result<(), String> {
        if let Some((at, reason)) = &self.connect_failed {
            if at.elapsed() < CONNECT_QUIET {
                return Err(reason.clone());
            }
        }
        match connect_any(&self.transport, &self.addrs, &self.options).await {
            Ok((stream, addr, hello)) => {
                self.connect_failed = None;
                self.adopt(stream, addr, hello);
                Ok(())
            }
            Err(reason) => {
                self.connect_failed = Some((Instant::now(), reason.clone()));
                Err(reason)
            }
        }
    }

    async fn on_call(&mut self, call: Call) {
        if call.reply.is_closed() {
            return; // the caller gave up (or timed out and sent this again) while it queued
        }
        if let (Some(conn), Some(p)) = (&self.conn, self.pending.get(&call.key)) {
            // A retry after a timeout. Nothing at all heard since the original was sent: the
            // connection is taken for dead. Otherwise it is alive and the retry goes on it.
            if conn.last_rx <= p.sent_at {
                let silent = p.sent_at.elapsed().as_millis();
                let addr = conn.addr.clone();
                self.drop_conn(format!("nothing heard for {silent} ms"));
                // A member gone silent (paused, or cut off) is tried last from now on.
                self.move_past(&addr);
            }
        }
        if self.conn.is_none() {
            if let Err(reason) = self.connect().await {
                let _ = call.reply.send(Answer::Lost(format!("cannot connect: {reason}")));
                return;
            }
        }
        let conn = self.conn.as_mut().expect("connected above");
        // The caller may have given up while we connected; if it reported "never sent", keep it so.
        if call.written.fetch_max(SENT, Ordering::AcqRel) == ABANDONED {
            return;
        }
        let write = conn.writer.write_all(&call.frame);
        let problem = match tokio::time::timeout(self.options.request_timeout, write).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("write failed: {e}")),
            Err(_) => Some(format!("write blocked for {} ms", self.options.request_timeout.as_millis())),
        };
        if let Some(problem) = problem {
            self.drop_conn(problem.clone());
            let _ = call.reply.send(Answer::Lost(problem));
            return;
        }
        let payload_len = (call.frame.len() - wire::FRAME_HEADER_LEN) as u32;
        self.pending.insert(call.key, Pending { reply: call.reply, sent_at: Instant::now(), payload_len });
    }

    fn on_event(&mut self, event: Event) {
        let Some(conn) = &mut self.conn else { return };
        if conn.generation != event.generation {
            return; // from a connection already dropped
        }
        let msg = match event.msg {
            Ok(msg) => msg,
            Err(reason) => return self.drop_conn(reason),
        };
        conn.last_rx = Instant::now();
        let key = match &msg {
            ServerMsg::Reply { client, seq, .. } => Key::Request(*client, *seq),
            ServerMsg::QueryReply { id, .. } => Key::Query(*id),
            ServerMsg::Status { id, .. } => Key::Status(*id),
            ServerMsg::Hello(_) => {
                tracing::debug!(addr = %conn.addr, "a second hello on one connection");
                return;
            }
            // The pipe's own connection opens no streams.
            ServerMsg::Stream { .. } | ServerMsg::StreamRefused { .. } | ServerMsg::StreamEnded { .. } => {
                tracing::debug!(addr = %conn.addr, "a stream message on a connection with no streams");
                return;
            }
            ServerMsg::Error { error } => {
                tracing::warn!(addr = %conn.addr, %error, "the server closed the connection");
                if let WireError::FrameTooLarge { len, max } = error {
                    // Sending that frame again would only break the next connection too.
                    let (len, max) = (*len, *max);
                    let too_large: Vec<Key> =
                        self.pending.iter().filter(|(_, p)| p.payload_len == len).map(|(k, _)| *k).collect();
                    for key in too_large {
                        let p = self.pending.remove(&key).expect("listed above");
                        let e = format!("a frame of {len} bytes exceeds the server's limit of {max}");
                        let _ = p.reply.send(Answer::Failed(ClientError::Protocol(e)));
                    }
                }
                return self.drop_conn(format!("server error: {error}"));
            }
        };
        let redirected = match refusal_in(&msg) {
            Some(RequestError::NotLeader { leader }) => Some(*leader),
            Some(RequestError::LeaderLost { .. }) => Some(None),
            _ => None,
        };
        match self.pending.remove(&key) {
            Some(p) => {
                let _ = p.reply.send(Answer::Msg(msg));
            }
            None => tracing::debug!(?key, "answer nobody waits for (the caller gave up)"),
        }
        if let Some(hint) = redirected {
            self.follow_leader(hint);
        }
    }

    /// This server does not lead: the connection goes, and the next one starts with the leader
    /// it named, if the members said where it is, or else with the next address, so the retry
    /// finds the leader within one pass over the cluster.
    fn follow_leader(&mut self, hint: Option<ReplicaId>) {
        let Some(addr) = self.conn.as_ref().map(|c| c.addr.clone()) else { return };
        self.drop_conn(format!("{addr} is not the leader"));
        self.move_past(&addr);
        let leader_addr = hint.and_then(|id| self.members.lock().expect("members lock").get(&id).cloned());
        if let Some(leader_addr) = leader_addr.filter(|a| *a != addr) {
            if let Some(i) = self.addrs.iter().position(|a| *a == leader_addr) {
                let leader_addr = self.addrs.remove(i);
                self.addrs.insert(0, leader_addr);
            }
        }
        self.connect_failed = None;
    }

    /// `addr` is tried after every other address from now on (the round-robin order stays).
    fn move_past(&mut self, addr: &str) {
        if let Some(i) = self.addrs.iter().position(|a| a == addr) {
            self.addrs.rotate_left(i + 1);
        }
    }

    /// Takes in what a member said about the cluster: the addresses of members the pipe was
    /// not given are added (tried after the given ones), so a pipe given one member reaches the
    /// others when it fails.
    fn learn(&mut self, hello: &Hello) {
        let mut members = self.members.lock().expect("members lock");
        for m in hello.members.iter().take(LEARNED_ADDRS_MAX) {
            members.insert(m.id, m.client.clone());
            if m.client.is_empty() {
                continue;
            }
            let room = self.addrs.len() < LEARNED_ADDRS_MAX;
            if self.options.learn_members && room && !self.addrs.contains(&m.client) {
                tracing::debug!(member = m.id.0, addr = %m.client, "learned a member's address");
                self.addrs.push(m.client.clone());
            }
        }
    }
}

async fn read_loop<S: tokio::io::AsyncRead>(
    reader: ReadHalf<S>,
    generation: u64,
    max: u32,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut reader = BufReader::new(reader);
    loop {
        let msg = match wire::read::<ServerMsg, _>(&mut reader, max).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err("the server closed the connection".to_string()),
            Err(e) => Err(format!("reading from the server: {e}")),
        };
        let end = msg.is_err();
        if events.send(Event { generation, msg }).is_err() || end {
            return;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wire::MemberAddr;
    use std::sync::Mutex;
    use truba_engine::{Attempt, DeadView, FailureReason, Index, Outcome, ReplicaId, RoleName, StatusView};

    /// What the fake server does with one message.
    pub(crate) enum Act {
        Answer(ServerMsg),
        /// Close the connection without answering.
        Drop,
        /// Say nothing (and keep the connection).
        Ignore,
    }

    type Behaviour = dyn Fn(&ClientMsg, usize) -> Act + Send + Sync;

    /// A tiny server speaking the wire protocol. `behaviour` gets each message and how many
    /// times that same message was seen before; every message received is logged.
    pub(crate) struct FakeServer {
        pub addr: String,
        /// What each new connection is greeted with (a tenth member of nothing, by default).
        pub hello: Arc<Mutex<ServerMsg>>,
        pub log: Arc<Mutex<Vec<ClientMsg>>>,
        pub connections: Arc<AtomicU64>,
        task: JoinHandle<()>,
    }

    impl Drop for FakeServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// The dead sessions of kind 1 in the fake's world (no other kind has any).
    pub(crate) const FAKE_DEAD: [u64; 3] = [7, 8, 9];

    /// The ordinary answer to each message: sessions are created as `next_id@0`.
    pub(crate) fn ordinary(msg: &ClientMsg) -> ServerMsg {
        match msg {
            ClientMsg::Request { client, seq, request } => {
                let outcome: Outcome = match request {
                    Request::New { .. } => {
                        Ok(Reply::Created { handle: Handle { session: SessionId(seq.0 + 100), attempt: Attempt(0) } })
                    }
                    Request::Store { timeout_s, .. } => Ok(Reply::Stored { due: UnixSecs(1_000 + *timeout_s as u64) }),
                    // A stateless fake: redrives answer as if every dead session were still there.
                    Request::Redrive { target: RedriveTarget::Session(sid) } if FAKE_DEAD.contains(&sid.0) => {
                        Ok(Reply::Redriven { count: 1, remaining: FAKE_DEAD.len() as u64 - 1 })
                    }
                    Request::Redrive { target: RedriveTarget::Session(sid) } => Err(RequestError::NotDead(*sid)),
                    Request::Redrive { target: RedriveTarget::Kind(Kind(1)) } => {
                        Ok(Reply::Redriven { count: 2, remaining: FAKE_DEAD.len() as u64 - 2 })
                    }
                    Request::Redrive { target: RedriveTarget::Kind(kind) } => Err(RequestError::UnknownKind(*kind)),
                    _ => Ok(Reply::Done),
                };
                ServerMsg::Reply { client: *client, seq: *seq, outcome }
            }
            ClientMsg::Query { id, query: Query::Session(sid) | Query::SessionLocal(sid) } => {
                ServerMsg::QueryReply { id: *id, reply: QueryReply::Session(Err(RequestError::SessionUnknown(*sid))) }
            }
            ClientMsg::Query { id, query: Query::Dead { kind, after, limit } } => {
                let dead: &[u64] = if *kind == Kind(1) { &FAKE_DEAD } else { &[] };
                let sessions = dead
                    .iter()
                    .filter(|&&sid| !after.is_some_and(|a| sid <= a.0))
                    .take(*limit as usize)
                    .map(|&sid| DeadView {
                        id: SessionId(sid),
                        since: Index(sid * 10),
                        deliveries: 3,
                        failures: 3,
                        last_failure: Some(FailureReason::Handler("boom".into())),
                        records: 1,
                        bytes: 4,
                    })
                    .collect();
                ServerMsg::QueryReply {
                    id: *id,
                    reply: QueryReply::Dead(Ok(DeadPage { sessions, total: dead.len() as u64 })),
                }
            }
            // The fake takes no credentials.
            ClientMsg::Authenticate { .. } => ServerMsg::Error { error: crate::wire::WireError::BadCredentials },
            // The fake serves no streams.
            ClientMsg::StreamOpen { stream, .. }
            | ClientMsg::StreamAck { stream, .. }
            | ClientMsg::StreamClose { stream } => {
                ServerMsg::StreamRefused { stream: *stream, refusal: crate::wire::StreamRefusal::NotOpen }
            }
            ClientMsg::Query { id, query: Query::Checkpoint { consumer } | Query::ReadThrough { consumer, .. } } => {
                let reply = QueryReply::Checkpoint(Err(RequestError::UnknownConsumer(consumer.clone())));
                ServerMsg::QueryReply { id: *id, reply }
            }
            ClientMsg::Query { id, query: Query::Config } => {
                ServerMsg::QueryReply { id: *id, reply: QueryReply::Config(Err(RequestError::NotConfigured)) }
            }
            ClientMsg::Query { id, query: Query::Status } => ServerMsg::QueryReply {
                id: *id,
                reply: QueryReply::Status(StatusView {
                    serving: true,
                    replica: ReplicaId(0),
                    role: RoleName::Leader,
                    term: Default::default(),
                    leader: Some(ReplicaId(0)),
                    applied: Default::default(),
                    commit: Default::default(),
                    durable: Default::default(),
                    last_index: Default::default(),
                    sessions_active: 0,
                    sessions_stored: 0,
                    sessions_dead: 0,
                    sessions_spilled: 0,
                    source_files: 0,
                    state_hash: 0,
                    members: Vec::new(),
                }),
            },
            ClientMsg::Status { id } => ServerMsg::Status {
                id: *id,
                status: ServerStatus {
                    version: "fake".into(),
                    engine: StatusView {
                        serving: true,
                        replica: ReplicaId(0),
                        role: RoleName::Leader,
                        term: Default::default(),
                        leader: Some(ReplicaId(0)),
                        applied: Default::default(),
                        commit: Default::default(),
                        durable: Default::default(),
                        last_index: Default::default(),
                        sessions_active: 3,
                        sessions_stored: 4,
                        sessions_dead: 0,
                        sessions_spilled: 2,
                        source_files: 1,
                        state_hash: 5,
                        members: Vec::new(),
                    },
                    disk_bytes: 6,
                    connections: 1,
                    role: "leader".into(),
                },
            },
        }
    }

    impl FakeServer {
        pub(crate) async fn start(behaviour: impl Fn(&ClientMsg, usize) -> Act + Send + Sync + 'static) -> FakeServer {
            FakeServer::start_on("127.0.0.1:0", behaviour).await
        }

        pub(crate) async fn start_on(
            addr: &str,
            behaviour: impl Fn(&ClientMsg, usize) -> Act + Send + Sync + 'static,
        ) -> FakeServer {
            let listener = Tcp.bind(addr).await.unwrap();
            let members = vec![MemberAddr { id: ReplicaId(0), client: String::new() }];
            let hello = ServerMsg::Hello(Hello {
                protocol: wire::CLIENT_PROTOCOL_VERSION,
                cluster: 1,
                member: ReplicaId(0),
                leader: Some(ReplicaId(0)),
                members,
            });
            let hello = Arc::new(Mutex::new(hello));
            let hello2 = hello.clone();
            let addr = Tcp.local_addr(&listener).unwrap().to_string();
            let log = Arc::new(Mutex::new(Vec::new()));
            let connections = Arc::new(AtomicU64::new(0));
            let behaviour: Arc<Behaviour> = Arc::new(behaviour);
            let (log2, conns2) = (log.clone(), connections.clone());
            let task = tokio::spawn(async move {
                // Dropped (with every connection's task) when the server is.
                let mut connection_tasks = tokio::task::JoinSet::new();
                loop {
                    let (stream, _) = Tcp.accept(&listener).await.unwrap();
                    conns2.fetch_add(1, Ordering::Relaxed);
                    let (log, behaviour) = (log2.clone(), behaviour.clone());
                    let hello = hello2.lock().unwrap().clone();
                    connection_tasks.spawn(async move {
                        let (r, mut w) = tokio::io::split(stream);
                        let mut r = BufReader::new(r);
                        if wire::write(&mut w, &hello).await.is_err() {
                            return;
                        }
                        while let Ok(Some(msg)) = wire::read::<ClientMsg, _>(&mut r, u32::MAX).await {
                            let seen = {
                                let mut log = log.lock().unwrap();
                                let seen = log.iter().filter(|m| **m == msg).count();
                                log.push(msg.clone());
                                seen
                            };
                            match behaviour(&msg, seen) {
                                Act::Answer(reply) => {
                                    if wire::write(&mut w, &reply).await.is_err() {
                                        return;
                                    }
                                }
                                Act::Drop => return,
                                Act::Ignore => {}
                            }
                        }
                    });
                }
            });
            FakeServer { addr, hello, log, connections, task }
        }

        pub(crate) fn requests(&self) -> Vec<(ClientId, Seq, Request)> {
            let log = self.log.lock().unwrap();
            log.iter()
                .filter_map(|m| match m {
                    ClientMsg::Request { client, seq, request } => Some((*client, *seq, request.clone())),
                    _ => None,
                })
                .collect()
        }
    }

    fn fast() -> ClientOptions {
        ClientOptions {
            request_timeout: Duration::from_millis(300),
            retry_for: Duration::from_secs(5),
            ..ClientOptions::default()
        }
    }

    async fn pipe(server: &FakeServer, options: ClientOptions) -> Pipe<Tcp> {
        Pipe::connect_with(Tcp, vec![server.addr.clone()], options).await.unwrap()
    }

    fn is_append(msg: &ClientMsg) -> bool {
        matches!(msg, ClientMsg::Request { request: Request::Append { .. }, .. })
    }

    #[tokio::test]
    async fn a_dropped_connection_is_retried_with_the_same_client_and_seq() {
        let server =
            FakeServer::start(
                |msg, seen| if is_append(msg) && seen == 0 { Act::Drop } else { Act::Answer(ordinary(msg)) },
            )
            .await;
        let pipe = pipe(&server, fast()).await;
        let mut s = pipe.new_with(1, b"r0".to_vec()).await.unwrap();
        assert_eq!(s.id(), SessionId(101));
        s.append(b"r1".to_vec()).await.unwrap();
        s.keep_alive().await.unwrap();
        assert_eq!(s.store(30).await.unwrap(), UnixSecs(1_030));

        let reqs = server.requests();
        let appends: Vec<_> = reqs.iter().filter(|(_, _, r)| matches!(r, Request::Append { .. })).collect();
        assert_eq!(appends.len(), 2, "{reqs:?}");
        assert_eq!(appends[0], appends[1], "the retry repeats client, seq and request");
        assert_eq!(appends[0].1, Seq(2));
        let client = reqs[0].0;
        assert!(reqs.iter().all(|(c, _, _)| *c == client), "one client id for the session");
        assert_eq!(reqs.iter().map(|(_, s, _)| s.0).collect::<Vec<_>>(), vec![1, 2, 2, 3, 4]);
        assert_eq!(server.connections.load(Ordering::Relaxed), 2, "reconnected once");
    }

    #[tokio::test]
    async fn a_silent_server_gets_the_request_again_on_a_new_connection() {
        let server =
            FakeServer::start(
                |msg, seen| if is_append(msg) && seen == 0 { Act::Ignore } else { Act::Answer(ordinary(msg)) },
            )
            .await;
        let pipe = pipe(&server, fast()).await;
        let mut s = pipe.session(Handle { session: SessionId(9), attempt: Attempt(2) });
        s.append(b"x".to_vec()).await.unwrap();
        let reqs = server.requests();
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0], reqs[1]);
        assert_eq!(reqs[0].1, Seq(1));
        assert_eq!(server.connections.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn not_ready_and_overloaded_are_retried() {
        let server = FakeServer::start(|msg, seen| match (msg, seen) {
            (ClientMsg::Request { client, seq, request: Request::Append { .. } }, 0 | 1) => {
                let e = if seen == 0 { RequestError::NotReady } else { RequestError::Overloaded { max: 1 } };
                Act::Answer(ServerMsg::Reply { client: *client, seq: *seq, outcome: Err(e) })
            }
            _ => Act::Answer(ordinary(msg)),
        })
        .await;
        let pipe = pipe(&server, fast()).await;
        let mut s = pipe.new(1).await.unwrap();
        s.append(b"x".to_vec()).await.unwrap();
        assert_eq!(server.requests().iter().filter(|(_, _, r)| matches!(r, Request::Append { .. })).count(), 3);
        assert_eq!(server.connections.load(Ordering::Relaxed), 1, "refusals do not break the connection");
    }

    #[tokio::test]
    async fn refusals_surface_typed() {
        let server = FakeServer::start(|msg, _| match msg {
            ClientMsg::Request { client, seq, request: Request::Append { handle, .. } } => {
                Act::Answer(ServerMsg::Reply {
                    client: *client,
                    seq: *seq,
                    outcome: Err(RequestError::SessionDeleted(handle.session)),
                })
            }
            ClientMsg::Request { client, seq, request: Request::Replace { .. } } => Act::Answer(ServerMsg::Reply {
                client: *client,
                seq: *seq,
                outcome: Err(RequestError::RecordTooLarge { size: 10, max: 1 }),
            }),
            _ => Act::Answer(ordinary(msg)),
        })
        .await;
        let pipe = pipe(&server, fast()).await;
        let mut s = pipe.new(1).await.unwrap();
        let e = s.append(b"x".to_vec()).await.unwrap_err();
        assert!(e.is_deleted(), "{e}");
        assert!(!e.is_unknown() && !e.is_stale() && !e.is_limit());
        assert_eq!(e, ClientError::Refused(RequestError::SessionDeleted(s.id())));
        assert_eq!(e.to_string(), format!("refused: session {} was deleted", s.id()));
        let e = s.replace(b"x".to_vec()).await.unwrap_err();
        assert!(e.is_limit(), "{e}");
        let e = pipe.get(SessionId(5)).await.unwrap_err();
        assert!(e.is_unknown(), "{e}");
        assert_eq!(server.requests().len(), 3, "refusals are not retried");
    }

    #[tokio::test]
    async fn wrong_reply_types_are_unexpected() {
        let server = FakeServer::start(|msg, _| match msg {
            ClientMsg::Request { client, seq, request: Request::Delete { .. } } => Act::Answer(ServerMsg::Reply {
                client: *client,
                seq: *seq,
                outcome: Ok(Reply::Stored { due: UnixSecs(1) }),
            }),
            _ => Act::Answer(ordinary(msg)),
        })
        .await;
        let pipe = pipe(&server, fast()).await;
        let s = pipe.session(Handle { session: SessionId(1), attempt: Attempt(0) });
        assert!(matches!(s.delete().await, Err(ClientError::Unexpected(_))));
    }

    #[tokio::test]
    async fn every_session_has_its_own_client_id() {
        let server = FakeServer::start(|msg, _| Act::Answer(ordinary(msg))).await;
        let pipe = pipe(&server, fast()).await;
        let mut a = pipe.new(1).await.unwrap();
        let mut b = pipe.new(1).await.unwrap();
        let c = pipe.session(a.handle());
        assert_ne!(a.client, b.client);
        assert_ne!(a.client, c.client);
        assert_ne!(b.client, c.client);
        a.append(b"a".to_vec()).await.unwrap();
        b.append(b"b".to_vec()).await.unwrap();
        let reqs = server.requests();
        assert_ne!(reqs[0].0, reqs[1].0);
        assert_eq!(reqs[2].0, reqs[0].0);
        assert_eq!(reqs[3].0, reqs[1].0);
        assert!(reqs.iter().skip(2).all(|(_, s, _)| *s == Seq(2)));
    }

    #[tokio::test]
    async fn many_sessions_share_one_connection_concurrently() {
        let server = FakeServer::start(|msg, _| Act::Answer(ordinary(msg))).await;
        let pipe = pipe(&server, fast()).await;
        let mut tasks = Vec::new();
        for i in 0..50u32 {
            let pipe = pipe.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = pipe.new(1).await.unwrap();
                for j in 0..10u32 {
                    s.append(format!("{i}/{j}")).await.unwrap();
                }
                s.delete().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(server.requests().len(), 50 * 12);
        assert_eq!(server.connections.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn status_and_queries() {
        let server = FakeServer::start(|msg, _| Act::Answer(ordinary(msg))).await;
        let pipe = pipe(&server, fast()).await;
        let st = pipe.status().await.unwrap();
        assert_eq!((st.engine.sessions_active, st.disk_bytes, st.role.as_str()), (3, 6, "leader"));
    }

    #[tokio::test]
    async fn dead_pages_and_redrives() {
        let server = FakeServer::start(|msg, _| Act::Answer(ordinary(msg))).await;
        let pipe = pipe(&server, fast()).await;
        let ids = |p: &DeadPage| p.sessions.iter().map(|v| v.id.0).collect::<Vec<_>>();
        let first = pipe.dead_page(1, None, 2).await.unwrap();
        assert_eq!((ids(&first), first.total), (vec![7, 8], 3));
        assert_eq!(first.sessions[0].last_failure, Some(FailureReason::Handler("boom".into())));
        let next = pipe.dead_page(1, first.sessions.last().map(|v| v.id), 2).await.unwrap();
        assert_eq!((ids(&next), next.total), (vec![9], 3));
        let none = pipe.dead_page(5, None, 100).await.unwrap();
        assert_eq!((ids(&none), none.total), (vec![], 0));

        assert_eq!(pipe.redrive_session(SessionId(7)).await.unwrap(), Redriven { count: 1, remaining: 2 });
        assert_eq!(pipe.redrive_kind(1).await.unwrap(), Redriven { count: 2, remaining: 1 });
        let e = pipe.redrive_session(SessionId(5)).await.unwrap_err();
        assert_eq!(e, ClientError::Refused(RequestError::NotDead(SessionId(5))));
        assert_eq!(e.to_string(), "refused: session 5 is not in a dead-letter set");
        let e = pipe.redrive_kind(4).await.unwrap_err();
        assert_eq!(e, ClientError::Refused(RequestError::UnknownKind(Kind(4))));

        let reqs = server.requests();
        assert_eq!(
            reqs.iter().map(|r| r.2.clone()).collect::<Vec<_>>(),
            vec![
                Request::Redrive { target: RedriveTarget::Session(SessionId(7)) },
                Request::Redrive { target: RedriveTarget::Kind(Kind(1)) },
                Request::Redrive { target: RedriveTarget::Session(SessionId(5)) },
                Request::Redrive { target: RedriveTarget::Kind(Kind(4)) },
            ],
            "refusals are not retried"
        );
        assert!(reqs.iter().all(|r| r.1 == Seq(1)), "each redrive is the first request of its client");
        let clients: std::collections::HashSet<_> = reqs.iter().map(|r| r.0).collect();
        assert_eq!(clients.len(), 4, "each redrive has a client id of its own");
    }

    #[tokio::test]
    async fn a_redrive_is_retried_with_the_same_client_and_seq() {
        let is_redrive = |msg: &ClientMsg| matches!(msg, ClientMsg::Request { request: Request::Redrive { .. }, .. });
        let server =
            FakeServer::start(
                move |msg, seen| {
                    if is_redrive(msg) && seen == 0 {
                        Act::Drop
                    } else {
                        Act::Answer(ordinary(msg))
                    }
                },
            )
            .await;
        let pipe = pipe(&server, fast()).await;
        assert_eq!(pipe.redrive_kind(1).await.unwrap(), Redriven { count: 2, remaining: 1 });
        let reqs = server.requests();
        assert_eq!(reqs.len(), 2, "{reqs:?}");
        assert_eq!(reqs[0], reqs[1], "the retry repeats client, seq and request, so it moves no second batch");
        assert_eq!(server.connections.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn dead_queries_and_redrives_follow_the_leader_and_wait_while_it_recovers() {
        let follower = FakeServer::start(|msg, _| {
            let not_leader = RequestError::NotLeader { leader: Some(ReplicaId(2)) };
            Act::Answer(match msg {
                ClientMsg::Request { client, seq, .. } => {
                    ServerMsg::Reply { client: *client, seq: *seq, outcome: Err(not_leader) }
                }
                ClientMsg::Query { id, query: Query::Dead { .. } } => {
                    ServerMsg::QueryReply { id: *id, reply: QueryReply::Dead(Err(not_leader)) }
                }
                _ => ordinary(msg),
            })
        })
        .await;
        let leader = FakeServer::start(|msg, seen| match msg {
            ClientMsg::Query { id, query: Query::Dead { .. } } if seen == 0 => {
                Act::Answer(ServerMsg::QueryReply { id: *id, reply: QueryReply::Dead(Err(RequestError::NotReady)) })
            }
            _ => Act::Answer(ordinary(msg)),
        })
        .await;
        let options = fast();
        let pipe = Pipe::connect_with(Tcp, vec![format!("{},{}", follower.addr, leader.addr)], options).await.unwrap();
        assert_eq!(pipe.dead_page(1, None, 10).await.unwrap().total, 3);
        assert_eq!(pipe.redrive_session(SessionId(8)).await.unwrap(), Redriven { count: 1, remaining: 2 });

        let dead_queries =
            |s: &FakeServer| s.log.lock().unwrap().iter().filter(|m| matches!(m, ClientMsg::Query { .. })).count();
        assert_eq!(dead_queries(&follower), 1, "the follower's refusal sends the pipe on to the next member");
        assert!(follower.requests().is_empty(), "and it stays with the leader");
        assert_eq!(dead_queries(&leader), 2, "NotReady is retried");
        assert_eq!(leader.requests().len(), 1);
    }

    #[tokio::test]
    async fn no_answer_at_all_is_a_timeout_that_says_the_outcome_is_unknown() {
        let server =
            FakeServer::start(|msg, _| if is_append(msg) { Act::Ignore } else { Act::Answer(ordinary(msg)) }).await;
        let options = ClientOptions { retry_for: Duration::from_millis(1_000), ..fast() };
        let pipe = pipe(&server, options).await;
        let mut s = pipe.new(1).await.unwrap();
        let e = s.append(b"x".to_vec()).await.unwrap_err();
        match &e {
            ClientError::Timeout { waited_ms } => assert!((1_000..3_000).contains(waited_ms), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("may or may not have been applied"));
        let reqs = server.requests();
        assert!(reqs.len() >= 3, "retried: {reqs:?}");
        assert!(reqs[1..].iter().all(|r| *r == reqs[1]));
    }

    #[tokio::test]
    async fn unreachable_servers_are_connect_errors() {
        // A port that was just free: bind, note it, close.
        let addr = {
            let l = Tcp.bind("127.0.0.1:0").await.unwrap();
            Tcp.local_addr(&l).unwrap().to_string()
        };
        let options = ClientOptions { retry_for: Duration::from_millis(300), ..fast() };
        let e = Pipe::connect_with(Tcp, vec![format!("{addr}, {addr}")], options.clone()).await.unwrap_err();
        match &e {
            ClientError::Connect { addrs, .. } => assert_eq!(*addrs, format!("{addr},{addr}")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(Pipe::connect(" , ").await, Err(ClientError::Connect { .. })));

        // The first address is dead, the second works.
        let server = FakeServer::start(|msg, _| Act::Answer(ordinary(msg))).await;
        let pipe = Pipe::connect(&format!("{addr},{}", server.addr)).await.unwrap();
        pipe.new(1).await.unwrap();
    }

    #[tokio::test]
    async fn a_server_that_starts_late_is_waited_for_within_the_timeout() {
        let addr = {
            let l = Tcp.bind("127.0.0.1:0").await.unwrap();
            Tcp.local_addr(&l).unwrap().to_string()
        };
        let late = addr.clone();
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            FakeServer::start_on(&late, |msg, _| Act::Answer(ordinary(msg))).await
        });
        let options = ClientOptions { retry_for: Duration::from_secs(5), ..fast() };
        let pipe = Pipe::connect_with(Tcp, vec![addr], options).await.expect("connected once it listened");
        pipe.new(1).await.unwrap();
        drop(server.await.unwrap());
    }

    #[tokio::test]
    async fn a_member_that_accepts_but_never_says_hello_is_left_after_the_connect_timeout() {
        // The kernel accepts for a paused process: a listener nobody reads from.
        let silent = Tcp.bind("127.0.0.1:0").await.unwrap();
        let silent_addr = Tcp.local_addr(&silent).unwrap().to_string();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = Tcp.accept(&silent).await {
                held.push(stream);
            }
        });
        let server = FakeServer::start(|msg, _| Act::Answer(ordinary(msg))).await;
        // The silent member is tried first, and alone for the stagger; then the next beside it.
        let options = ClientOptions { connect_timeout: Duration::from_secs(3), ..fast() };
        let started = Instant::now();
        let pipe = Pipe::connect_with(Tcp, vec![silent_addr.clone(), server.addr.clone()], options).await.unwrap();
        pipe.new(1).await.unwrap();
        let took = started.elapsed();
        assert!(took >= CONNECT_STAGGER, "it did give the silent member the stagger first: {took:?}");
        assert!(took < Duration::from_millis(1_500), "and did not wait for its connect timeout: {took:?}");
        assert_eq!(server.requests().len(), 1);

        // Alone, it is given up on after the connect timeout, with a reason that says so.
        let options = ClientOptions {
            connect_timeout: Duration::from_millis(200),
            retry_for: Duration::from_millis(300),
            ..fast()
        };
        match Pipe::connect_with(Tcp, vec![silent_addr], options).await {
            Err(ClientError::Connect { reason, .. }) => assert!(reason.contains("no hello within 200 ms"), "{reason}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        holder.abort();
    }

    #[tokio::test]
    async fn a_not_leader_hint_leads_to_a_member_the_pipe_was_not_given() {
        let leader = FakeServer::start(|msg, _| Act::Answer(ordinary(msg))).await;
        let follower = FakeServer::start(|msg, _| match msg {
            ClientMsg::Request { client, seq, .. } => Act::Answer(ServerMsg::Reply {
                client: *client,
                seq: *seq,
                outcome: Err(RequestError::NotLeader { leader: Some(ReplicaId(2)) }),
            }),
            _ => Act::Answer(ordinary(msg)),
        })
        .await;
        let members = vec![
            MemberAddr { id: ReplicaId(1), client: follower.addr.clone() },
            MemberAddr { id: ReplicaId(2), client: leader.addr.clone() },
        ];
        let hello = ServerMsg::Hello(Hello {
            protocol: wire::CLIENT_PROTOCOL_VERSION,
            cluster: 1,
            member: ReplicaId(1),
            leader: Some(ReplicaId(2)),
            members,
        });
        *follower.hello.lock().unwrap() = hello.clone();
        *leader.hello.lock().unwrap() = hello;
        let pipe = pipe(&follower, fast()).await;
        pipe.new(1).await.expect("the follower's hint and hello lead to the leader");
        assert_eq!(follower.requests().len(), 1, "refused once");
        assert_eq!(leader.requests().len(), 1, "then served by the leader it named");

        // Told to stay on the addresses given, it does not go there.
        let alone = ClientOptions { learn_members: false, retry_for: Duration::from_millis(300), ..fast() };
        let pipe = Pipe::connect_with(Tcp, vec![follower.addr.clone()], alone).await.unwrap();
        assert!(pipe.new(1).await.is_err());
        assert_eq!(leader.requests().len(), 1);
    }

    #[tokio::test]
    async fn a_server_gone_for_good_before_sending_is_a_connect_error() {
        let server = FakeServer::start(|msg, _| Act::Answer(ordinary(msg))).await;
        let options = ClientOptions { retry_for: Duration::from_millis(500), ..fast() };
        let pipe = pipe(&server, options).await;
        let addr = server.addr.clone();
        drop(server);
        // Wait for the server's side to be gone; the pipe notices its connection closing.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let e = pipe.new(1).await.unwrap_err();
        // The connection may look alive until the first write; either way the outcome is stated.
        match e {
            ClientError::Connect { addrs, .. } => assert_eq!(addrs, addr),
            ClientError::Timeout { .. } => {}
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_server_error_breaks_the_connection_and_an_oversized_frame_fails() {
        let server = FakeServer::start(|msg, seen| match msg {
            ClientMsg::Request { request: Request::Append { record, .. }, .. } if record.len() > 100 => {
                let len = wire::encode(msg).len() as u32 - wire::FRAME_HEADER_LEN as u32;
                Act::Answer(ServerMsg::Error { error: WireError::FrameTooLarge { len, max: 100 } })
            }
            _ if is_append(msg) && seen == 0 => Act::Answer(ServerMsg::Error { error: WireError::ShuttingDown }),
            _ => Act::Answer(ordinary(msg)),
        })
        .await;
        let pipe = pipe(&server, fast()).await;
        let mut s = pipe.new(1).await.unwrap();
        s.append(b"small".to_vec()).await.unwrap();
        let e = s.append(vec![0u8; 500]).await.unwrap_err();
        assert!(matches!(e, ClientError::Protocol(_)), "{e}");
        assert_eq!(server.connections.load(Ordering::Relaxed), 2);
    }
}
