//! Real processes, three of them: a `truba` cluster whose stored sessions are kept in source
//! files (tiny engine limits make the leader spill, merge and snapshot early), and a follower that
//! was down while most of them were written. The leader compacts its log past the dead follower,
//! so the restarted follower must take a snapshot install, and with it fetch the source files it
//! lacks from the leader, piece by piece (`SourceFetch` / `SourcePiece`, 4 KiB pieces here).
//!
//! Checked: the restarted follower catches up (same applied index and state hash as the others),
//! shows the leader's spilled sessions and source files, holds the same `src-` files byte for byte
//! and no `*.install.tmp` leftovers; then every stored session comes due and reaches the test's
//! handler exactly once, with its record, read back from the sources.
//!
//! `cargo test -p truba --test cluster_sources -- --nocapture` shows the figures.

// The shared helpers serve several test binaries; this one uses a few of them.
#[allow(dead_code)]
mod common;

use common::cluster::{by_position, dir_names, show_dir, Cluster, ClusterConfig, NODES};
use common::{connect, ms, KIND};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use truba::client::Pipe;
use truba::handler::{self, RepeatData};
use truba::net::{Tcp, Transport};
use truba_engine::{RoleName, SessionId};

/// Sessions stored while all three members run, then while the follower is down.
const SESSIONS_BEFORE: u64 = 2_000;
const SESSIONS_AFTER: u64 = 2_000;
/// Every session holds one record of this many bytes.
const RECORD_BYTES: usize = 1024;
/// Requests in flight at once while storing.
const WRITERS: usize = 64;
/// Every session is stored to come due this long after the first store (all at about the same
/// time, so none comes due before the follower has caught up and been checked).
const DUE_AFTER: Duration = Duration::from_secs(20);
/// A restarted member must be serving and caught up within this long.
const CATCH_UP_MAX: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The cluster (its harness is in `common/cluster.rs`).

/// Three members whose one kind ([`KIND`]) is delivered to `handler` (the test's [`Recorder`]).
fn new_cluster(handler: &str) -> Cluster {
    // A 64 KiB memtable holds about 60 of these sessions: thousands of them make dozens of
    // spills, which at most 4 sources a kind are merged into; the log is snapshotted
    // (and compacted) every 200 entries or 64 KiB.
    let engine = "snapshot_every_entries = 200
snapshot_log_bytes_max = 65536
segment_bytes_max = 65536
stored_memtable_bytes_max = 65536
sources_per_kind_max = 4
source_io_chunk_bytes = 4096
source_read_ahead_bytes = 4096
";
    let kind = format!(
        r#"handler = "{handler}"
lease_ms = 600000
default_delay_s = 3600
jitter_window_s = 0
record_bytes_max = 4096
"#
    );
    Cluster::new(&ClusterConfig { dir_prefix: "truba-cluster-sources-", engine, kind: &kind, stored: true })
}

// ---------------------------------------------------------------------------------------------
// Data directories.

/// Source files (`src-<index>`, final names only) and their lengths.
fn source_files(dir: &Path) -> BTreeMap<String, u64> {
    dir_names(dir)
        .into_iter()
        .filter(|n| n.starts_with("src-") && n.len() == 4 + 20 && n[4..].bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|n| std::fs::metadata(dir.join(&n)).ok().map(|m| (n, m.len())))
        .collect()
}

/// The highest snapshot index in a data directory (`snap-<index>.snap`).
fn last_snapshot(dir: &Path) -> Option<u64> {
    dir_names(dir)
        .iter()
        .filter_map(|n| n.strip_prefix("snap-").and_then(|n| n.strip_suffix(".snap")).and_then(|n| n.parse().ok()))
        .max()
}

// ---------------------------------------------------------------------------------------------
// Sessions and their handler.

/// Session `n`'s one record: its number as text, padded to [`RECORD_BYTES`].
fn record(n: u64) -> Vec<u8> {
    let mut r = format!("session-{n:06}|").into_bytes();
    let mut i = n as u8;
    while r.len() < RECORD_BYTES {
        r.push(b'a' + i % 26);
        i = i.wrapping_add(11);
    }
    r
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("the clock is after 1970").as_secs()
}

/// Opens sessions `numbers`, each with its one record, and stores each to come due at unix
/// second `due_at`, [`WRITERS`] at a time over one pipe. Each session's number and id.
async fn store_sessions(pipe: &Pipe<Tcp>, numbers: std::ops::Range<u64>, due_at: u64) -> Vec<(u64, SessionId)> {
    let next = Arc::new(AtomicU64::new(numbers.start));
    let end = numbers.end;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let (pipe, next) = (pipe.clone(), next.clone());
        workers.spawn(async move {
            let mut out = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= end {
                    return out;
                }
                let s = pipe.new_with(KIND, record(n)).await.unwrap_or_else(|e| panic!("opening session {n}: {e}"));
                let id = s.id();
                let timeout = due_at.saturating_sub(unix_now()).max(1) as u32;
                s.store(timeout).await.unwrap_or_else(|e| panic!("storing session {n} (id {}): {e}", id.0));
                out.push((n, id));
            }
        });
    }
    let mut all = Vec::new();
    while let Some(r) = workers.join_next().await {
        all.extend(r.expect("a writer panicked"));
    }
    all
}

/// One delivery: session id, attempt, records, and whether the handler's delete succeeded.
type Delivery = (u64, u32, Vec<Vec<u8>>, Result<(), String>);

/// Records every delivery it gets, then deletes the session.
struct Recorder(mpsc::UnboundedSender<Delivery>);

impl handler::Handler for Recorder {
    async fn handle(&self, data: RepeatData) -> Result<(), String> {
        let h = data.session.handle();
        let records = data.records.clone();
        let deleted = data.session.delete().await.map_err(|e| e.to_string());
        let _ = self.0.send((h.session.0, h.attempt.0, records, deleted.clone()));
        deleted
    }
}

// ---------------------------------------------------------------------------------------------
// The test.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_fell_behind_fetches_the_source_files_with_its_snapshot() {
    let started = Instant::now();
    let t = |at: Instant| format!("+{}", ms(at - started));

    let handler_listener = Tcp.bind("127.0.0.1:0").await.expect("binding the handler's port");
    let handler_addr = Tcp.local_addr(&handler_listener).expect("the handler's address").to_string();
    let (tx, mut deliveries) = mpsc::unbounded_channel();
    let handler_task = tokio::spawn(handler::serve_with(Tcp, handler_listener, Recorder(tx)));

    let mut cluster = new_cluster(&handler_addr);
    cluster.start_all();
    for i in 0..NODES {
        cluster.wait_accepting(i, Duration::from_secs(10)).await;
    }
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    eprintln!(
        "cluster_sources: 3 members up (dir {}); node {} leads, at {}",
        cluster.dir.as_ref().unwrap().path().display(),
        leader + 1,
        t(Instant::now())
    );

    // 1. Sessions stored while all three members run.
    let pipe = connect(cluster.addrs_from(leader)).await;
    let due_at = unix_now() + DUE_AFTER.as_secs();
    let t0 = Instant::now();
    let mut stored = store_sessions(&pipe, 0..SESSIONS_BEFORE, due_at).await;
    let (_, _, sts) = cluster.wait_converged(Duration::from_secs(20)).await;
    eprintln!(
        "cluster_sources: {SESSIONS_BEFORE} sessions stored in {}; converged at {}:\n{}",
        ms(t0.elapsed()),
        t(Instant::now()),
        cluster.show_statuses(&by_position(&sts))
    );
    let leader = cluster.wait_leader(Duration::from_secs(5)).await;

    // 2. A follower dies; many more sessions are stored without it.
    let follower = (leader + 1) % NODES;
    let fdir = cluster.nodes[follower].data.clone();
    let ldir = cluster.nodes[leader].data.clone();
    let follower_last = sts.iter().find(|s| s.engine.replica.0 as usize == follower + 1).unwrap().engine.last_index.0;
    let status = cluster.nodes[follower].kill9();
    assert!(!status.success(), "node {} was not running any more ({status})", follower + 1);
    let held_at_kill = source_files(&fdir);
    eprintln!(
        "cluster_sources: node {} (a follower, last index {follower_last}) killed at {}; it holds {} source files",
        follower + 1,
        t(Instant::now()),
        held_at_kill.len()
    );
    let t1 = Instant::now();
    stored.extend(store_sessions(&pipe, SESSIONS_BEFORE..SESSIONS_BEFORE + SESSIONS_AFTER, due_at).await);
    let stored_in = t1.elapsed();
    // The leader has snapshotted (and so compacted its log) past everything the dead follower
    // holds: only a snapshot can bring it back.
    let deadline = Instant::now() + Duration::from_secs(10);
    let snapshot = loop {
        let s = last_snapshot(&ldir);
        if let Some(s) = s.filter(|s| *s > follower_last) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the leader (node {}) took no snapshot past index {follower_last} (last one: {s:?})",
            leader + 1
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The two that run settle (spills and merges done), so the follower's snapshot will be the
    // leader's state at `quiet_at`: the source files it names that were made after the follower's
    // last entry can only come to the follower by fetching.
    let (_, _, sts) = cluster.wait_converged(Duration::from_secs(20)).await;
    let lst = sts.iter().find(|s| s.engine.replica.0 as usize == leader + 1).expect("the leader answers").clone();
    let quiet_at = lst.engine.applied.0;
    let leader_sources = source_files(&ldir);
    let lacking: Vec<(&String, &u64)> =
        leader_sources.iter().filter(|(n, len)| held_at_kill.get(*n) != Some(*len)).collect();
    eprintln!(
        "cluster_sources: {SESSIONS_AFTER} more sessions stored in {}; the leader's last snapshot is at index \
         {snapshot}; {} of its {} source files ({} bytes) are not on node {}:\n{}",
        ms(stored_in),
        lacking.len(),
        leader_sources.len(),
        lacking.iter().map(|(_, len)| **len).sum::<u64>(),
        follower + 1,
        cluster.show_statuses(&by_position(&sts))
    );
    assert!(lst.engine.sessions_spilled > 0, "the leader spilled nothing");
    assert!(!lacking.is_empty(), "the dead follower already holds every source file: nothing to fetch");

    // 3. The follower comes back and must catch up through a snapshot and the source files.
    cluster.start(follower);
    let restarted_at = cluster.wait_accepting(follower, Duration::from_secs(10)).await;
    let (_, _, sts) = cluster.wait_converged(CATCH_UP_MAX).await;
    let caught_up = restarted_at.elapsed();
    let by_node = |i: usize| sts.iter().find(|s| s.engine.replica.0 as usize == i + 1).expect("every member").clone();
    let (fst, lst) = (by_node(follower), by_node(leader));
    eprintln!(
        "cluster_sources: node {} restarted at {}, caught up {} later:\n{}",
        follower + 1,
        t(restarted_at),
        ms(caught_up),
        cluster.show_statuses(&by_position(&sts))
    );
    assert_eq!(lst.engine.role, RoleName::Leader, "node {} no longer leads", leader + 1);
    let total = SESSIONS_BEFORE + SESSIONS_AFTER;
    for s in &sts {
        assert_eq!(
            s.engine.sessions_stored, total,
            "node {} holds the wrong number of stored sessions",
            s.engine.replica.0
        );
    }
    assert!(fst.engine.sessions_spilled > 0, "the restarted follower shows no spilled sessions");
    assert!(fst.engine.source_files > 0, "the restarted follower shows no source files");
    assert_eq!(
        (fst.engine.sessions_spilled, fst.engine.source_files),
        (lst.engine.sessions_spilled, lst.engine.source_files),
        "the restarted follower's spilled sessions and source files differ from the leader's"
    );
    let installed = last_snapshot(&fdir);
    assert!(
        installed.is_some_and(|s| s > follower_last),
        "node {} has no snapshot past index {follower_last} (its last: {installed:?}): it did not install one",
        follower + 1
    );
    // It holds at least the files its state refers to, each the same bytes as the leader's copy
    // (files nothing refers to any more are removed lazily, after a later snapshot, so the two
    // directories need not list the same files).
    let fsrc = source_files(&fdir);
    assert!(
        fsrc.len() as u64 >= fst.engine.source_files,
        "node {} holds {} source files, its state refers to {}:\n{}",
        follower + 1,
        fsrc.len(),
        fst.engine.source_files,
        show_dir(&fdir)
    );
    for name in fsrc.keys() {
        let a = std::fs::read(fdir.join(name)).expect("reading the follower's source file");
        let b = std::fs::read(ldir.join(name))
            .unwrap_or_else(|e| panic!("{name} is on node {} but not on the leader: {e}", follower + 1));
        assert!(a == b, "{name} differs: {} bytes on node {}, {} on the leader", a.len(), follower + 1, b.len());
    }
    let leftovers: Vec<String> = dir_names(&fdir).into_iter().filter(|n| n.ends_with(".install.tmp")).collect();
    assert!(leftovers.is_empty(), "node {} keeps unfinished fetches: {leftovers:?}", follower + 1);
    // Made (spilled or merged) after the follower's last entry and no later than the state it was
    // sent: it never applied the entry that made it, so it fetched the file.
    let fetched: Vec<&String> =
        fsrc.keys().filter(|n| n[4..].parse::<u64>().is_ok_and(|id| id > follower_last && id <= quiet_at)).collect();
    eprintln!(
        "cluster_sources: node {} holds a snapshot at index {} and {} source files ({} bytes) identical to the \
         leader's, {} of them fetched ({}); {} spilled of {} stored",
        follower + 1,
        installed.unwrap(),
        fsrc.len(),
        fsrc.values().sum::<u64>(),
        fetched.len(),
        fetched.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", "),
        fst.engine.sessions_spilled,
        fst.engine.sessions_stored
    );
    assert!(
        !fetched.is_empty(),
        "node {} holds no source file made between its last entry ({follower_last}) and index {quiet_at}:\n{}",
        follower + 1,
        show_dir(&fdir)
    );

    // 4. Everything comes due: each session reaches the handler once, with its record.
    let caught_up_at = Instant::now();
    let wait = Duration::from_secs(due_at.saturating_sub(unix_now()) + 20);
    assert!(
        due_at > unix_now(),
        "the sessions came due before the follower had caught up (storing and catching up were too slow)"
    );
    let by_id: BTreeMap<u64, u64> = stored.iter().map(|(n, id)| (id.0, *n)).collect();
    assert_eq!(by_id.len() as u64, total, "session ids repeat");
    let mut delivered: BTreeMap<u64, Vec<Delivery>> = BTreeMap::new();
    let mut first_delivery = None;
    let deadline = Instant::now() + wait;
    while (delivered.len() as u64) < total {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, deliveries.recv()).await {
            Ok(Some((id, attempt, records, deleted))) => {
                first_delivery.get_or_insert_with(Instant::now);
                delivered.entry(id).or_default().push((id, attempt, records, deleted));
            }
            Ok(None) => panic!("the handler stopped"),
            Err(_) => {
                let sts = cluster.statuses().await;
                panic!(
                    "only {} of {total} sessions were delivered within {wait:?} of the follower catching up:\n{}",
                    delivered.len(),
                    cluster.show_statuses(&sts)
                );
            }
        }
    }
    let drained_at = Instant::now();
    // A moment for duplicates to show up, then the leader must hold no stored session.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sts = cluster.statuses().await;
        let l = sts[leader].as_ref().map(|s| (s.engine.sessions_stored, s.engine.sessions_active));
        if l == Some((0, 0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leader still holds sessions after the drain:\n{}",
            cluster.show_statuses(&sts)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok((id, attempt, records, deleted)) = deliveries.try_recv() {
        delivered.entry(id).or_default().push((id, attempt, records, deleted));
    }
    let mut bad = Vec::new();
    for (id, ds) in &delivered {
        let Some(n) = by_id.get(id) else {
            bad.push(format!("session {id} was delivered and nobody stored it"));
            continue;
        };
        if ds.len() != 1 {
            bad.push(format!(
                "session {id} (number {n}) was delivered {} times (attempts {:?})",
                ds.len(),
                ds.iter().map(|d| d.1).collect::<Vec<_>>()
            ));
        }
        for (_, attempt, records, deleted) in ds {
            if *records != vec![record(*n)] {
                bad.push(format!(
                    "session {id} (number {n}), attempt {attempt}: {} records, the first {:?}",
                    records.len(),
                    records.first().map(|r| String::from_utf8_lossy(&r[..r.len().min(24)]).into_owned())
                ));
            }
            if let Err(e) = deleted {
                bad.push(format!("session {id} (number {n}), attempt {attempt}: the handler's delete failed: {e}"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} wrong deliveries:\n{}",
        bad.len(),
        bad.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
    );
    assert_eq!(delivered.len() as u64, total);

    // The members agree once more, with nothing stored.
    let (_, _, sts) = cluster.wait_converged(Duration::from_secs(20)).await;
    for s in &sts {
        let e = &s.engine;
        assert_eq!(
            (e.sessions_stored, e.sessions_spilled, e.sessions_active),
            (0, 0, 0),
            "node {} after the drain",
            e.replica.0
        );
    }
    eprintln!(
        "cluster_sources: all {total} sessions delivered once each with their records: first at {}, last at {} \
         ({} after the follower caught up); members agree afterwards:\n{}",
        t(first_delivery.unwrap()),
        t(drained_at),
        ms(drained_at - caught_up_at),
        cluster.show_statuses(&by_position(&sts))
    );

    drop(pipe);
    for i in 0..NODES {
        let status = cluster.nodes[i].terminate(Duration::from_secs(10)).await;
        let status = status.unwrap_or_else(|| panic!("node {} did not exit within 10 s of SIGTERM", i + 1));
        assert!(status.success(), "node {} exited with {status} after SIGTERM", i + 1);
    }
    handler_task.abort();
    eprintln!(
        "cluster_sources: summary: {} source files fetched by node {} ({} on the leader); caught up {} after its \
         restart; done in {}",
        fetched.len(),
        follower + 1,
        fst.engine.source_files,
        ms(caught_up),
        ms(started.elapsed())
    );
}
