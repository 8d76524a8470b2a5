//! Recovery: rebuild the state from what the data directory holds, deciding what is a torn
//! write (cut off, after keeping a copy of the discarded bytes) and what is corruption (never
//! cut: the replica stops with a clear error).
//!
//! Recovery runs one disk operation at a time: list, read the newest snapshot, read each
//! segment in order, then carry out the repairs. A torn tail is recognised by its shape (the
//! file ends inside a record), which no flipped bit can fake. A damaged record is read again, and
//! corruption is only declared once two consecutive reads return the same bytes, so a bit flipped
//! on the way from the disk is not mistaken for damage on it; and even then nothing is cut: the
//! replica stops, and a restart reads again.

use crate::codec::{
    content_end, decode_snapshot, parse_segment_name, parse_snapshot_name, scan_segment, ScanEnd, SegmentScan,
    RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use crate::error::{DamageFound, Fatal};
use crate::hardstate::{self, Copies, HardState, HARD_STATE_FILE};
use crate::io::{DiskError, IoOp, IoReply};
use crate::ledger::{LedgerRecovered, LedgerScan, ScanStep};
use crate::log::{Loc, Log};
use crate::op::Entry;
use crate::sessions::StateMachine;
use crate::stored::parse_source_name;
use crate::types::{Index, SourceId, Term};
use std::collections::VecDeque;

pub(crate) enum Step {
    Io(IoOp),
    Done(Box<Recovered>),
    Fatal(Fatal),
}

/// What the disk held: the snapshot's state (nothing after it is applied: which entries are
/// committed is for consensus to find out), the log after it, and the hard state.
pub(crate) struct Recovered {
    pub state: StateMachine,
    pub log: Log,
    pub hard: HardState,
    /// A copy of the hard state was damaged: both are written again.
    pub hard_rewrite: bool,
    /// The hard state file is in the current layout, so it is overwritten in place.
    pub hard_in_place: bool,
    /// What recovery found damaged and repaired from peers (or will), for the operator.
    pub damage_found: Vec<DamageFound>,
    pub torn_bytes: u64,
    pub snapshot: Index,
    pub snapshots: Vec<String>,
    /// Source files found (see `stored.rs`).
    pub sources: Vec<SourceId>,
    /// The ledger as found, cut back to its last whole record (see `ledger.rs`).
    pub ledger: LedgerRecovered,
}

pub(crate) struct Options {
    /// Reads of a file that failed or returned damage before it is given up on.
    pub retries_max: u32,
    /// Fsync everything recovery builds on before serving (always, except under the
    /// `skip-recovery-fsync` mutation).
    pub sync_recovered: bool,
    /// A cluster member repairs damage from its peers; a lone replica stops instead (there is
    /// nowhere to repair from).
    pub repair_from_peers: bool,
    /// A dropped snapshot sets the repair mark (always, except under the
    /// `snapshot-damage-unmarked` mutation).
    pub mark_snapshot_damage: bool,
}

#[derive(Default)]
pub(crate) struct Recovery {
    mark_snapshot_damage: bool,
    reading: Option<String>,
    snapshots: Vec<(Index, String)>,
    sources: Vec<SourceId>,
    segments: VecDeque<(Index, String)>,
    state: StateMachine,
    log: Log,
    /// Entries after the snapshot, and where each was read from.
    entries: Vec<Entry>,
    locs: Vec<Loc>,
    last_index: Index,
    hard: HardState,
    hard_rewrite: bool,
    /// The hard state file is in the current layout (two copies, overwritten in place).
    hard_in_place: bool,
    /// The copies of the hard state found whole so far (reads are retried for the others).
    hard_seen: [Option<HardState>; 2],
    damage_found: Vec<DamageFound>,
    snapshot: Index,
    snapshot_term: Term,
    attempts: u32,
    previous_read: Option<Vec<u8>>,
    repairs: VecDeque<IoOp>,
    torn_bytes: u64,
    retries_max: u32,
    /// The final fsyncs of everything recovered have been queued.
    durable_queued: bool,
    /// In a cluster a damaged range is cut off and fetched again from the leader instead of
    /// stopping the replica (see [`Damage`]).
    repair_from_peers: bool,
    damage: Option<Damage>,
    /// Every name the directory listed (the ledger's scan picks its segments from them).
    names: Vec<String>,
    /// The ledger's last segment is being read.
    ledger_scan: Option<LedgerScan>,
    ledger: LedgerRecovered,
}

/// A confirmed damaged record in a cluster member's log. Everything from it on is dropped
/// (a copy of the damaged segment's tail is kept) and the replica repairs from the leader;
/// `bound` is an index its log certainly did not go beyond, which becomes the hard state's
/// repair mark: until the replica holds entries through it again, it may have acknowledged
/// entries it no longer has, so it neither votes nor stands.
#[derive(Debug)]
struct Damage {
    file: String,
    offset: u64,
    bound: Index,
    /// Later segments, read only to bound the log's end, then removed.
    later: Vec<String>,
    /// The damaged segment's bytes from the damage on, kept in a file for inspection.
    tail: Vec<u8>,
    /// The damage is in the snapshot `file` (kept under a new name): every segment is later.
    in_snapshot: bool,
}

/// What the scan of one segment says, before confirmation.
enum Verdict {
    Clean(SegmentScan),
    /// Cut the file at this offset (torn tail of the last segment).
    CutAt(SegmentScan, u64),
    /// The header itself is torn: the file was being created when the crash came.
    DropFile,
    Corrupt(u64),
}

impl Recovery {
    pub fn start(options: Options) -> (Recovery, Step) {
        let Options { retries_max, sync_recovered, repair_from_peers, mark_snapshot_damage } = options;
        let durable_queued = !sync_recovered;
        let r = Recovery { retries_max, durable_queued, repair_from_peers, mark_snapshot_damage, ..Default::default() };
        (r, Step::Io(IoOp::List))
    }

    /// `mutant`: the `truncate-mid-log` mutation is on.
    pub fn on_io(&mut self, result: Result<IoReply, DiskError>, mutant: bool) -> Step {
        if let Some(scan) = self.ledger_scan.as_mut() {
            let step = scan.on_read(result);
            return self.ledger_step(step);
        }
        match result {
            Ok(IoReply::Listed(names)) => self.listed(names),
            Ok(IoReply::Data(bytes)) => {
                let file = self.reading.clone().expect("a read is outstanding");
                if file == HARD_STATE_FILE {
                    self.hard_state_read(file, bytes)
                } else if parse_snapshot_name(&file).is_some() {
                    self.snapshot_read(file, bytes)
                } else {
                    self.segment_read(file, bytes, mutant)
                }
            }
            Ok(IoReply::Done) => self.next_repair(),
            Err(e) => match self.reading.clone() {
                Some(file) if file == HARD_STATE_FILE => {
                    let previous = self.previous_read.take();
                    self.retry(file, previous).unwrap_or_else(|| self.hard_state_chosen(true))
                }
                Some(file) => {
                    let attempts = self.attempts;
                    let previous = self.previous_read.take();
                    self.retry(file.clone(), previous).unwrap_or(Step::Fatal(Fatal::ReadFailed { file, attempts }))
                }
                None => Step::Fatal(Fatal::DiskFailed { file: "(recovery repair)".into(), reason: e.to_string() }),
            },
        }
    }

    fn listed(&mut self, names: Vec<String>) -> Step {
        self.names = names.clone();
        for n in &names {
            if n.ends_with(".tmp") {
                self.repairs.push_back(IoOp::Remove { file: n.clone() });
            }
        }
        self.sources = names.iter().filter_map(|n| parse_source_name(n)).collect();
        self.snapshots = names.iter().filter_map(|n| Some((parse_snapshot_name(n)?, n.clone()))).collect();
        self.snapshots.sort();
        let mut segments: Vec<_> = names.iter().filter_map(|n| Some((parse_segment_name(n)?, n.clone()))).collect();
        segments.sort();
        self.segments = segments.into();
        if names.iter().any(|n| n == HARD_STATE_FILE) {
            return self.read(HARD_STATE_FILE.into());
        }
        self.hard_state_chosen(false)
    }

    fn read_snapshot(&mut self) -> Step {
        match self.snapshots.last() {
            Some((_, name)) => self.read(name.clone()),
            None => self.next_segment(),
        }
    }

    /// A damaged copy is damage, never a torn write (a torn sector fails its checksum and the
    /// other copy holds the durable state); the file is read again before a copy is given up
    /// for lost, as a bit may have flipped on the way from the disk.
    fn hard_state_read(&mut self, file: String, bytes: Vec<u8>) -> Step {
        let read = hardstate::decode_file(&bytes);
        // A copy whose checksum held in any read is whole: keep it across the reads.
        for (seen, slot) in self.hard_seen.iter_mut().zip(read.slots) {
            *seen = seen.or(slot);
        }
        self.hard_in_place = read.current_layout;
        if self.hard_seen.iter().flatten().count() < self.hard_copies() {
            if let Some(step) = self.retry(file, Some(bytes)) {
                return step;
            }
        }
        self.hard_state_chosen(true)
    }

    /// How many copies the hard state file holds: two, or one in the previous version's layout.
    fn hard_copies(&self) -> usize {
        if self.hard_in_place {
            2
        } else {
            1
        }
    }

    /// The copies are read (`existed`: the file was there): take the state they give (see
    /// `hardstate::choose`), or, when both are lost, stop voting for good in a cluster and stop
    /// in a lone replica.
    fn hard_state_chosen(&mut self, existed: bool) -> Step {
        let (read, copies) = (self.hard_seen, self.hard_copies());
        match hardstate::choose(existed, read, copies) {
            Copies::Found { hs, rewrite } => {
                self.hard = hs;
                self.hard_rewrite = rewrite;
                for (slot, copy) in read.iter().enumerate().take(copies) {
                    if copy.is_none() {
                        self.damage_found.push(DamageFound::HardStateCopy { slot });
                    }
                }
            }
            Copies::Neither => {}
            Copies::Lost => {
                let reason = "no copy is readable and whole".to_string();
                if !self.repair_from_peers {
                    return Step::Fatal(Fatal::HardStateLost { reason });
                }
                // The term is raised from the snapshot and the log as they are read; the vote is
                // what cannot be known.
                self.hard = HardState { votes_lost: true, ..HardState::default() };
                self.hard_rewrite = true;
                self.damage_found.push(DamageFound::HardStateLost { reason });
            }
        }
        self.read_snapshot()
    }

    fn read(&mut self, file: String) -> Step {
        if self.reading.as_ref() != Some(&file) {
            self.attempts = 0;
            self.previous_read = None;
        }
        self.attempts += 1;
        self.reading = Some(file.clone());
        Step::Io(IoOp::Read { file })
    }

    /// Reads `file` again, remembering `bytes` to compare; `None` once the retries are used up.
    fn retry(&mut self, file: String, bytes: Option<Vec<u8>>) -> Option<Step> {
        if self.attempts > self.retries_max {
            return None;
        }
        self.previous_read = bytes;
        Some(self.read(file))
    }

    fn snapshot_read(&mut self, file: String, bytes: Vec<u8>) -> Step {
        let loaded = decode_snapshot(&bytes)
            .and_then(|(index, term, payload)| Ok((index, term, crate::snapshot::decode_state(payload, index)?)));
        match loaded {
            Ok((index, term, state)) => {
                self.state = state;
                self.raise_term(term);
                self.snapshot_term = term;
                self.snapshot = index;
                self.last_index = index;
                let older: Vec<_> = self.snapshots.iter().filter(|(i, _)| *i < index).map(|(_, n)| n.clone()).collect();
                self.repairs.extend(older.into_iter().map(|file| IoOp::Remove { file }));
                self.next_segment()
            }
            Err(reason) => match self.retry(file.clone(), Some(bytes)) {
                Some(step) => step,
                None if self.repair_from_peers => self.snapshot_damaged(file, reason),
                None => Step::Fatal(Fatal::SnapshotCorrupt { file, reason }),
            },
        }
    }

    /// A cluster member's newest snapshot is damaged: without the state it holds, nothing after
    /// it can be applied, so the replica starts from nothing and has the leader install a
    /// snapshot. Its log may have reached the snapshot's index or beyond, so that bound becomes
    /// the repair mark (no votes, no candidacy until it holds that much again), and the
    /// segments are read only to raise the bound, then removed with every source file (all of
    /// them belonged to the state being dropped). The damaged file is kept under a new name.
    fn snapshot_damaged(&mut self, file: String, reason: String) -> Step {
        let bound = parse_snapshot_name(&file).unwrap_or_default();
        self.damage_found.push(DamageFound::Snapshot { file: file.clone(), reason });
        let older: Vec<_> = self.snapshots.iter().filter(|(_, n)| *n != file).map(|(_, n)| n.clone()).collect();
        self.repairs.extend(older.into_iter().map(|file| IoOp::Remove { file }));
        self.snapshots.clear();
        let sources = std::mem::take(&mut self.sources);
        self.repairs.extend(sources.into_iter().map(|id| IoOp::Remove { file: crate::stored::source_name(id) }));
        self.damage = Some(Damage { file, offset: 0, bound, later: Vec::new(), tail: Vec::new(), in_snapshot: true });
        self.next_segment()
    }

    fn next_segment(&mut self) -> Step {
        // Segments wholly below the snapshot are leftovers of an interrupted clean-up.
        while self.segments.len() >= 2 && self.segments[1].0 .0 <= self.snapshot.0 + 1 {
            let (_, file) = self.segments.pop_front().expect("len checked");
            self.repairs.push_back(IoOp::Remove { file });
        }
        match self.segments.front() {
            Some((_, name)) => self.read(name.clone()),
            None => {
                self.reading = None;
                self.queue_damage_repair();
                self.drop_log_behind_snapshot();
                let (scan, step) = LedgerScan::start(&self.names, self.snapshot);
                self.ledger_scan = Some(scan);
                self.ledger_step(step)
            }
        }
    }

    /// The ledger's scan goes on, or is done and its repairs join the others.
    fn ledger_step(&mut self, step: ScanStep) -> Step {
        match step {
            ScanStep::Read(op) => Step::Io(op),
            ScanStep::Done(found, repairs) => {
                self.ledger_scan = None;
                self.ledger = found;
                self.repairs.extend(repairs);
                self.next_repair()
            }
        }
    }

    fn verdict(&self, bytes: &[u8], last: bool) -> Verdict {
        match scan_segment(bytes) {
            // A header cut short is a segment whose creation was torn; a whole one that fails
            // its checksum is damage.
            None if last && bytes.len() < SEGMENT_HEADER_LEN => Verdict::DropFile,
            None => Verdict::Corrupt(0),
            Some(s) => match s.end {
                ScanEnd::Clean => Verdict::Clean(s),
                ScanEnd::Torn { offset } if last => Verdict::CutAt(s, offset),
                ScanEnd::Torn { offset } | ScanEnd::Corrupt { offset } => Verdict::Corrupt(offset),
            },
        }
    }

    fn segment_read(&mut self, file: String, bytes: Vec<u8>, mutant: bool) -> Step {
        if self.damage.is_some() {
            self.segments.pop_front();
            self.bound_damaged_log(file, &bytes);
            return self.next_segment();
        }
        if let Some(found) = crate::codec::other_segment_format(&bytes) {
            // Not damage: a data directory from another version, which nothing here may cut or
            // repair. The operator learns why the replica will not start.
            let supported = crate::codec::SEGMENT_FORMAT;
            return Step::Fatal(Fatal::UnsupportedFormat { file, found, supported });
        }
        let last = self.segments.len() == 1;
        let mut verdict = self.verdict(&bytes, last);
        if mutant {
            // The deliberate bug: any bad record is treated as a torn tail and cut off at once.
            if let (Verdict::Corrupt(offset), Some(s)) = (&verdict, scan_segment(&bytes)) {
                let offset = *offset;
                let later: Vec<_> = self.segments.drain(1..).map(|(_, n)| n).collect();
                self.repairs.extend(later.into_iter().map(|file| IoOp::Remove { file }));
                verdict = Verdict::CutAt(s, offset);
            }
        }
        // Clean and torn verdicts rest on checksums that held and on the file's length, which a
        // flipped bit cannot fake; only a damage verdict needs the same bytes twice.
        let confirmed = !matches!(verdict, Verdict::Corrupt(_)) || self.previous_read.as_deref() == Some(&bytes[..]);
        if !confirmed {
            let attempts = self.attempts;
            return self.retry(file.clone(), Some(bytes)).unwrap_or(Step::Fatal(Fatal::ReadFailed { file, attempts }));
        }
        self.segments.pop_front();
        match verdict {
            Verdict::Clean(scan) => {
                // Zeros after the records are preallocated space: written to, not appended to.
                let end = scan.valid_end;
                if let Err(f) = self.accept(&file, scan, end) {
                    return Step::Fatal(f);
                }
                self.log.zeroed_to = bytes.len() as u64;
            }
            Verdict::CutAt(scan, offset) => {
                if let Err(f) = self.accept(&file, scan, offset) {
                    return Step::Fatal(f);
                }
                self.cut(&file, &bytes, offset);
                self.log.zeroed_to = offset.max(SEGMENT_HEADER_LEN as u64).min(bytes.len() as u64);
            }
            Verdict::DropFile => {
                self.keep_torn_copy(&file, &bytes, 0);
                self.repairs.push_back(IoOp::Remove { file });
                self.repairs.push_back(IoOp::SyncDir);
            }
            Verdict::Corrupt(offset) if self.repair_from_peers => self.start_damage(file, &bytes, offset),
            Verdict::Corrupt(offset) => return Step::Fatal(Fatal::LogCorruption { file, offset }),
        }
        self.next_segment()
    }

    /// Takes a segment's valid records: checks the chain across the file boundary, keeps the
    /// entries the snapshot does not already hold, and where each one starts.
    fn accept(&mut self, file: &str, scan: SegmentScan, end: u64) -> Result<(), Fatal> {
        let first = scan.header.first;
        let continues = if self.log.segments.is_empty() {
            first.0 <= self.state.applied.0 + 1
        } else {
            first == self.last_index.next() && scan.header.prev_crc == self.log.last_crc
        };
        if !continues {
            return Err(Fatal::LogGap { file: file.to_string(), expected: self.last_index.next(), found: first });
        }
        self.log.last_crc = scan.header.prev_crc;
        let mut offset = SEGMENT_HEADER_LEN as u64;
        for d in scan.records {
            let loc = Loc { segment: first, offset, prev_crc: d.prev_crc };
            offset = d.end as u64;
            self.log.last_crc = d.crc;
            if d.entry.index > self.last_index {
                self.last_index = d.entry.index;
                self.raise_term(d.entry.term);
                self.entries.push(d.entry);
                self.locs.push(loc);
            }
        }
        self.log.segments.push((first, file.to_string()));
        self.log.end_offset = end;
        Ok(())
    }

    /// A confirmed damaged record in a cluster: the records before it are kept, and the log's
    /// end before the damage is bounded (conservatively, by counting the smallest possible
    /// records in the bytes that follow it).
    fn start_damage(&mut self, file: String, bytes: &[u8], offset: u64) {
        let scan = scan_segment(bytes);
        let first = parse_segment_name(&file).unwrap_or(self.last_index.next());
        let kept_last = scan.as_ref().and_then(|s| s.records.last()).map_or(first.prev(), |d| d.entry.index);
        // Preallocated zeros at the end held no records.
        let rest = content_end(bytes).saturating_sub(offset as usize) as u64;
        let bound = Index(kept_last.0 + rest / RECORD_HEADER_LEN as u64 + 1);
        if let Some(s) = scan.filter(|_| offset >= SEGMENT_HEADER_LEN as u64) {
            // Accepting cannot fail here: a failure would have been a gap, not damage.
            let _ = self.accept(&file, s, offset);
        }
        let tail = bytes[offset as usize..content_end(bytes).max(offset as usize)].to_vec();
        self.damage_found.push(DamageFound::Log { file: file.clone(), offset });
        self.damage = Some(Damage { file, offset, bound, later: Vec::new(), tail, in_snapshot: false });
    }

    /// A segment after the damage: it only raises the bound on where the log ended. A segment
    /// that scans clean (every byte a whole record or preallocated zeros) gives its last index
    /// exactly; any other is bounded by counting the smallest possible records in it. The
    /// bound is what the replica must hold again before it votes, so a loose one keeps it out
    /// of elections for longer than needed (in an idle cluster, until that many entries come).
    fn bound_damaged_log(&mut self, file: String, bytes: &[u8]) {
        let d = self.damage.as_mut().expect("in damage mode");
        let first = parse_segment_name(&file).unwrap_or(d.bound);
        let scan = scan_segment(bytes);
        let last = match &scan {
            Some(s) if s.end == ScanEnd::Clean => s.records.last().map_or(first.prev().0, |r| r.entry.index.0),
            _ => {
                let by_size = first.0 + content_end(bytes) as u64 / RECORD_HEADER_LEN as u64 + 1;
                let by_scan = scan.and_then(|s| s.records.last().map(|r| r.entry.index.0)).unwrap_or(0);
                by_size.max(by_scan)
            }
        };
        d.bound = Index(d.bound.0.max(last));
        d.later.push(file);
    }

    /// The repair mark goes into the hard state durably before anything is cut, so that a
    /// crash in between cannot leave a short log that votes as if it were whole.
    fn queue_damage_repair(&mut self) {
        let Some(mut d) = self.damage.take() else { return };
        if d.in_snapshot && !self.mark_snapshot_damage {
            // The deliberate bug: the log the replica starts from looks whole.
            d.bound = Index(0);
        }
        self.hard.repair_upto = self.hard.repair_upto.max(d.bound);
        self.repairs.extend(hardstate::replace_ops(self.hard));
        if d.in_snapshot {
            // The segments go first, durably: a log left behind without its snapshot would be a
            // gap that stops the replica at its next boot.
            self.repairs.extend(d.later.into_iter().map(|file| IoOp::Remove { file }));
            self.repairs.push_back(IoOp::SyncDir);
            self.repairs.push_back(IoOp::Rename { from: d.file.clone(), to: format!("damaged-{}", d.file) });
            self.repairs.push_back(IoOp::SyncDir);
            return;
        }
        let copy = format!("damaged-{}-{}.bin", d.file, d.offset);
        self.repairs.push_back(IoOp::Write { file: copy.clone(), offset: 0, data: d.tail });
        self.repairs.push_back(IoOp::Sync { file: copy });
        // Later segments go first, durably: a crash after the truncation but before their
        // removal would leave a gap in the log that stops the replica at its next boot.
        let later = !d.later.is_empty();
        for file in d.later {
            self.repairs.push_back(IoOp::Remove { file });
        }
        if later {
            self.repairs.push_back(IoOp::SyncDir);
        }
        if d.offset >= SEGMENT_HEADER_LEN as u64 {
            self.repairs.push_back(IoOp::Truncate { file: d.file.clone(), len: d.offset });
            self.repairs.push_back(IoOp::Sync { file: d.file });
            self.log.zeroed_to = d.offset;
        } else {
            self.log.segments.retain(|(_, n)| *n != d.file);
            self.repairs.push_back(IoOp::Remove { file: d.file });
            self.repairs.push_back(IoOp::SyncDir);
        }
    }

    /// A snapshot installed from a leader can be ahead of every record on disk; if the crash
    /// came before the old segments' removal was durable, they are still here, wholly behind
    /// the snapshot. They are removed, and the log starts afresh after the snapshot (writing on
    /// at their end would leave a gap in the chain).
    fn drop_log_behind_snapshot(&mut self) {
        if self.log.segments.is_empty() || self.last_index > self.snapshot {
            return;
        }
        let old = std::mem::take(&mut self.log.segments);
        self.repairs.extend(old.into_iter().map(|(_, file)| IoOp::Remove { file }));
        self.repairs.push_back(IoOp::SyncDir);
        self.log = Log::default();
        self.last_index = self.snapshot;
    }

    /// A follower may write a leader's entries before the new term is durable in its hard
    /// state; the term it holds is at least every term in its log, with no vote in a newer one
    /// (a vote is only sent once durable, so none was cast that the disk does not show).
    fn raise_term(&mut self, term: Term) {
        if term > self.hard.term {
            self.hard = self.hard.with(term, None);
        }
    }

    fn keep_torn_copy(&mut self, file: &str, bytes: &[u8], offset: u64) {
        // Preallocated zeros after the torn record are not worth keeping (or counting).
        let discarded = bytes[offset as usize..content_end(bytes).max(offset as usize)].to_vec();
        self.torn_bytes += discarded.len() as u64;
        let copy = format!("torn-{file}-{offset}.bin");
        self.repairs.push_back(IoOp::Write { file: copy.clone(), offset: 0, data: discarded });
        self.repairs.push_back(IoOp::Sync { file: copy });
    }

    fn cut(&mut self, file: &str, bytes: &[u8], offset: u64) {
        let offset = offset.max(SEGMENT_HEADER_LEN as u64);
        if offset as usize >= bytes.len() {
            return;
        }
        self.keep_torn_copy(file, bytes, offset);
        self.repairs.push_back(IoOp::SyncDir);
        self.repairs.push_back(IoOp::Truncate { file: file.to_string(), len: offset });
        self.repairs.push_back(IoOp::Sync { file: file.to_string() });
    }

    /// The data recovery read may have been written by a process that died before fsyncing it:
    /// it can sit in the page cache only, and a power loss later would take it away from under
    /// everything acknowledged on top of it. So every file recovery builds on is fsynced, and
    /// then the directory, before the replica serves.
    fn make_durable(&mut self) {
        self.durable_queued = true;
        let snapshot = self.snapshots.iter().filter(|(i, _)| *i == self.snapshot).map(|(_, n)| n.clone());
        let segments = self.log.segments.iter().map(|(_, n)| n.clone());
        // The ledger too: a segment found in the page cache only could otherwise vanish under a
        // later snapshot, which would leave a hole no replay can fill.
        let ledger = self.ledger.names();
        let files: Vec<String> = snapshot.chain(segments).chain(ledger).collect();
        self.repairs.extend(files.into_iter().map(|file| IoOp::Sync { file }));
        self.repairs.push_back(IoOp::SyncDir);
    }

    fn next_repair(&mut self) -> Step {
        self.reading = None;
        if self.repairs.is_empty() && !self.durable_queued {
            self.make_durable();
        }
        match self.repairs.pop_front() {
            Some(op) => Step::Io(op),
            None => Step::Done(Box::new(Recovered {
                state: std::mem::take(&mut self.state),
                log: std::mem::take(&mut self.log).recovered(
                    self.snapshot,
                    self.snapshot_term,
                    std::mem::take(&mut self.entries),
                    std::mem::take(&mut self.locs),
                ),
                hard: self.hard,
                hard_rewrite: self.hard_rewrite,
                hard_in_place: self.hard_in_place,
                damage_found: std::mem::take(&mut self.damage_found),
                torn_bytes: self.torn_bytes,
                snapshot: self.snapshot,
                snapshots: self.snapshots.iter().filter(|(i, _)| *i == self.snapshot).map(|(_, n)| n.clone()).collect(),
                sources: std::mem::take(&mut self.sources),
                ledger: std::mem::take(&mut self.ledger),
            })),
        }
    }
}
