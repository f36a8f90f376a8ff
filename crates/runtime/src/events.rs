//! Per-sandbox events: workspace file changes (inotify on the host workspace,
//! so both tiers are seen), background process output and exits, lifecycle.
//!
//! File events are coalesced: raw events are gathered for [`COALESCE_WINDOW`]
//! and each path's changes in that window fold into one (created then
//! modified is created; modified many times is modified once; created then
//! removed is nothing). Subscribers that fall more than [`EVENT_BUFFER`]
//! events behind miss the oldest and are told how many.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use airlock_core::OutputStream;
use notify::event::{ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::error::{Error, Result};

/// Events a subscriber may fall behind by before it misses some.
pub const EVENT_BUFFER: usize = 4096;
/// How long raw file events are gathered before they are folded and sent.
pub const COALESCE_WINDOW: Duration = Duration::from_millis(50);

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
    File { change: FileChange, path: String },
    Renamed { from: String, to: String },
    ProcessOutput { process: String, stream: OutputStream, bytes: Vec<u8> },
    ProcessExited { process: String, code: Option<i32> },
    Lifecycle { change: Lifecycle },
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
pub(crate) struct WorkspaceWatch {
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for WorkspaceWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkspaceWatch")
    }
}

impl WorkspaceWatch {
    /// Watches `root` recursively; folded events go to `events`.
    pub fn start(root: &Path, events: broadcast::Sender<SandboxEvent>) -> Result<Self> {
        let (raw_tx, raw_rx) = mpsc::channel::<notify::Event>();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                let _ = raw_tx.send(event);
            }
        })
        .map_err(|e| Error::Invalid { what: "workspace watch", reason: e.to_string() })?;
        watcher
            .watch(root, RecursiveMode::Recursive)
            .map_err(|e| Error::Invalid { what: "workspace watch", reason: e.to_string() })?;
        let root = root.to_path_buf();
        // A plain thread: it must fold events whether or not a Tokio runtime
        // is around; it ends when the watcher (the sender's owner) is dropped.
        std::thread::Builder::new()
            .name("airlock-watch".into())
            .spawn(move || fold_events(&root, &raw_rx, &events))
            .map_err(|e| Error::Invalid { what: "workspace watch", reason: e.to_string() })?;
        Ok(Self { _watcher: watcher })
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

impl Window {
    fn note(&mut self, path: PathBuf, change: FileChange) {
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

fn fold_events(root: &Path, raw: &mpsc::Receiver<notify::Event>, events: &broadcast::Sender<SandboxEvent>) {
    let mut window = Window::default();
    let mut window_ends: Option<Instant> = None;
    loop {
        let received = match window_ends {
            Some(end) => raw.recv_timeout(end.saturating_duration_since(Instant::now())),
            None => raw.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(event) => {
                window_ends.get_or_insert_with(|| Instant::now() + COALESCE_WINDOW);
                match event.kind {
                    EventKind::Create(_) => event.paths.into_iter().for_each(|p| window.note(p, FileChange::Created)),
                    EventKind::Remove(_) => event.paths.into_iter().for_each(|p| window.note(p, FileChange::Removed)),
                    EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                        let mut paths = event.paths.into_iter();
                        if let (Some(from), Some(to)) = (paths.next(), paths.next()) {
                            window.renamed(from, to);
                        }
                    }
                    EventKind::Modify(ModifyKind::Name(RenameMode::From)) => window.moved_out.extend(event.paths),
                    EventKind::Modify(ModifyKind::Name(RenameMode::To)) => window.moved_in.extend(event.paths),
                    // Owner and mode changes (Airlock's own hand-over included) are not content changes.
                    EventKind::Modify(ModifyKind::Metadata(_)) => {}
                    EventKind::Modify(_) => event.paths.into_iter().for_each(|p| window.note(p, FileChange::Modified)),
                    _ => {}
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                window.flush(root, events);
                window_ends = None;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                window.flush(root, events);
                return;
            }
        }
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
