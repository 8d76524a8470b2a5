//! What the engine's integration tests share: a perfect in-memory directory that carries out
//! the engine's disk operations at once (the disk is never the interesting part there).

pub mod driver;

pub use truba_engine::mem_dir::{exec, MemDir as Dir};
