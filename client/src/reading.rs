//! The reading side of the client library: [`Tail`] (every committed entry's events, in order),
//! [`Watch`] (a resync of the sessions, then their changes, acknowledged by the application) and
//! [`Consumer`] (a tail from a checkpoint, and commits of the checkpoint with the session
//! operations its processing produced, as one entry).
//!
//! ```no_run
//! # async fn demo() -> Result<(), truba_client::client::ClientError> {
//! use truba_client::client::{Pipe, TailItem};
//! use truba_engine::{Filter, Index, TailFrom};
//! let pipe = Pipe::connect("127.0.0.1:7401,127.0.0.1:7402,127.0.0.1:7403").await?;
//! let mut tail = pipe.tail(TailFrom::Index(Index(1)), Filter::default());
//! while let Some(item) = tail.next().await {
//!     if let TailItem::Entry(entry) = item? {
//!         println!("{} {:?}", entry.index.0, entry.events);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! How a reader's stream travels:
//! - Each tail or watch has a TCP connection of its own, to one member: any member serves
//!   streams from its own ledger, while the pipe's shared connection follows the leader, and a
//!   reader that takes its time does not hold up the pipe's requests behind its items.
//! - The server sends at most a window of items the reader has not acknowledged. A tail
//!   acknowledges an item once the application has asked for what follows it, so the window
//!   follows the application, not the socket; a watch acknowledges what the application
//!   declared done ([`Watch::done`]).
//! - When the connection breaks, the member stops, or the server ends the stream for a reason
//!   that another attempt can cure (shutting down, recovering, damage in its copy), the reader
//!   opens the stream again at the next member, from just after what it had delivered (a tail)
//!   or acknowledged (a watch): nothing is skipped and nothing repeated. A member that has not
//!   yet got that far (`BeyondHead`) is tried again with backoff. After
//!   [`ClientOptions::retry_for`] without an item the reader gives up with an error.
//! - `next()` is cancel-safe: the reader keeps the bytes of a frame read half way, and of an
//!   acknowledgement written half way, for the next call.

use crate::client::{ClientError, ClientOptions, Pipe};
use crate::net::{Tcp, Transport};
use crate::wire::{self, ClientMsg, ServerMsg, StreamRefusal};
use rand_core::{OsRng, RngCore};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;
use truba_engine::{
    Audit, ClientId, CommitOp, ConsumerCommit, Filter, Index, Kind, LedgerEntry, Reply, Request, Seq, SessionBrief,
    SessionId, SessionSnapshot, StreamError, StreamItem, StreamOpen, TailFrom, What,
};

/// The number each reader gives its stream on its own connection (it has only that one).
const STREAM: u64 = 1;
/// Backoff between attempts to open a stream again: doubles from min to max, with jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// A stream open this long before it was lost counts as having been healthy.
const STABLE: Duration = Duration::from_secs(1);
/// Received bytes already decoded are dropped from the front of the buffer once this many.
const COMPACT_BYTES: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// One connection to one member, with buffers that make reads and writes cancel-safe.

struct Link<S> {
    addr: String,
    reader: ReadHalf<S>,
    writer: WriteHalf<S>,
    /// Bytes received; those before `start` are decoded already.
    inbuf: Vec<u8>,
    start: usize,
    /// Frames not yet written.
    outbuf: Vec<u8>,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Link<S> {
    fn new(stream: S, addr: String) -> Link<S> {
        let (reader, writer) = tokio::io::split(stream);
        Link { addr, reader, writer, inbuf: Vec::new(), start: 0, outbuf: Vec::new() }
    }

    fn queue(&mut self, msg: &ClientMsg) {
        self.outbuf.extend_from_slice(&wire::encode(msg));
    }

    /// Writes what is queued. Only as much as was written leaves the buffer, so a call cut off
    /// half way loses nothing.
    async fn flush(&mut self, timeout: Duration) -> Result<(), String> {
        while !self.outbuf.is_empty() {
            match tokio::time::timeout(timeout, self.writer.write(&self.outbuf)).await {
                Ok(Ok(0)) => return Err("the connection closed".into()),
                Ok(Ok(n)) => drop(self.outbuf.drain(..n)),
                Ok(Err(e)) => return Err(format!("write failed: {e}")),
                Err(_) => return Err(format!("a write blocked for {} ms", timeout.as_millis())),
            }
        }
        Ok(())
    }

    /// The next message from the server (writing what is queued first).
    async fn recv(&mut self, max: u32, timeout: Duration) -> Result<ServerMsg, String> {
        self.flush(timeout).await?;
        loop {
            match wire::decode_frame::<ServerMsg>(&self.inbuf[self.start..], max) {
                Ok(Some((msg, len))) => {
                    self.start += len;
                    if self.start == self.inbuf.len() {
                        self.inbuf.clear();
                        self.start = 0;
                    } else if self.start >= COMPACT_BYTES {
                        self.inbuf.drain(..self.start);
                        self.start = 0;
                    }
                    return Ok(msg);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("a bad frame from the server: {e}")),
            }
            self.inbuf.reserve(64 * 1024);
            match self.reader.read_buf(&mut self.inbuf).await {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("reading from the server: {e}")),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connections to the members, in turn, and the bounded patience between them.

struct Members<T: Transport> {
    transport: T,
    addrs: Vec<String>,
    /// The member to try first next time.
    at: usize,
    options: ClientOptions,
    link: Option<Link<T::Stream>>,
    /// When the current connection was opened.
    opened: Instant,
    /// Since when no item has come, and the last problem (the error given if it lasts past
    /// `retry_for`).
    trouble: Option<(Instant, ClientError)>,
    backoff: Duration,
}

impl<T: Transport> Members<T> {
    fn new(pipe: &Pipe<T>) -> Members<T> {
        Members {
            transport: pipe.transport().clone(),
            addrs: pipe.addrs().to_vec(),
            at: 0,
            options: pipe.options().clone(),
            link: None,
            opened: Instant::now(),
            trouble: None,
            backoff: BACKOFF_MIN,
        }
    }

    /// Connects to the first member that answers, starting with the one due, and asks it to
    /// open the stream.
    async fn open(&mut self, open: StreamOpen) -> Result<(), String> {
        let n = self.addrs.len();
        let mut problems = Vec::new();
        for k in 0..n {
            let i = (self.at + k) % n;
            let addr = &self.addrs[i];
            let (timeout, max) = (self.options.connect_timeout, self.options.frame_bytes_max);
            let token = self.options.token.as_deref();
            match crate::client::connect_member(&self.transport, addr, timeout, max, token).await {
                Ok((stream, _hello)) => {
                    self.at = i;
                    let mut link = Link::new(stream, addr.clone());
                    link.queue(&ClientMsg::StreamOpen { stream: STREAM, open });
                    tracing::debug!(%addr, "stream opened");
                    self.link = Some(link);
                    self.opened = Instant::now();
                    return Ok(());
                }
                Err(e) => problems.push(format!("{addr}: {e}")),
            }
        }
        Err(problems.join("; "))
    }

    /// The stream was lost (or must be opened again elsewhere): the next attempt starts with the
    /// next member.
    fn lost(&mut self, problem: ClientError) {
        if let Some(link) = self.link.take() {
            tracing::debug!(addr = %link.addr, %problem, "stream lost; going on at the next member");
            self.at = (self.at + 1) % self.addrs.len();
            // A stream that was open a while (a quiet one brings no items) had no trouble
            // before this: the patience starts again. A member that ends the stream as soon as
            // it is opened (it has not got that far yet, say) does not reset it.
            if self.opened.elapsed() >= STABLE {
                self.trouble = None;
            }
        }
        match &mut self.trouble {
            Some((_, last)) => *last = problem,
            None => self.trouble = Some((Instant::now(), problem)),
        }
    }

    /// An item came: the stream is healthy again.
    fn healthy(&mut self) {
        self.trouble = None;
        self.backoff = BACKOFF_MIN;
    }

    /// Waits before the next attempt; the error to give up with once there has been trouble
    /// for longer than `retry_for`.
    async fn pause(&mut self) -> Result<(), ClientError> {
        let Some((since, problem)) = &self.trouble else { return Ok(()) };
        if since.elapsed() >= self.options.retry_for {
            return Err(problem.clone());
        }
        let half = self.backoff.as_micros() as u64 / 2;
        let pause = self.backoff + Duration::from_micros(if half == 0 { 0 } else { OsRng.next_u64() % half });
        tokio::time::sleep(pause).await;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        Ok(())
    }

    fn connect_error(&self, reason: String) -> ClientError {
        ClientError::Connect { addrs: self.addrs.join(","), reason }
    }

    /// Queues an acknowledgement and writes it out (a failure is noticed by the next read).
    async fn ack(&mut self, seq: u64, error: Option<String>) {
        let timeout = self.options.request_timeout;
        if let Some(link) = self.link.as_mut() {
            link.queue(&ClientMsg::StreamAck { stream: STREAM, seq, error });
            let _ = link.flush(timeout).await;
        }
    }
}

/// What a reader does with a stream's end.
enum Ending {
    /// Open it again at the next member (the condition is this member's, or passing).
    Again(ClientError),
    /// Give up: the application gets this error.
    Fail(ClientError),
}

/// Whether opening the stream again (elsewhere, or after a pause) may cure `e`. A member that
/// has not got as far as the reader (`BeyondHead`) is retried only once the reader has got
/// somewhere: asking for an index past the head at the start is the caller's mistake.
fn ending(e: StreamError, resuming: bool) -> Ending {
    let again = match e {
        StreamError::Stopped
        | StreamError::NotReady
        | StreamError::Damaged { .. }
        | StreamError::TooManyStreams { .. } => true,
        StreamError::BeyondHead { .. } => resuming,
        _ => false,
    };
    if again {
        Ending::Again(ClientError::Stream(e))
    } else {
        Ending::Fail(ClientError::Stream(e))
    }
}

/// A refusal of the reader's own stream message. An acknowledgement that crossed the stream's
/// end is refused harmlessly; a refused open is the caller's mistake.
fn refused(refusal: StreamRefusal) -> Result<(), ClientError> {
    match refusal {
        StreamRefusal::NotOpen | StreamRefusal::AckBeyondSent { .. } => {
            tracing::debug!(%refusal, "a stream message was refused");
            Ok(())
        }
        refusal => Err(ClientError::StreamRefused(refusal)),
    }
}

// ---------------------------------------------------------------------------------------------
// Tails.

/// What a tail delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TailItem {
    /// A committed entry with the events the filter let through.
    Entry(LedgerEntry),
    /// Every entry through `through` has been looked at, and nothing more matched.
    Progress { through: Index },
}

/// One part of a received item, ready for the application.
struct TailPart {
    item: TailItem,
    /// The stream item it came in, if it is that item's last part.
    completes: Option<u64>,
    /// Where the tail resumes once the application has this part.
    resume_from: Index,
    /// The entry's encoded size, as the server sent it (0 for a progress mark).
    bytes: u64,
}

/// A tail of the ledger ([`Pipe::tail`]). [`Tail::next`] gives the entries one at a time, and
/// `None` once the tail has ended with an error it returned.
pub struct Tail<T: Transport = Tcp> {
    members: Members<T>,
    filter: Filter,
    /// Where to open the stream: the start asked for until something was delivered, then just
    /// after the last thing delivered.
    from: TailFrom,
    /// Something was delivered (or the start is a position reached before, a consumer's).
    resuming: bool,
    ready: VecDeque<TailPart>,
    /// The part the application got last: processed once it asks for the next.
    handed: Option<(Option<u64>, Index)>,
    /// Of the current stream: the next item's number, the last item the application processed
    /// whole, and the last acknowledged.
    expect: u64,
    processed: u64,
    acked: u64,
    ended: bool,
    /// Encoded bytes of the entries handed to the application so far.
    entry_bytes: u64,
}

impl<T: Transport> Tail<T> {
    pub(crate) fn new(pipe: &Pipe<T>, from: TailFrom, filter: Filter, resuming: bool) -> Tail<T> {
        Tail {
            members: Members::new(pipe),
            filter,
            from,
            resuming,
            ready: VecDeque::new(),
            handed: None,
            expect: 1,
            processed: 0,
            acked: 0,
            ended: false,
            entry_bytes: 0,
        }
    }

    /// Bytes of the entries this tail has handed to the application so far, as the server sent
    /// them (encoded, before decoding): what a reader's throughput is measured in.
    pub fn entry_bytes(&self) -> u64 {
        self.entry_bytes
    }

    /// The index the tail would go on from if it were opened again: one past the last entry (or
    /// progress mark) delivered, once something was.
    pub fn position(&self) -> Option<Index> {
        let from = match self.handed {
            Some((_, resume)) => resume,
            None => match self.from {
                TailFrom::Index(i) if self.resuming => i,
                _ => return None,
            },
        };
        Some(from.prev())
    }

    /// The member the tail reads from now, if it is connected.
    pub fn member(&self) -> Option<&str> {
        self.members.link.as_ref().map(|l| l.addr.as_str())
    }

    /// The next entry (or progress mark). Items the application got before are taken as
    /// processed, and acknowledged, when it asks for the next one. Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<TailItem, ClientError>> {
        if self.ended {
            return None;
        }
        if let Some((completes, resume)) = self.handed.take() {
            self.from = TailFrom::Index(resume);
            self.resuming = true;
            if let Some(seq) = completes {
                self.processed = seq;
            }
        }
        loop {
            if let Some(part) = self.ready.pop_front() {
                self.handed = Some((part.completes, part.resume_from));
                self.entry_bytes += part.bytes;
                return Some(Ok(part.item));
            }
            match self.receive().await {
                Ok(()) => {}
                Err(e) => {
                    self.ended = true;
                    return Some(Err(e));
                }
            }
        }
    }

    /// Reads the next item from the stream into `ready` (opening it first if it is not open,
    /// and acknowledging what the application has processed), or gives up.
    async fn receive(&mut self) -> Result<(), ClientError> {
        if self.members.link.is_none() {
            self.members.pause().await?;
            self.expect = 1;
            self.processed = 0;
            self.acked = 0;
            let open = StreamOpen::Tail { from: self.from, filter: self.filter.clone() };
            if let Err(reason) = self.members.open(open).await {
                let e = self.members.connect_error(reason);
                self.members.lost(e);
                return Ok(());
            }
        }
        let link = self.members.link.as_mut().expect("opened above");
        if self.processed > self.acked {
            link.queue(&ClientMsg::StreamAck { stream: STREAM, seq: self.processed, error: None });
            self.acked = self.processed;
        }
        let (max, timeout) = (self.members.options.frame_bytes_max, self.members.options.request_timeout);
        let msg = match link.recv(max, timeout).await {
            Ok(msg) => msg,
            Err(reason) => {
                let e = self.members.connect_error(reason);
                self.members.lost(e);
                return Ok(());
            }
        };
        match msg {
            ServerMsg::Stream { stream: STREAM, seq, item } => {
                if seq != self.expect {
                    let e =
                        ClientError::Protocol(format!("item {seq} of the stream came where {} was due", self.expect));
                    self.members.lost(e);
                    return Ok(());
                }
                self.expect += 1;
                self.on_item(seq, item)
            }
            ServerMsg::StreamEnded { stream: STREAM, reason } => {
                self.members.lost(ClientError::Protocol(reason.to_string()));
                Ok(())
            }
            ServerMsg::StreamRefused { stream: STREAM, refusal } => refused(refusal),
            ServerMsg::Error { error } => {
                self.members.lost(ClientError::Protocol(format!("the server closed the connection: {error}")));
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn on_item(&mut self, seq: u64, item: StreamItem) -> Result<(), ClientError> {
        // Everything handed out is processed by now (this runs only once `ready` is empty), so
        // `from` is just after the last thing delivered.
        let delivered = match self.from {
            TailFrom::Index(i) if self.resuming => i,
            _ => Index(0),
        };
        match item {
            StreamItem::Entries { entries, through, .. } => {
                self.members.healthy();
                let mut parts = Vec::with_capacity(entries.len());
                for bytes in &entries {
                    let entry = postcard::from_bytes::<LedgerEntry>(bytes)
                        .map_err(|e| ClientError::Protocol(format!("an entry that does not decode: {e}")))?;
                    // Never again what was delivered before the stream was opened again.
                    if entry.index >= delivered {
                        let resume_from = entry.index.next();
                        let bytes = bytes.len() as u64;
                        parts.push(TailPart { item: TailItem::Entry(entry), completes: None, resume_from, bytes });
                    }
                }
                match parts.last_mut() {
                    Some(last) => {
                        last.completes = Some(seq);
                        last.resume_from = through.next();
                        self.ready.extend(parts);
                    }
                    None => self.ready.push_back(TailPart {
                        item: TailItem::Progress { through },
                        completes: Some(seq),
                        resume_from: through.next(),
                        bytes: 0,
                    }),
                }
                Ok(())
            }
            StreamItem::Progress { through } => {
                self.members.healthy();
                let part = TailPart {
                    item: TailItem::Progress { through },
                    completes: Some(seq),
                    resume_from: through.next(),
                    bytes: 0,
                };
                self.ready.push_back(part);
                Ok(())
            }
            StreamItem::End(e) => match ending(e, self.resuming) {
                Ending::Again(e) => {
                    self.members.lost(e);
                    Ok(())
                }
                Ending::Fail(e) => Err(e),
            },
            other => Err(ClientError::Protocol(format!("a watch's item on a tail: {other:?}"))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Watches.

/// How a watch starts ([`Pipe::watch`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchOptions {
    /// The kinds whose sessions to watch (every kind if empty).
    pub kinds: Vec<Kind>,
    /// The last index this watcher acknowledged before, whose state it kept: the changes after
    /// it follow without a resync if the member still holds them (a resync starts over if not).
    pub resume_after: Option<Index>,
    /// Events sent and not yet acknowledged, at most (the server's limit if larger or absent;
    /// 0 is refused).
    pub window: Option<u32>,
}

/// What a watch delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchItem {
    /// A resync begins, consistent at index `at`: drop every session held; the live ones follow.
    ResyncStart { at: Index },
    /// A session of the resync.
    Session(SessionSnapshot),
    /// The resync is complete; changes after `at` follow.
    Synced { at: Index },
    /// A session changed.
    Change(Change),
}

/// One session's change, from an event of a committed entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The entry's index (the change's revision) and the session and its kind.
    pub index: Index,
    pub session: SessionId,
    pub kind: Kind,
    /// What happened; its records for a creation, an append or a replace (see
    /// [`Change::records`]).
    pub what: What,
    /// The session's state before and after (none before a creation, none after a deletion).
    pub before: Option<SessionBrief>,
    pub after: Option<SessionBrief>,
    /// The entry's audit: when the leader proposed it, and for a client's request, who asked.
    pub audit: Audit,
}

/// How a change touched a session's records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Records<'a> {
    Unchanged,
    /// These were added at the end (a creation's first records, or one append).
    Added(&'a [Vec<u8>]),
    /// Every record was dropped and this one kept.
    Replaced(&'a [u8]),
}

impl Change {
    pub fn records(&self) -> Records<'_> {
        match &self.what {
            What::Created { records } => Records::Added(records),
            What::Appended { record } => Records::Added(std::slice::from_ref(record)),
            What::Replaced { record } => Records::Replaced(record),
            _ => Records::Unchanged,
        }
    }
}

/// How far a watcher has acknowledged: what it would resume from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Position {
    /// A resync was acknowledged through its sync marker (changes, not a resync, follow).
    synced: bool,
    /// Every change through this index is acknowledged ...
    after: Option<Index>,
    /// ... and this many events of the entry just after it.
    skip: u32,
}

struct WatchPart {
    /// `None` for what the application is not shown (progress marks, the sync marker of a
    /// resume): acknowledged with what comes before it.
    item: Option<WatchItem>,
    /// The stream item it came in, if it is that item's last part.
    completes: Option<u64>,
    /// Where the watcher stands once this part is acknowledged.
    position: Position,
}

/// A watch of sessions ([`Pipe::watch`]). [`Watch::next`] gives the resync's sessions, then
/// changes; [`Watch::done`] acknowledges everything delivered so far (the server sends at most
/// a window of events not acknowledged). After a reconnect the watch resumes after the last
/// acknowledged change, so what was delivered and not acknowledged comes again, and a resync
/// starts over (with [`WatchItem::ResyncStart`]) if the member no longer holds those changes.
pub struct Watch<T: Transport = Tcp> {
    members: Members<T>,
    kinds: Vec<Kind>,
    window: Option<u32>,
    /// What the application acknowledged.
    position: Position,
    ready: VecDeque<WatchPart>,
    /// Parts handed to the application and not yet acknowledged, oldest first.
    handed: VecDeque<(Option<u64>, Position)>,
    /// Of the current stream: the next item's number, and the last acknowledged.
    expect: u64,
    acked: u64,
    /// The current stream resumed after `position` (its sync marker is not shown).
    resumed: bool,
    ended: bool,
}

impl<T: Transport> Watch<T> {
    pub(crate) fn new(pipe: &Pipe<T>, options: WatchOptions) -> Watch<T> {
        let position = Position { synced: options.resume_after.is_some(), after: options.resume_after, skip: 0 };
        Watch {
            members: Members::new(pipe),
            kinds: options.kinds,
            window: options.window,
            position,
            ready: VecDeque::new(),
            handed: VecDeque::new(),
            expect: 1,
            acked: 0,
            resumed: false,
            ended: false,
        }
    }

    /// The last index whose changes are all acknowledged (what a resume would go on after),
    /// once a resync was acknowledged through its sync marker.
    pub fn acknowledged(&self) -> Option<Index> {
        self.position.synced.then_some(self.position.after).flatten()
    }

    /// The member the watch reads from now, if it is connected.
    pub fn member(&self) -> Option<&str> {
        self.members.link.as_ref().map(|l| l.addr.as_str())
    }

    /// The next resync session or change. Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<WatchItem, ClientError>> {
        if self.ended {
            return None;
        }
        loop {
            if let Some(part) = self.ready.pop_front() {
                let nothing_pending = self.handed.is_empty();
                self.handed.push_back((part.completes, part.position));
                match part.item {
                    Some(item) => return Some(Ok(item)),
                    // Not shown: acknowledged at once if the application is up to date,
                    // otherwise with what it acknowledges next.
                    None if nothing_pending => self.done(Ok(())).await,
                    None => {}
                }
                continue;
            }
            if let Err(e) = self.receive().await {
                self.ended = true;
                return Some(Err(e));
            }
        }
    }

    /// Acknowledges everything delivered so far: processed (`Ok`), or failed with this text
    /// (datasync's `done(err)`: the server keeps it for operators, and the watch goes on).
    pub async fn done(&mut self, result: Result<(), String>) {
        let mut seq = None;
        while let Some((completes, position)) = self.handed.pop_front() {
            self.position = position;
            seq = completes.or(seq);
        }
        let error = result.err();
        let seq = seq.unwrap_or(self.acked).max(self.acked);
        if seq > self.acked || error.is_some() {
            self.acked = seq;
            self.members.ack(seq, error).await;
        }
    }

    async fn receive(&mut self) -> Result<(), ClientError> {
        if self.members.link.is_none() {
            self.members.pause().await?;
            // What was handed and not acknowledged comes again after the resume.
            self.handed.clear();
            self.expect = 1;
            self.acked = 0;
            let resume_after = if self.position.synced { self.position.after } else { None };
            self.resumed = resume_after.is_some();
            let open = StreamOpen::Watch { kinds: self.kinds.clone(), resume_after, window: self.window };
            if let Err(reason) = self.members.open(open).await {
                let e = self.members.connect_error(reason);
                self.members.lost(e);
                return Ok(());
            }
        }
        let link = self.members.link.as_mut().expect("opened above");
        let (max, timeout) = (self.members.options.frame_bytes_max, self.members.options.request_timeout);
        let msg = match link.recv(max, timeout).await {
            Ok(msg) => msg,
            Err(reason) => {
                let e = self.members.connect_error(reason);
                self.members.lost(e);
                return Ok(());
            }
        };
        match msg {
            ServerMsg::Stream { stream: STREAM, seq, item } => {
                if seq != self.expect {
                    let e =
                        ClientError::Protocol(format!("item {seq} of the stream came where {} was due", self.expect));
                    self.members.lost(e);
                    return Ok(());
                }
                self.expect += 1;
                self.on_item(seq, item)
            }
            ServerMsg::StreamEnded { stream: STREAM, reason } => {
                self.members.lost(ClientError::Protocol(reason.to_string()));
                Ok(())
            }
            ServerMsg::StreamRefused { stream: STREAM, refusal } => refused(refusal),
            ServerMsg::Error { error } => {
                self.members.lost(ClientError::Protocol(format!("the server closed the connection: {error}")));
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The position the last part received leaves the watcher at once acknowledged.
    fn last_position(&self) -> Position {
        self.ready.back().map(|p| p.position).or(self.handed.back().map(|h| h.1)).unwrap_or(self.position)
    }

    fn on_item(&mut self, seq: u64, item: StreamItem) -> Result<(), ClientError> {
        let visible = |item| WatchPart { item: Some(item), completes: Some(seq), position: Position::default() };
        match item {
            StreamItem::ResyncStart { at } => {
                self.members.healthy();
                self.ready.push_back(visible(WatchItem::ResyncStart { at }));
            }
            StreamItem::Resync { sessions } => {
                self.members.healthy();
                let n = sessions.len();
                for (i, session) in sessions.into_iter().enumerate() {
                    let completes = (i + 1 == n).then_some(seq);
                    self.ready.push_back(WatchPart {
                        item: Some(WatchItem::Session(session)),
                        completes,
                        position: Position::default(),
                    });
                }
                if n == 0 {
                    self.ready.push_back(WatchPart { item: None, completes: Some(seq), position: Position::default() });
                }
            }
            StreamItem::Synced { at } => {
                self.members.healthy();
                if self.resumed && seq == 1 {
                    // A resume: the application holds the state already.
                    let position = Position { synced: true, after: Some(at), skip: self.position.skip };
                    self.ready.push_back(WatchPart { item: None, completes: Some(seq), position });
                } else {
                    let position = Position { synced: true, after: Some(at), skip: 0 };
                    self.ready.push_back(WatchPart {
                        item: Some(WatchItem::Synced { at }),
                        completes: Some(seq),
                        position,
                    });
                }
            }
            StreamItem::Entries { entries, through, .. } => {
                self.members.healthy();
                let start = self.last_position();
                let mut parts = Vec::new();
                for bytes in &entries {
                    let entry = postcard::from_bytes::<LedgerEntry>(bytes)
                        .map_err(|e| ClientError::Protocol(format!("an entry that does not decode: {e}")))?;
                    // Events of an entry acknowledged in part before a resume are not shown again.
                    let skip = match start.after {
                        Some(a) if a.next() == entry.index => start.skip as usize,
                        Some(a) if entry.index <= a => entry.events.len(),
                        _ => 0,
                    };
                    let n = entry.events.len();
                    for (k, event) in entry.events.into_iter().enumerate().skip(skip) {
                        let position = if k + 1 < n {
                            Position { synced: true, after: Some(entry.index.prev()), skip: k as u32 + 1 }
                        } else {
                            Position { synced: true, after: Some(entry.index), skip: 0 }
                        };
                        let (Some(session), Some(kind)) = (event.session, event.kind) else {
                            return Err(ClientError::Protocol(format!("a watch's event of no session: {event:?}")));
                        };
                        let change = Change {
                            index: entry.index,
                            session,
                            kind,
                            what: event.what,
                            before: event.before,
                            after: event.after,
                            audit: entry.audit.clone(),
                        };
                        parts.push(WatchPart { item: Some(WatchItem::Change(change)), completes: None, position });
                    }
                }
                let end = Position { synced: true, after: Some(through), skip: 0 };
                match parts.last_mut() {
                    Some(last) => {
                        last.completes = Some(seq);
                        last.position = end;
                    }
                    None => parts.push(WatchPart { item: None, completes: Some(seq), position: end }),
                }
                self.ready.extend(parts);
            }
            StreamItem::Progress { through } => {
                self.members.healthy();
                let position = Position { synced: true, after: Some(through), skip: 0 };
                self.ready.push_back(WatchPart { item: None, completes: Some(seq), position });
            }
            StreamItem::End(e) => match ending(e, self.resumed) {
                Ending::Again(e) => self.members.lost(e),
                Ending::Fail(e) => return Err(e),
            },
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Consumers.

/// A named consumer of the ledger (gazette's consumer): it reads the events after its
/// checkpoint, and commits a new checkpoint together with the session operations its processing
/// produced, as one entry, so that a consumer that crashes mid-batch resumes from its checkpoint
/// and applies each batch's effects exactly once. Opening it fences every older opening of the
/// same name (their commits are refused with `StaleEpoch`).
///
/// ```no_run
/// # async fn demo(pipe: truba_client::client::Pipe) -> Result<(), truba_client::client::ClientError> {
/// use truba_client::client::{Consumer, TailItem};
/// use truba_engine::{CommitOp, Filter, Kind};
/// let mut consumer = Consumer::open(&pipe, "billing").await?;
/// let mut events = consumer.events(Filter { kinds: vec![Kind(1)], ..Filter::default() });
/// while let Some(item) = events.next().await {
///     if let TailItem::Entry(entry) = item? {
///         let op = CommitOp::New { kind: Kind(2), records: vec![b"invoice".to_vec()], store_s: None };
///         consumer.commit(entry.index, vec![op]).await?;
///     }
/// }
/// # Ok(()) }
/// ```
pub struct Consumer<T: Transport = Tcp> {
    pipe: Pipe<T>,
    name: String,
    epoch: u64,
    checkpoint: Index,
    /// Its requests' client id and next sequence number (a retry reuses both).
    client: ClientId,
    next_seq: u64,
}

impl<T: Transport> std::fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.name)
            .field("epoch", &self.epoch)
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}

impl<T: Transport> Consumer<T> {
    /// Opens the named consumer (creating it, with nothing processed, if it is new).
    pub async fn open(pipe: &Pipe<T>, name: &str) -> Result<Consumer<T>, ClientError> {
        let client = pipe.fresh_client_id();
        match pipe.request(client, Seq(1), Request::ConsumerOpen { consumer: name.into() }).await? {
            Reply::ConsumerOpened { epoch, through } => {
                Ok(Consumer { pipe: pipe.clone(), name: name.into(), epoch, checkpoint: through, client, next_seq: 2 })
            }
            other => Err(ClientError::Unexpected(format!("{other:?} to a consumer open"))),
        }
    }

    /// A consumer opened elsewhere (by a command line, say), named by the epoch its open
    /// returned. Its checkpoint is not known here ([`Consumer::checkpoint`] is 0 until it
    /// commits; [`Pipe::checkpoint`] reads it).
    pub fn at_epoch(pipe: &Pipe<T>, name: &str, epoch: u64) -> Consumer<T> {
        let client = pipe.fresh_client_id();
        Consumer { pipe: pipe.clone(), name: name.into(), epoch, checkpoint: Index(0), client, next_seq: 1 }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The epoch this opening holds.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Everything through this index is processed (as of the open, or this consumer's last
    /// commit).
    pub fn checkpoint(&self) -> Index {
        self.checkpoint
    }

    /// A tail of the events after the checkpoint.
    pub fn events(&self, filter: Filter) -> Tail<T> {
        Tail::new(&self.pipe, TailFrom::Index(self.checkpoint.next()), filter, true)
    }

    /// Records that everything through `through` is processed, with `ops` (applied in order,
    /// each session at most once), as one entry: all of it applies or none. The answers to
    /// `ops`, in order.
    pub async fn commit(&mut self, through: Index, ops: Vec<CommitOp>) -> Result<Vec<Reply>, ClientError> {
        let seq = Seq(self.next_seq);
        self.next_seq += 1;
        let commit = ConsumerCommit { consumer: self.name.clone(), epoch: self.epoch, through, ops };
        match self.pipe.request(self.client, seq, Request::ConsumerCommit(commit)).await? {
            Reply::Committed { through, results } => {
                self.checkpoint = through;
                Ok(results)
            }
            other => Err(ClientError::Unexpected(format!("{other:?} to a consumer commit"))),
        }
    }
}
