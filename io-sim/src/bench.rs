//! Engine throughput: one engine, an in-memory disk with no latency and no faults, and `clients`
//! clients each keeping one append outstanding. What it measures is the engine's own cost per
//! operation (request handling, batching, encoding, apply, reply), not any disk.

use crate::disk::{DiskFaults, SimDisk};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;
use truba_engine::{
    ClientId, Engine, EngineConfig, Handle, Input, Instant, Kind, KindConfig, Now, Output, Reply, Request, Seq, UnixMs,
};

#[derive(Debug)]
pub struct EngineBench {
    pub ops: u64,
    pub batches: u64,
    pub wall_s: f64,
}

struct Driver {
    engine: Engine,
    disk: SimDisk,
    rng: ChaCha8Rng,
    now: Now,
    completions: VecDeque<Input>,
    replies: Vec<(ClientId, Seq, Reply)>,
    batches: u64,
}

impl Driver {
    fn feed(&mut self, input: Input) {
        self.completions.push_back(input);
        while let Some(input) = self.completions.pop_front() {
            self.now.mono.0 += 1;
            self.now.wall.0 += 1;
            self.engine.handle(self.now, input);
            while let Some(o) = self.engine.poll() {
                match o {
                    Output::Io { id, op } => {
                        if matches!(op, truba_engine::IoOp::Sync { .. }) {
                            self.batches += 1;
                        }
                        let result = self.disk.execute(&op, &mut self.rng);
                        self.completions.push_back(Input::IoDone { id, result });
                    }
                    Output::Reply { client, seq, outcome } => {
                        self.replies.push((client, seq, outcome.expect("benchmark requests succeed")))
                    }
                    Output::Stopped(f) => panic!("engine stopped: {f}"),
                    _ => {}
                }
            }
        }
    }
}

pub fn engine_throughput(ops: u64, clients: u32, record_bytes: u32) -> EngineBench {
    let mut cfg = EngineConfig::default();
    let kind = KindConfig {
        record_bytes_max: record_bytes.max(1),
        session_bytes_max: u32::MAX,
        session_records_max: u32::MAX,
        lease_ms: u64::MAX / 4,
        ..KindConfig::default()
    };
    cfg.kinds.insert(Kind(1), kind);
    cfg.limits.snapshot_every_entries = 1_000_000;
    cfg.limits.pending_requests_max = clients.max(1) * 2;
    let mut d = Driver {
        engine: Engine::new(cfg, 1),
        disk: SimDisk::new(DiskFaults { write_latency_us: 0, fsync_latency_us: 0, ..DiskFaults::default() }),
        rng: ChaCha8Rng::seed_from_u64(1),
        now: Now { mono: Instant(0), wall: UnixMs(crate::clock::EPOCH_MS) },
        completions: VecDeque::new(),
        replies: Vec::new(),
        batches: 0,
    };
    d.feed(Input::Boot);
    // Open one session per client.
    for c in 0..clients {
        let request = Request::New { kind: Kind(1), record: None };
        d.completions.push_back(Input::Request { client: ClientId(c as u64), seq: Seq(1), request });
    }
    d.feed(Input::Tick);
    let mut handles = vec![None; clients as usize];
    for (client, _, reply) in d.replies.drain(..) {
        let Reply::Created { handle } = reply else { unreachable!("new answers created") };
        handles[client.0 as usize] = Some(handle);
    }
    let handles: Vec<Handle> = handles.into_iter().map(|h| h.expect("every client has a session")).collect();
    let record = vec![b'x'; record_bytes as usize];
    let append = |c: usize, seq: u64| Input::Request {
        client: ClientId(c as u64),
        seq: Seq(seq),
        request: Request::Append { handle: handles[c], record: record.clone() },
    };
    let batches_before = d.batches;
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    let mut done = 0u64;
    for c in 0..clients as usize {
        d.completions.push_back(append(c, 2));
        sent += 1;
    }
    while done < ops {
        d.feed(Input::Tick);
        let replies = std::mem::take(&mut d.replies);
        done += replies.len() as u64;
        for (client, seq, _) in replies {
            if sent < ops {
                d.completions.push_back(append(client.0 as usize, seq.0 + 1));
                sent += 1;
            }
        }
    }
    EngineBench { ops: done, batches: d.batches - batches_before, wall_s: started.elapsed().as_secs_f64() }
}
