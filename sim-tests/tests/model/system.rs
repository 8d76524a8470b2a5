//! The actor system: replicas and clients as one stateright actor type, the messages between
//! them, and the bounds of the exploration. The properties are in `properties.rs`.

use crate::client::{ClientActor, ClientState, Script};
use crate::replica::{warm_up, ReplicaActor, ReplicaState, Stored, Warm};
use crate::shared::Shared;
use crate::spec::{initial_history, History};
use stateright::actor::{Actor, ActorModel, ActorModelState, Id, LossyNetwork, Network, Out};
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use truba_engine::{EngineConfig, Message, Mutations, Outcome, ReplicaId, Reply, RequestError};

/// A replica-to-replica message, postcard-encoded (`Message` is neither `Hash` nor `Ord`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Wire(pub Arc<[u8]>);

impl Wire {
    pub fn encode(message: &Message) -> Wire {
        Wire(postcard::to_allocvec(message).expect("a message encodes").into())
    }

    pub fn decode(&self) -> Message {
        postcard::from_bytes(&self.0).expect("a message the model encoded decodes")
    }
}

/// Counterexample traces show the decoded message rather than its bytes.
impl fmt::Debug for Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.decode())
    }
}

/// What a client asks for, in a hashable form (turned into a truba `Request` by the replica).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClientOp {
    New { record: Vec<u8> },
    Append { session: u64, attempt: u32, record: Vec<u8> },
    RemoveMember { member: u32 },
}

/// A replica's answer to a client, in a hashable form.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Answer {
    Created {
        session: u64,
        attempt: u32,
    },
    Done,
    /// Not the leader; the hint, if any.
    NotLeader(Option<u32>),
    /// Retry later (overloaded, recovering).
    Busy,
    /// Refused for good.
    Refused(String),
}

impl Answer {
    pub fn of(outcome: &Outcome) -> Answer {
        match outcome {
            Ok(Reply::Created { handle }) => Answer::Created { session: handle.session.0, attempt: handle.attempt.0 },
            Ok(_) => Answer::Done,
            Err(RequestError::NotLeader { leader }) => Answer::NotLeader(leader.map(|l| l.0)),
            Err(e) if e.is_retryable() => Answer::Busy,
            Err(e) => Answer::Refused(e.to_string()),
        }
    }

    pub fn is_success(&self) -> bool {
        matches!(self, Answer::Created { .. } | Answer::Done)
    }

    /// Whether the client stops retrying on this answer.
    pub fn is_final(&self) -> bool {
        !matches!(self, Answer::NotLeader(_) | Answer::Busy)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Msg {
    Peer(Wire),
    Request { seq: u64, op: ClientOp },
    Reply { seq: u64, answer: Answer },
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// A replica's `next_deadline` has come.
    Deadline,
    /// A client's request is due for another send.
    Retry,
    /// A delayed client starts its script.
    Start,
}

#[derive(Clone)]
pub enum Node {
    Replica(ReplicaActor),
    Client(ClientActor),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NodeState {
    Replica(ReplicaState),
    Client(ClientState),
}

impl Actor for Node {
    type Msg = Msg;
    type State = NodeState;
    type Timer = Timer;
    type Storage = Stored;
    type Random = ();

    fn on_start(&self, _id: Id, storage: &Option<Stored>, o: &mut Out<Self>) -> NodeState {
        match self {
            Node::Replica(r) => NodeState::Replica(r.start(storage, o)),
            Node::Client(c) => NodeState::Client(c.start(o)),
        }
    }

    fn on_msg(&self, _id: Id, state: &mut Cow<NodeState>, src: Id, msg: Msg, o: &mut Out<Self>) {
        let next = match (self, state.as_ref()) {
            (Node::Replica(r), NodeState::Replica(s)) => r.on_msg(s, src, msg, o).map(NodeState::Replica),
            (Node::Client(c), NodeState::Client(s)) => c.on_msg(s, msg, o).map(NodeState::Client),
            _ => unreachable!("actor and state kinds match"),
        };
        if let Some(next) = next {
            *state = Cow::Owned(next);
        }
    }

    fn on_timeout(&self, _id: Id, state: &mut Cow<NodeState>, timer: &Timer, o: &mut Out<Self>) {
        let next = match (self, state.as_ref()) {
            (Node::Replica(r), NodeState::Replica(s)) => r.on_timeout(s, o).map(NodeState::Replica),
            (Node::Client(c), NodeState::Client(s)) => c.on_timeout(s, timer, o).map(NodeState::Client),
            _ => unreachable!("actor and state kinds match"),
        };
        if let Some(next) = next {
            *state = Cow::Owned(next);
        }
    }

    fn name(&self) -> String {
        match self {
            Node::Replica(r) => format!("r{}", r.me),
            Node::Client(_) => "client".into(),
        }
    }
}

/// What to explore: the cluster, the clients' scripts, and the bounds.
#[derive(Clone, Debug)]
pub struct ModelCfg {
    pub replicas: u32,
    pub clients: Vec<Script>,
    /// Sends of one request at most (the first one and its retries).
    pub sends_max: u32,
    /// Replica crashes over the whole run at most (each followed, perhaps, by a restart).
    pub crashes: u32,
    /// No replica's clock goes past this: it bounds how many timeouts a run can take.
    pub clock_max_ms: u64,
    /// Let the network drop any message. For these properties, which read no network state,
    /// a lost message is one never delivered, so loss adds states but no replica or client
    /// state that delay alone does not reach; it is modelled because the issue asks for it.
    pub lossy: bool,
    /// Start from a settled cluster (replica 0 leads term 1, its no-op committed everywhere)
    /// rather than from three empty replicas.
    pub warm: bool,
    pub mutations: Mutations,
}

pub type System = ActorModel<Node, ModelCfg, Shared<History>>;
pub type SystemState = ActorModelState<Node, Shared<History>>;

impl ModelCfg {
    /// The timings are the defaults today; they are set here so that the model's do not move
    /// if the defaults do.
    fn engine_config(&self) -> EngineConfig {
        let mut cfg = EngineConfig::default();
        cfg.consensus.election_timeout_ms_min = 150;
        cfg.consensus.election_timeout_ms_max = 300;
        cfg.consensus.heartbeat_ms = 50;
        cfg.mutations = self.mutations;
        cfg
    }

    fn actors(&self) -> Vec<Node> {
        let cfg = Arc::new(self.engine_config());
        let voters: Vec<ReplicaId> = (0..self.replicas).map(ReplicaId).collect();
        let warm = if self.warm { warm_up(&cfg, &voters) } else { vec![Warm::default(); voters.len()] };
        let replicas =
            (0..self.replicas).map(|me| Node::Replica(ReplicaActor::new(&cfg, me, &voters, warm[me as usize].clone())));
        let clients = self.clients.iter().map(|script| {
            Node::Client(ClientActor { script: script.clone(), replicas: self.replicas, sends_max: self.sends_max })
        });
        replicas.chain(clients).collect()
    }

    pub fn into_model(self) -> System {
        let lossy = if self.lossy { LossyNetwork::Yes } else { LossyNetwork::No };
        let actors = self.actors();
        let model = ActorModel::new(self, initial_history())
            .actors(actors)
            // Any message may overtake any other. Duplication is left out: a duplicating network
            // keeps every message deliverable forever, which multiplies the states at every
            // depth; the engine's tolerance of duplicates is the simulator's to test.
            .init_network(Network::new_unordered_nonduplicating([]))
            .lossy_network(lossy)
            // At most one replica is down at a time; `within_boundary` bounds the total.
            .max_crashes(1)
            .record_msg_out(History::record_out)
            .record_msg_in(History::record_in)
            .within_boundary(within_boundary);
        crate::properties::add(model)
    }
}

pub fn replicas(state: &SystemState) -> impl Iterator<Item = &ReplicaState> {
    state.actor_states.iter().filter_map(|s| match s.as_ref() {
        NodeState::Replica(r) => Some(r),
        NodeState::Client(_) => None,
    })
}

pub fn clients(state: &SystemState) -> impl Iterator<Item = &ClientState> {
    state.actor_states.iter().filter_map(|s| match s.as_ref() {
        NodeState::Client(c) => Some(c),
        NodeState::Replica(_) => None,
    })
}

/// Clients never crash (stateright offers every actor's crash; a client's would only restart
/// its script), replica crashes are bounded in total, and so is every replica's clock.
fn within_boundary(cfg: &ModelCfg, state: &SystemState) -> bool {
    let replicas_n = cfg.replicas as usize;
    if state.crashed.iter().skip(replicas_n).any(|c| *c) {
        return false;
    }
    let down = state.crashed.iter().take(replicas_n).filter(|c| **c).count() as u32;
    let restarts: u32 = replicas(state).map(|r| r.life.restarts).sum();
    down + restarts <= cfg.crashes && replicas(state).all(|r| r.view.clock <= cfg.clock_max_ms)
}
