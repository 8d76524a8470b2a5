//! Real processes, three of them: a `truba` cluster of three members under the load of 16
//! clients. Phase A kills the leader with SIGKILL again and again (a survivor must take over, in a
//! higher term), phase B kills a follower (the load must carry on, the leader must stay); each
//! killed member is restarted after a short pause. Afterwards every acknowledged operation must be
//! there and nothing else (read through the leader: followers refuse session reads), and the three
//! members, asked one by one, must agree on their applied index and state hash.
//!
//! This is `sigkill.rs` for a cluster, and shares its ground truth (the load, the model of every
//! session and the verification are in `common/mod.rs`; the member processes are run by
//! `common/cluster.rs`): every operation ends acknowledged (it happened), refused or never sent (it
//! did not happen), or timed out (it may or may not have happened; the session is then left alone
//! and checked for "the known records, with or without that one operation").
//!
//! Unavailability after a leader kill is the time from the kill to the first acknowledgement a
//! live member must have given: of a request sent after the killed process was reaped, or of any
//! request answered later than `election_timeout_ms_min - heartbeat_ms` after the kill (no
//! survivor can have been elected before that; earlier answers may be replies the dead leader
//! wrote before it died, read late). It includes the clients' reconnection backoff.
//!
//! The kill schedule (pauses, which follower) comes from a seed printed at the start; set
//! `TRUBA_CLUSTER_KILL_SEED` (hex) to replay it and `TRUBA_CLUSTER_KILLS` to change the number of
//! kills per phase (default 4).
//!
//! `cargo test -p truba --test cluster_kill -- --nocapture` shows the figures.

mod common;

use common::cluster::{by_position, Cluster, ClusterConfig, NODES};
use common::{assert_load_clean, assert_verified, connect, join_load, ms, Ledger, TaskReport, Verifier, XorShift};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use truba_engine::ConsensusConfig;

/// Every member's engine limits and kind settings (the rest of its config is the same for every
/// cluster test).
const CLUSTER: ClusterConfig = ClusterConfig {
    dir_prefix: "truba-cluster-kill-",
    engine: "snapshot_every_entries = 500\nsegment_bytes_max = 65536\n",
    kind: "lease_ms = 600000\ndefault_delay_s = 3600\n",
    stored: false,
};
/// Concurrent clients, each with its own pipe (connection) and one session at a time.
const TASKS: usize = 16;
/// SIGKILLs of the leader, then of a follower (`TRUBA_CLUSTER_KILLS` overrides both).
const KILLS: usize = 4;
/// Session reads in flight at once during the verification (reads wait for a confirmation
/// round, so many are kept in flight).
const READERS: usize = 64;
/// Reads back the sessions through a pipe to the members, which the leader answers.
const VERIFIER: Verifier = Verifier { test: "cluster_kill", holder: "member", readers: READERS };
const DEFAULT_SEED: u64 = 0xc1a5_7e55;
/// A survivor must be elected within this long after the leader is killed.
const ELECTION_MAX: Duration = Duration::from_secs(10);
/// Some acknowledgement must come within this long after a leader kill.
const UNAVAILABLE_MAX: Duration = Duration::from_secs(8);
/// The longest time without any acknowledgement while a follower is down and rejoins (unless the
/// leadership changed meanwhile, see `FollowerKill::leadership_changed`).
const FOLLOWER_GAP_MAX: Duration = Duration::from_secs(2);
/// A restarted member must be serving and caught up within this long.
const SETTLE_MAX: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// What the load tasks share with the test (the load itself is in `common`).

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    acked: AtomicU64,
    /// Every acknowledgement, in the order the answers came: (request sent, answer received).
    acks: Mutex<Vec<(Instant, Instant)>>,
}

impl Shared {
    fn first_live_ack(&self, dead_at: Instant, stale_until: Instant) -> Option<Instant> {
        first_live_ack(&self.acks.lock().unwrap(), dead_at, stale_until)
    }
}

impl Ledger for Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn on_ack(&self, sent_at: Instant) {
        let mut acks = self.acks.lock().unwrap();
        // Taken under the lock, so the answer times are in order.
        acks.push((sent_at, Instant::now()));
        self.acked.fetch_add(1, Ordering::Relaxed);
    }
}

/// The first acknowledgement after a kill (whose process was reaped at `dead_at`) that a live
/// member must have given: of a request sent after `dead_at`, or any answered at or after
/// `stale_until` (earlier ones may be replies the dead member wrote before it died, read late).
/// `acks` is in the order of the answers.
fn first_live_ack(acks: &[(Instant, Instant)], dead_at: Instant, stale_until: Instant) -> Option<Instant> {
    let from = acks.partition_point(|&(_, at)| at <= dead_at);
    acks[from..].iter().find(|&&(sent, at)| sent > dead_at || at >= stale_until).map(|&(_, at)| at)
}

/// The longest time without an acknowledgement from `from` to `to`, counting from the last one
/// before `from` and up to the first one after `to` (or `to`, if none came).
fn max_gap(acks: &[(Instant, Instant)], from: Instant, to: Instant) -> Duration {
    let start = acks.partition_point(|&(_, at)| at < from);
    let end = acks.partition_point(|&(_, at)| at <= to);
    let mut prev = if start > 0 { acks[start - 1].1 } else { from };
    let mut gap = Duration::ZERO;
    for &(_, at) in &acks[start..end] {
        gap = gap.max(at.saturating_duration_since(prev));
        prev = at;
    }
    let last = acks.get(end).map_or(to, |&(_, at)| at);
    gap.max(last.saturating_duration_since(prev))
}

// ---------------------------------------------------------------------------------------------
// The test.

struct LeaderKill {
    node: usize,
    term: u64,
    killed_at: Instant,
    /// Kill to new leader seen by polling every survivor's status.
    elected_after: Duration,
    new_leader: usize,
    new_term: u64,
    /// Kill to the first acknowledgement a live member gave (see the module docs).
    unavailable: Duration,
    /// Restart to serving and caught up.
    catch_up: Duration,
}

struct FollowerKill {
    node: usize,
    leader: usize,
    term: u64,
    /// Who led once the follower had rejoined (the same, normally: see `leadership_changed`).
    leader_after: usize,
    term_after: u64,
    killed_at: Instant,
    down_for: Duration,
    /// Acknowledgements while the follower was down.
    acks_while_down: usize,
    catch_up: Duration,
    /// Until the follower had rejoined and caught up.
    settled_at: Instant,
}

impl FollowerKill {
    /// With pre-vote and check-quorum a follower's death and return cannot unseat the leader, but
    /// a leader that stalls for an election timeout (150-300 ms by default; a busy two-core
    /// machine can do that) is replaced all the same. Reported; not a failure by itself (the
    /// load's gap is then held to the leader-kill bound instead).
    fn leadership_changed(&self) -> bool {
        (self.leader_after, self.term_after) != (self.leader, self.term)
    }
}

/// min / median / max.
fn spread(mut ds: Vec<Duration>) -> String {
    if ds.is_empty() {
        return "-".into();
    }
    ds.sort();
    format!("min {} / median {} / max {}", ms(ds[0]), ms(ds[ds.len() / 2]), ms(ds[ds.len() - 1]))
}

fn env_number(name: &str, hex: bool) -> Option<u64> {
    let s = std::env::var(name).ok()?;
    let s = s.trim();
    let n = if hex { u64::from_str_radix(s.trim_start_matches("0x"), 16) } else { s.parse() };
    Some(n.unwrap_or_else(|_| panic!("{name}={s} is not a {} number", if hex { "hex" } else { "decimal" })))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_sigkill_of_leader_and_follower_loses_nothing_acknowledged() {
    let started = Instant::now();
    let seed = env_number("TRUBA_CLUSTER_KILL_SEED", true).unwrap_or(DEFAULT_SEED);
    let kills = env_number("TRUBA_CLUSTER_KILLS", false).map_or(KILLS, |n| n as usize);
    eprintln!("cluster_kill: seed {seed:#x} (replay the schedule with TRUBA_CLUSTER_KILL_SEED={seed:x}); {kills} kills per phase");
    let mut rng = XorShift::new(seed);
    let consensus = ConsensusConfig::default();
    // No survivor can be elected sooner after a kill (see the module docs).
    let stale_for = Duration::from_millis(consensus.election_timeout_ms_min.saturating_sub(consensus.heartbeat_ms));

    let mut cluster = Cluster::new(&CLUSTER);
    cluster.start_all();
    for i in 0..NODES {
        cluster.wait_accepting(i, Duration::from_secs(10)).await;
    }
    let (first_leader, first_term, _) = cluster.wait_settled(SETTLE_MAX).await;
    eprintln!(
        "cluster_kill: 3 members up at {} (dir {}); node {} leads in term {first_term} after {}",
        cluster.addrs_from(0).join(","),
        cluster.dir.as_ref().unwrap().path().display(),
        first_leader + 1,
        ms(started.elapsed())
    );

    let shared = Arc::new(Shared::default());
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| tokio::spawn(common::load(t, cluster.addrs_from(t % NODES), seed, shared.clone())))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while shared.acked.load(Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "the load did not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Phase A: the leader.
    let mut leader_kills: Vec<LeaderKill> = Vec::new();
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.range(300, 900))).await;
        let (leader, term, _) = cluster.wait_settled(SETTLE_MAX).await;
        let restart_after = Duration::from_millis(rng.range(100, 500));
        let killed_at = Instant::now();
        let status = cluster.nodes[leader].kill9();
        let dead_at = Instant::now();
        assert!(!status.success(), "leader kill {k}: node {} was not running any more ({status})", leader + 1);
        let (new_leader, new_term, elected_at) = cluster.wait_new_leader(leader, term, ELECTION_MAX).await;
        assert_ne!(new_leader, leader, "leader kill {k}: the dead member is reported as leader");
        assert!(new_term > term, "leader kill {k}: new leader in term {new_term}, not above {term}");
        // Restarted only once a survivor leads: the point is that the survivors take over.
        let restart_at = killed_at + restart_after;
        if let Some(wait) = restart_at.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        cluster.start(leader);
        let restarted_at = cluster.wait_accepting(leader, Duration::from_secs(10)).await;
        let stale_until = killed_at + stale_for;
        let first_ack = loop {
            if let Some(at) = shared.first_live_ack(dead_at, stale_until) {
                break at;
            }
            assert!(
                killed_at.elapsed() < UNAVAILABLE_MAX,
                "leader kill {k}: nothing acknowledged within {UNAVAILABLE_MAX:?} of killing node {}",
                leader + 1
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let (_, _, settled_at) = cluster.wait_settled(SETTLE_MAX).await;
        let kill = LeaderKill {
            node: leader,
            term,
            killed_at,
            elected_after: elected_at - killed_at,
            new_leader,
            new_term,
            unavailable: first_ack - killed_at,
            catch_up: settled_at - restarted_at,
        };
        eprintln!(
            "cluster_kill: leader kill {k}: node {} (term {}) killed at +{}; node {} leads in term {} after {} \
             (seen by polling); first acknowledgement after {}; restarted after {}, caught up {} later",
            kill.node + 1,
            kill.term,
            ms(kill.killed_at - started),
            kill.new_leader + 1,
            kill.new_term,
            ms(kill.elected_after),
            ms(kill.unavailable),
            ms(restarted_at - killed_at),
            ms(kill.catch_up)
        );
        leader_kills.push(kill);
    }

    // Phase B: a follower.
    let mut follower_kills: Vec<FollowerKill> = Vec::new();
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.range(300, 900))).await;
        let (leader, term, _) = cluster.wait_settled(SETTLE_MAX).await;
        let followers: Vec<usize> = (0..NODES).filter(|&i| i != leader).collect();
        let node = followers[rng.range(0, followers.len() as u64 - 1) as usize];
        let down_for = Duration::from_millis(rng.range(200, 800));
        let acked_before = shared.acked.load(Ordering::Relaxed);
        let killed_at = Instant::now();
        let status = cluster.nodes[node].kill9();
        assert!(!status.success(), "follower kill {k}: node {} was not running any more ({status})", node + 1);
        tokio::time::sleep(down_for.saturating_sub(killed_at.elapsed())).await;
        let acks_while_down = (shared.acked.load(Ordering::Relaxed) - acked_before) as usize;
        cluster.start(node);
        let restarted_at = cluster.wait_accepting(node, Duration::from_secs(10)).await;
        let (leader_after, term_after, settled_at) = cluster.wait_settled(SETTLE_MAX).await;
        let kill = FollowerKill {
            node,
            leader,
            term,
            leader_after,
            term_after,
            killed_at,
            down_for: restarted_at - killed_at,
            acks_while_down,
            catch_up: settled_at - restarted_at,
            settled_at,
        };
        eprintln!(
            "cluster_kill: follower kill {k}: node {} killed at +{} (node {} leads in term {term}); {} acknowledged while \
             it was down for {}; caught up {} after the restart; {}",
            kill.node + 1,
            ms(kill.killed_at - started),
            kill.leader + 1,
            kill.acks_while_down,
            ms(kill.down_for),
            ms(kill.catch_up),
            if kill.leadership_changed() {
                format!("LEADERSHIP CHANGED: node {} leads in term {}", leader_after + 1, term_after)
            } else {
                "leader and term unchanged".to_string()
            }
        );
        follower_kills.push(kill);
    }

    // The load must still be running, then it stops.
    let acked_now = shared.acked.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(shared.acked.load(Ordering::Relaxed) > acked_now, "nothing was acknowledged after the last restart");
    shared.stop.store(true, Ordering::Relaxed);
    let TaskReport { sessions: models, uncertain_creates, generated, not_sent, unknown, violations } =
        join_load(tasks).await;
    let load_done = Instant::now();

    // Figures.
    let acks = shared.acks.lock().unwrap().clone();
    let total_acked = acks.len() as u64;
    let follower_gaps: Vec<Duration> =
        follower_kills.iter().map(|f| max_gap(&acks, f.killed_at, f.settled_at)).collect();
    eprintln!(
        "cluster_kill: {total_acked} operations acknowledged, {unknown} with unknown outcome, {not_sent} never sent; \
         {} sessions opened, {} creations with unknown outcome; load ran {}",
        models.len(),
        uncertain_creates.len(),
        ms(load_done - started)
    );
    assert_load_clean(&violations);
    assert!(total_acked >= 500, "too little load to mean anything: {total_acked} operations acknowledged");

    // Every member converges on one state...
    let t = Instant::now();
    let (applied, hash, sts) = cluster.wait_converged(Duration::from_secs(30)).await;
    let converged_after = t.elapsed();
    eprintln!(
        "cluster_kill: all {NODES} members at applied index {applied}, state hash {hash:016x}, after {}:\n{}",
        ms(converged_after),
        cluster.show_statuses(&by_position(&sts))
    );

    // ... which holds every acknowledged operation and nothing else. Session reads are answered
    // by the leader only (read index; followers refuse them with NotLeader), so they go through a
    // pipe to every member; that the followers hold the same state is the equal state hash above.
    let pipe = connect(cluster.addrs_from(0)).await;
    let t = Instant::now();
    let (v, _, bad) = VERIFIER.verify(&pipe, &models, &uncertain_creates, &generated).await;
    eprintln!("cluster_kill: {v}, in {}", ms(t.elapsed()));
    assert_verified(&bad, "after the kills");
    assert!(v.sessions > 0);
    drop(pipe);
    // Reads changed nothing: the members still agree, on the same index and state.
    let (applied_after, hash_after, _) = cluster.wait_converged(Duration::from_secs(10)).await;
    assert_eq!((applied_after, hash_after), (applied, hash), "the state changed during the verification");

    // Graceful shutdown of every member.
    for i in 0..NODES {
        let status = cluster.nodes[i].terminate(Duration::from_secs(10)).await;
        let status = status.unwrap_or_else(|| panic!("node {} did not exit within 10 s of SIGTERM", i + 1));
        assert!(status.success(), "node {} exited with {status} after SIGTERM", i + 1);
    }

    // Summary.
    let unavailable: Vec<Duration> = leader_kills.iter().map(|k| k.unavailable).collect();
    let elections: Vec<Duration> = leader_kills.iter().map(|k| k.elected_after).collect();
    let max_follower_gap = follower_gaps.iter().copied().max().unwrap_or_default();
    let changed = follower_kills.iter().filter(|f| f.leadership_changed()).count();
    let catch_ups: Vec<Duration> =
        leader_kills.iter().map(|k| k.catch_up).chain(follower_kills.iter().map(|f| f.catch_up)).collect();
    eprintln!("cluster_kill: ===== summary (seed {seed:#x}) =====");
    eprintln!("cluster_kill: kills: {} of the leader, {} of a follower", leader_kills.len(), follower_kills.len());
    eprintln!(
        "cluster_kill: operations acknowledged: {total_acked} ({unknown} unknown outcome, {not_sent} never sent); \
         sessions verified: {} ({} deleted, {} records)",
        v.sessions, v.deleted, v.records_checked
    );
    eprintln!(
        "cluster_kill: unavailability per leader kill: [{}]; {}",
        unavailable.iter().map(|d| d.as_millis().to_string()).collect::<Vec<_>>().join(", ") + " ms",
        spread(unavailable.clone())
    );
    eprintln!(
        "cluster_kill: new leader seen after: {}; new terms: [{}]",
        spread(elections),
        leader_kills.iter().map(|k| format!("{}->{}", k.term, k.new_term)).collect::<Vec<_>>().join(", ")
    );
    eprintln!(
        "cluster_kill: largest ack gap during each follower kill: [{}]; max {}; leadership changed during {changed} of \
         {} follower kills",
        follower_gaps.iter().map(|d| d.as_millis().to_string()).collect::<Vec<_>>().join(", ") + " ms",
        ms(max_follower_gap),
        follower_kills.len()
    );
    eprintln!("cluster_kill: restart to caught up: {}", spread(catch_ups));
    eprintln!(
        "cluster_kill: state hashes agree: {hash:016x} at applied index {applied} on all {NODES} members; done in {}",
        ms(started.elapsed())
    );

    for (k, (f, gap)) in follower_kills.iter().zip(&follower_gaps).enumerate() {
        assert!(f.acks_while_down > 0, "follower kill {k}: nothing acknowledged while node {} was down", f.node + 1);
        let max = if f.leadership_changed() { UNAVAILABLE_MAX } else { FOLLOWER_GAP_MAX };
        assert!(
            *gap <= max,
            "follower kill {k}: the load stalled for {} while node {} was down or catching up (at most {} allowed)",
            ms(*gap),
            f.node + 1,
            ms(max)
        );
    }
}

/// The unavailability and gap measures, on made-up timelines.
#[test]
fn unavailability_skips_stale_replies_and_gaps_span_the_window() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    // (sent, answered): killed at 1000, reaped at 1001, survivors cannot lead before 1100.
    let acks = vec![
        (at(990), at(999)),
        (at(995), at(1003)),  // a reply written before the kill, read late: stale
        (at(1500), at(1500)), // sent before the kill? no: sent at 1500, certainly live
        (at(998), at(1600)),
    ];
    assert_eq!(first_live_ack(&acks, at(1001), at(1100)), Some(at(1500)));
    let retried = vec![(at(990), at(1003)), (at(995), at(1400)), (at(1450), at(1500))];
    assert_eq!(first_live_ack(&retried, at(1001), at(1100)), Some(at(1400)), "a retry answered by the new leader");
    assert_eq!(first_live_ack(&acks[..2], at(1001), at(1100)), None);

    let steady: Vec<_> = (0..100).map(|i| (at(i * 10), at(i * 10 + 1))).collect();
    assert_eq!(max_gap(&steady, at(200), at(500)), Duration::from_millis(10));
    let mut stalled = steady.clone();
    stalled.retain(|&(_, a)| a < at(300) || a > at(700));
    // From the last before the stall (291) to the first after it (701), past the window's end.
    assert_eq!(max_gap(&stalled, at(250), at(500)), Duration::from_millis(410));
    assert_eq!(max_gap(&[], at(0), at(100)), Duration::from_millis(100));
}
