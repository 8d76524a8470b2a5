//! Stored sessions kept LSM-style, so that memory does not grow with the sessions waiting.
//!
//! A stored session starts in memory, in the state machine's session table (the memtable).
//! When the memtable grows past `limits.stored_memtable_bytes_max`, the leader proposes a
//! `Spill` of one kind: applying it moves that kind's stored sessions, in repeat order, into a
//! new *source*, whose file every replica writes from the same sessions (so the same bytes).
//! What stays in memory per spilled session is a [`Spilled`] entry: its place in repeat order,
//! the few fields `get` shows, the size of its frame in the file and its state-hash digest.
//!
//! A source is created in two steps, because it must be committed only once a majority holds the
//! file: `Spill` (or `Merge`) is applied everywhere, each replica writes and fsyncs the file and
//! reports it in its append replies, and once a majority has it the leader proposes
//! `SourceReady`. Until a replica's own file is durable and the source ready, it keeps the
//! spilled sessions' records in memory too (`held`), and its snapshots carry them.
//!
//! Sessions are taken in (repeat time, store index, id) order within a kind, so each source is
//! consumed as a prefix: a source only needs a count and a byte offset of what was taken. A
//! `Take` of a spilled session carries its records (the proposer read them from its file or its
//! `held` copy); applying it checks them against the digest and moves the session back into the
//! table, where the take goes on as for any stored session.
//!
//! Too many sources in a kind, and the leader proposes a `Merge` of two neighbouring ones (in
//! age order). Each replica merges the two files' untaken parts into a new file; sessions are
//! still taken from the two meanwhile. When the merge is ready, the new source replaces the two,
//! with as many of its sessions counted as taken as were taken from the two since the merge
//! began (they were the smallest of the two, so they are its first).
//!
//! File format: a 24-byte header (`TRUBAsr1`, kind, crc32 of kind and id, id), then one frame per
//! session, `len u32 | crc32 u32 | payload`, little endian, where the payload is the postcard
//! encoding of [`FrameRef`]. A merge copies frames unchanged.

use crate::hash::digest;
use crate::op::{FailureReason, UnixSecs, Unspilled};
use crate::sessions::{Session, Status};
use crate::types::{Attempt, Index, Kind, SessionId, SourceId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub(crate) const SOURCE_MAGIC: &[u8; 8] = b"TRUBAsr1";
pub(crate) const SOURCE_HEADER_LEN: u64 = 24;
pub(crate) const FRAME_HEADER_LEN: u64 = 8;

/// Memory a stored session in the memtable counts for besides its records.
pub(crate) const MEMTABLE_SESSION_OVERHEAD_BYTES: u64 = 128;

/// The file name of a source in the data directory.
pub fn source_name(id: SourceId) -> String {
    format!("src-{:020}", id.0)
}

pub(crate) fn parse_source_name(name: &str) -> Option<SourceId> {
    let digits = name.strip_prefix("src-")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(SourceId)
}

pub(crate) fn source_header(kind: Kind, id: SourceId) -> [u8; SOURCE_HEADER_LEN as usize] {
    let mut h = [0u8; SOURCE_HEADER_LEN as usize];
    h[..8].copy_from_slice(SOURCE_MAGIC);
    h[8..12].copy_from_slice(&kind.0.to_le_bytes());
    h[16..24].copy_from_slice(&id.0.to_le_bytes());
    let crc = crc32fast::hash(&[&h[8..12], &h[16..24]].concat());
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What a frame holds: the key it is ordered by, and what only the file keeps.
#[derive(Serialize)]
pub(crate) struct FrameRef<'a> {
    pub due: UnixSecs,
    pub stored_at: Index,
    pub id: SessionId,
    pub last_failure: &'a Option<FailureReason>,
    #[serde(with = "crate::op::records_serde")]
    pub records: &'a Vec<Vec<u8>>,
}

#[derive(Deserialize)]
pub(crate) struct Frame {
    pub due: UnixSecs,
    pub stored_at: Index,
    pub id: SessionId,
    pub last_failure: Option<FailureReason>,
    #[serde(with = "crate::op::records_serde")]
    pub records: Vec<Vec<u8>>,
}

/// Only a frame's key, decoded without its records.
#[derive(Deserialize)]
pub(crate) struct FrameKey {
    pub due: UnixSecs,
    pub stored_at: Index,
    pub id: SessionId,
}

impl Frame {
    pub fn into_unspilled(self) -> Unspilled {
        Unspilled { id: self.id, records: self.records, last_failure: self.last_failure }
    }
}

fn frame_ref(id: SessionId, s: &Session) -> FrameRef<'_> {
    let Status::Stored { due, stored_at } = s.status else { panic!("only stored sessions are spilled") };
    FrameRef { due, stored_at, id, last_failure: &s.last_failure, records: &s.records }
}

/// The length of a session's frame, header included, without encoding it.
fn frame_len(id: SessionId, s: &Session) -> u32 {
    let payload = postcard::experimental::serialized_size(&frame_ref(id, s)).expect("sizing into memory cannot fail");
    (payload as u64 + FRAME_HEADER_LEN) as u32
}

/// Appends one session's frame to `out`; returns the frame's length.
pub(crate) fn push_frame(out: &mut Vec<u8>, id: SessionId, s: &Session) -> u32 {
    let frame = frame_ref(id, s);
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN as usize]);
    let mut buf = postcard::to_extend(&frame, std::mem::take(out)).expect("postcard encoding into memory cannot fail");
    let len = (buf.len() - start) as u64 - FRAME_HEADER_LEN;
    let crc = crc32fast::hash(&buf[start + FRAME_HEADER_LEN as usize..]);
    buf[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    *out = buf;
    (len + FRAME_HEADER_LEN) as u32
}

/// The frame at the start of `buf`, if it is all there: `Ok(None)` if more bytes are needed,
/// `Err` if its checksum does not match. Returns the frame's bytes (header included).
pub(crate) fn frame_at(buf: &[u8]) -> Result<Option<&[u8]>, ()> {
    if buf.len() < FRAME_HEADER_LEN as usize {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    let end = FRAME_HEADER_LEN as usize + len;
    if buf.len() < end {
        return Ok(None);
    }
    if crc32fast::hash(&buf[FRAME_HEADER_LEN as usize..end]) != crc {
        return Err(());
    }
    Ok(Some(&buf[..end]))
}

/// The length a frame announces in its header (what a reader must have to hold it).
pub(crate) fn frame_len_announced(buf: &[u8]) -> Option<usize> {
    (buf.len() >= 4).then(|| FRAME_HEADER_LEN as usize + u32::from_le_bytes(buf[..4].try_into().expect("4")) as usize)
}

/// Sessions and their records, as a source file holds them.
pub type SourceSessions = Vec<(SessionId, Vec<Vec<u8>>)>;

/// The sessions in a source file, with their records, in file order: for tools and checkers
/// that look at a replica's files from outside.
pub fn decode_source_file(data: &[u8]) -> Result<SourceSessions, String> {
    if data.len() < SOURCE_HEADER_LEN as usize || &data[..8] != SOURCE_MAGIC {
        return Err("not a source file".into());
    }
    let mut at = SOURCE_HEADER_LEN as usize;
    let mut out = Vec::new();
    while at < data.len() {
        let frame = match frame_at(&data[at..]) {
            Ok(Some(f)) => f,
            Ok(None) => return Err(format!("ends inside a frame at byte {at}")),
            Err(()) => return Err(format!("checksum mismatch at byte {at}")),
        };
        let f: Frame = postcard::from_bytes(&frame[FRAME_HEADER_LEN as usize..]).map_err(|e| e.to_string())?;
        at += frame.len();
        out.push((f.id, f.records));
    }
    Ok(out)
}

/// A spilled session as the state keeps it in memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Spilled {
    pub due: UnixSecs,
    pub stored_at: Index,
    pub id: SessionId,
    pub attempt: Attempt,
    pub failures: u32,
    pub records: u32,
    pub frame_len: u32,
    pub bytes: u64,
    /// The session's state-hash digest: a take's carried records are checked against it.
    pub digest: u64,
}

impl Spilled {
    pub fn key(&self) -> (UnixSecs, Index, SessionId) {
        (self.due, self.stored_at, self.id)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Source {
    pub id: SourceId,
    /// Its sessions in repeat order.
    pub entries: Vec<Spilled>,
    /// Sessions taken so far (always the first ones), and the file offset where the rest start.
    pub taken: u64,
    pub taken_offset: u64,
    /// A majority holds the file.
    pub ready: bool,
    /// Its sessions' ids in id order, with their positions (taken ones too: a position below
    /// `taken` means taken). Two flat arrays cost 12 bytes a session, a third of a tree map's.
    ids: Vec<SessionId>,
    ids_pos: Vec<u32>,
}

impl Source {
    pub(crate) fn new(id: SourceId, entries: Vec<Spilled>, taken: u64, taken_offset: u64, ready: bool) -> Source {
        let mut s = Source { id, entries, taken, taken_offset, ready, ids: Vec::new(), ids_pos: Vec::new() };
        s.index_ids();
        s
    }

    fn index_ids(&mut self) {
        let mut order: Vec<(SessionId, u32)> = self.entries.iter().enumerate().map(|(p, e)| (e.id, p as u32)).collect();
        order.sort_unstable();
        self.ids = order.iter().map(|x| x.0).collect();
        self.ids_pos = order.iter().map(|x| x.1).collect();
    }

    /// The position of an untaken session.
    fn position(&self, id: SessionId) -> Option<u32> {
        let i = self.ids.binary_search(&id).ok()?;
        let pos = self.ids_pos[i];
        (pos as u64 >= self.taken).then_some(pos)
    }

    pub fn untaken(&self) -> &[Spilled] {
        &self.entries[self.taken as usize..]
    }

    pub fn head(&self) -> Option<&Spilled> {
        self.entries.get(self.taken as usize)
    }

    fn exhausted(&self) -> bool {
        self.taken as usize == self.entries.len()
    }
}

/// A merge under way: `into` will replace `older` and `newer`, whose untaken parts it holds
/// from the given positions (taken count, file offset) at the merge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PendingMerge {
    pub into: SourceId,
    pub kind: Kind,
    pub older: SourceId,
    pub older_from: (u64, u64),
    pub newer: SourceId,
    pub newer_from: (u64, u64),
    /// Sessions in each of the two (so a replica can write the merged file from the two files
    /// even once the merge is ready and the two are gone from the state).
    pub older_len: u64,
    pub newer_len: u64,
}

/// Where a spilled session is: its kind, source, and position in the source's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SpillPos {
    pub kind: Kind,
    pub source: SourceId,
    pub pos: u32,
}

/// A source file this replica needs written: from held sessions (a spill) or by merging two
/// files (a merge). Handed to the engine, which writes it in the background.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FileJob {
    Spill { kind: Kind, source: SourceId },
    Merge(PendingMerge),
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Sources {
    /// Per kind, its sources in age order (a merged source takes its two's place).
    pub kinds: BTreeMap<Kind, Vec<Source>>,
    pub merges: Vec<PendingMerge>,
    /// Records of spilled sessions whose source file may not yet be durable here, by source and
    /// position. Local, not replicated: a replica drops them once the source is ready and its own
    /// file durable, and its snapshots carry what it still holds.
    pub held: BTreeMap<SourceId, Vec<(SessionId, Session)>>,
    /// Files the state stopped referencing since the engine last asked (merged away, or all taken).
    pub gone: Vec<SourceId>,
    /// Files this replica must write, in the order the state asked for them.
    pub jobs: Vec<FileJob>,
}

impl Sources {
    pub fn source(&self, kind: Kind, id: SourceId) -> Option<&Source> {
        self.kinds.get(&kind)?.iter().find(|s| s.id == id)
    }

    fn source_mut(&mut self, kind: Kind, id: SourceId) -> Option<&mut Source> {
        self.kinds.get_mut(&kind)?.iter_mut().find(|s| s.id == id)
    }

    /// Where a spilled (untaken) session is, and what the state keeps of it.
    pub fn spilled(&self, id: SessionId) -> Option<(SpillPos, &Spilled)> {
        self.kinds.iter().find_map(|(kind, list)| {
            list.iter().find_map(|s| {
                let pos = s.position(id)?;
                Some((SpillPos { kind: *kind, source: s.id, pos }, &s.entries[pos as usize]))
            })
        })
    }

    pub fn locate(&self, id: SessionId) -> Option<SpillPos> {
        self.spilled(id).map(|(p, _)| p)
    }

    pub fn spilled_count(&self) -> u64 {
        self.kinds.values().flatten().map(|s| s.untaken().len() as u64).sum()
    }

    /// Every spilled (untaken) session.
    pub fn all_spilled(&self) -> impl Iterator<Item = (SpillPos, &Spilled)> + '_ {
        self.kinds.iter().flat_map(|(kind, list)| {
            list.iter().flat_map(move |s| {
                s.untaken()
                    .iter()
                    .enumerate()
                    .map(move |(i, e)| (SpillPos { kind: *kind, source: s.id, pos: (s.taken as usize + i) as u32 }, e))
            })
        })
    }

    /// Sources this state refers to (every one needs its file, or held records, here).
    pub fn referenced(&self) -> impl Iterator<Item = SourceId> + '_ {
        self.kinds.values().flatten().map(|s| s.id)
    }

    /// Sources a replica needs a file for: those referred to, and merges under way.
    pub fn needing_files(&self) -> impl Iterator<Item = SourceId> + '_ {
        self.referenced().chain(self.merges.iter().map(|m| m.into))
    }

    /// Untaken spilled sessions of a kind, one ordered slice per source.
    pub fn untaken_of(&self, kind: Kind) -> impl Iterator<Item = &[Spilled]> + '_ {
        self.kinds.get(&kind).into_iter().flatten().map(|s| s.untaken())
    }

    /// Moves `sessions` (a kind's memtable, in repeat order) into a new source `id`.
    pub fn spill(&mut self, kind: Kind, id: SourceId, sessions: Vec<(SessionId, Session)>) {
        let mut entries = Vec::with_capacity(sessions.len());
        for (sid, s) in &sessions {
            let Status::Stored { due, stored_at } = s.status else { panic!("only stored sessions are spilled") };
            // Only the length here: the file is encoded once, by the replica's spill job.
            let frame_len = frame_len(*sid, s);
            entries.push(Spilled {
                due,
                stored_at,
                id: *sid,
                attempt: s.attempt,
                failures: s.failures,
                records: s.records.len() as u32,
                frame_len,
                bytes: s.bytes,
                digest: s.digest(*sid),
            });
        }
        let source = Source::new(id, entries, 0, SOURCE_HEADER_LEN, false);
        self.kinds.entry(kind).or_default().push(source);
        self.held.insert(id, sessions);
        self.jobs.push(FileJob::Spill { kind, source: id });
    }

    /// Starts merging two neighbouring ready sources; refused (false) otherwise.
    pub fn merge(&mut self, kind: Kind, older: SourceId, newer: SourceId, into: SourceId) -> bool {
        let Some(list) = self.kinds.get(&kind) else { return false };
        let Some(i) = list.iter().position(|s| s.id == older) else { return false };
        let neighbours = list.get(i + 1).is_some_and(|s| s.id == newer);
        let busy = self.merges.iter().any(|m| [m.older, m.newer].iter().any(|x| *x == older || *x == newer));
        if !neighbours || busy || !list[i].ready || !list[i + 1].ready {
            return false;
        }
        let (o, n) = (&list[i], &list[i + 1]);
        let m = PendingMerge {
            into,
            kind,
            older,
            older_from: (o.taken, o.taken_offset),
            newer,
            newer_from: (n.taken, n.taken_offset),
            older_len: o.entries.len() as u64,
            newer_len: n.entries.len() as u64,
        };
        self.merges.push(m.clone());
        self.jobs.push(FileJob::Merge(m));
        true
    }

    /// A source (spilled or merged) is committed. Returns false if there is no such pending one.
    pub fn ready(&mut self, id: SourceId) -> bool {
        if let Some(i) = self.merges.iter().position(|m| m.into == id) {
            let m = self.merges.remove(i);
            self.finish_merge(m);
            return true;
        }
        let Some((kind, pos)) = self.find(id) else { return false };
        let s = &mut self.kinds.get_mut(&kind).expect("found")[pos];
        if s.ready {
            return false;
        }
        s.ready = true;
        self.drop_if_exhausted(kind, id);
        true
    }

    fn find(&self, id: SourceId) -> Option<(Kind, usize)> {
        self.kinds.iter().find_map(|(k, list)| list.iter().position(|s| s.id == id).map(|p| (*k, p)))
    }

    /// The merged source replaces its two; what was taken from them since the merge began is
    /// its first sessions.
    fn finish_merge(&mut self, m: PendingMerge) {
        let list = self.kinds.get_mut(&m.kind).expect("a merging kind has sources");
        let i = list.iter().position(|s| s.id == m.older).expect("merged sources stay until the merge is ready");
        assert_eq!(list[i + 1].id, m.newer, "merged sources are neighbours");
        let newer = list.remove(i + 1);
        let older = list.remove(i);
        let (a, b) = (&older.entries[m.older_from.0 as usize..], &newer.entries[m.newer_from.0 as usize..]);
        let mut entries = Vec::with_capacity(a.len() + b.len());
        let (mut x, mut y) = (0, 0);
        while x < a.len() || y < b.len() {
            let from_a = y == b.len() || (x < a.len() && a[x].key() < b[y].key());
            if from_a {
                entries.push(a[x].clone());
                x += 1;
            } else {
                entries.push(b[y].clone());
                y += 1;
            }
        }
        let taken = (older.taken - m.older_from.0) + (newer.taken - m.newer_from.0);
        let taken_offset =
            SOURCE_HEADER_LEN + entries[..taken as usize].iter().map(|e| e.frame_len as u64).sum::<u64>();
        list.insert(i, Source::new(m.into, entries, taken, taken_offset, true));
        self.gone.extend([older.id, newer.id]);
        self.drop_if_exhausted(m.kind, m.into);
    }

    /// A ready source all taken, and not being merged, is dropped (its file becomes garbage).
    fn drop_if_exhausted(&mut self, kind: Kind, id: SourceId) {
        let merging = self.merges.iter().any(|m| m.older == id || m.newer == id);
        let list = self.kinds.get_mut(&kind).expect("kind has sources");
        let Some(pos) = list.iter().position(|s| s.id == id) else { return };
        if !list[pos].ready || merging || !list[pos].exhausted() {
            return;
        }
        list.remove(pos);
        if list.is_empty() {
            self.kinds.remove(&kind);
        }
        self.held.remove(&id);
        self.gone.push(id);
    }

    /// Takes a spilled session out of its source with the records a `Take` carried, rebuilding
    /// it (as stored). `None` if it is not its source's next, or the records do not match.
    pub fn unspill(&mut self, id: SessionId, carried: &Unspilled, kind: Kind) -> Option<Session> {
        let p = self.locate(id)?;
        let src = self.source(p.kind, p.source)?;
        if src.taken != p.pos as u64 {
            return None;
        }
        let e = &src.entries[p.pos as usize];
        let mut s = Session {
            kind,
            attempt: e.attempt,
            records: Vec::new(),
            bytes: 0,
            status: Status::Stored { due: e.due, stored_at: e.stored_at },
            failures: e.failures,
            last_failure: carried.last_failure.clone(),
            records_hash: 0,
        };
        for r in &carried.records {
            s.push(r.clone());
        }
        if s.digest(id) != e.digest {
            return None;
        }
        let frame_len = e.frame_len as u64;
        let src = self.source_mut(p.kind, p.source).expect("checked");
        src.taken += 1;
        src.taken_offset += frame_len;
        self.drop_if_exhausted(p.kind, p.source);
        Some(s)
    }

    /// Forgets the held records of a source once it is ready and its file durable here.
    pub fn release_held(&mut self, id: SourceId) {
        let ready = self.find(id).is_none_or(|(k, p)| self.kinds[&k][p].ready);
        if ready {
            self.held.remove(&id);
        }
    }

    /// The records of a spilled session, if held in memory here.
    pub fn held_records(&self, id: SessionId) -> Option<Unspilled> {
        let p = self.locate(id)?;
        let (sid, s) = self.held.get(&p.source)?.get(p.pos as usize)?;
        debug_assert_eq!(*sid, id);
        Some(Unspilled { id, records: s.records.clone(), last_failure: s.last_failure.clone() })
    }

    /// What the state hash says of the sources: which exist, how much of each is taken, and
    /// the merges under way (the sessions in them are in the hash already, by their digests).
    pub fn summary_digest(&self) -> u64 {
        let list: Vec<_> =
            self.kinds.iter().flat_map(|(k, l)| l.iter().map(move |s| (*k, s.id, s.taken, s.ready))).collect();
        digest(5, &(list, &self.merges))
    }

    /// Rebuilds the id indexes (and the file jobs still owed) after loading a snapshot.
    pub fn rebuild(&mut self) {
        self.jobs.clear();
        for list in self.kinds.values_mut() {
            list.iter_mut().for_each(Source::index_ids);
        }
        for (kind, list) in &self.kinds {
            for s in list {
                if self.held.contains_key(&s.id) {
                    self.jobs.push(FileJob::Spill { kind: *kind, source: s.id });
                }
            }
        }
        self.jobs.extend(self.merges.iter().cloned().map(FileJob::Merge));
        self.jobs.sort_by_key(|j| match j {
            FileJob::Spill { source, .. } => *source,
            FileJob::Merge(m) => m.into,
        });
    }

    /// What `invariants` asserts of a state decoded from a snapshot, as an error: a snapshot
    /// from a peer is input, which may be refused but must never make the replica panic.
    /// (Counts, `taken` and held records were checked while decoding.)
    pub fn check_decoded(&self) -> Result<(), String> {
        for list in self.kinds.values() {
            for s in list {
                if !s.entries.windows(2).all(|w| w[0].key() < w[1].key()) {
                    return Err(format!("source {} is not in repeat order", s.id.0));
                }
                let taken = s.entries.get(..s.taken as usize).ok_or("a source has more taken than it holds")?;
                let offset = SOURCE_HEADER_LEN + taken.iter().map(|e| e.frame_len as u64).sum::<u64>();
                if offset != s.taken_offset {
                    return Err(format!("source {}'s taken offset {} is not {offset}", s.id.0, s.taken_offset));
                }
            }
        }
        match self
            .merges
            .iter()
            .find(|m| self.source(m.kind, m.older).is_none() || self.source(m.kind, m.newer).is_none())
        {
            Some(m) => Err(format!("a merge into {} names a source the state does not hold", m.into.0)),
            None => Ok(()),
        }
    }

    /// Sources, their held records and their id indexes agree; with `full`, every source is in repeat order.
    pub fn invariants(&self, full: bool) {
        for (kind, list) in &self.kinds {
            assert!(!list.is_empty(), "a kind without sources has no list");
            for s in list {
                assert!(s.taken as usize <= s.entries.len(), "a source never has more taken than it holds");
                if let Some(h) = self.held.get(&s.id) {
                    assert_eq!(h.len(), s.entries.len(), "held records mirror their source");
                }
                if full {
                    assert!(s.entries.windows(2).all(|w| w[0].key() < w[1].key()), "a source is in repeat order");
                    let offset = SOURCE_HEADER_LEN
                        + s.entries[..s.taken as usize].iter().map(|e| e.frame_len as u64).sum::<u64>();
                    assert_eq!(offset, s.taken_offset, "a source's taken offset matches its taken frames");
                    assert_eq!(s.ids.len(), s.entries.len(), "a source's id index covers it");
                    for (pos, e) in s.untaken().iter().enumerate() {
                        let p = self.locate(e.id).expect("an untaken session is located");
                        assert_eq!((p.kind, p.source, p.pos as u64), (*kind, s.id, s.taken + pos as u64));
                    }
                }
            }
        }
        for m in &self.merges {
            assert!(self.source(m.kind, m.older).is_some() && self.source(m.kind, m.newer).is_some());
        }
    }
}

/// Merges a kind's memtable order with its sources' untaken parts: (due, stored_at, id) order.
pub(crate) struct InOrder<'a, M: Iterator<Item = (UnixSecs, Index, SessionId)>> {
    memtable: std::iter::Peekable<M>,
    sources: Vec<&'a [Spilled]>,
    /// Only under the `sources-out-of-order` mutation: the memtable is drained first.
    memtable_first: bool,
}

impl<'a, M: Iterator<Item = (UnixSecs, Index, SessionId)>> InOrder<'a, M> {
    pub fn new(memtable: M, sources: impl Iterator<Item = &'a [Spilled]>, memtable_first: bool) -> Self {
        InOrder { memtable: memtable.peekable(), sources: sources.filter(|s| !s.is_empty()).collect(), memtable_first }
    }
}

impl<M: Iterator<Item = (UnixSecs, Index, SessionId)>> Iterator for InOrder<'_, M> {
    type Item = (UnixSecs, Index, SessionId);

    fn next(&mut self) -> Option<Self::Item> {
        let best = self.sources.iter().enumerate().map(|(i, s)| (s[0].key(), i)).min();
        match (self.memtable.peek().copied(), best) {
            (Some(m), Some((k, _))) if m < k || self.memtable_first => self.memtable.next(),
            (_, Some((k, i))) => {
                self.sources[i] = &self.sources[i][1..];
                if self.sources[i].is_empty() {
                    self.sources.remove(i);
                }
                Some(k)
            }
            (Some(_), None) => self.memtable.next(),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_names_round_trip_and_reject_others() {
        assert_eq!(parse_source_name(&source_name(SourceId(42))), Some(SourceId(42)));
        assert_eq!(parse_source_name("src-42"), None);
        assert_eq!(parse_source_name("seg-00000000000000000042"), None);
    }

    #[test]
    fn a_frame_is_found_whole_and_a_damaged_one_refused() {
        let s = Session {
            kind: Kind(1),
            attempt: Attempt(2),
            records: vec![b"abc".to_vec(), vec![7; 300]],
            bytes: 303,
            status: Status::Stored { due: UnixSecs(5), stored_at: Index(9) },
            failures: 1,
            last_failure: None,
            records_hash: 0,
        };
        let mut out = vec![];
        let len = push_frame(&mut out, SessionId(3), &s) as usize;
        assert_eq!(out.len(), len);
        assert_eq!(frame_len(SessionId(3), &s) as usize, len, "sizing agrees with encoding");
        assert_eq!(frame_len_announced(&out), Some(len));
        assert_eq!(frame_at(&out[..len - 1]), Ok(None));
        let f: Frame = postcard::from_bytes(&frame_at(&out).unwrap().unwrap()[8..]).unwrap();
        assert_eq!((f.id, f.due, f.records.len()), (SessionId(3), UnixSecs(5), 2));
        out[20] ^= 1;
        assert_eq!(frame_at(&out), Err(()));
    }
}
