//! LVM2 metadata text: any bytes parse to a tree or an error, and any tree gives a volume
//! group or an error — no panic, no unbounded recursion.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tree) = guestfs::lvm::parse(data) {
        if let Ok(vg) = guestfs::lvm::volume_group(&tree) {
            for lv in &vg.lvs {
                if let Ok(segs) = &lv.layout {
                    assert!(segs.iter().all(|s| s.stripes.iter().all(|&(i, _)| i < vg.pvs.len())));
                }
            }
        }
    }
});
