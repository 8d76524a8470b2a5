//! A client as a stateright actor: it runs a short script of requests one at a time, like the
//! client library does. A request goes to the replica the client believes leads (replica 0 at
//! first); a "not the leader" answer sends it on to the hinted replica (or the next one) at once,
//! and the retry timer sends it again, with the same sequence number, to the next replica in
//! turn (the one it tried may have crashed). Each request is sent at most `sends_max` times, so
//! that retries cannot grow the state space without end; a request that runs out of sends stays
//! unanswered, which the properties allow.

use crate::system::{Answer, ClientOp, Msg, Node, Timer};
use stateright::actor::{model_timeout, Id, Out};

/// One step of a client's script.
#[derive(Clone, Debug)]
pub enum Step {
    /// Open a session of kind 1 with this first record.
    New(&'static [u8]),
    /// Append this record to the session the client's last `New` created.
    AppendOwn(&'static [u8]),
    /// Remove this replica from the cluster's members (an operator's membership change).
    RemoveMember(u32),
}

#[derive(Clone, Debug)]
pub struct Script {
    /// Wait for a timer before the first request, so that it may start after another client's
    /// request was answered (which is what gives linearizability's real-time order something
    /// to check).
    pub delayed: bool,
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientState {
    /// Index of the current step in the script.
    pub step: usize,
    pub seq: u64,
    pub target: u32,
    pub sends: u32,
    pub waiting: bool,
    /// The session the last `New` created, with its attempt.
    pub handle: Option<(u64, u32)>,
    /// Every final answer received, with the sequence number it answered.
    pub answers: Vec<(u64, Answer)>,
}

#[derive(Clone)]
pub struct ClientActor {
    pub script: Script,
    pub replicas: u32,
    pub sends_max: u32,
}

impl ClientActor {
    pub fn start(&self, o: &mut Out<Node>) -> ClientState {
        let mut state =
            ClientState { step: 0, seq: 0, target: 0, sends: 0, waiting: false, handle: None, answers: vec![] };
        if self.script.delayed {
            o.set_timer(Timer::Start, model_timeout());
        } else {
            self.begin(&mut state, o);
        }
        state
    }

    /// Starts the current step of the script, if there is one that can be carried out.
    fn begin(&self, state: &mut ClientState, o: &mut Out<Node>) {
        state.waiting = false;
        match self.script.steps.get(state.step) {
            None => return,
            // The session to append to was never created (its `New` was refused).
            Some(Step::AppendOwn(_)) if state.handle.is_none() => return,
            Some(_) => {}
        }
        state.seq += 1;
        state.sends = 0;
        state.waiting = true;
        self.send(state, o);
    }

    fn op(&self, state: &ClientState) -> ClientOp {
        match (&self.script.steps[state.step], state.handle) {
            (Step::New(record), _) => ClientOp::New { record: record.to_vec() },
            (Step::AppendOwn(record), Some((session, attempt))) => {
                ClientOp::Append { session, attempt, record: record.to_vec() }
            }
            (Step::AppendOwn(_), None) => unreachable!("an append is started only with a handle"),
            (Step::RemoveMember(member), _) => ClientOp::RemoveMember { member: *member },
        }
    }

    /// (Re)sends the current request to the current target, and keeps the retry timer set while
    /// sends are left.
    fn send(&self, state: &mut ClientState, o: &mut Out<Node>) {
        state.sends += 1;
        o.send(Id::from(state.target as usize), Msg::Request { seq: state.seq, op: self.op(state) });
        if state.sends < self.sends_max {
            o.set_timer(Timer::Retry, model_timeout());
        } else {
            o.cancel_timer(Timer::Retry);
        }
    }

    pub fn on_msg(&self, state: &ClientState, msg: Msg, o: &mut Out<Node>) -> Option<ClientState> {
        let Msg::Reply { seq, answer } = msg else { return None };
        if !state.waiting || seq != state.seq {
            return None;
        }
        let mut next = state.clone();
        match answer {
            Answer::NotLeader(hint) if state.sends < self.sends_max => {
                next.target = hint.unwrap_or((state.target + 1) % self.replicas);
                self.send(&mut next, o);
            }
            Answer::NotLeader(_) | Answer::Busy => return None,
            answer => self.finish(&mut next, seq, answer, o),
        }
        Some(next)
    }

    /// A final answer: note it and go on with the script.
    fn finish(&self, state: &mut ClientState, seq: u64, answer: Answer, o: &mut Out<Node>) {
        if let Answer::Created { session, attempt } = answer {
            state.handle = Some((session, attempt));
        }
        state.answers.push((seq, answer));
        state.step += 1;
        o.cancel_timer(Timer::Retry);
        self.begin(state, o);
    }

    pub fn on_timeout(&self, state: &ClientState, timer: &Timer, o: &mut Out<Node>) -> Option<ClientState> {
        let mut next = state.clone();
        match timer {
            Timer::Start => self.begin(&mut next, o),
            Timer::Retry if state.waiting && state.sends < self.sends_max => {
                next.target = (state.target + 1) % self.replicas;
                self.send(&mut next, o);
            }
            _ => return None,
        }
        Some(next)
    }
}
