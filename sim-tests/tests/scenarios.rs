//! Every scenario in `scenarios/` over its `ci_seeds` seeds, with every checker on. A scenario
//! file added to the directory without a test here fails `every_scenario_file_is_tested`.

use sim_tests::{load, run_clean, run_clean_seeds, scenarios_dir};

/// The checkers must have had something to check: a run that acknowledged nothing, delivered
/// nothing, or (where the scenario crashes the replica) compared no recovered state would pass
/// vacuously.
fn scenario(name: &str) {
    let s = load(name);
    let summary = run_clean(name, s.ci_seeds);
    assert!(summary.acked_ops > summary.seeds * 20, "{name}: too few acknowledged operations to mean anything");
    assert!(summary.deliveries > 0, "{name}: nothing was ever delivered");
    let handlers_fail = s.kinds.values().any(|k| !k.handler.down_s.is_empty() || k.handler.flap_ms.is_some());
    if handlers_fail {
        assert!(summary.failed_deliveries > 0, "{name}: handler outages were configured but no delivery failed");
    }
    if s.kinds.values().any(|k| k.config.max_attempts > 0) && handlers_fail {
        assert!(
            summary.dead > 0,
            "{name}: nothing reached a dead-letter set, so the dead-letter rule was not exercised"
        );
    }
    if s.limits.stored_memtable_bytes_max < 64 * 1024 {
        assert!(
            summary.sources_written > 0 && summary.sources_merged > 0,
            "{name}: a small memtable was configured but no source was spilled and merged"
        );
        if s.replicas > 1 {
            assert!(summary.sources_installed > 0, "{name}: no snapshot install carried source files");
        }
        if s.faults.crash_every_ms.is_some() {
            assert!(summary.crashes_mid_merge > 0, "{name}: no crash cut a merge off half way");
        }
    }
    if s.faults.crash_every_ms.is_some() {
        assert!(summary.crashes > 0 && summary.hash_checks > 0, "{name}: crashes were configured but not exercised");
    }
    let t = summary.streams;
    if s.streams.tailers + s.streams.watchers > 0 {
        assert!(t.items > summary.seeds * 100, "{name}: readers were configured but hardly any entry reached them");
    }
    if s.streams.watchers > 0 {
        assert!(t.resyncs >= summary.seeds, "{name}: watchers were configured but few resyncs happened");
    }
    if s.streams.consumers > 0 {
        assert!(t.commits > summary.seeds * 10, "{name}: consumers were configured but few commits applied");
        if s.streams.bad_op_share > 0.0 {
            assert!(t.refused > 0, "{name}: no commit was refused whole for an operation in it");
        }
        if s.streams.zombie_share > 0.0 && s.streams.crash_every_ms.is_some() {
            assert!(t.fenced > 0, "{name}: no stale consumer's commit was fenced");
        }
    }
    if s.streams.pipeline_readers > 0 {
        assert!(t.read_throughs > 0, "{name}: no read-through was answered");
    }
    if s.membership.changes() {
        assert!(summary.member_changes > summary.seeds * 3, "{name}: few membership changes were committed");
        assert!(summary.transfers > 0, "{name}: no leadership transfer started");
        assert!(summary.member_refusals > 0, "{name}: the leader never had to refuse a change by the rules");
    }
    if s.workload.readers > 0 {
        assert!(
            summary.reads > summary.seeds * 100,
            "{name}: readers were configured but hardly any read was answered"
        );
    }
}

macro_rules! scenario_tests {
    ($($test:ident => $name:literal),* $(,)?) => {
        $( #[test] fn $test() { scenario($name) } )*
        const TESTED: &[&str] = &[$($name),*];
    };
}

scenario_tests! {
    steady => "steady",
    readers => "readers",
    crash_loop => "crash-loop",
    bit_rot => "bit-rot",
    disk_full => "disk-full",
    clock_steps => "clock-steps",
    redelivery_storm => "redelivery-storm",
    swarm => "swarm",
    small_crashes => "small-crashes",
    cluster_faults => "cluster-faults",
    cluster_five => "cluster-five",
    cluster_elections => "cluster-elections",
    cluster_bit_rot => "cluster-bit-rot",
    cluster_votes => "cluster-votes",
    handler_flapping => "handler-flapping",
    handler_outage => "handler-outage",
    handler_outage_hour => "handler-outage-hour",
    crash_storm => "crash-storm",
    cluster_delivery => "cluster-delivery",
    cluster_clock_steps => "cluster-clock-steps",
    source_merge_crash => "source-merge-crash",
    cluster_sources => "cluster-sources",
    cluster_reads => "cluster-reads",
    cluster_readers => "cluster-readers",
    cluster_config_drift => "cluster-config-drift",
    cluster_membership => "cluster-membership",
    cluster_lost_state => "cluster-lost-state",
}

#[test]
fn every_scenario_file_is_tested() {
    let mut files: Vec<String> = std::fs::read_dir(scenarios_dir())
        .expect("scenarios directory")
        .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_suffix(".toml").map(String::from))
        .collect();
    files.sort();
    let mut tested: Vec<String> = TESTED.iter().map(|s| s.to_string()).collect();
    tested.sort();
    assert_eq!(files, tested, "scenarios/ and the tests in sim-tests/tests/scenarios.rs differ");
}

/// Seeds beyond the CI ranges that once found a bug, kept so that the bug stays fixed (a
/// change in timing may move a bug to other seeds, so these are a floor, not a proof).
#[test]
fn seeds_that_once_failed() {
    let found: &[(&str, u64, &str)] = &[
        ("bit-rot", 821, "checker: a dedup retry answered after the session was redelivered"),
        ("bit-rot", 2980, "an fsynced delete in the last record cut as a torn tail"),
        ("crash-loop", 820, "checker: a deleted answer while another delete was in flight"),
        ("cluster-elections", 293, "a truncation durable before the removal of later segments"),
        ("cluster-bit-rot", 220, "a leader kept resending above a repaired follower's end"),
        ("swarm", 5005, "checker: a read-through between a consumer's open and its first commit"),
        ("cluster-membership", 296, "two removed members sent clients back and forth with stale leader hints"),
    ];
    for &(name, seed, what) in found {
        eprintln!("{name} seed {seed}: {what}");
        run_clean_seeds(name, [seed]);
    }
}
