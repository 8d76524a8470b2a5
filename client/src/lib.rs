//! # truba-client
//!
//! What a program needs to use a truba cluster, without the server: it depends on the engine's
//! types (requests, replies, ledger entries), never on the server, the disk or the command line.
//!
//! - [`client`]: `Pipe` and `Session`, with retries that are never applied twice, leader
//!   hints followed and silent members given up on quickly.
//! - [`reading`]: readers of the ledger: `Tail`, `Watch` and `Consumer` (re-exported by
//!   `client`).
//! - [`handler`]: `handler::serve` and the `Handler` trait for the pipe's deliveries.
//! - [`wire`]: framed postcard messages (length + crc32), and the client protocol's version.
//! - [`net`]: the network behind a trait (real TCP, with TLS when configured, or turmoil's in
//!   tests).
//!
//! The server (`truba`) re-exports these modules under the same names.

pub mod client;
pub mod handler;
pub mod net;
pub mod reading;
pub mod wire;
