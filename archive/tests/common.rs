//! Shared helpers for the archive's integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use archive::backup::{backup, BackupOptions, Source};
use archive::chunker::ChunkerParams;
use archive::keyfile::KdfParams;
use archive::manifest::{SnapshotEntry, StreamKind};
use archive::progress::Progress;
use archive::reader::{ReadAhead, StreamReader};
use archive::store::ChunkStore;
use archive::{InitOptions, Repository};
use blockdev::MemDev;

pub fn init(dir: &std::path::Path, chunker: &str) -> Repository {
    let opts = InitOptions {
        chunker: ChunkerParams::parse(chunker).unwrap(),
        zstd_level: 3,
        kdf: KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 },
        time_zone: None,
        pack_size: 1 << 20,
    };
    Repository::init(&dir.join("repo"), b"pw", &opts).unwrap()
}

pub fn backup_mem(repo: &Repository, vm: &str, streams: &[(&str, &[u8])]) -> SnapshotEntry {
    let sources = streams
        .iter()
        .map(|(name, data)| Source {
            name: name.to_string(),
            kind: StreamKind::Disk,
            dev: Box::new(MemDev::new(data.to_vec())),
            changed: None,
        })
        .collect();
    let opts = BackupOptions { vm: vm.into(), ..Default::default() };
    backup(repo, sources, &opts, &Progress::default()).unwrap()
}

pub fn reader(repo: Arc<Repository>, snap: &SnapshotEntry, stream: &str, cache: usize) -> StreamReader {
    let map = repo.load_stream_map(&snap.snapshot.stream(stream).unwrap().map.parse().unwrap()).unwrap();
    let index = repo.load_index(64).unwrap();
    StreamReader::new(Arc::new(ChunkStore::new(repo, index, cache)), map, ReadAhead::default())
}

/// Deterministic bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}
