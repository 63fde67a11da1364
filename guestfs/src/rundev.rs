//! A file's contents inside a guest filesystem as a [`BlockDev`], given where its blocks are
//! (ext4 extents and block maps, FAT cluster chains, NTFS data runs): random access through
//! the runs; holes and unwritten runs read as zeros and are reported as such by `allocation`.

use std::io;
use std::sync::Arc;

use blockdev::{check_range, Allocation, BlockDev, Run as AllocRun};

/// A run of blocks: file blocks `logical..logical + len` at device block `physical`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
    /// Allocated but never written: reads as zeros.
    pub unwritten: bool,
}

/// File contents. Cheap to create once the runs are known; `Send + Sync`.
pub struct RunDev {
    dev: Arc<dyn BlockDev>,
    block_size: u64,
    size: u64,
    runs: Vec<Run>,
    /// Contents stored inside the inode (inline data, fast symlinks).
    inline: Option<Vec<u8>>,
    /// Bytes from here on read as zeros whatever the runs say (NTFS's initialized size).
    valid: u64,
}

impl std::fmt::Debug for RunDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RunDev({} bytes, {} runs)", self.size, self.runs.len())
    }
}

impl RunDev {
    /// `runs` sorted by `logical`, not overlapping; block `b` of the file is at byte
    /// `physical * block_size` of `dev`.
    pub(crate) fn new(dev: Arc<dyn BlockDev>, block_size: u64, size: u64, runs: Vec<Run>) -> Self {
        Self { dev, block_size, size, runs, inline: None, valid: size }
    }

    /// Bytes at and beyond `valid` read as zeros (allocated but never written, as NTFS's
    /// initialized size says).
    pub(crate) fn valid_up_to(mut self, valid: u64) -> Self {
        self.valid = valid.min(self.size);
        self
    }

    pub(crate) fn inline(dev: Arc<dyn BlockDev>, data: Vec<u8>) -> Self {
        let size = data.len() as u64;
        Self { dev, block_size: 4096, size, runs: Vec::new(), inline: Some(data), valid: size }
    }

    /// The run containing or following file block `b`: (index, whether it contains b).
    fn find(&self, b: u64) -> (usize, bool) {
        let i = self.runs.partition_point(|r| r.logical + r.len <= b);
        (i, self.runs.get(i).is_some_and(|r| r.logical <= b))
    }
}

impl BlockDev for RunDev {
    fn len(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        if let Some(data) = &self.inline {
            buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
            return Ok(());
        }
        if offset + buf.len() as u64 > self.valid {
            let keep = self.valid.saturating_sub(offset).min(buf.len() as u64) as usize;
            buf[keep..].fill(0);
            if keep == 0 {
                return Ok(());
            }
            return self.read_at(offset, &mut buf[..keep]);
        }
        let bs = self.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (i, inside) = self.find(pos / bs);
            let out_len = (buf.len() - done) as u64;
            if !inside {
                // A hole up to the next run (or the end of the read).
                let next = self.runs.get(i).map_or(u64::MAX, |r| r.logical.saturating_mul(bs));
                let n = (next - pos).min(out_len) as usize;
                buf[done..done + n].fill(0);
                done += n;
                continue;
            }
            let r = &self.runs[i];
            let within = pos - r.logical * bs;
            let n = (r.len * bs - within).min(out_len) as usize;
            if r.unwritten {
                buf[done..done + n].fill(0);
            } else {
                let at = r.physical.checked_mul(bs).and_then(|p| p.checked_add(within));
                let at = at.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "extent beyond 2^64"))?;
                self.dev.read_at(at, &mut buf[done..done + n])?;
            }
            done += n;
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<AllocRun> {
        check_range(self.size, offset, 1)?;
        let limit = max_len.min(self.size - offset);
        if self.inline.is_some() {
            return Ok(AllocRun { kind: Allocation::Data, len: limit });
        }
        if offset >= self.valid {
            return Ok(AllocRun { kind: Allocation::Zero, len: limit });
        }
        let limit = limit.min(self.valid - offset);
        let bs = self.block_size;
        let (i, inside) = self.find(offset / bs);
        let (kind, end) = match self.runs.get(i) {
            Some(r) if inside && !r.unwritten => (Allocation::Data, (r.logical + r.len) * bs),
            Some(r) if inside => (Allocation::Zero, (r.logical + r.len) * bs),
            Some(r) => (Allocation::Zero, r.logical * bs),
            None => (Allocation::Zero, u64::MAX),
        };
        Ok(AllocRun { kind, len: (end - offset).min(limit) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::MemDev;

    #[test]
    fn bytes_past_the_valid_length_read_as_zeros() {
        let disk: Arc<dyn BlockDev> = Arc::new(MemDev::new((0..=255u8).cycle().take(8192).collect()));
        // Two blocks of 1 KiB at disk blocks 2 and 3, a hole, one more at block 5; valid to 2500.
        let runs = vec![
            Run { logical: 0, physical: 2, len: 2, unwritten: false },
            Run { logical: 3, physical: 5, len: 1, unwritten: false },
        ];
        let dev = RunDev::new(disk.clone(), 1024, 4096, runs).valid_up_to(2500);
        let mut all = vec![0xAAu8; 4096];
        dev.read_at(0, &mut all).expect("read");
        let mut want = vec![0u8; 4096];
        disk.read_at(2048, &mut want[..2048]).expect("disk");
        disk.read_at(5120, &mut want[3072..]).expect("disk");
        want[2500..].fill(0);
        assert_eq!(all, want);
        let mut tail = [0xAAu8; 10];
        dev.read_at(2495, &mut tail).expect("read across the valid end");
        assert_eq!(&tail[..5], &want[2495..2500]);
        assert_eq!(&tail[5..], &[0; 5]);
        let at = |o| dev.allocation(o, 4096).expect("allocation");
        assert_eq!((at(0).kind, at(0).len), (Allocation::Data, 2048));
        assert_eq!((at(2048).kind, at(2048).len), (Allocation::Zero, 452), "the hole stops at the valid end");
        assert_eq!((at(2600).kind, at(2600).len), (Allocation::Zero, 1496), "nothing valid past 2500");
    }
}
