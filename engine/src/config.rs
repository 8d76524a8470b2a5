//! Configuration: per-kind behaviour and the limits that bound every queue and size.

use crate::types::{Duration, Kind, ReplicaId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How sessions of one kind behave. Every size has a limit; exceeding it is a typed error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KindConfig {
    /// Delay applied when a session is stored automatically (its owner's lease ran out).
    pub default_delay_s: u32,
    /// Repeat times get a uniform random jitter in `0..=jitter_window_s` seconds added, so that a
    /// burst of failures is spread over this window instead of all coming due in one second.
    pub jitter_window_s: u32,
    /// Largest single record accepted.
    pub record_bytes_max: u32,
    /// Largest total of record bytes a session may hold.
    pub session_bytes_max: u32,
    /// Most records a session may hold.
    pub session_records_max: u32,
    /// An active session whose owner sends nothing for this long is stored with the default delay.
    pub lease_ms: u64,
    /// Most deliveries of this kind that may be in flight at once (the handler's slots).
    pub handler_slots: u32,
    /// Largest timeout a store may ask for.
    pub store_timeout_s_max: u32,
    /// After a failed delivery (the handler answered with an error, could not be reached, or
    /// let its lease run out) the session is stored again for `backoff_base_s * 2^(n-1)` seconds,
    /// `n` being the failures in a row, at most `backoff_cap_s`, plus the kind's jitter.
    pub backoff_base_s: u32,
    pub backoff_cap_s: u32,
    /// A session whose deliveries fail this many times in a row goes to the kind's dead-letter
    /// set instead of being stored again (0: never). A handler that stores the session (it is
    /// unfinished, not failed) or an operator's redrive starts the count again.
    pub max_attempts: u32,
}

impl KindConfig {
    /// Seconds before the next delivery after `failures` failed ones in a row (at least one),
    /// before jitter: the base doubled per further failure, at most the cap.
    pub fn backoff_s(&self, failures: u32) -> u32 {
        let doublings = failures.saturating_sub(1).min(31);
        let delay = (self.backoff_base_s as u64) << doublings;
        delay.min(self.backoff_cap_s as u64) as u32
    }

    /// Each setting by name, for diffs.
    pub fn named(&self) -> [(&'static str, u64); 11] {
        [
            ("default_delay_s", self.default_delay_s as u64),
            ("jitter_window_s", self.jitter_window_s as u64),
            ("record_bytes_max", self.record_bytes_max as u64),
            ("session_bytes_max", self.session_bytes_max as u64),
            ("session_records_max", self.session_records_max as u64),
            ("lease_ms", self.lease_ms),
            ("handler_slots", self.handler_slots as u64),
            ("store_timeout_s_max", self.store_timeout_s_max as u64),
            ("backoff_base_s", self.backoff_base_s as u64),
            ("backoff_cap_s", self.backoff_cap_s as u64),
            ("max_attempts", self.max_attempts as u64),
        ]
    }

    /// Whether `failures` failed deliveries in a row send a session to the dead-letter set.
    pub fn is_dead_after(&self, failures: u32) -> bool {
        self.max_attempts > 0 && failures >= self.max_attempts
    }
}

impl Default for KindConfig {
    fn default() -> Self {
        KindConfig {
            default_delay_s: 60,
            jitter_window_s: 10,
            record_bytes_max: 64 * 1024,
            session_bytes_max: 4 * 1024 * 1024,
            session_records_max: 10_000,
            lease_ms: 30_000,
            handler_slots: 64,
            store_timeout_s_max: 30 * 24 * 3600,
            backoff_base_s: 1,
            backoff_cap_s: 600,
            max_attempts: 10,
        }
    }
}

/// Bounds on everything the engine holds in memory or on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Sessions that may be active or stored at once.
    pub sessions_max: u64,
    /// Client requests waiting for the log (queued or being written) at once.
    pub pending_requests_max: u32,
    /// A group-commit batch takes at most this many entries ...
    pub batch_entries_max: u32,
    /// ... and at most this many encoded bytes.
    pub batch_bytes_max: u32,
    /// A log segment is closed and a new one started once it reaches this size.
    pub segment_bytes_max: u64,
    /// The log's segment is filled with zeros this far ahead of its end (0: never), so that
    /// appends overwrite allocated space and their fsyncs have no file size to journal.
    pub preallocate_bytes: u64,
    /// A snapshot is taken once this many entries have been applied since the last one, and the
    /// log has grown by at least the last snapshot's size since it was taken (so that a large
    /// state is not rewritten whole every this-many entries) ...
    pub snapshot_every_entries: u64,
    /// ... or by this much, whatever the state's size: the log since the last snapshot is held in
    /// memory, so this bounds it (at the cost of rewriting a state larger than it more often).
    pub snapshot_log_bytes_max: u64,
    /// Clients remembered in the deduplication table; the least recently seen is forgotten first.
    pub dedup_clients_max: u32,
    /// Deleted session ids remembered to answer "deleted" rather than "unknown".
    pub tombstones_max: u32,
    /// How often the repeater and the lease checker look for work.
    pub repeater_tick_ms: u64,
    /// Reads that fail their checksum or the disk are retried this many times before the engine
    /// decides the data is really corrupt.
    pub read_retries_max: u32,
    /// Sessions taken for delivery (or expired) in one replicated operation.
    pub take_batch_max: u32,
    /// Dead sessions one redrive of a whole kind moves back to the stored set; the client
    /// repeats the redrive until none remain.
    pub redrive_batch_max: u32,
    /// Dead sessions one listing returns at most.
    pub list_max: u32,
    /// Longest failure reason kept with a session (longer ones are cut at a character boundary).
    pub failure_reason_bytes_max: u32,
    /// Stored sessions held in memory (their record bytes plus a fixed overhead each) before the
    /// leader spills the largest kind's to a source file. With this, memory for waiting
    /// sessions no longer grows with their records: a spilled session keeps about 70 bytes in
    /// memory (its place in order and what a `get` shows).
    pub stored_memtable_bytes_max: u64,
    /// A kind with more source files than this has two neighbouring ones merged.
    pub sources_per_kind_max: u32,
    /// The leader reads this far ahead into each source whose first session is due.
    pub source_read_ahead_bytes: u32,
    /// Source files are read and written in pieces of this size (merges, read-ahead).
    pub source_io_chunk_bytes: u32,
    /// The ledger (every applied entry's events, for readers) starts a new segment file once
    /// the current one reaches this size.
    pub ledger_segment_bytes_max: u64,
    /// The ledger keeps at most this many bytes of segments ...
    pub ledger_retain_bytes_max: u64,
    /// ... and removes segments whose entries are all older than this; either way it keeps
    /// every entry after the newest snapshot, which a watcher's resync needs.
    pub ledger_retain_age_s: u64,
    /// The newest ledger records kept in memory for readers at the head (records not yet
    /// written are kept besides).
    pub ledger_cache_bytes_max: u64,
    /// Applying waits while more than this many ledger bytes wait to be written.
    pub ledger_backlog_bytes_max: u64,
    /// Readers (tails and watches) served at once.
    pub streams_max: u32,
    /// One item of a stream holds at most this many bytes of entries (at least one entry).
    pub stream_batch_bytes_max: u32,
    /// A reader behind the cached entries reads the ledger's files in pieces of this size ...
    pub stream_read_bytes: u32,
    /// ... with at most this many such reads in flight for all readers together.
    pub stream_reads_max: u32,
    /// Bytes of entries sent to a tail and not yet acknowledged, at most.
    pub tail_window_bytes_max: u64,
    /// Events sent to a watcher and not yet acknowledged, at most (a watcher may ask for fewer).
    pub watch_window_events_max: u32,
    /// A reader whose window stays full this long without an acknowledgement is cut off.
    pub stream_stall_ms_max: u64,
    /// A reader sent nothing for this long while the log moved on gets a progress mark ...
    pub progress_every_ms: u64,
    /// ... and one sent nothing for this long gets one anyway (a heartbeat: a reader that hears
    /// nothing for much longer knows its connection is gone).
    pub stream_heartbeat_ms: u64,
    /// Consumers the cluster keeps checkpoints for, at most.
    pub consumers_max: u32,
    /// Longest consumer name.
    pub consumer_name_bytes_max: u32,
    /// Session operations one consumer commit carries, at most.
    pub commit_ops_max: u32,
    /// Longest a read-through may wait.
    pub read_through_timeout_ms_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            sessions_max: 1_000_000,
            pending_requests_max: 4096,
            batch_entries_max: 1024,
            batch_bytes_max: 4 * 1024 * 1024,
            segment_bytes_max: 64 * 1024 * 1024,
            preallocate_bytes: 1024 * 1024,
            snapshot_every_entries: 100_000,
            snapshot_log_bytes_max: 32 * 1024 * 1024,
            dedup_clients_max: 100_000,
            tombstones_max: 100_000,
            repeater_tick_ms: 100,
            read_retries_max: 3,
            take_batch_max: 256,
            redrive_batch_max: 1024,
            list_max: 1000,
            failure_reason_bytes_max: 256,
            stored_memtable_bytes_max: 8 * 1024 * 1024,
            sources_per_kind_max: 32,
            source_read_ahead_bytes: 256 * 1024,
            source_io_chunk_bytes: 1024 * 1024,
            ledger_segment_bytes_max: 16 * 1024 * 1024,
            ledger_retain_bytes_max: 1024 * 1024 * 1024,
            ledger_retain_age_s: 7 * 24 * 3600,
            ledger_cache_bytes_max: 8 * 1024 * 1024,
            ledger_backlog_bytes_max: 16 * 1024 * 1024,
            streams_max: 256,
            stream_batch_bytes_max: 256 * 1024,
            stream_read_bytes: 1024 * 1024,
            stream_reads_max: 8,
            tail_window_bytes_max: 4 * 1024 * 1024,
            watch_window_events_max: 1024,
            stream_stall_ms_max: 60_000,
            progress_every_ms: 1000,
            stream_heartbeat_ms: 5000,
            consumers_max: 1024,
            consumer_name_bytes_max: 128,
            commit_ops_max: 256,
            read_through_timeout_ms_max: 60_000,
        }
    }
}

/// The limits that applying an entry depends on. They are part of the cluster's replicated
/// configuration ([`ClusterConfig`]), not of a node's file: were they read from each node's own
/// settings, two replicas could apply the same log differently. A new cluster takes them from
/// its first leader's [`Limits`]; afterwards only a committed configuration change moves them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedLimits {
    pub sessions_max: u64,
    pub dedup_clients_max: u32,
    pub tombstones_max: u32,
    pub redrive_batch_max: u32,
    pub consumers_max: u32,
    pub consumer_name_bytes_max: u32,
    pub commit_ops_max: u32,
}

impl From<&Limits> for AppliedLimits {
    fn from(l: &Limits) -> Self {
        AppliedLimits {
            sessions_max: l.sessions_max,
            dedup_clients_max: l.dedup_clients_max,
            tombstones_max: l.tombstones_max,
            redrive_batch_max: l.redrive_batch_max,
            consumers_max: l.consumers_max,
            consumer_name_bytes_max: l.consumer_name_bytes_max,
            commit_ops_max: l.commit_ops_max,
        }
    }
}

impl AppliedLimits {
    /// Each limit by name, for diffs and for telling an operator which of a file's settings the
    /// cluster does not follow.
    pub fn named(&self) -> [(&'static str, u64); 7] {
        [
            ("sessions_max", self.sessions_max),
            ("dedup_clients_max", self.dedup_clients_max as u64),
            ("tombstones_max", self.tombstones_max as u64),
            ("redrive_batch_max", self.redrive_batch_max as u64),
            ("consumers_max", self.consumers_max as u64),
            ("consumer_name_bytes_max", self.consumer_name_bytes_max as u64),
            ("commit_ops_max", self.commit_ops_max as u64),
        ]
    }
}

/// A member's part in consensus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MemberRole {
    /// Counts toward quorums and may lead.
    Voter,
    /// Replicates everything, never votes and never counts (not yet used: see the README).
    Learner,
}

/// Where a member is reached, as the cluster records it: opaque to the engine (which addresses
/// members by id), used by servers to dial each other and by clients to find members.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MemberAddrs {
    /// Where the other members reach it (replication traffic).
    pub peer: String,
    /// Where clients and handlers reach it.
    pub client: String,
}

/// The longest member address the configuration takes.
pub const MEMBER_ADDR_BYTES_MAX: usize = 256;

impl MemberAddrs {
    pub fn validate(&self) -> Result<(), String> {
        for (name, a) in [("peer", &self.peer), ("client", &self.client)] {
            if a.is_empty() || a.len() > MEMBER_ADDR_BYTES_MAX {
                return Err(format!("a {name} address must have 1 to {MEMBER_ADDR_BYTES_MAX} bytes"));
            }
        }
        Ok(())
    }
}

/// Most kinds a cluster may configure.
pub const KINDS_MAX: usize = 1024;

/// The cluster's configuration as replicated state: what applying depends on (the kinds and the
/// applied limits) and who the members are. It lives in the state machine and its snapshots and
/// changes only through committed entries, each raising `version` by one. Version 0 is a state
/// that has not applied its bootstrap entry yet (a new cluster's first leader proposes one, made
/// from its own file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub version: u64,
    pub members: BTreeMap<ReplicaId, MemberRole>,
    /// Members' addresses, where the cluster knows them (a member started from a file that
    /// names every voter may have none here: its servers read addresses from their files).
    pub addrs: BTreeMap<ReplicaId, MemberAddrs>,
    pub kinds: BTreeMap<Kind, KindConfig>,
    pub limits: AppliedLimits,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            version: 0,
            members: BTreeMap::new(),
            addrs: BTreeMap::new(),
            kinds: BTreeMap::new(),
            limits: AppliedLimits::from(&Limits::default()),
        }
    }
}

/// Why a proposed configuration is not valid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{0}")]
pub struct InvalidConfig(pub String);

impl ClusterConfig {
    /// The configuration a new cluster starts with: the first leader's kinds and limits, and
    /// the voters it was started with.
    pub fn bootstrap(cfg: &EngineConfig, voters: &[ReplicaId]) -> ClusterConfig {
        ClusterConfig {
            version: 1,
            members: voters.iter().map(|&v| (v, MemberRole::Voter)).collect(),
            addrs: BTreeMap::new(),
            kinds: cfg.kinds.clone(),
            limits: AppliedLimits::from(&cfg.limits),
        }
    }

    pub fn kind(&self, kind: Kind) -> Option<&KindConfig> {
        self.kinds.get(&kind)
    }

    /// Checks what every configuration must satisfy, whatever the state it would apply to.
    pub fn validate(kinds: &BTreeMap<Kind, KindConfig>, limits: &AppliedLimits) -> Result<(), InvalidConfig> {
        let bad = |what: String| Err(InvalidConfig(what));
        if kinds.is_empty() {
            return bad("at least one kind must be configured".into());
        }
        if kinds.len() > KINDS_MAX {
            return bad(format!("{} kinds configured; at most {KINDS_MAX}", kinds.len()));
        }
        for (kind, k) in kinds {
            let positive = [
                ("record_bytes_max", k.record_bytes_max as u64),
                ("session_bytes_max", k.session_bytes_max as u64),
                ("session_records_max", k.session_records_max as u64),
                ("lease_ms", k.lease_ms),
                ("handler_slots", k.handler_slots as u64),
                // A zero base would redeliver a failing session at once, over and over.
                ("backoff_base_s", k.backoff_base_s as u64),
            ];
            if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
                return bad(format!("kind {}: {name} must be above 0", kind.0));
            }
            if k.record_bytes_max > k.session_bytes_max {
                return bad(format!(
                    "kind {}: record_bytes_max ({}) is above session_bytes_max ({})",
                    kind.0, k.record_bytes_max, k.session_bytes_max
                ));
            }
            if k.backoff_base_s > k.backoff_cap_s {
                return bad(format!(
                    "kind {}: backoff_base_s ({}) is above backoff_cap_s ({})",
                    kind.0, k.backoff_base_s, k.backoff_cap_s
                ));
            }
        }
        if let Some((name, _)) = limits.named().iter().find(|(_, v)| *v == 0) {
            return bad(format!("limit {name} must be above 0"));
        }
        // Every setting must be one a configuration file can hold (TOML's integers are i64), so
        // that what `truba config show` prints can be applied again.
        let settings = kinds.iter().flat_map(|(k, c)| c.named().into_iter().map(move |(n, v)| (Some(*k), n, v)));
        let all = settings.chain(limits.named().into_iter().map(|(n, v)| (None, n, v)));
        if let Some((kind, name, v)) = all.into_iter().find(|(_, _, v)| *v > i64::MAX as u64) {
            let whose = kind.map_or("limit".to_string(), |k| format!("kind {}:", k.0));
            return bad(format!("{whose} {name} ({v}) is above the largest a configuration file holds ({})", i64::MAX));
        }
        Ok(())
    }

    /// What it takes to go from this configuration's kinds and applied limits to `kinds` and
    /// `limits`: kinds added (in kind order) with the settings of kinds in both that change,
    /// then kinds removed, then limits that change. Empty when they agree.
    pub fn changes(&self, kinds: &BTreeMap<Kind, KindConfig>, limits: &AppliedLimits) -> Vec<ConfigChange> {
        let mut out = Vec::new();
        for (&kind, to) in kinds {
            match self.kinds.get(&kind) {
                None => out.push(ConfigChange::KindAdded(kind)),
                Some(from) => {
                    let settings = from.named().into_iter().zip(to.named());
                    out.extend(
                        settings
                            .filter(|((_, a), (_, b))| a != b)
                            .map(|((name, from), (_, to))| ConfigChange::KindSetting { kind, name, from, to }),
                    );
                }
            }
        }
        out.extend(self.kinds.keys().filter(|k| !kinds.contains_key(k)).map(|&k| ConfigChange::KindRemoved(k)));
        let settings = self.limits.named().into_iter().zip(limits.named());
        out.extend(settings.filter(|((_, a), (_, b))| a != b).map(|((name, from), (_, to))| ConfigChange::Limit {
            name,
            from,
            to,
        }));
        out
    }

    /// Where `kinds` and `limits` (a node's own file) differ from this configuration (the
    /// cluster's), one line a setting.
    pub fn differences(&self, kinds: &BTreeMap<Kind, KindConfig>, limits: &AppliedLimits) -> Vec<String> {
        let line = |change: ConfigChange| match change {
            ConfigChange::KindAdded(k) => format!("kind {}: configured there, not in the cluster", k.0),
            ConfigChange::KindRemoved(k) => format!("kind {}: in the cluster, not configured there", k.0),
            ConfigChange::KindSetting { kind, name, from, to } => {
                format!("kind {}: {name} {to} there, {from} in the cluster", kind.0)
            }
            ConfigChange::Limit { name, from, to } => format!("limit {name}: {to} there, {from} in the cluster"),
        };
        self.changes(kinds, limits).into_iter().map(line).collect()
    }
}

/// One setting in which two configurations differ (see [`ClusterConfig::changes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigChange {
    KindAdded(Kind),
    KindRemoved(Kind),
    KindSetting { kind: Kind, name: &'static str, from: u64, to: u64 },
    Limit { name: &'static str, from: u64, to: u64 },
}

/// What applying an entry consults: the replicated configuration, and the deliberate bugs of
/// the mutation tests. Never a node's own settings (see `sessions.rs`).
pub(crate) struct Rules<'a> {
    pub config: &'a ClusterConfig,
    pub mutations: &'a Mutations,
}

impl<'a> Rules<'a> {
    pub fn new(config: &'a ClusterConfig, mutations: &'a Mutations) -> Rules<'a> {
        Rules { config, mutations }
    }

    pub fn limits(&self) -> &'a AppliedLimits {
        &self.config.limits
    }

    pub fn kind(&self, kind: Kind) -> Option<&'a KindConfig> {
        self.config.kinds.get(&kind)
    }

    /// Whether a mutation is on (always false without the `mutations` feature).
    #[inline]
    pub fn mutation(&self, pick: impl Fn(&Mutations) -> bool) -> bool {
        cfg!(feature = "mutations") && pick(self.mutations)
    }

    /// The clock reading from which a lease ending at `lease_until` counts as run out.
    pub fn lease_end(&self, kind: Kind, lease_until: crate::types::UnixMs) -> crate::types::UnixMs {
        if self.mutation(|m| m.expire_early) {
            crate::types::UnixMs(lease_until.0.saturating_sub(self.lease(kind).0 / 2))
        } else {
            lease_until
        }
    }

    pub fn lease(&self, kind: Kind) -> Duration {
        Duration(self.kind(kind).map_or(30_000, |k| k.lease_ms))
    }
}

/// Consensus timing and flow control. Every replica of a cluster should use the same values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsensusConfig {
    /// A follower that hears nothing from a leader for a random time in this range stands for
    /// election. The spread is what keeps two candidates from splitting the vote again and again.
    pub election_timeout_ms_min: u64,
    pub election_timeout_ms_max: u64,
    /// The leader sends at least this often to every follower, entries or not.
    pub heartbeat_ms: u64,
    /// Ask for pre-votes before raising the term (a rejoining replica cannot depose a leader).
    pub pre_vote: bool,
    /// A leader that has not heard from a majority within an election timeout steps down, and
    /// replicas that hear from a leader ignore vote requests for the minimum election timeout.
    pub check_quorum: bool,
    /// Largest encoded size of the entries in one append message.
    pub append_bytes_max: u64,
    /// Entry bytes sent to one follower and not yet acknowledged, at most.
    pub inflight_bytes_max: u64,
    /// Append messages sent to one follower and not yet acknowledged, at most.
    pub inflight_appends_max: u32,
    /// Outgoing messages held while the term or vote they depend on is being made durable.
    pub held_messages_max: u32,
    /// A learner is promoted only if its log lacks at most this many committed entries (and it
    /// answered within an election timeout): under load a learner that keeps up is still a
    /// round trip behind, and one that is far behind would leave the cluster short of a quorum
    /// while it catches up.
    pub promote_lag_entries_max: u64,
}

impl Default for ConsensusConfig {
    fn default() -> Self {
        ConsensusConfig {
            election_timeout_ms_min: 150,
            election_timeout_ms_max: 300,
            heartbeat_ms: 50,
            pre_vote: true,
            check_quorum: true,
            append_bytes_max: 1024 * 1024,
            inflight_bytes_max: 8 * 1024 * 1024,
            inflight_appends_max: 64,
            held_messages_max: 4096,
            promote_lag_entries_max: 256,
        }
    }
}

/// Deliberate bugs for the mutation tests: each must make a checker fail. Compiled in only with
/// the `mutations` feature, which no shipped build enables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mutations {
    /// Reply to clients when the write is issued, before the fsync that covers it completes.
    pub ack_before_fsync: bool,
    /// Treat a bad record in the middle of the log as a torn tail and cut the log there.
    pub truncate_mid_log_corruption: bool,
    /// Ignore the deduplication table: a retried request is applied again.
    pub apply_retry_twice: bool,
    /// Hand sessions to the repeater a few seconds before their repeat time.
    pub redeliver_early: bool,
    /// Recompute the jitter while applying instead of using the value written in the entry.
    pub recompute_jitter_on_apply: bool,
    /// Serve after recovery without fsyncing what was read (it may be in the page cache only).
    pub skip_recovery_fsync: bool,
    /// The leader commits an entry as soon as it is durable on the leader, without a majority.
    pub commit_without_majority: bool,
    /// Grant a vote (and adopt a term) without waiting for it to be made durable.
    pub vote_before_persist: bool,
    /// A follower acknowledges appended entries when they are written, before the fsync.
    pub follower_ack_before_fsync: bool,
    /// A follower accepts an append without checking the term of the entry before it.
    pub skip_prev_term_check: bool,
    /// Followers run the repeater too and push due sessions to handlers.
    pub follower_runs_repeater: bool,
    /// A member that cut a damaged range off its log votes and stands as if its log were whole.
    pub vote_while_repairing: bool,
    /// A failed delivery is stored again for redelivery at once, without backoff.
    pub no_backoff: bool,
    /// Sessions go to the dead-letter set one failed delivery before the kind's max attempts.
    pub dead_letter_early: bool,
    /// A keep-alive is answered but does not renew the lease.
    pub ignore_keepalive: bool,
    /// The repeater takes due sessions newest-stored first (and replicas do not check the order).
    pub take_out_of_order: bool,
    /// Leases are treated as running out halfway: a delivery is taken from its handler early.
    pub expire_early: bool,
    /// Client requests are not fenced: a handle of an older attempt is accepted.
    pub accept_stale_attempt: bool,
    /// A redrive moves a dead session back without clearing its failure count.
    pub redrive_keeps_count: bool,
    /// A source file gets its final name before its data is fsynced (so a power cut can leave
    /// a torn file under a name recovery trusts).
    pub source_rename_before_fsync: bool,
    /// The repeater and the replicas take a kind's sessions held in memory before any spilled
    /// one, whatever their repeat times.
    pub sources_out_of_order: bool,
    /// A leader answers a session read from its applied state at once, without the confirmation
    /// round that proves it still leads: a deposed leader that has not noticed answers stale.
    pub read_without_confirmation: bool,
    /// A tail reading the ledger's files does not skip the records before its position in a
    /// piece (it read from a remembered offset before it): they are sent again.
    pub tail_resends_old: bool,
    /// A tail reading a piece that ends inside a record steps over that record.
    pub tail_skips_at_piece_end: bool,
    /// An entry with several events goes out as one entry per event.
    pub tail_splits_entries: bool,
    /// Progress marks say the head of the ledger instead of what the reader was shown (ahead of
    /// entries it has yet to get: one that resumes after the mark skips them).
    pub progress_mark_ahead: bool,
    /// The ledger records the replica's own clock at apply as an entry's time, not the leader's.
    pub ledger_local_clock: bool,
    /// A watcher's resync leaves out the sessions whose records only a source file holds.
    pub resync_skips_spilled: bool,
    /// A watch's window is not enforced.
    pub watch_window_ignored: bool,
    /// A consumer's commit is not fenced by its epoch.
    pub stale_epoch_accepted: bool,
    /// A commit applies its operations one by one and keeps those before a refused one.
    pub commit_not_atomic: bool,
    /// A read-through answers once the replica has applied the index, whatever the checkpoint.
    pub read_through_on_applied: bool,
    /// Applying consults this node's own kinds and limits instead of the replicated ones.
    pub apply_local_config: bool,
    /// Learners count toward quorums (commits, elections, read confirmations) like voters.
    pub learner_in_quorum: bool,
    /// A new leader proposes a membership change before it has committed an entry of its term.
    pub skip_own_term_commit: bool,
    /// A leader proposes a membership change while the previous one is not committed yet.
    pub two_changes_in_flight: bool,
    /// A learner is promoted to voter while it lacks committed entries.
    pub promote_behind: bool,
    /// A replica that lost both copies of its hard state votes and stands as if it knew its votes.
    pub vote_after_losing_votes: bool,
    /// A replica that dropped a damaged snapshot sets no repair mark, so it votes with the empty
    /// log it starts from.
    pub snapshot_damage_unmarked: bool,
}

impl Mutations {
    /// Names accepted on the simulator's command line.
    pub const NAMES: [&'static str; 39] = [
        "ack-before-fsync",
        "truncate-mid-log",
        "apply-retry-twice",
        "redeliver-early",
        "recompute-jitter",
        "skip-recovery-fsync",
        "commit-without-majority",
        "vote-before-persist",
        "follower-ack-before-fsync",
        "skip-prev-term-check",
        "follower-runs-repeater",
        "vote-while-repairing",
        "no-backoff",
        "dead-letter-early",
        "ignore-keepalive",
        "take-out-of-order",
        "expire-early",
        "accept-stale-attempt",
        "redrive-keeps-count",
        "source-rename-before-fsync",
        "sources-out-of-order",
        "read-without-confirmation",
        "tail-resends-old",
        "tail-skips-at-piece-end",
        "tail-splits-entries",
        "progress-mark-ahead",
        "ledger-local-clock",
        "resync-skips-spilled",
        "watch-window-ignored",
        "stale-epoch-accepted",
        "commit-not-atomic",
        "read-through-on-applied",
        "apply-local-config",
        "learner-in-quorum",
        "skip-own-term-commit",
        "two-changes-in-flight",
        "promote-behind",
        "vote-after-losing-votes",
        "snapshot-damage-unmarked",
    ];

    pub fn from_name(name: &str) -> Option<Mutations> {
        let mut m = Mutations::default();
        match name {
            "ack-before-fsync" => m.ack_before_fsync = true,
            "truncate-mid-log" => m.truncate_mid_log_corruption = true,
            "apply-retry-twice" => m.apply_retry_twice = true,
            "redeliver-early" => m.redeliver_early = true,
            "recompute-jitter" => m.recompute_jitter_on_apply = true,
            "skip-recovery-fsync" => m.skip_recovery_fsync = true,
            "commit-without-majority" => m.commit_without_majority = true,
            "vote-before-persist" => m.vote_before_persist = true,
            "follower-ack-before-fsync" => m.follower_ack_before_fsync = true,
            "skip-prev-term-check" => m.skip_prev_term_check = true,
            "follower-runs-repeater" => m.follower_runs_repeater = true,
            "vote-while-repairing" => m.vote_while_repairing = true,
            "no-backoff" => m.no_backoff = true,
            "dead-letter-early" => m.dead_letter_early = true,
            "ignore-keepalive" => m.ignore_keepalive = true,
            "take-out-of-order" => m.take_out_of_order = true,
            "expire-early" => m.expire_early = true,
            "accept-stale-attempt" => m.accept_stale_attempt = true,
            "redrive-keeps-count" => m.redrive_keeps_count = true,
            "source-rename-before-fsync" => m.source_rename_before_fsync = true,
            "sources-out-of-order" => m.sources_out_of_order = true,
            "read-without-confirmation" => m.read_without_confirmation = true,
            "tail-resends-old" => m.tail_resends_old = true,
            "tail-skips-at-piece-end" => m.tail_skips_at_piece_end = true,
            "tail-splits-entries" => m.tail_splits_entries = true,
            "progress-mark-ahead" => m.progress_mark_ahead = true,
            "ledger-local-clock" => m.ledger_local_clock = true,
            "resync-skips-spilled" => m.resync_skips_spilled = true,
            "watch-window-ignored" => m.watch_window_ignored = true,
            "stale-epoch-accepted" => m.stale_epoch_accepted = true,
            "commit-not-atomic" => m.commit_not_atomic = true,
            "read-through-on-applied" => m.read_through_on_applied = true,
            "apply-local-config" => m.apply_local_config = true,
            "learner-in-quorum" => m.learner_in_quorum = true,
            "skip-own-term-commit" => m.skip_own_term_commit = true,
            "two-changes-in-flight" => m.two_changes_in_flight = true,
            "promote-behind" => m.promote_behind = true,
            "vote-after-losing-votes" => m.vote_after_losing_votes = true,
            "snapshot-damage-unmarked" => m.snapshot_damage_unmarked = true,
            _ => return None,
        }
        Some(m)
    }
}

/// Everything the engine is constructed with. Replicas of one cluster must share `kinds`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    pub kinds: BTreeMap<Kind, KindConfig>,
    pub limits: Limits,
    pub consensus: ConsensusConfig,
    #[serde(skip)]
    pub mutations: Mutations,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let mut kinds = BTreeMap::new();
        kinds.insert(Kind(1), KindConfig::default());
        EngineConfig {
            kinds,
            limits: Limits::default(),
            consensus: ConsensusConfig::default(),
            mutations: Mutations::default(),
        }
    }
}

impl EngineConfig {
    pub fn kind(&self, kind: Kind) -> Option<&KindConfig> {
        self.kinds.get(&kind)
    }

    /// Whether a mutation is on. Without the `mutations` feature this is always false, so the
    /// checks compile away in shipped builds.
    #[inline]
    pub(crate) fn mutation(&self, pick: impl Fn(&Mutations) -> bool) -> bool {
        cfg!(feature = "mutations") && pick(&self.mutations)
    }
}

#[cfg(test)]
mod tests {
    use super::KindConfig;

    #[test]
    fn backoff_doubles_from_the_base_and_stops_at_the_cap_without_overflowing() {
        let k = KindConfig { backoff_base_s: 3, backoff_cap_s: 50, ..KindConfig::default() };
        let delays: Vec<u32> = (1..=6).map(|n| k.backoff_s(n)).collect();
        assert_eq!(delays, [3, 6, 12, 24, 48, 50]);
        assert_eq!(k.backoff_s(0), 3, "the first failure waits the base");
        assert_eq!(k.backoff_s(u32::MAX), 50);
        let huge = KindConfig { backoff_base_s: u32::MAX, backoff_cap_s: u32::MAX, ..KindConfig::default() };
        assert_eq!(huge.backoff_s(40), u32::MAX);
    }

    #[test]
    fn dead_after_max_attempts_and_never_without_a_limit() {
        let k = KindConfig { max_attempts: 3, ..KindConfig::default() };
        assert!(!k.is_dead_after(2));
        assert!(k.is_dead_after(3));
        let unlimited = KindConfig { max_attempts: 0, ..KindConfig::default() };
        assert!(!unlimited.is_dead_after(u32::MAX));
    }

    /// Found by the `config` fuzz target: the cluster took a zero backoff base that a node's
    /// file refuses, so `truba config show`'s output could not be applied again.
    #[test]
    fn the_cluster_refuses_what_a_file_refuses() {
        let kinds = |k: KindConfig| std::collections::BTreeMap::from([(crate::types::Kind(1), k)]);
        let limits = super::AppliedLimits::from(&super::Limits::default());
        let zero_base = KindConfig { backoff_base_s: 0, ..KindConfig::default() };
        let e = super::ClusterConfig::validate(&kinds(zero_base), &limits).unwrap_err();
        assert_eq!(e.0, "kind 1: backoff_base_s must be above 0");
        assert!(super::ClusterConfig::validate(&kinds(KindConfig::default()), &limits).is_ok());
        let huge = KindConfig { lease_ms: u64::MAX, ..KindConfig::default() };
        let e = super::ClusterConfig::validate(&kinds(huge), &limits).unwrap_err();
        assert!(e.0.starts_with("kind 1: lease_ms (18446744073709551615) is above the largest"), "{e}");
    }
}
