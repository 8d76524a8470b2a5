//! The properties checked in every explored state.
//!
//! `always` properties are safety: one leader per term, log matching, agreement on committed
//! entries, committed entries held by a majority, acknowledged sessions surviving, linearizable
//! client histories, and no engine assertion failing. `sometimes` properties show that the
//! exploration reaches states where those mean something: without a leader, a re-election, an
//! acknowledgement and a restart within the bound, the safety properties would hold vacuously.

use crate::replica::ReplicaState;
use crate::system::{clients, replicas, Answer, System, SystemState};
use stateright::Expectation::{Always, Sometimes};

pub const ONE_LEADER_PER_TERM: &str = "one leader per term";
pub const LOG_MATCHING: &str = "log matching";
pub const COMMITTED_AGREE: &str = "committed entries agree";
pub const COMMITTED_ON_MAJORITY: &str = "committed entries are on a majority";
pub const ACKED_SURVIVES: &str = "acknowledged session survives";
pub const LINEARIZABLE: &str = "linearizable";
pub const ENGINE_HEALTHY: &str = "no engine assertion or stop";
pub const LEADER_ELECTED: &str = "a leader is elected";
pub const RE_ELECTED: &str = "a leader is elected in term 2 or later";
pub const CLIENT_ACKED: &str = "a client is acknowledged";
pub const RESTARTED_SERVES: &str = "a restarted replica serves";

/// The safety properties, whose discovery is a counterexample.
pub const SAFETY: [&str; 7] = [
    ONE_LEADER_PER_TERM,
    LOG_MATCHING,
    COMMITTED_AGREE,
    COMMITTED_ON_MAJORITY,
    ACKED_SURVIVES,
    LINEARIZABLE,
    ENGINE_HEALTHY,
];

pub fn add(model: System) -> System {
    model
        .property(Always, ONE_LEADER_PER_TERM, |_, s| pairs(s).all(|(a, b)| a.led.is_disjoint(&b.led)))
        .property(Always, LOG_MATCHING, |_, s| pairs(s).all(|(a, b)| logs_match(&a.view.log, &b.view.log)))
        .property(Always, COMMITTED_AGREE, |_, s| pairs(s).all(|(a, b)| committed_agree(a, b)))
        .property(Always, COMMITTED_ON_MAJORITY, |_, s| committed_on_majority(s))
        .property(Always, ACKED_SURVIVES, |_, s| acknowledged_sessions_survive(s))
        .property(Always, LINEARIZABLE, |_, s| s.history.is_linearizable())
        .property(Always, ENGINE_HEALTHY, |_, s| replicas(s).all(|r| r.view.failed.is_none()))
        .property(Sometimes, LEADER_ELECTED, |_, s| replicas(s).any(|r| r.view.leader))
        .property(Sometimes, RE_ELECTED, |_, s| replicas(s).any(|r| r.led.iter().any(|t| *t >= 2)))
        .property(Sometimes, CLIENT_ACKED, |_, s| clients(s).flat_map(|c| &c.answers).any(|(_, a)| a.is_success()))
        .property(Sometimes, RESTARTED_SERVES, |_, s| replicas(s).any(|r| r.life.restarts > 0 && r.view.serving))
}

/// Every unordered pair of replicas. A crashed replica keeps its last state in the model, and is
/// compared too: what it held before the crash was held.
fn pairs(state: &SystemState) -> impl Iterator<Item = (&ReplicaState, &ReplicaState)> {
    let all: Vec<&ReplicaState> = replicas(state).collect();
    let n = all.len();
    (0..n).flat_map(move |i| (i + 1..n).map(move |j| (i, j))).map(move |(i, j)| (all[i], all[j]))
}

/// Raft's log matching: if two logs hold an entry with the same index and term, they hold the
/// same terms at every index before it. Term 0 marks an entry a log no longer holds.
fn logs_match(a: &[u64], b: &[u64]) -> bool {
    let common = a.iter().zip(b).rposition(|(x, y)| x == y && *x != 0);
    let Some(last) = common else { return true };
    a[..last].iter().zip(&b[..last]).all(|(x, y)| x == y || *x == 0 || *y == 0)
}

/// Entries both replicas consider committed have the same term on both.
fn committed_agree(a: &ReplicaState, b: &ReplicaState) -> bool {
    let upto = a.view.commit.min(b.view.commit) as usize;
    a.view.log.iter().zip(&b.view.log).take(upto).all(|(x, y)| x == y || *x == 0 || *y == 0)
}

/// Every entry a replica considers committed is held, with the same term, by a majority of the
/// replicas. Raft commits an entry only once a majority holds it durably, and no replica of that
/// majority ever gives it up (a crash keeps what was fsynced, and only uncommitted entries are
/// ever cut), so this holds in every state, and it is the first thing a premature commit breaks.
fn committed_on_majority(state: &SystemState) -> bool {
    let all: Vec<&ReplicaState> = replicas(state).collect();
    let majority = all.len() / 2 + 1;
    let held = |i: usize, term: u64| all.iter().filter(|r| r.view.log.get(i) == Some(&term)).count();
    all.iter().all(|r| {
        let committed = r.view.log.iter().take(r.view.commit as usize).enumerate();
        committed.filter(|(_, t)| **t != 0).all(|(i, t)| held(i, *t) >= majority)
    })
}

/// Once a client holds "created session s", every replica that has applied index s (the entry
/// that created it) has the session.
fn acknowledged_sessions_survive(state: &SystemState) -> bool {
    let acked: Vec<u64> = clients(state)
        .flat_map(|c| &c.answers)
        .filter_map(|(_, a)| match a {
            Answer::Created { session, .. } => Some(*session),
            _ => None,
        })
        .collect();
    acked.iter().all(|s| replicas(state).all(|r| r.view.applied < *s || r.view.sessions.contains(s)))
}
