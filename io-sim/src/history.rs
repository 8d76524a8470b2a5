//! The simulator's ground truth: every client invocation and completion, every delivery, every
//! fault, with its virtual time. Checkers read it; its condensed form (one line per event, no
//! real-time figures) is what snapshot tests compare.

use std::fmt::Write as _;
use truba_engine::{
    Checkpoint, FailureReason, Handle, Kind, Outcome, RedriveTarget, Reply, Request, RequestError, SessionState,
    SessionView, StreamItem, StreamOpen, UnixSecs,
};

/// Who issued a request: a workload client or a handler working on a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Actor {
    Client(u32),
    Handler(u32, u32),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Invoke {
        actor: Actor,
        client: u64,
        seq: u64,
        request: Request,
    },
    Complete {
        actor: Actor,
        client: u64,
        seq: u64,
        outcome: Outcome,
    },
    /// The actor stopped waiting; the request's outcome is unknown.
    GiveUp {
        actor: Actor,
        client: u64,
        seq: u64,
    },
    /// A client process died; its in-flight request's outcome is unknown.
    ClientCrash {
        actor: Actor,
    },
    /// The replica pushed a session to a handler. `taken_at_ms` is the clock reading the replica
    /// says it decided the take at (the world checks it was a reading it was really given).
    Deliver {
        kind: Kind,
        handle: Handle,
        due: UnixSecs,
        records: Vec<Vec<u8>>,
        taken_at_ms: u64,
        /// The log index of the take: deliveries in take order are in this order.
        take_index: u64,
    },
    DeliveryFailed {
        handle: Handle,
        reason: FailureReason,
    },
    Crash {
        replica: u32,
        disk: String,
    },
    Restart {
        replica: u32,
        boot: u32,
    },
    Recovered {
        replica: u32,
        applied: u64,
        state_hash: u64,
        torn_bytes: u64,
    },
    Stopped {
        replica: u32,
        reason: String,
    },
    /// Recovery found damage that the replica repairs from its peers (or, for a lost hard
    /// state, lives with by never voting again).
    Damage {
        replica: u32,
        found: String,
    },
    /// A replica became leader of a term (other role changes are not client-visible).
    Leader {
        replica: u32,
        term: u64,
    },
    Fault {
        what: String,
    },
    Phase {
        name: &'static str,
    },
    /// A reader asked for a session (`get`); `read` numbers the reader's questions.
    ReadInvoke {
        reader: u32,
        read: u64,
        session: u64,
    },
    /// The answer reached the reader: the session as the leader showed it, or why it could not
    /// ("unknown", "deleted"). Redirects to the leader are the client library's, not answers.
    ReadComplete {
        reader: u32,
        read: u64,
        session: u64,
        answer: Result<SessionView, RequestError>,
    },
    /// The reader stopped waiting for an answer (the replica may have crashed or lost its role).
    ReadGiveUp {
        reader: u32,
        read: u64,
        session: u64,
    },
    /// A streamer (tailer, watcher, consumer) opened stream `stream` on a replica.
    StreamOpen {
        streamer: u32,
        stream: u64,
        replica: u32,
        open: StreamOpen,
    },
    /// Item `seq` of a stream reached its streamer.
    StreamItem {
        streamer: u32,
        stream: u64,
        seq: u64,
        item: StreamItem,
    },
    /// The streamer acknowledged the stream's items through `seq` (`error`: with a failure text).
    StreamAck {
        streamer: u32,
        stream: u64,
        seq: u64,
        error: bool,
    },
    /// The connection carrying the stream broke (its replica crashed or stopped).
    StreamBroken {
        streamer: u32,
        stream: u64,
    },
    /// A streamer's process died (and comes back later as a new one).
    StreamerCrash {
        streamer: u32,
    },
    /// A consumer's request (open, commit) and its final answer or give-up.
    ConsumerInvoke {
        streamer: u32,
        client: u64,
        seq: u64,
        request: Request,
    },
    ConsumerComplete {
        streamer: u32,
        client: u64,
        seq: u64,
        outcome: Outcome,
    },
    ConsumerGiveUp {
        streamer: u32,
        client: u64,
        seq: u64,
    },
    /// A pipeline reader asked a replica to read a consumer through an index, and the answer.
    ReadThroughInvoke {
        streamer: u32,
        id: u64,
        consumer: String,
        index: u64,
    },
    ReadThroughComplete {
        streamer: u32,
        id: u64,
        reply: Result<Checkpoint, RequestError>,
    },
    ReadThroughGiveUp {
        streamer: u32,
        id: u64,
    },
}

#[derive(Clone, Debug, Default)]
pub struct History {
    pub events: Vec<(u64, Event)>,
}

impl History {
    pub fn push(&mut self, true_us: u64, e: Event) {
        self.events.push((true_us, e));
    }

    /// One line per event. Record payloads are shown by id only.
    pub fn condensed(&self) -> String {
        let mut out = String::new();
        for (t, e) in &self.events {
            let _ = write!(out, "{:>6}.{:03} ", t / 1_000_000, (t / 1000) % 1000);
            let _ = writeln!(out, "{}", describe(e));
        }
        out
    }
}

pub fn record_id(r: &[u8]) -> String {
    let end = r.iter().position(|b| *b == b':').unwrap_or(r.len().min(24));
    String::from_utf8_lossy(&r[..end]).into_owned()
}

fn ids(records: &[Vec<u8>]) -> String {
    records.iter().map(|r| record_id(r)).collect::<Vec<_>>().join(",")
}

pub fn describe_request(r: &Request) -> String {
    match r {
        Request::New { kind, record } => {
            format!("new k{} [{}]", kind.0, record.as_ref().map(|r| record_id(r)).unwrap_or_default())
        }
        Request::Append { handle, record } => format!("append {handle} {} ({}B)", record_id(record), record.len()),
        Request::Replace { handle, record } => format!("replace {handle} {}", record_id(record)),
        Request::Delete { handle } => format!("delete {handle}"),
        Request::Store { handle, timeout_s } => format!("store {handle} {timeout_s}s"),
        Request::KeepAlive { handle } => format!("keepalive {handle}"),
        Request::Redrive { target: RedriveTarget::Session(id) } => format!("redrive {id}"),
        Request::Redrive { target: RedriveTarget::Kind(kind) } => format!("redrive k{}", kind.0),
        Request::DropDead { session } => format!("drop dead {session}"),
        Request::ConsumerOpen { consumer } => format!("consumer open {consumer}"),
        Request::ConsumerCommit(c) => {
            format!("consumer commit {} epoch {} through {} ({} ops)", c.consumer, c.epoch, c.through.0, c.ops.len())
        }
        Request::ConsumerDrop { consumer } => format!("consumer drop {consumer}"),
        Request::Configure { expect_version, kinds, .. } => {
            format!(
                "configure from version {expect_version}: kinds {:?}",
                kinds.keys().map(|k| k.0).collect::<Vec<_>>()
            )
        }
        Request::ChangeMembers { change, .. } => format!("members: {change}"),
        Request::TransferLeader { to } => format!("transfer leadership to {to}"),
    }
}

fn describe_open(open: &StreamOpen) -> String {
    match open {
        StreamOpen::Tail { from, filter } => format!(
            "tail from {from:?} kinds {:?}{}",
            kinds(&filter.kinds),
            if filter.internal { " +internal" } else { "" }
        ),
        StreamOpen::Watch { kinds: k, resume_after, window } => {
            format!("watch kinds {:?} after {:?} window {:?}", kinds(k), resume_after.map(|i| i.0), window)
        }
    }
}

fn kinds(k: &[Kind]) -> Vec<u32> {
    k.iter().map(|k| k.0).collect()
}

fn describe_item(item: &StreamItem) -> String {
    match item {
        StreamItem::Entries { entries, events, through } => {
            format!("{} entries, {events} events, through {}", entries.len(), through.0)
        }
        StreamItem::Progress { through } => format!("progress through {}", through.0),
        StreamItem::ResyncStart { at } => format!("resync at {}", at.0),
        StreamItem::Resync { sessions } => format!("{} sessions", sessions.len()),
        StreamItem::Synced { at } => format!("synced at {}", at.0),
        StreamItem::End(e) => format!("end: {e}"),
    }
}

fn describe(e: &Event) -> String {
    match e {
        Event::Invoke { actor, seq, request, .. } => format!("{actor:?}#{seq} > {}", describe_request(request)),
        Event::Complete { actor, seq, outcome, .. } => match outcome {
            Ok(Reply::Created { handle }) => format!("{actor:?}#{seq} < created {handle}"),
            Ok(Reply::Done) => format!("{actor:?}#{seq} < ok"),
            Ok(Reply::Stored { due }) => format!("{actor:?}#{seq} < stored, due {}", due.0),
            Ok(Reply::Redriven { count, remaining }) => {
                format!("{actor:?}#{seq} < redrove {count}, {remaining} still dead")
            }
            Ok(Reply::ConsumerOpened { epoch, through }) => {
                format!("{actor:?}#{seq} < opened at epoch {epoch}, through {}", through.0)
            }
            Ok(Reply::Committed { through, results }) => {
                format!("{actor:?}#{seq} < committed through {} ({} ops)", through.0, results.len())
            }
            Ok(Reply::Configured { version }) => format!("{actor:?}#{seq} < configured, version {version}"),
            Ok(Reply::MembersChanged { version }) => format!("{actor:?}#{seq} < members changed, version {version}"),
            Ok(Reply::LeaderTransferring { to }) => format!("{actor:?}#{seq} < handing over to {to}"),
            Err(e) => format!("{actor:?}#{seq} < error: {e}"),
        },
        Event::GiveUp { actor, seq, .. } => format!("{actor:?}#{seq} gave up"),
        Event::ClientCrash { actor } => format!("{actor:?} crashed"),
        Event::Deliver { kind, handle, due, records, .. } => {
            format!("deliver k{} {handle} due {} [{}]", kind.0, due.0, ids(records))
        }
        Event::DeliveryFailed { handle, reason } => match reason {
            FailureReason::Unreachable(_) => format!("handler unreachable {handle}"),
            _ => format!("handler failed {handle}"),
        },
        Event::Crash { replica, disk } => format!("replica {replica} crash ({disk})"),
        Event::Restart { replica, boot } => format!("replica {replica} restart, boot {boot}"),
        Event::Recovered { replica, applied, state_hash, torn_bytes } => {
            format!("replica {replica} recovered at {applied} hash {state_hash:016x} torn {torn_bytes}B")
        }
        Event::Stopped { replica, reason } => format!("replica {replica} stopped: {reason}"),
        Event::Damage { replica, found } => format!("replica {replica} found damage: {found}"),
        Event::Leader { replica, term } => format!("replica {replica} leads term {term}"),
        Event::Fault { what } => format!("fault: {what}"),
        Event::Phase { name } => format!("--- {name} phase ---"),
        Event::ReadInvoke { reader, read, session } => format!("Reader({reader})#{read} > get {session}"),
        Event::ReadComplete { reader, read, session, answer } => {
            format!("Reader({reader})#{read} < get {session} = {}", describe_view(answer))
        }
        Event::ReadGiveUp { reader, read, session } => format!("Reader({reader})#{read} gave up on get {session}"),
        Event::StreamOpen { streamer, stream, replica, open } => {
            format!("Streamer({streamer}) opens stream {stream} on replica {replica}: {}", describe_open(open))
        }
        Event::StreamItem { streamer, stream, seq, item } => {
            format!("Streamer({streamer}) stream {stream} #{seq}: {}", describe_item(item))
        }
        Event::StreamAck { streamer, stream, seq, error } => {
            format!("Streamer({streamer}) stream {stream} acks #{seq}{}", if *error { " with an error" } else { "" })
        }
        Event::StreamBroken { streamer, stream } => format!("Streamer({streamer}) stream {stream} broke"),
        Event::StreamerCrash { streamer } => format!("Streamer({streamer}) crashed"),
        Event::ConsumerInvoke { streamer, seq, request, .. } => {
            format!("Streamer({streamer})#{seq} > {}", describe_request(request))
        }
        Event::ConsumerComplete { streamer, seq, outcome, .. } => match outcome {
            Ok(Reply::ConsumerOpened { epoch, through }) => {
                format!("Streamer({streamer})#{seq} < opened at epoch {epoch}, through {}", through.0)
            }
            Ok(Reply::Committed { through, results }) => {
                format!("Streamer({streamer})#{seq} < committed through {} ({} ops)", through.0, results.len())
            }
            Ok(other) => format!("Streamer({streamer})#{seq} < {other:?}"),
            Err(e) => format!("Streamer({streamer})#{seq} < error: {e}"),
        },
        Event::ConsumerGiveUp { streamer, seq, .. } => format!("Streamer({streamer})#{seq} gave up"),
        Event::ReadThroughInvoke { streamer, id, consumer, index } => {
            format!("Streamer({streamer})#{id} > read {consumer} through {index}")
        }
        Event::ReadThroughComplete { streamer, id, reply } => match reply {
            Ok(c) => format!("Streamer({streamer})#{id} < checkpoint epoch {} through {}", c.epoch, c.through.0),
            Err(e) => format!("Streamer({streamer})#{id} < error: {e}"),
        },
        Event::ReadThroughGiveUp { streamer, id } => format!("Streamer({streamer})#{id} gave up"),
    }
}

/// A `get` answer in one line: handle, state, records (or where they are, when not shown).
fn describe_view(answer: &Result<SessionView, RequestError>) -> String {
    let v = match answer {
        Ok(v) => v,
        Err(e) => return format!("error: {e}"),
    };
    let state = match &v.state {
        SessionState::Active { delivering: true, .. } => "active, delivering".to_string(),
        SessionState::Active { .. } => "active".to_string(),
        SessionState::Stored { due } => format!("stored, due {}", due.0),
        SessionState::Dead { since } => format!("dead since {}", since.0),
    };
    let records = match v.source {
        Some((source, n)) if v.records.len() != n as usize => format!("{n} records in source {} (not shown)", source.0),
        Some((source, _)) => format!("[{}] from source {}", ids(&v.records), source.0),
        None => format!("[{}]", ids(&v.records)),
    };
    format!("{} {state} {records}", v.handle)
}
