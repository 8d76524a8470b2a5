//! `jetstream-bench`: the load of `truba bench` against NATS JetStream, for BENCHMARKS.md.
//!
//! Recreates a stream (file storage, `--replicas` replicas, subjects `bench.>`), then runs
//! `--clients` closed-loop publishers for `--duration-s` seconds. Each publisher keeps one
//! message outstanding: it publishes `--record-bytes` bytes to its own subject and waits for the
//! stream's PubAck before the next. Latency is measured around publish plus ack, in microseconds,
//! in the same kind of histogram as `truba bench`, and reported the same way.
//!
//! Built only with the `jetstream-bench` feature:
//!
//! ```sh
//! cargo build --release -p truba --features jetstream-bench --bin jetstream-bench
//! target/release/jetstream-bench --url nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224 --clients 64
//! ```

use async_nats::jetstream::{self, stream};
use async_nats::ServerAddr;
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};

#[derive(Parser, Clone, Debug)]
#[command(about = "Closed-loop JetStream publishes, each waiting for its PubAck; throughput and latency percentiles")]
struct Args {
    /// Server URL(s), comma-separated; a client may connect to any of them.
    #[arg(long, default_value = "nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224")]
    url: String,
    /// Concurrent publishers, each with one message outstanding.
    #[arg(long, default_value_t = 64)]
    clients: u32,
    /// NATS connections the publishers share (0: one connection per publisher).
    #[arg(long, default_value_t = 1)]
    connections: u32,
    /// Size of each published message's payload.
    #[arg(long, default_value_t = 256)]
    record_bytes: u32,
    /// Run for this long.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Stream to (re)create; any existing stream of this name is deleted first.
    #[arg(long, default_value = "BENCH")]
    stream: String,
    /// Replicas of the stream.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Runtime threads for the load generator, as in `truba bench`: 1 runs every publisher on
    /// one thread; more use a multi-threaded runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    let args = Args::parse();
    let runtime = if args.threads > 1 {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    };
    let runtime = runtime.unwrap_or_else(|e| {
        eprintln!("jetstream-bench: cannot start the runtime: {e}");
        std::process::exit(1);
    });
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("jetstream-bench: {e}");
        std::process::exit(1);
    }
}

async fn connect(servers: &[ServerAddr]) -> Result<async_nats::Client, Error> {
    // Any of the listed servers; the client also learns the cluster's other members.
    Ok(async_nats::ConnectOptions::new().retain_servers_order().connect(servers).await?)
}

async fn run(args: Args) -> Result<(), Error> {
    if args.clients == 0 || args.record_bytes == 0 {
        return Err("--clients and --record-bytes must be positive".into());
    }
    let servers: Vec<ServerAddr> =
        args.url.split(',').map(|s| s.trim().parse::<ServerAddr>()).collect::<Result<_, _>>()?;
    let connections = if args.connections == 0 { args.clients } else { args.connections.min(args.clients) };
    let mut contexts = Vec::new();
    for i in 0..connections as usize {
        // Spread the connections over the servers as truba's sessions are not: truba's all end
        // up on its leader, JetStream's may publish through any server.
        let mut order = servers.clone();
        order.rotate_left(i % servers.len());
        contexts.push(jetstream::new(connect(&order).await?));
    }

    let js = &contexts[0];
    let _ = js.delete_stream(&args.stream).await;
    js.create_stream(stream::Config {
        name: args.stream.clone(),
        subjects: vec!["bench.>".into()],
        num_replicas: args.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    // One acknowledged message, so the stream's leader is in place before the clock starts.
    js.publish("bench.warmup", Bytes::from_static(b"w")).await?.await?;

    let payload = Bytes::from(vec![b'r'; args.record_bytes as usize]);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_s);
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let (js, payload) = (contexts[i as usize % contexts.len()].clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let subject = format!("bench.{i}");
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let mut done = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                js.publish(subject.clone(), payload.clone()).await?.await?;
                hist.record(t.elapsed().as_micros() as u64).ok();
                done += 1;
            }
            Ok::<_, Error>((hist, done))
        }));
    }
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let mut ops = 0u64;
    for t in tasks {
        let (h, n) = t.await??;
        hist.add(&h)?;
        ops += n;
    }
    let secs = started.elapsed().as_secs_f64();
    let rate = ops as f64 / secs;
    let mib = rate * args.record_bytes as f64 / (1 << 20) as f64;
    let q = |x: f64| hist.value_at_quantile(x) as f64 / 1000.0;
    if args.json {
        let v = serde_json::json!({"system": "jetstream", "clients": args.clients, "connections": connections,
            "replicas": args.replicas, "record_bytes": args.record_bytes, "seconds": secs, "ops": ops, "ops_per_s": rate,
            "mib_per_s": mib, "p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999), "max_ms": q(1.0)});
        println!("{v}");
    } else {
        println!(
            "jetstream R{}: {} clients over {connections} connections, {} B messages, {secs:.1} s: {ops} acked, {rate:.0} ops/s, {mib:.2} MiB/s",
            args.replicas, args.clients, args.record_bytes
        );
        println!("latency: p50 {:.2} ms  p99 {:.2} ms  p999 {:.2} ms  max {:.2} ms", q(0.5), q(0.99), q(0.999), q(1.0));
    }
    let _ = contexts[0].delete_stream(&args.stream).await;
    for c in contexts {
        let _ = c.client().flush().await;
    }
    Ok(())
}
