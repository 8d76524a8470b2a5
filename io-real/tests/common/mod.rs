//! The ground truth shared by the tests that kill real `truba` processes under load (`sigkill.rs`
//! for one server, `cluster_kill.rs` for a cluster of three): the clients' load, the model of every
//! session they opened, and the verification that every acknowledged operation is there and
//! nothing else.
//!
//! Each operation ends in one of three ways: acknowledged (it happened), refused or never sent
//! (it did not happen), or timed out (it may or may not have happened; the session is then left
//! alone and checked for "the known records, with or without that one operation").
//!
//! It also holds the few steps both tests take with their server processes (start, SIGTERM, the
//! log's last lines), and in [`cluster`] the harness of the tests that run a cluster of three
//! (`cluster_kill.rs`, `cluster_sources.rs`).
//!
//! Each test binary compiles this module on its own (`mod common;`), so the unit tests at the end
//! run once in each of them.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use truba::client::{ClientError, ClientOptions, Pipe};
use truba::net::Tcp;
use truba_engine::{Handle, RequestError, SessionId, SessionState};

// `sigkill.rs` runs one server and compiles this module unused, and each cluster test uses only
// part of it, so the lint would otherwise fire in every binary.
#[allow(dead_code)]
pub mod cluster;

/// Every record is this long (unique text, padded).
pub const RECORD_LEN: usize = 100;
/// The kind every session is opened with.
pub const KIND: u32 = 1;
/// A full scan of session ids (to find sessions nobody acknowledged) is done up to this index.
pub const SCAN_MAX: u64 = 400_000;

// ---------------------------------------------------------------------------------------------
// A tiny reproducible generator (xorshift64*), so the tests need no `rand`.

pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        // splitmix64 of the seed, so that nearby seeds give unrelated streams (and never 0).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    pub fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
}

// ---------------------------------------------------------------------------------------------
// Server processes.

/// Starts `bin serve --config config` with its output appended to `log`, after a line
/// `===== test: {marker} =====`: a log kept over several starts then shows where each begins.
pub fn spawn_serve(bin: &Path, config: &Path, log: &Path, marker: &str) -> Child {
    spawn_serve_with(bin, config, log, marker, &[])
}

/// [`spawn_serve`] with more arguments after `serve --config FILE`.
pub fn spawn_serve_with(bin: &Path, config: &Path, log: &Path, marker: &str, args: &[&str]) -> Child {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("opening the log {}: {e}", log.display()));
    let mut mark = out.try_clone().expect("cloning the log handle");
    let _ = writeln!(mark, "===== test: {marker} =====");
    Command::new(bin)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("cloning the log handle"))
        .stderr(out)
        .spawn()
        .expect("starting `truba serve`")
}

/// SIGTERM to the running process in `child`; its exit status if it ends within `within` (it is
/// then taken out of `child`), `None` if it is still running by then.
pub async fn terminate(child: &mut Option<Child>, within: Duration) -> Option<ExitStatus> {
    let pid = child.as_ref().expect("the process is running").id();
    let sent = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("running kill");
    assert!(sent.success(), "kill -TERM {pid} failed: {sent}");
    let deadline = Instant::now() + within;
    loop {
        let running = child.as_mut().expect("the process is running");
        if let Some(status) = running.try_wait().expect("polling the process") {
            *child = None;
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The last `lines` lines of a process's log, to print when a test fails.
/// Runs `truba ARGS --addr ADDR` (without the caller's `RUST_LOG` and `TRUBA_ADDR`): its exit
/// code, standard output and standard error.
#[allow(dead_code)] // not every test file runs the command line
pub async fn truba_cli(addr: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_truba"))
        .args(args)
        .args(["--addr", addr])
        .env_remove("RUST_LOG")
        .env_remove("TRUBA_ADDR")
        .output()
        .await
        .expect("running truba");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("utf-8 output");
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| format!("(cannot read the log: {e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// The clients and their ground truth.

pub fn options() -> ClientOptions {
    ClientOptions { request_timeout: Duration::from_secs(1), retry_for: Duration::from_secs(20), ..Default::default() }
}

/// A pipe to the first of `addrs` that accepts it (the client moves on to the others when that
/// one fails), retried for up to 10 s while the server or cluster is still starting.
pub async fn connect(addrs: Vec<String>) -> Pipe<Tcp> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Pipe::connect_with(Tcp, addrs.clone(), options()).await {
            Ok(p) => return p,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot connect to {}: {e}", addrs.join(","));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

/// A unique record: its origin as text, padded to [`RECORD_LEN`] bytes.
pub fn record(task: usize, session: u64, n: u64) -> Vec<u8> {
    let mut r = format!("t{task:02}-s{session:05}-r{n:04}|").into_bytes();
    let mut i = 0u8;
    while r.len() < RECORD_LEN {
        r.push(b'a' + i % 26);
        i = i.wrapping_add(7);
    }
    r
}

pub fn show(r: &[u8]) -> String {
    let s = String::from_utf8_lossy(r);
    s.split('|').next().unwrap_or_default().to_string()
}

pub fn show_all(rs: &[Vec<u8>]) -> String {
    format!("[{}]", rs.iter().map(|r| show(r)).collect::<Vec<_>>().join(", "))
}

/// The one operation of a session whose outcome is unknown.
#[derive(Clone, Debug)]
pub enum Uncertain {
    Append(Vec<u8>),
    Replace(Vec<u8>),
    Delete,
}

/// What a session must hold.
#[derive(Clone, Debug)]
pub struct Model {
    pub id: SessionId,
    /// The handle from the creation (nothing is ever delivered, so the attempt never changes).
    /// Only `sigkill.rs` reads it (a keep-alive tells it when the restarted server serves), so
    /// the lint would otherwise fire in the `cluster_kill` binary.
    #[allow(dead_code)]
    pub handle: Handle,
    pub task: usize,
    /// Acknowledged appends since the last acknowledged replace (or the creation), in order.
    pub records: Vec<Vec<u8>>,
    /// The delete was acknowledged.
    pub deleted: bool,
    /// An operation with no answer; the session was not used after it.
    pub uncertain: Option<Uncertain>,
}

/// What one load task did, or (from [`join_load`]) all of them together.
#[derive(Default)]
pub struct TaskReport {
    pub sessions: Vec<Model>,
    /// First records of creations whose outcome is unknown (the session may exist, id unknown).
    pub uncertain_creates: Vec<Vec<u8>>,
    /// Every record generated, sent or not. A set, because the verification asks of every record
    /// it reads whether somebody generated it.
    pub generated: HashSet<Vec<u8>>,
    pub not_sent: u64,
    pub unknown: u64,
    /// Refusals and other errors that this workload never provokes: each one is a violation.
    pub violations: Vec<String>,
}

/// What the load tasks share with the test that runs them. Each test measures availability its
/// own way (per kill for one server, from a timeline of every acknowledgement for a cluster), so
/// each keeps its own state and only says when to stop and what to do with an acknowledgement.
pub trait Ledger: Send + Sync + 'static {
    /// The test wants the load to stop; each task finishes its session and returns its report.
    fn stopping(&self) -> bool;
    /// A request sent at `sent_at` was acknowledged just now.
    fn on_ack(&self, sent_at: Instant);
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
    ledger: &impl Ledger,
    report: &mut TaskReport,
) -> Outcome {
    match r {
        Ok(_) => {
            ledger.on_ack(sent_at);
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

/// One client until `ledger` says stop: it opens a session, appends to it or replaces its
/// records a random number of times, sometimes deletes it, and starts the next one. A session
/// whose operation had an unknown outcome is left alone from then on.
pub async fn load<L: Ledger>(task: usize, addrs: Vec<String>, seed: u64, ledger: Arc<L>) -> TaskReport {
    let pipe = connect(addrs).await;
    let mut rng = XorShift::new(seed ^ (task as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut report = TaskReport::default();
    let mut session_no = 0u64;
    while !ledger.stopping() {
        session_no += 1;
        let mut n = 0u64;
        let first = record(task, session_no, n);
        report.generated.insert(first.clone());
        let sent_at = Instant::now();
        let r = pipe.new_with(KIND, first.clone()).await;
        let what = format!("t{task} new session {session_no}");
        let mut session = match classify(&r, &what, sent_at, &*ledger, &mut report) {
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
            if ledger.stopping() {
                break;
            }
            n += 1;
            let rec = record(task, session_no, n);
            report.generated.insert(rec.clone());
            let replace = rng.percent(12);
            let sent_at = Instant::now();
            let r = if replace { session.replace(rec.clone()).await } else { session.append(rec.clone()).await };
            let what = format!("t{task} {} on session {}", if replace { "replace" } else { "append" }, m.id.0);
            match classify(&r, &what, sent_at, &*ledger, &mut report) {
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
            match classify(&r, &what, sent_at, &*ledger, &mut report) {
                Outcome::Acked => m.deleted = true,
                Outcome::NotApplied => {}
                Outcome::Unknown => m.uncertain = Some(Uncertain::Delete),
            }
        }
        report.sessions.push(m);
    }
    report
}

/// Waits for every load task (told to stop beforehand) and adds up their reports. A task that
/// does not stop within 40 s is a failure: it would mean some request hangs past every retry.
pub async fn join_load(tasks: Vec<JoinHandle<TaskReport>>) -> TaskReport {
    let mut totals = TaskReport::default();
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(40), t).await;
        let r = r.expect("a load task did not stop").expect("a load task panicked");
        totals.sessions.extend(r.sessions);
        totals.uncertain_creates.extend(r.uncertain_creates);
        totals.generated.extend(r.generated);
        totals.not_sent += r.not_sent;
        totals.unknown += r.unknown;
        totals.violations.extend(r.violations);
    }
    totals
}

/// Fails if the load saw refusals or errors it never provokes, listing the first 20.
pub fn assert_load_clean(violations: &[String]) {
    assert!(
        violations.is_empty(),
        "{} requests were refused or failed during the load (none should be):\n{}",
        violations.len(),
        violations.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Verification.

/// What a `get` showed: the records, or that the session is deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Records(Vec<Vec<u8>>),
    Deleted,
    /// The server says the session does not exist.
    Unknown,
}

/// What each session showed, or the error its `get` ended in, as text.
pub type Views = BTreeMap<SessionId, Result<Seen, String>>;

/// How a test reads sessions back and words what it finds. The one-server and the cluster test
/// differ only in the words and in how many reads they keep in flight (a cluster's reads wait
/// for a confirmation round, so it needs more at once).
pub struct Verifier {
    /// The test's name, which starts every line it prints.
    pub test: &'static str,
    /// What holds the sessions, as violations name it ("server", "member").
    pub holder: &'static str,
    /// Session reads in flight at once over the one pipe.
    pub readers: usize,
}

/// The figures of one verification.
#[derive(Default, Debug)]
pub struct Verified {
    pub sessions: usize,
    pub deleted: usize,
    pub uncertain: usize,
    /// Uncertain operations found applied / not applied.
    pub uncertain_applied: usize,
    pub uncertain_not_applied: usize,
    /// Sessions found that no acknowledgement names (creations whose outcome was unknown).
    pub orphans_found: usize,
    pub ids_scanned: u64,
    pub records_checked: usize,
}

impl fmt::Display for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "verified {} sessions ({} deleted, {} uncertain: {} applied, {} not), {} records, {} ids scanned, {} \
             orphans of unknown creations",
            self.sessions,
            self.deleted,
            self.uncertain,
            self.uncertain_applied,
            self.uncertain_not_applied,
            self.records_checked,
            self.ids_scanned,
            self.orphans_found
        )
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Judged {
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
pub fn judge(m: &Model, got: &Result<Seen, String>) -> Judged {
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

impl Verifier {
    /// Gets every id, [`Verifier::readers`] at a time over one pipe. Errors other than "deleted"
    /// and "unknown" are returned as text.
    pub async fn get_all(&self, pipe: &Pipe<Tcp>, ids: Vec<SessionId>) -> Views {
        let ids = Arc::new(ids);
        let next = Arc::new(AtomicU64::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..self.readers {
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

    /// Checks every modelled session, then that nothing else exists, on what `pipe` reaches.
    /// Returns the figures, what each session showed, and the violations.
    pub async fn verify(
        &self,
        pipe: &Pipe<Tcp>,
        models: &[Model],
        uncertain_creates: &[Vec<u8>],
        generated: &HashSet<Vec<u8>>,
    ) -> (Verified, Views, Vec<String>) {
        let mut v = Verified::default();
        let mut bad = Vec::new();
        let seen = self.get_all(pipe, models.iter().map(|m| m.id).collect()).await;
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

        // Nothing else: the session count leaves room only for creations whose outcome is
        // unknown, and a scan of every id shows that each extra session is one of those.
        let holder = self.holder;
        let status = pipe.status().await.expect("status");
        let total = status.engine.sessions_active + status.engine.sessions_stored;
        if status.engine.sessions_stored != 0 {
            bad.push(format!("{} sessions are stored; nothing here stores any", status.engine.sessions_stored));
        }
        if total < present || total - present > uncertain_creates.len() as u64 {
            bad.push(format!(
                "the {holder} holds {total} sessions; the clients know of {present}, plus at most {} creations with \
                 unknown outcome",
                uncertain_creates.len()
            ));
        }
        let applied = status.engine.applied.0;
        if applied <= SCAN_MAX {
            let known: HashSet<SessionId> = models.iter().map(|m| m.id).collect();
            let others: Vec<SessionId> = (1..=applied).map(SessionId).filter(|id| !known.contains(id)).collect();
            v.ids_scanned = applied;
            let mut orphan_firsts: HashSet<&[u8]> = uncertain_creates.iter().map(|r| r.as_slice()).collect();
            for (id, got) in self.get_all(pipe, others).await {
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
                    "the {holder} counts {total} sessions, the scan found {present} known and {} orphans",
                    v.orphans_found
                ));
            }
        } else {
            eprintln!("{}: {applied} entries, too many to scan every id; relying on the session count", self.test);
        }
        (v, seen, bad)
    }
}

/// Fails if a verification found violations, listing the first 30; `when` says which one
/// ("after the kills").
pub fn assert_verified(bad: &[String], when: &str) {
    assert!(
        bad.is_empty(),
        "{} violations {when}:\n{}",
        bad.len(),
        bad.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
    );
}

pub fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

// ---------------------------------------------------------------------------------------------
// Unit tests of the shared pieces.

/// The live runs rarely produce unknown outcomes (a restart takes milliseconds, the clients
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
