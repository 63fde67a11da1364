//! `vmvault ls` and `vmvault cat SNAPSHOT:/PATH` read files inside a backed-up ext4 disk,
//! compared with the tree the image was built from.

use std::path::Path;
use std::process::Command;

use crate::util::Env;

/// The source tree (fixtures/make-tree.sh) at `tree`, and fixtures/SCRIPT run on it with
/// `out` and `extra` arguments; its output must succeed.
fn fixture(env: &Env, script: &str, out: &Path, extra: &[&str]) -> std::path::PathBuf {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let tree = env.path("tree");
    assert!(Command::new(fx.join("make-tree.sh")).arg(&tree).output().expect("make-tree").status.success());
    let run = Command::new(fx.join(script)).arg(&tree).arg(out).args(extra).output().expect(script);
    assert!(run.status.success(), "{}", crate::util::text(&run));
    tree
}

pub(crate) fn built(env: &Env) -> std::path::PathBuf {
    let img = env.path("disk.img");
    let tree = fixture(env, "make-ext4-image.sh", &img, &["64"]);
    env.init(&[]);
    env.ok(&["backup", "--vm", "web01", &format!("xvda={}", img.display())]);
    tree
}

#[test]
fn ls_and_cat_read_files_inside_the_backup() {
    let env = Env::new();
    let tree = built(&env);
    assert_eq!(env.ok(&["ls", "web01@latest:/"]).trim(), "xvda/");
    let vols = env.ok(&["ls", "web01@latest:/xvda"]);
    assert!(vols.starts_with("p1/") && vols.contains("ext4"), "{vols}");
    // A directory listing names what the source directory holds.
    let listing = env.ok(&["ls", "web01@latest:/xvda/p1/etc"]);
    let name_of = |l: &str| l.split(" -> ").next().unwrap_or("").rsplit(' ').next().unwrap_or("").to_owned();
    let mut ours: Vec<String> = listing.lines().map(name_of).collect();
    ours.sort();
    let mut theirs: Vec<String> = std::fs::read_dir(tree.join("etc"))
        .expect("etc")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    theirs.sort();
    assert_eq!(ours, theirs);
    assert!(listing.contains("localtime -> ../usr/share/zoneinfo/UTC"), "{listing}");
    // Every regular file directly in etc/ comes back byte for byte.
    for name in &theirs {
        let p = tree.join("etc").join(name);
        if !std::fs::symlink_metadata(&p).expect("stat").is_file() {
            continue;
        }
        let out = env.cmd().args(["cat", &format!("web01@latest:/xvda/p1/etc/{name}")]).output().expect("cat");
        assert!(out.status.success(), "{}", crate::util::text(&out));
        assert!(out.stdout == std::fs::read(&p).expect("read"), "etc/{name} differs");
    }
    let big = tree.join("var/lib/db/data.db");
    let out = env.cmd().args(["cat", "web01@latest:/xvda/p1/var/lib/db/data.db"]).output().expect("cat");
    assert!(out.stdout == std::fs::read(big).expect("read"), "the 8 MiB database differs");
    let e = env.fails(&["ls", "web01@latest:/xvda/p1/etc/nope"]);
    assert!(e.contains("not found"), "{e}");
    let e = env.fails(&["cat", "web01@latest:/xvda/p1/etc"]);
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn restore_files_gives_back_the_source_tree_with_its_metadata() {
    let env = Env::new();
    let tree = built(&env);
    let out = env.path("out");
    // The whole filesystem: every name, byte, mode, owner, time, symlink, hard link, FIFO and
    // device node as in the tree the image was made from (lost+found is mke2fs's own).
    env.ok(&["restore-files", "web01@latest:/xvda/p1", "--target", out.to_str().expect("utf-8")]);
    let checks = crate::util::Checks { mode: true, owner: true, mtime: true, extra_ok: &["lost+found"] };
    let diffs = crate::util::compare_trees(&tree, &out.join("p1"), checks);
    assert!(diffs.is_empty(), "{diffs:#?}");
    // One folder, kept under its own name; a second restore refuses to overwrite it.
    env.ok(&["restore-files", "web01@latest:/xvda/p1/home/user", "-t", out.to_str().expect("utf-8")]);
    let diffs = crate::util::compare_trees(&tree.join("home/user"), &out.join("user"), checks);
    assert!(diffs.is_empty(), "{diffs:#?}");
    let e = env.fails(&["restore-files", "web01@latest:/xvda/p1/home/user", "-t", out.to_str().expect("utf-8")]);
    assert!(e.contains("already exists"), "{e}");
    // A single file of zeros (a hole in the ext4, as mke2fs -d skips zero blocks) is
    // restored as a hole.
    env.ok(&["restore-files", "web01@latest:/xvda/p1/var/cache/blobs/zeros.bin", "-t", out.to_str().expect("utf-8")]);
    let md = std::fs::metadata(out.join("zeros.bin")).expect("stat");
    assert_eq!(md.len(), 1 << 20);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(md.blocks(), 0, "zeros.bin was written out instead of left as a hole");
}

/// GPT (ext4, FAT32, swap) and MBR (ext4, logical FAT16) disks of one VM, read through
/// `restore-files` and the FUSE mount, against mtools (FAT) and the source tree (ext4).
#[test]
fn fat_and_mbr_volumes_agree_with_mtools_and_the_tree() {
    let env = Env::new();
    let tree = fixture(&env, "make-multi-image.sh", &env.path("img"), &[]);
    let offsets = std::fs::read_to_string(env.path("img/offsets")).expect("offsets");
    let offset = |img: &str, part: &str| -> String {
        let l = offsets.lines().find(|l| l.starts_with(&format!("{img} {part} "))).expect("offset line");
        l.rsplit(' ').next().expect("offset").to_owned()
    };
    env.init(&[]);
    let (gpt, mbr) = (env.path("img/gpt.img"), env.path("img/mbr.img"));
    env.ok(&["backup", "--vm", "multi", &format!("xvda={}", gpt.display()), &format!("xvdb={}", mbr.display())]);
    let vols = env.ok(&["ls", "multi@latest:/xvda"]);
    assert!(vols.contains("ext4") && vols.contains("fat32") && vols.contains("swap"), "{vols}");
    assert!(
        env.ok(&["ls", "multi@latest:/xvdb"]).contains("p5/")
            && env.ok(&["ls", "multi@latest:/xvdb"]).contains("fat16")
    );

    // The oracle: mtools copies everything out of each FAT, keeping modification times.
    let mcopy_all = |img: &Path, off: &str, dest: &Path| {
        std::fs::create_dir_all(dest).expect("mkdir");
        let out = Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .env("TZ", "UTC")
            .args(["-s", "-n", "-m", "-i", &format!("{}@@{off}", img.display()), "::/"])
            .arg(dest)
            .output()
            .expect("mcopy");
        assert!(out.status.success(), "{}", crate::util::text(&out));
    };
    let fat32 = env.path("oracle/fat32");
    mcopy_all(&gpt, &offset("gpt.img", "p2"), &fat32);
    let fat16 = env.path("oracle/fat16");
    mcopy_all(&mbr, &offset("mbr.img", "p5"), &fat16);
    // Contents and times; FAT keeps no owners or modes (files show 0644, folders 0755).
    let checks = crate::util::Checks { mode: false, owner: false, mtime: true, extra_ok: &[] };
    let restored = env.path("restored");
    let t = restored.to_str().expect("utf-8");
    env.ok(&["restore-files", "multi@latest:/xvda/p2", "-t", t]);
    let diffs = crate::util::compare_trees(&fat32, &restored.join("p2"), checks);
    assert!(diffs.is_empty(), "FAT32 restore vs mcopy: {diffs:#?}");
    // Long, unicode names came through both ways, with the source bytes.
    let doc = "user/documents/café-ünïcødé-日本語.txt";
    assert_eq!(
        std::fs::read(restored.join("p2").join(doc)).expect("restored"),
        std::fs::read(tree.join("home").join(doc)).expect("src")
    );
    let m = crate::mount::Mount::start(&env);
    let files = m.at.join("multi/latest/files");
    let diffs = crate::util::compare_trees(&fat32, &files.join("xvda/p2"), checks);
    assert!(diffs.is_empty(), "FAT32 through FUSE vs mcopy: {diffs:#?}");
    let diffs = crate::util::compare_trees(&fat16, &files.join("xvdb/p5"), checks);
    assert!(diffs.is_empty(), "FAT16 through FUSE vs mcopy: {diffs:#?}");
    // ext4 on the MBR disk: the whole tree with its metadata.
    let full = crate::util::Checks { mode: true, owner: true, mtime: true, extra_ok: &["lost+found"] };
    let diffs = crate::util::compare_trees(&tree, &files.join("xvdb/p1"), full);
    assert!(diffs.is_empty(), "ext4 on MBR through FUSE: {diffs:#?}");
    // Swap is shown raw, with its type named.
    let p3 = files.join("xvda/p3");
    assert_eq!(std::fs::read_to_string(p3.join("type.txt")).expect("type.txt"), "swap\n");
    let raw = std::fs::read(p3.join("partition.img")).expect("partition.img");
    let whole = std::fs::read(&gpt).expect("gpt.img");
    let at: usize = offset("gpt.img", "p3").parse().expect("number");
    assert!(raw == whole[at..at + raw.len()], "partition.img differs from the partition");
}

/// An NTFS partition read through `restore-files`, the FUSE mount and `cat` (an alternate
/// data stream), against ntfs-3g mounting the same partition read-only.
#[test]
fn ntfs_volume_agrees_with_ntfs_3g() {
    let env = Env::new();
    let img = env.path("ntfs.img");
    fixture(&env, "make-ntfs-image.sh", &img, &[]);
    env.init(&[]);
    env.ok(&["backup", "--vm", "win", &format!("xvda={}", img.display())]);
    assert!(env.ok(&["ls", "win@latest:/xvda"]).contains("ntfs"));

    // The oracle: ntfs-3g, read-only, on the partition cut out of the image.
    let part = env.path("part.img");
    let st = Command::new("dd")
        .arg(format!("if={}", img.display()))
        .arg(format!("of={}", part.display()))
        .args(["bs=1M", "skip=1", "conv=sparse", "status=none"])
        .status()
        .expect("dd");
    assert!(st.success());
    let oracle = env.path("oracle");
    std::fs::create_dir_all(&oracle).expect("mkdir");
    assert!(Command::new("ntfs-3g").args(["-o", "ro"]).arg(&part).arg(&oracle).status().expect("ntfs-3g").success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("fusermount3").arg("-u").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(oracle.clone());

    // NTFS keeps no Unix modes or owners; ntfs-3g points the junction to C:\Windows into
    // its own mount, we keep the Windows path.
    let checks = crate::util::Checks { mode: false, owner: false, mtime: true, extra_ok: &[] };
    let agree = |ours: &Path, how: &str| {
        let mut diffs = crate::util::compare_trees(&oracle, ours, checks);
        diffs.retain(|d| d != "junction: symlink target differs");
        assert!(diffs.is_empty(), "NTFS {how} vs ntfs-3g: {diffs:#?}");
        assert_eq!(std::fs::read_link(ours.join("junction")).expect("junction"), Path::new("C:/Windows"));
    };
    let restored = env.path("restored");
    env.ok(&["restore-files", "win@latest:/xvda/p1", "-t", restored.to_str().expect("utf-8")]);
    agree(&restored.join("p1"), "restore-files");
    let m = crate::mount::Mount::start(&env);
    agree(&m.at.join("win/latest/files/xvda/p1"), "through FUSE");
    // Alternate data streams are not listed but open by name.
    assert_eq!(
        std::fs::read(m.at.join("win/latest/files/xvda/p1/ads.txt:secret")).expect("stream"),
        b"the alternate stream\n"
    );
    assert_eq!(env.ok(&["cat", "win@latest:/xvda/p1/ads.txt:secret"]), "the alternate stream\n");
}
