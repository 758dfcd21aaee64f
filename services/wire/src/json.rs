//! Strict JSON: exactly one document, and an error that names where it went wrong.

use serde::de::DeserializeOwned;

/// Parses one JSON document into `T`. Anything after it but whitespace is refused, not
/// ignored.
///
/// # Errors
/// A message for the client naming the JSON path when there is one, such as
/// `payload.MediaDescribed.tags: invalid type: string "x", expected a sequence`, or
/// `trailing input after the JSON document: …`.
pub fn parse_strict<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // `?` is serde_path_to_error's "somewhere unknown", as at an early end of input.
        if path == "." || path == "?" || path.is_empty() {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })?;
    de.end()
        .map_err(|e| format!("trailing input after the JSON document: {e}"))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_trailing_input_are_named() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct T {
            tags: Vec<String>,
        }
        let e = parse_strict::<T>(br#"{"tags": "x"}"#).unwrap_err();
        assert!(e.starts_with("tags: invalid type"), "{e}");
        let e = parse_strict::<T>(br#"{"tags": []} {}"#).unwrap_err();
        assert!(e.starts_with("trailing input"), "{e}");
        assert!(parse_strict::<T>(b"{\"tags\": []}\n ").is_ok());
    }
}
