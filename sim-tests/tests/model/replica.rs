//! A replica as a stateright actor: the real `Engine` with a synchronous in-memory disk.
//!
//! Stateright needs every actor state to be `Clone + Hash + Eq`, and an `Engine` is none of
//! those. The engine is deterministic, though: the same seed and the same inputs give the same
//! engine, bit for bit. So the actor state is a *description* of the engine, namely what it booted
//! from (the durable disk, the clock, the restart count that selects the seed) and the inputs it
//! has been fed since, each with the clock reading it was fed at; the engine is rebuilt by
//! replaying them whenever the replica has to act. Disk operations complete synchronously inside
//! that replay (each `IoDone` is fed back at once, in issue order), so they are not inputs of
//! their own and add no interleavings: what stateright explores is only which message arrives
//! next (or is lost), which timer fires next, and when a replica crashes.
//!
//! Two states are equal exactly when their descriptions are, which is sound (equal descriptions
//! give equal engines) though finer than engine equality: different input orders that happen to
//! reach the same engine stay separate states. The [`View`] kept beside the description (role,
//! term, commit index, log terms, sessions) is a function of it, so it does not split states any
//! further; it is there so that properties can be checked without replaying three engines.
//!
//! Replaying is quadratic along a path, but it is rarely done: a step is a function of the
//! replica's state and the event, and the same pair turns up in many system states, so results
//! are memoised (`Memo`), and states are shared and hashed once (`Shared`).

use crate::disk::{Disk, Durable};
use crate::shared::Shared;
use crate::system::{Answer, ClientOp, Msg, Node, Timer, Wire};
use stateright::actor::{model_timeout, Id, Out};
use std::cell::Cell;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, Once};
use truba_engine::{
    Attempt, ClientId, Engine, EngineConfig, Handle, Index, Input, Instant, Kind, Now, Output, ReplicaId, Request,
    RoleName, Seq, SessionId, UnixMs,
};

/// Wall clock at virtual time 0.
const WALL0: u64 = 1_700_000_000_000;

/// One input fed to the engine after `Boot`, in a hashable form.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    Message { from: u32, message: Wire },
    Request { client: u64, seq: u64, op: ClientOp },
    Tick,
}

impl Event {
    fn input(&self) -> Input {
        match self {
            Event::Message { from, message } => Input::Message { from: ReplicaId(*from), message: message.decode() },
            Event::Request { client, seq, op } => {
                Input::Request { client: ClientId(*client), seq: Seq(*seq), request: request(op) }
            }
            Event::Tick => Input::Tick,
        }
    }
}

fn request(op: &ClientOp) -> Request {
    match op {
        ClientOp::New { record } => Request::New { kind: Kind(1), record: Some(record.clone()) },
        ClientOp::Append { session, attempt, record } => Request::Append {
            handle: Handle { session: SessionId(*session), attempt: Attempt(*attempt) },
            record: record.clone(),
        },
        ClientOp::RemoveMember { member } => Request::ChangeMembers {
            change: truba_engine::MemberChange::Remove(truba_engine::ReplicaId(*member)),
            addrs: None,
        },
    }
}

/// What survives a crash: the durable disk, and two facts about the machine rather than the
/// process (its clock, which keeps running, and how often it restarted, which picks the seed of
/// the next process). `led` is a ghost variable for the one-leader-per-term property: the terms
/// this replica has led, remembered across restarts so that a leader before a crash and another
/// one after it in the same term would be caught.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Machine {
    pub disk: Durable,
    pub restarts: u32,
    pub clock: u64,
    pub led: BTreeSet<u64>,
}

/// What the current process booted from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Life {
    pub restarts: u32,
    pub boot_clock: u64,
    pub disk: Arc<Durable>,
}

impl Life {
    /// The first process, on an empty disk at time 0.
    fn first() -> Life {
        Life { restarts: 0, boot_clock: 0, disk: Arc::default() }
    }
}

/// What the properties look at, computed from the engine after every step.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct View {
    /// Virtual monotonic time in ms; it moves only when a timer fires.
    pub clock: u64,
    pub serving: bool,
    pub leader: bool,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    /// The term of each entry from index 1 to the last one held (0 where compacted away).
    pub log: Vec<u64>,
    /// The ids of the sessions in the applied state.
    pub sessions: Vec<u64>,
    /// The engine panicked (an invariant assertion) or stopped with a fatal error.
    pub failed: Option<String>,
}

/// The storage stateright keeps across a crash.
pub type Stored = Shared<Machine>;

/// A replica's actor state: how its engine came to be, and the view of it.
pub type ReplicaState = Shared<Replica>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Replica {
    pub life: Life,
    /// Every input fed since `Boot`, with the clock reading it was fed at.
    pub events: Vec<(u64, Event)>,
    /// The ghost record of the terms led, carried over from [`Machine::led`].
    pub led: BTreeSet<u64>,
    pub view: View,
}

#[derive(Clone)]
pub struct ReplicaActor {
    cfg: Arc<EngineConfig>,
    pub me: u32,
    voters: Vec<ReplicaId>,
    warm: Arc<Warm>,
    memo: Arc<Memo>,
}

/// A running engine and its disk, rebuilt from a [`Replica`].
struct Live {
    engine: Engine,
    disk: Disk,
}

fn now(ms: u64) -> Now {
    Now { mono: Instant(ms), wall: UnixMs(WALL0 + ms) }
}

impl Live {
    /// Feeds one input and completes every disk operation it leads to; returns the other outputs.
    fn feed(&mut self, at: u64, input: Input) -> Vec<Output> {
        let now = now(at);
        self.engine.handle(now, input);
        let mut outputs = Vec::new();
        let mut done = VecDeque::new();
        loop {
            while let Some(output) = self.engine.poll() {
                match output {
                    Output::Io { id, op } => done.push_back((id, self.disk.exec(&op))),
                    other => outputs.push(other),
                }
            }
            let Some((id, result)) = done.pop_front() else { break };
            self.engine.handle(now, Input::IoDone { id, result });
        }
        outputs
    }

    fn view(&self, clock: u64) -> View {
        let engine = &self.engine;
        let (_, last) = engine.log_range();
        View {
            clock,
            serving: engine.is_serving(),
            leader: engine.is_leader(),
            term: engine.term().0,
            commit: engine.commit_index().0,
            applied: engine.state().applied().0,
            log: (1..=last.0).map(|i| engine.log_term(Index(i)).map_or(0, |t| t.0)).collect(),
            sessions: engine.state().session_views().map(|v| v.id.0).collect(),
            failed: None,
        }
    }
}

thread_local! {
    /// Set while an engine runs under `catch_unwind`, so the panic hook stays quiet: the panic
    /// is recorded in the state and reported with its path as a property violation instead.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

fn quiet_guarded_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(Cell::get) {
                default(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic (an engine assertion) into an error message.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    quiet_guarded_panics();
    GUARDED.with(|g| g.set(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(false));
    result.map_err(|p| {
        let text = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        format!("engine panicked: {}", text.unwrap_or_default())
    })
}

/// What a replica does in response to one event, in a form that can be kept in the memo and
/// turned into stateright commands any number of times.
#[derive(Clone, Debug)]
pub enum Effect {
    Send(Id, Msg),
    /// Set (true) or cancel (false) the deadline timer.
    Deadline(bool),
    Save(Stored),
}

/// The result of one step: the next state (none if the event changes nothing) and its effects.
#[derive(Debug)]
pub struct Stepped {
    next: Option<ReplicaState>,
    effects: Vec<Effect>,
}

/// What a step is a function of: the storage a replica starts from, or its state and an event.
#[derive(PartialEq, Eq, Hash)]
enum MemoKey {
    Start(Option<Stored>),
    Step(ReplicaState, Event),
}

type MemoMap = HashMap<MemoKey, Arc<Stepped>, BuildHasherDefault<DefaultHasher>>;

/// Steps already computed. The same replica state meets the same event in many system states
/// (the other replicas, the clients and the network differ), and a crashed replica restarts from
/// the same storage in many; since a step is a function of its key, its result is looked up
/// instead of replaying the engine again. The hasher has fixed keys; the map is cleared when it
/// grows past `MEMO_MAX` entries to bound memory.
#[derive(Default)]
pub struct Memo(Mutex<MemoMap>);

const MEMO_MAX: usize = 400_000;

impl Memo {
    fn get_or(&self, key: MemoKey, compute: impl FnOnce() -> Stepped) -> Arc<Stepped> {
        if let Some(hit) = self.0.lock().expect("memo lock").get(&key) {
            return Arc::clone(hit);
        }
        let stepped = Arc::new(compute());
        let mut map = self.0.lock().expect("memo lock");
        if map.len() >= MEMO_MAX {
            map.clear();
        }
        map.insert(key, Arc::clone(&stepped));
        stepped
    }
}

/// The inputs a replica starts the exploration with (nothing, for a cold start) and the terms it
/// led during them.
#[derive(Clone, Debug, Default)]
pub struct Warm {
    pub events: Vec<(u64, Event)>,
    pub led: BTreeSet<u64>,
}

fn apply(effects: &[Effect], o: &mut Out<Node>) {
    for effect in effects {
        match effect {
            Effect::Send(to, msg) => o.send(*to, msg.clone()),
            Effect::Deadline(true) => o.set_timer(Timer::Deadline, model_timeout()),
            Effect::Deadline(false) => o.cancel_timer(Timer::Deadline),
            Effect::Save(stored) => o.save(stored.clone()),
        }
    }
}

impl ReplicaActor {
    pub fn new(cfg: &Arc<EngineConfig>, me: u32, voters: &[ReplicaId], warm: Warm) -> ReplicaActor {
        ReplicaActor { cfg: Arc::clone(cfg), me, voters: voters.to_vec(), warm: Arc::new(warm), memo: Arc::default() }
    }

    fn seed(&self, restarts: u32) -> u64 {
        1000 * (u64::from(self.me) + 1) + u64::from(restarts)
    }

    /// A fresh engine on the disk the process booted from, after `Boot`.
    fn boot(&self, life: &Life) -> (Live, Vec<Output>) {
        let engine =
            Engine::replica((*self.cfg).clone(), ReplicaId(self.me), self.voters.clone(), self.seed(life.restarts));
        let mut live = Live { engine, disk: Disk::after_crash(&life.disk) };
        let outputs = live.feed(life.boot_clock, Input::Boot);
        (live, outputs)
    }

    /// The engine as the description says it is, with the outputs of its latest input (which is
    /// `Boot` if there are no events).
    fn replay(&self, state: &Replica) -> (Live, Vec<Output>) {
        let (mut live, mut outputs) = self.boot(&state.life);
        for (at, event) in &state.events {
            outputs = live.feed(*at, event.input());
        }
        (live, outputs)
    }

    /// Stateright's `on_start`: the first start (no storage yet; the warm-up's inputs, if any,
    /// already fed, their messages already delivered) or a restart after a crash.
    pub fn start(&self, storage: &Option<Stored>, o: &mut Out<Node>) -> ReplicaState {
        let stepped = self.memo.get_or(MemoKey::Start(storage.clone()), || self.compute_start(storage));
        apply(&stepped.effects, o);
        stepped.next.clone().expect("a start always makes a state")
    }

    fn compute_start(&self, storage: &Option<Stored>) -> Stepped {
        let (life, events, led) = match storage {
            None => (Life::first(), self.warm.events.clone(), self.warm.led.clone()),
            Some(s) => {
                let life = Life { restarts: s.restarts + 1, boot_clock: s.clock, disk: Arc::new(s.disk.clone()) };
                (life, Vec::new(), s.led.clone())
            }
        };
        let clock = events.last().map_or(life.boot_clock, |(at, _)| *at);
        let mut state = Replica { life, events, led, view: View { clock, ..View::default() } };
        let mut effects = Vec::new();
        match guarded(|| self.replay(&state)) {
            Ok((live, outputs)) => {
                let outputs = if state.events.is_empty() { outputs } else { Vec::new() };
                self.settle(&mut state, &live, outputs, &mut effects);
            }
            Err(e) => state.view.failed = Some(e),
        }
        Stepped { next: Some(Shared::new(state)), effects }
    }

    /// A message from a peer or a request from a client.
    pub fn on_msg(&self, state: &ReplicaState, src: Id, msg: Msg, o: &mut Out<Node>) -> Option<ReplicaState> {
        let event = match msg {
            Msg::Peer(message) => Event::Message { from: usize::from(src) as u32, message },
            Msg::Request { seq, op } => Event::Request { client: usize::from(src) as u64, seq, op },
            Msg::Reply { .. } => return None,
        };
        self.step(state, event, o)
    }

    /// The engine's deadline timer fired.
    pub fn on_timeout(&self, state: &ReplicaState, o: &mut Out<Node>) -> Option<ReplicaState> {
        self.step(state, Event::Tick, o)
    }

    fn step(&self, state: &ReplicaState, event: Event, o: &mut Out<Node>) -> Option<ReplicaState> {
        if state.view.failed.is_some() {
            return None;
        }
        let key = MemoKey::Step(state.clone(), event.clone());
        let stepped = self.memo.get_or(key, || self.compute(state, event));
        apply(&stepped.effects, o);
        stepped.next.clone()
    }

    /// Feeds one event to the replayed engine: a tick moves the clock to the engine's deadline,
    /// anything else arrives at the current clock reading.
    fn compute(&self, state: &ReplicaState, event: Event) -> Stepped {
        let result = guarded(|| {
            let (mut live, _) = self.replay(state);
            let at = match event {
                Event::Tick => state.view.clock.max(live.engine.next_deadline()?.0),
                _ => state.view.clock,
            };
            let outputs = live.feed(at, event.input());
            Some((live, at, outputs))
        });
        let mut next = Replica::clone(state);
        let mut effects = Vec::new();
        match result {
            Ok(None) => return Stepped { next: None, effects },
            Ok(Some((live, at, outputs))) => {
                next.events.push((at, event));
                next.view.clock = at;
                self.settle(&mut next, &live, outputs, &mut effects);
            }
            Err(e) => {
                next.events.push((state.view.clock, event));
                next.view.failed = Some(e);
                effects.push(Effect::Deadline(false));
            }
        }
        Stepped { next: Some(Shared::new(next)), effects }
    }

    /// After an input: send what the engine sent, note leadership, refresh the view, save the
    /// durable disk, and set the deadline timer.
    fn settle(&self, state: &mut Replica, live: &Live, outputs: Vec<Output>, effects: &mut Vec<Effect>) {
        let mut failed = None;
        for output in outputs {
            match output {
                Output::Send { to, message } => {
                    effects.push(Effect::Send(Id::from(to.0 as usize), Msg::Peer(Wire::encode(&message))))
                }
                Output::Reply { client, seq, outcome } => effects.push(Effect::Send(
                    Id::from(client.0 as usize),
                    Msg::Reply { seq: seq.0, answer: Answer::of(&outcome) },
                )),
                Output::Role { role: RoleName::Leader, term, .. } => {
                    state.led.insert(term.0);
                }
                Output::Stopped(fatal) => failed = Some(format!("engine stopped: {fatal}")),
                _ => {}
            }
        }
        state.view = View { failed, ..live.view(state.view.clock) };
        effects.push(Effect::Save(Shared::new(Machine {
            disk: live.disk.durable().clone(),
            restarts: state.life.restarts,
            clock: state.view.clock,
            led: state.led.clone(),
        })));
        let timed = live.engine.next_deadline().is_some() && state.view.failed.is_none();
        effects.push(Effect::Deadline(timed));
    }
}

/// Runs a cluster from a cold start to a settled one, outside the model checker and in one fixed
/// order: replica 0 stands for election, every message is delivered in the order sent, then
/// replica 0's heartbeat tells the followers what is committed. Exploring from there (rather
/// than from the cold start) spends the depth bound on what happens to a working cluster; the
/// cold start is explored too, by its own, shallower test.
pub fn warm_up(cfg: &Arc<EngineConfig>, voters: &[ReplicaId]) -> Vec<Warm> {
    let actors: Vec<_> = voters.iter().map(|v| ReplicaActor::new(cfg, v.0, voters, Warm::default())).collect();
    let mut w = WarmUp {
        lives: actors.iter().map(|a| a.boot(&Life::first()).0).collect(),
        warm: vec![Warm::default(); actors.len()],
        clocks: vec![0; actors.len()],
        queue: VecDeque::new(),
    };
    for _round in 0..2 {
        w.clocks[0] = w.lives[0].engine.next_deadline().expect("replica 0 waits for a deadline").0;
        w.feed(0, Event::Tick);
        while let Some((from, to, message)) = w.queue.pop_front() {
            w.feed(to, Event::Message { from: from as u32, message });
        }
    }
    assert!(w.lives[0].engine.is_leader(), "the warm-up elects replica 0");
    assert!(w.lives.iter().all(|l| l.engine.commit_index() >= Index(1)), "the warm-up commits the leader's no-op");
    w.warm
}

struct WarmUp {
    lives: Vec<Live>,
    warm: Vec<Warm>,
    clocks: Vec<u64>,
    /// Messages sent and not yet delivered: (from, to, message).
    queue: VecDeque<(usize, usize, Wire)>,
}

impl WarmUp {
    fn feed(&mut self, i: usize, event: Event) {
        for output in self.lives[i].feed(self.clocks[i], event.input()) {
            match output {
                Output::Send { to, message } => self.queue.push_back((i, to.0 as usize, Wire::encode(&message))),
                Output::Role { role: RoleName::Leader, term, .. } => {
                    self.warm[i].led.insert(term.0);
                }
                _ => {}
            }
        }
        self.warm[i].events.push((self.clocks[i], event));
    }
}
