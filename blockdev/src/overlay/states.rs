//! The block-state map: two bits per block, 32 blocks per atomic word, readable without
//! locks. Writers mark the 4 KiB bitmap pages they change so a flush writes back only those.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use super::header::BITMAP_PAGE;

/// Where the bytes of one block come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// Never written: read the base.
    Base = 0,
    /// Written: read the overlay file.
    Data = 1,
    /// Zeroed or discarded: reads as zeros, nothing stored.
    Zero = 2,
}

const PER_WORD: u64 = 32;
const WORDS_PER_PAGE: u64 = BITMAP_PAGE / 8;

#[derive(Debug)]
pub(crate) struct States {
    words: Vec<AtomicU64>,
    dirty: Vec<AtomicU64>,
    blocks: u64,
}

impl States {
    /// Parse the on-disk bitmap (`bytes` covers whole pages). State 3 and bits past the
    /// last block are damage.
    pub(crate) fn from_bytes(bytes: &[u8], blocks: u64) -> io::Result<Self> {
        let words: Vec<AtomicU64> =
            bytes.chunks_exact(8).map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))).collect();
        let s = Self::with_words(words, blocks);
        for (w, word) in s.words.iter().enumerate() {
            let v = word.load(Ordering::Relaxed);
            // A state of 3 has both bits set: the high bit of each pair ANDed with the low.
            if (v >> 1) & v & 0x5555_5555_5555_5555 != 0 {
                return Err(corrupt(w, "a block state of 3"));
            }
            let first = w as u64 * PER_WORD;
            if first + PER_WORD > blocks {
                let valid = blocks.saturating_sub(first);
                if valid < PER_WORD && v >> (2 * valid) != 0 {
                    return Err(corrupt(w, "states for blocks past the end"));
                }
            }
        }
        Ok(s)
    }

    /// A fresh map of `blocks` blocks, all [`BlockState::Base`], with room for `bytes` bytes.
    pub(crate) fn empty(bytes: u64, blocks: u64) -> Self {
        Self::with_words((0..bytes / 8).map(|_| AtomicU64::new(0)).collect(), blocks)
    }

    fn with_words(words: Vec<AtomicU64>, blocks: u64) -> Self {
        let pages = (words.len() as u64).div_ceil(WORDS_PER_PAGE);
        let dirty = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self { words, dirty, blocks }
    }

    pub(crate) fn get(&self, block: u64) -> BlockState {
        let v = self.words[(block / PER_WORD) as usize].load(Ordering::Acquire);
        match (v >> (2 * (block % PER_WORD))) & 3 {
            0 => BlockState::Base,
            1 => BlockState::Data,
            _ => BlockState::Zero,
        }
    }

    /// Set blocks `range` to `state`; each word changes atomically (no reader sees a
    /// half-written state).
    pub(crate) fn set(&self, range: Range<u64>, state: BlockState) {
        let mut b = range.start;
        while b < range.end {
            let w = b / PER_WORD;
            let upto = range.end.min((w + 1) * PER_WORD);
            let (lo, n) = (b % PER_WORD, upto - b);
            let mask = if n == PER_WORD { u64::MAX } else { ((1u64 << (2 * n)) - 1) << (2 * lo) };
            let bits = (0x5555_5555_5555_5555u64 * state as u64) & mask;
            let word = &self.words[w as usize];
            let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some((v & !mask) | bits));
            let page = w / WORDS_PER_PAGE;
            self.dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
            b = upto;
        }
    }

    /// Runs of equal state in `blocks`, as (state, block range).
    pub(crate) fn runs(&self, blocks: Range<u64>) -> impl Iterator<Item = (BlockState, Range<u64>)> + '_ {
        let mut b = blocks.start;
        std::iter::from_fn(move || {
            if b >= blocks.end {
                return None;
            }
            let st = self.get(b);
            let start = b;
            while b < blocks.end && self.get(b) == st {
                b += 1;
            }
            Some((st, start..b))
        })
    }

    /// Take the dirty pages: (byte offset within the bitmap, page bytes), clearing the marks.
    pub(crate) fn take_dirty(&self) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        for (i, d) in self.dirty.iter().enumerate() {
            let mut bits = d.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let page = i as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let words = &self.words[(page * WORDS_PER_PAGE) as usize..][..WORDS_PER_PAGE as usize];
                let bytes = words.iter().flat_map(|w| w.load(Ordering::Acquire).to_le_bytes()).collect();
                out.push((page * BITMAP_PAGE, bytes));
            }
        }
        out
    }

    /// Mark a page (by byte offset within the bitmap) dirty again, after a failed write-back.
    pub(crate) fn mark_dirty(&self, at: u64) {
        let page = at / BITMAP_PAGE;
        self.dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
    }

    /// Count blocks per state: (data, zero).
    pub(crate) fn counts(&self) -> (u64, u64) {
        let (mut data, mut zero) = (0, 0);
        for (st, r) in self.runs(0..self.blocks) {
            match st {
                BlockState::Data => data += r.end - r.start,
                BlockState::Zero => zero += r.end - r.start,
                BlockState::Base => {}
            }
        }
        (data, zero)
    }
}

fn corrupt(word: usize, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("overlay bitmap: {what} in the word at bitmap byte {}", word * 8),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_runs_and_dirty_pages() {
        let s = States::empty(2 * BITMAP_PAGE, 20_000);
        s.set(3..40, BlockState::Data);
        s.set(10..12, BlockState::Zero);
        s.set(16_500..16_501, BlockState::Data);
        assert_eq!(s.get(2), BlockState::Base);
        assert_eq!(s.get(3), BlockState::Data);
        assert_eq!(s.get(11), BlockState::Zero);
        assert_eq!(s.get(39), BlockState::Data);
        assert_eq!(s.get(40), BlockState::Base);
        let runs: Vec<_> = s.runs(0..50).collect();
        assert_eq!(
            runs,
            vec![
                (BlockState::Base, 0..3),
                (BlockState::Data, 3..10),
                (BlockState::Zero, 10..12),
                (BlockState::Data, 12..40),
                (BlockState::Base, 40..50)
            ]
        );
        assert_eq!(s.counts(), (36, 2));
        let dirty = s.take_dirty();
        assert_eq!(dirty.iter().map(|d| d.0).collect::<Vec<_>>(), vec![0, BITMAP_PAGE]);
        assert!(s.take_dirty().is_empty());
        // The page bytes parse back to the same states.
        let mut all = vec![0u8; 2 * BITMAP_PAGE as usize];
        for (off, bytes) in dirty {
            all[off as usize..][..bytes.len()].copy_from_slice(&bytes);
        }
        let t = States::from_bytes(&all, 20_000).unwrap();
        assert_eq!(t.runs(0..20_000).collect::<Vec<_>>(), s.runs(0..20_000).collect::<Vec<_>>());
    }

    #[test]
    fn damaged_bitmaps_are_rejected() {
        let mut b = vec![0u8; BITMAP_PAGE as usize];
        b[5] = 0b11 << 2;
        assert!(States::from_bytes(&b, 1000).is_err());
        let mut b = vec![0u8; BITMAP_PAGE as usize];
        b[250] = 1; // block 1000, past the end of a 1000-block map
        assert!(States::from_bytes(&b, 1000).is_err());
        b[250] = 0;
        assert!(States::from_bytes(&b, 1000).is_ok());
    }
}
