//! The harness shared by the turmoil tests (`turmoil.rs`: one server; `turmoil_cluster.rs`: a
//! cluster of three): the real server and client code over turmoil's simulated TCP and
//! filesystem, and faults injected between simulation steps.
//!
//! Each test binary compiles this module on its own (`mod turmoil_common;`) and uses only part
//! of it, hence the `dead_code` allowance.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::mpsc;
use truba::client::{ClientError, ClientOptions, Pipe};
use truba::config::{Config, KindSection, ServerLimits};
use truba::disk::{self, Fs};
use truba::net::Transport;
use truba::server::{self, Env, ToEngine};
use truba_engine::{IoId, IoOp, KindConfig, Limits};
use turmoil::fs::shim::std::fs as simfs;
use turmoil::Sim;

// ---------------------------------------------------------------------------------------------
// The simulated environment.

/// turmoil's TCP behind the server's and client's `Transport`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimNet;

impl Transport for SimNet {
    type Stream = turmoil::net::TcpStream;
    type Listener = turmoil::net::TcpListener;

    async fn bind(&self, addr: &str) -> io::Result<Self::Listener> {
        turmoil::net::TcpListener::bind(addr).await
    }

    async fn accept(&self, listener: &Self::Listener) -> io::Result<(Self::Stream, SocketAddr)> {
        listener.accept().await
    }

    async fn connect(&self, addr: &str) -> io::Result<Self::Stream> {
        turmoil::net::TcpStream::connect(addr).await
    }

    fn local_addr(&self, listener: &Self::Listener) -> io::Result<SocketAddr> {
        listener.local_addr()
    }
}

/// What the data directory saw, across every boot of one server (shared with the test).
#[derive(Debug, Default)]
pub struct FsStats {
    /// Distinct segment files written to.
    pub segments: Mutex<BTreeSet<String>>,
    /// Snapshots made durable (`*.tmp` renamed to `snap-*`).
    pub snapshots: AtomicUsize,
    /// Files removed (segments covered by a snapshot, old snapshots).
    pub removed: AtomicUsize,
    /// Copies of torn tails written by recovery (`torn-*.bin`).
    pub torn_copies: AtomicUsize,
    /// Truncations (recovery cutting a torn tail).
    pub truncations: AtomicUsize,
    /// Writes of any kind.
    pub writes: AtomicUsize,
    /// Where each file's data ends (as far as writes went).
    pub ends: Mutex<BTreeMap<String, u64>>,
    /// Bytes written to each file since its last fsync (what a crash now would lose or tear).
    pub unsynced: Mutex<BTreeMap<String, u64>>,
    /// Files created (or renamed into place) since the last directory fsync: a crash now
    /// drops them whole, so their writes cannot tear.
    pub new_entries: Mutex<BTreeSet<String>>,
}

impl FsStats {
    /// Most unsynced bytes in one file whose directory entry is durable: a crash now tears
    /// them at sector boundaries.
    pub fn tearable_bytes(&self) -> u64 {
        let new_entries = self.new_entries.lock().unwrap();
        let unsynced = self.unsynced.lock().unwrap();
        unsynced.iter().filter(|(name, _)| !new_entries.contains(*name)).map(|(_, b)| *b).max().unwrap_or(0)
    }

    /// Whether a segment that is full (the next batch starts a new one) has unsynced data in
    /// it under a durable name.
    pub fn full_segment_unsynced(&self) -> bool {
        let new_entries = self.new_entries.lock().unwrap();
        let ends = self.ends.lock().unwrap();
        self.unsynced.lock().unwrap().keys().any(|name| {
            name.starts_with("log-")
                && !new_entries.contains(name)
                && ends.get(name).copied().unwrap_or(0) >= SEGMENT_BYTES_MAX
        })
    }

    /// A power loss: nothing is pending any more (a process restart changes nothing here).
    pub fn lost_power(&self) {
        self.unsynced.lock().unwrap().clear();
        self.new_entries.lock().unwrap().clear();
    }

    pub fn summary(&self) -> String {
        format!(
            "segments written {}, snapshots {}, files removed {}, torn tails cut {} (copies {})",
            self.segments.lock().unwrap().len(),
            self.snapshots.load(Ordering::Relaxed),
            self.removed.load(Ordering::Relaxed),
            self.truncations.load(Ordering::Relaxed),
            self.torn_copies.load(Ordering::Relaxed),
        )
    }
}

/// The data directory on turmoil's per-host filesystem. Files are opened per operation, so no
/// handle outlives a crash.
struct SimFs {
    dir: PathBuf,
    stats: Arc<FsStats>,
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such file"))
}

impl SimFs {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Opens an existing file for reading and writing (`NotFound` if it does not exist).
    fn open(&self, name: &str) -> io::Result<simfs::File> {
        simfs::OpenOptions::new().read(true).write(true).open(self.path(name))
    }
}

impl Fs for SimFs {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in simfs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        simfs::read(self.path(name))
    }

    fn read_at(&self, name: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        disk::read_range(&self.open(name)?, offset, len)
    }

    fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        if name.starts_with("log-") {
            self.stats.segments.lock().unwrap().insert(name.to_string());
        }
        if name.starts_with("torn-") {
            self.stats.torn_copies.fetch_add(1, Ordering::Relaxed);
        }
        let path = self.path(name);
        if !simfs::exists(&path) {
            self.stats.new_entries.lock().unwrap().insert(name.to_string());
        }
        let file = simfs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        file.write_all_at(data, offset)?;
        *self.stats.unsynced.lock().unwrap().entry(name.to_string()).or_default() += data.len() as u64;
        let mut ends = self.stats.ends.lock().unwrap();
        let end = ends.entry(name.to_string()).or_default();
        *end = (*end).max(offset + data.len() as u64);
        Ok(())
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        self.open(name)?.sync_data()?;
        self.stats.unsynced.lock().unwrap().remove(name);
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        simfs::sync_dir(&self.dir)?;
        self.stats.new_entries.lock().unwrap().clear();
        Ok(())
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        self.stats.truncations.fetch_add(1, Ordering::Relaxed);
        self.open(name)?.set_len(len)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        // turmoil reports a missing source as a plain error; the engine expects NotFound.
        if !simfs::exists(self.path(from)) {
            return Err(not_found(from));
        }
        simfs::rename(self.path(from), self.path(to))?;
        // turmoil tracks unsynced writes by the name they were made under.
        self.stats.new_entries.lock().unwrap().insert(to.to_string());
        if to.starts_with("snap-") {
            self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        simfs::remove_file(self.path(name))?;
        self.stats.removed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn usage(&self) -> u64 {
        let Ok(entries) = simfs::read_dir(&self.dir) else { return 0 };
        entries.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
    }
}

/// A fixed wall-clock epoch for every simulation: 2024-01-01T00:00:00Z.
const EPOCH_SECS: u64 = 1_704_067_200;
/// How long an fsync takes. Writes are instant; the delay before each sync leaves a window in
/// which a crash finds written but unsynced data (to lose or tear).
const FSYNC_LATENCY: Duration = Duration::from_millis(2);

/// One disk operation, without its data (for `RUST_LOG=simfs=debug`).
fn describe(op: &IoOp) -> String {
    match op {
        IoOp::Write { file, offset, data } => format!("write {file} @{offset} +{}", data.len()),
        IoOp::Truncate { file, len } => format!("truncate {file} to {len}"),
        other => format!("{other:?}"),
    }
}

#[derive(Clone, Copy, Debug)]
pub struct SimEnv {
    seed: u64,
}

impl Env for SimEnv {
    type Net = SimNet;

    fn transport(&self) -> SimNet {
        SimNet
    }

    /// A task on the host's runtime, not a thread: turmoil's filesystem belongs to the host
    /// whose software is running, and a crash must stop the worker with the rest of the host.
    fn spawn_disk(
        &self,
        fs: Arc<dyn Fs>,
        mut ops: mpsc::UnboundedReceiver<(IoId, IoOp)>,
        done: mpsc::UnboundedSender<ToEngine>,
    ) {
        tokio::spawn(async move {
            while let Some((id, op)) = ops.recv().await {
                if matches!(op, IoOp::Sync { .. } | IoOp::SyncDir) {
                    tokio::time::sleep(FSYNC_LATENCY).await;
                }
                let result = disk::execute(fs.as_ref(), &op);
                tracing::debug!(target: "simfs", at = ?turmoil::sim_elapsed().unwrap_or_default(), op = %describe(&op), ok = result.is_ok());
                if done.send(ToEngine::IoDone { id, result }).is_err() {
                    break;
                }
            }
        });
    }

    fn wall_ms(&self) -> u64 {
        let since_epoch = turmoil::since_epoch().expect("called on a simulated host");
        since_epoch.as_millis() as u64
    }

    fn seed(&self) -> u64 {
        self.seed
    }
}

// ---------------------------------------------------------------------------------------------
// Hosts, configuration, the fault schedule.

pub const SERVER: &str = "server:7400";
const DATA_DIR: &str = "/data";
/// Small segments, so that they roll every few dozen batches.
const SEGMENT_BYTES_MAX: u64 = 32 * 1024;

pub fn kind_config() -> KindConfig {
    KindConfig {
        default_delay_s: 1,
        jitter_window_s: 1,
        record_bytes_max: 1024,
        session_bytes_max: 256 * 1024,
        session_records_max: 1000,
        // Long: in these tests only the handler test wants leases to run out.
        lease_ms: 600_000,
        handler_slots: 4,
        store_timeout_s_max: 3600,
        backoff_base_s: 1,
        backoff_cap_s: 2,
        // Handler failures here are faults of the network, not of the sessions: never give up.
        max_attempts: 0,
    }
}

/// The server's configuration: small segments and frequent snapshots so that both happen
/// within a few seconds of load.
pub fn config(kind: KindConfig) -> Config {
    let mut kinds = BTreeMap::new();
    kinds.insert(1, KindSection { handler: Some("handler:7500".into()), config: kind });
    Config {
        data_dir: DATA_DIR.into(),
        listen: "0.0.0.0:7400".into(),
        advertise: Some(vec![SERVER.into()]),
        server: ServerLimits {
            connections_max: 64,
            frame_bytes_max: 64 * 1024,
            inflight_per_connection_max: 256,
            handler_timeout_ms: 3_000,
            idle_timeout_ms: 10_000,
            ..ServerLimits::default()
        },
        engine: Limits {
            segment_bytes_max: SEGMENT_BYTES_MAX,
            snapshot_every_entries: 64,
            repeater_tick_ms: 50,
            batch_entries_max: 64,
            ..Limits::default()
        },
        kinds,
        ..Config::default()
    }
}

pub fn builder(seed: u64, duration_s: u64) -> turmoil::Builder {
    let mut b = turmoil::Builder::new();
    b.rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_SECS))
        .simulation_duration(Duration::from_secs(duration_s))
        .max_message_latency(Duration::from_millis(5));
    b
}

/// Adds the single server's host, `server`; returns its boot counter.
pub fn server_host(sim: &mut Sim<'_>, config: Config, stats: Arc<FsStats>) -> Arc<AtomicUsize> {
    server_host_named(sim, "server", 0x7275_6261, config, stats)
}

/// Adds a host called `name` that runs the server on the host's own simulated filesystem (in
/// `DATA_DIR`); its `n`th boot seeds the engine with `seed + n`. Returns its boot counter.
pub fn server_host_named(
    sim: &mut Sim<'_>,
    name: &str,
    seed: u64,
    config: Config,
    stats: Arc<FsStats>,
) -> Arc<AtomicUsize> {
    let boots = Arc::new(AtomicUsize::new(0));
    let boots2 = boots.clone();
    sim.host(name, move || {
        let (config, stats, boots) = (config.clone(), stats.clone(), boots2.clone());
        async move {
            let boot = boots.fetch_add(1, Ordering::Relaxed) as u64;
            simfs::create_dir_all(DATA_DIR)?;
            simfs::sync_dir("/")?;
            let fs = Arc::new(SimFs { dir: DATA_DIR.into(), stats });
            let listener = server::bind(&SimNet, &config.listen).await?;
            server::run(config, SimEnv { seed: seed + boot }, fs, listener, std::future::pending()).await?;
            Ok(())
        }
    });
    boots
}

/// Power loss on the server `host` (whose disk `stats` watch): `sim.crash` drops (or tears)
/// whatever was not fsynced.
pub fn power_loss(sim: &mut Sim<'_>, host: &str, stats: &FsStats) {
    stats.lost_power();
    sim.crash(host);
}

/// A fault injected from outside the simulation, between steps.
pub struct Fault {
    /// When: milliseconds after the start, or after the previous fault if `relative`.
    ms: u64,
    relative: bool,
    /// ... and, from then on, at the first step at which this holds.
    when: Option<Box<dyn Fn() -> bool>>,
    what: &'static str,
    inject: Box<dyn FnOnce(&mut Sim<'_>)>,
}

pub fn at(ms: u64, what: &'static str, inject: impl FnOnce(&mut Sim<'_>) + 'static) -> Fault {
    Fault { ms, relative: false, when: None, what, inject: Box::new(inject) }
}

pub fn after(ms: u64, what: &'static str, inject: impl FnOnce(&mut Sim<'_>) + 'static) -> Fault {
    Fault { relative: true, ..at(ms, what, inject) }
}

impl Fault {
    pub fn when(self, condition: impl Fn() -> bool + 'static) -> Fault {
        Fault { when: Some(Box::new(condition)), ..self }
    }
}

/// How long a fault may wait for its condition before the test gives up.
const CONDITION_WAIT_MAX: Duration = Duration::from_secs(5);

/// Steps the simulation, injecting the faults in order, each once its time has come (and its
/// condition holds), then runs it to the end (all clients done). Fails if the clients finish
/// before every fault was injected, or if a condition never holds.
pub fn run_with_faults(sim: &mut Sim<'_>, faults: Vec<Fault>) -> turmoil::Result {
    let mut previous = Duration::ZERO;
    for fault in faults {
        let due = Duration::from_millis(fault.ms) + if fault.relative { previous } else { Duration::ZERO };
        loop {
            let now = sim.elapsed();
            if now >= due && fault.when.as_ref().is_none_or(|c| c()) {
                break;
            }
            if now > due + CONDITION_WAIT_MAX {
                return Err(format!("the condition for `{}` never held from {due:?} to {now:?}", fault.what).into());
            }
            if sim.step()? {
                return Err(format!("the clients finished at {now:?}, before `{}` (due at {due:?})", fault.what).into());
            }
        }
        previous = sim.elapsed();
        eprintln!("  {:>7.3} s  {}", previous.as_secs_f64(), fault.what);
        (fault.inject)(sim);
    }
    sim.run()
}

pub fn options(request_timeout_ms: u64, retry_for_ms: u64) -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_millis(request_timeout_ms),
        request_timeout: Duration::from_millis(request_timeout_ms),
        retry_for: Duration::from_millis(retry_for_ms),
        ..ClientOptions::default()
    }
}

/// Connects a pipe to `addrs` (tried in order), waiting for a server to listen.
pub async fn connect(addrs: &[&str], options: ClientOptions) -> Result<Pipe<SimNet>, ClientError> {
    let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let mut tries = 0;
    loop {
        match Pipe::connect_with(SimNet, addrs.clone(), options.clone()).await {
            Ok(pipe) => return Ok(pipe),
            Err(e) if tries < 100 => {
                tries += 1;
                tracing::debug!(%e, "not connected yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A record for session task `task`, number `n`: unique, 200-1000 bytes.
pub fn record(task: usize, n: usize) -> Vec<u8> {
    let mut r = format!("t{task}-r{n}-").into_bytes();
    let len = 200 + (n * 137 + task * 61) % 800;
    r.resize(len, b'a' + (n % 26) as u8);
    r
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Runs `scenario` for each seed: `default`, or those in `TRUBA_TURMOIL_SEEDS` ("0..100" or
/// "3,17") for a deeper run.
pub fn for_seeds(default: &[u64], scenario: impl Fn(u64) -> turmoil::Result) -> turmoil::Result {
    init_tracing();
    let seeds: Vec<u64> = match std::env::var("TRUBA_TURMOIL_SEEDS") {
        Err(_) => default.to_vec(),
        Ok(spec) => match spec.split_once("..") {
            Some((a, b)) => (a.trim().parse()?..b.trim().parse()?).collect(),
            None => spec.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?,
        },
    };
    for seed in seeds {
        eprintln!("seed {seed}");
        scenario(seed).map_err(|e| format!("seed {seed}: {e}"))?;
    }
    Ok(())
}

pub fn check(cond: bool, msg: impl FnOnce() -> String) -> turmoil::Result {
    if cond {
        Ok(())
    } else {
        Err(msg().into())
    }
}
