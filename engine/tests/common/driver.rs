//! A driver for engine tests: a perfect in-memory disk (see `mod.rs`) that completes every disk
//! operation at once, unless a hold predicate keeps it back; held operations complete only when
//! released, so tests can observe what the engine does (and does not do) while a write or an
//! fsync is outstanding. Each test binary uses part of it.
#![allow(dead_code)]

use super::{exec, Dir};
use std::collections::{BTreeMap, VecDeque};
use truba_engine::{
    ClientId, DiskError, Engine, EngineConfig, FailureReason, Handle, Index, Input, Instant, IoId, IoOp, IoReply, Kind,
    KindConfig, Now, Outcome, Output, Query, QueryReply, Reply, Request, RequestError, Seq, SessionId, SessionView,
    StatusView, UnixMs, UnixSecs,
};

/// Wall clock at t = 0 (mono 0).
pub const WALL0: u64 = 1_700_000_000_000;

pub type Hold = Box<dyn Fn(&IoOp) -> bool>;

pub struct Driver {
    pub engine: Engine,
    pub dir: Dir,
    /// Milliseconds since the start: mono = t, wall = WALL0 + t.
    pub t: u64,
    /// Every output the engine emitted, in order.
    pub outputs: Vec<Output>,
    pub hold: Option<Hold>,
    pub held: VecDeque<(IoId, IoOp)>,
    pub done: VecDeque<(IoId, Result<IoReply, DiskError>)>,
    /// Next sequence number per client, for `req`.
    pub seqs: BTreeMap<u64, u64>,
}

impl Driver {
    pub fn new(cfg: EngineConfig, seed: u64) -> Driver {
        Driver::on_dir(cfg, seed, Dir::new(), 0)
    }

    pub fn on_dir(cfg: EngineConfig, seed: u64, dir: Dir, t: u64) -> Driver {
        Driver {
            engine: Engine::new(cfg, seed),
            dir,
            t,
            outputs: Vec::new(),
            hold: None,
            held: VecDeque::new(),
            done: VecDeque::new(),
            seqs: BTreeMap::new(),
        }
    }

    /// Boots a driver and asserts recovery finished.
    pub fn booted(cfg: EngineConfig, seed: u64) -> Driver {
        let mut d = Driver::new(cfg, seed);
        d.boot();
        d
    }

    /// A fresh engine on a copy of this driver's directory, booted (its outputs start at 0).
    pub fn restart(&self, cfg: EngineConfig, seed: u64) -> Driver {
        let mut d = Driver::on_dir(cfg, seed, self.dir.clone(), self.t);
        d.seqs = self.seqs.clone(); // the clients live on across the restart
        d.input(Input::Boot);
        d
    }

    pub fn now(&self) -> Now {
        Now { mono: Instant(self.t), wall: UnixMs(WALL0 + self.t) }
    }

    pub fn wall_ms(&self) -> u64 {
        WALL0 + self.t
    }

    pub fn advance(&mut self, ms: u64) {
        self.t += ms;
    }

    pub fn mark(&self) -> usize {
        self.outputs.len()
    }

    /// Feeds one input and drives every resulting disk operation to completion (except held ones).
    pub fn input(&mut self, input: Input) -> usize {
        let mark = self.mark();
        self.engine.handle(self.now(), input);
        self.pump();
        mark
    }

    pub fn pump(&mut self) {
        loop {
            while let Some(o) = self.engine.poll() {
                if let Output::Io { id, op } = &o {
                    if self.hold.as_ref().is_some_and(|h| h(op)) {
                        self.held.push_back((*id, op.clone()));
                    } else {
                        let r = exec(&mut self.dir, op);
                        self.done.push_back((*id, r));
                    }
                }
                self.outputs.push(o);
            }
            let Some((id, result)) = self.done.pop_front() else { break };
            self.engine.handle(self.now(), Input::IoDone { id, result });
        }
    }

    pub fn hold_if(&mut self, pred: impl Fn(&IoOp) -> bool + 'static) {
        self.hold = Some(Box::new(pred));
    }

    /// Stops holding and completes everything held so far (in issue order).
    pub fn release(&mut self) -> usize {
        let mark = self.mark();
        self.hold = None;
        while let Some((id, op)) = self.held.pop_front() {
            let r = exec(&mut self.dir, &op);
            self.done.push_back((id, r));
        }
        self.pump();
        mark
    }

    pub fn since(&self, mark: usize) -> &[Output] {
        &self.outputs[mark..]
    }

    pub fn ios_since(&self, mark: usize) -> Vec<IoOp> {
        self.since(mark)
            .iter()
            .filter_map(|o| match o {
                Output::Io { op, .. } => Some(op.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn replies_since(&self, mark: usize) -> Vec<(ClientId, Seq, Outcome)> {
        self.since(mark)
            .iter()
            .filter_map(|o| match o {
                Output::Reply { client, seq, outcome } => Some((*client, *seq, outcome.clone())),
                _ => None,
            })
            .collect()
    }

    pub fn deliveries_since(&self, mark: usize) -> Vec<(Kind, Handle, UnixSecs, Vec<Vec<u8>>)> {
        self.since(mark)
            .iter()
            .filter_map(|o| match o {
                Output::Deliver { kind, handle, due, records, .. } => Some((*kind, *handle, *due, records.clone())),
                _ => None,
            })
            .collect()
    }

    pub fn send(&mut self, client: u64, seq: u64, request: Request) -> usize {
        self.input(Input::Request { client: ClientId(client), seq: Seq(seq), request })
    }

    /// Sends a request and returns its one reply, which must come before this call returns.
    pub fn call(&mut self, client: u64, seq: u64, request: Request) -> Outcome {
        let mark = self.send(client, seq, request);
        let mine: Vec<_> = self
            .replies_since(mark)
            .into_iter()
            .filter(|(c, s, _)| *c == ClientId(client) && *s == Seq(seq))
            .map(|(_, _, o)| o)
            .collect();
        assert_eq!(mine.len(), 1, "exactly one reply to ({client}, {seq}), got {mine:?}");
        mine.into_iter().next().unwrap()
    }

    /// `call` with the client's next sequence number.
    pub fn req(&mut self, client: u64, request: Request) -> Outcome {
        let seq = self.seqs.entry(client).or_insert(0);
        *seq += 1;
        let seq = *seq;
        self.call(client, seq, request)
    }

    pub fn query(&mut self, query: Query) -> QueryReply {
        let mark = self.input(Input::Query { id: 99, query });
        let replies: Vec<_> = self
            .since(mark)
            .iter()
            .filter_map(|o| match o {
                Output::QueryReply { id: 99, reply } => Some(reply.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(replies.len(), 1);
        replies.into_iter().next().unwrap()
    }

    pub fn session(&mut self, id: SessionId) -> Result<SessionView, RequestError> {
        match self.query(Query::Session(id)) {
            QueryReply::Session(r) => r,
            other => panic!("unexpected {other:?}"),
        }
    }

    pub fn status(&mut self) -> StatusView {
        match self.query(Query::Status) {
            QueryReply::Status(s) => s,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Sends a Tick, first moving time up to `next_deadline` if it lies in the future.
    pub fn tick(&mut self) -> usize {
        let deadline = self.engine.next_deadline().expect("the engine has timed work");
        if deadline.0 > self.t {
            self.t = deadline.0;
        }
        self.input(Input::Tick)
    }

    /// Boots and returns (applied, state_hash, torn_bytes) of the one `Recovered` output.
    pub fn boot(&mut self) -> (Index, u64, u64) {
        let mark = self.input(Input::Boot);
        self.recovered_since(mark).expect("recovery finished")
    }

    pub fn recovered_since(&self, mark: usize) -> Option<(Index, u64, u64)> {
        let r: Vec<_> = self
            .since(mark)
            .iter()
            .filter_map(|o| match o {
                Output::Recovered { applied, state_hash, torn_bytes, .. } => Some((*applied, *state_hash, *torn_bytes)),
                _ => None,
            })
            .collect();
        assert!(r.len() <= 1, "at most one Recovered: {r:?}");
        r.into_iter().next()
    }

    pub fn files(&self, prefix: &str, suffix: &str) -> Vec<String> {
        self.dir.keys().filter(|n| n.starts_with(prefix) && n.ends_with(suffix)).cloned().collect()
    }

    pub fn segments(&self) -> Vec<String> {
        self.files("log-", ".seg")
    }

    pub fn views(&self) -> Vec<SessionView> {
        self.engine.state().session_views().collect()
    }
}

pub fn new(kind: u32, record: Option<&[u8]>) -> Request {
    Request::New { kind: Kind(kind), record: record.map(<[u8]>::to_vec) }
}

pub fn append(handle: Handle, record: &[u8]) -> Request {
    Request::Append { handle, record: record.to_vec() }
}

pub fn created(outcome: Outcome) -> Handle {
    match outcome {
        Ok(Reply::Created { handle }) => handle,
        other => panic!("expected Created, got {other:?}"),
    }
}

pub fn stored_due(outcome: Outcome) -> UnixSecs {
    match outcome {
        Ok(Reply::Stored { due }) => due,
        other => panic!("expected Stored, got {other:?}"),
    }
}

pub fn recs(rs: &[&[u8]]) -> Vec<Vec<u8>> {
    rs.iter().map(|r| r.to_vec()).collect()
}

/// A kind with no jitter and short timings, for repeat and lease tests.
pub fn quick_kind() -> KindConfig {
    KindConfig {
        default_delay_s: 2,
        jitter_window_s: 0,
        lease_ms: 1_000,
        store_timeout_s_max: 3_600,
        backoff_base_s: 2,
        backoff_cap_s: 8,
        max_attempts: 3,
        ..KindConfig::default()
    }
}

pub fn failed() -> FailureReason {
    FailureReason::Handler("it broke".into())
}

pub fn cfg_with(kind: u32, kc: KindConfig) -> EngineConfig {
    let mut cfg = EngineConfig::default();
    cfg.kinds.insert(Kind(kind), kc);
    cfg
}
