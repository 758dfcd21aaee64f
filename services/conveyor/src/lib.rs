//! The one Conveyor binary's library half: wiring roles together ([`app`]), operator commands
//! ([`ops`]) and benchmarks ([`loadtest`]). `main.rs` only parses arguments.

pub mod app;
pub mod archive;
pub mod backup;
pub mod cli;
pub mod loadtest;
pub mod ops;
pub mod replay;

pub use app::{App, Role, build};
