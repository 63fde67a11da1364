//! Repository statistics: logical size versus what is stored.

use serde::Serialize;

use crate::error::Result;
use crate::pack::pack_path;
use crate::repo::Repository;

#[derive(Debug, Default, Serialize)]
pub struct RepoStats {
    pub snapshots: usize,
    pub vms: usize,
    /// Sum of all streams' sizes over all snapshots.
    pub logical_bytes: u64,
    /// The part of `logical_bytes` in chunk extents (not zero extents).
    pub logical_data_bytes: u64,
    /// Distinct chunks in the index and their plaintext size.
    pub unique_chunks: u64,
    pub unique_bytes: u64,
    /// Bytes of all pack files (compressed, encrypted).
    pub stored_bytes: u64,
    pub packs: usize,
    /// logical_data_bytes / unique_bytes.
    pub dedup_ratio: f64,
    /// unique_bytes / stored_bytes.
    pub compression_ratio: f64,
    /// logical_bytes / stored_bytes: everything together, zero extents included.
    pub total_ratio: f64,
}

pub fn stats(repo: &Repository) -> Result<RepoStats> {
    let mut s = RepoStats::default();
    let snaps = repo.list_snapshots()?;
    s.snapshots = snaps.len();
    let mut vms: Vec<&str> = snaps.iter().map(|e| e.snapshot.vm.as_str()).collect();
    vms.sort_unstable();
    vms.dedup();
    s.vms = vms.len();
    for e in &snaps {
        for st in &e.snapshot.streams {
            s.logical_bytes += st.size;
            s.logical_data_bytes += st.data_bytes;
        }
    }
    let index = repo.load_index(16)?;
    let mut seen = std::collections::HashSet::new();
    for f in &index.files {
        for p in 0..f.page_count() {
            let page = f.read_page(&**repo.backend(), repo.sealer(), p)?;
            for (id, loc) in f.entries(&page) {
                if seen.insert(id) {
                    s.unique_chunks += 1;
                    s.unique_bytes += u64::from(loc.raw_len);
                }
            }
        }
    }
    for p in repo.list_packs()? {
        s.packs += 1;
        s.stored_bytes += repo.backend().size(&pack_path(&p))?;
    }
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    s.dedup_ratio = ratio(s.logical_data_bytes, s.unique_bytes);
    s.compression_ratio = ratio(s.unique_bytes, s.stored_bytes);
    s.total_ratio = ratio(s.logical_bytes, s.stored_bytes);
    Ok(s)
}
