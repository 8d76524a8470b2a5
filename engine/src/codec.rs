//! On-disk formats: log records, segment headers, snapshot files.
//!
//! A record is `len u32 | crc u32 | prev_crc u32 | term u64 | index u64 | header_crc u32 |
//! payload | 0xFF`, little endian, where `payload` is the postcard encoding of the entry's wall
//! time and command, `len` counts the payload and the end marker, `crc` covers every field, the
//! payload and the marker, and `header_crc` covers the 28 header bytes before it. Each record is
//! therefore checkable on its own, and `prev_crc` (the crc of the record before it) chains the
//! log, so a stale or misdirected write that is valid in itself still breaks the chain and is
//! caught.
//!
//! Segments are preallocated: the writer fills the space ahead of the log's end with zeros, so
//! that appending overwrites allocated blocks and an fdatasync has no file size to journal (it
//! about doubles the rate of small write+fsync pairs on ext4). The log ends where only zeros
//! follow. No record can end in a zero byte (hence the marker), and no record header is all
//! zeros, which is what makes the rules below sound.
//!
//! Torn versus corrupt is decided by shape, not by position. A torn write leaves a prefix of its
//! sectors, so the record is cut short: the file ends inside it, or zeros run from inside it to
//! the end of the file. That, and only that, is torn. A record that is all there but fails a
//! checksum, or a valid one that breaks the chain, is corruption, wherever it is (bit rot in the
//! last, fsynced record is corruption too, never a torn write to cut). Bytes after the log's end
//! that begin with an all-zero header are not a record at all (a flip in the preallocated
//! space): they are cut like a torn tail.

use crate::op::{Command, Entry};
use crate::types::{Index, Term, UnixMs};
use serde::{Deserialize, Serialize};

pub const RECORD_HEADER_LEN: usize = 32;
pub const SEGMENT_HEADER_LEN: usize = 28;
const SEGMENT_MAGIC: &[u8; 8] = b"TRUBAlg7";
/// The segment format this version writes and reads (the digit of [`SEGMENT_MAGIC`]).
pub const SEGMENT_FORMAT: u32 = 7;
const SNAPSHOT_MAGIC: &[u8; 8] = b"TRUBAsn6";
pub const SNAPSHOT_HEADER_LEN: usize = 36;
/// No record payload is ever larger than this; a length field above it is damage.
pub const PAYLOAD_BYTES_MAX: u32 = 64 * 1024 * 1024;
/// The last byte of every record: never zero, so a record's end is never mistaken for the
/// zeros of preallocated space.
const RECORD_END_MARKER: u8 = 0xFF;

#[derive(Deserialize)]
struct Payload {
    at: UnixMs,
    command: Command,
}

/// The same encoding as [`Payload`], borrowing the command instead of owning a copy.
#[derive(Serialize)]
struct PayloadRef<'a> {
    at: UnixMs,
    command: &'a Command,
}

fn record_crc(prev_crc: u32, term: u64, index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&prev_crc.to_le_bytes());
    h.update(&term.to_le_bytes());
    h.update(&index.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Appends the framed record to `out` and returns its crc (the next record's `prev_crc`).
pub fn encode_record(prev_crc: u32, entry: &Entry, out: &mut Vec<u8>) -> u32 {
    // The payload is serialized straight into `out` behind a header that is filled in after.
    let start = out.len();
    out.resize(start + RECORD_HEADER_LEN, 0);
    let payload = PayloadRef { at: entry.at, command: &entry.command };
    *out = postcard::to_extend(&payload, std::mem::take(out)).expect("postcard encoding into memory cannot fail");
    seal_record(prev_crc, entry.term, entry.index, start, out)
}

/// Frames `payload` as a record whatever its bytes: for tools and fuzzing that need records
/// whose checksums hold around contents no writer produced. Returns the record's crc.
pub fn encode_raw_record(prev_crc: u32, term: Term, index: Index, payload: &[u8], out: &mut Vec<u8>) -> u32 {
    let start = out.len();
    out.resize(start + RECORD_HEADER_LEN, 0);
    out.extend_from_slice(payload);
    seal_record(prev_crc, term, index, start, out)
}

/// Ends the record that starts at `start` (its header's room, then its payload) with the
/// marker, and fills in its header.
fn seal_record(prev_crc: u32, term: Term, index: Index, start: usize, out: &mut Vec<u8>) -> u32 {
    out.push(RECORD_END_MARKER);
    let len = out.len() - start - RECORD_HEADER_LEN;
    assert!(len as u64 <= PAYLOAD_BYTES_MAX as u64, "entry exceeds the payload limit");
    let crc = record_crc(prev_crc, term.0, index.0, &out[start + RECORD_HEADER_LEN..]);
    let header = &mut out[start..start + RECORD_HEADER_LEN];
    header[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    header[4..8].copy_from_slice(&crc.to_le_bytes());
    header[8..12].copy_from_slice(&prev_crc.to_le_bytes());
    header[12..20].copy_from_slice(&term.0.to_le_bytes());
    header[20..28].copy_from_slice(&index.0.to_le_bytes());
    let header_crc = crc32fast::hash(&header[..28]);
    header[28..32].copy_from_slice(&header_crc.to_le_bytes());
    crc
}

/// The encoded size of an entry with this clock reading and command, for batch accounting.
pub fn encoded_len(at: UnixMs, command: &Command) -> usize {
    RECORD_HEADER_LEN + postcard::experimental::serialized_size(&PayloadRef { at, command }).unwrap_or(0) + 1
}

/// The offset just after the last non-zero byte: where a preallocated file's content ends.
pub fn content_end(b: &[u8]) -> usize {
    b.iter().rposition(|&x| x != 0).map_or(0, |p| p + 1)
}

pub fn encode_segment_header(first: Index, prev_crc: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(SEGMENT_HEADER_LEN);
    out.extend_from_slice(SEGMENT_MAGIC);
    out.extend_from_slice(&first.0.to_le_bytes());
    out.extend_from_slice(&prev_crc.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let crc = crc32fast::hash(&out[..24]);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("slice of 4"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("slice of 8"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub first: Index,
    pub prev_crc: u32,
}

/// The format of a segment written by another version of truba, if that is what `b` starts
/// with: the same magic with another digit, and a header whose checksum holds (so a flipped bit
/// in this version's magic is damage, not another format).
pub fn other_segment_format(b: &[u8]) -> Option<u32> {
    let digit = *b.get(7)?;
    let other = b.len() >= SEGMENT_HEADER_LEN
        && b.starts_with(&SEGMENT_MAGIC[..7])
        && digit.is_ascii_digit()
        && b[..8] != SEGMENT_MAGIC[..]
        && crc32fast::hash(&b[..24]) == u32_at(b, 24);
    other.then(|| (digit - b'0') as u32)
}

pub fn decode_segment_header(b: &[u8]) -> Option<SegmentHeader> {
    if b.len() < SEGMENT_HEADER_LEN || &b[..8] != SEGMENT_MAGIC {
        return None;
    }
    if crc32fast::hash(&b[..24]) != u32_at(b, 24) {
        return None;
    }
    Some(SegmentHeader { first: Index(u64_at(b, 8)), prev_crc: u32_at(b, 16) })
}

/// A record that passed its own checksum.
#[derive(Clone, Debug)]
pub struct Decoded {
    pub entry: Entry,
    pub crc: u32,
    pub prev_crc: u32,
    pub end: usize,
}

/// Why the bytes at an offset are not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bad {
    /// The file ends inside the record: the shape a torn write leaves.
    Incomplete,
    /// The record is all there but a checksum fails or it does not decode: damage.
    Damaged,
}

/// Decodes the record at `at` if it is complete and its checksums hold. Chain continuity is the
/// caller's business.
pub fn decode_record(b: &[u8], at: usize) -> Result<Decoded, Bad> {
    if b.len() < at + RECORD_HEADER_LEN {
        return Err(Bad::Incomplete);
    }
    let header = &b[at..at + RECORD_HEADER_LEN];
    if crc32fast::hash(&header[..28]) != u32_at(header, 28) {
        return Err(Bad::Damaged);
    }
    let len = u32_at(header, 0);
    if len == 0 || len > PAYLOAD_BYTES_MAX {
        return Err(Bad::Damaged);
    }
    let end = at + RECORD_HEADER_LEN + len as usize;
    if b.len() < end {
        return Err(Bad::Incomplete);
    }
    let (crc, prev_crc) = (u32_at(header, 4), u32_at(header, 8));
    let (term, index) = (u64_at(header, 12), u64_at(header, 20));
    let payload = &b[at + RECORD_HEADER_LEN..end];
    if record_crc(prev_crc, term, index, payload) != crc {
        return Err(Bad::Damaged);
    }
    let (&marker, payload) = payload.split_last().expect("len is at least 1");
    if marker != RECORD_END_MARKER {
        return Err(Bad::Damaged);
    }
    let p: Payload = postcard::from_bytes(payload).map_err(|_| Bad::Damaged)?;
    let entry = Entry { term: Term(term), index: Index(index), at: p.at, command: p.command };
    Ok(Decoded { entry, crc, prev_crc, end })
}

/// How a segment's scan ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte belonged to a valid record, or is preallocated zeros after the last one.
    Clean,
    /// A record cut short (or junk that is no record after the log's end): a torn write,
    /// safe to cut at `offset`.
    Torn { offset: u64 },
    /// A complete record that is damaged or out of chain: never cut.
    Corrupt { offset: u64 },
}

#[derive(Clone, Debug)]
pub struct SegmentScan {
    pub header: SegmentHeader,
    pub records: Vec<Decoded>,
    pub end: ScanEnd,
    /// Where the valid records end (the header's end if there are none).
    pub valid_end: u64,
}

/// Reads a segment's records in order, checking the crc chain and that indexes follow one
/// another. `None` if the header itself is unreadable.
pub fn scan_segment(b: &[u8]) -> Option<SegmentScan> {
    let header = decode_segment_header(b)?;
    let mut records = Vec::new();
    let mut at = SEGMENT_HEADER_LEN;
    let mut prev_crc = header.prev_crc;
    let mut next_index = header.first;
    let content_end = content_end(b);
    while at < content_end {
        let end = match decode_record(b, at) {
            Ok(d) if d.prev_crc == prev_crc && d.entry.index == next_index => {
                prev_crc = d.crc;
                next_index = next_index.next();
                at = d.end;
                records.push(d);
                continue;
            }
            Ok(_) => ScanEnd::Corrupt { offset: at as u64 },
            Err(_) if cut_short(b, at, content_end) => ScanEnd::Torn { offset: at as u64 },
            Err(_) => ScanEnd::Corrupt { offset: at as u64 },
        };
        return Some(SegmentScan { header, records, end, valid_end: at as u64 });
    }
    Some(SegmentScan { header, records, end: ScanEnd::Clean, valid_end: at as u64 })
}

/// Whether the invalid record at `at` is the shape a torn write leaves: the file ends inside
/// it, zeros run from inside it to the end of the file, or no record begins there at all.
///
/// A record header always has a non-zero length, term and index, and one flipped bit can zero
/// at most one of them; preallocated zeros with a flipped bit have at most one of them set. So
/// a header with fewer than two of them set was never written: junk after the log's end.
fn cut_short(b: &[u8], at: usize, content_end: usize) -> bool {
    let header = &b[at..b.len().min(at + RECORD_HEADER_LEN)];
    if header.len() < RECORD_HEADER_LEN {
        return true;
    }
    let fields_set = [u32_at(header, 0) != 0, u64_at(header, 12) != 0, u64_at(header, 20) != 0];
    if fields_set.iter().filter(|&&set| set).count() < 2 {
        return true;
    }
    let header_ok = crc32fast::hash(&header[..28]) == u32_at(header, 28);
    let claimed_end =
        if header_ok { at + RECORD_HEADER_LEN + u32_at(header, 0) as usize } else { at + RECORD_HEADER_LEN };
    content_end < claimed_end
}

/// Frames a snapshot: magic, index, term, payload length, crc, payload.
pub fn encode_snapshot(index: Index, term: Term, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER_LEN + payload.len());
    out.resize(SNAPSHOT_HEADER_LEN, 0);
    out.extend_from_slice(payload);
    seal_snapshot(index, term, &mut out);
    out
}

/// Fills in the header of a snapshot file whose payload already follows `SNAPSHOT_HEADER_LEN`
/// bytes of room.
pub fn seal_snapshot(index: Index, term: Term, file: &mut [u8]) {
    let len = (file.len() - SNAPSHOT_HEADER_LEN) as u64;
    file[..8].copy_from_slice(SNAPSHOT_MAGIC);
    file[8..16].copy_from_slice(&index.0.to_le_bytes());
    file[16..24].copy_from_slice(&term.0.to_le_bytes());
    file[24..32].copy_from_slice(&len.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&file[8..32]);
    h.update(&file[SNAPSHOT_HEADER_LEN..]);
    let crc = h.finalize();
    file[32..36].copy_from_slice(&crc.to_le_bytes());
}

/// The index and term a snapshot file's header gives (without checking the payload, which a
/// reader of pieces checks section by section).
pub fn decode_snapshot_header(b: &[u8]) -> Result<(Index, Term), String> {
    if b.len() < SNAPSHOT_HEADER_LEN || &b[..8] != SNAPSHOT_MAGIC {
        return Err("not a snapshot of this version".into());
    }
    Ok((Index(u64_at(b, 8)), Term(u64_at(b, 16))))
}

/// Returns (index, term, payload) if the snapshot is whole and its checksum holds.
pub fn decode_snapshot(b: &[u8]) -> Result<(Index, Term, &[u8]), String> {
    if b.len() < SNAPSHOT_HEADER_LEN || &b[..8] != SNAPSHOT_MAGIC {
        return Err("bad header".into());
    }
    // The length is compared as the header gives it: a damaged one may be near u64::MAX.
    let (len, held) = (u64_at(b, 24), (b.len() - SNAPSHOT_HEADER_LEN) as u64);
    if held != len {
        return Err(format!("length {held} does not match header ({len})"));
    }
    let payload = &b[SNAPSHOT_HEADER_LEN..];
    let mut h = crc32fast::Hasher::new();
    h.update(&b[8..32]);
    h.update(payload);
    if h.finalize() != u32_at(b, 32) {
        return Err("checksum mismatch".into());
    }
    Ok((Index(u64_at(b, 8)), Term(u64_at(b, 16)), payload))
}

/// File names: zero-padded so that lexical order is numeric order.
pub fn segment_name(first: Index) -> String {
    format!("log-{:020}.seg", first.0)
}
pub fn snapshot_name(index: Index) -> String {
    format!("snap-{:020}.snap", index.0)
}
pub fn parse_segment_name(name: &str) -> Option<Index> {
    name.strip_prefix("log-")?.strip_suffix(".seg")?.parse().ok().map(Index)
}
pub fn parse_snapshot_name(name: &str) -> Option<Index> {
    name.strip_prefix("snap-")?.strip_suffix(".snap")?.parse().ok().map(Index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Request;
    use crate::types::{ClientId, Kind, Seq};

    /// Found by the `snapshot_recovery` fuzz target: a header whose length field is damaged to
    /// near `u64::MAX` overflowed the length check and panicked instead of being refused.
    #[test]
    fn a_snapshot_length_near_the_maximum_is_refused() {
        let mut file = encode_snapshot(Index(3), Term(1), b"payload");
        file[24..32].copy_from_slice(&(u64::MAX - 2).to_le_bytes());
        assert!(decode_snapshot(&file).unwrap_err().contains("does not match"));
    }

    fn entry(i: u64) -> Entry {
        Entry {
            term: Term(1),
            index: Index(i),
            at: UnixMs(1000 * i),
            command: Command::Client {
                client: ClientId(7),
                seq: Seq(i),
                request: Request::New { kind: Kind(1), record: Some(vec![i as u8; 40]) },
                due: None,
                principal: None,
            },
        }
    }

    fn segment(n: u64) -> Vec<u8> {
        let mut b = encode_segment_header(Index(1), 0);
        let mut crc = 0;
        for i in 1..=n {
            crc = encode_record(crc, &entry(i), &mut b);
        }
        b
    }

    #[test]
    fn a_segment_of_another_format_is_recognised_but_a_flipped_magic_is_not() {
        let mut b = segment(1);
        assert_eq!(other_segment_format(&b), None);
        b[7] ^= 1; // '2' becomes '3': a flipped bit, the header checksum no longer holds
        assert_eq!(other_segment_format(&b), None);
        b[7] = b'1';
        let crc = crc32fast::hash(&b[..24]);
        b[24..28].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(other_segment_format(&b), Some(1), "a whole format-1 header");
        assert_eq!(other_segment_format(b"TRUBAsn1"), None, "a snapshot is not a segment");
    }

    #[test]
    fn clean_segment_round_trips() {
        let s = scan_segment(&segment(5)).unwrap();
        assert_eq!(s.end, ScanEnd::Clean);
        assert_eq!(s.records.len(), 5);
        assert_eq!(s.records[4].entry, entry(5));
    }

    #[test]
    fn cut_tail_is_torn_at_every_cut_point() {
        let full = segment(3);
        let two = scan_segment(&full).unwrap().records[1].end;
        for cut in two + 1..full.len() {
            let s = scan_segment(&full[..cut]).unwrap();
            assert_eq!(s.records.len(), 2, "cut at {cut}");
            assert_eq!(s.end, ScanEnd::Torn { offset: two as u64 });
        }
    }

    #[test]
    fn a_flipped_bit_is_corruption_wherever_it_is() {
        let full = segment(3);
        let scan = scan_segment(&full).unwrap();
        let (first_end, second_end) = (scan.records[0].end, scan.records[1].end);
        // Every single bit of the second and third records, header and payload: never "torn".
        for byte in first_end..full.len() {
            for bit in 0..8 {
                let mut b = full.clone();
                b[byte] ^= 1 << bit;
                let s = scan_segment(&b).unwrap();
                let at = if byte < second_end { first_end } else { second_end };
                assert_eq!(s.end, ScanEnd::Corrupt { offset: at as u64 }, "flip at byte {byte} bit {bit}");
            }
        }
    }

    const PREALLOCATED: usize = 4096;

    fn zero_padded(mut b: Vec<u8>) -> Vec<u8> {
        b.resize(b.len() + PREALLOCATED, 0);
        b
    }

    #[test]
    fn preallocated_zeros_after_the_last_record_are_a_clean_end() {
        let full = segment(3);
        let s = scan_segment(&zero_padded(full.clone())).unwrap();
        assert_eq!((s.end, s.records.len(), s.valid_end), (ScanEnd::Clean, 3, full.len() as u64));
        let empty = scan_segment(&zero_padded(encode_segment_header(Index(1), 0))).unwrap();
        assert_eq!((empty.end, empty.valid_end), (ScanEnd::Clean, SEGMENT_HEADER_LEN as u64));
    }

    #[test]
    fn a_record_cut_short_by_zeros_is_torn_at_every_cut_point() {
        let full = zero_padded(segment(3));
        let two = scan_segment(&full).unwrap().records[1].end;
        let three = scan_segment(&full).unwrap().records[2].end;
        for cut in two + 1..three {
            let mut b = full.clone();
            b[cut..].fill(0);
            let s = scan_segment(&b).unwrap();
            assert_eq!(s.records.len(), 2, "cut at {cut}");
            assert_eq!(s.end, ScanEnd::Torn { offset: two as u64 }, "cut at {cut}");
        }
    }

    #[test]
    fn a_flipped_bit_before_preallocated_zeros_is_still_corruption() {
        let full = zero_padded(segment(3));
        let scan = scan_segment(&full).unwrap();
        let (first_end, second_end, third_end) = (scan.records[0].end, scan.records[1].end, scan.records[2].end);
        for byte in first_end..third_end {
            for bit in 0..8 {
                let mut b = full.clone();
                b[byte] ^= 1 << bit;
                let s = scan_segment(&b).unwrap();
                let at = if byte < second_end { first_end } else { second_end };
                assert_eq!(s.end, ScanEnd::Corrupt { offset: at as u64 }, "flip at byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn a_flipped_bit_in_preallocated_space_is_cut_not_corruption() {
        let full = zero_padded(segment(2));
        let end = scan_segment(&full).unwrap().valid_end as usize;
        for byte in [end, end + 5, end + 31, end + 32, end + 1000, full.len() - 1] {
            let mut b = full.clone();
            b[byte] ^= 0x10;
            let s = scan_segment(&b).unwrap();
            assert_eq!((s.records.len(), s.end), (2, ScanEnd::Torn { offset: end as u64 }), "flip at {byte}");
        }
    }

    /// Properties of the scanner over random segments: records of random sizes (payloads of
    /// zeros as well as of other bytes, so that zeros inside records are exercised), followed
    /// by random amounts of preallocated zeros.
    mod props {
        use super::*;
        use proptest::prelude::*;

        const SECTOR: usize = 512;

        fn record_entry(i: u64, len: usize, byte: u8) -> Entry {
            Entry {
                term: Term(1 + i / 3),
                index: Index(i),
                at: UnixMs(1000 * i),
                command: Command::Client {
                    client: ClientId(7),
                    seq: Seq(i),
                    request: Request::New { kind: Kind(1), record: Some(vec![byte; len]) },
                    due: None,
                    principal: None,
                },
            }
        }

        /// A segment of the given records (payload length, byte) and where each record ends.
        fn build(records: &[(usize, u8)]) -> (Vec<u8>, Vec<usize>) {
            let mut b = encode_segment_header(Index(1), 0);
            let (mut crc, mut ends) = (0, Vec::new());
            for (i, &(len, byte)) in records.iter().enumerate() {
                crc = encode_record(crc, &record_entry(i as u64 + 1, len, byte), &mut b);
                ends.push(b.len());
            }
            (b, ends)
        }

        /// How many records end at or before `offset`, and where the record holding it starts.
        fn record_at(ends: &[usize], offset: usize) -> (usize, usize) {
            let whole = ends.iter().filter(|&&e| e <= offset).count();
            (whole, if whole == 0 { SEGMENT_HEADER_LEN } else { ends[whole - 1] })
        }

        fn records() -> impl Strategy<Value = Vec<(usize, u8)>> {
            prop::collection::vec((0usize..700, prop_oneof![Just(0u8), Just(0xFFu8), any::<u8>()]), 1..8)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            #[test]
            fn whole_records_then_zeros_are_clean(recs in records(), pad in 0usize..5000) {
                let (mut b, ends) = build(&recs);
                b.resize(b.len() + pad, 0);
                let s = scan_segment(&b).unwrap();
                prop_assert_eq!(s.end, ScanEnd::Clean);
                prop_assert_eq!(s.records.len(), recs.len());
                prop_assert_eq!(s.valid_end as usize, *ends.last().unwrap());
            }

            /// A write torn at a sector boundary: the sectors after the tear keep the zeros
            /// that were there (preallocated) or are not there at all (appended).
            #[test]
            fn a_tear_at_any_sector_is_torn_or_a_shorter_clean_log(
                recs in records(), pad in 0usize..3000, tear in any::<prop::sample::Index>(), appended in any::<bool>()
            ) {
                let (mut b, ends) = build(&recs);
                let end = b.len();
                let first_sector = SEGMENT_HEADER_LEN.div_ceil(SECTOR);
                let last_sector = end.div_ceil(SECTOR);
                prop_assume!(last_sector > first_sector);
                let t = (first_sector + tear.index(last_sector - first_sector)) * SECTOR;
                let t = t.min(end);
                if appended {
                    b.truncate(t);
                } else {
                    b[t..].fill(0);
                    b.resize(end + pad, 0);
                }
                let (whole, start) = record_at(&ends, t);
                // A torn record whose kept bytes are all zeros (its length's low byte alone, say,
                // when the length is a multiple of 256) left nothing on disk: a shorter clean log.
                let nothing_kept = b[start..t].iter().all(|&x| x == 0);
                let s = scan_segment(&b).unwrap();
                prop_assert_eq!(s.records.len(), whole);
                if start == t || whole == recs.len() || nothing_kept {
                    prop_assert_eq!(s.end, ScanEnd::Clean);
                } else {
                    prop_assert_eq!(s.end, ScanEnd::Torn { offset: start as u64 });
                }
            }

            /// A flipped bit in any complete record, with or without zeros after the log, is
            /// corruption at that record: never a torn tail to cut.
            #[test]
            fn a_flip_in_a_record_is_corruption(
                recs in records(), pad in 0usize..3000, at in any::<prop::sample::Index>(), bit in 0u8..8
            ) {
                let (mut b, ends) = build(&recs);
                let end = b.len();
                b.resize(end + pad, 0);
                let p = SEGMENT_HEADER_LEN + at.index(end - SEGMENT_HEADER_LEN);
                b[p] ^= 1 << bit;
                let (k, start) = record_at(&ends, p);
                let s = scan_segment(&b).unwrap();
                prop_assert_eq!(s.records.len(), k);
                prop_assert_eq!(s.end, ScanEnd::Corrupt { offset: start as u64 });
            }

            /// A flipped bit in the preallocated zeros after the log is cut, with every record kept.
            #[test]
            fn a_flip_in_the_zeros_after_the_log_is_cut(
                recs in records(), pad in 1usize..3000, at in any::<prop::sample::Index>(), bit in 0u8..8
            ) {
                let (mut b, ends) = build(&recs);
                let end = b.len();
                b.resize(end + pad, 0);
                b[end + at.index(pad)] ^= 1 << bit;
                let s = scan_segment(&b).unwrap();
                prop_assert_eq!(s.records.len(), recs.len());
                prop_assert_eq!(s.end, ScanEnd::Torn { offset: *ends.last().unwrap() as u64 });
            }
        }
    }

    #[test]
    fn a_valid_but_misplaced_record_breaks_the_chain() {
        let mut b = encode_segment_header(Index(1), 0);
        let c1 = encode_record(0, &entry(1), &mut b);
        encode_record(c1 ^ 1, &entry(2), &mut b); // right index, wrong predecessor
        let s = scan_segment(&b).unwrap();
        assert_eq!(s.records.len(), 1);
        assert!(matches!(s.end, ScanEnd::Corrupt { .. }));
    }

    #[test]
    fn snapshot_checksum_catches_a_flip() {
        let mut s = encode_snapshot(Index(9), Term(1), b"state");
        assert_eq!(decode_snapshot(&s).unwrap().2, b"state");
        s[40] ^= 4;
        assert!(decode_snapshot(&s).is_err());
    }
}
