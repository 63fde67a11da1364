//! The one positional device trait under every vmvault crate.
//!
//! A [`BlockDev`] is a fixed-length array of bytes that can be read at any offset from any
//! thread. Raw image files, block devices, memory buffers, partitions (sub-ranges), archive
//! streams, VHD images and NBD clients all implement it; filesystem and format parsers take a
//! `&dyn BlockDev` (or a generic `D: BlockDev`) and never open paths themselves.
//!
//! Threading: every device is `Send + Sync`. Implementations that cache keep their caches
//! behind interior mutability, so FUSE and NBD worker threads may call `read_at` concurrently.
//!
//! Errors are plain [`std::io::Error`]: the trait is the meeting point of many crates, and
//! FUSE and NBD need an errno in the end. A read past the end is `UnexpectedEof`; a write to a
//! read-only device is `PermissionDenied`.

mod cache;
mod file;
mod mem;
pub mod overlay;
mod slice;

use std::io;

pub use cache::ReadCache;
pub use file::FileDev;
pub use mem::MemDev;
pub use overlay::Overlay;
pub use slice::SliceDev;

/// What a run of bytes of a device holds, as far as the device knows without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Bytes that must be read to be known.
    Data,
    /// Bytes that read as zero and cost nothing to read (a hole, a zero extent).
    Zero,
}

/// A run of bytes with one [`Allocation`], as answered by [`BlockDev::allocation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub kind: Allocation,
    pub len: u64,
}

/// A fixed-length, positionally addressed device. See the crate docs for the threading rules.
pub trait BlockDev: Send + Sync {
    /// The device's length in bytes. Constant for the device's lifetime.
    fn len(&self) -> u64;

    /// True when the device has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fill `buf` with the bytes at `offset`. Either the whole buffer is filled or an error is
    /// returned; a range that runs past [`len`](Self::len) is `UnexpectedEof`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// The allocation of the run starting at `offset`, at most `max_len` bytes long (and never
    /// past the end). The default says everything is data; devices that know their holes or
    /// zero extents say so, which lets callers skip reading them (sparse copies, NBD block
    /// status, SEEK_HOLE). `offset` must be below `len()`.
    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<Run> {
        check_range(self.len(), offset, 1)?;
        Ok(Run { kind: Allocation::Data, len: max_len.min(self.len() - offset) })
    }

    /// A hint that `len` bytes at `offset` will be read soon. Devices that can fetch ahead
    /// in the background (the page cache, a network client) start doing so. Never needed
    /// for correctness; the default ignores it.
    fn will_need(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }

    /// A hint that the bytes in this range will not be needed again soon: a device may make
    /// written bytes durable and drop the range from its caches (like `dd iflag=nocache` /
    /// `oflag=nocache`), so a backup or restore of a large disk does not flush everything
    /// else out of the page cache. Never needed for correctness.
    fn release(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }

    /// True when [`write_at`](Self::write_at) may succeed.
    fn is_writable(&self) -> bool {
        false
    }

    /// Write all of `buf` at `offset`. Devices never grow: writing past the end is an error.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let _ = (offset, buf);
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "device is read-only"))
    }

    /// Make `len` bytes at `offset` read as zeros. The default writes zero buffers; devices
    /// that can record zeros without writing them (holes, an overlay's zero state) override
    /// it and say so in [`zeroes_are_cheap`](Self::zeroes_are_cheap).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.len(), offset, len)?;
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            self.write_at(pos, &zeros[..n])?;
            pos += n as u64;
        }
        Ok(())
    }

    /// True when [`write_zeroes`](Self::write_zeroes) is much cheaper than writing zeros
    /// (NBD's FAST_ZERO asks exactly this).
    fn zeroes_are_cheap(&self) -> bool {
        false
    }

    /// A hint that the range's contents are no longer needed (TRIM / discard). Afterwards the
    /// range reads as its old bytes or as zeros, per device. The default keeps the bytes.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.len(), offset, len)?;
        if self.is_writable() {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::PermissionDenied, "device is read-only"))
        }
    }

    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Check that `len` bytes at `offset` lie inside a device of `dev_len` bytes.
pub fn check_range(dev_len: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= dev_len => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("range {offset}+{len} runs past the device end at {dev_len}"),
        )),
    }
}

/// Devices behind references and smart pointers are devices.
macro_rules! forward_blockdev {
    ($($t:ty),*) => {$(
        impl<D: BlockDev + ?Sized> BlockDev for $t {
            fn len(&self) -> u64 {
                (**self).len()
            }
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
                (**self).read_at(offset, buf)
            }
            fn allocation(&self, offset: u64, max_len: u64) -> io::Result<Run> {
                (**self).allocation(offset, max_len)
            }
            fn will_need(&self, offset: u64, len: u64) {
                (**self).will_need(offset, len)
            }
            fn release(&self, offset: u64, len: u64) {
                (**self).release(offset, len)
            }
            fn is_writable(&self) -> bool {
                (**self).is_writable()
            }
            fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
                (**self).write_at(offset, buf)
            }
            fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
                (**self).write_zeroes(offset, len)
            }
            fn zeroes_are_cheap(&self) -> bool {
                (**self).zeroes_are_cheap()
            }
            fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
                (**self).discard(offset, len)
            }
            fn flush(&self) -> io::Result<()> {
                (**self).flush()
            }
        }
    )*};
}

forward_blockdev!(&D, Box<D>, std::sync::Arc<D>);

/// Read the whole device into memory. A convenience for
/// tests and small tools; bulk paths use the device's own parallel readers.
pub fn read_all(dev: &dyn BlockDev) -> io::Result<Vec<u8>> {
    let len = usize::try_from(dev.len())
        .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "device too large for memory"))?;
    let mut out = vec![0u8; len];
    dev.read_at(0, &mut out)?;
    Ok(out)
}
