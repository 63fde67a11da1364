//! Guest filesystems (ext2/3/4, FAT12/16/32, NTFS) from arbitrary bytes, walked through the
//! filesystem-neutral `FileSystem` trait exactly as `vmvault mount` and `restore-files` do:
//! every directory listed, every node stat'ed, every file read and every symlink followed —
//! a value or an error, never a panic, a hang, or a read past a file's length.
#![no_main]
use std::sync::Arc;

use blockdev::{BlockDev, MemDev};
use guestfs::fs::{FileSystem, Kind};
use libfuzzer_sys::fuzz_target;

fn walk(fs: &dyn FileSystem, ino: u64, depth: u32, budget: &mut u32) {
    let Ok(entries) = fs.read_dir(ino) else { return };
    for e in entries {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let Ok(st) = fs.stat(e.ino) else { continue };
        match e.kind {
            Kind::Dir if depth < 8 => walk(fs, e.ino, depth + 1, budget),
            Kind::File => {
                if let Ok(dev) = fs.open(e.ino) {
                    let len = dev.len().min(1 << 20);
                    let mut buf = vec![0u8; len as usize];
                    let _ = dev.read_at(0, &mut buf);
                    let _ = dev.allocation(0, len.max(1));
                    assert!(dev.read_at(dev.len(), &mut [0u8; 1]).is_err(), "read past the end of {}", st.ino);
                }
            }
            Kind::Symlink => {
                let _ = fs.read_link(e.ino);
            }
            _ => {}
        }
        let _ = fs.lookup(ino, &e.name);
    }
}

fuzz_target!(|data: &[u8]| {
    // The input is the start of a 2 MiB volume.
    let mut vol = vec![0u8; 2 << 20];
    let n = data.len().min(vol.len());
    vol[..n].copy_from_slice(&data[..n]);
    let dev: Arc<dyn BlockDev> = Arc::new(MemDev::new(vol));
    let Ok(content) = guestfs::probe(&*dev) else { return };
    if let Ok(fs) = guestfs::fs::open(&content, dev) {
        let mut budget = 2000;
        let _ = fs.stat(fs.root());
        walk(&*fs, fs.root(), 0, &mut budget);
        let _ = guestfs::fs::resolve(&*fs, b"/a/b/../c");
    }
});
