//! Where Conveyor keeps its state: the three storage traits ([`EventLog`], [`ObjectStore`],
//! [`ReadStore`]), their embedded implementations (SQLite, a local directory) and distributed
//! ones (Kafka, S3, ScyllaDB, each behind a Cargo feature of its name, all on by default), the
//! one factory that opens what the settings name ([`Backends::open`]), and a conformance suite
//! per trait that every implementation passes.
//!
//! Everything above this crate works against the traits; only [`backends`] names an
//! implementation.
#![warn(missing_docs)]

pub mod backends;
pub mod clock;
pub mod error;
pub mod events;
pub mod log;
/// The accepted media formats; see [`conveyor_wire::media`].
pub use conveyor_wire::media;
pub mod objects;
pub mod sqlite;
pub mod testing;
pub mod views;

pub use backends::Backends;
pub use clock::VersionClock;
pub use error::{ErrorKind, Kinded};
pub use log::EventLog;
pub use objects::ObjectStore;
pub use views::ReadStore;
