//! What every Conveyor process runs on: the consumer-group runtime ([`consumer`]) and the
//! [`Stage`] every consumer group implements, the layers every HTTP edge shares ([`http`]),
//! API keys and signed URLs ([`keys`], [`signing`]), read-model change notices ([`changes`]),
//! shutdown, metrics and telemetry.
//!
//! It stands on `conveyor-config` and the storage traits of `conveyor-storage`, and names no
//! storage engine.
#![warn(missing_docs)]

pub mod changes;
pub mod consumer;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod shutdown;
pub mod signing;
pub mod stage;
pub mod telemetry;
pub mod trace;
pub mod zipkin;

pub use stage::Stage;
