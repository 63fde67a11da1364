//! The repository `config` file (plaintext JSON): format version and write parameters.

use serde::{Deserialize, Serialize};

use crate::chunker::ChunkerParams;
use crate::error::{Error, Result};

/// The repository format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Parameters fixed at `init`. Readers need only `version` and `cipher`; the rest tells
/// writers how to cut and pack so that all writers deduplicate against each other.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub version: u32,
    /// Random repository id, 64 hex digits. Bound into every key file.
    pub id: String,
    pub created: String,
    pub chunker: ChunkerParams,
    /// Granularity of zero detection, bytes; zero runs of aligned blocks become zero extents.
    pub zero_block: u32,
    pub compression: Compression,
    pub cipher: String,
    pub id_hash: String,
    /// Target pack size, bytes.
    pub pack_size: u32,
    /// IANA time zone in which retention rules read days, weeks, months and years (set at
    /// `init`; absent in older repositories: the local zone of the machine is used then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    pub algorithm: String,
    pub level: i32,
}

pub const CIPHER: &str = "aes-256-gcm";
pub const ID_HASH: &str = "blake3-keyed";

impl Config {
    /// A fresh config with a random id.
    pub fn new(chunker: ChunkerParams, zstd_level: i32) -> Result<Self> {
        let id: [u8; 32] = crate::crypto::random_array()?;
        let config = Self {
            version: FORMAT_VERSION,
            id: hex::encode(id),
            created: jiff::Timestamp::now().to_string(),
            chunker,
            zero_block: 64 * 1024,
            compression: Compression { algorithm: "zstd".into(), level: zstd_level },
            cipher: CIPHER.into(),
            id_hash: ID_HASH.into(),
            pack_size: 16 * 1024 * 1024,
            time_zone: None,
        };
        config.validate()?;
        Ok(config)
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let config: Config = serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt("config", format!("not a vmvault config: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("config serializes");
        v.push(b'\n');
        v
    }

    /// Reject versions, ciphers and parameters this build cannot honour.
    pub fn validate(&self) -> Result<()> {
        if self.version != FORMAT_VERSION {
            return Err(Error::Unsupported(format!(
                "repository format version {} (this build reads version {FORMAT_VERSION})",
                self.version
            )));
        }
        if self.cipher != CIPHER || self.id_hash != ID_HASH || self.compression.algorithm != "zstd" {
            return Err(Error::Unsupported(format!(
                "cipher {:?}, id hash {:?}, compression {:?}",
                self.cipher, self.id_hash, self.compression.algorithm
            )));
        }
        if !(1..=22).contains(&self.compression.level) {
            return Err(Error::corrupt("config", format!("zstd level {} outside 1..=22", self.compression.level)));
        }
        if self.zero_block < 4096 || !self.zero_block.is_power_of_two() || self.zero_block > 16 << 20 {
            return Err(Error::corrupt(
                "config",
                format!("zero_block {} is not a power of two in 4 KiB..16 MiB", self.zero_block),
            ));
        }
        if !(1 << 20..=1 << 30).contains(&self.pack_size) {
            return Err(Error::corrupt("config", format!("pack_size {} outside 1 MiB..1 GiB", self.pack_size)));
        }
        if hex::decode(&self.id).map(|v| v.len()) != Ok(32) || self.id.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(Error::corrupt("config", "id is not 64 hex digits"));
        }
        self.chunker.validate().map_err(|e| Error::corrupt("config", e.to_string()))
    }

    pub fn id_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        // validate() guaranteed the shape.
        let _ = hex::decode_to_slice(&self.id, &mut out);
        out
    }
}
