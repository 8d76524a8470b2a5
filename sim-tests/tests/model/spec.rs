//! The clients' view of truba as a sequential object, and the history that stateright's
//! `LinearizabilityTester` checks against it.
//!
//! Reads in truba are not linearizable (queries are answered from a replica's applied state), so
//! the model's clients only write, and what the specification can check about writes is where
//! they land: a session's id is the log index of the entry that created it, so in any
//! linearization the ids of created sessions strictly increase, and an append succeeds only on a
//! session that exists. A history in which a client was told "created session 2" and a later
//! client, starting after that answer, was also told "created session 2" (or 1) has no
//! linearization: the first acknowledged entry was lost and its index reused.

use crate::shared::Shared;
use crate::system::{Answer, ClientOp, Msg};
use stateright::actor::{Envelope, Id};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SpecOp {
    New,
    Append {
        session: u64,
    },
    /// A membership change: it changes nothing the clients can see of sessions.
    Reconfigure,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SpecRet {
    Created { session: u64 },
    Done,
    Refused(String),
}

/// The sessions created so far and the highest id handed out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Sessions {
    last_id: u64,
    ids: BTreeSet<u64>,
}

impl SequentialSpec for Sessions {
    type Op = SpecOp;
    type Ret = SpecRet;

    /// Used for operations that never returned (they may or may not have taken effect). Which
    /// id an unanswered `New` got is unknown, so it is given none: the specification then
    /// constrains later ids less, never more, and cannot report a violation that is not one.
    fn invoke(&mut self, op: &SpecOp) -> SpecRet {
        match op {
            SpecOp::New => SpecRet::Created { session: 0 },
            SpecOp::Append { .. } | SpecOp::Reconfigure => SpecRet::Done,
        }
    }

    fn is_valid_step(&mut self, op: &SpecOp, ret: &SpecRet) -> bool {
        match (op, ret) {
            (SpecOp::New, SpecRet::Created { session }) => self.create(*session),
            (SpecOp::Append { session }, SpecRet::Done) => self.ids.contains(session),
            (SpecOp::Reconfigure, SpecRet::Done | SpecRet::Refused(_)) => true,
            _ => false,
        }
    }
}

impl Sessions {
    fn create(&mut self, session: u64) -> bool {
        if session <= self.last_id {
            return false;
        }
        self.last_id = session;
        self.ids.insert(session);
        true
    }
}

/// The auxiliary history of the model: the tester, plus which request of each client has been
/// recorded as invoked and as returned, since a client retries one request several times and may
/// hear its answer more than once. It changes only when a client starts or finishes a request,
/// so it is kept `Shared` between the many states that have the same one, with whether it is
/// linearizable decided once, when it is made.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct History {
    pub tester: LinearizabilityTester<Id, Sessions>,
    invoked: BTreeMap<Id, u64>,
    returned: BTreeMap<Id, u64>,
    linearizable: bool,
}

pub fn initial_history() -> Shared<History> {
    let tester = LinearizabilityTester::new(Sessions::default());
    Shared::new(History { tester, invoked: BTreeMap::new(), returned: BTreeMap::new(), linearizable: true })
}

impl History {
    pub fn is_linearizable(&self) -> bool {
        self.linearizable
    }

    fn done(mut self) -> Shared<History> {
        self.linearizable = self.tester.serialized_history().is_some();
        Shared::new(self)
    }

    /// For `ActorModel::record_msg_out`: the first send of each request is its invocation.
    pub fn record_out<C>(_: &C, history: &Shared<History>, env: Envelope<&Msg>) -> Option<Shared<History>> {
        let Msg::Request { seq, op } = env.msg else { return None };
        if history.invoked.get(&env.src) == Some(seq) {
            return None;
        }
        let mut next = History::clone(history);
        next.invoked.insert(env.src, *seq);
        let _ = next.tester.on_invoke(env.src, spec_op(op));
        Some(next.done())
    }

    /// For `ActorModel::record_msg_in`: the first final answer a client receives for its current
    /// request is the return (the client ignores answers to older requests and redirections).
    pub fn record_in<C>(_: &C, history: &Shared<History>, env: Envelope<&Msg>) -> Option<Shared<History>> {
        let Msg::Reply { seq, answer } = env.msg else { return None };
        let current = history.invoked.get(&env.dst) == Some(seq);
        if !current || history.returned.get(&env.dst) == Some(seq) || !answer.is_final() {
            return None;
        }
        let mut next = History::clone(history);
        next.returned.insert(env.dst, *seq);
        let _ = next.tester.on_return(env.dst, spec_ret(answer));
        Some(next.done())
    }
}

fn spec_op(op: &ClientOp) -> SpecOp {
    match op {
        ClientOp::New { .. } => SpecOp::New,
        ClientOp::Append { session, .. } => SpecOp::Append { session: *session },
        ClientOp::RemoveMember { .. } => SpecOp::Reconfigure,
    }
}

fn spec_ret(answer: &Answer) -> SpecRet {
    match answer {
        Answer::Created { session, .. } => SpecRet::Created { session: *session },
        Answer::Done => SpecRet::Done,
        other => SpecRet::Refused(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_session_id_after_an_acknowledged_create_is_not_linearizable() {
        let (a, b) = (Id::from(3), Id::from(4));
        let mut t = LinearizabilityTester::new(Sessions::default());
        t.on_invoke(a, SpecOp::New).unwrap();
        t.on_return(a, SpecRet::Created { session: 2 }).unwrap();
        t.on_invoke(b, SpecOp::New).unwrap();
        t.on_return(b, SpecRet::Created { session: 2 }).unwrap();
        assert!(t.serialized_history().is_none());
    }

    #[test]
    fn concurrent_creates_may_land_in_either_order() {
        let (a, b) = (Id::from(3), Id::from(4));
        let mut t = LinearizabilityTester::new(Sessions::default());
        t.on_invoke(a, SpecOp::New).unwrap();
        t.on_invoke(b, SpecOp::New).unwrap();
        t.on_return(a, SpecRet::Created { session: 3 }).unwrap();
        t.on_return(b, SpecRet::Created { session: 2 }).unwrap();
        assert!(t.serialized_history().is_some());
    }
}
