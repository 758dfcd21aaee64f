//! Helpers for Conveyor's end-to-end tests: spawn the real app (in process, or as the real
//! binary) on port 0 with a temp dir, and drive it over HTTP.

pub mod helpers;
pub mod images;
pub mod videos;
