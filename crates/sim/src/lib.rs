//! Deterministic simulation of intermezzo: the server side.
//!
//! [`server::SimServer`] is the real server logic a simulation drives: the
//! journal crate's validation, reply cache and records, over an in-memory
//! redb disk that loses unsynced writes on a simulated crash. Its export is
//! the test kit's reference model fed every committed record in seq order.
//!
//! This crate must never start a thread or a runtime, read a clock or draw
//! randomness: every call is synchronous and takes the time it needs, so a
//! seed replays exactly.

mod disk;
mod export;
pub mod server;
pub mod world;

pub use server::{Mutation, ServerOpts, SimError, SimServer, SnapshotObject};
