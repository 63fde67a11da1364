//! The ext4 reader against debugfs (e2fsprogs): every inode of an image built by
//! fixtures/make-ext4-image.sh from fixtures/make-tree.sh agrees with `debugfs stat`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use blockdev::{BlockDev, FileDev, SliceDev};
use guestfs::ext4::{Ext4, Time};

fn fixture(dir: &Path) -> (std::path::PathBuf, u64) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let tree = dir.join("tree");
    let img = dir.join("disk.img");
    let ok = Command::new(root.join("make-tree.sh")).arg(&tree).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let out = Command::new(root.join("make-ext4-image.sh")).arg(&tree).arg(&img).arg("64").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let offset = stdout.lines().last().unwrap().trim_start_matches("offset=").parse().unwrap();
    (img, offset)
}

/// debugfs's `stat` of inodes 1..=n, as (ino, field → value) maps.
fn debugfs_stats(img: &Path, offset: u64, n: u32) -> Vec<(u32, std::collections::HashMap<String, String>)> {
    let cmds: String = (1..=n).map(|i| format!("stat <{i}>\n")).collect();
    let cmdfile = img.with_extension("cmds");
    std::fs::write(&cmdfile, cmds).unwrap();
    let spec = format!("{}?offset={offset}", img.display());
    let out = Command::new("debugfs").args(["-f", cmdfile.to_str().unwrap(), &spec]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut all = Vec::new();
    for block in text.split("Inode: ").skip(1) {
        let ino: u32 = block.split_whitespace().next().unwrap().parse().unwrap();
        let mut m = std::collections::HashMap::new();
        let words: Vec<&str> = block.split_whitespace().collect();
        for w in words.windows(2) {
            let key = w[0].trim_end_matches(':');
            if ["Type", "Mode", "Flags", "User", "Group", "Size", "Links", "ctime", "atime", "mtime", "crtime"]
                .contains(&key)
                && w[0].ends_with(':')
                && !m.contains_key(key)
            {
                m.insert(key.to_owned(), w[1].to_owned());
            }
        }
        all.push((ino, m));
    }
    all
}

fn raw(t: Time) -> String {
    let base = t.secs as u32;
    let extra = (t.nanos << 2) | (((t.secs - i64::from(base as i32)) >> 32) as u32 & 3);
    format!("0x{base:08x}:{extra:08x}")
}

#[test]
fn every_inode_agrees_with_debugfs() {
    let dir = tempfile::tempdir().unwrap();
    let (img, offset) = fixture(dir.path());
    let file: Arc<dyn BlockDev> = Arc::new(FileDev::open(&img).unwrap());
    let len = file.len() - offset;
    let fs = Ext4::open(Arc::new(SliceDev::new(file, offset, len).unwrap())).unwrap();
    assert_eq!(fs.sb.block_size, 4096);
    let stats = debugfs_stats(&img, offset, 600);
    assert_eq!(stats.len(), 600);
    let mut used = 0;
    for (ino, m) in stats {
        let i = fs.inode(ino).unwrap();
        if i.links == 0 {
            continue;
        }
        used += 1;
        let ctx = format!("inode {ino}: {m:?} vs {i:?}");
        assert_eq!(m["Mode"], format!("0{:03o}", i.mode & 0o7777), "{ctx}");
        let kind = match i.mode & 0xF000 {
            0x4000 => "directory",
            0x8000 => "regular",
            0xA000 => "symlink",
            0x2000 => "character",
            0x6000 => "block",
            0x1000 => "FIFO",
            _ => "other",
        };
        assert_eq!(m["Type"], kind, "{ctx}");
        assert_eq!(m["User"], i.uid.to_string(), "{ctx}");
        assert_eq!(m["Group"], i.gid.to_string(), "{ctx}");
        assert_eq!(m["Size"], i.size.to_string(), "{ctx}");
        assert_eq!(m["Links"], i.links.to_string(), "{ctx}");
        assert_eq!(m["Flags"], format!("0x{:x}", i.flags), "{ctx}");
        assert_eq!(m["mtime"], raw(i.mtime), "{ctx}");
        assert_eq!(m["ctime"], raw(i.ctime), "{ctx}");
        assert_eq!(m["atime"], raw(i.atime), "{ctx}");
        assert_eq!(m["crtime"], raw(i.crtime.unwrap()), "{ctx}");
    }
    assert!(used > 400, "only {used} inodes in use");
    assert!(fs.inode(0).is_err() && fs.inode(fs.sb.inodes_count + 1).is_err());
}

/// Every entry of the source tree, read back through the reader: type, permissions, size,
/// mtime, file bytes, symlink targets, directory listings, hard links as one inode.
fn compare_with_tree(fs: &Ext4, tree: &Path) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let mut seen_ino: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
    let mut stack = vec![tree.to_path_buf()];
    let mut checked = 0;
    while let Some(dir) = stack.pop() {
        let rel = dir.strip_prefix(tree).unwrap();
        let d = fs.lookup(format!("/{}", rel.display()).as_bytes()).unwrap();
        let mut ours: Vec<Vec<u8>> =
            fs.read_dir(&d).unwrap().into_iter().map(|e| e.name).filter(|n| n != b"." && n != b"..").collect();
        ours.retain(|n| !(rel.as_os_str().is_empty() && n == b"lost+found"));
        ours.sort();
        let mut theirs: Vec<Vec<u8>> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().as_bytes().to_vec()).collect();
        theirs.sort();
        assert_eq!(ours, theirs, "listing of {}", dir.display());
        for name in theirs {
            let path = dir.join(std::ffi::OsStr::from_bytes(&name));
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let inner = format!("/{}", path.strip_prefix(tree).unwrap().display());
            let i = fs.lookup(inner.as_bytes()).unwrap();
            assert_eq!(u32::from(i.mode), meta.mode(), "{inner}: mode");
            assert_eq!(i.mtime.secs, meta.mtime(), "{inner}: mtime");
            if let Some(&first) = seen_ino.get(&meta.ino()) {
                assert_eq!(i.ino, first, "{inner}: a hard link must be the same inode");
            }
            seen_ino.insert(meta.ino(), i.ino);
            if meta.is_dir() {
                stack.push(path);
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                assert_eq!(fs.read_link(&i).unwrap(), target.as_os_str().as_bytes(), "{inner}: target");
            } else if meta.is_file() {
                assert_eq!(i.size, meta.len(), "{inner}: size");
                let data = blockdev::read_all(&fs.contents(&i).unwrap()).unwrap();
                assert!(data == std::fs::read(&path).unwrap(), "{inner}: contents differ");
            } else {
                // FIFOs and device nodes: the kind and the device number, through the
                // filesystem-neutral view.
                let st = guestfs::fs::FileSystem::stat(fs, u64::from(i.ino)).unwrap();
                assert_eq!(st.mode(), meta.mode(), "{inner}: kind");
                let ft = meta.file_type();
                use std::os::unix::fs::FileTypeExt;
                if ft.is_char_device() || ft.is_block_device() {
                    let (ma, mi) = st.rdev.unwrap();
                    assert_eq!(makedev(ma, mi), meta.rdev(), "{inner}: device number");
                } else {
                    assert!(st.rdev.is_none(), "{inner}");
                }
            }
            checked += 1;
        }
    }
    assert!(checked > 400, "{checked}");
}

/// glibc's `makedev`.
fn makedev(major: u32, minor: u32) -> u64 {
    let (ma, mi) = (u64::from(major), u64::from(minor));
    ((ma & 0xfffff000) << 32) | ((ma & 0xfff) << 8) | ((mi & 0xffffff00) << 12) | (mi & 0xff)
}

#[test]
fn the_tree_reads_back_identically_ext4_and_ext2_with_block_maps() {
    let dir = tempfile::tempdir().unwrap();
    let (img, offset) = fixture(dir.path());
    let file: Arc<dyn BlockDev> = Arc::new(FileDev::open(&img).unwrap());
    let len = file.len() - offset;
    let fs = Ext4::open(Arc::new(SliceDev::new(file, offset, len).unwrap())).unwrap();
    compare_with_tree(&fs, &dir.path().join("tree"));
    let missing = fs.lookup(b"/etc/nope").unwrap_err();
    assert!(matches!(missing, guestfs::Error::NotFound(_)), "{missing}");
    // ext2 with 1 KiB blocks: block maps with double-indirect blocks for the 8 MiB file.
    let e2 = dir.path().join("ext2.img");
    std::fs::File::create(&e2).unwrap().set_len(80 << 20).unwrap();
    let tree = dir.path().join("tree");
    let out = Command::new("mke2fs")
        .env("E2FSPROGS_FAKE_TIME", "1735603200")
        .args(["-q", "-t", "ext2", "-b", "1024", "-d", tree.to_str().unwrap(), e2.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fs2 = Ext4::open(Arc::new(FileDev::open(&e2).unwrap())).unwrap();
    assert_eq!(fs2.sb.block_size, 1024);
    compare_with_tree(&fs2, &tree);
}

/// ext4's inline_data feature: small files and folders kept inside the inode (60 bytes of
/// `i_block` plus the `system.data` attribute), read back as `mke2fs -d` wrote them from a
/// source tree, with debugfs confirming they really are inline.
#[test]
fn inline_data_files_and_folders() {
    use guestfs::fs::FileSystem;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let sizes = [0usize, 1, 59, 60, 61, 100, 150];
    std::fs::create_dir_all(src.join("small")).unwrap();
    for n in sizes {
        let body: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
        std::fs::write(src.join(format!("f{n}")), body).unwrap();
    }
    std::fs::write(src.join("small/x"), b"x").unwrap();
    std::fs::create_dir_all(src.join("medium")).unwrap();
    for i in 0..3 {
        std::fs::write(src.join(format!("medium/e{i}")), b"").unwrap();
    }
    let img = dir.path().join("inline.img");
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-O", "inline_data", "-I", "256", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("8M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let debugfs = |cmd: &str| {
        let out = Command::new("debugfs").args(["-R", cmd]).arg(&img).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for p in ["/f61", "/f100", "/medium"] {
        assert!(debugfs(&format!("stat {p}")).contains("Flags: 0x10000000"), "{p} is not inline");
    }
    // mke2fs turns a folder that outgrows i_block into blocks; the kernel would continue it
    // in system.data. Do that with debugfs: one more entry ("extra", the inode of /f1) in the
    // attribute, and the folder's size grown to 60 + 36 bytes.
    let f1: u32 = debugfs("stat /f1").split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut tail = f1.to_le_bytes().to_vec();
    tail.extend_from_slice(&36u16.to_le_bytes());
    tail.extend_from_slice(&[5, 1]);
    tail.extend_from_slice(b"extra");
    tail.resize(36, 0);
    std::fs::write(dir.path().join("tail"), &tail).unwrap();
    let w = |cmd: String| Command::new("debugfs").args(["-w", "-R", &cmd]).arg(&img).output().unwrap();
    w(format!("ea_set -f {} /medium system.data", dir.path().join("tail").display()));
    w("sif /medium size 96".into());
    let listed = debugfs("ls /medium");
    assert!(listed.contains("extra") && listed.contains("e2"), "debugfs: {listed}");
    let dev: Arc<dyn BlockDev> = Arc::new(FileDev::open(&img).unwrap());
    let fs = Ext4::open(dev).unwrap();
    for n in sizes {
        let ino = guestfs::fs::resolve(&fs, format!("/f{n}").as_bytes()).unwrap();
        let d = fs.open(ino).unwrap();
        let got = blockdev::read_all(&*d).unwrap();
        assert_eq!(got, std::fs::read(src.join(format!("f{n}"))).unwrap(), "f{n}");
    }
    for (folder, count) in [("/small", 1), ("/medium", 4)] {
        let ino = guestfs::fs::resolve(&fs, folder.as_bytes()).unwrap();
        let mut names: Vec<String> =
            FileSystem::read_dir(&fs, ino).unwrap().into_iter().map(|e| String::from_utf8(e.name).unwrap()).collect();
        names.sort();
        let mut want: Vec<String> = std::fs::read_dir(src.join(&folder[1..]))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        if folder == "/medium" {
            want.push("extra".into());
        }
        want.sort();
        assert_eq!((names.len(), &names), (count, &want), "{folder}");
        let parent = Ext4::read_dir(&fs, &fs.inode(ino as u32).unwrap()).unwrap();
        assert!(parent.iter().any(|e| e.name == b".." && e.ino == 2), "{folder}: .. is the root");
    }
}
