//! The discrete-event world: the replicas (engine + simulated disk + clocks each), the network
//! between them, the clients and handlers, virtual time, and the fault schedule. It only carries
//! out what the engines ask for and records ground truth; every decision is an engine's.
//!
//! Clients reach the cluster the way the client library does: they send to the replica they
//! believe leads, and a "not the leader" answer makes the world resend the same request (same
//! client id and sequence) to the hinted leader, or to the next replica, without the agent
//! seeing it. Readers' questions (`get`) are carried and redirected the same way. Consensus
//! properties are checked as the run goes: at most one leader per term, equal state hashes at
//! equal applied indexes on every replica, and the same term for every applied index; log
//! matching is checked across replicas at every crash and at the end.

mod members;
mod streams;

use crate::clock::SimClock;
use crate::disk::{RotFile, SimDisk};
use crate::history::{Event, History};
use crate::network::SimNetwork;
use crate::reader::{Question, Reader, Sightings};
use crate::scenario::{HandlerSetup, Scenario};
use crate::workload::{Action, Agent, Ctx};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use truba_engine::{
    ClientId, Engine, EngineConfig, Handle, Index, Input, IoId, IoOp, Kind, KindConfig, Message, Mutations, Outcome,
    Output, Query, QueryReply, RedriveTarget, ReplicaId, Request, RequestError, RoleName, Seq, SessionId, SessionState,
    SessionView, StreamId,
};

#[derive(Debug)]
enum Ev {
    Wake { agent: usize, token: u64 },
    Request { to: usize, client: ClientId, seq: Seq, request: Request },
    Reply { client: ClientId, seq: Seq, outcome: Outcome },
    Io { r: usize, boot: u32, id: IoId, op: IoOp },
    Tick { r: usize, boot: u32 },
    Deliver { kind: Kind, handle: Handle },
    DeliveryFailed { handle: Handle, reason: truba_engine::FailureReason },
    Message { from: usize, to: usize, message: Message },
    Crash,
    Restart { r: usize },
    DiskFull { on: bool },
    ClockStep,
    Partition { start: bool },
    Clog,
    Storm,
    CrashStorm,
    Operator,
    ReadWake { reader: usize },
    Query { to: usize, id: u64, session: SessionId },
    QueryReply { id: u64, reply: QueryReply },
    ReadTimeout { reader: usize, read: u64 },
    StreamOpen { stream: u64, open: truba_engine::StreamOpen },
    StreamAck { stream: u64, seq: u64, error: Option<String> },
    StreamClose { stream: u64 },
    StreamItem { stream: u64, seq: u64, item: truba_engine::StreamItem },
    StreamBroken { stream: u64 },
    StreamerWake { streamer: usize, token: u64 },
    StreamerCrash,
    StreamerQuery { to: usize, id: u64, query: Query },
    StreamerQueryReply { id: u64, reply: QueryReply },
    Membership,
    Liveness,
    End,
}

/// Redirects of one request before the world stops chasing the leader for it (the agent's
/// own retry and give-up timers carry on regardless).
const REDIRECTS_MAX: u32 = 64;

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
    pub elections: u64,
    pub messages: u64,
    pub partitions: u64,
    pub rots: u64,
    /// Stored-session source files made durable under their final name (spills and merges),
    /// those of them written by a merge, and those that came with a snapshot install.
    pub sources_written: u64,
    pub sources_merged: u64,
    pub sources_installed: u64,
    /// Crashes that cut off a merge's file half written.
    pub crashes_mid_merge: u64,
    /// The membership operator's requests: changes committed, leadership transfers started, and
    /// changes the leader refused by the rules (one in flight, own-term commit, learner behind).
    pub member_changes: u64,
    pub transfers: u64,
    pub member_refusals: u64,
    merging: BTreeSet<(usize, String)>,
}

impl RunStats {
    /// Counts what a disk operation did to source files. A merge writes its file in pieces (a
    /// write at a nonzero offset); a spill writes it at once; an install writes `.install.tmp`.
    fn count_source_io(&mut self, r: usize, op: &IoOp) {
        match op {
            IoOp::Write { file, offset, .. } if file.starts_with("src-") && *offset > 0 => {
                self.merging.insert((r, file.clone()));
            }
            IoOp::Rename { from, to } if to.starts_with("src-") => {
                self.sources_written += 1;
                self.sources_merged += self.merging.remove(&(r, from.clone())) as u64;
                self.sources_installed += from.ends_with(".install.tmp") as u64;
            }
            _ => {}
        }
    }

    fn count_crash(&mut self, r: usize) {
        let before = self.merging.len();
        self.merging.retain(|(x, _)| *x != r);
        self.crashes_mid_merge += (self.merging.len() < before) as u64;
    }
}

/// What a run leaves for the checkers.
pub struct RunOutput {
    /// Every ledger entry some replica applied, by index (all replicas agreed on each, or a
    /// `ledger-agrees` violation says where not).
    pub ledger: BTreeMap<u64, bytes::Bytes>,
    /// The index the final leader (whose sessions are `final_sessions`) had applied.
    pub final_applied: Option<u64>,
    pub history: History,
    pub violations: Vec<Violation>,
    pub stats: RunStats,
    /// The leader's sessions at the end, or `None` if no replica was leading.
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
    net_rng: ChaCha8Rng,
    replicas: Vec<Replica>,
    network: SimNetwork,
    agents: Vec<Agent>,
    by_client: BTreeMap<ClientId, usize>,
    /// Where each client sends next (the leader it last heard of).
    leader_guess: BTreeMap<ClientId, usize>,
    redirects: BTreeMap<(ClientId, Seq), u32>,
    /// Which replica pushed each delivery, to report a handler failure back to it.
    delivered_by: BTreeMap<Handle, usize>,
    /// The leader of each term, as replicas announced it.
    leaders: BTreeMap<u64, usize>,
    /// The member whose every hard state copy rotted, if one did (at most one per run).
    votes_lost_by: Option<usize>,
    /// The term of every applied index, as the first replica to apply it had it.
    applied_terms: BTreeMap<u64, u64>,
    /// Every replica's applied index after its last step (to see what it applied since).
    applied_seen: Vec<u64>,
    /// The largest commit index any replica had when the faults were healed.
    liveness_commit: u64,
    pools: BTreeMap<Kind, (Vec<usize>, VecDeque<Handle>)>,
    kinds: Vec<(Kind, KindConfig, HandlerSetup)>,
    /// The operator agent, if the workload has one.
    operator: Option<usize>,
    readers: Vec<Reader>,
    /// Every draw for the readers (what to ask, when, and their network delays) comes from this
    /// stream of its own, so that a scenario without readers makes exactly the draws it did
    /// before readers existed.
    read_rng: ChaCha8Rng,
    sightings: Sightings,
    /// Which reader each query sent and not yet answered belongs to.
    query_owner: BTreeMap<u64, usize>,
    next_query: u64,
    /// Readers of the ledger (see `streamers.rs` and `streams.rs`), their streams' connections
    /// by stream number, and their requests and queries under way.
    streamers: Vec<crate::streamers::Streamer>,
    links: BTreeMap<u64, streams::Link>,
    next_stream: u64,
    streamer_clients: BTreeMap<ClientId, usize>,
    streamer_pending: BTreeMap<(ClientId, Seq), Request>,
    streamer_queries: BTreeMap<u64, (usize, u64)>,
    /// Every draw for the streamers comes from here, so scenarios without them draw as before.
    stream_rng: ChaCha8Rng,
    /// Sessions of the consumed kind clients were told they created (pipeline readers ask
    /// about them).
    consumed_created: Vec<u64>,
    /// Ground truth of the ledger: every replica's entry at each index, once they agree, and
    /// per replica the last index looked at.
    ledger: BTreeMap<u64, bytes::Bytes>,
    ledger_seen: Vec<u64>,
    /// Per kind, the stretches of true time (µs) in which its handler cannot be reached.
    outages: BTreeMap<Kind, Vec<(u64, u64)>>,
    history: History,
    hashes: BTreeMap<u64, u64>,
    /// Every wall-clock reading handed to the replica, to check the readings it reports.
    wall_readings: BTreeSet<u64>,
    violations: Vec<Violation>,
    liveness: bool,
    stats: RunStats,
    /// The membership operator and checkers (see `members.rs`), its own random stream (so that
    /// scenarios without it draw as before) and its requests awaiting an answer.
    member_ops: members::MemberOps,
    member_rng: ChaCha8Rng,
    member_pending: BTreeMap<Seq, Request>,
    /// Print every disk operation to standard error (for debugging one seed).
    pub trace_io: bool,
    /// Print every message between replicas to standard error (for debugging one seed).
    pub trace_messages: bool,
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
const STREAM_NET: u64 = 5;
const STREAM_OUTAGES: u64 = 6;
const STREAM_READERS: u64 = 7;
/// The streamers' stream; each streamer's own generator is the one after it plus its number.
const STREAM_STREAMERS: u64 = 8;
const STREAM_MEMBERS: u64 = 9;
const STREAM_AGENTS: u64 = 1000;

impl World {
    pub fn new(scenario: &Scenario, seed: u64, mutations: Mutations) -> World {
        let sc = if scenario.swarm { scenario.swarmed(&mut sub_rng(seed, STREAM_SWARM)) } else { scenario.clone() };
        let kinds: Vec<_> = sc.kinds.iter().map(|(k, s)| (Kind(*k), s.config.clone(), s.handler.clone())).collect();
        let cfg = EngineConfig {
            kinds: kinds.iter().map(|(k, c, _)| (*k, c.clone())).collect(),
            limits: sc.limits.clone(),
            consensus: sc.consensus.clone(),
            mutations,
        };
        let mut rng = sub_rng(seed, STREAM_WORLD);
        let cf = sc.faults.clock.clone();
        let replicas: Vec<Replica> = (0..sc.replicas)
            .map(|_| Replica {
                engine: None,
                boot: 0,
                disk: SimDisk::new(sc.faults.disk.clone()),
                clock: SimClock {
                    offset_ms: rng.gen_range(cf.offset_ms.0..=cf.offset_ms.1),
                    drift_ppm: rng.gen_range(cf.drift_ppm.0..=cf.drift_ppm.1),
                    steps_ms: 0,
                },
                scheduled_tick: None,
                restart_pending: false,
                consecutive_stops: 0,
            })
            .collect();
        let n = replicas.len();
        let mut w = World {
            cfg,
            seed,
            now_us: 0,
            next_seq: 0,
            events: BTreeMap::new(),
            rng,
            disk_rng: sub_rng(seed, STREAM_DISK),
            net_rng: sub_rng(seed, STREAM_NET),
            network: SimNetwork::new(n, sc.faults.network.clone()),
            replicas,
            agents: Vec::new(),
            by_client: BTreeMap::new(),
            leader_guess: BTreeMap::new(),
            redirects: BTreeMap::new(),
            delivered_by: BTreeMap::new(),
            leaders: BTreeMap::new(),
            votes_lost_by: None,
            applied_terms: BTreeMap::new(),
            applied_seen: vec![0; n],
            liveness_commit: 0,
            pools: BTreeMap::new(),
            outages: BTreeMap::new(),
            operator: None,
            readers: (0..sc.workload.readers).map(Reader::new).collect(),
            read_rng: sub_rng(seed, STREAM_READERS),
            sightings: Sightings::default(),
            query_owner: BTreeMap::new(),
            next_query: 0,
            streamers: Vec::new(),
            links: BTreeMap::new(),
            next_stream: 0,
            streamer_clients: BTreeMap::new(),
            streamer_pending: BTreeMap::new(),
            streamer_queries: BTreeMap::new(),
            stream_rng: sub_rng(seed, STREAM_STREAMERS),
            consumed_created: Vec::new(),
            ledger: BTreeMap::new(),
            ledger_seen: vec![0; n],
            kinds,
            history: History::default(),
            hashes: BTreeMap::new(),
            wall_readings: BTreeSet::new(),
            violations: Vec::new(),
            liveness: false,
            stats: RunStats::default(),
            member_ops: members::MemberOps::new(n),
            member_rng: sub_rng(seed, STREAM_MEMBERS),
            member_pending: BTreeMap::new(),
            trace_io: std::env::var_os("TRUBA_SIM_TRACE_IO").is_some(),
            trace_messages: std::env::var_os("TRUBA_SIM_TRACE_MESSAGES").is_some(),
            sc,
        };
        w.populate();
        w.populate_streamers();
        w.outages = w.draw_outages();
        w
    }

    /// The handlers' outages: the fixed ones, and for a flapping handler alternating up and down
    /// stretches drawn until the liveness phase.
    fn draw_outages(&self) -> BTreeMap<Kind, Vec<(u64, u64)>> {
        let mut rng = sub_rng(self.seed, STREAM_OUTAGES);
        let end_us = self.sc.duration_s * 1_000_000;
        let mut out = BTreeMap::new();
        for (kind, _, hs) in &self.kinds {
            let mut o: Vec<(u64, u64)> = hs.down_s.iter().map(|(a, b)| (a * 1_000_000, b * 1_000_000)).collect();
            if let Some((up, down)) = hs.flap_ms {
                let mut t = 0;
                while t < end_us {
                    t += rng.gen_range(up.0..=up.1.max(up.0)) * 1000;
                    let d = rng.gen_range(down.0..=down.1.max(down.0)) * 1000;
                    o.push((t, t + d));
                    t += d;
                }
            }
            out.insert(*kind, o);
        }
        out
    }

    fn populate(&mut self) {
        for i in 0..self.sc.workload.clients {
            let a = Agent::client(i, sub_rng(self.seed, STREAM_AGENTS + self.agents.len() as u64));
            self.agents.push(a);
        }
        if self.sc.workload.operator_every_ms.is_some() {
            // Far above any client or storm agent (their ids are 1 + index * 10^6 + incarnation)
            // and below the handlers' (10^12 and up), so its client ids are its own.
            let index = 900_000;
            let a = Agent::operator(index, sub_rng(self.seed, STREAM_AGENTS + self.agents.len() as u64));
            self.operator = Some(self.agents.len());
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
        self.simulate();
        self.finish()
    }

    /// Runs the scenario's events to its end.
    pub fn simulate(&mut self) {
        let safety_end = self.sc.duration_s * 1_000_000;
        let end = safety_end + self.sc.liveness_s * 1_000_000;
        for r in 0..self.replicas.len() {
            self.at(0, Ev::Restart { r });
        }
        for i in 0..self.agents.len() {
            let ctx = self.ctx_owned();
            let actions = self.agents[i].start(0, &ctx.as_ctx());
            self.apply_actions(i, actions);
        }
        for i in 0..self.readers.len() {
            self.next_read(i);
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
        if let Some(gap) = self.network.draw_partition_gap_us(&mut self.net_rng) {
            self.at(gap, Ev::Partition { start: true });
        }
        if let Some(gap) = self.network.draw_clog_gap_us(&mut self.net_rng) {
            self.at(gap, Ev::Clog);
        }
        if let Some(s) = &self.sc.workload.storm {
            self.at(s.at_s * 1_000_000, Ev::Storm);
        }
        if let Some(s) = &self.sc.workload.crash_storm {
            self.at(s.at_s * 1_000_000, Ev::CrashStorm);
        }
        if let Some(range) = self.sc.workload.operator_every_ms {
            let t = self.after_ms(range);
            self.at(t, Ev::Operator);
        }
        self.start_streamers();
        self.start_membership();
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
    }

    /// The leader's spilled sessions with their records, read from its source files (or from
    /// memory where it still holds them), so the final checks see every session whole.
    fn spilled_with_records(&mut self, r: usize) -> Vec<SessionView> {
        let rep = &self.replicas[r];
        let state = rep.engine.as_ref().expect("a leader is running").state();
        let mut files: BTreeMap<truba_engine::SourceId, BTreeMap<SessionId, Vec<Vec<u8>>>> = BTreeMap::new();
        let (mut out, mut unreadable) = (Vec::new(), Vec::new());
        for mut v in state.spilled_views() {
            let (source, _) = v.source.expect("a spilled view names its source");
            if let Some(held) = state.held_records(v.id) {
                v.records = held.records;
            } else {
                let in_file = files.entry(source).or_insert_with(|| {
                    let name = truba_engine::source_name(source);
                    let data = rep.disk.current_file(&name).unwrap_or_default();
                    match truba_engine::decode_source_file(data) {
                        Ok(sessions) => sessions.into_iter().collect(),
                        Err(e) => {
                            unreadable.push(format!("source file {name} of the leader is unreadable: {e}"));
                            BTreeMap::new()
                        }
                    }
                });
                v.records = in_file.get(&v.id).cloned().unwrap_or_default();
            }
            out.push(v);
        }
        for detail in unreadable {
            self.violate("acknowledged-survives", detail);
        }
        out
    }

    /// The end-of-run checks, and what the checkers need.
    pub fn finish(mut self) -> RunOutput {
        self.stats.virtual_us = self.now_us;
        self.check_log_matching();
        self.check_convergence();
        let leader = self.final_leader();
        let final_sessions = leader.map(|r| {
            let e = self.replicas[r].engine.as_ref().expect("a leader is running");
            e.state().full_invariants();
            let mut views: Vec<SessionView> = e.state().session_views().collect();
            views.extend(self.spilled_with_records(r));
            views
        });
        let clock_of = leader.unwrap_or(0);
        let final_applied = leader.and_then(|r| self.replicas[r].engine.as_ref()).map(|e| e.state().applied().0);
        RunOutput {
            final_applied,
            ledger: std::mem::take(&mut self.ledger),
            history: self.history,
            violations: self.violations,
            stats: self.stats,
            final_sessions,
            final_wall_ms: self.replicas[clock_of].clock.now(self.now_us).wall.0,
            end_us: self.now_us,
            scenario: self.sc,
        }
    }

    /// What is left of a run an engine assertion ended: the history up to that point.
    pub fn aborted(mut self) -> RunOutput {
        self.stats.virtual_us = self.now_us;
        RunOutput {
            final_applied: None,
            ledger: std::mem::take(&mut self.ledger),
            history: self.history,
            violations: self.violations,
            stats: self.stats,
            final_sessions: None,
            final_wall_ms: 0,
            end_us: self.now_us,
            scenario: self.sc,
        }
    }

    /// The serving leader of the highest term, if any.
    fn final_leader(&self) -> Option<usize> {
        (0..self.replicas.len())
            .filter_map(|r| {
                let e = self.replicas[r].engine.as_ref()?;
                (e.is_serving() && e.is_leader()).then_some((e.term(), r))
            })
            .max()
            .map(|(_, r)| r)
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
            Ev::Request { to, client, seq, request } => self.feed(to, Input::Request { client, seq, request }),
            Ev::Reply { client, seq, outcome } => self.on_reply(client, seq, outcome),
            Ev::Io { r, boot, id, op } => self.on_io(r, boot, id, op),
            Ev::Tick { r, boot } => {
                let rep = &mut self.replicas[r];
                if boot == rep.boot && rep.scheduled_tick == Some(self.now_us) {
                    rep.scheduled_tick = None;
                    self.feed(r, Input::Tick);
                }
            }
            Ev::Deliver { kind, handle } if self.handler_down(kind) => {
                let reason = truba_engine::FailureReason::Unreachable("connection refused".into());
                self.history.push(self.now_us, Event::DeliveryFailed { handle, reason: reason.clone() });
                let t = self.net_delay();
                self.at(t, Ev::DeliveryFailed { handle, reason });
            }
            Ev::Deliver { kind, handle } => {
                if let Some(pool) = self.pools.get_mut(&kind) {
                    pool.1.push_back(handle);
                }
                self.dispatch(kind);
            }
            Ev::DeliveryFailed { handle, reason } => {
                let r = self.delivered_by.get(&handle).copied().unwrap_or(0);
                self.feed(r, Input::DeliveryFailed { handle, reason });
            }
            Ev::Message { from, to, message } => {
                let from = ReplicaId(from as u32);
                self.feed(to, Input::Message { from, message });
            }
            Ev::Crash => self.crash(),
            Ev::Restart { r } => self.restart(r),
            Ev::DiskFull { on } => self.disk_full(on),
            Ev::ClockStep => self.clock_step(),
            Ev::Partition { start } => self.partition(start),
            Ev::Clog => self.clog(),
            Ev::Storm => self.storm(),
            Ev::CrashStorm => self.crash_storm(),
            Ev::Operator => self.operator(),
            Ev::ReadWake { reader } => self.read_wake(reader),
            Ev::Query { to, id, session } => self.feed(to, Input::Query { id, query: Query::Session(session) }),
            Ev::QueryReply { id, reply } => self.on_query_reply(id, reply),
            Ev::ReadTimeout { reader, read } => self.read_timeout(reader, read),
            Ev::StreamOpen { stream, open } => {
                self.stream_input(stream, Input::StreamOpen { stream: StreamId(stream), open })
            }
            Ev::StreamAck { stream, seq, error } => {
                self.stream_input(stream, Input::StreamAck { stream: StreamId(stream), seq, error })
            }
            Ev::StreamClose { stream } => {
                self.stream_input(stream, Input::StreamClose { stream: StreamId(stream) });
                self.links.remove(&stream);
            }
            Ev::StreamItem { stream, seq, item } => self.stream_item(stream, seq, item),
            Ev::StreamBroken { stream } => self.stream_broken(stream),
            Ev::StreamerWake { streamer, token } => self.streamer_wake(streamer, token),
            Ev::StreamerCrash => self.streamer_crash(),
            Ev::StreamerQuery { to, id, query } => self.feed(to, Input::Query { id, query }),
            Ev::StreamerQueryReply { id, reply } => self.streamer_query_reply(id, reply),
            Ev::Membership => self.membership_event(),
            Ev::Liveness => self.heal(),
            Ev::End => unreachable!("handled by the loop"),
        }
    }

    fn on_io(&mut self, r: usize, boot: u32, id: IoId, op: IoOp) {
        let rep = &mut self.replicas[r];
        if boot != rep.boot || rep.engine.is_none() {
            return; // the process that asked for it is gone
        }
        let result = rep.disk.execute(&op, &mut self.disk_rng);
        if result.is_ok() {
            self.stats.count_source_io(r, &op);
        }
        if self.trace_io {
            let what = match &op {
                IoOp::Write { file, offset, data } if data.len() < 100 => {
                    format!("write {file} @{offset} +{} {data:?}", data.len())
                }
                IoOp::Write { file, offset, data } => format!("write {file} @{offset} +{}", data.len()),
                IoOp::Read { file } => format!("read {file}"),
                IoOp::ReadAt { file, offset, len } => format!("read {file} @{offset}+{len}"),
                other => format!("{other:?}"),
            };
            let res = match &result {
                Ok(truba_engine::IoReply::Data(d)) if d.len() < 100 => format!("{} bytes {d:?}", d.len()),
                Ok(truba_engine::IoReply::Data(d)) => format!("{} bytes", d.len()),
                other => format!("{other:?}"),
            };
            eprintln!("{:>10.6} r{r} boot {boot} io {} {what} -> {res}", self.now_us as f64 / 1e6, id.0);
        }
        self.feed(r, Input::IoDone { id, result });
    }

    /// A reply reaches the client library: "not the leader" is followed, not shown to the agent.
    fn on_reply(&mut self, client: ClientId, seq: Seq, outcome: Outcome) {
        if client == members::MEMBER_CLIENT {
            self.member_reply(seq, outcome);
            return;
        }
        if self.streamer_clients.contains_key(&client) {
            self.streamer_reply(client, seq, outcome);
            return;
        }
        let Some(&i) = self.by_client.get(&client) else { return };
        if let Err(RequestError::NotLeader { leader } | RequestError::LeaderLost { leader }) = &outcome {
            let n = self.replicas.len();
            let current = self.leader_guess.get(&client).copied().unwrap_or(0);
            let next = leader.map_or((current + 1) % n, |l| l.0 as usize % n);
            self.leader_guess.insert(client, next);
            // The agent's pending request is re-sent when the agent retries; chasing it here
            // is what the client library does at once.
            let chased = self.redirects.entry((client, seq)).or_default();
            *chased += 1;
            if *chased <= REDIRECTS_MAX {
                if let Some(request) = self.agents[i].pending_request(client, seq) {
                    let delay = if leader.is_some() { 0 } else { 20_000 };
                    let t = self.net_delay() + delay;
                    self.at(t, Ev::Request { to: next, client, seq, request });
                }
            }
            return;
        }
        self.redirects.remove(&(client, seq));
        if let Ok(truba_engine::Reply::Created { handle }) = &outcome {
            self.sightings.created(handle.session);
            let request = self.agents[i].pending_request(client, seq);
            self.note_created(request.as_ref(), handle.session.0);
        }
        let ctx = self.ctx_owned();
        let actions = self.agents[i].on_reply(self.now_us, client, seq, outcome, &ctx.as_ctx());
        self.apply_actions(i, actions);
    }

    fn apply_actions(&mut self, agent: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { client, seq, request } => {
                    if let Some(handle) = request.handle() {
                        self.sightings.touched(handle.session);
                    }
                    self.by_client.insert(client, agent);
                    let to = self.leader_guess.get(&client).copied().unwrap_or(0);
                    let t = self.net_delay();
                    self.at(t, Ev::Request { to, client, seq, request });
                }
                Action::Wake { at_us, token } => self.at(at_us, Ev::Wake { agent, token }),
                Action::Record(e) => self.history.push(self.now_us, e),
                Action::DeliveryFailed(handle, reason) => {
                    self.history.push(self.now_us, Event::DeliveryFailed { handle, reason: reason.clone() });
                    let t = self.net_delay();
                    self.at(t, Ev::DeliveryFailed { handle, reason });
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

    /// Feeds one input to replica `r` and carries out everything it outputs.
    fn feed(&mut self, r: usize, input: Input) {
        let now = self.replicas[r].clock.now(self.now_us);
        let Some(engine) = self.replicas[r].engine.as_mut() else { return };
        self.wall_readings.insert(now.wall.0);
        engine.handle(now, input);
        let mut outputs = Vec::new();
        while let Some(o) = engine.poll() {
            outputs.push(o);
        }
        let serving = engine.is_serving();
        let deadline = engine.next_deadline();
        // Outputs first: a `Recovered` output is compared with hashes from before this step.
        for o in outputs {
            self.carry_out(r, o);
        }
        if serving {
            self.check_applied(r);
            self.check_membership(r);
        }
        let rep = &mut self.replicas[r];
        if let (Some(d), Some(_)) = (deadline, &rep.engine) {
            let t = rep.clock.true_us_at(d).max(self.now_us);
            if rep.scheduled_tick.is_none_or(|s| t < s) {
                rep.scheduled_tick = Some(t);
                let boot = rep.boot;
                self.at(t, Ev::Tick { r, boot });
            }
        }
    }

    /// Replica agreement, as the run goes: every index a replica applied has the term the
    /// first replica to apply it saw, and equal applied indexes have equal state hashes.
    fn check_applied(&mut self, r: usize) {
        let Some(engine) = self.replicas[r].engine.as_ref() else { return };
        let applied = engine.state().applied().0;
        let hash = engine.state().state_hash();
        let from = self.applied_seen[r].max(engine.log_range().0 .0.saturating_sub(1));
        let mut found = Vec::new();
        for i in from + 1..=applied {
            let Some(term) = engine.log_term(Index(i)) else { continue };
            match self.applied_terms.get(&i) {
                Some(&t) if t != term.0 => found.push(format!(
                    "replica {r} applied index {i} from term {}, but index {i} was applied from term {t} elsewhere",
                    term.0
                )),
                Some(_) => {}
                None => {
                    self.applied_terms.insert(i, term.0);
                }
            }
        }
        self.applied_seen[r] = applied;
        for detail in found {
            self.violate("committed-entries-agree", detail);
        }
        self.check_ledger(r);
        match self.hashes.get(&applied) {
            Some(&h) if h != hash => {
                self.stats.hash_checks += 1;
                let detail = format!(
                    "replica {r} at applied index {applied} hashes to {hash:016x}, but {h:016x} was seen at that \
                     index before"
                );
                self.violate("state-hash", detail);
            }
            Some(_) => self.stats.hash_checks += 1,
            None => {
                self.hashes.insert(applied, hash);
            }
        }
    }

    fn violate(&mut self, property: &'static str, detail: String) {
        self.violations.push(Violation { property, at_us: self.now_us, detail, session: None });
    }

    fn carry_out(&mut self, r: usize, o: Output) {
        match o {
            Output::PeerMessageRefused { from, message, reason } => {
                // The simulated network loses, duplicates and reorders, but never forges: every
                // message comes from a replica's engine, which must never send one that fails
                // the checks.
                let detail = format!("replica {r} refused a {message} from replica {from}: {reason}");
                self.violate("member-messages-valid", detail);
            }
            Output::Io { id, op } => {
                let rep = &self.replicas[r];
                let t = self.now_us + rep.disk.latency_us(&op, &mut self.disk_rng);
                let boot = rep.boot;
                self.at(t, Ev::Io { r, boot, id, op });
            }
            Output::Reply { client, seq, outcome } => {
                if let Ok(_) | Err(RequestError::NotLeader { .. }) = &outcome {
                    self.leader_guess.insert(client, r);
                }
                if let Err(RequestError::NotLeader { leader: Some(l) }) = &outcome {
                    self.leader_guess.insert(client, l.0 as usize);
                }
                let t = self.net_delay();
                self.at(t, Ev::Reply { client, seq, outcome });
            }
            Output::Deliver { kind, handle, due, taken_at, take_index, records } => {
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
                self.sightings.touched(handle.session);
                self.delivered_by.insert(handle, r);
                let take_index = take_index.0;
                let event = Event::Deliver { kind, handle, due, records, taken_at_ms, take_index };
                self.history.push(self.now_us, event);
                let t = self.net_delay();
                self.at(t, Ev::Deliver { kind, handle });
            }
            Output::Send { to, message } => {
                self.stats.messages += 1;
                self.check_vote_sent(r, to.0 as usize, &message);
                if self.trace_messages {
                    let n = match &message {
                        Message::Append { entries, prev_index, .. } => {
                            format!("{} prev {} n {}", message.name(), prev_index.0, entries.len())
                        }
                        Message::AppendReply { ok, matched, hint, .. } => {
                            format!("{} {ok} m {} h {}", message.name(), matched.0, hint.0)
                        }
                        m => m.name().to_string(),
                    };
                    eprintln!("{:>10.6} r{r} -> r{} {n}", self.now_us as f64 / 1e6, to.0);
                }
                let to = to.0 as usize;
                for t in self.network.deliveries(r, to, self.now_us, &mut self.net_rng) {
                    self.at(t, Ev::Message { from: r, to, message: message.clone() });
                }
            }
            Output::Role { role, term, .. } => {
                if role != RoleName::Leader {
                    return;
                }
                self.stats.elections += 1;
                self.history.push(self.now_us, Event::Leader { replica: r as u32, term: term.0 });
                self.check_elected(r, term.0);
                self.on_new_leader(r);
                if let Some(&other) = self.leaders.get(&term.0) {
                    if other != r {
                        let detail = format!("replicas {other} and {r} both lead term {}", term.0);
                        self.violate("one-leader-per-term", detail);
                    }
                } else {
                    self.leaders.insert(term.0, r);
                }
            }
            Output::Recovered { applied, state_hash, torn_bytes, damage } => {
                self.replicas[r].consecutive_stops = 0;
                let replica = r as u32;
                for found in damage {
                    self.history.push(self.now_us, Event::Damage { replica, found: format!("{found:?}") });
                }
                let e = Event::Recovered { replica, applied: applied.0, state_hash, torn_bytes };
                self.history.push(self.now_us, e);
                self.applied_seen[r] = applied.0;
                if let Some(&before) = self.hashes.get(&applied.0) {
                    self.stats.hash_checks += 1;
                    if before != state_hash {
                        let detail = format!(
                            "replica {r} recovered state at index {} hashes to {state_hash:016x}, but {before:016x} \
                             was seen at that index before",
                            applied.0
                        );
                        self.violate("state-hash", detail);
                    }
                }
            }
            Output::Stopped(fatal) => {
                let replica = r as u32;
                self.history.push(self.now_us, Event::Stopped { replica, reason: fatal.to_string() });
                self.break_streams(r);
                self.ledger_seen[r] = 0;
                let rep = &mut self.replicas[r];
                rep.engine = None;
                rep.boot += 1;
                rep.scheduled_tick = None;
                rep.consecutive_stops += 1;
                if rep.consecutive_stops >= 5 {
                    self.violate("recovery", format!("replica {r} stopped 5 times in a row; last: {fatal}"));
                } else {
                    // A supervisor restarts a stopped replica, as systemd would.
                    self.schedule_restart(r);
                }
            }
            Output::QueryReply { id, reply } => {
                if self.query_owner.contains_key(&id) {
                    let t = self.reader_delay();
                    self.at(t, Ev::QueryReply { id, reply });
                } else if self.streamer_queries.contains_key(&id) {
                    let t = self.now_us + self.sc.workload.net_delay_us.1;
                    self.at(t, Ev::StreamerQueryReply { id, reply });
                }
            }
            Output::Stream { stream, seq, item } => self.on_stream_output(stream, seq, item),
            // The simulator gives every replica the same file unless a scenario sets
            // `local_config_drift`, where a difference is the point; either way it is no event.
            Output::ConfigDiffers { .. } => {}
        }
    }

    /// Replica `r`'s own file: the scenario's, or under `local_config_drift` one that differs
    /// from every other replica's in what applying depends on.
    fn replica_config(&self, r: usize) -> EngineConfig {
        let mut cfg = self.cfg.clone();
        if self.sc.local_config_drift {
            let n = r as u64;
            for kc in cfg.kinds.values_mut() {
                kc.lease_ms += 700 * n;
                kc.default_delay_s += n as u32;
                kc.max_attempts = kc.max_attempts.saturating_add(n as u32);
                kc.record_bytes_max = kc.record_bytes_max.saturating_sub(64 * n as u32).max(1);
            }
        }
        cfg
    }

    fn schedule_restart(&mut self, r: usize) {
        if !self.replicas[r].restart_pending {
            self.replicas[r].restart_pending = true;
            let t = self.after_ms(self.sc.faults.restart_after_ms);
            self.at(t, Ev::Restart { r });
        }
    }

    fn restart(&mut self, r: usize) {
        self.replicas[r].restart_pending = false;
        if self.replicas[r].engine.is_some() {
            return;
        }
        let rep = &mut self.replicas[r];
        rep.boot += 1;
        let boot = rep.boot;
        let stream = STREAM_ENGINE + boot as u64 + ((r as u64) << 32);
        let seed = sub_rng(self.seed, stream).gen();
        self.replicas[r].engine = Some(self.new_engine(r, seed));
        self.history.push(self.now_us, Event::Restart { replica: r as u32, boot });
        self.feed(r, Input::Boot);
    }

    fn crash(&mut self) {
        if self.liveness {
            return;
        }
        let r = self.rng.gen_range(0..self.replicas.len());
        self.check_log_matching();
        if self.replicas[r].engine.take().is_some() {
            self.stats.crashes += 1;
            self.stats.count_crash(r);
            let share = self.sc.faults.process_crash_share;
            let process_only = share > 0.0 && self.rng.gen_bool(share.min(1.0));
            let summary = if process_only {
                "process only; the page cache survives".to_string()
            } else {
                format!("power loss: {}", self.replicas[r].disk.crash(&mut self.disk_rng))
            };
            self.replicas[r].boot += 1;
            self.replicas[r].scheduled_tick = None;
            self.applied_seen[r] = 0;
            self.ledger_seen[r] = 0;
            self.break_streams(r);
            self.history.push(self.now_us, Event::Crash { replica: r as u32, disk: summary });
            // Rot is applied to the medium as a power loss leaves it (nothing pending).
            if !process_only {
                self.maybe_rot(r);
            }
            self.schedule_restart(r);
        }
        if let Some(range) = self.sc.faults.crash_every_ms {
            let t = self.after_ms(range);
            self.at(t, Ev::Crash);
        }
    }

    /// Rot at rest on a crashed member, only while every other member serves with an intact log,
    /// so that a good copy of every committed entry survives (the fault model's promise).
    fn maybe_rot(&mut self, r: usize) {
        let p = self.replicas[r].disk.faults().rot_on_crash_prob;
        if self.replicas.len() < 3 || p <= 0.0 || !self.rng.gen_bool(p.min(1.0)) {
            return;
        }
        let others_whole = self
            .replicas
            .iter()
            .enumerate()
            .all(|(i, rep)| i == r || rep.engine.as_ref().is_some_and(|e| e.is_serving() && !e.is_repairing()));
        if !others_whole {
            return;
        }
        // At most one member per run loses its votes: each one costs the cluster a vote for
        // good, and a three-member cluster with two such could never elect a leader again.
        // A copy of the hard state rots only while the other is whole: rot in both is the
        // loss of every copy, which `hardstate-all` stands for.
        let votes_lost = self.votes_lost_by;
        let hard_whole = self.replicas[r].disk.current_file("hardstate").map(truba_engine::hard_state_copies_whole);
        // And while another member lives with lost votes, nothing may make this one abstain too
        // (a repair): with two of three members out of elections, none could be held, and the
        // repair, which needs a leader, would never end. An operator replaces such a member.
        let other_lost = votes_lost.is_some_and(|x| x != r);
        let allowed = |kind: RotFile| match kind {
            RotFile::Hardstate => hard_whole == Some(2),
            RotFile::HardstateAll => !other_lost,
            RotFile::Log | RotFile::Snapshot => !other_lost,
        };
        if let Some((kind, what)) = self.replicas[r].disk.rot(&mut self.disk_rng, allowed) {
            if kind == RotFile::HardstateAll {
                self.votes_lost_by = Some(r);
            }
            self.stats.rots += 1;
            self.history.push(self.now_us, Event::Fault { what: format!("replica {r}: {what}") });
        }
    }

    /// Log matching: if two replicas hold an entry with the same index and term, they hold the
    /// same entries before it. Checked over the entries both hold in memory.
    fn check_log_matching(&mut self) {
        let engines: Vec<(usize, &Engine)> =
            self.replicas.iter().enumerate().filter_map(|(i, r)| Some((i, r.engine.as_ref()?))).collect();
        let mut found = Vec::new();
        for (x, a) in &engines {
            for (y, b) in &engines {
                if x >= y || !a.is_serving() || !b.is_serving() {
                    continue;
                }
                let lo = a.log_range().0.max(b.log_range().0);
                let hi = a.log_range().1.min(b.log_range().1);
                // The highest index where both hold the same term ...
                let mut i = hi;
                while i >= lo && i.0 > 0 && a.log_term(i) != b.log_term(i) {
                    i = i.prev();
                }
                // ... and everything before it must agree.
                while i >= lo && i.0 > 0 {
                    let (ta, tb) = (a.log_term(i), b.log_term(i));
                    if ta != tb {
                        found.push(format!(
                            "replicas {x} and {y} agree on a later entry but hold index {} from terms {ta:?} and {tb:?}",
                            i.0
                        ));
                        break;
                    }
                    i = i.prev();
                }
            }
        }
        for detail in found {
            self.violate("log-matching", detail);
        }
    }

    /// After the liveness phase every replica serves and has applied everything that was
    /// committed when the faults were healed.
    fn check_convergence(&mut self) {
        let mut found = Vec::new();
        for (r, rep) in self.replicas.iter().enumerate() {
            if !self.is_final_member(r) {
                continue;
            }
            match rep.engine.as_ref().filter(|e| e.is_serving()) {
                None => found.push(format!("replica {r} was not serving at the end of the liveness phase")),
                Some(e) if e.state().applied().0 < self.liveness_commit => found.push(format!(
                    "replica {r} applied only through {} at the end; {} was committed when faults healed",
                    e.state().applied().0,
                    self.liveness_commit
                )),
                Some(_) => {}
            }
        }
        if self.replicas.len() > 1 && self.final_leader().is_none() {
            found.push("no replica was leading at the end of the liveness phase".into());
        }
        for detail in found {
            self.violate("convergence", detail);
        }
    }

    fn disk_full(&mut self, on: bool) {
        if self.liveness {
            return;
        }
        // Disk-full periods hit replica 0: a full disk on a minority must not stop the cluster.
        let disk = &mut self.replicas[0].disk;
        if on {
            self.stats.disk_full_periods += 1;
            let used = disk.used_bytes();
            disk.set_capacity(Some(used + 4096));
            self.history.push(self.now_us, Event::Fault { what: "disk full".into() });
            let t = self.after_ms(self.sc.faults.disk_full_for_ms);
            self.at(t, Ev::DiskFull { on: false });
        } else {
            disk.set_capacity(None);
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
        let mut r = self.rng.gen_range(0..self.replicas.len());
        if self.sc.faults.clock.step_leader {
            let leading = |rep: &Replica| rep.engine.as_ref().is_some_and(|e| e.is_leader());
            r = self.replicas.iter().position(leading).unwrap_or(r);
        }
        self.replicas[r].clock.steps_ms += step;
        self.stats.clock_steps += 1;
        let what = if self.replicas.len() == 1 {
            format!("wall clock stepped {step:+} ms")
        } else {
            let leader = self.replicas[r].engine.as_ref().is_some_and(|e| e.is_leader());
            format!("replica {r}{} wall clock stepped {step:+} ms", if leader { " (leader)" } else { "" })
        };
        self.history.push(self.now_us, Event::Fault { what });
        if let Some(range) = self.sc.faults.clock.step_every_ms {
            let t = self.after_ms(range);
            self.at(t, Ev::ClockStep);
        }
    }

    fn partition(&mut self, start: bool) {
        if self.liveness {
            return;
        }
        if start {
            if let Some(what) = self.network.partition_random(self.now_us, &mut self.net_rng) {
                self.stats.partitions += 1;
                self.history.push(self.now_us, Event::Fault { what });
            }
            let t = self.now_us + self.network.draw_partition_length_us(&mut self.net_rng);
            self.at(t, Ev::Partition { start: false });
        } else {
            self.network.set_partition(None);
            self.history.push(self.now_us, Event::Fault { what: "partition healed".into() });
            if let Some(gap) = self.network.draw_partition_gap_us(&mut self.net_rng) {
                self.at(self.now_us + gap, Ev::Partition { start: true });
            }
        }
    }

    fn clog(&mut self) {
        if self.liveness {
            return;
        }
        if let Some(what) = self.network.clog_random(self.now_us, &mut self.net_rng) {
            self.history.push(self.now_us, Event::Fault { what });
        }
        if let Some(gap) = self.network.draw_clog_gap_us(&mut self.net_rng) {
            self.at(self.now_us + gap, Ev::Clog);
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

    /// A share of the clients holding a session crash together, within one second.
    fn crash_storm(&mut self) {
        let s = self.sc.workload.crash_storm.clone().expect("crash storm configured");
        self.history.push(self.now_us, Event::Fault { what: format!("{:.0}% of clients crash", s.share * 100.0) });
        for i in 0..self.agents.len() {
            if !self.rng.gen_bool(s.share) {
                continue;
            }
            let at = self.now_us + self.rng.gen_range(0..1_000_000);
            let ctx = self.ctx_owned();
            let actions = self.agents[i].crash_if_holding(at, &ctx.as_ctx());
            self.apply_actions(i, actions);
        }
    }

    /// The operator looks at the leader's dead-letter sets (as `truba dead list` would) and
    /// redrives or drops one session, through the client path like any request.
    fn operator(&mut self) {
        let Some(agent) = self.operator else { return };
        let leader = self.replicas.iter().filter_map(|r| r.engine.as_ref()).find(|e| e.is_leader());
        let dead: Vec<SessionId> = leader.map_or_else(Vec::new, |e| {
            e.state().session_views().filter(|v| matches!(v.state, SessionState::Dead { .. })).map(|v| v.id).collect()
        });
        if !dead.is_empty() && !self.liveness {
            let session = dead[self.rng.gen_range(0..dead.len())];
            let request = if self.rng.gen_bool(self.sc.workload.operator_drop_share) {
                Request::DropDead { session }
            } else {
                Request::Redrive { target: RedriveTarget::Session(session) }
            };
            let ctx = self.ctx_owned();
            let actions = self.agents[agent].operate(self.now_us, request, &ctx.as_ctx());
            self.apply_actions(agent, actions);
        }
        if let Some(range) = self.sc.workload.operator_every_ms {
            let t = self.after_ms(range);
            self.at(t, Ev::Operator);
        }
    }

    /// A reader asks its next question, of the replica it believes leads, unless the liveness
    /// phase has begun (and the scenario keeps readers to the safety phase).
    fn read_wake(&mut self, i: usize) {
        if self.liveness && !self.sc.workload.reads_in_liveness {
            return;
        }
        let session = self.sightings.pick(&mut self.read_rng);
        let query = self.new_query(i);
        let q = self.readers[i].ask(session, query);
        let reader = self.readers[i].index;
        self.history.push(self.now_us, Event::ReadInvoke { reader, read: q.read, session: session.0 });
        let to = self.learner_to_read_from().unwrap_or(self.readers[i].guess);
        self.send_query(to, query, session, 0);
        let t = self.now_us + self.sc.workload.read_give_up_ms * 1000;
        self.at(t, Ev::ReadTimeout { reader: i, read: q.read });
    }

    /// A new engine query id for one send of a reader's question.
    fn new_query(&mut self, reader: usize) -> u64 {
        self.next_query += 1;
        self.query_owner.insert(self.next_query, reader);
        self.next_query
    }

    fn send_query(&mut self, to: usize, id: u64, session: SessionId, pause_us: u64) {
        let t = self.reader_delay() + pause_us;
        self.at(t, Ev::Query { to, id, session });
    }

    /// The client network's delay for a reader's message, drawn from the readers' stream.
    fn reader_delay(&mut self) -> u64 {
        let (a, b) = self.sc.workload.net_delay_us;
        self.now_us + self.read_rng.gen_range(a..=b.max(a))
    }

    fn next_read(&mut self, i: usize) {
        let (a, b) = self.sc.workload.read_every_ms;
        let t = self.now_us + self.read_rng.gen_range(a..=b.max(a)) * 1000;
        self.at(t, Ev::ReadWake { reader: i });
    }

    /// An answer reaches a reader. "Not the leader", or a replica that cannot answer now, is
    /// followed to the hinted leader or the next replica as the client library does, without
    /// the reader seeing it; anything else is the answer.
    fn on_query_reply(&mut self, id: u64, reply: QueryReply) {
        let Some(i) = self.query_owner.remove(&id) else { return };
        let QueryReply::Session(answer) = reply else { return };
        let Some(q) = self.readers[i].asked(id) else { return };
        if let Err(e) = &answer {
            if e.is_retryable() || matches!(e, RequestError::Stopped(_)) {
                self.redirect_question(i, q, e);
                return;
            }
        }
        self.readers[i].asking = None;
        let (reader, session) = (self.readers[i].index, q.session.0);
        self.history.push(self.now_us, Event::ReadComplete { reader, read: q.read, session, answer });
        self.next_read(i);
    }

    fn redirect_question(&mut self, i: usize, q: Question, e: &RequestError) {
        let n = self.replicas.len();
        let hint = match e {
            RequestError::NotLeader { leader: Some(l) } | RequestError::LeaderLost { leader: Some(l) } => {
                Some(l.0 as usize % n)
            }
            _ => None,
        };
        let next = hint.unwrap_or((self.readers[i].guess + 1) % n);
        self.readers[i].guess = next;
        if q.redirects >= REDIRECTS_MAX {
            return; // the reader's timeout gives the question up
        }
        let query = self.new_query(i);
        self.readers[i].asking = Some(Question { query, redirects: q.redirects + 1, ..q });
        let pause_us = if hint.is_some() { 0 } else { 20_000 };
        self.send_query(next, query, q.session, pause_us);
    }

    /// A question unanswered for `read_give_up_ms` is given up; the replica asked may be down,
    /// so the reader's next question goes to the next replica.
    fn read_timeout(&mut self, i: usize, read: u64) {
        let Some(q) = self.readers[i].asking.filter(|q| q.read == read) else { return };
        self.query_owner.remove(&q.query);
        self.readers[i].asking = None;
        self.readers[i].guess = (self.readers[i].guess + 1) % self.replicas.len();
        let (reader, session) = (self.readers[i].index, q.session.0);
        self.history.push(self.now_us, Event::ReadGiveUp { reader, read, session });
        self.next_read(i);
    }

    /// Whether `kind`'s handler is unreachable now (never in the liveness phase).
    fn handler_down(&self, kind: Kind) -> bool {
        !self.liveness
            && self.outages.get(&kind).is_some_and(|o| o.iter().any(|(a, b)| (*a..*b).contains(&self.now_us)))
    }

    /// The liveness phase: every fault healed, every replica up, no new sessions.
    fn heal(&mut self) {
        self.liveness = true;
        self.history.push(self.now_us, Event::Phase { name: "liveness" });
        self.network.heal();
        let healed = self.network.faults().healed();
        self.network.set_faults(healed);
        for r in 0..self.replicas.len() {
            let f = self.replicas[r].disk.faults_mut();
            f.read_bitflip_prob = 0.0;
            f.read_error_prob = 0.0;
            f.latency_spike_prob = 0.0;
            self.replicas[r].disk.set_capacity(None);
            if let Some(e) = &self.replicas[r].engine {
                self.liveness_commit = self.liveness_commit.max(e.commit_index().0);
            }
            if self.replicas[r].engine.is_none() {
                self.schedule_restart(r);
            }
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
