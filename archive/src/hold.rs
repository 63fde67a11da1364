//! Holds: a snapshot something outside the repository depends on (the base of a
//! `serve --writable` overlay) cannot be forgotten, so prune never deletes its data.
//!
//! `holds/<snapshot hex>-<random>` names the snapshot and who holds it. Forgetting and
//! holding race without a lock, both writing before they look (FORMAT.md §14.7):
//! - forget writes `forgetting/<snapshot hex>-<random>`, then lists holds, and removes the
//!   manifest only if there are none;
//! - a hold is written, then `forgetting/` is listed and the manifest checked; a live
//!   tombstone or a missing manifest withdraws the hold.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::SnapshotId;
use crate::repo::Repository;

pub const HOLD_DIR: &str = "holds";
pub const FORGET_DIR: &str = "forgetting";
pub const HOLD_MAGIC: &[u8; 8] = b"VMVHOLD1";
pub const TOMBSTONE_MAGIC: &[u8; 8] = b"VMVFGET1";

/// Who holds a snapshot, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Hold {
    pub version: u32,
    pub snapshot: String,
    /// What depends on it, e.g. "overlay /var/lib/ov/boot1/web01@3fa2c1d0.xvda.ovl".
    pub reason: String,
    /// The overlay file (absolute path) whose discard releases the hold, if any.
    pub overlay: Option<String>,
    pub host: String,
    pub created: String,
}

/// A forget in progress (its process, so a killed forget's tombstone goes stale).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tombstone {
    version: u32,
    snapshot: String,
    host: String,
    pid: u32,
    created: String,
}

/// Every hold, by file name.
pub fn holds(repo: &Repository) -> Result<Vec<(String, Hold)>> {
    let mut out = Vec::new();
    for name in repo.backend().list(HOLD_DIR)? {
        if let Some(h) = repo.read_json_object::<Hold>(&format!("{HOLD_DIR}/{name}"), HOLD_MAGIC)? {
            out.push((name, h));
        }
    }
    Ok(out)
}

/// Holds on one snapshot.
pub fn holds_on(repo: &Repository, id: &SnapshotId) -> Result<Vec<Hold>> {
    let prefix = format!("{}-", id.to_hex());
    let mut out = Vec::new();
    for name in repo.backend().list(HOLD_DIR)?.into_iter().filter(|n| n.starts_with(&prefix)) {
        if let Some(h) = repo.read_json_object::<Hold>(&format!("{HOLD_DIR}/{name}"), HOLD_MAGIC)? {
            out.push(h);
        }
    }
    Ok(out)
}

/// Hold snapshot `id`; returns the hold's name. Fails when the snapshot is gone or being
/// forgotten right now.
pub fn hold(repo: &Repository, id: &SnapshotId, reason: &str, overlay: Option<String>) -> Result<String> {
    let name = format!("{}-{}", id.to_hex(), hex::encode(crate::crypto::random_array::<8>()?));
    let h = Hold {
        version: 1,
        snapshot: id.to_hex(),
        reason: reason.to_string(),
        overlay,
        host: crate::lock::hostname(),
        created: jiff::Timestamp::now().to_string(),
    };
    let path = format!("{HOLD_DIR}/{name}");
    repo.write_json_object(&path, HOLD_MAGIC, &h)?;
    // Written; now look. A forget that did not see this hold wrote its tombstone first.
    let prefix = format!("{}-", id.to_hex());
    for t in repo.backend().list(FORGET_DIR)?.into_iter().filter(|n| n.starts_with(&prefix)) {
        let tomb = repo.read_json_object::<Tombstone>(&format!("{FORGET_DIR}/{t}"), TOMBSTONE_MAGIC);
        let live = match &tomb {
            Ok(Some(t)) => crate::lock::holder_gone(&t.host, t.pid, &t.created, repo.stale_after).is_none(),
            Ok(None) => false,
            Err(_) => true, // cannot tell: assume a forget runs
        };
        if live {
            repo.backend().remove(&path)?;
            return Err(Error::Usage(format!("snapshot {} is being forgotten; it cannot be held", id.short())));
        }
    }
    if !repo.backend().exists(&format!("snapshots/{}", id.to_hex())) {
        repo.backend().remove(&path)?;
        return Err(Error::Missing { object: format!("snapshot {}", id.short()), referenced_by: Some(reason.into()) });
    }
    Ok(name)
}

/// Release the holds an overlay file made.
pub fn release_overlay(repo: &Repository, overlay: &str) -> Result<usize> {
    let mut n = 0;
    for (name, h) in holds(repo)? {
        if h.overlay.as_deref() == Some(overlay) {
            repo.backend().remove(&format!("{HOLD_DIR}/{name}"))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Remove snapshot `id`'s manifest unless it is held. Removing one that is already gone is
/// not an error, so an interrupted forget can be run again.
pub fn forget(repo: &Repository, id: &SnapshotId) -> Result<()> {
    let manifest = format!("snapshots/{}", id.to_hex());
    if !repo.backend().exists(&manifest) {
        return Ok(());
    }
    let tomb = format!("{FORGET_DIR}/{}-{}", id.to_hex(), hex::encode(crate::crypto::random_array::<8>()?));
    let t = Tombstone {
        version: 1,
        snapshot: id.to_hex(),
        host: crate::lock::hostname(),
        pid: std::process::id(),
        created: jiff::Timestamp::now().to_string(),
    };
    repo.write_json_object(&tomb, TOMBSTONE_MAGIC, &t)?;
    // Written; now look. A hold this listing misses sees the tombstone and withdraws.
    let result = match holds_on(repo, id) {
        Ok(h) if !h.is_empty() => Err(Error::Usage(format!(
            "snapshot {} is held ({}); release it first (vmvault overlay discard)",
            id.short(),
            h.iter().map(|h| h.reason.as_str()).collect::<Vec<_>>().join("; ")
        ))),
        Ok(_) => repo.backend().remove(&manifest),
        Err(e) => Err(e),
    };
    repo.backend().remove(&tomb)?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> (tempfile::TempDir, Repository, SnapshotId) {
        let dir = tempfile::tempdir().unwrap();
        let opts = crate::InitOptions {
            kdf: crate::keyfile::KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 },
            ..Default::default()
        };
        let repo = Repository::init(&dir.path().join("r"), b"pw", &opts).unwrap();
        let snap = crate::manifest::Snapshot {
            version: 1,
            vm: "web".into(),
            time: "2026-01-01T00:00:00Z".into(),
            host: "h".into(),
            tags: vec![],
            parent: None,
            meta: None,
            streams: vec![],
            summary: Default::default(),
            program: "t".into(),
        };
        let id = repo.save_snapshot(&snap).unwrap();
        (dir, repo, id)
    }

    #[test]
    fn a_held_snapshot_is_not_forgotten_until_released() {
        let (_d, repo, id) = repo();
        let name = hold(&repo, &id, "overlay /x.ovl", Some("/x.ovl".into())).unwrap();
        let err = forget(&repo, &id).unwrap_err().to_string();
        assert!(err.contains("held (overlay /x.ovl)"), "{err}");
        assert!(repo.backend().exists(&format!("snapshots/{}", id.to_hex())));
        assert!(repo.backend().list(FORGET_DIR).unwrap().is_empty(), "tombstone removed");
        assert!(name.starts_with(&id.to_hex()));
        assert_eq!(release_overlay(&repo, "/x.ovl").unwrap(), 1);
        forget(&repo, &id).unwrap();
        assert!(!repo.backend().exists(&format!("snapshots/{}", id.to_hex())));
        // Gone: it cannot be held any more.
        assert!(matches!(hold(&repo, &id, "late", None), Err(Error::Missing { .. })));
        assert!(holds(&repo).unwrap().is_empty());
    }

    #[test]
    fn a_forget_in_progress_refuses_holds_and_a_dead_ones_does_not() {
        let (_d, repo, id) = repo();
        let mut t = Tombstone {
            version: 1,
            snapshot: id.to_hex(),
            host: crate::lock::hostname(),
            pid: std::process::id(),
            created: jiff::Timestamp::now().to_string(),
        };
        let path = format!("{FORGET_DIR}/{}-0000000000000000", id.to_hex());
        repo.write_json_object(&path, TOMBSTONE_MAGIC, &t).unwrap();
        let err = hold(&repo, &id, "overlay", None).unwrap_err().to_string();
        assert!(err.contains("being forgotten"), "{err}");
        assert!(holds(&repo).unwrap().is_empty(), "the hold was withdrawn");
        // A killed forget's tombstone (its process is gone) does not block.
        t.pid = i32::MAX as u32 - 7;
        repo.write_json_object(&path, TOMBSTONE_MAGIC, &t).unwrap();
        hold(&repo, &id, "overlay", None).unwrap();
        assert_eq!(holds_on(&repo, &id).unwrap().len(), 1);
    }
}
