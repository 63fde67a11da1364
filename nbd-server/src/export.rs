//! What the server exports: a device with a name and a description, and the catalogue the
//! handshake looks names up in.

use std::io;
use std::sync::Arc;

use blockdev::BlockDev;

use crate::proto::*;

/// Largest READ or WRITE payload accepted (the protocol's interoperable maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// One export: a device and what the server tells clients about it.
pub struct Export {
    pub name: String,
    pub description: String,
    pub dev: Arc<dyn BlockDev>,
    /// Advertised preferred block size (a power of two ≥ 512): the device's natural unit,
    /// e.g. an overlay's copy-on-write block.
    pub preferred_block: u32,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Export({:?}, {} bytes, writable: {})", self.name, self.dev.len(), self.writable())
    }
}

impl Export {
    pub fn new(name: impl Into<String>, description: impl Into<String>, dev: Arc<dyn BlockDev>) -> Self {
        Self { name: name.into(), description: description.into(), dev, preferred_block: 4096 }
    }

    pub fn writable(&self) -> bool {
        self.dev.is_writable()
    }

    /// Transmission flags, set truthfully. Every connection to one `Export` shares its
    /// device (and so its caches and its overlay), and a flush makes all completed writes
    /// durable for everyone: CAN_MULTI_CONN holds.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_CACHE | TF_CAN_MULTI_CONN;
        if self.writable() {
            f |= TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
            if self.dev.zeroes_are_cheap() {
                f |= TF_SEND_FAST_ZERO;
            }
        } else {
            f |= TF_READ_ONLY;
        }
        if structured {
            f |= TF_SEND_DF;
        }
        f
    }
}

/// The catalogue of exports. Implementations may open devices lazily; `open` and `list`
/// are called on a blocking thread and may do I/O.
pub trait Exports: Send + Sync + 'static {
    /// (name, description) of every export, for `NBD_OPT_LIST`.
    fn list(&self) -> io::Result<Vec<(String, String)>>;

    /// The export called `name` (`""` is the default export), or `None` if there is none.
    /// Opening one name twice should give the same `Export`, so that every connection sees
    /// the same data.
    fn open(&self, name: &str) -> io::Result<Option<Arc<Export>>>;

    /// Called once when the server stops, after the last connection closed: make
    /// everything durable.
    fn shutdown(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A fixed set of exports, the first one also being the default.
#[derive(Debug)]
pub struct StaticExports {
    exports: Vec<Arc<Export>>,
}

impl StaticExports {
    pub fn new(exports: Vec<Export>) -> Self {
        Self { exports: exports.into_iter().map(Arc::new).collect() }
    }
}

impl Exports for StaticExports {
    fn list(&self) -> io::Result<Vec<(String, String)>> {
        Ok(self.exports.iter().map(|e| (e.name.clone(), e.description.clone())).collect())
    }

    fn open(&self, name: &str) -> io::Result<Option<Arc<Export>>> {
        if name.is_empty() {
            return Ok(self.exports.first().cloned());
        }
        Ok(self.exports.iter().find(|e| e.name == name).cloned())
    }

    fn shutdown(&self) -> io::Result<()> {
        self.exports.iter().try_for_each(|e| e.dev.flush())
    }
}
