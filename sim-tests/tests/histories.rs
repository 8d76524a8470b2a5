//! Condensed histories of fixed seeds, as reviewed snapshots: any change in the engine's or the
//! simulator's behaviour shows up as a diff in `tests/snapshots/`. Review with `cargo insta review`
//! (or rerun with `INSTA_UPDATE=always` and read the diff) when a change is intended.

use sim_tests::load;
use truba_engine::Mutations;
use truba_sim::runner::run_seed;

fn snapshot(name: &str, seed: u64) {
    let r = run_seed(&load(name), seed, Mutations::default());
    assert!(r.violations.is_empty(), "{name} seed {seed} fails its checks: {:?}", r.violations[0]);
    insta::assert_snapshot!(format!("{name}-seed-{seed}"), r.output.history.condensed());
}

#[test]
fn small_crashes_seed_1() {
    snapshot("small-crashes", 1);
}

#[test]
fn small_crashes_seed_2() {
    snapshot("small-crashes", 2);
}

#[test]
fn small_crashes_seed_3() {
    snapshot("small-crashes", 3);
}
