//! Plaintext JSON files (config, key files) and manifest bodies: never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = archive::config::Config::from_json(data);
    let _ = archive::manifest::Snapshot::from_json(data, "fuzz");
    if let Ok(kf) = archive::keyfile::KeyFile::from_json(data, "fuzz") {
        // Key derivation costs are capped before any work is done.
        if kf.kdf.memory_kib <= 256 && kf.kdf.iterations <= 2 {
            let _ = kf.unwrap_key(b"pw", &[0u8; 32], "fuzz");
        }
    }
});
