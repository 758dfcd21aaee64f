//! The one Conveyor binary's library half: wiring roles together ([`app`]), operator commands
//! ([`ops`], with [`backup`], [`replay`] and the [`archive`] group), the command line ([`cli`])
//! and the API's OpenAPI document ([`openapi`]). `main.rs` only parses arguments and calls
//! into this library (apart from `healthcheck`, whose one request it makes itself). The load lab
//! is not here: it is its own crate and binary (tools/loadtest), which uses this one as a
//! library.
#![warn(missing_docs)]

pub mod app;
pub mod archive;
pub mod backup;
pub mod cli;
pub mod dev_keys;
pub mod openapi;
pub mod ops;
pub mod replay;

pub use app::{App, Role, build};

/// A progress bar for `len` items of long work (`what` names them), or a hidden one when
/// `visible` is false (tests, scheduled jobs).
pub fn progress_bar(visible: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = if visible {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}} {{per_sec}} eta {{eta}}"
        ))
        .expect("valid template"),
    );
    bar
}
