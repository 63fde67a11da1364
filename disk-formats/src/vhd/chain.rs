//! Opening a differencing chain from files: child first, parents found through their
//! locators (or given explicitly), checked by unique id.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdev::FileDev;

use super::read::{Layer, Vhd};
use crate::error::IoContext;
use crate::{Error, Result};

/// Longest chain followed; XenServer coalesces long before this.
const MAX_DEPTH: usize = 128;

fn open_layer(path: &Path) -> Result<Layer> {
    let file = FileDev::open(path).ctx(|| format!("opening {}", path.display()))?;
    Layer::open(Arc::new(file)).map_err(|e| match e {
        Error::Corrupt { what, offset, detail } => {
            Error::Corrupt { what: format!("{} ({what})", path.display()), offset, detail }
        }
        e => e,
    })
}

/// Open the VHD at `path` and, when it is a differencing disk, its parents. A parent is taken
/// from `parents` when one of them has the unique id the child names, else from the child's
/// locators (relative ones resolved against the child's folder). A loop, a missing parent or
/// a chain deeper than 128 is an error naming the file.
pub fn open_chain(path: &Path, parents: &[PathBuf]) -> Result<Vhd> {
    let mut layers = vec![(path.to_path_buf(), open_layer(path)?)];
    let mut seen = HashSet::new();
    seen.insert(layers[0].1.footer().unique_id);
    let mut explicit: Vec<(PathBuf, Option<Layer>)> = parents.iter().map(|p| (p.clone(), None)).collect();
    loop {
        let (child_path, child) = layers.last().expect("chain starts with the child");
        let Some(want) = child.parent_id() else { break };
        if layers.len() >= MAX_DEPTH {
            return Err(Error::Unsupported(format!("a VHD chain deeper than {MAX_DEPTH} at {}", child_path.display())));
        }
        let found = match find_explicit(&mut explicit, want)? {
            Some(l) => Some(l),
            None => find_by_hints(child_path, child, want)?,
        };
        let Some((p, layer)) = found else {
            return Err(Error::Usage(format!(
                "{} is a differencing VHD; its parent (unique id {}, locators {:?}) was not found — pass it with --parent",
                child_path.display(),
                hex::encode(want),
                child.parent_hints()
            )));
        };
        if !seen.insert(layer.footer().unique_id) {
            return Err(Error::corrupt(format!("VHD chain at {}", p.display()), 0, "the chain loops back on itself"));
        }
        layers.push((p, layer));
    }
    let (_, child) = layers.remove(0);
    let mut parent: Option<Arc<Vhd>> = None;
    while let Some((_, layer)) = layers.pop() {
        parent = Some(Arc::new(Vhd::new(layer, parent)?));
    }
    Vhd::new(child, parent)
}

fn find_explicit(explicit: &mut [(PathBuf, Option<Layer>)], want: [u8; 16]) -> Result<Option<(PathBuf, Layer)>> {
    for (path, slot) in explicit.iter_mut() {
        if slot.is_none() {
            *slot = Some(open_layer(path)?);
        }
        if slot.as_ref().is_some_and(|l| l.footer().unique_id == want) {
            return Ok(slot.take().map(|l| (path.clone(), l)));
        }
    }
    Ok(None)
}

fn find_by_hints(child_path: &Path, child: &Layer, want: [u8; 16]) -> Result<Option<(PathBuf, Layer)>> {
    let dir = child_path.parent().unwrap_or(Path::new("."));
    for hint in child.parent_hints() {
        let hint = hint.strip_prefix("./").unwrap_or(&hint).to_string();
        let mut candidates = vec![dir.join(&hint)];
        // Windows absolute paths and paths from another machine: try the bare name beside us.
        if let Some(name) = hint.rsplit('/').next() {
            candidates.push(dir.join(name));
        }
        for c in candidates {
            if c.is_file() {
                let layer = open_layer(&c)?;
                if layer.footer().unique_id == want {
                    return Ok(Some((c, layer)));
                }
            }
        }
    }
    Ok(None)
}
