//! `vmvault mount` through the kernel's FUSE: the layout, disk images byte for byte with
//! holes, guest files with their metadata against the source tree, new backups appearing,
//! damaged data as EIO, and a clean unmount on SIGTERM and on `fusermount3 -u`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::browse::built;
use crate::util::{compare_trees, same_file, text, Checks, Env};

/// A running `vmvault mount`, unmounted (SIGTERM) when dropped.
pub(crate) struct Mount {
    pub child: Child,
    pub at: PathBuf,
}

impl Mount {
    pub fn start(env: &Env) -> Self {
        let at = env.path("mnt");
        std::fs::create_dir_all(&at).expect("mkdir");
        let mut child = env
            .cmd()
            .args(["mount", at.to_str().expect("utf-8")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmvault mount");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
        if !line.starts_with("mounted ") {
            let mut err = String::new();
            let _ = child.stderr.take().expect("stderr").read_to_string(&mut err);
            panic!("vmvault mount did not start: {line}{err}");
        }
        Self { child, at }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        self.child.wait().expect("wait")
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

fn mounted(at: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    let at = at.canonicalize().unwrap_or_else(|_| at.to_owned());
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(at.to_str().expect("utf-8")))
}

fn seek(path: &Path, from: rustix::fs::SeekFrom) -> std::io::Result<u64> {
    let f = std::fs::File::open(path)?;
    Ok(rustix::fs::seek(&f, from)?)
}

#[test]
fn mount_shows_snapshots_disks_and_guest_files() {
    let env = Env::new();
    let tree = built(&env);
    let img = env.path("disk.img");
    let mut m = Mount::start(&env);
    let root = m.at.clone();
    let names = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&root), ["web01"]);
    let vm = root.join("web01");
    let snaps = names(&vm);
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    assert_eq!(snaps[1], "latest");
    assert!(snaps[0].len() == "2026-11-22T03:00:00Z_3fa2c1d0".len() && snaps[0].contains("Z_"), "{snaps:?}");
    assert_eq!(std::fs::read_link(vm.join("latest")).expect("readlink"), Path::new(&snaps[0]));
    let snap = vm.join("latest");
    assert_eq!(names(&snap), ["disks", "files", "vm.json"]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("vm.json")).expect("vm.json")).expect("json");
    assert_eq!(manifest["vm"], "web01");
    assert!(snaps[0].ends_with(&manifest["id"].as_str().expect("id")[..8]), "{manifest}");

    // The disk image: every byte, and its holes through SEEK_DATA / SEEK_HOLE.
    let raw = snap.join("disks/xvda.raw");
    assert!(same_file(&raw, &img), "xvda.raw differs from the image backed up");
    use rustix::fs::SeekFrom;
    let first_hole = seek(&raw, SeekFrom::Hole(0)).expect("SEEK_HOLE");
    assert!(first_hole > 0 && first_hole < std::fs::metadata(&raw).expect("stat").len(), "{first_hole}");
    let next_data = seek(&raw, SeekFrom::Data(first_hole)).expect("SEEK_DATA");
    assert!(next_data > first_hole, "{next_data}");
    // The same disk as a fixed VHD: qemu reads it as the image, holes at the same places,
    // and the file is the same on every open.
    let vhd = snap.join("disks/xvda.vhd");
    assert_eq!(names(&snap.join("disks")), ["xvda.raw", "xvda.vhd"]);
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", "vpc", "-F", "raw"])
        .arg(&vhd)
        .arg(&img)
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(seek(&vhd, SeekFrom::Hole(0)).expect("SEEK_HOLE"), first_hole);
    let tail = |p: &Path| {
        let b = std::fs::read(p).expect("read vhd");
        b[b.len() - 512..].to_vec()
    };
    assert_eq!(tail(&vhd), tail(&vhd));
    assert_eq!(&tail(&vhd)[..8], b"conectix");

    // Files inside the guest: names, bytes, modes, owners, times, links, special files.
    assert_eq!(names(&snap.join("files")), ["xvda"]);
    assert_eq!(names(&snap.join("files/xvda")), ["p1"]);
    let fs_root = snap.join("files/xvda/p1");
    let checks = Checks { mode: true, owner: true, mtime: true, extra_ok: &["lost+found"] };
    let diffs = compare_trees(&tree, &fs_root, checks);
    assert!(diffs.is_empty(), "{diffs:#?}");
    let zeros = fs_root.join("var/cache/blobs/zeros.bin");
    assert_eq!(seek(&zeros, SeekFrom::Hole(0)).expect("SEEK_HOLE"), 0);
    assert_eq!(
        seek(&zeros, SeekFrom::Data(0)).map_err(|e| e.raw_os_error()),
        Err(Some(rustix::io::Errno::NXIO.raw_os_error()))
    );
    // Read-only.
    let w = std::fs::OpenOptions::new().write(true).open(fs_root.join("etc/hostname"));
    assert!(w.is_err(), "opened for writing");
    assert!(std::fs::write(fs_root.join("new-file"), b"x").is_err());

    // A backup made while mounted appears without remounting.
    env.ok(&["backup", "--vm", "db01", &format!("xvdb={}", img.display())]);
    assert!(root.join("db01/latest/disks/xvdb.raw").exists(), "the new VM is not visible");
    assert_eq!(names(&root), ["db01", "web01"]);

    // SIGTERM unmounts cleanly.
    let status = m.terminate();
    assert!(status.success(), "{status:?}");
    assert!(!mounted(&root), "still mounted after SIGTERM");
}

#[test]
fn damaged_data_reads_as_eio_and_fusermount_unmounts() {
    let env = Env::new();
    let _tree = built(&env);
    // Damage the middle of every pack: chunk authentication must fail, never give bytes.
    let data = env.repo().join("data");
    let mut damaged = 0;
    for sub in std::fs::read_dir(&data).expect("data") {
        for pack in std::fs::read_dir(sub.expect("dir").path()).expect("packs") {
            let p = pack.expect("pack").path();
            let mut b = std::fs::read(&p).expect("read");
            let mid = b.len() / 2;
            for x in &mut b[mid - 2048..mid + 2048] {
                *x ^= 0x5a;
            }
            std::fs::write(&p, b).expect("write");
            damaged += 1;
        }
    }
    assert!(damaged > 0);
    let m = Mount::start(&env);
    let raw = m.at.join("web01/latest/disks/xvda.raw");
    let mut f = std::fs::File::open(&raw).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    let mut eio = false;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::IO.raw_os_error()), "{e}");
                eio = true;
                break;
            }
        }
    }
    assert!(eio, "reading a disk with damaged packs gave no error");
    drop(f);
    let out = Command::new("fusermount3").arg("-u").arg(&m.at).output().expect("fusermount3");
    assert!(out.status.success(), "{}", crate::util::text(&out));
    let mut m = m;
    let status = m.child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    let mut err = String::new();
    m.child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    assert!(err.contains("vmvault mount: read of"), "the failure was not logged: {err}");
}
