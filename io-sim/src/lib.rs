//! # truba-sim
//!
//! A deterministic discrete-event simulator for the truba engine: one master seed, virtual
//! time, a simulated disk, clocks and workload with the fault model of DESIGN.md, and checkers
//! that compare what the replica claimed with the ground truth the simulator recorded.
//!
//! - [`scenario`]: the scenario file format.
//! - [`world`]: the event loop that drives the engine.
//! - [`disk`], [`clock`]: the simulated disk and clocks.
//! - [`workload`]: simulated clients and handlers.
//! - [`reader`]: simulated readers (`get`, answered with a linearizable read).
//! - [`history`]: ground-truth events and their condensed form.
//! - [`checkers`]: the properties.
//! - [`runner`]: running seeds and ranges, reporting.
//! - [`bench`]: the engine throughput benchmark.

pub mod bench;
pub mod checkers;
pub mod clock;
pub mod disk;
pub mod downtime;
pub mod history;
pub mod network;
pub mod reader;
pub mod runner;
pub mod scenario;
pub mod streamers;
pub mod workload;
pub mod world;
