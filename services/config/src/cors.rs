//! `http.cors_origins`, parsed once when the settings load into [`CorsOrigins`], which the
//! HTTP edge turns into its CORS layer.

use std::fmt;

use http::HeaderValue;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Origins whose browser scripts may call the API (`http.cors_origins`): written as a
/// comma-separated list of `scheme://host[:port]`, or `*` for any, or empty for none.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum CorsOrigins {
    /// No CORS headers at all: browsers keep every other origin out. The default.
    #[default]
    None,
    /// Any origin (`*`).
    Any,
    /// These origins, each in the form browsers send it (see [`CorsOrigins::parse`]).
    List(Vec<HeaderValue>),
}

impl CorsOrigins {
    /// Parses the setting's text. Each origin is put in the form browsers send (RFC 6454
    /// §6.1): `scheme://host[:port]`, lowercase, without the scheme's default port, and
    /// nothing after it; `https://App.example:443/` becomes `https://app.example`.
    ///
    /// # Errors
    /// An origin that could never match what a browser sends (a path, a query, user info, a
    /// wildcard, a bad port, a scheme other than http and https), named in the message.
    pub fn parse(text: &str) -> Result<CorsOrigins, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(CorsOrigins::None);
        }
        if text == "*" {
            return Ok(CorsOrigins::Any);
        }
        let origins = text
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(origin)
            .collect::<Result<Vec<_>, _>>()?;
        // A list of nothing (`,`) allows nothing: the same as no CORS at all.
        Ok(match origins.is_empty() {
            true => CorsOrigins::None,
            false => CorsOrigins::List(origins),
        })
    }
}

/// One origin in the form browsers send it; see [`CorsOrigins::parse`].
fn origin(o: &str) -> Result<HeaderValue, String> {
    let bad = || {
        format!(
            "http.cors_origins: {o:?} is not an origin (scheme://host[:port]); list origins, \
             or give `*` alone for any"
        )
    };
    let uri: http::Uri = o.to_ascii_lowercase().parse().map_err(|_| bad())?;
    let scheme = uri
        .scheme_str()
        .filter(|s| matches!(*s, "http" | "https"))
        .ok_or_else(bad)?;
    let authority = uri.authority().ok_or_else(bad)?;
    if authority.as_str().contains('@') || !matches!(uri.path(), "" | "/") || uri.query().is_some()
    {
        return Err(bad());
    }
    let host = authority.host();
    let host_ok = match host.strip_prefix('[') {
        Some(v6) => v6
            .strip_suffix(']')
            .is_some_and(|inner| inner.parse::<std::net::Ipv6Addr>().is_ok()),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
        }
    };
    let has_port = authority.as_str().len() > host.len();
    let port = authority.port_u16().filter(|&p| p != 0);
    if !host_ok || (has_port && port.is_none()) {
        return Err(bad());
    }
    // An IPv6 address in the form browsers write it (compressed, RFC 5952).
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => format!("[{}]", v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?),
        None => host.to_owned(),
    };
    let origin = match (scheme, port) {
        ("https", Some(443)) | ("http", Some(80)) | (_, None) => format!("{scheme}://{host}"),
        (_, Some(port)) => format!("{scheme}://{host}:{port}"),
    };
    HeaderValue::from_str(&origin).map_err(|_| bad())
}

impl fmt::Display for CorsOrigins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CorsOrigins::None => Ok(()),
            CorsOrigins::Any => f.write_str("*"),
            CorsOrigins::List(origins) => {
                let texts: Vec<&str> = origins.iter().filter_map(|o| o.to_str().ok()).collect();
                f.write_str(&texts.join(","))
            }
        }
    }
}

/// `Debug` as the setting's text, quoted, as `ops config` shows it.
impl fmt::Debug for CorsOrigins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

impl Serialize for CorsOrigins {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CorsOrigins {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        CorsOrigins::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_origins_are_scheme_host_and_port_only() {
        assert_eq!(CorsOrigins::parse("").unwrap(), CorsOrigins::None);
        assert_eq!(CorsOrigins::parse(" * ").unwrap(), CorsOrigins::Any);
        assert_eq!(CorsOrigins::parse(" , ").unwrap(), CorsOrigins::None);
        for (given, sent) in [
            ("https://App.Example", "https://app.example"),
            ("https://b.example:443/", "https://b.example"),
            ("http://localhost:3000", "http://localhost:3000"),
            ("http://[::1]:8080", "http://[::1]:8080"),
            ("http://[0:0:0:0:0:0:0:1]:8080", "http://[::1]:8080"),
        ] {
            assert_eq!(origin(given).unwrap(), sent);
        }
        let list = CorsOrigins::parse("https://app.example, http://localhost:3000/,").unwrap();
        assert_eq!(
            list.to_string(),
            "https://app.example,http://localhost:3000"
        );
        for bad in [
            "garbage",
            "https://app.example/app",
            "https://*.example",
            "ftp://x",
            "https://",
            "https://x:abc",
            "https://x:",
            "https://x:99999",
            "https://[::1",
            "https://x:80:80",
            "https://x%2f",
            "https://é.example",
            "https://a.example, *",
            "https://u@a.example",
        ] {
            let e = CorsOrigins::parse(bad).expect_err(bad);
            assert!(e.contains("http.cors_origins"), "{e}");
        }
    }
}
