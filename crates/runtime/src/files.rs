//! File operations on a sandbox's workspace, from the host, for both tiers.
//!
//! Everything goes through the confined layer ([`WorkspaceDir`], DESIGN.md
//! decision 1): paths are relative to the workspace (`/workspace/...` is
//! accepted too), resolved beneath the workspace's directory handle in one
//! step, and no symlink is ever followed; only regular files are read or
//! written, and a FIFO, socket or device is refused at once.
//!
//! The work is blocking, so it runs on Tokio's blocking pool, at most
//! [`MAX_CONCURRENT_FILE_OPS`] at a time in the process, each bounded by
//! [`FILE_OP_TIMEOUT`]. Recursive walks also stop by themselves at the confined
//! layer's own time bound, so an abandoned one does not run on.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use airlock_core::confined::{FileWriter, FsError, Owner, WorkspaceDir};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::error::{Error, Result};

pub use airlock_core::confined::MAX_LIST_ENTRIES;
pub use airlock_core::{Entry as FileEntry, EntryKind as FileKind};

/// Largest file the whole-file calls (`read_file`, `write_file`) move through
/// memory; the streaming calls have no such limit (the disk quota bounds them).
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// File operations that may run on blocking threads at once, process-wide:
/// bounds the threads a flood of file requests can occupy.
pub const MAX_CONCURRENT_FILE_OPS: usize = 16;
/// Longest one file operation may take before the caller gets an error.
pub const FILE_OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Size of the chunks a streamed write moves at a time.
const STREAM_CHUNK_BYTES: usize = 256 * 1024;

static FILE_OPS: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(MAX_CONCURRENT_FILE_OPS)));

/// Runs a confined operation on the blocking pool, bounded in number and time.
pub(crate) async fn blocking<T, F>(operation: &'static str, path: &str, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, FsError> + Send + 'static,
{
    let permit = FILE_OPS
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| Error::Invalid { what: "file operation", reason: "the file pool is closed".into() })?;
    let task = tokio::task::spawn_blocking(move || {
        // Held until the work really ends, even if its caller stopped waiting.
        let _permit = permit;
        work()
    });
    match tokio::time::timeout(FILE_OP_TIMEOUT, task).await {
        Ok(Ok(result)) => result.map_err(Error::from),
        Ok(Err(stopped)) => {
            Err(Error::Invalid { what: "file operation", reason: format!("{operation} stopped: {stopped}") })
        }
        Err(_) => Err(Error::FileTimeout { operation, path: path.to_string(), after: FILE_OP_TIMEOUT }),
    }
}

/// Opens a regular file for reading as a stream.
pub(crate) async fn open_read(dir: &WorkspaceDir, path: &str) -> Result<(tokio::fs::File, FileEntry)> {
    let (dir, owned) = (dir.clone(), path.to_string());
    let (file, entry) = blocking("read", path, move || dir.open_read(&owned)).await?;
    Ok((tokio::fs::File::from_std(file), entry))
}

pub(crate) async fn read(dir: &WorkspaceDir, path: &str) -> Result<Vec<u8>> {
    let (dir, owned) = (dir.clone(), path.to_string());
    blocking("read", path, move || dir.read(&owned, MAX_FILE_BYTES)).await
}

/// Writes `path` from `source`, streaming: the bytes go to a temporary file
/// that replaces `path` only once all of them are written. Returns the bytes
/// written. A source that fails, or a full quota, leaves the old file as it was.
pub(crate) async fn write_from<R: AsyncRead + Unpin>(
    dir: &WorkspaceDir,
    path: &str,
    source: &mut R,
    owner: Option<Owner>,
) -> Result<u64> {
    let (dir, owned) = (dir.clone(), path.to_string());
    let writer: FileWriter = blocking("write", path, move || dir.create(&owned, owner)).await?;
    let io_error = |error: std::io::Error| Error::from(FsError::from_io("write", path, error));
    let stream = writer.file().map(std::fs::File::try_clone).transpose().map_err(io_error)?;
    let Some(stream) = stream else {
        return Err(Error::Invalid { what: "file write", reason: "the file closed before it was written".into() });
    };
    let mut stream = tokio::fs::File::from_std(stream);
    let mut buffer = vec![0u8; STREAM_CHUNK_BYTES];
    let mut written = 0u64;
    loop {
        let read =
            source.read(&mut buffer).await.map_err(|error| Error::Upload { path: path.to_string(), source: error })?;
        if read == 0 {
            break;
        }
        stream.write_all(&buffer[..read]).await.map_err(io_error)?;
        written += read as u64;
    }
    stream.flush().await.map_err(io_error)?;
    drop(stream);
    blocking("write", path, move || writer.commit()).await?;
    Ok(written)
}

pub(crate) async fn write(dir: &WorkspaceDir, path: &str, bytes: &[u8], owner: Option<Owner>) -> Result<()> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::Invalid {
            what: "file size",
            reason: format!("{} bytes is over the {MAX_FILE_BYTES}-byte limit of a whole-file write", bytes.len()),
        });
    }
    let (dir, owned, bytes) = (dir.clone(), path.to_string(), bytes.to_vec());
    blocking("write", path, move || dir.write(&owned, &bytes, owner)).await
}

pub(crate) async fn list(dir: &WorkspaceDir, path: &str) -> Result<Vec<FileEntry>> {
    let (dir, owned) = (dir.clone(), path.to_string());
    blocking("list", path, move || dir.list(&owned, MAX_LIST_ENTRIES)).await
}

pub(crate) async fn stat(dir: &WorkspaceDir, path: &str) -> Result<FileEntry> {
    let (dir, owned) = (dir.clone(), path.to_string());
    blocking("stat", path, move || dir.stat(&owned)).await
}

pub(crate) async fn mkdir(dir: &WorkspaceDir, path: &str, owner: Option<Owner>) -> Result<()> {
    let (dir, owned) = (dir.clone(), path.to_string());
    blocking("mkdir", path, move || dir.mkdir_all(&owned, owner)).await
}

/// Removes a file, a link, or a directory with everything in it.
pub(crate) async fn remove(dir: &WorkspaceDir, path: &str) -> Result<()> {
    let (dir, owned) = (dir.clone(), path.to_string());
    blocking("remove", path, move || dir.remove(&owned)).await
}

pub(crate) async fn rename(dir: &WorkspaceDir, from: &str, to: &str, owner: Option<Owner>) -> Result<()> {
    let (dir, source, target) = (dir.clone(), from.to_string(), to.to_string());
    blocking("rename", from, move || dir.rename(&source, &target, owner)).await
}

/// Gives the whole workspace to `owner`, walking descriptors.
pub(crate) async fn hand_over(dir: &WorkspaceDir, owner: Owner) -> Result<u64> {
    let dir = dir.clone();
    blocking("hand over", "", move || dir.chown_tree(owner)).await
}

/// Reads a guest program from the workspace, at most `limit` bytes.
pub(crate) async fn read_guest(dir: &WorkspaceDir, path: &str, limit: u64) -> Result<Vec<u8>> {
    let (dir, owned) = (dir.clone(), path.to_string());
    blocking("load guest", path, move || dir.read(&owned, limit)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace() -> (tempfile::TempDir, WorkspaceDir) {
        let dir = tempfile::tempdir().unwrap();
        let ws = WorkspaceDir::open(dir.path()).unwrap();
        (dir, ws)
    }

    #[tokio::test]
    async fn files_stream_in_and_out_and_refusals_are_typed() {
        let (root, ws) = workspace();
        let data: Vec<u8> = (0..3 * STREAM_CHUNK_BYTES + 17).map(|i| (i % 251) as u8).collect();
        let written = write_from(&ws, "a/big.bin", &mut data.as_slice(), None).await.unwrap();
        assert_eq!(written, data.len() as u64);
        let (mut file, entry) = open_read(&ws, "/workspace/a/big.bin").await.unwrap();
        assert_eq!(entry.size, data.len() as u64);
        let mut back = Vec::new();
        file.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, data);
        assert!(matches!(read(&ws, "../x").await, Err(Error::Path { .. })));
        std::os::unix::fs::symlink("/etc", root.path().join("etc")).unwrap();
        assert!(matches!(read(&ws, "etc/passwd").await, Err(Error::Path { .. })));
        assert!(matches!(read(&ws, "missing").await, Err(Error::Fs(FsError::NotFound { .. }))));
    }

    #[tokio::test]
    async fn a_failed_upload_leaves_the_old_file() {
        let (root, ws) = workspace();
        write(&ws, "keep", b"old", None).await.unwrap();
        struct Failing(bool);
        impl AsyncRead for Failing {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                if self.0 {
                    return std::task::Poll::Ready(Err(std::io::Error::other("client went away")));
                }
                self.0 = true;
                buf.put_slice(b"partial");
                std::task::Poll::Ready(Ok(()))
            }
        }
        let error = write_from(&ws, "keep", &mut Failing(false), None).await.unwrap_err();
        assert!(matches!(error, Error::Upload { .. }), "{error}");
        assert_eq!(std::fs::read(root.path().join("keep")).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1, "no temporary file left");
    }

    #[tokio::test]
    async fn the_whole_file_limit_is_named() {
        let (_root, ws) = workspace();
        let big = vec![0u8; (MAX_FILE_BYTES + 1) as usize];
        assert!(write(&ws, "big", &big, None).await.unwrap_err().to_string().contains("limit"));
    }
}
