//! A read cache that keeps what was read from a slow device (an archive stream: fetch,
//! decrypt, decompress) in an anonymous local file, so the second read of any block is a
//! plain `pread` served by the kernel's page cache — outside the process's memory.
//!
//! The file is created with `O_TMPFILE` (or created and unlinked at once): it has no name,
//! and nothing is left behind however the process ends. Zero runs of the base are never
//! stored. Once `max_bytes` are cached, further blocks are served from the base uncached.
//! Note that the file holds plaintext of what was read, like any page cache would.
//!
//! Threading: `Send + Sync`. A block is marked filled only after its bytes are in the file;
//! two readers missing the same block may both fill it, with the same bytes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{check_range, Allocation, BlockDev, Run};

/// A caching layer over `B`; see the module docs.
#[derive(Debug)]
pub struct ReadCache<B> {
    base: B,
    file: File,
    block: u64,
    filled: Vec<AtomicU64>,
    used: AtomicU64,
    max_bytes: u64,
}

fn anonymous_file(dir: &Path) -> io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    match rustix::fs::open(dir, OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC, Mode::from_raw_mode(0o600)) {
        Ok(fd) => Ok(File::from(fd)),
        Err(_) => {
            // Filesystems without O_TMPFILE: a named file, unlinked at once.
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(".vmvault-cache-{}-{n}", std::process::id()));
            let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
            std::fs::remove_file(&path)?;
            Ok(f)
        }
    }
}

impl<B: BlockDev> ReadCache<B> {
    /// Cache `base` in an anonymous file in `dir`, in blocks of `block` bytes (a power of
    /// two; the base's natural unit, e.g. its chunk size), up to `max_bytes`.
    pub fn new(base: B, dir: &Path, block: u64, max_bytes: u64) -> io::Result<Self> {
        if !block.is_power_of_two() || block < 4096 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "cache block must be a power of two ≥ 4096"));
        }
        let file = anonymous_file(dir)?;
        file.set_len(base.len())?;
        let blocks = base.len().div_ceil(block);
        let filled = (0..blocks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Ok(Self { base, file, block, filled, used: AtomicU64::new(0), max_bytes })
    }

    pub fn base(&self) -> &B {
        &self.base
    }

    /// Bytes held in the cache file.
    pub fn cached_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn is_filled(&self, b: u64) -> bool {
        self.filled[(b / 64) as usize].load(Ordering::Acquire) & (1 << (b % 64)) != 0
    }

    fn mark(&self, b: u64) {
        let old = self.filled[(b / 64) as usize].fetch_or(1 << (b % 64), Ordering::AcqRel);
        if old & (1 << (b % 64)) == 0 {
            self.used.fetch_add(self.block, Ordering::Relaxed);
        }
    }

    /// Read blocks `first..end_block` from the base (one call, so the base can fetch in
    /// parallel), store the data runs, and copy the part inside `offset..` into `out`.
    fn fill(&self, first: u64, end_block: u64, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let start = first * self.block;
        let end = (end_block * self.block).min(self.base.len());
        let mut whole = vec![0u8; (end - start) as usize];
        self.base.read_at(start, &mut whole)?;
        let room = self.used.load(Ordering::Relaxed) + (end - start) <= self.max_bytes;
        if room {
            for b in first..end_block {
                let (s, t) = (b * self.block, ((b + 1) * self.block).min(end));
                let data = &whole[(s - start) as usize..(t - start) as usize];
                // A zero run costs nothing to read again; keep the file sparse.
                let run = self.base.allocation(s, t - s)?;
                if run.kind == Allocation::Zero && run.len >= t - s {
                    continue;
                }
                // A failed cache write (disk full) is not a read error.
                if self.file.write_all_at(data, s).is_ok() {
                    self.mark(b);
                }
            }
        }
        let from = (offset - start) as usize;
        out.copy_from_slice(&whole[from..from + out.len()]);
        Ok(())
    }
}

impl<B: BlockDev> BlockDev for ReadCache<B> {
    fn len(&self) -> u64 {
        self.base.len()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.base.len(), offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let b = pos / self.block;
            let filled = self.is_filled(b);
            // The run of blocks with the same filled state, up to the end of the read.
            let mut next = b + 1;
            while next * self.block < end && self.is_filled(next) == filled {
                next += 1;
            }
            let upto = (next * self.block).min(end);
            let out = &mut buf[(pos - offset) as usize..(upto - offset) as usize];
            if filled {
                self.file.read_exact_at(out, pos)?;
            } else {
                match self.base.allocation(pos, upto - pos)? {
                    Run { kind: Allocation::Zero, len } => {
                        let n = len.min(upto - pos) as usize;
                        out[..n].fill(0);
                        pos += n as u64;
                        continue;
                    }
                    _ => self.fill(b, next, pos, out)?,
                }
            }
            pos = upto;
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<Run> {
        self.base.allocation(offset, max_len)
    }

    fn will_need(&self, offset: u64, len: u64) {
        self.base.will_need(offset, len)
    }
}
