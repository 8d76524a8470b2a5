//! The reading side's properties, checked against the ledger's ground truth (every replica's
//! entry at each index, on which they agreed: see `world/streams.rs`).
//!
//! Tails (`tail-*`): each tailer's entries come in index order, each once, across every stream
//! it opens (`tail-ordered`); every entry equals the committed entry at its index with exactly
//! the events of the reader's filter, never split (`tail-atomic`); nothing of the filter between
//! where a stream started and the last index an item covered is missing, unless the reader was
//! told it was compacted away (`tail-reliable`); a progress mark is never lower than an entry
//! already sent, and marks never go back (`tail-marks`).
//!
//! Watches (`watch-rebuild`): a watcher's copy, built from its resync and the changes after it,
//! must be the server's sessions at every index it acknowledges, and each change's previous
//! state must be what the watcher held. The server's sessions at an index are rebuilt from the
//! ledger the same way, from index 1; that rebuild is itself checked against the leader's final
//! state, so a wrong ledger cannot make a wrong watcher look right.

use crate::history::Event;
use crate::world::{RunOutput, Violation};
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use truba_engine::{
    BriefStatus, Filter, Kind, LedgerEntry, SessionBrief, SessionId, SessionState, StreamItem, StreamOpen, TailFrom,
    What,
};

type Records = Vec<Vec<u8>>;

/// One session's digest, for comparing copies of many sessions in O(1).
fn digest(id: SessionId, kind: Kind, brief: &SessionBrief, records: &Records) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (id.0, kind.0, brief.attempt.0, brief.failures, brief.records, brief.bytes).hash(&mut h);
    match brief.status {
        BriefStatus::Active { delivering } => (0u8, delivering as u64).hash(&mut h),
        BriefStatus::Stored { due } => (1u8, due.0).hash(&mut h),
        BriefStatus::Dead { since } => (2u8, since.0).hash(&mut h),
    }
    records.hash(&mut h);
    h.finish()
}

/// A copy of sessions, kept with per-kind sums of their digests.
#[derive(Clone, Debug, Default)]
struct Copy {
    sessions: BTreeMap<SessionId, (Kind, SessionBrief, Records)>,
    sums: BTreeMap<Kind, u64>,
}

impl Copy {
    fn set(&mut self, id: SessionId, value: Option<(Kind, SessionBrief, Records)>) {
        if let Some((kind, brief, records)) = self.sessions.remove(&id) {
            let d = digest(id, kind, &brief, &records);
            *self.sums.entry(kind).or_default() = self.sums[&kind].wrapping_sub(d);
        }
        if let Some((kind, brief, records)) = value {
            let d = digest(id, kind, &brief, &records);
            let sum = self.sums.entry(kind).or_default();
            *sum = sum.wrapping_add(d);
            self.sessions.insert(id, (kind, brief, records));
        }
    }

    /// The sum for these kinds (every kind if empty).
    fn sum(&self, kinds: &[Kind]) -> u64 {
        self.sums
            .iter()
            .filter(|(k, _)| kinds.is_empty() || kinds.contains(k))
            .fold(0u64, |a, (_, s)| a.wrapping_add(*s))
    }

    /// Applies one entry's session events; returns the first event whose previous state is not
    /// what the copy holds.
    fn apply(&mut self, e: &LedgerEntry, kinds: &[Kind]) -> Result<(), String> {
        for ev in &e.events {
            let (Some(id), Some(kind)) = (ev.session, ev.kind) else { continue };
            if ev.what.is_internal() || (!kinds.is_empty() && !kinds.contains(&kind)) {
                continue;
            }
            let held = self.sessions.get(&id).map(|h| h.1.clone());
            if held != ev.before {
                return Err(format!(
                    "index {}: {} of session {} changes it from {:?}, but it was {:?}",
                    e.index.0,
                    ev.what.name(),
                    id.0,
                    ev.before,
                    held
                ));
            }
            let value = ev.after.clone().map(|after| {
                let mut records = self.sessions.get(&id).map(|h| h.2.clone()).unwrap_or_default();
                match &ev.what {
                    What::Created { records: r } => records = r.clone(),
                    What::Appended { record } => records.push(record.clone()),
                    What::Replaced { record } => records = vec![record.clone()],
                    _ => {}
                }
                (kind, after, records)
            });
            self.set(id, value);
        }
        Ok(())
    }
}

struct Truth<'a> {
    run: &'a RunOutput,
    decoded: BTreeMap<u64, LedgerEntry>,
}

impl Truth<'_> {
    fn entry(&mut self, index: u64) -> Option<&LedgerEntry> {
        if !self.decoded.contains_key(&index) {
            let bytes = self.run.ledger.get(&index)?;
            let e = LedgerEntry::decode(bytes).expect("the ground truth decodes");
            self.decoded.insert(index, e);
        }
        self.decoded.get(&index)
    }
}

/// A tailer's view across its streams.
#[derive(Default)]
struct Tail {
    filter: Filter,
    stream: u64,
    /// The last item number of the open stream.
    seq: u64,
    /// Everything through here was shown (or looked at and filtered out) to this tailer.
    covered: Option<u64>,
    /// The highest index of an entry shown.
    last_entry: u64,
    /// The highest progress mark of the open stream.
    mark: u64,
}

/// A watcher's copy, and its items received but not yet acknowledged.
#[derive(Default)]
struct Watch {
    kinds: Vec<Kind>,
    stream: u64,
    copy: Copy,
    synced: bool,
    pending: Vec<(u64, StreamItem)>,
    /// (index, sum of the copy's digests) at each acknowledgement that covered an index.
    checks: Vec<(u64, u64, u64)>,
    broken_copy: bool,
}

pub fn check(run: &RunOutput) -> Vec<Violation> {
    let mut c = StreamChecker {
        truth: Truth { run, decoded: BTreeMap::new() },
        tails: BTreeMap::new(),
        watches: BTreeMap::new(),
        violations: Vec::new(),
    };
    for (t, e) in &run.history.events {
        c.event(*t, e);
    }
    c.rebuild_checks(run);
    c.violations
}

struct StreamChecker<'a> {
    truth: Truth<'a>,
    tails: BTreeMap<u32, Tail>,
    watches: BTreeMap<u32, Watch>,
    violations: Vec<Violation>,
}

impl StreamChecker<'_> {
    fn violate(&mut self, property: &'static str, at_us: u64, detail: String) {
        self.violations.push(Violation { property, at_us, detail, session: None });
    }

    fn event(&mut self, t: u64, e: &Event) {
        match e {
            Event::StreamOpen { streamer, stream, open: StreamOpen::Tail { from, filter }, .. } => {
                let tail = self.tails.entry(*streamer).or_default();
                tail.filter = filter.clone();
                (tail.stream, tail.seq, tail.mark) = (*stream, 0, 0);
                // Each stream is judged from where it was asked to start: a tailer resumes after
                // the last entry it was shown, a consumer goes back to its checkpoint.
                tail.covered = match from {
                    TailFrom::Index(i) => Some(i.0.saturating_sub(1)),
                    _ => None,
                };
                tail.last_entry = tail.covered.unwrap_or(0);
            }
            Event::StreamOpen { streamer, stream, open: StreamOpen::Watch { kinds, .. }, .. } => {
                let w = self.watches.entry(*streamer).or_default();
                w.kinds = kinds.clone();
                w.stream = *stream;
                w.pending.clear();
            }
            Event::StreamItem { streamer, stream, seq, item } => {
                if self.tails.get(streamer).is_some_and(|x| x.stream == *stream) {
                    self.tail_item(t, *streamer, *seq, item);
                } else if self.watches.get(streamer).is_some_and(|w| w.stream == *stream) {
                    let w = self.watches.get_mut(streamer).expect("checked");
                    w.pending.push((*seq, item.clone()));
                }
            }
            Event::StreamAck { streamer, stream, seq, .. }
                if self.watches.get(streamer).is_some_and(|w| w.stream == *stream) =>
            {
                self.watch_ack(t, *streamer, *seq);
            }
            Event::StreamerCrash { streamer } => {
                if let Some(w) = self.watches.get_mut(streamer) {
                    // The process that held the copy is gone; the next one is resynced.
                    *w = Watch { kinds: std::mem::take(&mut w.kinds), ..Watch::default() };
                }
                if let Some(tail) = self.tails.get_mut(streamer) {
                    tail.covered = None;
                    tail.last_entry = 0;
                }
            }
            _ => {}
        }
    }

    fn tail_item(&mut self, t: u64, streamer: u32, seq: u64, item: &StreamItem) {
        let tail = self.tails.get_mut(&streamer).expect("a tail");
        if seq != tail.seq + 1 {
            let detail = format!("streamer {streamer} got item {seq} after item {}", tail.seq);
            self.violate("tail-ordered", t, detail);
        }
        let tail = self.tails.get_mut(&streamer).expect("a tail");
        tail.seq = seq;
        match item {
            StreamItem::Entries { entries, through, .. } => {
                let decoded: Vec<LedgerEntry> =
                    entries.iter().map(|b| LedgerEntry::decode(b).expect("a replica's entry decodes")).collect();
                self.tail_entries(t, streamer, &decoded, through.0);
            }
            StreamItem::Progress { through } => {
                let tail = self.tails.get_mut(&streamer).expect("a tail");
                let (mark, last) = (tail.mark, tail.last_entry);
                tail.mark = through.0;
                if through.0 < mark || through.0 < last {
                    let detail = format!(
                        "streamer {streamer}: progress mark {} after mark {mark} and entry {last} were sent",
                        through.0
                    );
                    self.violate("tail-marks", t, detail);
                }
                self.tail_covers(t, streamer, &[], through.0);
            }
            StreamItem::End(truba_engine::StreamError::Compacted { first_available, .. }) => {
                // Told the rest is gone: the tailer goes on from what is still held.
                let tail = self.tails.get_mut(&streamer).expect("a tail");
                tail.covered = Some(first_available.0.saturating_sub(1).max(tail.covered.unwrap_or(0)));
            }
            _ => {}
        }
    }

    fn tail_entries(&mut self, t: u64, streamer: u32, entries: &[LedgerEntry], through: u64) {
        let filter = self.tails[&streamer].filter.clone();
        let mut previous = self.tails[&streamer].last_entry;
        for e in entries {
            if e.index.0 <= previous {
                let detail = format!("streamer {streamer} was shown entry {} after entry {previous}", e.index.0);
                self.violate("tail-ordered", t, detail);
            }
            previous = previous.max(e.index.0);
            let expected = self.truth.entry(e.index.0).and_then(|truth| truth.filtered(&filter));
            if expected.as_ref() != Some(e) {
                let detail = format!(
                    "streamer {streamer} was shown entry {} as {:?}, but the committed entry with its filter is {:?}",
                    e.index.0,
                    e.events.iter().map(|ev| ev.what.name()).collect::<Vec<_>>(),
                    expected.map(|x| x.events.iter().map(|ev| ev.what.name()).collect::<Vec<_>>())
                );
                self.violate("tail-atomic", t, detail);
            }
        }
        let tail = self.tails.get_mut(&streamer).expect("a tail");
        tail.last_entry = previous;
        if tail.mark > entries.first().map_or(u64::MAX, |e| e.index.0) {
            let detail = format!("streamer {streamer} was shown an entry below its progress mark {}", tail.mark);
            self.violate("tail-marks", t, detail);
        }
        let shown: Vec<u64> = entries.iter().map(|e| e.index.0).collect();
        self.tail_covers(t, streamer, &shown, through);
    }

    /// Every entry of the filter in (covered, through] must be among `shown`.
    fn tail_covers(&mut self, t: u64, streamer: u32, shown: &[u64], through: u64) {
        let tail = &self.tails[&streamer];
        let filter = tail.filter.clone();
        let from = match tail.covered {
            Some(c) => c + 1,
            None => shown.first().copied().unwrap_or(through + 1),
        };
        let shown: BTreeSet<u64> = shown.iter().copied().collect();
        for index in from..=through {
            let matching = self.truth.entry(index).is_some_and(|e| e.filtered(&filter).is_some());
            if matching && !shown.contains(&index) {
                let detail = format!(
                    "streamer {streamer} was never shown entry {index}, though its stream moved past it to {through}"
                );
                self.violate("tail-reliable", t, detail);
                break;
            }
        }
        let tail = self.tails.get_mut(&streamer).expect("a tail");
        tail.covered = Some(tail.covered.unwrap_or(0).max(through));
    }

    /// A watcher acknowledged its items through `seq`: they are applied to its copy.
    fn watch_ack(&mut self, t: u64, streamer: u32, seq: u64) {
        let w = self.watches.get_mut(&streamer).expect("a watcher");
        let items: Vec<StreamItem> = w.pending.iter().filter(|(n, _)| *n <= seq).map(|(_, i)| i.clone()).collect();
        w.pending.retain(|(n, _)| *n > seq);
        let mut covered = None;
        let mut problem = None;
        for item in items {
            let w = self.watches.get_mut(&streamer).expect("a watcher");
            match item {
                StreamItem::ResyncStart { .. } => {
                    w.copy = Copy::default();
                    w.synced = false;
                    w.broken_copy = false;
                }
                StreamItem::Resync { sessions } => {
                    for s in sessions {
                        if w.copy.sessions.contains_key(&s.session) {
                            problem = Some(format!("a resync showed session {} twice", s.session.0));
                        }
                        w.copy.set(s.session, Some((s.kind, s.brief, s.records)));
                    }
                }
                StreamItem::Synced { at } => {
                    w.synced = true;
                    covered = Some(at.0);
                }
                StreamItem::Entries { entries, through, .. } => {
                    let kinds = w.kinds.clone();
                    for b in &entries {
                        let e = LedgerEntry::decode(b).expect("a replica's entry decodes");
                        if let Err(p) = w.copy.apply(&e, &kinds) {
                            problem.get_or_insert(p);
                        }
                    }
                    covered = Some(through.0);
                }
                _ => {}
            }
        }
        let w = self.watches.get_mut(&streamer).expect("a watcher");
        if let Some(p) = problem {
            if !w.broken_copy {
                w.broken_copy = true;
                self.violate("watch-rebuild", t, format!("watcher {streamer}: {p}"));
            }
            return;
        }
        if let (Some(index), true) = (covered, w.synced) {
            let sum = w.copy.sum(&w.kinds);
            w.checks.push((index, sum, t));
        }
    }

    /// The copies at every acknowledged index, against the ledger's sessions at that index.
    fn rebuild_checks(&mut self, run: &RunOutput) {
        let mut wanted: Vec<(u64, u32, u64, u64)> = Vec::new();
        for (streamer, w) in &self.watches {
            wanted.extend(w.checks.iter().map(|(i, sum, t)| (*i, *streamer, *sum, *t)));
        }
        wanted.sort();
        let Some(last) = run.ledger.keys().next_back().copied() else { return };
        let mut truth = Copy::default();
        let mut at = 0;
        let mut next = wanted.into_iter().peekable();
        while at <= last {
            while let Some((index, streamer, sum, t)) = next.next_if(|w| w.0 == at) {
                let kinds = self.watches[&streamer].kinds.clone();
                if truth.sum(&kinds) != sum {
                    let detail = format!(
                        "watcher {streamer}'s copy at index {index} is not the server's sessions then \
                         ({} sessions of its kinds on the server)",
                        truth.sessions.values().filter(|(k, _, _)| kinds.is_empty() || kinds.contains(k)).count()
                    );
                    self.violate("watch-rebuild", t, detail);
                }
            }
            at += 1;
            if at > last {
                break;
            }
            let Some(e) = self.truth.entry(at).cloned() else {
                // A hole in the ground truth (an index no replica was seen applying): stop here.
                return;
            };
            if let Err(p) = truth.apply(&e, &[]) {
                self.violate("watch-rebuild", run.end_us, format!("the ledger itself: {p}"));
                return;
            }
        }
        self.final_check(run, &truth, last);
    }

    /// The sessions rebuilt from the ledger must be the leader's at the end.
    fn final_check(&mut self, run: &RunOutput, truth: &Copy, last: u64) {
        let (Some(finals), Some(applied)) = (&run.final_sessions, run.final_applied) else { return };
        if applied != last {
            return;
        }
        let mut actual = Copy::default();
        for v in finals {
            let status = match v.state {
                SessionState::Active { delivering, .. } => BriefStatus::Active { delivering },
                SessionState::Stored { due } => BriefStatus::Stored { due },
                SessionState::Dead { since } => BriefStatus::Dead { since },
            };
            let records = v.source.map_or(v.records.len() as u32, |(_, n)| n);
            let brief =
                SessionBrief { status, attempt: v.handle.attempt, failures: v.failures, records, bytes: v.bytes };
            actual.set(v.id, Some((v.kind, brief, v.records.clone())));
        }
        if actual.sum(&[]) != truth.sum(&[]) {
            let differ: Vec<u64> = actual
                .sessions
                .iter()
                .filter(|(id, s)| truth.sessions.get(id) != Some(s))
                .map(|(id, _)| id.0)
                .chain(truth.sessions.keys().filter(|id| !actual.sessions.contains_key(id)).map(|id| id.0))
                .take(5)
                .collect();
            let detail =
                format!("the sessions rebuilt from the ledger are not the leader's at index {last}: {differ:?} differ");
            self.violate("watch-rebuild", run.end_us, detail);
        }
    }
}
