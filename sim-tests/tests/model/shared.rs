//! A cheap-to-clone, cheap-to-hash wrapper for the large parts of the model's state.
//!
//! Stateright clones the whole system state for every transition and hashes it for every
//! fingerprint. A replica's state (its inputs since boot) and its durable disk are never changed
//! in place, so they are kept behind an `Arc` with their hash computed once, when they are made.
//! Equality still compares the values, so the wrapper is exactly as fine-grained as the value.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

#[derive(Clone)]
pub struct Shared<T> {
    digest: u64,
    value: Arc<T>,
}

impl<T: Hash> Shared<T> {
    pub fn new(value: T) -> Shared<T> {
        // `DefaultHasher::new()` has fixed keys, so digests are the same in every run.
        let mut h = DefaultHasher::new();
        value.hash(&mut h);
        Shared { digest: h.finish(), value: Arc::new(value) }
    }
}

impl<T> Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: PartialEq> PartialEq for Shared<T> {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest && (Arc::ptr_eq(&self.value, &other.value) || self.value == other.value)
    }
}

impl<T: Eq> Eq for Shared<T> {}

impl<T> Hash for Shared<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.digest);
    }
}

impl<T: fmt::Debug> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.value.fmt(f)
    }
}
