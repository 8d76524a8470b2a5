//! A watcher's resync: every live session of the kinds it watches, as of one index, streamed
//! with bounded memory however many sessions there are.
//!
//! The view consistent at one index is the newest snapshot: a file that does not change, whose
//! state is a sequence of sections (see `snapshot_format.rs`), and the source files it refers to,
//! which do not change either. While a resync reads them they are pinned: the engine defers
//! removing them (and the ledger keeps every entry after the snapshot, for the changes that
//! follow). The resync reads the snapshot a piece at a time, holds at most one section and the
//! sessions made from it, and for a source whose records only its file holds, reads the file
//! beside its entries, pairing each untaken entry with its frame. So the server's memory for a
//! resync is a few pieces, whatever the state's size.

use crate::codec::{decode_snapshot_header, SNAPSHOT_HEADER_LEN};
use crate::events::{BriefStatus, SessionBrief, SessionSnapshot};
use crate::io::{DiskError, IoOp, IoReply};
use crate::sessions::Session;
use crate::snapshot_format::{section_at, Meta, Section, SourceMeta};
use crate::stored::{frame_at, source_name, Frame, Spilled, FRAME_HEADER_LEN};
use crate::types::{Index, Kind, SessionId};
use bytes::Bytes;
use std::collections::VecDeque;

/// A file read a piece at a time from an offset.
#[derive(Debug)]
struct Piecewise {
    file: String,
    /// The file offset `buf` starts at.
    offset: u64,
    buf: Bytes,
    /// The file has no more bytes after `buf`.
    ended: bool,
}

impl Piecewise {
    fn new(file: String, offset: u64) -> Piecewise {
        Piecewise { file, offset, buf: Bytes::new(), ended: false }
    }

    fn read_op(&self, len: u64) -> IoOp {
        IoOp::ReadAt { file: self.file.clone(), offset: self.offset + self.buf.len() as u64, len }
    }

    fn append(&mut self, data: Vec<u8>) {
        if data.is_empty() {
            self.ended = true;
            return;
        }
        let mut joined = Vec::with_capacity(self.buf.len() + data.len());
        joined.extend_from_slice(&self.buf);
        joined.extend_from_slice(&data);
        self.buf = Bytes::from(joined);
    }

    fn consume(&mut self, n: usize) {
        self.buf = self.buf.slice(n..);
        self.offset += n as u64;
    }

    /// Drops what was read (a damaged piece), to read it again from the same offset.
    fn reread(&mut self) {
        self.buf = Bytes::new();
        self.ended = false;
    }
}

/// The source whose sections are being read.
#[derive(Debug)]
struct SourceCursor {
    meta: SourceMeta,
    /// Entries (and held sessions) of it seen so far: positions below `meta.taken` were taken.
    spilled_pos: u64,
    held_pos: u64,
    /// Its file, read beside its untaken entries (only for a source of a watched kind whose
    /// records are not held in the snapshot).
    file: Option<Piecewise>,
    /// Untaken entries waiting for their frames.
    pairing: VecDeque<Spilled>,
}

/// What the resync needs next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Read this to go on.
    Read(IoOp),
    /// Sessions are ready in [`Resync::take`].
    Ready,
    /// Every session was produced.
    Done,
}

#[derive(Debug)]
pub(crate) struct Resync {
    /// The snapshot's index: the resync is consistent at it.
    pub at: Index,
    /// The files read, pinned while the resync lasts.
    pub pins: Vec<String>,
    kinds: Vec<Kind>,
    snap: Option<Piecewise>,
    header_checked: bool,
    meta: Option<Meta>,
    source: Option<SourceCursor>,
    ready: VecDeque<SessionSnapshot>,
    done: bool,
    /// Damaged reads of the same place in a row.
    pub failures: u32,
    /// Only under the `resync-skips-spilled` mutation: sessions only a source file holds are
    /// left out.
    pub skip_spilled: bool,
}

/// Why a resync cannot go on.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Broken(pub String);

impl Resync {
    /// A resync of the snapshot `file` at `at` (none: the empty state before any entry).
    pub fn new(at: Index, file: Option<String>, pins: Vec<String>, kinds: Vec<Kind>) -> Resync {
        let done = file.is_none();
        let snap = file.map(|f| Piecewise::new(f, 0));
        Resync {
            at,
            pins,
            kinds,
            snap,
            header_checked: false,
            meta: None,
            source: None,
            ready: VecDeque::new(),
            done,
            failures: 0,
            skip_spilled: false,
        }
    }

    fn watched(&self, kind: Kind) -> bool {
        self.kinds.is_empty() || self.kinds.contains(&kind)
    }

    /// Takes ready sessions, up to `count` and about `bytes_max` bytes (at least one).
    pub fn take(&mut self, count: usize, bytes_max: u64) -> Vec<SessionSnapshot> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < count {
            let Some(s) = self.ready.front() else { break };
            let size = s.brief.bytes + 64;
            if !out.is_empty() && bytes + size > bytes_max {
                break;
            }
            bytes += size;
            out.push(self.ready.pop_front().expect("checked"));
        }
        out
    }

    /// Goes on until sessions are ready, a read is needed, or the resync is done.
    pub fn advance(&mut self, piece_bytes: u64) -> Result<Next, Broken> {
        loop {
            if !self.ready.is_empty() {
                return Ok(Next::Ready);
            }
            if self.done {
                return Ok(Next::Done);
            }
            if let Some(next) = self.pair(piece_bytes)? {
                return Ok(next);
            }
            if self.source.as_ref().is_some_and(|s| !s.pairing.is_empty()) {
                continue;
            }
            if let Some(next) = self.next_section(piece_bytes)? {
                return Ok(next);
            }
        }
    }

    /// A read finished (an empty one: the file ends there).
    pub fn on_read(&mut self, result: Result<IoReply, DiskError>) -> Result<(), Broken> {
        let paired = self.paired_read();
        let target = match self.source.as_mut().and_then(|s| s.file.as_mut()).filter(|_| paired) {
            Some(f) => f,
            None => self.snap.as_mut().expect("a resync reads its snapshot"),
        };
        match result {
            Ok(IoReply::Data(data)) => target.append(data),
            Err(DiskError::NotFound) => return Err(Broken(format!("{} is gone", target.file))),
            Ok(_) | Err(_) => {
                self.failures += 1;
                target.reread();
            }
        }
        Ok(())
    }

    /// Whether the read in flight is of the current source's file (entries wait for frames).
    fn paired_read(&self) -> bool {
        self.source.as_ref().is_some_and(|s| !s.pairing.is_empty())
    }

    /// Pairs untaken entries with their frames from the source file.
    fn pair(&mut self, piece_bytes: u64) -> Result<Option<Next>, Broken> {
        let Some(src) = self.source.as_mut() else { return Ok(None) };
        let Some(file) = src.file.as_mut() else { return Ok(None) };
        while let Some(entry) = src.pairing.front() {
            let frame = match frame_at(&file.buf) {
                Ok(Some(f)) => f,
                Ok(None) if file.ended => {
                    return Err(Broken(format!("{} ends before session {}", file.file, entry.id.0)))
                }
                Ok(None) => return Ok(Some(Next::Read(file.read_op(piece_bytes)))),
                Err(()) => {
                    self.failures += 1;
                    file.reread();
                    return Ok(Some(Next::Read(file.read_op(piece_bytes))));
                }
            };
            let len = frame.len();
            let decoded: Frame = postcard::from_bytes(&frame[FRAME_HEADER_LEN as usize..])
                .map_err(|e| Broken(format!("{}: undecodable frame: {e}", file.file)))?;
            if decoded.id != entry.id {
                return Err(Broken(format!(
                    "{} holds session {} where {} was expected",
                    file.file, decoded.id.0, entry.id.0
                )));
            }
            let entry = src.pairing.pop_front().expect("checked");
            file.consume(len);
            self.failures = 0;
            self.ready.push_back(spilled_snapshot(src.meta.kind, &entry, decoded));
        }
        Ok(if self.ready.is_empty() { None } else { Some(Next::Ready) })
    }

    /// Decodes the snapshot's next section and makes sessions of it.
    fn next_section(&mut self, piece_bytes: u64) -> Result<Option<Next>, Broken> {
        let snap = self.snap.as_mut().expect("a resync that is not done reads its snapshot");
        if !self.header_checked {
            if snap.buf.len() < SNAPSHOT_HEADER_LEN {
                return self.more(piece_bytes);
            }
            let (index, _) = decode_snapshot_header(&snap.buf).map_err(|e| Broken(format!("{}: {e}", snap.file)))?;
            if index != self.at {
                return Err(Broken(format!("{} is at index {index}, not {}", snap.file, self.at)));
            }
            snap.consume(SNAPSHOT_HEADER_LEN);
            self.header_checked = true;
        }
        let (section, len) = match section_at(&snap.buf) {
            Ok(Some(s)) => s,
            Ok(None) if snap.ended => return Err(Broken(format!("{} ends inside a section", snap.file))),
            Ok(None) => return self.more(piece_bytes),
            Err(_) => {
                self.failures += 1;
                snap.reread();
                return self.more(piece_bytes);
            }
        };
        snap.consume(len);
        self.failures = 0;
        self.on_section(section)?;
        Ok(None)
    }

    fn more(&self, piece_bytes: u64) -> Result<Option<Next>, Broken> {
        let snap = self.snap.as_ref().expect("reading the snapshot");
        Ok(Some(Next::Read(snap.read_op(piece_bytes))))
    }

    fn on_section(&mut self, section: Section) -> Result<(), Broken> {
        match section {
            Section::Meta(meta) => {
                if meta.applied != self.at {
                    return Err(Broken(format!("the snapshot's state is at {}, not {}", meta.applied, self.at)));
                }
                self.meta = Some(meta);
            }
            Section::Dedup(_) | Section::Tombstones(_) => {}
            Section::Sessions(items) => {
                for (id, s) in items {
                    if self.watched(s.kind) {
                        self.ready.push_back(memory_snapshot(id, s));
                    }
                }
            }
            Section::Spilled { source, entries } => {
                let skip = self.skip_spilled;
                let src = self.source_cursor(source)?;
                for e in entries {
                    let pos = src.spilled_pos;
                    src.spilled_pos += 1;
                    if pos >= src.meta.taken && src.file.is_some() && !skip {
                        src.pairing.push_back(e);
                    }
                }
            }
            Section::Held { source, sessions } => {
                let kind = self.source_cursor(source)?.meta.kind;
                let watched = self.watched(kind);
                let src = self.source.as_mut().expect("the cursor was just set");
                for (id, s) in sessions {
                    let pos = src.held_pos;
                    src.held_pos += 1;
                    if pos >= src.meta.taken && watched {
                        self.ready.push_back(memory_snapshot(id, s));
                    }
                }
            }
            Section::End { .. } => self.done = true,
        }
        Ok(())
    }

    /// The cursor of `source`, started when its first section comes.
    fn source_cursor(&mut self, source: crate::types::SourceId) -> Result<&mut SourceCursor, Broken> {
        if self.source.as_ref().is_none_or(|s| s.meta.id != source) {
            let meta = self.meta.as_ref().ok_or_else(|| Broken("a source section before the meta section".into()))?;
            let m = meta
                .sources
                .iter()
                .find(|m| m.id == source)
                .ok_or_else(|| Broken(format!("source {} unlisted", source.0)))?;
            let reads_file = !m.held && (self.kinds.is_empty() || self.kinds.contains(&m.kind));
            let file = reads_file.then(|| Piecewise::new(source_name(m.id), m.taken_offset));
            self.source =
                Some(SourceCursor { meta: m.clone(), spilled_pos: 0, held_pos: 0, file, pairing: VecDeque::new() });
        }
        Ok(self.source.as_mut().expect("set above"))
    }

    /// Memory the resync holds: what was read and not yet made into sessions, and the sessions
    /// not yet sent.
    pub fn held_bytes(&self) -> u64 {
        let snap = self.snap.as_ref().map_or(0, |s| s.buf.len() as u64);
        let src = self.source.as_ref().and_then(|s| s.file.as_ref()).map_or(0, |f| f.buf.len() as u64);
        let ready: u64 = self.ready.iter().map(|s| s.brief.bytes + 64).sum();
        snap + src + ready
    }
}

fn memory_snapshot(id: SessionId, s: Session) -> SessionSnapshot {
    SessionSnapshot { session: id, kind: s.kind, brief: s.brief(), records: s.records, last_failure: s.last_failure }
}

fn spilled_snapshot(kind: Kind, e: &Spilled, frame: Frame) -> SessionSnapshot {
    let brief = SessionBrief {
        status: BriefStatus::Stored { due: e.due },
        attempt: e.attempt,
        failures: e.failures,
        records: e.records,
        bytes: e.bytes,
    };
    SessionSnapshot { session: e.id, kind, brief, records: frame.records, last_failure: frame.last_failure }
}
