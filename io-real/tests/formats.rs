//! Golden bytes of every wire message: each variant of what clients send (`ClientMsg`) and are
//! sent (`ServerMsg`, with every stream item, refusal and end), what members send each other
//! (`PeerHello`, and a `PeerFrame` of every consensus `Message`), and what the pipe and handlers
//! say (`PipeToHandler`, `HandlerToPipe`), framed as they go on the wire. An encoding changed by
//! accident fails here instead of between two versions of truba in one cluster.
//!
//! A deliberate change updates the snapshots (`INSTA_UPDATE=always cargo test -p truba --test
//! formats`) and raises the protocol's version (`PROTOCOL_VERSION` for members,
//! `CLIENT_PROTOCOL_VERSION` for clients); see "Formats and upgrades" in the README.

use std::fmt::Write;
use truba::identity::{ClusterId, Identity, PeerHello};
use truba::wire::{
    encode, ClientMsg, HandlerToPipe, Hello, MemberAddr, PeerFrame, PipeToHandler, ServerMsg, ServerStatus, StreamEnd,
    StreamRefusal, WireError,
};
use truba_engine::{
    Attempt, ClientId, Command, Engine, EngineConfig, Entry, Filter, Handle, Index, Kind, Message, Query, QueryReply,
    ReplicaId, Reply, Request, RequestError, Seq, SessionId, SourceId, StreamError, StreamItem, StreamOpen, TailFrom,
    Term, UnixMs, UnixSecs,
};

/// One line per message: its name, then its frame in hex.
fn golden(samples: &[(&str, Vec<u8>)]) -> String {
    let mut out = String::new();
    for (name, frame) in samples {
        write!(out, "{name} ({} bytes):", frame.len()).expect("a string");
        for b in frame {
            write!(out, " {b:02x}").expect("a string");
        }
        out.push('\n');
    }
    out
}

fn handle() -> Handle {
    Handle { session: SessionId(5), attempt: Attempt(1) }
}

/// The message's variant. No wildcard: a new message fails to compile here, as a reminder to
/// give it a golden sample.
fn message_name(m: &Message) -> &'static str {
    match m {
        Message::PreVote { .. } => "PreVote",
        Message::PreVoteReply { .. } => "PreVoteReply",
        Message::Vote { .. } => "Vote",
        Message::VoteReply { .. } => "VoteReply",
        Message::Append { .. } => "Append",
        Message::AppendReply { .. } => "AppendReply",
        Message::Snapshot { .. } => "Snapshot",
        Message::SourceFetch { .. } => "SourceFetch",
        Message::SourcePiece { .. } => "SourcePiece",
        Message::TimeoutNow { .. } => "TimeoutNow",
        Message::ReadIndex { .. } => "ReadIndex",
        Message::ReadIndexReply { .. } => "ReadIndexReply",
    }
}

const MESSAGES: [&str; 12] = [
    "PreVote",
    "PreVoteReply",
    "Vote",
    "VoteReply",
    "Append",
    "AppendReply",
    "Snapshot",
    "SourceFetch",
    "SourcePiece",
    "TimeoutNow",
    "ReadIndex",
    "ReadIndexReply",
];

fn messages() -> Vec<Message> {
    let (t, i) = (Term(3), Index(40));
    let entry = Entry { term: t, index: Index(41), at: UnixMs(1_700_000_000_000), command: Command::Noop };
    vec![
        Message::PreVote { term: Term(4), last_index: i, last_term: t },
        Message::PreVoteReply { term: Term(4), granted: true },
        Message::Vote { term: Term(4), last_index: i, last_term: t, transfer: false },
        Message::VoteReply { term: Term(4), granted: false },
        Message::Append { term: t, prev_index: i, prev_term: t, commit: Index(39), round: 7, entries: vec![entry] },
        Message::AppendReply { term: t, ok: true, matched: Index(41), hint: Index(39), round: 7, sources: Index(41) },
        Message::Snapshot {
            term: t,
            index: i,
            last_term: t,
            state: vec![1, 2, 3],
            sources: vec![(SourceId(30), 4096)],
        },
        Message::SourceFetch { term: t, source: SourceId(30), offset: 0, len: 4096 },
        Message::SourcePiece { term: t, source: SourceId(30), offset: 0, data: vec![9; 4] },
        Message::TimeoutNow { term: t },
        Message::ReadIndex { term: t, ctx: 11 },
        Message::ReadIndexReply { term: t, ctx: 11, index: Some(i) },
    ]
}

#[test]
fn member_messages() {
    let samples = messages();
    let names: Vec<&str> = samples.iter().map(message_name).collect();
    for name in MESSAGES {
        assert!(names.contains(&name), "message {name} has no golden sample");
    }
    let identity = Identity { cluster: ClusterId(0x5eed), member: ReplicaId(1) };
    let mut frames = vec![("PeerHello", encode(&PeerHello::new(identity, "10.0.0.1:7500")))];
    for m in samples {
        frames.push((message_name(&m), encode(&PeerFrame { from: ReplicaId(1), message: m })));
    }
    insta::assert_snapshot!("member_messages", golden(&frames));
}

#[test]
fn client_messages() {
    let request = |request| ClientMsg::Request { client: ClientId(7), seq: Seq(3), request };
    let open = |open| ClientMsg::StreamOpen { stream: 2, open };
    let tail = StreamOpen::Tail { from: TailFrom::Index(Index(10)), filter: Filter::default() };
    let frames = vec![
        ("Request New", encode(&request(Request::New { kind: Kind(1), record: Some(b"first".to_vec()) }))),
        ("Request Append", encode(&request(Request::Append { handle: handle(), record: b"more".to_vec() }))),
        ("Request Store", encode(&request(Request::Store { handle: handle(), timeout_s: 60 }))),
        ("Query", encode(&ClientMsg::Query { id: 4, query: Query::Session(SessionId(5)) })),
        ("Status", encode(&ClientMsg::Status { id: 5 })),
        ("StreamOpen Tail", encode(&open(tail))),
        ("StreamOpen Oldest", encode(&open(StreamOpen::Tail { from: TailFrom::Oldest, filter: Filter::default() }))),
        (
            "StreamOpen Watch",
            encode(&open(StreamOpen::Watch { kinds: vec![Kind(1)], resume_after: Some(Index(9)), window: Some(64) })),
        ),
        ("StreamAck", encode(&ClientMsg::StreamAck { stream: 2, seq: 8, error: Some("slow".into()) })),
        ("StreamClose", encode(&ClientMsg::StreamClose { stream: 2 })),
        ("Authenticate", encode(&ClientMsg::Authenticate { token: "s3cret".into() })),
    ];
    insta::assert_snapshot!("client_messages", golden(&frames));
}

#[test]
fn server_messages() {
    let hello = Hello {
        protocol: truba::wire::CLIENT_PROTOCOL_VERSION,
        cluster: 0x5eed,
        member: ReplicaId(1),
        leader: Some(ReplicaId(0)),
        members: vec![MemberAddr { id: ReplicaId(0), client: "10.0.0.0:7400".into() }],
    };
    let status = ServerStatus {
        version: "0.1.0".into(),
        engine: Engine::new(EngineConfig::default(), 1).status(),
        disk_bytes: 4096,
        connections: 2,
        role: "leader".into(),
    };
    let stream = |item| ServerMsg::Stream { stream: 2, seq: 1, item };
    let entries =
        StreamItem::Entries { entries: vec![bytes::Bytes::from_static(b"ledger")], events: 1, through: Index(12) };
    let frames = vec![
        ("Hello", encode(&ServerMsg::Hello(hello))),
        (
            "Reply ok",
            encode(&ServerMsg::Reply {
                client: ClientId(7),
                seq: Seq(3),
                outcome: Ok(Reply::Created { handle: handle() }),
            }),
        ),
        (
            "Reply stored",
            encode(&ServerMsg::Reply {
                client: ClientId(7),
                seq: Seq(4),
                outcome: Ok(Reply::Stored { due: UnixSecs(1_700_000_060) }),
            }),
        ),
        (
            "Reply refused",
            encode(&ServerMsg::Reply {
                client: ClientId(7),
                seq: Seq(5),
                outcome: Err(RequestError::NotLeader { leader: Some(ReplicaId(0)) }),
            }),
        ),
        (
            "QueryReply",
            encode(&ServerMsg::QueryReply {
                id: 4,
                reply: QueryReply::Session(Err(RequestError::SessionUnknown(SessionId(6)))),
            }),
        ),
        ("Status", encode(&ServerMsg::Status { id: 5, status })),
        ("Error", encode(&ServerMsg::Error { error: WireError::FrameTooLarge { len: 1 << 30, max: 1 << 20 } })),
        ("Error checksum", encode(&ServerMsg::Error { error: WireError::BadChecksum })),
        ("Error malformed", encode(&ServerMsg::Error { error: WireError::Malformed("bad".into()) })),
        ("Error connections", encode(&ServerMsg::Error { error: WireError::TooManyConnections { max: 1024 } })),
        ("Error inflight", encode(&ServerMsg::Error { error: WireError::TooManyInflight { max: 256 } })),
        ("Error shutting down", encode(&ServerMsg::Error { error: WireError::ShuttingDown })),
        ("Error credentials", encode(&ServerMsg::Error { error: WireError::BadCredentials })),
        ("Stream Entries", encode(&stream(entries))),
        ("Stream Progress", encode(&stream(StreamItem::Progress { through: Index(13) }))),
        ("Stream ResyncStart", encode(&stream(StreamItem::ResyncStart { at: Index(13) }))),
        ("Stream Resync", encode(&stream(StreamItem::Resync { sessions: Vec::new() }))),
        ("Stream Synced", encode(&stream(StreamItem::Synced { at: Index(13) }))),
        (
            "Stream End",
            encode(&stream(StreamItem::End(StreamError::Compacted { requested: Index(1), first_available: Index(5) }))),
        ),
        (
            "StreamRefused AlreadyOpen",
            encode(&ServerMsg::StreamRefused { stream: 2, refusal: StreamRefusal::AlreadyOpen }),
        ),
        ("StreamRefused NotOpen", encode(&ServerMsg::StreamRefused { stream: 2, refusal: StreamRefusal::NotOpen })),
        (
            "StreamRefused AckBeyondSent",
            encode(&ServerMsg::StreamRefused { stream: 2, refusal: StreamRefusal::AckBeyondSent { seq: 9, sent: 8 } }),
        ),
        (
            "StreamRefused ZeroWindow",
            encode(&ServerMsg::StreamRefused { stream: 2, refusal: StreamRefusal::ZeroWindow }),
        ),
        (
            "StreamRefused PermissionDenied",
            encode(&ServerMsg::StreamRefused {
                stream: 2,
                refusal: StreamRefusal::PermissionDenied(RequestError::PermissionDenied {
                    principal: "orders".into(),
                    verb: "read".into(),
                    kind: Some(Kind(2)),
                }),
            }),
        ),
        ("StreamEnded ShuttingDown", encode(&ServerMsg::StreamEnded { stream: 2, reason: StreamEnd::ShuttingDown })),
        (
            "StreamEnded ConnectionBehind",
            encode(&ServerMsg::StreamEnded {
                stream: 2,
                reason: StreamEnd::ConnectionBehind { queued_bytes: 9, max: 8 },
            }),
        ),
    ];
    insta::assert_snapshot!("server_messages", golden(&frames));
}

#[test]
fn handler_messages() {
    let deliver = PipeToHandler::Deliver {
        kind: Kind(1),
        handle: handle(),
        due: UnixSecs(1_700_000_060),
        records: vec![b"a".to_vec(), b"bc".to_vec()],
        servers: vec!["10.0.0.0:7400".into()],
    };
    let frames = vec![
        ("Deliver", encode(&deliver)),
        ("Ack ok", encode(&HandlerToPipe::Ack { handle: handle(), result: Ok(()) })),
        ("Ack failed", encode(&HandlerToPipe::Ack { handle: handle(), result: Err("database down".into()) })),
    ];
    insta::assert_snapshot!("handler_messages", golden(&frames));
}
