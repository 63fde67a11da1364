//! MFT file records: update-sequence fixups, attribute headers, data runs, attribute lists.
//! Layouts as in ntfs-3g's `layout.h` and the Linux `ntfs3` driver's `ntfs.h`; every offset
//! and length is checked against the record before it is used.

use crate::error::{Error, Result};
use crate::read::{le16, le32, le64};

pub(crate) const STANDARD_INFORMATION: u32 = 0x10;
pub(crate) const ATTRIBUTE_LIST: u32 = 0x20;
pub(crate) const FILE_NAME: u32 = 0x30;
pub(crate) const DATA: u32 = 0x80;
pub(crate) const INDEX_ROOT: u32 = 0x90;
pub(crate) const INDEX_ALLOCATION: u32 = 0xA0;
pub(crate) const REPARSE_POINT: u32 = 0xC0;

/// Attribute flags.
pub(crate) const ATTR_COMPRESSION_MASK: u16 = 0x00FF;
pub(crate) const ATTR_ENCRYPTED: u16 = 0x4000;

/// Record flags.
const RECORD_IN_USE: u16 = 0x0001;
pub(crate) const RECORD_IS_DIRECTORY: u16 = 0x0002;

/// The low 48 bits of a file reference are the record number, the high 16 its sequence.
pub(crate) fn record_of(reference: u64) -> u64 {
    reference & 0xFFFF_FFFF_FFFF
}

/// Undo the update-sequence protection of a multi-sector record (`FILE` or `INDX`): the last
/// two bytes of every 512-byte stride hold the sequence number and their real value sits in
/// the update-sequence array. A stride whose number does not match was torn in writing.
pub(crate) fn fixup(buf: &mut [u8], magic: &[u8; 4], what: &'static str, at: u64) -> Result<()> {
    if buf.get(..4) != Some(&magic[..]) {
        let found = String::from_utf8_lossy(&buf[..4.min(buf.len())]).into_owned();
        return Err(Error::corrupt(
            what,
            at,
            format!("magic {found:?}, expected {:?}", String::from_utf8_lossy(magic)),
        ));
    }
    let (usa, count) = (usize::from(le16(buf, 4)), usize::from(le16(buf, 6)));
    let strides = buf.len() / 512;
    if count != strides + 1 || usa % 2 != 0 || usa < 8 || usa + 2 * count > buf.len() {
        return Err(Error::corrupt(what, at, format!("update sequence array of {count} at {usa}")));
    }
    let array = buf[usa..usa + 2 * count].to_vec();
    for i in 0..strides {
        let end = (i + 1) * 512 - 2;
        if buf[end..end + 2] != array[..2] {
            return Err(Error::corrupt(what, at, format!("sector {i} was torn in writing (update sequence mismatch)")));
        }
        buf[end..end + 2].copy_from_slice(&array[2 + 2 * i..4 + 2 * i]);
    }
    Ok(())
}

/// A contiguous piece of an attribute's value: clusters `vcn..vcn + len` at cluster `lcn`,
/// or a hole when `lcn` is `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub vcn: u64,
    pub len: u64,
    pub lcn: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NonResident {
    pub lowest_vcn: u64,
    /// log2 of the clusters in a compression unit (0: not compressed).
    pub compression_unit: u8,
    /// The sizes are meaningful in the piece starting at VCN 0 only.
    pub size: u64,
    pub initialized: u64,
    pub extents: Vec<Extent>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    Resident(Vec<u8>),
    NonResident(NonResident),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Attr {
    pub ty: u32,
    pub name: Vec<u16>,
    pub flags: u16,
    pub body: Body,
}

/// One MFT record, fixed up and parsed.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub flags: u16,
    /// The base record's reference for an extension record, 0 for a base record.
    pub base: u64,
    pub attrs: Vec<Attr>,
}

impl Record {
    /// Parse record `number` from `buf` (one record, as read from `$MFT` at byte `at`).
    pub(crate) fn parse(mut buf: Vec<u8>, at: u64) -> Result<Record> {
        const WHAT: &str = "NTFS file record";
        fixup(&mut buf, b"FILE", WHAT, at)?;
        let flags = le16(&buf, 0x16);
        if flags & RECORD_IN_USE == 0 {
            return Err(Error::corrupt(WHAT, at, "the record is not in use (a stale directory entry?)"));
        }
        let used = (le32(&buf, 0x18) as usize).min(buf.len());
        let base = le64(&buf, 0x20);
        let mut off = usize::from(le16(&buf, 0x14));
        let mut attrs = Vec::new();
        while off + 8 <= used {
            let ty = le32(&buf, off);
            if ty == 0xFFFF_FFFF {
                break;
            }
            let len = le32(&buf, off + 4) as usize;
            if len < 0x18 || !len.is_multiple_of(8) || off + len > used {
                return Err(Error::corrupt(WHAT, at + off as u64, format!("attribute {ty:#x} of {len} bytes")));
            }
            attrs.push(parse_attr(&buf[off..off + len], at + off as u64)?);
            off += len;
        }
        Ok(Record { flags, base, attrs })
    }
}

fn parse_attr(a: &[u8], at: u64) -> Result<Attr> {
    const WHAT: &str = "NTFS attribute";
    let ty = le32(a, 0);
    let non_resident = a[8] != 0;
    let (name_len, name_off) = (usize::from(a[9]), usize::from(le16(a, 10)));
    let flags = le16(a, 12);
    let name_bytes = a
        .get(name_off..name_off + 2 * name_len)
        .ok_or_else(|| Error::corrupt(WHAT, at, format!("name of {name_len} units at {name_off}")))?;
    let name = utf16_units(name_bytes);
    let body = if !non_resident {
        let (len, off) = (le32(a, 0x10) as usize, usize::from(le16(a, 0x14)));
        let value = a
            .get(off..off.saturating_add(len))
            .ok_or_else(|| Error::corrupt(WHAT, at, format!("resident value of {len} bytes at {off}")))?;
        Body::Resident(value.to_vec())
    } else {
        if a.len() < 0x40 {
            return Err(Error::corrupt(WHAT, at, "non-resident header too short"));
        }
        let lowest_vcn = le64(a, 0x10);
        let runs_off = usize::from(le16(a, 0x20));
        let runs = a
            .get(runs_off..)
            .filter(|_| runs_off >= 0x40)
            .ok_or_else(|| Error::corrupt(WHAT, at, format!("data runs at {runs_off}")))?;
        let nr = NonResident {
            lowest_vcn,
            compression_unit: a[0x22],
            size: le64(a, 0x30),
            initialized: le64(a, 0x38),
            extents: decode_runs(runs, lowest_vcn, at + runs_off as u64)?,
        };
        if lowest_vcn == 0 && nr.initialized > nr.size {
            return Err(Error::corrupt(
                WHAT,
                at,
                format!("initialized size {} beyond the size {}", nr.initialized, nr.size),
            ));
        }
        Body::NonResident(nr)
    };
    Ok(Attr { ty, name, flags, body })
}

/// Decode mapping pairs: a header byte (low nibble: bytes of the length, high nibble: bytes
/// of the signed LCN delta, 0 for a hole), then the two numbers, until a zero byte.
pub(crate) fn decode_runs(b: &[u8], first_vcn: u64, at: u64) -> Result<Vec<Extent>> {
    const WHAT: &str = "NTFS data runs";
    let (mut i, mut vcn, mut lcn) = (0usize, first_vcn, 0i64);
    let mut out = Vec::new();
    while let Some(&h) = b.get(i) {
        if h == 0 {
            return Ok(out);
        }
        let (nl, no) = (usize::from(h & 0x0F), usize::from(h >> 4));
        if nl == 0 || nl > 8 || no > 8 || i + 1 + nl + no > b.len() {
            return Err(Error::corrupt(WHAT, at + i as u64, format!("run header {h:#04x}")));
        }
        let len = le_uint(&b[i + 1..i + 1 + nl]);
        let here = if no == 0 {
            None
        } else {
            let delta = le_int(&b[i + 1 + nl..i + 1 + nl + no]);
            lcn = lcn
                .checked_add(delta)
                .filter(|l| *l >= 0)
                .ok_or_else(|| Error::corrupt(WHAT, at + i as u64, "cluster number out of range"))?;
            Some(lcn as u64)
        };
        if len == 0 {
            return Err(Error::corrupt(WHAT, at + i as u64, "a run of zero clusters"));
        }
        out.push(Extent { vcn, len, lcn: here });
        vcn = vcn.checked_add(len).ok_or_else(|| Error::corrupt(WHAT, at + i as u64, "runs beyond 2^64 clusters"))?;
        i += 1 + nl + no;
    }
    Err(Error::corrupt(WHAT, at + i as u64, "no end marker"))
}

fn le_uint(b: &[u8]) -> u64 {
    b.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x))
}

fn le_int(b: &[u8]) -> i64 {
    let v = le_uint(b);
    let unused = 64 - 8 * b.len() as u32;
    if unused == 64 {
        return 0;
    }
    ((v << unused) as i64) >> unused
}

/// UTF-16LE code units from bytes (an odd trailing byte is dropped).
pub(crate) fn utf16_units(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// The records an `$ATTRIBUTE_LIST` names as holding (parts of) the file's attributes.
pub(crate) fn parse_attribute_list(b: &[u8], at: u64) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 0x1A <= b.len() {
        let len = usize::from(le16(b, off + 4));
        if len < 0x1A || off + len > b.len() {
            return Err(Error::corrupt("NTFS attribute list", at + off as u64, format!("entry of {len} bytes")));
        }
        out.push(record_of(le64(b, off + 0x10)));
        off += len;
    }
    Ok(out)
}

/// A `$FILE_NAME` value: the parent, the DOS file attributes and the name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileName {
    pub parent: u64,
    pub attributes: u32,
    /// 0 POSIX, 1 Win32, 2 DOS, 3 Win32 and DOS.
    pub namespace: u8,
    pub name: Vec<u16>,
}

pub(crate) const NAMESPACE_DOS: u8 = 2;

impl FileName {
    pub(crate) fn parse(b: &[u8]) -> Option<FileName> {
        let len = usize::from(*b.get(0x40)?);
        let name = b.get(0x42..0x42 + 2 * len)?;
        Some(FileName {
            parent: record_of(le64(b, 0)),
            attributes: le32(b, 0x38),
            namespace: b[0x41],
            name: utf16_units(name),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_decode_with_signed_deltas_and_holes() {
        // 0x21: 1 length byte, 2 offset bytes; 0x01: a hole; 0x11 with a negative delta.
        let b = [0x21, 0x10, 0x00, 0x01, 0x01, 0x08, 0x11, 0x04, 0xF0, 0x00];
        let r = decode_runs(&b, 0, 0).expect("runs");
        assert_eq!(
            r,
            vec![
                Extent { vcn: 0, len: 16, lcn: Some(256) },
                Extent { vcn: 16, len: 8, lcn: None },
                Extent { vcn: 24, len: 4, lcn: Some(240) },
            ]
        );
        assert!(decode_runs(&[0x21, 0x10], 0, 0).is_err(), "truncated");
        assert!(decode_runs(&[0x11, 0x01, 0x80, 0x00], 0, 0).is_err(), "negative cluster");
        assert!(decode_runs(&[0x01, 0x00, 0x00], 0, 0).is_err(), "zero length");
        assert!(decode_runs(&[0x01, 0x04], 0, 0).is_err(), "no end marker");
    }

    #[test]
    fn fixups_restore_sector_ends_and_catch_torn_writes() {
        let mut r = vec![0u8; 1024];
        r[..4].copy_from_slice(b"FILE");
        r[4..8].copy_from_slice(&[0x30, 0, 3, 0]);
        r[0x30..0x36].copy_from_slice(&[7, 0, 0xAA, 0xBB, 0xCC, 0xDD]);
        r[510..512].copy_from_slice(&[7, 0]);
        r[1022..1024].copy_from_slice(&[7, 0]);
        let mut ok = r.clone();
        fixup(&mut ok, b"FILE", "t", 0).expect("fixup");
        assert_eq!((&ok[510..512], &ok[1022..1024]), (&[0xAA, 0xBB][..], &[0xCC, 0xDD][..]));
        r[1022] = 8;
        assert!(fixup(&mut r, b"FILE", "t", 0).is_err());
    }
}
