//! A device in memory, for tests and small images.

use std::io;
use std::sync::RwLock;

use crate::{check_range, BlockDev};

/// A writable device backed by a `Vec<u8>`.
#[derive(Debug, Default)]
pub struct MemDev {
    data: RwLock<Vec<u8>>,
}

impl MemDev {
    pub fn new(data: Vec<u8>) -> Self {
        Self { data: RwLock::new(data) }
    }

    /// A copy of the current contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BlockDev for MemDev {
    fn len(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        check_range(data.len() as u64, offset, buf.len() as u64)?;
        let start = offset as usize;
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }

    fn is_writable(&self) -> bool {
        true
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        check_range(data.len() as u64, offset, buf.len() as u64)?;
        let start = offset as usize;
        data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }
}
