//! `vmvault export`: a snapshot's disk as raw, VHD, qcow2 or stream-optimized VMDK (or the
//! whole VM as OVA / XVA), to a file or standard output.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use archive::reader::{RepoReader, StreamReader};
use archive::restore::RestoreOptions;
use blockdev::BlockDev;
use clap::{Args, ValueEnum};
use disk_formats::out::{copy_sparse, Background, Output, SparseFile, Stream};

use crate::commands::Ctx;
use crate::human;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The disk's bytes (sparse in a file).
    Raw,
    /// Dynamic VHD (2 MiB blocks; only blocks holding data are stored).
    Vhd,
    /// Fixed VHD: the raw bytes and a footer (sparse in a file).
    VhdFixed,
    /// qcow2 version 3, 64 KiB clusters, zero ranges unallocated.
    Qcow2,
    /// Stream-optimized VMDK (compressed grains), as OVA packages carry.
    Vmdk,
    /// The whole VM: OVF descriptor, SHA-256 manifest and a stream-optimized VMDK per disk.
    Ova,
    /// The whole VM for XenServer / XCP-ng (`xe vm-import`), with its memory when captured.
    Xva,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// SNAPSHOT:DISK for a disk format (e.g. web01@latest:xvda); SNAPSHOT for ova and xva.
    what: String,
    /// Output format.
    #[arg(long, short = 'f', value_enum)]
    format: Format,
    /// File to write, or `-` for standard output.
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Replace an existing file.
    #[arg(long)]
    overwrite: bool,
}

/// Where the bytes go: a file written under a temporary name and renamed when complete (a
/// failed export leaves nothing behind), or standard output.
enum Target {
    File { out: Background<SparseFile>, tmp: PathBuf, path: PathBuf },
    Pipe(Background<Stream<BufWriter<std::io::Stdout>>>),
}

impl Target {
    fn open(path: &Path, overwrite: bool) -> Result<Self> {
        if path == Path::new("-") {
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                bail!("refusing to write a disk image to a terminal; redirect it or pass -o FILE");
            }
            return Ok(Target::Pipe(Background::new(Stream(BufWriter::with_capacity(1 << 20, std::io::stdout())))?));
        }
        if path.exists() && !overwrite {
            bail!("{} exists; pass --overwrite to replace it", path.display());
        }
        let tmp = temp_name(path);
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Target::File { out: Background::new(SparseFile::new(file))?, tmp, path: path.to_path_buf() })
    }

    fn output(&mut self) -> &mut dyn Output {
        match self {
            Target::File { out, .. } => out,
            Target::Pipe(s) => s,
        }
    }

    fn finish(self) -> Result<()> {
        match self {
            Target::File { out, tmp, path } => {
                let file =
                    out.finish().and_then(SparseFile::finish).with_context(|| format!("writing {}", tmp.display()))?;
                file.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
                std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
            }
            Target::Pipe(s) => s.finish().map(drop).map_err(pipe_error),
        }
    }

    fn abandon(self) {
        if let Target::File { tmp, .. } = self {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

pub(crate) fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".vmvault-{}.tmp", std::process::id()));
    path.with_file_name(name)
}

fn pipe_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        crate::commands::BrokenPipe.into()
    } else {
        anyhow!(e).context("writing to standard output")
    }
}

/// Write with `f` into `target`, finishing it on success and removing it on failure.
pub(crate) fn write_target(
    path: &Path,
    overwrite: bool,
    f: impl FnOnce(&mut dyn Output) -> Result<u64>,
) -> Result<u64> {
    let mut target = Target::open(path, overwrite)?;
    match f(target.output()) {
        Ok(n) => {
            target.finish()?;
            Ok(n)
        }
        Err(e) => {
            target.abandon();
            match e.root_cause().downcast_ref::<std::io::Error>() {
                Some(io) if io.kind() == std::io::ErrorKind::BrokenPipe => Err(crate::commands::BrokenPipe.into()),
                _ => Err(e),
            }
        }
    }
}

/// Open the repository for reading (a read lock, as mount and serve take). Exports read
/// each chunk once, front to back: a small chunk cache is enough.
pub(crate) fn open_reader(ctx: &Ctx, command: &str) -> Result<(Arc<RepoReader>, archive::lock::LockGuard)> {
    let repo = Arc::new(ctx.open()?);
    let lock = repo.lock(archive::lock::LockKind::Read, command)?;
    Ok((Arc::new(RepoReader::new(repo, 1024, 32 << 20)?), lock))
}

pub fn run(ctx: &Ctx, a: ExportArgs) -> Result<()> {
    if matches!(a.format, Format::Ova | Format::Xva) {
        return export_vm(ctx, &a);
    }
    let (snap, disk) = crate::commands::split_what(&a.what)?;
    let (reader, _lock) = open_reader(ctx, "export")?;
    let entry = reader.repo().resolve_snapshot(snap)?;
    let stream = Arc::new(reader.open(&entry, disk)?);
    let start = Instant::now();
    let written = if a.format == Format::Raw && a.output != Path::new("-") {
        restore_raw(ctx, &stream, &a.output, a.overwrite)?
    } else {
        write_target(&a.output, a.overwrite, |out| write_disk(&*stream, a.format, out, &a.output))?
    };
    let secs = start.elapsed().as_secs_f64();
    if ctx.json {
        return ctx.print_json(&serde_json::json!({
            "snapshot": entry.id.to_hex(), "disk": disk, "format": format!("{:?}", a.format).to_lowercase(),
            "output": a.output, "size": stream.len(), "written": written, "seconds": secs,
        }));
    }
    if a.output != Path::new("-") {
        println!(
            "exported {}:{disk} ({}) to {}: {} written in {secs:.1} s ({})",
            entry.id.short(),
            human::bytes(stream.len()),
            a.output.display(),
            human::bytes(written),
            human::rate(stream.len(), secs)
        );
    }
    Ok(())
}

/// One disk in one format. `path` names the VMDK's extent in its descriptor.
pub(crate) fn write_disk(dev: &dyn BlockDev, format: Format, out: &mut dyn Output, path: &Path) -> Result<u64> {
    Ok(match format {
        Format::Raw => {
            copy_sparse(dev, out).context("copying the disk")?;
            dev.len()
        }
        Format::Vhd => disk_formats::vhd::write_dynamic(dev, out)?,
        Format::VhdFixed => disk_formats::vhd::write_fixed(dev, out)?,
        Format::Qcow2 => disk_formats::qcow2::write(dev, out)?,
        Format::Vmdk => {
            let name = path.file_name().map_or("disk.vmdk".into(), |n| n.to_string_lossy().into_owned());
            disk_formats::vmdk::write_stream_optimized(dev, out, &name)?
        }
        Format::Ova | Format::Xva => bail!("{format:?} packages a whole VM, not one disk"),
    })
}

/// OVA or XVA of a whole snapshot.
fn export_vm(ctx: &Ctx, a: &ExportArgs) -> Result<()> {
    use disk_formats::xva::objects::{package, StreamSpec};
    let (reader, _lock) = open_reader(ctx, "export")?;
    let entry = reader.repo().resolve_snapshot(&a.what)?;
    let snap = &entry.snapshot;
    let specs: Vec<StreamSpec> = snap
        .streams
        .iter()
        .map(|s| StreamSpec {
            name: s.name.clone(),
            size: s.size,
            memory: s.kind == archive::manifest::StreamKind::Memory,
        })
        .collect();
    let mut packaged = package(&snap.vm, snap.meta.as_ref(), &specs);
    if a.format == Format::Ova {
        packaged.keep_ovf_disks();
    }
    for note in &packaged.notes {
        eprintln!("note: {note}");
    }
    let devs: Vec<(String, StreamReader)> = packaged
        .vdis
        .iter()
        .map(|(id, stream)| Ok((id.clone(), reader.open(&entry, stream)?)))
        .collect::<Result<_>>()?;
    let start = Instant::now();
    let written = write_target(&a.output, a.overwrite, |out| {
        Ok(match a.format {
            Format::Xva => {
                let disks: Vec<(String, &dyn BlockDev)> =
                    devs.iter().map(|(id, d)| (id.clone(), d as &dyn BlockDev)).collect();
                disk_formats::xva::write(&packaged.ova, &disks, out)?
            }
            _ => {
                let spool = match a.output.parent() {
                    Some(p) if a.output != Path::new("-") && !p.as_os_str().is_empty() => p.to_path_buf(),
                    Some(_) if a.output != Path::new("-") => PathBuf::from("."),
                    _ => std::env::temp_dir(),
                };
                let disks: Vec<&dyn BlockDev> = devs.iter().map(|(_, d)| d as &dyn BlockDev).collect();
                disk_formats::ova::write(&packaged.ova, &disks, out, &spool)?
            }
        })
    })?;
    let secs = start.elapsed().as_secs_f64();
    let streams: Vec<&str> = packaged.vdis.iter().map(|(_, s)| s.as_str()).collect();
    if ctx.json {
        return ctx.print_json(&serde_json::json!({
            "snapshot": entry.id.to_hex(), "format": format!("{:?}", a.format).to_lowercase(), "output": a.output,
            "streams": streams, "written": written, "seconds": secs, "notes": packaged.notes,
        }));
    }
    if a.output != Path::new("-") {
        println!(
            "exported {} of {} ({}) to {}: {} written in {secs:.1} s",
            entry.id.short(),
            snap.vm,
            streams.join(", "),
            a.output.display(),
            human::bytes(written)
        );
    }
    Ok(())
}

/// Raw to a file: the parallel, sparse restore path, into a temporary name renamed when
/// complete.
fn restore_raw(ctx: &Ctx, stream: &StreamReader, path: &Path, overwrite: bool) -> Result<u64> {
    if path.exists() && !overwrite {
        bail!("{} exists; pass --overwrite to replace it", path.display());
    }
    let tmp = temp_name(path);
    let result = (|| {
        let target = crate::commands::sized_file(&tmp, stream.len())?;
        let opts = RestoreOptions::default();
        crate::commands::restore_with_bar(ctx, stream.store(), stream.map(), &target, opts, "export")?;
        target.flush()?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| stream.len())
}
