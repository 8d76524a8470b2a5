//! One engine on a perfect in-memory disk: every disk operation completes at once, messages it
//! sends go nowhere, and a crash keeps the directory as the operations left it. The fuzz
//! targets drive it with inputs made from their bytes; the engine checks its own invariants
//! after every step (`Engine::handle` ends with them), so a target only has to keep it busy.

use std::collections::VecDeque;
use truba_engine::{Engine, EngineConfig, Input, Instant, Message, Now, Outcome, Output, ReplicaId, Term, UnixMs};

pub use truba_engine::mem_dir::{exec, MemDir as Dir};

/// Wall clock at mono 0.
const WALL0_MS: u64 = 1_700_000_000_000;
/// Most disk completions one input may lead to before the harness calls it a livelock: far
/// above what any real step needs (a recovery of a few files, a batch and its fsync).
const STEPS_PER_INPUT_MAX: usize = 100_000;

/// The cluster a replica belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    /// A replica alone.
    Lone,
    /// Member 1 of voters {0, 1, 2}, a follower that has heard from no leader yet.
    Follower,
    /// Member 0 of voters {0, 1, 2}, elected leader of term 1 with member 1's votes.
    Leader,
}

pub struct Node {
    pub engine: Engine,
    pub dir: Dir,
    setup: Setup,
    seed: u64,
    t_ms: u64,
    /// Messages the engine sent, for targets that look at them (bounded: oldest dropped).
    pub sent: VecDeque<(ReplicaId, Message)>,
    /// Answers to requests (bounded the same way).
    pub replies: VecDeque<Outcome>,
}

const SENT_KEPT_MAX: usize = 64;

impl Node {
    pub fn new(setup: Setup, seed: u64) -> Node {
        Node::on_dir(setup, seed, Dir::new())
    }

    /// A replica that boots on `dir` (recovering whatever it holds).
    pub fn on_dir(setup: Setup, seed: u64, dir: Dir) -> Node {
        let engine = Node::engine(setup, seed);
        let mut node = Node { engine, dir, setup, seed, t_ms: 0, sent: VecDeque::new(), replies: VecDeque::new() };
        node.input(Input::Boot);
        if setup == Setup::Leader && node.engine.is_serving() {
            node.elect();
        }
        node
    }

    fn engine(setup: Setup, seed: u64) -> Engine {
        let cfg = config();
        let voters = vec![ReplicaId(0), ReplicaId(1), ReplicaId(2)];
        match setup {
            Setup::Lone => Engine::new(cfg, seed),
            Setup::Follower => Engine::replica(cfg, ReplicaId(1), voters, seed),
            Setup::Leader => Engine::replica(cfg, ReplicaId(0), voters, seed),
        }
    }

    /// Member 0 times out, and member 1 grants its pre-vote and its vote.
    fn elect(&mut self) {
        self.advance_ms(config().consensus.election_timeout_ms_max + 1);
        let one = ReplicaId(1);
        self.input(Input::Message { from: one, message: Message::PreVoteReply { term: Term(1), granted: true } });
        self.input(Input::Message { from: one, message: Message::VoteReply { term: Term(1), granted: true } });
    }

    pub fn now(&self) -> Now {
        Now { mono: Instant(self.t_ms), wall: UnixMs(WALL0_MS + self.t_ms) }
    }

    /// Lets time pass, then ticks.
    pub fn advance_ms(&mut self, ms: u64) {
        self.t_ms = self.t_ms.saturating_add(ms);
        self.input(Input::Tick);
    }

    /// Feeds one input and completes every disk operation it leads to.
    pub fn input(&mut self, input: Input) {
        self.engine.handle(self.now(), input);
        let mut done = VecDeque::new();
        for _ in 0..STEPS_PER_INPUT_MAX {
            while let Some(output) = self.engine.poll() {
                match output {
                    Output::Io { id, op } => done.push_back((id, exec(&mut self.dir, &op))),
                    Output::Send { to, message } => {
                        if self.sent.len() == SENT_KEPT_MAX {
                            self.sent.pop_front();
                        }
                        self.sent.push_back((to, message));
                    }
                    Output::Reply { outcome, .. } => {
                        if self.replies.len() == SENT_KEPT_MAX {
                            self.replies.pop_front();
                        }
                        self.replies.push_back(outcome);
                    }
                    _ => {}
                }
            }
            let Some((id, result)) = done.pop_front() else { return };
            self.engine.handle(self.now(), Input::IoDone { id, result });
        }
        panic!("one input led to more than {STEPS_PER_INPUT_MAX} disk operations");
    }

    /// A crash and a restart on the same directory (nothing is lost: every write completed).
    pub fn restart(&mut self) {
        let dir = std::mem::take(&mut self.dir);
        let t_ms = self.t_ms;
        self.engine = Node::engine(self.setup, self.seed);
        self.dir = dir;
        self.t_ms = t_ms;
        self.input(Input::Boot);
    }
}

/// The settings every fuzzed replica runs with: the defaults, but with files small enough that
/// a short input reaches segment rolls, snapshots and spills (and the in-memory disk does not
/// preallocate megabytes).
pub fn config() -> EngineConfig {
    let mut cfg = EngineConfig::default();
    cfg.limits.segment_bytes_max = 16 * 1024;
    cfg.limits.preallocate_bytes = 4 * 1024;
    cfg.limits.snapshot_every_entries = 16;
    cfg.limits.stored_memtable_bytes_max = 1024;
    cfg.limits.ledger_segment_bytes_max = 16 * 1024;
    cfg
}
