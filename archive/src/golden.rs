//! Golden vectors: fixed inputs → the exact bytes in `format-spec/vectors/`. A format change
//! shows up as a failing test and a reviewed diff of the vector files. Regenerate with
//! `VMVAULT_BLESS=1 cargo test -p archive golden`.
//!
//! Each vector is also decoded here by the public readers, so the files double as reader
//! test input.

use std::path::PathBuf;

use crate::chunker::{Chunker, ChunkerParams};
use crate::crypto::{MasterKey, Sealer};
use crate::extents::{MapBuilder, StreamMap};
use crate::id::{ChunkId, ObjectId};
use crate::index::{build_index_with_id, IndexFile};
use crate::keyfile::{KdfParams, KeyFile};
use crate::manifest::{BackupSummary, Snapshot, StreamKind, StreamRef};
use crate::object::{open_object, seal_object, SNAPSHOT_MAGIC, STREAM_MAGIC};
use crate::pack::{open_chunk, parse_toc, PackBuilder};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../format-spec/vectors")
}

/// Compare `bytes` with the vector file, or write it when blessing.
fn vector(name: &str, bytes: &[u8]) {
    let path = dir().join(name);
    if std::env::var_os("VMVAULT_BLESS").is_some() {
        std::fs::create_dir_all(dir()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        return;
    }
    let want = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (bless with VMVAULT_BLESS=1)", path.display()));
    assert!(
        want == bytes,
        "{name} differs from the golden vector; if the format change is intended, bless and review the diff"
    );
}

/// The master key of every vector: bytes 0, 1, 2, ... 63.
fn key() -> MasterKey {
    let mut b = [0u8; 64];
    for (i, x) in b.iter_mut().enumerate() {
        *x = i as u8;
    }
    MasterKey::from_bytes(&b)
}

/// Nonce prefix of every vector seal.
const PREFIX: [u8; 8] = *b"vmvGOLD!";

/// xorshift64 from seed 1, one byte per step (the low byte): the seeded data of the vectors.
fn seeded(len: usize) -> Vec<u8> {
    let mut x = 1u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn golden_chunk_boundaries() {
    let data = seeded(4 << 20);
    let k = key();
    let mut out = String::from("{\n");
    let specs = ["fixed:256K", "fastcdc:16K:64K:256K", "fastcdc:256K:1M:4M"];
    for (i, spec) in specs.iter().enumerate() {
        let ch = Chunker::new(ChunkerParams::parse(spec).unwrap(), k.gear_seed()).unwrap();
        let mut lens = Vec::new();
        let mut pos = 0;
        while let Some(n) = ch.next_cut(pos as u64, &data[pos..], true) {
            lens.push(n.to_string());
            pos += n;
        }
        assert_eq!(pos, data.len());
        let sep = if i + 1 < specs.len() { "," } else { "" };
        out.push_str(&format!("  \"{spec}\": [{}]{sep}\n", lens.join(", ")));
    }
    out.push_str("}\n");
    vector("chunk-boundaries.json", out.as_bytes());
    assert_eq!(format!("{:016x}", k.gear_seed()).len(), 16);
}

fn sample_chunks() -> Vec<Vec<u8>> {
    vec!["vmvault golden chunk, compressible. ".repeat(64).into_bytes(), seeded(100)]
}

/// A pack of the two sample chunks, each sealed with the fixed prefix.
fn sample_pack(k: &MasterKey) -> (crate::id::PackId, Vec<u8>, Vec<crate::pack::BlobEntry>) {
    let sealer = Sealer::with_prefix(k.data_key(), PREFIX);
    let mut pb = PackBuilder::new();
    for c in sample_chunks() {
        let id = k.chunk_id(&c);
        let blob = crate::pack::seal_chunk(&sealer, &id, &c, 3).unwrap();
        pb.add(id, &blob, c.len() as u32);
    }
    pb.finish(&sealer).unwrap()
}

#[test]
fn golden_sealed_chunk_and_pack() {
    let k = key();
    let chunks = sample_chunks();
    let sealer = Sealer::with_prefix(k.data_key(), PREFIX);
    let id = k.chunk_id(&chunks[0]);
    let blob = crate::pack::seal_chunk(&sealer, &id, &chunks[0], 3).unwrap();
    vector("sealed-chunk.bin", &blob);
    vector("sealed-chunk.id", format!("{}\n", id.to_hex()).as_bytes());
    let back = open_chunk(&sealer, &k, &id, &blob, chunks[0].len() as u32, "vector").unwrap();
    assert_eq!(back, chunks[0]);

    let (pack_id, bytes, entries) = sample_pack(&k);
    vector("pack.bin", &bytes);
    vector("pack.id", format!("{}\n", pack_id.to_hex()).as_bytes());
    let toc = parse_toc(&sealer, bytes.len() as u64, &bytes, "pack").unwrap();
    assert_eq!(toc, entries);
    for (e, c) in toc.iter().zip(&chunks) {
        let blob = &bytes[e.offset as usize..(e.offset + e.stored_len) as usize];
        assert_eq!(&open_chunk(&sealer, &k, &e.id, blob, e.raw_len, "pack").unwrap(), c);
    }
}

#[test]
fn golden_index() {
    let k = key();
    let (pack_id, _, entries) = sample_pack(&k);
    let sealer = Sealer::with_prefix(k.data_key(), PREFIX);
    let pairs: Vec<_> = entries.iter().map(|e| (pack_id, *e)).collect();
    let (id, bytes) = build_index_with_id(&sealer, &pairs, ObjectId([0x22; 32])).unwrap();
    vector("index.bin", &bytes);
    // Read it back through the backend like a repository would.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("index")).unwrap();
    std::fs::write(tmp.path().join("index").join(id.to_hex()), &bytes).unwrap();
    let backend = crate::backend::LocalBackend::new(tmp.path());
    let file = IndexFile::open(&backend, &sealer, &id.to_hex()).unwrap();
    let set = crate::index::IndexSet::new(vec![file], 4);
    for e in &entries {
        let loc = set.lookup(&backend, &sealer, &e.id).unwrap().unwrap();
        assert_eq!((loc.pack, loc.offset, loc.stored_len, loc.raw_len), (pack_id, e.offset, e.stored_len, e.raw_len));
    }
    assert!(set.lookup(&backend, &sealer, &ChunkId([0xff; 32])).unwrap().is_none());
}

fn sample_map(k: &MasterKey) -> StreamMap {
    let chunks = sample_chunks();
    let mut b = MapBuilder::default();
    b.push_chunk(chunks[0].len() as u32, k.chunk_id(&chunks[0]));
    b.push_zero(1 << 20);
    b.push_chunk(chunks[1].len() as u32, k.chunk_id(&chunks[1]));
    b.finish()
}

#[test]
fn golden_stream_map_and_manifest() {
    let k = key();
    let sealer = Sealer::with_prefix(k.data_key(), PREFIX);
    let map = sample_map(&k);
    let body = map.to_bytes();
    vector("stream-map.body", &body);
    let file = seal_object(&sealer, STREAM_MAGIC, &body, 3).unwrap();
    vector("stream-map.bin", &file);
    let opened = open_object(&sealer, STREAM_MAGIC, &file, "vector").unwrap();
    assert_eq!(StreamMap::from_bytes(&opened, "vector").unwrap(), map);
    let map_id = ObjectId(k.keyed_hash(&body));

    let snap = Snapshot {
        version: 1,
        vm: "web01".into(),
        time: "2026-11-22T03:00:00Z".into(),
        host: "backup-host".into(),
        tags: vec!["prod".into()],
        parent: None,
        meta: Some(serde_json::json!({"name_label": "web01", "VCPUs_max": 2})),
        streams: vec![StreamRef {
            name: "xvda".into(),
            kind: StreamKind::Disk,
            size: map.size,
            map: map_id.to_hex(),
            data_bytes: map.size - (1 << 20),
            zero_bytes: 1 << 20,
            chunks: 2,
        }],
        summary: BackupSummary {
            read_bytes: map.size,
            new_chunks: 2,
            new_bytes: 2404,
            stored_bytes: 400,
            duration_ms: 5,
        },
        program: "vmvault 0.1.0".into(),
    };
    let body = snap.to_json();
    vector("manifest.json", &body);
    let file = seal_object(&sealer, SNAPSHOT_MAGIC, &body, 3).unwrap();
    vector("manifest.bin", &file);
    let opened = open_object(&sealer, SNAPSHOT_MAGIC, &file, "vector").unwrap();
    assert_eq!(Snapshot::from_json(&opened, "vector").unwrap(), snap);
    vector("manifest.id", format!("{}\n", hex::encode(k.keyed_hash(&body))).as_bytes());
}

#[test]
fn golden_key_file() {
    let k = key();
    let repo_id = [0x33u8; 32];
    let p = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };
    let mut kf = KeyFile::wrap_with(&k, b"golden passphrase", &repo_id, p, [0x44; 16], |kek| {
        Ok(Sealer::with_prefix(kek, PREFIX))
    })
    .unwrap();
    kf.created = "2026-11-22T03:00:00Z".into();
    kf.host = "backup-host".into();
    kf.user = "root".into();
    vector("key.json", &kf.to_json());
    let back = KeyFile::from_json(&kf.to_json(), "vector").unwrap();
    assert_eq!(back.unwrap_key(b"golden passphrase", &repo_id, "vector").unwrap().unwrap().to_bytes(), k.to_bytes());
}
