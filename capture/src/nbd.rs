//! An NBD client as a [`BlockDev`]: how vmvault reads a VDI from XAPI's NBD server
//! (reference §6), and any other NBD export.
//!
//! Handshake (the protocol document, `doc/proto.md` of NetworkBlockDevice/nbd): fixed
//! newstyle only; STARTTLS first when TLS is asked for (rustls, with the caller's
//! verification); then `NBD_OPT_GO` asking for the block-size constraints, and — when the
//! server answers `ERR_UNSUP`, as xapi-nbd does — `NBD_OPT_EXPORT_NAME`. Transmission uses
//! simple replies: a read is split into requests of at most 2 MiB (XO's block size), all sent
//! before the replies are read (matched by cookie, so out-of-order servers work too), and
//! widened to the server's minimum block size (512 bytes for XAPI, which refuses unaligned
//! reads).
//!
//! For other servers (`Target::from_uri`: `nbd://host:port/export`, `nbd+unix:///export?
//! socket=PATH` — qemu-nbd, nbdkit, qemu's built-in server), the client also asks for
//! structured replies and the `base:allocation` meta context: then `NBD_CMD_BLOCK_STATUS`
//! answers [`BlockDev::allocation`], so holes and zero areas are not read; read replies arrive
//! as chunks (data, holes, errors), and a read that the chunks do not cover exactly is an
//! error, never short data.
//!
//! The connection opens on the first read, holding one export slot of the pool's limit, and
//! closes (freeing the slot) once a read reaches [`NbdDisk::finish_at`]; a later read opens
//! it again. A failed read is retried on a new connection (as XO does), a few times, a
//! second apart; the last error is returned. The export name is never shown in errors: XAPI's
//! carries the session.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockdev::{Allocation, BlockDev, Run};
use nbd_server::proto;
use rustls::pki_types::ServerName;

use crate::run::{Permit, Transfer};

/// Largest read request sent.
const MAX_REQUEST: u64 = 2 << 20;
/// Largest option reply payload accepted (the server's strings are short).
const MAX_REPLY: u32 = 64 << 10;
const TIMEOUT: Duration = Duration::from_secs(60);
/// Most replies accepted for one GO (a server sends a handful).
const MAX_INFOS: usize = 64;
/// Largest block status reply accepted: the protocol asks clients to take 32 MiB (qemu sends
/// up to 2^17 descriptors).
const MAX_STATUS_REPLY: u32 = 4 + (32 << 20);

/// TLS for an NBD connection.
#[derive(Clone, Debug)]
pub struct TlsTarget {
    pub config: Arc<rustls::ClientConfig>,
    pub name: ServerName<'static>,
}

/// Where an export is.
#[derive(Clone)]
pub struct Target {
    /// `host:port`, or `unix:/PATH` for a Unix socket (an absolute path).
    pub addr: String,
    pub export: String,
    /// How errors name the export (the name itself may hold a secret).
    pub label: String,
    pub tls: Option<TlsTarget>,
    /// Ask for structured replies and `base:allocation` (XAPI's server has neither).
    pub block_status: bool,
}

impl Target {
    /// An export named by an NBD URI (the NBD project's `uri.md`): `nbd://HOST[:PORT][/EXPORT]`
    /// (port 10809 by default, `[v6]` hosts) or `nbd+unix:///[EXPORT]?socket=PATH`; `nbds` and
    /// `nbds+unix` for TLS, the server's certificate checked against
    /// `tls-certificates=DIR/ca-cert.pem` for the URI's host name (`tls-hostname=NAME` for a
    /// Unix socket), as libnbd reads them, or not at all with `tls-verify-peer=false`.
    pub fn from_uri(uri: &str) -> Result<Target, String> {
        let bad = |why: &str| format!("NBD URI {uri:?}: {why}");
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("expected nbd://HOST[:PORT]/EXPORT"))?;
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let export = decode_uri_part(path).ok_or_else(|| bad("bad %-escape in the export name"))?;
        let param =
            |k: &str| query.split('&').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')).and_then(decode_uri_part);
        let addr = match scheme {
            "nbd" | "nbds" => {
                // HOST, [V6] or either with :PORT (empty: the default).
                let (host, port) = match authority.strip_prefix('[') {
                    Some(v6) => {
                        let (h, after) = v6.split_once(']').ok_or_else(|| bad("no ] after the IPv6 host"))?;
                        let port = match after {
                            "" => "",
                            p => p.strip_prefix(':').ok_or_else(|| bad("junk after the IPv6 host"))?,
                        };
                        (format!("[{h}]"), port)
                    }
                    None if authority.matches(':').count() > 1 => return Err(bad("IPv6 hosts go in brackets")),
                    None => {
                        let (h, p) = authority.split_once(':').unwrap_or((authority, ""));
                        (h.to_string(), p)
                    }
                };
                let port = match port {
                    "" => 10809,
                    p => p.parse::<u16>().map_err(|_| bad(&format!("port {p:?} is not a number")))?,
                };
                if host.is_empty() || host == "[]" {
                    return Err(bad("no host"));
                }
                format!("{host}:{port}")
            }
            "nbd+unix" | "nbds+unix" => {
                if !authority.is_empty() {
                    return Err(bad("nbd+unix:// takes no host (nbd+unix:///EXPORT?socket=PATH)"));
                }
                let socket = param("socket").filter(|s| !s.is_empty());
                let socket = socket.ok_or_else(|| bad("no socket=PATH"))?;
                // Absolute, so `unix:/…` cannot be mistaken for a host named "unix".
                let path = std::path::absolute(&socket).map_err(|e| bad(&format!("socket {socket:?}: {e}")))?;
                format!("unix:{}", path.display())
            }
            s => return Err(bad(&format!("unknown scheme {s:?}"))),
        };
        let tls = match scheme {
            "nbds" | "nbds+unix" => {
                let host = addr.rsplit_once(':').map_or("", |(h, _)| h).trim_matches(['[', ']']);
                let unchecked = param("tls-verify-peer").as_deref() == Some("false");
                let name = param("tls-hostname")
                    .or_else(|| (!addr.starts_with("unix:")).then(|| host.to_string()))
                    .or_else(|| unchecked.then(|| "localhost".to_string()));
                let name = name.ok_or_else(|| bad("a Unix socket with TLS needs tls-hostname=NAME"))?;
                let name = ServerName::try_from(name).map_err(|e| bad(&format!("TLS host name: {e}")))?;
                let config = match (param("tls-certificates"), param("tls-verify-peer").as_deref()) {
                    (_, Some("false")) => crate::xapi::tls::Trust::Insecure.client_config(),
                    (Some(dir), _) => {
                        Some(ca_config(&std::path::Path::new(&dir).join("ca-cert.pem")).map_err(|e| bad(&e))?)
                    }
                    (None, _) => {
                        return Err(bad(
                            "TLS needs tls-certificates=DIR (with DIR/ca-cert.pem) or tls-verify-peer=false",
                        ))
                    }
                };
                let config = config.ok_or_else(|| bad("no TLS configuration"))?;
                Some(TlsTarget { config, name })
            }
            _ => None,
        };
        Ok(Target { addr, export, label: uri.to_string(), tls, block_status: true })
    }
}

/// A TLS client configuration trusting the CA certificate(s) in PEM file `ca`.
fn ca_config(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let text = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&text) {
        let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots.add(cert).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A URI part with its %-escapes decoded; `None` for a broken escape or non-UTF-8 result.
fn decode_uri_part(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({} at {}, tls: {})", self.label, self.addr, self.tls.is_some())
    }
}

trait Io: Read + Write + Send {}
impl<T: Read + Write + Send> Io for T {}

/// An open connection, in transmission.
struct Conn {
    s: Box<dyn Io>,
    size: u64,
    flags: u16,
    /// Reads are widened to multiples of this.
    min_block: u64,
    max_request: u64,
    cookie: u64,
    /// Replies come as structured chunks.
    structured: bool,
    /// The id of the `base:allocation` meta context, when the server gave one.
    alloc_ctx: Option<u32>,
    /// The id of the other context asked for (a dirty bitmap), when the server gave it.
    extra_ctx: Option<u32>,
    _permit: Option<Permit>,
}

fn err(kind: io::ErrorKind, msg: String) -> io::Error {
    io::Error::new(kind, msg)
}

fn bad(t: &Target, what: impl std::fmt::Display) -> io::Error {
    err(io::ErrorKind::InvalidData, format!("NBD server at {} ({}): {what}", t.addr, t.label))
}

/// A name for an option reply error.
fn rep_name(rep: u32) -> String {
    match rep {
        proto::REP_ERR_UNSUP => "unsupported".into(),
        proto::REP_ERR_POLICY => "refused by policy".into(),
        proto::REP_ERR_INVALID => "invalid".into(),
        proto::REP_ERR_TLS_REQD => "TLS required".into(),
        proto::REP_ERR_UNKNOWN => "no such export".into(),
        proto::REP_ERR_SHUTDOWN => "server shutting down".into(),
        r => format!("error {r:#x}"),
    }
}

/// Read one option reply: (type, payload).
fn option_reply(s: &mut dyn Io, t: &Target, option: u32) -> io::Result<(u32, Vec<u8>)> {
    let mut head = [0u8; 20];
    s.read_exact(&mut head).map_err(|e| closed(t, e, "during option haggling"))?;
    let (opt, rep, len) = proto::parse_option_reply(&head).map_err(|e| bad(t, e))?;
    if opt != option {
        return Err(bad(t, format!("a reply to option {opt} where {option} was asked")));
    }
    if len > MAX_REPLY {
        return Err(bad(t, format!("an option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).map_err(|e| closed(t, e, "during option haggling"))?;
    Ok((rep, data))
}

/// An early end of the connection (or a silent server), said plainly.
fn closed(t: &Target, e: io::Error, when: &str) -> io::Error {
    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
        let secs = TIMEOUT.as_secs();
        err(
            io::ErrorKind::TimedOut,
            format!("NBD server at {} sent nothing for {secs} s {when} (export {})", t.addr, t.label),
        )
    } else if e.kind() == io::ErrorKind::UnexpectedEof {
        err(
            io::ErrorKind::ConnectionAborted,
            format!("NBD server at {} closed the connection {when} (export {})", t.addr, t.label),
        )
    } else {
        err(e.kind(), format!("NBD server at {} ({}): {e}", t.addr, t.label))
    }
}

fn send(s: &mut dyn Io, bytes: &[u8]) -> io::Result<()> {
    s.write_all(bytes)?;
    s.flush()
}

/// Connect and negotiate; the connection is in transmission when this returns.
fn connect(t: &Target, permit: Option<Permit>) -> io::Result<Conn> {
    connect_with(t, permit, None)
}

/// [`connect`], also asking for meta context `extra`.
fn connect_with(t: &Target, permit: Option<Permit>, extra: Option<&str>) -> io::Result<Conn> {
    if let Some(path) = t.addr.strip_prefix("unix:").filter(|p| p.starts_with('/')) {
        let s =
            UnixStream::connect(path).map_err(|e| err(e.kind(), format!("connecting to NBD socket {path}: {e}")))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        return secure(s, t, permit, extra);
    }
    let addrs: Vec<_> = t.addr.to_socket_addrs().map_err(|e| err(e.kind(), format!("{}: {e}", t.addr)))?.collect();
    let mut last = err(io::ErrorKind::NotFound, format!("{}: no address", t.addr));
    let mut tcp = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, TIMEOUT) {
            Ok(c) => {
                tcp = Some(c);
                break;
            }
            Err(e) => last = err(e.kind(), format!("connecting to NBD server {}: {e}", t.addr)),
        }
    }
    let tcp = tcp.ok_or(last)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(TIMEOUT))?;
    tcp.set_write_timeout(Some(TIMEOUT))?;
    secure(tcp, t, permit, extra)
}

/// Greet the server on `s`, switch to TLS when the target asks for it, and negotiate.
fn secure<S: Read + Write + Send + 'static>(
    mut s: S,
    t: &Target,
    permit: Option<Permit>,
    extra: Option<&str>,
) -> io::Result<Conn> {
    let no_zeroes = greet(&mut s, t)?;
    let s: Box<dyn Io> = match &t.tls {
        None => Box::new(s),
        Some(tls) => {
            send(&mut s, &proto::option_request(proto::OPT_STARTTLS, &[]))?;
            let (rep, _) = option_reply(&mut s, t, proto::OPT_STARTTLS)?;
            if rep != proto::REP_ACK {
                return Err(bad(t, format!("STARTTLS {}", rep_name(rep))));
            }
            let c = rustls::ClientConnection::new(tls.config.clone(), tls.name.clone()).map_err(io::Error::other)?;
            let mut st = rustls::StreamOwned::new(c, s);
            // Finish the handshake here, so a certificate problem is reported as one.
            while st.conn.is_handshaking() {
                st.conn
                    .complete_io(&mut st.sock)
                    .map_err(|e| err(e.kind(), format!("TLS with NBD server {}: {e}", t.addr)))?;
            }
            Box::new(st)
        }
    };
    negotiate(s, t, no_zeroes, permit, extra)
}

/// Read the server's greeting and answer it; true when both sides skip the 124 zeros.
fn greet(s: &mut dyn Io, t: &Target) -> io::Result<bool> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).map_err(|e| closed(t, e, "before its greeting"))?;
    let flags = proto::parse_greeting(&g).map_err(|e| bad(t, format!("not a newstyle NBD server ({e})")))?;
    if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad(t, "the server does not speak fixed newstyle NBD"));
    }
    let no_zeroes = flags & proto::FLAG_NO_ZEROES != 0;
    let cflags = proto::FLAG_C_FIXED_NEWSTYLE | if no_zeroes { proto::FLAG_C_NO_ZEROES } else { 0 };
    send(s, &cflags.to_be_bytes())?;
    Ok(no_zeroes)
}

/// Ask for structured replies, then for the `base:allocation` context of the export (and
/// `extra`); a server that refuses either is used without (reads and no block status).
fn ask_block_status(conn: &mut Conn, t: &Target, extra: Option<&str>) -> io::Result<()> {
    send(&mut *conn.s, &proto::option_request(proto::OPT_STRUCTURED_REPLY, &[]))?;
    let (rep, _) = option_reply(&mut *conn.s, t, proto::OPT_STRUCTURED_REPLY)?;
    if rep != proto::REP_ACK {
        return Ok(());
    }
    conn.structured = true;
    // A dirty bitmap's connection asks for that context alone.
    let queries = match extra {
        Some(e) => vec![e],
        None => vec![proto::BASE_ALLOCATION],
    };
    let query = proto::meta_request(&t.export, &queries);
    send(&mut *conn.s, &proto::option_request(proto::OPT_SET_META_CONTEXT, &query))?;
    for _ in 0..MAX_INFOS {
        let (rep, data) = option_reply(&mut *conn.s, t, proto::OPT_SET_META_CONTEXT)?;
        match rep {
            proto::REP_META_CONTEXT => {
                let (id, name) = proto::parse_meta_context(&data).map_err(|e| bad(t, e))?;
                if name == proto::BASE_ALLOCATION {
                    conn.alloc_ctx = Some(id);
                } else if Some(name.as_str()) == extra {
                    conn.extra_ctx = Some(id);
                }
            }
            proto::REP_ACK => return Ok(()),
            r if r & 0x8000_0000 != 0 => {
                // No contexts after all: reads only.
                (conn.alloc_ctx, conn.extra_ctx) = (None, None);
                return Ok(());
            }
            _ => {}
        }
    }
    Err(bad(t, format!("more than {MAX_INFOS} replies to one option")))
}

/// Select the export (GO, or EXPORT_NAME when the server knows no GO).
fn negotiate(
    s: Box<dyn Io>,
    t: &Target,
    no_zeroes: bool,
    permit: Option<Permit>,
    extra: Option<&str>,
) -> io::Result<Conn> {
    let mut conn = Conn {
        s,
        size: 0,
        flags: 0,
        min_block: 1,
        max_request: MAX_REQUEST,
        cookie: 0,
        structured: false,
        alloc_ctx: None,
        extra_ctx: None,
        _permit: permit,
    };
    if t.block_status || extra.is_some() {
        ask_block_status(&mut conn, t, extra)?;
    }
    let go = proto::info_request(&t.export, &[proto::INFO_BLOCK_SIZE]);
    send(&mut *conn.s, &proto::option_request(proto::OPT_GO, &go))?;
    let (mut export, mut selected) = (None, false);
    for _ in 0..MAX_INFOS {
        let s = &mut *conn.s;
        let (rep, data) = option_reply(s, t, proto::OPT_GO)?;
        match rep {
            proto::REP_INFO => match proto::parse_info(&data).map_err(|e| bad(t, e))? {
                proto::Info::Export { size, flags } => export = Some((size, flags)),
                proto::Info::BlockSize { min, max, .. } => {
                    // The protocol's bounds: a power of two up to 64 KiB, at most the maximum.
                    if !min.is_power_of_two() || min > 65536 || max < min {
                        return Err(bad(t, format!("block sizes min {min}, max {max}")));
                    }
                    conn.min_block = u64::from(min);
                    conn.max_request = MAX_REQUEST.min(u64::from(max)).max(conn.min_block);
                }
                proto::Info::Other(_) => {}
            },
            proto::REP_ACK => {
                let (size, flags) = export.ok_or_else(|| bad(t, "GO acknowledged without the export's size"))?;
                (conn.size, conn.flags) = (size, flags);
                selected = true;
                break;
            }
            proto::REP_ERR_UNSUP => {
                // An older server (xapi-nbd): select the export the old way. It closes the
                // connection when it does not like the name.
                send(s, &proto::option_request(proto::OPT_EXPORT_NAME, t.export.as_bytes()))?;
                let mut r = [0u8; 10];
                s.read_exact(&mut r).map_err(|e| {
                    closed(t, e, "when the export was selected (an unknown disk or an expired session?)")
                })?;
                (conn.size, conn.flags) = proto::parse_export_name_reply(&r);
                if !no_zeroes {
                    let mut z = [0u8; 124];
                    s.read_exact(&mut z).map_err(|e| closed(t, e, "after selecting the export"))?;
                }
                if conn.min_block == 1 {
                    conn.min_block = 512; // XAPI's sector size: it refuses smaller reads.
                }
                selected = true;
                break;
            }
            r if r & 0x8000_0000 != 0 => {
                let msg = String::from_utf8_lossy(&data);
                let msg = if msg.is_empty() { String::new() } else { format!(": {msg}") };
                return Err(bad(t, format!("the export was refused ({}){msg}", rep_name(r))));
            }
            _ => {} // a reply type this client did not ask for: skip it
        }
    }
    if !selected {
        return Err(bad(t, format!("more than {MAX_INFOS} replies to one option")));
    }
    Ok(conn)
}

impl Conn {
    /// Read `buf.len()` bytes at `offset` (inside the export), as pipelined requests.
    fn read(&mut self, t: &Target, offset: u64, buf: &mut [u8], received: &AtomicU64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let a = offset / self.min_block * self.min_block;
        let b = end.div_ceil(self.min_block).saturating_mul(self.min_block).min(self.size);
        let mut pieces = Vec::new(); // (cookie, offset, len)
        let mut at = a;
        while at < b {
            let n = (b - at).min(self.max_request);
            self.cookie += 1;
            let req = proto::Request {
                flags: 0,
                command: proto::CMD_READ,
                cookie: self.cookie,
                offset: at,
                length: n as u32,
            };
            self.s.write_all(&req.to_bytes())?;
            pieces.push((self.cookie, at, n));
            at += n;
        }
        self.s.flush()?;
        if self.structured {
            return self.read_chunks(t, offset..end, buf, &pieces, received);
        }
        let mut scratch = Vec::new();
        for _ in 0..pieces.len() {
            let mut head = [0u8; 16];
            self.s.read_exact(&mut head).map_err(|e| closed(t, e, "in the middle of a read"))?;
            let (cookie, error) = proto::parse_simple_reply(&head).map_err(|e| bad(t, e))?;
            let Some(&(_, p_off, p_len)) = pieces.iter().find(|p| p.0 == cookie) else {
                return Err(bad(t, format!("a reply to request {cookie}, which was never sent")));
            };
            if error != 0 {
                return Err(err(
                    io::ErrorKind::Other,
                    format!(
                        "NBD server at {} ({}): read of {p_len} bytes at {p_off} failed with error {error}",
                        t.addr, t.label
                    ),
                ));
            }
            self.read_into(t, p_off..p_off + p_len, offset..end, buf, &mut scratch)?;
            received.fetch_add(p_len, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Read the bytes of export range `piece` off the connection: the part inside `want` (the
    /// bytes of `buf`) into `buf`, straight when the piece lies wholly inside, the widened
    /// edges through `scratch`.
    fn read_into(
        &mut self,
        t: &Target,
        piece: std::ops::Range<u64>,
        want: std::ops::Range<u64>,
        buf: &mut [u8],
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let mid = |e| closed(t, e, "in the middle of a read");
        let (lo, hi) = (piece.start.max(want.start), piece.end.min(want.end));
        if lo == piece.start && hi == piece.end {
            let dst = &mut buf[(lo - want.start) as usize..(hi - want.start) as usize];
            return self.s.read_exact(dst).map_err(mid);
        }
        scratch.resize((piece.end - piece.start) as usize, 0);
        self.s.read_exact(scratch).map_err(mid)?;
        if lo < hi {
            buf[(lo - want.start) as usize..(hi - want.start) as usize]
                .copy_from_slice(&scratch[(lo - piece.start) as usize..(hi - piece.start) as usize]);
        }
        Ok(())
    }

    /// The structured replies to read requests `pieces` (cookie, offset, length), which cover
    /// `want` (the bytes of `buf`) widened: data and hole chunks in any order, each request
    /// ended by a chunk flagged DONE, which must have covered it exactly.
    fn read_chunks(
        &mut self,
        t: &Target,
        want: std::ops::Range<u64>,
        buf: &mut [u8],
        pieces: &[(u64, u64, u64)],
        received: &AtomicU64,
    ) -> io::Result<()> {
        let mut covered: Vec<Vec<(u64, u64)>> = vec![Vec::new(); pieces.len()];
        // Bytes covered per request so far: never more than asked (a server repeating
        // chunks is stopped at once, not when its DONE comes).
        let mut total = vec![0u64; pieces.len()];
        let mut done = vec![false; pieces.len()];
        let mut scratch = Vec::new();
        let mid = |e| closed(t, e, "in the middle of a read");
        while done.iter().any(|d| !d) {
            let (flags, kind, cookie, len) = self.chunk_header(t)?;
            let i = pieces.iter().position(|p| p.0 == cookie).filter(|&i| !done[i]);
            let i = i.ok_or_else(|| bad(t, format!("a reply to request {cookie}, which is not pending")))?;
            let (_, p_off, p_len) = pieces[i];
            let inside = |at: u64, n: u64| at >= p_off && at.checked_add(n).is_some_and(|e| e <= p_off + p_len);
            match kind {
                proto::REPLY_TYPE_OFFSET_DATA if len > 8 => {
                    let mut o = [0u8; 8];
                    self.s.read_exact(&mut o).map_err(mid)?;
                    let (at, n) = (u64::from_be_bytes(o), u64::from(len - 8));
                    if !inside(at, n) || total[i] + n > p_len {
                        return Err(bad(t, format!("{n} bytes of data at {at} for a read of {p_len} at {p_off}")));
                    }
                    self.read_into(t, at..at + n, want.clone(), buf, &mut scratch)?;
                    covered[i].push((at, n));
                    total[i] += n;
                    received.fetch_add(n, Ordering::Relaxed);
                }
                proto::REPLY_TYPE_OFFSET_HOLE if len == 12 => {
                    let mut h = [0u8; 12];
                    self.s.read_exact(&mut h).map_err(mid)?;
                    let at = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
                    let n = u64::from(u32::from_be_bytes(h[8..].try_into().expect("4 bytes")));
                    if n == 0 || !inside(at, n) || total[i] + n > p_len {
                        return Err(bad(t, format!("a hole of {n} bytes at {at} for a read of {p_len} at {p_off}")));
                    }
                    let (lo, hi) = (at.max(want.start), (at + n).min(want.end));
                    if lo < hi {
                        buf[(lo - want.start) as usize..(hi - want.start) as usize].fill(0);
                    }
                    covered[i].push((at, n));
                    total[i] += n;
                }
                proto::REPLY_TYPE_NONE if len == 0 && flags & proto::REPLY_FLAG_DONE != 0 => {}
                k if k & 0x8000 != 0 => {
                    let why = self.chunk_error(t, len)?;
                    return Err(err(
                        io::ErrorKind::Other,
                        format!(
                            "NBD server at {} ({}): read of {p_len} bytes at {p_off} failed: {why}",
                            t.addr, t.label
                        ),
                    ));
                }
                k => return Err(bad(t, format!("a reply chunk of type {k} and {len} bytes to a read"))),
            }
            if flags & proto::REPLY_FLAG_DONE != 0 {
                // Every byte exactly once: sorted, the chunks must tile the request.
                covered[i].sort_unstable();
                let mut pos = p_off;
                for &(at, n) in &covered[i] {
                    if at != pos {
                        return Err(bad(
                            t,
                            format!("the reply to a read of {p_len} bytes at {p_off} misses or repeats bytes at {pos}"),
                        ));
                    }
                    pos += n;
                }
                if pos != p_off + p_len {
                    return Err(bad(t, format!("the reply to a read of {p_len} bytes at {p_off} ends at {pos}")));
                }
                done[i] = true;
            }
        }
        Ok(())
    }

    /// A structured reply chunk's header: (flags, type, cookie, payload length).
    fn chunk_header(&mut self, t: &Target) -> io::Result<(u16, u16, u64, u32)> {
        let mut head = [0u8; 20];
        self.s.read_exact(&mut head[..4]).map_err(|e| closed(t, e, "in the middle of a reply"))?;
        if head[..4] == proto::SIMPLE_REPLY_MAGIC.to_be_bytes() {
            // Allowed even now for an error without payload.
            self.s.read_exact(&mut head[4..16]).map_err(|e| closed(t, e, "in the middle of a reply"))?;
            let (cookie, error) =
                proto::parse_simple_reply(head[..16].try_into().expect("16 bytes")).map_err(|e| bad(t, e))?;
            if error == 0 {
                return Err(bad(
                    t,
                    format!("a simple reply without error to request {cookie} after structured replies"),
                ));
            }
            return Err(err(
                io::ErrorKind::Other,
                format!("NBD server at {} ({}): request {cookie} failed with error {error}", t.addr, t.label),
            ));
        }
        self.s.read_exact(&mut head[4..]).map_err(|e| closed(t, e, "in the middle of a reply"))?;
        proto::parse_chunk_header(&head).map_err(|e| bad(t, e))
    }

    /// The payload of an error chunk (`len` bytes), as a sentence.
    fn chunk_error(&mut self, t: &Target, len: u32) -> io::Result<String> {
        if !(6..=MAX_REPLY).contains(&len) {
            return Err(bad(t, format!("an error chunk of {len} bytes")));
        }
        let mut b = vec![0u8; len as usize];
        self.s.read_exact(&mut b).map_err(|e| closed(t, e, "in the middle of a reply"))?;
        let code = u32::from_be_bytes(b[..4].try_into().expect("4 bytes"));
        let n = usize::from(u16::from_be_bytes([b[4], b[5]])).min(b.len() - 6);
        let msg = String::from_utf8_lossy(&b[6..6 + n]);
        Ok(if msg.is_empty() { format!("error {code}") } else { format!("error {code} ({msg})") })
    }

    /// `base:allocation` from `offset` rounded down to the minimum block (at most `len` bytes,
    /// at least one descriptor): that start, and runs of (length, reads as zeros).
    fn block_status(&mut self, t: &Target, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        let ctx = self.alloc_ctx.ok_or_else(|| bad(t, "no base:allocation context"))?;
        let runs = self.status_of(t, ctx, offset, len)?;
        Ok(runs.into_iter().map(|(a, b, state)| (a, b, state & proto::STATE_ZERO != 0)).collect())
    }

    /// Meta context `ctx` from `offset` rounded down to the minimum block (at most `len`
    /// bytes, at least one descriptor): runs of (start, end, state flags), in order, clipped
    /// to the export.
    fn status_of(&mut self, t: &Target, ctx: u32, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, u32)>> {
        let start = offset / self.min_block * self.min_block;
        let len = (offset + len).min(self.size).saturating_sub(start).clamp(1, 1 << 30) as u32;
        let offset = start;
        self.cookie += 1;
        let cookie = self.cookie;
        let req = proto::Request { flags: 0, command: proto::CMD_BLOCK_STATUS, cookie, offset, length: len };
        send(&mut *self.s, &req.to_bytes())?;
        let (mut runs, mut seen) = (Vec::new(), Vec::new());
        loop {
            let (flags, kind, c, n) = self.chunk_header(t)?;
            if c != cookie {
                return Err(bad(t, format!("a reply to request {c}, which is not pending")));
            }
            match kind {
                proto::REPLY_TYPE_BLOCK_STATUS if n >= 12 && (n - 4) % 8 == 0 && n <= MAX_STATUS_REPLY => {
                    let mut b = vec![0u8; n as usize];
                    self.s.read_exact(&mut b).map_err(|e| closed(t, e, "in the middle of a reply"))?;
                    let id = u32::from_be_bytes(b[..4].try_into().expect("4 bytes"));
                    // One chunk per context (at most the two asked for).
                    if seen.contains(&id) || seen.len() >= 2 {
                        return Err(bad(t, format!("a second block status chunk for context {id}")));
                    }
                    seen.push(id);
                    if id == ctx {
                        for d in b[4..].chunks_exact(8) {
                            let length = u64::from(u32::from_be_bytes(d[..4].try_into().expect("4 bytes")));
                            let state = u32::from_be_bytes(d[4..].try_into().expect("4 bytes"));
                            if length == 0 {
                                return Err(bad(t, "a block status descriptor of 0 bytes"));
                            }
                            // The last may reach past the request: clipped to the export.
                            let at = runs.last().map_or(start, |r: &(u64, u64, u32)| r.1);
                            if at < self.size {
                                runs.push((at, at.saturating_add(length).min(self.size), state));
                            }
                        }
                    }
                }
                proto::REPLY_TYPE_NONE if n == 0 && flags & proto::REPLY_FLAG_DONE != 0 => {}
                k if k & 0x8000 != 0 => {
                    let why = self.chunk_error(t, n)?;
                    return Err(err(io::ErrorKind::Other, format!("block status at {offset}: {why}")));
                }
                k => return Err(bad(t, format!("a reply chunk of type {k} and {n} bytes to a block status"))),
            }
            if flags & proto::REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if runs.is_empty() {
            return Err(bad(t, format!("no block status at {offset}")));
        }
        Ok(runs)
    }

    /// Say goodbye (best effort).
    fn disconnect(mut self) {
        self.cookie += 1;
        let req = proto::Request { flags: 0, command: proto::CMD_DISC, cookie: self.cookie, offset: 0, length: 0 };
        let _ = send(&mut *self.s, &req.to_bytes());
    }
}

/// An NBD session over a stream the caller opened (a Unix socket, a pipe to `nbd-server -`
/// style helpers, or test bytes): no TLS, no reconnecting.
pub struct Session {
    conn: Conn,
    target: Target,
    received: AtomicU64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({:?}, {} bytes)", self.target, self.conn.size)
    }
}

impl Session {
    /// Greet the server on `stream` and select `export`.
    pub fn over(stream: impl Read + Write + Send + 'static, export: &str) -> io::Result<Session> {
        Session::start(stream, export, false)
    }

    /// [`over`](Self::over), asking for structured replies and `base:allocation` first.
    pub fn with_block_status(stream: impl Read + Write + Send + 'static, export: &str) -> io::Result<Session> {
        Session::start(stream, export, true)
    }

    /// The server's `base:allocation` from `offset` rounded down to its minimum block: that
    /// start, and runs of (length, reads as zeros).
    pub fn block_status(&mut self, offset: u64, len: u64) -> io::Result<(u64, Vec<(u64, bool)>)> {
        blockdev::check_range(self.conn.size, offset, 1)?;
        let runs = self.conn.block_status(&self.target, offset, len)?;
        Ok((runs[0].0, runs.iter().map(|&(a, b, zero)| (b - a, zero)).collect()))
    }

    fn start(stream: impl Read + Write + Send + 'static, export: &str, block_status: bool) -> io::Result<Session> {
        let (addr, label) = ("stream".to_string(), "export".to_string());
        let target = Target { addr, export: export.into(), label, tls: None, block_status };
        let mut s: Box<dyn Io> = Box::new(stream);
        let no_zeroes = greet(&mut *s, &target)?;
        let conn = negotiate(s, &target, no_zeroes, None, None)?;
        Ok(Session { conn, target, received: AtomicU64::new(0) })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.conn.size
    }

    /// Read `buf.len()` bytes at `offset`; the range must lie inside the export.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        blockdev::check_range(self.conn.size, offset, buf.len() as u64)?;
        self.conn.read(&self.target, offset, buf, &self.received)
    }
}

/// The ranges a dirty bitmap of the export marks (`qemu:dirty-bitmap:BITMAP`, which qemu-nbd
/// offers with `-B BITMAP` and a running qemu with `block-export-add … bitmaps`): what changed
/// since the bitmap was created or cleared — a qemu VM's changed block tracking.
pub fn dirty_ranges(t: &Target, bitmap: &str) -> io::Result<Vec<std::ops::Range<u64>>> {
    let name = format!("qemu:dirty-bitmap:{bitmap}");
    let mut conn = connect_with(t, None, Some(&name))?;
    let Some(ctx) = conn.extra_ctx else {
        conn.disconnect();
        return Err(bad(t, format!("the server offers no {name} (qemu-nbd -B {bitmap}?)")));
    };
    let (size, mut at, mut out) = (conn.size, 0u64, Vec::<std::ops::Range<u64>>::new());
    while at < size {
        // Each answer holds at least one non-empty descriptor from `at` (rounded down to the
        // minimum block): this ends.
        let before = at;
        for (start, end, state) in conn.status_of(t, ctx, at, size - at)? {
            if state & 1 != 0 {
                match out.last_mut() {
                    Some(last) if last.end == start => last.end = end,
                    _ => out.push(start..end),
                }
            }
            at = end;
        }
        if at <= before {
            conn.disconnect();
            return Err(bad(t, format!("block status at {before} does not move past it")));
        }
    }
    conn.disconnect();
    Ok(out)
}

/// Which fixed-size blocks of a disk hold data, as far as the source knows (a VHD's BAT).
#[derive(Clone, Debug)]
pub struct BlockMap {
    pub block: u64,
    pub present: Vec<bool>,
}

impl BlockMap {
    /// The run at `offset` (at most `max_len`), from the blocks' presence.
    pub(crate) fn run(&self, offset: u64, max_len: u64) -> Run {
        let present = |b: u64| self.present.get(b as usize).copied().unwrap_or(true);
        let first = offset / self.block;
        let kind = present(first);
        let mut end = (first + 1) * self.block;
        while end < offset + max_len && present(end / self.block) == kind {
            end += self.block;
        }
        Run { kind: if kind { Allocation::Data } else { Allocation::Zero }, len: (end - offset).min(max_len) }
    }

    /// The present blocks of a disk of `size` bytes as byte ranges, merged.
    pub(crate) fn ranges(&self, size: u64) -> Vec<std::ops::Range<u64>> {
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        for (b, _) in (0u64..).zip(&self.present).filter(|(_, &p)| p) {
            let r = b * self.block..((b + 1) * self.block).min(size);
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ if r.start < r.end => out.push(r),
                _ => {}
            }
        }
        out
    }
}

/// A disk read over NBD. See the module docs.
pub struct NbdDisk {
    target: Target,
    size: u64,
    conn: Mutex<Option<Conn>>,
    map: Option<BlockMap>,
    /// The server's last block status answer: (start, end, reads as zeros) runs in order.
    status: Mutex<Vec<(u64, u64, bool)>>,
    finish_at: u64,
    transfer: Transfer,
    retries: u32,
}

impl std::fmt::Debug for NbdDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NbdDisk({:?}, {} bytes)", self.target, self.size)
    }
}

impl NbdDisk {
    /// A disk of `size` bytes at `target` (checked against the server's size on connect).
    pub fn new(target: Target, size: u64, transfer: Transfer) -> Self {
        let (conn, status) = (Mutex::new(None), Mutex::new(Vec::new()));
        NbdDisk { target, size, conn, map: None, status, finish_at: size, transfer, retries: 3 }
    }

    /// Connect now and take the disk's size from the server.
    pub fn open(target: Target) -> io::Result<Self> {
        let conn = connect(&target, None)?;
        let mut d = NbdDisk::new(target, conn.size, Transfer::default());
        d.conn = Mutex::new(Some(conn));
        Ok(d)
    }

    /// Blocks known to hold no data read as zeros without asking the server.
    pub fn with_map(mut self, map: BlockMap) -> Self {
        self.map = Some(map);
        self
    }

    /// Close the connection once a read reaches `end` (the last byte the caller plans to
    /// read), so the export slot goes to the next disk.
    pub fn finish_at(mut self, end: u64) -> Self {
        self.finish_at = end.min(self.size);
        self
    }

    /// Whether the server says the export is read-only.
    pub fn server_read_only(&self) -> Option<bool> {
        let g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref().map(|c| c.flags & proto::TF_READ_ONLY != 0)
    }

    fn open_conn(&self) -> io::Result<Conn> {
        let conn = connect(&self.target, self.transfer.slot())?;
        if conn.size != self.size {
            let why = format!("the export has {} bytes, the disk {}", conn.size, self.size);
            conn.disconnect();
            return Err(bad(&self.target, why));
        }
        Ok(conn)
    }

    /// A read on the open connection (opened first if needed). The flag says whether
    /// trying again on a new connection may help: not when the server refused the
    /// handshake or broke the protocol, only when the network failed.
    fn try_read(&self, slot: &mut Option<Conn>, offset: u64, buf: &mut [u8]) -> Result<(), (io::Error, bool)> {
        if slot.is_none() {
            let transient = |e: io::Error| {
                let again = matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::WouldBlock
                );
                (e, again)
            };
            *slot = Some(self.open_conn().map_err(transient)?);
        }
        let conn = slot.as_mut().expect("connected above");
        conn.read(&self.target, offset, buf, &self.transfer.received).map_err(|e| {
            *slot = None; // a connection in an unknown state is not reused
            let again = e.kind() != io::ErrorKind::InvalidData;
            (e, again)
        })
    }
}

impl BlockDev for NbdDisk {
    fn len(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        blockdev::check_range(self.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let mut attempt = 0;
        loop {
            self.transfer.check()?;
            match self.try_read(&mut slot, offset, buf) {
                Ok(()) => break,
                Err((e, again)) if !again || attempt >= self.retries => return Err(e),
                Err(_) => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(500 * u64::from(attempt)));
                }
            }
        }
        if offset + buf.len() as u64 >= self.finish_at {
            if let Some(c) = slot.take() {
                c.disconnect();
            }
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<Run> {
        blockdev::check_range(self.size, offset, 1)?;
        let max_len = max_len.min(self.size - offset);
        if let Some(m) = &self.map {
            return Ok(m.run(offset, max_len));
        }
        if !self.target.block_status {
            return Ok(Run { kind: Allocation::Data, len: max_len });
        }
        let mut cache = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let at = |cache: &[(u64, u64, bool)]| {
            let i = cache.partition_point(|r| r.1 <= offset);
            (i < cache.len() && cache[i].0 <= offset).then_some(i)
        };
        if at(&cache).is_none() {
            // Not known: whatever fails here, a bounded stretch is read instead (the read
            // says what went wrong, if anything).
            let data = Run { kind: Allocation::Data, len: max_len.min(64 << 20) };
            let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                let Ok(c) = self.open_conn() else { return Ok(data) };
                *slot = Some(c);
            }
            let conn = slot.as_mut().expect("connected above");
            if conn.alloc_ctx.is_none() {
                return Ok(Run { kind: Allocation::Data, len: max_len });
            }
            // Ask for a good stretch at once: the answers are cached.
            let Ok(runs) = conn.block_status(&self.target, offset, max_len.max(64 << 20)) else {
                *slot = None; // a connection in an unknown state is not reused
                return Ok(data);
            };
            *cache = runs;
        }
        // The run at `offset`: the cached runs of one kind from there on.
        let Some(i) = at(&cache) else {
            return Ok(Run { kind: Allocation::Data, len: max_len.min(64 << 20) });
            // an answer that stopped short
        };
        let zero = cache[i].2;
        let mut end = cache[i].1;
        for r in &cache[i + 1..] {
            if r.2 != zero || end >= offset + max_len {
                break;
            }
            end = r.1;
        }
        let kind = if zero { Allocation::Zero } else { Allocation::Data };
        Ok(Run { kind, len: (end - offset).min(max_len) })
    }
}

impl Drop for NbdDisk {
    fn drop(&mut self) {
        if let Some(c) = self.conn.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            c.disconnect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzzer's seed of a structured conversation (an 8 KiB export, `base:allocation` as
    /// context 1): block status data + zeros, then reads answered by data, hole + data, data.
    const STRUCTURED: &[u8] = include_bytes!("../../fuzz/seeds/capture_client/nbd_structured");

    #[test]
    fn structured_replies_fill_reads_and_answer_block_status() {
        let mut s = Session::with_block_status(replay(STRUCTURED.to_vec()), "disk").unwrap();
        assert_eq!(s.size(), 8192);
        assert_eq!(s.block_status(0, 8192).unwrap(), (0, vec![(4096, false), (4096, true)]));
        let mut b = vec![0u8; 512];
        s.read(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == b'a'));
        let mut b = vec![9u8; 3000];
        s.read(100, &mut b).unwrap();
        assert!(b[..1000].iter().all(|&x| x == 0), "the hole chunk reads as zeros");
        assert!(b[1000..].iter().all(|&x| x == b'b'));
        let mut b = [0u8; 1];
        s.read(8191, &mut b).unwrap();
        assert_eq!(b, [b'c']);
    }

    #[test]
    fn a_read_its_chunks_do_not_cover_exactly_is_an_error() {
        // The same conversation with the hole chunk of the second read cut to 999 bytes.
        let mut bytes = STRUCTURED.to_vec();
        let hole = bytes.windows(12).position(|w| w == [0, 0, 0, 0, 0, 0, 0, 100, 0, 0, 0x03, 0xe8]).unwrap();
        bytes[hole + 11] = 0xe7;
        let mut s = Session::with_block_status(replay(bytes), "disk").unwrap();
        s.block_status(0, 8192).unwrap();
        s.read(0, &mut [0u8; 512]).unwrap();
        let e = s.read(100, &mut [0u8; 3000]).unwrap_err().to_string();
        assert!(e.contains("misses or repeats bytes at 1099"), "{e}");
    }

    /// A server's handshake: greeting; with `structured`, structured replies and
    /// `base:allocation` as context 1 accepted; GO with an `size`-byte export.
    fn handshake(structured: bool, size: u64) -> Vec<u8> {
        let mut b = proto::greeting().to_vec();
        let mut opt = |o: u32, rep: u32, data: &[u8]| b.extend(proto::option_reply(o, rep, data));
        if structured {
            opt(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]);
            let context = proto::rep_meta_context(1, proto::BASE_ALLOCATION);
            opt(proto::OPT_SET_META_CONTEXT, proto::REP_META_CONTEXT, &context);
            opt(proto::OPT_SET_META_CONTEXT, proto::REP_ACK, &[]);
        }
        opt(proto::OPT_GO, proto::REP_INFO, &proto::info_export(size, 1));
        opt(proto::OPT_GO, proto::REP_ACK, &[]);
        b
    }

    fn chunk(b: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
        proto::chunk_header(b, cookie, flags, kind, payload.len() as u32);
        b.extend_from_slice(payload);
    }

    /// Replays `bytes` and records what the client sends.
    struct Recorder(io::Cursor<Vec<u8>>, Arc<Mutex<Vec<u8>>>);

    /// A server's side from `bytes`, what the client sends recorded and forgotten.
    fn replay(bytes: Vec<u8>) -> Recorder {
        Recorder(io::Cursor::new(bytes), Arc::default())
    }

    impl Read for Recorder {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.1.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The options a client sent, in order.
    fn options_sent(sent: &[u8]) -> Vec<u32> {
        let mut out = Vec::new();
        let mut at = 4; // after the client flags
        while let Some(Ok((option, len))) =
            sent.get(at..at + 16).map(|h| proto::parse_option_header(h.try_into().unwrap()))
        {
            out.push(option);
            at += 16 + len as usize;
        }
        out
    }

    #[test]
    fn xapi_targets_send_no_structured_options_and_others_ask_before_go() {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let r = Recorder(io::Cursor::new(handshake(false, 4096)), sent.clone());
        Session::over(r, "/uuid?session_id=x").unwrap();
        assert_eq!(options_sent(&sent.lock().unwrap()), vec![proto::OPT_GO]);
        let sent = Arc::new(Mutex::new(Vec::new()));
        let r = Recorder(io::Cursor::new(handshake(true, 4096)), sent.clone());
        Session::with_block_status(r, "disk").unwrap();
        let opts = options_sent(&sent.lock().unwrap());
        assert_eq!(opts, vec![proto::OPT_STRUCTURED_REPLY, proto::OPT_SET_META_CONTEXT, proto::OPT_GO]);
    }

    #[test]
    fn bad_structured_replies_are_errors_not_data() {
        let session = |tail: Vec<u8>| {
            let mut b = handshake(true, 8192);
            b.extend(tail);
            Session::with_block_status(replay(b), "disk").unwrap()
        };
        let done = proto::REPLY_FLAG_DONE;
        // An error chunk: its message reaches the caller.
        let mut t = Vec::new();
        proto::error_chunk(&mut t, 1, proto::EIO, "medium error", None);
        let e = session(t).read(0, &mut [0u8; 512]).unwrap_err().to_string();
        assert!(e.contains("error 5 (medium error)"), "{e}");
        // NONE without DONE, and a hole repeated past the request, are refused at once.
        let mut t = Vec::new();
        chunk(&mut t, 0, proto::REPLY_TYPE_NONE, 1, &[]);
        assert!(session(t).read(0, &mut [0u8; 512]).is_err());
        let mut t = Vec::new();
        for _ in 0..3 {
            chunk(&mut t, 0, proto::REPLY_TYPE_OFFSET_HOLE, 1, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        }
        let e = session(t).read(0, &mut [0u8; 512]).unwrap_err().to_string();
        assert!(e.contains("a hole of 256 bytes at 0"), "{e}");
        // A simple error reply to a block status is that error.
        let t = proto::simple_reply(1, proto::EINVAL).to_vec();
        let e = session(t).block_status(0, 8192).unwrap_err().to_string();
        assert!(e.contains("failed with error 22"), "{e}");
        // Two chunks for one context.
        let mut t = Vec::new();
        let status = [0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 0];
        chunk(&mut t, 0, proto::REPLY_TYPE_BLOCK_STATUS, 1, &status);
        chunk(&mut t, done, proto::REPLY_TYPE_BLOCK_STATUS, 1, &status);
        let e = session(t).block_status(0, 8192).unwrap_err().to_string();
        assert!(e.contains("a second block status chunk for context 1"), "{e}");
    }

    #[test]
    fn nbd_uris_name_the_address_and_export() {
        let t = Target::from_uri("nbd://host.example:10900/disk%200").unwrap();
        assert_eq!((t.addr.as_str(), t.export.as_str(), t.block_status), ("host.example:10900", "disk 0", true));
        let t = Target::from_uri("nbd://[::1]/x").unwrap();
        assert_eq!((t.addr.as_str(), t.export.as_str()), ("[::1]:10809", "x"));
        let t = Target::from_uri("nbd://[::1]:99").unwrap();
        assert_eq!((t.addr.as_str(), t.export.as_str()), ("[::1]:99", ""));
        let t = Target::from_uri("nbd+unix:///web01@latest/xvda?socket=/run/a%20b.sock").unwrap();
        assert_eq!((t.addr.as_str(), t.export.as_str()), ("unix:/run/a b.sock", "web01@latest/xvda"));
        let t = Target::from_uri("nbd+unix:///x?socket=rel.sock#frag").unwrap();
        assert!(t.addr.starts_with("unix:/") && t.addr.ends_with("/rel.sock"), "{}", t.addr);
        assert_eq!(t.export, "x");
        let t = Target::from_uri("nbd://unix:80/x").unwrap();
        assert_eq!(t.addr, "unix:80", "a host named unix is a host");
        let t = Target::from_uri("nbd://h:/x").unwrap();
        assert_eq!(t.addr, "h:10809");
        let t = Target::from_uri("nbds+unix:///x?socket=/s&tls-verify-peer=false").unwrap();
        assert!(t.tls.is_some() && t.addr == "unix:/s");
        for (bad, why) in [
            ("nbd://h:port/x", "not a number"),
            ("nbd:///x", "no host"),
            ("nbd+unix:///x", "no socket"),
            ("nbd+unix://h/x?socket=/s", "no host"),
            ("nbds://h/x", "tls-certificates=DIR"),
            ("nbds+unix:///x?socket=/s&tls-certificates=/d", "tls-hostname"),
            ("http://h/x", "unknown scheme"),
            ("nbd://h/%zz", "escape"),
            ("nbd://h/%+f", "escape"),
            ("nbd://::1/x", "brackets"),
            ("nbd://[::1/x", "no ]"),
            ("nbd://[::1]x/y", "junk"),
            ("disk.img", "expected nbd://"),
        ] {
            let e = Target::from_uri(bad).map(|_| ()).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
