//! `vmvault serve`: every disk of every snapshot as an NBD export, read-only or with a
//! copy-on-write overlay per export.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use archive::manifest::{SnapshotEntry, StreamKind};
use archive::reader::RepoReader;
use archive::Repository;
use blockdev::{BlockDev, FileDev, Overlay, ReadCache};
use clap::Args;
use nbd_server::{Event, Export, Exports, Listener, StaticExports};

use crate::commands::Ctx;
use crate::overlay::OverlayBase;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TCP address to listen on (port 0 picks a free one).
    #[arg(long, conflicts_with = "socket", default_value = "127.0.0.1:10809")]
    listen: SocketAddr,
    /// Listen on this Unix socket instead of TCP.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The default export (also served for the empty name), e.g. web01@latest/xvda.
    #[arg(long)]
    export: Option<String>,
    /// Accept writes, kept in one overlay file per export under --overlay-dir.
    #[arg(long, requires = "overlay_dir")]
    writable: bool,
    /// Folder for overlay files (one subfolder per serve session).
    #[arg(long)]
    overlay_dir: Option<PathBuf>,
    /// Overlay session name; give an earlier one to continue with its overlays.
    #[arg(long, requires = "writable")]
    session: Option<String>,
    /// Copy-on-write block size of new overlays.
    #[arg(long, default_value_t = 65536)]
    overlay_block_size: u32,
    /// Decompressed-chunk cache in memory, in MiB, shared by every export.
    #[arg(long, default_value_t = 64)]
    cache_mib: usize,
    /// Folder for the read cache: blocks read once are kept in an anonymous (unnamed,
    /// self-deleting) file there, so reading them again costs a local read. [default: $TMPDIR]
    #[arg(long)]
    read_cache_dir: Option<PathBuf>,
    /// Most bytes the read cache keeps per export, in MiB.
    #[arg(long, default_value_t = 16384)]
    read_cache_max_mib: u64,
    /// No read cache: every read decrypts and decompresses from the repository.
    #[arg(long, conflicts_with_all = ["read_cache_dir"])]
    no_read_cache: bool,
    /// Connections served at once.
    #[arg(long, default_value_t = 64)]
    max_connections: usize,
    /// TLS (STARTTLS): `required` refuses clients until they start TLS, `optional` lets them
    /// choose, `off` refuses STARTTLS. [default: required with --tls-cert, else off]
    #[arg(long, value_enum)]
    tls: Option<TlsMode>,
    /// PEM certificate chain for TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow listening on a non-loopback address without required TLS.
    #[arg(long)]
    insecure: bool,
    /// Serve this raw image file instead of a repository (for tests and benchmarks).
    #[arg(long, hide = true)]
    image: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TlsMode {
    Off,
    Optional,
    Required,
}

fn tls_config(args: &ServeArgs) -> Result<Option<nbd_server::Tls>> {
    let mode = args.tls.unwrap_or(if args.tls_cert.is_some() { TlsMode::Required } else { TlsMode::Off });
    match (mode, &args.tls_cert, &args.tls_key) {
        (TlsMode::Off, _, _) => Ok(None),
        (_, Some(cert), Some(key)) => {
            let acceptor = nbd_server::tls::acceptor(cert, key).context("loading the TLS certificate and key")?;
            Ok(Some(nbd_server::Tls { acceptor, required: mode == TlsMode::Required }))
        }
        _ => bail!("--tls {mode:?} needs --tls-cert and --tls-key"),
    }
}

/// Exports backed by the repository, opened on first use and kept for the server's life.
struct RepoExports {
    reader: RepoReader,
    opened: Mutex<HashMap<String, Arc<Export>>>,
    default: Option<String>,
    overlays: Option<(PathBuf, u32)>,
    /// Folder and per-export byte limit of the read cache.
    read_cache: Option<(PathBuf, u64)>,
}

/// Read-cache granularity: the default chunk size, so one fetch fills one block.
const READ_CACHE_BLOCK: u64 = 1 << 20;

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl RepoExports {
    fn new(repo: Arc<Repository>, args: &ServeArgs, session_dir: Option<PathBuf>) -> Result<Self> {
        Ok(Self {
            reader: RepoReader::new(repo, 256, args.cache_mib << 20)?,
            opened: Mutex::new(HashMap::new()),
            default: args.export.clone(),
            overlays: session_dir.map(|d| (d, args.overlay_block_size)),
            read_cache: (!args.no_read_cache).then(|| {
                (args.read_cache_dir.clone().unwrap_or_else(std::env::temp_dir), args.read_cache_max_mib << 20)
            }),
        })
    }

    fn open_export(&self, name: &str) -> Result<Option<Arc<Export>>> {
        let Some((spec, stream)) = name.rsplit_once('/') else { return Ok(None) };
        let entry = self.reader.repo().resolve_snapshot(spec)?;
        let canonical = format!("{}@{}/{stream}", entry.snapshot.vm, entry.id.to_hex());
        if let Some(e) = self.opened.lock().unwrap_or_else(|e| e.into_inner()).get(&canonical) {
            return Ok(Some(e.clone()));
        }
        let Some(sref) = entry.snapshot.stream(stream) else { return Ok(None) };
        let reader = self.reader.open(&entry, stream)?;
        let base: Box<dyn BlockDev> = match &self.read_cache {
            Some((dir, max)) => Box::new(
                ReadCache::new(reader, dir, READ_CACHE_BLOCK, *max)
                    .with_context(|| format!("creating a read cache in {}", dir.display()))?,
            ),
            None => Box::new(reader),
        };
        let mut description = describe(&entry, stream, sref.kind);
        let (dev, preferred): (Arc<dyn BlockDev>, u32) = match &self.overlays {
            Some((dir, block_size)) if sref.kind == StreamKind::Disk => {
                let path = dir.join(format!("{}@{}.{stream}.ovl", entry.snapshot.vm, entry.id.short()));
                let base_id = OverlayBase { snapshot: entry.id.to_hex(), stream: stream.to_owned() }.id();
                // The base must outlive the overlay: hold it, so forget (and so prune) skip it
                // until `overlay discard`.
                let abs = std::fs::canonicalize(dir)?.join(path.file_name().expect("file name"));
                let abs = abs.to_string_lossy().into_owned();
                let repo = self.reader.repo();
                let held = archive::hold::holds_on(repo, &entry.id)?.iter().any(|h| h.overlay.as_deref() == Some(&abs));
                if !held {
                    archive::hold::hold(repo, &entry.id, &format!("overlay {abs}"), Some(abs.clone()))?;
                }
                let ov = open_overlay(&path, base, &base_id, *block_size)?;
                description.push_str(&format!(", writes kept in {}", path.display()));
                (Arc::new(ov), *block_size)
            }
            _ => (Arc::from(base), 4096),
        };
        let mut export = Export::new(canonical.clone(), description, dev);
        export.preferred_block = preferred;
        let export = Arc::new(export);
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Some(opened.entry(canonical).or_insert(export).clone()))
    }
}

fn describe(e: &SnapshotEntry, stream: &str, kind: StreamKind) -> String {
    let what = if kind == StreamKind::Memory { "memory" } else { "disk" };
    format!("VM {}, {what} {stream}, snapshot {} of {}", e.snapshot.vm, e.id.short(), e.snapshot.time)
}

/// Continue an existing overlay of this base, or start one.
fn open_overlay<B: BlockDev>(path: &Path, base: B, base_id: &str, block_size: u32) -> Result<Overlay<B>> {
    if path.exists() {
        Overlay::open(path, base, Some(base_id), true).with_context(|| format!("opening overlay {}", path.display()))
    } else {
        Overlay::create(path, base, block_size, base_id).with_context(|| format!("creating overlay {}", path.display()))
    }
}

impl Exports for RepoExports {
    fn list(&self) -> std::io::Result<Vec<(String, String)>> {
        let entries = self.reader.repo().list_snapshots().map_err(io_err)?;
        let mut out = Vec::new();
        let mut latest: HashMap<&str, &SnapshotEntry> = HashMap::new();
        for e in &entries {
            for s in &e.snapshot.streams {
                out.push((format!("{}@{}/{}", e.snapshot.vm, e.id.short(), s.name), describe(e, &s.name, s.kind)));
            }
            let l = latest.entry(&e.snapshot.vm).or_insert(e);
            if e.snapshot.time > l.snapshot.time {
                *l = e;
            }
        }
        let mut vms: Vec<_> = latest.into_iter().collect();
        vms.sort_by(|a, b| a.0.cmp(b.0));
        for (vm, e) in vms {
            for s in &e.snapshot.streams {
                out.push((format!("{vm}@latest/{}", s.name), describe(e, &s.name, s.kind)));
            }
        }
        Ok(out)
    }

    fn open(&self, name: &str) -> std::io::Result<Option<Arc<Export>>> {
        let name = if name.is_empty() {
            match &self.default {
                Some(d) => d.as_str(),
                None => return Ok(None),
            }
        } else {
            name
        };
        match self.open_export(name) {
            Ok(e) => Ok(e),
            Err(e) => match e.downcast_ref::<archive::Error>() {
                Some(archive::Error::Missing { .. } | archive::Error::Usage(_)) => Ok(None),
                _ => Err(io_err(format!("{e:#}"))),
            },
        }
    }

    fn shutdown(&self) -> std::io::Result<()> {
        let opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        opened.values().try_for_each(|e| e.dev.flush())
    }
}

pub fn run(ctx: &Ctx, args: ServeArgs) -> Result<()> {
    let tls = tls_config(&args)?;
    let tls_required = tls.as_ref().is_some_and(|t| t.required);
    if args.socket.is_none() && !args.listen.ip().is_loopback() && !tls_required && !args.insecure {
        bail!(
            "{} is not a loopback address: use --tls-cert/--tls-key (TLS required), or --insecure to serve in clear text",
            args.listen
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(io_threads())
        .enable_all()
        .build()?;
    let (exports, lock, session): (Arc<dyn Exports>, _, _) = match &args.image {
        Some(path) => {
            let dev: Arc<dyn BlockDev> = Arc::new(FileDev::open(path)?);
            let name = path.file_name().map_or("image".into(), |n| n.to_string_lossy().into_owned());
            (Arc::new(StaticExports::new(vec![Export::new(name, "raw image", dev)])), None, None)
        }
        None => {
            let repo = Arc::new(ctx.open()?);
            let lock = repo.lock(archive::lock::LockKind::Read, "serve")?;
            let session = match (&args.overlay_dir, args.writable) {
                (Some(dir), true) => Some(session_dir(dir, args.session.as_deref())?),
                _ => None,
            };
            (Arc::new(RepoExports::new(repo, &args, session.clone())?), Some(lock), session)
        }
    };
    rt.block_on(async {
        let (listener, url) = match &args.socket {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                let l = tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
                let scheme = if tls_required { "nbds+unix" } else { "nbd+unix" };
                (Listener::Unix(l), format!("{scheme}:///EXPORT?socket={}", path.display()))
            }
            None => {
                let l = tokio::net::TcpListener::bind(args.listen)
                    .await
                    .with_context(|| format!("listening on {}", args.listen))?;
                let scheme = if tls_required { "nbds" } else { "nbd" };
                let url = format!("{scheme}://{}/EXPORT", l.local_addr()?);
                (Listener::Tcp(l), url)
            }
        };
        if let Some(dir) = &session {
            println!("overlay session {}", dir.display());
        }
        println!("serving {url}");
        use std::io::Write;
        std::io::stdout().flush()?;
        let quiet = ctx.quiet;
        let events: nbd_server::EventSink = Arc::new(move |e| {
            if !quiet {
                log_event(e)
            }
        });
        let config = nbd_server::Config { max_connections: args.max_connections, tls, ..Default::default() };
        nbd_server::serve(listener, exports, config, Some(events), shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    drop(lock);
    Ok(())
}

fn log_event(e: Event) {
    match e {
        Event::Connected { peer, export } => eprintln!("{peer}: connected to {export}"),
        Event::Closed { peer, error: Some(err) } => eprintln!("{peer}: closed: {err}"),
        Event::Closed { .. } => {}
        Event::Refused { peer, why } => eprintln!("{peer}: refused: {why}"),
    }
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// `DIR/SESSION`, created if new; SESSION defaults to the start time.
fn session_dir(dir: &Path, session: Option<&str>) -> Result<PathBuf> {
    let name = match session {
        Some(s) if !s.is_empty() && !s.contains('/') && s != "." && s != ".." => s.to_owned(),
        Some(s) => bail!("{s:?} is not a usable session name"),
        None => format!("serve-{}", jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ")),
    };
    let path = dir.join(name);
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(path)
}

/// Threads doing device I/O for requests (each holds up to a request's buffers): enough to
/// keep every core decrypting and decompressing while others wait on storage, few enough to
/// keep memory bounded.
fn io_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 16) * 4
}
