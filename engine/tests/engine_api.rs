//! Integration tests of the engine through its public API only.
//!
//! The driver below is a tiny, perfect in-memory disk: a map from file name to bytes. Every
//! `Output::Io` is executed at once and its completion fed back, unless a hold predicate says to
//! keep it back; held operations are executed and completed only when released, so tests can
//! observe what the engine does (and does not do) while a write or an fsync is outstanding.

mod common;

use common::driver::*;
use common::Dir;
use std::collections::BTreeMap;
use truba_engine::codec::{decode_record, scan_segment, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use truba_engine::{
    Attempt, ClientId, Command, EngineConfig, Fatal, Handle, Index, Input, IoOp, Kind, KindConfig, Output, Query,
    QueryReply, Reply, Request, RequestError, Seq, SessionId, SessionState, UnixSecs,
};
use truba_engine::{FailureReason, ReplicaId, RoleName, Term};

fn is_write_to_segment(op: &IoOp) -> bool {
    matches!(op, IoOp::Write { file, .. } if file.starts_with("log-"))
}

/// Decodes the log records in a batch write (skipping a segment header if the write has one).
fn records_in_write(data: &[u8], offset: u64) -> Vec<truba_engine::Entry> {
    let mut at = if offset == 0 { SEGMENT_HEADER_LEN } else { 0 };
    let mut out = Vec::new();
    while at < data.len() {
        let d = decode_record(data, at).expect("a batch write holds whole, valid records");
        at = d.end;
        out.push(d.entry);
    }
    out
}

/// A mixed workload of `n` operations over a few clients and kind 1. Returns the ids created.
fn workload(d: &mut Driver, n: usize) -> Vec<SessionId> {
    let mut live: Vec<Handle> = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let client = (i % 4) as u64 + 1;
        let record = format!("rec-{i}").into_bytes();
        if live.is_empty() || i % 10 == 0 || i % 10 == 5 {
            let h = created(d.req(client, new(1, Some(&record))));
            ids.push(h.session);
            live.push(h);
        } else {
            let h = live[i % live.len()];
            let outcome = match i % 10 {
                1 | 2 | 6 | 7 => d.req(client, append(h, &record)),
                3 => d.req(client, Request::Replace { handle: h, record }),
                4 => {
                    live.retain(|x| *x != h);
                    d.req(client, Request::Store { handle: h, timeout_s: 1 })
                }
                8 => {
                    live.retain(|x| *x != h);
                    d.req(client, Request::Delete { handle: h })
                }
                _ => d.req(client, Request::KeepAlive { handle: h }),
            };
            assert!(outcome.is_ok(), "op {i} on {h:?}: {outcome:?}");
        }
        d.advance(50);
        if i % 7 == 0 {
            d.tick();
        }
    }
    ids
}

// ---- 1. boot -----------------------------------------------------------------------------------

#[test]
fn boot_on_empty_dir_recovers_at_zero_and_refuses_requests_until_then() {
    let mut d = Driver::new(EngineConfig::default(), 1);

    // Before Boot at all.
    assert_eq!(d.call(1, 1, new(1, None)), Err(RequestError::NotReady));

    // Boot, but hold every disk operation so recovery cannot finish.
    d.hold_if(|_| true);
    let mark = d.input(Input::Boot);
    assert!(d.recovered_since(mark).is_none());
    assert_eq!(d.held.iter().map(|(_, op)| op.clone()).collect::<Vec<_>>(), vec![IoOp::List]);
    assert!(!d.engine.is_serving());
    assert_eq!(d.call(1, 2, new(1, None)), Err(RequestError::NotReady));
    assert!(d.held.len() == 1, "a refused request issues no disk operation");
    // Queries are not answered from a state that is not yet the replica's.
    assert_eq!(d.query(Query::Session(SessionId(1))), QueryReply::Session(Err(RequestError::NotReady)));
    assert!(!d.status().serving);

    let mark = d.release();
    let (applied, hash, torn) = d.recovered_since(mark).expect("recovered after the List completes");
    assert_eq!(applied, Index(0));
    assert_eq!(torn, 0);
    assert!(d.engine.is_serving());
    let st = d.status();
    assert!(st.serving);
    // A lone replica elects itself at once; its first entries as leader are a no-op at index 1
    // and the new cluster's configuration at index 2.
    assert_eq!((st.applied, st.durable, st.sessions_active, st.sessions_stored), (Index(2), Index(2), 0, 0));
    assert_eq!((st.role, st.term, st.leader), (RoleName::Leader, Term(1), Some(ReplicaId(0))));
    assert_ne!(st.state_hash, hash, "the hash covers the applied index");

    // NotReady was not remembered: the same (client, seq) now goes through.
    let h = created(d.call(1, 2, new(1, Some(b"x"))));
    assert_eq!(h, Handle { session: SessionId(3), attempt: Attempt(0) });
}

// ---- 2. round trip -----------------------------------------------------------------------------

#[test]
fn new_append_replace_delete_store_round_trip() {
    let mut d = Driver::booted(EngineConfig::default(), 2);

    let a = created(d.req(1, new(1, Some(b"a1"))));
    assert_eq!(a.attempt, Attempt(0));
    assert_eq!(a.session.0, d.status().applied.0, "session id is the index of the creating entry");
    assert_eq!(d.req(1, append(a, b"a2")), Ok(Reply::Done));
    assert_eq!(d.req(2, append(a, b"a3")), Ok(Reply::Done));

    let b = created(d.req(2, new(1, None)));
    assert_eq!(b.session, SessionId(6));
    assert_eq!(b.session.0, d.status().applied.0, "session id is the index of the creating entry");

    let v = d.session(a.session).unwrap();
    assert_eq!(v.records, recs(&[b"a1", b"a2", b"a3"]));
    assert_eq!(v.bytes, 6);
    assert_eq!(v.kind, Kind(1));
    assert_eq!(v.handle, a);
    assert!(matches!(v.state, SessionState::Active { delivering: false, .. }));

    assert_eq!(d.req(1, Request::Replace { handle: a, record: b"R".to_vec() }), Ok(Reply::Done));
    let v = d.session(a.session).unwrap();
    assert_eq!(v.records, recs(&[b"R"]));
    assert_eq!(v.bytes, 1);
    assert_eq!(d.req(1, append(a, b"after")), Ok(Reply::Done));
    assert_eq!(d.session(a.session).unwrap().records, recs(&[b"R", b"after"]));

    // Store b: due = wall seconds + timeout + jitter in 0..=10 (default kind).
    let wall_s = d.wall_ms() / 1000;
    let due = stored_due(d.req(2, Request::Store { handle: b, timeout_s: 100 }));
    assert!(due.0 >= wall_s + 100 && due.0 <= wall_s + 110, "due {due:?} for wall {wall_s}");
    assert_eq!(d.session(b.session).unwrap().state, SessionState::Stored { due });
    assert_eq!(d.req(2, append(b, b"no")), Err(RequestError::SessionStored(b.session)));
    let st = d.status();
    assert_eq!((st.sessions_active, st.sessions_stored), (1, 1));

    // Delete a: everything about it now answers SessionDeleted.
    assert_eq!(d.req(1, Request::Delete { handle: a }), Ok(Reply::Done));
    assert_eq!(d.session(a.session), Err(RequestError::SessionDeleted(a.session)));
    for r in [
        append(a, b"x"),
        Request::Replace { handle: a, record: b"y".to_vec() },
        Request::Store { handle: a, timeout_s: 1 },
        Request::KeepAlive { handle: a },
        Request::Delete { handle: a },
    ] {
        assert_eq!(d.req(1, r), Err(RequestError::SessionDeleted(a.session)));
    }
    // A never-created id is unknown, not deleted.
    let ghost = Handle { session: SessionId(1000), attempt: Attempt(0) };
    assert_eq!(d.req(1, append(ghost, b"x")), Err(RequestError::SessionUnknown(SessionId(1000))));
    let st = d.status();
    assert_eq!((st.sessions_active, st.sessions_stored), (0, 1));
}

// ---- 3. no reply before fsync --------------------------------------------------------------------

#[test]
fn no_reply_before_the_fsync_completes() {
    let mut d = Driver::booted(EngineConfig::default(), 3);
    let h = created(d.req(1, new(1, Some(b"first"))));
    let before = d.status();

    d.hold_if(|op| matches!(op, IoOp::Sync { file } if file.starts_with("log-")));
    let mark = d.send(1, 2, append(h, b"second"));
    let ios = d.ios_since(mark);
    assert!(ios.iter().any(is_write_to_segment), "the write was issued: {ios:?}");
    assert_eq!(d.held.len(), 1, "the fsync is held: {:?}", d.held);
    assert!(matches!(&d.held[0].1, IoOp::Sync { .. }));
    // The write itself completed (it was not held) ...
    let seg = d.segments().pop().unwrap();
    assert!(d.dir[&seg].windows(6).any(|w| w == b"second"), "write reached the directory");
    // ... but nothing was answered or applied.
    assert!(d.replies_since(mark).is_empty(), "reply before fsync: {:?}", d.replies_since(mark));
    assert_eq!(d.session(h.session).unwrap().records, recs(&[b"first"]));
    let during = d.status();
    assert_eq!(
        (during.applied, during.durable, during.state_hash),
        (before.applied, before.durable, before.state_hash)
    );

    let mark = d.release();
    let replies = d.replies_since(mark);
    assert_eq!(replies, vec![(ClientId(1), Seq(2), Ok(Reply::Done))]);
    assert_eq!(d.session(h.session).unwrap().records, recs(&[b"first", b"second"]));
    assert_eq!(d.status().applied, before.applied.next());
}

// ---- 4. group commit ------------------------------------------------------------------------------

#[test]
fn group_commit_takes_everything_waiting_in_one_write_and_one_fsync() {
    let mut d = Driver::booted(EngineConfig::default(), 4);
    created(d.req(1000, new(1, None))); // the segment exists from here on

    d.hold_if(|op| matches!(op, IoOp::Sync { file } if file.starts_with("log-")));
    let first = d.send(0, 1, new(1, Some(b"first")));
    assert_eq!(d.ios_since(first).iter().filter(|op| is_write_to_segment(op)).count(), 1);
    assert_eq!(d.held.len(), 1);

    let burst = d.mark();
    for c in 1..=50u64 {
        d.send(c, 1, new(1, Some(format!("c{c}").as_bytes())));
    }
    assert!(d.ios_since(burst).is_empty(), "no IO while a batch is in flight: {:?}", d.ios_since(burst));
    assert!(d.replies_since(first).is_empty());

    let mark = d.release();
    let ios = d.ios_since(mark);
    let writes: Vec<_> = ios.iter().filter(|op| is_write_to_segment(op)).collect();
    let syncs: Vec<_> = ios.iter().filter(|op| matches!(op, IoOp::Sync { .. })).collect();
    assert_eq!(writes.len(), 1, "one write for the whole group: {ios:?}");
    assert_eq!(syncs.len(), 1, "one fsync for the whole group: {ios:?}");
    let IoOp::Write { data, offset, .. } = writes[0] else { unreachable!() };
    let entries = records_in_write(data, *offset);
    let clients: Vec<u64> = entries
        .iter()
        .map(|e| match &e.command {
            Command::Client { client, .. } => client.0,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(clients, (1..=50).collect::<Vec<_>>());

    // Every client got its answer, the first one first, and only after the group's fsync.
    let replies = d.replies_since(mark);
    assert_eq!(replies.len(), 51);
    assert_eq!(replies[0].0, ClientId(0));
    let sync_at = d.since(mark).iter().rposition(|o| matches!(o, Output::Io { op: IoOp::Sync { .. }, .. })).unwrap();
    let first_group_reply =
        d.since(mark).iter().position(|o| matches!(o, Output::Reply { client, .. } if client.0 >= 1)).unwrap();
    assert!(sync_at < first_group_reply);
    for (i, (c, s, o)) in replies[1..].iter().enumerate() {
        assert_eq!((c.0, s.0), (i as u64 + 1, 1));
        assert_eq!(created(o.clone()).session, SessionId(5 + i as u64));
    }
}

// ---- 5. dedup -------------------------------------------------------------------------------------

#[test]
fn a_retried_request_is_applied_once_and_answered_the_same() {
    let mut d = Driver::booted(EngineConfig::default(), 5);
    let h = created(d.call(1, 1, new(1, Some(b"r0"))));

    // Retry while the original is in flight: no second entry, one answer.
    d.hold_if(|op| matches!(op, IoOp::Sync { file } if file.starts_with("log-")));
    let mark = d.send(2, 7, append(h, b"once"));
    let retry = d.send(2, 7, append(h, b"once"));
    assert!(d.since(retry).is_empty(), "an in-flight retry is silent: {:?}", d.since(retry));
    let applied_before = d.status().applied;
    d.release();
    let replies = d.replies_since(mark);
    assert_eq!(replies, vec![(ClientId(2), Seq(7), Ok(Reply::Done))]);
    assert_eq!(d.status().applied, applied_before.next(), "one entry for the request and its retry");

    // Retry after the answer: the same answer, from the table, with no disk work.
    let hash = d.status().state_hash;
    let mark = d.send(2, 7, append(h, b"once"));
    assert!(d.ios_since(mark).is_empty());
    assert_eq!(d.replies_since(mark), replies);
    assert_eq!(d.session(h.session).unwrap().records, recs(&[b"r0", b"once"]));
    assert_eq!(d.status().state_hash, hash);

    // A retried New answers the same handle and creates nothing.
    let again = created(d.call(1, 1, new(1, Some(b"r0"))));
    assert_eq!(again, h);
    assert_eq!(d.status().sessions_active, 1);

    // Lower sequence after a higher one.
    assert_eq!(d.call(2, 9, append(h, b"nine")), Ok(Reply::Done));
    assert_eq!(d.call(2, 8, append(h, b"eight")), Err(RequestError::StaleSequence { seq: 8, last: 9 }));
    assert_eq!(d.call(2, 7, append(h, b"once")), Err(RequestError::StaleSequence { seq: 7, last: 9 }));
    // And while a higher one is still in flight.
    d.hold_if(|op| matches!(op, IoOp::Sync { file } if file.starts_with("log-")));
    let mark = d.send(2, 12, append(h, b"twelve"));
    assert_eq!(d.call(2, 11, append(h, b"eleven")), Err(RequestError::StaleSequence { seq: 11, last: 12 }));
    d.release();
    assert_eq!(d.replies_since(mark).last().unwrap().2, Ok(Reply::Done));
    assert_eq!(d.session(h.session).unwrap().records, recs(&[b"r0", b"once", b"nine", b"twelve"]));
}

// ---- 6. limits ------------------------------------------------------------------------------------

fn limits_cfg() -> EngineConfig {
    cfg_with(
        2,
        KindConfig {
            record_bytes_max: 100,
            session_bytes_max: 250,
            session_records_max: 4,
            store_timeout_s_max: 3_600,
            ..KindConfig::default()
        },
    )
}

#[test]
fn refusals_change_nothing() {
    let mut d = Driver::booted(limits_cfg(), 6);
    let h = created(d.req(1, new(2, Some(&[1; 100]))));
    let view = d.session(h.session).unwrap();

    // Precheck refusals: no log entry, no disk work, state hash untouched.
    let prechecked: Vec<(Request, RequestError)> = vec![
        (append(h, &[2; 101]), RequestError::RecordTooLarge { size: 101, max: 100 }),
        (Request::Replace { handle: h, record: vec![2; 101] }, RequestError::RecordTooLarge { size: 101, max: 100 }),
        (new(2, Some(&[3; 101])), RequestError::RecordTooLarge { size: 101, max: 100 }),
        (new(99, None), RequestError::UnknownKind(Kind(99))),
        (new(99, Some(b"x")), RequestError::UnknownKind(Kind(99))),
        (
            Request::Store { handle: h, timeout_s: 3_601 },
            RequestError::TimeoutTooLong { timeout_s: 3_601, max_s: 3_600 },
        ),
    ];
    for (i, (request, error)) in prechecked.into_iter().enumerate() {
        let before = d.status();
        let mark = d.send(10 + i as u64, 1, request.clone());
        assert_eq!(d.replies_since(mark), vec![(ClientId(10 + i as u64), Seq(1), Err(error))], "{request:?}");
        assert!(d.ios_since(mark).is_empty(), "a precheck refusal writes nothing: {request:?}");
        assert_eq!(d.status(), before, "state unchanged after {request:?}");
    }
    assert_eq!(d.session(h.session).unwrap(), view);

    // Apply-time refusals: logged (the dedup table remembers the answer), but the session is as
    // it was, and the retry is answered from the table.
    assert_eq!(d.req(1, append(h, &[4; 100])), Ok(Reply::Done)); // 200 bytes
    let view = d.session(h.session).unwrap();
    let before = d.status();
    let refused = append(h, &[5; 51]);
    let outcome = d.call(1, 100, refused.clone());
    assert_eq!(outcome, Err(RequestError::SessionTooLarge { bytes: 251, max: 250 }));
    let after = d.status();
    assert_eq!(after.applied, before.applied.next(), "the refusal was logged");
    assert_ne!(after.state_hash, before.state_hash, "the remembered answer is part of the state");
    assert_eq!(d.session(h.session).unwrap(), view, "the session did not change");
    let mark = d.send(1, 100, refused);
    assert!(d.ios_since(mark).is_empty());
    assert_eq!(d.replies_since(mark)[0].2, outcome);
    assert_eq!(d.status(), after);

    // Replace is measured against the replacement alone, and too many records is refused too.
    assert_eq!(d.call(1, 101, Request::Replace { handle: h, record: vec![6; 100] }), Ok(Reply::Done));
    for i in 0..3u64 {
        assert_eq!(d.call(1, 102 + i, append(h, &[7; 10])), Ok(Reply::Done));
    }
    let view = d.session(h.session).unwrap();
    assert_eq!(view.records.len(), 4);
    assert_eq!(d.call(1, 110, append(h, &[8; 1])), Err(RequestError::TooManyRecords { max: 4 }));
    assert_eq!(d.session(h.session).unwrap(), view);
}

/// A New whose first record is within `record_bytes_max` but beyond `session_bytes_max` must be
/// refused like the equivalent Append to an empty session.
#[test]
fn new_with_a_first_record_over_the_session_limit_is_refused() {
    let cfg = cfg_with(3, KindConfig { record_bytes_max: 100, session_bytes_max: 50, ..KindConfig::default() });
    let mut d = Driver::booted(cfg, 6);
    // The same 80 bytes through Append to an empty session are refused ...
    let empty = created(d.req(1, new(3, None)));
    assert_eq!(d.req(1, append(empty, &[1; 80])), Err(RequestError::SessionTooLarge { bytes: 80, max: 50 }));
    // ... but through New they make a session over its kind's limit.
    let outcome = d.req(1, new(3, Some(&[1; 80])));
    assert_eq!(outcome, Err(RequestError::SessionTooLarge { bytes: 80, max: 50 }));
    assert!(d.views().iter().all(|v| v.bytes <= 50), "a session over session_bytes_max: {:?}", d.views());
}

// ---- 7. fencing -----------------------------------------------------------------------------------

#[test]
fn redelivery_fences_the_old_handle() {
    let mut d = Driver::booted(cfg_with(3, quick_kind()), 7);
    let h0 = created(d.req(1, new(3, Some(b"one"))));
    assert_eq!(d.req(1, append(h0, b"two")), Ok(Reply::Done));

    let wall_s = d.wall_ms() / 1000;
    let due = stored_due(d.req(1, Request::Store { handle: h0, timeout_s: 3 }));
    assert_eq!(due, UnixSecs(wall_s + 3), "no jitter with a zero window");
    // Stored, not yet delivered: the old handle is refused as stored.
    assert_eq!(d.req(1, append(h0, b"x")), Err(RequestError::SessionStored(h0.session)));

    // Just before the due second: nothing goes out.
    d.t = due.0 * 1000 - WALL0 - 1;
    let mark = d.tick();
    assert!(d.deliveries_since(mark).is_empty(), "delivered early: {:?}", d.deliveries_since(mark));
    assert!(matches!(d.session(h0.session).unwrap().state, SessionState::Stored { .. }));

    // From the due second on, a tick takes it and the engine delivers it with a new attempt.
    d.advance(1);
    let mark = d.tick();
    let dl = d.deliveries_since(mark);
    assert_eq!(dl.len(), 1, "{:?}", d.since(mark));
    let (kind, h1, ddue, records) = dl[0].clone();
    assert_eq!(kind, Kind(3));
    assert_eq!(h1, Handle { session: h0.session, attempt: Attempt(1) });
    assert_eq!(ddue, due);
    assert_eq!(records, recs(&[b"one", b"two"]));
    // The delivery came out only after the take was durable.
    let deliver_at = d.since(mark).iter().position(|o| matches!(o, Output::Deliver { .. })).unwrap();
    assert!(d.since(mark)[..deliver_at].iter().any(|o| matches!(o, Output::Io { op: IoOp::Sync { .. }, .. })));
    let v = d.session(h0.session).unwrap();
    assert_eq!(v.handle, h1);
    assert!(matches!(v.state, SessionState::Active { delivering: true, .. }));

    // The old handle is fenced off for everything.
    let stale = RequestError::StaleAttempt { handle: h0, current: Attempt(1) };
    for r in [
        append(h0, b"x"),
        Request::Replace { handle: h0, record: b"x".to_vec() },
        Request::Store { handle: h0, timeout_s: 1 },
        Request::KeepAlive { handle: h0 },
        Request::Delete { handle: h0 },
    ] {
        assert_eq!(d.req(1, r), Err(stale.clone()));
    }
    // The new one works.
    assert_eq!(d.req(2, append(h1, b"three")), Ok(Reply::Done));
    assert_eq!(d.session(h0.session).unwrap().records, recs(&[b"one", b"two", b"three"]));

    // A failed delivery stores it again after the backoff base; the next delivery fences h1.
    let wall_s = d.wall_ms() / 1000;
    d.input(Input::DeliveryFailed { handle: h1, reason: failed() });
    assert_eq!(d.session(h0.session).unwrap().state, SessionState::Stored { due: UnixSecs(wall_s + 2) });
    d.t = (wall_s + 2) * 1000 - WALL0;
    let mark = d.tick();
    let dl = d.deliveries_since(mark);
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].1, Handle { session: h0.session, attempt: Attempt(2) });
    assert_eq!(d.req(2, append(h1, b"x")), Err(RequestError::StaleAttempt { handle: h1, current: Attempt(2) }));
    assert_eq!(d.req(3, Request::Delete { handle: dl[0].1 }), Ok(Reply::Done));
    assert_eq!(d.session(h0.session), Err(RequestError::SessionDeleted(h0.session)));
}

/// Fails every delivery of `id` that comes due, `n` times, checking each backoff, and returns the
/// handle of the last delivery (already failed).
fn fail_deliveries(d: &mut Driver, id: SessionId, n: u32, expect_backoff_s: &[u64]) -> Handle {
    let mut last = None;
    let before = d.session(id).unwrap().failures;
    for i in 0..n {
        let due = match d.session(id).unwrap().state {
            SessionState::Stored { due } => due,
            other => panic!("failure {i}: not stored but {other:?}"),
        };
        d.t = due.0 * 1000 - WALL0;
        let mark = d.tick();
        let dl = d.deliveries_since(mark);
        assert_eq!(dl.len(), 1, "failure {i}: one delivery");
        let h = dl[0].1;
        let wall_s = d.wall_ms() / 1000;
        d.input(Input::DeliveryFailed { handle: h, reason: failed() });
        let v = d.session(id).unwrap();
        assert_eq!(v.failures, before + i + 1);
        assert_eq!(v.deliveries, h.attempt.0);
        assert_eq!(v.last_failure, Some(failed()));
        if let Some(backoff) = expect_backoff_s.get(i as usize) {
            assert_eq!(v.state, SessionState::Stored { due: UnixSecs(wall_s + backoff) }, "failure {i}");
        }
        last = Some(h);
    }
    last.expect("n > 0")
}

fn dead_page(d: &mut Driver, kind: u32) -> truba_engine::DeadPage {
    match d.query(Query::Dead { kind: Kind(kind), after: None, limit: 100 }) {
        QueryReply::Dead(Ok(page)) => page,
        other => panic!("{other:?}"),
    }
}

#[test]
fn failed_deliveries_back_off_exponentially_up_to_the_cap_and_then_go_to_the_dead_letter_set() {
    let kc = KindConfig { backoff_base_s: 2, backoff_cap_s: 5, max_attempts: 4, ..quick_kind() };
    let mut d = Driver::booted(cfg_with(3, kc), 7);
    let h0 = created(d.req(1, new(3, Some(b"one"))));
    d.req(1, Request::Store { handle: h0, timeout_s: 0 }).unwrap();
    // 2 s, 4 s, then capped at 5 s; the fourth failure is the last attempt.
    let last = fail_deliveries(&mut d, h0.session, 3, &[2, 4, 5]);
    assert_eq!(last.attempt, Attempt(3));
    let h4 = fail_deliveries(&mut d, h0.session, 1, &[]);
    let v = d.session(h0.session).unwrap();
    let SessionState::Dead { since } = v.state else { panic!("not dead after max attempts: {:?}", v.state) };
    assert_eq!((v.deliveries, v.failures), (4, 4));
    assert_eq!(d.status().sessions_dead, 1);

    // Dead sessions are never taken, however long one waits, and refuse their handle.
    d.advance(3_600_000);
    let mark = d.tick();
    assert!(d.deliveries_since(mark).is_empty());
    assert_eq!(d.req(2, append(h4, b"x")), Err(RequestError::SessionDead(h0.session)));
    let page = dead_page(&mut d, 3);
    assert_eq!(page.total, 1);
    assert_eq!(page.sessions[0].id, h0.session);
    assert_eq!(page.sessions[0].since, since);
    assert_eq!((page.sessions[0].records, page.sessions[0].bytes), (1, 3));

    // A redrive stores it due now with a fresh count; the next failure backs off from the base.
    let redrive = |id| Request::Redrive { target: truba_engine::RedriveTarget::Session(id) };
    assert_eq!(d.req(3, redrive(h0.session)), Ok(Reply::Redriven { count: 1, remaining: 0 }));
    assert_eq!(d.req(3, redrive(h0.session)), Err(RequestError::NotDead(h0.session)));
    assert_eq!(d.req(3, redrive(SessionId(999))), Err(RequestError::SessionUnknown(SessionId(999))));
    assert_eq!(d.session(h0.session).unwrap().failures, 0);
    assert_eq!(dead_page(&mut d, 3).total, 0);
    let h5 = fail_deliveries(&mut d, h0.session, 1, &[2]);
    assert_eq!(h5.attempt, Attempt(5));

    // A handler that stores the session has handled it: the count starts again.
    d.t = match d.session(h0.session).unwrap().state {
        SessionState::Stored { due } => due.0 * 1000 - WALL0,
        other => panic!("{other:?}"),
    };
    let mark = d.tick();
    let h6 = d.deliveries_since(mark)[0].1;
    d.req(4, Request::Store { handle: h6, timeout_s: 1 }).unwrap();
    assert_eq!(d.session(h0.session).unwrap().failures, 0);
    fail_deliveries(&mut d, h0.session, 1, &[2]);
    d.engine.state().full_invariants();
}

#[test]
fn a_delivery_whose_lease_runs_out_counts_as_a_failure() {
    let kc = KindConfig { max_attempts: 2, ..quick_kind() };
    let mut d = Driver::booted(cfg_with(3, kc), 7);
    let h0 = created(d.req(1, new(3, Some(b"one"))));
    d.req(1, Request::Store { handle: h0, timeout_s: 0 }).unwrap();
    for round in 1..=2 {
        let mark = d.tick();
        assert_eq!(d.deliveries_since(mark).len(), 1, "round {round}");
        // The handler goes silent: its lease (1 s) runs out.
        d.advance(1_000);
        d.tick();
        let v = d.session(h0.session).unwrap();
        assert_eq!(v.failures, round);
        assert_eq!(v.last_failure, Some(FailureReason::LeaseExpired));
        if let SessionState::Stored { due } = v.state {
            d.t = due.0 * 1000 - WALL0;
        }
    }
    assert!(matches!(d.session(h0.session).unwrap().state, SessionState::Dead { .. }));
}

#[test]
fn a_redrive_of_a_kind_moves_a_bounded_batch_oldest_first() {
    let kc = KindConfig { max_attempts: 1, ..quick_kind() };
    let mut cfg = cfg_with(3, kc);
    cfg.limits.redrive_batch_max = 2;
    let mut d = Driver::booted(cfg, 7);
    let mut ids = Vec::new();
    for c in 0..5 {
        let h = created(d.req(10 + c, new(3, Some(b"r"))));
        d.req(10 + c, Request::Store { handle: h, timeout_s: 0 }).unwrap();
        ids.push(h.session);
    }
    let mark = d.tick();
    for (_, h, _, _) in d.deliveries_since(mark) {
        d.input(Input::DeliveryFailed { handle: h, reason: FailureReason::Unreachable("refused".into()) });
    }
    let page = dead_page(&mut d, 3);
    assert_eq!(page.total, 5);
    assert_eq!(page.sessions.iter().map(|v| v.id).collect::<Vec<_>>(), ids, "oldest first");
    // Paging goes on after the given session.
    match d.query(Query::Dead { kind: Kind(3), after: Some(ids[1]), limit: 2 }) {
        QueryReply::Dead(Ok(p)) => assert_eq!(p.sessions.iter().map(|v| v.id).collect::<Vec<_>>(), ids[2..4]),
        other => panic!("{other:?}"),
    }
    let by_kind = Request::Redrive { target: truba_engine::RedriveTarget::Kind(Kind(3)) };
    assert_eq!(d.req(1, by_kind.clone()), Ok(Reply::Redriven { count: 2, remaining: 3 }));
    assert_eq!(dead_page(&mut d, 3).sessions[0].id, ids[2]);
    assert_eq!(d.req(1, by_kind.clone()), Ok(Reply::Redriven { count: 2, remaining: 1 }));
    assert_eq!(d.req(1, by_kind.clone()), Ok(Reply::Redriven { count: 1, remaining: 0 }));
    assert_eq!(d.req(1, by_kind), Ok(Reply::Redriven { count: 0, remaining: 0 }));
    // A page cannot go on from a session that is no longer dead, nor list a kind that does not exist.
    let after_redriven = Query::Dead { kind: Kind(3), after: Some(ids[0]), limit: 2 };
    assert_eq!(d.query(after_redriven), QueryReply::Dead(Err(RequestError::NotDead(ids[0]))));
    let unknown_kind = Query::Dead { kind: Kind(9), after: None, limit: 2 };
    assert_eq!(d.query(unknown_kind), QueryReply::Dead(Err(RequestError::UnknownKind(Kind(9)))));
    let unknown = Request::Redrive { target: truba_engine::RedriveTarget::Kind(Kind(9)) };
    assert_eq!(d.req(1, unknown), Err(RequestError::UnknownKind(Kind(9))));
    assert_eq!(d.status().sessions_stored, 5);
}

#[test]
fn an_operator_drops_a_dead_session_and_only_a_dead_one() {
    let kc = KindConfig { max_attempts: 1, ..quick_kind() };
    let mut d = Driver::booted(cfg_with(3, kc), 7);
    let dead = created(d.req(10, new(3, Some(b"poison"))));
    d.req(10, Request::Store { handle: dead, timeout_s: 0 }).unwrap();
    let alive = created(d.req(11, new(3, Some(b"fine"))));
    let mark = d.tick();
    let h = d.deliveries_since(mark)[0].1;
    d.input(Input::DeliveryFailed { handle: h, reason: failed() });
    assert!(matches!(d.session(dead.session).unwrap().state, SessionState::Dead { .. }));

    let drop = |session| Request::DropDead { session };
    assert_eq!(d.req(1, drop(alive.session)), Err(RequestError::NotDead(alive.session)));
    assert_eq!(d.req(1, drop(dead.session)), Ok(Reply::Done));
    assert_eq!(d.session(dead.session), Err(RequestError::SessionDeleted(dead.session)));
    assert_eq!(d.req(1, drop(dead.session)), Err(RequestError::SessionDeleted(dead.session)));
    assert_eq!(d.status().sessions_dead, 0);
    assert_eq!(dead_page(&mut d, 3).total, 0);
    d.advance(60_000);
    let mark = d.tick();
    assert!(d.deliveries_since(mark).iter().all(|(_, h, _, _)| h.session != dead.session));
    d.engine.state().full_invariants();
}

// ---- 8. lease expiry ------------------------------------------------------------------------------

#[test]
fn an_idle_session_is_stored_when_its_lease_runs_out_and_delivered_later() {
    let mut d = Driver::booted(cfg_with(3, quick_kind()), 8);
    let idle = created(d.req(1, new(3, Some(b"idle"))));
    let busy = created(d.req(2, new(3, Some(b"busy"))));
    let created_wall = d.wall_ms();
    match d.session(idle.session).unwrap().state {
        SessionState::Active { lease_until, delivering: false } => assert_eq!(lease_until.0, created_wall + 1_000),
        other => panic!("{other:?}"),
    }

    d.advance(500);
    d.tick();
    assert_eq!(d.req(2, Request::KeepAlive { handle: busy }), Ok(Reply::Done));
    d.advance(300);
    d.tick();
    assert!(matches!(d.session(idle.session).unwrap().state, SessionState::Active { .. }), "not yet expired");

    // Past the lease: the tick stores the idle session with the kind's default delay.
    d.t = created_wall + 1_000 - WALL0;
    let wall_s = d.wall_ms() / 1000;
    let mark = d.tick();
    assert!(d.replies_since(mark).is_empty());
    let due = UnixSecs(wall_s + 2);
    assert_eq!(d.session(idle.session).unwrap().state, SessionState::Stored { due });
    assert!(matches!(d.session(busy.session).unwrap().state, SessionState::Active { .. }), "kept alive");
    assert_eq!(d.req(1, append(idle, b"late")), Err(RequestError::SessionStored(idle.session)));

    // Later it is delivered with its records.
    d.t = due.0 * 1000 - WALL0;
    let mark = d.tick();
    let dl = d.deliveries_since(mark);
    let mine: Vec<_> = dl.iter().filter(|x| x.1.session == idle.session).collect();
    assert_eq!(mine.len(), 1, "{dl:?}");
    assert_eq!(mine[0].1.attempt, Attempt(1));
    assert_eq!(mine[0].2, due);
    assert_eq!(mine[0].3, recs(&[b"idle"]));
}

// ---- 9. restart -----------------------------------------------------------------------------------

#[test]
fn restart_recovers_the_same_state() {
    let cfg = EngineConfig::default();
    let mut d = Driver::booted(cfg.clone(), 9);
    let ids = workload(&mut d, 40);
    let st = d.status();
    let views = d.views();
    assert!(views.len() >= 3);

    let mut r = d.restart(cfg, 1234);
    let (applied, hash, torn) = r.recovered_since(0).expect("recovered");
    assert_eq!((applied, hash, torn), (st.applied, st.state_hash, 0));
    assert_eq!(r.views(), views);
    for id in ids {
        assert_eq!(r.session(id), d.session(id));
    }
    // Then it leads a new term, whose first entry is a no-op.
    assert_eq!(r.status().durable, st.durable.next());
    assert_eq!(r.status().term, Term(st.term.0 + 1));
    // Dedup survives the restart: a retry is answered from the table.
    let last_seq = d.seqs[&1];
    let before = d.outputs.iter().rev().find_map(|o| match o {
        Output::Reply { client: ClientId(1), seq, outcome } if seq.0 == last_seq => Some(outcome.clone()),
        _ => None,
    });
    let mark =
        r.send(1, last_seq, Request::KeepAlive { handle: Handle { session: SessionId(1), attempt: Attempt(0) } });
    assert!(r.ios_since(mark).is_empty());
    assert_eq!(r.replies_since(mark)[0].2, before.unwrap());
}

/// Snapshot file writes (their sizes) among the outputs since `mark`.
fn snapshot_writes(d: &Driver, mark: usize) -> Vec<usize> {
    d.since(mark)
        .iter()
        .filter_map(|o| match o {
            Output::Io { op: IoOp::Write { file, data, .. }, .. } if file.starts_with("snap-") => Some(data.len()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_large_state_is_snapshotted_again_only_once_the_log_has_grown_by_its_size() {
    let mut cfg = cfg_with(3, KindConfig { record_bytes_max: 8192, ..quick_kind() });
    cfg.limits.snapshot_every_entries = 10;
    let mut d = Driver::booted(cfg, 10);
    // 40 sessions of 8 KiB each: a state of some 320 KiB.
    for c in 0..40 {
        created(d.req(100 + c, new(3, Some(&[b'x'; 8000]))));
    }
    let sizes = snapshot_writes(&d, 0);
    let last = *sizes.last().expect("snapshots were taken");
    // Small appends: many more than 10 entries, but far fewer bytes than the last snapshot.
    let h = created(d.req(1, new(3, Some(b"small"))));
    let mark = d.mark();
    let mut appended = 0;
    while appended < last / 4 {
        d.req(1, append(h, &[b'y'; 100])).unwrap();
        appended += 100;
    }
    assert!(snapshot_writes(&d, mark).is_empty(), "a {last}-byte state rewritten after {appended} bytes of log");
    // Once the log has grown past the last snapshot's size, the next one is taken.
    while snapshot_writes(&d, mark).is_empty() {
        d.req(1, Request::Replace { handle: h, record: vec![b'z'; 4000] }).unwrap();
        appended += 4000;
        assert!(appended < 3 * last, "no snapshot after {appended} bytes of log (last snapshot {last} bytes)");
    }

    // With the log capped below the state's size, the cap decides.
    let mut cfg = cfg_with(3, KindConfig { record_bytes_max: 8192, ..quick_kind() });
    cfg.limits.snapshot_every_entries = 10;
    cfg.limits.snapshot_log_bytes_max = 20_000;
    let mut d = Driver::booted(cfg, 10);
    for c in 0..40 {
        created(d.req(100 + c, new(3, Some(&[b'x'; 8000]))));
    }
    let h = created(d.req(1, new(3, Some(b"small"))));
    let mark = d.mark();
    for _ in 0..400 {
        d.req(1, append(h, &[b'y'; 100])).unwrap();
    }
    assert!(!snapshot_writes(&d, mark).is_empty(), "40 KB of log passed the 20 KB cap without a snapshot");
}

#[test]
fn restart_after_snapshots_and_segment_rolls() {
    let mut cfg = EngineConfig::default();
    cfg.limits.snapshot_every_entries = 5;
    cfg.limits.segment_bytes_max = 300;
    let mut d = Driver::booted(cfg.clone(), 10);
    workload(&mut d, 100);
    let st = d.status();
    let views = d.views();

    let created_segments: std::collections::BTreeSet<String> = d
        .outputs
        .iter()
        .filter_map(|o| match o {
            Output::Io { op: IoOp::Write { file, .. }, .. } if file.starts_with("log-") => Some(file.clone()),
            _ => None,
        })
        .collect();
    let on_disk = d.segments();
    assert!(created_segments.len() > 5, "segments rolled: {created_segments:?}");
    assert!(on_disk.len() < created_segments.len(), "old segments removed: {on_disk:?}");
    assert!(d.ios_since(0).iter().any(|op| matches!(op, IoOp::Remove { file } if file.starts_with("log-"))));
    let snaps = d.files("snap-", ".snap");
    assert_eq!(snaps.len(), 1, "one durable snapshot left: {:?}", d.dir.keys().collect::<Vec<_>>());
    assert!(d.files("", ".tmp").is_empty());

    let mut r = d.restart(cfg.clone(), 99);
    let (applied, hash, torn) = r.recovered_since(0).expect("recovered");
    assert_eq!((applied, hash, torn), (st.applied, st.state_hash, 0));
    assert_eq!(r.views(), views);

    // It goes on from there, and a second restart agrees again.
    workload(&mut r, 30);
    let st2 = r.status();
    let mut r2 = r.restart(cfg, 5);
    assert_eq!(r2.recovered_since(0).map(|x| x.1), Some(st2.state_hash));
    assert_eq!(r2.views(), r.views());
    assert_eq!(r2.status().applied, st2.applied.next(), "the new leader's no-op follows");
}

// ---- 10. torn tail and corruption ------------------------------------------------------------------

#[test]
fn a_torn_tail_is_cut_and_kept_aside() {
    let cfg = EngineConfig::default();
    let mut d = Driver::booted(cfg.clone(), 11);
    workload(&mut d, 30);
    let st = d.status();
    let views = d.views();
    let last = d.segments().pop().unwrap();
    // The segment is preallocated: its records end before the zeros that fill the rest.
    let clean_len = scan_segment(&d.dir[&last]).unwrap().valid_end as usize;
    assert!(d.dir[&last].len() > clean_len, "the segment is preallocated");
    let clean = d.dir[&last][..clean_len].to_vec();

    // A partial record: a plausible header whose payload never made it (zeros after it).
    let mut garbage = Vec::new();
    garbage.extend_from_slice(&40u32.to_le_bytes());
    garbage.extend_from_slice(&[0xAB; 17]);
    d.dir.get_mut(&last).unwrap()[clean_len..clean_len + garbage.len()].copy_from_slice(&garbage);

    let mut r = d.restart(cfg.clone(), 11);
    let (applied, hash, torn) = r.recovered_since(0).expect("recovered");
    assert_eq!((applied, hash), (st.applied, st.state_hash));
    assert_eq!(torn, garbage.len() as u64);
    assert_eq!(r.views(), views);
    // Cut back to its valid end; the new leader's no-op follows.
    assert!(r.dir[&last].starts_with(&clean));
    assert!(!r.dir[&last][clean_len..].starts_with(&garbage[..8]));
    assert!(r.ios_since(0).contains(&IoOp::Truncate { file: last.clone(), len: clean_len as u64 }));
    let torn_files = r.files("torn-", "");
    assert_eq!(torn_files.len(), 1, "{:?}", r.dir.keys().collect::<Vec<_>>());
    assert_eq!(r.dir[&torn_files[0]], garbage);

    // The log goes on cleanly from the cut.
    let h = created(r.req(77, new(1, Some(b"after"))));
    let st2 = r.status();
    let mut r2 = r.restart(cfg, 11);
    assert_eq!(r2.recovered_since(0), Some((st2.applied, st2.state_hash, 0)));
    assert_eq!(r2.session(h.session).unwrap().records, recs(&[b"after"]));
}

/// Flips a payload byte of the first record of `file` and checks that restart refuses to go on.
fn assert_mid_log_corruption_stops(d: &Driver, cfg: EngineConfig, file: &str) {
    let mut bad = d.dir.clone();
    let bytes = bad.get_mut(file).unwrap();
    let scan = scan_segment(bytes).unwrap();
    assert!(scan.records.len() >= 2, "the segment has records after the first");
    bytes[SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 1] ^= 0x40;
    let damaged = bytes.clone();

    let mut r = Driver::on_dir(cfg, 12, bad, d.t);
    r.input(Input::Boot);
    assert!(r.recovered_since(0).is_none(), "recovered over corruption: {:?}", r.since(0));
    let stopped: Vec<_> = r.since(0).iter().filter(|o| matches!(o, Output::Stopped(_))).collect();
    assert_eq!(
        stopped,
        vec![&Output::Stopped(Fatal::LogCorruption { file: file.to_string(), offset: SEGMENT_HEADER_LEN as u64 })]
    );
    let ios = r.ios_since(0);
    assert!(!ios.iter().any(|op| matches!(op, IoOp::Truncate { .. } | IoOp::Remove { .. })), "{ios:?}");
    assert!(!ios.iter().any(|op| matches!(op, IoOp::Write { .. })), "{ios:?}");
    assert_eq!(r.dir[file], damaged, "the damaged segment is left as it is");
    assert!(r.engine.is_stopped());
    assert!(matches!(r.call(1, 1, new(1, None)), Err(RequestError::Stopped(_))));
}

#[test]
fn corruption_inside_the_log_stops_the_replica() {
    // One segment: it is also the last, where a torn tail would be cut.
    let cfg = EngineConfig::default();
    let mut d = Driver::booted(cfg.clone(), 12);
    workload(&mut d, 10);
    assert_eq!(d.segments().len(), 1);
    let only = d.segments()[0].clone();
    assert_mid_log_corruption_stops(&d, cfg, &only);

    // Several segments: damage the first one that has more than one record.
    let mut cfg = EngineConfig::default();
    cfg.limits.segment_bytes_max = 300;
    let mut d = Driver::booted(cfg.clone(), 12);
    workload(&mut d, 30);
    let segs = d.segments();
    assert!(segs.len() >= 3);
    let target = segs.iter().find(|s| scan_segment(&d.dir[*s]).unwrap().records.len() >= 2).unwrap().clone();
    assert_ne!(Some(&target), segs.last());
    assert_mid_log_corruption_stops(&d, cfg, &target);
}

// ---- 11. determinism ------------------------------------------------------------------------------

fn scripted_run(seed: u64) -> (Vec<String>, Dir) {
    let mut cfg = EngineConfig::default();
    cfg.kinds.insert(Kind(3), KindConfig { jitter_window_s: 5, lease_ms: 2_000, default_delay_s: 1, ..quick_kind() });
    cfg.limits.snapshot_every_entries = 7;
    cfg.limits.segment_bytes_max = 400;
    let mut d = Driver::booted(cfg, seed);
    workload(&mut d, 40);
    let mut handles = Vec::new();
    for c in 0..6u64 {
        let h = created(d.req(100 + c, new(3, Some(format!("s{c}").as_bytes()))));
        d.req(100 + c, Request::Store { handle: h, timeout_s: 1 }).unwrap();
        handles.push(h);
    }
    // Run the clock forward, ticking, and fail every other delivery.
    for _ in 0..80 {
        d.advance(137);
        let mark = d.tick();
        for (i, (_, h, _, _)) in d.deliveries_since(mark).into_iter().enumerate() {
            if i % 2 == 0 {
                d.input(Input::DeliveryFailed { handle: h, reason: failed() });
            }
        }
    }
    (d.outputs.iter().map(|o| format!("{o:?}")).collect(), d.dir)
}

#[test]
fn the_same_seed_gives_the_same_outputs() {
    let (a, dir_a) = scripted_run(42);
    let (b, dir_b) = scripted_run(42);
    assert!(a.iter().any(|o| o.starts_with("Deliver")), "the script exercises deliveries");
    assert!(a.iter().any(|o| o.contains("Rename")), "the script exercises snapshots");
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x, y, "output {i} differs");
    }
    assert_eq!(dir_a, dir_b);
    // The seed matters: another one draws other jitter.
    let (c, _) = scripted_run(43);
    assert_ne!(a, c);
}

// ---- bounds -----------------------------------------------------------------------------------------

/// `pending_requests_max` bounds requests waiting for the log, but `waiting` holds one entry per
/// client, so one client sending new sequence numbers while its first is in flight is never
/// refused and the queue grows past the bound (the engine's own invariant then panics).
#[test]
fn a_pipelining_client_is_bounded_by_pending_requests_max() {
    let mut cfg = EngineConfig::default();
    cfg.limits.pending_requests_max = 4;
    let mut d = Driver::booted(cfg, 13);
    let h = created(d.req(1, new(1, None)));

    d.hold_if(|op| matches!(op, IoOp::Sync { file } if file.starts_with("log-")));
    let mut overloaded = 0;
    for seq in 10..30u64 {
        let mark = d.send(1, seq, append(h, format!("{seq}").as_bytes()));
        overloaded += d
            .replies_since(mark)
            .iter()
            .filter(|(_, _, o)| matches!(o, Err(RequestError::Overloaded { max: 4 })))
            .count();
    }
    assert!(overloaded >= 20 - 4, "only {overloaded} of 20 pipelined requests were refused with a limit of 4");
    d.release();
}

/// `DeliveryFailed` is proposed with no check of the queue's bound (ticks do check it), so with
/// the queue full of client requests a few failure reports push it past `pending_requests_max + 2`.
#[test]
fn delivery_failures_with_a_full_queue_stay_bounded() {
    let mut cfg = cfg_with(3, quick_kind());
    cfg.limits.pending_requests_max = 8;
    let mut d = Driver::booted(cfg, 14);
    let mut hs = Vec::new();
    for c in 0..4u64 {
        let h = created(d.req(c, new(3, Some(b"x"))));
        d.req(c, Request::Store { handle: h, timeout_s: 0 }).unwrap();
    }
    let mark = d.tick();
    for (_, h, _, _) in d.deliveries_since(mark) {
        hs.push(h);
    }
    assert_eq!(hs.len(), 4);

    // Fill the pipeline: one batch in flight (held) and the rest of the limit queued.
    d.hold_if(|op| matches!(op, IoOp::Sync { file } if file.starts_with("log-")));
    for c in 100..108u64 {
        d.send(c, 1, new(3, None));
    }
    let mark = d.send(200, 1, new(3, None));
    assert_eq!(d.replies_since(mark)[0].2, Err(RequestError::Overloaded { max: 8 }));
    // The handlers report their failures.
    for h in &hs {
        d.input(Input::DeliveryFailed { handle: *h, reason: failed() });
    }
    d.release();
    for h in &hs {
        assert!(matches!(
            d.session(h.session).unwrap().state,
            SessionState::Stored { .. } | SessionState::Active { .. }
        ));
    }
}

#[test]
fn handler_slots_limit_deliveries_in_flight() {
    let mut d = Driver::booted(cfg_with(3, KindConfig { handler_slots: 2, ..quick_kind() }), 15);
    let mut ids = Vec::new();
    for c in 0..5u64 {
        let h = created(d.req(c, new(3, Some(&[c as u8]))));
        d.req(c, Request::Store { handle: h, timeout_s: 0 }).unwrap();
        ids.push(h.session);
    }
    let mark = d.tick();
    let first: Vec<Handle> = d.deliveries_since(mark).into_iter().map(|x| x.1).collect();
    assert_eq!(first.iter().map(|h| h.session).collect::<Vec<_>>(), ids[..2], "stored order, two slots");
    d.advance(100);
    let mark = d.tick();
    assert!(d.deliveries_since(mark).is_empty(), "no free slot");

    // A finished delivery frees its slot for the next due session at once, not at the next
    // repeater tick: the take is proposed as soon as the delete is applied.
    let mark = d.mark();
    assert_eq!(d.req(50, Request::Delete { handle: first[0] }), Ok(Reply::Done));
    let next: Vec<SessionId> = d.deliveries_since(mark).into_iter().map(|x| x.1.session).collect();
    assert_eq!(next, vec![ids[2]]);
    let mark = d.tick();
    assert!(d.deliveries_since(mark).is_empty(), "still two slots, both busy");
    let st = d.status();
    assert_eq!((st.sessions_active, st.sessions_stored), (2, 2));
}

#[test]
fn overload_refuses_beyond_pending_requests_max_with_distinct_clients() {
    let mut cfg = EngineConfig::default();
    cfg.limits.pending_requests_max = 8;
    let mut d = Driver::booted(cfg, 16);
    d.hold_if(|op| matches!(op, IoOp::Sync { file } if file.starts_with("log-")));
    let mark = d.mark();
    for c in 0..12u64 {
        d.send(c, 1, new(1, None));
    }
    let refused = d.replies_since(mark);
    assert_eq!(refused.len(), 4);
    assert!(refused.iter().all(|(c, _, o)| c.0 >= 8 && *o == Err(RequestError::Overloaded { max: 8 })));
    let hash = d.status().state_hash;
    let mark = d.release();
    let replies = d.replies_since(mark);
    assert_eq!(replies.len(), 8);
    assert!(replies.iter().all(|(_, _, o)| matches!(o, Ok(Reply::Created { .. }))));
    assert_ne!(d.status().state_hash, hash);
    assert_eq!(d.status().sessions_active, 8);
}

/// A session deleted a moment ago should answer "deleted"; the tombstone set drops the lowest
/// session id rather than the least recently deleted one.
#[test]
fn a_just_deleted_session_answers_deleted() {
    let mut cfg = EngineConfig::default();
    cfg.limits.tombstones_max = 2;
    let mut d = Driver::booted(cfg, 17);
    let a = created(d.req(1, new(1, None)));
    let b = created(d.req(1, new(1, None)));
    let c = created(d.req(1, new(1, None)));
    assert_eq!(d.req(1, Request::Delete { handle: b }), Ok(Reply::Done));
    assert_eq!(d.req(1, Request::Delete { handle: c }), Ok(Reply::Done));
    assert_eq!(d.req(1, Request::Delete { handle: a }), Ok(Reply::Done));
    assert_eq!(d.session(a.session), Err(RequestError::SessionDeleted(a.session)), "deleted last, forgotten first");
}

/// A snapshot that covers many segments removes them all at once, and the engine's bound on
/// outstanding disk operations (64) is an assertion. Scaled down from the default configuration
/// (64 MiB segments, 64 KiB records, a snapshot every 100 000 entries: ~100 segments covered).
#[test]
fn a_snapshot_covering_many_segments_stays_within_the_io_bound() {
    let mut cfg = EngineConfig::default();
    cfg.limits.segment_bytes_max = 8 * 1024;
    cfg.limits.snapshot_every_entries = 300;
    let mut d = Driver::booted(cfg.clone(), 18);
    let h = created(d.req(1, new(1, None)));
    for i in 0..320u32 {
        let record = vec![i as u8; 2_000];
        assert_eq!(d.req(1, Request::Replace { handle: h, record }), Ok(Reply::Done));
    }
    assert_eq!(d.files("snap-", ".snap").len(), 1);
    assert!(d.segments().len() < 10, "covered segments removed: {}", d.segments().len());
    let st = d.status();
    let r = d.restart(cfg, 18);
    assert_eq!(r.recovered_since(0), Some((st.applied, st.state_hash, 0)));
}

#[test]
fn a_log_of_an_older_format_stops_the_replica_with_a_clear_error_and_is_left_alone() {
    let cfg = EngineConfig::default();
    let mut d = Driver::booted(cfg.clone(), 13);
    workload(&mut d, 10);
    let file = d.segments().pop().unwrap();
    let mut old = d.dir.clone();
    // "TRUBAlg1" with a whole header: what the previous version wrote.
    let seg = old.get_mut(&file).unwrap();
    seg[7] = b'1';
    let crc = crc32fast::hash(&seg[..24]);
    seg[24..28].copy_from_slice(&crc.to_le_bytes());
    let before = old.clone();

    let mut r = Driver::on_dir(cfg, 13, old, d.t);
    r.input(Input::Boot);
    let stopped: Vec<_> = r.since(0).iter().filter(|o| matches!(o, Output::Stopped(_))).collect();
    assert_eq!(
        stopped,
        vec![&Output::Stopped(Fatal::UnsupportedFormat {
            file: file.clone(),
            found: 1,
            supported: truba_engine::codec::SEGMENT_FORMAT
        })]
    );
    let ios = r.ios_since(0);
    assert!(
        !ios.iter().any(|op| matches!(op, IoOp::Truncate { .. } | IoOp::Remove { .. } | IoOp::Write { .. })),
        "{ios:?}"
    );
    assert_eq!(r.dir, before, "nothing in the directory is changed");
    let message = Fatal::UnsupportedFormat { file, found: 1, supported: 2 }.to_string();
    assert!(message.contains("format 1") && message.contains("empty data directory"), "{message}");
}

// ---- stored sessions in source files ------------------------------------------------------------

fn sources_cfg() -> EngineConfig {
    let kc = KindConfig { handler_slots: 1000, ..quick_kind() };
    let mut cfg = cfg_with(1, kc);
    cfg.limits.stored_memtable_bytes_max = 2_000; // about eight stored sessions of 100 bytes
    cfg.limits.sources_per_kind_max = 2;
    cfg.limits.source_read_ahead_bytes = 600;
    cfg.limits.source_io_chunk_bytes = 512;
    // Merged-away files go once a snapshot no longer refers to them.
    cfg.limits.snapshot_every_entries = 50;
    cfg
}

#[test]
fn stored_sessions_spill_to_sources_are_merged_and_come_back_in_order_with_their_records() {
    let cfg = sources_cfg();
    let mut d = Driver::booted(cfg.clone(), 7);
    let mut expect: BTreeMap<SessionId, (UnixSecs, Vec<Vec<u8>>)> = BTreeMap::new();
    for i in 0..200u32 {
        if let Some(Output::Stopped(f)) = d.outputs.iter().find(|o| matches!(o, Output::Stopped(_))) {
            panic!("stopped: {f}");
        }
        let record = vec![i as u8; 100];
        let h = created(d.req(1, new(1, Some(&record))));
        let due = stored_due(d.req(1, Request::Store { handle: h, timeout_s: 100 + (i * 7) % 30 }));
        expect.insert(h.session, (due, vec![record]));
        if i % 5 == 0 {
            d.tick();
        }
    }
    for _ in 0..30 {
        d.tick();
    }
    let (spilled, sources) = d.engine.state().spilled_count();
    assert!(spilled >= 150, "most stored sessions are in source files: {spilled}");
    assert!((1..=3).contains(&sources), "merges keep the sources few: {sources}");
    // Merged-away files go once a snapshot no longer refers to them.
    for _ in 0..80 {
        let h = created(d.req(3, new(1, Some(b"x"))));
        d.req(3, Request::Delete { handle: h }).unwrap();
    }
    d.tick();
    assert_eq!(d.files("src-", "").len() as u64, sources, "one file per source, the merged-away ones removed");
    assert_eq!(d.engine.state().sessions_count(), (0, 200, 0));
    d.engine.state().full_invariants();
    let spilled_view = d.engine.state().spilled_views().next().expect("a spilled session");
    assert!(spilled_view.records.is_empty() && spilled_view.source.is_some_and(|(_, n)| n == 1));
    // A `get` of a spilled session reads its records from the source file.
    let mut with_records = spilled_view.clone();
    with_records.records = expect[&spilled_view.id].1.clone();
    assert_eq!(d.session(spilled_view.id), Ok(with_records));

    // A restart finds the sources again, with the same state.
    let (applied, hash) = (d.engine.state().applied(), d.engine.state().state_hash());
    let mut d = d.restart(cfg.clone(), 8);
    assert_eq!(d.recovered_since(0).map(|r| (r.0, r.1)), Some((applied, hash)), "the state survives a restart");
    d.engine.state().full_invariants();

    // All come due: every session is delivered once, in repeat order, with its records.
    d.advance(200_000);
    let mut delivered = Vec::new();
    for _ in 0..400 {
        let mark = d.tick();
        for (_, handle, due, records) in d.deliveries_since(mark) {
            let (want_due, want_records) = &expect[&handle.session];
            assert_eq!((due, &records), (*want_due, want_records), "session {:?}", handle.session);
            delivered.push((due, handle.session));
            assert_eq!(d.req(2, Request::Delete { handle }), Ok(Reply::Done));
        }
        if delivered.len() == expect.len() {
            break;
        }
    }
    assert_eq!(delivered.len(), expect.len(), "every stored session was delivered");
    assert!(delivered.windows(2).all(|w| w[0].0 <= w[1].0), "in repeat order");
    assert_eq!(d.engine.state().spilled_count(), (0, 0), "all sources taken and dropped");
    d.engine.state().full_invariants();
}

/// A lone replica repairs one damaged copy of its hard state from the other, and stops with a
/// clear error when both are lost (it has no peer to learn anything from; a cluster member
/// would go on without ever voting again).
#[test]
fn a_lone_replica_repairs_one_hard_state_copy_and_stops_when_both_are_lost() {
    let cfg = EngineConfig::default();
    let mut d = Driver::booted(cfg.clone(), 40);
    created(d.req(1, new(1, Some(b"a"))));
    let ranges = truba_engine::hard_state_copy_ranges();
    assert_eq!(truba_engine::hard_state_copies_whole(&d.dir["hardstate"]), 2);

    d.dir.get_mut("hardstate").unwrap()[ranges[1].start + 11] ^= 0x01;
    let r = d.restart(cfg.clone(), 41);
    assert!(r.recovered_since(0).is_some(), "{:?}", r.since(0));
    let damage = r.since(0).iter().find_map(|o| match o {
        Output::Recovered { damage, .. } => Some(damage.clone()),
        _ => None,
    });
    assert_eq!(damage, Some(vec![truba_engine::DamageFound::HardStateCopy { slot: 1 }]));
    assert_eq!(truba_engine::hard_state_copies_whole(&r.dir["hardstate"]), 2, "written again");

    let mut bad = r.dir.clone();
    let file = bad.get_mut("hardstate").unwrap();
    file[ranges[0].start + 2] ^= 0x80;
    file[ranges[1].start + 30] ^= 0x04;
    let mut lost = Driver::on_dir(cfg, 42, bad, r.t);
    lost.input(Input::Boot);
    assert!(lost.recovered_since(0).is_none());
    assert!(
        matches!(lost.since(0).last(), Some(Output::Stopped(Fatal::HardStateLost { .. }))),
        "{:?}",
        lost.since(0).last()
    );
}
