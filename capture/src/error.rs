//! The crate's one error type, sorted by fault.

use std::io;

/// Everything that can go wrong talking to a pool or moving a VM's data.
///
/// Sorted by whose fault it is: the network or the local system (`Io`, `Connect`), the
/// pool's answer (`Api` — XAPI said no, with its error code; `Protocol` — an answer that
/// is not XAPI's), this crate's abilities (`Unsupported`), or the caller (`Usage`), plus
/// the repository's and the disk formats' own errors. Messages never contain passwords or
/// session references.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A local I/O error, or one while moving disk data.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// The pool could not be reached or the TLS handshake failed.
    #[error("cannot reach {host}: {detail}")]
    Connect { host: String, detail: String },

    /// XAPI answered with a failure: `code` and its parameters (reference §1.9).
    #[error("{method}: {code}{}", fmt_params(params))]
    Api { method: String, code: String, params: Vec<String> },

    /// An answer that does not follow XAPI's protocol (bad XML, an HTTP error page).
    #[error("{what}: {detail}")]
    Protocol { what: String, detail: String },

    #[error("unsupported: {0}")]
    Unsupported(String),

    #[error("{0}")]
    Usage(String),

    #[error(transparent)]
    Archive(#[from] archive::Error),

    #[error(transparent)]
    Format(#[from] disk_formats::Error),
}

fn fmt_params(p: &[String]) -> String {
    if p.is_empty() {
        String::new()
    } else {
        format!(" [{}]", p.join(", "))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    pub(crate) fn protocol(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Protocol { what: what.into(), detail: detail.into() }
    }

    /// The XAPI error code, when XAPI refused.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { source, context } => io::Error::new(source.kind(), format!("{context}: {source}")),
            other => io::Error::other(other.to_string()),
        }
    }
}
