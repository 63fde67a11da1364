//! Object files: small encrypted files (snapshot manifests, stream maps, locks).
//!
//! Layout: `magic[8] || seal(aad = magic, plaintext)` where
//! `plaintext = compression[1] || body` (0 = stored, 1 = zstd).

use crate::crypto::Sealer;
use crate::error::{Error, Result};

pub const SNAPSHOT_MAGIC: &[u8; 8] = b"VMVSNAP1";
pub const STREAM_MAGIC: &[u8; 8] = b"VMVXMAP1";
pub const LOCK_MAGIC: &[u8; 8] = b"VMVLOCK1";

/// Largest object body accepted when reading (a stream map of a 64 TiB disk at 64 KiB
/// chunks stays below it).
pub const MAX_OBJECT_BODY: usize = 1 << 32;

thread_local! {
    /// One zstd compression context per thread and level: creating one per chunk costs more
    /// (fresh tables, page faults) than compressing a small chunk.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Write `compression[1] || payload` for `data` into `out` (replacing its contents): zstd
/// when that saves more than `min_saving` bytes, the bytes as they are otherwise.
pub fn compress_tagged_into(data: &[u8], zstd_level: i32, min_saving: usize, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(zstd::zstd_safe::compress_bound(data.len()) + 1);
    out.push(1);
    let compressed = COMPRESSOR.with_borrow_mut(|slot| {
        if slot.as_ref().is_none_or(|(l, _)| *l != zstd_level) {
            *slot = Some((zstd_level, zstd::bulk::Compressor::new(zstd_level).ok()?));
        }
        let (_, c) = slot.as_mut()?;
        let mut cursor = std::io::Cursor::new(&mut *out);
        cursor.set_position(1);
        c.compress_to_buffer(data, &mut cursor).ok()
    });
    if !compressed.is_some_and(|n| n + min_saving < data.len()) {
        out.clear();
        out.push(0);
        out.extend_from_slice(data);
    }
}

pub fn seal_object(sealer: &Sealer, magic: &[u8; 8], body: &[u8], zstd_level: i32) -> Result<Vec<u8>> {
    let mut plain = Vec::new();
    compress_tagged_into(body, zstd_level, 0, &mut plain);
    let mut out = magic.to_vec();
    sealer.seal_into(magic, &plain, &mut out)?;
    Ok(out)
}

pub fn open_object(sealer: &Sealer, magic: &[u8; 8], file: &[u8], name: &str) -> Result<Vec<u8>> {
    if file.len() < 8 || &file[..8] != magic {
        let found = file.get(..8).map(|m| String::from_utf8_lossy(m).into_owned()).unwrap_or_default();
        return Err(Error::corrupt(
            name,
            format!("bad magic at offset 0: expected {:?}, found {found:?}", String::from_utf8_lossy(magic)),
        ));
    }
    let plain = sealer.open(magic, &file[8..], name)?;
    decompress_tagged(&plain, MAX_OBJECT_BODY, name)
}

thread_local! {
    /// One zstd decompression context per thread, reused.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Undo `compression[1] || payload`, refusing results over `max` bytes.
pub fn decompress_tagged(plain: &[u8], max: usize, name: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    decompress_tagged_into(plain, max, name, &mut out)?;
    Ok(out)
}

/// [`decompress_tagged`] into a reusable buffer (replacing its contents).
pub fn decompress_tagged_into(plain: &[u8], max: usize, name: &str, out: &mut Vec<u8>) -> Result<()> {
    out.clear();
    match plain.split_first() {
        Some((0, body)) => {
            if body.len() > max {
                return Err(Error::corrupt(name, format!("{} bytes, over the {max}-byte limit", body.len())));
            }
            out.extend_from_slice(body);
            Ok(())
        }
        Some((1, body)) => {
            let size = zstd::zstd_safe::get_frame_content_size(body)
                .ok()
                .flatten()
                .ok_or_else(|| Error::corrupt(name, "zstd frame has no content size"))?;
            if size > max as u64 {
                return Err(Error::corrupt(name, format!("declares {size} bytes, over the {max}-byte limit")));
            }
            out.reserve(size as usize);
            DECOMPRESSOR
                .with_borrow_mut(|slot| {
                    if slot.is_none() {
                        *slot = Some(zstd::bulk::Decompressor::new()?);
                    }
                    slot.as_mut().expect("just set").decompress_to_buffer(body, &mut *out)
                })
                .map_err(|e| Error::corrupt(name, format!("zstd: {e}")))?;
            if out.len() as u64 != size {
                return Err(Error::corrupt(name, format!("decompressed to {} bytes, frame says {size}", out.len())));
            }
            Ok(())
        }
        Some((t, _)) => Err(Error::corrupt(name, format!("unknown compression tag {t}"))),
        None => Err(Error::corrupt(name, "empty plaintext")),
    }
}
