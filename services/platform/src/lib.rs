//! The plumbing every Conveyor service stands on: configuration, telemetry, shutdown, the
//! version clock, and the three backend traits ([`ObjectStore`], [`EventLog`], [`ReadStore`])
//! with their embedded implementations and conformance suites.
//!
//! Services depend on the traits only; [`Backends::open`] is the one place that turns the
//! configured URIs into implementations.

pub mod backends;
pub mod changes;
pub mod clock;
pub mod config;
pub mod consumer;
pub mod error;
pub mod events;
pub mod http;
pub mod keys;
pub mod log;
pub mod metrics;
/// The accepted media formats; see [`conveyor_wire::media`].
pub use conveyor_wire::media;
pub mod objects;
pub mod shutdown;
pub mod signing;
pub mod sqlite;
pub mod telemetry;
pub mod testing;
pub mod views;

pub use backends::Backends;
pub use clock::VersionClock;
pub use config::Settings;
pub use error::{ErrorKind, Kinded};
pub use log::EventLog;
pub use objects::ObjectStore;
pub use views::ReadStore;
