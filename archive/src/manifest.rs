//! Snapshot manifests: one backup of one VM (JSON inside a sealed object file).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{ObjectId, SnapshotId};

/// What a stream holds.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    Disk,
    Memory,
}

/// One stream of a snapshot and where its map is.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StreamRef {
    pub name: String,
    pub kind: StreamKind,
    pub size: u64,
    /// Object id of the stream map in `streams/`.
    pub map: String,
    /// Bytes in chunk extents / zero extents.
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub chunks: u64,
}

/// What the backup that made the snapshot did.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackupSummary {
    pub read_bytes: u64,
    pub new_chunks: u64,
    /// Plaintext bytes of the new chunks.
    pub new_bytes: u64,
    /// Bytes the new chunks take in packs.
    pub stored_bytes: u64,
    pub duration_ms: u64,
}

/// The manifest body.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub version: u32,
    pub vm: String,
    /// RFC 3339, UTC.
    pub time: String,
    pub host: String,
    #[serde(default)]
    pub tags: Vec<String>,
    pub parent: Option<String>,
    /// Free-form hypervisor metadata (the VM record, NICs, boot settings, ...).
    pub meta: Option<serde_json::Value>,
    pub streams: Vec<StreamRef>,
    pub summary: BackupSummary,
    pub program: String,
}

impl Snapshot {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("snapshot serializes")
    }

    pub fn from_json(b: &[u8], name: &str) -> Result<Self> {
        let s: Snapshot = serde_json::from_slice(b).map_err(|e| Error::corrupt(name, format!("manifest: {e}")))?;
        if s.version != 1 {
            return Err(Error::Unsupported(format!("{name}: manifest version {}", s.version)));
        }
        for st in &s.streams {
            st.map
                .parse::<ObjectId>()
                .map_err(|_| Error::corrupt(name, format!("stream {} has a bad map id", st.name)))?;
        }
        Ok(s)
    }

    pub fn stream(&self, name: &str) -> Option<&StreamRef> {
        self.streams.iter().find(|s| s.name == name)
    }

    pub fn timestamp(&self) -> Option<jiff::Timestamp> {
        self.time.parse().ok()
    }
}

/// A snapshot with its id, as listed.
#[derive(Clone, Debug)]
pub struct SnapshotEntry {
    pub id: SnapshotId,
    pub snapshot: Snapshot,
}

impl SnapshotEntry {
    /// Stream `name`, or a usage error naming the streams there are.
    pub fn stream_ref(&self, name: &str) -> Result<&StreamRef> {
        self.snapshot.stream(name).ok_or_else(|| {
            let names: Vec<&str> = self.snapshot.streams.iter().map(|s| s.name.as_str()).collect();
            Error::Usage(format!("snapshot {} has no stream {name:?} (it has: {})", self.id.short(), names.join(", ")))
        })
    }
}
