//! Golden bytes of every format the engine writes to disk: a log segment's header and a record
//! of every command (and of every request a client's command carries), a snapshot file, a
//! source file, the hard state file and a ledger file. An encoding that changes by accident (a field added, a
//! variant reordered) fails here, with the bytes side by side, instead of reaching a replica
//! that would read its own old log as damage and cut it.
//!
//! A deliberate change updates the snapshots (`INSTA_UPDATE=always cargo test -p truba-engine
//! --test formats`) together with the format's version (the digit in its magic) and the
//! upgrade notes in the README; see "Formats and upgrades" there.

mod common;

use common::driver::Driver;
use std::collections::BTreeMap;
use std::fmt::Write;
use truba_engine::codec::{encode_record, encode_segment_header, snapshot_name};
use truba_engine::{
    AppliedLimits, Attempt, ClientId, ClusterConfig, Command, CommitOp, ConsumerCommit, EngineConfig, Entry,
    FailureReason, Handle, Index, Kind, KindConfig, Limits, MemberAddrs, MemberChange, MemberRole, RedriveTarget,
    ReplicaId, Request, Seq, SessionId, SourceId, Term, UnixMs, UnixSecs, Unspilled,
};

/// Bytes as lines of 16, each led by its offset; a run of lines equal to the one before shows
/// as one `*` (as `hexdump` does), so a file of mostly zeros stays readable.
fn hex(bytes: &[u8]) -> String {
    let mut out = format!("{} bytes\n", bytes.len());
    let mut previous: Option<&[u8]> = None;
    let mut starred = false;
    for (i, line) in bytes.chunks(16).enumerate() {
        if previous == Some(line) {
            if !starred {
                out.push_str("*\n");
                starred = true;
            }
            continue;
        }
        (previous, starred) = (Some(line), false);
        write!(out, "{:06x}:", i * 16).expect("a string");
        for b in line {
            write!(out, " {b:02x}").expect("a string");
        }
        out.push('\n');
    }
    out
}

fn handle(session: u64) -> Handle {
    Handle { session: SessionId(session), attempt: Attempt(2) }
}

fn config() -> ClusterConfig {
    let mut kinds = BTreeMap::new();
    kinds.insert(Kind(1), KindConfig::default());
    ClusterConfig {
        version: 3,
        members: BTreeMap::from([(ReplicaId(0), MemberRole::Voter), (ReplicaId(3), MemberRole::Learner)]),
        addrs: BTreeMap::from([(ReplicaId(3), addrs())]),
        kinds,
        limits: AppliedLimits::from(&Limits::default()),
    }
}

fn addrs() -> MemberAddrs {
    MemberAddrs { peer: "10.0.0.3:7500".into(), client: "10.0.0.3:7400".into() }
}

/// One request of every kind a client sends.
fn requests() -> Vec<Request> {
    let commit = ConsumerCommit {
        consumer: "billing".into(),
        epoch: 4,
        through: Index(90),
        ops: vec![
            CommitOp::New { kind: Kind(1), records: vec![b"a".to_vec(), b"bc".to_vec()], store_s: Some(30) },
            CommitOp::Append { handle: handle(11), record: b"d".to_vec() },
            CommitOp::Replace { handle: handle(12), record: b"e".to_vec() },
            CommitOp::Delete { handle: handle(13) },
            CommitOp::Store { handle: handle(14), timeout_s: 60 },
            CommitOp::KeepAlive { handle: handle(15) },
        ],
    };
    vec![
        Request::New { kind: Kind(1), record: Some(b"first".to_vec()) },
        Request::New { kind: Kind(2), record: None },
        Request::Append { handle: handle(5), record: b"more".to_vec() },
        Request::Replace { handle: handle(5), record: b"instead".to_vec() },
        Request::Delete { handle: handle(5) },
        Request::Store { handle: handle(5), timeout_s: 120 },
        Request::KeepAlive { handle: handle(5) },
        Request::Redrive { target: RedriveTarget::Session(SessionId(6)) },
        Request::Redrive { target: RedriveTarget::Kind(Kind(1)) },
        Request::DropDead { session: SessionId(6) },
        Request::ConsumerOpen { consumer: "billing".into() },
        Request::ConsumerCommit(commit),
        Request::ConsumerDrop { consumer: "billing".into() },
        Request::Configure { expect_version: 2, kinds: config().kinds, limits: config().limits },
        Request::ChangeMembers { change: MemberChange::AddLearner(ReplicaId(3)), addrs: Some(addrs()) },
        Request::ChangeMembers { change: MemberChange::Promote(ReplicaId(3)), addrs: None },
        Request::ChangeMembers { change: MemberChange::Remove(ReplicaId(3)), addrs: None },
        Request::TransferLeader { to: ReplicaId(2) },
    ]
}

/// The command's variant. No wildcard: a new command fails to compile here, as a reminder to
/// give it a sample in `commands` (and a golden record).
fn command_name(c: &Command) -> &'static str {
    match c {
        Command::Client { .. } => "Client",
        Command::Take { .. } => "Take",
        Command::Spill { .. } => "Spill",
        Command::Merge { .. } => "Merge",
        Command::SourceReady { .. } => "SourceReady",
        Command::Expire { .. } => "Expire",
        Command::DeliveryFailed { .. } => "DeliveryFailed",
        Command::Noop => "Noop",
        Command::Reserve => "Reserve",
        Command::Commit { .. } => "Commit",
        Command::Bootstrap { .. } => "Bootstrap",
        Command::Members { .. } => "Members",
    }
}

const COMMANDS: [&str; 12] = [
    "Client",
    "Take",
    "Spill",
    "Merge",
    "SourceReady",
    "Expire",
    "DeliveryFailed",
    "Noop",
    "Reserve",
    "Commit",
    "Bootstrap",
    "Members",
];

/// One command of every kind, and a client command for every request.
fn commands() -> Vec<Command> {
    let mut out: Vec<Command> = requests()
        .into_iter()
        .enumerate()
        .map(|(i, request)| Command::Client {
            client: ClientId(7),
            seq: Seq(i as u64 + 1),
            request,
            due: (i % 2 == 0).then_some(UnixSecs(1_700_000_060)),
            principal: (i % 3 == 0).then(|| "alice".to_string()),
        })
        .collect();
    let unspilled = Unspilled {
        id: SessionId(21),
        records: vec![b"x".to_vec()],
        last_failure: Some(FailureReason::Handler("refused".into())),
    };
    let commit = match &requests()[11] {
        Request::ConsumerCommit(c) => c.clone(),
        other => panic!("the twelfth request is the consumer commit, not {other:?}"),
    };
    out.extend([
        Command::Take { sessions: vec![SessionId(20), SessionId(21)], unspilled: vec![unspilled] },
        Command::Spill { kind: Kind(1) },
        Command::Merge { kind: Kind(1), older: SourceId(30), newer: SourceId(40) },
        Command::SourceReady { source: SourceId(40) },
        Command::Expire { sessions: vec![(handle(22), UnixSecs(1_700_000_100))] },
        Command::DeliveryFailed {
            handle: handle(23),
            due: UnixSecs(1_700_000_200),
            reason: FailureReason::Unreachable("connection refused".into()),
        },
        Command::DeliveryFailed {
            handle: handle(24),
            due: UnixSecs(1_700_000_300),
            reason: FailureReason::LeaseExpired,
        },
        Command::Noop,
        Command::Reserve,
        Command::Commit {
            client: ClientId(8),
            seq: Seq(1),
            principal: None,
            commit,
            dues: vec![Some(UnixSecs(1_700_000_030)), None],
            ids_from: Index(100),
        },
        Command::Bootstrap { config: config() },
        Command::Members {
            client: ClientId(9),
            seq: Seq(2),
            principal: Some("operator".into()),
            change: MemberChange::AddLearner(ReplicaId(3)),
            members: config().members,
            addrs: Some(addrs()),
        },
    ]);
    out
}

#[test]
fn every_command_has_a_sample() {
    let names: Vec<&str> = commands().iter().map(command_name).collect();
    for name in COMMANDS {
        assert!(names.contains(&name), "command {name} has no golden sample");
    }
}

/// A segment header and one record of every command, chained as a segment holds them.
#[test]
fn log_segment() {
    let mut segment = encode_segment_header(Index(1), 0);
    let mut prev_crc = 0;
    for (i, command) in commands().into_iter().enumerate() {
        let entry = Entry { term: Term(2), index: Index(i as u64 + 1), at: UnixMs(1_700_000_000_123), command };
        prev_crc = encode_record(prev_crc, &entry, &mut segment);
    }
    let scan = truba_engine::codec::scan_segment(&segment).expect("a segment header");
    assert_eq!(scan.records.len(), commands().len(), "every record reads back");
    insta::assert_snapshot!("log_segment", hex(&segment));
}

/// A replica that took requests of several kinds, stored sessions until some spilled, and
/// took a snapshot: its files are what a real data directory holds.
fn busy_replica() -> Driver {
    let mut cfg = EngineConfig::default();
    cfg.limits.snapshot_every_entries = 20;
    cfg.limits.stored_memtable_bytes_max = 600;
    cfg.limits.preallocate_bytes = 0;
    let mut d = Driver::booted(cfg, 1);
    for i in 0..12u8 {
        let handle = match d.req(1, Request::New { kind: Kind(1), record: Some(vec![i; 24]) }) {
            Ok(truba_engine::Reply::Created { handle }) => handle,
            other => panic!("a new session: {other:?}"),
        };
        d.req(1, Request::Append { handle, record: vec![i; 8] }).expect("an append");
        d.req(1, Request::Store { handle, timeout_s: 3600 }).expect("a store");
    }
    d.advance(1000);
    d.tick();
    d
}

#[test]
fn snapshot_source_hard_state_and_ledger_files() {
    let d = busy_replica();
    let snapshot = d.dir.iter().find(|(f, _)| f.starts_with("snap-")).expect("the replica took a snapshot");
    let source = d.dir.iter().find(|(f, _)| f.starts_with("src-")).expect("the replica spilled sessions");
    assert!(truba_engine::decode_source_file(source.1).is_ok_and(|s| !s.is_empty()));
    assert!(snapshot.0.starts_with(&snapshot_name(Index(0))[..5]));
    insta::assert_snapshot!("snapshot_file", format!("{}\n{}", snapshot.0, hex(snapshot.1)));
    insta::assert_snapshot!("source_file", format!("{}\n{}", source.0, hex(source.1)));
    insta::assert_snapshot!("hard_state_file", hex(&d.dir["hardstate"]));
    let ledger = d.dir.iter().find(|(f, _)| f.starts_with("ledger-")).expect("the replica keeps a ledger");
    insta::assert_snapshot!("ledger_file", format!("{}\n{}", ledger.0, hex(ledger.1)));
}
