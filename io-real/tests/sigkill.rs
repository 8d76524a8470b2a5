//! Real processes: the `truba` server is killed with SIGKILL at random moments while 16 clients
//! keep it busy, restarted each time, and afterwards every acknowledged operation must be there
//! and nothing else.
//!
//! The clients keep a ground-truth model of every session they opened. Each operation ends in
//! one of three ways: acknowledged (it happened), refused or never sent (it did not happen), or
//! timed out (it may or may not have happened; the session is then left alone and checked for
//! "the known records, with or without that one operation").
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

use std::collections::{BTreeMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use truba::client::{ClientError, ClientOptions, Pipe};
use truba::net::Tcp;
use truba_engine::{Handle, RequestError, SessionId, SessionState};

/// Concurrent clients, each with its own pipe (connection) and one session at a time.
const TASKS: usize = 16;
/// SIGKILLs per run.
const KILLS: usize = 8;
/// Every record is this long (unique text, padded).
const RECORD_LEN: usize = 100;
/// The kind every session is opened with.
const KIND: u32 = 1;
/// A full scan of session ids (to find sessions nobody acknowledged) is done up to this index.
const SCAN_MAX: u64 = 400_000;
const DEFAULT_SEED: u64 = 0x5eed_cafe;

// ---------------------------------------------------------------------------------------------
// A tiny reproducible generator (xorshift64*), so the test needs no `rand`.

struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // splitmix64 of the seed, so that nearby seeds give unrelated streams (and never 0).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
}

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
        let log = OpenOptions::new().create(true).append(true).open(&self.log).expect("opening the server log");
        let mut marker = log.try_clone().expect("cloning the log handle");
        let _ = writeln!(marker, "===== test: starting the server =====");
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log handle"))
            .stderr(log)
            .spawn()
            .expect("starting `truba serve`");
        self.child = Some(child);
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server is running").id()
    }

    /// SIGKILL, then reap the process.
    fn kill9(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the server is running");
        child.kill().expect("sending SIGKILL");
        child.wait().expect("waiting for the killed server")
    }

    /// SIGTERM; the exit status if the process ends within `within`.
    async fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        let pid = self.pid();
        let sent = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("running kill");
        assert!(sent.success(), "kill -TERM {pid} failed: {sent}");
        let deadline = Instant::now() + within;
        loop {
            let child = self.child.as_mut().expect("the server is running");
            if let Some(status) = child.try_wait().expect("polling the server") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(cannot read the log: {e})"));
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
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
            eprintln!("{}", self.log_tail(80));
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
// The clients and their ground truth.

fn options() -> ClientOptions {
    ClientOptions { request_timeout: Duration::from_secs(1), retry_for: Duration::from_secs(20), ..Default::default() }
}

async fn connect(addr: &str) -> Pipe<Tcp> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Pipe::connect_with(Tcp, vec![addr.to_string()], options()).await {
            Ok(p) => return p,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot connect to {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

/// A unique record: its origin as text, padded to [`RECORD_LEN`] bytes.
fn record(task: usize, session: u64, n: u64) -> Vec<u8> {
    let mut r = format!("t{task:02}-s{session:05}-r{n:04}|").into_bytes();
    let mut i = 0u8;
    while r.len() < RECORD_LEN {
        r.push(b'a' + i % 26);
        i = i.wrapping_add(7);
    }
    r
}

fn show(r: &[u8]) -> String {
    let s = String::from_utf8_lossy(r);
    s.split('|').next().unwrap_or_default().to_string()
}

fn show_all(rs: &[Vec<u8>]) -> String {
    format!("[{}]", rs.iter().map(|r| show(r)).collect::<Vec<_>>().join(", "))
}

/// The one operation of a session whose outcome is unknown.
#[derive(Clone, Debug)]
enum Uncertain {
    Append(Vec<u8>),
    Replace(Vec<u8>),
    Delete,
}

/// What a session must hold.
#[derive(Clone, Debug)]
struct Model {
    id: SessionId,
    /// The handle from the creation (nothing is ever delivered, so the attempt never changes).
    handle: Handle,
    task: usize,
    /// Acknowledged appends since the last acknowledged replace (or the creation), in order.
    records: Vec<Vec<u8>>,
    /// The delete was acknowledged.
    deleted: bool,
    /// An operation with no answer; the session was not used after it.
    uncertain: Option<Uncertain>,
}

#[derive(Default)]
struct TaskReport {
    sessions: Vec<Model>,
    /// First records of creations whose outcome is unknown (the session may exist, id unknown).
    uncertain_creates: Vec<Vec<u8>>,
    /// Every record this task generated, sent or not.
    generated: Vec<Vec<u8>>,
    not_sent: u64,
    unknown: u64,
    /// Refusals and other errors that this workload never provokes: each one is a violation.
    violations: Vec<String>,
}

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

impl Shared {
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

enum Outcome {
    Acked,
    /// Certainly not applied (a refusal, or never sent).
    NotApplied,
    /// May or may not have been applied.
    Unknown,
}

fn classify<T>(
    r: &Result<T, ClientError>,
    what: &str,
    sent_at: Instant,
    shared: &Shared,
    report: &mut TaskReport,
) -> Outcome {
    match r {
        Ok(_) => {
            shared.on_ack(sent_at);
            Outcome::Acked
        }
        Err(ClientError::Refused(e)) => {
            // Nothing in this workload should be refused: sessions are ours, limits are far.
            report.violations.push(format!("{what} was refused: {e}"));
            Outcome::NotApplied
        }
        Err(ClientError::Connect { .. }) => {
            report.not_sent += 1;
            Outcome::NotApplied
        }
        Err(ClientError::Timeout { .. }) => {
            report.unknown += 1;
            Outcome::Unknown
        }
        Err(e) => {
            report.violations.push(format!("{what} failed: {e:?}"));
            Outcome::Unknown
        }
    }
}

async fn load(task: usize, addr: String, seed: u64, shared: Arc<Shared>) -> TaskReport {
    let pipe = connect(&addr).await;
    let mut rng = XorShift::new(seed ^ (task as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut report = TaskReport::default();
    let mut session_no = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        session_no += 1;
        let mut n = 0u64;
        let first = record(task, session_no, n);
        report.generated.push(first.clone());
        let sent_at = Instant::now();
        let r = pipe.new_with(KIND, first.clone()).await;
        let what = format!("t{task} new session {session_no}");
        let mut session = match classify(&r, &what, sent_at, &shared, &mut report) {
            Outcome::Acked => r.unwrap(),
            Outcome::NotApplied => continue,
            Outcome::Unknown => {
                report.uncertain_creates.push(first);
                continue;
            }
        };
        let mut m = Model {
            id: session.id(),
            handle: session.handle(),
            task,
            records: vec![first],
            deleted: false,
            uncertain: None,
        };
        let ops = rng.range(1, 30);
        let mut usable = true;
        for _ in 0..ops {
            if shared.stop.load(Ordering::Relaxed) {
                break;
            }
            n += 1;
            let rec = record(task, session_no, n);
            report.generated.push(rec.clone());
            let replace = rng.percent(12);
            let sent_at = Instant::now();
            let r = if replace { session.replace(rec.clone()).await } else { session.append(rec.clone()).await };
            let what = format!("t{task} {} on session {}", if replace { "replace" } else { "append" }, m.id.0);
            match classify(&r, &what, sent_at, &shared, &mut report) {
                Outcome::Acked if replace => m.records = vec![rec],
                Outcome::Acked => m.records.push(rec),
                Outcome::NotApplied => {}
                Outcome::Unknown => {
                    m.uncertain = Some(if replace { Uncertain::Replace(rec) } else { Uncertain::Append(rec) });
                    usable = false;
                    break;
                }
            }
        }
        if usable && rng.percent(40) {
            let sent_at = Instant::now();
            let r = session.delete().await;
            let what = format!("t{task} delete of session {}", m.id.0);
            match classify(&r, &what, sent_at, &shared, &mut report) {
                Outcome::Acked => m.deleted = true,
                Outcome::NotApplied => {}
                Outcome::Unknown => m.uncertain = Some(Uncertain::Delete),
            }
        }
        report.sessions.push(m);
    }
    report
}

// ---------------------------------------------------------------------------------------------
// Verification.

/// What a `get` showed: the records, or that the session is deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Records(Vec<Vec<u8>>),
    Deleted,
    /// The server says the session does not exist.
    Unknown,
}

/// Gets every id, 16 at a time over one pipe. Errors other than "deleted" and "unknown" are
/// returned as text.
async fn get_all(pipe: &Pipe<Tcp>, ids: Vec<SessionId>) -> BTreeMap<SessionId, Result<Seen, String>> {
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (pipe, ids, next) = (pipe.clone(), ids.clone(), next.clone());
        workers.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&id) = ids.get(i) else { break };
                let seen = match pipe.get(id).await {
                    Ok(v) if v.kind.0 != KIND => Err(format!("kind {} instead of {KIND}", v.kind.0)),
                    Ok(v) if !matches!(v.state, SessionState::Active { delivering: false, .. }) => {
                        Err(format!("state {:?} instead of active", v.state))
                    }
                    Ok(v) => Ok(Seen::Records(v.records)),
                    Err(ClientError::Refused(RequestError::SessionDeleted(_))) => Ok(Seen::Deleted),
                    Err(ClientError::Refused(RequestError::SessionUnknown(_))) => Ok(Seen::Unknown),
                    Err(e) => Err(e.to_string()),
                };
                out.push((id, seen));
            }
            out
        });
    }
    let mut all = BTreeMap::new();
    while let Some(r) = workers.join_next().await {
        all.extend(r.expect("a verification worker panicked"));
    }
    all
}

#[derive(Default, Debug)]
struct Verified {
    sessions: usize,
    deleted: usize,
    uncertain: usize,
    /// Uncertain operations found applied / not applied.
    uncertain_applied: usize,
    uncertain_not_applied: usize,
    /// Sessions found that no acknowledgement names (creations whose outcome was unknown).
    orphans_found: usize,
    ids_scanned: u64,
    records_checked: usize,
}

#[derive(Debug, PartialEq, Eq)]
enum Judged {
    /// Exactly the model (no operation with an unknown outcome).
    AsModelled,
    /// The known state plus the one operation whose outcome was unknown, which took effect.
    UncertainApplied,
    /// The known state; the operation whose outcome was unknown did not take effect.
    UncertainNotApplied,
    Wrong,
}

/// Whether what a session showed fits its model: an acknowledged delete means deleted; otherwise
/// exactly the acknowledged records, or, after an operation with an unknown outcome, those
/// records with that whole operation applied or not at all.
fn judge(m: &Model, got: &Result<Seen, String>) -> Judged {
    let known = if m.deleted { Seen::Deleted } else { Seen::Records(m.records.clone()) };
    let Some(u) = &m.uncertain else {
        return if *got == Ok(known) { Judged::AsModelled } else { Judged::Wrong };
    };
    let applied = match u {
        Uncertain::Append(r) => Seen::Records(m.records.iter().chain([r]).cloned().collect()),
        Uncertain::Replace(r) => Seen::Records(vec![r.clone()]),
        Uncertain::Delete => Seen::Deleted,
    };
    if *got == Ok(applied) {
        Judged::UncertainApplied
    } else if *got == Ok(known) {
        Judged::UncertainNotApplied
    } else {
        Judged::Wrong
    }
}

/// Checks every modelled session, then that nothing else exists. Returns the figures, what each
/// session showed, and the violations.
async fn verify(
    pipe: &Pipe<Tcp>,
    models: &[Model],
    uncertain_creates: &[Vec<u8>],
    generated: &HashSet<Vec<u8>>,
) -> (Verified, BTreeMap<SessionId, Result<Seen, String>>, Vec<String>) {
    let mut v = Verified::default();
    let mut bad = Vec::new();
    let seen = get_all(pipe, models.iter().map(|m| m.id).collect()).await;
    let mut present = 0u64;
    for m in models {
        v.sessions += 1;
        let got = &seen[&m.id];
        let who = format!("session {} (task {})", m.id.0, m.task);
        if let Ok(Seen::Records(rs)) = got {
            present += 1;
            v.records_checked += rs.len();
            for r in rs {
                if !generated.contains(r) {
                    bad.push(format!("{who} holds a record nobody sent: {:?}", String::from_utf8_lossy(r)));
                }
            }
        }
        v.deleted += usize::from(m.deleted);
        v.uncertain += usize::from(m.uncertain.is_some());
        let ok = match judge(m, got) {
            Judged::AsModelled => true,
            Judged::UncertainApplied => {
                v.uncertain_applied += 1;
                true
            }
            Judged::UncertainNotApplied => {
                v.uncertain_not_applied += 1;
                true
            }
            Judged::Wrong => false,
        };
        if !ok {
            let got = match got {
                Ok(Seen::Records(rs)) => format!("records {}", show_all(rs)),
                Ok(Seen::Deleted) => "deleted".to_string(),
                Ok(Seen::Unknown) => "unknown (does not exist)".to_string(),
                Err(e) => format!("error: {e}"),
            };
            let uncertain = match &m.uncertain {
                None => String::new(),
                Some(Uncertain::Append(r)) => format!(", or with {} appended (unknown outcome)", show(r)),
                Some(Uncertain::Replace(r)) => format!(", or [{}] (replace with unknown outcome)", show(r)),
                Some(Uncertain::Delete) => ", or deleted (delete with unknown outcome)".to_string(),
            };
            let want = if m.deleted { "deleted".to_string() } else { format!("records {}", show_all(&m.records)) };
            bad.push(format!("{who}: expected {want}{uncertain}; found {got}"));
        }
    }

    // Nothing else: the server's session count leaves room only for creations whose outcome is
    // unknown, and a scan of every id shows that each extra session is one of those.
    let status = pipe.status().await.expect("status");
    let total = status.engine.sessions_active + status.engine.sessions_stored;
    if status.engine.sessions_stored != 0 {
        bad.push(format!("{} sessions are stored; nothing here stores any", status.engine.sessions_stored));
    }
    if total < present || total - present > uncertain_creates.len() as u64 {
        bad.push(format!(
            "the server holds {total} sessions; the clients know of {present}, plus at most {} creations with unknown outcome",
            uncertain_creates.len()
        ));
    }
    let applied = status.engine.applied.0;
    if applied <= SCAN_MAX {
        let known: HashSet<SessionId> = models.iter().map(|m| m.id).collect();
        let others: Vec<SessionId> = (1..=applied).map(SessionId).filter(|id| !known.contains(id)).collect();
        v.ids_scanned = applied;
        let mut orphan_firsts: HashSet<&[u8]> = uncertain_creates.iter().map(|r| r.as_slice()).collect();
        for (id, got) in get_all(pipe, others).await {
            match got {
                Ok(Seen::Unknown) => {}
                Ok(Seen::Records(rs)) if rs.len() == 1 && orphan_firsts.remove(rs[0].as_slice()) => {
                    v.orphans_found += 1;
                }
                Ok(Seen::Records(rs)) => {
                    bad.push(format!("session {} exists and nobody created it: {}", id.0, show_all(&rs)))
                }
                Ok(Seen::Deleted) => bad.push(format!("session {} is deleted and nobody created it", id.0)),
                Err(e) => bad.push(format!("session {}: {e}", id.0)),
            }
        }
        if present + v.orphans_found as u64 != total {
            bad.push(format!(
                "the server counts {total} sessions, the scan found {present} known and {} orphans",
                v.orphans_found
            ));
        }
    } else {
        eprintln!("sigkill: {applied} entries, too many to scan every id; relying on the session count");
    }
    (v, seen, bad)
}

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
async fn probe_recovery_window(
    pipe: &Pipe<Tcp>,
    models: &[Model],
    before: &BTreeMap<SessionId, Result<Seen, String>>,
) -> Vec<String> {
    let ids: Vec<SessionId> =
        models.iter().filter(|m| !m.deleted && m.uncertain.is_none()).map(|m| m.id).take(64).collect();
    let asked = ids.len();
    let got = get_all(pipe, ids).await;
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

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
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
    let tasks: Vec<_> = (0..TASKS).map(|t| tokio::spawn(load(t, addr.clone(), seed, shared.clone()))).collect();

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
    let mut reports = Vec::new();
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(40), t).await;
        reports.push(r.expect("a load task did not stop").expect("a load task panicked"));
    }
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
    let (mut models, mut uncertain_creates, mut generated) = (Vec::new(), Vec::new(), HashSet::new());
    let (mut not_sent, mut unknown, mut violations) = (0, 0, Vec::new());
    for r in reports {
        models.extend(r.sessions);
        uncertain_creates.extend(r.uncertain_creates);
        generated.extend(r.generated);
        not_sent += r.not_sent;
        unknown += r.unknown;
        violations.extend(r.violations);
    }
    eprintln!(
        "sigkill: {} kills; {total_acked} operations acknowledged ({} of them in flight across a kill), {unknown} with \
         unknown outcome, {not_sent} never sent; {} sessions opened, {} creations with unknown outcome; load ran {}",
        kills.len(),
        shared.across_kill.load(Ordering::Relaxed),
        models.len(),
        uncertain_creates.len(),
        ms(load_done - started)
    );
    assert!(
        violations.is_empty(),
        "{} requests were refused or failed during the load (none should be):\n{}",
        violations.len(),
        violations.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(total_acked >= 200, "too little load to mean anything: {total_acked} operations acknowledged");

    // Every acknowledged operation is there, and nothing else.
    let pipe = connect(&addr).await;
    wait_serving(&pipe, &models).await;
    let t = Instant::now();
    let (v, seen, bad) = verify(&pipe, &models, &uncertain_creates, &generated).await;
    eprintln!(
        "sigkill: verified {} sessions ({} deleted, {} uncertain: {} applied, {} not), {} records, {} ids scanned, \
         {} orphans of unknown creations, in {}",
        v.sessions,
        v.deleted,
        v.uncertain,
        v.uncertain_applied,
        v.uncertain_not_applied,
        v.records_checked,
        v.ids_scanned,
        v.orphans_found,
        ms(t.elapsed())
    );
    assert!(
        bad.is_empty(),
        "{} violations after the kills:\n{}",
        bad.len(),
        bad.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
    );
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
    let pipe = connect(&addr).await;
    // First, queries sent while the server may still be recovering (see `probe_recovery_window`).
    let wrong_gets = probe_recovery_window(&pipe, &models, &seen).await;
    wait_serving(&pipe, &models).await;
    let (_, seen_again, bad) = verify(&pipe, &models, &uncertain_creates, &generated).await;
    assert!(
        bad.is_empty(),
        "{} violations after a clean restart:\n{}",
        bad.len(),
        bad.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
    );
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

/// The live run rarely produces unknown outcomes (a restart takes milliseconds, the clients
/// retry for 20 s), so the all-or-nothing rule for them is checked here.
#[test]
fn uncertain_operations_count_as_all_or_nothing() {
    let r = |n| record(0, 1, n);
    let recs = |ns: &[u64]| Ok(Seen::Records(ns.iter().map(|n| r(*n)).collect()));
    let handle = Handle { session: SessionId(7), attempt: truba_engine::Attempt(0) };
    let m =
        |uncertain| Model { id: SessionId(7), handle, task: 0, records: vec![r(0), r(1)], deleted: false, uncertain };

    let sure = m(None);
    assert_eq!(judge(&sure, &recs(&[0, 1])), Judged::AsModelled);
    assert_eq!(judge(&sure, &recs(&[0])), Judged::Wrong, "an acknowledged append lost");
    assert_eq!(judge(&sure, &recs(&[0, 1, 2])), Judged::Wrong, "a record nobody acknowledged");
    assert_eq!(judge(&sure, &recs(&[1, 0])), Judged::Wrong, "out of order");
    assert_eq!(judge(&sure, &Ok(Seen::Unknown)), Judged::Wrong);
    assert_eq!(judge(&sure, &Ok(Seen::Deleted)), Judged::Wrong);
    let deleted = Model { deleted: true, ..m(None) };
    assert_eq!(judge(&deleted, &Ok(Seen::Deleted)), Judged::AsModelled);
    assert_eq!(judge(&deleted, &recs(&[0, 1])), Judged::Wrong, "an acknowledged delete lost");
    assert_eq!(judge(&deleted, &Ok(Seen::Unknown)), Judged::Wrong);

    let append = m(Some(Uncertain::Append(r(2))));
    assert_eq!(judge(&append, &recs(&[0, 1, 2])), Judged::UncertainApplied);
    assert_eq!(judge(&append, &recs(&[0, 1])), Judged::UncertainNotApplied);
    assert_eq!(judge(&append, &recs(&[0, 1, 2, 2])), Judged::Wrong, "applied twice");
    assert_eq!(judge(&append, &recs(&[0])), Judged::Wrong);
    let replace = m(Some(Uncertain::Replace(r(2))));
    assert_eq!(judge(&replace, &recs(&[2])), Judged::UncertainApplied);
    assert_eq!(judge(&replace, &recs(&[0, 1])), Judged::UncertainNotApplied);
    assert_eq!(judge(&replace, &recs(&[0, 1, 2])), Judged::Wrong, "a replace is all or nothing");
    let delete = m(Some(Uncertain::Delete));
    assert_eq!(judge(&delete, &Ok(Seen::Deleted)), Judged::UncertainApplied);
    assert_eq!(judge(&delete, &recs(&[0, 1])), Judged::UncertainNotApplied);
    assert_eq!(judge(&delete, &Ok(Seen::Unknown)), Judged::Wrong);
}

#[test]
fn records_are_unique_and_padded() {
    let a = record(3, 17, 5);
    assert_eq!(a.len(), RECORD_LEN);
    assert_eq!(show(&a), "t03-s00017-r0005");
    let all: HashSet<Vec<u8>> =
        (0..4).flat_map(|t| (0..20).flat_map(move |s| (0..20).map(move |n| record(t, s, n)))).collect();
    assert_eq!(all.len(), 4 * 20 * 20);
}
