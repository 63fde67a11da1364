//! Keys, keyed ids, and authenticated encryption (AES-256-GCM).
//!
//! Every sealed byte string has the layout `nonce[12] || ciphertext || tag[16]`. Nonces are a
//! random 8-byte prefix drawn once per [`Sealer`] followed by a 4-byte little-endian counter,
//! so no two seals of one process share a nonce, and two processes collide only if their
//! random prefixes do (probability 2^-64 per pair).

use std::sync::atomic::{AtomicU32, Ordering};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};

use crate::error::{Error, Result};
use crate::id::ChunkId;

/// Bytes a seal adds: nonce and tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// Fill an array from the operating system's random generator.
pub fn random_array<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out).map_err(|e| Error::io("reading the system random generator", e.into()))?;
    Ok(out)
}

/// The repository master key: one key encrypts, the other makes ids.
#[derive(Clone)]
pub struct MasterKey {
    data_key: [u8; 32],
    id_key: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    pub const LEN: usize = 64;

    pub fn generate() -> Result<Self> {
        Ok(Self { data_key: random_array()?, id_key: random_array()? })
    }

    /// The 64-byte serialization: data key then id key.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.data_key);
        out[32..].copy_from_slice(&self.id_key);
        out
    }

    pub fn from_bytes(b: &[u8; 64]) -> Self {
        let mut data_key = [0u8; 32];
        let mut id_key = [0u8; 32];
        data_key.copy_from_slice(&b[..32]);
        id_key.copy_from_slice(&b[32..]);
        Self { data_key, id_key }
    }

    /// Keyed BLAKE3 of `data` under the id key.
    pub fn keyed_hash(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.id_key, data).as_bytes()
    }

    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId(self.keyed_hash(data))
    }

    /// The secret seed of the FastCDC gear table, so chunk boundaries do not reveal content.
    pub fn gear_seed(&self) -> u64 {
        let h = self.keyed_hash(b"vmvault fastcdc gear seed v1");
        u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
    }

    pub fn sealer(&self) -> Result<Sealer> {
        Sealer::new(&self.data_key)
    }

    #[cfg(test)]
    pub(crate) fn data_key(&self) -> &[u8; 32] {
        &self.data_key
    }
}

/// Seals and opens byte strings under one key. Cheap to share between threads.
pub struct Sealer {
    cipher: Aes256Gcm,
    prefix: [u8; 8],
    counter: AtomicU32,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    pub fn new(key: &[u8; 32]) -> Result<Self> {
        Ok(Self { cipher: Aes256Gcm::new(key.into()), prefix: random_array()?, counter: AtomicU32::new(0) })
    }

    /// A sealer with a chosen nonce prefix. Only for golden vectors and tests: reusing a
    /// prefix under one key repeats nonces, which breaks AES-GCM.
    #[cfg(test)]
    pub(crate) fn with_prefix(key: &[u8; 32], prefix: [u8; 8]) -> Self {
        Self { cipher: Aes256Gcm::new(key.into()), prefix, counter: AtomicU32::new(0) }
    }

    fn next_nonce(&self) -> Result<[u8; NONCE_LEN]> {
        // Never wraps: once exhausted, every further seal fails.
        let n = self
            .counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1))
            .map_err(|_| Error::Usage("nonce counter exhausted; start a new session".into()))?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&self.prefix);
        nonce[8..].copy_from_slice(&n.to_le_bytes());
        Ok(nonce)
    }

    /// Append `nonce || E(plaintext) || tag` to `out`.
    pub fn seal_into(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let nonce = self.next_nonce()?;
        out.reserve(plaintext.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut out[start..])
            .map_err(|_| Error::Usage("plaintext too long to seal".into()))?;
        out.extend_from_slice(&tag);
        Ok(())
    }

    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.seal_into(aad, plaintext, &mut out)?;
        Ok(out)
    }

    /// Authenticate and decrypt a sealed string. `what` names the object in the error.
    pub fn open(&self, aad: &[u8], sealed: &[u8], what: &str) -> Result<Vec<u8>> {
        let mut buf = sealed.to_vec();
        let plain = self.open_in_place(aad, &mut buf, what)?.len();
        buf.copy_within(NONCE_LEN..NONCE_LEN + plain, 0);
        buf.truncate(plain);
        Ok(buf)
    }

    /// Authenticate and decrypt in place; returns the plaintext, which lies inside `sealed`.
    pub fn open_in_place<'a>(&self, aad: &[u8], sealed: &'a mut [u8], what: &str) -> Result<&'a [u8]> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(Error::corrupt(
                what,
                format!("sealed data is {} bytes, shorter than the {SEAL_OVERHEAD}-byte envelope", sealed.len()),
            ));
        }
        let (nonce, rest) = sealed.split_at_mut(NONCE_LEN);
        let split = rest.len() - TAG_LEN;
        let (ct, tag) = rest.split_at_mut(split);
        self.cipher
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, ct, Tag::from_slice(tag))
            .map_err(|_| Error::corrupt(what, "authentication failed (wrong key, or the bytes were altered)"))?;
        Ok(&sealed[NONCE_LEN..NONCE_LEN + split])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let key = MasterKey::from_bytes(&[7u8; 64]);
        let s = key.sealer().unwrap();
        let a = s.seal(b"aad", b"hello").unwrap();
        let b = s.seal(b"aad", b"hello").unwrap();
        assert_ne!(a[..12], b[..12], "nonces must differ");
        assert_eq!(s.open(b"aad", &a, "x").unwrap(), b"hello");
        assert!(s.open(b"other", &a, "x").is_err());
        let mut bad = a.clone();
        bad[13] ^= 1;
        assert!(matches!(s.open(b"aad", &bad, "x"), Err(Error::Corrupt { .. })));
        assert!(s.open(b"aad", &a[..20], "x").is_err());
    }
}
