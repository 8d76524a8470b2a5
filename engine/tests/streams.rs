//! The reading side through the engine's public API: tails of the ledger (what every committed
//! entry did), their windows, progress marks, compaction and limits.

mod common;

use common::driver::*;
use truba_engine::{
    EngineConfig, Filter, Handle, Index, Input, IoOp, Kind, KindConfig, LedgerEntry, Output, Request, StreamError,
    StreamId, StreamItem, StreamOpen, TailFrom, What,
};

fn cfg() -> EngineConfig {
    let mut cfg = EngineConfig::default();
    cfg.kinds.insert(Kind(2), KindConfig::default());
    cfg
}

fn tail(from: TailFrom, kinds: &[u32], internal: bool) -> StreamOpen {
    StreamOpen::Tail { from, filter: Filter { kinds: kinds.iter().map(|k| Kind(*k)).collect(), internal } }
}

/// The items of stream `id` emitted since `mark`, with their numbers.
fn items(d: &Driver, mark: usize, id: u64) -> Vec<(u64, StreamItem)> {
    d.since(mark)
        .iter()
        .filter_map(|o| match o {
            Output::Stream { stream, seq, item } if *stream == StreamId(id) => Some((*seq, item.clone())),
            _ => None,
        })
        .collect()
}

/// The entries in `items`, decoded.
fn entries(items: &[(u64, StreamItem)]) -> Vec<LedgerEntry> {
    let mut out = Vec::new();
    for (_, item) in items {
        if let StreamItem::Entries { entries, .. } = item {
            out.extend(entries.iter().map(|b| postcard::from_bytes::<LedgerEntry>(b).expect("an entry decodes")));
        }
    }
    out
}

fn open(d: &mut Driver, id: u64, open: StreamOpen) -> usize {
    d.input(Input::StreamOpen { stream: StreamId(id), open })
}

fn new(kind: u32, record: &[u8]) -> Request {
    Request::New { kind: Kind(kind), record: Some(record.to_vec()) }
}

fn created(d: &mut Driver, client: u64, kind: u32, record: &[u8]) -> Handle {
    match d.req(client, new(kind, record)) {
        Ok(truba_engine::Reply::Created { handle }) => handle,
        other => panic!("expected Created, got {other:?}"),
    }
}

#[test]
fn a_tail_from_the_start_shows_every_committed_entry_in_order_with_its_audit() {
    let mut d = Driver::booted(cfg(), 1);
    let h = created(&mut d, 7, 1, b"first");
    d.req(7, Request::Append { handle: h, record: b"second".to_vec() }).unwrap();
    d.req(7, Request::Append { handle: Handle { attempt: truba_engine::Attempt(9), ..h }, record: b"x".to_vec() })
        .unwrap_err();
    d.req(7, Request::Store { handle: h, timeout_s: 60 }).unwrap();
    let mark = open(&mut d, 1, tail(TailFrom::Index(Index(1)), &[], true));
    let got = entries(&items(&d, mark, 1));
    let indexes: Vec<u64> = got.iter().map(|e| e.index.0).collect();
    let last = d.engine.state().applied().0;
    assert_eq!(indexes, (1..=last).collect::<Vec<_>>(), "every committed entry, in order, once");
    let whats: Vec<&str> = got.iter().flat_map(|e| e.events.iter().map(|ev| ev.what.name())).collect();
    assert_eq!(whats, ["noop", "created", "appended", "refused", "stored"]);
    let created = &got[1];
    assert_eq!(created.audit.client.map(|c| c.0), Some(7));
    assert_eq!(created.audit.at.0, d.wall_ms(), "the arrival time at the leader");
    let ev = &created.events[0];
    assert_eq!((ev.session, ev.kind), (Some(h.session), Some(Kind(1))));
    assert!(ev.before.is_none() && ev.after.as_ref().is_some_and(|b| b.records == 1));
    let appended = &got[2].events[0];
    assert_eq!(appended.after.as_ref().map(|b| (b.records, b.bytes)), Some((2, 11)));
    assert_eq!(got[2].audit.attempt, Some(h.attempt));
}

#[test]
fn new_entries_are_pushed_to_a_tail_at_the_head_at_once() {
    let mut d = Driver::booted(cfg(), 1);
    let mark = open(&mut d, 1, tail(TailFrom::Next, &[], false));
    assert!(entries(&items(&d, mark, 1)).is_empty(), "nothing before the tail started");
    let mark = d.mark();
    let h = created(&mut d, 7, 1, b"r");
    let got = entries(&items(&d, mark, 1));
    assert_eq!(got.len(), 1, "the new entry arrives with the request's answer: {got:?}");
    assert_eq!(got[0].events[0].session, Some(h.session));
}

#[test]
fn a_filter_keeps_the_kinds_asked_for_and_internal_events_only_when_asked() {
    let mut d = Driver::booted(cfg(), 1);
    let h1 = created(&mut d, 7, 1, b"one");
    let h2 = created(&mut d, 8, 2, b"two");
    d.req(8, Request::KeepAlive { handle: h2 }).unwrap();
    d.req(7, Request::Delete { handle: h1 }).unwrap();
    let mark = open(&mut d, 1, tail(TailFrom::Oldest, &[2], false));
    let got = entries(&items(&d, mark, 1));
    let seen: Vec<(&str, Option<Kind>)> =
        got.iter().flat_map(|e| e.events.iter().map(|ev| (ev.what.name(), ev.kind))).collect();
    assert_eq!(seen, [("created", Some(Kind(2)))], "kind 2 only; the keep-alive is internal");
    let mark = open(&mut d, 2, tail(TailFrom::Oldest, &[2], true));
    let names: Vec<&str> = entries(&items(&d, mark, 2)).iter().map(|e| e.events[0].what.name()).collect();
    assert_eq!(names, ["created", "renewed"]);
}

#[test]
fn a_tail_sends_no_more_than_its_window_until_it_acknowledges() {
    let mut c = cfg();
    c.limits.tail_window_bytes_max = 300;
    c.limits.stream_batch_bytes_max = 100;
    let mut d = Driver::booted(c, 1);
    for i in 0..20 {
        created(&mut d, 7, 1, format!("record {i:>40}").as_bytes());
    }
    let mark = open(&mut d, 1, tail(TailFrom::Oldest, &[], false));
    let first = items(&d, mark, 1);
    let bytes: usize = first
        .iter()
        .map(|(_, i)| match i {
            StreamItem::Entries { entries, .. } => entries.iter().map(|e| e.len()).sum(),
            _ => 0,
        })
        .sum();
    assert!(!first.is_empty() && bytes <= 300 + 100, "a window's worth: {bytes} bytes in {} items", first.len());
    let sent = entries(&first).len();
    assert!(sent < 20, "the window holds the rest back");
    let mut seen = sent;
    let mut last_seq = first.last().unwrap().0;
    while seen < 20 {
        let mark = d.input(Input::StreamAck { stream: StreamId(1), seq: last_seq, error: None });
        let more = items(&d, mark, 1);
        assert!(!more.is_empty(), "an acknowledgement makes room");
        seen += entries(&more).len();
        last_seq = more.last().unwrap().0;
    }
    assert_eq!(seen, 20);
}

#[test]
fn a_reader_whose_filter_matches_nothing_gets_progress_marks_that_never_go_back() {
    let mut d = Driver::booted(cfg(), 1);
    let mark = open(&mut d, 1, tail(TailFrom::Next, &[2], false));
    for i in 0..5 {
        created(&mut d, 7, 1, format!("r{i}").as_bytes());
        d.advance(1_100);
        d.input(Input::Tick);
    }
    let marks: Vec<Index> = items(&d, mark, 1)
        .into_iter()
        .map(|(_, item)| match item {
            StreamItem::Progress { through } => through,
            other => panic!("only marks match nothing: {other:?}"),
        })
        .collect();
    assert!(marks.len() >= 3, "marks as the log moves on: {marks:?}");
    assert!(marks.windows(2).all(|w| w[0] < w[1]), "marks never go back: {marks:?}");
    assert_eq!(*marks.last().unwrap(), d.engine.state().applied());
}

#[test]
fn a_tail_beyond_the_head_or_of_an_unknown_kind_is_refused() {
    let mut d = Driver::booted(cfg(), 1);
    let head = d.engine.state().applied();
    let mark = open(&mut d, 1, tail(TailFrom::Index(Index(head.0 + 5)), &[], false));
    assert!(matches!(&items(&d, mark, 1)[..], [(_, StreamItem::End(StreamError::BeyondHead { .. }))]));
    let mark = open(&mut d, 2, tail(TailFrom::Oldest, &[9], false));
    assert_eq!(items(&d, mark, 2), [(1, StreamItem::End(StreamError::UnknownKind(Kind(9))))]);
    let mark = open(&mut d, 3, tail(TailFrom::Index(head.next()), &[], false));
    assert!(items(&d, mark, 3).is_empty(), "one past the head waits for the next entry");
}

#[test]
fn streams_beyond_the_limit_are_refused() {
    let mut c = cfg();
    c.limits.streams_max = 2;
    let mut d = Driver::booted(c, 1);
    open(&mut d, 1, tail(TailFrom::Next, &[], false));
    open(&mut d, 2, tail(TailFrom::Next, &[], false));
    let mark = open(&mut d, 3, tail(TailFrom::Next, &[], false));
    assert_eq!(items(&d, mark, 3), [(1, StreamItem::End(StreamError::TooManyStreams { max: 2 }))]);
    d.input(Input::StreamClose { stream: StreamId(1) });
    let mark = open(&mut d, 3, tail(TailFrom::Next, &[], false));
    assert!(items(&d, mark, 3).is_empty(), "a closed stream's place is free again");
}

/// A small ledger that keeps nothing cached and rotates its segments quickly, so that readers
/// behind the head read the files.
fn small_ledger() -> EngineConfig {
    let mut c = cfg();
    c.limits.ledger_cache_bytes_max = 0;
    c.limits.ledger_segment_bytes_max = 2_000;
    c.limits.stream_read_bytes = 150;
    c.limits.snapshot_every_entries = 40;
    c
}

#[test]
fn old_entries_are_read_from_the_ledger_files_in_pieces_and_match_the_live_ones() {
    let mut d = Driver::booted(small_ledger(), 1);
    let live_mark = open(&mut d, 1, tail(TailFrom::Oldest, &[], true));
    for i in 0..100 {
        created(&mut d, 7, 1 + i % 2, format!("record {i:>30}").as_bytes());
        let n = items(&d, live_mark, 1).last().map(|(n, _)| *n).unwrap_or(0);
        d.input(Input::StreamAck { stream: StreamId(1), seq: n, error: None });
    }
    let live = entries(&items(&d, live_mark, 1));
    assert!(d.files("ledger-", ".led").len() > 3, "the ledger rotated: {:?}", d.files("ledger-", ""));
    let mark = open(&mut d, 2, tail(TailFrom::Index(Index(1)), &[], true));
    let reads = d
        .ios_since(mark)
        .iter()
        .filter(|op| matches!(op, IoOp::ReadAt { file, .. } if file.starts_with("ledger-")))
        .count();
    let old = entries(&items(&d, mark, 2));
    assert!(reads > 10, "read in pieces: {reads} reads");
    assert_eq!(old, live, "the files hold what the readers at the head were shown");
    // A restart keeps the ledger: the same history, read again from the files.
    let mut r = d.restart(small_ledger(), 2);
    let mark = open(&mut r, 3, tail(TailFrom::Index(Index(1)), &[], true));
    let after = entries(&items(&r, mark, 3));
    assert_eq!(&after[..live.len()], &live[..], "the ledger survives a restart");
}

#[test]
fn a_from_that_retention_removed_is_answered_with_what_is_still_held() {
    let mut c = small_ledger();
    c.limits.ledger_retain_bytes_max = 4_000;
    let mut d = Driver::booted(c, 1);
    for i in 0..200 {
        created(&mut d, 7, 1, format!("record {i:>30}").as_bytes());
    }
    let mark = open(&mut d, 1, tail(TailFrom::Index(Index(1)), &[], true));
    let got = items(&d, mark, 1);
    let [(_, StreamItem::End(StreamError::Compacted { requested, first_available }))] = &got[..] else {
        panic!("expected a compaction answer, got {got:?}")
    };
    assert_eq!(*requested, Index(1));
    assert!(first_available.0 > 1);
    let mark = open(&mut d, 2, tail(TailFrom::Index(*first_available), &[], true));
    let got = entries(&items(&d, mark, 2));
    assert_eq!(got.first().map(|e| e.index), Some(*first_available), "the oldest held is there");
    let oldest = open(&mut d, 3, tail(TailFrom::Oldest, &[], true));
    assert_eq!(entries(&items(&d, oldest, 3)).first().map(|e| e.index), Some(*first_available));
}

#[test]
fn a_reader_that_acknowledges_nothing_is_cut_off_after_the_stall_limit() {
    let mut c = cfg();
    c.limits.tail_window_bytes_max = 100;
    c.limits.stream_stall_ms_max = 5_000;
    let mut d = Driver::booted(c, 1);
    let mark = open(&mut d, 1, tail(TailFrom::Next, &[], false));
    for i in 0..10 {
        created(&mut d, 7, 1, format!("record {i:>60}").as_bytes());
    }
    for _ in 0..8 {
        d.advance(1_000);
        d.input(Input::Tick);
    }
    let got = items(&d, mark, 1);
    assert!(
        matches!(got.last(), Some((_, StreamItem::End(StreamError::TooSlow { stalled_ms: 5_000 })))),
        "cut off: {got:?}"
    );
    let mark = d.mark();
    created(&mut d, 7, 1, b"after");
    assert!(items(&d, mark, 1).is_empty(), "nothing more after the end");
}

#[test]
fn the_events_of_a_failed_delivery_and_a_dead_letter_say_what_became_of_the_session() {
    let kc = KindConfig { jitter_window_s: 0, max_attempts: 2, backoff_base_s: 1, ..KindConfig::default() };
    let mut c = cfg();
    c.kinds.insert(Kind(1), kc);
    let mut d = Driver::booted(c, 1);
    let h = created(&mut d, 7, 1, b"job");
    d.req(7, Request::Store { handle: h, timeout_s: 0 }).unwrap();
    let mut handles = Vec::new();
    for _ in 0..3 {
        d.advance(2_000);
        let mark = d.tick();
        handles.extend(d.deliveries_since(mark).into_iter().map(|(_, h, _, _)| h));
        if let Some(h) = handles.pop() {
            let reason = truba_engine::FailureReason::Handler("no".into());
            d.input(Input::DeliveryFailed { handle: h, reason });
        }
    }
    let mark = open(&mut d, 1, tail(TailFrom::Oldest, &[1], false));
    let whats: Vec<What> = entries(&items(&d, mark, 1)).into_iter().flat_map(|e| e.events).map(|e| e.what).collect();
    let names: Vec<&str> = whats.iter().map(What::name).collect();
    assert_eq!(names, ["created", "stored", "taken", "delivery-failed", "taken", "dead-lettered"]);
}
