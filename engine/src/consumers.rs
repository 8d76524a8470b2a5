//! Consumers with checkpoints (after Gazette's): a named consumer processes the ledger and
//! records how far it got, fenced by an epoch the way handles are fenced by attempts.
//!
//! - Opening a consumer is a replicated request whose epoch is its entry's index: unique and
//!   increasing, so it fences every earlier open (Kafka's generations and Gazette's fences do
//!   this; acknowledgements alone, as NATS has them, do not).
//! - A commit records the index the consumer processed through together with the session
//!   operations its processing produced, as one entry, all or nothing (`sessions/commit.rs`): a
//!   consumer restarted from its checkpoint meets every later event once, and its effects of
//!   earlier ones exactly once.
//! - Checkpoints are replicated state, in every snapshot. `read_through` waits on any replica
//!   until its applied checkpoint covers an index; a replica's applied state is a committed
//!   prefix, so it never answers early.

use crate::config::AppliedLimits;
use crate::error::RequestError;
use crate::op::{Checkpoint, QueryReply};
use crate::types::{Index, Instant};
use serde::{Deserialize, Serialize};

/// A consumer as the replicated state keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ConsumerState {
    pub epoch: u64,
    pub through: Index,
}

impl ConsumerState {
    pub fn checkpoint(&self, consumer: &str) -> Checkpoint {
        Checkpoint { consumer: consumer.to_string(), epoch: self.epoch, through: self.through }
    }
}

/// A consumer's name: 1 to `consumer_name_bytes_max` bytes of letters, digits, `.`, `_`, `-`
/// and `/`, so that it reads the same in a log line, a shell and a URL.
pub(crate) fn check_name(name: &str, limits: &AppliedLimits) -> Result<(), RequestError> {
    let max = limits.consumer_name_bytes_max as usize;
    if name.is_empty() || name.len() > max {
        return Err(RequestError::InvalidName(format!("a name has 1 to {max} bytes")));
    }
    let bad = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')));
    match bad {
        Some(c) => Err(RequestError::InvalidName(format!("{c:?} is not allowed (letters, digits, . _ - / are)"))),
        None => Ok(()),
    }
}

/// Read-throughs waiting on this replica for a checkpoint to cover an index.
#[derive(Debug, Default)]
pub(crate) struct ReadThroughs {
    waiting: Vec<Waiting>,
}

#[derive(Debug)]
struct Waiting {
    id: u64,
    consumer: String,
    index: Index,
    deadline: Instant,
    timeout_ms: u64,
}

impl ReadThroughs {
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn wait(&mut self, id: u64, consumer: String, index: Index, now: Instant, timeout_ms: u64) {
        let deadline = now.saturating_add(crate::types::Duration(timeout_ms));
        self.waiting.push(Waiting { id, consumer, index, deadline, timeout_ms });
    }

    /// Answers the waiting read-throughs that `lookup` now settles (covered, or the consumer
    /// gone), and those past their deadline.
    /// (`applied` is `None` but for a mutation test's deliberate bug, which answers once this
    /// replica's applied index covers the index.)
    pub fn settle(
        &mut self,
        now: Instant,
        applied: Option<Index>,
        lookup: impl Fn(&str) -> Option<Checkpoint>,
        mut answer: impl FnMut(u64, QueryReply),
    ) {
        self.waiting.retain(|w| {
            let reply = match lookup(&w.consumer) {
                None => Err(RequestError::UnknownConsumer(w.consumer.clone())),
                Some(c) if c.through >= w.index || applied.is_some_and(|a| a >= w.index) => Ok(c),
                Some(_) if now >= w.deadline => Err(RequestError::TimedOut { ms: w.timeout_ms }),
                Some(_) => return true,
            };
            answer(w.id, QueryReply::Checkpoint(reply));
            false
        });
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting.iter().map(|w| w.deadline).min()
    }

    /// Refuses every waiting read-through (the replica stopped).
    pub fn refuse_all(&mut self, error: RequestError, mut answer: impl FnMut(u64, QueryReply)) {
        for w in self.waiting.drain(..) {
            answer(w.id, QueryReply::Checkpoint(Err(error.clone())));
        }
    }
}
