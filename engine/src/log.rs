//! The log's layout on disk: which segment is being written, where, and the crc chain.
//! Writing is done by the engine in group-commit batches (see `engine.rs`); this module only
//! decides where the bytes of a batch go.

use crate::codec::{encode_record, encode_segment_header, segment_name};
use crate::op::Entry;
use crate::types::Index;

#[derive(Clone, Debug, Default)]
pub(crate) struct Log {
    /// Segments in index order: (first index, file name). The last one is written to.
    pub segments: Vec<(Index, String)>,
    /// Length of the last segment's valid content.
    pub end_offset: u64,
    /// Crc of the last durable record: the next record's `prev_crc`.
    pub last_crc: u32,
    /// Index of the last durable record.
    pub last_index: Index,
}

/// Where one batch goes (its bytes travel separately, in the write request).
#[derive(Clone, Debug)]
pub(crate) struct Placement {
    pub file: String,
    pub offset: u64,
    pub new_segment: bool,
    pub end_offset: u64,
    pub last_crc: u32,
}

impl Log {
    /// Encodes `entries` (which must continue the log) and says where to write them. A new
    /// segment is started when the current one is full; it begins with a header that carries the
    /// chain's crc across the file boundary.
    pub fn place(&self, entries: &[Entry], segment_bytes_max: u64) -> (Placement, Vec<u8>) {
        let first = entries.first().expect("a batch is never empty").index;
        assert_eq!(first, self.last_index.next(), "a batch continues the log");
        let new_segment = self.segments.is_empty() || self.end_offset >= segment_bytes_max;
        let (file, offset, mut data) = if new_segment {
            (segment_name(first), 0, encode_segment_header(first, self.last_crc))
        } else {
            (self.segments.last().expect("checked").1.clone(), self.end_offset, Vec::with_capacity(64 * 1024))
        };
        let mut crc = self.last_crc;
        for e in entries {
            crc = encode_record(crc, e, &mut data);
        }
        let end_offset = offset + data.len() as u64;
        (Placement { file, offset, new_segment, end_offset, last_crc: crc }, data)
    }

    /// Records that a placed batch is durable.
    pub fn commit(&mut self, p: &Placement, last: Index) {
        if p.new_segment {
            let first = Index(self.last_index.0 + 1);
            self.segments.push((first, p.file.clone()));
        }
        self.end_offset = p.end_offset;
        self.last_crc = p.last_crc;
        self.last_index = last;
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
}
