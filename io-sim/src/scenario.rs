//! Scenario files: cluster shape, workload mix and fault schedule, in TOML. The same files are
//! run by `truba-sim run` and by the sim-tests suite.

use crate::disk::DiskFaults;
use crate::network::NetFaults;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use truba_engine::{ConsensusConfig, KindConfig, Limits};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Safety phase: faults are injected for this long (virtual seconds).
    pub duration_s: u64,
    /// Liveness phase: faults healed, no new sessions; everything due must be delivered by its end.
    pub liveness_s: u64,
    /// Seeds the test suite runs in CI.
    #[serde(default = "default_ci_seeds")]
    pub ci_seeds: u64,
    /// Draw the fault probabilities themselves from the seed (some off, others frequent).
    #[serde(default)]
    pub swarm: bool,
    #[serde(default)]
    pub workload: Workload,
    /// `[kinds.N]` sections: kind number N's configuration and handler behaviour.
    #[serde(default, deserialize_with = "kinds_by_number")]
    pub kinds: BTreeMap<u32, KindSetup>,
    #[serde(default)]
    pub faults: Faults,
    #[serde(default)]
    pub limits: Limits,
    /// Voting replicas: 1, 3 or 5.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    #[serde(default)]
    pub consensus: ConsensusConfig,
    #[serde(default)]
    pub checks: Checks,
    /// Readers of the ledger: tails, watches, consumers (see `streamers.rs`).
    #[serde(default)]
    pub streams: StreamSetup,
    /// Give each replica its own file's kinds and limits, drifted from the scenario's (leases,
    /// delays, attempts, session limits differ per replica), as operators' files drift in real
    /// clusters. Replicas must still agree: applying follows the replicated configuration.
    #[serde(default)]
    pub local_config_drift: bool,
    /// `[membership]`: replicas that join later, and an operator who changes the membership.
    #[serde(default)]
    pub membership: MembershipSetup,
}

/// `[membership]`: an operator who adds learners, promotes them once caught up, removes members
/// and transfers leadership while the faults go on (see `world/members.rs`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MembershipSetup {
    /// The voters a new cluster starts with (the first ones); the other replicas start empty
    /// and join. `None`: every replica is a voter from the start.
    pub initial_voters: Option<u32>,
    /// How often the operator makes a change (`None`: never).
    pub every_ms: Option<(u64, u64)>,
    /// Share of the operator's actions that transfer leadership.
    pub transfer_share: f64,
    /// Share of the operator's actions that send a second change right after the first (the
    /// leader must refuse it while the first is in flight).
    pub burst_share: f64,
    /// Share of elections right after which the operator asks the new leader for a change (it
    /// must wait until it has committed an entry of its own term).
    pub on_election_share: f64,
    /// Fewest voters the operator leaves when it removes one.
    pub voters_min: u32,
}

impl Default for MembershipSetup {
    fn default() -> Self {
        MembershipSetup {
            initial_voters: None,
            every_ms: None,
            transfer_share: 0.2,
            burst_share: 0.2,
            on_election_share: 0.3,
            voters_min: 3,
        }
    }
}

impl MembershipSetup {
    pub fn changes(&self) -> bool {
        self.every_ms.is_some()
    }
}

/// `[streams]`: readers of the ledger and what they do.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSetup {
    pub tailers: u32,
    pub watchers: u32,
    pub consumers: u32,
    /// Readers that ask a consumer to read through a session's creation (read-your-writes).
    pub pipeline_readers: u32,
    /// Consumers process the creations of sessions of `consumed_kind`, and for each one create a
    /// session of `consumer_kind` (their effect), stored for `consumer_store_s` (longer than the
    /// run, so it is never delivered).
    pub consumed_kind: u32,
    pub consumer_kind: u32,
    pub consumer_store_s: u32,
    /// A reader takes this long to process an item before it acknowledges it ...
    pub ack_ms: (u64, u64),
    /// ... except after a share of items, when it stops acknowledging for `stall_ms`.
    pub stall_share: f64,
    pub stall_ms: (u64, u64),
    /// A reader whose stream broke or ended opens another after this long.
    pub reconnect_ms: (u64, u64),
    /// A reader process crashes this often (a consumer loses the batch it was working on).
    pub crash_every_ms: Option<(u64, u64)>,
    /// Share of consumer crashes after which the old process still sends its commit, as a
    /// paused process waking up would: fenced by the new epoch, it must change nothing.
    pub zombie_share: f64,
    /// Share of consumer commits carrying an operation that is refused (an oversized record):
    /// the whole commit must be refused, and the consumer sends it again without it.
    pub bad_op_share: f64,
    /// Events a consumer gathers before it commits, and the longest it waits with fewer.
    pub batch_events: (u32, u32),
    pub batch_ms: u64,
    /// Watch windows (events) are drawn from this range.
    pub watch_window: (u32, u32),
    /// Pipeline readers ask this often.
    pub read_through_every_ms: (u64, u64),
    /// A reader's request (a consumer's open or commit, a read-through) unanswered this long is
    /// given up: its outcome is unknown.
    pub request_give_up_ms: u64,
}

impl Default for StreamSetup {
    fn default() -> Self {
        StreamSetup {
            tailers: 0,
            watchers: 0,
            consumers: 0,
            pipeline_readers: 0,
            consumed_kind: 1,
            consumer_kind: 3,
            consumer_store_s: 100_000,
            ack_ms: (0, 30),
            stall_share: 0.0,
            stall_ms: (500, 3_000),
            reconnect_ms: (20, 300),
            crash_every_ms: None,
            zombie_share: 0.3,
            bad_op_share: 0.1,
            batch_events: (1, 8),
            batch_ms: 300,
            watch_window: (2, 64),
            read_through_every_ms: (50, 400),
            request_give_up_ms: 3_000,
        }
    }
}

impl StreamSetup {
    pub fn any(&self) -> bool {
        self.tailers + self.watchers + self.consumers + self.pipeline_readers > 0
    }
}

fn default_replicas() -> u32 {
    1
}

/// `[kinds.N]` tables: `handler` is taken out and the rest must be exactly `KindConfig`'s fields
/// (serde's `flatten` would silently accept misspelt keys).
fn kinds_by_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<u32, KindSetup>, D::Error> {
    use serde::de::Error;
    let by_name = BTreeMap::<String, toml::Table>::deserialize(d)?;
    by_name
        .into_iter()
        .map(|(k, mut table)| {
            let n = k.parse::<u32>().map_err(|_| D::Error::custom(format!("kind `{k}` is not a number")))?;
            let handler = match table.remove("handler") {
                None => HandlerSetup::default(),
                Some(v) => {
                    HandlerSetup::deserialize(v).map_err(|e| D::Error::custom(format!("kinds.{k}.handler: {e}")))?
                }
            };
            let config = KindConfig::deserialize(toml::Value::Table(table))
                .map_err(|e| D::Error::custom(format!("kinds.{k}: {e}")))?;
            Ok((n, KindSetup { config, handler }))
        })
        .collect()
}

fn default_ci_seeds() -> u64 {
    100
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    pub clients: u32,
    /// Records appended per session, inclusive range.
    pub records_per_session: (u32, u32),
    pub record_bytes: (u32, u32),
    /// Share of sessions ended by store (the rest are deleted).
    pub store_share: f64,
    pub store_timeout_s: (u32, u32),
    /// Share of appends that are a replace instead.
    pub replace_share: f64,
    /// Share of appends that are oversized on purpose (must be refused, change nothing).
    pub oversized_share: f64,
    /// Probability, per session, that the client crashes somewhere in the middle of it.
    pub client_crash_share: f64,
    /// Pause between a client's operations.
    pub think_ms: (u64, u64),
    /// A client that hears nothing retries the same request (same sequence number) after this.
    pub retry_after_ms: u64,
    /// ... and gives up (the outcome stays unknown) after this long.
    pub give_up_after_ms: u64,
    /// One-way network delay between clients and the replica.
    pub net_delay_us: (u64, u64),
    /// A burst of sessions created and stored at the same moment.
    pub storm: Option<Storm>,
    /// A share of the clients all crash in the same second, leaving their sessions to the lease.
    pub crash_storm: Option<CrashStorm>,
    /// An operator who, this often, picks a session in a dead-letter set and redrives it, or
    /// (with `operator_drop_share`) drops it.
    pub operator_every_ms: Option<(u64, u64)>,
    pub operator_drop_share: f64,
    /// Readers: each asks the replica it believes leads for one session at a time (`get`, a
    /// linearizable read), waiting `read_every_ms` between an answer and its next question, and
    /// gives up on a question unanswered after `read_give_up_ms`.
    pub readers: u32,
    pub read_every_ms: (u64, u64),
    pub read_give_up_ms: u64,
    /// Readers go on asking through the liveness phase (otherwise they stop when it starts).
    pub reads_in_liveness: bool,
    /// Share of reads first sent to a learner (if the leader's configuration has one), which
    /// answers them itself through the leader's read index.
    pub read_learner_share: f64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CrashStorm {
    pub at_s: u64,
    /// Share of the clients holding a session at that moment that crash.
    pub share: f64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            clients: 8,
            records_per_session: (1, 6),
            record_bytes: (40, 256),
            store_share: 0.4,
            store_timeout_s: (0, 5),
            replace_share: 0.05,
            oversized_share: 0.02,
            client_crash_share: 0.05,
            think_ms: (0, 20),
            retry_after_ms: 300,
            give_up_after_ms: 20_000,
            net_delay_us: (50, 500),
            storm: None,
            crash_storm: None,
            operator_every_ms: None,
            operator_drop_share: 0.3,
            readers: 0,
            read_every_ms: (10, 100),
            read_give_up_ms: 2_000,
            reads_in_liveness: false,
            read_learner_share: 0.0,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Storm {
    pub at_s: u64,
    pub sessions: u32,
    pub kind: u32,
    pub timeout_s: u32,
}

/// A kind's engine configuration plus how its simulated handler behaves.
#[derive(Clone, Debug)]
pub struct KindSetup {
    pub config: KindConfig,
    pub handler: HandlerSetup,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandlerSetup {
    /// Time a handler works on a delivery before answering.
    pub work_ms: (u64, u64),
    /// Share of deliveries the handler fails (the session is stored again).
    pub fail_share: f64,
    /// Share of deliveries the handler appends to and stores again instead of deleting.
    pub restore_share: f64,
    /// Share of deliveries the handler stalls on for longer than the lease (it gets fenced off).
    pub stall_share: f64,
    /// Share of deliveries that are long jobs: the handler works for 2.5 leases, renewing its
    /// lease with a keep-alive every third of one, and then deletes the session.
    pub long_share: f64,
    /// Stretches of the run, `[from_s, to_s)` in true seconds, in which the handler cannot be
    /// reached: every delivery then fails as unreachable.
    pub down_s: Vec<(u64, u64)>,
    /// The handler flaps: up for a random time in the first range (ms), then down for one in the
    /// second, over and over, until the liveness phase.
    pub flap_ms: Option<((u64, u64), (u64, u64))>,
}

impl Default for HandlerSetup {
    fn default() -> Self {
        HandlerSetup {
            work_ms: (1, 50),
            fail_share: 0.05,
            restore_share: 0.1,
            stall_share: 0.02,
            long_share: 0.0,
            down_s: Vec::new(),
            flap_ms: None,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    pub disk: DiskFaults,
    /// Replica crashes: time between them (virtual ms), inclusive range; none if absent.
    pub crash_every_ms: Option<(u64, u64)>,
    /// Share of crashes that kill only the process: the page cache (everything written, synced
    /// or not) survives. The rest are power losses, where unsynced writes are lost or torn.
    pub process_crash_share: f64,
    pub restart_after_ms: (u64, u64),
    /// Disk-full periods: time between them and how long each lasts (virtual ms).
    pub disk_full_every_ms: Option<(u64, u64)>,
    pub disk_full_for_ms: (u64, u64),
    pub clock: ClockFaults,
    /// Between replicas (clients and handlers reach every replica with `workload.net_delay_us`).
    pub network: NetFaults,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockFaults {
    /// Initial offset of the replica's wall clock from true time, drawn from this range.
    pub offset_ms: (i64, i64),
    /// Drift of both clocks, parts per million, drawn from this range.
    pub drift_ppm: (i64, i64),
    /// Wall-clock steps: time between them and their size (either sign).
    pub step_every_ms: Option<(u64, u64)>,
    pub step_ms: (i64, i64),
    /// Step the leader's clock (when there is one) rather than a replica drawn at random: the
    /// leader's clock is the one repeat times and lease ends are read on.
    pub step_leader: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Checks {
    /// Slack allowed between a replica's wall clock and true time when checking that nothing is
    /// delivered before its repeat time in true time.
    pub clock_error_ms: u64,
    /// For a storm: the due times of its sessions must cover at least this share of the jitter
    /// window's seconds, and no second may hold more than `storm_peak_factor` times the mean.
    pub storm_cover_share: f64,
    pub storm_peak_factor: f64,
}

impl Default for Checks {
    fn default() -> Self {
        Checks { clock_error_ms: 1_000, storm_cover_share: 0.8, storm_peak_factor: 3.0 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl Scenario {
    pub fn parse(text: &str, path: &Path) -> Result<Scenario, ScenarioError> {
        let s: Scenario =
            toml::from_str(text).map_err(|e| ScenarioError::Parse { path: path.into(), reason: e.to_string() })?;
        s.validate().map_err(|reason| ScenarioError::Invalid { path: path.into(), reason })?;
        Ok(s)
    }

    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScenarioError::Read { path: path.into(), reason: e.to_string() })?;
        Scenario::parse(&text, path)
    }

    /// A file, or every `*.toml` in a directory (sorted by name).
    pub fn load_all(path: &Path) -> Result<Vec<(PathBuf, Scenario)>, ScenarioError> {
        if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| ScenarioError::Read { path: path.into(), reason: e.to_string() })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            files.sort();
            files.into_iter().map(|p| Scenario::load(&p).map(|s| (p, s))).collect()
        } else {
            Ok(vec![(path.to_path_buf(), Scenario::load(path)?)])
        }
    }

    fn validate(&self) -> Result<(), String> {
        match self.membership.initial_voters {
            None if ![1, 3, 5].contains(&self.replicas) => {
                return Err(format!("replicas must be 1, 3 or 5, got {}", self.replicas));
            }
            Some(v) if ![1, 3, 5].contains(&v) || v > self.replicas || self.replicas > 7 => {
                return Err(format!(
                    "membership.initial_voters must be 1, 3 or 5 and at most replicas (at most 7), got {v} of {}",
                    self.replicas
                ));
            }
            _ => {}
        }
        if self.kinds.is_empty() {
            return Err("at least one [kinds.N] section is needed".into());
        }
        let w = &self.workload;
        for (name, (a, b)) in [("records_per_session", w.records_per_session), ("record_bytes", w.record_bytes)] {
            if a > b {
                return Err(format!("workload.{name}: {a} > {b}"));
            }
        }
        if w.read_every_ms.0 > w.read_every_ms.1 {
            return Err(format!("workload.read_every_ms: {} > {}", w.read_every_ms.0, w.read_every_ms.1));
        }
        if w.record_bytes.0 < 32 {
            return Err("workload.record_bytes must be at least 32 (records carry their id)".into());
        }
        if let Some(s) = &w.storm {
            if !self.kinds.contains_key(&s.kind) {
                return Err(format!("workload.storm.kind {} is not configured", s.kind));
            }
        }
        for share in [w.store_share, w.replace_share, w.oversized_share, w.client_crash_share] {
            if !(0.0..=1.0).contains(&share) {
                return Err(format!("shares must lie in 0..=1, got {share}"));
            }
        }
        Ok(())
    }

    /// Swarm mode: every fault knob is switched off or scaled by a factor drawn from the seed,
    /// so a range of seeds explores many different fault regimes.
    pub fn swarmed(&self, rng: &mut ChaCha8Rng) -> Scenario {
        let mut s = self.clone();
        let mut scale = |p: f64| if rng.gen_bool(0.35) { 0.0 } else { p * rng.gen_range(0.1..4.0) };
        let d = &mut s.faults.disk;
        d.read_bitflip_prob = scale(d.read_bitflip_prob).min(0.5);
        d.read_error_prob = scale(d.read_error_prob).min(0.5);
        d.latency_spike_prob = scale(d.latency_spike_prob).min(0.5);
        s.workload.client_crash_share = scale(s.workload.client_crash_share).min(1.0);
        s.workload.oversized_share = scale(s.workload.oversized_share).min(1.0);
        for k in s.kinds.values_mut() {
            k.handler.fail_share = scale(k.handler.fail_share).min(0.9);
            k.handler.stall_share = scale(k.handler.stall_share).min(0.5);
        }
        let n = &mut s.faults.network;
        n.loss_prob = scale(n.loss_prob).min(0.5);
        n.dup_prob = scale(n.dup_prob).min(0.5);
        n.reorder_prob = scale(n.reorder_prob).min(0.5);
        n.spike_prob = scale(n.spike_prob).min(0.5);
        if rng.gen_bool(0.3) {
            s.faults.crash_every_ms = None;
        }
        if rng.gen_bool(0.5) {
            s.faults.disk.torn_writes = !s.faults.disk.torn_writes || rng.gen_bool(0.5);
        }
        // Segments not preallocated at all, preallocated in small odd steps, or as configured:
        // each leaves a different shape on disk for recovery to read.
        s.limits.preallocate_bytes = match rng.gen_range(0..3) {
            0 => 0,
            1 => rng.gen_range(1..5000),
            _ => s.limits.preallocate_bytes,
        };
        // Redelivery under failure: dead letters after a few failures or never, backoff from
        // immediate-ish to slow, and sometimes long jobs that renew their lease.
        for k in s.kinds.values_mut() {
            let c = &mut k.config;
            c.max_attempts = [0, 1, 2, 3, 5, c.max_attempts][rng.gen_range(0..6)];
            c.backoff_base_s = rng.gen_range(1..=3);
            c.backoff_cap_s = c.backoff_base_s * rng.gen_range(1..=16);
            if rng.gen_bool(0.3) {
                k.handler.long_share = rng.gen_range(0.05..0.3);
            }
        }
        // Half the seeds keep stored sessions in source files, spilled and merged all the time.
        if rng.gen_bool(0.5) {
            s.limits.stored_memtable_bytes_max = rng.gen_range(1024..16 * 1024);
            s.limits.sources_per_kind_max = rng.gen_range(1..=4);
            s.limits.source_io_chunk_bytes = rng.gen_range(256..4096);
            s.limits.source_read_ahead_bytes = rng.gen_range(256..8192);
        }
        // A cluster run with `--swarm` changes its membership in one seed in four (if the
        // scenario does not already): a member removed (down to two voters), added back as a
        // learner on its old data directory, promoted, and leadership transferred.
        if s.replicas >= 3 && !s.membership.changes() && rng.gen_bool(0.25) {
            s.membership.every_ms = Some((300, 3000));
            s.membership.voters_min = 2;
        }
        // Two seeds in five have readers of the ledger (unless the scenario names its own), with
        // a ledger that keeps little in memory and often rotates and retains little, so that
        // readers read old entries from files and are told of compaction.
        if !s.streams.any() && s.kinds.len() >= 2 && rng.gen_bool(0.4) {
            let st = &mut s.streams;
            st.tailers = rng.gen_range(0..=3);
            st.watchers = rng.gen_range(0..=3);
            st.consumers = rng.gen_range(0..=2);
            st.pipeline_readers = if st.consumers > 0 { rng.gen_range(0..=2) } else { 0 };
            st.consumed_kind = *s.kinds.keys().next().expect("two kinds");
            st.consumer_kind = *s.kinds.keys().next_back().expect("two kinds");
            st.stall_share = [0.0, 0.02, 0.1][rng.gen_range(0..3)];
            st.crash_every_ms = rng.gen_bool(0.5).then_some((500, 4000));
            st.zombie_share = rng.gen_range(0.0..1.0);
            let l = &mut s.limits;
            if rng.gen_bool(0.5) {
                l.ledger_cache_bytes_max = rng.gen_range(1024..64 * 1024);
                l.ledger_segment_bytes_max = rng.gen_range(4096..64 * 1024);
                l.stream_read_bytes = rng.gen_range(512..8192);
            }
            if rng.gen_bool(0.5) {
                l.ledger_retain_bytes_max = rng.gen_range(64 * 1024..1024 * 1024);
            }
            l.progress_every_ms = rng.gen_range(100..2000);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_scenario_parses_and_typos_are_refused() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        assert!(Scenario::load_all(&dir).unwrap().len() >= 7);
        let base = "name = \"t\"\nduration_s = 1\nliveness_s = 1\n";
        let ok = format!("{base}[kinds.1]\nlease_ms = 5\n[kinds.1.handler]\nfail_share = 0.5\n");
        let s = Scenario::parse(&ok, Path::new("t")).unwrap();
        assert_eq!((s.kinds[&1].config.lease_ms, s.kinds[&1].handler.fail_share), (5, 0.5));
        let typo = format!("{base}[kinds.1]\nlease_msec = 5\n");
        assert!(Scenario::parse(&typo, Path::new("t")).unwrap_err().to_string().contains("lease_msec"));
        let typo = format!("{base}[kinds.1]\n[kinds.1.handler]\nfail = 0.5\n");
        assert!(Scenario::parse(&typo, Path::new("t")).unwrap_err().to_string().contains("fail"));
    }
}
