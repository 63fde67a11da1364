//! A backup run over many VMs, with the pool-wide limits Xen Orchestra uses (reference
//! §8.1): VMs at once, snapshots at once, disk exports at once. Snapshots are taken first,
//! as close together as the snapshot limit allows, then the VMs are transferred.

use std::sync::{Arc, Condvar, Mutex};

use archive::Repository;

use crate::backup::{self, LogLine, Options, VmResult};
use crate::error::Result;
use crate::select::Selection;
use crate::xapi::Client;

/// A counting semaphore.
#[derive(Debug)]
pub struct Semaphore {
    free: Mutex<usize>,
    cv: Condvar,
}

/// A held slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit(Arc<Semaphore>);

impl Semaphore {
    pub fn new(n: usize) -> Arc<Semaphore> {
        Arc::new(Semaphore { free: Mutex::new(n.max(1)), cv: Condvar::new() })
    }

    pub fn acquire(self: &Arc<Self>) -> Permit {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.cv.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        Permit(self.clone())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.cv.notify_one();
    }
}

/// What every disk transfer of a backup shares: the count of bytes received from the pool,
/// the flag that stops reads (Ctrl-C), and the pool's export slots (one is held while a
/// transfer runs).
#[derive(Clone, Debug, Default)]
pub struct Transfer {
    pub received: Arc<std::sync::atomic::AtomicU64>,
    pub cancel: Arc<std::sync::atomic::AtomicBool>,
    pub exports: Option<Arc<Semaphore>>,
}

impl Transfer {
    /// `Interrupted` once the cancel flag is set.
    pub fn check(&self) -> std::io::Result<()> {
        if self.cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "interrupted"));
        }
        Ok(())
    }

    /// An export slot (waiting for one), or none without a limit.
    pub fn slot(&self) -> Option<Permit> {
        self.exports.as_ref().map(|s| s.acquire())
    }

    pub fn count(&self, n: u64) {
        self.received.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The pool-wide limits of one run.
#[derive(Debug)]
pub struct Limits {
    pub vms: usize,
    pub snapshots_at_once: usize,
    pub snapshots: Arc<Semaphore>,
    pub exports: Arc<Semaphore>,
}

impl Limits {
    pub fn new(vms: usize, snapshots: usize, exports: usize) -> Arc<Limits> {
        Arc::new(Limits {
            vms: vms.max(1),
            snapshots_at_once: snapshots.max(1),
            snapshots: Semaphore::new(snapshots),
            exports: Semaphore::new(exports),
        })
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    pub results: Vec<VmResult>,
    /// (VM, reason) for VMs the selection matched but left out.
    pub skipped: Vec<(String, String)>,
}

/// Select, snapshot, transfer.
pub fn run(
    client: &Arc<Client>,
    repo: &Arc<Repository>,
    sel: &Selection,
    opts: &Options,
    limits: &Arc<Limits>,
    log: &(dyn Fn(LogLine) + Sync),
) -> Result<Report> {
    let picked = sel.pick(client)?;
    let mut report = Report { skipped: picked.skipped, ..Report::default() };
    for m in picked.missing {
        report.results.push(VmResult::failed(m.clone(), String::new(), Some(format!("no VM named {m:?} on the pool"))));
    }
    let refs: Vec<String> = picked.vms.iter().map(|(r, _)| r.clone()).collect();
    // Phase 1: snapshots, `snapshots` at a time.
    let pending = parallel(&refs, limits.snapshots_at_once, |vm| backup::prepare(client, vm, opts, limits, log));
    // Phase 2: transfers, `vms` at a time.
    let results = parallel_owned(pending, limits.vms, |p| backup::complete(client, repo, p, opts, limits, log));
    report.results.extend(results);
    Ok(report)
}

/// Map `f` over `items` on up to `n` threads, keeping the order.
fn parallel<T: Sync, R: Send>(items: &[T], n: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..n.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(item) = items.get(i) else { break };
                *out[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(f(item));
            });
        }
    });
    out.into_iter().filter_map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner())).collect()
}

fn parallel_owned<T: Send, R: Send>(items: Vec<T>, n: usize, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    parallel(&slots, n, |m| {
        let t = m.lock().unwrap_or_else(|e| e.into_inner()).take().expect("each item is taken once");
        f(t)
    })
}
