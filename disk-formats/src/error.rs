//! The crate's one error type, sorted by fault.

use std::io;

/// Everything that can go wrong reading or writing a disk image format.
///
/// Sorted by whose fault it is: the environment (`Io`), the bytes of an image or package
/// (`Corrupt`), this crate's abilities (`Unsupported`), or the caller (`Usage`). Messages name
/// the structure, the byte offset where it helps, what was expected and what was found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system or device I/O error.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// The image's bytes are damaged or impossible: bad magic, checksum, offsets outside the
    /// file, a loop in a chain, a tar member escaping its folder.
    #[error("{what} is damaged at byte {offset}: {detail}")]
    Corrupt { what: String, offset: u64, detail: String },

    /// A valid image using a feature this crate does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// The caller asked for something the format cannot hold (a disk over VHD's limit, a size
    /// that is not a whole number of sectors).
    #[error("{0}")]
    Usage(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    pub(crate) fn corrupt(what: impl Into<String>, offset: u64, detail: impl Into<String>) -> Self {
        Error::Corrupt { what: what.into(), offset, detail: detail.into() }
    }
}

/// FUSE and NBD answer with an errno: damage is EIO, usage is EINVAL.
impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { source, context } => io::Error::new(source.kind(), format!("{context}: {source}")),
            Error::Usage(_) => io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
            Error::Unsupported(_) => io::Error::new(io::ErrorKind::Unsupported, e.to_string()),
            Error::Corrupt { .. } => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
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
