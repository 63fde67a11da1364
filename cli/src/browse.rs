//! `vmvault ls` and `vmvault cat SNAPSHOT:/PATH`: the files inside a backup's disks, read in
//! user space (partition tables, LVM, ext2/3/4) without mounting anything.
//! Paths: `/` lists disks, `/xvda` its volumes (`p1`, `vg0-root`, …), `/xvda/p1/etc` a
//! directory inside the filesystem.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use archive::manifest::StreamKind;
use blockdev::BlockDev;
use clap::Args;
use guestfs::ext4::{Ext4, Inode};
use guestfs::{Content, Entry};

use crate::commands::{chunk_store, stream_reader, Ctx};
use crate::human;

#[derive(Args, Debug)]
pub struct LsArgs {
    /// SNAPSHOT:/PATH, e.g. web01@latest:/ or web01@latest:/xvda/p1/etc
    what: String,
}

/// A snapshot's disks with their volumes discovered.
struct Guest {
    disks: Vec<String>,
    entries: Vec<Entry>,
}

fn split(what: &str) -> Result<(&str, &str)> {
    let i =
        what.find(":/").ok_or_else(|| anyhow!("{what:?}: expected SNAPSHOT:/PATH, e.g. web01@latest:/xvda/p1/etc"))?;
    Ok((&what[..i], &what[i + 1..]))
}

fn open_guest(ctx: &Ctx, snap: &str) -> Result<Guest> {
    let repo = Arc::new(ctx.open()?);
    let entry = repo.resolve_snapshot(snap)?;
    let store = chunk_store(&repo, 256, 64 << 20)?;
    let mut disks = Vec::new();
    for s in entry.snapshot.streams.iter().filter(|s| s.kind == StreamKind::Disk) {
        let dev: Arc<dyn BlockDev> = Arc::new(stream_reader(&repo, &store, s)?);
        disks.push((s.name.clone(), dev));
    }
    let entries = guestfs::discover(&disks)?;
    Ok(Guest { disks: disks.into_iter().map(|(n, _)| n).collect(), entries })
}

/// The filesystem of volume `disk/vol` and the inode at `rest` inside it.
fn locate(g: &Guest, disk: &str, vol: &str, rest: &str) -> Result<(Ext4, Inode)> {
    let e = g
        .entries
        .iter()
        .find(|e| e.disk == disk && e.name == vol)
        .ok_or_else(|| anyhow!("no volume {disk}/{vol} (see `vmvault ls SNAPSHOT:/{disk}`)"))?;
    let content = e.content.as_ref().map_err(|why| anyhow!("{disk}/{vol}: {why}"))?;
    let dev = e.dev.clone().ok_or_else(|| anyhow!("{disk}/{vol} cannot be read"))?;
    match content {
        Content::Ext { .. } => {
            let fs = Ext4::open(dev).with_context(|| format!("opening the filesystem of {disk}/{vol}"))?;
            let inode = fs.lookup(rest.as_bytes()).with_context(|| format!("in {disk}/{vol}"))?;
            Ok((fs, inode))
        }
        other => bail!("{disk}/{vol} holds {}, which vmvault cannot browse yet (ext2/3/4 only so far)", other.name()),
    }
}

/// The parts of an absolute path: (disk, volume, rest inside the filesystem).
fn parts(path: &str) -> (Option<&str>, Option<&str>, String) {
    let mut it = path.split('/').filter(|p| !p.is_empty());
    let (disk, vol) = (it.next(), it.next());
    let rest: Vec<&str> = it.collect();
    (disk, vol, format!("/{}", rest.join("/")))
}

fn kind_char(mode: u16) -> char {
    match mode & 0xF000 {
        0x4000 => 'd',
        0xA000 => 'l',
        0x2000 => 'c',
        0x6000 => 'b',
        0x1000 => 'p',
        0xC000 => 's',
        _ => '-',
    }
}

fn mode_string(mode: u16) -> String {
    let mut s = String::from(kind_char(mode));
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

pub fn ls(ctx: &Ctx, a: LsArgs) -> Result<()> {
    let (snap, path) = split(&a.what)?;
    let g = open_guest(ctx, snap)?;
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
            for d in &g.disks {
                out.push(format!("{d}/"));
            }
        }
        (Some(disk), None, _) => {
            if !g.disks.iter().any(|d| d == disk) {
                bail!("snapshot has no disk {disk:?} (it has: {})", g.disks.join(", "));
            }
            for e in g.entries.iter().filter(|e| e.disk == disk) {
                let size = e.dev.as_ref().map_or(0, |d| d.len());
                let what = match &e.content {
                    Ok(c) => c.name(),
                    Err(why) => format!("unreadable: {why}"),
                };
                out.push(format!("{:<16} {:>10}  {what}", format!("{}/", e.name), human::bytes(size)));
            }
        }
        (Some(disk), Some(vol), rest) => {
            let (fs, inode) = locate(g, disk, vol, &rest)?;
            if !inode.is_dir() {
                out.push(line(&inode, rest.rsplit('/').next().unwrap_or_default(), &fs));
                return Ok(());
            }
            let mut entries = fs.read_dir(&inode)?;
            entries.sort_by(|x, y| x.name.cmp(&y.name));
            for e in entries.iter().filter(|e| e.name != b"." && e.name != b"..") {
                let child = fs.inode(e.ino)?;
                out.push(line(&child, &String::from_utf8_lossy(&e.name), &fs));
            }
        }
    }
    Ok(())
}

fn line(i: &Inode, name: &str, fs: &Ext4) -> String {
    let time =
        jiff::Timestamp::from_second(i.mtime.secs).map_or("?".into(), |t| t.strftime("%Y-%m-%d %H:%M").to_string());
    let mut s = format!("{} {:>5} {:>5} {:>12} {time} {name}", mode_string(i.mode), i.uid, i.gid, i.size);
    if i.is_symlink() {
        if let Ok(t) = fs.read_link(i) {
            s.push_str(&format!(" -> {}", String::from_utf8_lossy(&t)));
        }
    }
    s
}

/// The contents of a regular file inside the guest, for `cat`.
pub fn open_file(ctx: &Ctx, what: &str) -> Result<Box<dyn BlockDev>> {
    let (snap, path) = split(what)?;
    let g = open_guest(ctx, snap)?;
    let (Some(disk), Some(vol), rest) = parts(path) else { bail!("{path}: give /DISK/VOLUME/PATH") };
    let (fs, inode) = locate(&g, disk, vol, &rest)?;
    if inode.mode & 0xF000 != 0x8000 {
        bail!("{path} is not a regular file");
    }
    Ok(Box::new(fs.contents(&inode)?))
}
