//! The archive's one error type, sorted by fault.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the archive crate.
///
/// The variants are sorted by whose fault it is: the environment (`Io`), the bytes in the
/// repository (`Corrupt`, `Missing`), the reader's abilities (`Unsupported`), or the caller
/// (`Usage`, `WrongPassword`, `Locked`). Messages name the object and, where it helps, the
/// byte offset, what was expected and what was found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error on a repository path or a source.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// Bytes in the repository are damaged: bad magic, failed authentication, wrong hash,
    /// impossible lengths.
    #[error("{object} is damaged: {detail}")]
    Corrupt { object: String, detail: String },

    /// An object that something refers to is not there.
    #[error("{object} is missing{}", referenced_by.as_ref().map(|r| format!(" (referenced by {r})")).unwrap_or_default())]
    Missing { object: String, referenced_by: Option<String> },

    /// The repository uses a feature or version this build does not know.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// No key file opens with the given passphrase.
    #[error("wrong passphrase: no key in {0} opens with it")]
    WrongPassword(PathBuf),

    /// Another process holds a conflicting lock.
    #[error("repository is locked: {0}")]
    Locked(String),

    /// The caller asked for something impossible or ambiguous.
    #[error("{0}")]
    Usage(String),
}

/// The archive's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    pub(crate) fn corrupt(object: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Corrupt { object: object.into(), detail: detail.into() }
    }

    /// True for damage in the repository (as opposed to environment or usage faults).
    pub fn is_damage(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::Missing { .. })
    }
}

/// FUSE and NBD answer with an errno: damage is EIO, usage is EINVAL.
impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { source, context } => io::Error::new(source.kind(), format!("{context}: {source}")),
            Error::Usage(_) => io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
            Error::Unsupported(_) => io::Error::new(io::ErrorKind::Unsupported, e.to_string()),
            other => io::Error::other(other.to_string()),
        }
    }
}

/// Attach a context string to I/O results.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}
