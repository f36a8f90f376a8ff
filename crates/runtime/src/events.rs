//! Per-sandbox events: workspace file changes (inotify on the host workspace,
//! so both tiers are seen), background process output and exits, lifecycle.
//!
//! File events are coalesced: raw events are gathered for [`COALESCE_WINDOW`]
//! and each path's changes in that window fold into one (created then
//! modified is created; modified many times is modified once; created then
//! removed is nothing). Subscribers that fall more than [`EVENT_BUFFER`]
//! events behind miss the oldest and are told how many.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use airlock_core::confined::{MAX_TREE_DEPTH, UPLOAD_PREFIX};
use airlock_core::{OutputStream, WORKSPACE_GUEST_PATH, WorkspaceDir};
use rustix::event::{PollFd, PollFlags};
use rustix::fs::inotify::{CreateFlags, ReadFlags, WatchFlags};
use rustix::fs::{FileType, Mode, OFlags};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::error::{Error, Result};

/// Events a subscriber may fall behind by before it misses some.
pub const EVENT_BUFFER: usize = 4096;
/// How long raw file events are gathered before they are folded and sent.
pub const COALESCE_WINDOW: Duration = Duration::from_millis(50);
/// Most directories one workspace's watch covers. Each takes an inotify watch,
/// which the host's user shares with every other sandbox
/// (`fs.inotify.max_user_watches`); past it, new directories go unwatched and
/// subscribers are told once.
pub const MAX_WATCHED_DIRECTORIES: usize = 4096;
/// Bytes read from inotify at a time.
const INOTIFY_BUFFER_BYTES: usize = 64 * 1024;

/// How a workspace path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileChange {
    Created,
    Modified,
    Removed,
}

/// A lifecycle change of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lifecycle {
    /// Its container was created or started.
    ContainerStarted,
    Slept,
    Woke,
    Destroyed,
}

/// Something that happened in a sandbox. Paths are relative to `/workspace`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum SandboxEvent {
    File {
        change: FileChange,
        path: String,
    },
    Renamed {
        from: String,
        to: String,
    },
    ProcessOutput {
        process: String,
        stream: OutputStream,
        bytes: Vec<u8>,
    },
    ProcessExited {
        process: String,
        code: Option<i32>,
    },
    Lifecycle {
        change: Lifecycle,
    },
    /// The workspace has more directories than are watched: changes in the
    /// ones past the limit are not reported.
    WatchLimitReached {
        limit: usize,
    },
}

/// A subscription to one sandbox's events.
#[derive(Debug)]
pub struct EventStream {
    receiver: broadcast::Receiver<SandboxEvent>,
    /// Events this subscriber missed by falling behind.
    pub missed: u64,
    // Keeps the workspace watched while any subscriber lives.
    _watch: std::sync::Arc<WorkspaceWatch>,
}

impl EventStream {
    pub(crate) fn new(receiver: broadcast::Receiver<SandboxEvent>, watch: std::sync::Arc<WorkspaceWatch>) -> Self {
        Self { receiver, missed: 0, _watch: watch }
    }

    /// The next event; `None` once the sandbox is gone.
    pub async fn next(&mut self) -> Option<SandboxEvent> {
        loop {
            match self.receiver.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(count)) => self.missed += count,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// An inotify watch on one workspace, feeding a sandbox's event channel.
///
/// It never follows a link and never leaves the workspace: each directory is
/// opened through the confined layer (or relative to its parent's handle with
/// `O_NOFOLLOW`), and the watch is added on that very descriptor through its
/// `/proc/self/fd` name. At most [`MAX_WATCHED_DIRECTORIES`] are watched.
pub(crate) struct WorkspaceWatch {
    /// Writing here (or dropping it) ends the watch thread.
    stop: Option<OwnedFd>,
}

impl std::fmt::Debug for WorkspaceWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkspaceWatch")
    }
}

impl Drop for WorkspaceWatch {
    fn drop(&mut self) {
        // Closing the write end wakes the thread's poll with a hang-up.
        drop(self.stop.take());
    }
}

impl WorkspaceWatch {
    /// Watches the workspace recursively; folded events go to `events`.
    pub fn start(dir: &WorkspaceDir, events: broadcast::Sender<SandboxEvent>) -> Result<Self> {
        let failed = |reason: String| Error::Invalid { what: "workspace watch", reason };
        let inotify = rustix::fs::inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)
            .map_err(|e| failed(format!("inotify: {e}")))?;
        let (wake, stop) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| failed(format!("pipe: {e}")))?;
        let mut watches = Watches { inotify, by_wd: HashMap::new(), dir: dir.clone(), limit_told: false };
        let root = rustix::io::fcntl_dupfd_cloexec(dir.root(), 0).map_err(|e| failed(e.to_string()))?;
        let mut found = Vec::new();
        watches.add_tree(root, String::new(), 0, &mut found, &events);
        // A plain thread: it must fold events whether or not a Tokio runtime
        // is around; it ends when this watch is dropped.
        std::thread::Builder::new()
            .name("airlock-watch".into())
            .spawn(move || watch_loop(watches, &wake, &events))
            .map_err(|e| failed(e.to_string()))?;
        Ok(Self { stop: Some(stop) })
    }
}

const WATCH_MASK: WatchFlags = WatchFlags::CREATE
    .union(WatchFlags::DELETE)
    .union(WatchFlags::MODIFY)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::ONLYDIR)
    .union(WatchFlags::EXCL_UNLINK);

/// The watched directories of one workspace, by watch descriptor.
struct Watches {
    inotify: OwnedFd,
    /// Watch descriptor to the directory's workspace-relative path ("" is the root).
    by_wd: HashMap<i32, String>,
    dir: WorkspaceDir,
    limit_told: bool,
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() { name.to_string() } else { format!("{parent}/{name}") }
}

impl Watches {
    /// Watches the directory `fd` (at `rel`) and every directory below it,
    /// each reached relative to its parent's handle with `O_NOFOLLOW`. The
    /// entries found go to `found` (for a directory that arrived whole).
    fn add_tree(
        &mut self,
        fd: OwnedFd,
        rel: String,
        depth: usize,
        found: &mut Vec<String>,
        events: &broadcast::Sender<SandboxEvent>,
    ) {
        if depth > MAX_TREE_DEPTH {
            return;
        }
        if self.by_wd.len() >= MAX_WATCHED_DIRECTORIES {
            if !self.limit_told {
                self.limit_told = true;
                let _ = events.send(SandboxEvent::WatchLimitReached { limit: MAX_WATCHED_DIRECTORIES });
            }
            return;
        }
        let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let Ok(wd) = rustix::fs::inotify::add_watch(&self.inotify, link.as_str(), WATCH_MASK) else {
            return;
        };
        self.by_wd.insert(wd, rel.clone());
        let Ok(entries) = rustix::fs::Dir::read_from(&fd) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().to_str() else { continue };
            if name == "." || name == ".." {
                continue;
            }
            let child_rel = join(&rel, name);
            found.push(child_rel.clone());
            if entry.file_type() == FileType::Directory
                && let Ok(child) = rustix::fs::openat(
                    &fd,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
            {
                self.add_tree(child, child_rel, depth + 1, found, events);
            }
        }
    }

    /// A directory created or moved in at `rel`: watch it and what is in it.
    fn add_new(&mut self, rel: &str, window: &mut Window, events: &broadcast::Sender<SandboxEvent>) {
        // Through the confined layer: a link there is refused, not followed.
        let Ok(fd) = self.dir.open_dir(rel) else { return };
        let mut found = Vec::new();
        self.add_tree(fd, rel.to_string(), rel.matches('/').count() + 1, &mut found, events);
        // What was made in it before the watch began is reported too.
        for path in found {
            window.note(virtual_path(&path), FileChange::Created);
        }
    }

    /// A watched directory moved from `from` to `to`: its watches follow.
    fn moved(&mut self, from: &str, to: &str) {
        let prefix = format!("{from}/");
        for path in self.by_wd.values_mut() {
            if path == from {
                *path = to.to_string();
            } else if let Some(rest) = path.strip_prefix(&prefix) {
                *path = format!("{to}/{rest}");
            }
        }
    }
}

/// Events are folded on paths under a fixed root that is never a host path.
fn virtual_path(rel: &str) -> PathBuf {
    Path::new(WORKSPACE_GUEST_PATH).join(rel)
}

/// Reads inotify until the watch is dropped, folding events into windows.
fn watch_loop(mut watches: Watches, wake: &OwnedFd, events: &broadcast::Sender<SandboxEvent>) {
    let root = Path::new(WORKSPACE_GUEST_PATH);
    let mut window = Window::default();
    let mut window_ends: Option<Instant> = None;
    let mut buffer = vec![MaybeUninit::<u8>::uninit(); INOTIFY_BUFFER_BYTES];
    // A move's first half waits here for its second (same cookie).
    let mut moved_from: Option<(u32, String, bool)> = None;
    loop {
        let timeout = window_ends.map(|end| {
            let left = end.saturating_duration_since(Instant::now());
            rustix::time::Timespec {
                tv_sec: i64::try_from(left.as_secs()).unwrap_or(0),
                tv_nsec: i64::from(left.subsec_nanos()),
            }
        });
        let (ready, stopped) = {
            let mut fds = [PollFd::new(&watches.inotify, PollFlags::IN), PollFd::new(wake, PollFlags::IN)];
            match rustix::event::poll(&mut fds, timeout.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(_) => return,
            }
            (!fds[0].revents().is_empty(), !fds[1].revents().is_empty())
        };
        if stopped {
            window.flush(root, events);
            return;
        }
        if ready {
            let mut raw = Vec::new();
            {
                let mut reader = rustix::fs::inotify::Reader::new(&watches.inotify, &mut buffer);
                while let Ok(event) = reader.next() {
                    let name = event.file_name().and_then(|n| n.to_str().ok()).map(str::to_string);
                    raw.push((event.wd(), event.events(), event.cookie(), name));
                }
            }
            for (wd, flags, cookie, name) in raw {
                if flags.contains(ReadFlags::IGNORED) {
                    watches.by_wd.remove(&wd);
                    continue;
                }
                let (Some(parent), Some(name)) = (watches.by_wd.get(&wd), name) else { continue };
                let rel = join(parent, &name);
                let is_dir = flags.contains(ReadFlags::ISDIR);
                window_ends.get_or_insert_with(|| Instant::now() + COALESCE_WINDOW);
                if let Some((pending_cookie, from, from_dir)) = moved_from.take() {
                    if flags.contains(ReadFlags::MOVED_TO) && cookie == pending_cookie {
                        window.renamed(virtual_path(&from), virtual_path(&rel));
                        if from_dir {
                            watches.moved(&from, &rel);
                        }
                        continue;
                    }
                    window.moved_out.push(virtual_path(&from));
                }
                if flags.contains(ReadFlags::CREATE) {
                    window.note(virtual_path(&rel), FileChange::Created);
                    if is_dir {
                        watches.add_new(&rel, &mut window, events);
                    }
                } else if flags.contains(ReadFlags::DELETE) {
                    window.note(virtual_path(&rel), FileChange::Removed);
                } else if flags.contains(ReadFlags::MODIFY) {
                    window.note(virtual_path(&rel), FileChange::Modified);
                } else if flags.contains(ReadFlags::MOVED_FROM) {
                    moved_from = Some((cookie, rel, is_dir));
                } else if flags.contains(ReadFlags::MOVED_TO) {
                    window.moved_in.push(virtual_path(&rel));
                    if is_dir {
                        watches.add_new(&rel, &mut window, events);
                    }
                }
            }
        }
        // Checked after every wake, so a steady stream of events cannot hold a window open.
        if window_ends.is_some_and(|end| Instant::now() >= end) {
            if let Some((_, from, _)) = moved_from.take() {
                window.moved_out.push(virtual_path(&from));
            }
            window.flush(root, events);
            window_ends = None;
        }
    }
}

fn relative(root: &Path, path: &Path) -> Option<String> {
    let relative = path.strip_prefix(root).ok()?;
    let text = relative.to_str()?;
    (!text.is_empty()).then(|| text.to_string())
}

/// One window's changes, in the order paths first changed.
#[derive(Default)]
struct Window {
    order: Vec<PathBuf>,
    changes: HashMap<PathBuf, FileChange>,
    renames: Vec<(PathBuf, PathBuf)>,
    /// Halves of renames whose other half has not (yet) been seen: a move out
    /// of the workspace, or into it. inotify reports both halves and then the
    /// pair; a pair cancels its halves.
    moved_out: Vec<PathBuf>,
    moved_in: Vec<PathBuf>,
    /// Paths created within this window (a removal then cancels them).
    born: std::collections::HashSet<PathBuf>,
}

/// A host upload's temporary file (see the confined layer's `create`): its
/// own events are not the workspace's; its rename into place is the change.
fn is_upload(path: &Path) -> bool {
    path.file_name().and_then(|name| name.to_str()).is_some_and(|name| name.starts_with(UPLOAD_PREFIX))
}

impl Window {
    fn note(&mut self, path: PathBuf, change: FileChange) {
        if is_upload(&path) {
            return;
        }
        let folded = match (self.changes.get(&path), change) {
            (None, change) => {
                self.order.push(path.clone());
                if change == FileChange::Created {
                    self.born.insert(path.clone());
                }
                change
            }
            (Some(FileChange::Created), FileChange::Modified) => FileChange::Created,
            (Some(FileChange::Removed), FileChange::Created) => FileChange::Modified,
            (Some(_), FileChange::Removed) if self.born.contains(&path) => {
                self.changes.remove(&path);
                self.order.retain(|p| *p != path);
                self.born.remove(&path);
                return;
            }
            (Some(_), change) => change,
        };
        self.changes.insert(path, folded);
    }

    fn renamed(&mut self, from: PathBuf, to: PathBuf) {
        if is_upload(&from) {
            self.note(to, FileChange::Created);
            return;
        }
        self.moved_out.retain(|path| *path != from);
        self.moved_in.retain(|path| *path != to);
        self.renames.push((from, to));
    }

    fn flush(&mut self, root: &Path, events: &broadcast::Sender<SandboxEvent>) {
        for path in std::mem::take(&mut self.order) {
            if let (Some(change), Some(relative)) = (self.changes.get(&path), relative(root, &path)) {
                let _ = events.send(SandboxEvent::File { change: *change, path: relative });
            }
        }
        let halves = std::mem::take(&mut self.moved_out)
            .into_iter()
            .map(|path| (FileChange::Removed, path))
            .chain(std::mem::take(&mut self.moved_in).into_iter().map(|path| (FileChange::Created, path)));
        for (change, path) in halves {
            if let Some(relative) = relative(root, &path) {
                let _ = events.send(SandboxEvent::File { change, path: relative });
            }
        }
        for (from, to) in std::mem::take(&mut self.renames) {
            if let (Some(from), Some(to)) = (relative(root, &from), relative(root, &to)) {
                let _ = events.send(SandboxEvent::Renamed { from, to });
            }
        }
        self.changes.clear();
        self.born.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folded(changes: &[(&str, FileChange)]) -> Vec<SandboxEvent> {
        let root = Path::new("/ws");
        let (sender, mut receiver) = broadcast::channel(16);
        let mut window = Window::default();
        for (path, change) in changes {
            window.note(root.join(path), *change);
        }
        window.flush(root, &sender);
        let mut events = Vec::new();
        while let Ok(event) = receiver.try_recv() {
            events.push(event);
        }
        events
    }

    fn file(change: FileChange, path: &str) -> SandboxEvent {
        SandboxEvent::File { change, path: path.into() }
    }

    #[test]
    fn changes_to_one_path_fold_into_one() {
        use FileChange::*;
        assert_eq!(folded(&[("a", Created), ("a", Modified), ("a", Modified)]), vec![file(Created, "a")]);
        assert_eq!(
            folded(&[("a", Modified), ("b", Modified), ("a", Modified)]),
            vec![file(Modified, "a"), file(Modified, "b")]
        );
        assert_eq!(
            folded(&[("tmp", Created), ("tmp", Modified), ("tmp", Removed)]),
            vec![],
            "a scratch file leaves no trace"
        );
        assert_eq!(folded(&[("a", Modified), ("a", Removed)]), vec![file(Removed, "a")]);
        assert_eq!(folded(&[("a/b.txt", Created)]), vec![file(Created, "a/b.txt")], "paths are relative");
    }

    #[test]
    fn a_rename_is_one_event_and_lone_halves_are_moves_in_and_out() {
        let root = Path::new("/ws");
        let (sender, mut receiver) = broadcast::channel(16);
        let mut window = Window::default();
        window.moved_out.push(root.join("a"));
        window.moved_in.push(root.join("b"));
        window.renamed(root.join("a"), root.join("b"));
        window.moved_out.push(root.join("gone"));
        window.moved_in.push(root.join("arrived"));
        window.flush(root, &sender);
        let mut events = Vec::new();
        while let Ok(event) = receiver.try_recv() {
            events.push(event);
        }
        assert_eq!(
            events,
            vec![
                file(FileChange::Removed, "gone"),
                file(FileChange::Created, "arrived"),
                SandboxEvent::Renamed { from: "a".into(), to: "b".into() },
            ]
        );
    }
}
