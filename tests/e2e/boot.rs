//! Instant boot: a real guest boots from a backup served over NBD, writes a file, powers off;
//! after kill -9 of the server, the write is in the overlay; the base snapshot is untouched.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::nbd::{tool, Server};
use crate::util::Env;

/// The guest built by fixtures/make-boot-guest.sh, once per target folder.
fn guest() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("boot-guest");
    if !dir.join("ready").exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/make-boot-guest.sh");
        let out = Command::new(script).arg(&dir).output().expect("run make-boot-guest.sh");
        assert!(out.status.success(), "make-boot-guest.sh failed:\n{}", crate::util::text(&out));
    }
    dir
}

/// Boot the guest from `drive` (a qemu -drive file=...) and return its console output.
pub fn boot(guest: &Path, drive: &str) -> String {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-machine", "q35", "-m", "256", "-nographic", "-no-reboot", "-net", "none"])
        .arg("-kernel")
        .arg(guest.join("vmlinux"))
        .arg("-initrd")
        .arg(guest.join("initrd.cpio.gz"))
        .args(["-append", "console=ttyS0 quiet panic=-1", "-drive"])
        .arg(format!("file={drive},format=raw,if=virtio,cache=none"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 is needed (package qemu-system-x86)");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("the guest did not power off within 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    child.stdout.take().expect("stdout").read_to_string(&mut out).expect("read");
    child.stderr.take().expect("stderr").read_to_string(&mut out).expect("read");
    out
}

fn debugfs_cat(img: &Path, offset: &str, file: &str) -> String {
    let spec = format!("{}?offset={offset}", img.display());
    let out = Command::new("debugfs").args(["-R", &format!("cat {file}"), &spec]).output().expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_guest_boots_from_a_backup_and_its_writes_survive_kill_9() {
    let guest = guest();
    let offset = std::fs::read_to_string(guest.join("offset")).expect("offset");
    let offset = offset.trim().trim_start_matches("offset=").to_owned();
    let env = Env::new();
    env.init(&[]);
    let disk = guest.join("disk.img");
    env.ok(&["backup", "--vm", "tiny", &format!("xvda={}", disk.display())]);
    let ov = env.path("ov");
    let args = ["--writable", "--overlay-dir", ov.to_str().expect("path"), "--session", "s"];

    let srv = Server::start(&env, &args);
    let console = boot(&guest, &srv.uri("tiny@latest/xvda"));
    assert!(console.contains("VMVAULT-MARKER: booted from a vmvault backup"), "{console}");
    assert!(console.contains("VMVAULT-DONE"), "{console}");
    // The guest synced before powering off: that flush must hold through kill -9.
    srv.kill();

    let srv = Server::start(&env, &args);
    let copy = env.path("after.img");
    tool("nbdcopy", &[&srv.uri("tiny@latest/xvda"), copy.to_str().expect("path")]);
    let wrote = debugfs_cat(&copy, &offset, "/guest-wrote.txt");
    assert!(wrote.contains("written by the guest"), "overlay lost the guest's file: {wrote:?}");
    srv.stop();
    let e2fsck = Command::new("e2fsck").args(["-fn", &format!("{}?offset={offset}", copy.display())]).output();
    let e2fsck = e2fsck.expect("e2fsck");
    assert!(e2fsck.status.success(), "{}", crate::util::text(&e2fsck));

    // The base snapshot never changed.
    let base = env.path("base.img");
    env.ok(&["restore", "tiny@latest:xvda", "--target", base.to_str().expect("path")]);
    assert!(crate::util::same_file(&base, &disk));
    assert_eq!(debugfs_cat(&base, &offset, "/guest-wrote.txt"), "");
}
