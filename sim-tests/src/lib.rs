//! Shared helpers for the simulation test suite: where the scenarios live and how a range of
//! seeds is run and reported. The tests themselves are in `tests/`.

use std::path::PathBuf;
use truba_engine::Mutations;
use truba_sim::runner::{failure_report, run_seed, SeedRun, Summary};
use truba_sim::scenario::Scenario;

/// The workspace's `scenarios/` directory.
pub fn scenarios_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

pub fn scenario_path(name: &str) -> PathBuf {
    scenarios_dir().join(format!("{name}.toml"))
}

pub fn load(name: &str) -> Scenario {
    Scenario::load(&scenario_path(name)).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs seeds `0..n`, panicking with the full failure report at the first failing seed.
pub fn run_clean(name: &str, n: u64) -> Summary {
    run_clean_seeds(name, 0..n)
}

/// Runs the given seeds of a scenario with no mutation; panics with the failure report at the
/// first violation.
pub fn run_clean_seeds(name: &str, seeds: impl IntoIterator<Item = u64>) -> Summary {
    let scenario = load(name);
    let mut summary = Summary { scenario: name.into(), ..Default::default() };
    for seed in seeds {
        let r = run_seed(&scenario, seed, Mutations::default());
        summary.add(&r);
        if !r.violations.is_empty() {
            panic!("\n{}", failure_report(&scenario_path(name), &r, None));
        }
    }
    eprintln!("{}", Summary::table(std::slice::from_ref(&summary)));
    summary
}

/// Runs seeds `0..n` with a mutation on; returns the first run in which one of `properties`
/// fails (other properties may fail first, in it or in earlier seeds), if any.
pub fn first_failure(name: &str, mutation: &str, n: u64, properties: &[&str]) -> Option<SeedRun> {
    let scenario = load(name);
    let m = Mutations::from_name(mutation).expect("known mutation");
    (0..n)
        .map(|seed| run_seed(&scenario, seed, m))
        .find(|r| r.violations.iter().any(|v| properties.contains(&v.property)))
}
