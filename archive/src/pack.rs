//! Packs: files holding many sealed chunks, and a sealed table of contents at the end.
//!
//! ```text
//! pack    := "VMVPACK1" blob* toc toc_len:u32 "VMVPEND1"
//! blob    := seal(aad = chunk id, compression[1] || payload)
//! toc     := seal(aad = "VMVPTOC1", count:u32 reserved:u32 entry*)
//! entry   := chunk_id[32] offset:u32 stored_len:u32 raw_len:u32 reserved:u32   (48 bytes)
//! ```
//! A pack's name is the unkeyed BLAKE3 of all its bytes. The table of contents repeats what
//! the index says, so the index can be rebuilt from packs alone.

use crate::chunker::MAX_CHUNK;
use std::cell::RefCell;

use crate::crypto::{Sealer, SEAL_OVERHEAD};
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId};
use crate::object::{compress_tagged_into, decompress_tagged_into};

pub const PACK_MAGIC: &[u8; 8] = b"VMVPACK1";
pub const PACK_END: &[u8; 8] = b"VMVPEND1";
pub const TOC_AAD: &[u8; 8] = b"VMVPTOC1";
const TOC_ENTRY: usize = 48;
/// Packs never reach 4 GiB: offsets are u32.
pub const MAX_PACK: u64 = u32::MAX as u64;

/// Where a chunk is stored inside its pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlobEntry {
    pub id: ChunkId,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
}

thread_local! {
    /// The plaintext buffer of [`seal_chunk`], reused.
    static PLAIN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Compress (when it saves more than 64 bytes) and seal one chunk. Returns the blob bytes.
pub fn seal_chunk(sealer: &Sealer, id: &ChunkId, data: &[u8], zstd_level: i32) -> Result<Vec<u8>> {
    PLAIN.with_borrow_mut(|plain| {
        compress_tagged_into(data, zstd_level, 64, plain);
        sealer.seal(&id.0, plain)
    })
}

/// Open a blob and verify that its plaintext hashes to `id`. Never returns wrong bytes.
pub fn open_chunk(
    sealer: &Sealer,
    key: &crate::crypto::MasterKey,
    id: &ChunkId,
    blob: &[u8],
    raw_len: u32,
    where_: &str,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    open_chunk_into(sealer, key, id, &mut blob.to_vec(), raw_len, where_, &mut out)?;
    Ok(out)
}

/// [`open_chunk`] decrypting `blob` in place and decompressing into `out` (both reusable).
pub fn open_chunk_into(
    sealer: &Sealer,
    key: &crate::crypto::MasterKey,
    id: &ChunkId,
    blob: &mut [u8],
    raw_len: u32,
    where_: &str,
    out: &mut Vec<u8>,
) -> Result<()> {
    let name = || format!("chunk {} in {where_}", id.short());
    let plain = sealer.open_in_place(&id.0, blob, &name())?;
    decompress_tagged_into(plain, MAX_CHUNK as usize, &name(), out)?;
    if out.len() != raw_len as usize {
        return Err(Error::corrupt(name(), format!("expected {raw_len} bytes, found {}", out.len())));
    }
    if key.chunk_id(out) != *id {
        return Err(Error::corrupt(name(), "content does not hash to its id"));
    }
    Ok(())
}

/// Builds one pack in memory.
#[derive(Debug)]
pub struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<BlobEntry>,
}

impl Default for PackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PackBuilder {
    pub fn new() -> Self {
        Self { buf: PACK_MAGIC.to_vec(), entries: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn add(&mut self, id: ChunkId, blob: &[u8], raw_len: u32) {
        let offset = self.buf.len() as u32;
        self.buf.extend_from_slice(blob);
        self.entries.push(BlobEntry { id, offset, stored_len: blob.len() as u32, raw_len });
    }

    /// Append the table of contents; return the pack's bytes, id and entries.
    pub fn finish(mut self, sealer: &Sealer) -> Result<(PackId, Vec<u8>, Vec<BlobEntry>)> {
        let mut toc = Vec::with_capacity(8 + self.entries.len() * TOC_ENTRY);
        toc.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        toc.extend_from_slice(&[0u8; 4]);
        for e in &self.entries {
            toc.extend_from_slice(&e.id.0);
            toc.extend_from_slice(&e.offset.to_le_bytes());
            toc.extend_from_slice(&e.stored_len.to_le_bytes());
            toc.extend_from_slice(&e.raw_len.to_le_bytes());
            toc.extend_from_slice(&[0u8; 4]);
        }
        let sealed = sealer.seal(TOC_AAD, &toc)?;
        self.buf.extend_from_slice(&sealed);
        self.buf.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(PACK_END);
        let id = PackId(*blake3::hash(&self.buf).as_bytes());
        Ok((id, self.buf, self.entries))
    }
}

/// Read a pack's table of contents from its tail bytes (the last `tail.len()` bytes of a
/// pack of `pack_len` bytes). Returns `Err(need)` style errors as `Corrupt` with detail.
pub fn parse_toc(sealer: &Sealer, pack_len: u64, tail: &[u8], name: &str) -> Result<Vec<BlobEntry>> {
    if pack_len > MAX_PACK {
        return Err(Error::corrupt(name, format!("{pack_len} bytes is over the pack size limit")));
    }
    if tail.len() < 12 || &tail[tail.len() - 8..] != PACK_END {
        return Err(Error::corrupt(name, format!("no end marker at offset {}", pack_len.saturating_sub(8))));
    }
    let n = tail.len();
    let toc_len = u32::from_le_bytes([tail[n - 12], tail[n - 11], tail[n - 10], tail[n - 9]]) as usize;
    if toc_len + 12 > n {
        return Err(Error::corrupt(name, format!("table of contents length {toc_len} exceeds the pack")));
    }
    let toc = sealer.open(TOC_AAD, &tail[n - 12 - toc_len..n - 12], &format!("{name} table of contents"))?;
    let count = toc.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let count = count.ok_or_else(|| Error::corrupt(name, "table of contents too short"))?;
    if toc.len() != 8 + count * TOC_ENTRY {
        return Err(Error::corrupt(name, format!("table of contents holds {} bytes for {count} entries", toc.len())));
    }
    let toc_start = pack_len - 12 - toc_len as u64;
    toc[8..]
        .chunks_exact(TOC_ENTRY)
        .map(|e| {
            let u = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
            let entry = BlobEntry {
                id: ChunkId(e[..32].try_into().expect("32 bytes")),
                offset: u(32),
                stored_len: u(36),
                raw_len: u(40),
            };
            let end = u64::from(entry.offset) + u64::from(entry.stored_len);
            if entry.offset < 8
                || end > toc_start
                || (entry.stored_len as usize) < SEAL_OVERHEAD + 1
                || entry.raw_len > MAX_CHUNK
            {
                return Err(Error::corrupt(name, format!("blob entry {} has impossible bounds", entry.id.short())));
            }
            Ok(entry)
        })
        .collect()
}

/// The path of a pack inside the repository.
pub fn pack_path(id: &PackId) -> String {
    let h = id.to_hex();
    format!("data/{}/{}", &h[..2], h)
}
