//! Seed inputs for every target, made from what truba really writes and sends: the fuzzer
//! starts from inputs that reach deep (a follower that took entries, a leader that commits, a
//! snapshot and a source file that decode) and mutates from there. `cargo run -p
//! truba-fuzz-targets --bin fuzz-seeds` writes them under `fuzz/seeds/<target>/`; the replay
//! test runs them too, so they cannot rot unnoticed.

use crate::node::{Dir, Node, Setup};
use serde::Serialize;
use std::sync::OnceLock;
use truba::wire::{ClientMsg, HandlerToPipe, Hello, MemberAddr, PeerFrame, PipeToHandler};
use truba_engine::codec::{decode_snapshot, encode_snapshot};
use truba_engine::{
    Attempt, ClientId, ClusterConfig, Command, Entry, FailureReason, Handle, Index, Input, Kind, Message, Query,
    ReplicaId, Reply, Request, Seq, SessionId, Term, UnixMs,
};

/// When the spilled sessions of [`spilled_dir`] come due after their replica starts.
pub const SPILLED_DUE_MS: u64 = 60_000;
const WALL_MS: UnixMs = UnixMs(1_700_000_000_000);

fn postcard<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("encoding into memory cannot fail")
}

/// A lone replica's directory after it stored enough sessions to spill them into a source
/// file, and that file's name.
pub fn spilled_dir() -> &'static (Dir, String) {
    static DIR: OnceLock<(Dir, String)> = OnceLock::new();
    DIR.get_or_init(|| {
        let node = busy_lone_replica();
        let source = node.dir.keys().find(|f| f.starts_with("src-")).expect("the run spilled a source file").clone();
        (node.dir, source)
    })
}

/// A lone replica that opened, appended to and stored sessions until it spilled them, deleted
/// one, and took snapshots along the way.
fn busy_lone_replica() -> Node {
    let mut node = Node::new(Setup::Lone, 0);
    let mut seq = 0;
    let mut call = |node: &mut Node, request: Request| {
        seq += 1;
        node.input(Input::Request { client: ClientId(1), seq: Seq(seq), request });
        node.replies.back().cloned().expect("a lone replica answers at once")
    };
    for i in 0..32u8 {
        let created = call(&mut node, Request::New { kind: Kind(1), record: Some(vec![i; 64]) });
        let Ok(Reply::Created { handle }) = created else { panic!("a new session: {created:?}") };
        call(&mut node, Request::Append { handle, record: vec![i; 40] }).expect("an append");
        let timeout_s = (SPILLED_DUE_MS / 1000) as u32;
        let request = if i % 8 == 7 { Request::Delete { handle } } else { Request::Store { handle, timeout_s } };
        call(&mut node, request).expect("a store or a delete");
    }
    node.advance_ms(1000);
    node
}

fn a_config() -> ClusterConfig {
    ClusterConfig::bootstrap(&crate::node::config(), &[ReplicaId(0), ReplicaId(1), ReplicaId(2)])
}

fn entry(index: u64, command: Command) -> Entry {
    Entry { term: Term(1), index: Index(index), at: WALL_MS, command }
}

fn handle(session: u64) -> Handle {
    Handle { session: SessionId(session), attempt: Attempt(0) }
}

/// Seeds by target: (target, file name, bytes); the names of inputs that once failed start
/// with `regression-`.
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        let name = if name.starts_with("regression-") { name.to_string() } else { format!("seed-{name}") };
        out.push((target, name, bytes))
    };

    for (name, bytes) in frames() {
        add("frames", name, bytes);
    }
    add("member_messages", "follower", follower_steps());
    add("member_messages", "leader", leader_steps());
    add("client_requests", "sessions", client_steps());

    let (dir, source) = spilled_dir();
    for (file, bytes) in dir.iter().filter(|(f, _)| f.starts_with("log-")).take(2) {
        let mut raw = vec![0, 0];
        raw.extend_from_slice(bytes);
        add("log_recovery", &format!("raw-{file}"), raw);
    }
    add("log_recovery", "framed", framed_log());
    if let Some((file, bytes)) = dir.iter().find(|(f, _)| f.starts_with("snap-")) {
        let mut raw = vec![0];
        raw.extend_from_slice(bytes);
        add("snapshot_recovery", &format!("raw-{file}"), raw);
        let (index, term, payload) = decode_snapshot(bytes).expect("the run's snapshot is whole");
        let mut sealed = vec![2];
        sealed.extend(postcard(&(index.0, term.0)));
        sealed.extend_from_slice(payload);
        add("snapshot_recovery", "sealed", sealed);
    }
    let mut raw = vec![0];
    raw.extend_from_slice(&dir[source]);
    add("source_file", "spilled", raw);

    let mut toml = vec![0];
    toml.extend_from_slice(truba::cluster_config::render(&a_config()).as_bytes());
    add("config", "shown", toml);
    let mut replicated = vec![1];
    replicated.extend(postcard(&a_config()));
    add("config", "replicated", replicated);

    for (target, name, bytes) in regressions() {
        add(target, name, bytes);
    }
    out
}

/// The inputs that made a target fail once, rebuilt by hand (what each found is in the
/// README's "Fuzzing"), so that they stay in every replay.
fn regressions() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // A snapshot file whose length field is near u64::MAX (raw mode).
    let mut snapshot = encode_snapshot(Index(3), Term(1), b"payload");
    snapshot[24..32].copy_from_slice(&(u64::MAX - 2).to_le_bytes());
    out.push(("snapshot_recovery", "regression-length-overflow", [vec![0], snapshot].concat()));
    // Replicated configurations that validated but did not survive `show` and `apply`.
    let mut zero_base = a_config();
    zero_base.kinds.get_mut(&Kind(1)).expect("kind 1").backoff_base_s = 0;
    out.push(("config", "regression-backoff-base-zero", [vec![1], postcard(&zero_base)].concat()));
    let mut large = a_config();
    let kind = large.kinds.get_mut(&Kind(1)).expect("kind 1");
    (kind.record_bytes_max, kind.session_bytes_max) = (8 << 20, 16 << 20);
    out.push(("config", "regression-frame-size", [vec![1], postcard(&large)].concat()));
    let mut huge = a_config();
    huge.kinds.get_mut(&Kind(1)).expect("kind 1").lease_ms = u64::MAX;
    out.push(("config", "regression-beyond-toml", [vec![1], postcard(&huge)].concat()));
    out
}

/// Frame payloads (the target adds the header).
fn frames() -> Vec<(&'static str, Vec<u8>)> {
    let new = Request::New { kind: Kind(1), record: Some(b"first".to_vec()) };
    let append = Message::Append {
        term: Term(1),
        prev_index: Index(0),
        prev_term: Term(0),
        commit: Index(0),
        round: 1,
        entries: vec![entry(1, Command::Noop)],
    };
    let hello = Hello {
        protocol: truba::wire::CLIENT_PROTOCOL_VERSION,
        cluster: 7,
        member: ReplicaId(0),
        leader: Some(ReplicaId(0)),
        members: vec![MemberAddr { id: ReplicaId(0), client: "127.0.0.1:7700".into() }],
    };
    let identity = truba::identity::Identity { cluster: truba::identity::ClusterId(7), member: ReplicaId(1) };
    vec![
        ("client-request", postcard(&ClientMsg::Request { client: ClientId(1), seq: Seq(1), request: new })),
        ("peer-append", postcard(&PeerFrame { from: ReplicaId(0), message: append })),
        ("hello", postcard(&hello)),
        ("peer-hello", postcard(&truba::identity::PeerHello::new(identity, "127.0.0.1:7701"))),
        ("handler-ack", postcard(&HandlerToPipe::Ack { handle: handle(3), result: Err("busy".into()) })),
        (
            "deliver",
            postcard(&PipeToHandler::Deliver {
                kind: Kind(1),
                handle: handle(3),
                due: truba_engine::UnixSecs(1_700_000_000),
                records: vec![b"r".to_vec()],
                servers: vec!["127.0.0.1:7700".into()],
            }),
        ),
    ]
}

/// An opcode and its message (see [`crate::member_messages`]); `from` is 0, 1, 2 or 3 (the
/// stranger).
fn message_step(out: &mut Vec<u8>, from: u8, message: &Message) {
    out.push(from << 3);
    out.extend(postcard(message));
}

fn follower_steps() -> Vec<u8> {
    let mut out = vec![0];
    let entries = vec![
        entry(1, Command::Noop),
        entry(2, Command::Bootstrap { config: a_config() }),
        entry(3, Command::Spill { kind: Kind(1) }),
    ];
    let first = Message::Append {
        term: Term(1),
        prev_index: Index(0),
        prev_term: Term(0),
        commit: Index(0),
        round: 1,
        entries,
    };
    message_step(&mut out, 0, &first);
    let commit = Message::Append {
        term: Term(1),
        prev_index: Index(3),
        prev_term: Term(1),
        commit: Index(3),
        round: 2,
        entries: vec![],
    };
    message_step(&mut out, 0, &commit);
    out.extend([5, 50]);
    message_step(&mut out, 2, &Message::PreVote { term: Term(2), last_index: Index(3), last_term: Term(1) });
    message_step(
        &mut out,
        2,
        &Message::Vote { term: Term(2), last_index: Index(3), last_term: Term(1), transfer: false },
    );
    message_step(&mut out, 0, &Message::ReadIndexReply { term: Term(2), ctx: 1, index: Some(Index(3)) });
    out.push(7);
    let (dir, _) = spilled_dir();
    if let Some(bytes) = dir.iter().find(|(f, _)| f.starts_with("snap-")).map(|(_, b)| b) {
        let (index, last_term, payload) = decode_snapshot(bytes).expect("the run's snapshot is whole");
        let snapshot =
            Message::Snapshot { term: Term(3), index, last_term, state: payload.to_vec(), sources: Vec::new() };
        message_step(&mut out, 0, &snapshot);
    }
    out
}

fn leader_steps() -> Vec<u8> {
    let mut out = vec![1];
    let ok = |matched: u64, round: u64| Message::AppendReply {
        term: Term(1),
        ok: true,
        matched: Index(matched),
        hint: Index(0),
        round,
        sources: Index(matched),
    };
    message_step(&mut out, 1, &ok(2, 1));
    out.push(6 | (1 << 3));
    out.extend(postcard(&Request::New { kind: Kind(1), record: Some(vec![1; 16]) }));
    message_step(&mut out, 2, &ok(3, 2));
    message_step(&mut out, 1, &Message::ReadIndex { term: Term(1), ctx: 9 });
    message_step(
        &mut out,
        2,
        &Message::SourceFetch { term: Term(1), source: truba_engine::SourceId(3), offset: 0, len: 64 },
    );
    out.extend([5, 40]);
    message_step(
        &mut out,
        1,
        &Message::AppendReply {
            term: Term(1),
            ok: false,
            matched: Index(0),
            hint: Index(1),
            round: 3,
            sources: Index(0),
        },
    );
    message_step(&mut out, 2, &Message::VoteReply { term: Term(1), granted: false });
    out
}

fn client_steps() -> Vec<u8> {
    let mut out = Vec::new();
    let request = |out: &mut Vec<u8>, seq: u64, r: Request| {
        out.push(0);
        out.extend(postcard(&seq));
        out.extend(postcard(&r));
    };
    // A lone replica's first entries are its no-op and its bootstrap: the first session is 3.
    request(&mut out, 1, Request::New { kind: Kind(1), record: Some(vec![7; 32]) });
    request(&mut out, 2, Request::Append { handle: handle(3), record: vec![8; 32] });
    request(&mut out, 3, Request::Store { handle: handle(3), timeout_s: 1 });
    out.push(4);
    out.extend(postcard(&Query::Session(SessionId(3))));
    out.extend([5, 200]);
    out.push(6);
    out.extend(postcard(&(handle(3), FailureReason::LeaseExpired)));
    request(&mut out, 4, Request::ConsumerOpen { consumer: "c".into() });
    out.push(7);
    out.push(4);
    out.extend(postcard(&Query::Status));
    out
}

/// Records whose payloads are real entries (a clock reading and a command), framed by the
/// target with valid checksums.
fn framed_log() -> Vec<u8> {
    let mut out = vec![1, 1];
    for command in
        [Command::Noop, Command::Bootstrap { config: a_config() }, Command::Spill { kind: Kind(1) }, Command::Noop]
    {
        let payload = postcard(&(WALL_MS, command));
        out.push(1);
        out.extend(postcard(&(payload.len() as u16)));
        out.extend(payload);
    }
    out
}
