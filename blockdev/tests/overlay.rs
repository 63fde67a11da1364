//! The copy-on-write overlay against a plain in-memory model: random writes, zeroing and
//! discards agree with the model byte for byte, before and after a reopen, and the base is
//! never touched.

use std::sync::Arc;

use blockdev::{read_all, Allocation, BlockDev, MemDev, Overlay};
use proptest::prelude::*;

const BS: u32 = 4096;

fn base_bytes(len: usize) -> Vec<u8> {
    // Data with a zero gap in the middle, so the base has holes worth reporting.
    (0..len).map(|i| if (len / 3..len / 2).contains(&i) { 0 } else { (i * 31 % 251) as u8 }).collect()
}

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Discard(u64, u64),
    Flush,
}

fn op(len: u64) -> impl Strategy<Value = Op> {
    let range = (0..len).prop_flat_map(move |o| (Just(o), 1..=(len - o).min(3 * u64::from(BS))));
    prop_oneof![
        4 => range.clone().prop_map(|(o, n)| Op::Write(o, (0..n).map(|i| (i as u8) ^ 0xA5 ^ (o as u8)).collect())),
        1 => range.clone().prop_map(|(o, n)| Op::Zero(o, n)),
        1 => range.prop_map(|(o, n)| Op::Discard(o, n)),
        1 => Just(Op::Flush),
    ]
}

/// Apply `op` to the model. Discard zeroes whole blocks only, as the overlay documents.
fn apply(model: &mut [u8], op: &Op, len: u64) {
    match op {
        Op::Write(o, d) => model[*o as usize..][..d.len()].copy_from_slice(d),
        Op::Zero(o, n) => model[*o as usize..][..*n as usize].fill(0),
        Op::Discard(o, n) => {
            let bs = u64::from(BS);
            let start = o.next_multiple_of(bs);
            let end = if o + n == len { len } else { (o + n) / bs * bs };
            if end > start {
                model[start as usize..end as usize].fill(0);
            }
        }
        Op::Flush => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn overlay_matches_model(ops in proptest::collection::vec(op(10 * 4096 + 1000), 1..40)) {
        let len = 10 * 4096 + 1000u64;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.ovl");
        let original = base_bytes(len as usize);
        let base = Arc::new(MemDev::new(original.clone()));
        let mut model = original.clone();
        {
            let ov = Overlay::create(&path, base.clone(), BS, "base-1").unwrap();
            for op in &ops {
                match op {
                    Op::Write(o, d) => ov.write_at(*o, d).unwrap(),
                    Op::Zero(o, n) => ov.write_zeroes(*o, *n).unwrap(),
                    Op::Discard(o, n) => ov.discard(*o, *n).unwrap(),
                    Op::Flush => ov.flush().unwrap(),
                }
                apply(&mut model, op, len);
            }
            prop_assert_eq!(read_all(&ov).unwrap(), model.clone());
            // Reads of odd sizes at odd offsets agree with the model too.
            for (o, n) in [(1u64, 3usize), (4095, 2), (8191, 5000), (len - 7, 7)] {
                let mut b = vec![0u8; n];
                ov.read_at(o, &mut b).unwrap();
                prop_assert_eq!(&b[..], &model[o as usize..][..n]);
            }
            // Every changed byte lies in a changed range.
            let changed = ov.changed_ranges();
            for (i, (a, b)) in model.iter().zip(&original).enumerate() {
                if a != b {
                    prop_assert!(changed.iter().any(|r| r.contains(&(i as u64))), "byte {} changed outside {:?}", i, changed);
                }
            }
            ov.flush().unwrap();
        }
        let ov = Overlay::open(&path, base.clone(), Some("base-1"), false).unwrap();
        prop_assert_eq!(read_all(&ov).unwrap(), model);
        prop_assert_eq!(base.to_vec(), original);
    }
}

#[test]
fn allocation_reports_base_holes_overlay_data_and_zeroed_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.ovl");
    let base = MemDev::new(vec![7u8; 16 * 4096]);
    let ov = Overlay::create(&path, base, BS, "b").unwrap();
    ov.write_zeroes(4096, 2 * 4096).unwrap();
    ov.write_at(3 * 4096 + 10, b"x").unwrap();
    let r = ov.allocation(0, u64::MAX).unwrap();
    assert_eq!((r.kind, r.len), (Allocation::Data, 4096));
    let r = ov.allocation(4096, u64::MAX).unwrap();
    assert_eq!((r.kind, r.len), (Allocation::Zero, 2 * 4096));
    let r = ov.allocation(3 * 4096, 100).unwrap();
    assert_eq!((r.kind, r.len), (Allocation::Data, 100));
    assert_eq!(ov.changed_ranges(), vec![4096..4 * 4096]);
    let u = ov.usage();
    assert_eq!((u.data_blocks, u.zero_blocks), (1, 2));
}

#[test]
fn open_checks_base_identity_size_lock_and_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.ovl");
    let ov = Overlay::create(&path, MemDev::new(vec![0; 8192]), BS, "snap-a").unwrap();
    ov.write_at(0, b"hello").unwrap();
    ov.flush().unwrap();
    // Held exclusively while open for writing.
    let e = Overlay::open(&path, MemDev::new(vec![0; 8192]), None, false).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ResourceBusy, "{e}");
    drop(ov);
    let e = Overlay::open(&path, MemDev::new(vec![0; 8192]), Some("snap-b"), false).unwrap_err();
    assert!(e.to_string().contains("snap-a"), "{e}");
    let e = Overlay::open(&path, MemDev::new(vec![0; 4096]), None, false).unwrap_err();
    assert!(e.to_string().contains("8192"), "{e}");
    assert!(Overlay::create(&path, MemDev::new(vec![0; 8192]), BS, "x").is_err(), "create must not overwrite");
    // A damaged bitmap is an error, not wrong data.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xff], 4096).unwrap();
    let e = Overlay::open(&path, MemDev::new(vec![0; 8192]), None, false).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
}

#[test]
fn writes_are_refused_on_a_read_only_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.ovl");
    drop(Overlay::create(&path, MemDev::new(vec![0; 8192]), BS, "b").unwrap());
    let ov = Overlay::open(&path, MemDev::new(vec![0; 8192]), None, false).unwrap();
    assert_eq!(ov.write_at(0, b"x").unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);
    assert!(!ov.is_writable());
}

#[test]
fn concurrent_partial_writes_to_one_block_keep_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.ovl");
    let ov = Arc::new(Overlay::create(&path, MemDev::new(vec![1u8; 64 * 1024]), 65536, "b").unwrap());
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let ov = ov.clone();
            s.spawn(move || ov.write_at(u64::from(t) * 1000, &[t + 10; 1000]).unwrap());
        }
    });
    let all = read_all(&*ov).unwrap();
    for t in 0..8usize {
        assert!(all[t * 1000..(t + 1) * 1000].iter().all(|&b| b == t as u8 + 10), "writer {t} lost");
    }
    assert!(all[8000..].iter().all(|&b| b == 1));
}
