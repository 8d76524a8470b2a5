//! The replica's hard state: its current term, whom it voted for in that term, and whether it
//! is repairing its log (see `repair_upto`) or has lost its votes (see `votes_lost`).
//!
//! Raft is only safe if a replica never forgets a term it acknowledged or a vote it cast, so the
//! state is made durable before any message that depends on it leaves (see `Engine::send`).
//!
//! The file holds two copies of the state, in two 4 KiB slots (two sectors, even where sectors
//! are 4 KiB), so that a damaged copy is repaired from the other. Both slots are written in place with the same state
//! and then fsynced once; the state counts as durable (and may be acted on) only once that fsync
//! completes. A crash during the write leaves each slot whole, old or new (sectors are written
//! whole; a torn one fails its checksum), and rot at rest damages one slot. So whenever one
//! slot is unreadable the other is safe to use: it holds either the durable state or a newer one
//! that nothing outside this replica saw yet; of two readable slots, the newer is taken. Only
//! when both are lost does the replica not know whom it voted for; then it never votes or stands
//! again (`votes_lost`).
//!
//! The file is created the atomic way (write a temp file, fsync it, rename it, fsync the
//! directory), as DESIGN.md asks, and only then overwritten in place: one write and one fsync
//! per change, half of what a replacement costs, which is what keeps elections quick.

use crate::io::{DiskError, IoOp, IoReply, Replace};
use crate::types::{Index, ReplicaId, Term};

pub(crate) const HARD_STATE_FILE: &str = "hardstate";
const HARD_STATE_TMP: &str = "hardstate.tmp";
/// Format 2 (one copy, before `votes_lost`) is still read, so that a data directory of the
/// previous version starts; the file is replaced in format 3 at the first write.
const MAGIC_V2: &[u8; 8] = b"TRUBAhs2";
const MAGIC: &[u8; 8] = b"TRUBAhs3";
const NO_VOTE: u32 = u32::MAX;
const HARD_STATE_LEN_V2: usize = 32;
pub(crate) const HARD_STATE_LEN: usize = 36;
const FLAG_VOTES_LOST: u32 = 1;
/// Each copy sits in a sector of its own, even on a disk with 4 KiB physical sectors.
const SLOT_BYTES: usize = 4096;
const SLOTS: usize = 2;
pub(crate) const HARD_STATE_FILE_BYTES: usize = SLOT_BYTES * SLOTS;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct HardState {
    pub term: Term,
    pub vote: Option<ReplicaId>,
    /// Non-zero while the replica repairs a log that lost a damaged range: its log once reached
    /// this index, and entries up to it may have been acknowledged, so until it holds them again
    /// (from a leader) it neither votes nor stands. Zero otherwise.
    pub repair_upto: Index,
    /// Both copies of the hard state were found damaged: the replica may have voted in any term
    /// up to one it no longer knows, so it never votes or stands again (it still replicates and
    /// serves). Nothing learnt later tells it safely which terms are free: the candidate it
    /// voted for may be the only other replica that knows that term. The remedy is a new member
    /// in its place (see "The hard state" in the README).
    pub votes_lost: bool,
}

impl HardState {
    /// The same marks in a new term or with a new vote.
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
    let flags = if hs.votes_lost { FLAG_VOTES_LOST } else { 0 };
    b.extend_from_slice(&flags.to_le_bytes());
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

pub(crate) fn decode(b: &[u8]) -> Result<HardState, String> {
    let len = match b.get(..8) {
        Some(m) if m == MAGIC => HARD_STATE_LEN,
        Some(m) if m == MAGIC_V2 => HARD_STATE_LEN_V2,
        _ => return Err(format!("{} bytes, not a hard state record", b.len())),
    };
    if b.len() != len {
        return Err(format!("{} bytes, not a hard state record of {len}", b.len()));
    }
    let crc = u32::from_le_bytes(b[len - 4..].try_into().expect("4 bytes"));
    if crc32fast::hash(&b[..len - 4]) != crc {
        return Err("checksum mismatch".into());
    }
    let term = Term(u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")));
    let vote = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
    let repair_upto = Index(u64::from_le_bytes(b[20..28].try_into().expect("8 bytes")));
    let flags = if len == HARD_STATE_LEN { u32::from_le_bytes(b[28..32].try_into().expect("4 bytes")) } else { 0 };
    if flags & !FLAG_VOTES_LOST != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    let votes_lost = flags & FLAG_VOTES_LOST != 0;
    Ok(HardState { term, vote: (vote != NO_VOTE).then_some(ReplicaId(vote)), repair_upto, votes_lost })
}

/// Where in the file each copy's bytes lie (also for fault injection in tests and the
/// simulator).
pub fn hard_state_copy_ranges() -> [std::ops::Range<usize>; SLOTS] {
    [0, 1].map(|slot| slot * SLOT_BYTES..slot * SLOT_BYTES + HARD_STATE_LEN)
}

/// How many copies in a hard state file's bytes are whole (for fault injection: the simulator
/// only rots one copy while the other is whole).
pub fn hard_state_copies_whole(file: &[u8]) -> usize {
    decode_file(file).slots.iter().flatten().count()
}

/// The whole file: the state in both slots, each padded to its sector.
pub(crate) fn encode_file(hs: HardState) -> Vec<u8> {
    let mut b = vec![0; HARD_STATE_FILE_BYTES];
    let record = encode(hs);
    for range in hard_state_copy_ranges() {
        b[range].copy_from_slice(&record);
    }
    b
}

/// What the file holds: each slot's state (`None`: damaged), and whether it is in the current
/// layout (a file of the previous version holds one copy and is replaced at the next write).
pub(crate) struct FileRead {
    pub slots: [Option<HardState>; SLOTS],
    pub current_layout: bool,
}

pub(crate) fn decode_file(b: &[u8]) -> FileRead {
    if b.len() != HARD_STATE_FILE_BYTES {
        // The previous version's one-copy file, or a damaged length: one copy at most.
        return FileRead { slots: [decode(b).ok(), None], current_layout: false };
    }
    FileRead { slots: hard_state_copy_ranges().map(|range| decode(&b[range]).ok()), current_layout: true }
}

/// What recovery makes of the copies as read.
pub(crate) enum Copies {
    /// The state to go on with; `rewrite` when a copy was lost (both are written again).
    Found { hs: HardState, rewrite: bool },
    /// No file: a replica that never wrote its hard state, so never voted.
    Neither,
    /// The file exists and every copy in it is damaged.
    Lost,
}

/// Picks the state to recover. `existed`: the file was listed; `read`: its copies (a file of
/// the previous version has one).
pub(crate) fn choose(existed: bool, read: [Option<HardState>; SLOTS], copies: usize) -> Copies {
    match read {
        // Slots differ only after a crash during a write: the newer state is the one being
        // written, which nothing outside saw yet, and taking it is safe (a term only rises,
        // and within a term a vote is only ever added).
        [Some(a), Some(b)] => {
            let newer = if (b.term, b.vote.is_some()) > (a.term, a.vote.is_some()) { b } else { a };
            // The marks are kept if either copy has them: erring that way only costs votes.
            let hs = HardState {
                repair_upto: a.repair_upto.max(b.repair_upto),
                votes_lost: a.votes_lost || b.votes_lost,
                ..newer
            };
            Copies::Found { hs, rewrite: a != b }
        }
        [Some(hs), None] | [None, Some(hs)] => Copies::Found { hs, rewrite: copies == SLOTS },
        [None, None] if !existed => Copies::Neither,
        [None, None] => Copies::Lost,
    }
}

pub(crate) enum HsStep {
    Io(IoOp),
    /// Nothing to do, or the newest wanted state is durable.
    Idle,
}

/// How the file is being written.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// Created (or replaced, from an older layout) atomically.
    Replace(Replace),
    /// Overwritten in place: the write, then the fsync.
    InPlaceWrite,
    InPlaceSync,
}

/// Makes the wanted hard state durable, one write at a time. A newer wanted state that arrives
/// during a write is written right after it.
#[derive(Debug, Default)]
pub(crate) struct HardStateWriter {
    /// What is on disk for certain (in both copies).
    pub durable: HardState,
    /// What the replica currently holds; durable once a write of it completes.
    pub wanted: HardState,
    writing: Option<(HardState, Stage)>,
    /// The file exists in the current layout, so it is overwritten in place.
    in_place: bool,
    /// A copy was found damaged at recovery: both are written even if the state is unchanged.
    rewrite: bool,
}

impl HardStateWriter {
    /// `in_place`: recovery found the file in the current layout.
    pub fn recovered(hs: HardState, in_place: bool) -> HardStateWriter {
        HardStateWriter { durable: hs, wanted: hs, writing: None, in_place, rewrite: false }
    }

    /// Both copies are written again at the next `want`, even if nothing changed.
    pub fn rewrite(&mut self) {
        self.rewrite = true;
    }

    pub fn is_durable(&self) -> bool {
        self.durable == self.wanted && !self.rewrite
    }

    /// Records a new wanted state; returns the first disk operation if none is under way.
    pub fn want(&mut self, hs: HardState) -> HsStep {
        self.wanted = hs;
        self.next()
    }

    fn next(&mut self) -> HsStep {
        if self.writing.is_some() || self.is_durable() {
            return HsStep::Idle;
        }
        self.rewrite = false;
        let data = encode_file(self.wanted);
        let (stage, file) = if self.in_place {
            (Stage::InPlaceWrite, HARD_STATE_FILE)
        } else {
            (Stage::Replace(Replace::Write), HARD_STATE_TMP)
        };
        self.writing = Some((self.wanted, stage));
        HsStep::Io(IoOp::Write { file: file.into(), offset: 0, data })
    }

    /// A step of the write finished. An error is fatal to the caller: after a failed fsync
    /// nothing is known about what the disk holds.
    pub fn on_io(&mut self, result: Result<IoReply, DiskError>) -> Result<HsStep, DiskError> {
        let (hs, stage) = self.writing.expect("a hard state write is under way");
        result?;
        let next = match stage {
            // The temp file may hold an older record of the same length: the write covers all
            // its bytes, so no truncation is needed.
            Stage::Replace(r) => r.next(HARD_STATE_TMP, HARD_STATE_FILE).map(|(n, op)| (Stage::Replace(n), op)),
            Stage::InPlaceWrite => Some((Stage::InPlaceSync, IoOp::Sync { file: HARD_STATE_FILE.into() })),
            Stage::InPlaceSync => None,
        };
        if let Some((stage, op)) = next {
            self.writing = Some((hs, stage));
            return Ok(HsStep::Io(op));
        }
        self.writing = None;
        self.durable = hs;
        self.in_place = true;
        Ok(self.next())
    }
}

/// Every operation of one atomic replacement of the file (none depends on a result), for
/// recovery, which must make a repair mark durable before it cuts anything.
pub(crate) fn replace_ops(hs: HardState) -> Vec<IoOp> {
    let mut writer = HardStateWriter::default();
    let mut ops = Vec::new();
    let mut step = writer.want(hs);
    while let HsStep::Io(op) = step {
        ops.push(op);
        step = writer.on_io(Ok(IoReply::Done)).expect("no errors given");
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(term: u64, vote: Option<u32>) -> HardState {
        HardState { term: Term(term), vote: vote.map(ReplicaId), ..Default::default() }
    }

    #[test]
    fn round_trip_and_damage() {
        let marked = HardState { term: Term(7), vote: Some(ReplicaId(2)), repair_upto: Index(41), votes_lost: false };
        let lost = HardState { term: Term(9), vote: None, repair_upto: Index(0), votes_lost: true };
        for hs in [marked, lost, hs(0, None)] {
            assert_eq!(decode(&encode(hs)).unwrap(), hs);
            for bit in 0..HARD_STATE_LEN * 8 {
                let mut b = encode(hs);
                b[bit / 8] ^= 1 << (bit % 8);
                assert!(decode(&b).is_err(), "flipping bit {bit} must be caught");
            }
            assert!(decode(&encode(hs)[..28]).is_err());
        }
    }

    #[test]
    fn the_previous_format_is_still_read() {
        // Format 2 as the previous version wrote it: no flags word.
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC_V2);
        b.extend_from_slice(&5u64.to_le_bytes());
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&b).unwrap(), hs(5, Some(3)));
    }

    #[test]
    fn the_first_write_creates_the_file_then_it_is_overwritten_in_place() {
        let ops = replace_ops(hs(3, Some(1)));
        let names: Vec<String> = ops.iter().map(describe).collect();
        assert_eq!(names, ["write hardstate.tmp", "sync hardstate.tmp", "rename hardstate", "syncdir"]);
        let mut w = HardStateWriter::default();
        let mut step = w.want(hs(1, None));
        while let HsStep::Io(_) = step {
            step = w.on_io(Ok(IoReply::Done)).unwrap();
        }
        let mut names = Vec::new();
        let mut step = w.want(hs(2, Some(1)));
        while let HsStep::Io(op) = step {
            names.push(describe(&op));
            step = w.on_io(Ok(IoReply::Done)).unwrap();
        }
        assert_eq!(names, ["write hardstate", "sync hardstate"]);
        assert_eq!(w.durable, hs(2, Some(1)));
    }

    fn describe(op: &IoOp) -> String {
        match op {
            IoOp::Write { file, offset, data } => {
                assert_eq!((*offset, data.len()), (0, HARD_STATE_FILE_BYTES), "the whole file, both copies");
                format!("write {file}")
            }
            IoOp::Rename { to, .. } => format!("rename {to}"),
            IoOp::SyncDir => "syncdir".into(),
            op => format!("sync {}", op.file()),
        }
    }

    #[test]
    fn writes_newest_wanted_after_the_one_under_way() {
        let mut w = HardStateWriter::recovered(HardState::default(), true);
        let (a, b) = (hs(1, None), hs(2, Some(1)));
        assert!(matches!(w.want(a), HsStep::Io(IoOp::Write { .. })));
        assert!(matches!(w.want(b), HsStep::Idle), "one write at a time");
        assert!(matches!(w.on_io(Ok(IoReply::Done)).unwrap(), HsStep::Io(IoOp::Sync { .. })));
        assert_eq!(w.durable, HardState::default(), "durable only once fsynced");
        // The first write completes and the second starts at once.
        assert!(matches!(w.on_io(Ok(IoReply::Done)).unwrap(), HsStep::Io(IoOp::Write { .. })));
        assert_eq!(w.durable, a);
        assert!(!w.is_durable());
        w.on_io(Ok(IoReply::Done)).unwrap();
        assert!(matches!(w.on_io(Ok(IoReply::Done)).unwrap(), HsStep::Idle));
        assert_eq!(w.durable, b);
        assert!(w.is_durable());
    }

    #[test]
    fn a_recovered_writer_rewrites_a_lost_copy() {
        let mut w = HardStateWriter::recovered(hs(4, Some(2)), true);
        assert!(matches!(w.want(hs(4, Some(2))), HsStep::Idle));
        w.rewrite();
        assert!(!w.is_durable());
        assert!(matches!(w.want(hs(4, Some(2))), HsStep::Io(IoOp::Write { .. })));
    }

    #[test]
    fn each_copy_survives_damage_to_the_other() {
        let state = hs(6, Some(0));
        let file = encode_file(state);
        for at in [0, 20, SLOT_BYTES, SLOT_BYTES + 30] {
            let mut b = file.clone();
            b[at] ^= 0x10;
            let read = decode_file(&b);
            assert!(read.current_layout);
            assert_eq!(read.slots.iter().flatten().count(), 1, "damage at byte {at} hits one copy");
            assert!(
                matches!(choose(true, read.slots, SLOTS), Copies::Found { hs: found, rewrite: true } if found == state)
            );
        }
        // The padding carries nothing: damage there loses nothing.
        let mut b = file.clone();
        b[SLOT_BYTES - 1] ^= 1;
        assert!(matches!(choose(true, decode_file(&b).slots, SLOTS), Copies::Found { rewrite: false, .. }));
        // A torn in-place write leaves the first sector new and the second old.
        let mut torn = encode_file(hs(7, None));
        torn[SLOT_BYTES..].copy_from_slice(&file[SLOT_BYTES..]);
        assert!(
            matches!(choose(true, decode_file(&torn).slots, SLOTS), Copies::Found { hs: found, .. } if found == hs(7, None))
        );
    }

    #[test]
    fn choosing_between_the_copies() {
        let (old, new) = (hs(3, Some(1)), hs(4, None));
        let found = |c: Copies| match c {
            Copies::Found { hs, rewrite } => Some((hs, rewrite)),
            _ => None,
        };
        assert_eq!(found(choose(true, [Some(new), Some(new)], 2)), Some((new, false)));
        assert_eq!(found(choose(true, [Some(new), Some(old)], 2)), Some((new, true)));
        assert_eq!(found(choose(true, [Some(old), Some(new)], 2)), Some((new, true)));
        // Within a term, the copy with the vote is the newer.
        assert_eq!(found(choose(true, [Some(hs(4, None)), Some(hs(4, Some(2)))], 2)), Some((hs(4, Some(2)), true)));
        assert_eq!(found(choose(true, [None, Some(old)], 2)), Some((old, true)));
        // The previous version's file holds one copy, which is all there is to read.
        assert_eq!(found(choose(true, [Some(old), None], 1)), Some((old, false)));
        assert!(matches!(choose(false, [None, None], 2), Copies::Neither));
        assert!(matches!(choose(true, [None, None], 2), Copies::Lost));
        assert!(matches!(choose(true, [None, None], 1), Copies::Lost));
    }
}
