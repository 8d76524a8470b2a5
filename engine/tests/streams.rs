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
    StreamOpen::Tail {
        from,
        filter: Filter { kinds: kinds.iter().map(|k| Kind(*k)).collect(), internal, sessions_only: false },
    }
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
    assert_eq!(whats, ["noop", "configured", "created", "appended", "refused", "stored"]);
    let created = &got[2];
    assert_eq!(created.audit.client.map(|c| c.0), Some(7));
    assert_eq!(created.audit.at.0, d.wall_ms(), "the arrival time at the leader");
    let ev = &created.events[0];
    assert_eq!((ev.session, ev.kind), (Some(h.session), Some(Kind(1))));
    assert!(ev.before.is_none() && ev.after.as_ref().is_some_and(|b| b.records == 1));
    let appended = &got[3].events[0];
    assert_eq!(appended.after.as_ref().map(|b| (b.records, b.bytes)), Some((2, 11)));
    assert_eq!(got[3].audit.attempt, Some(h.attempt));
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
    // The cluster's configuration entry is shown too (a configuration change is no housekeeping).
    assert!(sent < 21, "the window holds the rest back");
    let mut seen = sent;
    let mut last_seq = first.last().unwrap().0;
    while seen < 21 {
        let mark = d.input(Input::StreamAck { stream: StreamId(1), seq: last_seq, error: None });
        let more = items(&d, mark, 1);
        assert!(!more.is_empty(), "an acknowledgement makes room");
        seen += entries(&more).len();
        last_seq = more.last().unwrap().0;
    }
    assert_eq!(seen, 21);
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
    let head = d.engine.state().applied();
    let opened = [(1, StreamItem::Progress { through: head })];
    assert_eq!(
        items(&d, mark, 3),
        opened,
        "a closed stream's place is free again; a tail from the head says where it starts"
    );
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

// ---- watches -------------------------------------------------------------------------------

use std::collections::BTreeMap;
use truba_engine::{BriefStatus, SessionBrief, SessionId, SessionState, SessionView};

type Held = BTreeMap<SessionId, (Kind, SessionBrief, Vec<Vec<u8>>)>;

/// What a watcher holds: built from a resync, kept up to date by the changes.
#[derive(Default, Debug)]
struct Watcher {
    sessions: Held,
    synced: Option<Index>,
    resyncs: u32,
    last: Index,
}

impl Watcher {
    fn apply(&mut self, item: &StreamItem) {
        match item {
            StreamItem::ResyncStart { .. } => {
                self.sessions.clear();
                self.synced = None;
                self.resyncs += 1;
            }
            StreamItem::Resync { sessions } => {
                assert!(self.synced.is_none(), "resync sessions come before the sync marker");
                for s in sessions {
                    let old = self.sessions.insert(s.session, (s.kind, s.brief.clone(), s.records.clone()));
                    assert!(old.is_none(), "a resync shows each session once");
                }
            }
            StreamItem::Synced { at } => {
                self.synced = Some(*at);
                self.last = *at;
            }
            StreamItem::Entries { entries, .. } => {
                assert!(self.synced.is_some(), "changes come after the sync marker");
                for bytes in entries {
                    let e: LedgerEntry = postcard::from_bytes(bytes).unwrap();
                    assert!(e.index > self.last, "changes in index order, each once");
                    self.last = e.index;
                    for ev in e.events {
                        let id = ev.session.expect("a watch shows session events");
                        let held = self.sessions.get(&id).map(|h| h.1.clone());
                        assert_eq!(
                            held, ev.before,
                            "the change's previous state is what the watcher holds ({:?})",
                            ev.what
                        );
                        match ev.after {
                            None => {
                                self.sessions.remove(&id);
                            }
                            Some(after) => {
                                let kind = ev.kind.expect("a session event has a kind");
                                let h = self.sessions.entry(id).or_insert((kind, after.clone(), Vec::new()));
                                h.1 = after;
                                match ev.what {
                                    What::Created { records } => h.2 = records,
                                    What::Appended { record } => h.2.push(record),
                                    What::Replaced { record } => h.2 = vec![record],
                                    _ => {}
                                }
                            }
                        }
                    }
                }
            }
            StreamItem::Progress { .. } => {}
            StreamItem::End(e) => panic!("the watch ended: {e}"),
        }
    }
}

fn brief_of(v: &SessionView) -> SessionBrief {
    let status = match v.state {
        SessionState::Active { delivering, .. } => BriefStatus::Active { delivering },
        SessionState::Stored { due } => BriefStatus::Stored { due },
        SessionState::Dead { since } => BriefStatus::Dead { since },
    };
    let records = v.source.map_or(v.records.len() as u32, |(_, n)| n);
    SessionBrief { status, attempt: v.handle.attempt, failures: v.failures, records, bytes: v.bytes }
}

/// Every session the engine holds, spilled ones with their records from their source files.
fn engine_sessions(d: &Driver) -> Held {
    let state = d.engine.state();
    let mut out = Held::new();
    for v in state.session_views().chain(state.spilled_views()) {
        let records = match v.source {
            None => v.records.clone(),
            Some((source, _)) => match state.held_records(v.id) {
                Some(u) => u.records,
                None => {
                    let file = &d.dir[&truba_engine::source_name(source)];
                    let all = truba_engine::decode_source_file(file).unwrap();
                    all.into_iter().find(|(id, _)| *id == v.id).expect("a spilled session is in its file").1
                }
            },
        };
        out.insert(v.id, (v.kind, brief_of(&v), records));
    }
    out
}

/// Feeds every item since `mark` to the watcher, acknowledging as it goes, until nothing more.
fn follow(d: &mut Driver, w: &mut Watcher, id: u64, mut mark: usize) {
    loop {
        let got = items(d, mark, id);
        let Some((last, _)) = got.last() else { return };
        for (_, item) in &got {
            w.apply(item);
        }
        let last = *last;
        mark = d.input(Input::StreamAck { stream: StreamId(id), seq: last, error: None });
    }
}

fn spilling() -> EngineConfig {
    let mut c = cfg();
    c.limits.stored_memtable_bytes_max = 1_500;
    c.limits.sources_per_kind_max = 2;
    c.limits.snapshot_every_entries = 30;
    c.limits.ledger_cache_bytes_max = 0;
    c.limits.stream_read_bytes = 300;
    c
}

/// Sessions of both kinds: some deleted, most stored far ahead (so they are spilled to source
/// files and merged), a few left active.
fn activity(d: &mut Driver, from: u64, n: u64) {
    for i in from..from + n {
        let h = created(d, 100 + i, 1 + (i % 2) as u32, format!("first {i:>20}").as_bytes());
        d.req(100 + i, Request::Append { handle: h, record: format!("second {i:>20}").into_bytes() }).unwrap();
        match i % 5 {
            0 => drop(d.req(100 + i, Request::Delete { handle: h }).unwrap()),
            1 => {}
            _ => drop(d.req(100 + i, Request::Store { handle: h, timeout_s: 100_000 }).unwrap()),
        }
        d.advance(100);
        d.input(Input::Tick);
    }
}

fn watch(kinds: &[u32], resume_after: Option<Index>, window: Option<u32>) -> StreamOpen {
    StreamOpen::Watch { kinds: kinds.iter().map(|k| Kind(*k)).collect(), resume_after, window }
}

#[test]
fn a_watch_resyncs_from_the_snapshot_and_source_files_then_its_changes_rebuild_the_state() {
    let mut d = Driver::booted(spilling(), 1);
    activity(&mut d, 0, 120);
    assert!(d.engine.status().sessions_spilled > 10, "sessions were spilled: {:?}", d.engine.status());
    let mut w = Watcher::default();
    let mark = open(&mut d, 1, watch(&[], None, None));
    let reads = d.ios_since(mark);
    follow(&mut d, &mut w, 1, mark);
    assert!(reads.iter().any(|op| matches!(op, IoOp::ReadAt { file, .. } if file.starts_with("snap-"))));
    assert!(
        reads.iter().any(|op| matches!(op, IoOp::ReadAt { file, .. } if file.starts_with("src-"))),
        "spilled records come from their files"
    );
    assert!(w.synced.unwrap().0 > 0, "the resync is of a snapshot");
    assert_eq!(w.sessions, engine_sessions(&d), "resync plus changes hold the server's sessions");
    for round in 0..3 {
        let mark = d.mark();
        activity(&mut d, 1000 + round * 50, 50);
        follow(&mut d, &mut w, 1, mark);
        assert_eq!(w.sessions, engine_sessions(&d), "after round {round}");
    }
    assert_eq!(w.resyncs, 1);
}

#[test]
fn a_watch_of_one_kind_sees_only_its_sessions() {
    let mut d = Driver::booted(spilling(), 1);
    activity(&mut d, 0, 80);
    let mut w = Watcher::default();
    let mark = open(&mut d, 1, watch(&[2], None, None));
    follow(&mut d, &mut w, 1, mark);
    let mark = d.mark();
    activity(&mut d, 500, 40);
    follow(&mut d, &mut w, 1, mark);
    let mut expected = engine_sessions(&d);
    expected.retain(|_, (kind, _, _)| *kind == Kind(2));
    assert_eq!(w.sessions, expected);
}

#[test]
fn a_watcher_that_reconnects_resumes_after_its_index_or_is_resynced_if_it_is_gone() {
    let mut c = spilling();
    c.limits.ledger_segment_bytes_max = 4_000;
    c.limits.ledger_retain_bytes_max = 8_000;
    let mut d = Driver::booted(c, 1);
    activity(&mut d, 0, 40);
    let mut w = Watcher::default();
    let mark = open(&mut d, 1, watch(&[], None, None));
    follow(&mut d, &mut w, 1, mark);
    d.input(Input::StreamClose { stream: StreamId(1) });
    activity(&mut d, 100, 10);
    let mark = open(&mut d, 2, watch(&[], Some(w.last), None));
    let first = items(&d, mark, 2);
    assert_eq!(first.first().map(|(_, i)| i.clone()), Some(StreamItem::Synced { at: w.last }), "a resume, no resync");
    follow(&mut d, &mut w, 2, mark);
    assert_eq!((w.resyncs, &w.sessions), (1, &engine_sessions(&d)));
    d.input(Input::StreamClose { stream: StreamId(2) });
    activity(&mut d, 200, 150);
    let mark = open(&mut d, 3, watch(&[], Some(w.last), None));
    assert!(matches!(items(&d, mark, 3).first(), Some((_, StreamItem::ResyncStart { .. }))), "the index is gone");
    follow(&mut d, &mut w, 3, mark);
    assert_eq!((w.resyncs, &w.sessions), (2, &engine_sessions(&d)));
}

#[test]
fn a_watch_never_has_more_events_out_than_its_window_and_its_files_stay_until_it_is_done() {
    let mut d = Driver::booted(spilling(), 1);
    activity(&mut d, 0, 120);
    let mark = open(&mut d, 1, watch(&[], None, Some(5)));
    let mut w = Watcher::default();
    let first = items(&d, mark, 1);
    let events: u32 = first.iter().map(|(_, i)| i.events()).sum();
    assert!(events <= 5 && events > 0, "{events} events out with a window of 5");
    for (_, item) in &first {
        w.apply(item);
    }
    let pinned: Vec<String> = d
        .ios_since(mark)
        .iter()
        .filter_map(|op| match op {
            IoOp::ReadAt { file, .. } => Some(file.clone()),
            _ => None,
        })
        .collect();
    // Much happens meanwhile: snapshots, spills and merges that would remove those files.
    activity(&mut d, 1000, 150);
    for f in &pinned {
        assert!(d.dir.contains_key(f), "{f} is kept while the resync reads it");
    }
    let mut last = first.last().unwrap().0;
    let mut mark = d.mark();
    loop {
        let m = d.input(Input::StreamAck { stream: StreamId(1), seq: last, error: None });
        let got = items(&d, m.min(mark), 1).into_iter().filter(|(n, _)| *n > last).collect::<Vec<_>>();
        mark = d.mark();
        let Some(&(n, _)) = got.last() else { break };
        let out: u32 = got.iter().map(|(_, i)| i.events()).sum();
        assert!(out <= 5, "{out} events out after one acknowledgement");
        for (_, item) in &got {
            w.apply(item);
        }
        last = n;
    }
    assert_eq!(w.sessions, engine_sessions(&d));
    // Done: the files it kept are removed at the next clean-up.
    activity(&mut d, 3000, 40);
    assert!(pinned.iter().any(|f| !d.dir.contains_key(f)), "files kept for the resync go once it is done");
}
