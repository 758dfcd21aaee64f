//! What reaches Conveyor from outside, parsed. Everything here is a pure function of its
//! input, with no I/O and no heavy dependencies, so that `fuzz/` can run it millions of times:
//! - [`media`]: the accepted formats, told apart by their leading bytes;
//! - [`json`]: strict JSON bodies (one document, errors naming their JSON path), and
//!   [`intake`], `POST /v1/events`'s body;
//! - [`range`]: a `Range` header against an object's size;
//! - [`cursor`]: the opaque timeline cursors clients hand back;
//! - [`headers`]: JPEG, GIF, PNG and HEIF header walks, which decode nothing, for the checks
//!   that run before any image decoder;
//! - [`fuzzing`]: the properties the fuzz targets check, shared with the regression tests that
//!   replay every input a fuzzer ever found (`fuzz/regressions/`).
#![warn(missing_docs)]

pub mod cursor;
pub mod fuzzing;
pub mod headers;
pub mod intake;
pub mod json;
pub mod media;
pub mod range;
