//! Readers of the ledger: tails and watches, served by any replica from its own ledger.
//!
//! A stream never makes the server hold more than a bounded amount for it, however slow its
//! reader: items are produced only while the reader's window has room (bytes for a tail,
//! events for a watch; the reader acknowledges items by number), and a reader that falls behind
//! is not buffered for but reads older entries from the ledger's files when it is ready, one
//! piece at a time through the disk boundary (so the simulator covers those reads). What a
//! stream holds is its position, its window's accounting and at most one piece being read.
//! A reader whose window stays full for `stream_stall_ms_max` is cut off with a clear reason;
//! one that falls behind retention is told what was compacted away, never skipped over.
//!
//! Entries go out as the bytes the ledger keeps (an encoded [`crate::events::LedgerEntry`]),
//! filtered without decoding by the marks kept beside them; only an entry of which some events
//! match and others do not is decoded and encoded again. An entry is never split across items.
//!
//! Progress marks: a reader that was sent nothing for `progress_every_ms` while the entries it
//! was shown moved on (its filter matched none of them) gets `Progress { through }`, so it
//! still learns how far the log is. Marks and entries never go back.

use crate::config::Limits;
use crate::events::{Filter, StreamError, StreamId, StreamItem, StreamOpen, TailFrom};
use crate::io::{DiskError, IoOp, IoReply, Output};
use crate::ledger::{parse, Ledger, Locate, Parsed, Record, LEDGER_HEADER_LEN};
use crate::resync::{Next, Resync};
use crate::stored::source_name;
use crate::types::{Duration, Index, Instant, Kind, SourceId};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};

/// What an item costs a window of a tail beyond its entries' bytes (so that marks count too).
const ITEM_COST_BYTES: u64 = 16;

/// A piece of a ledger file being read for a stream that is behind.
#[derive(Debug)]
struct DiskRead {
    file: String,
    /// The file offset `buf` starts at: always a record boundary at or before the cursor.
    offset: u64,
    buf: Bytes,
    /// A read is in flight (its token, to tell a stale completion from the current one).
    reading: Option<u64>,
    /// Damaged reads of the same place in a row.
    failures: u32,
}

#[derive(Debug)]
enum Reading {
    Tail,
    /// A watch: while `resync` is there it sends sessions (`resync_read` is its read in
    /// flight); then the changes after the resync's index, as entries.
    Watch {
        resync: Option<Box<Resync>>,
        resync_read: Option<u64>,
    },
}

impl Reading {
    fn resyncing(&self) -> bool {
        matches!(self, Reading::Watch { resync: Some(_), .. })
    }
}

#[derive(Debug)]
struct Stream {
    reading: Reading,
    filter: Filter,
    /// The next ledger index to look at.
    cursor: Index,
    /// The number of the last item sent.
    seq: u64,
    /// Items sent and not yet acknowledged, with their cost, and the window.
    unacked: VecDeque<(u64, u64)>,
    in_window: u64,
    window: u64,
    /// When the last item was sent, and the highest index an item covered.
    last_item_at: Instant,
    reported: Index,
    /// Since when the window has been full with the reader acknowledging nothing.
    full_since: Option<Instant>,
    disk: Option<DiskRead>,
    /// The last error a watcher reported with an acknowledgement (datasync's `Done(err)`).
    last_error: Option<String>,
}

/// A read a stream wants issued: the stream, its token and the operation.
pub(crate) type StreamRead = (StreamId, u64, IoOp);

#[derive(Debug, Default)]
pub(crate) struct Streams {
    open: BTreeMap<StreamId, Stream>,
    /// Disk reads in flight for streams, and the next read token.
    reads: usize,
    next_token: u64,
}

/// What a step of the streams needs from the engine.
pub(crate) struct Ctx<'a> {
    pub ledger: &'a Ledger,
    pub limits: &'a Limits,
    /// For the mutation tests' deliberate bugs.
    pub cfg: &'a crate::config::EngineConfig,
    pub now: Instant,
    /// The replica's last log index (a tail may start at most one past it).
    pub log_last: Index,
    /// The newest durable snapshot, its file and the sources it refers to (a resync reads them).
    pub newest_snapshot: Option<(Index, &'a str, &'a [SourceId])>,
    pub kinds_known: &'a dyn Fn(Kind) -> bool,
    pub out: &'a mut VecDeque<Output>,
    pub reads: &'a mut Vec<StreamRead>,
}

impl Ctx<'_> {
    fn emit(&mut self, id: StreamId, s: &mut Stream, item: StreamItem, cost: u64) {
        s.seq += 1;
        s.unacked.push_back((s.seq, cost));
        s.in_window += cost;
        s.last_item_at = self.now;
        self.out.push_back(Output::Stream { stream: id, seq: s.seq, item });
    }

    fn end(&mut self, id: StreamId, seq: u64, error: StreamError) {
        self.out.push_back(Output::Stream { stream: id, seq: seq + 1, item: StreamItem::End(error) });
    }
}

impl Streams {
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Opens a stream (or refuses it with an `End`).
    pub fn open(&mut self, id: StreamId, open: StreamOpen, ctx: &mut Ctx) {
        if self.open.contains_key(&id) {
            return ctx.end(id, 0, StreamError::AlreadyOpen);
        }
        let max = ctx.limits.streams_max;
        if self.open.len() >= max as usize {
            return ctx.end(id, 0, StreamError::TooManyStreams { max });
        }
        let open_from = match &open {
            StreamOpen::Tail { from, .. } => Some(*from),
            StreamOpen::Watch { .. } => None,
        };
        let (reading, filter, cursor, window) = match open {
            StreamOpen::Tail { from, filter } => {
                let cursor = match from {
                    TailFrom::Index(i) => i.max(Index(1)),
                    TailFrom::Oldest => ctx.ledger.first(),
                    TailFrom::Next => ctx.ledger.next(),
                };
                if cursor > ctx.log_last.next() {
                    return ctx.end(id, 0, StreamError::BeyondHead { from: cursor, head: ctx.log_last });
                }
                (Reading::Tail, filter, cursor, ctx.limits.tail_window_bytes_max)
            }
            StreamOpen::Watch { kinds, resume_after, window } => {
                let max = ctx.limits.watch_window_events_max;
                let mut window = window.map_or(max, |w| w.clamp(1, max)) as u64;
                if ctx.cfg.mutation(|m| m.watch_window_ignored) {
                    window = u64::MAX;
                }
                if let Some(after) = resume_after.filter(|i| *i > ctx.log_last) {
                    return ctx.end(id, 0, StreamError::BeyondHead { from: after.next(), head: ctx.log_last });
                }
                let cursor = resume_after.map_or(Index(0), |i| i.next());
                let filter = Filter { kinds, internal: false, sessions_only: true };
                (Reading::Watch { resync: None, resync_read: None }, filter, cursor, window)
            }
        };
        if let Some(k) = filter.kinds.iter().find(|k| !(ctx.kinds_known)(**k)) {
            return ctx.end(id, 0, StreamError::UnknownKind(*k));
        }
        let stream = Stream {
            reading,
            filter,
            cursor,
            seq: 0,
            unacked: VecDeque::new(),
            in_window: 0,
            window,
            last_item_at: ctx.now,
            reported: cursor.prev(),
            full_since: None,
            disk: None,
            last_error: None,
        };
        let mut stream = stream;
        if matches!(stream.reading, Reading::Tail) && cursor.0 > 0 {
            // A tail from the oldest entry held or from the head learns at once where it starts,
            // so that it can resume from there if its connection breaks before the first entry.
            let opened_at_index = matches!(open_from, Some(TailFrom::Index(_)));
            if !opened_at_index {
                let through = cursor.prev();
                ctx.emit(id, &mut stream, StreamItem::Progress { through }, ITEM_COST_BYTES);
            }
        }
        if matches!(stream.reading, Reading::Watch { .. }) {
            // A watcher resumes after the index it gave if the changes after it are still held,
            // and is resynced otherwise.
            let resumes = stream.cursor.0 > 0 && !matches!(ctx.ledger.locate(stream.cursor), Locate::Compacted { .. });
            if resumes {
                let at = stream.cursor.prev();
                ctx.emit(id, &mut stream, StreamItem::Synced { at }, 0);
            } else {
                start_resync(id, &mut stream, ctx);
            }
        }
        self.open.insert(id, stream);
        self.pump_one(id, ctx);
    }

    /// The reader acknowledged every item through `seq` (with an error text, for a watcher
    /// whose processing failed: it is kept for operators, and the window moves on).
    pub fn ack(&mut self, id: StreamId, seq: u64, error: Option<String>, ctx: &mut Ctx) {
        let Some(s) = self.open.get_mut(&id) else { return };
        while s.unacked.front().is_some_and(|(n, _)| *n <= seq) {
            let (_, cost) = s.unacked.pop_front().expect("checked");
            s.in_window -= cost;
        }
        s.full_since = None;
        if error.is_some() {
            s.last_error = error;
        }
        self.pump_one(id, ctx);
    }

    pub fn close(&mut self, id: StreamId) {
        self.open.remove(&id);
    }

    /// Sends every stream what it has room for (after new entries were applied, say).
    pub fn pump(&mut self, ctx: &mut Ctx) {
        let ids: Vec<StreamId> = self.open.keys().copied().collect();
        for id in ids {
            self.pump_one(id, ctx);
        }
    }

    /// Ends every stream (the replica stopped).
    pub fn stop_all(&mut self, ctx: &mut Ctx) {
        for (id, s) in std::mem::take(&mut self.open) {
            ctx.end(id, s.seq, StreamError::Stopped);
        }
    }

    /// Every `progress_every_ms`: progress marks, and readers stalled too long cut off.
    pub fn tick(&mut self, ctx: &mut Ctx) {
        let every = Duration(ctx.limits.progress_every_ms);
        let stall = Duration(ctx.limits.stream_stall_ms_max);
        let mut cut = Vec::new();
        for (id, s) in self.open.iter_mut() {
            if s.full_since.is_some_and(|t| ctx.now.saturating_since(t) >= stall) {
                cut.push((*id, s.seq));
                continue;
            }
            let moved = s.cursor.prev() > s.reported;
            let quiet = ctx.now.saturating_since(s.last_item_at) >= every;
            // A stream with nothing to say still says so now and then, so that a reader can
            // tell a quiet log from a connection that died without a word.
            let silent = ctx.now.saturating_since(s.last_item_at) >= Duration(ctx.limits.stream_heartbeat_ms);
            let shows_changes = !s.reading.resyncing();
            if (moved && quiet || silent) && shows_changes && s.in_window < s.window {
                let mut through = s.cursor.prev();
                if ctx.cfg.mutation(|m| m.progress_mark_ahead) {
                    through = through.max(ctx.ledger.next().prev());
                }
                s.reported = through;
                let cost = match s.reading {
                    Reading::Tail => ITEM_COST_BYTES,
                    Reading::Watch { .. } => 1,
                };
                ctx.emit(*id, s, StreamItem::Progress { through }, cost);
            }
        }
        for (id, seq) in cut {
            self.open.remove(&id);
            ctx.end(id, seq, StreamError::TooSlow { stalled_ms: stall.0 });
        }
    }

    fn pump_one(&mut self, id: StreamId, ctx: &mut Ctx) {
        let Some(mut s) = self.open.remove(&id) else { return };
        let keep = self.fill(id, &mut s, ctx);
        if keep {
            self.open.insert(id, s);
        }
    }

    /// Sends `s` what its window has room for. False if the stream ended.
    fn fill(&mut self, id: StreamId, s: &mut Stream, ctx: &mut Ctx) -> bool {
        if s.reading.resyncing() {
            match self.fill_resync(id, s, ctx) {
                Some(true) => {}
                Some(false) => return true, // waiting for room or a read
                None => return false,       // ended
            }
        }
        loop {
            if s.in_window >= s.window {
                s.full_since.get_or_insert(ctx.now);
                return true;
            }
            match ctx.ledger.locate(s.cursor) {
                Locate::Future => return true,
                Locate::Compacted { first } if matches!(s.reading, Reading::Tail) => {
                    ctx.end(id, s.seq, StreamError::Compacted { requested: s.cursor, first_available: first });
                    return false;
                }
                Locate::Compacted { .. } => {
                    // A watcher that fell behind what is held starts again from a resync.
                    start_resync(id, s, ctx);
                    return self.fill(id, s, ctx);
                }
                Locate::Cached => {
                    s.disk = None;
                    let before = s.cursor;
                    let records = ctx.ledger.cached_from(s.cursor).map(|r| r.as_ref());
                    let batch = Batch::take(s, records, ctx);
                    if s.cursor == before {
                        // The next entry does not fit the room left: it waits for acknowledgements.
                        s.full_since.get_or_insert(ctx.now);
                        return true;
                    }
                    self.send_batch(id, s, batch, ctx);
                }
                Locate::Disk { file, offset } => {
                    if s.disk.as_ref().is_none_or(|d| d.file != file) {
                        s.disk = Some(DiskRead { file, offset, buf: Bytes::new(), reading: None, failures: 0 });
                    }
                    match self.batch_from_disk(id, s, ctx) {
                        Ok(Some(batch)) => self.send_batch(id, s, batch, ctx),
                        Ok(None) => return true, // waiting for a read
                        Err(e) => {
                            ctx.end(id, s.seq, e);
                            return false;
                        }
                    }
                }
            }
        }
    }

    fn send_batch(&mut self, id: StreamId, s: &mut Stream, batch: Batch, ctx: &mut Ctx) {
        if batch.entries.is_empty() {
            return; // everything looked at was filtered out; the cursor moved on
        }
        let cost = match s.reading {
            Reading::Tail => batch.bytes + ITEM_COST_BYTES,
            Reading::Watch { .. } => batch.events as u64,
        };
        s.reported = batch.through;
        let item = StreamItem::Entries { entries: batch.entries, events: batch.events, through: batch.through };
        ctx.emit(id, s, item, cost);
    }

    /// Takes a batch from the piece read for `s`, or asks for the next piece (`Ok(None)`).
    fn batch_from_disk(&mut self, id: StreamId, s: &mut Stream, ctx: &mut Ctx) -> Result<Option<Batch>, StreamError> {
        let d = s.disk.as_mut().expect("reading from disk");
        if d.reading.is_some() {
            return Ok(None);
        }
        if d.failures > ctx.limits.read_retries_max {
            return Err(StreamError::Damaged { index: s.cursor });
        }
        // Records before the cursor (the piece starts at a remembered position before it).
        let resends = ctx.cfg.mutation(|m| m.tail_resends_old);
        loop {
            match parse(&d.buf) {
                Parsed::Whole(r, len) if r.index < s.cursor && !resends => {
                    d.buf = d.buf.slice(len..);
                    d.offset += len as u64;
                }
                Parsed::Whole(r, _) if r.index > s.cursor => return Err(StreamError::Damaged { index: s.cursor }),
                Parsed::Whole(r, _) if resends => {
                    s.cursor = r.index;
                    break;
                }
                Parsed::Whole(..) => break,
                Parsed::Short => return Ok(self.read_more(id, d, ctx)),
                Parsed::Damaged => return self.damaged(id, s, ctx),
            }
        }
        let mut records = Vec::new();
        let mut rest = d.buf.clone();
        let mut used = 0usize;
        let mut expect = s.cursor;
        while let Parsed::Whole(r, len) = parse(&rest) {
            if r.index != expect {
                break;
            }
            expect = expect.next();
            rest = rest.slice(len..);
            used += len;
            records.push((r, used));
        }
        let before = s.cursor;
        let batch = Batch::take(s, records.iter().map(|(r, _)| r), ctx);
        let taken = (s.cursor.0 - before.0) as usize;
        if taken == 0 {
            // The next entry does not fit the room left: it waits for acknowledgements.
            s.full_since.get_or_insert(ctx.now);
            return Ok(None);
        }
        {
            let consumed = records[taken - 1].1;
            let d = s.disk.as_mut().expect("reading from disk");
            d.buf = d.buf.slice(consumed..);
            d.offset += consumed as u64;
            d.failures = 0;
            let cut = matches!(parse(&d.buf), Parsed::Short) && !d.buf.is_empty();
            if cut && taken == records.len() && ctx.cfg.mutation(|m| m.tail_skips_at_piece_end) {
                // The deliberate bug: the record the piece ends inside is stepped over.
                s.cursor = s.cursor.next();
                s.disk = None;
            }
        }
        Ok(Some(batch))
    }

    /// Issues a read of the next piece of the stream's file, if a read slot is free (one frees
    /// when another read completes, and then every stream is pumped again). Always `None`: the
    /// batch comes once the read has.
    fn read_more(&mut self, id: StreamId, d: &mut DiskRead, ctx: &mut Ctx) -> Option<Batch> {
        if self.reads >= ctx.limits.stream_reads_max as usize {
            return None;
        }
        self.next_token += 1;
        self.reads += 1;
        d.reading = Some(self.next_token);
        let offset = d.offset + d.buf.len() as u64;
        let op = IoOp::ReadAt { file: d.file.clone(), offset, len: ctx.limits.stream_read_bytes as u64 };
        ctx.reads.push((id, self.next_token, op));
        None
    }

    /// A piece failed its checksum: it is read again from the damaged record, a few times,
    /// before the reader is told this replica's copy is damaged.
    fn damaged(&mut self, id: StreamId, s: &mut Stream, ctx: &mut Ctx) -> Result<Option<Batch>, StreamError> {
        let d = s.disk.as_mut().expect("reading from disk");
        d.failures += 1;
        if d.failures > ctx.limits.read_retries_max {
            return Err(StreamError::Damaged { index: s.cursor });
        }
        d.buf = Bytes::new();
        Ok(self.read_more(id, d, ctx))
    }

    /// A read for stream `id` finished.
    pub fn on_read(&mut self, id: StreamId, token: u64, result: Result<IoReply, DiskError>, ctx: &mut Ctx) {
        self.reads -= 1;
        let mut result = Some(result);
        if let Some(Reading::Watch { resync: Some(r), resync_read }) = self.open.get_mut(&id).map(|s| &mut s.reading) {
            if *resync_read == Some(token) {
                *resync_read = None;
                if let Err(broken) = r.on_read(result.take().expect("not taken yet")) {
                    r.failures = u32::MAX;
                    let _ = broken; // reported when the stream next fills
                }
            }
        }
        if let (Some(result), Some(s)) = (result, self.open.get_mut(&id)) {
            if let Some(d) = s.disk.as_mut().filter(|d| d.reading == Some(token)) {
                d.reading = None;
                match result {
                    Ok(IoReply::Data(data)) if !data.is_empty() => {
                        let mut joined = Vec::with_capacity(d.buf.len() + data.len());
                        joined.extend_from_slice(&d.buf);
                        joined.extend_from_slice(&data);
                        d.buf = Bytes::from(joined);
                    }
                    Ok(_) => {
                        // The end of the file: go on in the next segment, or look again where
                        // the cursor is (the entries may be cached now, or compacted away). A
                        // file that ends inside a record, or before the cursor's entry, counts
                        // as a damaged read: read again, then reported.
                        let next = ctx.ledger.segment_after(&d.file).map(str::to_string);
                        let elsewhere = !matches!(ctx.ledger.locate(s.cursor), Locate::Disk { .. });
                        match next {
                            Some(file) if d.buf.is_empty() => {
                                *d = DiskRead {
                                    file,
                                    offset: LEDGER_HEADER_LEN,
                                    buf: Bytes::new(),
                                    reading: None,
                                    failures: 0,
                                }
                            }
                            None if d.buf.is_empty() && elsewhere => s.disk = None,
                            _ => {
                                d.failures += 1;
                                d.buf = Bytes::new();
                            }
                        }
                    }
                    // Removed by retention meanwhile, or a read error: look again where the
                    // cursor is (a failed read counts like a damaged one).
                    Err(DiskError::NotFound) => s.disk = None,
                    Err(_) => d.failures += 1,
                }
            }
        }
        // A read slot is free: every stream waiting for one may go on.
        self.pump(ctx);
    }

    /// Sends a resyncing watcher what its window has room for. `Some(true)`: the resync is
    /// done (the changes follow); `Some(false)`: it waits for room or a read; `None`: it ended.
    fn fill_resync(&mut self, id: StreamId, s: &mut Stream, ctx: &mut Ctx) -> Option<bool> {
        loop {
            let room = s.window.saturating_sub(s.in_window);
            let Reading::Watch { resync: Some(r), resync_read } = &mut s.reading else { return Some(true) };
            if r.failures > ctx.limits.read_retries_max {
                ctx.end(id, s.seq, StreamError::Damaged { index: r.at });
                return None;
            }
            if resync_read.is_some() {
                return Some(false);
            }
            match r.advance(ctx.limits.stream_read_bytes as u64) {
                Ok(Next::Ready) if room == 0 => {
                    s.full_since.get_or_insert(ctx.now);
                    return Some(false);
                }
                Ok(Next::Ready) => {
                    let sessions = r.take(room as usize, ctx.limits.stream_batch_bytes_max as u64);
                    let cost = sessions.len() as u64;
                    ctx.emit(id, s, StreamItem::Resync { sessions }, cost);
                }
                Ok(Next::Read(op)) => {
                    if self.reads >= ctx.limits.stream_reads_max as usize {
                        return Some(false);
                    }
                    self.next_token += 1;
                    self.reads += 1;
                    *resync_read = Some(self.next_token);
                    ctx.reads.push((id, self.next_token, op));
                    return Some(false);
                }
                Ok(Next::Done) => {
                    let at = r.at;
                    s.reading = Reading::Watch { resync: None, resync_read: None };
                    s.cursor = at.next();
                    s.reported = at;
                    ctx.emit(id, s, StreamItem::Synced { at }, 0);
                    return Some(true);
                }
                Err(_) => {
                    // A pinned file cannot go, so this is damage (or a bug): this replica cannot
                    // resync the watcher, another may.
                    ctx.end(id, s.seq, StreamError::Damaged { index: r.at });
                    return None;
                }
            }
        }
    }

    /// Files the streams read that must not be removed yet (resyncs' snapshots and sources).
    pub fn pinned(&self) -> impl Iterator<Item = &str> + '_ {
        self.open
            .values()
            .filter_map(|s| match &s.reading {
                Reading::Watch { resync: Some(r), .. } => Some(r.pins.iter().map(String::as_str)),
                _ => None,
            })
            .flatten()
    }

    /// The oldest snapshot a resync reads: the ledger keeps every entry after it.
    pub fn oldest_resync(&self) -> Option<Index> {
        self.open
            .values()
            .filter_map(|s| match &s.reading {
                Reading::Watch { resync: Some(r), .. } => Some(r.at),
                _ => None,
            })
            .min()
    }

    /// `session_bytes_max`: the largest session any kind allows (a resync holds a few).
    pub fn invariants(&self, limits: &Limits, session_bytes_max: u64) {
        assert!(self.open.len() <= limits.streams_max as usize, "streams bounded");
        assert!(self.reads <= limits.stream_reads_max as usize, "stream reads bounded");
        for s in self.open.values() {
            if let Reading::Watch { resync: Some(r), .. } = &s.reading {
                // A piece of each file, a section, and the sessions made of one section.
                let piece = limits.stream_read_bytes as u64 + 1024 * 1024 + session_bytes_max;
                assert!(r.held_bytes() <= 3 * piece, "a resync holds a few pieces: {}", r.held_bytes());
            }
            assert_eq!(s.in_window, s.unacked.iter().map(|(_, c)| c).sum::<u64>(), "window accounting");
            let piece = limits.stream_read_bytes as u64 + crate::ledger::RECORD_BYTES_MAX as u64;
            assert!(s.disk.as_ref().is_none_or(|d| (d.buf.len() as u64) <= piece), "a stream holds one piece");
        }
    }
}

/// Entries gathered for one item.
#[derive(Debug, Default)]
struct Batch {
    entries: Vec<Bytes>,
    events: u32,
    bytes: u64,
    through: Index,
}

impl Batch {
    /// Takes records (from the stream's cursor on, in order) while the item and the window have
    /// room, moving the cursor past each one taken or filtered out. A record bigger than the
    /// room left goes alone rather than never.
    fn take<'r>(s: &mut Stream, records: impl Iterator<Item = &'r Record>, ctx: &Ctx) -> Batch {
        let limits = ctx.limits;
        let mut b = Batch { through: s.cursor.prev(), ..Batch::default() };
        let room = s.window.saturating_sub(s.in_window);
        let watch = matches!(s.reading, Reading::Watch { .. });
        let split = ctx.cfg.mutation(|m| m.tail_splits_entries);
        for r in records {
            let matching = r.marks.iter().filter(|m| s.filter.matches(**m)).count();
            if matching > 0 {
                let bodies = if split && matching > 1 {
                    split_events(r, &s.filter)
                } else if matching == r.marks.len() {
                    vec![r.body.clone()]
                } else {
                    refiltered(r, &s.filter).into_iter().collect()
                };
                let size: u64 = bodies.iter().map(|b| b.len() as u64).sum();
                let cost = if watch { matching as u64 } else { size };
                let used = if watch { b.events as u64 } else { b.bytes };
                let full = b.bytes >= limits.stream_batch_bytes_max as u64 || used + cost > room;
                if full && (!b.entries.is_empty() || s.in_window > 0) {
                    // An entry bigger than the room left waits for acknowledgements; one bigger
                    // than the whole window goes alone once nothing else is outstanding (an
                    // entry is never split).
                    break;
                }
                b.bytes += size;
                b.events += matching as u32;
                b.entries.extend(bodies);
            }
            s.cursor = r.index.next();
            b.through = r.index;
            if b.bytes >= limits.stream_batch_bytes_max as u64 {
                break;
            }
        }
        b
    }
}

/// Only under the `tail-splits-entries` mutation: one entry per matching event.
fn split_events(r: &Record, filter: &Filter) -> Vec<Bytes> {
    let entry = r.entry().expect("the ledger's own records decode");
    let kept = entry.filtered(filter).expect("some events match");
    kept.events
        .iter()
        .map(|e| {
            let one = crate::events::LedgerEntry { events: vec![e.clone()], ..kept.clone() };
            Bytes::from(postcard::to_allocvec(&one).expect("postcard encoding into memory cannot fail"))
        })
        .collect()
}

/// The record's entry with only the events `filter` lets through, encoded again (`None` if it
/// does not decode: the ledger wrote it, so that would be a bug, not input to skip).
fn refiltered(r: &Record, filter: &Filter) -> Option<Bytes> {
    let entry = r.entry().expect("the ledger's own records decode");
    let kept = entry.filtered(filter)?;
    Some(Bytes::from(postcard::to_allocvec(&kept).expect("postcard encoding into memory cannot fail")))
}

/// Starts (or starts again) a watcher's resync from the newest snapshot, pinning its files.
fn start_resync(id: StreamId, s: &mut Stream, ctx: &mut Ctx) {
    let (at, file, pins) = match ctx.newest_snapshot {
        Some((at, file, sources)) => {
            let mut pins = vec![file.to_string()];
            pins.extend(sources.iter().map(|id| source_name(*id)));
            (at, Some(file.to_string()), pins)
        }
        // Before the first snapshot the state it would hold is the empty one at index 0, and
        // the ledger holds every entry since.
        None => (Index(0), None, Vec::new()),
    };
    s.disk = None;
    let mut resync = Resync::new(at, file, pins, s.filter.kinds.clone());
    resync.skip_spilled = ctx.cfg.mutation(|m| m.resync_skips_spilled);
    s.reading = Reading::Watch { resync: Some(Box::new(resync)), resync_read: None };
    ctx.emit(id, s, StreamItem::ResyncStart { at }, 0);
}
