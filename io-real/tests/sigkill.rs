//! Real processes: the `truba` server is killed with SIGKILL at random moments while 16 clients
//! keep it busy, restarted each time, and afterwards every acknowledged operation must be there
//! and nothing else.
//!
//! The clients keep a ground-truth model of every session they opened. Each operation ends in
//! one of three ways: acknowledged (it happened), refused or never sent (it did not happen), or
//! timed out (it may or may not have happened; the session is then left alone and checked for
//! "the known records, with or without that one operation"). The load, the model and the
//! verification are in `common/mod.rs`, shared with `cluster_kill.rs`.
//!
//! The kill schedule comes from a seed printed at the start; set `TRUBA_SIGKILL_SEED` to replay
//! it (the interleaving with the clients is up to the machine, the schedule is not).
//!
//! `cargo test -p truba --test sigkill -- --nocapture` shows the figures (kills, operations,
//! sessions verified, unavailability after each restart).
//!
//! Right after each restart the test also queries sessions and status while the server may still
//! be recovering (see `probe_recovery_window`): they must be refused as not ready (and retried by
//! the client), never answered from the empty state of a server that has not recovered yet.

mod common;

use common::{
    assert_load_clean, assert_verified, connect, join_load, ms, show_all, Ledger, Model, Seen, TaskReport, Verifier,
    Views, XorShift, KIND,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use truba::client::Pipe;
use truba::net::Tcp;
use truba_engine::SessionId;

/// Concurrent clients, each with its own pipe (connection) and one session at a time.
const TASKS: usize = 16;
/// SIGKILLs per run.
const KILLS: usize = 8;
const DEFAULT_SEED: u64 = 0x5eed_cafe;
/// Reads back the sessions of the one server, 16 at a time.
const VERIFIER: Verifier = Verifier { test: "sigkill", holder: "server", readers: 16 };

// ---------------------------------------------------------------------------------------------
// The server process.

struct Server {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    addr: String,
    child: Option<Child>,
    /// Kept (not removed) if the test fails, so the data directory can be looked at.
    dir: Option<tempfile::TempDir>,
}

impl Server {
    fn new(dir: tempfile::TempDir, addr: String) -> Server {
        let data = dir.path().join("data");
        let config = dir.path().join("truba.toml");
        let text = format!(
            r#"data_dir = "{data}"
listen = "{addr}"

[engine]
snapshot_every_entries = 500
segment_bytes_max = 65536

[kinds.{KIND}]
lease_ms = 600000
default_delay_s = 3600
"#,
            data = data.display()
        );
        std::fs::write(&config, text).expect("writing the config");
        Server {
            bin: PathBuf::from(env!("CARGO_BIN_EXE_truba")),
            config,
            log: dir.path().join("server.log"),
            addr,
            child: None,
            dir: Some(dir),
        }
    }

    fn start(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        self.child = Some(common::spawn_serve(&self.bin, &self.config, &self.log, "starting the server"));
    }

    /// SIGKILL, then reap the process.
    fn kill9(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the server is running");
        child.kill().expect("sending SIGKILL");
        child.wait().expect("waiting for the killed server")
    }

    /// SIGTERM; the exit status if the process ends within `within`.
    async fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        common::terminate(&mut self.child, within).await
    }

    /// Polls until the server accepts a connection; when it did, and that connection.
    async fn wait_accepting(&mut self, within: Duration) -> (Instant, Pipe<Tcp>) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(pipe) = Pipe::connect(&self.addr).await {
                return (Instant::now(), pipe);
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("the server exited while starting: {status}");
            }
            assert!(Instant::now() < deadline, "the server did not accept connections within {within:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- last lines of the server log ({}) -----", self.log.display());
            eprintln!("{}", common::log_tail(&self.log, 80));
            eprintln!("----- end of the server log -----");
            if let Some(dir) = self.dir.take() {
                eprintln!("data directory kept at {}", dir.keep().display());
            }
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    l.local_addr().expect("local address").port()
}

// ---------------------------------------------------------------------------------------------
// What the load tasks share with the kill loop.

/// One SIGKILL and how long the service was gone.
#[derive(Clone, Debug)]
struct Kill {
    killed_at: Instant,
    dead_at: Instant,
    accepting_at: Option<Instant>,
    /// What `status` said on the first connection to the new process: (applied index, sessions).
    status_at_accept: Option<(u64, u64)>,
    /// The first acknowledgement of a request *sent* after the old process was reaped: certainly
    /// served by the new one.
    first_ack: Option<Instant>,
    acked_before: u64,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    acked: AtomicU64,
    /// Acknowledgements of requests sent before a kill and answered after the old process was
    /// reaped: in flight at the kill, answered after a retry (by the log or the dedup table).
    across_kill: AtomicU64,
    kills: Mutex<Vec<Kill>>,
}

impl Ledger for Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn on_ack(&self, sent_at: Instant) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut kills = self.kills.lock().unwrap();
        if let Some(k) = kills.last_mut() {
            if k.first_ack.is_none() && sent_at > k.dead_at {
                k.first_ack = Some(now);
            }
            if sent_at < k.killed_at && now > k.dead_at {
                self.across_kill.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Verification (the shared part is in `common`).

/// Waits until the engine serves (accepting connections is not enough: it recovers after binding
/// its port). A keep-alive on a live session is refused with NotReady, which the client retries,
/// until recovery is over; it changes nothing but the session's lease.
async fn wait_serving(pipe: &Pipe<Tcp>, models: &[Model]) {
    let live = models.iter().find(|m| !m.deleted && m.uncertain.is_none()).expect("at least one live session");
    pipe.session(live.handle).keep_alive().await.expect("a keep-alive on a live session");
}

/// Guards a bug this test found (fixed in `Engine::on_query`): queries used to be answered while
/// the replica was recovering, from its still-empty state, so `get` on a live session said "does
/// not exist" and `status` reported index 0. Now session queries are refused with `NotReady`
/// (which the client retries) and status says `serving: false` until recovery is done.
///
/// This sends `get`s for live sessions as soon as the restarted server accepts connections and
/// returns the answers that differ from what the same sessions showed before the restart (the
/// kill loop does the same with `status`); the test fails on any. The verification proper waits
/// for [`wait_serving`] first.
async fn probe_recovery_window(pipe: &Pipe<Tcp>, models: &[Model], before: &Views) -> Vec<String> {
    let ids: Vec<SessionId> =
        models.iter().filter(|m| !m.deleted && m.uncertain.is_none()).map(|m| m.id).take(64).collect();
    let asked = ids.len();
    let got = VERIFIER.get_all(pipe, ids).await;
    let wrong: Vec<String> = got
        .iter()
        .filter(|(id, g)| before.get(id) != Some(g))
        .map(|(id, g)| {
            let g = match g {
                Ok(Seen::Records(rs)) => format!("records {}", show_all(rs)),
                other => format!("{other:?}"),
            };
            format!("session {} (live, with records) answered {g} right after the restart", id.0)
        })
        .collect();
    eprintln!(
        "sigkill: {} of {asked} queries sent right after the restart (while it may be recovering) were answered wrongly{}",
        wrong.len(),
        if wrong.is_empty() { String::new() } else { format!(", e.g. {}", wrong[0]) }
    );
    wrong
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing_acknowledged_and_invents_nothing() {
    let started = Instant::now();
    let seed = std::env::var("TRUBA_SIGKILL_SEED")
        .ok()
        .map(|s| {
            let s = s.trim_start_matches("0x");
            u64::from_str_radix(s, 16).expect("TRUBA_SIGKILL_SEED is hex")
        })
        .unwrap_or(DEFAULT_SEED);
    eprintln!("sigkill: seed {seed:#x} (replay the schedule with TRUBA_SIGKILL_SEED={seed:x})");
    let mut rng = XorShift::new(seed);

    let dir = tempfile::tempdir().expect("tempdir");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut server = Server::new(dir, addr.clone());
    server.start();
    server.wait_accepting(Duration::from_secs(10)).await;

    let shared = Arc::new(Shared::default());
    let tasks: Vec<_> =
        (0..TASKS).map(|t| tokio::spawn(common::load(t, vec![addr.clone()], seed, shared.clone()))).collect();

    for k in 0..KILLS {
        let pause = Duration::from_millis(rng.range(200, 800));
        tokio::time::sleep(pause).await;
        let acked_before = shared.acked.load(Ordering::Relaxed);
        let killed_at = Instant::now();
        let status = server.kill9();
        let dead_at = Instant::now();
        assert!(!status.success(), "kill {k}: the server was not running any more ({status})");
        shared.kills.lock().unwrap().push(Kill {
            killed_at,
            dead_at,
            accepting_at: None,
            status_at_accept: None,
            first_ack: None,
            acked_before,
        });
        server.start();
        let (accepting, probe) = server.wait_accepting(Duration::from_secs(10)).await;
        // Sent at once, so it usually arrives while the new process is still recovering.
        let st = probe.status().await.expect("status right after a restart");
        let mut kills = shared.kills.lock().unwrap();
        kills[k].accepting_at = Some(accepting);
        // A server still recovering says so (`serving: false`); only a serving one must show its state.
        if st.engine.serving {
            kills[k].status_at_accept =
                Some((st.engine.applied.0, st.engine.sessions_active + st.engine.sessions_stored));
        }
    }

    // The load must come back after the last restart before it is stopped.
    let deadline = Instant::now() + Duration::from_secs(15);
    while shared.kills.lock().unwrap().last().unwrap().first_ack.is_none() {
        assert!(Instant::now() < deadline, "no request was acknowledged after the last restart");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    shared.stop.store(true, Ordering::Relaxed);
    let TaskReport { sessions: models, uncertain_creates, generated, not_sent, unknown, violations } =
        join_load(tasks).await;
    let load_done = Instant::now();

    // Figures.
    let kills = shared.kills.lock().unwrap().clone();
    let total_acked = shared.acked.load(Ordering::Relaxed);
    for (k, kill) in kills.iter().enumerate() {
        let until = kills.get(k + 1).map_or(total_acked, |n| n.acked_before);
        let accepting = kill.accepting_at.map_or("never".into(), |a| ms(a - kill.killed_at));
        let first_ack = kill.first_ack.map_or("none".into(), |a| ms(a - kill.killed_at));
        eprintln!(
            "sigkill: kill {k}: unavailable {first_ack} (kill to first ack of a request sent after it; reaped after {}, \
             accepting connections after {accepting}, status (if serving) then said applied {} and {} sessions); {} acked before it, \
             {} until the next",
            ms(kill.dead_at - kill.killed_at),
            kill.status_at_accept.map_or(0, |s| s.0),
            kill.status_at_accept.map_or(0, |s| s.1),
            kill.acked_before,
            until - kill.acked_before,
        );
    }
    // Each acknowledged operation is its own log entry, so a recovered server is at least at the
    // count acknowledged before the kill (a status answered from the empty state is skipped).
    for (k, kill) in kills.iter().enumerate() {
        if let Some((applied, _)) = kill.status_at_accept.filter(|s| s.0 > 0) {
            assert!(
                applied >= kill.acked_before,
                "kill {k}: recovered to index {applied}, but {} operations had been acknowledged",
                kill.acked_before
            );
        }
    }
    let empty_status =
        kills.iter().filter(|k| k.acked_before > 0 && k.status_at_accept.is_some_and(|s| s.0 == 0)).count();
    eprintln!(
        "sigkill: at {empty_status} of {} restarts, `status` sent on connecting reported index 0 and no sessions although \
         operations had been acknowledged (answered from the empty state of a server still recovering)",
        kills.len()
    );
    eprintln!(
        "sigkill: {} kills; {total_acked} operations acknowledged ({} of them in flight across a kill), {unknown} with \
         unknown outcome, {not_sent} never sent; {} sessions opened, {} creations with unknown outcome; load ran {}",
        kills.len(),
        shared.across_kill.load(Ordering::Relaxed),
        models.len(),
        uncertain_creates.len(),
        ms(load_done - started)
    );
    assert_load_clean(&violations);
    assert!(total_acked >= 200, "too little load to mean anything: {total_acked} operations acknowledged");

    // Every acknowledged operation is there, and nothing else.
    let pipe = connect(vec![addr.clone()]).await;
    wait_serving(&pipe, &models).await;
    let t = Instant::now();
    let (v, seen, bad) = VERIFIER.verify(&pipe, &models, &uncertain_creates, &generated).await;
    eprintln!("sigkill: {v}, in {}", ms(t.elapsed()));
    assert_verified(&bad, "after the kills");
    assert!(v.sessions > 0);

    let status = pipe.status().await.expect("status");
    let files =
        std::fs::read_dir(server.dir.as_ref().unwrap().path().join("data")).expect("listing the data directory");
    let mut by_kind = BTreeMap::<String, usize>::new();
    for f in files {
        let name = f.expect("a directory entry").file_name().to_string_lossy().into_owned();
        *by_kind.entry(name.split(['-', '.']).next().unwrap_or_default().to_string()).or_default() += 1;
    }
    eprintln!(
        "sigkill: the server is at index {}, {} bytes on disk: {by_kind:?}",
        status.engine.applied.0, status.disk_bytes
    );

    // Graceful shutdown, with a client still connected: exit status 0 within 10 s.
    let t = Instant::now();
    let status = server.terminate(Duration::from_secs(10)).await;
    let status = status.expect("the server did not exit within 10 s of SIGTERM");
    eprintln!("sigkill: SIGTERM: exited with {status} after {}", ms(t.elapsed()));
    assert!(status.success(), "the server exited with {status} after SIGTERM");

    // And after a clean restart every session reads exactly as it did (uncertain ones included).
    drop(pipe);
    server.start();
    let pipe = connect(vec![addr.clone()]).await;
    // First, queries sent while the server may still be recovering (see `probe_recovery_window`).
    let wrong_gets = probe_recovery_window(&pipe, &models, &seen).await;
    wait_serving(&pipe, &models).await;
    let (_, seen_again, bad) = VERIFIER.verify(&pipe, &models, &uncertain_creates, &generated).await;
    assert_verified(&bad, "after a clean restart");
    let changed: Vec<_> = seen.iter().filter(|(id, s)| seen_again.get(id) != Some(s)).map(|(id, _)| id.0).collect();
    assert!(changed.is_empty(), "sessions read differently after a clean restart: {changed:?}");
    let status = server.terminate(Duration::from_secs(10)).await.expect("no exit within 10 s of the second SIGTERM");
    assert!(status.success(), "the server exited with {status} after the second SIGTERM");
    eprintln!(
        "sigkill: done in {}{}",
        ms(started.elapsed()),
        if wrong_gets.is_empty() && empty_status == 0 {
            ""
        } else {
            " (with the known bug: queries answered during recovery, see above)"
        }
    );
    // Queries must never be answered from the empty state of a server still recovering (they are
    // refused with NotReady, which the client retries, and status says `serving: false`).
    assert!(
        wrong_gets.is_empty() && empty_status == 0,
        "queries were answered from an empty state during recovery: status at {empty_status} restarts; gets:\n{}",
        wrong_gets.join("\n")
    );
}
