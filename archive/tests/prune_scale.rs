//! Builds a synthetic repository with many tiny chunks for `bench/prune-scale.sh`, which then
//! measures `vmvault prune`'s peak memory on it. Ignored by default (minutes, ~1 GB of disk):
//!
//! ```text
//! VMVAULT_SCALE_REPO=/path/repo SCALE_CHUNKS=10000000 \
//!     cargo test --release -p archive --test prune_scale -- --ignored
//! ```
//!
//! The repository (passphrase `pw`) holds SCALE_CHUNKS distinct 16-byte chunks in 16 MiB
//! packs, indexed in files of 32 packs as a backup writes them, and 100 snapshots of VM
//! `scale`; snapshot `i` uses the i-th hundredth of the chunks. Every other snapshot is
//! already forgotten, so a prune deletes about half the packs and repacks the packs on the
//! boundaries. Two kept snapshots' streams are written next to the repository as
//! `expect-<snapshot id>.raw` so the script can check restores after the prune.

use archive::chunker::ChunkerParams;
use archive::extents::MapBuilder;
use archive::id::{ChunkId, PackId};
use archive::index::build_index;
use archive::keyfile::KdfParams;
use archive::manifest::{BackupSummary, Snapshot, StreamKind, StreamRef};
use archive::pack::{pack_path, seal_chunk, BlobEntry, PackBuilder};
use archive::{InitOptions, Repository};

fn chunk(i: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&i.to_le_bytes());
    b[8..].copy_from_slice(&(!i).to_le_bytes());
    b
}

#[test]
#[ignore = "builds a repository of millions of chunks for bench/prune-scale.sh"]
fn build_scale_repository() {
    let Ok(path) = std::env::var("VMVAULT_SCALE_REPO") else {
        panic!("set VMVAULT_SCALE_REPO to the repository path to create");
    };
    let n: u64 = std::env::var("SCALE_CHUNKS").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000_000);
    let path = std::path::PathBuf::from(path);
    let opts = InitOptions {
        chunker: ChunkerParams::Fixed { size: 64 << 10 },
        zstd_level: 1,
        kdf: KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 },
        time_zone: None,
        pack_size: 16 << 20,
    };
    let repo = Repository::init(&path, b"pw", &opts).unwrap();
    let ids: Vec<ChunkId> = (0..n).map(|i| repo.key().chunk_id(&chunk(i))).collect();

    // Packs, and an index file every 32 packs.
    let mut pack = PackBuilder::new();
    let mut pending: Vec<(PackId, BlobEntry)> = Vec::new();
    let mut packs = 0;
    let mut flush = |pack: PackBuilder, pending: &mut Vec<(PackId, BlobEntry)>, last: bool| {
        if !pack.is_empty() {
            let (id, bytes, entries) = pack.finish(repo.sealer()).unwrap();
            repo.backend().write(&pack_path(&id), &bytes).unwrap();
            pending.extend(entries.into_iter().map(|e| (id, e)));
            packs += 1;
        }
        if (packs % 32 == 0 || last) && !pending.is_empty() {
            let (iid, bytes) = build_index(repo.sealer(), pending).unwrap();
            repo.backend().write(&format!("index/{}", iid.to_hex()), &bytes).unwrap();
            pending.clear();
        }
    };
    for (i, id) in ids.iter().enumerate() {
        let blob = seal_chunk(repo.sealer(), id, &chunk(i as u64), 1).unwrap();
        pack.add(*id, &blob, 16);
        if pack.len() >= 16 << 20 {
            flush(std::mem::take(&mut pack), &mut pending, false);
        }
    }
    flush(pack, &mut pending, true);

    // 100 snapshots; forget the odd ones.
    let per = n / 100;
    let mut kept = Vec::new();
    for s in 0..100u64 {
        let range = s * per..if s == 99 { n } else { (s + 1) * per };
        let mut b = MapBuilder::default();
        for i in range.clone() {
            b.push_chunk(16, ids[i as usize]);
        }
        let map = b.finish();
        let map_id = repo.save_stream_map(&map).unwrap();
        let snap = Snapshot {
            version: 1,
            vm: "scale".into(),
            time: format!("2026-01-01T00:{:02}:{:02}Z", s / 60, s % 60),
            host: "bench".into(),
            tags: vec![],
            parent: None,
            meta: None,
            streams: vec![StreamRef {
                name: "xvda".into(),
                kind: StreamKind::Disk,
                size: map.size,
                map: map_id.to_hex(),
                data_bytes: map.size,
                zero_bytes: 0,
                chunks: range.end - range.start,
            }],
            summary: BackupSummary::default(),
            program: "prune_scale".into(),
        };
        let id = repo.save_snapshot(&snap).unwrap();
        if s % 2 == 1 {
            repo.forget_snapshot(&id).unwrap();
        } else {
            kept.push((id, range));
        }
    }
    for (id, range) in [kept[1].clone(), kept[kept.len() - 1].clone()] {
        let bytes: Vec<u8> = range.flat_map(chunk).collect();
        let out = path.parent().unwrap().join(format!("expect-{}.raw", id.to_hex()));
        std::fs::write(out, bytes).unwrap();
    }
    eprintln!("{n} chunks in {packs} packs, 100 snapshots (50 forgotten) in {}", path.display());
}
