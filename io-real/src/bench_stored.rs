//! `truba bench-stored`: many stored sessions waiting on one server, then all coming due at
//! once to an echo handler this tool serves itself.
//!
//! Phase "store" opens `--sessions` sessions, each with one record (`New` with the first
//! record, then `Store`), `--concurrency` at a time over one [`Pipe`]. Every session is stored
//! to come due at the same second: the store timeout of each is the time left until
//! `now + --due-in-s` as of the phase's start, so the sessions stored last wait least. Phase
//! "drain" serves an echo handler on `--handler-addr` (it deletes each delivered session: the
//! work is done) and measures from the first delivery until the server's `truba status` shows
//! no stored or active session left. Progress goes to standard error, results to standard output.

use crate::client::Pipe;
use crate::handler::{Handler, RepeatData};
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Progress lines on standard error this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How often the drain phase asks the server for its counts.
const STATUS_POLL: Duration = Duration::from_secs(1);

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Store the sessions and print their common due time.
    Store,
    /// Serve the echo handler and measure the redelivery of everything stored.
    Drain,
    /// Store, then drain in the same run.
    All,
}

#[derive(clap::Args, Clone, Debug)]
pub struct BenchStoredArgs {
    /// Server address(es).
    #[arg(long, env = "TRUBA_ADDR", default_value = "127.0.0.1:7400")]
    pub addr: String,
    /// Sessions to store (phase "store").
    #[arg(long, default_value_t = 1_000_000)]
    pub sessions: u64,
    /// Size of each session's one record.
    #[arg(long, default_value_t = 1024)]
    pub record_bytes: u32,
    /// Sessions being opened and stored at once, all over one connection.
    #[arg(long, default_value_t = 256)]
    pub concurrency: u32,
    /// Kind of the sessions (its handler must be `--handler-addr`, with no jitter for "all at
    /// once", and `store_timeout_s_max` at least `--due-in-s`).
    #[arg(long, default_value_t = 1)]
    pub kind: u32,
    /// Every session comes due this many seconds after the store phase starts (the kind's
    /// jitter is added by the server). Choose it longer than storing takes (plus a restart, if
    /// one comes between the phases); sessions stored after that moment are stored with a 1 s
    /// timeout and the overrun is reported.
    #[arg(long, default_value_t = 600)]
    pub due_in_s: u32,
    /// Phase "drain": the due time printed by the store phase (unix seconds); the phase waits
    /// until then before it expects deliveries. Without it, it just waits for the first one.
    #[arg(long)]
    pub due_at: Option<u64>,
    /// Where this tool serves the echo handler that finishes (deletes) every delivered session.
    #[arg(long, default_value = "127.0.0.1:7500")]
    pub handler_addr: String,
    /// Which part to run.
    #[arg(long, value_enum, default_value_t = Phase::All)]
    pub phase: Phase,
    /// Phase "drain" gives up after this many seconds without the stored and active count
    /// going down.
    #[arg(long, default_value_t = 120)]
    pub stall_s: u64,
    /// Print each phase's result as one JSON line.
    #[arg(long)]
    pub json: bool,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn unix_now_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

pub async fn run(args: BenchStoredArgs) -> Result<(), String> {
    if args.concurrency == 0 || args.record_bytes == 0 {
        return Err("--concurrency and --record-bytes must be positive".into());
    }
    let pipe = Pipe::connect(&args.addr).await.map_err(|e| e.to_string())?;
    let mut due_at = args.due_at;
    if matches!(args.phase, Phase::Store | Phase::All) {
        due_at = Some(store(&args, &pipe).await?);
    }
    if matches!(args.phase, Phase::Drain | Phase::All) {
        drain(&args, &pipe, due_at).await?;
    }
    Ok(())
}

/// Stores the sessions; returns the latest due time the server answered.
async fn store(args: &BenchStoredArgs, pipe: &Pipe) -> Result<u64, String> {
    let due_target = unix_now() + args.due_in_s as u64;
    let next = Arc::new(AtomicU64::new(0));
    let stored = Arc::new(AtomicU64::new(0));
    let latest_due = Arc::new(AtomicU64::new(0));
    let overran = Arc::new(AtomicU64::new(0));
    let record = Arc::new(vec![b's'; args.record_bytes as usize]);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.min(args.sessions.max(1) as u32) {
        let (pipe, next, stored, latest_due, overran, record) =
            (pipe.clone(), next.clone(), stored.clone(), latest_due.clone(), overran.clone(), record.clone());
        let (n, kind) = (args.sessions, args.kind);
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let session = pipe.new_with(kind, record.to_vec()).await.map_err(|e| e.to_string())?;
                let left = due_target.saturating_sub(unix_now());
                if left == 0 {
                    overran.fetch_add(1, Ordering::Relaxed);
                }
                let due = session.store(left.clamp(1, u32::MAX as u64) as u32).await.map_err(|e| e.to_string())?;
                latest_due.fetch_max(due.0, Ordering::Relaxed);
                stored.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        }));
    }
    let progress = {
        let stored = stored.clone();
        tokio::spawn(async move {
            let mut last = 0u64;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
            loop {
                tick.tick().await;
                let now = stored.load(Ordering::Relaxed);
                eprintln!(
                    "store: {now} stored after {:.0} s ({:.0}/s over the last {} s)",
                    started.elapsed().as_secs_f64(),
                    (now - last) as f64 / PROGRESS_EVERY.as_secs_f64(),
                    PROGRESS_EVERY.as_secs()
                );
                last = now;
            }
        })
    };
    let mut failure = None;
    for t in tasks {
        if let Err(e) = t.await.map_err(|e| e.to_string()).and_then(|r| r) {
            failure.get_or_insert(e);
        }
    }
    progress.abort();
    if let Some(e) = failure {
        return Err(format!("after {} sessions stored: {e}", stored.load(Ordering::Relaxed)));
    }
    let secs = started.elapsed().as_secs_f64();
    let n = stored.load(Ordering::Relaxed);
    let due = latest_due.load(Ordering::Relaxed);
    let overran = overran.load(Ordering::Relaxed);
    if overran > 0 {
        eprintln!("store: {overran} sessions were stored after the due time: raise --due-in-s");
    }
    if args.json {
        let v = serde_json::json!({"phase": "store", "sessions": n, "record_bytes": args.record_bytes,
            "concurrency": args.concurrency, "seconds": secs, "sessions_per_s": n as f64 / secs,
            "due_unix_s": due, "due_in_s_after_store": due as f64 - unix_now_f64(), "stored_after_due": overran});
        println!("{v}");
    } else {
        println!(
            "store: {n} sessions of one {} B record in {secs:.1} s: {:.0} sessions/s ({} at once)",
            args.record_bytes,
            n as f64 / secs,
            args.concurrency
        );
        println!("store: all due at {due} (unix seconds), {:.0} s from now", due as f64 - unix_now_f64());
    }
    let _ = std::io::stdout().flush();
    Ok(due)
}

/// The echo handler: counts each delivery and finishes the session.
struct EchoDelete {
    delivered: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    /// Microseconds since `epoch` of the first delivery (0: none yet).
    first_us: Arc<AtomicU64>,
    epoch: Instant,
}

impl Handler for EchoDelete {
    async fn handle(&self, data: RepeatData) -> Result<(), String> {
        let at = (self.epoch.elapsed().as_micros() as u64).max(1);
        let _ = self.first_us.compare_exchange(0, at, Ordering::AcqRel, Ordering::Acquire);
        match data.session.delete().await {
            Ok(()) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                Err(e.to_string())
            }
        }
    }
}

async fn drain(args: &BenchStoredArgs, pipe: &Pipe, due_at: Option<u64>) -> Result<(), String> {
    let epoch = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_us = Arc::new(AtomicU64::new(0));
    let handler =
        EchoDelete { delivered: delivered.clone(), failed: failed.clone(), first_us: first_us.clone(), epoch };
    let addr = args.handler_addr.clone();
    let server = tokio::spawn(async move { crate::handler::serve(&addr, handler).await });
    let status = pipe.status().await.map_err(|e| e.to_string())?;
    let waiting = status.engine.sessions_stored + status.engine.sessions_active;
    match due_at {
        Some(d) => eprintln!(
            "drain: {waiting} sessions stored or active, due at {d}, {} s from now",
            d as i64 - unix_now() as i64
        ),
        None => eprintln!("drain: {waiting} sessions stored or active; waiting for the first delivery"),
    }
    let mut last_left = waiting;
    let mut last_change = Instant::now();
    let mut last_print = Instant::now();
    let mut ended = None;
    loop {
        if server.is_finished() {
            return match server.await {
                Ok(Err(e)) => Err(e.to_string()),
                other => Err(format!("the echo handler stopped: {other:?}")),
            };
        }
        tokio::time::sleep(STATUS_POLL).await;
        let s = pipe.status().await.map_err(|e| e.to_string())?;
        let left = s.engine.sessions_stored + s.engine.sessions_active;
        let started = first_us.load(Ordering::Acquire) != 0;
        if started && left == 0 {
            ended = Some(epoch.elapsed());
            break;
        }
        if left != last_left {
            (last_left, last_change) = (left, Instant::now());
        }
        let due_passed = due_at.is_none_or(|d| unix_now() > d);
        if due_passed && last_change.elapsed() > Duration::from_secs(args.stall_s) {
            eprintln!("drain: no progress for {} s with {left} sessions left; giving up", args.stall_s);
            break;
        }
        if last_print.elapsed() >= PROGRESS_EVERY {
            last_print = Instant::now();
            eprintln!(
                "drain: {} delivered ({} failed), {} stored, {} active, {} dead",
                delivered.load(Ordering::Relaxed),
                failed.load(Ordering::Relaxed),
                s.engine.sessions_stored,
                s.engine.sessions_active,
                s.engine.sessions_dead
            );
        }
    }
    server.abort();
    let first = Duration::from_micros(first_us.load(Ordering::Acquire));
    let n = delivered.load(Ordering::Relaxed);
    let f = failed.load(Ordering::Relaxed);
    let Some(end) = ended else {
        return Err(format!("drain did not finish: {n} delivered, {f} failed, {last_left} left"));
    };
    // Measured up to the status poll that saw none left, so up to one poll interval too long.
    let secs = (end - first).as_secs_f64();
    let rate = n as f64 / secs;
    let late = due_at.map(|d| epoch_to_unix(epoch, first) - d as f64);
    if args.json {
        let v = serde_json::json!({"phase": "drain", "delivered": n, "failed": f, "seconds": secs,
            "deliveries_per_s": rate, "first_delivery_after_due_s": late});
        println!("{v}");
    } else {
        println!("drain: {n} deliveries ({f} failed) in {secs:.1} s from the first: {rate:.0} deliveries/s");
        if let Some(l) = late {
            println!("drain: the first delivery came {l:.1} s after the due time");
        }
    }
    let _ = std::io::stdout().flush();
    Ok(())
}

/// The unix time (seconds) of `offset` after `epoch`.
fn epoch_to_unix(epoch: Instant, offset: Duration) -> f64 {
    unix_now_f64() - epoch.elapsed().as_secs_f64() + offset.as_secs_f64()
}
