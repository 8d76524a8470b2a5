//! A replica's clocks: a monotonic clock that drifts, and a wall clock that drifts, starts at an
//! offset, and can be stepped in either direction. True (virtual) time is what the simulator
//! keeps; the engine only ever sees these readings.

use truba_engine::{Instant, Now, UnixMs};

/// The wall clock of true time zero: a fixed date, so that histories are reproducible.
pub const EPOCH_MS: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

#[derive(Clone, Debug, Default)]
pub struct SimClock {
    pub offset_ms: i64,
    pub drift_ppm: i64,
    pub steps_ms: i64,
}

impl SimClock {
    fn drifted(&self, true_us: u64) -> u64 {
        let t = true_us as i128;
        (t + t * self.drift_ppm as i128 / 1_000_000).max(0) as u64
    }

    pub fn now(&self, true_us: u64) -> Now {
        let mono_ms = self.drifted(true_us) / 1000;
        let wall = EPOCH_MS as i64 + mono_ms as i64 + self.offset_ms + self.steps_ms;
        Now { mono: Instant(mono_ms), wall: UnixMs(wall.max(0) as u64) }
    }

    /// The first true time (µs) at which the monotonic clock reads at least `mono`.
    pub fn true_us_at(&self, mono: Instant) -> u64 {
        let want_us = mono.0 as i128 * 1000;
        let t = want_us * 1_000_000 / (1_000_000 + self.drift_ppm as i128);
        let mut t = t.max(0) as u64;
        while self.drifted(t) / 1000 < mono.0 {
            t += 1;
        }
        t
    }

    /// How far the wall clock is from true time right now, in ms (positive: ahead).
    pub fn wall_error_ms(&self, true_us: u64) -> i64 {
        self.now(true_us).wall.0 as i64 - (EPOCH_MS + true_us / 1000) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_map_back_to_true_time() {
        for drift in [-500, 0, 37, 800] {
            let c = SimClock { offset_ms: 5, drift_ppm: drift, steps_ms: -2000 };
            for mono in [0, 1, 999, 123_456] {
                let t = c.true_us_at(Instant(mono));
                assert!(c.now(t).mono.0 >= mono);
                assert!(t == 0 || c.now(t - 1).mono.0 < mono, "drift {drift} mono {mono}");
            }
        }
    }
}
