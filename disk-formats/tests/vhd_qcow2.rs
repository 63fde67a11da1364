//! VHD and qcow2 files written here, checked by qemu-img; VHD files made by qemu-img and by
//! hand (differencing chains) read back here.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blockdev::{read_all, BlockDev, FileDev};
use common::{noise, run, sample_disk, write_raw, Pieces};
use disk_formats::out::{SparseFile, Stream};
use disk_formats::vhd::{self, DiskType, DynHeader, Footer, Vhd};
use disk_formats::{qcow2, Error};

fn write_with(path: &Path, f: impl FnOnce(&mut SparseFile) -> disk_formats::Result<u64>) -> u64 {
    let mut out = SparseFile::new(File::create(path).unwrap());
    let n = f(&mut out).unwrap();
    out.finish().unwrap();
    assert_eq!(std::fs::metadata(path).unwrap().len(), n, "the writer's byte count");
    n
}

fn compare(fmt: &str, image: &Path, raw: &Path) {
    run(Command::new("qemu-img").args(["compare", "-q", "-f", fmt, "-F", "raw"]).arg(image).arg(raw));
}

#[test]
fn dynamic_vhd_is_read_by_qemu_as_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, img) = (dir.path().join("src.raw"), dir.path().join("d.vhd"));
    let disk = sample_disk();
    write_raw(&disk, &raw);
    let n = write_with(&img, |o| vhd::write_dynamic(&disk, o));
    assert_eq!(n, vhd::write::dynamic_size(&disk).unwrap());
    compare("vpc", &img, &raw);
    let info = run(Command::new("qemu-img").args(["info", "--output=json", "-f", "vpc"]).arg(&img));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], disk.len);
    // Blocks 0, 1, 2 (the piece straddling 4 MiB), 15, 16 and 18: six of 19 allocated.
    assert_eq!(n, 1536 + 512 + 6 * (512 + (2 << 20)) + 512);
    // qemu's own conversion back to raw is byte-identical.
    let back = dir.path().join("back.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "vpc", "-O", "raw"]).arg(&img).arg(&back));
    assert_eq!(std::fs::read(&back).unwrap(), disk.to_vec());
    // And our reader agrees, holes included.
    let v = Vhd::open(Arc::new(FileDev::open(&img).unwrap())).unwrap();
    assert_eq!(read_all(&v).unwrap(), disk.to_vec());
    let holes = disk_formats::out::data_granules(&v, 2 << 20).unwrap();
    assert_eq!(holes, vec![0..3, 15..17, 18..19]);
}

#[test]
fn fixed_vhd_is_the_raw_disk_and_a_footer() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, img) = (dir.path().join("src.raw"), dir.path().join("f.vhd"));
    let disk = sample_disk();
    write_raw(&disk, &raw);
    write_with(&img, |o| vhd::write_fixed(&disk, o));
    compare("vpc", &img, &raw);
    let bytes = std::fs::read(&img).unwrap();
    let f = Footer::from_bytes(&bytes[bytes.len() - 512..], 0).unwrap();
    assert_eq!((f.disk_type, f.current_size, f.data_offset), (DiskType::Fixed, disk.len, u64::MAX));
    // Holes stay holes: the file uses far less than its length.
    let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&img).unwrap()) * 512;
    assert!(used < 8 << 20, "{used} bytes allocated for a fixed VHD of 1.3 MiB data");
    let v = Vhd::open(Arc::new(FileDev::open(&img).unwrap())).unwrap();
    assert_eq!(read_all(&v).unwrap(), disk.to_vec());
}

#[test]
fn fixed_view_equals_the_fixed_writer() {
    let disk = sample_disk();
    let mut streamed = Vec::new();
    vhd::write_fixed(&disk, &mut Stream(&mut streamed)).unwrap();
    let id = Footer::from_bytes(&streamed[streamed.len() - 512..], 0).unwrap();
    let view = vhd::FixedView::new(&disk, id.unique_id, id.timestamp).unwrap();
    assert_eq!(read_all(&view).unwrap(), streamed);
    // Reads across the data/footer boundary.
    let mut b = vec![0u8; 1000];
    view.read_at(disk.len - 488, &mut b).unwrap();
    assert_eq!(b, streamed[(disk.len - 488) as usize..(disk.len + 512) as usize]);
}

#[test]
fn qcow2_passes_qemu_img_check_and_compares_equal() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, img) = (dir.path().join("src.raw"), dir.path().join("d.qcow2"));
    let disk = sample_disk();
    write_raw(&disk, &raw);
    let n = write_with(&img, |o| qcow2::write(&disk, o));
    assert_eq!(n, qcow2::image_size(&disk).unwrap());
    let check = run(Command::new("qemu-img").args(["check", "--output=json", "-f", "qcow2"]).arg(&img));
    let check: serde_json::Value = serde_json::from_str(&check).unwrap();
    assert_eq!(check["check-errors"], 0, "{check}");
    assert!(check.get("leaks").is_none() && check.get("corruptions").is_none(), "{check}");
    compare("qcow2", &img, &raw);
    let map = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "qcow2"]).arg(&img));
    let data: u64 = serde_json::from_str::<Vec<serde_json::Value>>(&map)
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    // 100 000 B → 2 clusters; 1 MiB across 4 MiB → 17; one sector → 1; 70 000 B → 2; then
    // the last, partial cluster (qemu counts only the bytes inside the disk).
    assert_eq!(data, (2 + 17 + 1 + 2) * 65536 + (disk.len % 65536));
}

/// A device of `len` bytes with one 4 KiB piece of data in the middle.
fn mostly_empty(len: u64) -> Pieces {
    Pieces { len, pieces: vec![(len / 2, noise(9, 4096))] }
}

#[test]
fn a_terabyte_of_zeros_costs_only_its_tables() {
    let dir = tempfile::tempdir().unwrap();
    let disk = mostly_empty(1 << 40);
    let img = dir.path().join("big.qcow2");
    let n = write_with(&img, |o| qcow2::write(&disk, o));
    assert!(n < 1 << 20, "{n}-byte qcow2 for 4 KiB of data");
    run(Command::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(&img));
    let dump =
        run(Command::new("qemu-io").args(["-f", "qcow2", "-c"]).arg(format!("read -v {} 16", disk.len / 2)).arg(&img));
    let first: String = disk.pieces[0].1[..4].iter().map(|b| format!("{b:02x} ")).collect();
    assert!(dump.contains(first.trim_end()), "{dump}");
    let img = dir.path().join("big.vhd");
    let n = write_with(&img, |o| vhd::write_dynamic(&disk, o));
    assert_eq!(n, 1536 + (2 << 20) + 512 + (2 << 20) + 512, "BAT of 512 Ki entries and one block");
    let v = Vhd::open(Arc::new(FileDev::open(&img).unwrap())).unwrap();
    let mut piece = vec![0u8; 4096];
    v.read_at(disk.len / 2, &mut piece).unwrap();
    assert_eq!(piece, disk.pieces[0].1);
}

#[test]
fn vhd_refuses_disks_over_2040_gib() {
    let disk = mostly_empty(3 << 40);
    let e = vhd::write_dynamic(&disk, &mut Stream(std::io::sink())).unwrap_err();
    assert!(matches!(e, Error::Usage(_)) && e.to_string().contains("2040 GiB"), "{e}");
    let e = vhd::write_fixed(&disk, &mut Stream(std::io::sink())).unwrap_err();
    assert!(e.to_string().contains("2040 GiB"), "{e}");
}

#[test]
fn reads_dynamic_vhds_made_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, img) = (dir.path().join("src.raw"), dir.path().join("q.vhd"));
    let disk = sample_disk();
    write_raw(&disk, &raw);
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on"])
        .arg(&raw)
        .arg(&img));
    let v = Vhd::open(Arc::new(FileDev::open(&img).unwrap())).unwrap();
    assert_eq!(v.len(), disk.len);
    assert_eq!(read_all(&v).unwrap(), disk.to_vec());
}

/// Write a differencing VHD over `parent` by hand from the specification: 2 MiB blocks, one
/// W2ru locator (UTF-16LE relative path), `sectors` (block, first sector, count, seed) stored
/// with their bitmap bits set.
fn make_child(path: &Path, parent: &Path, locator: &str, sectors: &[(u32, u32, u32, u64)]) -> [u8; 16] {
    let pbytes = std::fs::read(parent).unwrap();
    let pf = Footer::from_bytes(&pbytes[pbytes.len() - 512..], 0).unwrap();
    let size = pf.current_size;
    let id = vhd::footer::random_uuid();
    let mut footer = Footer::new(DiskType::Differencing, size, id);
    footer.creator_app = *b"tap\0";
    let mut h = DynHeader::new(size, 1536).unwrap();
    h.parent_id = pf.unique_id;
    h.parent_timestamp = pf.timestamp;
    h.parent_name = Path::new(parent).file_name().unwrap().to_string_lossy().into_owned();
    let entries = h.max_table_entries as usize;
    let bat_bytes = (entries * 4).next_multiple_of(512);
    let loc_at = 1536 + bat_bytes;
    let loc: Vec<u8> = locator.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let mut hb = h.to_bytes();
    // Locator entry 0: W2ru, data space 1 sector, length, offset.
    hb[576..580].copy_from_slice(b"W2ru");
    hb[580..584].copy_from_slice(&1u32.to_be_bytes());
    hb[584..588].copy_from_slice(&(loc.len() as u32).to_be_bytes());
    hb[592..600].copy_from_slice(&(loc_at as u64).to_be_bytes());
    hb[36..40].fill(0);
    let sum = vhd::footer::checksum(&hb, 36);
    hb[36..40].copy_from_slice(&sum.to_be_bytes());
    let mut file = footer.to_bytes().to_vec();
    file.extend_from_slice(&hb);
    let mut bat = vec![0xffu8; bat_bytes];
    let mut blocks: Vec<u32> = sectors.iter().map(|s| s.0).collect();
    blocks.dedup();
    let first_block = loc_at + 512;
    for (k, b) in blocks.iter().enumerate() {
        let sector = (first_block + k * (512 + (2 << 20))) / 512;
        bat[*b as usize * 4..*b as usize * 4 + 4].copy_from_slice(&(sector as u32).to_be_bytes());
    }
    file.extend_from_slice(&bat);
    let mut l = loc.clone();
    l.resize(512, 0);
    file.extend_from_slice(&l);
    for b in &blocks {
        let mut bitmap = vec![0u8; 512];
        let mut data = vec![0u8; 2 << 20];
        for &(_, first, count, seed) in sectors.iter().filter(|s| s.0 == *b) {
            for s in first..first + count {
                bitmap[(s / 8) as usize] |= 0x80 >> (s % 8);
            }
            data[first as usize * 512..(first + count) as usize * 512]
                .copy_from_slice(&noise(seed, count as usize * 512));
        }
        file.extend_from_slice(&bitmap);
        file.extend_from_slice(&data);
    }
    file.extend_from_slice(&footer.to_bytes());
    std::fs::write(path, file).unwrap();
    id
}

/// The parent's bytes with the child's sectors laid over them.
fn overlay(mut base: Vec<u8>, sectors: &[(u32, u32, u32, u64)]) -> Vec<u8> {
    for &(b, first, count, seed) in sectors {
        let at = b as usize * (2 << 20) + first as usize * 512;
        base[at..at + count as usize * 512].copy_from_slice(&noise(seed, count as usize * 512));
    }
    base
}

#[test]
fn differencing_chains_resolve_by_locator_and_read_through() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sample_disk();
    let base = dir.path().join("base.vhd");
    write_with(&base, |o| vhd::write_dynamic(&disk, o));
    std::fs::create_dir(dir.path().join("kids")).unwrap();
    let mid = dir.path().join("kids/mid.vhd");
    let top = dir.path().join("kids/top.vhd");
    // mid: a few sectors inside block 0 and a run in the absent block 5; top: sectors over
    // mid's and over the base's block 1.
    let mid_s = [(0, 3, 5, 11), (0, 4000, 96, 12), (5, 0, 4096, 13)];
    let top_s = [(0, 4, 2, 21), (1, 100, 1, 22)];
    make_child(&mid, &base, "../base.vhd", &mid_s);
    make_child(&top, &mid, "./mid.vhd", &top_s);
    let v = vhd::open_chain(&top, &[]).unwrap();
    assert_eq!(v.depth(), 3);
    let want = overlay(overlay(disk.to_vec(), &mid_s), &top_s);
    assert_eq!(read_all(&v).unwrap(), want);
    // Odd-sized reads across sector runs agree with the whole.
    for (off, len) in [(1500u64, 3000usize), ((2 << 20) + 51_000, 1), ((10 << 20) - 7, 4_194_321)] {
        let mut b = vec![0u8; len];
        v.read_at(off, &mut b).unwrap();
        assert_eq!(b, want[off as usize..off as usize + len], "read of {len} at {off}");
    }
    // Moved parents are found when given explicitly, and only by unique id.
    let elsewhere = tempfile::tempdir().unwrap();
    let moved: PathBuf = elsewhere.path().join("renamed.vhd");
    std::fs::rename(&base, &moved).unwrap();
    let e = vhd::open_chain(&top, &[]).unwrap_err().to_string();
    assert!(e.contains("mid.vhd") && e.contains("--parent"), "{e}");
    let v = vhd::open_chain(&top, &[top.clone(), moved]).unwrap();
    assert_eq!(read_all(&v).unwrap(), want);
}

#[test]
fn a_chain_that_loops_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sample_disk();
    let (a, b) = (dir.path().join("a.vhd"), dir.path().join("b.vhd"));
    write_with(&a, |o| vhd::write_dynamic(&disk, o));
    make_child(&b, &a, "a.vhd", &[(0, 0, 1, 1)]);
    // Now make a a child of b: b names a's id, so a must carry that id and name b's.
    let b_id = {
        let bytes = std::fs::read(&b).unwrap();
        Footer::from_bytes(&bytes[bytes.len() - 512..], 0).unwrap().unique_id
    };
    let a_id = {
        let bytes = std::fs::read(&a).unwrap();
        Footer::from_bytes(&bytes[bytes.len() - 512..], 0).unwrap().unique_id
    };
    let tmp = dir.path().join("a2.vhd");
    make_child(&tmp, &b, "b.vhd", &[(0, 1, 1, 2)]);
    // Rewrite a2's footers with a's unique id, then put it in a's place.
    let mut bytes = std::fs::read(&tmp).unwrap();
    let len = bytes.len();
    let mut f = Footer::from_bytes(&bytes[len - 512..], 0).unwrap();
    f.unique_id = a_id;
    bytes[len - 512..].copy_from_slice(&f.to_bytes());
    bytes[..512].copy_from_slice(&f.to_bytes());
    std::fs::write(&a, bytes).unwrap();
    let _ = b_id;
    let e = vhd::open_chain(&b, &[]).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }) && e.to_string().contains("loops"), "{e}");
}

#[test]
fn damaged_vhds_are_clear_errors() {
    let disk = sample_disk();
    let mut good = Vec::new();
    vhd::write_dynamic(&disk, &mut Stream(&mut good)).unwrap();
    let open = |b: Vec<u8>| Vhd::open(Arc::new(blockdev::MemDev::new(b))).map(|_| ()).unwrap_err().to_string();
    // Footer checksum (both copies damaged).
    let mut b = good.clone();
    let n = b.len();
    b[n - 512 + 70] ^= 1;
    b[70] ^= 1;
    assert!(open(b).contains("checksum"));
    // Header checksum.
    let mut b = good.clone();
    b[600] ^= 1;
    assert!(open(b).contains("VHD dynamic header"));
    // A BAT entry pointing past the end.
    let mut b = good.clone();
    b[1536..1540].copy_from_slice(&0x00ff_0000u32.to_be_bytes());
    let e = open(b);
    assert!(e.contains("block 0") && e.contains("past the file's end"), "{e}");
    // Truncated.
    let e = open(good[..3000].to_vec());
    assert!(e.contains("VHD"), "{e}");
    // A differencing disk opened alone.
    let e = open(good[..100].to_vec());
    assert!(e.contains("shorter than a footer"), "{e}");
}

#[test]
fn stream_optimized_vmdk_passes_qemu_img_check_and_compares_equal() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, img) = (dir.path().join("src.raw"), dir.path().join("d.vmdk"));
    let disk = sample_disk();
    write_raw(&disk, &raw);
    write_with(&img, |o| disk_formats::vmdk::write_stream_optimized(&disk, o, "d.vmdk"));
    run(Command::new("qemu-img").args(["check", "-q", "-f", "vmdk"]).arg(&img));
    compare("vmdk", &img, &raw);
    let info = run(Command::new("qemu-img").args(["info", "--output=json", "-f", "vmdk"]).arg(&img));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format-specific"]["data"]["create-type"], "streamOptimized", "{info}");
    assert_eq!(info["virtual-size"], disk.len);
    // A mostly empty terabyte: only its tables and one grain.
    let big = mostly_empty(1 << 40);
    let img = dir.path().join("big.vmdk");
    let n = write_with(&img, |o| disk_formats::vmdk::write_stream_optimized(&big, o, "big.vmdk"));
    assert!(n < 512 << 10, "{n}");
    run(Command::new("qemu-img").args(["check", "-q", "-f", "vmdk"]).arg(&img));
}
