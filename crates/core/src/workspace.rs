//! A sandbox's workspace: one host directory, the single source of truth for its files.

use std::path::{Path, PathBuf};

use crate::Error;

/// Where every tier shows the workspace to guest code.
pub const WORKSPACE_GUEST_PATH: &str = "/workspace";

/// A host directory that serves as a sandbox's workspace. Constructed only for
/// an existing directory; the path is canonical (absolute, no symlinks), so
/// every tier confines guests to the same place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    /// Opens an existing directory as a workspace.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let root = path.canonicalize().map_err(|source| Error::Workspace {
            path: path.to_path_buf(),
            reason: source.to_string(),
        })?;
        if !root.is_dir() {
            return Err(Error::Workspace { path: path.to_path_buf(), reason: "not a directory".into() });
        }
        Ok(Self { root })
    }

    /// Creates the directory (and its parents) if missing, then opens it.
    pub fn create(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        std::fs::create_dir_all(path).map_err(|source| Error::Workspace {
            path: path.to_path_buf(),
            reason: source.to_string(),
        })?;
        Self::open(path)
    }

    /// The canonical host path.
    pub fn host_path(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_directories_only() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::open(dir.path()).unwrap();
        assert_eq!(ws.host_path(), dir.path().canonicalize().unwrap());

        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = Workspace::open(&file).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");

        let err = Workspace::open(dir.path().join("missing")).unwrap_err().to_string();
        assert!(err.contains("No such file"), "{err}");
    }

    #[test]
    fn create_makes_missing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::create(dir.path().join("a/b")).unwrap();
        assert!(ws.host_path().is_dir());
    }
}
