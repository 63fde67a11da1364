//! Partition tables, volume probing and ext4 superblock / group descriptors / inodes from
//! arbitrary bytes: a value or an error, never a panic; every partition found lies inside
//! the disk.
#![no_main]
use std::sync::Arc;

use blockdev::{BlockDev, MemDev};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The fuzz input is the first sectors of a 1 MiB disk (GPT backup lookups land in zeros).
    let mut disk = vec![0u8; 1 << 20];
    let n = data.len().min(disk.len());
    disk[..n].copy_from_slice(&data[..n]);
    let dev: Arc<dyn BlockDev> = Arc::new(MemDev::new(disk));
    if let Ok(d) = guestfs::open_disk(dev.clone()) {
        for v in d.volumes {
            if let Some(p) = &v.partition {
                assert!(p.start + p.len <= dev.len());
            }
            if matches!(v.content, guestfs::Content::Ext { .. }) {
                if let Ok(fs) = guestfs::ext4::Ext4::open(Arc::new(v.dev)) {
                    for ino in [1, 2, 11, fs.sb.inodes_count] {
                        let _ = fs.inode(ino);
                    }
                }
            }
        }
    }
});
