//! Simulated readers: processes that ask the cluster for one session at a time (`get`, which the
//! leader answers with a linearizable read) and record what they were told, for the
//! `linearizable-reads` checker. The world carries their questions and answers over the client
//! network and follows "not the leader" answers for them, as the client library would.
//!
//! Which session a reader asks about is drawn from what the world has seen so far: mostly one
//! of the sessions written or delivered most recently (where a stale answer would show), some
//! other session a client created, or any id at all (deleted ones, and ids that never named a
//! session).

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;
use truba_engine::SessionId;

/// Recently touched sessions a reader picks from.
const RECENT_MAX: usize = 16;
/// Ids beyond the highest one seen that a reader may ask about (they name no session yet).
const BEYOND_MAX_ID: u64 = 50;

/// A question on its way: which session, and the engine query id of its latest send (a
/// redirect sends it again under a new id, so a late answer to an earlier send is recognised).
#[derive(Clone, Copy, Debug)]
pub struct Question {
    pub read: u64,
    pub session: SessionId,
    pub query: u64,
    pub redirects: u32,
}

#[derive(Debug)]
pub struct Reader {
    pub index: u32,
    /// The replica this reader believes leads.
    pub guess: usize,
    reads: u64,
    pub asking: Option<Question>,
}

impl Reader {
    pub fn new(index: u32) -> Reader {
        Reader { index, guess: 0, reads: 0, asking: None }
    }

    /// Starts the next question (the world sends it).
    pub fn ask(&mut self, session: SessionId, query: u64) -> Question {
        self.reads += 1;
        let q = Question { read: self.reads, session, query, redirects: 0 };
        self.asking = Some(q);
        q
    }

    /// The question being asked, if `query` is its latest send.
    pub fn asked(&self, query: u64) -> Option<Question> {
        self.asking.filter(|q| q.query == query)
    }
}

/// The sessions the world has seen, as readers choose from them.
#[derive(Debug, Default)]
pub struct Sightings {
    recent: VecDeque<u64>,
    created: Vec<u64>,
    max_id: u64,
}

impl Sightings {
    /// A client was told it created this session.
    pub fn created(&mut self, id: SessionId) {
        self.created.push(id.0);
        self.touched(id);
    }

    /// A request on this session was sent, or the session was delivered.
    pub fn touched(&mut self, id: SessionId) {
        self.max_id = self.max_id.max(id.0);
        if self.recent.back() == Some(&id.0) {
            return;
        }
        self.recent.retain(|x| *x != id.0);
        self.recent.push_back(id.0);
        if self.recent.len() > RECENT_MAX {
            self.recent.pop_front();
        }
    }

    /// A session to ask about: 70% a recently touched one, 20% any created one, 10% any id up
    /// to a little beyond the highest seen.
    pub fn pick(&self, rng: &mut ChaCha8Rng) -> SessionId {
        let roll: f64 = rng.gen();
        let id = if roll < 0.7 && !self.recent.is_empty() {
            self.recent[rng.gen_range(0..self.recent.len())]
        } else if roll < 0.9 && !self.created.is_empty() {
            self.created[rng.gen_range(0..self.created.len())]
        } else {
            rng.gen_range(1..=self.max_id + BEYOND_MAX_ID)
        };
        SessionId(id)
    }
}
