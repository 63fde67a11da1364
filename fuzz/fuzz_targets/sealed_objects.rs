//! Sealed containers under a fixed key: object files, pack tables of contents, chunk blobs,
//! and compressed payloads. Either they authenticate and parse, or a clean error.
#![no_main]
use archive::crypto::MasterKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = MasterKey::from_bytes(&[7u8; 64]);
    let sealer = key.sealer().unwrap();
    let _ = archive::object::open_object(&sealer, archive::object::SNAPSHOT_MAGIC, data, "fuzz");
    let _ = archive::pack::parse_toc(&sealer, data.len() as u64, data, "fuzz");
    let id = key.chunk_id(data);
    let _ = archive::pack::open_chunk(&sealer, &key, &id, data, 100, "fuzz");
    // Unauthenticated paths: the decompressor's limits.
    let _ = archive::object::decompress_tagged(data, 1 << 20, "fuzz");
    // Seal what we got, then it must open to the same bytes.
    let sealed = sealer.seal(b"aad", data).unwrap();
    assert_eq!(sealer.open(b"aad", &sealed, "fuzz").unwrap(), data);
});
