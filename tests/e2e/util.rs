//! Running the binary in a temporary folder.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const PASS: &str = "correct horse";

/// A temporary folder with a repository path and helpers to run `vmvault` in it.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("tempdir") }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn repo(&self) -> PathBuf {
        self.path("repo")
    }

    /// A `vmvault` command with the repository and passphrase set.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmvault"));
        c.env("VMVAULT_REPO", self.repo()).env("VMVAULT_PASSWORD", PASS).env_remove("VMVAULT_PASSWORD_FILE");
        c.current_dir(self.dir.path());
        c
    }

    /// Run with `args`; panic with the output unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("run vmvault");
        assert!(out.status.success(), "vmvault {args:?} failed:\n{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run with `args`; panic unless it fails. Returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("run vmvault");
        assert!(!out.status.success(), "vmvault {args:?} should have failed:\n{}", text(&out));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn init(&self, extra: &[&str]) {
        let mut args = vec!["init", "--kdf-memory-kib", "256"];
        args.extend_from_slice(extra);
        self.ok(&args);
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).expect("valid JSON")
    }
}

pub fn text(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A sparse disk image: `size` bytes with the given (offset, bytes) written into it.
pub fn write_image(path: &Path, size: u64, parts: &[(u64, &[u8])]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("set_len");
    for (off, data) in parts {
        f.write_all_at(data, *off).expect("write image");
    }
}

pub fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read a") == std::fs::read(b).expect("read b")
}

/// What [`compare_trees`] checks besides names, kinds, contents and symlink targets.
#[derive(Clone, Copy, Debug)]
pub struct Checks {
    pub mode: bool,
    pub owner: bool,
    pub mtime: bool,
    /// Names in `ours` (relative paths) that `theirs` lacks and that are expected there.
    pub extra_ok: &'static [&'static str],
}

/// Every difference between the tree `theirs` (the source) and `ours` (what vmvault shows or
/// restored): missing or extra names, kinds, contents, symlink targets, device numbers, hard
/// links (names that share an inode in one tree must share it in the other), and the
/// metadata `checks` asks for. Empty when they agree.
pub fn compare_trees(theirs: &Path, ours: &Path, checks: Checks) -> Vec<String> {
    use std::collections::{BTreeMap, HashMap};
    use std::os::unix::fs::MetadataExt;
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, std::fs::Metadata>) {
        let dir = root.join(rel);
        let Ok(rd) = std::fs::read_dir(&dir) else { return };
        for e in rd.flatten() {
            let r = rel.join(e.file_name());
            let md = std::fs::symlink_metadata(root.join(&r)).expect("stat");
            let is_dir = md.is_dir();
            out.insert(r.clone(), md);
            if is_dir {
                walk(root, &r, out);
            }
        }
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    walk(theirs, Path::new(""), &mut a);
    walk(ours, Path::new(""), &mut b);
    let mut diffs = Vec::new();
    let (mut links_a, mut links_b): (HashMap<u64, Vec<&PathBuf>>, HashMap<u64, Vec<&PathBuf>>) = Default::default();
    for (rel, ma) in &a {
        let Some(mb) = b.get(rel) else {
            diffs.push(format!("{}: missing", rel.display()));
            continue;
        };
        let show = rel.display();
        if ma.file_type() != mb.file_type() {
            diffs.push(format!("{show}: kind {:?} vs {:?}", ma.file_type(), mb.file_type()));
            continue;
        }
        if checks.mode && ma.mode() & 0o7777 != mb.mode() & 0o7777 && !ma.file_type().is_symlink() {
            diffs.push(format!("{show}: mode {:o} vs {:o}", ma.mode() & 0o7777, mb.mode() & 0o7777));
        }
        if checks.owner && (ma.uid(), ma.gid()) != (mb.uid(), mb.gid()) {
            diffs.push(format!("{show}: owner {}:{} vs {}:{}", ma.uid(), ma.gid(), mb.uid(), mb.gid()));
        }
        if checks.mtime && (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
            diffs.push(format!(
                "{show}: mtime {}.{} vs {}.{}",
                ma.mtime(),
                ma.mtime_nsec(),
                mb.mtime(),
                mb.mtime_nsec()
            ));
        }
        let ft = ma.file_type();
        use std::os::unix::fs::FileTypeExt;
        if ft.is_file() {
            if ma.len() != mb.len() || !same_file(&theirs.join(rel), &ours.join(rel)) {
                diffs.push(format!("{show}: contents differ ({} vs {} bytes)", ma.len(), mb.len()));
            }
            if ma.nlink() > 1 {
                links_a.entry(ma.ino()).or_default().push(rel);
                links_b.entry(mb.ino()).or_default().push(rel);
            }
        } else if ft.is_symlink() {
            let (ta, tb) = (std::fs::read_link(theirs.join(rel)), std::fs::read_link(ours.join(rel)));
            if ta.ok() != tb.ok() {
                diffs.push(format!("{show}: symlink target differs"));
            }
        } else if (ft.is_char_device() || ft.is_block_device()) && ma.rdev() != mb.rdev() {
            diffs.push(format!("{show}: device {:#x} vs {:#x}", ma.rdev(), mb.rdev()));
        }
    }
    for rel in b.keys().filter(|r| !a.contains_key(*r)) {
        if !checks.extra_ok.iter().any(|x| rel.starts_with(x)) {
            diffs.push(format!("{}: not in the source", rel.display()));
        }
    }
    fn groups(m: HashMap<u64, Vec<&PathBuf>>) -> Vec<Vec<&PathBuf>> {
        let mut g: Vec<Vec<&PathBuf>> = m.into_values().collect();
        g.iter_mut().for_each(|v| v.sort());
        g.sort();
        g
    }
    let (ga, gb) = (groups(links_a), groups(links_b));
    if ga != gb {
        diffs.push(format!("hard links differ: {ga:?} vs {gb:?}"));
    }
    diffs
}
