//! vmvault's capture side: sources that feed the archive.
//!
//! - [`xapi`]: a XenServer / XCP-ng API client (JSON-RPC or XML-RPC, HTTPS with pinned
//!   certificates, tasks, HTTP transfers);
//! - [`backup`]: back up one VM — snapshot or checkpoint, transfer, cleanup;
//! - [`restore`]: recreate a VM on a pool from a snapshot, halted or suspended with its
//!   memory;
//! - [`select`]: which VMs a run backs up.
//!
//! Sync throughout: the network is the only edge, and one blocking HTTP client is enough
//! for a backup that is bound by the archive's hashing and compression.

pub mod backup;
pub mod cbt;
pub mod error;
pub mod nbd;
pub mod restore;
pub mod run;
pub mod select;
pub mod source;
pub mod xapi;

pub use error::{Error, Result};
