//! The discrete-event world: one replica (engine + simulated disk + clocks), the clients and
//! handlers, virtual time, and the fault schedule. It only carries out what the engine asks for
//! and records ground truth; every decision is the engine's.

use crate::clock::SimClock;
use crate::disk::SimDisk;
use crate::history::{Event, History};
use crate::scenario::{HandlerSetup, Scenario};
use crate::workload::{Action, Agent, Ctx};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use truba_engine::{
    ClientId, Engine, EngineConfig, Handle, Input, IoId, IoOp, Kind, KindConfig, Mutations, Outcome, Output, Request,
    Seq, SessionView,
};

#[derive(Debug)]
enum Ev {
    Wake { agent: usize, token: u64 },
    Request { client: ClientId, seq: Seq, request: Request },
    Reply { client: ClientId, seq: Seq, outcome: Outcome },
    Io { boot: u32, id: IoId, op: IoOp },
    Tick { boot: u32 },
    Deliver { kind: Kind, handle: Handle },
    DeliveryFailed { handle: Handle },
    Crash,
    Restart,
    DiskFull { on: bool },
    ClockStep,
    Storm,
    Liveness,
    End,
}

struct Replica {
    engine: Option<Engine>,
    boot: u32,
    disk: SimDisk,
    clock: SimClock,
    scheduled_tick: Option<u64>,
    restart_pending: bool,
    consecutive_stops: u32,
}

/// A property found violated while the run was going on (the rest are checked afterwards).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub property: &'static str,
    pub at_us: u64,
    pub detail: String,
    /// The session the violation concerns, so the report can show its events.
    pub session: Option<u64>,
}

#[derive(Clone, Debug, Default)]
pub struct RunStats {
    pub events: u64,
    pub virtual_us: u64,
    pub crashes: u64,
    pub hash_checks: u64,
    pub disk_full_periods: u64,
    pub clock_steps: u64,
}

/// What a run leaves for the checkers.
pub struct RunOutput {
    pub history: History,
    pub violations: Vec<Violation>,
    pub stats: RunStats,
    /// The replica's sessions at the end, or `None` if it was not serving.
    pub final_sessions: Option<Vec<SessionView>>,
    pub final_wall_ms: u64,
    pub end_us: u64,
    /// The scenario as run (after swarm draws).
    pub scenario: Scenario,
}

pub struct World {
    sc: Scenario,
    cfg: EngineConfig,
    seed: u64,
    now_us: u64,
    next_seq: u64,
    events: BTreeMap<(u64, u64), Ev>,
    rng: ChaCha8Rng,
    disk_rng: ChaCha8Rng,
    replica: Replica,
    agents: Vec<Agent>,
    by_client: BTreeMap<ClientId, usize>,
    pools: BTreeMap<Kind, (Vec<usize>, VecDeque<Handle>)>,
    kinds: Vec<(Kind, KindConfig, HandlerSetup)>,
    history: History,
    hashes: BTreeMap<u64, u64>,
    /// Every wall-clock reading handed to the replica, to check the readings it reports.
    wall_readings: BTreeSet<u64>,
    violations: Vec<Violation>,
    liveness: bool,
    stats: RunStats,
    /// Print every disk operation to standard error (for debugging one seed).
    pub trace_io: bool,
}

fn sub_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

const STREAM_WORLD: u64 = 1;
const STREAM_DISK: u64 = 2;
const STREAM_SWARM: u64 = 3;
const STREAM_ENGINE: u64 = 4;
const STREAM_AGENTS: u64 = 1000;

impl World {
    pub fn new(scenario: &Scenario, seed: u64, mutations: Mutations) -> World {
        let sc = if scenario.swarm { scenario.swarmed(&mut sub_rng(seed, STREAM_SWARM)) } else { scenario.clone() };
        let kinds: Vec<_> = sc.kinds.iter().map(|(k, s)| (Kind(*k), s.config.clone(), s.handler.clone())).collect();
        let cfg = EngineConfig {
            kinds: kinds.iter().map(|(k, c, _)| (*k, c.clone())).collect(),
            limits: sc.limits.clone(),
            mutations,
        };
        let mut rng = sub_rng(seed, STREAM_WORLD);
        let cf = &sc.faults.clock;
        let clock = SimClock {
            offset_ms: rng.gen_range(cf.offset_ms.0..=cf.offset_ms.1),
            drift_ppm: rng.gen_range(cf.drift_ppm.0..=cf.drift_ppm.1),
            steps_ms: 0,
        };
        let replica = Replica {
            engine: None,
            boot: 0,
            disk: SimDisk::new(sc.faults.disk.clone()),
            clock,
            scheduled_tick: None,
            restart_pending: false,
            consecutive_stops: 0,
        };
        let mut w = World {
            cfg,
            seed,
            now_us: 0,
            next_seq: 0,
            events: BTreeMap::new(),
            rng,
            disk_rng: sub_rng(seed, STREAM_DISK),
            replica,
            agents: Vec::new(),
            by_client: BTreeMap::new(),
            pools: BTreeMap::new(),
            kinds,
            history: History::default(),
            hashes: BTreeMap::new(),
            wall_readings: BTreeSet::new(),
            violations: Vec::new(),
            liveness: false,
            stats: RunStats::default(),
            trace_io: std::env::var_os("TRUBA_SIM_TRACE_IO").is_some(),
            sc,
        };
        w.populate();
        w
    }

    fn populate(&mut self) {
        for i in 0..self.sc.workload.clients {
            let a = Agent::client(i, sub_rng(self.seed, STREAM_AGENTS + self.agents.len() as u64));
            self.agents.push(a);
        }
        for (kind, kc, _) in self.kinds.clone() {
            let mut slots = Vec::new();
            for slot in 0..kc.handler_slots {
                let a = Agent::handler(kind, slot, sub_rng(self.seed, STREAM_AGENTS + self.agents.len() as u64));
                slots.push(self.agents.len());
                self.agents.push(a);
            }
            self.pools.insert(kind, (slots, VecDeque::new()));
        }
    }

    fn at(&mut self, t_us: u64, ev: Ev) {
        self.next_seq += 1;
        self.events.insert((t_us.max(self.now_us), self.next_seq), ev);
    }

    fn after_ms(&mut self, range: (u64, u64)) -> u64 {
        self.now_us + self.rng.gen_range(range.0..=range.1.max(range.0)) * 1000
    }

    fn net_delay(&mut self) -> u64 {
        let (a, b) = self.sc.workload.net_delay_us;
        self.now_us + self.rng.gen_range(a..=b.max(a))
    }

    /// Runs the scenario to its end and hands over what the checkers need.
    pub fn run(mut self) -> RunOutput {
        let safety_end = self.sc.duration_s * 1_000_000;
        let end = safety_end + self.sc.liveness_s * 1_000_000;
        self.at(0, Ev::Restart);
        for i in 0..self.agents.len() {
            let ctx = self.ctx_owned();
            let actions = self.agents[i].start(0, &ctx.as_ctx());
            self.apply_actions(i, actions);
        }
        if let Some(r) = self.sc.faults.crash_every_ms {
            let t = self.after_ms(r);
            self.at(t, Ev::Crash);
        }
        if let Some(r) = self.sc.faults.disk_full_every_ms {
            let t = self.after_ms(r);
            self.at(t, Ev::DiskFull { on: true });
        }
        if let Some(r) = self.sc.faults.clock.step_every_ms {
            let t = self.after_ms(r);
            self.at(t, Ev::ClockStep);
        }
        if let Some(s) = &self.sc.workload.storm {
            self.at(s.at_s * 1_000_000, Ev::Storm);
        }
        self.at(safety_end, Ev::Liveness);
        self.at(end, Ev::End);
        while let Some(((t, _), ev)) = self.events.pop_first() {
            self.now_us = t;
            self.stats.events += 1;
            if matches!(ev, Ev::End) {
                break;
            }
            self.step(ev);
        }
        self.stats.virtual_us = self.now_us;
        let final_sessions = self.replica.engine.as_ref().filter(|e| e.is_serving()).map(|e| {
            e.state().full_invariants();
            e.state().session_views().collect()
        });
        RunOutput {
            history: self.history,
            violations: self.violations,
            stats: self.stats,
            final_sessions,
            final_wall_ms: self.replica.clock.now(self.now_us).wall.0,
            end_us: self.now_us,
            scenario: self.sc,
        }
    }

    fn ctx_owned(&self) -> OwnedCtx {
        OwnedCtx { workload: self.sc.workload.clone(), kinds: self.kinds.clone(), liveness: self.liveness }
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Wake { agent, token } => {
                let ctx = self.ctx_owned();
                let actions = self.agents[agent].wake(self.now_us, token, &ctx.as_ctx());
                self.apply_actions(agent, actions);
            }
            Ev::Request { client, seq, request } => self.feed(Input::Request { client, seq, request }),
            Ev::Reply { client, seq, outcome } => {
                let Some(&i) = self.by_client.get(&client) else { return };
                let ctx = self.ctx_owned();
                let actions = self.agents[i].on_reply(self.now_us, client, seq, outcome, &ctx.as_ctx());
                self.apply_actions(i, actions);
            }
            Ev::Io { boot, id, op } => {
                if boot != self.replica.boot || self.replica.engine.is_none() {
                    return; // the process that asked for it is gone
                }
                let result = self.replica.disk.execute(&op, &mut self.disk_rng);
                if self.trace_io {
                    let what = match &op {
                        IoOp::Write { file, offset, data } if data.len() < 100 => {
                            format!("write {file} @{offset} +{} {data:?}", data.len())
                        }
                        IoOp::Write { file, offset, data } => format!("write {file} @{offset} +{}", data.len()),
                        IoOp::Read { file } => format!("read {file}"),
                        other => format!("{other:?}"),
                    };
                    let res = match &result {
                        Ok(truba_engine::IoReply::Data(d)) if d.len() < 100 => format!("{} bytes {d:?}", d.len()),
                        Ok(truba_engine::IoReply::Data(d)) => format!("{} bytes", d.len()),
                        other => format!("{other:?}"),
                    };
                    eprintln!("{:>10.6} boot {boot} io {} {what} -> {res}", self.now_us as f64 / 1e6, id.0);
                }
                self.feed(Input::IoDone { id, result });
            }
            Ev::Tick { boot } => {
                if boot == self.replica.boot && self.replica.scheduled_tick == Some(self.now_us) {
                    self.replica.scheduled_tick = None;
                    self.feed(Input::Tick);
                }
            }
            Ev::Deliver { kind, handle } => {
                if let Some(pool) = self.pools.get_mut(&kind) {
                    pool.1.push_back(handle);
                }
                self.dispatch(kind);
            }
            Ev::DeliveryFailed { handle } => self.feed(Input::DeliveryFailed { handle }),
            Ev::Crash => self.crash(),
            Ev::Restart => self.restart(),
            Ev::DiskFull { on } => self.disk_full(on),
            Ev::ClockStep => self.clock_step(),
            Ev::Storm => self.storm(),
            Ev::Liveness => self.heal(),
            Ev::End => unreachable!("handled by the loop"),
        }
    }

    fn apply_actions(&mut self, agent: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { client, seq, request } => {
                    self.by_client.insert(client, agent);
                    let t = self.net_delay();
                    self.at(t, Ev::Request { client, seq, request });
                }
                Action::Wake { at_us, token } => self.at(at_us, Ev::Wake { agent, token }),
                Action::Record(e) => self.history.push(self.now_us, e),
                Action::DeliveryFailed(handle) => {
                    self.history.push(self.now_us, Event::DeliveryFailed { handle });
                    let t = self.net_delay();
                    self.at(t, Ev::DeliveryFailed { handle });
                }
            }
        }
        if let crate::history::Actor::Handler(kind, _) = self.agents[agent].actor {
            self.dispatch(Kind(kind));
        }
    }

    /// Hands queued deliveries of `kind` to idle handler workers.
    fn dispatch(&mut self, kind: Kind) {
        loop {
            let Some((workers, queue)) = self.pools.get(&kind) else { return };
            if queue.is_empty() {
                return;
            }
            let Some(&w) = workers.iter().find(|w| self.agents[**w].is_idle_handler()) else { return };
            let handle = self.pools.get_mut(&kind).expect("exists").1.pop_front().expect("non-empty");
            let ctx = self.ctx_owned();
            let actions = self.agents[w].deliver(self.now_us, handle, kind, &ctx.as_ctx());
            for a in actions {
                if let Action::Wake { at_us, token } = a {
                    self.at(at_us, Ev::Wake { agent: w, token });
                }
            }
        }
    }

    /// Feeds one input to the replica and carries out everything it outputs.
    fn feed(&mut self, input: Input) {
        let now = self.replica.clock.now(self.now_us);
        let Some(engine) = self.replica.engine.as_mut() else { return };
        self.wall_readings.insert(now.wall.0);
        engine.handle(now, input);
        let mut outputs = Vec::new();
        while let Some(o) = engine.poll() {
            outputs.push(o);
        }
        let serving = engine.is_serving();
        let (applied, hash) = (engine.state().applied().0, engine.state().state_hash());
        let deadline = engine.next_deadline();
        // Outputs first: a `Recovered` output is compared with hashes from before this step.
        for o in outputs {
            self.carry_out(o);
        }
        if serving {
            self.hashes.insert(applied, hash);
        }
        if let (Some(d), Some(_)) = (deadline, &self.replica.engine) {
            let t = self.replica.clock.true_us_at(d).max(self.now_us);
            if self.replica.scheduled_tick.is_none_or(|s| t < s) {
                self.replica.scheduled_tick = Some(t);
                let boot = self.replica.boot;
                self.at(t, Ev::Tick { boot });
            }
        }
    }

    fn carry_out(&mut self, o: Output) {
        match o {
            Output::Io { id, op } => {
                let t = self.now_us + self.replica.disk.latency_us(&op, &mut self.disk_rng);
                let boot = self.replica.boot;
                self.at(t, Ev::Io { boot, id, op });
            }
            Output::Reply { client, seq, outcome } => {
                let t = self.net_delay();
                self.at(t, Ev::Reply { client, seq, outcome });
            }
            Output::Deliver { kind, handle, due, taken_at, records } => {
                if !self.wall_readings.contains(&taken_at.0) {
                    self.violations.push(Violation {
                        property: "no-early-redelivery",
                        at_us: self.now_us,
                        detail: format!(
                            "take claims clock reading {} ms, which the replica was never given",
                            taken_at.0
                        ),
                        session: Some(handle.session.0),
                    });
                }
                let taken_at_ms = taken_at.0;
                self.history.push(self.now_us, Event::Deliver { kind, handle, due, records, taken_at_ms });
                let t = self.net_delay();
                self.at(t, Ev::Deliver { kind, handle });
            }
            Output::Recovered { applied, state_hash, torn_bytes } => {
                self.replica.consecutive_stops = 0;
                self.history.push(self.now_us, Event::Recovered { applied: applied.0, state_hash, torn_bytes });
                if let Some(&before) = self.hashes.get(&applied.0) {
                    self.stats.hash_checks += 1;
                    if before != state_hash {
                        self.violations.push(Violation {
                            property: "state-hash",
                            at_us: self.now_us,
                            detail: format!(
                                "recovered state at index {} hashes to {state_hash:016x}, but the replica had \
                                 {before:016x} at that index before the crash",
                                applied.0
                            ),
                            session: None,
                        });
                    }
                }
            }
            Output::Stopped(fatal) => {
                self.history.push(self.now_us, Event::Stopped { reason: fatal.to_string() });
                self.replica.engine = None;
                self.replica.boot += 1;
                self.replica.scheduled_tick = None;
                self.replica.consecutive_stops += 1;
                if self.replica.consecutive_stops >= 5 {
                    self.violations.push(Violation {
                        property: "recovery",
                        at_us: self.now_us,
                        detail: format!("the replica stopped 5 times in a row; last: {fatal}"),
                        session: None,
                    });
                } else {
                    // A supervisor restarts a stopped replica, as systemd would.
                    self.schedule_restart();
                }
            }
            Output::QueryReply { .. } => {}
        }
    }

    fn schedule_restart(&mut self) {
        if !self.replica.restart_pending {
            self.replica.restart_pending = true;
            let t = self.after_ms(self.sc.faults.restart_after_ms);
            self.at(t, Ev::Restart);
        }
    }

    fn restart(&mut self) {
        self.replica.restart_pending = false;
        if self.replica.engine.is_some() {
            return;
        }
        self.replica.boot += 1;
        let boot = self.replica.boot;
        let seed = sub_rng(self.seed, STREAM_ENGINE + boot as u64).gen();
        self.replica.engine = Some(Engine::new(self.cfg.clone(), seed));
        self.history.push(self.now_us, Event::Restart { boot });
        self.feed(Input::Boot);
    }

    fn crash(&mut self) {
        if self.liveness {
            return;
        }
        if self.replica.engine.take().is_some() {
            self.stats.crashes += 1;
            let share = self.sc.faults.process_crash_share;
            let summary = if share > 0.0 && self.rng.gen_bool(share.min(1.0)) {
                "process only; the page cache survives".to_string()
            } else {
                format!("power loss: {}", self.replica.disk.crash(&mut self.disk_rng))
            };
            self.replica.boot += 1;
            self.replica.scheduled_tick = None;
            self.history.push(self.now_us, Event::Crash { disk: summary });
            self.schedule_restart();
        }
        if let Some(r) = self.sc.faults.crash_every_ms {
            let t = self.after_ms(r);
            self.at(t, Ev::Crash);
        }
    }

    fn disk_full(&mut self, on: bool) {
        if self.liveness {
            return;
        }
        if on {
            self.stats.disk_full_periods += 1;
            let used = self.replica.disk.used_bytes();
            self.replica.disk.set_capacity(Some(used + 4096));
            self.history.push(self.now_us, Event::Fault { what: "disk full".into() });
            let t = self.after_ms(self.sc.faults.disk_full_for_ms);
            self.at(t, Ev::DiskFull { on: false });
        } else {
            self.replica.disk.set_capacity(None);
            self.history.push(self.now_us, Event::Fault { what: "disk space freed".into() });
            if let Some(r) = self.sc.faults.disk_full_every_ms {
                let t = self.after_ms(r);
                self.at(t, Ev::DiskFull { on: true });
            }
        }
    }

    fn clock_step(&mut self) {
        if self.liveness {
            return;
        }
        let (a, b) = self.sc.faults.clock.step_ms;
        let step = self.rng.gen_range(a..=b);
        self.replica.clock.steps_ms += step;
        self.stats.clock_steps += 1;
        self.history.push(self.now_us, Event::Fault { what: format!("wall clock stepped {step:+} ms") });
        if let Some(r) = self.sc.faults.clock.step_every_ms {
            let t = self.after_ms(r);
            self.at(t, Ev::ClockStep);
        }
    }

    fn storm(&mut self) {
        let s = self.sc.workload.storm.clone().expect("storm configured");
        self.history.push(self.now_us, Event::Fault { what: format!("storm of {} sessions", s.sessions) });
        for _ in 0..s.sessions {
            let idx = self.agents.len();
            let rng = sub_rng(self.seed, STREAM_AGENTS + idx as u64);
            let mut a = Agent::storm(idx as u32, Kind(s.kind), s.timeout_s, rng);
            let ctx = self.ctx_owned();
            let actions = a.start(self.now_us, &ctx.as_ctx());
            self.agents.push(a);
            self.apply_actions(idx, actions);
        }
    }

    /// The liveness phase: every fault healed, the replica up, no new sessions.
    fn heal(&mut self) {
        self.liveness = true;
        self.history.push(self.now_us, Event::Phase { name: "liveness" });
        let f = self.replica.disk.faults_mut();
        f.read_bitflip_prob = 0.0;
        f.read_error_prob = 0.0;
        f.latency_spike_prob = 0.0;
        self.replica.disk.set_capacity(None);
        if self.replica.engine.is_none() {
            self.schedule_restart();
        }
    }
}

/// An owned copy of the context, so agents can be borrowed mutably while it is in use.
struct OwnedCtx {
    workload: crate::scenario::Workload,
    kinds: Vec<(Kind, KindConfig, HandlerSetup)>,
    liveness: bool,
}

impl OwnedCtx {
    fn as_ctx(&self) -> Ctx<'_> {
        Ctx { workload: &self.workload, kinds: &self.kinds, liveness: self.liveness }
    }
}
