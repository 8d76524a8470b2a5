//! Membership: who votes, who only learns, and how that changes while the cluster serves.
//!
//! Changes are Raft's single-server changes, not joint consensus. One change adds a learner,
//! promotes a learner to voter, or removes one member, so the majorities of the configurations
//! before and after any one change always overlap, and no two leaders can be chosen by disjoint
//! quorums. Joint consensus would allow arbitrary changes in one step, at the price of a second
//! entry per change and quorums counted twice in every path that counts. Operators here change
//! one member at a time anyway (add a learner, let it catch up, promote it), so the simpler
//! protocol gives them everything with less to get wrong.
//!
//! Single-server changes are safe only with three rules, all enforced by the leader before it
//! proposes a change (see `Engine::check_member_change`):
//! - A configuration takes effect on a replica as soon as its entry is in the replica's log,
//!   committed or not (and is undone if the entry is cut off). A replica always uses the latest
//!   configuration in its log (see `Engine::members`).
//! - At most one change is in flight: a leader proposes a change only once the previous one is
//!   committed. Otherwise two uncommitted changes could be two steps apart, with disjoint
//!   majorities.
//! - A new leader proposes a change only after it has committed an entry of its own term (the
//!   fix Ongaro published in 2015 for the bug in the original single-server algorithm: without
//!   it, a change left uncommitted by a deposed leader and a new leader's change can both take
//!   effect from configurations whose majorities do not overlap).
//!
//! A learner is promoted only once it holds everything committed, so that the new voter does not
//! leave the cluster unable to commit while it catches up (with three voters and one promoted
//! learner that lags, a single failure would stall every write).

use crate::config::MemberRole;
use crate::error::RequestError;
use crate::types::ReplicaId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The members of a configuration and what each one does.
pub type Members = BTreeMap<ReplicaId, MemberRole>;

/// Most voters a configuration may have: more makes every commit wait for more acknowledgements
/// without surviving a failure that fewer could not.
pub const VOTERS_MAX: usize = 7;
/// Most members (voters and learners) a configuration may have: every member is sent every entry.
pub const MEMBERS_MAX: usize = 16;

/// One change to the membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// A new member that replicates everything, never votes and never counts.
    AddLearner(ReplicaId),
    /// A caught-up learner becomes a voter.
    Promote(ReplicaId),
    /// A learner or voter leaves (not the leader: it transfers leadership first).
    Remove(ReplicaId),
}

impl MemberChange {
    pub fn member(&self) -> ReplicaId {
        match *self {
            MemberChange::AddLearner(id) | MemberChange::Promote(id) | MemberChange::Remove(id) => id,
        }
    }
}

impl std::fmt::Display for MemberChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemberChange::AddLearner(id) => write!(f, "add learner {id}"),
            MemberChange::Promote(id) => write!(f, "promote {id}"),
            MemberChange::Remove(id) => write!(f, "remove {id}"),
        }
    }
}

/// The members after `change`, or why it cannot be made to `members`.
pub fn changed(members: &Members, change: MemberChange) -> Result<Members, RequestError> {
    let refuse = |why: String| Err(RequestError::InvalidMemberChange(why));
    let mut next = members.clone();
    match change {
        MemberChange::AddLearner(id) => {
            if members.contains_key(&id) {
                return refuse(format!("{id} is already a member"));
            }
            if members.len() >= MEMBERS_MAX {
                return refuse(format!("the cluster has its limit of {MEMBERS_MAX} members"));
            }
            next.insert(id, MemberRole::Learner);
        }
        MemberChange::Promote(id) => match members.get(&id) {
            None => return refuse(format!("{id} is not a member; add it as a learner first")),
            Some(MemberRole::Voter) => return refuse(format!("{id} is already a voter")),
            Some(MemberRole::Learner) if voter_count(members) >= VOTERS_MAX => {
                return refuse(format!("the cluster has its limit of {VOTERS_MAX} voters"));
            }
            Some(MemberRole::Learner) => {
                next.insert(id, MemberRole::Voter);
            }
        },
        MemberChange::Remove(id) => match members.get(&id) {
            None => return refuse(format!("{id} is not a member")),
            Some(MemberRole::Voter) if voter_count(members) == 1 => {
                return refuse(format!("{id} is the last voter"));
            }
            Some(_) => {
                next.remove(&id);
            }
        },
    }
    Ok(next)
}

pub fn is_voter(members: &Members, id: ReplicaId) -> bool {
    members.get(&id) == Some(&MemberRole::Voter)
}

pub fn voters(members: &Members) -> impl Iterator<Item = ReplicaId> + '_ {
    members.iter().filter(|(_, r)| **r == MemberRole::Voter).map(|(id, _)| *id)
}

pub fn voter_count(members: &Members) -> usize {
    voters(members).count()
}

/// How many voters make a quorum.
pub fn majority(members: &Members) -> usize {
    voter_count(members) / 2 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Members {
        (1..=3).map(|i| (ReplicaId(i), MemberRole::Voter)).collect()
    }

    #[test]
    fn a_learner_joins_then_votes() {
        let m = changed(&three(), MemberChange::AddLearner(ReplicaId(4))).unwrap();
        assert_eq!(m.get(&ReplicaId(4)), Some(&MemberRole::Learner));
        assert_eq!(majority(&m), 2, "a learner does not count");
        let m = changed(&m, MemberChange::Promote(ReplicaId(4))).unwrap();
        assert_eq!(majority(&m), 3);
        let m = changed(&m, MemberChange::Remove(ReplicaId(1))).unwrap();
        assert_eq!(voters(&m).collect::<Vec<_>>(), vec![ReplicaId(2), ReplicaId(3), ReplicaId(4)]);
    }

    #[test]
    fn impossible_changes_are_refused_and_change_nothing() {
        let m = three();
        for change in [
            MemberChange::AddLearner(ReplicaId(1)),
            MemberChange::Promote(ReplicaId(9)),
            MemberChange::Promote(ReplicaId(2)),
            MemberChange::Remove(ReplicaId(9)),
        ] {
            assert!(matches!(changed(&m, change), Err(RequestError::InvalidMemberChange(_))), "{change}");
        }
        let one: Members = [(ReplicaId(1), MemberRole::Voter)].into();
        assert!(changed(&one, MemberChange::Remove(ReplicaId(1))).is_err(), "the last voter stays");
        let full: Members = (0..MEMBERS_MAX as u32).map(|i| (ReplicaId(i), MemberRole::Learner)).collect();
        assert!(changed(&full, MemberChange::AddLearner(ReplicaId(99))).is_err());
    }
}
