//! A Bloom filter over chunk ids, kept in each index file's directory, so a lookup skips
//! the index files that cannot hold a chunk instead of reading a page of each.
//!
//! Chunk ids are keyed hashes, uniformly distributed, so the probes are taken from the id
//! itself: probe `i` (0..7) is the little-endian u32 at bytes `4i..4i+4`, modulo the number
//! of bits. With 10 bits per entry and 7 probes about 1 % of absent ids pass.

use crate::id::ChunkId;

pub const PROBES: usize = 7;
pub const BITS_PER_ENTRY: u64 = 10;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bloom {
    words: Vec<u64>,
}

impl Bloom {
    /// The filter size, in bits, for `entries` ids: a multiple of 64, at least 64.
    pub fn bits_for(entries: u64) -> u64 {
        (entries.saturating_mul(BITS_PER_ENTRY)).div_ceil(64).max(1) * 64
    }

    pub fn for_entries(entries: u64) -> Self {
        Self { words: vec![0; (Self::bits_for(entries) / 64) as usize] }
    }

    fn probes(id: &ChunkId, bits: u64) -> impl Iterator<Item = u64> + '_ {
        (0..PROBES).map(move |i| {
            let b = &id.0[4 * i..4 * i + 4];
            u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])) % bits
        })
    }

    pub fn bits(&self) -> u64 {
        self.words.len() as u64 * 64
    }

    pub fn insert(&mut self, id: &ChunkId) {
        let bits = self.bits();
        for p in Self::probes(id, bits) {
            self.words[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// False means certainly absent; true means maybe present.
    pub fn may_contain(&self, id: &ChunkId) -> bool {
        let bits = self.bits();
        Self::probes(id, bits).all(|p| self.words[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }

    /// Little-endian u64 words.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Parse `bytes` (a multiple of 8, at least 8).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() || bytes.len() % 8 != 0 {
            return None;
        }
        Some(Self { words: bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8"))).collect() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let key = crate::crypto::MasterKey::from_bytes(&[9u8; 64]);
        let ids: Vec<ChunkId> = (0u32..5000).map(|i| key.chunk_id(&i.to_le_bytes())).collect();
        let mut f = Bloom::for_entries(ids.len() as u64);
        ids.iter().for_each(|id| f.insert(id));
        assert!(ids.iter().all(|id| f.may_contain(id)));
        let absent = (5000u32..25000).filter(|i| f.may_contain(&key.chunk_id(&i.to_le_bytes()))).count();
        assert!(absent < 400, "{absent} of 20000 absent ids passed (expected about 1 %)");
        assert_eq!(Bloom::from_bytes(&f.to_bytes()).unwrap(), f);
        assert_eq!(Bloom::bits_for(0), 64);
    }
}
