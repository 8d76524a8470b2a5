//! The replicated log as this replica holds it: the entries since the last snapshot in memory
//! (the leader sends them to followers from here, and they are applied from here), and where
//! the written ones sit on disk, so that a follower can cut off a suffix that a new leader
//! overrides. Writing is done by the engine in group-commit batches (see `engine.rs`); this module
//! only decides where the bytes of a batch go and what a cut must do on disk.

use crate::codec::{encode_record, encode_segment_header, segment_name, SEGMENT_HEADER_LEN};
use crate::io::IoOp;
use crate::membership::Members;
use crate::op::Command;
use crate::op::Entry;
use crate::types::{Index, Term};
use std::collections::{BTreeSet, VecDeque};

/// Where a written record starts, and the crc of the record before it (the chain's value
/// to restore if the log is cut there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub segment: Index,
    pub offset: u64,
    pub prev_crc: u32,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Log {
    /// Segments in index order: (first index, file name). The last one is written to.
    pub segments: Vec<(Index, String)>,
    /// Length of the last segment's written content.
    pub end_offset: u64,
    /// The last segment is known to hold zeros (or records) up to here: the file's length.
    pub zeroed_to: u64,
    /// Crc of the last written record: the next record's `prev_crc`.
    pub last_crc: u32,
    /// Index of the last record written to disk (durable once the batch's fsync completed).
    pub written: Index,
    /// The entry just before the first one held (the snapshot's), and its term.
    pub base: Index,
    pub base_term: Term,
    /// Entries `base + 1 ..= last_index()`, written or not.
    entries: VecDeque<Entry>,
    /// Where entries `base + 1 ..= written` start on disk.
    locs: VecDeque<Loc>,
    /// The held entries that change the membership: consensus uses the latest one from the
    /// moment it is in the log (see `membership.rs`).
    member_changes: BTreeSet<Index>,
}

/// Where one batch goes (its bytes travel separately, in the write request).
#[derive(Clone, Debug)]
pub(crate) struct Placement {
    pub file: String,
    pub offset: u64,
    pub new_segment: bool,
    pub end_offset: u64,
    /// The file's length once written: the records plus the zeros that preallocate after them.
    pub zeroed_to: u64,
    pub last_crc: u32,
    pub locs: Vec<Loc>,
}

impl Log {
    /// A log recovered from disk: `entries` follow `base` and were all read from `locs`.
    pub fn recovered(mut self, base: Index, base_term: Term, entries: Vec<Entry>, locs: Vec<Loc>) -> Log {
        assert_eq!(entries.len(), locs.len(), "every recovered entry has a location");
        assert!(entries.first().is_none_or(|e| e.index == base.next()), "recovered entries follow the base");
        self.base = base;
        self.base_term = base_term;
        self.member_changes = entries.iter().filter(|e| is_member_change(e)).map(|e| e.index).collect();
        self.entries = entries.into();
        self.locs = locs.into();
        self.written = self.last_index();
        self
    }

    pub fn last_index(&self) -> Index {
        Index(self.base.0 + self.entries.len() as u64)
    }

    pub fn last_term(&self) -> Term {
        self.entries.back().map_or(self.base_term, |e| e.term)
    }

    /// The term of the entry at `index`, if this log knows it (0 for index 0).
    pub fn term_at(&self, index: Index) -> Option<Term> {
        if index == self.base {
            return Some(self.base_term);
        }
        self.entry(index).map(|e| e.term)
    }

    pub fn entry(&self, index: Index) -> Option<&Entry> {
        if index <= self.base {
            return None;
        }
        self.entries.get((index.0 - self.base.0 - 1) as usize)
    }

    /// Entries from `from` on, as many as fit in `bytes_max` (at least one if any exist).
    pub fn slice(&self, from: Index, bytes_max: u64) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut i = from;
        while let Some(e) = self.entry(i) {
            let len = crate::codec::encoded_len(e.at, &e.command) as u64;
            if !out.is_empty() && bytes + len > bytes_max {
                break;
            }
            bytes += len;
            out.push(e.clone());
            i = i.next();
        }
        out
    }

    pub fn append(&mut self, entry: Entry) {
        assert_eq!(entry.index, self.last_index().next(), "entries are appended in order");
        assert!(entry.term >= self.last_term(), "terms never go backwards along the log");
        if is_member_change(&entry) {
            self.member_changes.insert(entry.index);
        }
        self.entries.push_back(entry);
    }

    /// The membership of the latest membership entry held after `after`, if any.
    pub fn latest_members(&self, after: Index) -> Option<(Index, &Members)> {
        let index = *self.member_changes.range(after.next()..).next_back()?;
        match &self.entry(index)?.command {
            Command::Members { members, .. } => Some((index, members)),
            _ => None,
        }
    }

    /// The membership entries held after `after`, in log order.
    pub fn member_changes_after(&self, after: Index) -> impl Iterator<Item = &Entry> + '_ {
        self.member_changes.range(after.next()..).filter_map(|i| self.entry(*i))
    }

    /// The index of the latest membership entry held, if any.
    pub fn latest_member_change(&self) -> Option<Index> {
        self.member_changes.last().copied()
    }

    /// Drops the entries from `from` on from memory (a new leader overrides them). The caller
    /// cuts the disk with [`Log::cut_ops`] if any of them were written.
    pub fn truncate(&mut self, from: Index) {
        assert!(from > self.base, "entries covered by the snapshot are committed and never cut");
        self.entries.truncate((from.0 - self.base.0 - 1) as usize);
        self.member_changes.split_off(&from);
    }

    /// Disk operations that cut the written log back so that `from` is the next index written:
    /// remove every later segment, then truncate the segment holding `from` at its start, each
    /// made durable before anything is written after it.
    pub fn cut_ops(&self, from: Index) -> Vec<IoOp> {
        assert!(from <= self.written && from > self.base, "only written, uncommitted entries are cut");
        let loc = self.locs[(from.0 - self.base.0 - 1) as usize];
        // Later segments go first, durably: a crash after the truncation but before their
        // removal would leave a gap between the cut segment's end and the next one's start.
        // The other way round, a crash leaves the overridden entries whole, which is harmless.
        let mut ops = Vec::new();
        let file = self.segment_file(loc.segment);
        let later: Vec<_> = self.segments.iter().filter(|(first, _)| *first > loc.segment).collect();
        for (_, name) in &later {
            ops.push(IoOp::Remove { file: name.clone() });
        }
        if !later.is_empty() {
            ops.push(IoOp::SyncDir);
        }
        ops.push(IoOp::Truncate { file: file.clone(), len: loc.offset });
        ops.push(IoOp::Sync { file });
        ops
    }

    /// Records that the cut made by [`Log::cut_ops`] is durable.
    pub fn cut_done(&mut self, from: Index) {
        let k = (from.0 - self.base.0 - 1) as usize;
        let loc = self.locs[k];
        self.locs.truncate(k);
        self.segments.retain(|(first, _)| *first <= loc.segment);
        self.end_offset = loc.offset.max(SEGMENT_HEADER_LEN as u64);
        self.zeroed_to = self.end_offset;
        self.last_crc = loc.prev_crc;
        self.written = from.prev();
    }

    fn segment_file(&self, first: Index) -> String {
        self.segments.iter().find(|(f, _)| *f == first).expect("a written entry's segment exists").1.clone()
    }

    /// Encodes the entries `written + 1 ..= last` (which must exist) and says where to write
    /// them. A new segment is started when the current one is full; it begins with a header that
    /// carries the chain's crc across the file boundary. When the records would pass the zeros
    /// already there, zeros for `preallocate_bytes` more (within the segment's size) go with them.
    pub fn place(&self, last: Index, segment_bytes_max: u64, preallocate_bytes: u64) -> (Placement, Vec<u8>) {
        let first = self.written.next();
        assert!(first <= last && last <= self.last_index(), "a batch is never empty and continues the log");
        let new_segment = self.segments.is_empty() || self.end_offset >= segment_bytes_max;
        let (file, offset, mut data) = if new_segment {
            (segment_name(first), 0, encode_segment_header(first, self.last_crc))
        } else {
            (self.segments.last().expect("checked").1.clone(), self.end_offset, Vec::with_capacity(64 * 1024))
        };
        let segment = if new_segment { first } else { self.segments.last().expect("checked").0 };
        let mut crc = self.last_crc;
        let mut locs = Vec::with_capacity((last.0 - first.0 + 1) as usize);
        let mut i = first;
        while i <= last {
            let e = self.entry(i).expect("checked above");
            locs.push(Loc { segment, offset: offset + data.len() as u64, prev_crc: crc });
            crc = encode_record(crc, e, &mut data);
            i = i.next();
        }
        let end_offset = offset + data.len() as u64;
        let zeroed_before = if new_segment { 0 } else { self.zeroed_to };
        let mut zeroed_to = zeroed_before.max(end_offset);
        if preallocate_bytes > 0 && end_offset > zeroed_before {
            zeroed_to = (end_offset + preallocate_bytes).min(segment_bytes_max).max(end_offset);
            data.resize((zeroed_to - offset) as usize, 0);
        }
        (Placement { file, offset, new_segment, end_offset, zeroed_to, last_crc: crc, locs }, data)
    }

    /// Records that a placed batch is written (the engine decides when it counts as durable).
    pub fn placed(&mut self, p: Placement) {
        if p.new_segment {
            self.segments.push((self.written.next(), p.file.clone()));
        }
        self.written = Index(self.written.0 + p.locs.len() as u64);
        self.end_offset = p.end_offset;
        self.zeroed_to = if p.new_segment { p.zeroed_to } else { self.zeroed_to.max(p.zeroed_to) };
        self.last_crc = p.last_crc;
        self.locs.extend(p.locs);
    }

    /// Forgets the entries through `index` from memory once a snapshot holds them.
    pub fn compact(&mut self, index: Index) {
        if index <= self.base {
            return;
        }
        let n = ((index.0 - self.base.0) as usize).min(self.entries.len());
        let term = self.term_at(index).expect("compacting only through a held entry");
        self.entries.drain(..n);
        self.locs.drain(..n.min(self.locs.len()));
        self.member_changes = self.member_changes.split_off(&index.next());
        self.base = index;
        self.base_term = term;
    }

    /// Starts over after an installed snapshot: nothing held, nothing written; returns the
    /// segment files that are now obsolete.
    pub fn reset(&mut self, base: Index, base_term: Term) -> Vec<String> {
        let old = std::mem::take(&mut self.segments);
        *self = Log { base, base_term, written: base, ..Log::default() };
        old.into_iter().map(|(_, n)| n).collect()
    }

    /// Segments whose every entry is at or below `index`, never the one being written.
    pub fn covered_by(&self, index: Index) -> Vec<String> {
        let mut out = Vec::new();
        for pair in self.segments.windows(2) {
            if pair[1].0 .0 <= index.0 + 1 {
                out.push(pair[0].1.clone());
            }
        }
        out
    }

    pub fn forget(&mut self, names: &[String]) {
        self.segments.retain(|(_, n)| !names.contains(n));
    }

    pub fn invariants(&self) {
        // `written` may exceed the last index while a cut of overridden entries is pending.
        assert!(self.written >= self.base, "written lies after the base");
        assert_eq!(self.locs.len() as u64, self.written.0 - self.base.0, "every written entry has a location");
        for index in &self.member_changes {
            assert!(self.entry(*index).is_some_and(is_member_change), "a membership entry is held where noted");
        }
        if let Some(first) = self.entries.front() {
            assert_eq!(first.index, self.base.next(), "entries follow the base");
            assert!(first.term >= self.base_term, "terms never go backwards along the log");
        }
    }
}

fn is_member_change(entry: &Entry) -> bool {
    matches!(entry.command, Command::Members { .. })
}
