//! A sub-range of another device: a partition, a logical volume segment, a file in a tar.

use std::io;

use crate::{check_range, BlockDev, Run};

/// Bytes `start .. start + len` of an inner device, addressed from zero.
#[derive(Debug)]
pub struct SliceDev<D> {
    inner: D,
    start: u64,
    len: u64,
}

impl<D: BlockDev> SliceDev<D> {
    /// Fails when the range does not lie inside `inner`.
    pub fn new(inner: D, start: u64, len: u64) -> io::Result<Self> {
        check_range(inner.len(), start, len)?;
        Ok(Self { inner, start, len })
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }
}

impl<D: BlockDev> BlockDev for SliceDev<D> {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.len, offset, buf.len() as u64)?;
        self.inner.read_at(self.start + offset, buf)
    }

    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<Run> {
        check_range(self.len, offset, 1)?;
        let run = self.inner.allocation(self.start + offset, max_len.min(self.len - offset))?;
        Ok(run)
    }

    fn will_need(&self, offset: u64, len: u64) {
        if offset < self.len {
            self.inner.will_need(self.start + offset, len.min(self.len - offset));
        }
    }

    fn release(&self, offset: u64, len: u64) {
        if offset < self.len {
            self.inner.release(self.start + offset, len.min(self.len - offset));
        }
    }

    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        check_range(self.len, offset, buf.len() as u64)?;
        self.inner.write_at(self.start + offset, buf)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDev;

    #[test]
    fn slice_maps_offsets_and_bounds() {
        let mem = MemDev::new((0..=255u8).collect());
        assert!(SliceDev::new(&mem, 200, 57).is_err());
        let s = SliceDev::new(&mem, 10, 20).unwrap();
        let mut buf = [0u8; 5];
        s.read_at(15, &mut buf).unwrap();
        assert_eq!(buf, [25, 26, 27, 28, 29]);
        assert!(s.read_at(16, &mut buf).is_err());
        s.write_at(0, &[0xff]).unwrap();
        assert_eq!(mem.to_vec()[10], 0xff);
        assert_eq!(s.allocation(19, 100).unwrap().len, 1);
    }
}
