//! `vmvault restore-files SNAPSHOT:/DISK/VOLUME/PATH --target DIR`: copy a file or a whole
//! tree out of a guest filesystem, keeping what `tar -p` keeps: permission bits, owner and
//! group (when run as root), modification and access times (directories' after their
//! contents), symlinks as symlinks, hard links as hard links, sparse files sparse, FIFOs
//! and (as root) device nodes. A file that cannot be read is reported and skipped; the
//! command then fails after restoring everything else, as restic does.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use archive::reader::RepoReader;
use blockdev::{Allocation, BlockDev};
use clap::Args;
use guestfs::fs::{FileSystem, Kind, Stat};
use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};

use crate::browse::{locate, open_guest};
use crate::commands::Ctx;

#[derive(Args, Debug)]
pub struct RestoreFilesArgs {
    /// SNAPSHOT:/DISK/VOLUME/PATH, e.g. web01@latest:/xvda/p1/home/alice
    what: String,
    /// Folder to restore into (created if missing); the item keeps its name inside it.
    #[arg(long, short = 't')]
    target: PathBuf,
}

/// What was restored, and what was not.
#[derive(Debug, Default)]
struct Tally {
    files: u64,
    dirs: u64,
    links: u64,
    bytes: u64,
    skipped: Vec<String>,
    failed: Vec<String>,
}

struct Restorer<'a> {
    fs: &'a dyn FileSystem,
    as_root: bool,
    /// Inode → first path restored, for hard links.
    linked: HashMap<u64, PathBuf>,
    tally: Tally,
    buf: Vec<u8>,
}

const COPY_BUF: usize = 4 << 20;

fn timespec(t: guestfs::fs::Time) -> Timespec {
    Timespec { tv_sec: t.secs, tv_nsec: i64::from(t.nanos.min(999_999_999)) }
}

impl Restorer<'_> {
    /// Restore node `ino` (with metadata `st`) as `dest`, which does not exist yet.
    fn restore(&mut self, ino: u64, st: &Stat, dest: &Path, shown: &str) {
        if let Err(e) = self.restore_one(ino, st, dest, shown) {
            eprintln!("vmvault: {shown}: {e:#}");
            self.tally.failed.push(shown.to_owned());
        }
    }

    fn restore_one(&mut self, ino: u64, st: &Stat, dest: &Path, shown: &str) -> Result<()> {
        if st.kind != Kind::Dir && st.nlink > 1 {
            if let Some(first) = self.linked.get(&ino) {
                fs::hard_link(first, dest).with_context(|| format!("linking {}", dest.display()))?;
                self.tally.links += 1;
                return Ok(());
            }
            self.linked.insert(ino, dest.to_owned());
        }
        match st.kind {
            Kind::Dir => {
                fs::create_dir(dest).with_context(|| format!("creating {}", dest.display()))?;
                self.tally.dirs += 1;
                let mut entries = self.fs.read_dir(ino)?;
                entries.sort_by(|a, b| a.name.cmp(&b.name));
                for e in entries {
                    let name = String::from_utf8_lossy(&e.name).into_owned();
                    let child_shown = format!("{shown}/{name}");
                    if e.name.contains(&b'/') || e.name.is_empty() {
                        eprintln!("vmvault: {child_shown}: name not usable on this system; skipped");
                        self.tally.skipped.push(child_shown);
                        continue;
                    }
                    let child_dest = dest.join(std::ffi::OsStr::from_bytes(&e.name));
                    match self.fs.stat(e.ino) {
                        Ok(cst) => self.restore(e.ino, &cst, &child_dest, &child_shown),
                        Err(err) => {
                            eprintln!("vmvault: {child_shown}: {err}");
                            self.tally.failed.push(child_shown);
                        }
                    }
                }
            }
            Kind::File => {
                self.copy_file(ino, dest)?;
                self.tally.files += 1;
            }
            Kind::Symlink => {
                let target = self.fs.read_link(ino)?;
                rustix::fs::symlinkat(target.as_slice(), CWD, dest)
                    .with_context(|| format!("creating symlink {}", dest.display()))?;
                self.tally.files += 1;
            }
            Kind::Fifo | Kind::CharDevice | Kind::BlockDevice | Kind::Socket => {
                let (ft, dev) = match (st.kind, st.rdev) {
                    (Kind::Fifo, _) => (rustix::fs::FileType::Fifo, 0),
                    (Kind::CharDevice, Some((ma, mi))) if self.as_root => {
                        (rustix::fs::FileType::CharacterDevice, rustix::fs::makedev(ma, mi))
                    }
                    (Kind::BlockDevice, Some((ma, mi))) if self.as_root => {
                        (rustix::fs::FileType::BlockDevice, rustix::fs::makedev(ma, mi))
                    }
                    _ => {
                        let why = if st.kind == Kind::Socket { "a socket" } else { "a device node (needs root)" };
                        eprintln!("vmvault: {shown}: {why}; skipped");
                        self.tally.skipped.push(shown.to_owned());
                        return Ok(());
                    }
                };
                rustix::fs::mknodat(CWD, dest, ft, rustix::fs::Mode::from_raw_mode(0o600), dev)
                    .with_context(|| format!("creating {}", dest.display()))?;
                self.tally.files += 1;
            }
        }
        self.set_metadata(st, dest)
    }

    /// Copy file contents, leaving holes where the guest file has them.
    fn copy_file(&mut self, ino: u64, dest: &Path) -> Result<()> {
        let src: Arc<dyn BlockDev> = self.fs.open(ino)?;
        let out = File::create_new(dest).with_context(|| format!("creating {}", dest.display()))?;
        let len = src.len();
        let mut pos = 0u64;
        while pos < len {
            let run = src.allocation(pos, len - pos)?;
            if run.kind == Allocation::Zero {
                pos += run.len;
                continue;
            }
            let end = pos + run.len;
            while pos < end {
                let n = (end - pos).min(COPY_BUF as u64) as usize;
                let buf = &mut self.buf[..n];
                src.read_at(pos, buf).with_context(|| format!("reading at byte {pos}"))?;
                std::os::unix::fs::FileExt::write_all_at(&out, buf, pos)?;
                pos += n as u64;
            }
        }
        out.set_len(len)?;
        self.tally.bytes += len;
        Ok(())
    }

    fn set_metadata(&self, st: &Stat, dest: &Path) -> Result<()> {
        let nofollow = AtFlags::SYMLINK_NOFOLLOW;
        if self.as_root {
            let (uid, gid) = (rustix::fs::Uid::from_raw(st.uid), rustix::fs::Gid::from_raw(st.gid));
            rustix::fs::chownat(CWD, dest, Some(uid), Some(gid), nofollow)
                .with_context(|| format!("setting the owner of {}", dest.display()))?;
        }
        if st.kind != Kind::Symlink {
            // After chown, which clears setuid/setgid.
            rustix::fs::chmodat(CWD, dest, rustix::fs::Mode::from_raw_mode(u32::from(st.perm)), AtFlags::empty())
                .with_context(|| format!("setting the mode of {}", dest.display()))?;
        }
        let times = Timestamps { last_access: timespec(st.atime), last_modification: timespec(st.mtime) };
        rustix::fs::utimensat(CWD, dest, &times, nofollow)
            .with_context(|| format!("setting the times of {}", dest.display()))?;
        Ok(())
    }
}

pub fn run(ctx: &Ctx, a: RestoreFilesArgs) -> Result<()> {
    let i = a.what.find(":/").ok_or_else(|| anyhow!("{:?}: expected SNAPSHOT:/DISK/VOLUME/PATH", a.what))?;
    let (snap, path) = (&a.what[..i], &a.what[i + 1..]);
    let repo = Arc::new(ctx.open()?);
    let _lock = repo.lock(archive::lock::LockKind::Read, "restore-files")?;
    let entry = repo.resolve_snapshot(snap)?;
    let reader = RepoReader::new(repo, 256, 256 << 20)?;
    let guest = open_guest(&reader, &entry)?;
    let at = locate(&guest, path)?;
    let name = at.shown.rsplit('/').find(|p| !p.is_empty()).unwrap_or("restored").to_owned();
    fs::create_dir_all(&a.target).with_context(|| format!("creating {}", a.target.display()))?;
    let dest = a.target.join(&name);
    if dest.symlink_metadata().is_ok() {
        bail!("{} already exists; restore into an empty folder or remove it first", dest.display());
    }
    let mut r = Restorer {
        fs: &*at.fs,
        as_root: rustix::process::geteuid().is_root(),
        linked: HashMap::new(),
        tally: Tally::default(),
        buf: vec![0; COPY_BUF],
    };
    r.restore(at.ino, &at.stat, &dest, &at.shown);
    let t = &r.tally;
    if !ctx.quiet {
        eprintln!(
            "restored {} files, {} folders, {} hard links, {} into {}{}",
            t.files,
            t.dirs,
            t.links,
            crate::human::bytes(t.bytes),
            dest.display(),
            if r.as_root { "" } else { " (owners not kept: not running as root)" }
        );
        if !t.skipped.is_empty() {
            eprintln!("skipped {} entries (named above)", t.skipped.len());
        }
    }
    if !t.failed.is_empty() {
        bail!("{} entries could not be restored (named above)", t.failed.len());
    }
    Ok(())
}
