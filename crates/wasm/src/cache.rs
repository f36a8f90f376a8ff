//! The on-disk cache of compiled guests.
//!
//! Compiled code is native machine code that Wasmtime loads without further
//! checks, so a cache file is trusted only after it proves it is whole and ours:
//! each file carries a header with the hash of the source it was compiled from,
//! the key of the engine that compiled it, and a SHA-256 of its payload. A file
//! that is truncated, corrupt, foreign (another source or another engine) or
//! unreadable is reported as a miss, deleted, and rebuilt by the caller.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Identifies the file format; bump the digit when the layout changes.
const MAGIC: &[u8; 8] = b"AIRLCK01";
const HASH_LEN: usize = 32;
/// magic, source hash, engine key, payload hash, payload length.
const HEADER_LEN: usize = MAGIC.len() + 3 * HASH_LEN + 8;

pub(crate) type Hash32 = [u8; HASH_LEN];

pub(crate) fn sha256(bytes: &[u8]) -> Hash32 {
    Sha256::digest(bytes).into()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds a `Hash` value (the engine's compatibility hash) into SHA-256, so the
/// engine key is stable across processes, unlike `DefaultHasher`.
#[derive(Default)]
pub(crate) struct Sha256Hasher(Sha256);

impl std::hash::Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes([digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7]])
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl Sha256Hasher {
    pub(crate) fn digest(self) -> Hash32 {
        self.0.finalize().into()
    }
}

/// Why a cache file was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rejected {
    Missing,
    Unreadable(String),
    Truncated,
    BadMagic,
    Foreign,
    Corrupt,
}

#[derive(Debug, Clone)]
pub(crate) struct DiskCache {
    dir: PathBuf,
    engine_key: Hash32,
}

impl DiskCache {
    pub(crate) fn new(dir: PathBuf, engine_key: Hash32) -> Self {
        Self { dir, engine_key }
    }

    /// The file for a source; the engine key in the name keeps engines of
    /// different versions or settings from fighting over one file.
    pub(crate) fn path_for(&self, source: &Hash32) -> PathBuf {
        self.dir.join(format!("{}-{}.cwasm", hex(source), &hex(&self.engine_key)[..16]))
    }

    /// The verified payload for `source`, or why there is none. A file that is
    /// present but rejected is removed so that the rebuilt one replaces it.
    pub(crate) fn load(&self, source: &Hash32) -> Result<Vec<u8>, Rejected> {
        let path = self.path_for(source);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Rejected::Missing),
            Err(e) => return Err(Rejected::Unreadable(e.to_string())),
        };
        let verdict = self.verify(source, bytes);
        if verdict.is_err() {
            // Best effort: a file we cannot remove is overwritten by the rebuild anyway.
            let _ = std::fs::remove_file(&path);
        }
        verdict
    }

    fn verify(&self, source: &Hash32, mut bytes: Vec<u8>) -> Result<Vec<u8>, Rejected> {
        if bytes.len() < HEADER_LEN {
            return Err(if bytes.starts_with(MAGIC) || MAGIC.starts_with(&bytes) {
                Rejected::Truncated
            } else {
                Rejected::BadMagic
            });
        }
        let (header, payload) = bytes.split_at(HEADER_LEN);
        let (magic, rest) = header.split_at(MAGIC.len());
        if magic != MAGIC {
            return Err(Rejected::BadMagic);
        }
        let (file_source, rest) = rest.split_at(HASH_LEN);
        let (file_engine, rest) = rest.split_at(HASH_LEN);
        let (payload_hash, len) = rest.split_at(HASH_LEN);
        if file_source != source || file_engine != self.engine_key {
            return Err(Rejected::Foreign);
        }
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(len);
        let expected_len = u64::from_le_bytes(len_bytes);
        if (payload.len() as u64) < expected_len {
            return Err(Rejected::Truncated);
        }
        if payload.len() as u64 != expected_len || sha256(payload) != payload_hash {
            return Err(Rejected::Corrupt);
        }
        Ok(bytes.split_off(HEADER_LEN))
    }

    /// Writes a payload atomically (temporary file, then rename), so a crash
    /// mid-write leaves no half file under the final name.
    pub(crate) fn store(&self, source: &Hash32, payload: &[u8]) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path_for(source);
        let mut file = tempfile::NamedTempFile::new_in(&self.dir)?;
        file.write_all(MAGIC)?;
        file.write_all(source)?;
        file.write_all(&self.engine_key)?;
        file.write_all(&sha256(payload))?;
        file.write_all(&(payload.len() as u64).to_le_bytes())?;
        file.write_all(payload)?;
        file.as_file().sync_data()?;
        file.persist(&path).map_err(|e| e.error)?;
        Ok(path)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> (tempfile::TempDir, DiskCache) {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::new(dir.path().to_path_buf(), [7; 32]);
        (dir, cache)
    }

    #[test]
    fn round_trips() {
        let (_dir, cache) = cache();
        let source = sha256(b"module");
        assert_eq!(cache.load(&source), Err(Rejected::Missing));
        cache.store(&source, b"compiled code").unwrap();
        assert_eq!(cache.load(&source).unwrap(), b"compiled code");
    }

    #[test]
    fn rejects_and_removes_damaged_files() {
        let (_dir, cache) = cache();
        let source = sha256(b"module");
        let payload = vec![42u8; 1000];
        type Damage = fn(&mut Vec<u8>);
        let damage: [(&str, Damage, Rejected); 5] = [
            ("truncated payload", |f| f.truncate(f.len() - 10), Rejected::Truncated),
            ("truncated header", |f| f.truncate(20), Rejected::Truncated),
            ("flipped payload byte", |f| *f.last_mut().unwrap() ^= 1, Rejected::Corrupt),
            ("not ours", |f| f[0] = b'X', Rejected::BadMagic),
            ("other engine", |f| f[MAGIC.len() + HASH_LEN] ^= 1, Rejected::Foreign),
        ];
        for (what, damage, expected) in damage {
            let path = cache.store(&source, &payload).unwrap();
            let mut bytes = std::fs::read(&path).unwrap();
            damage(&mut bytes);
            std::fs::write(&path, &bytes).unwrap();
            assert_eq!(cache.load(&source), Err(expected), "{what}");
            assert!(!path.exists(), "{what}: rejected file should be removed");
        }
    }

    #[test]
    fn a_file_for_another_source_is_foreign() {
        let (_dir, cache) = cache();
        let a = sha256(b"a");
        let b = sha256(b"b");
        let path_a = cache.store(&a, b"code of a").unwrap();
        std::fs::copy(&path_a, cache.path_for(&b)).unwrap();
        assert_eq!(cache.load(&b), Err(Rejected::Foreign));
    }
}
