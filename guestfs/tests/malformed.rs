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

/// A FAT16 volume from mkfs.fat with one 5-cluster file copied in by mtools; damage to its
/// chain or boot sector is an error naming the fault, never repeated or wrong bytes.
#[test]
fn fat_damage_is_an_error_not_wrong_bytes() {
    use guestfs::fat::Fat;
    use guestfs::fs::FileSystem;
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fat.img");
    let st = Command::new("mkfs.fat")
        .args(["-C", "-F", "16", "-s", "1", "-S", "512"])
        .arg(&img)
        .arg("8192")
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let body: Vec<u8> = (0..5 * 512).map(|i| (i / 512) as u8 + 1).collect();
    std::fs::write(dir.path().join("f.bin"), &body).unwrap();
    let st = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(&img)
        .arg(dir.path().join("f.bin"))
        .arg("::/F.BIN")
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let good = std::fs::read(&img).unwrap();
    let open = |b: Vec<u8>| Fat::open(Arc::new(MemDev::new(b)) as Arc<dyn BlockDev>);
    let read = |b: Vec<u8>| -> guestfs::Result<Vec<u8>> {
        let fs = open(b)?;
        let ino = guestfs::fs::resolve(&fs, b"/F.BIN")?;
        let dev = fs.open(ino)?;
        Ok(blockdev::read_all(&*dev).unwrap())
    };
    assert_eq!(read(good.clone()).unwrap(), body);
    // The file's first cluster and the first FAT, from the boot sector and the root entry.
    let le16 = |b: &[u8], at: usize| usize::from(u16::from_le_bytes([b[at], b[at + 1]]));
    let (reserved, fats, per_fat, root_entries) =
        (le16(&good, 14), usize::from(good[16]), le16(&good, 22), le16(&good, 17));
    let fat_at = reserved * 512;
    let root_at = (reserved + fats * per_fat) * 512;
    let first = (0..root_entries)
        .map(|i| root_at + 32 * i)
        .find(|&e| &good[e..e + 8] == b"F       ")
        .map(|e| le16(&good, e + 26))
        .unwrap();
    let link = |b: &mut Vec<u8>, cluster: usize, to: u16| {
        b[fat_at + 2 * cluster..fat_at + 2 * cluster + 2].copy_from_slice(&to.to_le_bytes())
    };
    // The third cluster links back to the first: the chain loops.
    let mut b = good.clone();
    link(&mut b, first + 2, first as u16);
    assert!(read(b).unwrap_err().to_string().contains("loops"));
    // The chain ends after two clusters of five.
    let mut b = good.clone();
    link(&mut b, first + 1, 0xFFFF);
    assert!(read(b).unwrap_err().to_string().contains("2 clusters for 5"));
    // A link to a free cluster.
    let mut b = good.clone();
    link(&mut b, first, 0);
    assert!(read(b).unwrap_err().to_string().contains("links to 0x0"));
    // Boot sector: no signature, and an impossible cluster size.
    let mut b = good.clone();
    b[510] = 0;
    assert!(open(b).unwrap_err().to_string().contains("55 AA"));
    let mut b = good;
    b[13] = 3;
    assert!(open(b).unwrap_err().to_string().contains("sectors per cluster"));
}
