//! The replica's hard state: its current term, whom it voted for in that term, and whether it
//! is repairing its log (see `repair_upto`).
//!
//! Raft is only safe if a replica never forgets a term it acknowledged or a vote it cast, so the
//! pair is made durable before any message that depends on it leaves (see `Engine::send`). It is
//! replaced atomically, as DESIGN.md asks: write a temp file, fsync it, rename it over the old
//! one, fsync the directory. A crash at any step leaves either the old pair or the new one.

use crate::io::{DiskError, IoOp, IoReply, Replace};
use crate::types::{Index, ReplicaId, Term};

pub(crate) const HARD_STATE_FILE: &str = "hardstate";
const HARD_STATE_TMP: &str = "hardstate.tmp";
const MAGIC: &[u8; 8] = b"TRUBAhs2";
const NO_VOTE: u32 = u32::MAX;
pub(crate) const HARD_STATE_LEN: usize = 32;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct HardState {
    pub term: Term,
    pub vote: Option<ReplicaId>,
    /// Non-zero while the replica repairs a log that lost a damaged range: its log once reached
    /// this index, and entries up to it may have been acknowledged, so until it holds them again
    /// (from a leader) it neither votes nor stands. Zero otherwise.
    pub repair_upto: Index,
}

impl HardState {
    /// The same repair mark in a new term or with a new vote.
    pub fn with(self, term: Term, vote: Option<ReplicaId>) -> HardState {
        HardState { term, vote, ..self }
    }
}

pub(crate) fn encode(hs: HardState) -> Vec<u8> {
    let mut b = Vec::with_capacity(HARD_STATE_LEN);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&hs.term.0.to_le_bytes());
    b.extend_from_slice(&hs.vote.map_or(NO_VOTE, |v| v.0).to_le_bytes());
    b.extend_from_slice(&hs.repair_upto.0.to_le_bytes());
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

pub(crate) fn decode(b: &[u8]) -> Result<HardState, String> {
    if b.len() != HARD_STATE_LEN || &b[..8] != MAGIC {
        return Err(format!("{} bytes, not a hard state record", b.len()));
    }
    let crc = u32::from_le_bytes(b[28..32].try_into().expect("4 bytes"));
    if crc32fast::hash(&b[..28]) != crc {
        return Err("checksum mismatch".into());
    }
    let term = Term(u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")));
    let vote = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
    let repair_upto = Index(u64::from_le_bytes(b[20..28].try_into().expect("8 bytes")));
    Ok(HardState { term, vote: (vote != NO_VOTE).then_some(ReplicaId(vote)), repair_upto })
}

pub(crate) enum HsStep {
    Io(IoOp),
    /// Nothing to do, or the newest wanted state is durable.
    Idle,
}

/// Makes the wanted hard state durable, one replacement at a time. A newer wanted state that
/// arrives during a replacement is written right after it.
#[derive(Debug, Default)]
pub(crate) struct HardStateWriter {
    /// What is on disk for certain.
    pub durable: HardState,
    /// What the replica currently holds; durable once a replacement of it completes.
    pub wanted: HardState,
    writing: Option<(HardState, Replace)>,
}

impl HardStateWriter {
    pub fn recovered(hs: HardState) -> HardStateWriter {
        HardStateWriter { durable: hs, wanted: hs, writing: None }
    }

    pub fn is_durable(&self) -> bool {
        self.durable == self.wanted
    }

    /// Records a new wanted state; returns the first disk operation if none is under way.
    pub fn want(&mut self, hs: HardState) -> HsStep {
        self.wanted = hs;
        self.next()
    }

    fn next(&mut self) -> HsStep {
        if self.writing.is_some() || self.durable == self.wanted {
            return HsStep::Idle;
        }
        self.writing = Some((self.wanted, Replace::Write));
        HsStep::Io(IoOp::Write { file: HARD_STATE_TMP.into(), offset: 0, data: encode(self.wanted) })
    }

    /// A step of the replacement finished. An error is fatal to the caller: after a failed
    /// fsync nothing is known about what the disk holds.
    pub fn on_io(&mut self, result: Result<IoReply, DiskError>) -> Result<HsStep, DiskError> {
        let (hs, stage) = self.writing.expect("a hard state write is under way");
        result?;
        // The temp file may hold a longer older record: the write covers all 24 bytes and the
        // file never holds anything else, so no truncation is needed.
        let Some((next, op)) = stage.next(HARD_STATE_TMP, HARD_STATE_FILE) else {
            self.writing = None;
            self.durable = hs;
            return Ok(self.next());
        };
        self.writing = Some((hs, next));
        Ok(HsStep::Io(op))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let hs = HardState { term: Term(7), vote: Some(ReplicaId(2)), repair_upto: Index(41) };
        assert_eq!(decode(&encode(hs)).unwrap(), hs);
        let none = HardState { term: Term(9), vote: None, repair_upto: Index(0) };
        assert_eq!(decode(&encode(none)).unwrap(), none);
        for bit in 0..HARD_STATE_LEN * 8 {
            let mut b = encode(hs);
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&b).is_err(), "flipping bit {bit} must be caught");
        }
        assert!(decode(&encode(hs)[..28]).is_err());
    }

    #[test]
    fn writes_newest_wanted_after_the_one_under_way() {
        let mut w = HardStateWriter::default();
        let a = HardState { term: Term(1), vote: None, repair_upto: Index(0) };
        let b = HardState { term: Term(2), vote: Some(ReplicaId(1)), repair_upto: Index(0) };
        assert!(matches!(w.want(a), HsStep::Io(IoOp::Write { .. })));
        assert!(matches!(w.want(b), HsStep::Idle), "one replacement at a time");
        for _ in 0..3 {
            assert!(matches!(w.on_io(Ok(IoReply::Done)).unwrap(), HsStep::Io(_)));
        }
        // The first replacement completes and the second starts at once.
        assert!(matches!(w.on_io(Ok(IoReply::Done)).unwrap(), HsStep::Io(IoOp::Write { .. })));
        assert_eq!(w.durable, a);
        assert!(!w.is_durable());
        for _ in 0..3 {
            w.on_io(Ok(IoReply::Done)).unwrap();
        }
        assert!(matches!(w.on_io(Ok(IoReply::Done)).unwrap(), HsStep::Idle));
        assert_eq!(w.durable, b);
        assert!(w.is_durable());
    }
}
