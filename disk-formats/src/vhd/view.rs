//! A device shown as a fixed VHD: its bytes, then a footer. Random access, nothing copied,
//! holes where the device has them — what the FUSE mount serves as `disks/NAME.vhd`.

use std::io;

use blockdev::{check_range, Allocation, BlockDev, Run};

use super::footer::{DiskType, Footer};
use super::write::check_size;
use crate::Result;

/// `dev` followed by a fixed-disk footer.
#[derive(Debug)]
pub struct FixedView<D> {
    dev: D,
    footer: [u8; 512],
}

impl<D: BlockDev> FixedView<D> {
    /// The footer's unique id and timestamp are given so that the same snapshot always shows
    /// the same file.
    pub fn new(dev: D, unique_id: [u8; 16], timestamp: u32) -> Result<Self> {
        check_size(dev.len())?;
        let mut f = Footer::new(DiskType::Fixed, dev.len(), unique_id);
        f.timestamp = timestamp;
        Ok(FixedView { footer: f.to_bytes(), dev })
    }
}

impl<D: BlockDev> BlockDev for FixedView<D> {
    fn len(&self) -> u64 {
        self.dev.len() + 512
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.len(), offset, buf.len() as u64)?;
        let data_len = self.dev.len();
        let split = (data_len.saturating_sub(offset)).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(split);
        if !head.is_empty() {
            self.dev.read_at(offset, head)?;
        }
        if !tail.is_empty() {
            let from = (offset + split as u64 - data_len) as usize;
            tail.copy_from_slice(&self.footer[from..from + tail.len()]);
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<Run> {
        check_range(self.len(), offset, 1)?;
        let data_len = self.dev.len();
        if offset >= data_len {
            return Ok(Run { kind: Allocation::Data, len: max_len.min(self.len() - offset).max(1) });
        }
        self.dev.allocation(offset, max_len.min(data_len - offset))
    }

    fn will_need(&self, offset: u64, len: u64) {
        self.dev.will_need(offset, len);
    }

    fn release(&self, offset: u64, len: u64) {
        self.dev.release(offset, len);
    }
}
