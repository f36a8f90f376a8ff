//! Sandbox snapshots: take, list, delete, restore into the same sandbox, and
//! fork into new sandboxes.
//!
//! A snapshot is two read-only btrfs snapshots on the home's disk, under
//! `home/sandboxes/.snapshots/<id>/`: `sandbox` (the sandbox's directory, its
//! workspace in it) and `layer` (the container's writable layer: installed
//! packages, files outside `/workspace`), plus `manifest`, one line per file
//! (type, mode, owner, size, SHA-256, path) whose SHA-256 the registry keeps.
//! Taking one pauses the container (the cgroup freezer) for the two snapshot
//! ioctls only: processes and their connections stay, an open exec stream
//! goes on after. The manifest is hashed afterwards from the read-only copy,
//! which no sandbox can reach, so nothing in it changes while it is read.
//!
//! A restore or a fork first hashes the snapshot again and compares with the
//! registry's hash (a damaged or missing file is refused, naming it, and
//! nothing is changed); then makes a writable copy-on-write snapshot of it
//! aside and swaps it in (`RENAME_EXCHANGE`) or names it as the new sandbox.
//! The container is made anew from the same image over the snapshot's layer:
//! files and installed packages come back, running processes do not (Docker
//! cannot restore a checkpoint into a new container).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use airlock_container::{ContainerSandbox, ContainerState};
use airlock_core::{SandboxId, SandboxName};
use rusqlite::{OptionalExtension, params};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::SandboxConfig;
use crate::error::{Error, Result};
use crate::runtime::Runtime;
use crate::sandbox::Sandbox;
use crate::store::{SandboxRecord, SandboxState};

/// How many snapshots of one sandbox are kept unless the runtime's options
/// say otherwise: past it, taking one deletes the oldest (bounds the disk a
/// sandbox's history holds).
pub const DEFAULT_MAX_SNAPSHOTS_PER_SANDBOX: usize = 10;
/// Most files (of any type) one snapshot may hold: bounds the manifest (about
/// 150 bytes a file, in memory while it is made or checked) and the time
/// hashing takes.
pub const MAX_SNAPSHOT_ENTRIES: u64 = 500_000;
/// Deepest directory tree a snapshot's manifest descends (a descriptor per level).
pub const MAX_SNAPSHOT_DEPTH: usize = 512;
/// Longest label a snapshot may carry.
pub const MAX_SNAPSHOT_LABEL_BYTES: usize = 256;
/// Most sandboxes one fork makes.
pub const MAX_FORKS: usize = 64;
/// The manifest's file in a snapshot's directory.
const MANIFEST_FILE: &str = "manifest";
/// A snapshot id's prefix; the rest is 32 lower-case hex digits.
const ID_PREFIX: &str = "snap-";

/// Version 6 of the registry: snapshots, and where each sandbox last came
/// from (its restore or fork), so that a new snapshot names its parent.
pub(crate) const SCHEMA_SNAPSHOTS: &str = "
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    sandbox_name TEXT NOT NULL,
    owner TEXT,
    parent TEXT,
    label TEXT,
    created_at_ms INTEGER NOT NULL,
    files INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    layer INTEGER NOT NULL,
    image TEXT,
    config TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    paused_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_sandbox ON snapshots (sandbox_id, created_at_ms);
CREATE TABLE IF NOT EXISTS snapshot_origins (
    sandbox_id TEXT PRIMARY KEY,
    snapshot_id TEXT NOT NULL
);
";

/// One snapshot, as listed and inspected.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SnapshotInfo {
    pub id: String,
    /// The sandbox it was taken of (which may since have been destroyed).
    pub sandbox_id: String,
    pub sandbox_name: String,
    /// The API token its sandbox belonged to (`None`: made in process).
    pub owner: Option<String>,
    /// The snapshot its sandbox had last been restored or forked from, else
    /// the sandbox's previous snapshot.
    pub parent: Option<String>,
    pub label: Option<String>,
    pub created_at_ms: u128,
    /// Files of every type in the workspace and the writable layer.
    pub files: u64,
    /// Bytes of the regular files in it (before sharing with the sandbox and
    /// other snapshots: what it holds, not what it adds to the disk).
    pub bytes: u64,
    /// Whether the container's writable layer is in it (installed packages).
    pub layer: bool,
    /// The image its layer sits on.
    pub image: Option<String>,
    /// The sandbox's configuration when it was taken: forks get it.
    pub config: SandboxConfig,
    /// SHA-256 of its manifest: what a restore checks it against.
    pub manifest_sha256: String,
    /// How long the sandbox's container was frozen while it was taken (µs).
    pub paused_us: u64,
}

/// A fresh snapshot id.
fn new_id() -> String {
    format!("{ID_PREFIX}{}", uuid::Uuid::new_v4().simple())
}

/// Refuses anything but an id this module makes: ids become path names.
fn check_id(id: &str) -> Result<&str> {
    let ok = id
        .strip_prefix(ID_PREFIX)
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    if ok { Ok(id) } else { Err(Error::NoSuchSnapshot(id.chars().take(80).collect())) }
}

fn ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

const COLUMNS: &str = "id, sandbox_id, sandbox_name, owner, parent, label, created_at_ms, files, bytes, layer, image, \
                       config, manifest_sha256, paused_us";

fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<std::result::Result<SnapshotInfo, String>> {
    let config: String = row.get(11)?;
    let info = |config| SnapshotInfo {
        id: row.get(0).unwrap_or_default(),
        sandbox_id: row.get(1).unwrap_or_default(),
        sandbox_name: row.get(2).unwrap_or_default(),
        owner: row.get(3).unwrap_or_default(),
        parent: row.get(4).unwrap_or_default(),
        label: row.get(5).unwrap_or_default(),
        created_at_ms: u128::from(to_u64(row.get(6).unwrap_or_default())),
        files: to_u64(row.get(7).unwrap_or_default()),
        bytes: to_u64(row.get(8).unwrap_or_default()),
        layer: row.get::<_, i64>(9).unwrap_or_default() != 0,
        image: row.get(10).unwrap_or_default(),
        config,
        manifest_sha256: row.get(12).unwrap_or_default(),
        paused_us: to_u64(row.get(13).unwrap_or_default()),
    };
    Ok(serde_json::from_str::<SandboxConfig>(&config).map(info).map_err(|e| e.to_string()))
}

/// Held shared while a snapshot is used (restore, fork) and alone while one
/// is deleted, so that a snapshot is never deleted under its use.
static SNAPSHOT_USE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

impl Runtime {
    /// Every snapshot, newest first; of one sandbox (by name) when given.
    pub fn snapshots(&self, sandbox: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let filter = match sandbox {
            Some(name) => Some(self.get(name)?.ok_or_else(|| Error::NoSuchSandbox(name.to_string()))?.id()),
            None => None,
        };
        self.snapshot_rows(filter)
    }

    fn snapshot_rows(&self, sandbox: Option<SandboxId>) -> Result<Vec<SnapshotInfo>> {
        let store = &self.inner.store;
        let connection = store.connection();
        let err = |e: rusqlite::Error| Error::Store { path: store.path().to_path_buf(), reason: e.to_string() };
        let query = format!(
            "SELECT {COLUMNS} FROM snapshots WHERE (?1 IS NULL OR sandbox_id = ?1) ORDER BY created_at_ms DESC, rowid DESC"
        );
        let mut statement = connection.prepare_cached(&query).map_err(err)?;
        let rows = statement.query_map(params![sandbox.map(|id| id.to_string())], read_row).map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(err)?.map_err(|reason| Error::Invalid { what: "snapshot record", reason })?);
        }
        Ok(out)
    }

    /// Snapshot `id`, or [`Error::NoSuchSnapshot`].
    pub fn snapshot_info(&self, id: &str) -> Result<SnapshotInfo> {
        let id = check_id(id)?;
        let store = &self.inner.store;
        let connection = store.connection();
        let err = |e: rusqlite::Error| Error::Store { path: store.path().to_path_buf(), reason: e.to_string() };
        let row = connection
            .query_row(&format!("SELECT {COLUMNS} FROM snapshots WHERE id = ?1"), params![id], read_row)
            .optional()
            .map_err(err)?;
        match row {
            Some(info) => info.map_err(|reason| Error::Invalid { what: "snapshot record", reason }),
            None => Err(Error::NoSuchSnapshot(id.to_string())),
        }
    }

    /// Deletes snapshot `id` (its files and its record). Sandboxes restored or
    /// forked from it keep their files: they share extents, not the snapshot.
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let id = self.snapshot_info(id)?.id;
        let _alone = SNAPSHOT_USE.write().await;
        self.remove_snapshot_now(&id).await
    }

    async fn remove_snapshot_now(&self, id: &str) -> Result<()> {
        let runtime = self.clone();
        let owned = id.to_string();
        blocking(move || runtime.inner.disk.remove_snapshot(&owned)).await?;
        let store = &self.inner.store;
        store
            .connection()
            .execute("DELETE FROM snapshots WHERE id = ?1", params![id])
            .map_err(|e| Error::Store { path: store.path().to_path_buf(), reason: e.to_string() })?;
        Ok(())
    }

    /// Makes one new sandbox per name from snapshot `id`: its configuration,
    /// its workspace and its container's writable layer (copies that share
    /// unchanged data with the snapshot, copy-on-write), each container made
    /// from the same image and started, ready for a command. `owner` is
    /// recorded as their tenant. Running processes and interpreter contexts
    /// are not carried: a fork starts with the snapshot's files only. All or
    /// nothing: when one fails, those made are destroyed.
    pub async fn fork_snapshot(&self, id: &str, names: &[String], owner: Option<&str>) -> Result<Vec<Sandbox>> {
        if names.is_empty() || names.len() > MAX_FORKS {
            return Err(Error::Invalid {
                what: "fork",
                reason: format!("{} names given; a fork makes 1 to {MAX_FORKS} sandboxes", names.len()),
            });
        }
        let mut parsed = Vec::with_capacity(names.len());
        for name in names {
            let name = SandboxName::new(name)?;
            if parsed.contains(&name) {
                return Err(Error::Invalid { what: "fork", reason: format!("the name {name} is given twice") });
            }
            if self.inner.store.by_name(&name)?.is_some() {
                return Err(Error::Invalid { what: "fork", reason: format!("a sandbox named {name} exists") });
            }
            parsed.push(name);
        }
        // Looked up under the lock: a snapshot deleted meanwhile is no such
        // snapshot, not a damaged one.
        let _use = SNAPSHOT_USE.read().await;
        let info = self.snapshot_info(id)?;
        self.verify_snapshot(&info).await?;
        self.check_image(&info, info.config.image.as_deref()).await?;
        let mut made: Vec<Sandbox> = Vec::new();
        let result = async {
            for name in parsed {
                made.push(self.fork_one(&info, name, owner).await?);
            }
            if info.layer {
                // Started together: the forks are ready for a command on return.
                let starts: Vec<_> = made
                    .iter()
                    .map(|sandbox| {
                        let sandbox = sandbox.clone();
                        tokio::spawn(async move {
                            let _active = sandbox.begin().await?;
                            sandbox.container().await.map(drop)
                        })
                    })
                    .collect();
                for start in starts {
                    start.await.map_err(|e| Error::Disk(format!("starting a fork stopped: {e}")))??;
                }
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(error) = result {
            for sandbox in made {
                if let Err(cleanup) = sandbox.destroy().await {
                    tracing::warn!(%cleanup, sandbox = %sandbox.name(), "removing a fork after a failed fork failed");
                }
            }
            return Err(error);
        }
        Ok(made)
    }

    async fn fork_one(&self, info: &SnapshotInfo, name: SandboxName, owner: Option<&str>) -> Result<Sandbox> {
        let record = SandboxRecord {
            id: SandboxId::new(),
            name,
            created_at: SystemTime::now(),
            config: info.config.clone(),
            state: SandboxState::Active,
            escalated: None,
            container_id: None,
            owner: owner.map(str::to_string),
        };
        let dir = self.sandbox_dir(record.id);
        {
            let (runtime, dir, id, disk) = (self.clone(), dir.clone(), info.id.clone(), record.config.disk);
            blocking(move || runtime.inner.disk.copy_snapshot_to(&id, &dir, disk, false)).await?;
        }
        let inserted = crate::runtime::make_private(&dir).and_then(|()| self.inner.store.insert(&record));
        match inserted {
            Ok(true) => {}
            other => {
                let _ = self.inner.disk.remove_sandbox_dir(&dir);
                other?;
                return Err(Error::Invalid { what: "fork", reason: format!("a sandbox named {} exists", record.name) });
            }
        }
        self.set_origin(record.id, &info.id)?;
        self.load(record)
    }

    fn set_origin(&self, sandbox: SandboxId, snapshot: &str) -> Result<()> {
        let store = &self.inner.store;
        store
            .connection()
            .execute(
                "INSERT INTO snapshot_origins (sandbox_id, snapshot_id) VALUES (?1, ?2)
                 ON CONFLICT (sandbox_id) DO UPDATE SET snapshot_id = excluded.snapshot_id",
                params![sandbox.to_string(), snapshot],
            )
            .map_err(|e| Error::Store { path: store.path().to_path_buf(), reason: e.to_string() })?;
        Ok(())
    }

    /// Hashes the snapshot again and compares with its recorded hash.
    async fn verify_snapshot(&self, info: &SnapshotInfo) -> Result<()> {
        let runtime = self.clone();
        let (id, expected) = (info.id.clone(), info.manifest_sha256.clone());
        blocking(move || {
            let damaged = |reason: String| Error::SnapshotDamaged { id: id.clone(), reason };
            let (sandbox, layer) = runtime.inner.disk.open_snapshot(&id).map_err(|e| damaged(e.to_string()))?;
            let manifest = Manifest::build(&sandbox, layer.as_ref()).map_err(damaged)?;
            if manifest.sha256() == expected {
                return Ok(());
            }
            let stored = runtime
                .inner
                .disk
                .open_snapshot_dir(&id)
                .ok()
                .and_then(|dir| read_small(dir.as_fd(), MANIFEST_FILE, manifest.text.len() as u64 * 2 + (1 << 20)));
            let reason = match stored {
                Some(stored) if hex(&Sha256::digest(&stored)) == expected => first_difference(&stored, &manifest.text),
                _ => "its files do not match its recorded hash (and its manifest is damaged too)".to_string(),
            };
            Err(damaged(reason))
        })
        .await
    }

    /// A snapshot with a layer is used only over the image it was taken on.
    async fn check_image(&self, info: &SnapshotInfo, configured: Option<&str>) -> Result<()> {
        let Some(taken_on) = info.image.as_deref().filter(|_| info.layer) else { return Ok(()) };
        let now = match configured {
            Some(image) => image.to_string(),
            None => self.containers().await?.base_image.clone(),
        };
        if now == taken_on {
            Ok(())
        } else {
            Err(Error::Invalid {
                what: "snapshot",
                reason: format!(
                    "its container layer was taken over the image {taken_on}, and a new container would use {now}"
                ),
            })
        }
    }

    /// Deletes the oldest snapshots of `sandbox` past the retention limit.
    async fn prune_snapshots(&self, sandbox: SandboxId) -> Result<()> {
        let keep = self.inner.options.max_snapshots_per_sandbox.max(1);
        let old: Vec<String> = self.snapshot_rows(Some(sandbox))?.into_iter().skip(keep).map(|s| s.id).collect();
        if old.is_empty() {
            return Ok(());
        }
        let _alone = SNAPSHOT_USE.write().await;
        for id in old {
            tracing::info!(snapshot = %id, "deleting a snapshot past the retention limit");
            self.remove_snapshot_now(&id).await?;
        }
        Ok(())
    }
}

impl Sandbox {
    /// Takes a snapshot of this sandbox: its workspace, its container's
    /// writable layer (installed packages, files outside `/workspace`) and its
    /// configuration. The container is paused (frozen) for the moment the
    /// filesystem takes its snapshots, then resumes: processes, their
    /// connections and open streams carry on. The oldest snapshots past the
    /// runtime's `max_snapshots_per_sandbox` are deleted.
    pub async fn snapshot(&self, label: Option<&str>) -> Result<SnapshotInfo> {
        if let Some(label) = label
            && (label.len() > MAX_SNAPSHOT_LABEL_BYTES || label.chars().any(char::is_control))
        {
            return Err(Error::Invalid {
                what: "snapshot label",
                reason: format!("at most {MAX_SNAPSHOT_LABEL_BYTES} bytes, no control characters"),
            });
        }
        let active = self.begin().await?;
        let runtime = self.runtime.clone();
        let id = new_id();
        let dir = runtime.sandbox_dir(self.inner.id);
        let (layer, image, paused_us) = {
            // Held throughout: a command that starts meanwhile waits for the
            // container instead of finding it frozen.
            let slot = self.inner.container.lock().await;
            let container = match (slot.as_ref(), self.inner.container_id()) {
                (Some(container), _) => Some(container.clone()),
                // Not yet adopted by this process, and maybe running.
                (None, Some(container_id)) => {
                    let engine = &runtime.containers().await?.engine;
                    ContainerSandbox::adopt(engine, &container_id).await.ok()
                }
                (None, None) => None,
            };
            let running = match &container {
                Some(container) => container.state().await? == ContainerState::Running,
                None => false,
            };
            let image = container.as_ref().map(|c| c.spec().image.clone());
            let frozen = Instant::now();
            if running && let Some(container) = &container {
                container.pause().await?;
            }
            let taken = {
                let (runtime, dir, id) = (runtime.clone(), dir.clone(), id.clone());
                blocking(move || runtime.inner.disk.take_snapshot(&dir, &id)).await
            };
            if running && let Some(container) = &container {
                container.unpause().await?;
            }
            let paused_us = u64::try_from(frozen.elapsed().as_micros()).unwrap_or(u64::MAX);
            drop(slot);
            (taken?, image, paused_us)
        };
        // Hashed from the read-only copy, outside the pause.
        let manifest = {
            let (runtime, id) = (runtime.clone(), id.clone());
            blocking(move || {
                let (sandbox, layer) = runtime.inner.disk.open_snapshot(&id)?;
                let manifest = Manifest::build(&sandbox, layer.as_ref())
                    .map_err(|reason| Error::Invalid { what: "snapshot", reason })?;
                let dir = runtime.inner.disk.open_snapshot_dir(&id)?;
                write_file(dir.as_fd(), MANIFEST_FILE, &manifest.text)
                    .map_err(|e| Error::Disk(format!("writing snapshot {id}'s manifest: {e}")))?;
                Ok(manifest)
            })
            .await
        };
        let manifest = match manifest {
            Ok(manifest) => manifest,
            Err(error) => {
                let _ = runtime.remove_snapshot_now(&id).await;
                return Err(error);
            }
        };
        let record = self.inner.record().clone();
        let info = SnapshotInfo {
            id: id.clone(),
            sandbox_id: record.id.to_string(),
            sandbox_name: record.name.to_string(),
            owner: record.owner.clone(),
            parent: self.parent_of_next()?,
            label: label.map(str::to_string),
            created_at_ms: u128::try_from(ms(SystemTime::now())).unwrap_or(0),
            files: manifest.entries,
            bytes: manifest.bytes,
            layer,
            image: image.filter(|_| layer),
            config: record.config.clone(),
            manifest_sha256: manifest.sha256(),
            paused_us,
        };
        if let Err(error) = self.insert_snapshot(&info) {
            let _ = runtime.remove_snapshot_now(&id).await;
            return Err(error);
        }
        // Let go first: a restore holds the snapshots' lock shared while it
        // waits for this sandbox's lifecycle lock alone, and pruning takes the
        // snapshots' lock alone; holding both ways round would deadlock.
        drop(active);
        runtime.prune_snapshots(self.inner.id).await?;
        Ok(info)
    }

    /// This sandbox's snapshots, newest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.runtime.snapshot_rows(Some(self.inner.id))
    }

    fn parent_of_next(&self) -> Result<Option<String>> {
        let store = &self.runtime.inner.store;
        let connection = store.connection();
        let err = |e: rusqlite::Error| Error::Store { path: store.path().to_path_buf(), reason: e.to_string() };
        let id = self.inner.id.to_string();
        let origin: Option<String> = connection
            .query_row("SELECT snapshot_id FROM snapshot_origins WHERE sandbox_id = ?1", params![id], |row| row.get(0))
            .optional()
            .map_err(err)?;
        if origin.is_some() {
            return Ok(origin);
        }
        connection
            .query_row(
                "SELECT id FROM snapshots WHERE sandbox_id = ?1 ORDER BY created_at_ms DESC, rowid DESC LIMIT 1",
                params![id],
                |row| row.get(0),
            )
            .optional()
            .map_err(err)
    }

    fn insert_snapshot(&self, info: &SnapshotInfo) -> Result<()> {
        let store = &self.runtime.inner.store;
        let config = serde_json::to_string(&info.config)
            .map_err(|e| Error::Invalid { what: "sandbox config", reason: e.to_string() })?;
        store
            .connection()
            .execute(
                &format!("INSERT INTO snapshots ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"),
                params![
                    info.id,
                    info.sandbox_id,
                    info.sandbox_name,
                    info.owner,
                    info.parent,
                    info.label,
                    i64::try_from(info.created_at_ms).unwrap_or(i64::MAX),
                    i64::try_from(info.files).unwrap_or(i64::MAX),
                    i64::try_from(info.bytes).unwrap_or(i64::MAX),
                    i64::from(info.layer),
                    info.image,
                    config,
                    info.manifest_sha256,
                    i64::try_from(info.paused_us).unwrap_or(i64::MAX),
                ],
            )
            .map_err(|e| Error::Store { path: store.path().to_path_buf(), reason: e.to_string() })?;
        Ok(())
    }

    /// Puts this sandbox back as it was when snapshot `id` (one of its own)
    /// was taken: its workspace and its container's writable layer. The
    /// snapshot is verified first; a damaged one is refused with
    /// [`Error::SnapshotDamaged`] and the sandbox is left as it was. Then
    /// running operations are waited for, the container is removed (its
    /// processes end), interpreter contexts are dropped, the files are
    /// swapped in one step, and a new container is started over the restored
    /// layer. Watchers of the workspace should subscribe again.
    pub async fn restore(&self, id: &str) -> Result<()> {
        // Held before the lifecycle lock, and looked up under it (see `fork_snapshot`).
        let _use = SNAPSHOT_USE.read().await;
        let info = self.runtime.snapshot_info(id)?;
        if info.sandbox_id != self.inner.id.to_string() {
            return Err(Error::Invalid {
                what: "restore",
                reason: format!(
                    "snapshot {} was taken of sandbox {}, not this one; fork it to make a sandbox from it",
                    info.id, info.sandbox_name
                ),
            });
        }
        self.runtime.verify_snapshot(&info).await?;
        self.runtime.check_image(&info, self.inner.config.image.as_deref()).await?;
        let _alone = self.inner.lifecycle.write().await;
        let old = self.inner.container.lock().await.take();
        let old = match (old, self.inner.container_id()) {
            (Some(container), _) => Some(container),
            (None, Some(container_id)) => {
                let engine = &self.runtime.containers().await?.engine;
                ContainerSandbox::adopt(engine, &container_id).await.ok()
            }
            (None, None) => None,
        };
        if let Some(container) = old {
            container.remove().await?;
        }
        self.runtime.inner.store.set_container(self.inner.id, None)?;
        self.inner.set_container_id(None);
        self.inner.container_stopped.store(false, std::sync::atomic::Ordering::SeqCst);
        self.drop_contexts();
        // Its socket lives in the sandbox's directory: bound again at the next start.
        self.stop_proxy();
        let dir = self.runtime.sandbox_dir(self.inner.id);
        {
            let (runtime, dir, id, disk) = (self.runtime.clone(), dir.clone(), info.id.clone(), self.inner.config.disk);
            blocking(move || runtime.inner.disk.copy_snapshot_to(&id, &dir, disk, true)).await?;
        }
        repoint(self.inner.dir.root(), &dir.join("workspace"))?;
        self.runtime.set_origin(self.inner.id, &info.id)?;
        let asleep = self.inner.record().state == SandboxState::Sleeping;
        if info.layer && !asleep {
            self.container().await?;
        }
        Ok(())
    }
}

/// Points the open descriptor `fd` (the sandbox's workspace handle, shared by
/// every holder) at the directory `path`, in one step (`dup3`).
#[allow(unsafe_code)]
fn repoint(fd: &OwnedFd, path: &Path) -> Result<()> {
    let fresh =
        rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| Error::File {
                operation: "open restored workspace",
                path: path.display().to_string(),
                source: e.into(),
            })?;
    // SAFETY: both descriptors are open and owned for the whole call; dup3
    // replaces what `fd`'s number refers to (a directory, by another
    // directory) and closes nothing its owner still uses.
    let result = unsafe { libc::dup3(fresh.as_raw_fd(), fd.as_raw_fd(), libc::O_CLOEXEC) };
    if result < 0 {
        return Err(Error::File {
            operation: "switch to the restored workspace",
            path: path.display().to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(|e| Error::Disk(format!("a snapshot step stopped: {e}")))?
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// One line per file of a snapshot, in a fixed order (depth first, names
/// sorted): `<type> <mode> <uid> <gid> <size> <digest> <path>`. The digest is
/// the SHA-256 of a regular file's bytes or a link's target; a device's
/// number; `-` for directories, FIFOs and sockets (never opened). Extended
/// attributes and times are not in it.
struct Manifest {
    text: Vec<u8>,
    entries: u64,
    bytes: u64,
}

impl Manifest {
    /// From a snapshot's read-only directories: `workspace/` of the sandbox
    /// directory, and `diff/` of the layer (overlay's upper directory;
    /// `work/` is overlay's scratch space, and `link`/`lower` name Docker's
    /// layers, replaced at every use).
    fn build(sandbox: &OwnedFd, layer: Option<&OwnedFd>) -> std::result::Result<Self, String> {
        let mut manifest = Self { text: Vec::new(), entries: 0, bytes: 0 };
        let workspace = open_dir_at(sandbox.as_fd(), b"workspace").map_err(|e| format!("its workspace: {e}"))?;
        manifest.walk(workspace.as_fd(), b"workspace", 0)?;
        if let Some(layer) = layer {
            let diff = open_dir_at(layer.as_fd(), b"diff").map_err(|e| format!("its container layer: {e}"))?;
            manifest.walk(diff.as_fd(), b"layer", 0)?;
        }
        Ok(manifest)
    }

    fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.text))
    }

    fn walk(&mut self, dir: BorrowedFd<'_>, path: &[u8], depth: usize) -> std::result::Result<(), String> {
        if depth >= MAX_SNAPSHOT_DEPTH {
            return Err(format!("{} is deeper than {MAX_SNAPSHOT_DEPTH} directories", show(path)));
        }
        let listed = rustix::fs::openat(dir, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| format!("reading {}: {e}", show(path)))?;
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&listed).map_err(|e| format!("reading {}: {e}", show(path)))? {
            let entry = entry.map_err(|e| format!("reading {}: {e}", show(path)))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        names.sort();
        for name in names {
            self.entries += 1;
            if self.entries > MAX_SNAPSHOT_ENTRIES {
                return Err(format!("it holds more than {MAX_SNAPSHOT_ENTRIES} files"));
            }
            let mut child = path.to_vec();
            child.push(b'/');
            child.extend_from_slice(&name);
            let cname = std::ffi::CString::new(name).map_err(|_| format!("a name in {} holds a NUL", show(path)))?;
            let stat = rustix::fs::statat(dir, &cname, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| format!("{} is missing or unreadable: {e}", show(&child)))?;
            let kind = FileType::from_raw_mode(stat.st_mode);
            let (letter, size, digest) = match kind {
                FileType::Directory => ('d', 0, "-".to_string()),
                FileType::RegularFile => {
                    let digest = hash_file(dir, &cname, &stat).map_err(|e| format!("{}: {e}", show(&child)))?;
                    self.bytes += stat.st_size as u64;
                    ('f', stat.st_size as u64, digest)
                }
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(dir, &cname, Vec::new())
                        .map_err(|e| format!("{}: {e}", show(&child)))?;
                    ('l', target.as_bytes().len() as u64, hex(&Sha256::digest(target.as_bytes())))
                }
                FileType::CharacterDevice => ('c', 0, format!("{:x}", stat.st_rdev)),
                FileType::BlockDevice => ('b', 0, format!("{:x}", stat.st_rdev)),
                FileType::Fifo => ('p', 0, "-".to_string()),
                FileType::Socket => ('s', 0, "-".to_string()),
                _ => ('?', 0, "-".to_string()),
            };
            let mode = stat.st_mode & 0o7777;
            let _ = write!(
                LineWriter(&mut self.text),
                "{letter} {mode:o} {} {} {size} {digest} ",
                stat.st_uid,
                stat.st_gid
            );
            self.text.extend(child.escape_ascii());
            self.text.push(b'\n');
            if kind == FileType::Directory {
                let sub = open_dir_at(dir, cname.as_bytes()).map_err(|e| format!("{}: {e}", show(&child)))?;
                self.walk(sub.as_fd(), &child, depth + 1)?;
            }
        }
        Ok(())
    }
}

struct LineWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for LineWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn show(path: &[u8]) -> String {
    path.escape_ascii().to_string()
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    let name = std::ffi::CString::new(name).map_err(|_| rustix::io::Errno::INVAL)?;
    rustix::fs::openat(
        dir,
        &name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// SHA-256 of the regular file `name` in `dir`: opened without following a
/// link or blocking, and checked to be the file that was looked at.
fn hash_file(
    dir: BorrowedFd<'_>,
    name: &std::ffi::CStr,
    seen: &rustix::fs::Stat,
) -> std::result::Result<String, String> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| e.to_string())?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| e.to_string())?;
    if stat.st_ino != seen.st_ino || FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err("changed while it was read".into());
    }
    let mut file = std::fs::File::from(fd);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = file.read(&mut buffer).map_err(|e| e.to_string())?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex(&hasher.finalize()))
}

fn write_file(dir: BorrowedFd<'_>, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    file.sync_all()
}

fn read_small(dir: BorrowedFd<'_>, name: &str, limit: u64) -> Option<Vec<u8>> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let mut bytes = Vec::new();
    std::fs::File::from(fd).take(limit).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// Names the first file whose line differs between the recorded manifest and
/// the one just made.
fn first_difference(stored: &[u8], now: &[u8]) -> String {
    let path_of = |line: &[u8]| -> Vec<u8> { line.splitn(7, |b| *b == b' ').nth(6).unwrap_or_default().to_vec() };
    let now_lines: HashMap<Vec<u8>, &[u8]> =
        now.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| (path_of(l), l)).collect();
    let mut stored_paths = std::collections::HashSet::new();
    for line in stored.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let path = path_of(line);
        match now_lines.get(&path) {
            None => return format!("{} is missing", String::from_utf8_lossy(&path)),
            Some(found) if *found != line => return format!("{} was changed", String::from_utf8_lossy(&path)),
            Some(_) => {}
        }
        stored_paths.insert(path);
    }
    match now_lines.keys().find(|path| !stored_paths.contains(*path)) {
        Some(path) => format!("{} was added", String::from_utf8_lossy(path)),
        None => "its files do not match its recorded hash".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_before_they_name_a_path() {
        let id = new_id();
        assert_eq!(check_id(&id).unwrap(), id);
        for bad in ["..", "snap-../../x", "snap-", "snap-0123456789abcdef0123456789ABCDEF", "x"] {
            assert!(matches!(check_id(bad), Err(Error::NoSuchSnapshot(_))), "{bad}");
        }
    }

    #[test]
    fn the_first_difference_is_named() {
        let stored = b"d 755 0 0 0 - workspace/a\nf 644 0 0 1 aa workspace/a/b\nf 644 0 0 1 bb workspace/c\n";
        let changed = b"d 755 0 0 0 - workspace/a\nf 644 0 0 1 ab workspace/a/b\nf 644 0 0 1 bb workspace/c\n";
        let missing = b"d 755 0 0 0 - workspace/a\nf 644 0 0 1 bb workspace/c\n";
        assert_eq!(first_difference(stored, changed), "workspace/a/b was changed");
        assert_eq!(first_difference(stored, missing), "workspace/a/b is missing");
    }
}
