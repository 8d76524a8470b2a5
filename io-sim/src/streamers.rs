//! Simulated readers of the ledger: tailers, watchers, consumers and pipeline readers. Like the
//! clients in `workload.rs`, each is a state machine that the world drives: it is told about
//! stream items, replies and timers, and answers with [`SAction`]s the world carries out over
//! the simulated network. Everything they see goes into the history for the checkers
//! (`checkers/streams.rs`, `checkers/consumers.rs`).
//!
//! - A **tailer** tails some replica from the start, the oldest entry held, or the head, with a
//!   random filter; it acknowledges items after a while (sometimes it stalls), and when its
//!   stream breaks or ends it opens another, on another replica if the first one failed, from
//!   the index after the last it was shown (or from what is still held, if told its position
//!   was compacted away).
//! - A **watcher** watches some kinds with a small window, acknowledging (now and then with an
//!   error text) and resuming after the last index it acknowledged.
//! - A **consumer** opens its name (a new epoch), tails from its checkpoint, and for every
//!   creation of the consumed kind it sees commits the creation of one session of its own kind
//!   with the checkpoint, in batches. Some commits carry an operation that must be refused,
//!   which makes the whole commit refused; it sends it again without. Consumers crash, and some
//!   come back as two: once the new process has opened the name again, the old one still sends
//!   the commit it had under way (fenced by the new epoch, it must change nothing).
//! - A **pipeline reader** asks any replica to read a consumer through a session's creation.

use crate::history::Event;
use crate::scenario::StreamSetup;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use truba_engine::{
    Checkpoint, ClientId, CommitOp, ConsumerCommit, Filter, Index, Kind, LedgerEntry, Outcome, Query, Reply, Request,
    RequestError, Seq, StreamError, StreamItem, StreamOpen, TailFrom, What,
};

/// What a streamer asks the world to do.
#[derive(Debug)]
pub enum SAction {
    /// Open a stream on `replica` (the world numbers it and says so with `opened`).
    Open {
        replica: usize,
        open: StreamOpen,
    },
    /// Acknowledge the open stream's items through `seq`.
    Ack {
        seq: u64,
        error: Option<String>,
    },
    /// Close the open stream.
    Close,
    /// Send a request the way the client library does (to the leader, following redirects).
    Request {
        client: ClientId,
        seq: Seq,
        request: Request,
    },
    /// Ask `replica` a query (its answer comes back with `on_read_through`, with `question`).
    Query {
        replica: usize,
        question: u64,
        query: Query,
    },
    /// A pipeline reader is ready for its next question (the world picks it).
    WantsReadThrough,
    Wake {
        at_us: u64,
        token: u64,
    },
    Record(Event),
}

#[derive(Debug)]
enum Role {
    Tailer { from: TailFrom, filter: Filter },
    Watcher { kinds: Vec<Kind>, window: u32, resume_after: Option<Index> },
    Consumer(Box<ConsumerRole>),
    Pipeline { asking: Option<u64> },
}

/// A consumer process's state.
#[derive(Debug, Default)]
struct ConsumerRole {
    name: String,
    /// The epoch this process opened the name at, once it has.
    epoch: Option<u64>,
    /// Creations seen and not yet committed, and the highest index the stream covered.
    batch: Vec<Index>,
    through: Index,
    /// The checkpoint committed last.
    committed: Index,
    /// The request under way: its sequence number and the request.
    pending: Option<(u64, Request)>,
    /// The last commit this process sent (answered or not): after a crash, the old process may
    /// send it again once the new one has opened the name (a paused process waking up).
    last_commit: Option<Request>,
    zombie: Option<Request>,
    batch_started_us: u64,
}

#[derive(Debug)]
pub struct Streamer {
    pub index: u32,
    role: Role,
    setup: StreamSetup,
    rng: ChaCha8Rng,
    pub replica: usize,
    replicas: usize,
    /// The open stream's number as the world gave it (0: none).
    pub stream: u64,
    /// The last item number received on the open stream, and the last acknowledged.
    received: u64,
    acked: u64,
    /// The index each received item covers, by number (a watcher resumes after the last one
    /// it acknowledged).
    covers: Vec<(u64, Index)>,
    /// The index after the last one shown (where a tail resumes).
    next: Option<Index>,
    stalled_until_us: u64,
    ack_scheduled: bool,
    /// Client ids: `client_base + incarnation`.
    client_base: u64,
    incarnation: u64,
    seq: u64,
    wake_token: u64,
    crashed: bool,
}

/// A wake-up's purpose is told by its token's two low bits; the rest numbers it.
const WAKE_ACK: u64 = 0;
const WAKE_OPEN: u64 = 1;
const WAKE_WORK: u64 = 2;
const WAKE_GIVE_UP: u64 = 3;

impl Streamer {
    pub fn tailer(index: u32, replicas: usize, kinds: &[Kind], setup: &StreamSetup, mut rng: ChaCha8Rng) -> Streamer {
        let from = match rng.gen_range(0..4) {
            0 => TailFrom::Oldest,
            1 => TailFrom::Next,
            _ => TailFrom::Index(Index(1)),
        };
        let filter = Filter { kinds: pick_kinds(&mut rng, kinds), internal: rng.gen_bool(0.3), sessions_only: false };
        Streamer::new(index, Role::Tailer { from, filter }, replicas, setup, rng)
    }

    pub fn watcher(index: u32, replicas: usize, kinds: &[Kind], setup: &StreamSetup, mut rng: ChaCha8Rng) -> Streamer {
        let (a, b) = setup.watch_window;
        let window = rng.gen_range(a..=b.max(a));
        let kinds = pick_kinds(&mut rng, kinds);
        Streamer::new(index, Role::Watcher { kinds, window, resume_after: None }, replicas, setup, rng)
    }

    pub fn consumer(index: u32, replicas: usize, setup: &StreamSetup, rng: ChaCha8Rng) -> Streamer {
        let role = ConsumerRole { name: format!("consumer-{index}"), ..ConsumerRole::default() };
        Streamer::new(index, Role::Consumer(Box::new(role)), replicas, setup, rng)
    }

    pub fn pipeline(index: u32, replicas: usize, setup: &StreamSetup, rng: ChaCha8Rng) -> Streamer {
        Streamer::new(index, Role::Pipeline { asking: None }, replicas, setup, rng)
    }

    fn new(index: u32, role: Role, replicas: usize, setup: &StreamSetup, mut rng: ChaCha8Rng) -> Streamer {
        let replica = rng.gen_range(0..replicas);
        Streamer {
            index,
            role,
            setup: setup.clone(),
            rng,
            replica,
            replicas,
            stream: 0,
            received: 0,
            acked: 0,
            covers: Vec::new(),
            next: None,
            stalled_until_us: 0,
            ack_scheduled: false,
            client_base: 3_000_000_000_000 + index as u64 * 1_000_000,
            incarnation: 0,
            seq: 0,
            wake_token: 0,
            crashed: false,
        }
    }

    /// The consumer name this streamer works as, if it is a consumer.
    pub fn consumer_name(&self) -> Option<&str> {
        match &self.role {
            Role::Consumer(c) => Some(&c.name),
            _ => None,
        }
    }

    fn client(&self) -> ClientId {
        ClientId(self.client_base + self.incarnation)
    }

    fn wake(&mut self, at_us: u64, purpose: u64) -> SAction {
        self.wake_token += 1;
        SAction::Wake { at_us, token: self.wake_token << 2 | purpose }
    }

    fn draw_us(&mut self, range: (u64, u64)) -> u64 {
        self.rng.gen_range(range.0..=range.1.max(range.0)) * 1000
    }

    /// Starts the process (at time zero, or again after a crash).
    pub fn start(&mut self, now_us: u64) -> Vec<SAction> {
        self.crashed = false;
        match &self.role {
            Role::Consumer(_) => self.consumer_open(now_us),
            Role::Pipeline { .. } => {
                let t = now_us + self.draw_us(self.setup.read_through_every_ms);
                vec![self.wake(t, WAKE_WORK)]
            }
            _ => self.open(),
        }
    }

    /// Opens the stream this streamer reads (again, after a break: where it left off).
    fn open(&mut self) -> Vec<SAction> {
        (self.received, self.acked, self.ack_scheduled) = (0, 0, false);
        self.covers.clear();
        let open = match &mut self.role {
            Role::Tailer { from, filter } => {
                let from = self.next.map_or(*from, TailFrom::Index);
                StreamOpen::Tail { from, filter: filter.clone() }
            }
            Role::Watcher { kinds, window, resume_after } => {
                StreamOpen::Watch { kinds: kinds.clone(), resume_after: *resume_after, window: Some(*window) }
            }
            Role::Consumer(c) => {
                // What was seen and not committed will be seen again.
                c.batch.clear();
                c.through = c.committed;
                let filter = Filter { kinds: vec![], internal: false, sessions_only: true };
                StreamOpen::Tail { from: TailFrom::Index(c.committed.next()), filter }
            }
            Role::Pipeline { .. } => return vec![],
        };
        vec![SAction::Open { replica: self.replica, open }]
    }

    /// The world opened the stream as number `stream`.
    pub fn opened(&mut self, stream: u64) {
        self.stream = stream;
    }

    /// Item `seq` of the open stream arrived.
    pub fn on_item(&mut self, now_us: u64, seq: u64, item: &StreamItem) -> Vec<SAction> {
        if self.crashed {
            return vec![];
        }
        self.received = seq;
        match item {
            StreamItem::Entries { entries, through, .. } => {
                self.next = Some(through.next());
                self.covers.push((seq, *through));
                let consumed = Kind(self.setup.consumed_kind);
                if let Role::Consumer(c) = &mut self.role {
                    c.through = *through;
                    for bytes in entries {
                        let e = LedgerEntry::decode(bytes).expect("a replica's ledger entry decodes");
                        let creations = e.events.iter().filter(|ev| matches!(ev.what, What::Created { .. }));
                        // Creations already committed (shown again after a reconnect) are not.
                        if e.index > c.committed {
                            c.batch.extend(creations.filter(|ev| ev.kind == Some(consumed)).map(|_| e.index));
                        }
                    }
                }
            }
            StreamItem::Progress { through } => {
                self.next = Some(through.next());
                self.covers.push((seq, *through));
                if let Role::Consumer(c) = &mut self.role {
                    c.through = *through;
                }
            }
            StreamItem::Synced { at } => self.covers.push((seq, *at)),
            StreamItem::ResyncStart { .. } => {
                // The watcher drops its copy for the new one, so until that one is complete it
                // holds nothing to resume from: a stream may resync again after a `Synced` (the
                // changes after it were gone), and what covered the old copy is void.
                self.covers.clear();
                if let Role::Watcher { resume_after, .. } = &mut self.role {
                    *resume_after = None;
                }
            }
            StreamItem::Resync { .. } => {}
            StreamItem::End(e) => return self.ended(now_us, e),
        }
        let mut out = Vec::new();
        if !self.ack_scheduled {
            self.ack_scheduled = true;
            let mut t = (now_us + self.draw_us(self.setup.ack_ms)).max(self.stalled_until_us);
            if self.setup.stall_share > 0.0 && self.rng.gen_bool(self.setup.stall_share.min(1.0)) {
                t += self.draw_us(self.setup.stall_ms);
                self.stalled_until_us = t;
            }
            out.push(self.wake(t, WAKE_ACK));
        }
        if let Role::Consumer(c) = &mut self.role {
            if c.batch_started_us == 0 {
                c.batch_started_us = now_us;
            }
            out.extend(self.maybe_commit(now_us));
        }
        out
    }

    /// The stream ended (or was refused): open another, from where the reader stands.
    fn ended(&mut self, now_us: u64, e: &StreamError) -> Vec<SAction> {
        self.stream = 0;
        match e {
            // Compacted away is gone for good: a tail resumes at what is still held (a watcher
            // is resynced by the replica itself; a consumer must not skip, and tries elsewhere).
            StreamError::Compacted { first_available, .. } if matches!(self.role, Role::Tailer { .. }) => {
                self.next = Some(*first_available)
            }
            StreamError::TooSlow { .. } => {}
            _ => self.replica = (self.replica + 1) % self.replicas,
        }
        let t = now_us + self.draw_us(self.setup.reconnect_ms);
        vec![self.wake(t, WAKE_OPEN)]
    }

    /// The connection to the replica broke (it crashed): open another stream elsewhere.
    pub fn on_broken(&mut self, now_us: u64) -> Vec<SAction> {
        if self.crashed || self.stream == 0 {
            return vec![];
        }
        self.stream = 0;
        self.replica = self.rng.gen_range(0..self.replicas);
        let t = now_us + self.draw_us(self.setup.reconnect_ms);
        vec![self.wake(t, WAKE_OPEN)]
    }

    pub fn on_wake(&mut self, now_us: u64, token: u64) -> Vec<SAction> {
        let (number, purpose) = (token >> 2, token & 3);
        match purpose {
            WAKE_ACK if !self.crashed => self.ack(now_us),
            WAKE_GIVE_UP if !self.crashed => self.give_up(now_us, number),
            // Only the latest open or work timer counts.
            _ if number != self.wake_token => vec![],
            WAKE_OPEN if self.crashed => self.start(now_us),
            WAKE_OPEN if self.stream == 0 => match &self.role {
                Role::Consumer(c) if c.epoch.is_none() => self.consumer_open(now_us),
                _ => self.open(),
            },
            WAKE_WORK if !self.crashed => match &self.role {
                Role::Consumer(_) => self.maybe_commit(now_us),
                Role::Pipeline { asking: None } => vec![SAction::WantsReadThrough],
                _ => vec![],
            },
            _ => vec![],
        }
    }

    /// Acknowledges everything received, now that it is processed.
    fn ack(&mut self, now_us: u64) -> Vec<SAction> {
        self.ack_scheduled = false;
        if now_us < self.stalled_until_us || self.stream == 0 || self.received <= self.acked {
            return vec![];
        }
        self.acked = self.received;
        let covered = self.covers.iter().filter(|(n, _)| *n <= self.acked).map(|(_, i)| *i).max();
        self.covers.retain(|(n, _)| *n > self.acked);
        if let (Role::Watcher { resume_after, .. }, Some(i)) = (&mut self.role, covered) {
            *resume_after = Some(i);
        }
        let error = match self.role {
            Role::Watcher { .. } if self.rng.gen_bool(0.05) => Some("simulated processing failure".to_string()),
            _ => None,
        };
        let record =
            Event::StreamAck { streamer: self.index, stream: self.stream, seq: self.acked, error: error.is_some() };
        vec![SAction::Record(record), SAction::Ack { seq: self.acked, error }]
    }

    /// The process dies: its stream and anything under way go with it. It comes back after a
    /// while; a consumer's commit under way may come back too, from the old process.
    pub fn crash(&mut self, now_us: u64) -> Vec<SAction> {
        let mut out = vec![SAction::Record(Event::StreamerCrash { streamer: self.index })];
        if self.stream != 0 {
            out.push(SAction::Close);
        }
        self.stream = 0;
        self.crashed = true;
        self.next = None;
        let zombie_share = self.setup.zombie_share;
        let zombie = zombie_share > 0.0 && self.rng.gen_bool(zombie_share.min(1.0));
        match &mut self.role {
            Role::Consumer(c) => {
                let zombie = c.last_commit.take().filter(|_| zombie);
                **c = ConsumerRole { name: c.name.clone(), zombie, ..ConsumerRole::default() };
            }
            // A watcher process that restarts has lost what it held: it is resynced.
            Role::Watcher { resume_after, .. } => *resume_after = None,
            Role::Pipeline { asking } => *asking = None,
            Role::Tailer { .. } => {}
        }
        self.incarnation += 1;
        let t = now_us + self.draw_us(self.setup.reconnect_ms) + 200_000;
        out.push(self.wake(t, WAKE_OPEN));
        out
    }

    // ---- consumers --------------------------------------------------------------------------

    fn send(&mut self, now_us: u64, request: Request) -> Vec<SAction> {
        self.seq += 1;
        let (client, seq) = (self.client(), Seq(self.seq));
        if let Role::Consumer(c) = &mut self.role {
            c.pending = Some((self.seq, request.clone()));
            if matches!(request, Request::ConsumerCommit(_)) {
                c.last_commit = Some(request.clone());
            }
        }
        let give_up = now_us + self.setup.request_give_up_ms * 1000;
        let rec =
            Event::ConsumerInvoke { streamer: self.index, client: client.0, seq: seq.0, request: request.clone() };
        vec![
            SAction::Record(rec),
            SAction::Request { client, seq, request },
            SAction::Wake { at_us: give_up, token: self.seq << 2 | WAKE_GIVE_UP },
        ]
    }

    fn consumer_open(&mut self, now_us: u64) -> Vec<SAction> {
        let Role::Consumer(c) = &self.role else { return vec![] };
        let request = Request::ConsumerOpen { consumer: c.name.clone() };
        self.send(now_us, request)
    }

    /// Commits the batch once it is big or old enough and nothing else is under way.
    fn maybe_commit(&mut self, now_us: u64) -> Vec<SAction> {
        let (a, b) = self.setup.batch_events;
        let want = self.rng.gen_range(a..=b.max(a)) as usize;
        let bad = self.setup.bad_op_share > 0.0 && self.rng.gen_bool(self.setup.bad_op_share.min(1.0));
        let bad_at: f64 = self.rng.gen();
        let (kind, store_s, batch_ms) =
            (Kind(self.setup.consumer_kind), self.setup.consumer_store_s, self.setup.batch_ms);
        let Role::Consumer(c) = &mut self.role else { return vec![] };
        let Some(epoch) = c.epoch else { return vec![] };
        if c.pending.is_some() || c.through <= c.committed {
            return vec![];
        }
        let due_at = c.batch_started_us + batch_ms * 1000;
        if c.batch.len() < want && now_us < due_at {
            return vec![self.wake(due_at, WAKE_WORK)];
        }
        let record = |index: &Index| format!("out:{}:{}", c.name, index.0).into_bytes();
        let mut ops: Vec<CommitOp> =
            c.batch.iter().map(|i| CommitOp::New { kind, records: vec![record(i)], store_s: Some(store_s) }).collect();
        if bad {
            // An operation the replicas must refuse (a kind that does not exist), which makes
            // the whole commit refused.
            let at = (bad_at * (ops.len() + 1) as f64) as usize;
            ops.insert(at.min(ops.len()), CommitOp::New { kind: Kind(u32::MAX), records: vec![], store_s: None });
        }
        let commit = ConsumerCommit { consumer: c.name.clone(), epoch, through: c.through, ops };
        self.send(now_us, Request::ConsumerCommit(commit))
    }

    /// A request's final answer (the world follows redirects).
    pub fn on_reply(&mut self, now_us: u64, client: ClientId, seq: Seq, outcome: Outcome) -> Vec<SAction> {
        let rec =
            Event::ConsumerComplete { streamer: self.index, client: client.0, seq: seq.0, outcome: outcome.clone() };
        let mut out = vec![SAction::Record(rec)];
        if self.crashed || client != self.client() {
            return out; // a zombie's answer, or one for a process that is gone
        }
        let Role::Consumer(c) = &mut self.role else { return out };
        if c.pending.as_ref().is_none_or(|(s, _)| *s != seq.0) {
            return out;
        }
        let (_, request) = c.pending.take().expect("checked");
        match (request, outcome) {
            (Request::ConsumerOpen { .. }, Ok(Reply::ConsumerOpened { epoch, through })) => {
                c.epoch = Some(epoch);
                c.committed = through;
                c.batch_started_us = now_us;
                out.extend(self.open());
                out.extend(self.send_zombie());
            }
            (Request::ConsumerCommit(_), Ok(Reply::Committed { through, .. })) => {
                c.committed = through;
                c.batch.retain(|i| *i > through);
                c.batch_started_us = now_us;
                out.extend(self.maybe_commit(now_us));
            }
            (Request::ConsumerCommit(mut commit), Err(RequestError::CommitOpFailed { op, .. })) => {
                // Drop the refused operation and commit the rest.
                if (op as usize) < commit.ops.len() {
                    commit.ops.remove(op as usize);
                }
                out.extend(self.send(now_us, Request::ConsumerCommit(commit)));
            }
            _ => {
                // Fenced by a newer epoch, overloaded, or anything else: this process starts
                // over from the replicated checkpoint, a little later.
                out.extend(self.start_over(now_us));
            }
        }
        out
    }

    /// Once the new process has opened the name again, the old one sends the commit it had
    /// under way, with its old epoch, over a connection of its own.
    fn send_zombie(&mut self) -> Vec<SAction> {
        let Role::Consumer(c) = &mut self.role else { return vec![] };
        let Some(request) = c.zombie.take() else { return vec![] };
        let client = ClientId(self.client_base + 500_000 + self.incarnation);
        let rec = Event::ConsumerInvoke { streamer: self.index, client: client.0, seq: 1, request: request.clone() };
        vec![SAction::Record(rec), SAction::Request { client, seq: Seq(1), request }]
    }

    /// Starts over from the checkpoint: a new connection opens the name again after a while.
    fn start_over(&mut self, now_us: u64) -> Vec<SAction> {
        let mut out = Vec::new();
        if self.stream != 0 {
            out.push(SAction::Close);
            self.stream = 0;
        }
        if let Role::Consumer(c) = &mut self.role {
            **c = ConsumerRole { name: c.name.clone(), ..ConsumerRole::default() };
        }
        self.incarnation += 1;
        let t = now_us + self.draw_us(self.setup.reconnect_ms);
        out.push(self.wake(t, WAKE_OPEN));
        out
    }

    /// A request's give-up timer fired: if it is still unanswered its outcome is unknown (a
    /// consumer starts over from the checkpoint); a pipeline reader asks its next question.
    fn give_up(&mut self, now_us: u64, seq: u64) -> Vec<SAction> {
        match &mut self.role {
            Role::Consumer(c) if c.pending.as_ref().is_some_and(|(s, _)| *s == seq) => {
                let rec = Event::ConsumerGiveUp { streamer: self.index, client: self.client().0, seq };
                let mut out = vec![SAction::Record(rec)];
                out.extend(self.start_over(now_us));
                out
            }
            Role::Pipeline { asking } if *asking == Some(seq) => {
                *asking = None;
                let rec = Event::ReadThroughGiveUp { streamer: self.index, id: seq };
                let t = now_us + self.draw_us(self.setup.read_through_every_ms);
                vec![SAction::Record(rec), self.wake(t, WAKE_WORK)]
            }
            _ => vec![],
        }
    }

    // ---- pipeline readers -------------------------------------------------------------------

    /// Asks a random replica to read `consumer` through `index` (the world picks them from what
    /// it has seen).
    pub fn ask_read_through(&mut self, now_us: u64, consumer: String, index: Index) -> Vec<SAction> {
        if !matches!(self.role, Role::Pipeline { asking: None }) || self.crashed {
            return vec![];
        }
        self.seq += 1;
        self.role = Role::Pipeline { asking: Some(self.seq) };
        let replica = self.rng.gen_range(0..self.replicas);
        let timeout_ms = self.setup.request_give_up_ms / 2;
        let rec =
            Event::ReadThroughInvoke { streamer: self.index, id: self.seq, consumer: consumer.clone(), index: index.0 };
        let give_up = now_us + self.setup.request_give_up_ms * 1000;
        vec![
            SAction::Record(rec),
            SAction::Query { replica, question: self.seq, query: Query::ReadThrough { consumer, index, timeout_ms } },
            SAction::Wake { at_us: give_up, token: self.seq << 2 | WAKE_GIVE_UP },
        ]
    }

    /// A read-through's answer: recorded, and the next question follows after a while (an
    /// answer to a question given up is dropped).
    pub fn on_read_through(
        &mut self,
        now_us: u64,
        question: u64,
        reply: Result<Checkpoint, RequestError>,
    ) -> Vec<SAction> {
        let Role::Pipeline { asking: Some(id) } = self.role else { return vec![] };
        if id != question {
            return vec![];
        }
        self.role = Role::Pipeline { asking: None };
        let rec = Event::ReadThroughComplete { streamer: self.index, id, reply };
        let t = now_us + self.draw_us(self.setup.read_through_every_ms);
        vec![SAction::Record(rec), self.wake(t, WAKE_WORK)]
    }

    /// The query a pipeline reader waits for, if any.
    pub fn asking(&self) -> Option<u64> {
        match self.role {
            Role::Pipeline { asking } => asking,
            _ => None,
        }
    }
}

/// A random subset of the kinds, or all of them (empty: every kind).
fn pick_kinds(rng: &mut ChaCha8Rng, kinds: &[Kind]) -> Vec<Kind> {
    if kinds.len() < 2 || rng.gen_bool(0.5) {
        return vec![];
    }
    let picked: Vec<Kind> = kinds.iter().copied().filter(|_| rng.gen_bool(0.5)).collect();
    if picked.is_empty() {
        vec![kinds[0]]
    } else {
        picked
    }
}
