//! Running seeds: one seed with full reporting, or a range with progress and a summary.

use crate::checkers::check;
use crate::history::Event;
use crate::scenario::Scenario;
use crate::world::{RunOutput, Violation, World};
use std::fmt::Write as _;
use std::path::Path;
use truba_engine::Mutations;

/// One seed's result.
pub struct SeedRun {
    pub seed: u64,
    pub output: RunOutput,
    pub violations: Vec<Violation>,
}

impl SeedRun {
    pub fn acked_ops(&self) -> u64 {
        self.output.history.events.iter().filter(|(_, e)| matches!(e, Event::Complete { outcome: Ok(_), .. })).count()
            as u64
    }
    pub fn deliveries(&self) -> u64 {
        self.output.history.events.iter().filter(|(_, e)| matches!(e, Event::Deliver { .. })).count() as u64
    }
    /// Delivery failures handlers reported (unreachable or failed).
    pub fn failed_deliveries(&self) -> u64 {
        self.output.history.events.iter().filter(|(_, e)| matches!(e, Event::DeliveryFailed { .. })).count() as u64
    }
    /// Answers readers got (a session, or "unknown" or "deleted").
    pub fn reads(&self) -> u64 {
        self.output.history.events.iter().filter(|(_, e)| matches!(e, Event::ReadComplete { .. })).count() as u64
    }
    /// What the readers of the ledger met (see [`StreamTally`]).
    pub fn streams(&self) -> StreamTally {
        let mut t = StreamTally::default();
        for (_, e) in &self.output.history.events {
            match e {
                Event::StreamItem { item, .. } => match item {
                    truba_engine::StreamItem::Entries { .. } => t.items += 1,
                    truba_engine::StreamItem::ResyncStart { .. } => t.resyncs += 1,
                    truba_engine::StreamItem::End(truba_engine::StreamError::Compacted { .. }) => t.compacted += 1,
                    truba_engine::StreamItem::End(truba_engine::StreamError::TooSlow { .. }) => t.cut_off += 1,
                    _ => {}
                },
                Event::ConsumerComplete { outcome, .. } => match outcome {
                    Ok(truba_engine::Reply::Committed { .. }) => t.commits += 1,
                    Err(truba_engine::RequestError::StaleEpoch { .. }) => t.fenced += 1,
                    Err(truba_engine::RequestError::CommitOpFailed { .. }) => t.refused += 1,
                    _ => {}
                },
                Event::ReadThroughComplete { reply: Ok(_), .. } => t.read_throughs += 1,
                _ => {}
            }
        }
        t
    }

    /// Sessions in a dead-letter set at the end.
    pub fn dead(&self) -> u64 {
        let finals = self.output.final_sessions.iter().flatten();
        finals.filter(|v| matches!(v.state, truba_engine::SessionState::Dead { .. })).count() as u64
    }
}

/// Runs one seed. An engine assertion that fails (the engines check their invariants after
/// every step, in release builds too) is reported as a violation of `engine-invariant`, with
/// the history up to that point, rather than ending the whole run.
pub fn run_seed(scenario: &Scenario, seed: u64, mutations: Mutations) -> SeedRun {
    let mut world = World::new(scenario, seed, mutations);
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| world.simulate())) {
        Ok(()) => {
            let output = world.finish();
            let violations = check(&output);
            SeedRun { seed, output, violations }
        }
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a non-string panic".into());
            let output = world.aborted();
            let at_us = output.end_us;
            let violations = vec![Violation { property: "engine-invariant", at_us, detail, session: None }];
            SeedRun { seed, output, violations }
        }
    }
}

/// The exact command that replays one seed.
pub fn repro_command(path: &Path, seed: u64, mutation: Option<&str>) -> String {
    let mut cmd = String::from("cargo run --release -p truba-sim");
    if mutation.is_some() {
        cmd.push_str(" --features mutations");
    }
    let _ = write!(cmd, " -- run {} --seed {seed} --history", path.display());
    if let Some(m) = mutation {
        let _ = write!(cmd, " --mutation {m}");
    }
    cmd
}

/// A failure report: scenario, seed, the first violated property, the events that show it, and
/// the command that reproduces it.
pub fn failure_report(path: &Path, run: &SeedRun, mutation: Option<&str>) -> String {
    let v = &run.violations[0];
    let mut out = String::new();
    let _ = writeln!(out, "FAILED  scenario {} ({}), seed {}", run.output.scenario.name, path.display(), run.seed);
    let _ = writeln!(out, "  property: {}", v.property);
    let _ = writeln!(out, "  at {:.3} s: {}", v.at_us as f64 / 1e6, v.detail);
    if run.violations.len() > 1 {
        let mut others: Vec<&str> = Vec::new();
        for v in &run.violations[1..] {
            if !others.contains(&v.property) {
                others.push(v.property);
            }
        }
        let _ = writeln!(out, "  ({} further violations: {})", run.violations.len() - 1, others.join(", "));
    }
    let lines = run.output.history.condensed();
    let related: Vec<&str> = match v.session {
        Some(id) => {
            // A reader's lines name the session as `get {id}`, at the end or before a space.
            let (needle, get, get_sp) = (format!(" {id}@"), format!("get {id}"), format!("get {id} "));
            let read = |l: &str| l.ends_with(&get) || l.contains(&get_sp);
            lines.lines().filter(|l| l.contains(&needle) || read(l) || l.contains("replica")).collect()
        }
        None => lines.lines().filter(|l| l.contains("replica") || l.contains("fault")).collect(),
    };
    let _ = writeln!(out, "  events ({} of {}, last 40 shown):", related.len(), lines.lines().count());
    for l in related.iter().rev().take(40).rev() {
        let _ = writeln!(out, "    {l}");
    }
    let _ = writeln!(out, "  reproduce: {}", repro_command(path, run.seed, mutation));
    out
}

/// What the readers of the ledger met in a run: entry items received, resyncs begun, streams
/// told their position was compacted away or cut off as too slow, consumer commits applied,
/// stale ones fenced and ones refused whole, and read-throughs answered.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamTally {
    pub items: u64,
    pub resyncs: u64,
    pub compacted: u64,
    pub cut_off: u64,
    pub commits: u64,
    pub fenced: u64,
    pub refused: u64,
    pub read_throughs: u64,
}

impl StreamTally {
    fn add(&mut self, o: StreamTally) {
        self.items += o.items;
        self.resyncs += o.resyncs;
        self.compacted += o.compacted;
        self.cut_off += o.cut_off;
        self.commits += o.commits;
        self.fenced += o.fenced;
        self.refused += o.refused;
        self.read_throughs += o.read_throughs;
    }
}

/// Totals over a range of seeds.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub scenario: String,
    pub seeds: u64,
    pub failed: u64,
    pub first_failing_seed: Option<u64>,
    pub events: u64,
    pub acked_ops: u64,
    pub deliveries: u64,
    pub failed_deliveries: u64,
    pub dead: u64,
    pub crashes: u64,
    pub hash_checks: u64,
    pub sources_written: u64,
    pub sources_merged: u64,
    pub sources_installed: u64,
    pub crashes_mid_merge: u64,
    pub member_changes: u64,
    pub transfers: u64,
    pub member_refusals: u64,
    pub reads: u64,
    pub streams: StreamTally,
    pub virtual_s: f64,
}

impl Summary {
    pub fn add(&mut self, r: &SeedRun) {
        self.seeds += 1;
        if !r.violations.is_empty() {
            self.failed += 1;
            self.first_failing_seed.get_or_insert(r.seed);
        }
        self.events += r.output.stats.events;
        self.acked_ops += r.acked_ops();
        self.deliveries += r.deliveries();
        self.failed_deliveries += r.failed_deliveries();
        self.dead += r.dead();
        self.crashes += r.output.stats.crashes;
        self.hash_checks += r.output.stats.hash_checks;
        self.sources_written += r.output.stats.sources_written;
        self.sources_merged += r.output.stats.sources_merged;
        self.sources_installed += r.output.stats.sources_installed;
        self.crashes_mid_merge += r.output.stats.crashes_mid_merge;
        self.member_changes += r.output.stats.member_changes;
        self.transfers += r.output.stats.transfers;
        self.member_refusals += r.output.stats.member_refusals;
        self.reads += r.reads();
        self.streams.add(r.streams());
        self.virtual_s += r.output.stats.virtual_us as f64 / 1e6;
    }

    pub fn table(rows: &[Summary]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<22} {:>7} {:>7} {:>11} {:>10} {:>10} {:>8} {:>6} {:>8} {:>8} {:>8} {:>20} {:>24} {:>14}",
            "scenario",
            "seeds",
            "failed",
            "events",
            "acked ops",
            "delivered",
            "h-failed",
            "dead",
            "crashes",
            "hash ok",
            "reads",
            "src wr/mrg/inst/cut",
            "stream it/rs/cmt/fen/rt",
            "members ch/tr/rf"
        );
        for r in rows {
            let _ = writeln!(
                out,
                "{:<22} {:>7} {:>7} {:>11} {:>10} {:>10} {:>8} {:>6} {:>8} {:>8} {:>8} {:>20} {:>24} {:>14}",
                r.scenario,
                r.seeds,
                r.failed,
                r.events,
                r.acked_ops,
                r.deliveries,
                r.failed_deliveries,
                r.dead,
                r.crashes,
                r.hash_checks,
                r.reads,
                format!("{}/{}/{}/{}", r.sources_written, r.sources_merged, r.sources_installed, r.crashes_mid_merge),
                {
                    let t = r.streams;
                    format!("{}/{}/{}/{}/{}", t.items, t.resyncs, t.commits, t.fenced, t.read_throughs)
                },
                format!("{}/{}/{}", r.member_changes, r.transfers, r.member_refusals)
            );
        }
        out
    }
}
