//! Writing tar members for OVA and XVA packages: ustar headers (through the `tar` crate's
//! header type), with a PAX `size` record in front of members of 8 GiB or more (whose ustar
//! size field then holds the GNU base-256 form, for readers that skip PAX headers).

use std::io::Write;

use crate::{Error, Result};

/// The ustar size field's limit (11 octal digits).
const USTAR_MAX: u64 = (1 << 33) - 1;

fn header(name: &str, size: u64, mtime: u64, kind: tar::EntryType) -> Result<[u8; 512]> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).map_err(|e| Error::Usage(format!("tar member name {name:?}: {e}")))?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(mtime);
    h.set_entry_type(kind);
    h.set_cksum();
    Ok(*h.as_bytes())
}

/// A PAX record `"<len> key=value\n"`, whose length counts its own digits.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}")
}

/// Write the header(s) of a member of `size` bytes; its data and [`pad`] follow.
pub fn write_header(out: &mut dyn Write, name: &str, size: u64, mtime: u64) -> Result<u64> {
    let mut n = 0;
    if size > USTAR_MAX {
        let pax = pax_record("size", &size.to_string());
        out.write_all(&header(&format!("PaxHeaders/{name}"), pax.len() as u64, mtime, tar::EntryType::XHeader)?)
            .map_err(|e| Error::io("writing a tar header", e))?;
        out.write_all(pax.as_bytes()).map_err(|e| Error::io("writing a tar header", e))?;
        n += 512 + pad(out, pax.len() as u64)? + pax.len() as u64;
    }
    out.write_all(&header(name, size, mtime, tar::EntryType::Regular)?)
        .map_err(|e| Error::io("writing a tar header", e))?;
    Ok(n + 512)
}

/// Zero padding after `size` bytes of member data, up to the next 512-byte record.
pub fn pad(out: &mut dyn Write, size: u64) -> Result<u64> {
    let n = size.next_multiple_of(512) - size;
    out.write_all(&[0u8; 512][..n as usize]).map_err(|e| Error::io("writing tar padding", e))?;
    Ok(n)
}

/// A whole member whose bytes are in memory.
pub fn write_member(out: &mut dyn Write, name: &str, data: &[u8], mtime: u64) -> Result<u64> {
    let n = write_header(out, name, data.len() as u64, mtime)?;
    out.write_all(data).map_err(|e| Error::io(format!("writing {name}"), e))?;
    Ok(n + data.len() as u64 + pad(out, data.len() as u64)?)
}

/// The end of the archive: two zero records.
pub fn write_end(out: &mut dyn Write) -> Result<u64> {
    out.write_all(&[0u8; 1024]).map_err(|e| Error::io("ending the tar archive", e))?;
    Ok(1024)
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_count_their_own_length() {
        for v in ["1", "8589934592", &"9".repeat(95)] {
            let r = pax_record("size", v);
            let (len, _) = r.split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), r.len(), "{r:?}");
        }
    }

    #[test]
    fn large_members_get_a_pax_size_and_base256() {
        let mut out = Vec::new();
        let size = 9u64 << 30;
        write_header(&mut out, "big.vmdk", size, 0).unwrap();
        assert_eq!(out.len(), 512 * 3);
        let mut a = tar::Archive::new(&out[..]);
        // The crate reads the PAX size; the entry's data is absent, so only look at headers.
        let e = a.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.header().size().unwrap(), size);
        assert_eq!(e.path().unwrap().to_str().unwrap(), "big.vmdk");
    }
}
