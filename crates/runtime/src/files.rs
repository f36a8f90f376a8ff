//! File operations on a sandbox's workspace, from the host, for both tiers.
//!
//! Paths are relative to the workspace (`/workspace/...` is accepted too) and
//! confined to it with the isolates' rules: no `..`, no other absolute path,
//! and no symlink that leads out. Every symlink on the way is resolved and
//! checked; the last component of a remove or rename is the link itself.

use std::path::{Component, Path, PathBuf};

use airlock_core::WORKSPACE_GUEST_PATH;
use serde::Serialize;

use crate::error::{Error, Result};

/// Largest file `read` returns and `write` accepts: files pass through memory.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Most entries one `list` returns.
pub const MAX_LIST_ENTRIES: usize = 10_000;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    Other,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileEntry {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
}

fn refuse(path: &str, reason: impl Into<String>) -> Error {
    Error::Path { path: path.to_string(), reason: reason.into() }
}

/// The workspace-relative components of `path`, checked.
fn relative_parts(path: &str) -> Result<Vec<String>> {
    if path.contains('\0') {
        return Err(refuse(path, "contains a NUL byte"));
    }
    let relative = match path.strip_prefix(WORKSPACE_GUEST_PATH) {
        Some("") => "",
        Some(rest) if rest.starts_with('/') => rest.trim_start_matches('/'),
        _ if path.starts_with('/') => return Err(refuse(path, "absolute paths must be under /workspace")),
        _ => path,
    };
    let mut parts = Vec::new();
    for component in Path::new(relative).components() {
        match component {
            Component::Normal(part) => {
                parts.push(part.to_str().ok_or_else(|| refuse(path, "is not UTF-8"))?.to_string())
            }
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse(path, "'..' is not allowed")),
            Component::RootDir | Component::Prefix(_) => return Err(refuse(path, "must be relative to the workspace")),
        }
    }
    Ok(parts)
}

/// The host path of `path` in the workspace at `root` (canonical). With
/// `follow_last` false the last component is not resolved (it may be a link
/// to remove or rename). Missing components are allowed: they are to be made.
pub(crate) fn resolve(root: &Path, path: &str, follow_last: bool) -> Result<PathBuf> {
    let parts = relative_parts(path)?;
    let mut resolved = root.to_path_buf();
    for (index, part) in parts.iter().enumerate() {
        let next = resolved.join(part);
        let last = index + 1 == parts.len();
        match std::fs::symlink_metadata(&next) {
            Ok(metadata) if metadata.file_type().is_symlink() && (follow_last || !last) => {
                let target =
                    next.canonicalize().map_err(|_| refuse(path, format!("symlink {part:?} leads nowhere")))?;
                if !target.starts_with(root) {
                    return Err(refuse(path, format!("symlink {part:?} leads out of the workspace")));
                }
                resolved = target;
            }
            _ => resolved = next,
        }
    }
    Ok(resolved)
}

fn file_error<'a>(operation: &'static str, path: &'a str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::File { operation, path: path.to_string(), source }
}

pub(crate) fn read(root: &Path, path: &str) -> Result<Vec<u8>> {
    let host = resolve(root, path, true)?;
    let size = std::fs::metadata(&host).map_err(file_error("read", path))?.len();
    if size > MAX_FILE_BYTES {
        return Err(Error::Invalid {
            what: "file size",
            reason: format!("{path:?} is {size} bytes, over the {MAX_FILE_BYTES}-byte file limit"),
        });
    }
    std::fs::read(&host).map_err(file_error("read", path))
}

/// Writes `bytes` to `path`, making missing parent directories. Returns the host path.
pub(crate) fn write(root: &Path, path: &str, bytes: &[u8]) -> Result<PathBuf> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::Invalid {
            what: "file size",
            reason: format!("{} bytes is over the {MAX_FILE_BYTES}-byte file limit", bytes.len()),
        });
    }
    let host = resolve(root, path, true)?;
    if host == root {
        return Err(refuse(path, "is the workspace itself"));
    }
    if let Some(parent) = host.parent() {
        std::fs::create_dir_all(parent).map_err(file_error("write", path))?;
    }
    std::fs::write(&host, bytes).map_err(file_error("write", path))?;
    Ok(host)
}

pub(crate) fn list(root: &Path, path: &str) -> Result<Vec<FileEntry>> {
    let host = resolve(root, path, true)?;
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(&host).map_err(file_error("list", path))? {
        let entry = entry.map_err(file_error("list", path))?;
        if entries.len() == MAX_LIST_ENTRIES {
            return Err(Error::Invalid {
                what: "listing",
                reason: format!("{path:?} has more than {MAX_LIST_ENTRIES} entries (the listing limit)"),
            });
        }
        let metadata = entry.metadata().map_err(file_error("list", path))?;
        let kind = if metadata.file_type().is_symlink() {
            FileKind::Symlink
        } else if metadata.is_dir() {
            FileKind::Directory
        } else if metadata.is_file() {
            FileKind::File
        } else {
            FileKind::Other
        };
        entries.push(FileEntry { name: entry.file_name().to_string_lossy().into_owned(), kind, size: metadata.len() });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

pub(crate) fn mkdir(root: &Path, path: &str) -> Result<PathBuf> {
    let host = resolve(root, path, true)?;
    std::fs::create_dir_all(&host).map_err(file_error("mkdir", path))?;
    Ok(host)
}

/// Removes a file, a link, or a directory with everything in it.
pub(crate) fn remove(root: &Path, path: &str) -> Result<()> {
    let host = resolve(root, path, false)?;
    if host == root {
        return Err(refuse(path, "is the workspace itself"));
    }
    let metadata = std::fs::symlink_metadata(&host).map_err(file_error("remove", path))?;
    if metadata.is_dir() {
        std::fs::remove_dir_all(&host).map_err(file_error("remove", path))
    } else {
        std::fs::remove_file(&host).map_err(file_error("remove", path))
    }
}

pub(crate) fn rename(root: &Path, from: &str, to: &str) -> Result<PathBuf> {
    let source = resolve(root, from, false)?;
    let target = resolve(root, to, false)?;
    if source == root || target == root {
        return Err(refuse(from, "the workspace itself cannot be renamed"));
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(file_error("rename", to))?;
    }
    std::fs::rename(&source, &target).map_err(file_error("rename", from))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ws");
        std::fs::create_dir(&root).unwrap();
        let root = root.canonicalize().unwrap();
        (dir, root)
    }

    #[test]
    fn files_round_trip_inside_the_workspace() {
        let (_dir, root) = workspace();
        write(&root, "a/b/c.txt", b"hello").unwrap();
        assert_eq!(read(&root, "/workspace/a/b/c.txt").unwrap(), b"hello");
        assert_eq!(
            list(&root, "a/b").unwrap(),
            vec![FileEntry { name: "c.txt".into(), kind: FileKind::File, size: 5 }]
        );
        rename(&root, "a/b/c.txt", "d.txt").unwrap();
        assert_eq!(read(&root, "./d.txt").unwrap(), b"hello");
        mkdir(&root, "e/f").unwrap();
        remove(&root, "e").unwrap();
        remove(&root, "d.txt").unwrap();
        let names: Vec<String> = list(&root, "").unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec!["a"]);
    }

    #[test]
    fn escapes_are_refused() {
        let (dir, root) = workspace();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        for (path, reason) in [
            ("../secret", "'..' is not allowed"),
            ("a/../../secret", "'..' is not allowed"),
            ("/etc/passwd", "absolute paths must be under /workspace"),
            ("/workspacefoo", "absolute paths must be under /workspace"),
        ] {
            let error = read(&root, path).unwrap_err().to_string();
            assert!(error.contains(reason), "{path}: {error}");
        }
        std::os::unix::fs::symlink(dir.path(), root.join("out")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("passwd")).unwrap();
        std::fs::create_dir(root.join("in")).unwrap();
        std::os::unix::fs::symlink(root.join("in"), root.join("inside")).unwrap();
        assert!(read(&root, "out/secret").unwrap_err().to_string().contains("leads out of the workspace"));
        assert!(read(&root, "passwd").unwrap_err().to_string().contains("leads out of the workspace"));
        assert!(write(&root, "out/new", b"x").is_err());
        assert!(!dir.path().join("new").exists());
        // A link that stays inside is followed; removing a link removes the link only.
        write(&root, "inside/note", b"ok").unwrap();
        assert_eq!(std::fs::read(root.join("in/note")).unwrap(), b"ok");
        remove(&root, "passwd").unwrap();
        assert!(Path::new("/etc/passwd").exists());
        assert!(write(&root, "", b"x").is_err(), "the workspace itself");
    }

    #[test]
    fn the_size_limit_is_named() {
        let (_dir, root) = workspace();
        let big = vec![0u8; (MAX_FILE_BYTES + 1) as usize];
        assert!(write(&root, "big", &big).unwrap_err().to_string().contains("file limit"));
    }
}
