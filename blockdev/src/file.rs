//! Files and block devices.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use crate::{check_range, Allocation, BlockDev, Run};

/// A regular file or a block device. Its length is fixed when it is opened.
///
/// Holes of sparse files are reported through [`BlockDev::allocation`] (SEEK_DATA /
/// SEEK_HOLE), so a backup reads only the allocated parts of a sparse image. Block devices
/// report everything as data.
#[derive(Debug)]
pub struct FileDev {
    file: File,
    len: u64,
    writable: bool,
    seekable_holes: bool,
}

impl FileDev {
    /// Open a file or block device read-only.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::from_file(File::open(path)?, false)
    }

    /// Open an existing file or block device for reading and writing. It never grows.
    pub fn open_rw(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::from_file(OpenOptions::new().read(true).write(true).open(path)?, true)
    }

    /// Wrap an open file. `writable` must match how the file was opened.
    pub fn from_file(mut file: File, writable: bool) -> io::Result<Self> {
        let meta = file.metadata()?;
        let is_block = meta.file_type().is_block_device();
        if !meta.is_file() && !is_block {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file or block device"));
        }
        // A block device's metadata length is 0; its size is where the end is.
        let len = if is_block { file.seek(SeekFrom::End(0))? } else { meta.len() };
        Ok(Self { file, len, writable, seekable_holes: !is_block })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn seek_data_or_hole(&self, from: u64, data: bool) -> io::Result<Option<u64>> {
        let whence = if data { rustix::fs::SeekFrom::Data(from) } else { rustix::fs::SeekFrom::Hole(from) };
        match rustix::fs::seek(&self.file, whence) {
            Ok(pos) => Ok(Some(pos)),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl BlockDev for FileDev {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.len, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }

    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<Run> {
        check_range(self.len, offset, 1)?;
        let limit = max_len.min(self.len - offset);
        if !self.seekable_holes {
            return Ok(Run { kind: Allocation::Data, len: limit });
        }
        // SEEK_DATA from `offset`: if it lands beyond `offset`, we are in a hole.
        match self.seek_data_or_hole(offset, true) {
            Ok(Some(data)) if data > offset => Ok(Run { kind: Allocation::Zero, len: (data - offset).min(limit) }),
            Ok(None) => Ok(Run { kind: Allocation::Zero, len: limit }),
            Ok(Some(_)) => {
                let hole = self.seek_data_or_hole(offset, false)?.unwrap_or(self.len);
                Ok(Run { kind: Allocation::Data, len: (hole.max(offset + 1) - offset).min(limit) })
            }
            // Filesystems without SEEK_DATA support: everything is data.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                Ok(Run { kind: Allocation::Data, len: limit })
            }
            Err(e) => Err(e),
        }
    }

    fn will_need(&self, offset: u64, len: u64) {
        let len = std::num::NonZeroU64::new(len.min(self.len.saturating_sub(offset)));
        if len.is_some() {
            // Starts asynchronous readahead; errors only mean no hint.
            let _ = rustix::fs::fadvise(&self.file, offset, len, rustix::fs::Advice::WillNeed);
        }
    }

    fn release(&self, offset: u64, len: u64) {
        let len = std::num::NonZeroU64::new(len.min(self.len.saturating_sub(offset)));
        if len.is_none() || (self.writable && rustix::fs::fdatasync(&self.file).is_err()) {
            return;
        }
        // Clean pages can now be dropped; errors only mean they stay cached.
        let _ = rustix::fs::fadvise(&self.file, offset, len, rustix::fs::Advice::DontNeed);
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "device is read-only"));
        }
        check_range(self.len, offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        if self.writable {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sparse_file_reports_holes_and_reads_zero() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.as_file_mut().set_len(8 << 20).unwrap();
        f.as_file_mut().seek(SeekFrom::Start(4 << 20)).unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        f.flush().unwrap();
        let dev = FileDev::open(f.path()).unwrap();
        assert_eq!(dev.len(), 8 << 20);
        let first = dev.allocation(0, u64::MAX).unwrap();
        assert_eq!(first.kind, Allocation::Zero);
        assert!(first.len <= 4 << 20 && first.len > 0);
        let data = dev.allocation(4 << 20, u64::MAX).unwrap();
        assert_eq!(data.kind, Allocation::Data);
        assert!(data.len >= 4096);
        let mut buf = [1u8; 16];
        dev.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 16]);
        dev.read_at(4 << 20, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 16]);
        // The whole device is covered by runs whose lengths add up.
        let mut pos = 0;
        while pos < dev.len() {
            pos += dev.allocation(pos, 1 << 20).unwrap().len;
        }
        assert_eq!(pos, dev.len());
    }

    #[test]
    fn reads_past_end_fail_and_read_only_refuses_writes() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(100).unwrap();
        let dev = FileDev::open(f.path()).unwrap();
        let mut buf = [0u8; 10];
        assert_eq!(dev.read_at(95, &mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(dev.write_at(0, &buf).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        let rw = FileDev::open_rw(f.path()).unwrap();
        rw.write_at(90, &[5u8; 10]).unwrap();
        assert!(rw.write_at(91, &[5u8; 10]).is_err(), "devices never grow");
        dev.read_at(90, &mut buf).unwrap();
        assert_eq!(buf, [5u8; 10]);
    }
}
