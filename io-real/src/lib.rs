//! # truba
//!
//! The truba engine bound to files, TCP and the system clock: the server, the client library,
//! the handler side of the protocol, and the `truba` command line. The engine itself is
//! unchanged: this crate only carries out what it asks for.
//!
//! - [`server`]: the driver loop (engine task, connections, disk worker, deliveries, shutdown).
//! - [`disk`]: the data directory: the engine's disk operations on real files.
//! - [`net`]: the network behind a trait, so tests can run it over turmoil.
//! - [`wire`]: framed postcard messages (length + crc32).
//! - [`config`]: the TOML configuration and its defaults.
//! - [`identity`]: the cluster id, the data directory's owner, and the member connections' hello.
//! - [`client`]: `Pipe` and `Session`, with retries that are never applied twice.
//! - [`reading`]: readers of the ledger: `Tail`, `Watch` and `Consumer` (re-exported by `client`).
//! - [`handler`]: `handler::serve` and the `Handler` trait for the pipe's deliveries.
//! - [`bench`]: `truba bench`.
//! - [`bench_stored`]: `truba bench-stored`.
//! - [`bench_read`]: `truba bench-read`.

pub mod auth;
pub mod bench;
pub mod bench_read;
pub mod bench_stored;
pub mod client;
pub mod cluster_config;
pub mod config;
pub mod disk;
pub mod handler;
pub mod identity;
pub mod net;
pub mod reading;
pub mod server;
pub mod wire;
