//! The NBD wire format as pure functions: byte slices in, typed values or encoded bytes
//! out, no I/O. Names follow the protocol document (`doc/proto.md` of NetworkBlockDevice/nbd);
//! every integer on the wire is big-endian.

use thiserror::Error;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

// NBD_INFO types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

// Error values.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// base:allocation states.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Longest option payload accepted; longer ones are skipped and answered `ERR_TOO_BIG`.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest export name or metadata query accepted (the protocol's own limit).
pub const MAX_STRING: usize = 4096;

/// Bytes that break the protocol.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("bad magic {found:#x} (expected {expected:#x})")]
    Magic { expected: u64, found: u64 },
    #[error("malformed option data: {0}")]
    Malformed(&'static str),
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    (u64::from(be_u32(b, at)) << 32) | u64::from(be_u32(b, at + 4))
}

/// The server's first 18 bytes.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option header: (option number, payload length).
pub fn parse_option_header(b: &[u8; 16]) -> Result<(u32, u32), ProtoError> {
    let magic = be_u64(b, 0);
    if magic != IHAVEOPT {
        return Err(ProtoError::Magic { expected: IHAVEOPT, found: magic });
    }
    Ok((be_u32(b, 8), be_u32(b, 12)))
}

/// An option reply with its payload.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A UTF-8 string without NULs, of at most [`MAX_STRING`] bytes.
fn string(b: &[u8]) -> Result<String, ProtoError> {
    if b.len() > MAX_STRING || b.contains(&0) {
        return Err(ProtoError::Malformed("string too long or containing NUL"));
    }
    String::from_utf8(b.to_vec()).map_err(|_| ProtoError::Malformed("string is not UTF-8"))
}

/// A length-prefixed string at the start of `b`; returns it and the rest.
fn prefixed(b: &[u8]) -> Result<(String, &[u8]), ProtoError> {
    let len = b.get(..4).map(|l| be_u32(l, 0) as usize).ok_or(ProtoError::Malformed("short length"))?;
    let s = b.get(4..4usize.saturating_add(len)).ok_or(ProtoError::Malformed("length runs past the option"))?;
    Ok((string(s)?, &b[4 + len..]))
}

/// The export name of `NBD_OPT_EXPORT_NAME` (the whole payload).
pub fn parse_export_name(b: &[u8]) -> Result<String, ProtoError> {
    string(b)
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data: the export name and the info types asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn parse_info_request(b: &[u8]) -> Result<InfoRequest, ProtoError> {
    let (name, rest) = prefixed(b)?;
    let n = rest.get(..2).map(|c| usize::from(be_u16(c, 0))).ok_or(ProtoError::Malformed("no info count"))?;
    if rest.len() != 2 + 2 * n {
        return Err(ProtoError::Malformed("info count disagrees with the option length"));
    }
    let infos = (0..n).map(|i| be_u16(rest, 2 + 2 * i)).collect();
    Ok(InfoRequest { name, infos })
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` data.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_request(b: &[u8]) -> Result<MetaRequest, ProtoError> {
    let (name, mut rest) = prefixed(b)?;
    let n = rest.get(..4).map(|c| be_u32(c, 0)).ok_or(ProtoError::Malformed("no query count"))?;
    rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..n {
        let (q, r) = prefixed(rest)?;
        queries.push(q);
        rest = r;
    }
    if !rest.is_empty() {
        return Err(ProtoError::Malformed("bytes after the last query"));
    }
    Ok(MetaRequest { name, queries })
}

/// `NBD_REP_INFO` payload for `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = INFO_EXPORT.to_be_bytes().to_vec();
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_REP_INFO` payload for `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, preferred, max] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b
}

/// `NBD_REP_INFO` payload for a string info (NAME, DESCRIPTION).
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut b = kind.to_be_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b
}

/// `NBD_REP_SERVER` payload: name and description.
pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

/// `NBD_REP_META_CONTEXT` payload.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zeros unless NO_ZEROES.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = size.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.resize(b.len() + 124, 0);
    }
    b
}

/// A transmission request header (the 28-byte compact form).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub const REQUEST_LEN: usize = 28;

impl Request {
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::Magic { expected: REQUEST_MAGIC.into(), found: magic.into() });
        }
        Ok(Self {
            flags: be_u16(b, 4),
            command: be_u16(b, 6),
            cookie: be_u64(b, 8),
            offset: be_u64(b, 16),
            length: be_u32(b, 24),
        })
    }

    pub fn to_bytes(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A simple reply header (read data, if any, follows it).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header, appended to `out`; `len` is the payload length.
pub fn chunk_header(out: &mut Vec<u8>, cookie: u64, flags: u16, kind: u16, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// An `ERROR` or `ERROR_OFFSET` chunk (with DONE), appended to `out`.
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str, offset: Option<u64>) {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    let kind = if offset.is_some() { REPLY_TYPE_ERROR_OFFSET } else { REPLY_TYPE_ERROR };
    let len = 6 + msg.len() + if offset.is_some() { 8 } else { 0 };
    chunk_header(out, cookie, REPLY_FLAG_DONE, kind, len as u32);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    if let Some(o) = offset {
        out.extend_from_slice(&o.to_be_bytes());
    }
}

// The client's side of the handshake and of transmission (vmvault's NBD client in
// `capture` uses these; the server never does).

/// The server's greeting (18 bytes): its handshake flags.
pub fn parse_greeting(b: &[u8; 18]) -> Result<u16, ProtoError> {
    let magic = be_u64(b, 0);
    if magic != NBDMAGIC {
        return Err(ProtoError::Magic { expected: NBDMAGIC, found: magic });
    }
    let opt = be_u64(b, 8);
    if opt != IHAVEOPT {
        // Old-style servers send an export size here; vmvault does not speak that protocol.
        return Err(ProtoError::Magic { expected: IHAVEOPT, found: opt });
    }
    Ok(be_u16(b, 16))
}

/// A client's option request: `IHAVEOPT`, option, length, data.
pub fn option_request(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The header of an option reply: (option, reply type, payload length).
pub fn parse_option_reply(b: &[u8; 20]) -> Result<(u32, u32, u32), ProtoError> {
    let magic = be_u64(b, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtoError::Magic { expected: OPTION_REPLY_MAGIC, found: magic });
    }
    Ok((be_u32(b, 8), be_u32(b, 12), be_u32(b, 16)))
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data: the export name and the info types asked for.
pub fn info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

/// What an `NBD_REP_INFO` payload says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// A type this client does not use (NAME, DESCRIPTION, …): skipped.
    Other(u16),
}

pub fn parse_info(b: &[u8]) -> Result<Info, ProtoError> {
    let kind = b.get(..2).map(|k| be_u16(k, 0)).ok_or(ProtoError::Malformed("short info reply"))?;
    match kind {
        INFO_EXPORT if b.len() == 12 => Ok(Info::Export { size: be_u64(b, 2), flags: be_u16(b, 10) }),
        INFO_BLOCK_SIZE if b.len() == 14 => {
            Ok(Info::BlockSize { min: be_u32(b, 2), preferred: be_u32(b, 6), max: be_u32(b, 10) })
        }
        INFO_EXPORT | INFO_BLOCK_SIZE => Err(ProtoError::Malformed("info reply of the wrong length")),
        k => Ok(Info::Other(k)),
    }
}

/// The reply to `NBD_OPT_EXPORT_NAME` (its first 10 bytes): size and transmission flags.
pub fn parse_export_name_reply(b: &[u8; 10]) -> (u64, u16) {
    (be_u64(b, 0), be_u16(b, 8))
}

/// A simple reply header: (cookie, error). A structured reply is refused: this client
/// never negotiates them.
pub fn parse_simple_reply(b: &[u8; 16]) -> Result<(u64, u32), ProtoError> {
    let magic = be_u32(b, 0);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ProtoError::Magic { expected: SIMPLE_REPLY_MAGIC.into(), found: magic.into() });
    }
    Ok((be_u64(b, 8), be_u32(b, 4)))
}

/// `NBD_OPT_SET_META_CONTEXT` / `NBD_OPT_LIST_META_CONTEXT` data: the export and the queries.
pub fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// An `NBD_REP_META_CONTEXT` payload: (context id, context name).
pub fn parse_meta_context(b: &[u8]) -> Result<(u32, String), ProtoError> {
    let id = b.get(..4).map(|c| be_u32(c, 0)).ok_or(ProtoError::Malformed("short meta context reply"))?;
    let name = std::str::from_utf8(&b[4..]).map_err(|_| ProtoError::Malformed("meta context name not UTF-8"))?;
    Ok((id, name.to_string()))
}

/// A structured reply chunk header: (flags, type, cookie, payload length).
pub fn parse_chunk_header(b: &[u8; 20]) -> Result<(u16, u16, u64, u32), ProtoError> {
    let magic = be_u32(b, 0);
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(ProtoError::Magic { expected: STRUCTURED_REPLY_MAGIC.into(), found: magic.into() });
    }
    Ok((be_u16(b, 4), be_u16(b, 6), be_u64(b, 8), be_u32(b, 16)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = Request { flags: 1, command: CMD_WRITE, cookie: 0xdead_beef_0102, offset: 1 << 40, length: 4096 };
        assert_eq!(Request::parse(&r.to_bytes()), Ok(r));
        let mut b = r.to_bytes();
        b[0] ^= 1;
        assert!(matches!(Request::parse(&b), Err(ProtoError::Magic { .. })));
    }

    #[test]
    fn info_request_parsing_checks_every_length() {
        let mut b = 4u32.to_be_bytes().to_vec();
        b.extend_from_slice(b"disk");
        b.extend_from_slice(&2u16.to_be_bytes());
        b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        b.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&b),
            Ok(InfoRequest { name: "disk".into(), infos: vec![INFO_BLOCK_SIZE, INFO_NAME] })
        );
        for cut in 0..b.len() {
            assert!(parse_info_request(&b[..cut]).is_err(), "accepted a cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_err());
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(&b[4..]);
        assert!(parse_info_request(&huge).is_err());
    }

    #[test]
    fn meta_request_parsing() {
        let mut b = 0u32.to_be_bytes().to_vec();
        b.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q.as_bytes());
        }
        let m = parse_meta_request(&b).unwrap();
        assert_eq!(m.name, "");
        assert_eq!(m.queries, ["base:allocation", "qemu:dirty-bitmap:x"]);
        for cut in 0..b.len() {
            assert!(parse_meta_request(&b[..cut]).is_err(), "accepted a cut at {cut}");
        }
    }

    #[test]
    fn fixed_layouts() {
        assert_eq!(&greeting()[..8], b"NBDMAGIC");
        assert_eq!(&greeting()[8..16], b"IHAVEOPT");
        assert_eq!(export_name_reply(1, 1, false).len(), 134);
        assert_eq!(export_name_reply(1, 1, true).len(), 10);
        assert_eq!(info_export(0, 0).len(), 12);
        assert_eq!(info_block_size(1, 4096, 1 << 25).len(), 14);
        let mut out = Vec::new();
        error_chunk(&mut out, 7, EIO, "bad", Some(512));
        assert_eq!(out.len(), 20 + 6 + 3 + 8);
    }

    #[test]
    fn client_side_round_trips() {
        let g = greeting();
        assert_eq!(parse_greeting(&g), Ok(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        let mut old = g;
        old[8..16].copy_from_slice(&(1u64 << 30).to_be_bytes());
        assert!(parse_greeting(&old).is_err(), "an old-style greeting is not newstyle");
        let req = option_request(OPT_GO, &info_request("disk", &[INFO_BLOCK_SIZE]));
        let hdr: [u8; 16] = req[..16].try_into().unwrap();
        assert_eq!(parse_option_header(&hdr), Ok((OPT_GO, (req.len() - 16) as u32)));
        assert_eq!(parse_info_request(&req[16..]).unwrap().infos, [INFO_BLOCK_SIZE]);
        let rep = option_reply(OPT_GO, REP_INFO, &info_export(1 << 33, TF_READ_ONLY));
        let head: [u8; 20] = rep[..20].try_into().unwrap();
        assert_eq!(parse_option_reply(&head), Ok((OPT_GO, REP_INFO, 12)));
        assert_eq!(parse_info(&rep[20..]), Ok(Info::Export { size: 1 << 33, flags: TF_READ_ONLY }));
        assert_eq!(
            parse_info(&info_block_size(512, 4096, 1 << 25)),
            Ok(Info::BlockSize { min: 512, preferred: 4096, max: 1 << 25 })
        );
        assert!(parse_info(&info_export(1, 1)[..11]).is_err());
        assert_eq!(parse_info(&info_string(INFO_NAME, "x")), Ok(Info::Other(INFO_NAME)));
        let e: [u8; 10] = export_name_reply(4096, 3, true).try_into().unwrap();
        assert_eq!(parse_export_name_reply(&e), (4096, 3));
        assert_eq!(parse_simple_reply(&simple_reply(9, EINVAL)), Ok((9, EINVAL)));
        let mut structured = Vec::new();
        chunk_header(&mut structured, 9, 0, REPLY_TYPE_NONE, 0);
        assert!(parse_simple_reply(&structured[..16].try_into().unwrap()).is_err());
    }
}
