//! Properties of the session state machine under random sequences of operations: stores, takes,
//! failed deliveries, lease expiries, handler stores and deletes, keep-alives, redrives and drops,
//! with the clock moving on. After every entry the full invariants hold (indexes and hash
//! recomputed), and at the end:
//! - a session is dead only after `max_attempts` deliveries since a handler last stored it or an
//!   operator redrove it, and its failure count is exactly the kind's limit;
//! - no kind has more deliveries out than handler slots;
//! - the state survives a snapshot round trip with the same hash and the same sessions;
//! - applying the same entries again gives the same hash (apply is a function of its input).

use crate::config::{EngineConfig, KindConfig};
use crate::op::{Command, Entry, FailureReason, RedriveTarget, Reply, Request, SessionState, UnixSecs};
use crate::sessions::{MutationEnv, StateMachine};
use crate::snapshot::{decode_state, encode_state};
use crate::types::{Attempt, ClientId, Handle, Index, Kind, Seq, SessionId, Term, UnixMs};
use proptest::prelude::*;
use rand::SeedableRng;
use std::collections::BTreeMap;

const MAX_ATTEMPTS: u32 = 3;
const SLOTS: u32 = 2;
const WALL0: u64 = 1_800_000_000_000;

/// One step of a random history. Sessions are named by their position among those created.
#[derive(Clone, Debug)]
enum Op {
    New,
    Store(usize, u32),
    Take(usize),
    Fail(usize),
    /// Advance the clock by this many ms, then expire every lease that ran out.
    Expire(u64),
    HandlerStore(usize),
    HandlerDelete(usize),
    KeepAlive(usize),
    RedriveOne(usize),
    RedriveKind,
    Drop(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let s = 0usize..8;
    prop_oneof![
        2 => Just(Op::New),
        3 => (s.clone(), 0u32..3).prop_map(|(i, t)| Op::Store(i, t)),
        4 => s.clone().prop_map(Op::Take),
        4 => s.clone().prop_map(Op::Fail),
        2 => (0u64..3000).prop_map(Op::Expire),
        1 => s.clone().prop_map(Op::HandlerStore),
        1 => s.clone().prop_map(Op::HandlerDelete),
        1 => s.clone().prop_map(Op::KeepAlive),
        1 => s.clone().prop_map(Op::RedriveOne),
        1 => Just(Op::RedriveKind),
        1 => s.prop_map(Op::Drop),
    ]
}

fn cfg() -> EngineConfig {
    let kind = KindConfig {
        default_delay_s: 1,
        jitter_window_s: 0,
        lease_ms: 1000,
        handler_slots: SLOTS,
        backoff_base_s: 1,
        backoff_cap_s: 4,
        max_attempts: MAX_ATTEMPTS,
        ..KindConfig::default()
    };
    EngineConfig { kinds: BTreeMap::from([(Kind(1), kind)]), ..EngineConfig::default() }
}

/// Applies a history, entry by entry, checking the full invariants after each; returns the
/// entries (for a replay) and the final state.
struct Run {
    cfg: EngineConfig,
    state: StateMachine,
    entries: Vec<Entry>,
    at: u64,
    ids: Vec<SessionId>,
    seq: u64,
    /// Per session: the attempt of the last acknowledged handler store or redrive.
    reset_attempt: BTreeMap<SessionId, u32>,
}

impl Run {
    fn new() -> Run {
        let state = StateMachine::default();
        let mut run = Run {
            cfg: cfg(),
            state,
            entries: Vec::new(),
            at: WALL0,
            ids: Vec::new(),
            seq: 0,
            reset_attempt: BTreeMap::new(),
        };
        // A cluster's log starts with its configuration: applying consults nothing else.
        let config = crate::config::ClusterConfig::bootstrap(&run.cfg, &[crate::types::ReplicaId(0)]);
        run.apply(Command::Bootstrap { config });
        run
    }

    fn apply(&mut self, command: Command) -> Option<crate::op::Outcome> {
        let entry = Entry { term: Term(1), index: self.state.applied().next(), at: UnixMs(self.at), command };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let env = MutationEnv { rng: &mut rng, wall: UnixMs(self.at) };
        let applied = self.state.apply(&entry, &self.cfg.mutations, None, env);
        self.entries.push(entry);
        self.state.full_invariants();
        applied.reply.map(|(_, _, outcome)| outcome)
    }

    fn request(&mut self, request: Request, due: Option<UnixSecs>) -> crate::op::Outcome {
        self.seq += 1;
        let command = Command::Client { client: ClientId(1), seq: Seq(self.seq), request, due, principal: None };
        self.apply(command).expect("a client request is answered")
    }

    fn session(&self, i: usize) -> Option<(SessionId, Handle, SessionState)> {
        let id = *self.ids.get(i % self.ids.len().max(1))?;
        let v = self.state.session_view(id).ok()?;
        Some((id, v.handle, v.state))
    }

    fn due(&self, after_s: u64) -> UnixSecs {
        UnixSecs(self.at / 1000 + after_s)
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::New => {
                let request = Request::New { kind: Kind(1), record: Some(vec![1, 2, 3]) };
                if let Ok(Reply::Created { handle }) = self.request(request, None) {
                    self.ids.push(handle.session);
                }
            }
            Op::Store(i, t) => {
                let Some((_, handle, _)) = self.session(i) else { return };
                let due = self.due(t as u64);
                self.request(Request::Store { handle, timeout_s: t }, Some(due)).ok();
            }
            Op::Take(i) => {
                let Some((id, _, _)) = self.session(i) else { return };
                // Jump to its repeat time if it has one, as the leader's clock would.
                if let Some(SessionState::Stored { due }) = self.state.session_view(id).ok().map(|v| v.state) {
                    self.at = self.at.max(due.as_ms().0);
                }
                self.apply(Command::Take { sessions: vec![id], unspilled: vec![] });
            }
            Op::Fail(i) => {
                let Some((_, handle, _)) = self.session(i) else { return };
                let due = self.due(1);
                let reason = FailureReason::Handler("no".into());
                self.apply(Command::DeliveryFailed { handle, due, reason });
            }
            Op::Expire(ms) => {
                self.at += ms;
                let at = UnixMs(self.at);
                let expired: Vec<(Handle, UnixSecs)> = self
                    .state
                    .leases_in_order()
                    .take_while(|(until, _)| *until <= at)
                    .map(|(_, id)| {
                        let attempt = self.state.session(*id).expect("leased").attempt;
                        (Handle { session: *id, attempt }, UnixSecs(self.at / 1000 + 1))
                    })
                    .collect();
                if !expired.is_empty() {
                    self.apply(Command::Expire { sessions: expired });
                }
            }
            Op::HandlerStore(i) => {
                let Some((id, handle, _)) = self.session(i) else { return };
                let due = self.due(0);
                if let Ok(Reply::Stored { .. }) = self.request(Request::Store { handle, timeout_s: 0 }, Some(due)) {
                    self.reset_attempt.insert(id, handle.attempt.0);
                }
            }
            Op::HandlerDelete(i) => {
                let Some((_, handle, _)) = self.session(i) else { return };
                self.request(Request::Delete { handle }, None).ok();
            }
            Op::KeepAlive(i) => {
                let Some((_, handle, _)) = self.session(i) else { return };
                self.request(Request::KeepAlive { handle }, None).ok();
            }
            Op::RedriveOne(i) => {
                let Some((id, handle, _)) = self.session(i) else { return };
                let target = RedriveTarget::Session(id);
                if let Ok(Reply::Redriven { .. }) = self.request(Request::Redrive { target }, None) {
                    self.reset_attempt.insert(id, handle.attempt.0);
                }
            }
            Op::RedriveKind => {
                let dead: Vec<(SessionId, Attempt)> = self
                    .state
                    .session_views()
                    .filter(|v| matches!(v.state, SessionState::Dead { .. }))
                    .map(|v| (v.id, v.handle.attempt))
                    .collect();
                let target = RedriveTarget::Kind(Kind(1));
                if let Ok(Reply::Redriven { count, .. }) = self.request(Request::Redrive { target }, None) {
                    // The default batch is far above what these histories kill.
                    assert_eq!(count as usize, dead.len(), "a kind's redrive moves every dead session");
                    for (id, attempt) in dead {
                        self.reset_attempt.insert(id, attempt.0);
                    }
                }
            }
            Op::Drop(i) => {
                let Some((id, _, state)) = self.session(i) else { return };
                let outcome = self.request(Request::DropDead { session: id }, None);
                assert_eq!(outcome.is_ok(), matches!(state, SessionState::Dead { .. }), "drop: {outcome:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn redelivery_keeps_its_rules_under_any_history(ops in prop::collection::vec(op(), 1..120)) {
        let mut run = Run::new();
        for op in &ops {
            run.step(op);
        }
        let state = &run.state;
        let mut out_per_kind = 0;
        for v in state.session_views() {
            if let SessionState::Active { delivering: true, .. } = v.state {
                out_per_kind += 1;
            }
            if let SessionState::Dead { .. } = v.state {
                let reset = run.reset_attempt.get(&v.id).copied().unwrap_or(0);
                prop_assert_eq!(v.failures, MAX_ATTEMPTS, "dead with {} failures", v.failures);
                prop_assert!(v.deliveries - reset >= MAX_ATTEMPTS, "dead after {} deliveries since a reset", v.deliveries - reset);
            } else {
                prop_assert!(v.failures < MAX_ATTEMPTS, "{} failures in a row but not dead: {:?}", v.failures, v.state);
            }
        }
        prop_assert!(out_per_kind <= SLOTS, "{out_per_kind} deliveries out with {SLOTS} slots");

        // A snapshot round trip keeps everything.
        let encoded = encode_state(state);
        let loaded = decode_state(&encoded, state.applied()).expect("a state decodes");
        prop_assert_eq!(loaded.state_hash(), state.state_hash());
        prop_assert_eq!(loaded.session_views().collect::<Vec<_>>(), state.session_views().collect::<Vec<_>>());

        // A snapshot that says less than its sessions show is refused with an error (it may come
        // from a peer), never a panic: sessions beyond its applied index, a wrong byte count.
        if let Some((&id, _)) = state.sessions.iter().next() {
            let mut behind = loaded.clone();
            behind.applied = Index(id.0.saturating_sub(1));
            let refused = decode_state(&encode_state(&behind), behind.applied);
            prop_assert!(refused.is_err(), "sessions beyond the applied index were taken");
            let mut miscounted = loaded.clone();
            miscounted.sessions.get_mut(&id).expect("the session").bytes += 1;
            prop_assert!(decode_state(&encode_state(&miscounted), miscounted.applied).is_err());
        }

        // The same entries applied again give the same state.
        let mut again = StateMachine::default();
        for e in &run.entries {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
            again.apply(e, &run.cfg.mutations, None, MutationEnv { rng: &mut rng, wall: UnixMs(0) });
        }
        prop_assert_eq!(again.state_hash(), state.state_hash());
        prop_assert_eq!(again.applied(), Index(run.entries.len() as u64));
    }
}
