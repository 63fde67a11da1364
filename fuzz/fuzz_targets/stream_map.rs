//! Stream map bodies: any bytes parse to a valid map or a clean error, and a valid map
//! re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(map) = archive::extents::StreamMap::from_bytes(data, "fuzz") {
        assert_eq!(map.to_bytes(), data);
        if map.size > 0 {
            let i = map.find(map.size - 1);
            assert!(i < map.extents.len());
        }
    }
});
