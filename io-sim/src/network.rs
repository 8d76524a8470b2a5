//! The simulated network between the replicas of a cluster.
//!
//! The network carries discrete messages between replicas `0..n` in virtual time (microseconds).
//! It does not hold messages itself: [`SimNetwork::deliveries`] tells the caller at which
//! absolute times one message sent now arrives, and the caller schedules those arrivals in its
//! own event queue. The fault model, read from a scenario's `[faults.network]` table
//! ([`NetFaults`]), is:
//!
//! - **Delay.** Every message takes a one-way delay drawn from `delay_us`.
//! - **Order.** Each directed link is FIFO for ordinary messages, like a connection: an ordinary
//!   message never arrives before one sent earlier on the same link (arrival times on a link are
//!   strictly increasing, so the order does not depend on how the caller breaks ties). A latency
//!   spike (`spike_prob`) therefore also holds back the messages sent after it.
//! - **Reordering.** With `reorder_prob` a message gets an extra delay from `reorder_extra_us`
//!   and leaves the FIFO order, so later messages overtake it.
//! - **Loss and duplication.** With `loss_prob` a message is dropped; with `dup_prob` it arrives
//!   twice. The second copy has its own delay and is outside the FIFO order, like a
//!   retransmission that took another path.
//! - **Partitions** ([`Partition`]): a split into two groups, a one-way cut of one link, an
//!   isolated replica, or any of those switching on and off (flapping). A message sent across a
//!   cut is lost; messages already in flight are not affected.
//! - **Clogs.** A clogged directed link holds its messages until the clog ends; they are late,
//!   not lost.
//! - A message to oneself always arrives after the minimum delay and is never faulted.
//!
//! Partitions and clogs are installed by the caller ([`SimNetwork::partition_random`],
//! [`SimNetwork::clog_random`], [`SimNetwork::heal`]) at times it draws with the schedule
//! helpers, so the whole timeline stays in the caller's event loop.
//!
//! All randomness comes from the caller's [`ChaCha8Rng`] and all maps are ordered, so the same
//! seed and the same calls give the same results. Each message between two replicas draws the
//! same amount of random numbers in the same order whatever the fault settings and the outcome,
//! so changing one probability (or healing the network) does not shift the random stream of
//! everything that follows.

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Probabilities and ranges of network faults, read from a scenario file's `[faults.network]`
/// table. Ranges are inclusive `(min, max)` pairs; a range with `min > max` means `min`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetFaults {
    /// One-way delay of every message in microseconds.
    pub delay_us: (u64, u64),
    /// Probability that a message is dropped.
    pub loss_prob: f64,
    /// Probability that a message arrives twice, each copy with its own delay.
    pub dup_prob: f64,
    /// Probability that a message gets an extra delay from `reorder_extra_us`, so that later
    /// messages overtake it.
    pub reorder_prob: f64,
    /// Extra delay of a reordered message in microseconds.
    pub reorder_extra_us: (u64, u64),
    /// Probability of a latency spike on a message (it also holds back later messages on the
    /// same link).
    pub spike_prob: f64,
    /// Extra delay of a spike in microseconds.
    pub spike_us: (u64, u64),
    /// Time between the end of one partition and the start of the next, in milliseconds;
    /// `None` means no partitions.
    pub partition_every_ms: Option<(u64, u64)>,
    /// How long one partition lasts, in milliseconds.
    pub partition_for_ms: (u64, u64),
    /// Toggle period of a flapping partition, in milliseconds.
    pub flap_ms: (u64, u64),
    /// Time between two clogs of a random directed link, in milliseconds; `None` means no clogs.
    pub clog_every_ms: Option<(u64, u64)>,
    /// How long one clog lasts, in milliseconds.
    pub clog_for_ms: (u64, u64),
}

impl Default for NetFaults {
    fn default() -> Self {
        NetFaults {
            delay_us: (50, 400),
            loss_prob: 0.0,
            dup_prob: 0.0,
            reorder_prob: 0.0,
            reorder_extra_us: (1_000, 20_000),
            spike_prob: 0.0,
            spike_us: (20_000, 200_000),
            partition_every_ms: None,
            partition_for_ms: (200, 3_000),
            flap_ms: (20, 200),
            clog_every_ms: None,
            clog_for_ms: (100, 2_000),
        }
    }
}

impl NetFaults {
    /// The same network without faults: delays and ranges are kept, every fault probability is
    /// zero and no partition or clog is ever scheduled. The liveness phase of a run uses this.
    pub fn healed(&self) -> NetFaults {
        NetFaults {
            loss_prob: 0.0,
            dup_prob: 0.0,
            reorder_prob: 0.0,
            spike_prob: 0.0,
            partition_every_ms: None,
            clog_every_ms: None,
            ..self.clone()
        }
    }
}

/// The shape of a partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Partition {
    /// Two groups that cannot talk to each other in either direction (covers majority/minority
    /// splits). `side` is one group; every other replica is in the other.
    Split { side: BTreeSet<usize> },
    /// Messages from `from` to `to` are dropped; the other direction works.
    OneWay { from: usize, to: usize },
    /// One replica cut off from all others both ways.
    Isolate { replica: usize },
    /// `inner` switches on and off every `period_us` starting at `since_us` (on during even
    /// periods, off before `since_us`).
    Flapping { inner: Box<Partition>, period_us: u64, since_us: u64 },
}

impl Partition {
    /// Whether this partition cuts the link `from -> to` at `now_us`. A replica is never cut
    /// from itself.
    pub fn cuts(&self, from: usize, to: usize, now_us: u64) -> bool {
        if from == to {
            return false;
        }
        match self {
            Partition::Split { side } => side.contains(&from) != side.contains(&to),
            Partition::OneWay { from: f, to: t } => *f == from && *t == to,
            Partition::Isolate { replica } => from == *replica || to == *replica,
            Partition::Flapping { inner, period_us, since_us } => {
                flap_is_on(*period_us, *since_us, now_us) && inner.cuts(from, to, now_us)
            }
        }
    }

    /// A short description for the history, without the "partition: " prefix, e.g.
    /// "{0,3} | {1,2,4}", "one-way 2->0", "isolate 1" or "flapping every 40 ms (isolate 1)".
    /// `replicas` is needed to list the other side of a split.
    pub fn describe(&self, replicas: usize) -> String {
        match self {
            Partition::Split { side } => {
                let other: BTreeSet<usize> = (0..replicas).filter(|r| !side.contains(r)).collect();
                format!("{} | {}", set_text(side), set_text(&other))
            }
            Partition::OneWay { from, to } => format!("one-way {from}->{to}"),
            Partition::Isolate { replica } => format!("isolate {replica}"),
            Partition::Flapping { inner, period_us, .. } => {
                format!("flapping every {} ({})", duration_text(*period_us), inner.describe(replicas))
            }
        }
    }
}

/// Whether a flapping partition is on: off before it starts, then on during even periods. A zero
/// period is treated as one microsecond so that a hand-written scenario cannot divide by zero.
fn flap_is_on(period_us: u64, since_us: u64, now_us: u64) -> bool {
    now_us >= since_us && ((now_us - since_us) / period_us.max(1)) & 1 == 0
}

/// "{0,3}" for a set of replicas.
fn set_text(set: &BTreeSet<usize>) -> String {
    let items: Vec<String> = set.iter().map(|r| r.to_string()).collect();
    format!("{{{}}}", items.join(","))
}

/// "40 ms" for whole milliseconds, "1500 us" otherwise.
fn duration_text(us: u64) -> String {
    let (ms, rest) = (us / 1000, us % 1000);
    if rest == 0 {
        format!("{ms} ms")
    } else {
        format!("{us} us")
    }
}

/// Counters of what the network did and which faults it injected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Messages handed to [`SimNetwork::deliveries`], self-sends included.
    pub sent: u64,
    /// Arrivals scheduled (a duplicated message counts twice).
    pub delivered: u64,
    /// Messages dropped, by random loss or by a partition.
    pub lost: u64,
    /// Of the lost messages, those dropped by a partition.
    pub cut: u64,
    /// Messages that arrive twice.
    pub duplicated: u64,
    /// Arrivals that got the reordering extra delay.
    pub reordered: u64,
    /// Messages held back by a clogged link.
    pub held: u64,
    /// Partitions installed by [`SimNetwork::partition_random`].
    pub partitions: u64,
    /// Clogs installed by [`SimNetwork::clog_random`].
    pub clogs: u64,
}

/// The random numbers one message between two replicas uses, drawn all at once and always in
/// the same order so that the random stream does not depend on the fault settings.
struct MessageDraws {
    lose: bool,
    duplicate: bool,
    copies: [CopyDraws; 2],
}

/// The random numbers of one copy of a message.
struct CopyDraws {
    delay_us: u64,
    reorder_us: Option<u64>,
    spike_us: Option<u64>,
}

impl MessageDraws {
    fn draw(faults: &NetFaults, rng: &mut ChaCha8Rng) -> MessageDraws {
        let lose = roll(rng, faults.loss_prob);
        let duplicate = roll(rng, faults.dup_prob);
        let first = CopyDraws::draw(faults, rng);
        let second = CopyDraws::draw(faults, rng);
        MessageDraws { lose, duplicate, copies: [first, second] }
    }
}

impl CopyDraws {
    fn draw(faults: &NetFaults, rng: &mut ChaCha8Rng) -> CopyDraws {
        let delay_us = draw_range(rng, faults.delay_us);
        let reorder = roll(rng, faults.reorder_prob);
        let reorder_us = draw_range(rng, faults.reorder_extra_us);
        let spike = roll(rng, faults.spike_prob);
        let spike_us = draw_range(rng, faults.spike_us);
        CopyDraws { delay_us, reorder_us: reorder.then_some(reorder_us), spike_us: spike.then_some(spike_us) }
    }

    /// Total time this copy spends on the wire after it may leave (after any clog).
    fn flight_us(&self) -> u64 {
        self.delay_us.saturating_add(self.reorder_us.unwrap_or(0)).saturating_add(self.spike_us.unwrap_or(0))
    }
}

/// True with probability `p`. It always draws exactly one number (unlike `gen_bool`, which
/// draws none for `p == 1.0`), which keeps the random stream independent of the settings; a
/// probability outside `[0, 1]` acts as the nearest bound and NaN as zero, without panicking.
fn roll(rng: &mut ChaCha8Rng, p: f64) -> bool {
    rng.gen::<f64>() < p
}

/// A uniform draw from an inclusive range; `min > max` means `min`.
fn draw_range(rng: &mut ChaCha8Rng, (min, max): (u64, u64)) -> u64 {
    rng.gen_range(min..=max.max(min))
}

/// A uniform draw from an inclusive range of milliseconds, in microseconds.
fn draw_ms_as_us(rng: &mut ChaCha8Rng, range: (u64, u64)) -> u64 {
    draw_range(rng, range).saturating_mul(1000)
}

/// The simulated network of one cluster.
#[derive(Clone, Debug)]
pub struct SimNetwork {
    replicas: usize,
    faults: NetFaults,
    partition: Option<Partition>,
    /// Clogged directed links and the time their clog ends.
    clogs: BTreeMap<(usize, usize), u64>,
    /// Per directed link, the arrival time of the last ordinary (in-order) message, which the
    /// next one must come strictly after.
    last_arrival: BTreeMap<(usize, usize), u64>,
    stats: NetStats,
}

impl SimNetwork {
    /// A healthy network between `replicas` replicas with the given fault settings.
    pub fn new(replicas: usize, faults: NetFaults) -> SimNetwork {
        SimNetwork {
            replicas,
            faults,
            partition: None,
            clogs: BTreeMap::new(),
            last_arrival: BTreeMap::new(),
            stats: NetStats::default(),
        }
    }

    /// The number of replicas.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// The current fault settings.
    pub fn faults(&self) -> &NetFaults {
        &self.faults
    }

    /// Replaces the fault settings for messages sent from now on. The current partition and
    /// clogs stay; [`SimNetwork::heal`] removes them.
    pub fn set_faults(&mut self, faults: NetFaults) {
        self.faults = faults;
    }

    /// Arrival times (absolute, microseconds) of one message sent now from `from` to `to`:
    /// empty if it is lost (random loss or partition), one entry normally, two if duplicated. A
    /// message to self is delivered after the minimum delay and never faulted. A clogged link
    /// holds the message: it arrives at the clog end plus its normal delay.
    pub fn deliveries(&mut self, from: usize, to: usize, now_us: u64, rng: &mut ChaCha8Rng) -> Vec<u64> {
        self.stats.sent += 1;
        if from == to {
            self.stats.delivered += 1;
            return vec![now_us.saturating_add(self.faults.delay_us.0)];
        }
        // Draw before deciding anything, so that a cut or lost message uses the same random
        // numbers as a delivered one.
        let draws = MessageDraws::draw(&self.faults, rng);
        if self.is_cut(from, to, now_us) {
            self.stats.lost += 1;
            self.stats.cut += 1;
            return Vec::new();
        }
        if draws.lose {
            self.stats.lost += 1;
            return Vec::new();
        }
        let leave_us = self.leave_time(from, to, now_us);
        let mut arrivals = vec![self.first_arrival(from, to, leave_us, &draws.copies[0])];
        if draws.duplicate {
            self.stats.duplicated += 1;
            arrivals.push(self.extra_arrival(leave_us, &draws.copies[1]));
        }
        self.stats.delivered += arrivals.len() as u64;
        arrivals
    }

    /// When a message sent now may leave: now, or the end of the clog of its link. Clogs that
    /// have ended are forgotten here.
    fn leave_time(&mut self, from: usize, to: usize, now_us: u64) -> u64 {
        match self.clogs.get(&(from, to)) {
            Some(&until_us) if until_us > now_us => {
                self.stats.held += 1;
                until_us
            }
            Some(_) => {
                self.clogs.remove(&(from, to));
                now_us
            }
            None => now_us,
        }
    }

    /// Arrival of the first copy. An ordinary copy keeps the link FIFO: it arrives strictly
    /// after the previous ordinary message of the link and becomes the new mark. A reordered
    /// copy is outside the order and leaves the mark alone, so that later messages overtake it.
    fn first_arrival(&mut self, from: usize, to: usize, leave_us: u64, copy: &CopyDraws) -> u64 {
        let arrival = leave_us.saturating_add(copy.flight_us());
        if copy.reorder_us.is_some() {
            self.stats.reordered += 1;
            return arrival;
        }
        let mark = self.last_arrival.entry((from, to)).or_insert(0);
        let arrival = arrival.max(mark.saturating_add(1));
        *mark = arrival;
        arrival
    }

    /// Arrival of the duplicate, which is outside the FIFO order like a reordered message.
    fn extra_arrival(&mut self, leave_us: u64, copy: &CopyDraws) -> u64 {
        if copy.reorder_us.is_some() {
            self.stats.reordered += 1;
        }
        leave_us.saturating_add(copy.flight_us())
    }

    /// Whether the link `from -> to` is cut at this moment by the partition (a flapping one is
    /// evaluated at `now_us`). Clogs do not count: they delay, they do not cut.
    pub fn is_cut(&self, from: usize, to: usize, now_us: u64) -> bool {
        self.partition.as_ref().is_some_and(|p| p.cuts(from, to, now_us))
    }

    /// Whether the link `from -> to` is clogged at `now_us`.
    pub fn is_clogged(&self, from: usize, to: usize, now_us: u64) -> bool {
        self.clogs.get(&(from, to)).is_some_and(|&until_us| until_us > now_us)
    }

    /// Draws a partition shape uniformly among a majority/minority split, a split into two
    /// random non-empty groups, a one-way cut of a random link, an isolated replica and a
    /// flapping version of one of those four; installs it (replacing any current partition) and
    /// returns a one-line description for the history. With fewer than two replicas there is
    /// nothing to cut: it does nothing and returns `None`.
    pub fn partition_random(&mut self, now_us: u64, rng: &mut ChaCha8Rng) -> Option<String> {
        if self.replicas < 2 {
            return None;
        }
        let draws = ShapeDraws::draw(self.replicas, &self.faults, rng);
        let partition = match draws.kind {
            4 => Partition::Flapping {
                inner: Box::new(draws.simple_shape(draws.flap_inner_kind)),
                period_us: draws.flap_period_us,
                since_us: now_us,
            },
            kind => draws.simple_shape(kind),
        };
        let text = format!("partition: {}", partition.describe(self.replicas));
        self.partition = Some(partition);
        self.stats.partitions += 1;
        Some(text)
    }

    /// Installs a partition, or removes it with `None`. Clogs are not touched.
    pub fn set_partition(&mut self, p: Option<Partition>) {
        self.partition = p;
    }

    /// The current partition, if any.
    pub fn partition(&self) -> Option<&Partition> {
        self.partition.as_ref()
    }

    /// Clogs a random directed link until `now_us` plus a duration drawn from `clog_for_ms`
    /// (extending a clog already there) and returns a description for the history. With fewer
    /// than two replicas there is no link: it does nothing and returns `None`.
    pub fn clog_random(&mut self, now_us: u64, rng: &mut ChaCha8Rng) -> Option<String> {
        if self.replicas < 2 {
            return None;
        }
        let from = rng.gen_range(0..self.replicas);
        // Draw the destination among the other replicas so that a replica never clogs itself.
        let mut to = rng.gen_range(0..self.replicas - 1);
        if to >= from {
            to += 1;
        }
        let for_us = draw_ms_as_us(rng, self.faults.clog_for_ms);
        let until_us = now_us.saturating_add(for_us);
        let entry = self.clogs.entry((from, to)).or_insert(0);
        *entry = (*entry).max(until_us);
        self.stats.clogs += 1;
        Some(format!("clog {from}->{to} for {}", duration_text(for_us)))
    }

    /// Removes the partition and all clogs (the liveness phase). Messages already in flight keep
    /// their arrival times.
    pub fn heal(&mut self) {
        self.partition = None;
        self.clogs.clear();
    }

    /// Counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Time until the next partition starts, drawn from `partition_every_ms`; `None` if
    /// partitions are off.
    pub fn draw_partition_gap_us(&self, rng: &mut ChaCha8Rng) -> Option<u64> {
        self.faults.partition_every_ms.map(|range| draw_ms_as_us(rng, range))
    }

    /// How long a partition lasts, drawn from `partition_for_ms`.
    pub fn draw_partition_length_us(&self, rng: &mut ChaCha8Rng) -> u64 {
        draw_ms_as_us(rng, self.faults.partition_for_ms)
    }

    /// Time until the next clog, drawn from `clog_every_ms`; `None` if clogs are off.
    pub fn draw_clog_gap_us(&self, rng: &mut ChaCha8Rng) -> Option<u64> {
        self.faults.clog_every_ms.map(|range| draw_ms_as_us(rng, range))
    }
}

/// The random numbers of one [`SimNetwork::partition_random`], drawn all at once and in a fixed
/// order whatever shape is chosen.
struct ShapeDraws {
    replicas: usize,
    /// 0: majority/minority, 1: random groups, 2: one-way, 3: isolate, 4: flapping.
    kind: u32,
    /// The shape a flapping partition wraps (0..=3 as above).
    flap_inner_kind: u32,
    /// The replicas in random order; shapes take the replicas they need from the front.
    order: Vec<usize>,
    /// Size of the minority of a majority/minority split.
    minority: usize,
    /// Group membership of each replica for a split into random groups.
    coin: Vec<bool>,
    flap_period_us: u64,
}

impl ShapeDraws {
    /// Needs `replicas >= 2`.
    fn draw(replicas: usize, faults: &NetFaults, rng: &mut ChaCha8Rng) -> ShapeDraws {
        let kind = rng.gen_range(0..5);
        let flap_inner_kind = rng.gen_range(0..4);
        let order = shuffled(replicas, rng);
        let minority = rng.gen_range(1..=replicas / 2);
        let coin = (0..replicas).map(|_| rng.gen::<bool>()).collect();
        let flap_period_us = draw_ms_as_us(rng, faults.flap_ms);
        ShapeDraws { replicas, kind, flap_inner_kind, order, minority, coin, flap_period_us }
    }

    fn simple_shape(&self, kind: u32) -> Partition {
        match kind {
            0 => Partition::Split { side: self.order[..self.minority].iter().copied().collect() },
            1 => Partition::Split { side: self.random_group() },
            2 => Partition::OneWay { from: self.order[0], to: self.order[1] },
            _ => Partition::Isolate { replica: self.order[0] },
        }
    }

    /// The replicas whose coin came up true, moving the first replica of the random order in or
    /// out when needed so that neither group is empty.
    fn random_group(&self) -> BTreeSet<usize> {
        let mut side: BTreeSet<usize> = (0..self.replicas).filter(|&r| self.coin[r]).collect();
        if side.is_empty() {
            side.insert(self.order[0]);
        } else if side.len() == self.replicas {
            side.remove(&self.order[0]);
        }
        side
    }
}

/// `0..n` in a uniformly random order (Fisher-Yates).
fn shuffled(n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.gen_range(0..=i);
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// Every fault at once, so that a test exercising all paths has something to exercise.
    fn stormy() -> NetFaults {
        NetFaults {
            loss_prob: 0.1,
            dup_prob: 0.1,
            reorder_prob: 0.1,
            spike_prob: 0.05,
            partition_every_ms: Some((10, 100)),
            clog_every_ms: Some((10, 100)),
            ..NetFaults::default()
        }
    }

    fn split(side: &[usize]) -> Partition {
        Partition::Split { side: side.iter().copied().collect() }
    }

    /// A run of sends with partitions and clogs mixed in, returning everything observable.
    fn run(seed: u64) -> (Vec<Vec<u64>>, Vec<Option<String>>, NetStats) {
        let mut r = rng(seed);
        let mut net = SimNetwork::new(5, stormy());
        let (mut arrivals, mut events) = (Vec::new(), Vec::new());
        for i in 0..1000u64 {
            let now = i * 500;
            if i % 97 == 0 {
                events.push(net.partition_random(now, &mut r));
            }
            if i % 61 == 0 {
                events.push(net.clog_random(now, &mut r));
            }
            if i % 250 == 0 {
                net.heal();
            }
            let (from, to) = (r.gen_range(0..5), r.gen_range(0..5));
            arrivals.push(net.deliveries(from, to, now, &mut r));
        }
        (arrivals, events, net.stats())
    }

    #[test]
    fn same_seed_gives_same_deliveries() {
        let (a, b) = (run(7), run(7));
        assert_eq!(a, b);
        assert_eq!(a.2.sent, 1000);
        assert!(a.2.lost > 0 && a.2.duplicated > 0 && a.2.reordered > 0, "{:?}", a.2);
        assert_ne!(a.0, run(8).0, "a different seed should give a different run");
    }

    #[test]
    fn random_stream_does_not_depend_on_the_settings() {
        let mut quiet_rng = rng(3);
        let mut stormy_rng = rng(3);
        let mut quiet = SimNetwork::new(3, NetFaults::default());
        let mut noisy = SimNetwork::new(3, NetFaults { loss_prob: 1.0, dup_prob: 1.0, ..stormy() });
        noisy.set_partition(Some(Partition::Isolate { replica: 0 }));
        for i in 0..100 {
            quiet.deliveries(0, 1 + i % 2, i as u64, &mut quiet_rng);
            noisy.deliveries(0, 1 + i % 2, i as u64, &mut stormy_rng);
        }
        assert_eq!(quiet_rng.gen::<u64>(), stormy_rng.gen::<u64>());
    }

    #[test]
    fn delays_stay_in_range_and_links_are_fifo() {
        let mut r = rng(1);
        let mut net = SimNetwork::new(2, NetFaults::default());
        let mut last = 0;
        for now in 0..2000u64 {
            let got = net.deliveries(0, 1, now, &mut r);
            assert_eq!(got.len(), 1);
            assert!(got[0] >= now + 50, "arrived before the minimum delay");
            assert!(got[0] > last, "an ordinary message overtook an earlier one");
            last = got[0];
        }
    }

    #[test]
    fn reordered_messages_are_overtaken() {
        let mut r = rng(2);
        let mut net = SimNetwork::new(2, NetFaults { reorder_prob: 1.0, ..NetFaults::default() });
        let first = net.deliveries(0, 1, 0, &mut r)[0];
        net.set_faults(NetFaults::default());
        let second = net.deliveries(0, 1, 10, &mut r)[0];
        assert!(first >= 1_050, "a reordered message gets the extra delay");
        assert!(second < first, "a later ordinary message overtakes the reordered one");
        assert_eq!(net.stats().reordered, 1);
    }

    #[test]
    fn loss_one_loses_everything() {
        let mut r = rng(4);
        let mut net = SimNetwork::new(3, NetFaults { loss_prob: 1.0, ..NetFaults::default() });
        for i in 0..200 {
            assert!(net.deliveries(i % 3, (i + 1) % 3, i as u64, &mut r).is_empty());
        }
        let stats = net.stats();
        assert_eq!((stats.sent, stats.lost, stats.delivered, stats.cut), (200, 200, 0, 0));
    }

    #[test]
    fn dup_one_gives_two_arrivals() {
        let mut r = rng(5);
        let mut net = SimNetwork::new(2, NetFaults { dup_prob: 1.0, ..NetFaults::default() });
        for now in 0..200 {
            let got = net.deliveries(1, 0, now, &mut r);
            assert_eq!(got.len(), 2);
            assert!(got.iter().all(|&t| t >= now + 50));
        }
        assert_eq!((net.stats().duplicated, net.stats().delivered), (200, 400));
    }

    #[test]
    fn split_cuts_across_sides_both_ways_only() {
        let mut net = SimNetwork::new(5, NetFaults::default());
        net.set_partition(Some(split(&[0, 3])));
        assert!(net.is_cut(0, 1, 0) && net.is_cut(1, 0, 0));
        assert!(net.is_cut(3, 4, 0) && net.is_cut(4, 3, 0));
        assert!(!net.is_cut(0, 3, 0) && !net.is_cut(3, 0, 0));
        assert!(!net.is_cut(1, 2, 0) && !net.is_cut(4, 1, 0));
        let mut r = rng(6);
        assert!(net.deliveries(1, 3, 0, &mut r).is_empty());
        assert_eq!(net.deliveries(2, 4, 0, &mut r).len(), 1);
        assert_eq!(net.stats().cut, 1);
    }

    #[test]
    fn one_way_cuts_one_direction() {
        let mut net = SimNetwork::new(3, NetFaults::default());
        net.set_partition(Some(Partition::OneWay { from: 2, to: 0 }));
        assert!(net.is_cut(2, 0, 0));
        assert!(!net.is_cut(0, 2, 0));
        assert!(!net.is_cut(2, 1, 0) && !net.is_cut(1, 0, 0));
        let mut r = rng(7);
        assert!(net.deliveries(2, 0, 0, &mut r).is_empty());
        assert_eq!(net.deliveries(0, 2, 0, &mut r).len(), 1);
    }

    #[test]
    fn isolate_cuts_one_replica_from_all() {
        let mut net = SimNetwork::new(4, NetFaults::default());
        net.set_partition(Some(Partition::Isolate { replica: 1 }));
        for other in [0, 2, 3] {
            assert!(net.is_cut(1, other, 0) && net.is_cut(other, 1, 0));
        }
        assert!(!net.is_cut(0, 2, 0) && !net.is_cut(3, 0, 0));
        assert!(!net.is_cut(1, 1, 0));
    }

    #[test]
    fn flapping_alternates() {
        let mut net = SimNetwork::new(3, NetFaults::default());
        let inner = Box::new(Partition::Isolate { replica: 0 });
        net.set_partition(Some(Partition::Flapping { inner, period_us: 1_000, since_us: 5_000 }));
        assert!(!net.is_cut(0, 1, 4_999), "off before it starts");
        assert!(net.is_cut(0, 1, 5_000) && net.is_cut(1, 0, 5_999), "on in period 0");
        assert!(!net.is_cut(0, 1, 6_000) && !net.is_cut(0, 1, 6_999), "off in period 1");
        assert!(net.is_cut(0, 1, 7_000), "on in period 2");
        assert!(!net.is_cut(1, 2, 5_000), "only the inner shape is cut");
    }

    #[test]
    fn flapping_with_zero_period_does_not_panic() {
        let p = Partition::Flapping { inner: Box::new(split(&[0])), period_us: 0, since_us: 0 };
        assert!(p.cuts(0, 1, 0));
        assert!(!p.cuts(0, 1, 1));
    }

    #[test]
    fn clog_holds_then_delivers_after_its_end() {
        let mut r = rng(8);
        let mut net = SimNetwork::new(2, NetFaults { clog_for_ms: (100, 100), ..NetFaults::default() });
        let text = net.clog_random(1_000, &mut r).expect("two replicas have links");
        let (from, to) = if text.starts_with("clog 0->1") { (0, 1) } else { (1, 0) };
        assert_eq!(text, format!("clog {from}->{to} for 100 ms"));
        assert!(net.is_clogged(from, to, 100_999) && !net.is_clogged(to, from, 2_000));
        let held = net.deliveries(from, to, 2_000, &mut r);
        assert_eq!(held.len(), 1, "a clog delays, it does not lose");
        assert!(held[0] >= 101_000 + 50 && held[0] <= 101_000 + 400, "{held:?}");
        let other = net.deliveries(to, from, 2_000, &mut r);
        assert!(other[0] <= 2_400, "the other direction is not clogged");
        let after = net.deliveries(from, to, 101_000, &mut r);
        // The clog has ended, so the message leaves at once, but still after the held one.
        assert!(after[0] > held[0] && after[0] <= 101_000 + 401, "{after:?}");
        assert!(!net.is_clogged(from, to, 101_000));
        assert_eq!(net.stats().held, 1);
    }

    #[test]
    fn heal_clears_partition_and_clogs() {
        let mut r = rng(9);
        let mut net = SimNetwork::new(3, NetFaults { clog_for_ms: (1_000, 1_000), ..NetFaults::default() });
        net.set_partition(Some(Partition::Isolate { replica: 2 }));
        net.clog_random(0, &mut r);
        assert!(net.is_cut(2, 0, 0));
        net.heal();
        assert!(net.partition().is_none());
        for from in 0..3 {
            for to in 0..3 {
                assert!(!net.is_cut(from, to, 0) && !net.is_clogged(from, to, 0));
                let got = net.deliveries(from, to, 10, &mut r);
                assert!(got.len() == 1 && got[0] <= 410, "{from}->{to}: {got:?}");
            }
        }
    }

    #[test]
    fn healed_faults_keep_delays_and_drop_faults() {
        let faults = NetFaults { delay_us: (10, 20), ..stormy() };
        let healed = faults.healed();
        assert_eq!(healed.delay_us, (10, 20));
        assert_eq!((healed.loss_prob, healed.dup_prob, healed.reorder_prob, healed.spike_prob), (0.0, 0.0, 0.0, 0.0));
        assert_eq!((healed.partition_every_ms, healed.clog_every_ms), (None, None));
    }

    #[test]
    fn random_partitions_cover_every_shape() {
        let mut r = rng(10);
        let mut net = SimNetwork::new(5, NetFaults::default());
        let mut seen = BTreeSet::new();
        for _ in 0..500 {
            let text = net.partition_random(0, &mut r).expect("five replicas can be partitioned");
            let p = net.partition().expect("installed").clone();
            check_shape(&p, 5);
            seen.insert(shape_name(&p, &text));
        }
        let all = ["flapping", "isolate", "minority", "one-way", "random groups"];
        assert_eq!(seen, all.into_iter().collect());
        assert_eq!(net.stats().partitions, 500);
    }

    #[test]
    fn minority_splits_are_minorities() {
        let mut r = rng(13);
        for n in 2..8 {
            for _ in 0..50 {
                let draws = ShapeDraws::draw(n, &NetFaults::default(), &mut r);
                let Partition::Split { side } = draws.simple_shape(0) else { panic!("kind 0 is a split") };
                assert!((1..=n / 2).contains(&side.len()), "n={n}: {side:?}");
                check_shape(&draws.simple_shape(1), n);
            }
        }
    }

    /// Checks that a drawn shape is valid: splits have two non-empty sides, replicas exist.
    fn check_shape(p: &Partition, n: usize) {
        match p {
            Partition::Split { side } => {
                assert!(!side.is_empty() && side.len() < n && side.iter().all(|&r| r < n), "{side:?}")
            }
            Partition::OneWay { from, to } => assert!(from != to && *from < n && *to < n),
            Partition::Isolate { replica } => assert!(*replica < n),
            Partition::Flapping { inner, period_us, .. } => {
                assert!((20_000..=200_000).contains(period_us));
                assert!(!matches!(**inner, Partition::Flapping { .. }));
                check_shape(inner, n);
            }
        }
    }

    /// Which of the five kinds a shape is. A split whose side is larger than half the cluster
    /// can only come from the random groups; a small one could be either, so it counts as a
    /// minority split.
    fn shape_name(p: &Partition, text: &str) -> &'static str {
        assert!(text.starts_with("partition: "), "{text}");
        match p {
            Partition::Split { side } if side.len() > 2 => "random groups",
            Partition::Split { .. } => "minority",
            Partition::OneWay { .. } => "one-way",
            Partition::Isolate { .. } => "isolate",
            Partition::Flapping { .. } => "flapping",
        }
    }

    #[test]
    fn descriptions_read_well() {
        assert_eq!(split(&[0, 3]).describe(5), "{0,3} | {1,2,4}");
        assert_eq!(Partition::OneWay { from: 2, to: 0 }.describe(3), "one-way 2->0");
        let inner = Box::new(Partition::Isolate { replica: 1 });
        let flap = Partition::Flapping { inner, period_us: 40_000, since_us: 0 };
        assert_eq!(flap.describe(3), "flapping every 40 ms (isolate 1)");
    }

    #[test]
    fn self_sends_are_never_faulted() {
        let mut r = rng(11);
        let faults = NetFaults { loss_prob: 1.0, spike_prob: 1.0, reorder_prob: 1.0, dup_prob: 1.0, ..stormy() };
        let mut net = SimNetwork::new(3, faults);
        net.set_partition(Some(Partition::Isolate { replica: 1 }));
        net.clog_random(0, &mut r);
        for now in 0..100 {
            assert_eq!(net.deliveries(1, 1, now, &mut r), vec![now + 50]);
        }
        assert!(!net.is_cut(1, 1, 0));
        assert_eq!((net.stats().lost, net.stats().delivered), (0, 100));
    }

    #[test]
    fn single_replica_and_bad_settings_do_not_panic() {
        let mut r = rng(12);
        let bad = NetFaults {
            delay_us: (500, 100),
            loss_prob: f64::NAN,
            dup_prob: -1.0,
            reorder_prob: 2.0,
            spike_us: (u64::MAX, 0),
            flap_ms: (10, 0),
            clog_for_ms: (u64::MAX, 0),
            ..NetFaults::default()
        };
        let mut one = SimNetwork::new(1, bad.clone());
        assert_eq!(one.partition_random(0, &mut r), None);
        assert_eq!(one.clog_random(0, &mut r), None);
        assert_eq!(one.deliveries(0, 0, 7, &mut r), vec![507]);
        let mut none = SimNetwork::new(0, bad.clone());
        assert_eq!(none.partition_random(0, &mut r), None);
        let mut two = SimNetwork::new(2, NetFaults { spike_prob: 1.0, ..bad });
        assert!(two.clog_random(u64::MAX - 5, &mut r).is_some());
        let got = two.deliveries(0, 1, u64::MAX - 5, &mut r);
        assert_eq!(got.len(), 1, "NaN loss means no loss, negative dup means no dup");
        assert!(two.partition_random(0, &mut r).is_some());
    }

    #[test]
    fn parses_from_a_scenario_table() {
        let text = "delay_us = [10, 20]\nloss_prob = 0.01\npartition_every_ms = [500, 5000]\n";
        let faults: NetFaults = toml::from_str(text).expect("valid table");
        assert_eq!(faults.delay_us, (10, 20));
        assert_eq!(faults.partition_every_ms, Some((500, 5_000)));
        assert_eq!(faults.clog_for_ms, NetFaults::default().clog_for_ms);
        assert!(toml::from_str::<NetFaults>("los_prob = 0.1").is_err(), "typos are refused");
    }
}
