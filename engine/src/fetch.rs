//! Source files that come with a snapshot install, fetched from the leader in pieces.
//!
//! A snapshot names the source files it needs and their lengths; the follower asks the leader
//! for them one piece at a time (`SourceFetch`), checks each piece frame by frame, writes what
//! checked out, and asks for the rest from the end of the last whole frame. One piece is in
//! flight at a time, so the transfer is paced by the follower's disk and bounded in memory by a
//! piece, whatever the files' sizes (a snapshot's files can be gigabytes, far beyond one
//! message). A piece that is damaged, lost or never answered is asked for again; a transfer
//! that makes no progress for long is abandoned, and the leader's next snapshot starts anew.
//! Once every file is whole and fsynced under its final name, the snapshot itself is written.

use crate::io::IoOp;
use crate::stored::{frame_at, frame_len_announced, source_name, SOURCE_HEADER_LEN, SOURCE_MAGIC};
use crate::types::{Duration, Instant, SourceId};
use std::collections::{BTreeSet, VecDeque};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Asking for and writing pieces.
    Receiving,
    /// A checked piece is being written.
    Writing {
        upto: u64,
    },
    Sync,
    Rename,
}

#[derive(Debug)]
struct Current {
    id: SourceId,
    len: u64,
    /// Bytes from the file's start that are checked and written.
    verified: u64,
    stage: Stage,
    /// When the outstanding request was sent, if one is.
    asked_at: Option<Instant>,
    /// Bytes to ask for next (more than a piece when a frame is longer).
    want: u64,
}

#[derive(Debug)]
pub(crate) struct Fetch {
    queue: VecDeque<(SourceId, u64)>,
    current: Option<Current>,
    shipped: BTreeSet<SourceId>,
    /// Requests that went unanswered, or answered with damage, since the last progress.
    pub stalls: u32,
}

pub(crate) fn install_tmp(id: SourceId) -> String {
    format!("{}.install.tmp", source_name(id))
}

impl Fetch {
    pub fn new(files: Vec<(SourceId, u64)>) -> Fetch {
        let mut f = Fetch { queue: files.into(), current: None, shipped: BTreeSet::new(), stalls: 0 };
        f.next_file();
        f
    }

    fn next_file(&mut self) {
        self.current = self.queue.pop_front().map(|(id, len)| Current {
            id,
            len,
            verified: 0,
            stage: Stage::Receiving,
            asked_at: None,
            want: 0,
        });
    }

    /// Files this replica already holds durably (same id, same bytes): not fetched again.
    pub fn already_held(&mut self, ids: impl IntoIterator<Item = SourceId>) {
        self.shipped.extend(ids);
    }

    pub fn finished(&self) -> bool {
        self.current.is_none()
    }

    pub fn shipped(&self) -> &BTreeSet<SourceId> {
        &self.shipped
    }

    /// The request to send now, if one is due: none is outstanding, or the last went unanswered
    /// for `timeout`. Returns (source, offset, length).
    pub fn request(&mut self, now: Instant, piece: u64, timeout: Duration) -> Option<(SourceId, u64, u64)> {
        let c = self.current.as_mut()?;
        if c.stage != Stage::Receiving {
            return None;
        }
        if let Some(t) = c.asked_at {
            if now.saturating_since(t) < timeout {
                return None;
            }
            self.stalls += 1;
        }
        c.asked_at = Some(now);
        let len = c.want.max(piece).min(c.len - c.verified);
        Some((c.id, c.verified, len))
    }

    /// A piece came. Returns the write of its checked part, if it is the piece asked for and
    /// some of it checks out; otherwise it is dropped (and asked for again).
    pub fn on_piece(&mut self, id: SourceId, offset: u64, data: &[u8]) -> Option<IoOp> {
        let c = self.current.as_mut()?;
        if c.id != id || c.verified != offset || c.stage != Stage::Receiving || c.asked_at.is_none() {
            return None; // stale, or a duplicate
        }
        c.asked_at = None;
        let mut good = 0usize;
        if offset == 0 {
            if data.len() < SOURCE_HEADER_LEN as usize || &data[..8] != SOURCE_MAGIC {
                self.stalls += 1;
                return None;
            }
            good = SOURCE_HEADER_LEN as usize;
        }
        while let Ok(Some(f)) = frame_at(&data[good..]) {
            good += f.len();
        }
        let end = offset + good as u64;
        // Nothing usable: the piece runs past the file, or its first frame is damaged.
        let first_damaged = good == 0 && frame_at(data).is_err();
        if end > c.len || first_damaged {
            self.stalls += 1;
            return None;
        }
        // A frame longer than what was asked for: ask for all of it next time.
        c.want = frame_len_announced(&data[good..]).map_or(0, |n| n as u64);
        if good == 0 {
            if data.is_empty() {
                self.stalls += 1;
            }
            return None;
        }
        self.stalls = 0;
        c.stage = Stage::Writing { upto: end };
        Some(IoOp::Write { file: install_tmp(c.id), offset, data: data[..good].to_vec() })
    }

    /// The fetch's last disk operation finished. Returns the next one, if any (then the caller
    /// asks for the next piece, or, once `finished`, goes on with the snapshot).
    pub fn on_io(&mut self) -> Option<IoOp> {
        let c = self.current.as_mut().expect("a fetch's IO belongs to its current file");
        match c.stage {
            Stage::Writing { upto } => {
                c.verified = upto;
                if c.verified < c.len {
                    c.stage = Stage::Receiving;
                    return None;
                }
                c.stage = Stage::Sync;
                Some(IoOp::Sync { file: install_tmp(c.id) })
            }
            Stage::Sync => {
                c.stage = Stage::Rename;
                Some(IoOp::Rename { from: install_tmp(c.id), to: source_name(c.id) })
            }
            Stage::Rename => {
                self.shipped.insert(c.id);
                self.next_file();
                None
            }
            Stage::Receiving => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::UnixSecs;
    use crate::sessions::{Session, Status};
    use crate::stored::{push_frame, source_header};
    use crate::types::{Attempt, Index, Kind, SessionId};

    fn file(n: usize) -> Vec<u8> {
        let mut out = source_header(Kind(1), SourceId(9)).to_vec();
        for i in 0..n {
            let s = Session {
                kind: Kind(1),
                attempt: Attempt(0),
                records: vec![vec![i as u8; 100 + i * 37]],
                bytes: (100 + i * 37) as u64,
                status: Status::Stored { due: UnixSecs(5), stored_at: Index(i as u64) },
                failures: 0,
                last_failure: None,
                records_hash: 0,
            };
            push_frame(&mut out, SessionId(i as u64 + 1), &s);
        }
        out
    }

    /// Drives a fetch against `source`, damaging or dropping some answers; returns the bytes
    /// written to the temporary file.
    fn run(source: &[u8], piece: u64, mut damage: impl FnMut(usize, &mut Vec<u8>) -> bool) -> Vec<u8> {
        let mut f = Fetch::new(vec![(SourceId(9), source.len() as u64)]);
        let mut written = vec![0u8; source.len()];
        let (mut now, timeout) = (Instant(0), Duration(10));
        for round in 0..10_000 {
            if f.finished() {
                return written;
            }
            now = now.saturating_add(Duration(11));
            let Some((_, offset, len)) = f.request(now, piece, timeout) else { continue };
            let end = (offset + len).min(source.len() as u64) as usize;
            let mut data = source[offset as usize..end].to_vec();
            if !damage(round, &mut data) {
                continue; // lost: asked again after the timeout
            }
            let Some(IoOp::Write { offset, data, .. }) = f.on_piece(SourceId(9), offset, &data) else { continue };
            written[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            while let Some(op) = f.on_io() {
                assert!(matches!(op, IoOp::Sync { .. } | IoOp::Rename { .. }));
            }
        }
        panic!("the fetch did not finish");
    }

    #[test]
    fn a_file_arrives_whole_in_pieces_smaller_than_its_frames() {
        let source = file(40);
        assert_eq!(run(&source, 64, |_, _| true), source);
        assert_eq!(run(&source, 1 << 20, |_, _| true), source);
    }

    #[test]
    fn damaged_and_lost_pieces_are_asked_for_again() {
        let source = file(40);
        let written = run(&source, 300, |round, data| {
            if round % 3 == 1 && data.len() > 30 {
                data[30] ^= 0x10; // a flipped bit on the way
            }
            round % 5 != 2 // every fifth answer lost
        });
        assert_eq!(written, source);
    }
}
