//! `vmvault import`: VHD files (with their differencing chains) and XVA packages into a new
//! snapshot. Every structure is checked before the backup starts, so bad input stores
//! nothing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use archive::backup::{BackupOptions, ParentChoice, Source};
use archive::manifest::StreamKind;
use clap::Args;

use crate::commands::{report_backup, Ctx};
use crate::progress::Bar;

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The VM the snapshot belongs to (default for an XVA: its VM's name).
    #[arg(long)]
    vm: Option<String>,
    /// VHD files as [NAME=]FILE (fixed, dynamic, or differencing: its parents are found
    /// through its parent locators or --parent; NAME defaults to the file's stem), or one XVA
    /// (its disks, its memory if it holds a suspended VM, and its VM records).
    #[arg(required = true, value_name = "[NAME=]FILE")]
    files: Vec<String>,
    /// Parent VHDs of differencing disks, matched by unique id (when moved from where the
    /// child's locators say).
    #[arg(long = "parent", value_name = "FILE")]
    parents: Vec<PathBuf>,
    /// Tags for the snapshot.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
}

/// What a file holds, by its first bytes.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Vhd,
    Xva,
    Other,
}

fn sniff(path: &Path) -> Result<Kind> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut head = [0u8; 512];
    let n = f.read(&mut head).with_context(|| format!("reading {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut tail = [0u8; 8];
    if len >= 512 {
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut tail, len - 512)?;
    }
    Ok(if head[..n.min(8)] == *b"conectix" || tail == *b"conectix" {
        Kind::Vhd
    } else if n == 512 && head.starts_with(b"ova.xml\0") {
        Kind::Xva
    } else {
        Kind::Other
    })
}

/// `[NAME=]FILE`: a path that exists as given is a file (even with a `=` in it); otherwise
/// NAME is what comes before the first `=`. NAME defaults to the file's stem.
fn split_spec(spec: &str) -> (String, PathBuf) {
    match spec.split_once('=') {
        Some((n, p)) if !Path::new(spec).exists() => (n.to_string(), PathBuf::from(p)),
        _ => {
            let p = PathBuf::from(spec);
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            (stem, p)
        }
    }
}

pub fn run(ctx: &Ctx, a: ImportArgs) -> Result<()> {
    if let [only] = a.files.as_slice() {
        let path = split_spec(only).1;
        if sniff(&path)? == Kind::Xva {
            return import_xva(ctx, &a, &path);
        }
    }
    let vm = a.vm.clone().ok_or_else(|| anyhow!("--vm NAME is needed for VHD files"))?;
    let mut sources = Vec::new();
    let mut origin = Vec::new();
    for spec in &a.files {
        let (name, path) = split_spec(spec);
        if name.is_empty() || sources.iter().any(|s: &Source| s.name == name) {
            bail!("{spec:?}: each disk needs its own NAME (NAME=FILE)");
        }
        match sniff(&path)? {
            Kind::Vhd => {}
            Kind::Xva => bail!("{}: an XVA is imported alone", path.display()),
            Kind::Other => bail!("{}: neither a VHD (no \"conectix\" footer) nor an XVA", path.display()),
        }
        let vhd =
            disk_formats::vhd::open_chain(&path, &a.parents).with_context(|| format!("opening {}", path.display()))?;
        origin.push(serde_json::json!({"stream": name, "format": "vhd", "file": path, "chain": vhd.depth()}));
        sources.push(Source { name, kind: StreamKind::Disk, dev: Box::new(vhd), changed: None });
    }
    let meta = serde_json::json!({ "imported": origin });
    save(ctx, &a, vm, sources, meta)
}

fn save(ctx: &Ctx, a: &ImportArgs, vm: String, sources: Vec<Source>, meta: serde_json::Value) -> Result<()> {
    let repo = ctx.open()?;
    let progress = Arc::new(archive::progress::Progress::default());
    let start = Instant::now();
    let label = format!("import {vm}");
    let opts =
        BackupOptions { vm, tags: a.tags.clone(), meta: Some(meta), parent: ParentChoice::Latest, workers: a.workers };
    let entry = {
        let _bar = Bar::start(progress.clone(), &label, ctx.quiet);
        archive::backup::backup(&repo, sources, &opts, &progress).map_err(|e| anyhow!(e))?
    };
    report_backup(ctx, &entry, start.elapsed().as_secs_f64())
}

/// An XVA: checked whole (every chunk's checksum) before anything is stored.
fn import_xva(ctx: &Ctx, a: &ImportArgs, path: &Path) -> Result<()> {
    use disk_formats::xva::{objects, Xva};
    let file = blockdev::FileDev::open(path).with_context(|| format!("opening {}", path.display()))?;
    let xva = Xva::open(Arc::new(file)).with_context(|| format!("reading {}", path.display()))?;
    let ids: Vec<String> = xva.disks.keys().cloned().collect();
    let names = objects::stream_names(&xva.ova, &ids);
    let meta = objects::meta_for(&xva.ova, &names);
    let vm_name = xva.ova.vm()?.snapshot["name_label"].as_str().unwrap_or("").to_string();
    let vm = a.vm.clone().unwrap_or_else(|| disk_formats::ova::file_stem(&vm_name));
    let mut disks = xva.disks;
    let sources = names
        .into_iter()
        .map(|(id, name, memory)| {
            let dev = disks.remove(&id).expect("names come from the disks' ids");
            let kind = if memory { StreamKind::Memory } else { StreamKind::Disk };
            Source { name, kind, dev: Box::new(dev), changed: None }
        })
        .collect();
    save(ctx, a, vm, sources, meta)
}
