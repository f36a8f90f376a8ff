//! The interpreter components this binary carries (packed by build.rs), and
//! unpacking them once into a per-user cache so a copied or installed binary
//! runs Python and JavaScript with no build tree.
//!
//! A build tree (or `$AIRLOCK_INTERPRETERS`) still wins, so a developer's
//! freshly built guests are what runs.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use airlock::wasm::interpreter::{build_tree_interpreter_dir, set_fallback_interpreter_dir};
use anyhow::{Context, Result, bail};

/// (file name, unpacked size, zstd bytes) for each carried component; empty
/// when the binary was built before the guests.
const CARRIED: &[(&str, usize, &[u8])] = include!(concat!(env!("OUT_DIR"), "/carried_interpreters.rs"));
/// Names this build's set of components (build.rs hashes them), so a newer
/// binary unpacks beside an older one.
const CARRIED_DIGEST: &str = include!(concat!(env!("OUT_DIR"), "/carried_digest.rs"));

/// Makes the carried interpreters the fallback interpreter directory, unpacking
/// them on first use. A no-op when a build tree provides them or the binary
/// carries none.
pub fn install() -> Result<()> {
    if CARRIED.is_empty() || build_tree_interpreter_dir().is_some() {
        return Ok(());
    }
    let dir = cache_root().join("interpreters").join(CARRIED_DIGEST);
    unpack_into(&dir).with_context(|| format!("unpacking the interpreters into {}", dir.display()))?;
    set_fallback_interpreter_dir(dir);
    Ok(())
}

/// Where derived files go: `$XDG_CACHE_HOME/airlock`, else `~/.cache/airlock`,
/// else the runtime's default home. Never a shared directory such as /tmp,
/// where another user could plant a component first.
fn cache_root() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("XDG_CACHE_HOME")
        .map(|cache| cache.join("airlock"))
        .or_else(|| var("HOME").map(|home| home.join(".cache").join("airlock")))
        .unwrap_or_else(airlock::runtime::default_home)
}

/// Unpacks every carried component into `dir` unless it is there already.
/// Each file is written under a temporary name and renamed into place, so a
/// concurrent start or a crash never leaves a half-written component; the
/// directory is named by the components' digest and private to this user, so
/// a file of the right size there is the one this binary wrote.
fn unpack_into(dir: &Path) -> Result<()> {
    let present = |name: &str, size: usize| {
        std::fs::symlink_metadata(dir.join(name)).is_ok_and(|meta| meta.is_file() && meta.len() == size as u64)
    };
    if CARRIED.iter().all(|(name, size, _)| present(name, *size)) {
        return Ok(());
    }
    create_private_dir(dir)?;
    for (name, size, packed) in CARRIED {
        let bytes = unpack(packed, *size).with_context(|| format!("carried {name}"))?;
        let mut temporary = tempfile::NamedTempFile::new_in(dir)?;
        temporary.write_all(&bytes)?;
        temporary.as_file().sync_all()?;
        temporary.persist(dir.join(name))?;
    }
    Ok(())
}

fn unpack(packed: &[u8], size: usize) -> Result<Vec<u8>> {
    let mut decoder = ruzstd::decoding::StreamingDecoder::new(packed).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut bytes = Vec::with_capacity(size);
    decoder.read_to_end(&mut bytes)?;
    if bytes.len() != size {
        bail!("unpacked {} bytes, expected {size}", bytes.len());
    }
    Ok(bytes)
}

/// Creates `dir` and its missing parents, readable by this user only.
fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    Ok(())
}
