//! One request against one export, synchronously (it runs on a blocking thread): validate,
//! do the I/O, encode the whole reply into one buffer. Nothing is sent before the reply is
//! complete, so an I/O error is always reported as an error reply, never as wrong data.

use std::io;

use blockdev::Allocation;

use crate::export::MAX_PAYLOAD;
use crate::handshake::{Negotiated, ALLOCATION_ID};
use crate::proto::*;

/// Zero runs shorter than this are sent as data: a hole chunk costs as much as 32 zeros.
const MIN_HOLE: u64 = 4096;
/// Most descriptors in one BLOCK_STATUS reply.
const MAX_DESCRIPTORS: usize = 4096;

/// The errno for an I/O error, as the protocol defines them.
pub fn errno(e: &io::Error) -> u32 {
    match e.kind() {
        io::ErrorKind::PermissionDenied => EPERM,
        io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidInput => EINVAL,
        _ => match e.raw_os_error() {
            Some(28 | 27 | 122) => ENOSPC, // ENOSPC, EFBIG, EDQUOT
            _ => EIO,
        },
    }
}

struct Failure(u32, String);

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure(errno(&e), e.to_string())
    }
}

fn fail<T>(errno: u32, msg: &str) -> Result<T, Failure> {
    Err(Failure(errno, msg.to_owned()))
}

/// Execute `req` (with its WRITE payload) and return the encoded reply (DISC never gets
/// here: it has no reply).
pub(crate) fn execute(n: &Negotiated, req: &Request, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match run(n, req, payload, &mut out) {
        // A reply without payload may be simple even when structured replies are on.
        Ok(()) if out.is_empty() => simple_reply(req.cookie, 0).to_vec(),
        Ok(()) => out,
        Err(Failure(code, msg)) => reply_error(n, req.cookie, code, &msg),
    }
}

pub(crate) fn reply_error(n: &Negotiated, cookie: u64, code: u32, msg: &str) -> Vec<u8> {
    if n.structured {
        let mut out = Vec::new();
        error_chunk(&mut out, cookie, code, msg, None);
        out
    } else {
        simple_reply(cookie, code).to_vec()
    }
}

fn allowed_flags(n: &Negotiated, command: u16) -> u16 {
    let writable = n.export.writable();
    CMD_FLAG_FUA
        | match command {
            CMD_READ if n.structured => CMD_FLAG_DF,
            CMD_WRITE_ZEROES if writable => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

fn run(n: &Negotiated, req: &Request, payload: &[u8], out: &mut Vec<u8>) -> Result<(), Failure> {
    let dev = &n.export.dev;
    let size = dev.len();
    let len = u64::from(req.length);
    if !matches!(req.command, CMD_READ..=CMD_BLOCK_STATUS) {
        return fail(EINVAL, "unknown command");
    }
    if req.flags & !allowed_flags(n, req.command) != 0 {
        return fail(EINVAL, "flag not valid for this command");
    }
    let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && !n.export.writable() {
        return fail(EPERM, "export is read-only");
    }
    let in_bounds = req.offset.checked_add(len).is_some_and(|end| end <= size);
    if !in_bounds && req.command != CMD_FLUSH {
        let code = if matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES) { ENOSPC } else { EINVAL };
        return fail(code, "request runs past the end of the export");
    }
    match req.command {
        CMD_READ => read(n, req, out),
        CMD_WRITE => {
            dev.write_at(req.offset, payload)?;
            fua(n, req)
        }
        CMD_FLUSH => Ok(dev.flush()?),
        CMD_TRIM => {
            dev.discard(req.offset, len)?;
            fua(n, req)
        }
        CMD_CACHE => {
            dev.will_need(req.offset, len);
            Ok(())
        }
        CMD_WRITE_ZEROES => {
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && !dev.zeroes_are_cheap() {
                return fail(ENOTSUP, "zeroing is not faster than writing");
            }
            dev.write_zeroes(req.offset, len)?;
            fua(n, req)
        }
        _ => block_status(n, req, out),
    }
}

fn fua(n: &Negotiated, req: &Request) -> Result<(), Failure> {
    if req.flags & CMD_FLAG_FUA != 0 {
        n.export.dev.flush()?;
    }
    Ok(())
}

fn read(n: &Negotiated, req: &Request, out: &mut Vec<u8>) -> Result<(), Failure> {
    if req.length > MAX_PAYLOAD {
        return fail(EINVAL, "read longer than the 32 MiB maximum");
    }
    let dev = &n.export.dev;
    if !n.structured {
        out.extend_from_slice(&simple_reply(req.cookie, 0));
        let at = out.len();
        out.resize(at + req.length as usize, 0);
        return Ok(dev.read_at(req.offset, &mut out[at..])?);
    }
    if req.length == 0 {
        chunk_header(out, req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
        return Ok(());
    }
    let end = req.offset + u64::from(req.length);
    // Runs of data and holes; with DF, one data chunk for everything.
    let mut runs: Vec<(bool, u64, u64)> = Vec::new();
    let mut pos = req.offset;
    while pos < end {
        let run = if req.flags & CMD_FLAG_DF != 0 {
            blockdev::Run { kind: Allocation::Data, len: end - pos }
        } else {
            dev.allocation(pos, end - pos)?
        };
        let len = run.len.clamp(1, end - pos);
        let hole = run.kind == Allocation::Zero && len >= MIN_HOLE;
        match runs.last_mut() {
            Some(last) if last.0 == hole => last.2 += len,
            _ => runs.push((hole, pos, len)),
        }
        pos += len;
    }
    let last = runs.len() - 1;
    for (i, (hole, at, len)) in runs.into_iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        if hole {
            chunk_header(out, req.cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12);
            out.extend_from_slice(&at.to_be_bytes());
            out.extend_from_slice(&(len as u32).to_be_bytes());
        } else {
            chunk_header(out, req.cookie, flags, REPLY_TYPE_OFFSET_DATA, 8 + len as u32);
            out.extend_from_slice(&at.to_be_bytes());
            let from = out.len();
            out.resize(from + len as usize, 0);
            dev.read_at(at, &mut out[from..])?;
        }
    }
    Ok(())
}

fn block_status(n: &Negotiated, req: &Request, out: &mut Vec<u8>) -> Result<(), Failure> {
    if !n.structured || !n.allocation {
        return fail(EINVAL, "no metadata context was negotiated");
    }
    if req.length == 0 {
        return fail(EINVAL, "zero-length block status");
    }
    let end = req.offset + u64::from(req.length);
    let mut descriptors: Vec<(u32, u32)> = Vec::new();
    let mut pos = req.offset;
    while pos < end && descriptors.len() < MAX_DESCRIPTORS {
        let run = n.export.dev.allocation(pos, end - pos)?;
        let len = run.len.clamp(1, end - pos);
        let state = if run.kind == Allocation::Zero { STATE_HOLE | STATE_ZERO } else { 0 };
        match descriptors.last_mut() {
            Some(last) if last.1 == state => last.0 += len as u32,
            _ => descriptors.push((len as u32, state)),
        }
        if req.flags & CMD_FLAG_REQ_ONE != 0 {
            descriptors.truncate(1);
            break;
        }
        pos += len;
    }
    chunk_header(out, req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 4 + 8 * descriptors.len() as u32);
    out.extend_from_slice(&ALLOCATION_ID.to_be_bytes());
    for (len, state) in descriptors {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&state.to_be_bytes());
    }
    Ok(())
}
