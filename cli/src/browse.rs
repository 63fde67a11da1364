//! `vmvault ls` and `vmvault cat SNAPSHOT:/PATH`: the files inside a backup's disks, read in
//! user space (partition tables, LVM, guest filesystems) without mounting anything.
//! Paths: `/` lists disks, `/xvda` its volumes (`p1`, `vg0-root`, …), `/xvda/p1/etc` a
//! directory inside the filesystem.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use archive::manifest::{SnapshotEntry, StreamKind};
use archive::reader::RepoReader;
use blockdev::BlockDev;
use clap::Args;
use guestfs::fs::{FileSystem, Kind, Stat};
use guestfs::Guest;

use crate::commands::Ctx;
use crate::human;

#[derive(Args, Debug)]
pub struct LsArgs {
    /// SNAPSHOT:/PATH, e.g. web01@latest:/ or web01@latest:/xvda/p1/etc
    what: String,
}

fn split(what: &str) -> Result<(&str, &str)> {
    let i =
        what.find(":/").ok_or_else(|| anyhow!("{what:?}: expected SNAPSHOT:/PATH, e.g. web01@latest:/xvda/p1/etc"))?;
    Ok((&what[..i], &what[i + 1..]))
}

/// The disks of snapshot `entry`, read through `reader`, with their volumes discovered.
pub fn open_guest(reader: &RepoReader, entry: &SnapshotEntry) -> Result<Guest> {
    let mut disks = Vec::new();
    for s in entry.snapshot.streams.iter().filter(|s| s.kind == StreamKind::Disk) {
        let dev: Arc<dyn BlockDev> = Arc::new(reader.open(entry, &s.name)?);
        disks.push((s.name.clone(), dev));
    }
    Ok(Guest::open(disks)?)
}

fn open_snapshot(ctx: &Ctx, snap: &str) -> Result<Guest> {
    let repo = Arc::new(ctx.open()?);
    let entry = repo.resolve_snapshot(snap)?;
    let reader = RepoReader::new(repo, 256, 64 << 20)?;
    open_guest(&reader, &entry)
}

/// A node inside the filesystem of one volume.
pub struct Located {
    pub fs: Arc<dyn FileSystem>,
    pub ino: u64,
    pub stat: Stat,
    /// `disk/volume/path`, for messages.
    pub shown: String,
}

/// The node at `/disk/vol/rest` (`rest` may be empty: the volume's root).
pub fn locate(g: &Guest, path: &str) -> Result<Located> {
    let (Some(disk), Some(vol), rest) = parts(path) else { bail!("{path}: give /DISK/VOLUME[/PATH]") };
    let i = g.volume(disk, vol).ok_or_else(|| anyhow!("no volume {disk}/{vol} (see `vmvault ls SNAPSHOT:/{disk}`)"))?;
    if !g.browsable(i) {
        let what = g.volumes[i].content.as_ref().map_or_else(|e| format!("unreadable: {e}"), |c| c.name());
        bail!("{disk}/{vol} holds {what}, which vmvault cannot browse (it reads ext2/3/4 and FAT)");
    }
    let fs = g.filesystem(i)?;
    let ino = guestfs::fs::resolve(&*fs, rest.as_bytes()).with_context(|| format!("in {disk}/{vol}"))?;
    let stat = fs.stat(ino).with_context(|| format!("{disk}/{vol}{rest}"))?;
    Ok(Located { fs, ino, stat, shown: format!("{disk}/{vol}{rest}") })
}

/// The parts of an absolute path: (disk, volume, rest inside the filesystem).
fn parts(path: &str) -> (Option<&str>, Option<&str>, String) {
    let mut it = path.split('/').filter(|p| !p.is_empty());
    let (disk, vol) = (it.next(), it.next());
    let rest: Vec<&str> = it.collect();
    (disk, vol, format!("/{}", rest.join("/")))
}

fn kind_char(k: Kind) -> char {
    match k {
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::CharDevice => 'c',
        Kind::BlockDevice => 'b',
        Kind::Fifo => 'p',
        Kind::Socket => 's',
        Kind::File => '-',
    }
}

fn mode_string(s: &Stat) -> String {
    let mut out = String::from(kind_char(s.kind));
    for shift in [6, 3, 0] {
        let bits = (s.perm >> shift) & 7;
        out.push(if bits & 4 != 0 { 'r' } else { '-' });
        out.push(if bits & 2 != 0 { 'w' } else { '-' });
        out.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    out
}

pub fn ls(ctx: &Ctx, a: LsArgs) -> Result<()> {
    let (snap, path) = split(&a.what)?;
    let g = open_snapshot(ctx, snap)?;
    let mut lines = Vec::new();
    list(&g, path, &mut lines)?;
    let mut text = lines.join("\n");
    text.push('\n');
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(crate::commands::BrokenPipe.into()),
        r => Ok(r?),
    }
}

fn list(g: &Guest, path: &str, out: &mut Vec<String>) -> Result<()> {
    match parts(path) {
        (None, _, _) => {
            for (d, _) in &g.disks {
                out.push(format!("{d}/"));
            }
        }
        (Some(disk), None, _) => {
            if !g.disks.iter().any(|(d, _)| d == disk) {
                let names: Vec<&str> = g.disks.iter().map(|(d, _)| d.as_str()).collect();
                bail!("snapshot has no disk {disk:?} (it has: {})", names.join(", "));
            }
            for (_, e) in g.volumes_of(disk) {
                let size = e.dev.as_ref().map_or(0, |d| d.len());
                let what = match &e.content {
                    Ok(c) => c.name(),
                    Err(why) => format!("unreadable: {why}"),
                };
                out.push(format!("{:<16} {:>10}  {what}", format!("{}/", e.name), human::bytes(size)));
            }
        }
        (Some(_), Some(_), rest) => {
            let at = locate(g, path)?;
            if at.stat.kind != Kind::Dir {
                out.push(line(&at.stat, rest.rsplit('/').next().unwrap_or_default(), &*at.fs));
                return Ok(());
            }
            let mut entries = at.fs.read_dir(at.ino)?;
            entries.sort_by(|x, y| x.name.cmp(&y.name));
            for e in entries {
                let child = at.fs.stat(e.ino)?;
                out.push(line(&child, &String::from_utf8_lossy(&e.name), &*at.fs));
            }
        }
    }
    Ok(())
}

fn line(s: &Stat, name: &str, fs: &dyn FileSystem) -> String {
    let time =
        jiff::Timestamp::from_second(s.mtime.secs).map_or("?".into(), |t| t.strftime("%Y-%m-%d %H:%M").to_string());
    let size = match s.rdev {
        Some((major, minor)) => format!("{major}, {minor}"),
        None => s.size.to_string(),
    };
    let mut out = format!("{} {:>5} {:>5} {size:>12} {time} {name}", mode_string(s), s.uid, s.gid);
    if s.kind == Kind::Symlink {
        if let Ok(t) = fs.read_link(s.ino) {
            out.push_str(&format!(" -> {}", String::from_utf8_lossy(&t)));
        }
    }
    out
}

/// The contents of a regular file inside the guest, for `cat`.
pub fn open_file(ctx: &Ctx, what: &str) -> Result<Arc<dyn BlockDev>> {
    let (snap, path) = split(what)?;
    let g = open_snapshot(ctx, snap)?;
    let at = locate(&g, path)?;
    if at.stat.kind != Kind::File {
        bail!("{path} is not a regular file");
    }
    Ok(at.fs.open(at.ino)?)
}
