//! `vmvault ls` and `vmvault cat SNAPSHOT:/PATH` read files inside a backed-up ext4 disk,
//! compared with the tree the image was built from.

use std::path::Path;
use std::process::Command;

use crate::util::Env;

pub(crate) fn built(env: &Env) -> std::path::PathBuf {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let tree = env.path("tree");
    let img = env.path("disk.img");
    assert!(Command::new(fx.join("make-tree.sh")).arg(&tree).output().expect("make-tree").status.success());
    let out = Command::new(fx.join("make-ext4-image.sh")).arg(&tree).arg(&img).arg("64").output().expect("mkimg");
    assert!(out.status.success(), "{}", crate::util::text(&out));
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
