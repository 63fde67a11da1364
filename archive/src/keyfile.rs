//! Key files: the master key wrapped under a passphrase (Argon2id + AES-256-GCM).
//!
//! Argon2id (RFC 9106) rather than scrypt: it is the winner of the Password Hashing
//! Competition, resists both GPU cracking (memory-hard) and side channels (the "id" hybrid),
//! and the `argon2` crate is pure Rust. Default cost: 64 MiB, 3 passes, 1 lane (about 0.2 s
//! here); the parameters live in each key file so they can be raised later.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::crypto::{random_array, MasterKey, Sealer};
use crate::error::{Error, Result};

/// Argon2id cost parameters.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        Self { memory_kib: 64 * 1024, iterations: 3, parallelism: 1 }
    }
}

/// The JSON stored in `keys/<id>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub version: u32,
    pub created: String,
    pub host: String,
    pub user: String,
    pub kdf: Kdf,
    /// base64 of `nonce || E(master key) || tag`.
    pub wrapped: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kdf {
    pub algorithm: String,
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// base64 of 16 random bytes.
    pub salt: String,
}

/// Additional data binding a wrapped key to its repository.
fn aad(repo_id: &[u8; 32]) -> Vec<u8> {
    let mut v = b"vmvault key v1".to_vec();
    v.extend_from_slice(repo_id);
    v
}

fn derive(passphrase: &[u8], salt: &[u8], p: KdfParams) -> Result<[u8; 32]> {
    // Cap what a key file may demand, so a hostile file cannot exhaust memory or time.
    if p.memory_kib > 4 << 20 || p.iterations > 100 || p.parallelism == 0 || p.parallelism > 64 {
        return Err(Error::Unsupported(format!("key derivation parameters {p:?} exceed the limits")));
    }
    let params = argon2::Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
        .map_err(|e| Error::Unsupported(format!("argon2 parameters {p:?}: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    argon
        .hash_password_into(passphrase, salt, &mut out)
        .map_err(|e| Error::Usage(format!("key derivation failed: {e}")))?;
    Ok(out)
}

impl KeyFile {
    /// Wrap `master` under `passphrase` for the repository `repo_id`.
    pub fn wrap(master: &MasterKey, passphrase: &[u8], repo_id: &[u8; 32], p: KdfParams) -> Result<Self> {
        Self::wrap_with(master, passphrase, repo_id, p, random_array()?, Sealer::new)
    }

    pub(crate) fn wrap_with(
        master: &MasterKey,
        passphrase: &[u8],
        repo_id: &[u8; 32],
        p: KdfParams,
        salt: [u8; 16],
        sealer: impl FnOnce(&[u8; 32]) -> Result<Sealer>,
    ) -> Result<Self> {
        let kek = derive(passphrase, &salt, p)?;
        let sealed = sealer(&kek)?.seal(&aad(repo_id), &master.to_bytes())?;
        Ok(Self {
            version: 1,
            created: jiff::Timestamp::now().to_string(),
            host: crate::lock::hostname(),
            user: std::env::var("USER").unwrap_or_default(),
            kdf: Kdf {
                algorithm: "argon2id".into(),
                memory_kib: p.memory_kib,
                iterations: p.iterations,
                parallelism: p.parallelism,
                salt: B64.encode(salt),
            },
            wrapped: B64.encode(sealed),
        })
    }

    /// Unwrap the master key. `Ok(None)` means the passphrase does not fit this key file.
    pub fn unwrap_key(&self, passphrase: &[u8], repo_id: &[u8; 32], name: &str) -> Result<Option<MasterKey>> {
        if self.version != 1 || self.kdf.algorithm != "argon2id" {
            return Err(Error::Unsupported(format!(
                "key file {name}: version {} with kdf {:?}",
                self.version, self.kdf.algorithm
            )));
        }
        let bad = |what: &str| Error::corrupt(format!("key file {name}"), format!("{what} is not valid base64"));
        let salt = B64.decode(&self.kdf.salt).map_err(|_| bad("salt"))?;
        let sealed = B64.decode(&self.wrapped).map_err(|_| bad("wrapped key"))?;
        let p = KdfParams {
            memory_kib: self.kdf.memory_kib,
            iterations: self.kdf.iterations,
            parallelism: self.kdf.parallelism,
        };
        let kek = derive(passphrase, &salt, p)?;
        match Sealer::new(&kek)?.open(&aad(repo_id), &sealed, name) {
            Ok(plain) => {
                let bytes: [u8; 64] = plain.as_slice().try_into().map_err(|_| {
                    Error::corrupt(
                        format!("key file {name}"),
                        format!("master key is {} bytes, expected 64", plain.len()),
                    )
                })?;
                Ok(Some(MasterKey::from_bytes(&bytes)))
            }
            Err(_) => Ok(None),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("key file serializes");
        v.push(b'\n');
        v
    }

    pub fn from_json(bytes: &[u8], name: &str) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| Error::corrupt(format!("key file {name}"), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap() {
        let fast = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
        let mk = MasterKey::generate().unwrap();
        let repo = [3u8; 32];
        let kf = KeyFile::wrap(&mk, b"secret", &repo, fast).unwrap();
        let kf = KeyFile::from_json(&kf.to_json(), "k").unwrap();
        let got = kf.unwrap_key(b"secret", &repo, "k").unwrap().unwrap();
        assert_eq!(got.to_bytes(), mk.to_bytes());
        assert!(kf.unwrap_key(b"wrong", &repo, "k").unwrap().is_none());
        assert!(kf.unwrap_key(b"secret", &[4u8; 32], "k").unwrap().is_none(), "bound to the repo");
    }
}
