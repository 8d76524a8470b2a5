//! This replica's ledger: the events of every entry it applied (see `events.rs`), kept in files
//! for readers, the newest of them in memory too.
//!
//! Why files of its own rather than the log: an entry's events depend on the state it met (an
//! append under a stale handle is refused, a failure dead-letters a session only at its kind's
//! max attempts), so they cannot be read off the log alone once the state has moved on. Each
//! replica writes them as it applies, so every replica's ledger holds the same bytes for the
//! same index.
//!
//! Files: segments `ledger-<first index>-<created, wall ms>.led`, each a 24-byte header (magic,
//! first index, crc) and then one record per entry: `len u32 | crc u32 | payload`, where the
//! payload is the postcard encoding of the entry's [`EventMark`]s (what a filter needs) followed
//! by the encoded [`LedgerEntry`] (what a reader receives, unchanged).
//!
//! Durability: records are written as entries are applied, but not fsynced on the way; a crash
//! loses at most what was applied since the last fsync, and re-applying the log after the
//! snapshot writes it again. That is only possible back to the snapshot, so before a snapshot
//! at index S is renamed into place the ledger is fsynced through S (`want_durable`). At boot
//! the last segment is scanned and cut back to its last whole record; a ledger that then ends
//! below the snapshot, or starts after it, is dropped and started again after the snapshot.
//!
//! Memory: every record not yet written, and beyond that the newest `ledger_cache_bytes_max`,
//! are kept in memory for readers at the head; readers further behind read the files through
//! the disk boundary, a piece at a time. Apply waits while more than `ledger_backlog_bytes_max`
//! waits to be written, so a slow disk cannot make the cache grow without bound.
//!
//! Retention: the oldest segments are removed once the ledger holds more than
//! `ledger_retain_bytes_max`, or once everything in them is older than `ledger_retain_age_s`,
//! but never one holding an entry after the newest snapshot (a watcher's resync reads the
//! snapshot and then the ledger from the entry after it).

use crate::events::{EventMark, LedgerEntry};
use crate::io::{DiskError, IoOp, IoReply};
use crate::types::Index;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

const LEDGER_MAGIC: &[u8; 8] = b"TRUBAld1";
pub(crate) const LEDGER_HEADER_LEN: u64 = 24;
const RECORD_HEADER_LEN: usize = 8;
/// No ledger record is larger than this; a length field above it is damage.
pub(crate) const RECORD_BYTES_MAX: u32 = 128 * 1024 * 1024;
/// A position in a segment is remembered every this many bytes, so that a reader finds an old
/// index without scanning its segment from the start.
const SPARSE_EVERY_BYTES: u64 = 256 * 1024;
/// Recovery reads the last segment in pieces of this size.
const SCAN_PIECE_BYTES: u64 = 1024 * 1024;

pub fn ledger_name(first: Index, created_ms: u64) -> String {
    format!("ledger-{:020}-{:013}.led", first.0, created_ms)
}

/// The first index and creation time a segment's name gives.
pub fn parse_ledger_name(name: &str) -> Option<(Index, u64)> {
    let rest = name.strip_prefix("ledger-")?.strip_suffix(".led")?;
    let (first, created) = rest.split_once('-')?;
    Some((Index(first.parse().ok()?), created.parse().ok()?))
}

fn header(first: Index) -> Vec<u8> {
    let mut h = Vec::with_capacity(LEDGER_HEADER_LEN as usize);
    h.extend_from_slice(LEDGER_MAGIC);
    h.extend_from_slice(&first.0.to_le_bytes());
    let crc = crc32fast::hash(&h[8..16]);
    h.extend_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(&[0u8; 4]);
    h
}

fn header_first(b: &[u8]) -> Option<Index> {
    if b.len() < LEDGER_HEADER_LEN as usize || &b[..8] != LEDGER_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
    (crc32fast::hash(&b[8..16]) == crc).then(|| Index(u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"))))
}

/// One entry's events as the ledger keeps them: what a filter needs, and the encoded entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub index: Index,
    pub marks: Vec<EventMark>,
    /// The postcard encoding of the [`LedgerEntry`], sent to readers as it is.
    pub body: Bytes,
}

#[derive(Serialize, Deserialize)]
struct Head<'a> {
    index: Index,
    #[serde(borrow)]
    marks: std::borrow::Cow<'a, [EventMark]>,
}

impl Record {
    pub fn of(entry: &LedgerEntry) -> Record {
        let body = postcard::to_allocvec(entry).expect("postcard encoding into memory cannot fail");
        let marks = entry.events.iter().map(|e| e.mark()).collect();
        Record { index: entry.index, marks, body: Bytes::from(body) }
    }

    pub fn entry(&self) -> Result<LedgerEntry, String> {
        postcard::from_bytes(&self.body).map_err(|e| format!("undecodable ledger entry {}: {e}", self.index))
    }

    /// Memory the record counts for in the cache.
    pub fn cost(&self) -> u64 {
        self.body.len() as u64 + self.marks.len() as u64 * 8 + 64
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
        let head = Head { index: self.index, marks: std::borrow::Cow::Borrowed(&self.marks) };
        let mut buf =
            postcard::to_extend(&head, std::mem::take(out)).expect("postcard encoding into memory cannot fail");
        buf.extend_from_slice(&self.body);
        let len = (buf.len() - start - RECORD_HEADER_LEN) as u32;
        let crc = crc32fast::hash(&buf[start + RECORD_HEADER_LEN..]);
        buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        *out = buf;
    }
}

/// What the bytes at the start of a buffer are.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A whole record and the bytes it took.
    Whole(Record, usize),
    /// The buffer ends inside a record: more is needed (`len` bytes in all, if known).
    Short,
    /// Not a valid record: a checksum, a length or the encoding is wrong.
    Damaged,
}

/// Parses the record at the start of `buf`; the record's body shares `buf`'s memory.
pub(crate) fn parse(buf: &Bytes) -> Parsed {
    if buf.len() < RECORD_HEADER_LEN {
        return Parsed::Short;
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if len == 0 || len > RECORD_BYTES_MAX {
        return Parsed::Damaged;
    }
    let end = RECORD_HEADER_LEN + len as usize;
    if buf.len() < end {
        return Parsed::Short;
    }
    let payload = &buf[RECORD_HEADER_LEN..end];
    if crc32fast::hash(payload) != crc {
        return Parsed::Damaged;
    }
    let Ok((head, rest)) = postcard::take_from_bytes::<Head>(payload) else { return Parsed::Damaged };
    let body_start = end - rest.len();
    let record = Record { index: head.index, marks: head.marks.into_owned(), body: buf.slice(body_start..end) };
    Parsed::Whole(record, end)
}

/// The ledger's limits (see `Limits`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LedgerLimits {
    pub segment_bytes_max: u64,
    pub cache_bytes_max: u64,
    pub backlog_bytes_max: u64,
    pub retain_bytes_max: u64,
    pub retain_age_ms: u64,
}

impl LedgerLimits {
    pub fn of(l: &crate::config::Limits) -> LedgerLimits {
        LedgerLimits {
            segment_bytes_max: l.ledger_segment_bytes_max,
            cache_bytes_max: l.ledger_cache_bytes_max,
            backlog_bytes_max: l.ledger_backlog_bytes_max,
            retain_bytes_max: l.ledger_retain_bytes_max,
            retain_age_ms: l.ledger_retain_age_s.saturating_mul(1000),
        }
    }
}

#[derive(Clone, Debug)]
struct Segment {
    first: Index,
    created_ms: u64,
    name: String,
    /// Bytes in the file (for the last one, written so far).
    len: u64,
    /// (index, offset) of some records, every `SPARSE_EVERY_BYTES` or so (only for what this
    /// process wrote: older segments are read from their start).
    sparse: Vec<(Index, u64)>,
}

/// A write in flight.
#[derive(Debug)]
struct Write {
    file: String,
    upto: Index,
    len: u64,
    /// The write starts a new segment (its header first).
    new_segment: Option<Segment>,
}

/// Where a reader finds an index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Locate {
    /// Removed by retention (or never held here): the oldest index still held.
    Compacted { first: Index },
    /// Not applied here yet.
    Future,
    /// In memory.
    Cached,
    /// In a file, at or after this offset (records before the index come first).
    Disk { file: String, offset: u64 },
}

/// What the ledger asks of the disk after a step.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LedgerIo {
    Write(IoOp),
    Sync(Vec<IoOp>),
    /// Cut a failed write's leftovers off; the write is tried again later.
    Repair(IoOp),
}

#[derive(Debug, Default)]
pub(crate) struct Ledger {
    limits: LedgerLimits,
    segments: Vec<Segment>,
    /// The oldest index held, and the next to be appended.
    first: Index,
    next: Index,
    cache: VecDeque<Arc<Record>>,
    cache_bytes: u64,
    /// Encoded records not yet handed to the disk, and the last index among them.
    pending: Vec<u8>,
    write: Option<Write>,
    /// Records through here are in files (not necessarily durable).
    written: Index,
    /// Files written to since their last fsync.
    dirty: BTreeSet<String>,
    /// Fsyncs under way: how many are left, and the index they make durable.
    syncing: Option<(usize, Index)>,
    durable: Index,
    /// Someone waits for the ledger to be durable through here (a snapshot).
    durable_wanted: Index,
    /// A failed write's leftovers are being cut off; nothing is written until that is done.
    repairing: bool,
    /// After a failed write, the next one waits for `retry()`.
    failed: bool,
}

/// What recovery found of the ledger.
#[derive(Debug, Default)]
pub(crate) struct LedgerRecovered {
    /// (first index, created ms, name), in index order; the last one ends at `end`.
    segments: Vec<(Index, u64, String)>,
    end: u64,
    next: Index,
}

impl LedgerRecovered {
    pub fn names(&self) -> impl Iterator<Item = String> + '_ {
        self.segments.iter().map(|s| s.2.clone())
    }
}

impl Ledger {
    pub fn recovered(limits: LedgerLimits, r: LedgerRecovered) -> Ledger {
        let count = r.segments.len();
        let segments: Vec<Segment> = r
            .segments
            .into_iter()
            .enumerate()
            .map(|(i, (first, created_ms, name))| Segment {
                first,
                created_ms,
                name,
                len: if i + 1 == count { r.end } else { 0 },
                sparse: Vec::new(),
            })
            .collect();
        let first = segments.first().map_or(r.next, |s| s.first);
        let written = r.next.prev();
        Ledger { limits, segments, first, next: r.next, written, durable: written, ..Ledger::default() }
    }

    /// The oldest index a reader can ask for.
    pub fn first(&self) -> Index {
        self.first
    }

    /// The index the next record will have (one after the last applied).
    pub fn next(&self) -> Index {
        self.next
    }

    pub fn durable(&self) -> Index {
        self.durable
    }

    /// Appends an applied entry's record. A record the ledger already holds (an entry applied
    /// again after a restart, whose record survived) is skipped.
    pub fn append(&mut self, record: Record) {
        if record.index < self.next {
            return;
        }
        assert_eq!(record.index, self.next, "ledger records follow one another");
        record.encode_into(&mut self.pending);
        self.next = self.next.next();
        self.cache_bytes += record.cost();
        self.cache.push_back(Arc::new(record));
    }

    /// Whether apply must wait for the disk: too many bytes wait to be written.
    pub fn backlogged(&self) -> bool {
        let writing = self.write.as_ref().map_or(0, |w| w.len);
        self.pending.len() as u64 + writing > self.limits.backlog_bytes_max
    }

    /// Asks for the ledger to be durable through `index` (which must be applied).
    pub fn want_durable(&mut self, index: Index) {
        assert!(index < self.next, "only applied entries can be made durable");
        self.durable_wanted = self.durable_wanted.max(index);
    }

    /// The next disk work: a write of what is pending, or the fsyncs someone waits for.
    pub fn step(&mut self, now_wall_ms: u64) -> Option<LedgerIo> {
        if self.write.is_some() || self.repairing || self.failed {
            return None;
        }
        if !self.pending.is_empty() {
            return Some(LedgerIo::Write(self.start_write(now_wall_ms)));
        }
        if self.syncing.is_none() && self.durable_wanted > self.durable && !self.dirty.is_empty() {
            let ops: Vec<IoOp> = std::mem::take(&mut self.dirty).into_iter().map(|file| IoOp::Sync { file }).collect();
            self.syncing = Some((ops.len(), self.written));
            return Some(LedgerIo::Sync(ops));
        }
        if self.syncing.is_none() && self.durable_wanted > self.durable && self.dirty.is_empty() {
            // Everything written was fsynced already.
            self.durable = self.written;
        }
        None
    }

    fn start_write(&mut self, now_wall_ms: u64) -> IoOp {
        let first = self.written.next();
        let upto = self.next.prev();
        let full = self.segments.last().is_none_or(|s| s.len >= self.limits.segment_bytes_max);
        let records = std::mem::take(&mut self.pending);
        let (file, offset, data, new_segment) = if full {
            let name = ledger_name(first, now_wall_ms);
            let mut data = header(first);
            data.extend_from_slice(&records);
            let sparse = vec![(first, LEDGER_HEADER_LEN)];
            let segment = Segment { first, created_ms: now_wall_ms, name: name.clone(), len: 0, sparse };
            (name, 0, data, Some(segment))
        } else {
            let s = self.segments.last_mut().expect("checked");
            if s.sparse.last().is_none_or(|(_, at)| s.len >= at + SPARSE_EVERY_BYTES) {
                s.sparse.push((first, s.len));
            }
            (s.name.clone(), s.len, records, None)
        };
        self.write = Some(Write { file: file.clone(), upto, len: data.len() as u64, new_segment });
        IoOp::Write { file, offset, data }
    }

    /// A write finished. A full disk leaves the records cached: their leftovers on disk are
    /// cut off (`Repair`), and they are written again after [`Ledger::retry`].
    pub fn on_write(&mut self, result: Result<IoReply, DiskError>) -> Result<Option<LedgerIo>, DiskError> {
        let w = self.write.take().expect("a ledger write is in flight");
        match result {
            Ok(_) => {
                if let Some(s) = w.new_segment {
                    self.segments.push(s);
                }
                let s = self.segments.last_mut().expect("a written segment");
                s.len += w.len;
                self.written = w.upto;
                self.dirty.insert(w.file);
                self.trim_cache();
                Ok(None)
            }
            Err(DiskError::NoSpace) => {
                // The records are still cached: encode them again for the next attempt.
                self.pending.clear();
                for r in self.cache.iter().filter(|r| r.index > self.written) {
                    r.encode_into(&mut self.pending);
                }
                self.failed = true;
                self.repairing = true;
                let len = self.segments.last().filter(|_| w.new_segment.is_none()).map_or(0, |s| s.len);
                let op = match w.new_segment {
                    Some(_) => IoOp::Remove { file: w.file },
                    None => IoOp::Truncate { file: w.file, len },
                };
                Ok(Some(LedgerIo::Repair(op)))
            }
            Err(e) => Err(e),
        }
    }

    /// A failed write's leftovers are cut off.
    pub fn on_repair(&mut self, result: Result<IoReply, DiskError>) -> Result<(), DiskError> {
        self.repairing = false;
        match result {
            Ok(_) | Err(DiskError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Allows the write that failed to be tried again.
    pub fn retry(&mut self) {
        self.failed = false;
    }

    /// One fsync finished.
    pub fn on_sync(&mut self, result: Result<IoReply, DiskError>) -> Result<(), DiskError> {
        result?;
        let (left, upto) = self.syncing.as_mut().expect("ledger fsyncs are under way");
        *left -= 1;
        if *left == 0 {
            self.durable = self.durable.max(*upto);
            self.syncing = None;
        }
        Ok(())
    }

    fn trim_cache(&mut self) {
        while self.cache_bytes > self.limits.cache_bytes_max {
            match self.cache.front() {
                Some(r) if r.index <= self.written => {
                    self.cache_bytes -= r.cost();
                    self.cache.pop_front();
                }
                _ => break,
            }
        }
    }

    /// Where a reader finds `index`.
    pub fn locate(&self, index: Index) -> Locate {
        if index < self.first {
            return Locate::Compacted { first: self.first };
        }
        if index >= self.next {
            return Locate::Future;
        }
        if self.cache.front().is_some_and(|r| r.index <= index) {
            return Locate::Cached;
        }
        let s =
            self.segments.iter().rev().find(|s| s.first <= index).expect("an index after the first is in a segment");
        let offset = s.sparse.iter().rev().find(|(i, _)| *i <= index).map_or(LEDGER_HEADER_LEN, |(_, at)| *at);
        Locate::Disk { file: s.name.clone(), offset }
    }

    /// The cached records from `index` on (which must be cached), in order.
    pub fn cached_from(&self, index: Index) -> impl Iterator<Item = &Arc<Record>> + '_ {
        let skip = self.cache.front().map_or(0, |r| index.0.saturating_sub(r.index.0) as usize);
        self.cache.iter().skip(skip)
    }

    /// The cached records after `index`, oldest first.
    pub fn cached_after(&self, index: Index) -> impl Iterator<Item = &Arc<Record>> + '_ {
        let skip = self.cache.front().map_or(0, |r| (index.0 + 1).saturating_sub(r.index.0) as usize);
        self.cache.iter().skip(skip)
    }

    /// The segment after `file`, where a reader goes on when it reached `file`'s end.
    pub fn segment_after(&self, file: &str) -> Option<&str> {
        let i = self.segments.iter().position(|s| s.name == file)?;
        self.segments.get(i + 1).map(|s| s.name.as_str())
    }

    /// Segments retention removes now: the oldest, while the ledger holds more than its byte
    /// limit or their newest entry is older than the age limit; never one holding an entry
    /// after `keep_after` (the newest snapshot), nor the one being written.
    pub fn expired(&mut self, keep_after: Index, now_wall_ms: u64) -> Vec<String> {
        let limits = self.limits;
        let mut total: u64 = self.segments.iter().map(|s| s.len.max(LEDGER_HEADER_LEN)).sum();
        let mut out = Vec::new();
        while self.segments.len() >= 2 {
            let (oldest, next) = (&self.segments[0], &self.segments[1]);
            let covered = next.first.prev() <= keep_after;
            // Everything in the oldest segment was applied before the next one was started.
            let old = now_wall_ms.saturating_sub(next.created_ms) > limits.retain_age_ms;
            let big = total > limits.retain_bytes_max;
            if !covered || !(old || big) {
                break;
            }
            total -= oldest.len.max(LEDGER_HEADER_LEN);
            out.push(self.segments.remove(0).name);
            self.first = self.segments[0].first;
        }
        out
    }

    /// Starts over after an installed snapshot at `index`: the entries before it were never
    /// applied here, so the ledger cannot continue; it begins again after it. Returns the files
    /// to remove.
    pub fn reset(&mut self, index: Index) -> Vec<String> {
        let old: Vec<String> = self.segments.drain(..).map(|s| s.name).collect();
        let limits = self.limits;
        *self = Ledger {
            limits,
            first: index.next(),
            next: index.next(),
            written: index,
            durable: index,
            ..Ledger::default()
        };
        old
    }

    pub fn invariants(&self) {
        assert!(self.first <= self.next, "the ledger's first index is at most its next");
        assert!(self.written < self.next, "written records were appended");
        assert!(self.durable <= self.written, "durable records were written");
        // The cache holds consecutive records (readers index into it by arithmetic), so its two
        // ends say all: it ends with the last record and starts at or before the first one not
        // yet written. Checking the ends keeps this check constant-time after every step.
        if let (Some(front), Some(back)) = (self.cache.front(), self.cache.back()) {
            assert_eq!(back.index.next(), self.next, "the cache ends with the last record");
            assert_eq!(front.index.0 + self.cache.len() as u64, self.next.0, "the cache is consecutive");
            assert!(front.index <= self.written.next(), "every record not yet written is cached");
        } else {
            assert_eq!(self.written.next(), self.next, "every record not yet written is cached");
        }
    }
}

/// Recovery's part for the ledger. Segments that end at or before the snapshot were fsynced
/// before it was renamed into place; those after may have lost a tail to a power cut (a segment
/// is not fsynced when the next one starts), which would leave a hole before the next segment.
/// So every segment that may hold an entry after the snapshot is read, in pieces, and the ledger
/// is cut at its first whole record short of the next one expected (or at a torn record):
/// everything after the snapshot is written again as the log is applied. A ledger that then
/// does not reach the snapshot, or starts after it, is dropped and starts again after it.
#[derive(Debug)]
pub(crate) struct LedgerScan {
    /// (first index, created ms, name), in index order.
    segments: Vec<(Index, u64, String)>,
    snapshot: Index,
    /// The segment being read (an index into `segments`), its bytes read and not yet parsed,
    /// and where they start in the file.
    at: usize,
    buf: Bytes,
    offset: u64,
    /// The next index the ledger should hold, and where the segment's records end so far.
    expect: Index,
    valid_end: u64,
    header_checked: bool,
}

/// What the scan asks for next.
#[derive(Debug)]
pub(crate) enum ScanStep {
    Read(IoOp),
    /// Done: the ledger as found, and the disk operations that make it so (cuts, removals).
    Done(LedgerRecovered, Vec<IoOp>),
}

impl LedgerScan {
    /// `names`: every file name in the data directory; `snapshot`: the snapshot's index.
    pub fn start(names: &[String], snapshot: Index) -> (LedgerScan, ScanStep) {
        let mut segments: Vec<(Index, u64, String)> =
            names.iter().filter_map(|n| parse_ledger_name(n).map(|(first, at)| (first, at, n.clone()))).collect();
        segments.sort();
        // The first segment to read: the last one starting at or before the entry after the
        // snapshot (earlier ones end before it, and were made durable with it).
        let at = segments.iter().rposition(|s| s.0 <= snapshot.next()).unwrap_or(0);
        let expect = segments.get(at).map_or(Index(0), |s| s.0);
        let mut scan = LedgerScan {
            segments,
            snapshot,
            at,
            buf: Bytes::new(),
            offset: 0,
            expect,
            valid_end: 0,
            header_checked: false,
        };
        let step = if scan.segments.is_empty() { scan.finish(Vec::new()) } else { scan.read() };
        (scan, step)
    }

    fn name(&self) -> &str {
        &self.segments[self.at].2
    }

    fn read(&self) -> ScanStep {
        let offset = self.offset + self.buf.len() as u64;
        ScanStep::Read(IoOp::ReadAt { file: self.name().to_string(), offset, len: SCAN_PIECE_BYTES })
    }

    /// A piece of the segment being read arrived (an error or a missing file ends the scan
    /// there: what cannot be read is cut, as a torn tail would be).
    pub fn on_read(&mut self, result: Result<IoReply, DiskError>) -> ScanStep {
        let data = match result {
            Ok(IoReply::Data(d)) if !d.is_empty() => d,
            // The end of the file, just after a whole record: on to the next segment.
            Ok(IoReply::Data(_)) if self.header_checked && self.buf.is_empty() => return self.next_segment(),
            _ => return self.cut(),
        };
        let mut joined = Vec::with_capacity(self.buf.len() + data.len());
        joined.extend_from_slice(&self.buf);
        joined.extend_from_slice(&data);
        self.buf = Bytes::from(joined);
        if !self.header_checked {
            if self.buf.len() < LEDGER_HEADER_LEN as usize {
                return self.read();
            }
            if header_first(&self.buf) != Some(self.segments[self.at].0) || self.segments[self.at].0 != self.expect {
                return self.cut();
            }
            self.header_checked = true;
            self.buf = self.buf.slice(LEDGER_HEADER_LEN as usize..);
            self.offset = LEDGER_HEADER_LEN;
            self.valid_end = LEDGER_HEADER_LEN;
        }
        loop {
            match parse(&self.buf) {
                Parsed::Whole(r, len) if r.index == self.expect => {
                    self.expect = self.expect.next();
                    self.buf = self.buf.slice(len..);
                    self.offset += len as u64;
                    self.valid_end = self.offset;
                }
                Parsed::Short => return self.read(),
                Parsed::Whole(..) | Parsed::Damaged => return self.cut(),
            }
        }
    }

    /// The segment read is whole: the next one must start where it ended.
    fn next_segment(&mut self) -> ScanStep {
        if self.at + 1 == self.segments.len() {
            return self.finish(Vec::new());
        }
        self.at += 1;
        (self.buf, self.offset, self.valid_end, self.header_checked) = (Bytes::new(), 0, 0, false);
        self.read()
    }

    /// The ledger ends inside the segment being read, at `valid_end` (0: not even its header is
    /// whole or right): it is cut there, and every later segment removed.
    fn cut(&mut self) -> ScanStep {
        let mut repairs = Vec::new();
        let later: Vec<String> = self.segments.drain(self.at + 1..).map(|s| s.2).collect();
        for file in later {
            repairs.push(IoOp::Remove { file });
        }
        let name = self.name().to_string();
        if self.header_checked {
            repairs.push(IoOp::Truncate { file: name.clone(), len: self.valid_end });
            repairs.push(IoOp::Sync { file: name });
        } else {
            repairs.push(IoOp::Remove { file: name });
            self.segments.pop();
        }
        repairs.push(IoOp::SyncDir);
        self.finish(repairs)
    }

    fn finish(&mut self, mut repairs: Vec<IoOp>) -> ScanStep {
        let first = self.segments.first().map(|s| s.0);
        let next = if self.segments.is_empty() { self.snapshot.next() } else { self.expect };
        let reaches_snapshot = next > self.snapshot;
        let starts_in_time = first.is_none_or(|f| f <= self.snapshot.next());
        if !(reaches_snapshot && starts_in_time) {
            // A gap between the snapshot and the ledger could never be filled: start afresh.
            repairs.retain(|op| !matches!(op, IoOp::Truncate { .. } | IoOp::Sync { .. }));
            for (_, _, name) in self.segments.drain(..) {
                repairs.push(IoOp::Remove { file: name });
            }
            repairs.push(IoOp::SyncDir);
            let recovered = LedgerRecovered { segments: Vec::new(), end: 0, next: self.snapshot.next() };
            return ScanStep::Done(recovered, repairs);
        }
        let end = if self.segments.is_empty() { 0 } else { self.valid_end };
        let segments = std::mem::take(&mut self.segments);
        ScanStep::Done(LedgerRecovered { segments, end, next }, repairs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Audit, Event, What};
    use crate::types::{Kind, SessionId, Term};

    fn entry(i: u64, kind: u32) -> LedgerEntry {
        let event = Event {
            session: Some(SessionId(i)),
            kind: Some(Kind(kind)),
            what: What::Appended { record: vec![i as u8; 10 + i as usize] },
            before: None,
            after: None,
        };
        LedgerEntry { index: Index(i), term: Term(1), audit: Audit::default(), events: vec![event] }
    }

    fn limits() -> LedgerLimits {
        LedgerLimits {
            segment_bytes_max: 200,
            cache_bytes_max: 0,
            backlog_bytes_max: 1 << 20,
            retain_bytes_max: 1 << 20,
            retain_age_ms: u64::MAX,
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_ledger_name(&ledger_name(Index(42), 1_700_000_000_123)), Some((Index(42), 1_700_000_000_123)));
        assert_eq!(parse_ledger_name("log-00000000000000000042.seg"), None);
    }

    #[test]
    fn records_parse_back_whole_and_damage_is_refused() {
        let r = Record::of(&entry(7, 2));
        let mut out = Vec::new();
        r.encode_into(&mut out);
        let buf = Bytes::from(out.clone());
        assert_eq!(parse(&buf), Parsed::Whole(r.clone(), out.len()));
        assert_eq!(r.entry().unwrap(), entry(7, 2));
        assert_eq!(parse(&buf.slice(..out.len() - 1)), Parsed::Short);
        for at in 0..out.len() {
            let mut bad = out.clone();
            bad[at] ^= 0x10;
            let got = parse(&Bytes::from(bad));
            assert!(matches!(got, Parsed::Damaged | Parsed::Short), "flip at {at}: {got:?}");
        }
    }

    /// Writes records through a ledger into a map of files, as a disk would.
    fn write_all(l: &mut Ledger, files: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        while let Some(io) = l.step(1000) {
            match io {
                LedgerIo::Write(IoOp::Write { file, offset, data }) => {
                    let f = files.entry(file).or_default();
                    f.truncate(offset as usize);
                    f.extend_from_slice(&data);
                    l.on_write(Ok(IoReply::Done)).unwrap();
                }
                LedgerIo::Sync(ops) => {
                    for _ in ops {
                        l.on_sync(Ok(IoReply::Done)).unwrap();
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn segments_rotate_records_are_found_and_retention_keeps_what_the_snapshot_needs() {
        let mut l = Ledger::recovered(limits(), LedgerRecovered { segments: vec![], end: 0, next: Index(1) });
        let mut files = std::collections::BTreeMap::new();
        for i in 1..=20 {
            l.append(Record::of(&entry(i, 1)));
            write_all(&mut l, &mut files);
        }
        l.invariants();
        assert!(files.len() > 3, "segments rotate at their size limit: {files:?}");
        for i in 1..=20 {
            let Locate::Disk { file, offset } = l.locate(Index(i)) else { panic!("{i} is on disk") };
            let mut buf = Bytes::from(files[&file][offset as usize..].to_vec());
            loop {
                let Parsed::Whole(r, len) = parse(&buf) else { panic!("{i} not found in {file}") };
                if r.index == Index(i) {
                    assert_eq!(r.entry().unwrap(), entry(i, 1));
                    break;
                }
                buf = buf.slice(len..);
            }
        }
        assert_eq!(l.locate(Index(21)), Locate::Future);
        let mut small = limits();
        small.retain_bytes_max = 0;
        l.limits = small;
        let removed = l.expired(Index(5), 1000);
        assert!(!removed.is_empty());
        assert!(l.first() <= Index(6), "entries after the snapshot stay: first {:?}", l.first());
        assert!(matches!(l.locate(Index(1)), Locate::Compacted { .. }));
        l.want_durable(Index(20));
        write_all(&mut l, &mut files);
        assert_eq!(l.durable(), Index(20));
    }

    fn scan(files: &std::collections::BTreeMap<String, Vec<u8>>, snapshot: Index) -> (LedgerRecovered, Vec<IoOp>) {
        let names: Vec<String> = files.keys().cloned().collect();
        let (mut scan, mut step) = LedgerScan::start(&names, snapshot);
        loop {
            match step {
                ScanStep::Read(IoOp::ReadAt { file, offset, len }) => {
                    let f = &files[&file];
                    let from = (offset as usize).min(f.len());
                    let to = (from + len as usize).min(f.len());
                    step = scan.on_read(Ok(IoReply::Data(f[from..to].to_vec())));
                }
                ScanStep::Done(r, ops) => return (r, ops),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn recovery_cuts_a_torn_tail_and_drops_a_ledger_that_misses_the_snapshot() {
        let mut l = Ledger::recovered(limits(), LedgerRecovered { segments: vec![], end: 0, next: Index(1) });
        let mut files = std::collections::BTreeMap::new();
        for i in 1..=10 {
            l.append(Record::of(&entry(i, 1)));
            write_all(&mut l, &mut files);
        }
        let (r, ops) = scan(&files, Index(3));
        assert_eq!(r.next, Index(11));
        assert!(ops.is_empty(), "a whole ledger needs no repair: {ops:?}");
        // A torn last record.
        let last = files.keys().last().unwrap().clone();
        let len = files[&last].len();
        files.get_mut(&last).unwrap().truncate(len - 3);
        let (r, ops) = scan(&files, Index(3));
        assert_eq!(r.next, Index(10));
        assert!(matches!(&ops[0], IoOp::Truncate { file, .. } if *file == last));
        // The same tear with a snapshot at 10: the ledger no longer reaches it and starts afresh.
        let (r, ops) = scan(&files, Index(10));
        assert_eq!((r.next, r.segments.len()), (Index(11), 0));
        assert_eq!(ops.iter().filter(|o| matches!(o, IoOp::Remove { .. })).count(), files.len());
        // A segment after the snapshot that lost its tail (it was never fsynced) leaves a hole
        // before the next one: the ledger is cut at the hole, and the next ones removed.
        let (r, _) = scan(&files, Index(3));
        let mut holed = files.clone();
        let names: Vec<String> = holed.keys().cloned().collect();
        let middle = &names[names.len() / 2];
        let len = holed[middle].len();
        holed.get_mut(middle).unwrap().truncate(len - 10);
        let (cut, ops) = scan(&holed, Index(3));
        assert!(cut.next < r.next, "cut at the hole: {:?} then {:?}", r.next, cut.next);
        assert!(ops.iter().any(|o| matches!(o, IoOp::Truncate { file, .. } if file == middle)));
        assert!(ops.iter().any(|o| matches!(o, IoOp::Remove { file } if *file == names[names.len() - 1])));
        // No ledger at all after a snapshot (an older version's data, say): it starts after it.
        let (r, ops) = scan(&Default::default(), Index(40));
        assert_eq!((r.next, ops.len()), (Index(41), 0));
    }
}
