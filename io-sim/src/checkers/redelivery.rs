//! Properties of redelivery under failure: the order sessions are taken in, the backoff after a
//! failed delivery, the dead-letter rule, and leases that keep-alives renew. Fed by the main
//! checker with the events it has already matched up (a completion with its request).
//!
//! Every bound here is computed so that an uncertain history (an outcome left unknown, a report
//! that the leader dropped, clocks that disagree within the scenario's bound) can only weaken
//! it, never make a correct run fail.

use crate::clock::EPOCH_MS;
use crate::history::Actor;
use crate::world::{RunOutput, Violation};
use std::collections::{BTreeMap, BTreeSet};
use truba_engine::{Handle, KindConfig, Outcome, RedriveTarget, Reply, Request, SessionState, SessionView, UnixSecs};

#[derive(Debug, Default)]
struct Session {
    kind: u32,
    /// The attempt number of the last delivery seen, and the replica clock its take was decided at.
    attempt: u32,
    taken_at_ms: u64,
    /// Failed attempts reported by handlers since the last store that may have been applied:
    /// never more than the engine's count of failures in a row.
    reported_failures: BTreeSet<u32>,
    /// The attempt of the last handler whose store was acknowledged: the engine's count of
    /// failures in a row cannot exceed the deliveries since.
    reset_attempt: u32,
    /// After a failure report: the earliest repeat time (wall ms) the next delivery may carry.
    backoff_floor_ms: Option<(u64, u32)>,
    /// The latest lease start or acknowledged renewal: (attempt, the earliest true time in µs
    /// at which that lease can have run out on any leader's clock, which may lie in the past).
    renewed: Option<(u32, i64)>,
    /// Attempts whose holder ended them itself (stored, deleted, reported failure).
    ended: BTreeSet<u32>,
    /// An acknowledged store not yet followed by a delivery: (due, sent, acknowledged).
    store: Option<(UnixSecs, u64, u64)>,
    /// Each delivery seen: (attempt, true time).
    delivered_at: Vec<(u32, u64)>,
}

impl Session {
    /// A redrive may have restarted the engine's count of failures in a row: the backoff check
    /// then counts from nothing, which can only weaken it.
    fn count_may_restart(&mut self) {
        self.reported_failures.clear();
        self.backoff_floor_ms = None;
    }
}

/// One delivery, for the order check: (take index, order seen, due, store sent and acknowledged).
type Taken = (u64, usize, UnixSecs, Option<(u64, u64)>, u64);

pub(super) struct RedeliveryChecker<'a> {
    run: &'a RunOutput,
    sessions: BTreeMap<u64, Session>,
    taken: BTreeMap<u32, Vec<Taken>>,
    pub violations: Vec<Violation>,
}

impl<'a> RedeliveryChecker<'a> {
    pub fn new(run: &'a RunOutput) -> Self {
        RedeliveryChecker { run, sessions: BTreeMap::new(), taken: BTreeMap::new(), violations: Vec::new() }
    }

    fn kind(&self, kind: u32) -> Option<&KindConfig> {
        self.run.scenario.kinds.get(&kind).map(|k| &k.config)
    }

    fn clock_error_ms(&self) -> u64 {
        self.run.scenario.checks.clock_error_ms
    }

    fn violate(&mut self, property: &'static str, at_us: u64, session: u64, detail: String) {
        self.violations.push(Violation { property, at_us, detail, session: Some(session) });
    }

    pub fn created(&mut self, id: u64, kind: u32) {
        self.sessions.entry(id).or_insert_with(|| Session { kind, ..Default::default() });
    }

    /// A request answered. `sent_us` is when it was first sent.
    pub fn complete(&mut self, t: u64, actor: Actor, request: &Request, sent_us: u64, outcome: &Outcome) {
        if let (Request::Redrive { target: RedriveTarget::Session(id) }, Ok(Reply::Redriven { count: 1, .. })) =
            (request, outcome)
        {
            // The count starts again from the attempt it died at (no delivery happens meanwhile).
            if let Some(s) = self.sessions.get_mut(&id.0) {
                s.reset_attempt = s.reset_attempt.max(s.attempt);
                s.count_may_restart();
            }
            return;
        }
        let Some(handle) = request.handle() else { return };
        self.owner_acts(handle, request);
        let ce_us = self.clock_error_ms() as i64 * 1000;
        let lease_us = |kind| self.kind(kind).map_or(0, |k| k.lease_ms as i64 * 1000);
        let Some(kind) = self.sessions.get(&handle.session.0).map(|s| s.kind) else { return };
        // A renewal applied at its proposer's clock (at most `ce` behind true time when it was
        // sent) runs until that reading plus the lease, which another leader's clock (at most
        // `ce` ahead) reads as run out `2 ce` early.
        let floor_us = sent_us as i64 + lease_us(kind) - 2 * ce_us;
        let s = self.sessions.get_mut(&handle.session.0).expect("checked");
        // Fencing: a request sent after a later attempt was delivered reaches the log after that
        // attempt's take, so it must be refused, whatever it is.
        let superseded = s.delivered_at.iter().find(|(a, t)| *a > handle.attempt.0 && *t < sent_us).copied();
        if let (Some((later, at)), Ok(_)) = (superseded, outcome) {
            let detail = format!(
                "{} on attempt {} was accepted, though sent {} ms after attempt {later} was delivered",
                crate::history::describe_request(request),
                handle.attempt.0,
                (sent_us - at) / 1000
            );
            self.violate("stale-attempt-refused", t, handle.session.0, detail);
            return;
        }
        match (request, outcome) {
            (Request::Store { .. }, Ok(Reply::Stored { due })) => {
                s.reported_failures.clear();
                if matches!(actor, Actor::Handler(..)) {
                    s.reset_attempt = s.reset_attempt.max(handle.attempt.0);
                }
                s.store = Some((*due, sent_us, t));
            }
            (Request::Append { .. } | Request::Replace { .. } | Request::KeepAlive { .. }, Ok(_))
                if s.renewed.is_none_or(|r| (handle.attempt.0, floor_us) > r) =>
            {
                s.renewed = Some((handle.attempt.0, floor_us));
            }
            _ => {}
        }
    }

    /// A request sent: a holder that stores or deletes its session gives its lease up.
    pub fn invoked(&mut self, request: &Request) {
        if let Some(handle) = request.handle() {
            self.owner_acts(handle, request);
        }
    }

    /// A request whose outcome stays unknown: a store (or an operator's redrive) may have reset
    /// the failure count.
    pub fn unknown(&mut self, request: &Request) {
        if let Request::Redrive { target: RedriveTarget::Session(id) } = request {
            if let Some(s) = self.sessions.get_mut(&id.0) {
                s.count_may_restart();
            }
            return;
        }
        let Some(handle) = request.handle() else { return };
        self.owner_acts(handle, request);
        if let (Request::Store { .. }, Some(s)) = (request, self.sessions.get_mut(&handle.session.0)) {
            s.reported_failures.clear();
            s.backoff_floor_ms = None;
            s.store = None;
        }
    }

    fn owner_acts(&mut self, handle: Handle, request: &Request) {
        if matches!(request, Request::Store { .. } | Request::Delete { .. }) {
            if let Some(s) = self.sessions.get_mut(&handle.session.0) {
                s.ended.insert(handle.attempt.0);
            }
        }
    }

    /// A handler reported that its delivery failed.
    pub fn failure_reported(&mut self, t: u64, handle: Handle) {
        let ce = self.clock_error_ms();
        let Some(kc) = self.sessions.get(&handle.session.0).and_then(|s| self.kind(s.kind)).cloned() else { return };
        let s = self.sessions.get_mut(&handle.session.0).expect("checked");
        s.ended.insert(handle.attempt.0);
        if handle.attempt.0 != s.attempt {
            return; // a report about an older delivery changes nothing
        }
        s.reported_failures.insert(handle.attempt.0);
        let n = s.reported_failures.len() as u32;
        // The failure was decided at the report or, if the lease ran out first, at the lease's
        // end: whichever came first, read on some leader's clock.
        let decided_wall_ms = (t / 1000 + EPOCH_MS).saturating_sub(ce).min(s.taken_at_ms + kc.lease_ms);
        let floor = decided_wall_ms.saturating_sub(1000) + kc.backoff_s(n) as u64 * 1000;
        s.backoff_floor_ms = Some((floor, n));
    }

    pub fn delivered(&mut self, t: u64, kind: u32, handle: Handle, due: UnixSecs, taken_at_ms: u64, take_index: u64) {
        let ce = self.clock_error_ms();
        let lease_ms = self.kind(kind).map_or(0, |k| k.lease_ms);
        let id = handle.session.0;
        let s = self.sessions.entry(id).or_insert_with(|| Session { kind, ..Default::default() });
        if handle.attempt.0 <= s.attempt {
            return; // the fencing checker reports attempts that do not grow
        }
        let mut found = Vec::new();
        if let Some((floor, n)) = s.backoff_floor_ms.take() {
            if due.0 * 1000 < floor {
                found.push((
                    "backoff",
                    format!(
                        "redelivered for repeat time {} s after {n} failure(s) in a row; the kind's backoff allows {:.3} s at the earliest",
                        due.0,
                        floor as f64 / 1000.0
                    ),
                ));
            }
        }
        if let Some((attempt, until_us)) = s.renewed.filter(|(a, _)| *a < handle.attempt.0 && !s.ended.contains(a)) {
            if (t as i64) < until_us {
                found.push((
                    "lease-respected",
                    format!(
                        "attempt {} delivered {} ms before the lease attempt {attempt} held (from its take or a renewal) could run out",
                        handle.attempt.0,
                        (until_us - t as i64) / 1000
                    ),
                ));
            }
        }
        let store = s.store.take().filter(|(d, _, _)| *d == due).map(|(_, sent, acked)| (sent, acked));
        let order = self.taken.get(&kind).map_or(0, Vec::len);
        self.taken.entry(kind).or_default().push((take_index, order, due, store, id));
        s.attempt = handle.attempt.0;
        s.taken_at_ms = taken_at_ms;
        s.delivered_at.push((handle.attempt.0, t));
        // The take itself starts the new attempt's lease, at its clock reading: no other attempt
        // may go out before it can have run out (at most one live attempt per session).
        // The lease runs to the take's reading plus the lease, which another leader's clock (at
        // most `ce` ahead) reads as run out `ce` early.
        let floor_us = (taken_at_ms as i64 - EPOCH_MS as i64 + lease_ms as i64 - ce as i64) * 1000;
        if s.renewed.is_none_or(|r| (handle.attempt.0, floor_us) > r) {
            s.renewed = Some((handle.attempt.0, floor_us));
        }
        for (p, d) in found {
            self.violate(p, t, id, d);
        }
    }

    /// At the end: the order of takes within each kind, and the dead-letter rule.
    pub fn finish(&mut self, end_us: u64, finals: Option<&Vec<SessionView>>) {
        for (kind, mut taken) in std::mem::take(&mut self.taken) {
            taken.sort_by_key(|(take, order, ..)| (*take, *order));
            self.check_order(end_us, kind, &taken);
        }
        for v in finals.into_iter().flatten() {
            let SessionState::Dead { .. } = v.state else { continue };
            let max = self.kind(v.kind.0).map_or(0, |k| k.max_attempts);
            let reset = self.sessions.get(&v.id.0).map_or(0, |s| s.reset_attempt);
            let deliveries = v.deliveries.saturating_sub(reset);
            if max == 0 || deliveries < max {
                let detail = format!(
                    "dead-lettered after {deliveries} deliveries since its handler last stored it; the kind allows {max} failures in a row"
                );
                self.violate("dead-letter-after-max-attempts", end_us, v.id.0, detail);
            }
        }
    }

    /// Within a kind, sessions are taken in order of repeat time, and of storing within a second.
    fn check_order(&mut self, end_us: u64, kind: u32, taken: &[Taken]) {
        let mut latest_sent: Option<(UnixSecs, u64, u64)> = None;
        for w in taken.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if b.2 < a.2 {
                let detail = format!(
                    "kind {kind}: session {} (due {} s) was taken after session {} (due {} s)",
                    a.4, a.2 .0, b.4, b.2 .0
                );
                self.violate("due-order", end_us, b.4, detail);
                return;
            }
        }
        // Same second: a session whose store was acknowledged before another's was sent goes first.
        for (_, _, due, store, id) in taken {
            let Some((sent, acked)) = *store else { continue };
            if let Some((d, other_sent, other)) = latest_sent.filter(|(d, ..)| d == due) {
                if other_sent > acked {
                    let detail = format!(
                        "kind {kind}: session {id}'s store was acknowledged before session {other}'s was sent, both due {} s, but {other} was taken first",
                        d.0
                    );
                    self.violate("due-order", end_us, *id, detail);
                    return;
                }
            }
            if latest_sent.is_none_or(|(d, s, _)| d != *due || sent > s) {
                latest_sent = Some((*due, sent, *id));
            }
        }
    }
}
