//! End-to-end tests: the real app on port 0 with a temp dir, driven over HTTP.

mod backup;
mod bad_input;
mod capacity;
mod clocks;
mod contract;
mod crash;
mod dead_letters;
mod delivery;
mod direct_uploads;
mod hostile;
mod idempotency;
mod observability;
mod outages;
mod photos;
mod pipeline;
mod private_media;
mod replay;
mod replicas;
mod s3;
mod scale_out;
mod video;
