//! `truba bench`: closed-loop appends from concurrent sessions against a running server, with
//! the machine's raw write+fsync rate measured in the same run for comparison.

use crate::client::Pipe;
use hdrhistogram::Histogram;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Server address(es).
    #[arg(long, env = "TRUBA_ADDR", default_value = "127.0.0.1:7400")]
    pub addr: String,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Run for this long ...
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// ... or until this many appends have been acknowledged.
    #[arg(long)]
    pub ops: Option<u64>,
    /// Directory on the server's disk where the raw write+fsync rate is measured.
    #[arg(long, default_value = ".")]
    pub probe_dir: PathBuf,
    /// How long the raw write+fsync probe runs (0 to skip it).
    #[arg(long, default_value_t = 3)]
    pub probe_s: u64,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Runtime threads for the load generator. 1 (the default) runs every session on one
    /// thread, as the server does: on a small machine that shares its cores with the server,
    /// a multi-threaded runtime spends more on waking its workers than it gains (about 1.35x
    /// fewer appends/s here). More suits a load generator on a many-core machine of its own.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// The closed-loop append load's shape: `truba bench` and `truba bench-read` (which fills the
/// log with it, or runs it beside readers) share it.
#[derive(clap::Args, Clone, Debug)]
pub struct LoadArgs {
    /// Concurrent sessions, each with one append outstanding.
    #[arg(long, default_value_t = 64)]
    pub clients: u32,
    /// Connections the sessions share (0: one connection per session). An application usually
    /// keeps one `Pipe`, with all its sessions multiplexed over it.
    #[arg(long, default_value_t = 0)]
    pub connections: u32,
    /// Size of each appended record.
    #[arg(long, default_value_t = 256)]
    pub record_bytes: u32,
    /// Kind of the sessions opened.
    #[arg(long, default_value_t = 1)]
    pub kind: u32,
    /// Each session is deleted and replaced by a new one after this many appends, so sessions
    /// stay within their kind's size limits.
    #[arg(long, default_value_t = 1000)]
    pub appends_per_session: u32,
}

/// What a run of the load did: acknowledged appends, their latencies (microseconds), how long it
/// ran, and over how many connections.
pub struct LoadResult {
    pub hist: Histogram<u64>,
    pub ops: u64,
    pub secs: f64,
    pub connections: u32,
    /// With `record_acks`: every acknowledged append as (client id, sequence, the Unix time in
    /// microseconds its acknowledgement came), for readers' lag behind the writer.
    pub acks: Vec<(u64, u64, u64)>,
}

/// Blocks of the preallocated probe file, overwritten in turn.
const PROBE_PREALLOCATED_BLOCKS: u64 = 4096;

/// One 4 KiB write plus fdatasync at a time, for `secs` seconds: the rate a log that fsyncs
/// every operation on its own could reach on this disk. Appending (each write grows the file,
/// so each fdatasync also journals the new size), or with `preallocated`, overwriting a file
/// filled with zeros beforehand (the way truba writes its log).
pub fn raw_fsync_rate(dir: &std::path::Path, secs: u64, preallocated: bool) -> Result<(f64, u64), String> {
    use std::os::unix::fs::FileExt;
    let path = dir.join(format!(".truba-fsync-probe-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let block = vec![0x5au8; 4096];
    if preallocated {
        let zeros = vec![0u8; (PROBE_PREALLOCATED_BLOCKS * 4096) as usize];
        file.write_all_at(&zeros, 0).and_then(|_| file.sync_all()).map_err(|e| format!("probe preallocation: {e}"))?;
    }
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        let block_no = if preallocated { n % PROBE_PREALLOCATED_BLOCKS } else { n };
        file.write_all_at(&block, block_no * 4096)
            .and_then(|_| file.sync_data())
            .map_err(|e| format!("probe write: {e}"))?;
        hist.record(t.elapsed().as_micros() as u64).ok();
        n += 1;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    Ok((rate, hist.value_at_quantile(0.5)))
}

pub async fn run(args: BenchArgs) -> Result<(), String> {
    check_load(&args.load)?;
    let (raw, raw_prealloc) = if args.probe_s > 0 {
        let probe = |preallocated: bool| {
            let (dir, secs) = (args.probe_dir.clone(), args.probe_s);
            tokio::task::spawn_blocking(move || raw_fsync_rate(&dir, secs, preallocated))
        };
        let r = probe(false).await.map_err(|e| e.to_string())??;
        let p = probe(true).await.map_err(|e| e.to_string())??;
        if !args.json {
            let dir = args.probe_dir.display();
            println!("raw write+fsync (4 KiB, {dir}): appending {:.0} ops/s, p50 {:.2} ms", r.0, r.1 as f64 / 1000.0);
            println!(
                "raw write+fsync (4 KiB, {dir}): into preallocated space {:.0} ops/s, p50 {:.2} ms",
                p.0,
                p.1 as f64 / 1000.0
            );
        }
        (Some(r), Some(p))
    } else {
        (None, None)
    };
    let LoadResult { hist, ops, secs, connections, .. } =
        load(&args.addr, &args.load, Duration::from_secs(args.duration_s), args.ops, None, false).await?;
    let rate = ops as f64 / secs;
    let mib = rate * args.load.record_bytes as f64 / (1 << 20) as f64;
    let q = |x: f64| hist.value_at_quantile(x) as f64 / 1000.0;
    if args.json {
        let v = serde_json::json!({"clients": args.load.clients, "connections": connections, "record_bytes": args.load.record_bytes, "seconds": secs,
            "ops": ops, "ops_per_s": rate, "mib_per_s": mib, "p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999),
            "raw_fsync_per_s": raw.map(|r| r.0), "ratio_to_raw": raw.map(|r| rate / r.0),
            "raw_preallocated_fsync_per_s": raw_prealloc.map(|r| r.0), "ratio_to_raw_preallocated": raw_prealloc.map(|r| rate / r.0)});
        println!("{v}");
    } else {
        println!(
            "truba: {} clients over {connections} connections, {} B appends, {secs:.1} s: {ops} appends, {rate:.0} ops/s, {mib:.2} MiB/s",
            args.load.clients, args.load.record_bytes
        );
        println!("latency: p50 {:.2} ms  p99 {:.2} ms  p999 {:.2} ms  max {:.2} ms", q(0.5), q(0.99), q(0.999), q(1.0));
        if let (Some((r, _)), Some((p, _))) = (raw, raw_prealloc) {
            println!(
                "ratio: {:.1}x the raw one-write-one-fsync rate appending, {:.1}x into preallocated space",
                rate / r,
                rate / p
            );
        }
        let _ = std::io::stdout().flush();
    }
    Ok(())
}

pub fn check_load(load: &LoadArgs) -> Result<(), String> {
    if load.clients == 0 || load.record_bytes == 0 {
        return Err("--clients and --record-bytes must be positive".into());
    }
    Ok(())
}

/// Runs the closed-loop append load against `addr`: `load.clients` sessions, each keeping one
/// append outstanding, for `duration` or until `ops` appends were acknowledged (each session
/// does its share, and `duration` may be `Duration::MAX`). `acked`, if given, counts the acknowledged appends as they come (for
/// progress lines); `record_acks` keeps each append's acknowledgement time ([`LoadResult::acks`]).
pub async fn load(
    addr: &str,
    load: &LoadArgs,
    duration: Duration,
    ops: Option<u64>,
    acked: Option<Arc<AtomicU64>>,
    record_acks: bool,
) -> Result<LoadResult, String> {
    check_load(load)?;
    // A run bounded by `ops` may be given Duration::MAX.
    let deadline =
        Instant::now().checked_add(duration).unwrap_or_else(|| Instant::now() + Duration::from_secs(1 << 32));
    let per_client = ops.map(|n| n.div_ceil(load.clients as u64));
    let connections = if load.connections == 0 { load.clients } else { load.connections.min(load.clients) };
    let mut pipes = Vec::new();
    for _ in 0..connections {
        pipes.push(Pipe::connect(addr).await.map_err(|e| e.to_string())?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..load.clients {
        let (load, pipe, acked) = (load.clone(), pipes[i as usize % pipes.len()].clone(), acked.clone());
        tasks
            .push(tokio::spawn(async move { client_loop(load, pipe, deadline, per_client, acked, record_acks).await }));
    }
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let mut ops = 0u64;
    let mut acks = Vec::new();
    for t in tasks {
        let (h, n, a) = t.await.map_err(|e| e.to_string())??;
        hist.add(&h).map_err(|e| e.to_string())?;
        ops += n;
        acks.extend(a);
    }
    Ok(LoadResult { hist, ops, secs: started.elapsed().as_secs_f64(), connections, acks })
}

/// The wall clock in microseconds since the Unix epoch (for lags against audit times).
pub(crate) fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

async fn client_loop(
    args: LoadArgs,
    pipe: Pipe,
    deadline: Instant,
    ops: Option<u64>,
    acked: Option<Arc<AtomicU64>>,
    record_acks: bool,
) -> Result<(Histogram<u64>, u64, Vec<(u64, u64, u64)>), String> {
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let mut acks = Vec::new();
    let record = vec![b'r'; args.record_bytes as usize];
    let mut done = 0u64;
    let mut session = pipe.new(args.kind).await.map_err(|e| e.to_string())?;
    let mut in_session = 0u32;
    loop {
        if ops.map_or(Instant::now() >= deadline, |n| done >= n) {
            break;
        }
        if in_session >= args.appends_per_session {
            session.delete().await.map_err(|e| e.to_string())?;
            session = pipe.new(args.kind).await.map_err(|e| e.to_string())?;
            in_session = 0;
        }
        let t = Instant::now();
        session.append(record.clone()).await.map_err(|e| e.to_string())?;
        hist.record(t.elapsed().as_micros() as u64).ok();
        if let (true, Some((client, seq))) = (record_acks, session.last_request()) {
            acks.push((client.0, seq.0, unix_us()));
        }
        done += 1;
        in_session += 1;
        if let Some(a) = &acked {
            a.fetch_add(1, Ordering::Relaxed);
        }
    }
    let _ = session.delete().await;
    Ok((hist, done, acks))
}
