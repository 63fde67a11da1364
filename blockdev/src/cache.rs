//! A read cache that keeps what was read from a slow device (an archive stream: fetch,
//! decrypt, decompress) in an anonymous local file, so the second read of any block is a
//! plain `pread` served by the kernel's page cache — outside the process's memory.
//!
//! The file is created with `O_TMPFILE` (or created and unlinked at once): it has no name,
//! and nothing is left behind however the process ends. Zero runs of the base are never
//! stored. Once `max_bytes` are cached, further blocks are served from the base uncached.
//! Note that the file holds plaintext of what was read, like any page cache would.
//!
//! Threading: `Send + Sync`. Readers never write the file themselves: they hand the blocks
//! they fetched to one writer thread (so cache writes do not contend on the file's inode
//! lock) through a short queue, and wait only when the queue is full. A block is marked filled only after its bytes are in the
//! file; two readers missing the same block may both fetch it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::{check_range, Allocation, BlockDev, Run};

/// Spans queued to the writer thread at most (each up to a read's worth of blocks).
const QUEUE: usize = 16;

/// What the reader threads and the writer thread share.
#[derive(Debug)]
struct Shared {
    file: File,
    block: u64,
    filled: Vec<AtomicU64>,
    used: AtomicU64,
}

enum Job {
    /// Bytes starting at a block boundary, and which of their blocks to store.
    Store { start: u64, data: Vec<u8>, blocks: Vec<u64> },
    /// Reply once everything queued before is written.
    Barrier(std::sync::mpsc::Sender<()>),
}

/// A caching layer over `B`; see the module docs.
#[derive(Debug)]
pub struct ReadCache<B> {
    base: B,
    shared: Arc<Shared>,
    max_bytes: u64,
    queue: Mutex<Option<SyncSender<Job>>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Store { start, blocks, .. } => write!(f, "Store({start}, {} blocks)", blocks.len()),
            Job::Barrier(_) => write!(f, "Barrier"),
        }
    }
}

impl Shared {
    fn is_filled(&self, b: u64) -> bool {
        self.filled[(b / 64) as usize].load(Ordering::Acquire) & (1 << (b % 64)) != 0
    }

    /// Store blocks whose bytes were reserved in `used` when they were queued; give the
    /// reservation back for blocks that end up not stored.
    fn write(&self, start: u64, data: &[u8], blocks: &[u64]) {
        for &b in blocks {
            let s = b * self.block;
            let from = (s - start) as usize;
            let to = (from + self.block as usize).min(data.len());
            // A failed cache write (disk full) only means the block stays uncached.
            let stored = !self.is_filled(b) && self.file.write_all_at(&data[from..to], s).is_ok();
            if stored {
                self.filled[(b / 64) as usize].fetch_or(1 << (b % 64), Ordering::AcqRel);
            } else {
                self.used.fetch_sub(self.block, Ordering::Relaxed);
            }
        }
    }
}

fn writer(shared: Arc<Shared>, rx: std::sync::mpsc::Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        match job {
            Job::Store { start, data, blocks } => shared.write(start, &data, &blocks),
            Job::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

impl<B> Drop for ReadCache<B> {
    fn drop(&mut self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
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
        let shared = Arc::new(Shared { file, block, filled, used: AtomicU64::new(0) });
        let (tx, rx) = sync_channel(QUEUE);
        let w = shared.clone();
        let writer = std::thread::Builder::new().name("read-cache".into()).spawn(move || writer(w, rx))?;
        Ok(Self { base, shared, max_bytes, queue: Mutex::new(Some(tx)), writer: Some(writer) })
    }

    /// Wait until every block handed to the writer so far is in the file (for tests and
    /// measurements; reads never need it).
    pub fn wait_idle(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = self.sender().is_some_and(|q| q.send(Job::Barrier(tx)).is_ok());
        if sent {
            let _ = rx.recv();
        }
    }

    fn sender(&self) -> Option<SyncSender<Job>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn base(&self) -> &B {
        &self.base
    }

    /// Bytes held in the cache file (and queued for it).
    pub fn cached_bytes(&self) -> u64 {
        self.shared.used.load(Ordering::Relaxed)
    }

    /// Read blocks `first..end_block` from the base (one call, so the base can fetch in
    /// parallel), store the data runs, and copy the part inside `offset..` into `out`.
    fn fill(&self, first: u64, end_block: u64, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let block = self.shared.block;
        let start = first * block;
        let end = (end_block * block).min(self.base.len());
        let mut whole = vec![0u8; (end - start) as usize];
        self.base.read_at(start, &mut whole)?;
        let from = (offset - start) as usize;
        out.copy_from_slice(&whole[from..from + out.len()]);
        let mut blocks = Vec::new();
        for b in first..end_block {
            let (s, t) = (b * block, ((b + 1) * block).min(end));
            // A zero run costs nothing to read again; keep the file sparse.
            let run = self.base.allocation(s, t - s)?;
            if !(run.kind == Allocation::Zero && run.len >= t - s) {
                blocks.push(b);
            }
        }
        let bytes = blocks.len() as u64 * block;
        let q = match self.sender() {
            Some(q) if !blocks.is_empty() => q,
            _ => return Ok(()),
        };
        // Reserve the room first, so concurrent readers cannot overshoot the limit together.
        let reserved = self.shared.used.fetch_add(bytes, Ordering::Relaxed);
        if reserved + bytes > self.max_bytes {
            self.shared.used.fetch_sub(bytes, Ordering::Relaxed);
            return Ok(());
        }
        // Wait for room in the queue: every block read gets cached, at the writer's pace.
        if q.send(Job::Store { start, data: whole, blocks }).is_err() {
            self.shared.used.fetch_sub(bytes, Ordering::Relaxed);
        }
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
        let (block, shared) = (self.shared.block, &self.shared);
        let mut pos = offset;
        while pos < end {
            let b = pos / block;
            let filled = shared.is_filled(b);
            // The run of blocks with the same filled state, up to the end of the read.
            let mut next = b + 1;
            while next * block < end && shared.is_filled(next) == filled {
                next += 1;
            }
            let upto = (next * block).min(end);
            let out = &mut buf[(pos - offset) as usize..(upto - offset) as usize];
            if filled {
                shared.file.read_exact_at(out, pos)?;
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
