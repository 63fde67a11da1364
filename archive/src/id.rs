//! Typed 32-byte identifiers.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// Lower-case hex, 64 characters.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// The first `n` hex characters, for display.
            pub fn short(&self) -> String {
                let mut s = self.to_hex();
                s.truncate(8);
                s
            }

            /// Random id from the operating system's generator.
            pub fn random() -> Result<Self> {
                Ok(Self(crate::crypto::random_array()?))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|_| {
                    Error::Usage(format!("{s:?} is not a 64-digit hex {}", stringify!($name)))
                })?;
                Ok(Self(out))
            }
        }
    };
}

id_type!(
    /// Keyed BLAKE3 of a chunk's plaintext.
    ChunkId
);
id_type!(
    /// Unkeyed BLAKE3 of a whole pack file: the pack's name, verifiable without a key.
    PackId
);
id_type!(
    /// Keyed BLAKE3 of an object file's plaintext body (snapshots, stream maps), or random
    /// (index files, locks).
    ObjectId
);

/// A snapshot is named by the id of its manifest object.
pub type SnapshotId = ObjectId;
