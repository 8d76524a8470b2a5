//! Simulated clients and handlers. Each is an [`Agent`]: it opens or receives a session, works
//! through a plan of operations one request at a time, retries a request it hears nothing
//! about with the same sequence number, and gives up after a while (the outcome then stays
//! unknown, which the checkers allow for). Handlers are agents whose session comes from a
//! delivery instead of `new`.

use crate::history::{Actor, Event};
use crate::scenario::{HandlerSetup, Workload};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;
use truba_engine::{ClientId, FailureReason, Handle, Kind, KindConfig, Outcome, Reply, Request, RequestError, Seq};

/// One step of a session plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Append(u32),
    Replace(u32),
    /// An append over the kind's record limit: must be refused and change nothing.
    Oversized(u32),
    Delete,
    Store(u32),
    /// Send the next request, then die without waiting for its answer.
    CrashAfterNext,
    /// Tell the pipe this delivery failed.
    Fail,
    /// Do nothing for this long (ms): a handler that stalls past its lease, or works on a long job.
    Stall(u64),
    /// Renew the lease.
    KeepAlive,
}

/// What an agent wants the world to do.
#[derive(Debug)]
pub enum Action {
    Send {
        client: ClientId,
        seq: Seq,
        request: Request,
    },
    /// Call [`Agent::wake`] at this time with this token; an older token is stale.
    Wake {
        at_us: u64,
        token: u64,
    },
    Record(Event),
    DeliveryFailed(Handle, FailureReason),
}

#[derive(Debug)]
struct Inflight {
    seq: u64,
    request: Request,
    first_sent_us: u64,
}

/// What the world tells an agent about the run.
pub struct Ctx<'a> {
    pub workload: &'a Workload,
    pub kinds: &'a [(Kind, KindConfig, HandlerSetup)],
    /// In the liveness phase no new sessions start and handlers always finish their work.
    pub liveness: bool,
}

#[derive(Debug)]
pub struct Agent {
    pub actor: Actor,
    pub client: ClientId,
    /// Client ids of later incarnations are `client_base + incarnation`.
    client_base: u64,
    seq: u64,
    rng: ChaCha8Rng,
    handle: Option<Handle>,
    kind: Kind,
    plan: VecDeque<Step>,
    inflight: Option<Inflight>,
    /// Opens sessions by itself (workload client) rather than waiting for deliveries (handler).
    opens_sessions: bool,
    /// A storm agent opens one session, stores it, and is done.
    one_shot: Option<(Kind, u32)>,
    done: bool,
    /// Set between a crash and the restart of the client process.
    crashed: bool,
    /// Only the most recently scheduled wake-up counts; earlier timers are stale.
    wake_token: u64,
}

pub fn record_bytes(client: ClientId, seq: u64, len: u32) -> Vec<u8> {
    let mut r = format!("c{}.{}:", client.0, seq).into_bytes();
    let fill = b'a' + ((client.0 * 31 + seq) % 26) as u8;
    r.resize((len as usize).max(r.len()), fill);
    r
}

/// The request a record claims to come from, `(client, seq)`, read from its id.
pub fn record_origin(r: &[u8]) -> Option<(u64, u64)> {
    let id = crate::history::record_id(r);
    let (c, s) = id.strip_prefix('c')?.split_once('.')?;
    Some((c.parse().ok()?, s.parse().ok()?))
}

/// Whether `r` is exactly a record some client generated with [`record_bytes`].
pub fn record_is_genuine(r: &[u8]) -> bool {
    let Some((c, s)) = record_origin(r) else { return false };
    record_bytes(ClientId(c), s, r.len() as u32) == r
}

impl Agent {
    pub fn client(index: u32, rng: ChaCha8Rng) -> Agent {
        let base = 1 + index as u64 * 1_000_000;
        Agent::new(Actor::Client(index), base, rng, true, None)
    }

    pub fn storm(index: u32, kind: Kind, timeout_s: u32, rng: ChaCha8Rng) -> Agent {
        let base = 1 + index as u64 * 1_000_000;
        Agent::new(Actor::Client(index), base, rng, true, Some((kind, timeout_s)))
    }

    /// An operator: sends the redrives and drops the world picks, one at a time.
    pub fn operator(index: u32, rng: ChaCha8Rng) -> Agent {
        let base = 1 + index as u64 * 1_000_000;
        Agent::new(Actor::Client(index), base, rng, false, None)
    }

    /// The operator sends `request` unless it still waits for its previous one.
    pub fn operate(&mut self, now_us: u64, request: Request, ctx: &Ctx) -> Vec<Action> {
        if self.inflight.is_some() {
            return vec![];
        }
        self.send(now_us, request, ctx)
    }

    pub fn handler(kind: Kind, slot: u32, rng: ChaCha8Rng) -> Agent {
        let base = 1_000_000_000_000 + kind.0 as u64 * 1_000_000_000 + slot as u64 * 1_000_000;
        Agent::new(Actor::Handler(kind.0, slot), base, rng, false, None)
    }

    fn new(actor: Actor, base: u64, rng: ChaCha8Rng, opens: bool, one_shot: Option<(Kind, u32)>) -> Agent {
        Agent {
            actor,
            client: ClientId(base),
            client_base: base,
            seq: 0,
            rng,
            handle: None,
            kind: Kind(0),
            plan: VecDeque::new(),
            inflight: None,
            opens_sessions: opens,
            one_shot,
            done: false,
            crashed: false,
            wake_token: 0,
        }
    }

    pub fn is_idle_handler(&self) -> bool {
        !self.opens_sessions && self.handle.is_none() && self.inflight.is_none()
    }

    /// A handler receives a session to work on.
    pub fn deliver(&mut self, now_us: u64, handle: Handle, kind: Kind, ctx: &Ctx) -> Vec<Action> {
        let setup = ctx.kinds.iter().find(|k| k.0 == kind).map(|k| (k.1.clone(), k.2.clone()));
        let Some((kc, hs)) = setup else { return vec![] };
        self.handle = Some(handle);
        self.kind = kind;
        self.plan.clear();
        let roll: f64 = self.rng.gen();
        if !ctx.liveness && roll < hs.fail_share {
            self.plan.push_back(Step::Fail);
        } else if !ctx.liveness && roll < hs.fail_share + hs.stall_share {
            self.plan.push_back(Step::Stall(kc.lease_ms * 2));
            self.plan.push_back(Step::Delete);
        } else if !ctx.liveness && roll < hs.fail_share + hs.stall_share + hs.long_share {
            // A long job: 2.5 leases of work, a keep-alive every third of a lease.
            for _ in 0..7 {
                self.plan.push_back(Step::Stall(kc.lease_ms / 3));
                self.plan.push_back(Step::KeepAlive);
            }
            self.plan.push_back(Step::Delete);
        } else if !ctx.liveness && roll < hs.fail_share + hs.stall_share + hs.long_share + hs.restore_share {
            let len = self.rng.gen_range(ctx.workload.record_bytes.0..=ctx.workload.record_bytes.1);
            self.plan.push_back(Step::Append(len));
            let (a, b) = ctx.workload.store_timeout_s;
            self.plan.push_back(Step::Store(self.rng.gen_range(a..=b)));
        } else {
            self.plan.push_back(Step::Delete);
        }
        let work = self.rng.gen_range(hs.work_ms.0..=hs.work_ms.1);
        self.wake_after(now_us, work * 1000)
    }

    fn wake_after(&mut self, now_us: u64, delay_us: u64) -> Vec<Action> {
        self.wake_token += 1;
        vec![Action::Wake { at_us: now_us + delay_us, token: self.wake_token }]
    }

    fn think(&mut self, now_us: u64, ctx: &Ctx) -> Vec<Action> {
        let (a, b) = ctx.workload.think_ms;
        let ms = self.rng.gen_range(a..=b);
        self.wake_after(now_us, ms * 1000)
    }

    /// Starts a client process (at time zero, or after a crash).
    pub fn start(&mut self, now_us: u64, ctx: &Ctx) -> Vec<Action> {
        self.think(now_us, ctx)
    }

    pub fn wake(&mut self, now_us: u64, token: u64, ctx: &Ctx) -> Vec<Action> {
        if token != self.wake_token || self.done {
            return vec![];
        }
        if self.crashed {
            // The client process comes back as a new process: a new client id, no session.
            self.crashed = false;
            self.client = ClientId(self.client.0 + 1);
            assert!(self.client.0 < self.client_base + 1_000_000, "client incarnations bounded");
        }
        if let Some(inf) = &self.inflight {
            if now_us.saturating_sub(inf.first_sent_us) >= ctx.workload.give_up_after_ms * 1000 {
                let seq = inf.seq;
                self.inflight = None;
                self.abandon_session();
                let mut out = vec![Action::Record(Event::GiveUp { actor: self.actor, client: self.client.0, seq })];
                out.extend(self.think(now_us, ctx));
                return out;
            }
            let (seq, request) = (Seq(inf.seq), inf.request.clone());
            let mut out = vec![Action::Send { client: self.client, seq, request }];
            out.extend(self.wake_after(now_us, ctx.workload.retry_after_ms * 1000));
            return out;
        }
        self.next_request(now_us, ctx)
    }

    fn abandon_session(&mut self) {
        self.handle = None;
        self.plan.clear();
        if self.one_shot.is_some() {
            self.done = true;
        }
    }

    fn next_request(&mut self, now_us: u64, ctx: &Ctx) -> Vec<Action> {
        let Some(handle) = self.handle else {
            if !self.opens_sessions || (ctx.liveness && self.one_shot.is_none()) {
                return vec![];
            }
            return self.open_session(now_us, ctx);
        };
        let mut crash = false;
        let step = loop {
            match self.plan.pop_front() {
                Some(Step::CrashAfterNext) => crash = true,
                Some(s) => break s,
                None => break Step::Delete,
            }
        };
        let request = match step {
            Step::Append(len) | Step::Oversized(len) => {
                Request::Append { handle, record: record_bytes(self.client, self.seq + 1, len) }
            }
            Step::Replace(len) => Request::Replace { handle, record: record_bytes(self.client, self.seq + 1, len) },
            Step::Delete => Request::Delete { handle },
            Step::Store(timeout_s) => Request::Store { handle, timeout_s },
            Step::Fail => {
                self.handle = None;
                let mut out = vec![Action::DeliveryFailed(handle, FailureReason::Handler("simulated failure".into()))];
                out.extend(self.think(now_us, ctx));
                return out;
            }
            Step::Stall(ms) => return self.wake_after(now_us, ms * 1000),
            Step::KeepAlive => Request::KeepAlive { handle },
            Step::CrashAfterNext => unreachable!("consumed above"),
        };
        let mut out = self.send(now_us, request, ctx);
        if crash {
            out.extend(self.crash(now_us, ctx));
        }
        out
    }

    fn open_session(&mut self, now_us: u64, ctx: &Ctx) -> Vec<Action> {
        let w = ctx.workload;
        let (kind, kc) = match self.one_shot {
            Some((kind, timeout_s)) => {
                self.plan = VecDeque::from([Step::Store(timeout_s)]);
                let kc = ctx.kinds.iter().find(|k| k.0 == kind).expect("storm kind configured").1.clone();
                (kind, kc)
            }
            None => {
                let i = self.rng.gen_range(0..ctx.kinds.len());
                let (kind, kc, _) = &ctx.kinds[i];
                self.plan = self.plan_session(w, kc);
                (*kind, kc.clone())
            }
        };
        self.kind = kind;
        let len = self.rng.gen_range(w.record_bytes.0..=w.record_bytes.1).min(kc.record_bytes_max);
        let record = Some(record_bytes(self.client, self.seq + 1, len));
        self.send(now_us, Request::New { kind, record }, ctx)
    }

    fn plan_session(&mut self, w: &Workload, kc: &KindConfig) -> VecDeque<Step> {
        let mut plan = VecDeque::new();
        let n = self.rng.gen_range(w.records_per_session.0..=w.records_per_session.1);
        for _ in 0..n {
            let len = self.rng.gen_range(w.record_bytes.0..=w.record_bytes.1).min(kc.record_bytes_max);
            let roll: f64 = self.rng.gen();
            plan.push_back(if roll < w.oversized_share {
                Step::Oversized(kc.record_bytes_max + self.rng.gen_range(1..100))
            } else if roll < w.oversized_share + w.replace_share {
                Step::Replace(len)
            } else {
                Step::Append(len)
            });
        }
        plan.push_back(if self.rng.gen_bool(w.store_share) {
            Step::Store(self.rng.gen_range(w.store_timeout_s.0..=w.store_timeout_s.1))
        } else {
            Step::Delete
        });
        if self.rng.gen_bool(w.client_crash_share) {
            let at = self.rng.gen_range(0..plan.len());
            plan.insert(at, Step::CrashAfterNext);
        }
        plan
    }

    fn send(&mut self, now_us: u64, request: Request, ctx: &Ctx) -> Vec<Action> {
        self.seq += 1;
        let seq = self.seq;
        self.inflight = Some(Inflight { seq, request: request.clone(), first_sent_us: now_us });
        let mut out = vec![
            Action::Record(Event::Invoke { actor: self.actor, client: self.client.0, seq, request: request.clone() }),
            Action::Send { client: self.client, seq: Seq(seq), request },
        ];
        out.extend(self.wake_after(now_us, ctx.workload.retry_after_ms * 1000));
        out
    }

    /// Crashes this client now if it is a workload client holding a session (a crash storm).
    pub fn crash_if_holding(&mut self, now_us: u64, ctx: &Ctx) -> Vec<Action> {
        if !self.opens_sessions || self.one_shot.is_some() || self.crashed || self.handle.is_none() {
            return vec![];
        }
        self.crash(now_us, ctx)
    }

    /// The process dies: its in-flight request's outcome is unknown and its session dangles
    /// until the lease runs out. It comes back later as a new process.
    fn crash(&mut self, now_us: u64, ctx: &Ctx) -> Vec<Action> {
        self.inflight = None;
        self.abandon_session();
        self.crashed = true;
        let mut out = vec![Action::Record(Event::ClientCrash { actor: self.actor })];
        let (a, b) = ctx.workload.think_ms;
        let restart_ms = self.rng.gen_range(a..=b) + 100;
        out.extend(self.wake_after(now_us, restart_ms * 1000));
        out
    }

    /// The request this process waits for, if it is `(client, seq)`: the client library
    /// resends it to the leader after a redirect.
    pub fn pending_request(&self, client: ClientId, seq: Seq) -> Option<Request> {
        let inf = self.inflight.as_ref()?;
        (client == self.client && inf.seq == seq.0).then(|| inf.request.clone())
    }

    pub fn on_reply(&mut self, now_us: u64, client: ClientId, seq: Seq, outcome: Outcome, ctx: &Ctx) -> Vec<Action> {
        let Some(inf) = &self.inflight else { return vec![] };
        if client != self.client || seq.0 != inf.seq {
            return vec![]; // an answer to a request this process no longer waits for
        }
        if let Err(e) = &outcome {
            if e.is_retryable() || matches!(e, RequestError::Stopped(_)) {
                return vec![]; // the pending retry timer resends it
            }
        }
        let request = self.inflight.take().expect("checked").request;
        let mut out = vec![Action::Record(Event::Complete {
            actor: self.actor,
            client: client.0,
            seq: seq.0,
            outcome: outcome.clone(),
        })];
        match (&request, &outcome) {
            (Request::New { .. }, Ok(Reply::Created { handle })) => self.handle = Some(*handle),
            (Request::New { .. }, _) => self.abandon_session(),
            (Request::Delete { .. } | Request::Store { .. }, Ok(_)) => {
                self.handle = None;
                self.plan.clear();
                if self.one_shot.is_some() {
                    self.done = true;
                    return out;
                }
            }
            (Request::Delete { .. } | Request::Store { .. }, Err(RequestError::DiskFull)) => {
                // Nothing was applied; try the same ending again as a new request.
                let step = match request {
                    Request::Store { timeout_s, .. } => Step::Store(timeout_s),
                    _ => Step::Delete,
                };
                self.plan.push_front(step);
            }
            (_, Err(RequestError::RecordTooLarge { .. } | RequestError::DiskFull)) => {}
            (_, Err(_)) => self.abandon_session(),
            (_, Ok(_)) => {}
        }
        out.extend(self.think(now_us, ctx));
        out
    }
}
