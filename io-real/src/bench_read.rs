//! `truba bench-read`: the reading side of the ledger under measurement: tails catching up and
//! following the head, a watcher's resync, a consumer's commits. Progress lines go to standard
//! error during long phases, results to standard output (one JSON line with `--json`).
//!
//! Modes:
//! - `tail-catchup`: a tail on one member (`--addr`) from the oldest entry it holds (or
//!   `--from`) until it has `--events` events or has reached the member's head as of the start;
//!   events/s, entries/s and MiB/s of entries (their encoded size, as the server sends them).
//!   `--fill N` first appends N records with the append load of `truba bench` (through
//!   `--fill-addr`, by default `--addr`) and waits for the member to have applied them.
//! - `tail-live`: the append load for `--duration-s`, with `--tailers` tails reading from the
//!   head on the members of `--tail-addrs`; the load's appends/s and latencies, and each tail's
//!   events/s and lag (the time it got an event minus the entry's audit time, the leader's wall
//!   clock when it proposed the entry, which is in whole milliseconds and comes before the
//!   commit: the lag is an upper bound of how far behind the commit a tail is). The tails run
//!   on a thread of their own; the CPU time of the load's thread, the tails' thread and the
//!   servers given with `--server-pids` is reported beside (everything shares the cores).
//! - `watch-resync`: a watch on one member (`--addr`) from its open to `Synced` (the resync's
//!   sessions, sessions/s), then on to the member's head as of the open (the changes after the
//!   resync's snapshot); with `--server-pid`, the member's VmRSS sampled every 50 ms meanwhile.
//! - `consumer`: a consumer (`--name`) committing in a closed loop, each commit carrying
//!   `--ops-per-commit` new stored sessions of one record, through the last index a tail of its
//!   events (in the same process) has delivered; commits/s, ops/s, commit latency. A consumer
//!   behind the head first commits through the head, untimed (`--keep-checkpoint`: not).

use crate::bench::{self, unix_us, LoadArgs, LoadResult};
use crate::client::{Consumer, Pipe, TailItem, WatchItem, WatchOptions};
use hdrhistogram::Histogram;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use truba_engine::{CommitOp, Filter, Index, Kind, TailFrom};

/// Progress lines on standard error this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long a member may take to apply what the fill appended, before the catch-up starts.
const APPLY_WAIT: Duration = Duration::from_secs(120);
/// What the output says about the lag of a live tail.
const LAG_NOTE: &str = "lag = when the tail got the event - the entry's audit time (the leader's wall clock, in whole \
                        ms, when the request reached it and the entry was proposed): it includes the commit latency \
                        (replication, fsync) and up to 1 ms of rounding, so it is an upper bound of how far the tail is \
                        behind the commit. behind ack = when the tail got an append's event - when the writer got \
                        that append's acknowledgement (the leader answers once it is committed and applied): how far \
                        the tail is behind the commit as the writer sees it, counted as 0 when the tail was first";

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A tail from the oldest entry (or --from) up to the head: read throughput.
    TailCatchup,
    /// The append load with tails following the head: append throughput and tail lag.
    TailLive,
    /// A watch's resync: time to Synced, sessions/s, the server's RSS.
    WatchResync,
    /// A consumer's closed-loop commits: commits/s, ops/s, commit latency.
    Consumer,
}

#[derive(clap::Args, Clone, Debug)]
pub struct BenchReadArgs {
    /// What to measure.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// tail-catchup and watch-resync: the member to read from (one address). tail-live and
    /// consumer: the cluster's addresses (the load and the commits go to its leader).
    #[arg(long, env = "TRUBA_ADDR", default_value = "127.0.0.1:7400", value_name = "HOST:PORT[,HOST:PORT...]")]
    pub addr: String,
    /// Readers see only events (tails) or sessions (watches) of this kind (repeat for several;
    /// none: every kind). `--kind` is the kind of the sessions the load and the consumer create.
    #[arg(long = "read-kind", value_name = "K")]
    pub read_kinds: Vec<u32>,
    /// Tails include internal events (keep-alives, refusals, the pipe's housekeeping).
    #[arg(long)]
    pub internal: bool,
    /// tail-catchup: stop once this many events were read (default: at the member's head as of
    /// the start).
    #[arg(long)]
    pub events: Option<u64>,
    /// tail-catchup: start at this index (default: the oldest entry the member holds).
    #[arg(long, value_name = "INDEX")]
    pub from: Option<u64>,
    /// tail-catchup: first append this many records with the load (then wait until the member
    /// read from has applied them).
    #[arg(long, value_name = "N")]
    pub fill: Option<u64>,
    /// tail-catchup: the cluster's addresses for the fill (default: --addr; give every member
    /// when --addr is a follower).
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
    pub fill_addr: Option<String>,
    /// tail-live and consumer: run for this long.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// tail-live: tails reading from the head during the load (0: the load alone, the baseline).
    #[arg(long, default_value_t = 0)]
    pub tailers: u32,
    /// tail-live: the members the tails read from, in turn (default: --addr's first).
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
    pub tail_addrs: Option<String>,
    /// tail-live: server processes (every member's, on this machine) whose CPU time during the
    /// load to report beside the load generator's and the tails'.
    #[arg(long, value_name = "PID,...", value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// tail-live: after the load, how long the tails may take to reach the last committed entry.
    #[arg(long, default_value_t = 10)]
    pub drain_s: u64,
    /// watch-resync: the watcher's window (events sent and not yet acknowledged; default: the
    /// server's limit).
    #[arg(long)]
    pub window: Option<u32>,
    /// watch-resync: the server's process id, to sample its VmRSS during the resync.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// watch-resync: VmRSS sampling interval.
    #[arg(long, default_value_t = 50)]
    pub rss_every_ms: u64,
    /// watch-resync: give up after this many seconds without an item.
    #[arg(long, default_value_t = 60)]
    pub stall_s: u64,
    /// consumer: its name.
    #[arg(long, default_value = "bench-read")]
    pub name: String,
    /// consumer: session operations per commit (each a new session of --kind with one record
    /// of --record-bytes, stored for --store-s; at most the server's engine.commit_ops_max).
    #[arg(long, default_value_t = 16)]
    pub ops_per_commit: u32,
    /// consumer: read the events after the consumer's checkpoint as it is (by default a
    /// consumer behind the head first commits through the head, untimed, so that the run
    /// measures commits at the head rather than beside a tail reading a backlog).
    #[arg(long)]
    pub keep_checkpoint: bool,
    /// consumer: the store timeout of the sessions its commits create (far: none comes due).
    #[arg(long, default_value_t = 86_400)]
    pub store_s: u32,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Print the result as one JSON line.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: BenchReadArgs) -> Result<(), String> {
    match args.mode {
        Mode::TailCatchup => tail_catchup(&args).await,
        Mode::TailLive => tail_live(&args).await,
        Mode::WatchResync => watch_resync(&args).await,
        Mode::Consumer => consumer(&args).await,
    }
}

fn filter(args: &BenchReadArgs) -> Filter {
    Filter { kinds: args.read_kinds.iter().copied().map(Kind).collect(), internal: args.internal, sessions_only: false }
}

fn split_addrs(s: &str) -> Vec<String> {
    s.split(',').map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// A histogram of microseconds as milliseconds: p50, p99, p999, max.
fn quantiles_ms(h: &Histogram<u64>) -> [f64; 4] {
    let q = |x: f64| h.value_at_quantile(x) as f64 / 1000.0;
    [q(0.5), q(0.99), q(0.999), h.max() as f64 / 1000.0]
}

fn quantiles_json(h: &Histogram<u64>) -> serde_json::Value {
    let [p50, p99, p999, max] = quantiles_ms(h);
    serde_json::json!({"p50_ms": p50, "p99_ms": p99, "p999_ms": p999, "max_ms": max, "count": h.len()})
}

fn quantiles_text(h: &Histogram<u64>) -> String {
    let [p50, p99, p999, max] = quantiles_ms(h);
    format!("p50 {p50:.2} ms  p99 {p99:.2} ms  p999 {p999:.2} ms  max {max:.2} ms")
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new(3).expect("histogram")
}

/// Runs the append load, with a progress line on standard error every few seconds.
async fn load_with_progress(
    phase: &'static str,
    addr: &str,
    load: &LoadArgs,
    duration: Duration,
    ops: Option<u64>,
    record_acks: bool,
) -> Result<LoadResult, String> {
    let acked = Arc::new(AtomicU64::new(0));
    let progress = {
        let acked = acked.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut last = 0u64;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
            loop {
                tick.tick().await;
                let now = acked.load(Ordering::Relaxed);
                let of = ops.map(|n| format!(" of {n}")).unwrap_or_default();
                eprintln!(
                    "{phase}: {now}{of} appends after {:.0} s ({:.0}/s over the last {} s)",
                    started.elapsed().as_secs_f64(),
                    (now - last) as f64 / PROGRESS_EVERY.as_secs_f64(),
                    PROGRESS_EVERY.as_secs()
                );
                last = now;
            }
        })
    };
    let result = bench::load(addr, load, duration, ops, Some(acked), record_acks).await;
    progress.abort();
    result
}

// ---------------------------------------------------------------------------------------------
// tail-catchup

async fn tail_catchup(args: &BenchReadArgs) -> Result<(), String> {
    if split_addrs(&args.addr).len() != 1 {
        return Err(
            "tail-catchup reads from one member: give one address with --addr (--fill-addr for the fill)".into()
        );
    }
    let pipe = Pipe::connect(&args.addr).await.map_err(|e| e.to_string())?;
    let mut fill_json = serde_json::Value::Null;
    if let Some(n) = args.fill {
        let fill_addr = args.fill_addr.as_deref().unwrap_or(&args.addr);
        eprintln!("fill: {n} appends of {} B through {fill_addr}", args.load.record_bytes);
        let r = load_with_progress("fill", fill_addr, &args.load, Duration::MAX, Some(n), false).await?;
        let rate = r.ops as f64 / r.secs;
        // The leader's commit index once the fill is acknowledged: the member read from must
        // have applied that far, so that the catch-up measures reading, not replication.
        let leader = Pipe::connect(fill_addr).await.map_err(|e| e.to_string())?;
        let target = leader.status().await.map_err(|e| e.to_string())?.engine.commit;
        let waited = Instant::now();
        loop {
            let applied = pipe.status().await.map_err(|e| e.to_string())?.engine.applied;
            if applied >= target {
                break;
            }
            if waited.elapsed() > APPLY_WAIT {
                return Err(format!(
                    "{} has applied {} of {} after {} s",
                    args.addr,
                    applied.0,
                    target.0,
                    APPLY_WAIT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let waited = waited.elapsed().as_secs_f64();
        eprintln!(
            "fill: {} appends in {:.1} s, {rate:.0}/s (p99 {:.2} ms); {} applied index {} {waited:.2} s later",
            r.ops,
            r.secs,
            quantiles_ms(&r.hist)[1],
            args.addr,
            target.0
        );
        fill_json = serde_json::json!({"appends": r.ops, "seconds": r.secs, "appends_per_s": rate,
            "latency": quantiles_json(&r.hist), "commit": target.0, "apply_wait_s": waited});
    }
    let head = pipe.status().await.map_err(|e| e.to_string())?.engine.applied;
    let from = args.from.map_or(TailFrom::Oldest, |i| TailFrom::Index(Index(i)));
    let wanted = args.events.unwrap_or(u64::MAX);
    let or_events = args.events.map(|n| format!(" or {n} events")).unwrap_or_default();
    let from_text = args.from.map_or("the oldest entry".to_string(), |i| format!("index {i}"));
    eprintln!("catch-up: tail on {} from {from_text} to {} (the head as of now){or_events}", args.addr, head.0);
    let started = Instant::now();
    let mut tail = pipe.tail(from, filter(args));
    let (mut events, mut entries) = (0u64, 0u64);
    let mut first: Option<Index> = None;
    let mut first_item = None;
    let mut last_print = Instant::now();
    let mut last_events = 0u64;
    loop {
        let at = tail.position().unwrap_or(Index(0));
        if events >= wanted || at >= head {
            break;
        }
        match tail.next().await {
            None => return Err("the tail ended".into()),
            Some(Err(e)) => return Err(format!("the tail failed after {events} events: {e}")),
            Some(Ok(TailItem::Progress { through })) => {
                first.get_or_insert(through.next());
            }
            Some(Ok(TailItem::Entry(entry))) => {
                first.get_or_insert(entry.index);
                entries += 1;
                events += entry.events.len() as u64;
            }
        }
        first_item.get_or_insert_with(|| started.elapsed());
        if last_print.elapsed() >= PROGRESS_EVERY {
            eprintln!(
                "catch-up: {events} events, at index {} of {}, {:.0} events/s over the last {} s",
                tail.position().unwrap_or(Index(0)).0,
                head.0,
                (events - last_events) as f64 / last_print.elapsed().as_secs_f64(),
                PROGRESS_EVERY.as_secs()
            );
            last_print = Instant::now();
            last_events = events;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let bytes = tail.entry_bytes();
    let at = tail.position().unwrap_or(Index(0));
    let first = first.unwrap_or(Index(0));
    let first_item_s = first_item.map(|d| d.as_secs_f64());
    if events < wanted && args.events.is_some() {
        eprintln!("catch-up: the head ({}) came after {events} events, before the {wanted} asked for", head.0);
    }
    let (ev_rate, en_rate, mib_rate) = (events as f64 / secs, entries as f64 / secs, mib(bytes) / secs);
    if args.json {
        let v = serde_json::json!({"mode": "tail-catchup", "addr": args.addr, "fill": fill_json,
            "from_index": first.0, "to_index": at.0, "head": head.0, "events": events, "entries": entries,
            "bytes": bytes, "seconds": secs, "events_per_s": ev_rate, "entries_per_s": en_rate,
            "mib_per_s": mib_rate, "first_item_s": first_item_s});
        println!("{v}");
    } else {
        println!(
            "tail-catchup on {}: indexes {}..={} (head {}): {events} events in {entries} entries, {:.1} MiB, {secs:.2} s",
            args.addr,
            first.0,
            at.0,
            head.0,
            mib(bytes)
        );
        println!("  {ev_rate:.0} events/s  {en_rate:.0} entries/s  {mib_rate:.1} MiB/s of entries");
    }
    let _ = std::io::stdout().flush();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// tail-live

/// One live tail's figures.
struct Tailed {
    addr: String,
    events: u64,
    entries: u64,
    bytes: u64,
    /// Per event, microseconds from the entry's audit time to its arrival here.
    lag: Histogram<u64>,
    /// Events that arrived before their audit time (clocks: counted as 0).
    early: u64,
    /// Every client request's entry as (client id, sequence, the Unix time in microseconds it
    /// arrived here), to set against the writer's acknowledgements.
    arrivals: Vec<(u64, u64, u64)>,
    /// Where the tail stood when it stopped, and whether it reached the target by then.
    position: Index,
    caught_up: bool,
    /// From the load's end to reaching the target.
    drain_s: Option<f64>,
}

/// When the tails stop: once at `target`, or at `deadline` whatever they reached.
#[derive(Clone, Copy, Debug)]
struct Stop {
    target: Index,
    deadline: Instant,
    load_ended: Instant,
}

async fn tail_live(args: &BenchReadArgs) -> Result<(), String> {
    let tail_addrs = split_addrs(args.tail_addrs.as_deref().unwrap_or(&args.addr));
    let tail_addrs = if args.tail_addrs.is_none() { tail_addrs.into_iter().take(1).collect() } else { tail_addrs };
    if args.tailers > 0 && tail_addrs.is_empty() {
        return Err("no --tail-addrs".into());
    }
    bench::check_load(&args.load)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel::<Option<Stop>>(None);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<Result<(), String>>();
    let counters: Vec<Arc<AtomicU64>> = (0..args.tailers).map(|_| Arc::new(AtomicU64::new(0))).collect();
    // The tails run on a thread and runtime of their own, so that the load generator's thread is
    // the same as `truba bench`'s, and a tail's reading is not held up behind the load's tasks
    // (which would show as lag).
    let tails = if args.tailers > 0 {
        let (filter, addrs, counters) = (filter(args), tail_addrs.clone(), counters.clone());
        let n = args.tailers;
        let thread = std::thread::Builder::new()
            .name("tails".into())
            .spawn(move || {
                let rt =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
                let cpu = thread_cpu_ns();
                let tailed = rt.block_on(async move {
                    let mut tasks = Vec::new();
                    for i in 0..n as usize {
                        let addr = addrs[i % addrs.len()].clone();
                        let (filter, stop, ready, counter) =
                            (filter.clone(), stop_rx.clone(), ready_tx.clone(), counters[i].clone());
                        tasks.push(tokio::spawn(live_tail(addr, filter, stop, ready, counter)));
                    }
                    drop(ready_tx);
                    let mut out = Vec::new();
                    for t in tasks {
                        out.push(t.await.map_err(|e| e.to_string())??);
                    }
                    Ok::<Vec<Tailed>, String>(out)
                })?;
                Ok::<_, String>((tailed, cpu_since(cpu)))
            })
            .map_err(|e| e.to_string())?;
        Some(thread)
    } else {
        drop(ready_tx);
        None
    };
    // Every tail is open at the head before the load starts.
    for _ in 0..args.tailers {
        match tokio::time::timeout(Duration::from_secs(30), ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => return Err(format!("a tail did not open: {e}")),
            Ok(None) | Err(_) => return Err("the tails did not open within 30 s".into()),
        }
    }
    if args.tailers > 0 {
        eprintln!("live: {} tails open on {}", args.tailers, tail_addrs.join(","));
    }
    let progress = {
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
            let mut last = 0u64;
            loop {
                tick.tick().await;
                let events: u64 = counters.iter().map(|c| c.load(Ordering::Relaxed)).sum();
                if !counters.is_empty() {
                    eprintln!(
                        "live: tails got {:.0} events/s each over the last {} s",
                        (events - last) as f64 / counters.len() as f64 / PROGRESS_EVERY.as_secs_f64(),
                        PROGRESS_EVERY.as_secs()
                    );
                }
                last = events;
            }
        })
    };
    let (load_cpu, servers_cpu) =
        (thread_cpu_ns(), args.server_pids.iter().map(|p| process_cpu_ns(*p)).collect::<Vec<_>>());
    let r = load_with_progress("live", &args.addr, &args.load, Duration::from_secs(args.duration_s), None, true).await;
    progress.abort();
    let load_ended = Instant::now();
    let cpu = Cpu {
        load_thread_s: cpu_since(load_cpu),
        tails_thread_s: None,
        servers_s: args
            .server_pids
            .iter()
            .zip(servers_cpu)
            .map(|(p, c)| (*p, c.and_then(|c| Some(process_cpu_ns(*p)?.saturating_sub(c) as f64 / 1e9))))
            .collect(),
    };
    // The tails go on until they have the last entry committed by then (the highest commit
    // index any member knows: the leader's).
    let mut target = Index(0);
    for addr in split_addrs(&args.addr) {
        if let Ok(p) = Pipe::connect(&addr).await {
            if let Ok(s) = p.status().await {
                target = target.max(s.engine.commit);
            }
        }
    }
    let _ = stop_tx.send(Some(Stop { target, deadline: load_ended + Duration::from_secs(args.drain_s), load_ended }));
    let (tailed, tails_cpu) = match tails {
        Some(t) => t.join().map_err(|_| "the tails' thread panicked".to_string())??,
        None => (Vec::new(), None),
    };
    let r = r?;
    report_live(args, &r, &tailed, target, Cpu { tails_thread_s: tails_cpu, ..cpu })
}

/// One tail from the head: counts and lags until told to stop.
async fn live_tail(
    addr: String,
    filter: Filter,
    mut stop: tokio::sync::watch::Receiver<Option<Stop>>,
    ready: tokio::sync::mpsc::UnboundedSender<Result<(), String>>,
    counter: Arc<AtomicU64>,
) -> Result<Tailed, String> {
    let pipe = match Pipe::connect(&addr).await {
        Ok(p) => p,
        Err(e) => {
            let _ = ready.send(Err(format!("{addr}: {e}")));
            return Err(e.to_string());
        }
    };
    let mut tail = pipe.tail(TailFrom::Next, filter);
    let mut t = Tailed {
        addr: addr.clone(),
        events: 0,
        entries: 0,
        bytes: 0,
        lag: histogram(),
        early: 0,
        arrivals: Vec::new(),
        position: Index(0),
        caught_up: false,
        drain_s: None,
    };
    // The first item is the mark of where the tail starts.
    match tail.next().await {
        Some(Ok(_)) => {
            let _ = ready.send(Ok(()));
        }
        Some(Err(e)) => {
            let _ = ready.send(Err(format!("{addr}: {e}")));
            return Err(e.to_string());
        }
        None => return Err(format!("{addr}: the tail ended")),
    }
    drop(ready);
    loop {
        let when = *stop.borrow();
        if let Some(s) = when {
            let at = tail.position().unwrap_or(Index(0));
            if at >= s.target {
                t.caught_up = true;
                t.drain_s = Some(s.load_ended.elapsed().as_secs_f64());
                break;
            }
            if Instant::now() >= s.deadline {
                break;
            }
        }
        let item = tokio::select! {
            item = tail.next() => item,
            changed = stop.changed() => match changed {
                Ok(()) => continue,
                Err(_) => return Err(format!("{addr}: the bench stopped before telling the tail to")),
            },
            _ = tokio::time::sleep(Duration::from_millis(100)), if when.is_some() => continue,
        };
        let now = unix_us();
        match item {
            None => return Err(format!("{addr}: the tail ended")),
            Some(Err(e)) => return Err(format!("{addr}: the tail failed after {} events: {e}", t.events)),
            Some(Ok(TailItem::Progress { .. })) => {}
            Some(Ok(TailItem::Entry(entry))) => {
                let n = entry.events.len() as u64;
                let at_us = entry.audit.at.0 * 1000;
                let lag = match now.checked_sub(at_us) {
                    Some(l) => l,
                    None => {
                        t.early += n;
                        0
                    }
                };
                t.lag.record_n(lag, n).ok();
                if let (Some(client), Some(seq)) = (entry.audit.client, entry.audit.seq) {
                    t.arrivals.push((client.0, seq.0, now));
                }
                t.events += n;
                t.entries += 1;
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
    t.position = tail.position().unwrap_or(Index(0));
    t.bytes = tail.entry_bytes();
    Ok(t)
}

/// CPU time (seconds) used during a live run, for telling the readers' cost from the rest on a
/// machine whose cores everything shares.
struct Cpu {
    /// The load generator's thread, during the load.
    load_thread_s: Option<f64>,
    /// The tails' thread, from their opening to their end (after the load).
    tails_thread_s: Option<f64>,
    /// Each server process given with --server-pids (all its threads), during the load.
    servers_s: Vec<(u32, Option<f64>)>,
}

/// Nanoseconds the calling thread has run on a CPU (Linux's schedstat).
fn thread_cpu_ns() -> Option<u64> {
    schedstat_ns("/proc/thread-self/schedstat")
}

fn cpu_since(start: Option<u64>) -> Option<f64> {
    Some(thread_cpu_ns()?.saturating_sub(start?) as f64 / 1e9)
}

fn schedstat_ns(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.split_whitespace().next()?.parse().ok()
}

/// Nanoseconds every thread of a process has run on a CPU (threads that ended are not counted).
fn process_cpu_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(tasks.flatten().filter_map(|t| schedstat_ns(&format!("{}/schedstat", t.path().display()))).sum())
}

/// How far behind the writer's acknowledgements the tails got the appends, in microseconds, over
/// every matched append (those that came to a tail before their acknowledgement count as 0 and
/// are counted as `ahead`).
struct BehindAck {
    behind: Histogram<u64>,
    ahead: u64,
    matched: u64,
}

fn behind_ack(r: &LoadResult, tailed: &[Tailed]) -> BehindAck {
    let acks: std::collections::HashMap<(u64, u64), u64> = r.acks.iter().map(|&(c, s, at)| ((c, s), at)).collect();
    let mut out = BehindAck { behind: histogram(), ahead: 0, matched: 0 };
    for &(c, s, got) in tailed.iter().flat_map(|t| t.arrivals.iter()) {
        let Some(&acked) = acks.get(&(c, s)) else { continue }; // not an append of the load
        out.matched += 1;
        match got.checked_sub(acked) {
            Some(us) => {
                out.behind.record(us).ok();
            }
            None => {
                out.ahead += 1;
                out.behind.record(0).ok();
            }
        }
    }
    out
}

fn report_live(args: &BenchReadArgs, r: &LoadResult, tailed: &[Tailed], target: Index, cpu: Cpu) -> Result<(), String> {
    let rate = r.ops as f64 / r.secs;
    let ba = behind_ack(r, tailed);
    let mut all = histogram();
    for t in tailed {
        all.add(&t.lag).map_err(|e| e.to_string())?;
    }
    let behind: Vec<&Tailed> = tailed.iter().filter(|t| !t.caught_up).collect();
    if args.json {
        let tails: Vec<_> = tailed
            .iter()
            .map(|t| {
                serde_json::json!({"addr": t.addr, "events": t.events, "entries": t.entries, "bytes": t.bytes,
                    "events_per_s": t.events as f64 / r.secs, "lag": quantiles_json(&t.lag), "early_events": t.early,
                    "position": t.position.0, "caught_up": t.caught_up, "drain_s": t.drain_s})
            })
            .collect();
        let v = serde_json::json!({"mode": "tail-live", "addr": args.addr, "clients": args.load.clients,
            "connections": r.connections, "record_bytes": args.load.record_bytes, "seconds": r.secs,
            "appends": r.ops, "appends_per_s": rate, "latency": quantiles_json(&r.hist), "tailers": tailed.len(),
            "tail_addrs": args.tail_addrs, "target": target.0, "tails_behind": behind.len(),
            "lag_all": if tailed.is_empty() { serde_json::Value::Null } else { quantiles_json(&all) },
            "events_per_s_per_tail": if tailed.is_empty() { serde_json::Value::Null } else {
                (tailed.iter().map(|t| t.events).sum::<u64>() as f64 / tailed.len() as f64 / r.secs).into() },
            "behind_ack": if ba.matched == 0 { serde_json::Value::Null } else {
                serde_json::json!({"matched": ba.matched, "ahead": ba.ahead, "ahead_fraction": ba.ahead as f64 / ba.matched as f64,
                    "behind": quantiles_json(&ba.behind)}) },
            "tails": tails, "lag_note": LAG_NOTE, "cpu": {"load_thread_s": cpu.load_thread_s,
            "tails_thread_s": cpu.tails_thread_s, "servers": cpu.servers_s.iter()
                .map(|(pid, s)| serde_json::json!({"pid": pid, "cpu_s": s})).collect::<Vec<_>>()}});
        println!("{v}");
    } else {
        println!(
            "tail-live: {} clients over {} connections, {} B appends, {:.1} s: {} appends, {rate:.0} appends/s",
            args.load.clients, r.connections, args.load.record_bytes, r.secs, r.ops
        );
        println!("  append latency: {}", quantiles_text(&r.hist));
        if tailed.is_empty() {
            println!("  no tails (the baseline)");
        } else {
            println!("  {} tails; {LAG_NOTE}", tailed.len());
            for (i, t) in tailed.iter().enumerate() {
                let drained = match t.drain_s {
                    Some(d) => format!("at the last commit {d:.2} s after the load"),
                    None => format!("BEHIND: at {} of {} when it stopped", t.position.0, target.0),
                };
                println!(
                    "  tail {i} on {}: {} events, {:.0} events/s, lag {}; {drained}",
                    t.addr,
                    t.events,
                    t.events as f64 / r.secs,
                    quantiles_text(&t.lag)
                );
            }
            println!("  every tail: lag {}", quantiles_text(&all));
            if ba.matched > 0 {
                println!(
                    "  behind the writer's acknowledgement: {:.1}% of {} appends came to the tails first (0); all {}",
                    100.0 * ba.ahead as f64 / ba.matched as f64,
                    ba.matched,
                    quantiles_text(&ba.behind)
                );
            }
            let early: u64 = tailed.iter().map(|t| t.early).sum();
            if early > 0 {
                println!("  {early} events arrived before their audit time (a clock step?) and count as 0 lag");
            }
        }
        let secs = |s: Option<f64>| s.map_or("?".to_string(), |s| format!("{s:.2} s"));
        let mut line = format!("  CPU: load generator {}", secs(cpu.load_thread_s));
        if !tailed.is_empty() {
            line += &format!(", tails {} (with the drain)", secs(cpu.tails_thread_s));
        }
        for (pid, s) in &cpu.servers_s {
            line += &format!(", server {pid} {}", secs(*s));
        }
        println!("{line} (over {:.1} s)", r.secs);
    }
    let _ = std::io::stdout().flush();
    if !behind.is_empty() {
        return Err(format!(
            "{} of {} tails had not reached the last commit ({}) {} s after the load",
            behind.len(),
            tailed.len(),
            target.0,
            args.drain_s
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// watch-resync

/// VmRSS in KiB of a process, from /proc.
fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[derive(Clone, Copy, Debug, Default)]
struct RssStats {
    before_kib: u64,
    peak_kib: u64,
    /// Seconds after the sampling started.
    peak_at_s: f64,
    last_kib: u64,
    samples: u64,
}

/// Samples a process's VmRSS on a thread of its own (so a busy reader does not delay it).
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<RssStats>,
}

impl RssSampler {
    fn start(pid: u32, every: Duration) -> Result<RssSampler, String> {
        let before = vm_rss_kib(pid).ok_or_else(|| format!("cannot read VmRSS in /proc/{pid}/status"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rss".into())
            .spawn(move || {
                let started = Instant::now();
                let mut s = RssStats { before_kib: before, peak_kib: before, last_kib: before, ..RssStats::default() };
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    let Some(kib) = vm_rss_kib(pid) else { break };
                    s.samples += 1;
                    s.last_kib = kib;
                    if kib > s.peak_kib {
                        s.peak_kib = kib;
                        s.peak_at_s = started.elapsed().as_secs_f64();
                    }
                }
                s
            })
            .map_err(|e| e.to_string())?;
        Ok(RssSampler { stop, thread })
    }

    fn finish(self) -> RssStats {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

async fn watch_resync(args: &BenchReadArgs) -> Result<(), String> {
    if split_addrs(&args.addr).len() != 1 {
        return Err("watch-resync reads from one member: give one address with --addr".into());
    }
    let pipe = Pipe::connect(&args.addr).await.map_err(|e| e.to_string())?;
    let status = pipe.status().await.map_err(|e| e.to_string())?;
    let head = status.engine.applied;
    eprintln!(
        "resync: watch on {} (head {}, {} sessions stored, {} of them in {} source files, {} active)",
        args.addr,
        head.0,
        status.engine.sessions_stored,
        status.engine.sessions_spilled,
        status.engine.source_files,
        status.engine.sessions_active
    );
    let sampler = match args.server_pid {
        Some(pid) => Some(RssSampler::start(pid, Duration::from_millis(args.rss_every_ms.max(1)))?),
        None => None,
    };
    let started = Instant::now();
    let kinds = args.read_kinds.iter().copied().map(Kind).collect();
    let mut watch = pipe.watch(WatchOptions { kinds, resume_after: None, window: args.window });
    let (mut sessions, mut record_bytes, mut changes, mut resyncs) = (0u64, 0u64, 0u64, 0u32);
    let mut resync_at = None;
    let mut first_item = None;
    let mut synced: Option<(f64, Index)> = None;
    let mut last_item = Instant::now();
    let mut last_print = Instant::now();
    let mut last_sessions = 0u64;
    let result = loop {
        if synced.is_some() && watch.acknowledged().is_some_and(|a| a >= head) {
            break Ok(());
        }
        if last_item.elapsed() > Duration::from_secs(args.stall_s) {
            break Err(format!("no item for {} s ({sessions} sessions, {changes} changes so far)", args.stall_s));
        }
        if last_print.elapsed() >= PROGRESS_EVERY {
            let rss = args.server_pid.and_then(vm_rss_kib).map(|k| format!(", server RSS {} MiB", k / 1024));
            eprintln!(
                "resync: {sessions} sessions, {changes} changes after {:.0} s ({:.0} sessions/s over the last {} s){}",
                started.elapsed().as_secs_f64(),
                (sessions - last_sessions) as f64 / last_print.elapsed().as_secs_f64(),
                PROGRESS_EVERY.as_secs(),
                rss.unwrap_or_default()
            );
            last_print = Instant::now();
            last_sessions = sessions;
        }
        // Progress marks are not shown to the application: waiting a little at a time lets the
        // loop see that the acknowledged position reached the head.
        let item = match tokio::time::timeout(Duration::from_millis(200), watch.next()).await {
            Err(_) => continue,
            Ok(None) => break Err("the watch ended".into()),
            Ok(Some(Err(e))) => break Err(format!("the watch failed after {sessions} sessions: {e}")),
            Ok(Some(Ok(item))) => item,
        };
        last_item = Instant::now();
        first_item.get_or_insert_with(|| started.elapsed().as_secs_f64());
        match item {
            WatchItem::ResyncStart { at } => {
                resyncs += 1;
                if resyncs > 1 {
                    eprintln!("resync: the resync started over at {} after {sessions} sessions", at.0);
                    sessions = 0;
                    record_bytes = 0;
                }
                resync_at = Some(at);
            }
            WatchItem::Session(s) => {
                sessions += 1;
                record_bytes += s.records.iter().map(|r| r.len() as u64).sum::<u64>();
            }
            WatchItem::Synced { at } => {
                synced = Some((started.elapsed().as_secs_f64(), at));
                eprintln!(
                    "resync: synced at {} with {sessions} sessions after {:.2} s",
                    at.0,
                    started.elapsed().as_secs_f64()
                );
            }
            WatchItem::Change(_) => changes += 1,
        }
        // Acknowledged as it goes: the server's window moves with what was processed.
        watch.done(Ok(())).await;
    };
    let to_head = started.elapsed().as_secs_f64();
    let rss = sampler.map(RssSampler::finish);
    result?;
    let (synced_s, synced_at) = synced.expect("the loop ends in sync");
    let rate = sessions as f64 / synced_s;
    if args.json {
        let rss_json = rss.map(|r| {
            serde_json::json!({"before_kib": r.before_kib, "peak_kib": r.peak_kib, "peak_at_s": r.peak_at_s,
                "end_kib": r.last_kib, "growth_kib": r.peak_kib.saturating_sub(r.before_kib), "samples": r.samples,
                "every_ms": args.rss_every_ms})
        });
        let v = serde_json::json!({"mode": "watch-resync", "addr": args.addr, "kinds": args.read_kinds,
            "window": args.window, "head": head.0, "resync_at": resync_at.map(|i| i.0), "resyncs": resyncs,
            "sessions": sessions, "record_bytes": record_bytes, "first_item_s": first_item,
            "synced_s": synced_s, "synced_at": synced_at.0, "sessions_per_s": rate,
            "mib_per_s": mib(record_bytes) / synced_s, "changes_to_head": changes, "to_head_s": to_head,
            "server_rss": rss_json});
        println!("{v}");
    } else {
        println!(
            "watch-resync on {}: {sessions} sessions ({:.1} MiB of records) as of index {} in {synced_s:.2} s: {rate:.0} sessions/s",
            args.addr,
            mib(record_bytes),
            synced_at.0
        );
        println!(
            "  first item after {:.3} s; then {changes} changes up to the head as of the open ({}), {to_head:.2} s in all",
            first_item.unwrap_or(0.0),
            head.0
        );
        if resyncs > 1 {
            println!("  the resync started over {} times", resyncs - 1);
        }
        if let Some(r) = rss {
            println!(
                "  server VmRSS: {} MiB before, peak {} MiB ({:.1} s in), {} MiB at the end: growth {} MiB ({} samples every {} ms)",
                r.before_kib / 1024,
                r.peak_kib / 1024,
                r.peak_at_s,
                r.last_kib / 1024,
                r.peak_kib.saturating_sub(r.before_kib) / 1024,
                r.samples,
                args.rss_every_ms
            );
        }
    }
    let _ = std::io::stdout().flush();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// consumer

async fn consumer(args: &BenchReadArgs) -> Result<(), String> {
    let pipe = Pipe::connect(&args.addr).await.map_err(|e| e.to_string())?;
    let mut consumer = Consumer::open(&pipe, &args.name).await.map_err(|e| e.to_string())?;
    if !args.keep_checkpoint {
        // A consumer behind the head would first read its backlog, whose tail competes with the
        // commits: it moves its checkpoint to the head first (not timed).
        let head = pipe.status().await.map_err(|e| e.to_string())?.engine.applied;
        if consumer.checkpoint() < head {
            consumer.commit(head, Vec::new()).await.map_err(|e| format!("moving the checkpoint to the head: {e}"))?;
        }
    }
    let opened_at = consumer.checkpoint();
    eprintln!(
        "consumer {}: epoch {}, checkpoint {}; committing {} ops a commit for {} s",
        args.name,
        consumer.epoch(),
        opened_at.0,
        args.ops_per_commit,
        args.duration_s
    );
    // The consumer's input: a tail of its events from the checkpoint (its own commits among
    // them). Each commit goes through the last index the tail delivered, which the server
    // accepts (below the commit's own index, not behind the checkpoint).
    let seen = Arc::new(AtomicU64::new(opened_at.0));
    let tail_events = Arc::new(AtomicU64::new(0));
    let mut tail = consumer.events(filter(args));
    let reader = {
        let (seen, tail_events) = (seen.clone(), tail_events.clone());
        tokio::spawn(async move {
            while let Some(item) = tail.next().await {
                match item {
                    Ok(TailItem::Entry(e)) => {
                        tail_events.fetch_add(e.events.len() as u64, Ordering::Relaxed);
                    }
                    Ok(TailItem::Progress { .. }) => {}
                    Err(e) => return Err(e.to_string()),
                }
                if let Some(at) = tail.position() {
                    seen.fetch_max(at.0, Ordering::Relaxed);
                }
            }
            Ok(())
        })
    };
    let record = vec![b'c'; args.load.record_bytes as usize];
    let op = CommitOp::New { kind: Kind(args.load.kind), records: vec![record], store_s: Some(args.store_s) };
    let mut hist = histogram();
    let (mut commits, mut advanced) = (0u64, 0u64);
    let mut through = opened_at;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_s);
    let mut last_print = Instant::now();
    let mut last_commits = 0u64;
    let failure = loop {
        if Instant::now() >= deadline {
            break None;
        }
        if reader.is_finished() {
            break Some("the consumer's tail ended".to_string());
        }
        let next = Index(seen.load(Ordering::Relaxed)).max(through);
        let ops = vec![op.clone(); args.ops_per_commit as usize];
        let t = Instant::now();
        if let Err(e) = consumer.commit(next, ops).await {
            break Some(format!("commit {} failed: {e}", commits + 1));
        }
        hist.record(t.elapsed().as_micros() as u64).ok();
        commits += 1;
        if next > through {
            advanced += 1;
        }
        through = next;
        if last_print.elapsed() >= PROGRESS_EVERY {
            eprintln!(
                "consumer: {commits} commits, {:.0}/s over the last {} s, through {}",
                (commits - last_commits) as f64 / last_print.elapsed().as_secs_f64(),
                PROGRESS_EVERY.as_secs(),
                through.0
            );
            last_print = Instant::now();
            last_commits = commits;
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let tail_failure = if reader.is_finished() {
        match reader.await {
            Ok(Err(e)) => Some(e),
            Ok(Ok(())) => Some("ended".into()),
            Err(e) => Some(e.to_string()),
        }
    } else {
        reader.abort();
        None
    };
    if let Some(e) = failure {
        let tail = tail_failure.map(|t| format!(" (the tail: {t})")).unwrap_or_default();
        return Err(format!("{e}{tail}"));
    }
    let seen = Index(seen.load(Ordering::Relaxed));
    let (rate, ops_rate) = (commits as f64 / secs, commits as f64 * args.ops_per_commit as f64 / secs);
    if args.json {
        let v = serde_json::json!({"mode": "consumer", "addr": args.addr, "name": args.name,
            "epoch": consumer.epoch(), "ops_per_commit": args.ops_per_commit, "record_bytes": args.load.record_bytes,
            "seconds": secs, "commits": commits, "commits_per_s": rate, "ops_per_s": ops_rate,
            "latency": quantiles_json(&hist), "commits_advancing": advanced, "checkpoint_from": opened_at.0,
            "checkpoint": through.0, "tail_seen": seen.0, "tail_events": tail_events.load(Ordering::Relaxed)});
        println!("{v}");
    } else {
        println!(
            "consumer {}: {commits} commits of {} ops in {secs:.1} s: {rate:.0} commits/s, {ops_rate:.0} ops/s",
            args.name, args.ops_per_commit
        );
        println!("  commit latency: {}", quantiles_text(&hist));
        println!(
            "  checkpoint {} -> {} ({advanced} of {commits} commits moved it; the tail had seen {}, {} events)",
            opened_at.0,
            through.0,
            seen.0,
            tail_events.load(Ordering::Relaxed)
        );
    }
    let _ = std::io::stdout().flush();
    Ok(())
}
