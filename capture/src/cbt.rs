//! Changed block tracking (reference §4): which 64 KiB blocks of a disk changed since the
//! previous backup, and a device that reads only those from the pool.
//!
//! The previous backup's snapshot VDI of each disk is kept on the pool as a `cbt_metadata`
//! VDI (`VDI.data_destroy`: the data goes, the change log stays) and named in the repository
//! snapshot's `meta.capture.cbt`. The next backup asks `VDI.list_changed_blocks(base, new)`
//! and feeds the changed ranges to the archive. The archive re-reads whole parent extents
//! around a change (its chunks are bigger than 64 KiB); [`Patched`] serves the unchanged
//! parts of those extents from the parent snapshot in the repository, so only changed
//! blocks cross the network.
//!
//! Over HTTP (no NBD) the base keeps its data instead, and the changed ranges are the 2 MiB
//! blocks of the pool's `base=` difference (`crate::source::HttpDisk::delta`); [`Patched`]
//! combines them with the parent backup the same way.

use std::io;
use std::ops::Range;

use base64::Engine;
use blockdev::BlockDev;

/// CBT's block size.
pub const BLOCK: u64 = 64 << 10;

/// The changed ranges of a disk of `size` bytes from `list_changed_blocks`' answer (base64
/// of a bitmap, one bit per 64 KiB block, most significant bit first), merged.
pub fn decode(b64: &str, size: u64) -> Result<Vec<Range<u64>>, String> {
    let bits = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("the changed-block bitmap is not base64: {e}"))?;
    let blocks = size.div_ceil(BLOCK);
    if (bits.len() as u64) < blocks.div_ceil(8) {
        return Err(format!("a bitmap of {} bytes for {blocks} blocks", bits.len()));
    }
    let mut out: Vec<Range<u64>> = Vec::new();
    for i in 0..blocks {
        if bits[(i / 8) as usize] & (0x80 >> (i % 8)) == 0 {
            continue;
        }
        let r = i * BLOCK..((i + 1) * BLOCK).min(size);
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    Ok(out)
}

/// The disk as it is now, from two places: the changed ranges from the pool, everything else
/// from the previous backup (which CBT says it still equals).
pub struct Patched {
    pub source: Box<dyn BlockDev>,
    pub parent: Box<dyn BlockDev>,
    /// Sorted, disjoint.
    pub changed: Vec<Range<u64>>,
}

impl std::fmt::Debug for Patched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Patched({} changed ranges, {} bytes)", self.changed.len(), self.source.len())
    }
}

impl BlockDev for Patched {
    fn len(&self) -> u64 {
        self.source.len()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        blockdev::check_range(self.len(), offset, buf.len() as u64)?;
        for (from_source, r) in self.pieces(offset, offset + buf.len() as u64) {
            let dst = &mut buf[(r.start - offset) as usize..(r.end - offset) as usize];
            if from_source {
                self.source.read_at(r.start, dst)?;
            } else {
                self.parent.read_at(r.start, dst)?;
            }
        }
        Ok(())
    }

    /// The parent's answer for its pieces: its zero extents need not be read (and rescanned)
    /// around a change. Changed pieces are data: every one is read, so the source sees a
    /// read reach the end of its last range and lets its export go (a source that skipped it
    /// as zeros would hold its export slot to the end of the backup).
    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<blockdev::Run> {
        blockdev::check_range(self.len(), offset, 1)?;
        let end = offset.saturating_add(max_len).min(self.len());
        match self.pieces(offset, end).next() {
            Some((false, r)) => self.parent.allocation(offset, r.end - offset),
            Some((true, r)) => Ok(blockdev::Run { kind: blockdev::Allocation::Data, len: r.end - offset }),
            None => Ok(blockdev::Run { kind: blockdev::Allocation::Data, len: 0 }),
        }
    }

    /// Each side hears of its own pieces only: announcing a changed range to the parent would
    /// have the repository reader decrypt chunks no read then asks for.
    fn will_need(&self, offset: u64, len: u64) {
        self.tell(offset, len, |d, o, n| d.will_need(o, n));
    }

    fn release(&self, offset: u64, len: u64) {
        self.tell(offset, len, |d, o, n| d.release(o, n));
    }
}

impl Patched {
    /// Pass a hint about `len` bytes at `offset` to the side that serves each piece.
    fn tell(&self, offset: u64, len: u64, hint: impl Fn(&dyn BlockDev, u64, u64)) {
        let end = offset.saturating_add(len).min(self.len());
        for (from_source, r) in self.pieces(offset.min(end), end) {
            let dev = if from_source { &*self.source } else { &*self.parent };
            hint(dev, r.start, r.end - r.start);
        }
    }

    /// `offset..end` cut where the changed ranges begin and end: `(true, r)` for a piece the
    /// pool must serve, `(false, r)` for one the parent backup does.
    fn pieces(&self, offset: u64, end: u64) -> impl Iterator<Item = (bool, Range<u64>)> + '_ {
        let mut pos = offset;
        // The first changed range that ends after `offset`.
        let mut i = self.changed.partition_point(|r| r.end <= offset);
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let (from_source, until) = match self.changed.get(i) {
                Some(r) if r.start <= pos => (true, r.end.min(end)),
                Some(r) => (false, r.start.min(end)),
                None => (false, end),
            };
            if from_source {
                i += 1;
            }
            let piece = (from_source, pos..until);
            pos = until;
            Some(piece)
        })
    }
}

/// Up to `n` blocks not in `changed` (of a disk of `size` bytes), spread over the disk by a
/// seeded generator: the audit's sample.
pub fn sample_unchanged(changed: &[Range<u64>], size: u64, n: usize, seed: u64) -> Vec<u64> {
    let blocks = size / BLOCK; // whole blocks only
    let mut state = seed | 1;
    let mut out = Vec::new();
    for _ in 0..n * 4 {
        if out.len() == n || blocks == 0 {
            break;
        }
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let b = state.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks;
        let at = b * BLOCK;
        let hit = changed.iter().any(|r| r.start < at + BLOCK && at < r.end);
        if !hit && !out.contains(&at) {
            out.push(at);
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::MemDev;

    #[test]
    fn decode_merges_runs_msb_first_and_clips_the_last_block() {
        // Blocks 0, 1 and 9 of an 11-block disk whose last block is short.
        let size = 10 * BLOCK + 100;
        let b64 = base64::engine::general_purpose::STANDARD.encode([0b1100_0000, 0b0100_0000]);
        assert_eq!(decode(&b64, size).unwrap(), vec![0..2 * BLOCK, 9 * BLOCK..10 * BLOCK]);
        let last = base64::engine::general_purpose::STANDARD.encode([0, 0b0010_0000]);
        assert_eq!(decode(&last, size).unwrap(), vec![10 * BLOCK..size]);
        assert!(decode("AA==", size).is_err(), "a bitmap too short for the disk");
        assert!(decode("not base64!", size).is_err());
    }

    #[test]
    fn patched_reads_changed_ranges_from_the_source_only() {
        let size = 8 * BLOCK;
        let source = MemDev::new(vec![1u8; size as usize]);
        let parent = MemDev::new(vec![2u8; size as usize]);
        let changed = vec![BLOCK..2 * BLOCK, 5 * BLOCK..7 * BLOCK];
        let p = Patched { source: Box::new(source), parent: Box::new(parent), changed: changed.clone() };
        let mut all = vec![0u8; size as usize];
        p.read_at(0, &mut all).unwrap();
        for (i, b) in all.iter().enumerate() {
            let want = if changed.iter().any(|r| r.contains(&(i as u64))) { 1 } else { 2 };
            assert_eq!(*b, want, "byte {i}");
        }
        let mut part = vec![0u8; 10];
        p.read_at(2 * BLOCK - 5, &mut part).unwrap();
        assert_eq!(part, [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
        assert!(p.read_at(size - 1, &mut [0u8; 2]).is_err());
    }

    /// Records the ranges it is told of.
    #[derive(Debug, Default)]
    struct Told(std::sync::Mutex<Vec<Range<u64>>>, u64);

    impl BlockDev for Told {
        fn len(&self) -> u64 {
            self.1
        }
        fn read_at(&self, _: u64, buf: &mut [u8]) -> io::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn will_need(&self, offset: u64, len: u64) {
            self.0.lock().unwrap().push(offset..offset + len);
        }
    }

    #[test]
    fn will_need_tells_each_side_of_its_own_pieces_only() {
        let size = 8 * BLOCK;
        let source = std::sync::Arc::new(Told(Default::default(), size));
        let parent = std::sync::Arc::new(Told(Default::default(), size));
        let changed = vec![BLOCK..2 * BLOCK, 5 * BLOCK..7 * BLOCK];
        let p = Patched { source: Box::new(source.clone()), parent: Box::new(parent.clone()), changed };
        p.will_need(BLOCK / 2, 6 * BLOCK);
        assert_eq!(*source.0.lock().unwrap(), vec![BLOCK..2 * BLOCK, 5 * BLOCK..6 * BLOCK + BLOCK / 2]);
        assert_eq!(*parent.0.lock().unwrap(), vec![BLOCK / 2..BLOCK, 2 * BLOCK..5 * BLOCK]);
        p.will_need(5 * BLOCK, 1 << 40); // past the end: clipped
        assert_eq!(source.0.lock().unwrap().last(), Some(&(5 * BLOCK..7 * BLOCK)));
        assert_eq!(parent.0.lock().unwrap().last(), Some(&(7 * BLOCK..size)));
    }

    /// All holes.
    #[derive(Debug)]
    struct Holes(u64);

    impl BlockDev for Holes {
        fn len(&self) -> u64 {
            self.0
        }
        fn read_at(&self, _: u64, buf: &mut [u8]) -> io::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn allocation(&self, offset: u64, max_len: u64) -> io::Result<blockdev::Run> {
            Ok(blockdev::Run { kind: blockdev::Allocation::Zero, len: max_len.min(self.0 - offset) })
        }
    }

    #[test]
    fn allocation_asks_the_side_that_serves_the_piece() {
        use blockdev::{Allocation, Run};
        let size = 8 * BLOCK;
        let source = MemDev::new(vec![1u8; size as usize]);
        let changed = vec![BLOCK..2 * BLOCK];
        let p = Patched { source: Box::new(source), parent: Box::new(Holes(size)), changed };
        assert_eq!(p.allocation(0, size).unwrap(), Run { kind: Allocation::Zero, len: BLOCK });
        assert_eq!(p.allocation(BLOCK + 7, size).unwrap(), Run { kind: Allocation::Data, len: BLOCK - 7 });
        assert_eq!(p.allocation(2 * BLOCK, 3).unwrap(), Run { kind: Allocation::Zero, len: 3 });
        assert_eq!(p.allocation(2 * BLOCK, size).unwrap(), Run { kind: Allocation::Zero, len: 6 * BLOCK });
        assert!(p.allocation(size, 1).is_err());
        // A changed piece is data even where the source knows a hole: it is read, so the
        // source sees its last range read and lets its export go.
        let p =
            Patched { source: Box::new(Holes(size)), parent: Box::new(Holes(size)), changed: vec![BLOCK..2 * BLOCK] };
        assert_eq!(p.allocation(BLOCK, size).unwrap(), Run { kind: Allocation::Data, len: BLOCK });
    }

    #[test]
    fn the_audit_sample_avoids_changed_blocks() {
        let size = 100 * BLOCK;
        let changed = vec![0..50 * BLOCK];
        let s = sample_unchanged(&changed, size, 10, 42);
        assert_eq!(s.len(), 10);
        assert!(s.iter().all(|&a| a >= 50 * BLOCK && a < size && a % BLOCK == 0));
        assert!(sample_unchanged(&[0..size], size, 10, 1).is_empty());
    }
}
