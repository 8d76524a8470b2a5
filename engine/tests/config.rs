//! The cluster's replicated configuration: bootstrapped by the first leader, changed only by
//! committed entries, kept in snapshots, and followed whatever a node's own file says.

mod common;

use common::driver::*;
use std::collections::BTreeMap;
use truba_engine::{
    AppliedLimits, ClusterConfig, EngineConfig, Kind, KindConfig, Output, Query, QueryReply, Reply, Request,
    RequestError,
};

fn config(d: &mut Driver) -> ClusterConfig {
    match d.query(Query::Config) {
        QueryReply::Config(Ok(c)) => c,
        other => panic!("no configuration: {other:?}"),
    }
}

fn two_kinds() -> EngineConfig {
    let mut cfg = EngineConfig::default();
    cfg.kinds.insert(Kind(2), KindConfig { lease_ms: 7_000, ..KindConfig::default() });
    cfg
}

fn configure(
    d: &mut Driver,
    expect_version: u64,
    kinds: &BTreeMap<Kind, KindConfig>,
    limits: AppliedLimits,
) -> Result<Reply, RequestError> {
    d.req(9, Request::Configure { expect_version, kinds: kinds.clone(), limits })
}

#[test]
fn a_new_cluster_takes_its_first_leaders_file_as_configuration_version_1() {
    let mut d = Driver::booted(two_kinds(), 1);
    let c = config(&mut d);
    assert_eq!(c.version, 1);
    assert_eq!(c.kinds, two_kinds().kinds);
    assert_eq!(c.limits, AppliedLimits::from(&two_kinds().limits));
    assert_eq!(c.members.len(), 1);
}

#[test]
fn a_change_applies_whole_and_raises_the_version() {
    let mut d = Driver::booted(EngineConfig::default(), 2);
    assert_eq!(d.req(1, new(2, None)), Err(RequestError::UnknownKind(Kind(2))));
    let mut c = config(&mut d);
    c.kinds.insert(Kind(2), KindConfig { record_bytes_max: 10, ..KindConfig::default() });
    c.limits.sessions_max = 5;
    assert_eq!(configure(&mut d, 1, &c.kinds, c.limits), Ok(Reply::Configured { version: 2 }));
    let now = config(&mut d);
    assert_eq!((now.version, &now.kinds, now.limits), (2, &c.kinds, c.limits));
    // The new kind and its limits hold at once.
    created(d.req(1, new(2, Some(b"0123456789"))));
    assert_eq!(d.req(1, new(2, Some(b"01234567890"))), Err(RequestError::RecordTooLarge { size: 11, max: 10 }));
    for _ in 0..4 {
        created(d.req(1, new(1, None)));
    }
    assert_eq!(d.req(1, new(1, None)), Err(RequestError::TooManySessions { max: 5 }));
}

#[test]
fn a_change_based_on_an_old_version_or_invalid_is_refused_and_changes_nothing() {
    let mut d = Driver::booted(EngineConfig::default(), 3);
    let c = config(&mut d);
    let mut kinds = c.kinds.clone();
    kinds.insert(Kind(3), KindConfig::default());
    assert_eq!(configure(&mut d, 1, &kinds, c.limits), Ok(Reply::Configured { version: 2 }));
    // A second operator who read version 1 does not overwrite the first one's change unseen.
    assert_eq!(configure(&mut d, 1, &c.kinds, c.limits), Err(RequestError::ConfigVersion { expected: 1, current: 2 }));
    let mut bad = kinds.clone();
    bad.insert(Kind(4), KindConfig { record_bytes_max: 100, session_bytes_max: 10, ..KindConfig::default() });
    assert!(
        matches!(configure(&mut d, 2, &bad, c.limits), Err(RequestError::InvalidConfig(m)) if m.contains("kind 4"))
    );
    assert!(matches!(configure(&mut d, 2, &BTreeMap::new(), c.limits), Err(RequestError::InvalidConfig(_))));
    let zero = AppliedLimits { sessions_max: 0, ..c.limits };
    assert!(
        matches!(configure(&mut d, 2, &kinds, zero), Err(RequestError::InvalidConfig(m)) if m.contains("sessions_max"))
    );
    let now = config(&mut d);
    assert_eq!((now.version, now.kinds), (2, kinds));
}

#[test]
fn a_kind_that_still_has_sessions_cannot_be_removed() {
    let mut d = Driver::booted(two_kinds(), 4);
    let h = created(d.req(1, new(2, Some(b"x"))));
    let c = config(&mut d);
    let mut without = c.kinds.clone();
    without.remove(&Kind(2));
    assert_eq!(configure(&mut d, 1, &without, c.limits), Err(RequestError::KindInUse { kind: Kind(2), sessions: 1 }));
    assert_eq!(d.session(h.session).map(|v| v.kind), Ok(Kind(2)), "the session is untouched");
    d.req(1, Request::Delete { handle: h }).unwrap();
    assert_eq!(configure(&mut d, 1, &without, c.limits), Ok(Reply::Configured { version: 2 }));
    assert_eq!(d.req(1, new(2, None)), Err(RequestError::UnknownKind(Kind(2))));
}

/// The issue's report: a node restarted with a kind removed from its own file answered "does
/// not exist" for an acknowledged session of that kind. Now the replicated configuration rules,
/// and the node says where its file differs.
#[test]
fn a_node_whose_file_lost_a_kind_still_serves_that_kind_and_says_its_file_differs() {
    let mut d = Driver::booted(two_kinds(), 5);
    let h = created(d.req(1, new(2, Some(b"kept"))));
    let mut r = d.restart(EngineConfig::default(), 6);
    assert_eq!(r.session(h.session).map(|v| v.records), Ok(recs(&[b"kept"])));
    r.req(1, append(h, b"more")).unwrap();
    created(r.req(1, new(2, None)));
    let said: Vec<_> = r
        .since(0)
        .iter()
        .filter_map(|o| match o {
            Output::ConfigDiffers { version, differences } => Some((*version, differences.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(said, [(1, vec!["kind 2: in the cluster, not configured there".to_string()])]);
    // The lease of kind 2 is the cluster's (7 s), not the default that this file would give.
    assert_eq!(config(&mut r).kinds[&Kind(2)].lease_ms, 7_000);
}

#[test]
fn a_changed_configuration_survives_a_restart_from_the_log_and_from_a_snapshot() {
    let mut cfg = EngineConfig::default();
    cfg.limits.snapshot_every_entries = 5;
    cfg.limits.snapshot_log_bytes_max = 1;
    let mut d = Driver::booted(cfg.clone(), 7);
    let mut c = config(&mut d);
    c.kinds.insert(Kind(5), KindConfig::default());
    assert_eq!(configure(&mut d, 1, &c.kinds, c.limits), Ok(Reply::Configured { version: 2 }));
    let mut r = d.restart(cfg.clone(), 8);
    assert_eq!(config(&mut r).kinds, c.kinds, "replayed from the log");
    for _ in 0..20 {
        created(r.req(1, new(5, None)));
    }
    assert!(!r.files("snap-", "").is_empty(), "a snapshot was taken");
    let st = r.status();
    let mut r2 = r.restart(cfg, 9);
    let (applied, hash, _) = r2.recovered_since(0).expect("recovered");
    assert_eq!((applied, hash), (st.applied, st.state_hash), "the same state, configuration included");
    let after = config(&mut r2);
    assert_eq!((after.version, after.kinds), (2, c.kinds));
}
