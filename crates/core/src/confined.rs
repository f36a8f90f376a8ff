//! The confined workspace layer (DESIGN.md, decision 1): every host-side
//! operation on a workspace goes through a [`WorkspaceDir`].
//!
//! The workspace belongs to the code in the sandbox, which can rename, swap and
//! link anything in it at any instant. So the host never resolves a path in it
//! and then uses that path again:
//!
//! - the workspace is opened once, as a directory handle;
//! - a path is resolved beneath that handle in one step, by `openat2` with
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//!   RESOLVE_NO_XDEV`, or one component at a time with `O_NOFOLLOW`: a symlink
//!   anywhere on the way is refused, never followed;
//! - a file is opened with `O_PATH | O_NOFOLLOW` first, its type checked on the
//!   descriptor, and only a regular file is reopened for reading or writing, so
//!   a FIFO, socket or device is refused at once and never opened;
//! - creating, renaming, removing and changing owners go through directory
//!   handles (`mkdirat`, `renameat`, `unlinkat`, `fchown`, `fchownat` with
//!   `AT_SYMLINK_NOFOLLOW` on one name in a held directory), and recursive work
//!   walks descriptors, bounded in depth and time.
//!
//! No host [`Path`] into the workspace leaves this module: what comes out are
//! open files, directory handles and entries.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;
use serde::Serialize;

use crate::WORKSPACE_GUEST_PATH;

/// Deepest directory tree a recursive walk (remove, ownership handover)
/// descends: each level holds one descriptor open, so this bounds the
/// descriptors a hostile tree can make the host hold.
pub const MAX_TREE_DEPTH: usize = 512;
/// Longest a recursive walk may run before it stops with an error: code in the
/// sandbox can keep adding entries while the host walks.
pub const MAX_WALK_TIME: Duration = Duration::from_secs(60);
/// Most entries one listing returns.
pub const MAX_LIST_ENTRIES: usize = 10_000;
/// Prefix of the temporary name a write goes to before it replaces its target.
pub const UPLOAD_PREFIX: &str = ".airlock-upload-";

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// What a workspace entry is. Only files and directories are read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    Unknown,
}

impl EntryKind {
    fn of(stat: &Stat) -> Self {
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => Self::File,
            FileType::Directory => Self::Directory,
            FileType::Symlink => Self::Symlink,
            FileType::Fifo => Self::Fifo,
            FileType::Socket => Self::Socket,
            FileType::CharacterDevice => Self::CharDevice,
            FileType::BlockDevice => Self::BlockDevice,
            FileType::Unknown => Self::Unknown,
        }
    }
}

impl std::fmt::Display for EntryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::File => "regular file",
            Self::Directory => "directory",
            Self::Symlink => "symbolic link",
            Self::Fifo => "FIFO",
            Self::Socket => "socket",
            Self::CharDevice => "character device",
            Self::BlockDevice => "block device",
            Self::Unknown => "file of unknown type",
        })
    }
}

/// One workspace entry, as its directory reports it (links not followed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Last modification, in milliseconds since the Unix epoch.
    pub modified_ms: i64,
}

impl Entry {
    fn new(name: String, stat: &Stat) -> Self {
        let modified_ms = stat
            .st_mtime
            .saturating_mul(1000)
            .saturating_add(i64::try_from(stat.st_mtime_nsec / 1_000_000).unwrap_or(0));
        Self {
            name,
            kind: EntryKind::of(stat),
            size: u64::try_from(stat.st_size).unwrap_or(0),
            mode: stat.st_mode & 0o7777,
            modified_ms,
        }
    }
}

/// Who files the host makes in a workspace belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Why a confined operation was refused or failed. Paths are the caller's,
/// as given (workspace-relative), never host paths.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    #[error("path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("path {path:?} goes through a symbolic link; the host never follows links in a workspace")]
    Symlink { path: String },
    #[error("path {path:?} leaves the workspace")]
    Escape { path: String },
    #[error("{path:?} is a {kind}: only regular files and directories can be read or written")]
    SpecialFile { path: String, kind: EntryKind },
    #[error("{path:?} does not exist")]
    NotFound { path: String },
    #[error("{path:?} is not a directory")]
    NotADirectory { path: String },
    #[error("{path:?} is a directory")]
    IsADirectory { path: String },
    #[error("{path:?} already exists")]
    Exists { path: String },
    #[error("{path:?}: the sandbox's disk quota is used up (no space left)")]
    NoSpace { path: String },
    #[error("{path:?} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { path: String, size: u64, limit: u64 },
    #[error("{path:?}: {what} (limit {limit})")]
    Limit { path: String, what: &'static str, limit: u64 },
    #[error("{operation} {path:?}: {source}")]
    Io {
        operation: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl FsError {
    /// Maps an errno from a confined operation to what it means there.
    fn from_errno(operation: &'static str, path: &str, errno: Errno) -> Self {
        let path = path.to_string();
        match errno {
            Errno::LOOP => Self::Symlink { path },
            Errno::XDEV => Self::Escape { path },
            Errno::NOENT => Self::NotFound { path },
            Errno::NOTDIR => Self::NotADirectory { path },
            Errno::ISDIR => Self::IsADirectory { path },
            Errno::EXIST | Errno::NOTEMPTY => Self::Exists { path },
            Errno::NOSPC | Errno::DQUOT => Self::NoSpace { path },
            other => Self::Io { operation, path, source: other.into() },
        }
    }

    /// Maps an I/O error met while reading or writing a confined file.
    pub fn from_io(operation: &'static str, path: &str, error: io::Error) -> Self {
        match error.raw_os_error() {
            Some(code) => Self::from_errno(operation, path, Errno::from_raw_os_error(code)),
            None => Self::Io { operation, path: path.to_string(), source: error },
        }
    }

    /// True when the operation failed for want of space (the disk quota).
    pub fn is_no_space(&self) -> bool {
        matches!(self, Self::NoSpace { .. })
    }
}

type Result<T, E = FsError> = std::result::Result<T, E>;

/// A workspace path, checked: relative to the workspace (`/workspace/...` is
/// accepted too), no `..`, no NUL, no other absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RelPath<'a> {
    given: &'a str,
    parts: Vec<&'a str>,
}

impl<'a> RelPath<'a> {
    fn parse(given: &'a str) -> Result<Self> {
        let invalid = |reason| Err(FsError::InvalidPath { path: given.to_string(), reason });
        if given.contains('\0') {
            return invalid("contains a NUL byte");
        }
        let relative = match given.strip_prefix(WORKSPACE_GUEST_PATH) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
            _ if given.starts_with('/') => return invalid("absolute paths must be under /workspace"),
            _ => given,
        };
        let mut parts = Vec::new();
        for part in relative.split('/') {
            match part {
                "" | "." => {}
                ".." => return invalid("'..' is not allowed"),
                part => parts.push(part),
            }
        }
        Ok(Self { given, parts })
    }

    fn joined(&self) -> String {
        if self.parts.is_empty() { ".".to_string() } else { self.parts.join("/") }
    }

    /// The parent's parts and the last name; `None` for the workspace itself.
    fn split_last(&self) -> Option<(&[&'a str], &'a str)> {
        let (last, parent) = self.parts.split_last()?;
        Some((parent, last))
    }
}

fn refuse_root(path: &str) -> FsError {
    FsError::InvalidPath { path: path.to_string(), reason: "is the workspace itself" }
}

/// A workspace, opened once as a directory handle. Cheap to clone (clones
/// share the handle). Every method takes a workspace-relative path.
#[derive(Debug, Clone)]
pub struct WorkspaceDir {
    root: Arc<OwnedFd>,
}

impl WorkspaceDir {
    /// Opens the directory at `host_path` (a path the host controls, not one
    /// inside a workspace) as a workspace.
    pub fn open(host_path: &Path) -> Result<Self> {
        let shown = host_path.display().to_string();
        let fd = rustix::fs::open(
            host_path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| FsError::from_errno("open workspace", &shown, errno))?;
        Ok(Self { root: Arc::new(fd) })
    }

    /// The workspace's root directory handle.
    pub fn root(&self) -> &OwnedFd {
        &self.root
    }

    fn open_beneath(&self, path: &RelPath<'_>, flags: OFlags) -> Result<OwnedFd> {
        let joined = path.joined();
        match rustix::fs::openat2(&*self.root, joined.as_str(), flags | OFlags::CLOEXEC, Mode::empty(), RESOLVE) {
            Ok(fd) => Ok(fd),
            // With O_NOFOLLOW | O_DIRECTORY a final link answers ENOTDIR. Only
            // to name the refusal, look at what is there (nothing is used).
            Err(Errno::NOTDIR) => {
                let what = rustix::fs::openat2(
                    &*self.root,
                    joined.as_str(),
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                    RESOLVE,
                )
                .and_then(rustix::fs::fstat);
                match what {
                    Ok(stat) if EntryKind::of(&stat) == EntryKind::Symlink => {
                        Err(FsError::Symlink { path: path.given.to_string() })
                    }
                    _ => Err(FsError::NotADirectory { path: path.given.to_string() }),
                }
            }
            Err(errno) => Err(FsError::from_errno("open", path.given, errno)),
        }
    }

    /// A directory of the workspace, as a handle.
    pub fn open_dir(&self, path: &str) -> Result<OwnedFd> {
        let path = RelPath::parse(path)?;
        self.open_beneath(&path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW)
    }

    fn open_parent(&self, path: &RelPath<'_>, parent: &[&str]) -> Result<OwnedFd> {
        let parent = RelPath { given: path.given, parts: parent.to_vec() };
        self.open_beneath(&parent, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW)
    }

    /// What is at `path`, the entry itself (a link is reported, not followed).
    pub fn stat(&self, path: &str) -> Result<Entry> {
        let rel = RelPath::parse(path)?;
        match rel.split_last() {
            None => {
                let stat = rustix::fs::fstat(&*self.root).map_err(|e| FsError::from_errno("stat", path, e))?;
                Ok(Entry::new(String::new(), &stat))
            }
            Some((parent, name)) => {
                let dir = self.open_parent(&rel, parent)?;
                let stat = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| FsError::from_errno("stat", path, e))?;
                Ok(Entry::new(name.to_string(), &stat))
            }
        }
    }

    /// Opens a regular file for reading. Anything else is refused without
    /// being opened: the file is first reached with `O_PATH`, its type checked
    /// on that descriptor, and only then reopened.
    pub fn open_read(&self, path: &str) -> Result<(File, Entry)> {
        let rel = RelPath::parse(path)?;
        let located = self.open_beneath(&rel, OFlags::PATH | OFlags::NOFOLLOW)?;
        let stat = rustix::fs::fstat(&located).map_err(|e| FsError::from_errno("stat", path, e))?;
        let name = rel.parts.last().map(|s| s.to_string()).unwrap_or_default();
        let entry = Entry::new(name, &stat);
        match entry.kind {
            EntryKind::File => {}
            EntryKind::Directory => return Err(FsError::IsADirectory { path: path.to_string() }),
            // O_PATH with O_NOFOLLOW reaches a final link itself.
            EntryKind::Symlink => return Err(FsError::Symlink { path: path.to_string() }),
            kind => return Err(FsError::SpecialFile { path: path.to_string(), kind }),
        }
        let file = reopen(&located, OFlags::RDONLY, path)?;
        Ok((file, entry))
    }

    /// Reads a whole regular file of at most `limit` bytes.
    pub fn read(&self, path: &str, limit: u64) -> Result<Vec<u8>> {
        let (file, entry) = self.open_read(path)?;
        if entry.size > limit {
            return Err(FsError::TooLarge { path: path.to_string(), size: entry.size, limit });
        }
        let mut bytes = Vec::with_capacity(usize::try_from(entry.size).unwrap_or(0));
        // The file may grow after the check: read one byte past the limit to tell.
        file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| FsError::from_io("read", path, e))?;
        if bytes.len() as u64 > limit {
            return Err(FsError::TooLarge { path: path.to_string(), size: bytes.len() as u64, limit });
        }
        Ok(bytes)
    }

    /// Starts writing `path`: the bytes go to a new temporary file beside it,
    /// which replaces `path` only on [`FileWriter::commit`]. A write that fails
    /// or is dropped half-way leaves the old file as it was. Missing parent
    /// directories are made; new files and directories get `owner` at once,
    /// through their descriptors.
    pub fn create(&self, path: &str, owner: Option<Owner>) -> Result<FileWriter> {
        let rel = RelPath::parse(path)?;
        let (parent_parts, name) = rel.split_last().ok_or_else(|| refuse_root(path))?;
        if name.starts_with(UPLOAD_PREFIX) {
            return Err(FsError::InvalidPath {
                path: path.to_string(),
                reason: "names starting with .airlock-upload- are reserved",
            });
        }
        let parent = self.make_dirs(&rel, parent_parts, owner)?;
        // Only a regular file (or nothing) is replaced; anything else is
        // refused before a byte is written. If the name changes after this
        // check, the commit still only replaces the name: nothing is ever
        // written through a link or into a special file.
        match rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW).map(|stat| EntryKind::of(&stat)) {
            Ok(EntryKind::File) | Err(Errno::NOENT) => {}
            Ok(EntryKind::Directory) => return Err(FsError::IsADirectory { path: path.to_string() }),
            Ok(EntryKind::Symlink) => return Err(FsError::Symlink { path: path.to_string() }),
            Ok(kind) => return Err(FsError::SpecialFile { path: path.to_string(), kind }),
            Err(errno) => return Err(FsError::from_errno("create", path, errno)),
        }
        let mut attempt = 0u32;
        let (temp_name, fd) = loop {
            let temp_name = format!("{UPLOAD_PREFIX}{:016x}", random_u64() ^ u64::from(attempt));
            match rustix::fs::openat(
                &parent,
                temp_name.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o644),
            ) {
                Ok(fd) => break (temp_name, fd),
                Err(Errno::EXIST) if attempt < 8 => attempt += 1,
                Err(errno) => return Err(FsError::from_errno("create", path, errno)),
            }
        };
        let writer = FileWriter {
            file: Some(File::from(fd)),
            parent,
            temp_name,
            name: name.to_string(),
            given: path.to_string(),
            written: 0,
        };
        if let (Some(owner), Some(file)) = (owner, writer.file.as_ref()) {
            chown_fd(file, owner).map_err(|e| FsError::from_errno("change the owner of", path, e))?;
        }
        Ok(writer)
    }

    /// Writes a whole file (see [`create`](Self::create)).
    pub fn write(&self, path: &str, bytes: &[u8], owner: Option<Owner>) -> Result<()> {
        let mut writer = self.create(path, owner)?;
        writer.write_all(bytes).map_err(|e| FsError::from_io("write", path, e))?;
        writer.commit()
    }

    /// Makes `path` and any missing parents; new directories get `owner`.
    pub fn mkdir_all(&self, path: &str, owner: Option<Owner>) -> Result<()> {
        let rel = RelPath::parse(path)?;
        self.make_dirs(&rel, &rel.parts, owner).map(drop)
    }

    /// Walks `parts` from the root one component at a time (`O_NOFOLLOW`, so
    /// a link on the way is refused), making what is missing.
    fn make_dirs(&self, rel: &RelPath<'_>, parts: &[&str], owner: Option<Owner>) -> Result<OwnedFd> {
        // Most calls find the directory there already: one step.
        match self.open_parent(rel, parts) {
            Ok(dir) => return Ok(dir),
            Err(FsError::NotFound { .. }) => {}
            Err(refused) => return Err(refused),
        }
        let open_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut current =
            rustix::io::fcntl_dupfd_cloexec(&*self.root, 0).map_err(|e| FsError::from_errno("open", rel.given, e))?;
        for part in parts {
            let next = match rustix::fs::openat(&current, *part, open_flags, Mode::empty()) {
                Ok(dir) => dir,
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(&current, *part, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(errno) => return Err(FsError::from_errno("make directory", rel.given, errno)),
                    }
                    let made = rustix::fs::openat(&current, *part, open_flags, Mode::empty())
                        .map_err(|e| FsError::from_errno("open", rel.given, e))?;
                    if let Some(owner) = owner {
                        chown_fd(&made, owner).map_err(|e| FsError::from_errno("change the owner of", rel.given, e))?;
                    }
                    made
                }
                // O_DIRECTORY may answer ENOTDIR for a link: say which it is.
                Err(Errno::NOTDIR | Errno::LOOP)
                    if rustix::fs::statat(&current, *part, AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|stat| EntryKind::of(&stat) == EntryKind::Symlink) =>
                {
                    return Err(FsError::Symlink { path: rel.given.to_string() });
                }
                Err(errno) => return Err(FsError::from_errno("open", rel.given, errno)),
            };
            current = next;
        }
        Ok(current)
    }

    /// The entries of a directory, sorted by name, at most `limit` of them.
    pub fn list(&self, path: &str, limit: usize) -> Result<Vec<Entry>> {
        let dir = self.open_dir(path)?;
        let mut entries = Vec::new();
        for_each_name(&dir, path, |name| {
            if entries.len() == limit {
                return Err(FsError::Limit {
                    path: path.to_string(),
                    what: "the directory has more entries than a listing returns",
                    limit: limit as u64,
                });
            }
            // An entry removed since the directory was read is skipped.
            if let Ok(stat) = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                entries.push(Entry::new(name.to_string(), &stat));
            }
            Ok(())
        })?;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Removes a file, a link (the link itself), a special file, or a
    /// directory with everything in it, walking descriptors.
    pub fn remove(&self, path: &str) -> Result<()> {
        let rel = RelPath::parse(path)?;
        let (parent_parts, name) = rel.split_last().ok_or_else(|| refuse_root(path))?;
        let parent = self.open_parent(&rel, parent_parts)?;
        let stat = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| FsError::from_errno("remove", path, e))?;
        if EntryKind::of(&stat) != EntryKind::Directory {
            return match rustix::fs::unlinkat(&parent, name, AtFlags::empty()) {
                // Swapped for a directory since: remove that instead.
                Err(Errno::ISDIR) => remove_tree(&parent, name, path, &Walk::new()),
                other => other.map_err(|e| FsError::from_errno("remove", path, e)),
            };
        }
        remove_tree(&parent, name, path, &Walk::new())
    }

    /// Moves `from` to `to` (making `to`'s missing parents), both within the
    /// workspace, through their parent directories' handles.
    pub fn rename(&self, from: &str, to: &str, owner: Option<Owner>) -> Result<()> {
        let source = RelPath::parse(from)?;
        let target = RelPath::parse(to)?;
        let (source_parent, source_name) = source.split_last().ok_or_else(|| refuse_root(from))?;
        let (target_parent, target_name) = target.split_last().ok_or_else(|| refuse_root(to))?;
        let source_dir = self.open_parent(&source, source_parent)?;
        let target_dir = self.make_dirs(&target, target_parent, owner)?;
        rustix::fs::renameat(&source_dir, source_name, &target_dir, target_name)
            .map_err(|e| FsError::from_errno("rename", from, e))
    }

    /// Gives the workspace and everything in it to `owner`, walking
    /// descriptors: directories are changed through their own handles, other
    /// entries by name within their held directory, links themselves (never
    /// followed). Returns how many entries changed owner.
    pub fn chown_tree(&self, owner: Owner) -> Result<u64> {
        let walk = Walk::new();
        let mut changed = 0;
        let stat = rustix::fs::fstat(&*self.root).map_err(|e| FsError::from_errno("stat", "", e))?;
        if stat.st_uid != owner.uid || stat.st_gid != owner.gid {
            chown_fd(&*self.root, owner).map_err(|e| FsError::from_errno("change the owner of", "", e))?;
            changed += 1;
        }
        chown_below(&self.root, "", owner, &walk, 0, &mut changed)?;
        Ok(changed)
    }
}

/// A file being written: see [`WorkspaceDir::create`]. Dropped without
/// [`commit`](Self::commit), its temporary file is removed.
#[derive(Debug)]
pub struct FileWriter {
    file: Option<File>,
    parent: OwnedFd,
    temp_name: String,
    name: String,
    given: String,
    written: u64,
}

impl FileWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The open file, for positioned or vectored writes.
    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// Puts the written file in place of its target, atomically. The target's
    /// name is replaced whatever it is (a link is replaced, not followed), but
    /// a directory there is refused.
    pub fn commit(mut self) -> Result<()> {
        drop(self.file.take());
        match rustix::fs::renameat(&self.parent, self.temp_name.as_str(), &self.parent, self.name.as_str()) {
            Ok(()) => {
                self.temp_name.clear();
                Ok(())
            }
            Err(Errno::ISDIR | Errno::NOTEMPTY | Errno::EXIST) => {
                Err(FsError::IsADirectory { path: self.given.clone() })
            }
            Err(errno) => Err(FsError::from_errno("replace", &self.given, errno)),
        }
    }
}

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let file = self.file.as_mut().ok_or_else(|| io::Error::other("the file was committed"))?;
        let written = file.write(buf)?;
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        if !self.temp_name.is_empty() {
            drop(self.file.take());
            let _ = rustix::fs::unlinkat(&self.parent, self.temp_name.as_str(), AtFlags::empty());
        }
    }
}

/// Reopens a file reached with `O_PATH` through its `/proc/self/fd` link,
/// which names the very inode the descriptor holds, whatever the path now is.
fn reopen(located: &OwnedFd, flags: OFlags, path: &str) -> Result<File> {
    let link = format!("/proc/self/fd/{}", located.as_raw_fd());
    let fd = rustix::fs::open(link.as_str(), flags | OFlags::CLOEXEC | OFlags::NONBLOCK, Mode::empty())
        .map_err(|e| FsError::from_errno("open", path, e))?;
    // Regular files ignore O_NONBLOCK; clearing it keeps later reads plain.
    let _ = rustix::fs::fcntl_setfl(&fd, flags & !OFlags::NONBLOCK & !OFlags::CLOEXEC);
    Ok(File::from(fd))
}

fn chown_fd(fd: impl AsFd, owner: Owner) -> rustix::io::Result<()> {
    rustix::fs::fchown(fd, Some(rustix::fs::Uid::from_raw(owner.uid)), Some(rustix::fs::Gid::from_raw(owner.gid)))
}

/// Bounds of one recursive walk.
struct Walk {
    deadline: Instant,
}

impl Walk {
    fn new() -> Self {
        Self { deadline: Instant::now() + MAX_WALK_TIME }
    }

    fn check(&self, path: &str, depth: usize) -> Result<()> {
        if depth > MAX_TREE_DEPTH {
            return Err(FsError::Limit {
                path: path.to_string(),
                what: "the directory tree is deeper than a walk descends",
                limit: MAX_TREE_DEPTH as u64,
            });
        }
        if Instant::now() > self.deadline {
            return Err(FsError::Limit {
                path: path.to_string(),
                what: "walking the directory tree took longer than allowed (seconds)",
                limit: MAX_WALK_TIME.as_secs(),
            });
        }
        Ok(())
    }
}

/// Calls `each` with every raw name in the directory `dir` (not `.` or `..`),
/// as it is read: a caller can stop at a bound without reading the rest.
fn for_each_raw_name(dir: &OwnedFd, path: &str, mut each: impl FnMut(&CStr) -> Result<()>) -> Result<()> {
    let entries = rustix::fs::Dir::read_from(dir).map_err(|e| FsError::from_errno("list", path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| FsError::from_errno("list", path, e))?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            each(name)?;
        }
    }
    Ok(())
}

/// Calls `each` with every UTF-8 name in `dir`. A name that is not UTF-8
/// cannot be named through the API; the recursive walks still reach it, as
/// they use raw names.
fn for_each_name(dir: &OwnedFd, path: &str, mut each: impl FnMut(&str) -> Result<()>) -> Result<()> {
    for_each_raw_name(dir, path, |name| match name.to_str() {
        Ok(name) => each(name),
        Err(_) => Ok(()),
    })
}

/// Every raw name in `dir`, read before the walk changes the directory.
fn raw_names(dir: &OwnedFd, path: &str) -> Result<Vec<CString>> {
    let mut names = Vec::new();
    for_each_raw_name(dir, path, |name| {
        names.push(name.to_owned());
        Ok(())
    })?;
    Ok(names)
}

/// Removes the directory `name` in `parent` and everything in it. Each level
/// is opened with `O_NOFOLLOW | O_DIRECTORY` relative to its parent's handle:
/// an entry swapped for a link mid-walk is unlinked, never followed.
fn remove_tree<N: rustix::path::Arg + Copy>(parent: &OwnedFd, name: N, path: &str, walk: &Walk) -> Result<()> {
    remove_tree_at(parent, name, path, walk, 0)
}

fn remove_tree_at<N: rustix::path::Arg + Copy>(
    parent: &OwnedFd,
    name: N,
    path: &str,
    walk: &Walk,
    depth: usize,
) -> Result<()> {
    walk.check(path, depth)?;
    // Rounds: code in the sandbox may add entries while they are removed.
    loop {
        match rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => return Ok(()),
            Err(Errno::NOTEMPTY | Errno::EXIST) => {}
            // No longer a directory: whatever it is now, remove the name.
            Err(Errno::NOTDIR) => {
                return match rustix::fs::unlinkat(parent, name, AtFlags::empty()) {
                    Ok(()) | Err(Errno::NOENT) => Ok(()),
                    Err(errno) => Err(FsError::from_errno("remove", path, errno)),
                };
            }
            Err(errno) => return Err(FsError::from_errno("remove", path, errno)),
        }
        walk.check(path, depth)?;
        let dir = match rustix::fs::openat(
            parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(dir) => dir,
            Err(Errno::NOENT) => return Ok(()),
            Err(Errno::NOTDIR | Errno::LOOP) => continue,
            Err(errno) => return Err(FsError::from_errno("remove", path, errno)),
        };
        for child in raw_names(&dir, path)? {
            match rustix::fs::unlinkat(&dir, child.as_c_str(), AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::ISDIR | Errno::PERM) => remove_tree_at(&dir, child.as_c_str(), path, walk, depth + 1)?,
                Err(errno) => return Err(FsError::from_errno("remove", path, errno)),
            }
        }
    }
}

fn chown_below(dir: &OwnedFd, path: &str, owner: Owner, walk: &Walk, depth: usize, changed: &mut u64) -> Result<()> {
    walk.check(path, depth)?;
    for name in raw_names(dir, path)? {
        let Ok(stat) = rustix::fs::statat(dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        if EntryKind::of(&stat) == EntryKind::Directory {
            // Through its own handle; if it was swapped for something else
            // since, that is handled as a non-directory below.
            match rustix::fs::openat(
                dir,
                name.as_c_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(child) => {
                    let stat = rustix::fs::fstat(&child).map_err(|e| FsError::from_errno("stat", path, e))?;
                    if stat.st_uid != owner.uid || stat.st_gid != owner.gid {
                        chown_fd(&child, owner).map_err(|e| FsError::from_errno("change the owner of", path, e))?;
                        *changed += 1;
                    }
                    chown_below(&child, path, owner, walk, depth + 1, changed)?;
                    continue;
                }
                Err(Errno::NOENT) => continue,
                Err(Errno::NOTDIR | Errno::LOOP) => {}
                Err(errno) => return Err(FsError::from_errno("open", path, errno)),
            }
        } else if stat.st_uid == owner.uid && stat.st_gid == owner.gid {
            continue;
        }
        match rustix::fs::chownat(
            dir,
            name.as_c_str(),
            Some(rustix::fs::Uid::from_raw(owner.uid)),
            Some(rustix::fs::Gid::from_raw(owner.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        ) {
            Ok(()) => *changed += 1,
            Err(Errno::NOENT) => {}
            Err(errno) => return Err(FsError::from_errno("change the owner of", path, errno)),
        }
    }
    Ok(())
}

/// A name no one can predict, for temporary files.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    hasher.write_u32(std::process::id());
    hasher.finish()
}

#[cfg(test)]
mod tests;
