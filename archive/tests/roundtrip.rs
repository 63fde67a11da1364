//! Property tests: whatever goes in comes back, through every read path.

mod common;

use std::sync::Arc;

use blockdev::{Allocation, BlockDev, MemDev};
use common::*;
use proptest::prelude::*;

/// A disk image from a recipe of (offset, length, kind) regions over zeros.
fn build(size: usize, regions: &[(usize, usize, u8)]) -> Vec<u8> {
    let mut d = vec![0u8; size];
    for (i, &(off, len, kind)) in regions.iter().enumerate() {
        let off = off % size;
        let len = len.min(size - off);
        let src = match kind % 3 {
            0 => noise(i as u64 + 1, len),
            1 => b"text text text\n".iter().copied().cycle().take(len).collect(),
            _ => vec![kind; len],
        };
        d[off..off + len].copy_from_slice(&src);
    }
    d
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    #[test]
    fn stream_reads_equal_source(
        size in 1usize..(6 << 20),
        regions in proptest::collection::vec((0usize..(6 << 20), 0usize..(2 << 20), any::<u8>()), 0..6),
        reads in proptest::collection::vec((any::<u64>(), 1usize..(3 << 20)), 1..20),
        cdc in any::<bool>(),
    ) {
        let data = build(size, &regions);
        let dir = tempfile::tempdir().unwrap();
        let repo = init(dir.path(), if cdc { "fastcdc:16K:64K:256K" } else { "fixed:64K" });
        let snap = backup_mem(&repo, "vm", &[("xvda", &data)]);
        let repo = Arc::new(repo);
        let r = reader(repo.clone(), &snap, "xvda", 8 << 20);
        prop_assert_eq!(r.len(), data.len() as u64);
        for (off, len) in reads {
            let off = (off % data.len() as u64) as usize;
            let len = len.min(data.len() - off);
            let mut buf = vec![0xAAu8; len];
            r.read_at(off as u64, &mut buf).unwrap();
            prop_assert!(buf == data[off..off + len], "read {}+{} differs", off, len);
        }
        // Zero runs reported by allocation really are zero.
        let mut pos = 0u64;
        while pos < r.len() {
            let run = r.allocation(pos, u64::MAX).unwrap();
            prop_assert!(run.len > 0);
            if run.kind == Allocation::Zero {
                prop_assert!(data[pos as usize..(pos + run.len) as usize].iter().all(|&b| b == 0));
            }
            pos += run.len;
        }
        // Restore onto a device equals the source.
        let target = MemDev::new(vec![0x55u8; data.len()]);
        let store = archive::store::ChunkStore::new(repo.clone(), repo.load_index(16).unwrap(), 0);
        let opts = archive::restore::RestoreOptions { threads: 3, write_zeros: true };
        archive::restore::restore(&store, r.map(), &target, opts, &Default::default()).unwrap();
        prop_assert!(target.to_vec() == data);
    }
}

#[test]
fn reads_of_1b_3k_1m_agree() {
    let mut data = noise(5, 5 << 20);
    data[(1 << 20)..(3 << 20)].fill(0);
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), "fixed:256K");
    let snap = backup_mem(&repo, "vm", &[("d", &data)]);
    let r = reader(Arc::new(repo), &snap, "d", 1 << 20);
    for step in [1usize, 3 * 1024, 1 << 20] {
        let mut out = Vec::with_capacity(data.len());
        let mut buf = vec![0u8; step];
        let mut pos = 0;
        // 1-byte reads over the whole stream would take long: sample a window for them.
        let end = if step == 1 { 300_000 } else { data.len() };
        while pos < end {
            let n = step.min(end - pos);
            r.read_at(pos as u64, &mut buf[..n]).unwrap();
            out.extend_from_slice(&buf[..n]);
            pos += n;
        }
        assert_eq!(out, data[..end], "step {step}");
    }
    // Past the end is an error, not a short read.
    let mut buf = [0u8; 2];
    assert!(r.read_at(data.len() as u64 - 1, &mut buf).is_err());
}

#[test]
fn dedup_across_vms_and_streams() {
    let a = noise(1, 4 << 20);
    let dir = tempfile::tempdir().unwrap();
    let repo = init(dir.path(), "fixed:1M");
    let s1 = backup_mem(&repo, "vm1", &[("xvda", &a)]);
    let s2 = backup_mem(&repo, "vm2", &[("xvda", &a), ("xvdb", &a)]);
    assert_eq!(s1.snapshot.summary.new_bytes, 4 << 20);
    assert_eq!(s2.snapshot.summary.new_bytes, 0, "global dedup: another VM's identical disk stores nothing");
    assert!(s2.snapshot.parent.is_none(), "vm2 has no parent of its own");
}
