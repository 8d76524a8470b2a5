//! The consumers' properties, checked against the ledger's ground truth.
//!
//! - `consumer-exactly-once`: a consumer creates one session of its kind for every creation of
//!   the consumed kind it processes, in the commit that records it processed it. So for every
//!   such creation at or below the consumer's final checkpoint there is exactly one, and none
//!   above it, whatever crashes, stale processes and refused commits happened.
//! - `consumer-epoch`: every checkpoint committed carries the epoch of the consumer's latest
//!   open before it (a stale epoch's commit never applies).
//! - `read-through`: a read-through's answer covers the index asked about, and is a checkpoint
//!   that was committed (or kept by an open, under the open's epoch).

use crate::history::Event;
use crate::world::{RunOutput, Violation};
use std::collections::{BTreeMap, BTreeSet};
use truba_engine::{Kind, LedgerEntry, What};

pub fn check(run: &RunOutput) -> Vec<Violation> {
    let setup = &run.scenario.streams;
    if setup.consumers == 0 && setup.pipeline_readers == 0 {
        return Vec::new();
    }
    let (consumed, effect) = (Kind(setup.consumed_kind), Kind(setup.consumer_kind));
    let mut violations = Vec::new();
    let mut violate =
        |property, detail| violations.push(Violation { property, at_us: run.end_us, detail, session: None });
    let mut epochs: BTreeMap<String, u64> = BTreeMap::new();
    let mut committed: BTreeSet<(String, u64, u64)> = BTreeSet::new();
    let mut through: BTreeMap<String, u64> = BTreeMap::new();
    let mut creations: Vec<u64> = Vec::new();
    let mut effects: BTreeMap<(String, u64), u32> = BTreeMap::new();
    for (index, bytes) in &run.ledger {
        let e = LedgerEntry::decode(bytes).expect("the ground truth decodes");
        for ev in &e.events {
            match &ev.what {
                What::ConsumerOpened { consumer, epoch } => {
                    epochs.insert(consumer.clone(), *epoch);
                    // An open keeps the checkpoint under the new epoch: until the new epoch's
                    // first commit, a read answers (new epoch, old checkpoint), and rightly so.
                    let kept = through.get(consumer).copied().unwrap_or(0);
                    committed.insert((consumer.clone(), *epoch, kept));
                }
                What::CheckpointCommitted { consumer, epoch, through: t } => {
                    let current = epochs.get(consumer).copied().unwrap_or(0);
                    if *epoch != current {
                        let detail = format!(
                            "at index {index} consumer {consumer}'s checkpoint {} was committed with epoch {epoch}, \
                             but the consumer was opened again at epoch {current}",
                            t.0
                        );
                        violate("consumer-epoch", detail);
                    }
                    committed.insert((consumer.clone(), *epoch, t.0));
                    through.insert(consumer.clone(), t.0);
                }
                What::Created { records } if ev.kind == Some(consumed) => creations.push(*index),
                What::Created { records } if ev.kind == Some(effect) => {
                    let parsed = records.first().and_then(|r| std::str::from_utf8(r).ok()).and_then(parse_effect);
                    if let Some((name, i)) = parsed {
                        *effects.entry((name, i)).or_default() += 1;
                    }
                }
                _ => {}
            }
        }
    }
    for (name, t) in &through {
        for &i in &creations {
            let n = effects.get(&(name.clone(), i)).copied().unwrap_or(0);
            let expected = u32::from(i <= *t);
            if n != expected {
                let detail = format!(
                    "consumer {name} (checkpoint {t}) produced {n} effects of the creation at index {i}, not {expected}"
                );
                violate("consumer-exactly-once", detail);
                break;
            }
        }
    }
    // Read-throughs: what each question asked, and what its answer said.
    let mut asked: BTreeMap<(u32, u64), (String, u64)> = BTreeMap::new();
    for (t, e) in &run.history.events {
        match e {
            Event::ReadThroughInvoke { streamer, id, consumer, index } => {
                asked.insert((*streamer, *id), (consumer.clone(), *index));
            }
            Event::ReadThroughComplete { streamer, id, reply: Ok(c) } => {
                let Some((consumer, index)) = asked.get(&(*streamer, *id)) else { continue };
                let known = committed.contains(&(c.consumer.clone(), c.epoch, c.through.0));
                if c.through.0 < *index || !known || c.consumer != *consumer {
                    let detail = format!(
                        "a read of {consumer} through {index} was answered with checkpoint {} (epoch {}), which {}",
                        c.through.0,
                        c.epoch,
                        if known { "does not cover the index" } else { "was never committed" }
                    );
                    violations.push(Violation { property: "read-through", at_us: *t, detail, session: None });
                }
            }
            _ => {}
        }
    }
    violations
}

/// `out:<consumer>:<index>`: the record a consumer's effect carries.
fn parse_effect(record: &str) -> Option<(String, u64)> {
    let rest = record.strip_prefix("out:")?;
    let (name, index) = rest.rsplit_once(':')?;
    Some((name.to_string(), index.parse().ok()?))
}
