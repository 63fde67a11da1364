//! A copy-on-write overlay over a read-only base device: the layer that lets a VM boot
//! from a backup and write. Written blocks live in one sparse overlay file; everything else
//! is read from the base, which is never modified.
//!
//! The file: a 4 KiB header ([`OverlayHeader`]), a bitmap of two bits per block
//! ([`BlockState`]), then the data area where block `i` sits at `data_offset + i *
//! block_size`. The byte layout is in `format-spec/OVERLAY.md`.
//!
//! Durability: after [`flush`](BlockDev::flush) returns, every write that completed before it
//! survives a crash. A flush syncs the data first, then writes the changed bitmap pages and
//! syncs again, so the bitmap on disk never names a block whose data is not on disk.
//!
//! Threading: `Send + Sync`. Reads take no lock. Partial writes to a block that still comes
//! from the base copy it first under one of a few striped locks, so two writers to
//! different parts of one block cannot lose each other's bytes.

mod header;
mod states;

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

pub use header::{OverlayHeader, MAX_BLOCK, MIN_BLOCK};
pub use states::BlockState;

use crate::{check_range, Allocation, BlockDev, Run};
use header::HEADER_LEN;
use states::States;

const STRIPES: usize = 64;

/// A copy-on-write overlay over `B`. See the module docs.
#[derive(Debug)]
pub struct Overlay<B> {
    base: B,
    file: File,
    header: OverlayHeader,
    states: States,
    writable: bool,
    stripes: Vec<Mutex<()>>,
    flushing: Mutex<()>,
}

/// What [`Overlay::usage`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverlayUsage {
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub block_size: u32,
}

fn lock_file(file: &File, writable: bool) -> io::Result<()> {
    use rustix::fs::FlockOperation::{NonBlockingLockExclusive, NonBlockingLockShared};
    let op = if writable { NonBlockingLockExclusive } else { NonBlockingLockShared };
    rustix::fs::flock(file, op).map_err(|e| match e {
        rustix::io::Errno::WOULDBLOCK => {
            io::Error::new(io::ErrorKind::ResourceBusy, "the overlay is in use by another process")
        }
        e => e.into(),
    })
}

impl<B: BlockDev> Overlay<B> {
    /// Create a new overlay file at `path` (which must not exist) over `base`.
    pub fn create(path: &Path, base: B, block_size: u32, base_id: &str) -> io::Result<Self> {
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let header = OverlayHeader { block_size, size: base.len(), created, base_id: base_id.to_owned() };
        header.validate()?;
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        lock_file(&file, true)?;
        file.set_len(header.data_offset() + header.size)?;
        file.write_all_at(&header.to_bytes(), 0)?;
        file.sync_all()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        let states = States::empty(header.bitmap_len(), header.blocks());
        Ok(Self::assemble(base, file, header, states, true))
    }

    /// Open an existing overlay over `base`. When `base_id` is given it must equal the one
    /// recorded at creation; the base's length must always match. A writable open takes an
    /// exclusive lock on the file, a read-only one a shared lock.
    pub fn open(path: &Path, base: B, base_id: Option<&str>, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        lock_file(&file, writable)?;
        let header = read_header(&file)?;
        if let Some(id) = base_id.filter(|id| *id != header.base_id) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("overlay belongs to base {:?}, not {id:?}", header.base_id),
            ));
        }
        if base.len() != header.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("overlay is for a {}-byte base; this base has {} bytes", header.size, base.len()),
            ));
        }
        let have = file.metadata()?.len();
        if have < header.data_offset() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("overlay file truncated to {have} bytes")));
        }
        let mut bitmap = vec![0u8; header.bitmap_len() as usize];
        file.read_exact_at(&mut bitmap, header.bitmap_offset())?;
        let states = States::from_bytes(&bitmap, header.blocks())?;
        Ok(Self::assemble(base, file, header, states, writable))
    }

    fn assemble(base: B, file: File, header: OverlayHeader, states: States, writable: bool) -> Self {
        let stripes = (0..STRIPES).map(|_| Mutex::new(())).collect();
        Self { base, file, header, states, writable, stripes, flushing: Mutex::new(()) }
    }

    pub fn header(&self) -> &OverlayHeader {
        &self.header
    }

    pub fn base(&self) -> &B {
        &self.base
    }

    pub fn usage(&self) -> OverlayUsage {
        let (data_blocks, zero_blocks) = self.states.counts();
        OverlayUsage { data_blocks, zero_blocks, block_size: self.header.block_size }
    }

    /// Byte ranges that differ from the base (written, zeroed or discarded), merged.
    pub fn changed_ranges(&self) -> Vec<Range<u64>> {
        let bs = u64::from(self.header.block_size);
        let mut out: Vec<Range<u64>> = Vec::new();
        for (st, r) in self.states.runs(0..self.header.blocks()) {
            if st == BlockState::Base {
                continue;
            }
            let range = r.start * bs..(r.end * bs).min(self.header.size);
            match out.last_mut() {
                Some(last) if last.end == range.start => last.end = range.end,
                _ => out.push(range),
            }
        }
        out
    }

    fn bs(&self) -> u64 {
        u64::from(self.header.block_size)
    }

    fn data_pos(&self, offset: u64) -> u64 {
        self.header.data_offset() + offset
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::PermissionDenied, "overlay is open read-only"))
        }
    }

    /// Write `buf` into the inside of one block at device offset `offset`, copying the
    /// block's old contents into the overlay first if it has none there yet.
    fn write_partial(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let block = offset / self.bs();
        if self.states.get(block) != BlockState::Data {
            let _guard = self.stripes[block as usize % STRIPES].lock().unwrap_or_else(|e| e.into_inner());
            let state = self.states.get(block);
            if state != BlockState::Data {
                let start = block * self.bs();
                let len = self.bs().min(self.header.size - start) as usize;
                let mut whole = vec![0u8; len];
                if state == BlockState::Base {
                    self.base.read_at(start, &mut whole)?;
                }
                let at = (offset - start) as usize;
                whole[at..at + buf.len()].copy_from_slice(buf);
                self.file.write_all_at(&whole, self.data_pos(start))?;
                self.states.set(block..block + 1, BlockState::Data);
                return Ok(());
            }
        }
        self.file.write_all_at(buf, self.data_pos(offset))
    }

    /// Split `offset..offset+len` into a partial head, whole blocks, and a partial tail.
    fn split(&self, offset: u64, len: u64) -> (Range<u64>, Range<u64>, Range<u64>) {
        let end = offset + len;
        let first_whole = offset.next_multiple_of(self.bs()).min(end);
        // The last block may be short (device length not a multiple of the block size).
        let last_whole = if end == self.header.size { end } else { end / self.bs() * self.bs() };
        let last_whole = last_whole.max(first_whole);
        (offset..first_whole, first_whole..last_whole, last_whole..end)
    }

    fn blocks_of(&self, r: &Range<u64>) -> Range<u64> {
        r.start / self.bs()..r.end.div_ceil(self.bs())
    }

    /// Mark whole blocks zero and free their space in the file.
    fn zero_blocks(&self, whole: Range<u64>) -> io::Result<()> {
        if whole.is_empty() {
            return Ok(());
        }
        self.states.set(self.blocks_of(&whole), BlockState::Zero);
        use rustix::fs::FallocateFlags;
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        // Punching is only space reclamation; the state already says zero.
        let _ = rustix::fs::fallocate(&self.file, flags, self.data_pos(whole.start), whole.end - whole.start);
        Ok(())
    }
}

impl<B> Overlay<B> {
    fn write_back(&self, pages: &[(u64, Vec<u8>)]) -> io::Result<()> {
        self.file.sync_data()?;
        if pages.is_empty() {
            return Ok(());
        }
        for (at, bytes) in pages {
            self.file.write_all_at(bytes, self.header.bitmap_offset() + at)?;
        }
        self.file.sync_data()
    }
}

fn read_header(file: &File) -> io::Result<OverlayHeader> {
    let mut buf = vec![0u8; HEADER_LEN];
    file.read_exact_at(&mut buf, 0)
        .map_err(|e| io::Error::new(e.kind(), format!("reading the overlay header: {e}")))?;
    OverlayHeader::from_bytes(&buf)
}

/// Read an overlay file's header without opening its base (to find out what the base is).
pub fn read_overlay_header(path: &Path) -> io::Result<OverlayHeader> {
    read_header(&File::open(path)?)
}

/// Delete an overlay file, refusing while another process has it open for writing (a
/// server serving it). Returns what the header said.
pub fn remove_overlay(path: &Path) -> io::Result<OverlayHeader> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    lock_file(&file, true)?;
    let header = read_header(&file)?;
    std::fs::remove_file(path)?;
    Ok(header)
}

impl<B: BlockDev> BlockDev for Overlay<B> {
    fn len(&self) -> u64 {
        self.header.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.header.size, offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let blocks = self.blocks_of(&(offset..end));
        for (st, r) in self.states.runs(blocks) {
            let (s, t) = ((r.start * self.bs()).max(offset), (r.end * self.bs()).min(end));
            let out = &mut buf[(s - offset) as usize..(t - offset) as usize];
            match st {
                BlockState::Base => self.base.read_at(s, out)?,
                BlockState::Data => self.file.read_exact_at(out, self.data_pos(s))?,
                BlockState::Zero => out.fill(0),
            }
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<Run> {
        check_range(self.header.size, offset, 1)?;
        let limit = offset + max_len.min(self.header.size - offset);
        let block = offset / self.bs();
        let (st, r) = match self.states.runs(block..self.blocks_of(&(offset..limit)).end).next() {
            Some(run) => run,
            None => return Ok(Run { kind: Allocation::Data, len: limit - offset }),
        };
        let end = (r.end * self.bs()).min(limit);
        Ok(match st {
            BlockState::Base => self.base.allocation(offset, end - offset)?,
            BlockState::Data => Run { kind: Allocation::Data, len: end - offset },
            BlockState::Zero => Run { kind: Allocation::Zero, len: end - offset },
        })
    }

    fn will_need(&self, offset: u64, len: u64) {
        self.base.will_need(offset, len);
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check_writable()?;
        check_range(self.header.size, offset, buf.len() as u64)?;
        let (head, whole, tail) = self.split(offset, buf.len() as u64);
        let part = |r: &Range<u64>| &buf[(r.start - offset) as usize..(r.end - offset) as usize];
        if !head.is_empty() {
            self.write_partial(head.start, part(&head))?;
        }
        if !whole.is_empty() {
            self.file.write_all_at(part(&whole), self.data_pos(whole.start))?;
            self.states.set(self.blocks_of(&whole), BlockState::Data);
        }
        if !tail.is_empty() {
            self.write_partial(tail.start, part(&tail))?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(self.header.size, offset, len)?;
        let (head, whole, tail) = self.split(offset, len);
        for r in [&head, &tail] {
            if !r.is_empty() {
                self.write_partial(r.start, &vec![0u8; (r.end - r.start) as usize])?;
            }
        }
        self.zero_blocks(whole)
    }

    fn zeroes_are_cheap(&self) -> bool {
        true
    }

    /// Whole blocks in the range become zero; partial blocks keep their bytes.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(self.header.size, offset, len)?;
        let (_, whole, _) = self.split(offset, len);
        self.zero_blocks(whole)
    }

    fn flush(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _one_at_a_time = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        // Take the pages before the first sync: every state they hold was set after its data
        // was written, so that data is covered by the sync below.
        let pages = self.states.take_dirty();
        let result = self.write_back(&pages);
        if result.is_err() {
            for (at, _) in &pages {
                self.states.mark_dirty(*at);
            }
        }
        result
    }
}
