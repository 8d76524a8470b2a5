//! Every checker is shown to catch something: each deliberate bug, switched on through the
//! engine's `mutations` feature, must make the named property fail within 200 seeds of the
//! named scenario. A mutation that slips through means a checker (or a scenario) lost its teeth.

use sim_tests::first_failure;

const SEEDS_MAX: u64 = 200;

fn caught(mutation: &str, scenario: &str, properties: &[&str]) {
    let Some(run) = first_failure(scenario, mutation, SEEDS_MAX) else {
        panic!("mutation {mutation} survived {SEEDS_MAX} seeds of {scenario}");
    };
    let first = &run.violations[0];
    eprintln!("mutation {mutation}: caught in {scenario} seed {} by {}: {}", run.seed, first.property, first.detail);
    assert!(
        run.violations.iter().any(|v| properties.contains(&v.property)),
        "mutation {mutation} was caught, but by {:?} rather than {properties:?}",
        run.violations.iter().map(|v| v.property).collect::<Vec<_>>()
    );
}

#[test]
fn ack_before_fsync_is_caught() {
    caught("ack-before-fsync", "crash-loop", &["acknowledged-survives", "session-records"]);
}

#[test]
fn truncating_at_mid_log_corruption_is_caught() {
    caught("truncate-mid-log", "bit-rot", &["acknowledged-survives", "session-records", "state-hash"]);
}

#[test]
fn applying_a_retry_twice_is_caught() {
    caught("apply-retry-twice", "crash-loop", &["exactly-once", "session-records", "delete-is-final"]);
}

#[test]
fn redelivering_early_is_caught() {
    caught("redeliver-early", "steady", &["no-early-redelivery"]);
}

#[test]
fn recomputing_jitter_on_apply_is_caught() {
    caught("recompute-jitter", "crash-loop", &["state-hash"]);
}

#[test]
fn skipping_the_fsync_of_recovered_data_is_caught() {
    caught("skip-recovery-fsync", "crash-loop", &["acknowledged-survives", "session-records", "state-hash"]);
}
