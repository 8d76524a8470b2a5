//! `truba-sim`: run scenarios over seeds, replay one seed, measure the simulator.

use clap::{Parser, Subcommand};
use std::io::{IsTerminal as _, Write as _};
use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use truba_engine::Mutations;
use truba_sim::downtime::{self, TimeoutRange};
use truba_sim::runner::{failure_report, run_seed, Summary};
use truba_sim::scenario::Scenario;

#[derive(Parser)]
#[command(name = "truba-sim", version, about = "Deterministic simulator for the truba engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario file (or every *.toml in a directory) over a range of seeds.
    Run {
        /// Scenario file or directory.
        path: PathBuf,
        /// Seed range, half-open: 0..1000.
        #[arg(long, value_parser = parse_range, conflicts_with = "seed")]
        seeds: Option<Range<u64>>,
        /// One seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Draw fault probabilities from each seed, whatever the scenario file says.
        #[arg(long)]
        swarm: bool,
        /// Switch on a deliberate bug (needs a build with `--features mutations`).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(Mutations::NAMES))]
        mutation: Option<String>,
        /// Print the condensed history of each seed.
        #[arg(long)]
        history: bool,
        /// Keep going after a failing seed (the default stops at the first).
        #[arg(long)]
        keep_going: bool,
    },
    /// Measure the engine's throughput with an in-memory disk that costs nothing.
    BenchEngine {
        /// Appends to complete.
        #[arg(long, default_value_t = 1_000_000)]
        ops: u64,
        /// Concurrent clients, each with one append outstanding.
        #[arg(long, default_value_t = 64)]
        clients: u32,
        #[arg(long, default_value_t = 256)]
        record_bytes: u32,
        /// Repeat the measurement this many times and report each run and the median.
        #[arg(long, default_value_t = 5)]
        runs: u32,
    },
    /// Measure simulated seconds per wall second and events per second.
    Bench {
        path: PathBuf,
        #[arg(long, value_parser = parse_range, default_value = "0..20")]
        seeds: Range<u64>,
    },
    /// Measure the unavailability of a leadership transfer: from the operator's request until
    /// the new leader has committed its first entry (see `downtime::run_transfer_trial`).
    TransferDowntime {
        #[arg(long, default_value_t = 100)]
        trials: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Election timeout range in ms.
        #[arg(long, default_value = "150-300")]
        range: TimeoutRange,
    },
    /// Measure the time without a leader after a leader crash, per election timeout range, with
    /// and without pre-vote (Figure 16 of the Raft paper; see the `downtime` module).
    ElectionDowntime {
        /// Trials per row [default: 1000, and 100 for a range without spread].
        #[arg(long)]
        trials: Option<u32>,
        /// Master seed; every trial's seed derives from it.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Election timeout ranges in ms, comma-separated, e.g. 150-150,150-300 [default: the
        /// paper's ten].
        #[arg(long, value_delimiter = ',')]
        ranges: Vec<TimeoutRange>,
        /// Only the rows with pre-vote.
        #[arg(long, conflicts_with = "no_prevote_only")]
        prevote_only: bool,
        /// Only the rows without pre-vote.
        #[arg(long)]
        no_prevote_only: bool,
        /// Print JSON instead of a markdown table.
        #[arg(long)]
        json: bool,
    },
}

fn parse_range(s: &str) -> Result<Range<u64>, String> {
    let (a, b) = s.split_once("..").ok_or("expected A..B, e.g. 0..1000")?;
    let a: u64 = a.parse().map_err(|e| format!("{a}: {e}"))?;
    let b: u64 = b.parse().map_err(|e| format!("{b}: {e}"))?;
    if a >= b {
        return Err(format!("empty range {a}..{b}"));
    }
    Ok(a..b)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { path, seeds, seed, swarm, mutation, history, keep_going } => {
            let seeds = seeds.unwrap_or_else(|| seed.map_or(0..100, |s| s..s + 1));
            run(path, seeds, swarm, mutation, history, keep_going)
        }
        Command::Bench { path, seeds } => bench(path, seeds),
        Command::BenchEngine { ops, clients, record_bytes, runs } => bench_engine(ops, clients, record_bytes, runs),
        Command::TransferDowntime { trials, seed, range } => transfer_downtime(trials, seed, range),
        Command::ElectionDowntime { trials, seed, ranges, prevote_only, no_prevote_only, json } => {
            let pre_vote: &[bool] = match (prevote_only, no_prevote_only) {
                (true, _) => &[true],
                (_, true) => &[false],
                _ => &[true, false],
            };
            election_downtime(trials, seed, ranges, pre_vote, json)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("truba-sim: {e}");
            ExitCode::from(2)
        }
    }
}

fn transfer_downtime(trials: u32, seed: u64, range: TimeoutRange) -> Result<bool, String> {
    println!(
        "{} replicas; one-way network delay uniform {:.1}-{:.1} ms; fsync {:.1} ms; pre-vote and check-quorum on; \
         the transfer is asked at a random point of a heartbeat interval, to a random follower; unavailability = \
         from the request until the new leader has committed its first entry",
        downtime::REPLICAS,
        downtime::NET_DELAY_US_MIN as f64 / 1000.0,
        downtime::NET_DELAY_US_MAX as f64 / 1000.0,
        downtime::FSYNC_US as f64 / 1000.0
    );
    let mut times = Vec::new();
    let mut failed = 0;
    for trial in 0..trials {
        match downtime::run_transfer_trial(range, downtime::trial_seed(seed, trial)) {
            Ok(us) => times.push(us),
            Err(why) => {
                failed += 1;
                eprintln!("trial {trial}: {why}");
            }
        }
    }
    times.sort_unstable();
    let pct = |p: f64| times.get(((times.len() as f64 - 1.0) * p).round() as usize).map(|us| *us as f64 / 1000.0);
    let show = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.1}"));
    println!("| timeout (ms) | trials | failed | median (ms) | p90 | p99 | max |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {range} | {trials} | {failed} | {} | {} | {} | {} |",
        show(pct(0.5)),
        show(pct(0.9)),
        show(pct(0.99)),
        show(pct(1.0))
    );
    Ok(failed == 0)
}

fn run(
    path: PathBuf,
    seeds: Range<u64>,
    swarm: bool,
    mutation: Option<String>,
    history: bool,
    keep_going: bool,
) -> Result<bool, String> {
    let mutations = match &mutation {
        None => Mutations::default(),
        Some(_) if !cfg!(feature = "mutations") => {
            return Err("--mutation needs a build with `--features mutations`".into());
        }
        Some(name) => Mutations::from_name(name).ok_or_else(|| format!("unknown mutation {name}"))?,
    };
    let scenarios = Scenario::load_all(&path).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    let mut all_ok = true;
    let tty = std::io::stderr().is_terminal();
    for (file, mut scenario) in scenarios {
        scenario.swarm |= swarm;
        let mut summary = Summary { scenario: scenario.name.clone(), ..Default::default() };
        let started = Instant::now();
        let mut last_progress = Instant::now();
        for seed in seeds.clone() {
            let r = run_seed(&scenario, seed, mutations);
            if history {
                print!("{}", r.output.history.condensed());
            }
            summary.add(&r);
            if !r.violations.is_empty() {
                all_ok = false;
                eprint!("{}", failure_report(&file, &r, mutation.as_deref()));
                if !keep_going {
                    break;
                }
            }
            // A terminal gets a line rewritten every 2 s; a log gets a new line every 10 s.
            let every = if tty { 2 } else { 10 };
            if last_progress.elapsed().as_secs() >= every {
                last_progress = Instant::now();
                let rate = summary.seeds as f64 / started.elapsed().as_secs_f64();
                let (start, end) = if tty { ("\r", "   ") } else { ("", "\n") };
                eprint!(
                    "{start}[{}] {}/{} seeds, {} failed, {rate:.1} seeds/s{end}",
                    scenario.name,
                    summary.seeds,
                    seeds.end - seeds.start,
                    summary.failed
                );
                let _ = std::io::stderr().flush();
            }
        }
        let clear = if tty { "\r" } else { "" };
        eprintln!(
            "{clear}[{}] {} seeds in {:.1} s{:20}",
            scenario.name,
            summary.seeds,
            started.elapsed().as_secs_f64(),
            ""
        );
        rows.push(summary);
    }
    println!("{}", Summary::table(&rows));
    Ok(all_ok)
}

fn bench(path: PathBuf, seeds: Range<u64>) -> Result<bool, String> {
    let scenarios = Scenario::load_all(&path).map_err(|e| e.to_string())?;
    println!("{:<22} {:>6} {:>14} {:>16} {:>14}", "scenario", "seeds", "sim s/wall s", "events/wall s", "acked ops/s");
    for (_, scenario) in scenarios {
        let mut summary = Summary::default();
        let started = Instant::now();
        for seed in seeds.clone() {
            summary.add(&run_seed(&scenario, seed, Mutations::default()));
        }
        let wall = started.elapsed().as_secs_f64();
        println!(
            "{:<22} {:>6} {:>14.0} {:>16.0} {:>14.0}",
            scenario.name,
            summary.seeds,
            summary.virtual_s / wall,
            summary.events as f64 / wall,
            summary.acked_ops as f64 / wall
        );
    }
    Ok(true)
}

fn bench_engine(ops: u64, clients: u32, record_bytes: u32, runs: u32) -> Result<bool, String> {
    if ops == 0 || clients == 0 || runs == 0 {
        return Err("--ops, --clients and --runs must be positive".into());
    }
    println!("engine, in-memory disk: {ops} appends of {record_bytes} B from {clients} clients");
    let mut rates = Vec::new();
    for run in 1..=runs {
        let b = truba_sim::bench::engine_throughput(ops, clients, record_bytes);
        let rate = b.ops as f64 / b.wall_s;
        rates.push(rate);
        println!(
            "run {run}: {:>10.0} ops/s  {:>7.1} MiB/s  {:>6.1} ops/batch",
            rate,
            rate * record_bytes as f64 / (1 << 20) as f64,
            b.ops as f64 / b.batches.max(1) as f64
        );
    }
    rates.sort_by(f64::total_cmp);
    println!("median: {:.0} ops/s", rates[rates.len() / 2]);
    Ok(true)
}

fn election_downtime(
    trials: Option<u32>,
    seed: u64,
    ranges: Vec<TimeoutRange>,
    pre_vote: &[bool],
    json: bool,
) -> Result<bool, String> {
    if trials == Some(0) {
        return Err("--trials must be positive".into());
    }
    let ranges = if ranges.is_empty() { TimeoutRange::PAPER.to_vec() } else { ranges };
    let started = Instant::now();
    let mut rows = Vec::new();
    for range in ranges {
        for &pre_vote in pre_vote {
            let n = trials.unwrap_or_else(|| range.default_trials());
            let row_started = Instant::now();
            let row = downtime::run_row(range, pre_vote, n, seed);
            eprintln!(
                "[{range} ms, pre-vote {}] {n} trials in {:.1} s, {} not converged",
                if pre_vote { "on" } else { "off" },
                row_started.elapsed().as_secs_f64(),
                row.not_converged
            );
            rows.push(row);
        }
    }
    if json {
        println!("{}", downtime::json(&rows, seed));
    } else {
        println!(
            "{}\nseed {seed}; times in ms from the crash until all four survivors heard from the new leader, over \
             the converged trials (nearest-rank percentiles)\n",
            downtime::describe()
        );
        print!("{}", downtime::table(&rows));
    }
    for row in rows.iter().filter(|r| r.failed > 0) {
        let first = row.first_failure.as_deref().unwrap_or("?");
        let pre_vote = if row.pre_vote { "on" } else { "off" };
        eprintln!("[{} ms, pre-vote {pre_vote}] {} trials failed; first: {first}", row.range, row.failed);
    }
    eprintln!("{} rows in {:.1} s", rows.len(), started.elapsed().as_secs_f64());
    Ok(true)
}
