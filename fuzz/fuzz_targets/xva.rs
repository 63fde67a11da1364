//! XVA packages from arbitrary bytes: checking the tar, ova.xml and the chunks gives a
//! package or an error, never a panic or a hang; every VDI of an accepted package reads at
//! its start and end and answers allocation queries inside itself.
#![no_main]
use std::sync::Arc;

use blockdev::{BlockDev, MemDev};
use disk_formats::xva::Xva;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let file: Arc<dyn BlockDev> = Arc::new(MemDev::new(data.to_vec()));
    let Ok(xva) = Xva::open(file) else { return };
    for disk in xva.disks.values() {
        // Skipped chunks make sparse disks far larger than the input: read pieces.
        let len = disk.len();
        let mut buf = vec![0u8; len.min(1 << 20) as usize];
        disk.read_at(0, &mut buf).expect("an accepted VDI reads");
        disk.read_at(len - buf.len() as u64, &mut buf).expect("an accepted VDI reads");
        let mut pos = 0;
        for _ in 0..1000 {
            if pos >= len {
                break;
            }
            let r = disk.allocation(pos, len - pos).expect("allocation inside the disk");
            assert!(r.len > 0 && r.len <= len - pos);
            pos += r.len;
        }
    }
});
