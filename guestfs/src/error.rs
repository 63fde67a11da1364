//! One error type for everything guestfs reads, sorted by fault.

use std::io;

use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The device could not be read.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// Bytes that break the format's rules, with where they are.
    #[error("{what} at byte {offset}: {detail}")]
    Corrupt { what: &'static str, offset: u64, detail: String },
    /// A valid structure this reader does not handle (e.g. LVM thin pools).
    #[error("{0}")]
    Unsupported(String),
    /// A name that is not there.
    #[error("{0}: not found")]
    NotFound(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }

    pub(crate) fn corrupt(what: &'static str, offset: u64, detail: impl Into<String>) -> Self {
        Error::Corrupt { what, offset, detail: detail.into() }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { source, .. } => source,
            Error::Corrupt { .. } => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
            Error::Unsupported(_) => io::Error::new(io::ErrorKind::Unsupported, e.to_string()),
            Error::NotFound(_) => io::Error::new(io::ErrorKind::NotFound, e.to_string()),
        }
    }
}
