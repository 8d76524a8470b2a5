//! The repeater: the leader's decisions about which stored sessions to hand to handlers and
//! which leases have run out. It only proposes; the replicated `Take` and `Expire` commands are
//! what change state, so every replica agrees on what was taken. Followers never run it.

use crate::config::{KindConfig, Limits, Rules};
use crate::op::{Command, UnixSecs, Unspilled};
use crate::sessions::{Session, StateMachine, Status};
use crate::types::{Handle, Kind, SessionId, UnixMs};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};

/// Repeat time = wall clock (whole seconds) + timeout + a uniform jitter from the kind's window.
pub(crate) fn draw_due(wall: UnixMs, timeout_s: u32, kind: Option<&KindConfig>, rng: &mut ChaCha8Rng) -> UnixSecs {
    let window = kind.map_or(0, |k| k.jitter_window_s);
    let jitter = if window == 0 { 0 } else { rng.gen_range(0..=window as u64) };
    UnixSecs(wall.as_secs().0 + timeout_s as u64 + jitter)
}

/// Repeat time after a failed delivery: the kind's backoff for the session's failures in a row
/// (this one included), plus the jitter.
pub(crate) fn draw_retry_due(wall: UnixMs, session: &Session, cfg: &Rules<'_>, rng: &mut ChaCha8Rng) -> UnixSecs {
    let kc = cfg.kind(session.kind);
    let mut delay = kc.map_or(60, |k| k.backoff_s(session.failures + 1));
    if cfg.mutation(|m| m.no_backoff) {
        delay = 0;
    }
    draw_due(wall, delay, kc, rng)
}

/// Leader-only, volatile: what has been proposed but not yet applied, so a tick does not
/// propose the same session twice.
#[derive(Debug, Default)]
pub(crate) struct Repeater {
    /// Sessions proposed for a take, with their kind.
    taking: BTreeMap<SessionId, Kind>,
    expiring: BTreeSet<SessionId>,
}

impl Repeater {
    /// Forgets proposals that were applied or dropped.
    pub fn settle(&mut self, command: &Command) {
        match command {
            Command::Take { sessions, .. } => sessions.iter().for_each(|s| {
                self.taking.remove(s);
            }),
            Command::Expire { sessions } => sessions.iter().for_each(|(h, _)| {
                self.expiring.remove(&h.session);
            }),
            _ => {}
        }
    }

    /// Due stored sessions of each kind, in (due, store order), at most as many as the kind has
    /// free handler slots. Only each kind's due prefix is read, however many sessions wait.
    /// A spilled session goes with its records, which `records` finds (held in memory, or read
    /// ahead from its file); a kind whose next session's records are not at hand yet waits.
    pub fn plan_take(
        &mut self,
        state: &StateMachine,
        wall: UnixMs,
        cfg: &Rules<'_>,
        limits: &Limits,
        records: &dyn Fn(SessionId) -> Option<Unspilled>,
    ) -> Option<Command> {
        let mut horizon = wall.as_secs();
        if cfg.mutation(|m| m.redeliver_early) {
            horizon.0 += 5;
        }
        let (mut taken, mut unspilled, mut carried) = (Vec::new(), Vec::new(), 0u64);
        for (kind, kc) in &cfg.config.kinds {
            let room = limits.take_batch_max as usize - taken.len();
            let busy = state.delivering(*kind) as usize + self.taking_of(*kind);
            let free = (kc.handler_slots as usize).saturating_sub(busy).min(room);
            let due = state
                .stored_in_order(*kind, cfg)
                .take_while(|(due, _, _)| *due <= horizon)
                .filter(|(_, _, id)| !self.taking.contains_key(id));
            let mut ids: Vec<SessionId> = if cfg.mutation(|m| m.take_out_of_order) {
                let mut due: Vec<_> = due.map(|(_, _, id)| id).collect();
                due.reverse();
                due.into_iter().take(free).collect()
            } else {
                due.take(free).map(|(_, _, id)| id).collect()
            };
            for (n, id) in ids.iter().enumerate() {
                if state.is_spilled(*id) {
                    // The entry carries spilled sessions' records: at most half a batch's bytes
                    // of them (and always one), so a take stays an ordinary log entry.
                    let full = carried > limits.batch_bytes_max as u64 / 2;
                    match records(*id).filter(|_| !full) {
                        Some(u) => {
                            carried += u.records.iter().map(|r| r.len() as u64).sum::<u64>();
                            unspilled.push(u);
                        }
                        None => {
                            ids.truncate(n);
                            break;
                        }
                    }
                }
            }
            self.taking.extend(ids.iter().map(|id| (*id, *kind)));
            taken.extend(ids);
        }
        if taken.is_empty() {
            return None;
        }
        Some(Command::Take { sessions: taken, unspilled })
    }

    fn taking_of(&self, kind: Kind) -> usize {
        self.taking.values().filter(|k| **k == kind).count()
    }

    /// Active sessions whose lease ran out, each with the repeat time of an automatic store.
    pub fn plan_expire(
        &mut self,
        state: &StateMachine,
        wall: UnixMs,
        cfg: &Rules<'_>,
        limits: &Limits,
        rng: &mut ChaCha8Rng,
    ) -> Option<Command> {
        let mut expired = Vec::new();
        for &(lease_until, id) in state.leases_in_order() {
            let kind = state.session(id).expect("leased session exists").kind;
            if cfg.lease_end(kind, lease_until) > wall {
                // Leases are in order of their end; under the expire-early mutation a later one
                // of a shorter-leased kind may still be due, so only that build looks on.
                if cfg.mutation(|m| m.expire_early) {
                    continue;
                }
                break;
            }
            if expired.len() >= limits.take_batch_max as usize {
                break;
            }
            if self.expiring.contains(&id) {
                continue;
            }
            let s = state.session(id).expect("leased session exists");
            let Status::Active { delivering, .. } = s.status else { panic!("a leased session is active") };
            let due = if delivering {
                draw_retry_due(wall, s, cfg, rng)
            } else {
                let kc = cfg.kind(s.kind);
                draw_due(wall, kc.map_or(60, |k| k.default_delay_s), kc, rng)
            };
            expired.push((Handle { session: id, attempt: s.attempt }, due));
        }
        if expired.is_empty() {
            return None;
        }
        self.expiring.extend(expired.iter().map(|(h, _)| h.session));
        Some(Command::Expire { sessions: expired })
    }
}
