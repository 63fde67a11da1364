//! Repository locks: files in `locks/`, sealed like every other object.
//!
//! Long readers (mount, serve, restore-files) hold a read lock; a backup (and forget) a shared
//! one; prune a prune lock, which coexists with both and excludes other prunes; check and key
//! changes an exclusive one, which excludes every other lock (FORMAT.md §9.4). To take
//! a lock a process writes its lock file first, then lists the others: on a conflict it
//! removes its own and fails, so two racing processes both back off rather than both win.
//! A lock is stale when its process is gone (same host) or it has not been refreshed for
//! `stale_after`; a held lock is refreshed every `stale_after / 6` by a background thread.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::crypto::Sealer;
use crate::error::{Error, Result};
use crate::object::{open_object, seal_object, LOCK_MAGIC};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    /// A long reader (mount, serve, restore-files): keeps check and key changes out, and
    /// nothing else; a prune does not wait for it (FORMAT.md §14 says what readers see).
    Read,
    /// A writer of new data (backup, overlay commit, forget).
    Shared,
    /// Prune: runs beside backups (its own protocol keeps them safe, FORMAT.md §14), never
    /// beside another prune or an exclusive holder.
    Prune,
    Exclusive,
}

impl LockKind {
    /// Whether a holder of `self` and a holder of `other` may run at the same time.
    pub fn coexists_with(self, other: LockKind) -> bool {
        use LockKind::{Exclusive, Prune, Read};
        match (self, other) {
            (Exclusive, _) | (_, Exclusive) | (Prune, Prune) => false,
            (Read | LockKind::Shared | Prune, _) => true,
        }
    }
}

/// The body of a lock file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockInfo {
    pub version: u32,
    pub kind: LockKind,
    pub host: String,
    pub pid: u32,
    pub created: String,
    pub refreshed: String,
    pub command: String,
}

/// Default age after which an unrefreshed lock is stale.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(30 * 60);

pub fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    match rustix::process::Pid::from_raw(pid) {
        Some(p) => !matches!(rustix::process::test_kill_process(p), Err(rustix::io::Errno::SRCH)),
        None => false,
    }
}

/// Why the holder of a lock-like record (process `pid` on `host`, last alive at `refreshed`)
/// counts as gone, or `None` when it may still be running: its process is gone from this
/// host, or it has not refreshed for `stale_after`.
pub fn holder_gone(host: &str, pid: u32, refreshed: &str, stale_after: Duration) -> Option<String> {
    if host == hostname() && !process_alive(pid) {
        return Some(format!("process {pid} on {host} is gone"));
    }
    let Ok(refreshed) = refreshed.parse::<jiff::Timestamp>() else {
        return Some(format!("refresh time {refreshed:?} is unreadable"));
    };
    let age = jiff::Timestamp::now().duration_since(refreshed);
    let limit = jiff::SignedDuration::try_from(stale_after).ok()?;
    (age > limit).then(|| format!("not refreshed for {}s", age.as_secs()))
}

impl LockInfo {
    /// Why this lock is stale, or `None` when it may still be held.
    pub fn stale_reason(&self, stale_after: Duration) -> Option<String> {
        if self.version != 1 {
            // A lock from a newer vmvault: never assume it is gone.
            return None;
        }
        holder_gone(&self.host, self.pid, &self.refreshed, stale_after)
    }

    pub fn describe(&self) -> String {
        format!("{:?} lock by pid {} on {} ({}) since {}", self.kind, self.pid, self.host, self.command, self.created)
    }
}

/// A lock file as found in `locks/`.
#[derive(Debug)]
pub struct FoundLock {
    pub name: String,
    pub info: Result<LockInfo>,
}

pub fn list_locks(backend: &dyn Backend, sealer: &Sealer) -> Result<Vec<FoundLock>> {
    let mut out = Vec::new();
    for name in backend.list("locks")? {
        let path = format!("locks/{name}");
        let info = match backend.read(&path) {
            Ok(bytes) => open_object(sealer, LOCK_MAGIC, &bytes, &path)
                .and_then(|body| serde_json::from_slice(&body).map_err(|e| Error::corrupt(&path, e.to_string()))),
            // Removed between list and read: it is gone, skip it.
            Err(Error::Missing { .. }) => continue,
            Err(e) => Err(e),
        };
        out.push(FoundLock { name, info });
    }
    Ok(out)
}

/// A held lock; dropping it removes the lock file.
#[derive(Debug)]
pub struct LockGuard {
    backend: Arc<dyn Backend>,
    path: String,
    stop: Arc<(Mutex<bool>, Condvar)>,
    refresher: Option<JoinHandle<()>>,
}

fn write_lock(backend: &dyn Backend, sealer: &Sealer, path: &str, info: &LockInfo) -> Result<()> {
    let body = serde_json::to_vec(info).expect("lock serializes");
    backend.write(path, &seal_object(sealer, LOCK_MAGIC, &body, 3)?)
}

impl LockGuard {
    pub fn acquire(
        backend: Arc<dyn Backend>,
        sealer: Arc<Sealer>,
        kind: LockKind,
        command: &str,
        stale_after: Duration,
    ) -> Result<Self> {
        let name = hex::encode(crate::crypto::random_array::<16>()?);
        let path = format!("locks/{name}");
        let now = jiff::Timestamp::now().to_string();
        let mut info = LockInfo {
            version: 1,
            kind,
            host: hostname(),
            pid: std::process::id(),
            created: now.clone(),
            refreshed: now,
            command: command.to_string(),
        };
        write_lock(&*backend, &sealer, &path, &info)?;
        let conflict = list_locks(&*backend, &sealer).and_then(|locks| {
            for l in locks.into_iter().filter(|l| l.name != name) {
                match l.info {
                    Ok(other) if other.stale_reason(stale_after).is_some() => {}
                    Ok(other) if kind.coexists_with(other.kind) => {}
                    Ok(other) => return Ok(Some(other.describe())),
                    Err(e) => return Ok(Some(format!("unreadable lock {} ({e})", l.name))),
                }
            }
            Ok(None)
        });
        match conflict {
            Ok(None) => {}
            Ok(Some(desc)) => {
                let _ = backend.remove(&path);
                return Err(Error::Locked(format!("{desc}; if that process is gone, run `vmvault unlock`")));
            }
            Err(e) => {
                let _ = backend.remove(&path);
                return Err(e);
            }
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let refresher = {
            let (backend, stop, path) = (backend.clone(), stop.clone(), path.clone());
            let every = stale_after / 6;
            std::thread::Builder::new()
                .name("lock-refresh".into())
                .spawn(move || {
                    let (m, cv) = &*stop;
                    let mut stopped = m.lock().unwrap_or_else(|e| e.into_inner());
                    while !*stopped {
                        let (g, timeout) = cv.wait_timeout(stopped, every).unwrap_or_else(|e| e.into_inner());
                        stopped = g;
                        if timeout.timed_out() && !*stopped {
                            info.refreshed = jiff::Timestamp::now().to_string();
                            let _ = write_lock(&*backend, &sealer, &path, &info);
                        }
                    }
                })
                .map_err(|e| Error::io("starting the lock refresher", e))?
        };
        Ok(Self { backend, path, stop, refresher: Some(refresher) })
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let (m, cv) = &*self.stop;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(h) = self.refresher.take() {
            let _ = h.join();
        }
        let _ = self.backend.remove(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    #[test]
    fn shared_locks_coexist_exclusive_conflicts_and_drop_is_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path()));
        let sealer = Arc::new(Sealer::new(&[1u8; 32]).unwrap());
        let stale = DEFAULT_STALE_AFTER;
        let a = LockGuard::acquire(backend.clone(), sealer.clone(), LockKind::Shared, "a", stale).unwrap();
        let b = LockGuard::acquire(backend.clone(), sealer.clone(), LockKind::Shared, "b", stale).unwrap();
        let err = LockGuard::acquire(backend.clone(), sealer.clone(), LockKind::Exclusive, "c", stale).unwrap_err();
        assert!(matches!(err, Error::Locked(_)), "{err}");
        assert_eq!(list_locks(&*backend, &sealer).unwrap().len(), 2, "the failed attempt removed its file");
        // Dropping must not wait for the refresh interval (a regression: it once did).
        let t = std::time::Instant::now();
        drop(a);
        drop(b);
        assert!(t.elapsed() < Duration::from_secs(5));
        let x = LockGuard::acquire(backend.clone(), sealer.clone(), LockKind::Exclusive, "x", stale).unwrap();
        assert!(LockGuard::acquire(backend.clone(), sealer.clone(), LockKind::Shared, "y", stale).is_err());
        assert!(LockGuard::acquire(backend.clone(), sealer.clone(), LockKind::Prune, "y", stale).is_err());
        drop(x);
        // Prune runs beside backups, never beside another prune or check.
        let p = LockGuard::acquire(backend.clone(), sealer.clone(), LockKind::Prune, "p", stale).unwrap();
        let s = LockGuard::acquire(backend.clone(), sealer.clone(), LockKind::Shared, "s", stale).unwrap();
        assert!(LockGuard::acquire(backend.clone(), sealer.clone(), LockKind::Prune, "p2", stale).is_err());
        assert!(LockGuard::acquire(backend.clone(), sealer.clone(), LockKind::Exclusive, "c", stale).is_err());
        let r = LockGuard::acquire(backend.clone(), sealer.clone(), LockKind::Read, "r", stale).unwrap();
        drop((p, s));
        assert!(LockGuard::acquire(backend.clone(), sealer.clone(), LockKind::Exclusive, "c", stale).is_err());
        drop(r);
        assert!(list_locks(&*backend, &sealer).unwrap().is_empty());
    }

    #[test]
    fn dead_process_lock_is_stale() {
        let info = LockInfo {
            version: 1,
            kind: LockKind::Exclusive,
            host: hostname(),
            pid: i32::MAX as u32 - 7,
            created: jiff::Timestamp::now().to_string(),
            refreshed: jiff::Timestamp::now().to_string(),
            command: "t".into(),
        };
        assert!(info.stale_reason(DEFAULT_STALE_AFTER).is_some());
        let old = LockInfo { host: "elsewhere".into(), refreshed: "2000-01-01T00:00:00Z".into(), ..info.clone() };
        assert!(old.stale_reason(DEFAULT_STALE_AFTER).is_some());
        let fresh = LockInfo { host: "elsewhere".into(), ..info };
        assert!(fresh.stale_reason(DEFAULT_STALE_AFTER).is_none());
    }
}
