//! The [`Tree`] served through FUSE (fuser, no libfuse): read-only, many threads, reads of
//! up to 1 MiB, kernel read-ahead and page cache kept across opens (snapshots never
//! change), attributes and names cached by the kernel, `SEEK_DATA`/`SEEK_HOLE` from the
//! devices' allocation, and every failure an errno: `ENOENT` for absent names, `EIO` for
//! damaged or missing data (logged with what and where), never wrong bytes.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use blockdev::{Allocation, BlockDev};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, Request,
};
use guestfs::fs::{Kind, Stat, Time};

use crate::tree::{Error, Listing, Tree};

/// Cache lifetime of what never changes (everything inside a snapshot).
const TTL_FIXED: Duration = Duration::from_secs(3600);
/// Cache lifetime of the root, VM folders and `latest` (new backups appear).
const TTL_VOLATILE: Duration = Duration::from_secs(1);
/// Largest read the kernel is asked to send (FUSE's own limit is 1 MiB with max_pages).
const MAX_READ: u32 = 1 << 20;

pub(crate) struct Fs {
    tree: Tree,
    files: Mutex<HashMap<u64, Arc<dyn BlockDev>>>,
    dirs: Mutex<HashMap<u64, Arc<Listing>>>,
    next_fh: AtomicU64,
    quiet: bool,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fs({:?})", self.tree)
    }
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
    }
}

fn system_time(t: Time) -> std::time::SystemTime {
    let nanos = Duration::from_nanos(u64::from(t.nanos.min(999_999_999)));
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(t.secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + nanos
    }
}

/// The kernel's encoding of a device number in `fuse_attr.rdev` (Linux `new_encode_dev`).
fn encode_dev((major, minor): (u32, u32)) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn attr(st: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(st.ino),
        size: st.size,
        blocks: st.size.div_ceil(512),
        atime: system_time(st.atime),
        mtime: system_time(st.mtime),
        ctime: system_time(st.ctime),
        crtime: system_time(st.crtime.unwrap_or(st.ctime)),
        kind: kind(st.kind),
        perm: st.perm & 0o7777,
        nlink: st.nlink,
        uid: st.uid,
        gid: st.gid,
        rdev: st.rdev.map_or(0, encode_dev),
        // cp, cat and friends size their buffers by this.
        blksize: MAX_READ,
        flags: 0,
    }
}

impl Fs {
    pub(crate) fn new(tree: Tree, quiet: bool) -> Self {
        Self { tree, files: Mutex::default(), dirs: Mutex::default(), next_fh: AtomicU64::new(1), quiet }
    }

    fn ttl(&self, ino: u64) -> Duration {
        if self.tree.is_volatile(ino) {
            TTL_VOLATILE
        } else {
            TTL_FIXED
        }
    }

    /// The errno for `e`; I/O failures are logged, as the caller sees only EIO.
    fn errno(&self, what: &str, ino: u64, e: Error) -> Errno {
        match e {
            Error::NotFound => Errno::ENOENT,
            Error::Invalid => Errno::EINVAL,
            Error::Io(msg) => {
                if !self.quiet {
                    eprintln!("vmvault mount: {what} (inode {ino:#x}): {msg}");
                }
                Errno::EIO
            }
        }
    }

    fn io_errno(&self, what: &str, ino: u64, e: std::io::Error) -> Errno {
        self.errno(what, ino, Error::Io(e.to_string()))
    }

    fn handle(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    fn file(&self, fh: FileHandle) -> Option<Arc<dyn BlockDev>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).get(&fh.0).cloned()
    }

    fn listing(&self, ino: u64, fh: FileHandle) -> Result<Arc<Listing>, Errno> {
        if let Some(l) = self.dirs.lock().unwrap_or_else(|e| e.into_inner()).get(&fh.0) {
            return Ok(l.clone());
        }
        // No handle (should not happen): list again.
        self.tree.read_dir(ino).map(Arc::new).map_err(|e| self.errno("readdir", ino, e))
    }

    /// SEEK_DATA / SEEK_HOLE over `dev` from `offset`.
    fn seek(dev: &dyn BlockDev, offset: u64, want: Allocation) -> std::io::Result<Option<u64>> {
        let len = dev.len();
        let mut pos = offset;
        while pos < len {
            let run = dev.allocation(pos, len - pos)?;
            if run.kind == want {
                return Ok(Some(pos));
            }
            if run.len == 0 {
                break;
            }
            pos += run.len;
        }
        // Past the last data: a hole reaches to the end of the file (the implicit one).
        Ok((want == Allocation::Zero).then_some(len.max(offset)))
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Read-ahead as large as the kernel allows; directory listings with attributes.
        let _ = config.set_max_readahead(MAX_READ).or_else(|max| config.set_max_readahead(max));
        let want = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS;
        let _ = config.add_capabilities(want & config.capabilities());
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.tree.lookup(parent.0, name.as_bytes()) {
            Ok(st) => reply.entry(&self.ttl(st.ino), &attr(&st), Generation(0)),
            Err(e) => reply.error(self.errno("lookup", parent.0, e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.tree.stat(ino.0) {
            Ok(st) => reply.attr(&self.ttl(ino.0), &attr(&st)),
            Err(e) => reply.error(self.errno("getattr", ino.0, e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.tree.read_link(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(self.errno("readlink", ino.0, e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != fuser::OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.tree.open(ino.0) {
            Ok(dev) => {
                let fh = self.handle();
                self.files.lock().unwrap_or_else(|e| e.into_inner()).insert(fh, dev);
                // Files (all inside snapshots) never change: keep the page cache across opens.
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
            }
            Err(e) => reply.error(self.errno("open", ino.0, e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(dev) = self.file(fh) else { return reply.error(Errno::EBADF) };
        let len = dev.len();
        if offset >= len {
            return reply.data(&[]);
        }
        let n = u64::from(size.min(MAX_READ)).min(len - offset) as usize;
        let mut buf = vec![0u8; n];
        match dev.read_at(offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(self.io_errno(&format!("read of {n} bytes at {offset}"), ino.0, e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.tree.read_dir(ino.0) {
            Ok(list) => {
                let fh = self.handle();
                self.dirs.lock().unwrap_or_else(|e| e.into_inner()).insert(fh, Arc::new(list));
                let keep =
                    if self.tree.is_volatile(ino.0) { FopenFlags::empty() } else { FopenFlags::FOPEN_KEEP_CACHE };
                reply.opened(FileHandle(fh), keep | FopenFlags::FOPEN_CACHE_DIR);
            }
            Err(e) => reply.error(self.errno("opendir", ino.0, e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let list = match self.listing(ino.0, fh) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        for (next, name, i, k) in with_dots(ino.0, &list, offset) {
            if reply.add(INodeNo(i), next, kind(k), OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let list = match self.listing(ino.0, fh) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        for (next, name, i, _) in with_dots(ino.0, &list, offset) {
            // An entry whose metadata cannot be read is left out of this listing (logged);
            // a plain lookup of it gives the error.
            let st = match self.tree.stat(i) {
                Ok(st) => st,
                Err(e) => {
                    let _ = self.errno("readdirplus", i, e);
                    continue;
                }
            };
            if reply.add(INodeNo(i), next, OsStr::from_bytes(name), &self.ttl(i), &attr(&st), Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: fuser::ReplyEmpty) {
        self.dirs.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, MAX_READ, 255, MAX_READ);
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        const SEEK_DATA: i32 = 3;
        const SEEK_HOLE: i32 = 4;
        let Some(dev) = self.file(fh) else { return reply.error(Errno::EBADF) };
        let Ok(off) = u64::try_from(offset) else { return reply.error(Errno::EINVAL) };
        let want = match whence {
            SEEK_DATA => Allocation::Data,
            SEEK_HOLE => Allocation::Zero,
            _ => return reply.error(Errno::EINVAL),
        };
        if off >= dev.len() {
            return reply.error(Errno::ENXIO);
        }
        match Self::seek(&*dev, off, want) {
            Ok(Some(p)) => reply.offset(p as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(self.io_errno("lseek", ino.0, e)),
        }
    }
}

/// The entries of a listing from `offset` on, after `.` and `..`, each with the offset of the
/// entry after it (the kernel mixes readdir and readdirplus calls on one handle, so both use
/// this one numbering: 1 = after `.`, 2 = after `..`, 2 + k = after entry k).
fn with_dots(ino: u64, list: &Listing, offset: u64) -> impl Iterator<Item = (u64, &[u8], u64, Kind)> {
    let dots = [(b".".as_slice(), ino, Kind::Dir), (b"..".as_slice(), ino, Kind::Dir)];
    let all = dots.into_iter().chain(list.iter().map(|(n, i, k)| (n.as_slice(), *i, *k)));
    all.enumerate().skip(offset as usize).map(|(pos, (n, i, k))| (pos as u64 + 1, n, i, k))
}
