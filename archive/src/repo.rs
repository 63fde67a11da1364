//! Opening, creating and reading a repository: config, keys, objects, snapshots, the index.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, LocalBackend};
use crate::chunker::ChunkerParams;
use crate::config::Config;
use crate::crypto::{MasterKey, Sealer};
use crate::error::{Error, Result};
use crate::extents::StreamMap;
use crate::id::{ObjectId, PackId, SnapshotId};
use crate::index::{IndexFile, IndexSet};
use crate::keyfile::{KdfParams, KeyFile};
use crate::lock::{LockGuard, LockKind, DEFAULT_STALE_AFTER};
use crate::manifest::{Snapshot, SnapshotEntry};
use crate::object::{open_object, seal_object, SNAPSHOT_MAGIC, STREAM_MAGIC};
use crate::pack::{pack_path, parse_toc, BlobEntry};

/// Folders of a repository.
pub const DIRS: [&str; 6] = ["keys", "data", "index", "snapshots", "streams", "locks"];

/// Choices made once, at `init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub chunker: ChunkerParams,
    pub zstd_level: i32,
    pub kdf: KdfParams,
    /// IANA name of the zone retention periods are read in (`Config::time_zone`).
    pub time_zone: Option<String>,
    /// Target pack size in bytes (`Config::pack_size`, 1 MiB ..= 1 GiB).
    pub pack_size: u32,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            chunker: ChunkerParams::Fixed { size: 1 << 20 },
            zstd_level: 3,
            kdf: KdfParams::default(),
            time_zone: None,
            pack_size: 16 << 20,
        }
    }
}

/// An open repository: its config and master key. Cheap to share (`Arc`) between threads.
#[derive(Debug)]
pub struct Repository {
    path: PathBuf,
    backend: Arc<dyn Backend>,
    config: Config,
    key: MasterKey,
    sealer: Arc<Sealer>,
    key_name: String,
    /// Age after which another process's lock counts as stale.
    pub stale_after: Duration,
}

impl Repository {
    /// Create a repository in `path` (which must not exist, or be an empty folder).
    pub fn init(path: &Path, passphrase: &[u8], opts: &InitOptions) -> Result<Self> {
        if path.join("config").exists() {
            return Err(Error::Usage(format!("{} already holds a repository", path.display())));
        }
        if let Ok(mut rd) = std::fs::read_dir(path) {
            if rd.next().is_some() {
                return Err(Error::Usage(format!("{} exists and is not empty", path.display())));
            }
        }
        let mut config = Config::new(opts.chunker, opts.zstd_level)?;
        if !(1 << 20..=1 << 30).contains(&opts.pack_size) {
            return Err(Error::Usage(format!("pack size {} bytes: give 1 MiB to 1 GiB", opts.pack_size)));
        }
        config.pack_size = opts.pack_size;
        if let Some(tz) = &opts.time_zone {
            jiff::tz::TimeZone::get(tz).map_err(|e| Error::Usage(format!("time zone {tz:?}: {e}")))?;
            config.time_zone = Some(tz.clone());
        }
        let backend = LocalBackend::new(path);
        for d in DIRS {
            std::fs::create_dir_all(path.join(d))
                .map_err(|e| Error::io(format!("creating {}", path.join(d).display()), e))?;
        }
        std::fs::File::open(path)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("syncing {}", path.display()), e))?;
        let key = MasterKey::generate()?;
        let kf = KeyFile::wrap(&key, passphrase, &config.id_bytes(), opts.kdf)?;
        let key_name = hex::encode(crate::crypto::random_array::<16>()?);
        backend.create_new(&format!("keys/{key_name}"), &kf.to_json())?;
        // The config last: a folder without one is not a repository yet.
        backend.create_new("config", &config.to_json())?;
        Self::assemble(path, Arc::new(backend), config, key, key_name)
    }

    /// Open the repository in `path` with a passphrase that fits one of its key files.
    pub fn open(path: &Path, passphrase: &[u8]) -> Result<Self> {
        let backend = LocalBackend::new(path);
        let config = match backend.read("config") {
            Ok(c) => Config::from_json(&c)?,
            Err(Error::Missing { .. }) => {
                return Err(Error::Usage(format!(
                    "{} is not a vmvault repository (no config); create one with `vmvault init`",
                    path.display()
                )))
            }
            Err(e) => return Err(e),
        };
        // A damaged or foreign key file must not lock out the others: try every one, and
        // only say why they failed when none fits.
        let mut unreadable = Vec::new();
        for name in backend.list("keys")? {
            let tried = KeyFile::from_json(&backend.read(&format!("keys/{name}"))?, &name)
                .and_then(|kf| kf.unwrap_key(passphrase, &config.id_bytes(), &name));
            match tried {
                Ok(Some(key)) => return Self::assemble(path, Arc::new(backend), config, key, name),
                Ok(None) => {}
                Err(e) => unreadable.push(e),
            }
        }
        match unreadable.into_iter().next() {
            Some(e) => Err(e),
            None => Err(Error::WrongPassword(path.join("keys"))),
        }
    }

    fn assemble(
        path: &Path,
        backend: Arc<dyn Backend>,
        config: Config,
        key: MasterKey,
        key_name: String,
    ) -> Result<Self> {
        let sealer = Arc::new(key.sealer()?);
        Ok(Self { path: path.to_path_buf(), backend, config, key, sealer, key_name, stale_after: DEFAULT_STALE_AFTER })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The zone retention reads calendar periods in: `over` (a `--time-zone`), else the
    /// repository's, else this machine's.
    pub fn time_zone(&self, over: Option<&str>) -> Result<jiff::tz::TimeZone> {
        match over.or(self.config.time_zone.as_deref()) {
            Some(name) => jiff::tz::TimeZone::get(name).map_err(|e| Error::Usage(format!("time zone {name:?}: {e}"))),
            None => Ok(jiff::tz::TimeZone::system()),
        }
    }
    pub fn key(&self) -> &MasterKey {
        &self.key
    }
    pub fn sealer(&self) -> &Arc<Sealer> {
        &self.sealer
    }
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    /// The key file this repository was opened with.
    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    pub fn lock(&self, kind: LockKind, command: &str) -> Result<LockGuard> {
        LockGuard::acquire(self.backend.clone(), self.sealer.clone(), kind, command, self.stale_after)
    }

    // ---- keys ----

    pub fn list_keys(&self) -> Result<Vec<(String, KeyFile)>> {
        self.backend
            .list("keys")?
            .into_iter()
            .map(|name| {
                let kf = KeyFile::from_json(&self.backend.read(&format!("keys/{name}"))?, &name)?;
                Ok((name, kf))
            })
            .collect()
    }

    /// Add a key file for `passphrase`; returns its name.
    pub fn add_key(&self, passphrase: &[u8], kdf: KdfParams) -> Result<String> {
        let kf = KeyFile::wrap(&self.key, passphrase, &self.config.id_bytes(), kdf)?;
        let name = hex::encode(crate::crypto::random_array::<16>()?);
        self.backend.create_new(&format!("keys/{name}"), &kf.to_json())?;
        Ok(name)
    }

    /// Remove a key file (by name or unique prefix). The last key, and the key in use, stay.
    pub fn remove_key(&self, prefix: &str) -> Result<String> {
        let names = self.backend.list("keys")?;
        let matches: Vec<&String> = names.iter().filter(|n| n.starts_with(prefix)).collect();
        let name = match matches.as_slice() {
            [one] => (*one).clone(),
            [] => return Err(Error::Usage(format!("no key file starts with {prefix:?}"))),
            _ => return Err(Error::Usage(format!("{prefix:?} matches {} key files; give more digits", matches.len()))),
        };
        if name == self.key_name {
            return Err(Error::Usage("refusing to remove the key in use; open with another key to remove it".into()));
        }
        if names.len() <= 1 {
            return Err(Error::Usage("refusing to remove the last key".into()));
        }
        self.backend.remove(&format!("keys/{name}"))?;
        Ok(name)
    }

    /// Change the passphrase of the key in use: add a new key file, then remove the old one.
    pub fn change_passphrase(&mut self, new: &[u8], kdf: KdfParams) -> Result<String> {
        let name = self.add_key(new, kdf)?;
        self.backend.remove(&format!("keys/{}", self.key_name))?;
        self.key_name = name.clone();
        Ok(name)
    }

    // ---- objects ----

    /// Store an object body under its keyed hash; a no-op when it already exists.
    pub fn save_object(&self, dir: &str, magic: &[u8; 8], body: &[u8]) -> Result<ObjectId> {
        let id = ObjectId(self.key.keyed_hash(body));
        let path = format!("{dir}/{}", id.to_hex());
        if !self.backend.exists(&path) {
            self.backend.write(&path, &seal_object(&self.sealer, magic, body, self.config.compression.level)?)?;
        }
        Ok(id)
    }

    /// Load an object body and check it hashes to its id.
    pub fn load_object(&self, dir: &str, magic: &[u8; 8], id: &ObjectId) -> Result<Vec<u8>> {
        let path = format!("{dir}/{}", id.to_hex());
        let size = self.backend.size(&path)?;
        if size > crate::object::MAX_OBJECT_BODY as u64 + 64 {
            return Err(Error::corrupt(path, format!("{size} bytes is over the object size limit")));
        }
        let body = open_object(&self.sealer, magic, &self.backend.read(&path)?, &path)?;
        if self.key.keyed_hash(&body) != id.0 {
            return Err(Error::corrupt(path, "content does not hash to its name"));
        }
        Ok(body)
    }

    /// Write a sealed JSON object that is not content-addressed (prune markers, holds).
    pub fn write_json_object(&self, path: &str, magic: &[u8; 8], value: &impl serde::Serialize) -> Result<()> {
        let body = serde_json::to_vec(value).map_err(|e| Error::Usage(format!("{path}: {e}")))?;
        self.backend.write(path, &seal_object(&self.sealer, magic, &body, 3)?)
    }

    /// Read a sealed JSON object written by [`write_json_object`](Self::write_json_object);
    /// `None` when it does not exist (removed meanwhile).
    pub fn read_json_object<T: serde::de::DeserializeOwned>(&self, path: &str, magic: &[u8; 8]) -> Result<Option<T>> {
        let bytes = match self.backend.read(path) {
            Ok(b) => b,
            Err(Error::Missing { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let body = open_object(&self.sealer, magic, &bytes, path)?;
        serde_json::from_slice(&body).map(Some).map_err(|e| Error::corrupt(path, e.to_string()))
    }

    pub fn save_stream_map(&self, map: &StreamMap) -> Result<ObjectId> {
        self.save_object("streams", STREAM_MAGIC, &map.to_bytes())
    }

    pub fn load_stream_map(&self, id: &ObjectId) -> Result<StreamMap> {
        let body = self.load_object("streams", STREAM_MAGIC, id)?;
        StreamMap::from_bytes(&body, &format!("streams/{}", id.to_hex()))
    }

    pub fn save_snapshot(&self, snap: &Snapshot) -> Result<SnapshotId> {
        self.save_object("snapshots", SNAPSHOT_MAGIC, &snap.to_json())
    }

    pub fn load_snapshot(&self, id: &SnapshotId) -> Result<Snapshot> {
        let body = self.load_object("snapshots", SNAPSHOT_MAGIC, id)?;
        Snapshot::from_json(&body, &format!("snapshots/{}", id.to_hex()))
    }

    /// Remove snapshot `id`'s manifest (its data stays until `prune`), unless it is held
    /// (`hold.rs`: the base of an overlay). Removing one that is already gone is not an
    /// error, so an interrupted `forget` can simply be run again.
    pub fn forget_snapshot(&self, id: &SnapshotId) -> Result<()> {
        crate::hold::forget(self, id)
    }

    /// Every snapshot, oldest first. Unreadable manifests are errors.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotEntry>> {
        let mut out = Vec::new();
        for name in self.backend.list("snapshots")? {
            // Stray files (not a lower-case 64-digit id) are not snapshots; `check` warns.
            let Ok(id) = name.parse::<SnapshotId>() else { continue };
            if id.to_hex() != name {
                continue;
            }
            match self.load_snapshot(&id) {
                Ok(snapshot) => out.push(SnapshotEntry { id, snapshot }),
                // Forgotten between the listing and the read.
                Err(Error::Missing { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| (a.snapshot.timestamp(), &a.snapshot.time).cmp(&(b.snapshot.timestamp(), &b.snapshot.time)));
        Ok(out)
    }

    /// The newest snapshot of `vm`, if any.
    pub fn latest_snapshot(&self, vm: &str) -> Result<Option<SnapshotEntry>> {
        Ok(self.list_snapshots()?.into_iter().filter(|s| s.snapshot.vm == vm).last())
    }

    /// Resolve `vm@latest`, `vm@<id-prefix>` or `<id-prefix>`.
    pub fn resolve_snapshot(&self, spec: &str) -> Result<SnapshotEntry> {
        let all = self.list_snapshots()?;
        let (vm, rest) = match spec.split_once('@') {
            Some((vm, rest)) => (Some(vm), rest),
            None => (None, spec),
        };
        let candidates: Vec<SnapshotEntry> = all
            .into_iter()
            .filter(|s| vm.is_none_or(|vm| s.snapshot.vm == vm))
            .filter(|s| rest == "latest" && vm.is_some() || s.id.to_hex().starts_with(&rest.to_ascii_lowercase()))
            .collect();
        if rest == "latest" && vm.is_some() {
            return candidates.into_iter().last().ok_or_else(|| {
                Error::Usage(format!("no snapshot of VM {:?}; see `vmvault snapshots`", vm.unwrap_or_default()))
            });
        }
        if rest.len() < 4 {
            return Err(Error::Usage(format!("snapshot {spec:?}: give at least 4 hex digits of the id, or VM@latest")));
        }
        match candidates.len() {
            1 => Ok(candidates.into_iter().next().expect("one")),
            0 => Err(Error::Usage(format!("no snapshot matches {spec:?}; see `vmvault snapshots`"))),
            n => Err(Error::Usage(format!("{spec:?} matches {n} snapshots; give more digits"))),
        }
    }

    // ---- packs ----

    /// Every pack file in the repository, by name. Files that are not named like a pack in
    /// its right folder are ignored.
    pub fn list_packs(&self) -> Result<Vec<PackId>> {
        let mut out = Vec::new();
        for dir in self.backend.list("data")? {
            for name in self.backend.list(&format!("data/{dir}"))? {
                match name.parse::<PackId>() {
                    Ok(id) if id.to_hex() == name && name[..2] == dir => out.push(id),
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// A pack's table of contents, read from its tail.
    pub fn read_pack_toc(&self, pack: &PackId) -> Result<Vec<BlobEntry>> {
        let path = pack_path(pack);
        let size = self.backend.size(&path)?;
        if size < 8 + 12 {
            return Err(Error::corrupt(&path, format!("{size} bytes is too short for a pack")));
        }
        let tail = self.backend.read_range(&path, size - 12, 12)?;
        let toc_len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
        if toc_len + 20 > size {
            return Err(Error::corrupt(&path, format!("table of contents length {toc_len} exceeds the pack")));
        }
        let tail = self.backend.read_range(&path, size - 12 - toc_len, (toc_len + 12) as usize)?;
        parse_toc(&self.sealer, size, &tail, &path)
    }

    // ---- index ----

    /// Open every index file's directory. `cache_pages` bounds decrypted pages in memory.
    pub fn load_index(&self, cache_pages: usize) -> Result<IndexSet> {
        let mut files = Vec::new();
        for name in self.backend.list("index")? {
            match IndexFile::open(&*self.backend, &self.sealer, &name) {
                Ok(f) => files.push(f),
                // Replaced by a prune between the listing and the read. Its replacement was
                // written first; if this listing missed it, readers that miss a chunk reload.
                Err(Error::Missing { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(IndexSet::new(files, cache_pages))
    }
}
