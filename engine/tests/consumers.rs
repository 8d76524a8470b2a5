//! Consumers with checkpoints through the engine's public API: epochs that fence, commits of a
//! checkpoint with session operations applied all or nothing, checkpoint reads and read-throughs.

mod common;

use common::driver::*;
use truba_engine::{
    Checkpoint, CommitOp, ConsumerCommit, EngineConfig, Handle, Index, Input, Kind, Outcome, Output, Query, QueryReply,
    Reply, Request, RequestError, SessionId,
};

fn open(d: &mut Driver, client: u64, name: &str) -> (u64, Index) {
    match d.req(client, Request::ConsumerOpen { consumer: name.into() }) {
        Ok(Reply::ConsumerOpened { epoch, through }) => (epoch, through),
        other => panic!("expected an open, got {other:?}"),
    }
}

fn commit(d: &mut Driver, client: u64, name: &str, epoch: u64, through: u64, ops: Vec<CommitOp>) -> Outcome {
    let c = ConsumerCommit { consumer: name.into(), epoch, through: Index(through), ops };
    d.req(client, Request::ConsumerCommit(c))
}

fn new_op(records: &[&str], store_s: Option<u32>) -> CommitOp {
    CommitOp::New { kind: Kind(1), records: records.iter().map(|r| r.as_bytes().to_vec()).collect(), store_s }
}

fn session(d: &mut Driver, client: u64, record: &str) -> Handle {
    match d.req(client, Request::New { kind: Kind(1), record: Some(record.as_bytes().to_vec()) }) {
        Ok(Reply::Created { handle }) => handle,
        other => panic!("expected Created, got {other:?}"),
    }
}

fn checkpoint(d: &mut Driver, name: &str) -> Result<Checkpoint, RequestError> {
    match d.query(Query::Checkpoint { consumer: name.into() }) {
        QueryReply::Checkpoint(r) => r,
        other => panic!("unexpected {other:?}"),
    }
}

/// The sessions held, as (id, records), to compare before and after a refused commit.
fn sessions(d: &Driver) -> Vec<(SessionId, Vec<Vec<u8>>)> {
    d.views().into_iter().map(|v| (v.id, v.records)).collect()
}

#[test]
fn opening_a_consumer_again_fences_the_older_epoch_and_its_commit_changes_nothing() {
    let mut d = Driver::booted(EngineConfig::default(), 1);
    let (first, through) = open(&mut d, 1, "billing");
    assert_eq!(through, Index(0), "a new consumer starts with nothing processed");
    assert_eq!(first, d.engine.state().applied().0, "the epoch is the open's index");
    let (second, _) = open(&mut d, 2, "billing");
    assert!(second > first);
    let before = (sessions(&d), checkpoint(&mut d, "billing"));
    let stale = commit(&mut d, 1, "billing", first, 1, vec![new_op(&["x"], None)]);
    assert_eq!(stale, Err(RequestError::StaleEpoch { epoch: first, current: second }));
    assert_eq!((sessions(&d), checkpoint(&mut d, "billing")), before, "a stale commit applies nothing");
    let ok = commit(&mut d, 2, "billing", second, 2, vec![]);
    assert_eq!(ok, Ok(Reply::Committed { through: Index(2), results: vec![] }));
    assert_eq!(checkpoint(&mut d, "billing").unwrap().through, Index(2));
}

#[test]
fn a_commit_applies_its_operations_with_its_checkpoint_and_its_sessions_take_reserved_indexes() {
    let mut d = Driver::booted(EngineConfig::default(), 1);
    let keep = session(&mut d, 5, "kept");
    let gone = session(&mut d, 6, "done");
    let (epoch, _) = open(&mut d, 1, "orders");
    let at = d.engine.state().applied();
    let ops = vec![
        new_op(&["job a"], None),
        CommitOp::Append { handle: keep, record: b"more".to_vec() },
        new_op(&["job b", "detail"], Some(60)),
        CommitOp::Delete { handle: gone },
        new_op(&["job c"], None),
    ];
    let Ok(Reply::Committed { through, results }) = commit(&mut d, 1, "orders", epoch, at.0, ops) else {
        panic!("the commit applies")
    };
    assert_eq!(through, at);
    let created: Vec<SessionId> = results
        .iter()
        .filter_map(|r| match r {
            Reply::Created { handle } => Some(handle.session),
            _ => None,
        })
        .collect();
    // Two indexes reserved before the commit's own: three sessions, three consecutive ids.
    let commit_index = d.engine.state().applied();
    assert_eq!(created, [SessionId(commit_index.0 - 2), SessionId(commit_index.0 - 1), SessionId(commit_index.0)]);
    let views = d.views();
    let records = |id: SessionId| views.iter().find(|v| v.id == id).map(|v| v.records.clone());
    assert_eq!(records(created[1]), Some(vec![b"job b".to_vec(), b"detail".to_vec()]));
    assert!(matches!(
        views.iter().find(|v| v.id == created[1]).unwrap().state,
        truba_engine::SessionState::Stored { .. }
    ));
    assert_eq!(records(keep.session), Some(vec![b"kept".to_vec(), b"more".to_vec()]));
    assert_eq!(records(gone.session), None, "deleted");
    assert_eq!(checkpoint(&mut d, "orders").unwrap().through, at);
}

#[test]
fn a_commit_with_one_refused_operation_applies_nothing() {
    let mut d = Driver::booted(EngineConfig::default(), 1);
    let a = session(&mut d, 5, "a");
    let b = session(&mut d, 6, "b");
    d.req(6, Request::Delete { handle: b }).unwrap();
    let (epoch, _) = open(&mut d, 1, "c");
    let before = (sessions(&d), checkpoint(&mut d, "c"));
    let ops = vec![
        new_op(&["new"], None),
        CommitOp::Append { handle: a, record: b"x".to_vec() },
        CommitOp::Append { handle: b, record: b"y".to_vec() },
    ];
    let refused = commit(&mut d, 1, "c", epoch, 2, ops);
    assert_eq!(
        refused,
        Err(RequestError::CommitOpFailed { op: 2, error: Box::new(RequestError::SessionDeleted(b.session)) })
    );
    assert_eq!((sessions(&d), checkpoint(&mut d, "c")), before, "all or nothing");
    let twice = vec![CommitOp::Append { handle: a, record: b"1".to_vec() }, CommitOp::KeepAlive { handle: a }];
    assert_eq!(commit(&mut d, 1, "c", epoch, 2, twice), Err(RequestError::SessionTwiceInCommit(a.session)));
    let c = commit(&mut d, 1, "c", epoch, 3, vec![]);
    assert!(c.is_ok());
    assert_eq!(
        commit(&mut d, 1, "c", epoch, 2, vec![]),
        Err(RequestError::CheckpointBehind { through: Index(2), current: Index(3) })
    );
    let far = d.engine.state().applied().0 + 10;
    assert!(matches!(commit(&mut d, 1, "c", epoch, far, vec![]), Err(RequestError::ThroughBeyondLog { .. })));
    assert_eq!(commit(&mut d, 1, "nobody", 1, 1, vec![]), Err(RequestError::UnknownConsumer("nobody".into())));
}

#[test]
fn a_retried_commit_is_applied_once() {
    let mut d = Driver::booted(EngineConfig::default(), 1);
    let (epoch, _) = open(&mut d, 1, "c");
    let c = ConsumerCommit { consumer: "c".into(), epoch, through: Index(1), ops: vec![new_op(&["once"], None)] };
    let first = d.call(9, 1, Request::ConsumerCommit(c.clone()));
    let again = d.call(9, 1, Request::ConsumerCommit(c));
    assert_eq!(first, again, "the retry is answered from the deduplication table");
    let onces = d.views().iter().filter(|v| v.records == vec![b"once".to_vec()]).count();
    assert_eq!(onces, 1);
}

#[test]
fn read_through_waits_for_the_checkpoint_to_cover_the_index_or_times_out() {
    let mut d = Driver::booted(EngineConfig::default(), 1);
    let (epoch, _) = open(&mut d, 1, "c");
    let target = d.engine.state().applied();
    let mark = d.input(Input::Query {
        id: 7,
        query: Query::ReadThrough { consumer: "c".into(), index: target, timeout_ms: 5_000 },
    });
    let answered = |d: &Driver, mark| {
        d.since(mark).iter().find_map(|o| match o {
            Output::QueryReply { id: 7, reply } => Some(reply.clone()),
            _ => None,
        })
    };
    assert_eq!(answered(&d, mark), None, "it waits");
    commit(&mut d, 1, "c", epoch, target.0 - 1, vec![]).unwrap();
    assert_eq!(answered(&d, mark), None, "a checkpoint below the index does not answer it");
    commit(&mut d, 1, "c", epoch, target.0, vec![]).unwrap();
    let want = Checkpoint { consumer: "c".into(), epoch, through: target };
    assert_eq!(answered(&d, mark), Some(QueryReply::Checkpoint(Ok(want))), "answered once covered");
    let far = Index(target.0 + 100);
    let mark = d.input(Input::Query {
        id: 7,
        query: Query::ReadThrough { consumer: "c".into(), index: far, timeout_ms: 2_000 },
    });
    d.advance(1_000);
    d.input(Input::Tick);
    assert_eq!(answered(&d, mark), None);
    d.advance(1_500);
    d.input(Input::Tick);
    assert_eq!(answered(&d, mark), Some(QueryReply::Checkpoint(Err(RequestError::TimedOut { ms: 2_000 }))));
    let q = Query::ReadThrough { consumer: "x".into(), index: far, timeout_ms: 1 };
    let mark = d.input(Input::Query { id: 7, query: q });
    assert_eq!(answered(&d, mark), Some(QueryReply::Checkpoint(Err(RequestError::UnknownConsumer("x".into())))));
}

#[test]
fn checkpoints_survive_snapshots_and_restarts() {
    let mut cfg = EngineConfig::default();
    cfg.limits.snapshot_every_entries = 5;
    let mut d = Driver::booted(cfg.clone(), 1);
    let (epoch, _) = open(&mut d, 1, "c");
    for i in 1..=20 {
        commit(&mut d, 1, "c", epoch, i, vec![new_op(&["r"], None)]).unwrap();
    }
    assert!(!d.files("snap-", "").is_empty());
    let mut r = d.restart(cfg, 2);
    r.pump();
    let c = checkpoint(&mut r, "c").unwrap();
    assert_eq!((c.epoch, c.through), (epoch, Index(20)));
}

#[test]
fn consumer_names_and_counts_are_limited() {
    let mut cfg = EngineConfig::default();
    cfg.limits.consumers_max = 2;
    cfg.limits.commit_ops_max = 2;
    let mut d = Driver::booted(cfg, 1);
    for bad in ["", "has space", "quote\"", &"x".repeat(200)] {
        let got = d.req(1, Request::ConsumerOpen { consumer: bad.into() });
        assert!(matches!(got, Err(RequestError::InvalidName(_))), "{bad:?}: {got:?}");
    }
    open(&mut d, 1, "a");
    let (epoch, _) = open(&mut d, 1, "b/c.d-e_f");
    assert_eq!(
        d.req(1, Request::ConsumerOpen { consumer: "z".into() }),
        Err(RequestError::TooManyConsumers { max: 2 })
    );
    let three = vec![new_op(&["1"], None), new_op(&["2"], None), new_op(&["3"], None)];
    assert_eq!(commit(&mut d, 1, "b/c.d-e_f", epoch, 1, three), Err(RequestError::TooManyOps { max: 2 }));
    assert_eq!(d.req(1, Request::ConsumerDrop { consumer: "a".into() }), Ok(Reply::Done));
    assert!(matches!(d.req(1, Request::ConsumerOpen { consumer: "z".into() }), Ok(Reply::ConsumerOpened { .. })));
}
