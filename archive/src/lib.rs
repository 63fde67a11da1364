//! The vmvault repository: format v1 (see `format-spec/FORMAT.md`), chunking, keys and
//! encryption, packs, the paged chunk index, stream maps, snapshot manifests, locks, backup,
//! random-access stream reading, restore, check and statistics.
//!
//! Everything here is synchronous and uses plain threads; no async runtime, no CLI, no
//! process configuration. Bytes read from a repository are never trusted: every length is
//! checked before it sizes an allocation, every object is authenticated, every chunk is
//! re-hashed after decryption, and a problem is an [`Error`] naming the object.

pub mod backend;
pub mod backup;
pub mod bloom;
pub mod check;
pub mod chunker;
pub mod config;
pub mod crypto;
pub mod error;
pub mod extents;
#[cfg(test)]
mod golden;
pub mod hold;
pub mod id;
pub mod index;
pub mod keyfile;
pub mod lock;
pub mod manifest;
pub mod object;
pub mod pack;
pub mod progress;
pub mod prune;
pub mod reader;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod splitter;
pub mod stats;
pub mod store;

pub use error::{Error, Result};
pub use id::{ChunkId, ObjectId, PackId, SnapshotId};
pub use repo::{InitOptions, Repository};
