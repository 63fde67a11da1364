//! The browse tree of a repository, independent of FUSE:
//!
//! ```text
//! /VM/                                  one folder per VM
//! /VM/latest -> TIME_ID                 the newest snapshot
//! /VM/TIME_ID/vm.json                   the snapshot's manifest
//! /VM/TIME_ID/disks/DISK.raw            each disk, random access, holes reported
//! /VM/TIME_ID/disks/DISK.vhd            the same disk as a fixed VHD (raw bytes + footer)
//! /VM/TIME_ID/STREAM.img                each memory stream (memory.img)
//! /VM/TIME_ID/files/DISK/VOLUME/...     each volume's filesystem (guestfs), or for volumes
//!                                       vmvault cannot read: partition.img and type.txt
//! ```
//!
//! Inode numbers: nodes vmvault makes up (folders, vm.json, disk images) are numbered on
//! first sight below 2^48; a node inside a guest filesystem is `slot << 48 | guest inode`,
//! where the slot names the (snapshot, volume), so guest inodes need no table and hard links
//! keep one number. Snapshots are opened on first access, not at mount time, and the
//! repository's catalogue is re-read (at most every [`REFRESH`]) when the root or a VM
//! folder is listed, so new backups appear.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use archive::manifest::{SnapshotEntry, StreamKind};
use archive::reader::RepoReader;
use archive::SnapshotId;
use blockdev::{BlockDev, MemDev};
use guestfs::fs::{DirEntry, FileSystem, Kind, Stat, Time};
use guestfs::Guest;

/// How often listing the root or a VM folder re-reads the repository's snapshot list.
pub const REFRESH: Duration = Duration::from_secs(2);
/// Guest inode numbers must fit below this; the slot goes above it.
const SLOT_SHIFT: u32 = 48;
const GUEST_MASK: u64 = (1 << SLOT_SHIFT) - 1;
pub const ROOT: u64 = 1;

/// Why an operation failed, as FUSE needs to tell it.
#[derive(Debug)]
pub enum Error {
    NotFound,
    /// Not a directory / not a symlink / not a file, as asked.
    Invalid,
    /// Reading failed (damaged or missing data, I/O): the message says what and where.
    Io(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<guestfs::Error> for Error {
    fn from(e: guestfs::Error) -> Self {
        match e {
            guestfs::Error::NotFound(_) => Error::NotFound,
            other => Error::Io(other.to_string()),
        }
    }
}

impl From<archive::Error> for Error {
    fn from(e: archive::Error) -> Self {
        Error::Io(e.to_string())
    }
}

/// A node vmvault makes up (everything outside guest filesystems).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Node {
    Root,
    Vm(String),
    /// `VM/latest`.
    Latest(String),
    Snap(usize),
    VmJson(usize),
    Disks(usize),
    /// `disks/NAME.raw`.
    Disk(usize, String),
    /// `disks/NAME.vhd`: a fixed VHD, so offsets match the raw disk and holes stay holes.
    DiskVhd(usize, String),
    /// `NAME.img` for a memory stream.
    Memory(usize, String),
    Files(usize),
    FilesDisk(usize, String),
    /// The folder of a volume without a readable filesystem, and its two files.
    RawVolume(usize, usize),
    VolumeImg(usize, usize),
    VolumeType(usize, usize),
}

/// A stable unique id for a disk's VHD view: the same file every time it is opened.
fn vhd_id(id: &SnapshotId, disk: &str) -> [u8; 16] {
    let mut u = [0u8; 16];
    u.copy_from_slice(&id.0[..16]);
    for (i, b) in disk.bytes().enumerate() {
        u[i % 16] ^= b.rotate_left((i / 16) as u32);
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Snapshot time as VHD time (seconds since 2000-01-01 UTC).
fn vhd_time(t: Time) -> u32 {
    u32::try_from(t.secs.saturating_sub(disk_formats::vhd::footer::EPOCH_OFFSET as i64)).unwrap_or(0)
}

/// One snapshot, opened on first access.
struct Snap {
    entry: SnapshotEntry,
    /// `2026-11-22T03:00:00Z_3fa2c1d0`.
    dir: String,
    time: Time,
    /// Readers of its streams, opened on first use.
    streams: Mutex<HashMap<String, Arc<dyn BlockDev>>>,
    /// `vm.json`, made on first use.
    json: OnceLock<Vec<u8>>,
    guest: OnceLock<std::result::Result<Arc<Guest>, String>>,
}

#[derive(Default)]
struct Catalogue {
    snaps: Vec<Arc<Snap>>,
    by_id: HashMap<SnapshotId, usize>,
    /// VM → its snapshots (indices into `snaps`), oldest first; only those still listed.
    vms: BTreeMap<String, Vec<usize>>,
    read_at: Option<Instant>,
}

#[derive(Default)]
struct Nodes {
    list: Vec<Node>,
    index: HashMap<Node, u64>,
}

/// Guest filesystems by slot (slot 0 is unused).
#[derive(Default)]
struct Slots {
    list: Vec<(usize, usize, Arc<dyn FileSystem>)>,
    index: HashMap<(usize, usize), u64>,
}

/// What `read_dir` gives: a name, its inode and kind.
pub type Listing = Vec<(Vec<u8>, u64, Kind)>;

/// The tree. `Send + Sync`; every method may run on any FUSE thread.
pub struct Tree {
    reader: Arc<RepoReader>,
    catalogue: RwLock<Catalogue>,
    nodes: RwLock<Nodes>,
    slots: RwLock<Slots>,
    /// Owner of the made-up nodes (the user who mounted).
    uid: u32,
    gid: u32,
    mounted: Time,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tree({})", self.reader.repo().path().display())
    }
}

fn now() -> Time {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Time { secs: d.as_secs() as i64, nanos: d.subsec_nanos() }
}

fn parse_time(s: &str) -> Time {
    s.parse::<jiff::Timestamp>()
        .map(|t| Time { secs: t.as_second(), nanos: t.subsec_nanosecond().max(0) as u32 })
        .unwrap_or_default()
}

/// `2026-11-22T03:00:00Z`: snapshot folders are named to the second.
fn folder_time(t: Time) -> String {
    jiff::Timestamp::from_second(t.secs)
        .map_or_else(|_| t.secs.to_string(), |ts| ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
}

impl Tree {
    /// The tree of `reader`'s repository; made-up nodes belong to `uid:gid`. Nothing is read
    /// until the first listing.
    pub fn new(reader: Arc<RepoReader>, uid: u32, gid: u32) -> Self {
        let tree = Self {
            reader,
            catalogue: RwLock::default(),
            nodes: RwLock::default(),
            slots: RwLock::default(),
            uid,
            gid,
            mounted: now(),
        };
        tree.intern(Node::Root); // inode 1
        tree
    }

    /// Re-read the snapshot list if it is older than [`REFRESH`] (or always with `force`).
    fn refresh(&self, force: bool) -> Result<()> {
        let stale = |c: &Catalogue| force || c.read_at.is_none_or(|t| t.elapsed() >= REFRESH);
        if !stale(&self.catalogue.read().unwrap_or_else(|e| e.into_inner())) {
            return Ok(());
        }
        let entries = self.reader.repo().list_snapshots()?;
        let mut guard = self.catalogue.write().unwrap_or_else(|e| e.into_inner());
        let c = &mut *guard;
        if !stale(c) {
            return Ok(());
        }
        let mut vms: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for e in entries {
            let i = match c.by_id.get(&e.id) {
                Some(&i) => i,
                None => {
                    let time = parse_time(&e.snapshot.time);
                    let dir = format!("{}_{}", folder_time(time), e.id.short());
                    c.snaps.push(Arc::new(Snap {
                        dir,
                        time,
                        entry: e,
                        streams: Mutex::default(),
                        json: OnceLock::new(),
                        guest: OnceLock::new(),
                    }));
                    let i = c.snaps.len() - 1;
                    let id = c.snaps[i].entry.id;
                    c.by_id.insert(id, i);
                    i
                }
            };
            vms.entry(c.snaps[i].entry.snapshot.vm.clone()).or_default().push(i);
        }
        for list in vms.values_mut() {
            list.sort_by(|&a, &b| (c.snaps[a].time, &c.snaps[a].dir).cmp(&(c.snaps[b].time, &c.snaps[b].dir)));
        }
        c.vms = vms;
        c.read_at = Some(Instant::now());
        Ok(())
    }

    fn snap(&self, i: usize) -> Result<Arc<Snap>> {
        let c = self.catalogue.read().unwrap_or_else(|e| e.into_inner());
        c.snaps.get(i).cloned().ok_or(Error::NotFound)
    }

    fn intern(&self, n: Node) -> u64 {
        if let Some(&ino) = self.nodes.read().unwrap_or_else(|e| e.into_inner()).index.get(&n) {
            return ino;
        }
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&ino) = nodes.index.get(&n) {
            return ino;
        }
        nodes.list.push(n.clone());
        let ino = nodes.list.len() as u64; // 1-based: Root is 1
        nodes.index.insert(n, ino);
        ino
    }

    fn node(&self, ino: u64) -> Result<Node> {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        let i = usize::try_from(ino).ok().and_then(|i| i.checked_sub(1)).ok_or(Error::NotFound)?;
        nodes.list.get(i).cloned().ok_or(Error::NotFound)
    }

    /// The guest filesystem and guest inode behind `ino`, if it is a guest node.
    fn guest_node(&self, ino: u64) -> Result<Option<(u64, Arc<dyn FileSystem>)>> {
        let slot = ino >> SLOT_SHIFT;
        if slot == 0 {
            return Ok(None);
        }
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        let (_, _, fs) = slots.list.get(slot as usize - 1).ok_or(Error::NotFound)?;
        Ok(Some((slot, fs.clone())))
    }

    fn slot_for(&self, snap: usize, vol: usize, fs: &Arc<dyn FileSystem>) -> Result<u64> {
        if let Some(&s) = self.slots.read().unwrap_or_else(|e| e.into_inner()).index.get(&(snap, vol)) {
            return Ok(s);
        }
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&s) = slots.index.get(&(snap, vol)) {
            return Ok(s);
        }
        if slots.list.len() >= (1 << (64 - SLOT_SHIFT)) - 1 {
            return Err(Error::Io("too many volumes opened in one mount".into()));
        }
        slots.list.push((snap, vol, fs.clone()));
        let s = slots.list.len() as u64;
        slots.index.insert((snap, vol), s);
        Ok(s)
    }

    fn encode(slot: u64, guest: u64) -> Result<u64> {
        if guest > GUEST_MASK {
            return Err(Error::Io(format!("guest inode {guest} is beyond 2^48")));
        }
        Ok(slot << SLOT_SHIFT | guest)
    }

    /// A reader of stream `name` of snapshot `s`, opened once.
    fn stream(&self, s: &Snap, name: &str) -> Result<Arc<dyn BlockDev>> {
        let mut streams = s.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = streams.get(name) {
            return Ok(d.clone());
        }
        let d: Arc<dyn BlockDev> = Arc::new(self.reader.open(&s.entry, name)?);
        streams.insert(name.to_owned(), d.clone());
        Ok(d)
    }

    fn guest(&self, s: &Snap) -> Result<Arc<Guest>> {
        let g = s.guest.get_or_init(|| {
            let mut disks = Vec::new();
            for sref in s.entry.snapshot.streams.iter().filter(|r| r.kind == StreamKind::Disk) {
                let dev = self.stream(s, &sref.name).map_err(|e| format!("{e:?}"))?;
                disks.push((sref.name.clone(), dev));
            }
            Guest::open(disks).map(Arc::new).map_err(|e| format!("{} {}: {e}", s.entry.snapshot.vm, s.dir))
        });
        g.clone().map_err(Error::Io)
    }

    fn manifest_json(s: &Snap) -> &[u8] {
        s.json.get_or_init(|| {
            let mut v = serde_json::to_value(&s.entry.snapshot).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("id".into(), s.entry.id.to_hex().into());
            }
            let mut b = serde_json::to_vec_pretty(&v).unwrap_or_default();
            b.push(b'\n');
            b
        })
    }

    fn volume_type(g: &Guest, vol: usize) -> Vec<u8> {
        let v = &g.volumes[vol];
        let what = match &v.content {
            Ok(c) => c.name(),
            Err(e) => format!("unreadable: {e}"),
        };
        let mut s = format!("{what}\n");
        if let Err(e) = g.filesystem(vol) {
            if g.browsable(vol) {
                s.push_str(&format!("the filesystem could not be opened: {e}\n"));
            }
        }
        s.into_bytes()
    }

    fn made_up(&self, ino: u64, kind: Kind, size: u64, time: Time) -> Stat {
        let perm = if matches!(kind, Kind::Dir | Kind::Symlink) { 0o555 } else { 0o444 };
        Stat {
            ino,
            kind,
            perm,
            uid: self.uid,
            gid: self.gid,
            size,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            atime: time,
            mtime: time,
            ctime: time,
            crtime: None,
            rdev: None,
        }
    }

    /// The metadata of `ino`.
    pub fn stat(&self, ino: u64) -> Result<Stat> {
        if let Some((_, fs)) = self.guest_node(ino)? {
            let mut st = fs.stat(ino & GUEST_MASK)?;
            st.ino = ino;
            return Ok(st);
        }
        let node = self.node(ino)?;
        let snap_time = |i: usize| self.snap(i).map(|s| s.time);
        Ok(match node {
            Node::Root | Node::Vm(_) => self.made_up(ino, Kind::Dir, 0, self.mounted),
            Node::Latest(vm) => {
                let target = self.latest(&vm)?;
                self.made_up(ino, Kind::Symlink, target.len() as u64, self.mounted)
            }
            Node::Snap(i) | Node::Disks(i) | Node::Files(i) | Node::FilesDisk(i, _) | Node::RawVolume(i, _) => {
                self.made_up(ino, Kind::Dir, 0, snap_time(i)?)
            }
            Node::VmJson(i) => {
                let s = self.snap(i)?;
                self.made_up(ino, Kind::File, Self::manifest_json(&s).len() as u64, s.time)
            }
            Node::Disk(i, name) | Node::Memory(i, name) => {
                let s = self.snap(i)?;
                let size = s.entry.snapshot.stream(&name).map_or(0, |r| r.size);
                self.made_up(ino, Kind::File, size, s.time)
            }
            Node::DiskVhd(i, name) => {
                let s = self.snap(i)?;
                let size = s.entry.snapshot.stream(&name).map_or(0, |r| r.size);
                self.made_up(ino, Kind::File, size + 512, s.time)
            }
            Node::VolumeImg(i, v) => {
                let s = self.snap(i)?;
                let g = self.guest(&s)?;
                let size = g.volumes.get(v).and_then(|e| e.dev.as_ref()).map_or(0, |d| d.len());
                self.made_up(ino, Kind::File, size, s.time)
            }
            Node::VolumeType(i, v) => {
                let s = self.snap(i)?;
                let g = self.guest(&s)?;
                self.made_up(ino, Kind::File, Self::volume_type(&g, v).len() as u64, s.time)
            }
        })
    }

    /// The folder name of `vm`'s newest snapshot.
    fn latest(&self, vm: &str) -> Result<String> {
        let c = self.catalogue.read().unwrap_or_else(|e| e.into_inner());
        let last = c.vms.get(vm).and_then(|l| l.last()).ok_or(Error::NotFound)?;
        Ok(c.snaps[*last].dir.clone())
    }

    /// The entries of folder `ino` (no `.` and `..`).
    pub fn read_dir(&self, ino: u64) -> Result<Listing> {
        if let Some((slot, fs)) = self.guest_node(ino)? {
            let mut out = Vec::new();
            for DirEntry { name, ino: g, kind } in fs.read_dir(ino & GUEST_MASK)? {
                out.push((name, Self::encode(slot, g)?, kind));
            }
            return Ok(out);
        }
        let dir = |name: String, n: Node| (name.into_bytes(), self.intern(n), Kind::Dir);
        let file = |name: String, n: Node| (name.into_bytes(), self.intern(n), Kind::File);
        Ok(match self.node(ino)? {
            Node::Root => {
                self.refresh(false)?;
                let c = self.catalogue.read().unwrap_or_else(|e| e.into_inner());
                c.vms.keys().map(|vm| dir(vm.clone(), Node::Vm(vm.clone()))).collect()
            }
            Node::Vm(vm) => {
                self.refresh(false)?;
                let c = self.catalogue.read().unwrap_or_else(|e| e.into_inner());
                let list = c.vms.get(&vm).ok_or(Error::NotFound)?;
                let mut out: Listing = list.iter().map(|&i| dir(c.snaps[i].dir.clone(), Node::Snap(i))).collect();
                out.push((b"latest".to_vec(), self.intern(Node::Latest(vm)), Kind::Symlink));
                out
            }
            Node::Snap(i) => {
                let s = self.snap(i)?;
                let mut out = vec![file("vm.json".into(), Node::VmJson(i)), dir("disks".into(), Node::Disks(i))];
                for r in s.entry.snapshot.streams.iter().filter(|r| r.kind == StreamKind::Memory) {
                    out.push(file(format!("{}.img", r.name), Node::Memory(i, r.name.clone())));
                }
                out.push(dir("files".into(), Node::Files(i)));
                out
            }
            Node::Disks(i) => {
                let s = self.snap(i)?;
                let mut out = Vec::new();
                for r in s.entry.snapshot.streams.iter().filter(|r| r.kind == StreamKind::Disk) {
                    out.push(file(format!("{}.raw", r.name), Node::Disk(i, r.name.clone())));
                    if disk_formats::vhd::write::check_size(r.size).is_ok() {
                        out.push(file(format!("{}.vhd", r.name), Node::DiskVhd(i, r.name.clone())));
                    }
                }
                out
            }
            Node::Files(i) => {
                let s = self.snap(i)?;
                let disks = s.entry.snapshot.streams.iter().filter(|r| r.kind == StreamKind::Disk);
                disks.map(|r| dir(r.name.clone(), Node::FilesDisk(i, r.name.clone()))).collect()
            }
            Node::FilesDisk(i, disk) => {
                let s = self.snap(i)?;
                let g = self.guest(&s)?;
                let mut out = Vec::new();
                for (v, e) in g.volumes_of(&disk) {
                    let ino = self.volume_ino(i, &g, v)?;
                    out.push((e.name.clone().into_bytes(), ino, Kind::Dir));
                }
                out
            }
            Node::RawVolume(i, v) => {
                vec![
                    file("partition.img".into(), Node::VolumeImg(i, v)),
                    file("type.txt".into(), Node::VolumeType(i, v)),
                ]
            }
            _ => return Err(Error::Invalid),
        })
    }

    /// The folder of volume `v`: its filesystem's root, or a made-up folder with the raw
    /// volume when there is no readable filesystem.
    fn volume_ino(&self, snap: usize, g: &Guest, v: usize) -> Result<u64> {
        if g.browsable(v) {
            if let Ok(fs) = g.filesystem(v) {
                let slot = self.slot_for(snap, v, &fs)?;
                return Self::encode(slot, fs.root());
            }
        }
        Ok(self.intern(Node::RawVolume(snap, v)))
    }

    /// The node named `name` in folder `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Stat> {
        if let Some((slot, fs)) = self.guest_node(parent)? {
            let g = fs.lookup(parent & GUEST_MASK, name)?.ok_or(Error::NotFound)?;
            return self.stat(Self::encode(slot, g)?);
        }
        let found = self.read_dir(parent)?.into_iter().find(|(n, _, _)| n == name);
        match found {
            Some((_, ino, _)) => self.stat(ino),
            None if matches!(self.node(parent)?, Node::Root | Node::Vm(_)) => {
                // Perhaps made since the last listing.
                self.refresh(true)?;
                let (_, ino, _) =
                    self.read_dir(parent)?.into_iter().find(|(n, _, _)| n == name).ok_or(Error::NotFound)?;
                self.stat(ino)
            }
            None => Err(Error::NotFound),
        }
    }

    pub fn read_link(&self, ino: u64) -> Result<Vec<u8>> {
        if let Some((_, fs)) = self.guest_node(ino)? {
            return Ok(fs.read_link(ino & GUEST_MASK)?);
        }
        match self.node(ino)? {
            Node::Latest(vm) => Ok(self.latest(&vm)?.into_bytes()),
            _ => Err(Error::Invalid),
        }
    }

    /// The contents of file `ino`.
    pub fn open(&self, ino: u64) -> Result<Arc<dyn BlockDev>> {
        if let Some((_, fs)) = self.guest_node(ino)? {
            return Ok(fs.open(ino & GUEST_MASK)?);
        }
        Ok(match self.node(ino)? {
            Node::VmJson(i) => Arc::new(MemDev::new(Self::manifest_json(&*self.snap(i)?).to_vec())),
            Node::Disk(i, name) | Node::Memory(i, name) => self.stream(&*self.snap(i)?, &name)?,
            Node::DiskVhd(i, name) => {
                let s = self.snap(i)?;
                let dev = self.stream(&s, &name)?;
                let vhd = disk_formats::vhd::FixedView::new(dev, vhd_id(&s.entry.id, &name), vhd_time(s.time))
                    .map_err(|e| Error::Io(e.to_string()))?;
                Arc::new(vhd)
            }
            Node::VolumeImg(i, v) => {
                let g = self.guest(&*self.snap(i)?)?;
                g.volumes.get(v).and_then(|e| e.dev.clone()).ok_or_else(|| Error::Io("volume cannot be read".into()))?
            }
            Node::VolumeType(i, v) => {
                let g = self.guest(&*self.snap(i)?)?;
                Arc::new(MemDev::new(Self::volume_type(&g, v)))
            }
            _ => return Err(Error::Invalid),
        })
    }

    /// Whether `ino` may change while mounted (the root, VM folders, `latest`), so the
    /// kernel should cache it only briefly.
    pub fn is_volatile(&self, ino: u64) -> bool {
        ino >> SLOT_SHIFT == 0 && matches!(self.node(ino), Ok(Node::Root | Node::Vm(_) | Node::Latest(_)))
    }
}
