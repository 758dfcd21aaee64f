//! `POST /v1/events`'s body: one event, or an array of them appended together.

use conveyor_schemas::intake::IncomingEvent;

/// The events in `body`: an array when its first non-blank byte is `[`, one event otherwise.
///
/// # Errors
/// As [`crate::json::parse_strict`], with array elements named by index (`[1].payload…`);
/// and `no events given` for an empty array.
pub fn parse(body: &[u8]) -> Result<Vec<IncomingEvent>, String> {
    let events = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => crate::json::parse_strict(body)?,
        _ => vec![crate::json::parse_strict(body)?],
    };
    if events.is_empty() {
        return Err("no events given".into());
    }
    Ok(events)
}
