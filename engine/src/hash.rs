//! The state hash: a value any two replicas (or two runs) can compare to know they hold the
//! same state. It is a wrapping sum of per-item digests, so a change updates it in O(1) by
//! removing the old item's digest and adding the new one.

use crate::op::UnixSecs;
use crate::types::{Index, Kind, SessionId};
use serde::Serialize;
use std::collections::BTreeMap;

/// Digest of a serializable value under a tag that separates item types.
pub(crate) fn digest<T: Serialize>(tag: u64, v: &T) -> u64 {
    // Digested items are small (records enter through their chained hash), so a stack buffer
    // nearly always suffices; larger ones fall back to the heap.
    let mut buf = [0u8; 256];
    match postcard::to_slice(v, &mut buf) {
        Ok(bytes) => xxhash_rust::xxh3::xxh3_64_with_seed(bytes, tag),
        Err(_) => {
            let bytes = postcard::to_allocvec(v).expect("postcard encoding into memory cannot fail");
            xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, tag)
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct StateHash(u64);

impl StateHash {
    pub fn add(&mut self, d: u64) {
        self.0 = self.0.wrapping_add(d);
    }
    pub fn remove(&mut self, d: u64) {
        self.0 = self.0.wrapping_sub(d);
    }
    pub fn value(&self, applied: Index, repeat_index: &BTreeMap<Kind, (UnixSecs, Index, SessionId)>) -> u64 {
        self.0.wrapping_add(digest(4, &(applied, repeat_index)))
    }
}
