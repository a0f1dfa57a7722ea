//! The contracts between l7mesh's processes (ARCHITECTURE.md, "Contracts between processes
//! (`l7mesh-api`)"): every message that crosses a process is one serde type here, so the
//! writer and the reader cannot drift apart.
#![forbid(unsafe_code)]

pub mod broker;
pub mod cluster;
pub mod control;
pub mod flow;
pub mod layout;
#[cfg(feature = "metrics")]
pub mod metrics;
mod reason;
pub mod rest;
pub mod stream;
pub mod tables;
pub mod token;
mod verdict;

pub use verdict::{Direction, ParseError, Verdict};
