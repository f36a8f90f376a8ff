//! The on-disk cache of compiled guests.
//!
//! Compiled code is native machine code that Wasmtime loads without further
//! checks, so a cache entry is trusted only after it proves it is whole and
//! ours. An entry is two files:
//!
//! - `<source sha256>-<engine key>.cwasm`: Wasmtime's own artifact, loaded by
//!   mapping the file (code and memory images are then paged in lazily, which
//!   keeps a new process's start-up short);
//! - the same name with `.check`: the SHA-256 of the source it was compiled
//!   from, the key of the engine that compiled it, the artifact's length and
//!   its XXH3-128 checksum.
//!
//! An artifact that is truncated, corrupt (checksum mismatch), foreign (another
//! source or engine) or without its check file is reported, deleted, and
//! rebuilt by the caller. The checksum guards against damage, not against an
//! attacker who can write the cache directory (who could rewrite both files):
//! the cache directory must be writable only by the runtime's user.
//!
//! Checksumming reads the whole artifact (37 MB for the Python interpreter,
//! about 5 ms), which a new process would otherwise not touch. So once an
//! artifact has passed, a third file (`.verified`) records the artifact's
//! size, modification time and inode, and a later load whose artifact still
//! has that stamp skips the checksum. Replacing or rewriting the artifact
//! changes its stamp; damage that leaves size, time and inode unchanged (bit
//! rot) goes unnoticed after the first check.
//!
//! The cache also remembers, per guest file path, the source hash of the file
//! as it was (size, modification time, inode), so a new process does not read
//! and hash a large guest again to find its entry.
//!
//! The cache is bounded. Every load sets an artifact's access time (set
//! explicitly, so `noatime` or `relatime` mounts do not matter, and without
//! touching the modification time the `.verified` stamp records); after each
//! store, while the artifacts and their side files together pass the size
//! bound, the entry used least recently goes. An artifact larger than the
//! bound alone is not stored. The path index keeps at most
//! [`MAX_PATH_INDEX_ENTRIES`] entries, the oldest written going first.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Identifies the check-file format; bump the digit when the layout changes.
const MAGIC: &[u8; 8] = b"AIRLCK02";
const HASH_LEN: usize = 32;
/// magic, source hash, engine key, artifact checksum (16), artifact length (8).
const CHECK_LEN: usize = MAGIC.len() + 2 * HASH_LEN + 16 + 8;
/// Path-index entries: size (8), modification time in ns (16), inode (8), source hash.
const INDEX_LEN: usize = 8 + 16 + 8 + HASH_LEN;
/// Most guest file paths the index remembers: each is a small file, and
/// loading guests from ever new paths must not grow the directory for ever.
const MAX_PATH_INDEX_ENTRIES: usize = 4096;
const ARTIFACT_SUFFIX: &str = ".cwasm";

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

/// Why a cache entry was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rejected {
    Missing,
    Unreadable(String),
    Truncated,
    BadMagic,
    Foreign,
    Corrupt,
}

/// What identifies a file's version without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    len: u64,
    modified_ns: i128,
    inode: u64,
}

impl FileStamp {
    pub(crate) fn of(meta: &std::fs::Metadata) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let modified = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
        Some(Self { len: meta.len(), modified_ns: modified.as_nanos() as i128, inode: meta.ino() })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct DiskCache {
    dir: PathBuf,
    engine_key: Hash32,
    /// Bound on the total size of artifacts and their side files.
    max_bytes: u64,
}

fn checksum(bytes: &[u8]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(bytes).to_le_bytes()
}

/// Writes `contents` under `path` atomically (temporary file, then rename),
/// synced to disk before the rename.
fn write_atomically(dir: &Path, path: &Path, contents: &[&[u8]]) -> std::io::Result<()> {
    write_replacing(dir, path, contents, true)
}

/// Writes `contents` under `path` by rename, so readers see all or nothing;
/// `sync` also makes it survive a crash.
fn write_replacing(dir: &Path, path: &Path, contents: &[&[u8]], sync: bool) -> std::io::Result<()> {
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    for part in contents {
        file.write_all(part)?;
    }
    if sync {
        file.as_file().sync_data()?;
    }
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

impl DiskCache {
    pub(crate) fn new(dir: PathBuf, engine_key: Hash32, max_bytes: u64) -> Self {
        Self { dir, engine_key, max_bytes }
    }

    /// The artifact file for a source; the engine key in the name keeps
    /// engines of different versions or settings from fighting over one file.
    pub(crate) fn path_for(&self, source: &Hash32) -> PathBuf {
        self.dir.join(format!("{}-{}{ARTIFACT_SUFFIX}", hex(source), &hex(&self.engine_key)[..16]))
    }

    fn check_path_for(&self, source: &Hash32) -> PathBuf {
        self.sidecar_path_for(source, ".check")
    }

    fn verified_path_for(&self, source: &Hash32) -> PathBuf {
        self.sidecar_path_for(source, ".verified")
    }

    fn sidecar_path_for(&self, source: &Hash32, suffix: &str) -> PathBuf {
        let mut path = self.path_for(source).into_os_string();
        path.push(suffix);
        PathBuf::from(path)
    }

    /// The path of a verified artifact for `source`, or why there is none. An
    /// entry that is present but rejected is removed so that the rebuilt one
    /// replaces it.
    pub(crate) fn load(&self, source: &Hash32) -> Result<PathBuf, Rejected> {
        let verdict = self.verify(source);
        if matches!(verdict, Err(Rejected::Truncated | Rejected::BadMagic | Rejected::Foreign | Rejected::Corrupt)) {
            // Best effort: an entry we cannot remove is overwritten by the rebuild anyway.
            let _ = std::fs::remove_file(self.path_for(source));
            let _ = std::fs::remove_file(self.check_path_for(source));
            let _ = std::fs::remove_file(self.verified_path_for(source));
        }
        verdict
    }

    fn verify(&self, source: &Hash32) -> Result<PathBuf, Rejected> {
        let path = self.path_for(source);
        let check = match std::fs::read(self.check_path_for(source)) {
            Ok(check) => check,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(if path.exists() { Rejected::BadMagic } else { Rejected::Missing });
            }
            Err(e) => return Err(Rejected::Unreadable(e.to_string())),
        };
        if check.len() != CHECK_LEN || !check.starts_with(MAGIC) {
            return Err(Rejected::BadMagic);
        }
        let rest = &check[MAGIC.len()..];
        let (file_source, rest) = rest.split_at(HASH_LEN);
        let (file_engine, rest) = rest.split_at(HASH_LEN);
        let (expected_sum, len) = rest.split_at(16);
        if file_source != source || file_engine != self.engine_key {
            return Err(Rejected::Foreign);
        }
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(len);
        let expected_len = u64::from_le_bytes(len_bytes);
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Rejected::Truncated),
            Err(e) => return Err(Rejected::Unreadable(e.to_string())),
        };
        let meta = file.metadata().map_err(|e| Rejected::Unreadable(e.to_string()))?;
        let actual_len = meta.len();
        if actual_len < expected_len {
            return Err(Rejected::Truncated);
        }
        if actual_len != expected_len {
            return Err(Rejected::Corrupt);
        }
        let stamp = FileStamp::of(&meta).map(encode_stamp);
        let verified_path = self.verified_path_for(source);
        if stamp.is_some() && std::fs::read(&verified_path).ok().as_deref() == stamp.as_ref().map(|s| &s[..]) {
            mark_used(&file);
            return Ok(path);
        }
        if checksum(&map(&file)?) != expected_sum {
            return Err(Rejected::Corrupt);
        }
        if let Some(stamp) = stamp {
            // A hint: if it is lost, the next load checksums again.
            let _ = write_replacing(&self.dir, &verified_path, &[&stamp], false);
        }
        mark_used(&file);
        Ok(path)
    }

    /// Stores an artifact: the artifact first, its check file last, so a crash
    /// in between leaves an entry without a check file, which is never loaded.
    pub(crate) fn store(&self, source: &Hash32, artifact: &[u8]) -> std::io::Result<PathBuf> {
        if artifact.len() as u64 > self.max_bytes {
            return Err(std::io::Error::other(format!(
                "the artifact ({} bytes) is larger than the cache's size bound ({} bytes)",
                artifact.len(),
                self.max_bytes
            )));
        }
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path_for(source);
        write_atomically(&self.dir, &path, &[artifact])?;
        let len = (artifact.len() as u64).to_le_bytes();
        write_atomically(
            &self.dir,
            &self.check_path_for(source),
            &[MAGIC, source, &self.engine_key, &checksum(artifact), &len],
        )?;
        self.trim(&path);
        Ok(path)
    }

    /// Removes the least recently used entries, never `keep`, until the
    /// artifacts and their side files fit the size bound. Best effort: an
    /// entry another process removes first is simply gone.
    fn trim(&self, keep: &Path) {
        let Ok(listing) = std::fs::read_dir(&self.dir) else { return };
        let mut sizes = std::collections::HashMap::new();
        let mut artifacts = Vec::new();
        for entry in listing.flatten() {
            // Not followed: the cache holds regular files only.
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let path = entry.path();
            if path.to_str().is_some_and(|p| p.ends_with(ARTIFACT_SUFFIX)) && path != keep {
                let used = meta.accessed().unwrap_or(std::time::UNIX_EPOCH);
                artifacts.push((used, path.clone()));
            }
            sizes.insert(path, meta.len());
        }
        let mut total: u64 = sizes.values().sum();
        if total <= self.max_bytes {
            return;
        }
        artifacts.sort();
        for (_, artifact) in artifacts {
            let mut files = vec![artifact.clone()];
            for suffix in [".check", ".verified"] {
                let mut side = artifact.clone().into_os_string();
                side.push(suffix);
                files.push(PathBuf::from(side));
            }
            for file in files {
                // The artifact goes first: a check file left without it is
                // refused (as truncated) and removed by the next load.
                if let Some(size) = sizes.get(&file)
                    && std::fs::remove_file(&file).is_ok()
                {
                    total = total.saturating_sub(*size);
                }
            }
            if total <= self.max_bytes {
                break;
            }
        }
    }

    /// Total bytes of the cache's entries now (artifacts and side files, not the path index).
    #[cfg(test)]
    fn size(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|listing| {
                listing.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
            })
            .unwrap_or(0)
    }

    fn index_path_for(&self, guest_file: &Path) -> PathBuf {
        self.dir.join("paths").join(hex(&sha256(guest_file.as_os_str().as_encoded_bytes())))
    }

    /// The source hash recorded for `guest_file` if the file is unchanged since.
    pub(crate) fn recall_source(&self, guest_file: &Path, stamp: FileStamp) -> Option<Hash32> {
        let entry = std::fs::read(self.index_path_for(guest_file)).ok()?;
        if entry.len() != INDEX_LEN || entry[..32] != encode_stamp(stamp) {
            return None;
        }
        entry[32..].try_into().ok()
    }

    /// Records the source hash of `guest_file` as it is now. Best effort.
    pub(crate) fn remember_source(&self, guest_file: &Path, stamp: FileStamp, source: &Hash32) {
        let path = self.index_path_for(guest_file);
        if let Some(dir) = path.parent()
            && std::fs::create_dir_all(dir).is_ok()
        {
            let _ = write_atomically(dir, &path, &[&encode_stamp(stamp), source]);
            trim_index(dir, MAX_PATH_INDEX_ENTRIES);
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Removes the oldest written path-index entries beyond `max`.
fn trim_index(dir: &Path, max: usize) {
    let Ok(listing) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = listing
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok().filter(std::fs::Metadata::is_file)?;
            Some((meta.modified().unwrap_or(std::time::UNIX_EPOCH), e.path()))
        })
        .collect();
    if entries.len() <= max {
        return;
    }
    entries.sort();
    let excess = entries.len() - max;
    for (_, path) in entries.into_iter().take(excess) {
        let _ = std::fs::remove_file(path);
    }
}

/// Records that an artifact was just used: its access time, set explicitly.
/// The modification time, part of the `.verified` stamp, is left alone.
fn mark_used(file: &std::fs::File) {
    let _ = file.set_times(std::fs::FileTimes::new().set_accessed(std::time::SystemTime::now()));
}

fn encode_stamp(stamp: FileStamp) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..8].copy_from_slice(&stamp.len.to_le_bytes());
    out[8..24].copy_from_slice(&stamp.modified_ns.to_le_bytes());
    out[24..].copy_from_slice(&stamp.inode.to_le_bytes());
    out
}

#[allow(unsafe_code)]
fn map(file: &std::fs::File) -> Result<memmap2::Mmap, Rejected> {
    // SAFETY: the mapping is read only and dropped before this function's
    // caller returns; a concurrent writer could change the bytes under it, but
    // cache files are only ever replaced by rename, never written in place.
    unsafe { memmap2::Mmap::map(file) }.map_err(|e| Rejected::Unreadable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> (tempfile::TempDir, DiskCache) {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::new(dir.path().to_path_buf(), [7; 32], u64::MAX);
        (dir, cache)
    }

    #[test]
    fn stays_under_its_bound_dropping_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        // Room for two entries of 1000 bytes with their side files, not three.
        let cache = DiskCache::new(dir.path().to_path_buf(), [7; 32], 2 * (1000 + CHECK_LEN as u64 + 32) + 100);
        let [a, b, c, d] = [b"a", b"b", b"c", b"d"].map(|s| sha256(s));
        cache.store(&a, &[1; 1000]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.store(&b, &[2; 1000]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // a is used after b was stored: b is now the least recently used.
        assert!(cache.load(&a).is_ok());
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.store(&c, &[3; 1000]).unwrap();
        assert!(cache.size() <= cache.max_bytes, "{} bytes", cache.size());
        assert_eq!(cache.load(&b), Err(Rejected::Missing), "b was least recently used");
        assert!(!cache.check_path_for(&b).exists() && !cache.verified_path_for(&b).exists());
        assert!(cache.load(&a).is_ok() && cache.load(&c).is_ok());
        // An artifact larger than the whole bound is not stored at all.
        assert!(cache.store(&d, &[4; 5000]).is_err());
        assert_eq!(cache.load(&d), Err(Rejected::Missing));
        assert!(cache.load(&a).is_ok() && cache.load(&c).is_ok());
    }

    #[test]
    fn the_path_index_is_bounded() {
        let (dir, cache) = cache();
        let index = dir.path().join("paths");
        for i in 0..10 {
            let guest = dir.path().join(format!("guest{i}.wasm"));
            std::fs::write(&guest, b"v").unwrap();
            let stamp = FileStamp::of(&std::fs::metadata(&guest).unwrap()).unwrap();
            cache.remember_source(&guest, stamp, &sha256(b"v"));
        }
        assert_eq!(std::fs::read_dir(&index).unwrap().count(), 10);
        trim_index(&index, 4);
        assert_eq!(std::fs::read_dir(&index).unwrap().count(), 4);
    }

    #[test]
    fn round_trips() {
        let (_dir, cache) = cache();
        let source = sha256(b"module");
        assert_eq!(cache.load(&source), Err(Rejected::Missing));
        let path = cache.store(&source, b"compiled code").unwrap();
        assert_eq!(cache.load(&source), Ok(path.clone()));
        assert_eq!(std::fs::read(path).unwrap(), b"compiled code");
    }

    #[test]
    fn rejects_and_removes_damaged_entries() {
        let (_dir, cache) = cache();
        let source = sha256(b"module");
        let payload = vec![42u8; 1000];
        type Damage = fn(&mut Vec<u8>);
        let artifact_damage: [(&str, Damage, Rejected); 4] = [
            ("truncated", |f| f.truncate(f.len() - 10), Rejected::Truncated),
            ("emptied", |f| f.clear(), Rejected::Truncated),
            ("flipped byte", |f| f[500] ^= 1, Rejected::Corrupt),
            ("grown", |f| f.push(0), Rejected::Corrupt),
        ];
        for (what, damage, expected) in artifact_damage {
            let path = cache.store(&source, &payload).unwrap();
            let mut bytes = std::fs::read(&path).unwrap();
            damage(&mut bytes);
            std::fs::write(&path, &bytes).unwrap();
            assert_eq!(cache.load(&source), Err(expected), "{what}");
            assert!(!path.exists(), "{what}: rejected entry should be removed");
        }
        let check_damage: [(&str, Damage, Rejected); 3] = [
            ("not ours", |f| f[0] = b'X', Rejected::BadMagic),
            ("short", |f| f.truncate(10), Rejected::BadMagic),
            ("other engine", |f| f[MAGIC.len() + HASH_LEN] ^= 1, Rejected::Foreign),
        ];
        for (what, damage, expected) in check_damage {
            let path = cache.store(&source, &payload).unwrap();
            let check = cache.check_path_for(&source);
            let mut bytes = std::fs::read(&check).unwrap();
            damage(&mut bytes);
            std::fs::write(&check, &bytes).unwrap();
            assert_eq!(cache.load(&source), Err(expected), "{what}");
            assert!(!path.exists() && !check.exists(), "{what}: rejected entry should be removed");
        }
        let path = cache.store(&source, &payload).unwrap();
        std::fs::remove_file(cache.check_path_for(&source)).unwrap();
        assert_eq!(cache.load(&source), Err(Rejected::BadMagic), "artifact without its check file");
        assert!(!path.exists());
    }

    #[test]
    fn a_verified_artifact_is_not_checksummed_again_until_it_changes() {
        let (_dir, cache) = cache();
        let source = sha256(b"module");
        let path = cache.store(&source, &[42u8; 1000]).unwrap();
        let verified = cache.verified_path_for(&source);
        assert!(!verified.exists(), "stored is not verified");
        assert_eq!(cache.load(&source), Ok(path.clone()));
        assert!(verified.exists(), "a checksummed artifact is recorded");
        // With the stamp recorded, a wrong checksum in the check file goes
        // unread: proof the artifact was not checksummed again.
        let check = cache.check_path_for(&source);
        let mut bytes = std::fs::read(&check).unwrap();
        bytes[MAGIC.len() + 2 * HASH_LEN] ^= 1;
        std::fs::write(&check, &bytes).unwrap();
        assert_eq!(cache.load(&source), Ok(path.clone()));
        // A replaced artifact has another stamp, and is checksummed again.
        let mut damaged = std::fs::read(&path).unwrap();
        damaged[500] ^= 1;
        let replacement = path.with_extension("new");
        std::fs::write(&replacement, &damaged).unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        assert_eq!(cache.load(&source), Err(Rejected::Corrupt));
        assert!(!path.exists() && !verified.exists());
    }

    #[test]
    fn an_entry_for_another_source_is_foreign() {
        let (_dir, cache) = cache();
        let a = sha256(b"a");
        let b = sha256(b"b");
        cache.store(&a, b"code of a").unwrap();
        std::fs::copy(cache.path_for(&a), cache.path_for(&b)).unwrap();
        std::fs::copy(cache.check_path_for(&a), cache.check_path_for(&b)).unwrap();
        assert_eq!(cache.load(&b), Err(Rejected::Foreign));
    }

    #[test]
    fn remembers_source_hashes_of_unchanged_files() {
        let (dir, cache) = cache();
        let guest = dir.path().join("guest.wasm");
        std::fs::write(&guest, b"v1").unwrap();
        let stamp = FileStamp::of(&std::fs::metadata(&guest).unwrap()).unwrap();
        assert_eq!(cache.recall_source(&guest, stamp), None);
        cache.remember_source(&guest, stamp, &sha256(b"v1"));
        assert_eq!(cache.recall_source(&guest, stamp), Some(sha256(b"v1")));
        std::fs::write(&guest, b"v2 is longer").unwrap();
        let changed = FileStamp::of(&std::fs::metadata(&guest).unwrap()).unwrap();
        assert_eq!(cache.recall_source(&guest, changed), None);
    }
}
