//! `linearizable-reads`: every answer a reader got fits a linearization of that session's
//! writes. A read of session X asked at `t_inv` and answered at `t_resp` may take effect at any
//! moment in between, so:
//!
//! - Every write to X acknowledged before `t_inv` is reflected. The records shown are one of
//!   the record lists the session model allowed when the read was asked, extended by the writes
//!   to X in flight then or sent while it was under way (each may or may not be reflected, but
//!   only whole). A delete acknowledged before means "deleted" (or "unknown" once tombstones
//!   may have been evicted), an acknowledged creation means never "unknown", and a delivery
//!   means at least its attempt.
//! - Nothing sent after `t_resp` is reflected: its records are in no possibility, and
//!   "deleted" needs a delete acknowledged, in flight, left unanswered, or sent by then.
//! - Reads are monotonic: of two reads of X where the first was answered before the second was
//!   asked, the second never shows an older state: a session again after "deleted", a lower
//!   attempt, an attempt active again after it was stored, or records ending in an older write.
//!
//! Some changes come from no client write, and are allowed for: a lease that runs out stores
//! the session (same attempt), a failed delivery stores it again or dead-letters it, and a take
//! whose proposer lost its role raises the attempt without any delivery being seen (so there is
//! no upper bound on the attempt). A spilled session may be shown without its records
//! (`source` gives their count): such an answer says nothing about records.
//!
//! Writes to one session are applied in the order they were first sent: one holder sends one
//! request at a time, and a holder's request sent before a take can only be applied before it
//! (after it, fencing refuses it). So the position of the write that made a session's last
//! record only grows, which is what the monotonic check compares.

use super::{operated, Records, SessionModel};
use crate::workload::record_origin;
use crate::world::{RunOutput, Violation};
use std::collections::BTreeMap;
use truba_engine::{Request, RequestError, SessionState, SessionView};

const PROPERTY: &str = "linearizable-reads";

/// What the acknowledged history required of a session when a read of it was asked.
struct Required {
    possible: std::collections::BTreeSet<Records>,
    /// Too many unknown outcomes for the records to be checked.
    records_unknown: bool,
    deleted: bool,
    maybe_deleted: bool,
    /// The attempt of the session's latest delivery.
    attempt: u32,
}

/// Whether a session existed, as an answer showed it; later answers never show an earlier one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
enum Existence {
    #[default]
    Unknown,
    Live,
    Deleted,
}

/// A session's state as answers showed it, in the terms later answers must not go back on.
#[derive(Clone, Copy, Debug, Default)]
struct Shown {
    existence: Existence,
    /// For a live session: its attempt, and whether it was stored or dead in that attempt (an
    /// attempt never becomes active again).
    attempt: (u32, bool),
    /// The write whose record the session ended with, when the records were shown: its
    /// position among all writes sent, and its `(client, seq)`.
    newest_write: Option<(u64, RequestKey)>,
    /// When the read that showed the newest of these was answered, for the report.
    answered_us: u64,
}

impl Shown {
    fn merge(&mut self, other: Shown) {
        self.existence = self.existence.max(other.existence);
        self.attempt = self.attempt.max(other.attempt);
        self.newest_write = self.newest_write.max(other.newest_write);
        self.answered_us = self.answered_us.max(other.answered_us);
    }
}

struct PendingRead {
    reader: u32,
    read: u64,
    asked_us: u64,
    /// `None` if the session's creation was not acknowledged when the read was asked.
    required: Option<Required>,
    /// Writes to the session in flight when the read was asked, or sent while it was.
    concurrent: Vec<Request>,
    /// What reads answered before this one was asked had shown of the session.
    floor: Option<Shown>,
}

impl PendingRead {
    fn label(&self, session: u64, answered_us: u64) -> String {
        format!(
            "get {session} (Reader({})#{}, asked at {} s, answered at {} s)",
            self.reader,
            self.read,
            secs(self.asked_us),
            secs(answered_us)
        )
    }

    fn delete_possible(&self) -> bool {
        let sent = self.concurrent.iter().any(|r| matches!(r, Request::Delete { .. } | Request::DropDead { .. }));
        sent || self.required.as_ref().is_some_and(|r| r.deleted || r.maybe_deleted)
    }
}

/// A request's name: `(client, seq)`.
type RequestKey = (u64, u64);

fn secs(us: u64) -> String {
    format!("{:.3}", us as f64 / 1e6)
}

pub(super) struct ReadsChecker {
    /// Writes in flight, per session: who sent them and what.
    open_writes: BTreeMap<u64, Vec<(RequestKey, Request)>>,
    /// Reads not yet answered, per session.
    pending: BTreeMap<u64, Vec<PendingRead>>,
    /// Per session, the newest state answered reads had shown.
    shown: BTreeMap<u64, Shown>,
    /// Where each record-carrying write was sent among all writes: `(client, seq)` to position.
    write_position: BTreeMap<RequestKey, u64>,
    writes_sent: u64,
    /// Sessions whose creation was sent: no more can have been deleted, so while this stays
    /// within the tombstone limit no tombstone was evicted.
    creations_sent: u64,
    tombstones_max: u64,
    pub violations: Vec<Violation>,
}

/// The session a write changes, if it names one.
fn written_session(request: &Request) -> Option<u64> {
    request.handle().map(|h| h.session.0).or_else(|| operated(request))
}

/// Whether a view holds the session's records (a spilled session's may be left out).
fn records_shown(view: &SessionView) -> bool {
    view.source.is_none_or(|(_, count)| view.records.len() == count as usize)
}

impl ReadsChecker {
    pub fn new(run: &RunOutput) -> ReadsChecker {
        ReadsChecker {
            open_writes: BTreeMap::new(),
            pending: BTreeMap::new(),
            shown: BTreeMap::new(),
            write_position: BTreeMap::new(),
            writes_sent: 0,
            creations_sent: 0,
            tombstones_max: run.scenario.limits.tombstones_max as u64,
            violations: Vec::new(),
        }
    }

    fn violate(&mut self, at_us: u64, session: u64, detail: String) {
        self.violations.push(Violation { property: PROPERTY, at_us, detail, session: Some(session) });
    }

    /// A client or handler sent a request (the first time; retries reuse it).
    pub fn write_invoked(&mut self, client: u64, seq: u64, request: &Request) {
        self.writes_sent += 1;
        match request {
            Request::New { record, .. } => {
                self.creations_sent += 1;
                if record.is_some() {
                    self.write_position.insert((client, seq), self.writes_sent);
                }
            }
            Request::Append { .. } | Request::Replace { .. } => {
                self.write_position.insert((client, seq), self.writes_sent);
            }
            _ => {}
        }
        let Some(session) = written_session(request) else { return };
        for p in self.pending.get_mut(&session).into_iter().flatten() {
            p.concurrent.push(request.clone());
        }
        self.open_writes.entry(session).or_default().push(((client, seq), request.clone()));
    }

    /// A request is no longer in flight: answered, given up, or its client crashed.
    pub fn write_closed(&mut self, client: u64, seq: u64, request: &Request) {
        let Some(session) = written_session(request) else { return };
        let Some(open) = self.open_writes.get_mut(&session) else { return };
        open.retain(|(key, _)| *key != (client, seq));
        if open.is_empty() {
            self.open_writes.remove(&session);
        }
    }

    /// A reader asked for `session`; `model` is what the acknowledged writes say of it now.
    pub fn invoked(&mut self, t: u64, reader: u32, read: u64, session: u64, model: Option<&SessionModel>) {
        let required = model.map(|m| Required {
            possible: m.possible.clone(),
            records_unknown: m.unknown,
            deleted: m.deleted,
            maybe_deleted: m.maybe_deleted,
            attempt: m.attempt,
        });
        let concurrent =
            self.open_writes.get(&session).map_or_else(Vec::new, |w| w.iter().map(|(_, r)| r.clone()).collect());
        let floor = self.shown.get(&session).copied();
        let p = PendingRead { reader, read, asked_us: t, required, concurrent, floor };
        self.pending.entry(session).or_default().push(p);
    }

    /// The reader gave up: the read may or may not have been served, and says nothing.
    pub fn given_up(&mut self, reader: u32, read: u64, session: u64) {
        self.take_pending(reader, read, session);
    }

    fn take_pending(&mut self, reader: u32, read: u64, session: u64) -> Option<PendingRead> {
        let list = self.pending.get_mut(&session)?;
        let at = list.iter().position(|p| (p.reader, p.read) == (reader, read))?;
        let p = list.swap_remove(at);
        if list.is_empty() {
            self.pending.remove(&session);
        }
        Some(p)
    }

    /// The answer to a read reached its reader.
    pub fn completed(
        &mut self,
        t: u64,
        reader: u32,
        read: u64,
        session: u64,
        answer: &Result<SessionView, RequestError>,
    ) {
        let Some(p) = self.take_pending(reader, read, session) else { return };
        let Some(shown) = self.shown_by(t, answer) else { return };
        let label = p.label(session, t);
        let mut found = Vec::new();
        if let Some(req) = &p.required {
            found.extend(self.against_writes(&p, req, answer));
        }
        if let Some(floor) = &p.floor {
            found.extend(self.against_earlier_reads(floor, &shown));
        }
        for detail in found {
            self.violate(t, session, format!("{label}: {detail}"));
        }
        self.shown.entry(session).or_default().merge(shown);
    }

    /// What an answer showed, or `None` for an answer that shows nothing of the session.
    fn shown_by(&self, t: u64, answer: &Result<SessionView, RequestError>) -> Option<Shown> {
        let mut shown = Shown { answered_us: t, ..Shown::default() };
        match answer {
            Ok(v) => {
                shown.existence = Existence::Live;
                shown.attempt = (v.handle.attempt.0, !matches!(v.state, SessionState::Active { .. }));
                if records_shown(v) {
                    shown.newest_write = v.records.last().and_then(|r| self.position_of(r));
                }
            }
            Err(RequestError::SessionDeleted(_)) => shown.existence = Existence::Deleted,
            Err(RequestError::SessionUnknown(_)) => shown.existence = Existence::Unknown,
            Err(_) => return None,
        }
        Some(shown)
    }

    fn position_of(&self, record: &[u8]) -> Option<(u64, RequestKey)> {
        let origin = record_origin(record)?;
        Some((*self.write_position.get(&origin)?, origin))
    }

    fn tombstones_may_be_evicted(&self) -> bool {
        self.creations_sent > self.tombstones_max
    }

    /// The answer against the writes acknowledged before the read was asked and those that
    /// may have been applied while it was under way.
    fn against_writes(
        &self,
        p: &PendingRead,
        req: &Required,
        answer: &Result<SessionView, RequestError>,
    ) -> Vec<String> {
        let mut found = Vec::new();
        match answer {
            Err(RequestError::SessionUnknown(_)) if !(p.delete_possible() && self.tombstones_may_be_evicted()) => {
                found.push(
                    "answered \"unknown\", but the session's creation was acknowledged before it was asked".into(),
                );
            }
            Err(RequestError::SessionDeleted(_)) if !p.delete_possible() => found.push(
                "answered \"deleted\", but no delete of the session was acknowledged, in flight, left unanswered or \
                 sent by then"
                    .into(),
            ),
            Ok(v) if req.deleted => found.push(format!(
                "showed the session live ({} {}), but its delete was acknowledged before the read was asked",
                v.handle,
                state_name(&v.state)
            )),
            Ok(v) => {
                if v.handle.attempt.0 < req.attempt {
                    found.push(format!(
                        "showed attempt {}, but attempt {} was delivered before the read was asked",
                        v.handle.attempt.0, req.attempt
                    ));
                }
                if !req.records_unknown && records_shown(v) {
                    found.extend(self.records_fit(p, req, &v.records).err());
                }
            }
            Err(_) => {}
        }
        found
    }

    /// The records shown must be one of the possibilities when the read was asked, extended by
    /// the writes that were in flight or sent while it was under way.
    fn records_fit(&self, p: &PendingRead, req: &Required, records: &Records) -> Result<(), String> {
        let mut model = SessionModel { possible: req.possible.clone(), ..SessionModel::default() };
        for w in &p.concurrent {
            model.apply(w, false);
        }
        if model.unknown {
            return Ok(()); // too many possibilities to check exactly
        }
        model.observe(records).map_err(|e| format!("{e}, given the writes acknowledged before it was asked"))
    }

    /// The answer against what reads answered before this one was asked had shown.
    fn against_earlier_reads(&self, floor: &Shown, now: &Shown) -> Vec<String> {
        let mut found = Vec::new();
        let earlier = format!("a read answered at {} s", secs(floor.answered_us));
        let evictable = self.tombstones_may_be_evicted() && now.existence == Existence::Unknown;
        if now.existence < floor.existence && !evictable {
            found.push(format!(
                "answered {}, but {earlier} had shown the session {}",
                existence_name(now.existence),
                existence_name(floor.existence)
            ));
            return found;
        }
        if now.existence != Existence::Live || floor.existence != Existence::Live {
            return found;
        }
        if now.attempt < floor.attempt {
            found.push(format!(
                "showed attempt {}{}, but {earlier} had shown attempt {}{}",
                now.attempt.0,
                settled_name(now.attempt.1),
                floor.attempt.0,
                settled_name(floor.attempt.1)
            ));
        }
        if let (Some((a, (ac, aseq))), Some((b, (bc, bseq)))) = (now.newest_write, floor.newest_write) {
            if a < b {
                found.push(format!(
                    "showed records ending in c{ac}.{aseq}, but {earlier} had shown them ending in c{bc}.{bseq},                      which was sent later"
                ));
            }
        }
        found
    }
}

fn state_name(state: &SessionState) -> &'static str {
    match state {
        SessionState::Active { .. } => "active",
        SessionState::Stored { .. } => "stored",
        SessionState::Dead { .. } => "dead",
    }
}

fn existence_name(e: Existence) -> &'static str {
    match e {
        Existence::Unknown => "\"unknown\"",
        Existence::Live => "live",
        Existence::Deleted => "\"deleted\"",
    }
}

fn settled_name(settled: bool) -> &'static str {
    if settled {
        " (stored or dead)"
    } else {
        " (active)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Actor, Event, History};
    use crate::scenario::Scenario;
    use crate::workload::record_bytes;
    use crate::world::RunStats;
    use std::path::Path;
    use truba_engine::{Attempt, ClientId, Handle, Kind, Reply, SessionId, SourceId, UnixMs, UnixSecs};

    const CLIENT: u64 = 1;
    const ID: u64 = 5;

    fn record(seq: u64) -> Vec<u8> {
        record_bytes(ClientId(CLIENT), seq, 40)
    }

    fn handle(attempt: u32) -> Handle {
        Handle { session: SessionId(ID), attempt: Attempt(attempt) }
    }

    fn view(attempt: u32, state: SessionState, records: &[u64]) -> SessionView {
        let records: Vec<Vec<u8>> = records.iter().map(|s| record(*s)).collect();
        SessionView {
            id: SessionId(ID),
            kind: Kind(1),
            handle: handle(attempt),
            state,
            deliveries: attempt,
            failures: 0,
            last_failure: None,
            bytes: records.iter().map(|r| r.len() as u64).sum(),
            records,
            source: None,
        }
    }

    fn active() -> SessionState {
        SessionState::Active { lease_until: UnixMs(10_000), delivering: false }
    }

    fn stored() -> SessionState {
        SessionState::Stored { due: UnixSecs(20) }
    }

    /// A history that creates session 5 with record 1 and appends record 2 (both acknowledged),
    /// then sends an append of record 3 and leaves it unanswered, followed by `reads`.
    fn history(reads: Vec<Event>) -> History {
        let actor = Actor::Client(0);
        let invoke = |seq: u64, request: Request| Event::Invoke { actor, client: CLIENT, seq, request };
        let done = |seq: u64, outcome| Event::Complete { actor, client: CLIENT, seq, outcome };
        let mut events = vec![
            invoke(1, Request::New { kind: Kind(1), record: Some(record(1)) }),
            done(1, Ok(Reply::Created { handle: handle(0) })),
            invoke(2, Request::Append { handle: handle(0), record: record(2) }),
            done(2, Ok(Reply::Done)),
            invoke(3, Request::Append { handle: handle(0), record: record(3) }),
        ];
        events.extend(reads);
        History { events: events.into_iter().enumerate().map(|(i, e)| (i as u64 * 1000, e)).collect() }
    }

    fn ask(read: u64) -> Event {
        Event::ReadInvoke { reader: 0, read, session: ID }
    }

    fn answer(read: u64, answer: Result<SessionView, RequestError>) -> Event {
        Event::ReadComplete { reader: 0, read, session: ID, answer }
    }

    /// The `linearizable-reads` violations of a run with this history.
    fn violations(reads: Vec<Event>) -> Vec<String> {
        let text = "name = \"t\"\nduration_s = 1\nliveness_s = 1\n[kinds.1]\n";
        let run = RunOutput {
            ledger: Default::default(),
            final_applied: None,
            history: history(reads),
            violations: Vec::new(),
            stats: RunStats::default(),
            final_sessions: Some(Vec::new()),
            final_wall_ms: 0,
            end_us: 1_000_000,
            scenario: Scenario::parse(text, Path::new("t")).expect("a valid scenario"),
        };
        super::super::check(&run).into_iter().filter(|v| v.property == PROPERTY).map(|v| v.detail).collect()
    }

    #[test]
    fn answers_that_fit_the_writes_pass() {
        // Without and with the unanswered append; stored by a lease that ran out.
        assert!(violations(vec![ask(1), answer(1, Ok(view(0, active(), &[1, 2])))]).is_empty());
        assert!(violations(vec![ask(1), answer(1, Ok(view(0, stored(), &[1, 2, 3])))]).is_empty());
        // A spilled session shown without its records says nothing about them.
        let mut spilled = view(0, stored(), &[]);
        spilled.source = Some((SourceId(9), 2));
        assert!(violations(vec![ask(1), answer(1, Ok(spilled))]).is_empty());
    }

    #[test]
    fn a_stale_answer_is_caught() {
        let found = violations(vec![ask(1), answer(1, Ok(view(0, active(), &[1])))]);
        assert!(found.len() == 1 && found[0].contains("records [c1.1]"), "{found:?}");
        let found = violations(vec![ask(1), answer(1, Err(RequestError::SessionUnknown(SessionId(ID))))]);
        assert!(found.len() == 1 && found[0].contains("creation was acknowledged"), "{found:?}");
        let found = violations(vec![ask(1), answer(1, Err(RequestError::SessionDeleted(SessionId(ID))))]);
        assert!(found.len() == 1 && found[0].contains("no delete"), "{found:?}");
    }

    #[test]
    fn a_read_that_goes_back_is_caught() {
        let reads = vec![
            ask(1),
            answer(1, Ok(view(0, stored(), &[1, 2, 3]))),
            ask(2),
            answer(2, Ok(view(0, active(), &[1, 2]))),
        ];
        let found = violations(reads);
        assert!(found.len() == 2, "{found:?}");
        assert!(found[0].contains("attempt 0 (active)") && found[1].contains("ending in c1.2"), "{found:?}");
        // Two reads under way at once may see the write in either order.
        let reads = vec![
            ask(1),
            ask(2),
            answer(1, Ok(view(0, active(), &[1, 2, 3]))),
            answer(2, Ok(view(0, active(), &[1, 2]))),
        ];
        assert!(violations(reads).is_empty());
    }
}
