//! # truba
//!
//! The truba engine bound to files, TCP and the system clock: the server, the client library,
//! the handler side of the protocol, and the `truba` command line. The engine itself is
//! unchanged: this crate only carries out what it asks for.
//!
//! - [`server`]: the driver loop (engine task, connections, disk worker, deliveries, shutdown).
//! - [`disk`]: the data directory: the engine's disk operations on real files.
//! - [`net`], [`wire`], [`client`], [`reading`], [`handler`]: the client side, from the
//!   `truba-client` crate (which has no server in it), re-exported here.
//! - [`config`]: the TOML configuration and its defaults.
//! - [`identity`]: the cluster id, the data directory's owner, and the member connections' hello.
//! - [`bench`]: `truba bench`.
//! - [`bench_stored`]: `truba bench-stored`.
//! - [`bench_read`]: `truba bench-read`.

// The client side lives in its own crate (no server in it); re-exported under the old paths.
pub use truba_client::{client, handler, net, reading, wire};

pub mod auth;
pub mod bench;
pub mod bench_read;
pub mod bench_stored;
pub mod cluster_config;
pub mod config;
pub mod disk;
pub mod identity;
pub mod server;
