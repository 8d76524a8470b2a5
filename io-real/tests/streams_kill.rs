//! Real processes and the reading side:
//!
//! - a tail and a watch reading from the leader of a three-member cluster under load survive the
//!   leader's SIGKILL: they go on at another member, and what each got is exactly a surviving
//!   member's ledger read from the start (no gap, no repeat);
//! - a watcher that stops acknowledging leaves the server's memory flat while writes go on
//!   (VmRSS from /proc; the bound is [`RSS_GROWTH_MAX`]), and gets everything once it goes on;
//! - a consumer process killed (SIGKILL) mid-batch, again and again, resumes from its checkpoint,
//!   and the effects it commits with its checkpoints are applied exactly once.

#[allow(dead_code)]
mod common;

use common::cluster::{Cluster, ClusterConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use truba::client::{ClientOptions, Consumer, Pipe, TailItem, WatchItem, WatchOptions};
use truba::net::Tcp;
use truba_engine::{CommitOp, Event, Filter, Index, Kind, LedgerEntry, SessionId, TailFrom};

fn options() -> ClientOptions {
    ClientOptions { request_timeout: Duration::from_secs(2), retry_for: Duration::from_secs(20), ..Default::default() }
}

async fn pipe(addrs: Vec<String>) -> Pipe {
    Pipe::connect_with(Tcp, addrs, options()).await.expect("connecting")
}

/// Sessions opened, appended to and deleted, one after another, until `stop`; the count of
/// sessions deleted. Records are `record_len` bytes at least. Refusals and time-outs (a leader
/// change) are skipped over.
async fn load(p: Pipe, stop: Arc<AtomicBool>, done: Arc<AtomicU64>, record_len: usize) {
    let mut i = 0u64;
    let record = |what: &str, i: u64| format!("{what} {i:>width$}", width = record_len).into_bytes();
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let Ok(mut s) = p.new_with(common::KIND, record("load", i)).await else { continue };
        if s.append(record("more", i)).await.is_ok() && s.delete().await.is_ok() {
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Every entry of `addr`'s own ledger from index 1 through `through`, all events included.
async fn ledger_of(addr: &str, through: Index) -> Vec<LedgerEntry> {
    let p = pipe(vec![addr.to_string()]).await;
    let mut t = p.tail(TailFrom::Index(Index(1)), Filter { internal: true, ..Filter::default() });
    let mut out = Vec::new();
    while t.position().is_none_or(|at| at < through) {
        match t.next().await.expect("the tail goes on") {
            Ok(TailItem::Entry(e)) => out.push(e),
            Ok(TailItem::Progress { .. }) => {}
            Err(e) => panic!("reading {addr}'s ledger: {e}"),
        }
    }
    out.retain(|e| e.index <= through);
    out
}

/// What a reader task got, and the members it read from.
#[derive(Default)]
struct Got {
    entries: Vec<LedgerEntry>,
    /// A watch's sync marker, then its changes: (index, event).
    synced: Option<Index>,
    changes: Vec<(Index, Event)>,
    members: BTreeSet<String>,
    /// How far it has got (a tail's position, a watch's acknowledged index).
    at: Index,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_and_a_watch_survive_a_leader_sigkill_with_no_gap_and_no_repeat() {
    let mut cluster = Cluster::new(&ClusterConfig {
        dir_prefix: "truba-streams-kill-",
        engine: "snapshot_every_entries = 300\n",
        kind: "lease_ms = 600000\n",
        stored: false,
    });
    for i in 0..3 {
        cluster.start(i);
    }
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let (_, term, _) = cluster.wait_settled(Duration::from_secs(20)).await;
    let addrs = cluster.addrs_from(leader);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4).map(|_| tokio::spawn(load_on(addrs.clone(), stop.clone(), done.clone()))).collect();

    // Both readers start at the leader (the first address) and read everything.
    let tail_got = Arc::new(Mutex::new(Got::default()));
    let watch_got = Arc::new(Mutex::new(Got::default()));
    let readers_stop = Arc::new(AtomicBool::new(false));
    let tail_task = {
        let (p, got, stop) = (pipe(addrs.clone()).await, tail_got.clone(), readers_stop.clone());
        tokio::spawn(async move {
            let mut t = p.tail(TailFrom::Index(Index(1)), Filter { internal: true, ..Filter::default() });
            while !stop.load(Ordering::Relaxed) {
                let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(100), t.next()).await else { continue };
                let mut g = got.lock().unwrap();
                if let Some(m) = t.member() {
                    g.members.insert(m.to_string());
                }
                match item.expect("the tail never fails") {
                    TailItem::Entry(e) => g.entries.push(e),
                    TailItem::Progress { .. } => {}
                }
                g.at = t.position().unwrap_or_default();
            }
        })
    };
    let watch_task = {
        let (p, got, stop) = (pipe(addrs.clone()).await, watch_got.clone(), readers_stop.clone());
        tokio::spawn(async move {
            let mut w = p.watch(WatchOptions { window: Some(64), ..WatchOptions::default() });
            while !stop.load(Ordering::Relaxed) {
                let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(100), w.next()).await else { continue };
                {
                    let mut g = got.lock().unwrap();
                    if let Some(m) = w.member() {
                        g.members.insert(m.to_string());
                    }
                    match item.expect("the watch never fails") {
                        WatchItem::ResyncStart { .. } => {
                            assert!(g.synced.is_none(), "one resync only: resumes go on after what was acknowledged");
                        }
                        WatchItem::Session(_) => {}
                        WatchItem::Synced { at } => g.synced = Some(at),
                        WatchItem::Change(c) => {
                            let event = Event {
                                session: Some(c.session),
                                kind: Some(c.kind),
                                what: c.what,
                                before: c.before,
                                after: c.after,
                            };
                            g.changes.push((c.index, event));
                        }
                    }
                }
                w.done(Ok(())).await;
                got.lock().unwrap().at = w.acknowledged().unwrap_or_default();
            }
        })
    };

    // Load for a while, then the leader dies under the readers' feet.
    let wait_for = |n: u64| {
        let done = done.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while done.load(Ordering::Relaxed) < n {
                assert!(Instant::now() < deadline, "the load did not reach {n} sessions");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for(150).await;
    assert_eq!(tail_got.lock().unwrap().members.len(), 1, "the tail reads from the leader");
    let killed_addr = cluster.nodes[leader].client.clone();
    assert!(tail_got.lock().unwrap().members.contains(&killed_addr));
    cluster.nodes[leader].kill9();
    let (new_leader, _, _) = cluster.wait_new_leader(leader, term, Duration::from_secs(10)).await;
    let at_kill = done.load(Ordering::Relaxed);
    wait_for(at_kill + 150).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    // Everything committed, read back from a survivor, is what the readers got.
    let (applied, _, _) = cluster.wait_converged(Duration::from_secs(20)).await;
    let target = Index(applied);
    let deadline = Instant::now() + Duration::from_secs(20);
    while tail_got.lock().unwrap().at < target || watch_got.lock().unwrap().at < target {
        assert!(Instant::now() < deadline, "the readers did not reach index {applied}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    readers_stop.store(true, Ordering::Relaxed);
    tail_task.await.unwrap();
    watch_task.await.unwrap();
    let survivor = (0..3).find(|&i| cluster.running(i)).expect("a survivor");
    let reference = ledger_of(&cluster.nodes[survivor].client, target).await;
    assert_eq!(reference.first().map(|e| e.index), Some(Index(1)));
    assert_eq!(reference.last().map(|e| e.index), Some(target));

    let tail = std::mem::take(&mut *tail_got.lock().unwrap());
    assert!(tail.members.len() >= 2, "the tail went on at another member: {:?}", tail.members);
    let got: Vec<&LedgerEntry> = tail.entries.iter().filter(|e| e.index <= target).collect();
    let indexes: Vec<u64> = got.iter().map(|e| e.index.0).collect();
    assert_eq!(indexes, (1..=applied).collect::<Vec<_>>(), "every index once, in order");
    for (g, r) in got.iter().zip(&reference) {
        assert_eq!(*g, r, "entry {} as the survivor holds it", r.index.0);
    }

    let watch = std::mem::take(&mut *watch_got.lock().unwrap());
    assert!(watch.members.len() >= 2, "the watch went on at another member: {:?}", watch.members);
    let synced = watch.synced.expect("the watch synced");
    let expected: Vec<(Index, Event)> = reference
        .iter()
        .filter(|e| e.index > synced)
        .flat_map(|e| {
            e.events.iter().filter(|ev| ev.session.is_some() && !ev.what.is_internal()).map(|ev| (e.index, ev.clone()))
        })
        .collect();
    let changes: Vec<(Index, Event)> = watch.changes.iter().filter(|(i, _)| *i <= target).cloned().collect();
    assert_eq!(changes.len(), expected.len(), "as many changes as the ledger has session events after {synced:?}");
    assert!(changes == expected, "the watch's changes are the ledger's session events, each once, in order");

    // Consumers through a follower: requests and checkpoint reads follow the leader, a
    // read-through is answered by the follower itself.
    let follower = (0..3).find(|&i| cluster.running(i) && i != new_leader).expect("a running follower");
    let via_follower = pipe(cluster.addrs_from(follower)).await;
    let mut consumer = Consumer::open(&via_follower, "audit").await.expect("opened through a follower");
    consumer.commit(target, vec![]).await.expect("committed through a follower");
    assert_eq!(via_follower.checkpoint("audit").await.unwrap().through, target);
    let only_follower = pipe(vec![cluster.nodes[follower].client.clone()]).await;
    let covered = only_follower.read_through("audit", target, Duration::from_secs(5)).await;
    assert_eq!(covered.expect("the follower answers a read-through").through, target);
    eprintln!(
        "tail: {} entries from {:?}; watch: synced at {}, {} changes from {:?}; killed {killed_addr}",
        got.len(),
        tail.members,
        synced.0,
        changes.len(),
        watch.members
    );
}

async fn load_on(addrs: Vec<String>, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    load(pipe(addrs).await, stop, done, 0).await
}

// ---------------------------------------------------------------------------------------------
// A watcher that stops acknowledging.

/// How much the server's resident memory may grow, after a warm-up, while a watcher that
/// acknowledges nothing holds a stream open and writes go on. The engine holds a stream's
/// position and window accounting only, never the items it has not sent, so what grows is the
/// allocator's slack; the state, log and ledger cache are bounded by the config below. The
/// changes the watcher is not sent meanwhile come to [`MEASURED`] x 2 records of
/// [`RECORD_BYTES`], some 24 MB: a server that held them would pass the bound twice over.
const RSS_GROWTH_MAX: u64 = 12 << 20;
const RECORD_BYTES: usize = 4_000;
/// Writers (each a session at a time: open, append, delete), and the sessions written before the
/// memory is first read and while it is watched.
const WRITERS: usize = 32;
const WARM_UP: u64 = 1_000;
const MEASURED: u64 = 3_000;

fn vm_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("a VmRSS line");
    let kb: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmRSS in kB");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_stops_acknowledging_leaves_the_servers_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let config = dir.path().join("truba.toml");
    let text = format!(
        "data_dir = \"{}\"\nlisten = \"{addr}\"\n\n[engine]\nsnapshot_every_entries = 1000\n\
         snapshot_log_bytes_max = 1048576\nledger_cache_bytes_max = 1048576\ndedup_clients_max = 1000\n\
         tombstones_max = 1000\n\n[kinds.1]\nlease_ms = 600000\n",
        dir.path().join("data").display()
    );
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("server.log");
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_truba"));
    let mut child = Some(common::spawn_serve(&bin, &config, &log, "memory test"));
    let pid = child.as_ref().unwrap().id();
    let p = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(p) = Pipe::connect_with(Tcp, vec![addr.clone()], options()).await {
                if p.new(common::KIND).await.is_ok() {
                    break p;
                }
            }
            assert!(Instant::now() < deadline, "the server did not serve:\n{}", common::log_tail(&log, 30));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    // The watcher takes a window's worth and then acknowledges nothing.
    let mut w = p.watch(WatchOptions { window: Some(32), ..WatchOptions::default() });
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> =
        (0..WRITERS).map(|_| tokio::spawn(load(p.clone(), stop.clone(), done.clone(), RECORD_BYTES))).collect();
    let mut held = 0;
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(500), w.next()).await {
        item.expect("the watch goes on");
        held += 1;
    }
    assert!(held > 0, "the watcher got its window's worth");

    // Warm-up: the caches, the log between snapshots and the tables fill to their bounds.
    let started = Instant::now();
    while done.load(Ordering::Relaxed) < WARM_UP {
        assert!(started.elapsed() < Duration::from_secs(30), "the warm-up load did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let base = vm_rss(pid);
    let from = done.load(Ordering::Relaxed);
    let mut peak = base;
    while done.load(Ordering::Relaxed) < from + MEASURED {
        assert!(started.elapsed() < Duration::from_secs(60), "the load did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(vm_rss(pid));
    }
    stop.store(true, Ordering::Relaxed);
    for t in writers {
        t.await.unwrap();
    }
    let sessions = done.load(Ordering::Relaxed) - from;
    eprintln!(
        "VmRSS {} MiB after the warm-up, at most {} MiB while {sessions} more sessions (3 entries each) were written",
        base >> 20,
        peak >> 20
    );
    assert!(
        peak <= base + RSS_GROWTH_MAX,
        "the server's memory grew by {} MiB (bound {} MiB) with a watcher holding its window",
        (peak - base) >> 20,
        RSS_GROWTH_MAX >> 20
    );

    // The stream was held, not cut: acknowledged now, the watcher gets every change.
    let head = p.status().await.unwrap().engine.applied;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        w.done(Ok(())).await;
        if w.acknowledged().is_some_and(|at| at >= head) {
            break;
        }
        assert!(Instant::now() < deadline, "the watcher did not catch up");
        match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
            Ok(Some(item)) => drop(item.expect("the watch goes on after its pause")),
            Ok(None) => panic!("the watch ended"),
            Err(_) => panic!("nothing came for 5 s; acknowledged through {:?} of {}", w.acknowledged(), head.0),
        }
    }
    let _ = common::terminate(&mut child, Duration::from_secs(10)).await;
}

// ---------------------------------------------------------------------------------------------
// A consumer killed mid-batch.

const CONSUMER: &str = "copier";
/// Inputs a consumer process handles before it commits them, with a pause for each (so that a
/// kill lands mid-batch).
const BATCH: usize = 5;
const PAUSE: Duration = Duration::from_millis(8);

/// The consumer process: run by the test below as a child (this same test binary, this test
/// alone, with the server's address in the environment); without it, it does nothing. It copies
/// every kind-1 session's creation into a kind-2 session "copy of ID", committing each batch of
/// copies with its checkpoint, until its checkpoint reaches `TRUBA_TEST_CONSUMER_UNTIL`.
#[tokio::test(flavor = "current_thread")]
async fn consumer_process() {
    let Ok(addr) = std::env::var("TRUBA_TEST_CONSUMER_ADDR") else { return };
    let until: u64 = std::env::var("TRUBA_TEST_CONSUMER_UNTIL").ok().and_then(|u| u.parse().ok()).unwrap_or(u64::MAX);
    let p = pipe(vec![addr]).await;
    let mut c = Consumer::open(&p, CONSUMER).await.expect("opening the consumer");
    let mut events = c.events(Filter { kinds: vec![Kind(common::KIND)], ..Filter::default() });
    let mut ops = Vec::new();
    while c.checkpoint().0 < until {
        let item = events.next().await.expect("the events go on").expect("reading events");
        if let TailItem::Entry(e) = item {
            for ev in e.events.iter().filter(|ev| ev.what.name() == "created") {
                tokio::time::sleep(PAUSE).await;
                let record = format!("copy of {}", ev.session.expect("a session's event").0).into_bytes();
                ops.push(CommitOp::New { kind: Kind(2), records: vec![record], store_s: None });
            }
        }
        let through = events.position().expect("something was read");
        if ops.len() >= BATCH || (through.0 >= until && through > c.checkpoint()) {
            c.commit(through, std::mem::take(&mut ops)).await.expect("committing");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_batch_resumes_from_its_checkpoint_and_applies_its_effects_once() {
    use truba::config::{Config, KindSection};
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config { data_dir: dir.path().to_path_buf(), ..Config::default() };
    c.kinds.clear();
    for kind in [1, 2] {
        let config = truba_engine::KindConfig { lease_ms: 600_000, ..Default::default() };
        c.kinds.insert(kind, KindSection { handler: None, config });
    }
    let listener = truba::server::bind(&truba::net::RealNet::plain(), "127.0.0.1:0").await.unwrap();
    let addr = truba::net::Transport::local_addr(&truba::net::RealNet::plain(), &listener).unwrap().to_string();
    c.listen = addr.clone();
    let fs = truba::disk::DirFs::open(&c.data_dir).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server =
        tokio::spawn(truba::server::run(c, truba::server::RealEnv::default(), Arc::new(fs), listener, async {
            let _ = stop_rx.await;
        }));
    let p = pipe(vec![addr.clone()]).await;
    let mut inputs = Vec::new();
    let add = |n: usize, p: Pipe| async move {
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(p.new_with(common::KIND, format!("input {i}").into_bytes()).await.unwrap().id());
        }
        ids
    };
    inputs.extend(add(40, p.clone()).await);

    let child_addr = addr.clone();
    let spawn = move |until: Option<u64>| {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "consumer_process", "--nocapture", "--test-threads", "1"])
            .env("TRUBA_TEST_CONSUMER_ADDR", &child_addr)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(u) = until {
            cmd.env("TRUBA_TEST_CONSUMER_UNTIL", u.to_string());
        }
        cmd.spawn().expect("starting the consumer process")
    };
    let mut rng = common::XorShift::new(0x5eed);
    let mut kills = 0;
    for round in 0..4 {
        let before = p.checkpoint(CONSUMER).await.map(|c| c.through).unwrap_or_default();
        let mut child = spawn(None);
        // Killed once it has committed at least one batch of this run, part way into another.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = p.checkpoint(CONSUMER).await.map(|c| c.through).unwrap_or_default();
            if now > before {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: the consumer committed nothing");
            assert!(child.try_wait().unwrap().is_none(), "round {round}: the consumer exited by itself");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.range(0, (BATCH as u64) * PAUSE.as_millis() as u64))).await;
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        kills += 1;
        inputs.extend(add(10, p.clone()).await);
    }
    // A last run to the end.
    let head = p.status().await.unwrap().engine.applied;
    let status = tokio::task::spawn_blocking(move || spawn(Some(head.0)).wait().unwrap()).await.unwrap();
    assert!(status.success(), "the last consumer run failed: {status}");
    assert!(p.checkpoint(CONSUMER).await.unwrap().through >= head);

    // Every input copied exactly once.
    let now = p.status().await.unwrap().engine.applied;
    let mut t = p.tail(TailFrom::Index(Index(1)), Filter { kinds: vec![Kind(2)], ..Filter::default() });
    let mut copies: BTreeMap<String, u32> = BTreeMap::new();
    while t.position().is_none_or(|at| at < now) {
        if let Some(Ok(TailItem::Entry(e))) = t.next().await {
            for ev in e.events {
                if let truba_engine::What::Created { records } = ev.what {
                    *copies.entry(String::from_utf8(records[0].clone()).unwrap()).or_default() += 1;
                }
            }
        }
    }
    let expected: BTreeMap<String, u32> =
        inputs.iter().map(|id: &SessionId| (format!("copy of {}", id.0), 1)).collect();
    assert_eq!(copies, expected, "each input copied once after {kills} kills mid-batch");
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
