//! Election downtime after a leader crash: the experiment of Figure 16 of the Raft paper
//! (Ongaro and Ousterhout, "In Search of an Understandable Consensus Algorithm", section 9.3;
//! Ongaro's thesis, chapter 9), run against the real engine.
//!
//! The question is how long a cluster is without a leader once its leader dies, and how that
//! depends on the range election timeouts are drawn from and on pre-vote. Too narrow a range
//! lets several replicas stand at once and split the vote; too wide a range makes the first
//! candidate wait longer. The paper found that a few milliseconds of spread already make split
//! votes rare (without any, elections took over 10 s), and recommended 150-300 ms.
//!
//! # One trial
//!
//! - **Cluster.** Five replicas of [`Engine`], each on its own [`MemDisk`] (a perfect in-memory
//!   data directory). A `Sync` or `SyncDir` completes [`FSYNC_US`] after it is issued, every other
//!   disk operation [`WRITE_US`] after; a replica's completions arrive in the order it issued the
//!   operations. A message takes a one-way delay drawn uniformly from
//!   [`NET_DELAY_US_MIN`]..=[`NET_DELAY_US_MAX`] (2.5-4.5 ms), independently for every message,
//!   so messages may overtake each other; none is lost. The broadcast time (a round trip plus an
//!   fsync) is therefore about 7 + 8 = 15 ms, the paper's figure.
//! - **Configuration.** The election timeout range of the row, check-quorum on, pre-vote as the
//!   row says, and a heartbeat interval of `min(50, min_timeout / 3)` ms (see
//!   [`TimeoutRange::heartbeat_ms`]; the paper used half the minimum timeout, this engine's
//!   default is a third of 150 ms).
//! - **First leader.** Replica `r` boots at `r * min_timeout / 2` ms, so that the first
//!   election is rarely split even when the range has no spread; the cluster runs until every
//!   replica names the same leader.
//! - **Logs of different lengths.** Two of the four followers, drawn at random, become laggards:
//!   from then until the crash, every message of the leader to them that carries entries (an
//!   append with entries, or a snapshot) is dropped, while empty appends (heartbeats) pass, so
//!   the laggards keep hearing from the leader. The leader then appends [`REQUESTS`] client
//!   requests, which commit on the leader and the two up-to-date followers (the laggards miss
//!   those entries, and the leader's no-op too if it was not yet delivered). The laggards' logs
//!   are shorter, so the up-to-date replicas refuse them their (pre-)votes, and a laggard cannot
//!   gather the three votes of the four survivors it needs: two survivors cannot win. The trial
//!   checks this at the crash (the laggards' last index is below the others') and at the end
//!   (no laggard leads).
//! - **Crash.** The harness waits for the leader's next heartbeat round (a tick after which the
//!   leader sent an append to every follower, all of them delivered), then crashes the leader at
//!   a time drawn uniformly from the heartbeat interval that follows. The crashed engine is
//!   dropped: its disk completions and every message addressed to it are discarded. Messages it
//!   sent before the crash are still delivered, as packets already on the wire would be, so the
//!   followers do hear that last heartbeat.
//! - **Downtime.** The time from the crash until each of the four survivors leads in a term
//!   higher than the crashed leader's or has received an append of such a term: the new leader
//!   is elected and the three others have heard from it. A trial in which that has not happened
//!   [`CAP_US`] (10 s) after the crash counts as not converged.
//!
//! Every trial's randomness (network delays, the laggards, the crash point, each engine's own
//! seed) derives from one master seed and the trial's number, so a run reproduces exactly: the
//! event queue is ordered by `(time, sequence number)` and all maps are ordered. Rows share
//! trial seeds, which makes their comparison less noisy.
//!
//! # What this engine adds to the paper's model
//!
//! At the time of writing (see the engine's `hardstate.rs` and `election.rs`):
//!
//! - The term and vote are made durable by replacing a file atomically (write, fsync, rename,
//!   fsync of the directory): two fsyncs, about 16 ms here, on the candidate. A voter that learns
//!   the new term from the vote request itself replaces the file twice in a row (the term
//!   without a vote, then the vote) before its grant leaves: about 32 ms. With pre-vote a round
//!   trip comes first. From the first timeout to the new leader's first append an election
//!   therefore takes about 60 ms, four broadcast times, where the paper's model has one fsync on
//!   each side.
//! - A pre-candidate's timer is not restarted when it becomes a candidate, so with pre-vote the
//!   whole election must fit in one timeout: ranges whose maximum is below about 60 ms can
//!   seldom or never elect a leader, not even the first one (the trial then fails before the
//!   crash).
//! - Timeouts are drawn in whole milliseconds and the engine's clock counts milliseconds, so a
//!   range such as 150-151 has two values only.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use truba_engine::{
    ClientId, DiskError, Engine, EngineConfig, Input, Instant, IoId, IoOp, IoReply, Kind, Message, Now, Output,
    ReplicaId, Request, Seq, Term, UnixMs,
};

/// Replicas in the cluster.
pub const REPLICAS: usize = 5;
/// Shortest one-way network delay, in microseconds.
pub const NET_DELAY_US_MIN: u64 = 2_500;
/// Longest one-way network delay, in microseconds.
pub const NET_DELAY_US_MAX: u64 = 4_500;
/// Latency of `Sync` and `SyncDir`, in microseconds.
pub const FSYNC_US: u64 = 8_000;
/// Latency of every other disk operation, in microseconds.
pub const WRITE_US: u64 = 100;
/// A trial without a new leader this long after the crash counts as not converged.
pub const CAP_US: u64 = 10_000_000;
/// Client requests the leader appends while the laggards are cut off.
pub const REQUESTS: u64 = 3;
/// Each preparation phase (first election, requests, heartbeat round) must finish within this.
const PHASE_CAP_US: u64 = 10_000_000;
/// Wall clock at virtual time zero (2026-01-01T00:00:00Z); the engine needs one, nothing here
/// depends on its value.
const WALL0_MS: u64 = 1_767_225_600_000;

/// A range of election timeouts, in milliseconds, both ends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeoutRange {
    pub min_ms: u64,
    pub max_ms: u64,
}

impl TimeoutRange {
    /// The ranges of Figure 16 of the Raft paper.
    pub const PAPER: [TimeoutRange; 10] = [
        TimeoutRange { min_ms: 150, max_ms: 150 },
        TimeoutRange { min_ms: 150, max_ms: 151 },
        TimeoutRange { min_ms: 150, max_ms: 155 },
        TimeoutRange { min_ms: 150, max_ms: 175 },
        TimeoutRange { min_ms: 150, max_ms: 200 },
        TimeoutRange { min_ms: 150, max_ms: 300 },
        TimeoutRange { min_ms: 12, max_ms: 24 },
        TimeoutRange { min_ms: 25, max_ms: 50 },
        TimeoutRange { min_ms: 50, max_ms: 100 },
        TimeoutRange { min_ms: 100, max_ms: 200 },
    ];

    /// The heartbeat interval used with this range: a third of the minimum timeout, so that a
    /// follower misses two heartbeats before it stands, and at most the engine's default 50 ms.
    pub fn heartbeat_ms(self) -> u64 {
        (self.min_ms / 3).clamp(1, 50)
    }

    /// Trials per row when the command line does not say: the paper ran 1000, and 100 for the
    /// range without spread, whose trials are slow.
    pub fn default_trials(self) -> u32 {
        if self.min_ms == self.max_ms {
            100
        } else {
            1000
        }
    }
}

impl fmt::Display for TimeoutRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min_ms, self.max_ms)
    }
}

impl FromStr for TimeoutRange {
    type Err = String;

    /// Parses `MIN-MAX` in milliseconds, e.g. `150-300`.
    fn from_str(s: &str) -> Result<TimeoutRange, String> {
        let (a, b) = s.split_once('-').ok_or_else(|| format!("{s}: expected MIN-MAX in ms, e.g. 150-300"))?;
        let min_ms: u64 = a.trim().parse().map_err(|e| format!("{a}: {e}"))?;
        let max_ms: u64 = b.trim().parse().map_err(|e| format!("{b}: {e}"))?;
        if min_ms < 3 || max_ms < min_ms {
            return Err(format!("{s}: need 3 <= MIN <= MAX"));
        }
        Ok(TimeoutRange { min_ms, max_ms })
    }
}

/// What one trial found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every survivor heard from a new leader `downtime_us` after the crash; the new leader's
    /// term is `terms` above the crashed leader's (1 when the first election succeeded).
    Converged { downtime_us: u64, terms: u64 },
    /// No new leader reached every survivor within [`CAP_US`].
    NotConverged,
    /// The trial could not be carried out: the cluster never got to the point of the crash
    /// (for instance, no first leader was elected), an engine stopped, or the premise broke (a
    /// laggard was not behind, or won).
    Failed(String),
}

/// The trials of one row of the table: one timeout range, pre-vote on or off.
#[derive(Clone, Debug)]
pub struct Row {
    pub range: TimeoutRange,
    pub pre_vote: bool,
    pub heartbeat_ms: u64,
    pub trials: u32,
    /// The downtime of every converged trial, in microseconds, sorted.
    pub downtimes_us: Vec<u64>,
    /// The sum over converged trials of the terms the election took.
    pub terms_sum: u64,
    pub not_converged: u32,
    pub failed: u32,
    /// Why the first failed trial failed.
    pub first_failure: Option<String>,
}

impl Row {
    /// The nearest-rank percentile `p` (in 0..=100) of the converged trials' downtimes.
    pub fn percentile_us(&self, p: f64) -> Option<u64> {
        let n = self.downtimes_us.len();
        if n == 0 {
            return None;
        }
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.downtimes_us.get(rank.clamp(1, n) - 1).copied()
    }

    pub fn mean_us(&self) -> Option<f64> {
        let n = self.downtimes_us.len();
        (n > 0).then(|| self.downtimes_us.iter().sum::<u64>() as f64 / n as f64)
    }

    /// How many terms an election took on average (1.0: no split votes).
    pub fn mean_terms(&self) -> Option<f64> {
        let n = self.downtimes_us.len();
        (n > 0).then(|| self.terms_sum as f64 / n as f64)
    }
}

/// The seed of trial `trial` of a run with master seed `master`.
pub fn trial_seed(master: u64, trial: u32) -> u64 {
    splitmix(splitmix(master) ^ u64::from(trial))
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs `trials` trials of one row.
pub fn run_row(range: TimeoutRange, pre_vote: bool, trials: u32, seed: u64) -> Row {
    let mut row = Row {
        range,
        pre_vote,
        heartbeat_ms: range.heartbeat_ms(),
        trials,
        downtimes_us: Vec::new(),
        terms_sum: 0,
        not_converged: 0,
        failed: 0,
        first_failure: None,
    };
    for trial in 0..trials {
        match run_trial(range, pre_vote, trial_seed(seed, trial)) {
            Outcome::Converged { downtime_us, terms } => {
                row.downtimes_us.push(downtime_us);
                row.terms_sum += terms;
            }
            Outcome::NotConverged => row.not_converged += 1,
            Outcome::Failed(why) => {
                row.failed += 1;
                row.first_failure.get_or_insert(format!("trial {trial}: {why}"));
            }
        }
    }
    row.downtimes_us.sort_unstable();
    row
}

/// Runs one trial (see the module documentation).
pub fn run_trial(range: TimeoutRange, pre_vote: bool, seed: u64) -> Outcome {
    let mut cluster = Cluster::new(config(range, pre_vote), seed);
    match prepare(&mut cluster, range) {
        Ok(crash) => measure(&mut cluster, crash),
        Err(why) => Outcome::Failed(why),
    }
}

fn config(range: TimeoutRange, pre_vote: bool) -> EngineConfig {
    let mut cfg = EngineConfig::default();
    cfg.consensus.election_timeout_ms_min = range.min_ms;
    cfg.consensus.election_timeout_ms_max = range.max_ms;
    cfg.consensus.heartbeat_ms = range.heartbeat_ms();
    cfg.consensus.pre_vote = pre_vote;
    cfg.consensus.check_quorum = true;
    cfg
}

/// The moment of the crash and the crashed leader's term.
#[derive(Clone, Copy, Debug)]
struct Crash {
    at_us: u64,
    term: Term,
}

/// Boots the cluster, elects a leader, makes the laggards, and crashes the leader after a
/// heartbeat round.
fn prepare(c: &mut Cluster, range: TimeoutRange) -> Result<Crash, String> {
    let leader = settle(c, range, true)?;
    let delay_us = c.rng.gen_range(0..range.heartbeat_ms() * 1000);
    c.push(c.now_us + delay_us, Ev::Crash(leader));
    let mut crash = None;
    c.run_for(PHASE_CAP_US, |c, h| match h {
        Happened::Crashed { term } => {
            crash = Some(Crash { at_us: c.now_us, term: *term });
            true
        }
        _ => false,
    })?;
    let crash = crash.ok_or("the crash did not happen")?;
    check_laggards(c)?;
    Ok(crash)
}

/// Boots the cluster, elects a leader, makes the laggards (if asked), commits the client
/// requests, and runs until the leader's next heartbeat round. The leader.
fn settle(c: &mut Cluster, range: TimeoutRange, laggards: bool) -> Result<usize, String> {
    for r in 0..REPLICAS {
        c.push(r as u64 * range.min_ms / 2 * 1000, Ev::Boot(r));
    }
    if !c.run_for(PHASE_CAP_US, |c, _| c.agreed_leader().is_some())? {
        return Err("no leader was elected".into());
    }
    let leader = c.agreed_leader().ok_or("the elected leader vanished")?;
    if laggards {
        c.make_laggards(leader);
    }
    for i in 0..REQUESTS {
        let request = Request::New { kind: Kind(1), record: None };
        c.feed(leader, Input::Request { client: ClientId(100 + i), seq: Seq(1), request });
    }
    if !c.run_for(PHASE_CAP_US, |c, _| c.replies_ok >= REQUESTS)? {
        return Err("the client requests were not committed".into());
    }
    let round = |_: &Cluster, h: &Happened| matches!(h, Happened::HeartbeatRound(r) if *r == leader);
    if !c.run_for(PHASE_CAP_US, round)? {
        return Err("the leader sent no heartbeat round".into());
    }
    Ok(leader)
}

/// The premise of the trial, checked at the crash: every laggard's log is shorter than every
/// other survivor's.
fn check_laggards(c: &Cluster) -> Result<(), String> {
    let lag = c.lag.as_ref().ok_or("no laggards were made")?;
    let last = |laggard: bool| {
        c.survivors().filter(move |(r, _)| lag.laggards.contains(r) == laggard).map(|(_, e)| e.log_range().1)
    };
    match (last(true).max(), last(false).min()) {
        (Some(behind), Some(current)) if behind < current => Ok(()),
        (behind, current) => {
            Err(format!("the laggards are not behind: their last index {behind:?}, the others' {current:?}"))
        }
    }
}

/// Runs from the crash until every survivor has heard from a new leader, or the cap.
fn measure(c: &mut Cluster, crash: Crash) -> Outcome {
    let mut heard = BTreeSet::new();
    let mut new_term = crash.term;
    let done = c.run_for(CAP_US, |c, h| {
        if let Happened::AppendDelivered { to, term } = h {
            if *term > crash.term {
                heard.insert(*to);
                new_term = new_term.max(*term);
            }
        }
        c.survivors().all(|(r, engine)| heard.contains(&r) || (engine.is_leader() && engine.term() > crash.term))
    });
    match done {
        Ok(true) => match c.survivors().find(|(_, e)| e.is_leader()) {
            Some((r, _)) if c.lag.as_ref().is_some_and(|l| l.laggards.contains(&r)) => {
                Outcome::Failed(format!("laggard {r} won the election"))
            }
            _ => Outcome::Converged { downtime_us: c.now_us - crash.at_us, terms: new_term.0 - crash.term.0 },
        },
        Ok(false) => Outcome::NotConverged,
        Err(why) => Outcome::Failed(format!("after the crash: {why}")),
    }
}

/// Leadership transfer instead of a crash: the same cluster, first leader and requests (no
/// laggards), then, at a point drawn from the heartbeat interval after a heartbeat round, an
/// operator asks the leader to hand over to a follower drawn at random. The unavailability is
/// the time from the request until the new leader has committed its first entry (from then on
/// it commits writes; the old leader refuses them from the request on). Returns it, or why the
/// trial failed.
pub fn run_transfer_trial(range: TimeoutRange, seed: u64) -> Result<u64, String> {
    let mut c = Cluster::new(config(range, true), seed);
    let leader = settle(&mut c, range, false)?;
    let delay_us = c.rng.gen_range(0..range.heartbeat_ms() * 1000);
    let followers: Vec<usize> = (0..REPLICAS).filter(|r| *r != leader).collect();
    let to = followers[c.rng.gen_range(0..followers.len())];
    let old_term = c.engines[leader].as_ref().map_or(Term(0), Engine::term);
    if c.run_for(delay_us, |_, _| false)? {
        return Err("the cluster stopped early".into());
    }
    let asked_at = c.now_us;
    let request = Request::TransferLeader { to: ReplicaId(to as u32) };
    c.feed(leader, Input::Request { client: ClientId(999), seq: Seq(1), request });
    let serving = |c: &Cluster, _: &Happened| {
        c.engines[to]
            .as_ref()
            .is_some_and(|e| e.is_leader() && e.term() > old_term && e.commit_index() >= e.membership().term_start)
    };
    if !c.run_for(CAP_US, serving)? {
        return Err(format!("{to} did not take over within {} s", CAP_US / 1_000_000));
    }
    Ok(c.now_us - asked_at)
}

/// A perfect in-memory data directory: a map from file name to bytes. Operations take effect
/// when issued; nothing is ever lost, because no replica of this experiment restarts.
#[derive(Clone, Debug, Default)]
pub struct MemDisk {
    files: BTreeMap<String, Vec<u8>>,
}

impl MemDisk {
    /// Carries out one operation, as the engine's [`IoOp`] documents it.
    pub fn execute(&mut self, op: &IoOp) -> Result<IoReply, DiskError> {
        match op {
            IoOp::List => Ok(IoReply::Listed(self.files.keys().cloned().collect())),
            IoOp::Read { file } => self.files.get(file).cloned().map(IoReply::Data).ok_or(DiskError::NotFound),
            IoOp::ReadAt { file, offset, len } => {
                let content = self.files.get(file).ok_or(DiskError::NotFound)?;
                Ok(IoReply::Data(content[crate::disk::read_range(content.len(), *offset, *len)].to_vec()))
            }
            IoOp::Write { file, offset, data } => {
                let start = to_usize(*offset)?;
                let end = start.checked_add(data.len()).ok_or_else(too_large)?;
                let content = self.files.entry(file.clone()).or_default();
                if content.len() < end {
                    content.resize(end, 0);
                }
                content[start..end].copy_from_slice(data);
                Ok(IoReply::Done)
            }
            IoOp::Sync { file } => self.files.get(file).map(|_| IoReply::Done).ok_or(DiskError::NotFound),
            IoOp::SyncDir => Ok(IoReply::Done),
            IoOp::Truncate { file, len } => {
                let len = to_usize(*len)?;
                let content = self.files.get_mut(file).ok_or(DiskError::NotFound)?;
                content.resize(len, 0);
                Ok(IoReply::Done)
            }
            IoOp::Rename { from, to } => {
                let content = self.files.remove(from).ok_or(DiskError::NotFound)?;
                self.files.insert(to.clone(), content);
                Ok(IoReply::Done)
            }
            IoOp::Remove { file } => self.files.remove(file).map(|_| IoReply::Done).ok_or(DiskError::NotFound),
        }
    }
}

fn to_usize(n: u64) -> Result<usize, DiskError> {
    usize::try_from(n).map_err(|_| too_large())
}

fn too_large() -> DiskError {
    DiskError::Io("offset or length beyond the address space".into())
}

/// What the harness schedules.
enum Ev {
    Boot(usize),
    /// Replica `r` may have a deadline due.
    Tick(usize),
    Io {
        r: usize,
        id: IoId,
        result: Result<IoReply, DiskError>,
    },
    Msg {
        from: usize,
        to: usize,
        message: Message,
    },
    Crash(usize),
}

/// What an event did that a phase of the trial may be waiting for.
enum Happened {
    Nothing,
    /// A tick of the leader `r` made it send an append to every follower, none of them dropped.
    HeartbeatRound(usize),
    /// An append of `term` reached replica `to`.
    AppendDelivered {
        to: usize,
        term: Term,
    },
    /// The leader crashed in `term`.
    Crashed {
        term: Term,
    },
}

/// The leader's messages that carry entries do not reach the laggards.
struct Lag {
    leader: usize,
    laggards: BTreeSet<usize>,
}

/// Five engines, their disks, the network between them and one event queue.
struct Cluster {
    /// `None` once crashed.
    engines: Vec<Option<Engine>>,
    disks: Vec<MemDisk>,
    queue: BTreeMap<(u64, u64), Ev>,
    next_seq: u64,
    now_us: u64,
    rng: ChaCha8Rng,
    /// When each replica's earliest queued tick fires.
    tick_at: Vec<Option<u64>>,
    /// When each replica's last disk operation completes; later ones complete after it.
    disk_done_at: Vec<u64>,
    /// The leader each replica last reported, from its `Output::Role`.
    leader_of: Vec<Option<ReplicaId>>,
    lag: Option<Lag>,
    replies_ok: u64,
    /// Set when an engine stopped or refused a request; ends the trial.
    failure: Option<String>,
}

impl Cluster {
    fn new(cfg: EngineConfig, seed: u64) -> Cluster {
        let voters: Vec<ReplicaId> = (0..REPLICAS as u32).map(ReplicaId).collect();
        let engines = (0..REPLICAS)
            .map(|r| Some(Engine::replica(cfg.clone(), voters[r], voters.clone(), splitmix(seed ^ (r as u64 + 1)))))
            .collect();
        Cluster {
            engines,
            disks: vec![MemDisk::default(); REPLICAS],
            queue: BTreeMap::new(),
            next_seq: 0,
            now_us: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            tick_at: vec![None; REPLICAS],
            disk_done_at: vec![0; REPLICAS],
            leader_of: vec![None; REPLICAS],
            lag: None,
            replies_ok: 0,
            failure: None,
        }
    }

    fn push(&mut self, at_us: u64, ev: Ev) {
        self.queue.insert((at_us, self.next_seq), ev);
        self.next_seq += 1;
    }

    fn engine_now(&self) -> Now {
        let ms = self.now_us / 1000;
        Now { mono: Instant(ms), wall: UnixMs(WALL0_MS + ms) }
    }

    /// Processes events until `stop` says so (`Ok(true)`), `limit_us` of virtual time has
    /// passed (`Ok(false)`), or an engine failed (`Err`).
    fn run_for(&mut self, limit_us: u64, mut stop: impl FnMut(&Cluster, &Happened) -> bool) -> Result<bool, String> {
        let deadline = self.now_us.saturating_add(limit_us);
        while let Some(entry) = self.queue.first_entry() {
            let (at_us, _) = *entry.key();
            if at_us > deadline {
                return Ok(false);
            }
            let ev = entry.remove();
            self.now_us = at_us;
            let happened = self.dispatch(ev);
            if let Some(why) = &self.failure {
                return Err(why.clone());
            }
            if stop(self, &happened) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn dispatch(&mut self, ev: Ev) -> Happened {
        match ev {
            Ev::Boot(r) => {
                self.feed(r, Input::Boot);
                Happened::Nothing
            }
            Ev::Tick(r) => self.tick(r),
            Ev::Io { r, id, result } => {
                self.feed(r, Input::IoDone { id, result });
                Happened::Nothing
            }
            Ev::Msg { from, to, message } => self.deliver(from, to, message),
            Ev::Crash(r) => self.crash(r),
        }
    }

    fn tick(&mut self, r: usize) -> Happened {
        if self.tick_at[r] == Some(self.now_us) {
            self.tick_at[r] = None;
        }
        let now_ms = self.now_us / 1000;
        let due = self.engines[r].as_ref().and_then(Engine::next_deadline).is_some_and(|d| d.0 <= now_ms);
        if !due {
            self.arm(r);
            return Happened::Nothing;
        }
        let appended = self.feed(r, Input::Tick);
        let leads = self.engines[r].as_ref().is_some_and(Engine::is_leader);
        if leads && appended.len() == REPLICAS - 1 {
            Happened::HeartbeatRound(r)
        } else {
            Happened::Nothing
        }
    }

    fn deliver(&mut self, from: usize, to: usize, message: Message) -> Happened {
        if self.engines[to].is_none() {
            return Happened::Nothing;
        }
        let append_term = matches!(message, Message::Append { .. }).then(|| message.term());
        self.feed(to, Input::Message { from: ReplicaId(from as u32), message });
        match append_term {
            Some(term) => Happened::AppendDelivered { to, term },
            None => Happened::Nothing,
        }
    }

    fn crash(&mut self, r: usize) -> Happened {
        let term = self.engines[r].take().map_or(Term(0), |e| e.term());
        self.tick_at[r] = None;
        Happened::Crashed { term }
    }

    /// Hands one input to replica `r` and carries out everything it asks for. Returns the
    /// replicas it sent an append to (and that append was not dropped).
    fn feed(&mut self, r: usize, input: Input) -> BTreeSet<usize> {
        let now = self.engine_now();
        let mut outputs = Vec::new();
        if let Some(engine) = self.engines[r].as_mut() {
            engine.handle(now, input);
            while let Some(o) = engine.poll() {
                outputs.push(o);
            }
        }
        let mut appended = BTreeSet::new();
        for o in outputs {
            if let Some(to) = self.carry_out(r, o) {
                appended.insert(to);
            }
        }
        self.arm(r);
        appended
    }

    /// Carries out one output of replica `r`; returns the receiver of an append it sent.
    fn carry_out(&mut self, r: usize, o: Output) -> Option<usize> {
        match o {
            Output::Io { id, op } => self.disk_op(r, id, &op),
            Output::Send { to, message } => return self.send(r, to.0 as usize, message),
            Output::Role { leader, .. } => self.leader_of[r] = leader,
            Output::Reply { outcome: Ok(_), .. } => self.replies_ok += 1,
            Output::Reply { outcome: Err(e), .. } => self.fail(format!("replica {r} refused a request: {e}")),
            Output::Stopped(fatal) => self.fail(format!("replica {r} stopped: {fatal}")),
            _ => {}
        }
        None
    }

    fn fail(&mut self, why: String) {
        self.failure.get_or_insert(why);
    }

    fn disk_op(&mut self, r: usize, id: IoId, op: &IoOp) {
        let result = self.disks[r].execute(op);
        let latency = if matches!(op, IoOp::Sync { .. } | IoOp::SyncDir) { FSYNC_US } else { WRITE_US };
        let at_us = (self.now_us + latency).max(self.disk_done_at[r]);
        self.disk_done_at[r] = at_us;
        self.push(at_us, Ev::Io { r, id, result });
    }

    fn send(&mut self, from: usize, to: usize, message: Message) -> Option<usize> {
        if to >= REPLICAS || self.withheld(from, to, &message) {
            return None;
        }
        let is_append = matches!(message, Message::Append { .. });
        let at_us = self.now_us + self.rng.gen_range(NET_DELAY_US_MIN..=NET_DELAY_US_MAX);
        self.push(at_us, Ev::Msg { from, to, message });
        is_append.then_some(to)
    }

    /// Whether this message would bring a laggard up to date.
    fn withheld(&self, from: usize, to: usize, message: &Message) -> bool {
        let carries_entries = match message {
            Message::Append { entries, .. } => !entries.is_empty(),
            Message::Snapshot { .. } => true,
            _ => false,
        };
        carries_entries && self.lag.as_ref().is_some_and(|l| l.leader == from && l.laggards.contains(&to))
    }

    /// Makes sure a tick is queued for replica `r`'s next deadline.
    fn arm(&mut self, r: usize) {
        let Some(deadline) = self.engines[r].as_ref().and_then(Engine::next_deadline) else { return };
        let at_us = deadline.0.saturating_mul(1000).max(self.now_us);
        if self.tick_at[r].is_some_and(|t| t <= at_us) {
            return;
        }
        self.tick_at[r] = Some(at_us);
        self.push(at_us, Ev::Tick(r));
    }

    /// The replicas that have not crashed.
    fn survivors(&self) -> impl Iterator<Item = (usize, &Engine)> {
        self.engines.iter().enumerate().filter_map(|(r, e)| e.as_ref().map(|e| (r, e)))
    }

    /// The leader every replica names, if they agree and it does lead.
    fn agreed_leader(&self) -> Option<usize> {
        let leader = self.leader_of[0]?;
        let r = leader.0 as usize;
        let agreed = self.leader_of.iter().all(|l| *l == Some(leader));
        (agreed && self.engines.get(r)?.as_ref()?.is_leader()).then_some(r)
    }

    /// Draws two of the leader's followers to fall behind.
    fn make_laggards(&mut self, leader: usize) {
        let mut followers: Vec<usize> = (0..REPLICAS).filter(|r| *r != leader).collect();
        let mut laggards = BTreeSet::new();
        while laggards.len() < 2 && !followers.is_empty() {
            let i = self.rng.gen_range(0..followers.len());
            laggards.insert(followers.swap_remove(i));
        }
        self.lag = Some(Lag { leader, laggards });
    }
}

/// The fixed parameters, as a few lines for the output.
pub fn describe() -> String {
    format!(
        "{REPLICAS} replicas; one-way network delay uniform {:.1}-{:.1} ms; fsync {:.1} ms, other disk ops {:.1} ms \
         (broadcast time ~{:.0} ms); check-quorum on; heartbeat min(50, min timeout / 3) ms; two laggards; \
         {REQUESTS} requests; cap {} s after the crash",
        NET_DELAY_US_MIN as f64 / 1000.0,
        NET_DELAY_US_MAX as f64 / 1000.0,
        FSYNC_US as f64 / 1000.0,
        WRITE_US as f64 / 1000.0,
        (NET_DELAY_US_MIN + NET_DELAY_US_MAX + FSYNC_US) as f64 / 1000.0,
        CAP_US / 1_000_000,
    )
}

fn ms(us: Option<u64>) -> String {
    us.map_or_else(|| "-".into(), |us| format!("{:.1}", us as f64 / 1000.0))
}

/// The rows as a markdown table, times in milliseconds.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| timeout (ms) | pre-vote | heartbeat (ms) | trials | median | mean | p90 | p99 | max | not converged | \
         failed | mean terms |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.range,
            if row.pre_vote { "yes" } else { "no" },
            row.heartbeat_ms,
            row.trials,
            ms(row.percentile_us(50.0)),
            row.mean_us().map_or_else(|| "-".into(), |m| format!("{:.1}", m / 1000.0)),
            ms(row.percentile_us(90.0)),
            ms(row.percentile_us(99.0)),
            ms(row.downtimes_us.last().copied()),
            row.not_converged,
            row.failed,
            row.mean_terms().map_or_else(|| "-".into(), |t| format!("{t:.2}")),
        ));
    }
    out
}

/// The rows as JSON, times in milliseconds (`null` where no trial converged).
pub fn json(rows: &[Row], seed: u64) -> String {
    let num = |v: Option<f64>| v.map_or_else(|| "null".into(), |v| format!("{v:.3}"));
    let pct = |row: &Row, p: f64| num(row.percentile_us(p).map(|us| us as f64 / 1000.0));
    let items: Vec<String> = rows
        .iter()
        .map(|row| {
            format!(
                "{{\"timeout_min_ms\":{},\"timeout_max_ms\":{},\"pre_vote\":{},\"heartbeat_ms\":{},\"trials\":{},\"median_ms\":{},\
                 \"mean_ms\":{},\"p90_ms\":{},\"p99_ms\":{},\"max_ms\":{},\"not_converged\":{},\
                 \"failed\":{},\"mean_terms\":{}}}",
                row.range.min_ms,
                row.range.max_ms,
                row.pre_vote,
                row.heartbeat_ms,
                row.trials,
                pct(row, 50.0),
                num(row.mean_us().map(|m| m / 1000.0)),
                pct(row, 90.0),
                pct(row, 99.0),
                pct(row, 100.0),
                row.not_converged,
                row.failed,
                num(row.mean_terms()),
            )
        })
        .collect();
    format!(
        "{{\"seed\":{seed},\"replicas\":{REPLICAS},\"net_delay_ms\":[{:.1},{:.1}],\"fsync_ms\":{:.1},\
         \"cap_ms\":{},\"rows\":[{}]}}",
        NET_DELAY_US_MIN as f64 / 1000.0,
        NET_DELAY_US_MAX as f64 / 1000.0,
        FSYNC_US as f64 / 1000.0,
        CAP_US / 1000,
        items.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(file: &str, offset: u64, data: &[u8]) -> IoOp {
        IoOp::Write { file: file.into(), offset, data: data.to_vec() }
    }

    fn read(disk: &mut MemDisk, file: &str) -> Result<IoReply, DiskError> {
        disk.execute(&IoOp::Read { file: file.into() })
    }

    #[test]
    fn mem_disk_round_trips_writes_and_renames() {
        let mut disk = MemDisk::default();
        assert_eq!(read(&mut disk, "a"), Err(DiskError::NotFound));
        assert_eq!(disk.execute(&write("a.tmp", 2, b"xy")), Ok(IoReply::Done));
        assert_eq!(read(&mut disk, "a.tmp"), Ok(IoReply::Data(vec![0, 0, b'x', b'y'])));
        assert_eq!(disk.execute(&write("a.tmp", 0, b"ab")), Ok(IoReply::Done));
        assert_eq!(disk.execute(&IoOp::Sync { file: "a.tmp".into() }), Ok(IoReply::Done));
        let rename = IoOp::Rename { from: "a.tmp".into(), to: "a".into() };
        assert_eq!(disk.execute(&rename), Ok(IoReply::Done));
        assert_eq!(disk.execute(&rename), Err(DiskError::NotFound));
        assert_eq!(disk.execute(&IoOp::List), Ok(IoReply::Listed(vec!["a".into()])));
        assert_eq!(read(&mut disk, "a"), Ok(IoReply::Data(b"abxy".to_vec())));
        let read_at = |offset, len| IoOp::ReadAt { file: "a".into(), offset, len };
        assert_eq!(disk.execute(&read_at(1, 2)), Ok(IoReply::Data(b"bx".to_vec())));
        assert_eq!(disk.execute(&read_at(2, u64::MAX)), Ok(IoReply::Data(b"xy".to_vec())));
        assert_eq!(disk.execute(&read_at(9, 1)), Ok(IoReply::Data(Vec::new())));
        assert_eq!(disk.execute(&IoOp::ReadAt { file: "b".into(), offset: 0, len: 1 }), Err(DiskError::NotFound));
        assert_eq!(disk.execute(&IoOp::Truncate { file: "a".into(), len: 1 }), Ok(IoReply::Done));
        assert_eq!(read(&mut disk, "a"), Ok(IoReply::Data(b"a".to_vec())));
        assert_eq!(disk.execute(&IoOp::Remove { file: "a".into() }), Ok(IoReply::Done));
        assert_eq!(disk.execute(&IoOp::List), Ok(IoReply::Listed(Vec::new())));
        assert_eq!(disk.execute(&IoOp::Sync { file: "a".into() }), Err(DiskError::NotFound));
    }

    #[test]
    fn timeout_ranges_parse() {
        assert_eq!("150-300".parse(), Ok(TimeoutRange { min_ms: 150, max_ms: 300 }));
        assert!("300-150".parse::<TimeoutRange>().is_err());
        assert!("150".parse::<TimeoutRange>().is_err());
        assert_eq!(TimeoutRange { min_ms: 150, max_ms: 300 }.heartbeat_ms(), 50);
        assert_eq!(TimeoutRange { min_ms: 12, max_ms: 24 }.heartbeat_ms(), 4);
    }

    #[test]
    fn elections_with_the_paper_range_converge() {
        let range = TimeoutRange { min_ms: 150, max_ms: 300 };
        for pre_vote in [true, false] {
            let row = run_row(range, pre_vote, 20, 7);
            assert_eq!(row.failed, 0, "{:?}", row.first_failure);
            assert_eq!(row.not_converged, 0);
            let median = row.percentile_us(50.0).unwrap_or(0);
            assert!((150_000..=600_000).contains(&median), "median {median} us");
            // A downtime below the minimum timeout minus a heartbeat interval is impossible.
            assert!(row.downtimes_us[0] >= 100_000, "min {} us", row.downtimes_us[0]);
        }
    }

    #[test]
    fn trials_are_deterministic() {
        let range = TimeoutRange { min_ms: 150, max_ms: 155 };
        for trial in 0..3 {
            let seed = trial_seed(42, trial);
            assert_eq!(run_trial(range, true, seed), run_trial(range, true, seed));
        }
    }
}
