//! The NTFS reader against ntfs-3g: an image built by fixtures/make-ntfs-image.sh is mounted
//! read-only with ntfs-3g (which numbers inodes by MFT record, as we do), and every node
//! agrees: names, kinds, record numbers, link counts, sizes, bytes, modification times and
//! link targets; the alternate data stream reads as ntfs-3g's `streams_interface=windows`
//! shows it. Needs root, /dev/fuse and ntfs-3g.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blockdev::{Allocation, BlockDev, FileDev, SliceDev};
use guestfs::fs::{FileSystem, Kind};
use guestfs::ntfs::Ntfs;

struct Ntfs3g(PathBuf);

impl Drop for Ntfs3g {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-u").arg(&self.0).status();
    }
}

/// The fixture image, the NTFS partition cut out of it, and the source tree.
fn fixture(dir: &Path) -> (PathBuf, u64, PathBuf) {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let tree = dir.join("tree");
    let out = Command::new(fx.join("make-tree.sh")).arg(&tree).output().expect("make-tree");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let img = dir.join("ntfs.img");
    let out = Command::new(fx.join("make-ntfs-image.sh")).arg(&tree).arg(&img).output().expect("make-ntfs-image");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let offset = stdout.lines().last().expect("offset").trim_start_matches("offset=").parse().expect("number");
    (img, offset, tree)
}

fn open(img: &Path, offset: u64) -> Ntfs {
    let file: Arc<dyn BlockDev> = Arc::new(FileDev::open(img).expect("open"));
    let len = file.len() - offset;
    Ntfs::open(Arc::new(SliceDev::new(file, offset, len).expect("slice"))).expect("NTFS opens")
}

fn mount_ntfs3g(img: &Path, offset: u64, dir: &Path) -> Ntfs3g {
    // ntfs-3g reads a whole volume: cut the partition out (sparse).
    let part = dir.join("part.img");
    let st = Command::new("dd")
        .arg(format!("if={}", img.display()))
        .arg(format!("of={}", part.display()))
        .args(["bs=1M", &format!("skip={}", offset >> 20), "conv=sparse", "status=none"])
        .status()
        .expect("dd");
    assert!(st.success());
    let at = dir.join("ntfs-3g");
    std::fs::create_dir_all(&at).expect("mkdir");
    let st = Command::new("ntfs-3g")
        .args(["-o", "ro,streams_interface=windows"])
        .arg(&part)
        .arg(&at)
        .status()
        .expect("ntfs-3g");
    assert!(st.success(), "ntfs-3g mount failed");
    Ntfs3g(at)
}

fn read_all(fs: &Ntfs, ino: u64) -> Vec<u8> {
    let dev = fs.open(ino).expect("open");
    let mut b = vec![0u8; dev.len() as usize];
    dev.read_at(0, &mut b).expect("read");
    b
}

/// Walk ntfs-3g's view and ours side by side.
fn compare(fs: &Ntfs, ino: u64, theirs: &Path, rel: &str, seen: &mut usize) {
    let mut ours: Vec<_> = fs
        .read_dir(ino)
        .expect("read_dir")
        .into_iter()
        .map(|e| (String::from_utf8(e.name.clone()).expect("utf-8"), e))
        .collect();
    ours.sort_by(|a, b| a.0.cmp(&b.0));
    let mut names: Vec<String> = std::fs::read_dir(theirs)
        .expect("their dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    assert_eq!(ours.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(), names, "names in /{rel}");
    for (name, e) in ours {
        *seen += 1;
        let path = theirs.join(&name);
        let show = format!("/{rel}{name}");
        let md = std::fs::symlink_metadata(&path).expect("their stat");
        let st = fs.stat(e.ino).expect("stat");
        assert_eq!(st.kind, e.kind, "{show}: kind in the listing and in stat");
        assert_eq!(e.ino, md.ino(), "{show}: record number");
        assert_eq!(st.nlink as u64, md.nlink().max(1), "{show}: links");
        assert_eq!((st.mtime.secs, st.mtime.nanos as i64), (md.mtime(), md.mtime_nsec()), "{show}: mtime");
        let ft = md.file_type();
        match st.kind {
            Kind::Dir => {
                assert!(ft.is_dir(), "{show}: a folder for ntfs-3g");
                compare(fs, e.ino, &path, &format!("{rel}{name}/"), seen);
            }
            Kind::Symlink => {
                assert!(ft.is_symlink(), "{show}: a symlink for ntfs-3g");
                let target = fs.read_link(e.ino).expect("read_link");
                assert_eq!(st.size, target.len() as u64, "{show}: size of a link");
                if name == "junction" {
                    // ntfs-3g points absolute targets into its own mount; we keep the Windows path.
                    assert_eq!(target, b"C:/Windows");
                } else {
                    assert_eq!(
                        Path::new(std::str::from_utf8(&target).expect("utf-8")),
                        std::fs::read_link(&path).expect("readlink"),
                        "{show}"
                    );
                }
            }
            Kind::File => {
                assert!(ft.is_file(), "{show}: a file for ntfs-3g");
                assert_eq!(st.size, md.len(), "{show}: size");
                assert!(read_all(fs, e.ino) == std::fs::read(&path).expect("their read"), "{show}: contents differ");
            }
            other => panic!("{show}: unexpected {other:?}"),
        }
    }
}

#[test]
fn every_node_agrees_with_ntfs_3g() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (img, offset, tree) = fixture(dir.path());
    let fs = open(&img, offset);
    let theirs = mount_ntfs3g(&img, offset, dir.path());
    let mut seen = 0;
    compare(&fs, fs.root(), &theirs.0, "", &mut seen);
    assert!(seen > 40, "only {seen} nodes compared");

    // What the fixture put there, checked against the source tree as well.
    let at = |p: &str| guestfs::fs::resolve(&fs, p.as_bytes()).unwrap_or_else(|e| panic!("{p}: {e}"));
    let doc = "home/user/documents/café-ünïcødé-日本語.txt";
    assert_eq!(read_all(&fs, at(doc)), std::fs::read(tree.join(doc)).expect("source"));
    let notes = at("/compressed/notes.txt");
    let syslog = std::fs::read(tree.join("var/log/syslog")).expect("syslog");
    assert_eq!(read_all(&fs, notes), syslog.repeat(4), "the LZNT1-compressed file");
    assert_eq!(at("/hardlink.txt"), at("/etc/hostname"), "hard links share a node");
    assert_eq!(fs.stat(at("/hardlink.txt")).expect("stat").nlink, 2);
    assert_eq!(fs.read_link(at("/link-to-etc")).expect("interix link"), b"etc");
    // Case-insensitive names, as Windows.
    assert_eq!(at("/ETC/HOSTNAME"), at("/etc/hostname"));

    // Sparse: holes where nothing was written, data at 8 MiB and 40 MiB.
    let sparse = fs.open(at("/sparse.bin")).expect("open");
    let kind = |off: u64| sparse.allocation(off, 1 << 20).expect("allocation").kind;
    assert_eq!(
        (kind(0), kind(8 << 20), kind(20 << 20), kind(40 << 20), kind(50 << 20)),
        (Allocation::Zero, Allocation::Data, Allocation::Zero, Allocation::Data, Allocation::Zero)
    );

    // The alternate data stream: not listed, opened by name like ntfs-3g's windows interface.
    let root = fs.root();
    assert!(!fs.read_dir(root).expect("root").iter().any(|e| e.name.contains(&b':')));
    for name in ["ads.txt:secret", "ads.txt:SECRET:$DATA"] {
        let ino = fs.lookup(root, name.as_bytes()).expect("lookup").unwrap_or_else(|| panic!("{name}"));
        assert_eq!(read_all(&fs, ino), std::fs::read(theirs.0.join("ads.txt:secret")).expect("their stream"));
        assert_eq!(fs.stat(ino).expect("stat").size, 21);
    }
    assert_eq!(fs.lookup(root, b"ads.txt:nothing").expect("lookup"), None);
    assert_eq!(fs.lookup(root, b"ads.txt:").expect("lookup"), Some(at("/ads.txt")));
}

/// A fresh 2 MiB volume from mkntfs (512-byte clusters), as bytes.
fn small_volume(dir: &Path) -> Vec<u8> {
    let img = dir.join("small.img");
    std::fs::File::create(&img).expect("create").set_len(2 << 20).expect("size");
    let out =
        Command::new("mkntfs").args(["-q", "-F", "-Q", "-s", "512", "-c", "512"]).arg(&img).output().expect("mkntfs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(&img).expect("read")
}

fn open_bytes(b: Vec<u8>) -> guestfs::Result<Ntfs> {
    Ntfs::open(Arc::new(blockdev::MemDev::new(b)))
}

/// Damage gives a clear error naming what is wrong — never a panic or wrong names.
#[test]
fn damaged_volumes_give_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = small_volume(dir.path());
    let fs = open_bytes(good.clone()).expect("a fresh volume opens");
    assert!(fs.read_dir(fs.root()).expect("root").is_empty(), "metadata files are not listed");

    let mft = u64::from_le_bytes(good[0x30..0x38].try_into().expect("8")) as usize * 512;
    let record = |n: usize| mft + n * 1024;
    let err = |b: Vec<u8>| open_bytes(b).map(|_| ()).expect_err("damage is noticed").to_string();

    let mut b = good.clone();
    b[3..11].copy_from_slice(b"EXFAT   ");
    assert!(err(b).contains("no NTFS signature"));
    let mut b = good.clone();
    b[0x0D] = 3; // sectors per cluster must be a power of two
    assert!(err(b).contains("1536-byte clusters"));
    let mut b = good.clone();
    b[0x0D] = 0xE0; // 2^32 sectors per cluster
    assert!(err(b).contains("sectors per cluster code"));
    let mut b = good.clone();
    b[0x40] = 0; // file record size code
    assert!(err(b).contains("file record size"));
    // A torn write in the root folder's record: the sector's last two bytes no longer
    // carry the update sequence number.
    let mut b = good.clone();
    b[record(5) + 510] ^= 0xFF;
    assert!(err(b).contains("torn"));
    // An attribute whose length runs past the record.
    let mut b = good.clone();
    let first = record(5) + usize::from(u16::from_le_bytes([b[record(5) + 0x14], b[record(5) + 0x15]]));
    b[first + 4..first + 8].copy_from_slice(&0x0FF0u32.to_le_bytes());
    assert!(err(b).contains("attribute"));
    // $MFT's data runs pointing past the end of the volume: reading a record fails with an
    // I/O error, not garbage.
    let mut b = good.clone();
    b[0x30..0x38].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(!err(b).is_empty());
}
