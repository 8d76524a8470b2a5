//! The properties, checked against the ground truth of a run. Each checker is one pass over the
//! history (plus the replica's final state), linear in its length.
//!
//! The session model: for every session the checker keeps the set of record lists the session
//! may hold given what was acknowledged, refused, or left unknown (a request whose client gave
//! up or crashed may or may not have been applied, but only entirely). Every time the replica
//! shows a session's records (a delivery, or the final state), they must be one of the
//! possibilities, and the set collapses to what was shown.

mod consumers;
mod reads;
mod redelivery;
mod streams;

use crate::history::{describe_request, record_id, Actor, Event};
use crate::workload::record_is_genuine;
use crate::world::{RunOutput, Violation};
use reads::ReadsChecker;
use redelivery::RedeliveryChecker;
use std::collections::{BTreeMap, BTreeSet};
use truba_engine::{Reply, Request, RequestError, SessionState, UnixSecs};

/// Possibilities beyond this many are not tracked exactly until the next observation.
const POSSIBILITIES_MAX: usize = 64;
/// Slack for "delivered by the end": repeater ticks and handler round trips.
const LIVENESS_GRACE_MS: u64 = 5_000;

type Records = Vec<Vec<u8>>;

#[derive(Debug, Default)]
struct SessionModel {
    possible: BTreeSet<Records>,
    /// Too many unknown outcomes: skip the exact check until the next observation.
    unknown: bool,
    deleted: bool,
    maybe_deleted: bool,
    /// Deletes sent and not yet answered: any of them may already have been applied.
    deletes_in_flight: u32,
    attempt: u32,
    /// Repeat time of an acknowledged store not yet followed by a delivery.
    acked_due: Option<UnixSecs>,
    /// True time before which an acknowledged store must not be delivered (minus clock error).
    not_before_us: Option<u64>,
}

impl SessionModel {
    fn new(first: Records) -> SessionModel {
        SessionModel { possible: BTreeSet::from([first]), ..Default::default() }
    }

    fn apply(&mut self, request: &Request, certain: bool) {
        let next: BTreeSet<Records> = self
            .possible
            .iter()
            .map(|p| {
                let mut p = p.clone();
                match request {
                    Request::Append { record, .. } => p.push(record.clone()),
                    Request::Replace { record, .. } => p = vec![record.clone()],
                    _ => {}
                }
                p
            })
            .collect();
        if certain {
            self.possible = next;
        } else {
            self.possible.extend(next);
        }
        if self.possible.len() > POSSIBILITIES_MAX {
            self.unknown = true;
            self.possible.clear();
        }
    }

    fn observe(&mut self, records: &Records) -> Result<(), String> {
        let ok = self.unknown || self.possible.contains(records);
        let expected: Vec<String> = self
            .possible
            .iter()
            .take(4)
            .map(|p| p.iter().map(|r| record_id(r)).collect::<Vec<_>>().join(","))
            .collect();
        self.possible = BTreeSet::from([records.clone()]);
        self.unknown = false;
        if ok {
            Ok(())
        } else {
            let got: Vec<String> = records.iter().map(|r| record_id(r)).collect();
            Err(format!("records [{}], expected one of [{}]", got.join(","), expected.join("] or [")))
        }
    }
}

struct Checker<'a> {
    run: &'a RunOutput,
    sessions: BTreeMap<u64, SessionModel>,
    inflight: BTreeMap<(u64, u64), (Request, u64)>,
    last_request: BTreeMap<Actor, (u64, u64)>,
    /// First records of sessions whose creation has an unknown outcome.
    orphans: BTreeSet<Vec<u8>>,
    /// Sessions delivered while their creation was still unanswered.
    adopted: BTreeSet<u64>,
    storm_dues: Vec<u64>,
    redelivery: RedeliveryChecker<'a>,
    reads: ReadsChecker,
    violations: Vec<Violation>,
}

/// Runs every checker over a finished run. The first violation is the most useful to report.
pub fn check(run: &RunOutput) -> Vec<Violation> {
    let mut c = Checker {
        run,
        sessions: BTreeMap::new(),
        inflight: BTreeMap::new(),
        last_request: BTreeMap::new(),
        orphans: BTreeSet::new(),
        adopted: BTreeSet::new(),
        storm_dues: Vec::new(),
        redelivery: RedeliveryChecker::new(run),
        reads: ReadsChecker::new(run),
        violations: run.violations.clone(),
    };
    for (t, e) in &run.history.events {
        c.event(*t, e);
    }
    // Requests still unanswered when the run ended may or may not have been applied.
    for (request, _) in std::mem::take(&mut c.inflight).into_values() {
        c.unknown_outcome(&request);
    }
    c.final_state();
    c.storm_spread();
    c.redelivery.finish(run.end_us, run.final_sessions.as_ref());
    c.violations.append(&mut c.redelivery.violations);
    c.violations.append(&mut c.reads.violations);
    c.violations.extend(streams::check(run));
    c.violations.extend(consumers::check(run));
    c.violations.sort_by_key(|v| v.at_us);
    c.violations
}

/// The session an operator's request names, if it is one.
fn operated(request: &Request) -> Option<u64> {
    match request {
        Request::DropDead { session } => Some(session.0),
        Request::Redrive { target: truba_engine::RedriveTarget::Session(id) } => Some(id.0),
        _ => None,
    }
}

impl Checker<'_> {
    fn violate(&mut self, property: &'static str, at_us: u64, session: Option<u64>, detail: String) {
        self.violations.push(Violation { property, at_us, detail, session });
    }

    fn event(&mut self, t: u64, e: &Event) {
        match e {
            Event::Invoke { actor, client, seq, request } => {
                self.deletes_in_flight(request, 1);
                self.redelivery.invoked(request);
                self.reads.write_invoked(*client, *seq, request);
                self.inflight.insert((*client, *seq), (request.clone(), t));
                self.last_request.insert(*actor, (*client, *seq));
            }
            Event::Complete { actor, client, seq, outcome } => {
                let Some((request, invoked)) = self.inflight.remove(&(*client, *seq)) else { return };
                self.deletes_in_flight(&request, -1);
                self.reads.write_closed(*client, *seq, &request);
                self.complete(t, *actor, &request, invoked, outcome);
                self.redelivery.complete(t, *actor, &request, invoked, outcome);
            }
            Event::GiveUp { client, seq, .. } => {
                if let Some((request, _)) = self.inflight.remove(&(*client, *seq)) {
                    self.deletes_in_flight(&request, -1);
                    self.reads.write_closed(*client, *seq, &request);
                    self.unknown_outcome(&request);
                }
            }
            Event::ClientCrash { actor } => {
                let Some((client, seq)) = self.last_request.get(actor).copied() else { return };
                if let Some((request, _)) = self.inflight.remove(&(client, seq)) {
                    self.deletes_in_flight(&request, -1);
                    self.reads.write_closed(client, seq, &request);
                    self.unknown_outcome(&request);
                }
            }
            Event::Deliver { kind, handle, due, records, taken_at_ms, take_index } => {
                self.delivered(t, handle.session.0, handle.attempt.0, *due, records, *taken_at_ms);
                self.redelivery.delivered(t, kind.0, *handle, *due, *taken_at_ms, *take_index);
            }
            Event::DeliveryFailed { handle, .. } => self.redelivery.failure_reported(t, *handle),
            Event::ReadInvoke { reader, read, session } => {
                self.reads.invoked(t, *reader, *read, *session, self.sessions.get(session));
            }
            Event::ReadComplete { reader, read, session, answer } => {
                self.reads.completed(t, *reader, *read, *session, answer);
            }
            Event::ReadGiveUp { reader, read, session } => self.reads.given_up(*reader, *read, *session),
            _ => {}
        }
    }

    /// Deletes and operators' drops sent and not yet answered: either may already be applied.
    fn deletes_in_flight(&mut self, request: &Request, delta: i32) {
        let id = match request {
            Request::Delete { handle } => handle.session,
            Request::DropDead { session } => *session,
            _ => return,
        };
        if let Some(m) = self.sessions.get_mut(&id.0) {
            m.deletes_in_flight = m.deletes_in_flight.saturating_add_signed(delta);
        }
    }

    fn complete(&mut self, t: u64, actor: Actor, request: &Request, invoked_us: u64, outcome: &truba_engine::Outcome) {
        if let Request::New { record, kind } = request {
            if let Ok(Reply::Created { handle }) = outcome {
                let id = handle.session.0;
                self.redelivery.created(id, kind.0);
                if self.adopted.remove(&id) {
                    return; // Delivered before its creation was answered: modelled since then.
                }
                if self.sessions.contains_key(&id) {
                    self.violate("unique-session-ids", t, Some(id), format!("session id {id} handed out twice"));
                }
                self.sessions.insert(id, SessionModel::new(record.iter().cloned().collect()));
            }
            return;
        }
        if let Some(id) = operated(request) {
            self.operator_complete(id, request, outcome);
            return;
        }
        let handle = request.handle().expect("non-new requests carry a handle");
        let id = handle.session.0;
        let storm = matches!(actor, Actor::Client(i) if i >= self.run.scenario.workload.clients);
        let Some(m) = self.sessions.get_mut(&id) else { return };
        // Fencing: an operation on an older attempt was applied before the delivery that was
        // already observed (a retry can bring its answer late), so its effect is already in the
        // model.
        let superseded = handle.attempt.0 < m.attempt;
        match outcome {
            Ok(_) if superseded => {}
            Ok(reply) => {
                m.apply(request, true);
                match (request, reply) {
                    (Request::Delete { .. }, _) => m.deleted = true,
                    (Request::Store { timeout_s, .. }, Reply::Stored { due }) => {
                        m.acked_due = Some(*due);
                        m.not_before_us = Some(invoked_us + *timeout_s as u64 * 1_000_000);
                        if storm {
                            self.storm_dues.push(due.0);
                        }
                    }
                    _ => {}
                }
            }
            Err(RequestError::SessionUnknown(_)) => {
                let detail = format!(
                    "{} refused as unknown, but the session's creation was acknowledged",
                    describe_request(request)
                );
                self.violate("acknowledged-survives", t, Some(id), detail);
            }
            Err(RequestError::SessionDeleted(_)) if !m.deleted && !m.maybe_deleted && m.deletes_in_flight == 0 => {
                let detail = format!(
                    "{} refused as deleted, but no delete of the session was acknowledged, in flight, or left unanswered",
                    describe_request(request)
                );
                self.violate("delete-is-final", t, Some(id), detail);
            }
            Err(_) => {}
        }
    }

    /// An operator's redrive or drop answered. A drop deletes the session (it must never be
    /// delivered or held again); a redrive changes nothing the records model tracks.
    fn operator_complete(&mut self, id: u64, request: &Request, outcome: &truba_engine::Outcome) {
        if let (Some(m), Request::DropDead { .. }, Ok(_)) = (self.sessions.get_mut(&id), request, outcome) {
            m.deleted = true;
        }
    }

    fn unknown_outcome(&mut self, request: &Request) {
        self.redelivery.unknown(request);
        match request {
            Request::New { record: Some(r), .. } => {
                self.orphans.insert(r.clone());
            }
            Request::New { .. } => {}
            Request::DropDead { session } => {
                if let Some(m) = self.sessions.get_mut(&session.0) {
                    m.maybe_deleted = true;
                }
            }
            Request::Redrive { .. } => {}
            other => {
                let handle = other.handle().expect("handle");
                let m = self.sessions.get_mut(&handle.session.0).filter(|m| handle.attempt.0 >= m.attempt);
                if let Some(m) = m {
                    m.apply(other, false);
                    if matches!(other, Request::Delete { .. }) {
                        m.maybe_deleted = true;
                    }
                    if matches!(other, Request::Store { .. }) {
                        m.acked_due = None;
                        m.not_before_us = None;
                    }
                }
            }
        }
    }

    fn delivered(&mut self, t: u64, id: u64, attempt: u32, due: UnixSecs, records: &Records, taken_at_ms: u64) {
        if due.as_ms().0 > taken_at_ms {
            let detail = format!("taken at replica clock {taken_at_ms} ms, before its repeat time {} s", due.0);
            self.violate("no-early-redelivery", t, Some(id), detail);
        }
        for r in records {
            if !record_is_genuine(r) {
                let detail = format!("record {:?} was never sent by any client", record_id(r));
                self.violate("no-invented-records", t, Some(id), detail);
            }
        }
        let distinct: BTreeSet<_> = records.iter().collect();
        if distinct.len() != records.len() {
            self.violate("exactly-once", t, Some(id), "the same record appears twice in one session".into());
        }
        if !self.sessions.contains_key(&id) {
            // A creation still unanswered may have been applied, its lease run out and the
            // session stored and delivered while the client was retrying.
            let creating = records.first().is_some_and(|first| {
                self.inflight.values().any(|(r, _)| matches!(r, Request::New { record: Some(x), .. } if x == first))
            });
            match records.first() {
                Some(first) if self.orphans.remove(first) => {
                    self.sessions.insert(id, SessionModel::new(records.clone()));
                }
                Some(_) if creating => {
                    self.adopted.insert(id);
                    self.sessions.insert(id, SessionModel::new(records.clone()));
                }
                _ => {
                    self.violate("no-invented-sessions", t, Some(id), "delivered a session no client created".into());
                    return;
                }
            }
        }
        let clock_error_us = self.run.scenario.checks.clock_error_ms * 1000;
        // Requests on the attempt this delivery ends, still unanswered, may have been applied
        // before the session was taken (a lease can run out while a retry is under way): the
        // delivered records may include them. Their late answers are then superseded.
        let unanswered: Vec<Request> = self
            .inflight
            .values()
            .map(|(r, _)| r)
            .filter(|r| r.handle().is_some_and(|h| h.session.0 == id))
            .cloned()
            .collect();
        let m = self.sessions.get_mut(&id).expect("inserted above");
        let current = m.attempt;
        for r in unanswered.iter().filter(|r| r.handle().is_some_and(|h| h.attempt.0 == current)) {
            m.apply(r, false);
        }
        let mut found = Vec::new();
        if m.deleted {
            found.push(("delete-is-final", "a session whose delete was acknowledged was delivered".to_string()));
        }
        if attempt <= m.attempt {
            found.push(("fencing", format!("delivery attempt {attempt} does not exceed the previous {}", m.attempt)));
        }
        // A take can become durable and then be lost with a crash before it is delivered; the
        // lease then runs out and the session is stored again with a new repeat time. Only a
        // delivery that is the very next attempt must carry the acknowledged repeat time.
        if let Some(d) = m.acked_due.filter(|d| *d != due && attempt == m.attempt + 1) {
            found.push((
                "repeat-time",
                format!("delivered for repeat time {} s, but the store was acknowledged with {} s", due.0, d.0),
            ));
        }
        if let Some(nb) = m.not_before_us.filter(|nb| t + clock_error_us < *nb) {
            found.push((
                "no-early-redelivery",
                format!("delivered {} ms (true time) before its store's timeout ran out", (nb - t) / 1000),
            ));
        }
        if let Err(e) = m.observe(records) {
            found.push(("session-records", e));
        }
        m.attempt = attempt;
        m.acked_due = None;
        m.not_before_us = None;
        m.maybe_deleted = false;
        for (p, d) in found {
            self.violate(p, t, Some(id), d);
        }
    }

    /// After the liveness phase: the replica serves, nothing due is left undelivered, nothing
    /// dangles, and every session is where the acknowledged history says it must be.
    fn final_state(&mut self) {
        let end = self.run.end_us;
        let Some(finals) = &self.run.final_sessions else {
            self.violate("liveness", end, None, "the replica was not serving at the end of the liveness phase".into());
            return;
        };
        let wall = self.run.final_wall_ms;
        let mut present = BTreeSet::new();
        for v in finals {
            // Consumers' own sessions came from their commits, not from clients: the consumer
            // checkers account for them.
            if v.records.first().is_some_and(|r| r.starts_with(b"out:")) {
                continue;
            }
            let id = v.id.0;
            present.insert(id);
            match v.state {
                SessionState::Stored { due } if due.as_ms().0 + LIVENESS_GRACE_MS <= wall => {
                    let place = v.source.map_or(String::new(), |(s, _)| format!(" (kept in source {})", s.0));
                    let detail =
                        format!("stored session due at {} s was still not delivered at {} ms{place}", due.0, wall);
                    self.violate("liveness", end, Some(id), detail);
                }
                SessionState::Active { lease_until, .. } if lease_until.0 + LIVENESS_GRACE_MS <= wall => {
                    let detail = format!("session's lease ran out at {} ms but it was never stored", lease_until.0);
                    self.violate("no-dangling-sessions", end, Some(id), detail);
                }
                _ => {}
            }
            let Some(m) = self.sessions.get_mut(&id) else {
                if !v.records.first().is_some_and(|f| self.orphans.contains(f)) {
                    self.violate(
                        "no-invented-sessions",
                        end,
                        Some(id),
                        "the replica holds a session no client created".into(),
                    );
                }
                continue;
            };
            let deleted = m.deleted;
            let observed = m.observe(&v.records);
            if deleted {
                self.violate(
                    "delete-is-final",
                    end,
                    Some(id),
                    "a session whose delete was acknowledged is still held".into(),
                );
            }
            if let Err(e) = observed {
                self.violate("session-records", end, Some(id), e);
            }
        }
        let lost: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(id, m)| !m.deleted && !m.maybe_deleted && !present.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            let detail = "the session was acknowledged and never deleted, but the replica no longer has it".into();
            self.violate("acknowledged-survives", end, Some(id), detail);
        }
    }

    /// A storm of sessions stored in one moment must come due spread over the jitter window.
    fn storm_spread(&mut self) {
        let sc = &self.run.scenario;
        let Some(storm) = &sc.workload.storm else { return };
        let window = sc.kinds.get(&storm.kind).map_or(0, |k| k.config.jitter_window_s) as u64;
        let n = self.storm_dues.len() as u64;
        if n < 100 || window == 0 {
            return;
        }
        let mut per_second: BTreeMap<u64, u64> = BTreeMap::new();
        for d in &self.storm_dues {
            *per_second.entry(*d).or_default() += 1;
        }
        let mean = n as f64 / (window + 1) as f64;
        let peak = *per_second.values().max().unwrap_or(&0) as f64;
        let covered = per_second.len() as f64 / (window + 1) as f64;
        let (cover_min, peak_max) = (sc.checks.storm_cover_share, sc.checks.storm_peak_factor * mean);
        if covered < cover_min || peak > peak_max {
            let detail = format!(
                "{n} stored sessions fall in {} distinct seconds (need {:.0}% of {} s) with a peak of {peak} in one \
                 second (limit {peak_max:.0})",
                per_second.len(),
                cover_min * 100.0,
                window + 1
            );
            self.violate("storm-spread", self.run.end_us, None, detail);
        }
    }
}
