//! What kind of failure a backend error is. Every backend error type ([`LogError`],
//! [`ViewError`], [`ObjectError`]) says its [`ErrorKind`]; the driver and SDK errors behind
//! them are mapped onto kinds in one place per backend (`kind_of` in each implementation), and
//! callers decide on the kind, never on the text.
//!
//! [`LogError`]: crate::log::LogError
//! [`ViewError`]: crate::views::ViewError
//! [`ObjectError`]: crate::objects::ObjectError

/// The three ways a backend call can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Worth retrying as is: the backend is unavailable, timed out, throttled or overloaded.
    /// Also every failure that hits all requests alike until an operator acts (expired
    /// credentials, a read-only or missing database, a missing bucket), and every driver error
    /// a mapping does not recognise: retrying stalls one partition visibly (its lag grows),
    /// where giving up would dead-letter good records by the thousand.
    Transient,
    /// Retrying cannot help: this request or record is invalid, or refused for what it is.
    Permanent,
    /// What was asked for does not exist.
    NotFound,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
            ErrorKind::NotFound => "not found",
        })
    }
}

/// An error that knows its kind.
pub trait Kinded {
    /// What kind of failure this is: transient, permanent or not found.
    fn kind(&self) -> ErrorKind;

    /// Whether retrying as is can help: the kind is [`ErrorKind::Transient`].
    fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }
}

/// The kind of a failed local file operation (the embedded backends).
pub fn io_kind(e: &std::io::Error) -> ErrorKind {
    use std::io::ErrorKind as Io;
    match e.kind() {
        Io::NotFound => ErrorKind::NotFound,
        Io::InvalidInput | Io::InvalidData | Io::Unsupported => ErrorKind::Permanent,
        // Full disks, permissions, interrupted calls, timeouts: an operator or a moment can
        // fix them, and they hit every record alike.
        _ => ErrorKind::Transient,
    }
}

/// The kind of a SQLite error (the embedded log and read store).
pub fn sqlite_kind(e: &rusqlite::Error) -> ErrorKind {
    use rusqlite::ffi::ErrorCode as Code;
    match e {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
            // What this record's values break. A busy, read-only, full, corrupt or missing
            // database fails every record alike: transient, for an operator to fix while the
            // lag shows it.
            Code::ConstraintViolation
            | Code::TooBig
            | Code::TypeMismatch
            | Code::ParameterOutOfRange => ErrorKind::Permanent,
            _ => ErrorKind::Transient,
        },
        rusqlite::Error::QueryReturnedNoRows => ErrorKind::NotFound,
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::ToSqlConversionFailure(..) => ErrorKind::Permanent,
        _ => ErrorKind::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_busy_is_transient_and_a_constraint_is_permanent() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY); INSERT INTO t VALUES (1);")
            .unwrap();
        let duplicate = conn.execute("INSERT INTO t VALUES (1)", []).unwrap_err();
        assert_eq!(sqlite_kind(&duplicate), ErrorKind::Permanent);
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        assert_eq!(sqlite_kind(&busy), ErrorKind::Transient);
    }
}
