//! Stream maps: a stream (one disk, or memory) as a sorted list of extents, each a chunk or
//! a run of zeros. Random access is a binary search.
//!
//! ```text
//! body   := version:u32 reserved:u32 size:u64 count:u64 extent*
//! extent := offset:u64 length:u32 kind:u8 reserved[3] chunk_id[32]     (48 bytes)
//! ```
//! `kind` 0 = zero (chunk id all zero), 1 = chunk. Extents are contiguous from offset 0 and
//! end exactly at `size`.

use crate::chunker::MAX_CHUNK;
use crate::error::{Error, Result};
use crate::id::ChunkId;

const HEADER: usize = 24;
const EXTENT: usize = 48;
/// Longest zero extent: 2 GiB (longer runs are split).
pub const MAX_ZERO_EXTENT: u64 = 1 << 31;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    Zero,
    Chunk(ChunkId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u32,
    pub kind: ExtentKind,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// A complete stream map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamMap {
    pub size: u64,
    pub extents: Vec<Extent>,
}

impl StreamMap {
    /// Index of the extent holding `offset` (which must be below `size`).
    pub fn find(&self, offset: u64) -> usize {
        self.extents.partition_point(|e| e.end() <= offset)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.extents.len() * EXTENT);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.extents.len() as u64).to_le_bytes());
        for e in &self.extents {
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.len.to_le_bytes());
            match e.kind {
                ExtentKind::Zero => {
                    out.extend_from_slice(&[0u8; 4]);
                    out.extend_from_slice(&[0u8; 32]);
                }
                ExtentKind::Chunk(id) => {
                    out.extend_from_slice(&[1u8, 0, 0, 0]);
                    out.extend_from_slice(&id.0);
                }
            }
        }
        out
    }

    /// Parse and validate a map body. `name` names the object in errors.
    pub fn from_bytes(b: &[u8], name: &str) -> Result<Self> {
        let bad = |d: String| Error::corrupt(name, d);
        if b.len() < HEADER {
            return Err(bad(format!("{} bytes is too short for a stream map", b.len())));
        }
        let version = u32::from_le_bytes(b[0..4].try_into().expect("4"));
        if version != 1 {
            return Err(Error::Unsupported(format!("{name}: stream map version {version}")));
        }
        if b[4..8] != [0, 0, 0, 0] {
            return Err(bad("reserved header bytes 4..8 are not zero".into()));
        }
        let size = u64::from_le_bytes(b[8..16].try_into().expect("8"));
        let count = u64::from_le_bytes(b[16..24].try_into().expect("8"));
        if Some(b.len() as u64) != count.checked_mul(EXTENT as u64).and_then(|n| n.checked_add(HEADER as u64)) {
            return Err(bad(format!("{} bytes do not hold {count} extents", b.len())));
        }
        let mut extents = Vec::with_capacity(count as usize);
        let mut pos = 0u64;
        for (i, r) in b[HEADER..].chunks_exact(EXTENT).enumerate() {
            let at = HEADER + i * EXTENT;
            let offset = u64::from_le_bytes(r[0..8].try_into().expect("8"));
            let len = u32::from_le_bytes(r[8..12].try_into().expect("4"));
            let id = ChunkId(r[16..48].try_into().expect("32"));
            let kind = match (r[12], &r[13..16]) {
                (0, [0, 0, 0]) if id.0 == [0u8; 32] && u64::from(len) <= MAX_ZERO_EXTENT => ExtentKind::Zero,
                (1, [0, 0, 0]) if len <= MAX_CHUNK => ExtentKind::Chunk(id),
                _ => return Err(bad(format!("extent {i} at byte {at}: bad kind {} or fields", r[12]))),
            };
            if offset != pos || len == 0 {
                return Err(bad(format!("extent {i} at byte {at}: starts at {offset}, expected {pos}, length {len}")));
            }
            pos += u64::from(len);
            extents.push(Extent { offset, len, kind });
        }
        if pos != size {
            return Err(bad(format!("extents end at {pos}, stream size is {size}")));
        }
        Ok(Self { size, extents })
    }

    /// Distinct chunk ids, sorted.
    pub fn chunk_ids(&self) -> Vec<ChunkId> {
        let mut ids: Vec<ChunkId> = self
            .extents
            .iter()
            .filter_map(|e| match e.kind {
                ExtentKind::Chunk(id) => Some(id),
                ExtentKind::Zero => None,
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Builds a map from pieces in offset order, merging neighbouring zero runs.
#[derive(Debug, Default)]
pub struct MapBuilder {
    map: StreamMap,
}

impl MapBuilder {
    pub fn push_chunk(&mut self, len: u32, id: ChunkId) {
        let offset = self.map.size;
        self.map.extents.push(Extent { offset, len, kind: ExtentKind::Chunk(id) });
        self.map.size += u64::from(len);
    }

    pub fn push_zero(&mut self, mut len: u64) {
        while len > 0 {
            let offset = self.map.size;
            if let Some(last) = self.map.extents.last_mut() {
                if last.kind == ExtentKind::Zero && u64::from(last.len) < MAX_ZERO_EXTENT {
                    let add = len.min(MAX_ZERO_EXTENT - u64::from(last.len));
                    last.len += add as u32;
                    self.map.size += add;
                    len -= add;
                    continue;
                }
            }
            let add = len.min(MAX_ZERO_EXTENT);
            self.map.extents.push(Extent { offset, len: add as u32, kind: ExtentKind::Zero });
            self.map.size += add;
            len -= add;
        }
    }

    /// Append a copy of `src`'s extents covering `start .. start + len`. Both ends must lie on
    /// a boundary of `src`'s chunk extents; zero extents are cut to the range.
    pub fn push_from(&mut self, src: &StreamMap, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = start + len;
        let mut i = src.find(start);
        while i < src.extents.len() && src.extents[i].offset < end {
            let e = src.extents[i];
            match e.kind {
                // A zero extent may be cut: only its part inside the range is copied.
                ExtentKind::Zero => self.push_zero(e.end().min(end) - e.offset.max(start)),
                ExtentKind::Chunk(id) => {
                    debug_assert!(e.offset >= start && e.end() <= end, "a chunk extent cut by push_from");
                    self.push_chunk(e.len, id)
                }
            }
            i += 1;
        }
    }

    pub fn size(&self) -> u64 {
        self.map.size
    }

    pub fn finish(self) -> StreamMap {
        self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_find() {
        let mut b = MapBuilder::default();
        b.push_chunk(100, ChunkId([1; 32]));
        b.push_zero(50);
        b.push_zero(MAX_ZERO_EXTENT);
        b.push_chunk(7, ChunkId([2; 32]));
        let m = b.finish();
        assert_eq!(m.extents.len(), 4, "zero runs merge up to the cap");
        assert_eq!(m.size, 157 + MAX_ZERO_EXTENT);
        let back = StreamMap::from_bytes(&m.to_bytes(), "t").unwrap();
        assert_eq!(back, m);
        assert_eq!(m.find(0), 0);
        assert_eq!(m.find(99), 0);
        assert_eq!(m.find(100), 1);
        assert_eq!(m.find(m.size - 1), 3);
    }

    #[test]
    fn rejects_gaps_and_bad_kinds() {
        let mut b = MapBuilder::default();
        b.push_chunk(100, ChunkId([1; 32]));
        b.push_chunk(100, ChunkId([2; 32]));
        let good = b.finish().to_bytes();
        let mut gap = good.clone();
        gap[24 + 48] = 1; // second extent's offset low byte
        assert!(StreamMap::from_bytes(&gap, "t").is_err());
        let mut kind = good.clone();
        kind[24 + 12] = 9;
        assert!(StreamMap::from_bytes(&kind, "t").is_err());
        assert!(StreamMap::from_bytes(&good[..good.len() - 1], "t").is_err());
        let mut size = good;
        size[8] = 1;
        assert!(StreamMap::from_bytes(&size, "t").is_err());
    }
}
