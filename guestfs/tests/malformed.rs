//! Any bytes give a table, no table, or an error — never a panic or a hang; a loop in the
//! extended partition chain is cut with a warning.

use std::sync::Arc;

use blockdev::{BlockDev, MemDev};
use guestfs::{open_disk, read_table};
use proptest::prelude::*;

fn mbr_entry(b: &mut [u8], sector: usize, slot: usize, kind: u8, start: u32, count: u32) {
    let e = sector * 512 + 446 + 16 * slot;
    b[e + 4] = kind;
    b[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
    b[e + 12..e + 16].copy_from_slice(&count.to_le_bytes());
    b[sector * 512 + 510] = 0x55;
    b[sector * 512 + 511] = 0xAA;
}

#[test]
fn a_looping_extended_chain_is_cut() {
    let mut b = vec![0u8; 1 << 20];
    mbr_entry(&mut b, 0, 0, 0x83, 1500, 8);
    mbr_entry(&mut b, 0, 1, 0x05, 100, 1000);
    // EBR at 100 (logical 5) links to the EBR at 100 + 200; that one (logical 6) links back
    // to 100 + 200 — itself.
    mbr_entry(&mut b, 100, 0, 0x83, 1, 8);
    mbr_entry(&mut b, 100, 1, 0x05, 200, 8);
    mbr_entry(&mut b, 300, 0, 0x83, 1, 8);
    mbr_entry(&mut b, 300, 1, 0x05, 200, 8);
    let t = read_table(&MemDev::new(b)).unwrap().unwrap();
    assert_eq!(t.partitions.iter().map(|p| p.number).collect::<Vec<_>>(), [1, 5, 6]);
    assert_eq!(t.partitions[1].start, 101 * 512, "logical starts are relative to their EBR");
    assert!(t.warnings.iter().any(|w| w.contains("loop")), "{:?}", t.warnings);
}

#[test]
fn partitions_past_the_end_are_skipped_with_a_warning() {
    let mut b = vec![0u8; 1 << 20];
    mbr_entry(&mut b, 0, 0, 0x83, 2048, 8); // beyond a 1 MiB disk
    mbr_entry(&mut b, 0, 1, 0x83, 100, 8);
    let t = read_table(&MemDev::new(b)).unwrap().unwrap();
    assert_eq!(t.partitions.len(), 1);
    assert!(t.warnings[0].contains("does not fit"), "{:?}", t.warnings);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn random_first_sectors_never_panic(head in proptest::collection::vec(any::<u8>(), 0..4096), sig in any::<bool>(), gpt in any::<bool>()) {
        let mut b = vec![0u8; 4 << 20];
        b[..head.len()].copy_from_slice(&head);
        if sig {
            b[510] = 0x55;
            b[511] = 0xAA;
        }
        if gpt {
            b[512..520].copy_from_slice(b"EFI PART");
        }
        let dev: Arc<dyn BlockDev> = Arc::new(MemDev::new(b));
        let _ = open_disk(dev);
    }
}
