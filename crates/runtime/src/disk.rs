//! Per-sandbox disk quotas, through btrfs subvolumes and simple quotas.
//!
//! A home's `sandboxes/` directory is a btrfs filesystem in a sparse image
//! file (`disk.img` in the home), loop-mounted by the runtime as root with
//! `nosuid,nodev` (bind mounts of workspaces into containers inherit both).
//! Each sandbox directory is a subvolume in its own level-1 quota group whose
//! referenced-bytes limit is the sandbox's `disk`. With btrfs *simple quotas*
//! (Linux 6.7+), a subvolume or snapshot that a sandbox makes inside its
//! workspace joins the same group, so it cannot step outside the limit.
//! Past the limit, writes fail with `EDQUOT` in the container and in
//! isolates; the files API names the quota. The image is sparse and holes are
//! punched back into it when files are deleted (`discard=async`), so the
//! host's disk pays only for what sandboxes hold, and never more than the
//! image's size in all.
//!
//! Why this mechanism: this kernel has no XFS quota and no ext4 quota format,
//! so XFS or ext4 project quotas cannot be used; a filesystem image per
//! sandbox would cost an mkfs and a loop device per sandbox. A subvolume and
//! three ioctls per sandbox are cheap enough for thousands.
//!
//! Needs root (to loop-mount and to set quotas) and `mkfs.btrfs`
//! (btrfs-progs; `airlock setup` installs it). Without them, quotas are not
//! enforced: the runtime says why in a warning and in [`DiskStatus`], or
//! refuses to open when [`QuotaMode::Required`].
//!
//! The mount is shared by every runtime open on the home (in any process) and
//! taken down by the last one to close: a shared `flock` on `disk.users`
//! counts users, and `disk.lock` orders mounting and unmounting.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use airlock_core::limits::{GIB, MIB, format_size};
use rustix::fs::{FlockOperation, Mode, OFlags};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A sandbox's disk quota unless its configuration says otherwise: the
/// workspace (and the container's writable layer where the engine can limit it).
pub const DEFAULT_DISK_BYTES: u64 = 10 * GIB;
/// The smallest quota: btrfs needs some metadata room for even an empty tree.
pub const MIN_DISK_BYTES: u64 = 16 * MIB;
/// The largest quota a sandbox may ask for.
pub const MAX_DISK_BYTES: u64 = 16 * 1024 * GIB;
/// The home's filesystem image, holding every sandbox directory.
pub const DISK_IMAGE_FILE: &str = "disk.img";
/// Taken alone while the image is mounted or unmounted.
pub const DISK_LOCK_FILE: &str = "disk.lock";
/// Held shared by every runtime using the mounted image.
pub const DISK_USERS_FILE: &str = "disk.users";
/// The smallest image: mkfs.btrfs needs about 114 MiB for its own trees.
pub const MIN_IMAGE_BYTES: u64 = 256 * MIB;
/// The default image size is this share (in percent) of the host filesystem's
/// free space when the image is made: sandboxes together can never fill the host.
pub const DEFAULT_IMAGE_SHARE_PERCENT: u64 = 50;
/// ... and at most this.
pub const MAX_DEFAULT_IMAGE_BYTES: u64 = 1024 * GIB;
/// Mount options of the image: no setuid binaries and no device nodes work
/// from a workspace, in the container either; freed blocks go back to the host.
pub const IMAGE_MOUNT_OPTIONS: &str = "loop,nosuid,nodev,discard=async";

/// Whether the runtime enforces disk quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaMode {
    /// Enforce them where the host allows (root, btrfs-progs, Linux 6.7+);
    /// elsewhere warn and run without.
    #[default]
    Auto,
    /// Refuse to open the runtime when they cannot be enforced.
    Required,
    /// Never: sandbox directories are plain directories on the home's filesystem.
    Off,
}

/// How the home's disk is set up. Every field has a default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskOptions {
    pub quotas: QuotaMode,
    /// The image's size when it is made; `None` is [`DEFAULT_IMAGE_SHARE_PERCENT`]
    /// of the host's free space, at most [`MAX_DEFAULT_IMAGE_BYTES`]. An existing
    /// image keeps its size.
    pub image_bytes: Option<u64>,
}

/// Whether disk quotas hold in this runtime, and why not when they do not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum DiskStatus {
    Enforced { image: PathBuf, image_bytes: u64 },
    NotEnforced { reason: String },
}

impl DiskStatus {
    pub fn is_enforced(&self) -> bool {
        matches!(self, DiskStatus::Enforced { .. })
    }
}

/// The home's disk: the mounted image, or plain directories.
#[derive(Debug)]
pub(crate) struct HomeDisk {
    status: DiskStatus,
    mounted: Option<Mounted>,
}

#[derive(Debug)]
struct Mounted {
    /// `home/sandboxes`, the image's mount point.
    sandboxes: PathBuf,
    /// The mount point, open: subvolumes are made and destroyed beneath it.
    /// An `Option` so that it is closed before the unmount.
    root: Option<OwnedFd>,
    lock: File,
    users: File,
    /// The image is ours (not a filesystem someone else mounted there): the
    /// last user unmounts it.
    unmount_when_last: bool,
}

impl HomeDisk {
    /// Mounts the home's image (making it first if needed), or says why not.
    /// `home` is canonical and `home/sandboxes` exists.
    pub fn open(home: &Path, options: &DiskOptions) -> Result<Self> {
        if options.quotas == QuotaMode::Off {
            return Ok(Self::unenforced("disk quotas are turned off in the runtime's options".into()));
        }
        match Mounted::open(home, options) {
            Ok(Ok((mounted, image_bytes))) => {
                let image = home.join(DISK_IMAGE_FILE);
                Ok(Self { status: DiskStatus::Enforced { image, image_bytes }, mounted: Some(mounted) })
            }
            Ok(Err(reason)) if options.quotas == QuotaMode::Auto => {
                tracing::warn!("disk quotas are not enforced for {}: {reason}", home.display());
                Ok(Self::unenforced(reason))
            }
            Ok(Err(reason)) => Err(Error::Disk(reason)),
            Err(error) => Err(error),
        }
    }

    fn unenforced(reason: String) -> Self {
        Self { status: DiskStatus::NotEnforced { reason }, mounted: None }
    }

    pub fn status(&self) -> &DiskStatus {
        &self.status
    }

    /// Makes a sandbox's directory (`home/sandboxes/<id>`): a subvolume limited
    /// to `disk_bytes` when quotas hold, a plain directory otherwise.
    pub fn create_sandbox_dir(&self, dir: &Path, disk_bytes: u64) -> Result<()> {
        let Some(mounted) = &self.mounted else {
            return std::fs::create_dir_all(dir).map_err(file_error("create sandbox directory", dir));
        };
        let (root, name) = mounted.child(dir)?;
        let group = quota_group_of(name);
        let failed = |step: &'static str| {
            move |source: io::Error| Error::Disk(format!("{step} for {}: {source}", dir.display()))
        };
        btrfs::create_qgroup(root, group).map_err(failed("making the quota group"))?;
        let made = btrfs::limit_qgroup(root, group, disk_bytes)
            .map_err(failed("limiting the quota group"))
            .and_then(|()| btrfs::create_subvolume(root, name, group).map_err(failed("making the subvolume")));
        if made.is_err() {
            let _ = btrfs::destroy_qgroup(root, group);
        }
        made
    }

    /// An empty directory for a new container's writable layer, on the
    /// sandbox's filesystem and in its quota group (`<dir>/layer`, a subvolume
    /// of its own so that it goes in one step); `None` without quotas. A layer
    /// left by an earlier container is deleted first, unless it is still
    /// mounted (its container lives: the engine refuses a second one by name).
    pub fn layer_home(&self, dir: &Path) -> Result<Option<PathBuf>> {
        let Some(mounted) = &self.mounted else {
            return Ok(None);
        };
        let (root, name) = mounted.child(dir)?;
        let home = dir.join(LAYER_DIR);
        let shown = home.display().to_string();
        let failed = |step: &'static str| {
            let shown = shown.clone();
            move |source: io::Error| Error::Disk(format!("{step} for {shown}: {source}"))
        };
        let sandbox = open_beneath(root, name).map_err(failed("opening the sandbox's directory"))?;
        if !mounted.layer_mounts(name).is_empty() {
            return Ok(Some(home));
        }
        // A layer a restore or fork put there: the new container takes it.
        if rustix::fs::unlinkat(&sandbox, LAYER_FROM_SNAPSHOT, rustix::fs::AtFlags::empty()).is_ok()
            && is_subvolume(sandbox.as_fd(), LAYER_DIR)
        {
            return Ok(Some(home));
        }
        match btrfs::destroy_subvolume(sandbox.as_fd(), LAYER_DIR) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                return Err(failed("deleting the previous writable layer")(error));
            }
            _ => {}
        }
        btrfs::create_subvolume(sandbox.as_fd(), LAYER_DIR, quota_group_of(name))
            .map_err(failed("making the writable layer's subvolume"))?;
        Ok(Some(home))
    }

    /// Removes a sandbox's directory and everything in it; its quota goes with it.
    pub fn remove_sandbox_dir(&self, dir: &Path) -> Result<()> {
        let Some(mounted) = &self.mounted else {
            return remove_tree(dir);
        };
        let (root, name) = mounted.child(dir)?;
        // A layer mount its container's removal left (the engine removed it
        // some other way): detached, so that the filesystem keeps no mount.
        for point in mounted.layer_mounts(name) {
            tracing::info!(mount = %point.display(), "detaching a writable layer left mounted");
            if let Err(error) = rustix::mount::unmount(&point, rustix::mount::UnmountFlags::DETACH) {
                tracing::warn!(%error, mount = %point.display(), "detaching a writable layer failed");
            }
        }
        if let Ok(sandbox) = open_beneath(root, name) {
            match btrfs::destroy_subvolume(sandbox.as_fd(), LAYER_DIR) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => {
                    tracing::debug!(%error, dir = %dir.display(), "the writable layer goes with the sandbox's tree");
                }
                _ => {}
            }
        }
        match btrfs::destroy_subvolume(root, name) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            // Not a subvolume (made before quotas), or it holds subvolumes the
            // sandbox made: the slow way, which deletes those too.
            Err(_) => remove_tree(dir)?,
        }
        // The group stays until the kernel has dropped the subvolume's extents;
        // a leftover empty group is harmless.
        if let Err(error) = btrfs::destroy_qgroup(root, quota_group_of(name)) {
            tracing::debug!(%error, dir = %dir.display(), "the sandbox's quota group stays for now");
        }
        Ok(())
    }
}

/// A sandbox directory's subdirectory holding its container's writable layer.
pub(crate) const LAYER_DIR: &str = "layer";
/// Left in a sandbox directory whose `layer` came from a snapshot (a restore
/// or a fork): the next container keeps that layer instead of an empty one.
pub(crate) const LAYER_FROM_SNAPSHOT: &str = "layer.from-snapshot";
/// Where snapshots live, beneath the mount point (`home/sandboxes/.snapshots`):
/// on the same btrfs filesystem as the sandboxes, so that they share extents.
pub(crate) const SNAPSHOTS_DIR: &str = ".snapshots";
/// A snapshot's read-only copy of its sandbox directory (workspace included).
pub(crate) const SNAPSHOT_SANDBOX: &str = "sandbox";
/// A snapshot's read-only copy of its sandbox's writable layer.
pub(crate) const SNAPSHOT_LAYER: &str = "layer";
/// btrfs gives every subvolume's root directory this inode number.
const SUBVOLUME_ROOT_INODE: u64 = 256;

/// Whether `name` in `dir` is the root of a subvolume.
fn is_subvolume(dir: BorrowedFd<'_>, name: &str) -> bool {
    rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|stat| stat.st_ino == SUBVOLUME_ROOT_INODE && (stat.st_mode & libc::S_IFMT) == libc::S_IFDIR)
}

impl HomeDisk {
    /// The mount point, open, when snapshots can be taken (the home's
    /// sandboxes live on btrfs); else why not.
    fn snapshot_root(&self) -> Result<(&Mounted, BorrowedFd<'_>)> {
        match &self.mounted {
            Some(mounted @ Mounted { root: Some(root), .. }) => Ok((mounted, root.as_fd())),
            _ => Err(Error::SnapshotsUnavailable(format!(
                "they need the home's btrfs disk (as disk quotas do), and it is not set up ({})",
                match &self.status {
                    DiskStatus::NotEnforced { reason } => reason.as_str(),
                    DiskStatus::Enforced { .. } => "closed",
                }
            ))),
        }
    }

    /// `home/sandboxes/.snapshots/<id>`, opened (made when `create`).
    fn snapshot_dir_fd(&self, id: &str, create: bool) -> Result<OwnedFd> {
        let (_, root) = self.snapshot_root()?;
        let failed = |step: &'static str| move |e: rustix::io::Errno| Error::Disk(format!("{step} snapshot {id}: {e}"));
        if create {
            match rustix::fs::mkdirat(root, SNAPSHOTS_DIR, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(failed("making the snapshots directory for")(e)),
            }
        }
        let all = open_beneath(root, SNAPSHOTS_DIR).map_err(|e| Error::Disk(format!("opening the snapshots directory: {e}")))?;
        if create {
            rustix::fs::mkdirat(&all, id, Mode::from_raw_mode(0o700)).map_err(failed("making the directory of"))?;
        }
        open_beneath(all.as_fd(), id).map_err(|e| Error::Disk(format!("opening snapshot {id}: {e}")))
    }

    /// Takes read-only snapshots of the sandbox directory `dir` (its
    /// workspace) and of its writable layer when it has one, into
    /// `.snapshots/<id>/`. Returns whether the layer was captured. The caller
    /// keeps the sandbox still (its container paused) meanwhile.
    pub(crate) fn take_snapshot(&self, dir: &Path, id: &str) -> Result<bool> {
        let (mounted, root) = self.snapshot_root()?;
        let (_, name) = mounted.child(dir)?;
        let failed = |step: &'static str| move |e: io::Error| Error::Disk(format!("{step} for snapshot {id}: {e}"));
        let sandbox = open_beneath(root, name).map_err(failed("opening the sandbox's directory"))?;
        let target = self.snapshot_dir_fd(id, true)?;
        let taken = btrfs::snapshot(target.as_fd(), SNAPSHOT_SANDBOX, sandbox.as_fd(), true, None)
            .map_err(failed("snapshotting the sandbox's directory"))
            .and_then(|()| {
                if !is_subvolume(sandbox.as_fd(), LAYER_DIR) {
                    return Ok(false);
                }
                let layer = open_beneath(sandbox.as_fd(), LAYER_DIR).map_err(failed("opening the writable layer"))?;
                btrfs::snapshot(target.as_fd(), SNAPSHOT_LAYER, layer.as_fd(), true, None)
                    .map_err(failed("snapshotting the writable layer"))?;
                Ok(true)
            });
        if taken.is_err() {
            drop(target);
            let _ = self.remove_snapshot(id);
        }
        taken
    }

    /// Snapshot `id`'s directory (its subvolumes and manifest), open.
    pub(crate) fn open_snapshot_dir(&self, id: &str) -> Result<OwnedFd> {
        self.snapshot_dir_fd(id, false)
    }

    /// The snapshot's read-only directories, open: its sandbox directory and
    /// its writable layer (when it has one).
    pub(crate) fn open_snapshot(&self, id: &str) -> Result<(OwnedFd, Option<OwnedFd>)> {
        let dir = self.snapshot_dir_fd(id, false)?;
        let sandbox = open_beneath(dir.as_fd(), SNAPSHOT_SANDBOX)
            .map_err(|e| Error::Disk(format!("snapshot {id} has no sandbox directory: {e}")))?;
        let layer = if is_subvolume(dir.as_fd(), SNAPSHOT_LAYER) {
            Some(open_beneath(dir.as_fd(), SNAPSHOT_LAYER).map_err(|e| Error::Disk(format!("opening snapshot {id}'s layer: {e}")))?)
        } else {
            None
        };
        Ok((sandbox, layer))
    }

    /// Deletes snapshot `id`'s subvolumes and directory; a missing one is no error.
    pub(crate) fn remove_snapshot(&self, id: &str) -> Result<()> {
        let (_, root) = self.snapshot_root()?;
        let Ok(all) = open_beneath(root, SNAPSHOTS_DIR) else { return Ok(()) };
        let Ok(dir) = open_beneath(all.as_fd(), id) else { return Ok(()) };
        for part in [SNAPSHOT_LAYER, SNAPSHOT_SANDBOX] {
            match btrfs::destroy_subvolume(dir.as_fd(), part) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => {
                    return Err(Error::Disk(format!("deleting snapshot {id}'s {part}: {error}")));
                }
                _ => {}
            }
        }
        // Its own files (the manifest): the directory is the runtime's, no sandbox's.
        if let Ok(listed) = rustix::fs::openat(&dir, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            && let Ok(entries) = rustix::fs::Dir::read_from(&listed)
        {
            for entry in entries.flatten() {
                if entry.file_type() == rustix::fs::FileType::RegularFile {
                    let _ = rustix::fs::unlinkat(&dir, entry.file_name(), rustix::fs::AtFlags::empty());
                }
            }
        }
        drop(dir);
        match rustix::fs::unlinkat(&all, id, rustix::fs::AtFlags::REMOVEDIR) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(Error::Disk(format!("deleting snapshot {id}'s directory: {e}"))),
        }
    }

    /// Makes the sandbox directory `dir` a writable copy (copy-on-write) of
    /// snapshot `id`, its writable layer included (marked for the next
    /// container, [`LAYER_FROM_SNAPSHOT`]). `replace`: `dir` exists and is
    /// swapped for the copy in one step (`RENAME_EXCHANGE`), then deleted;
    /// else `dir` is new, in a new quota group of `disk_bytes`. Either way the
    /// copy is made aside first: a failure leaves `dir` as it was.
    pub(crate) fn copy_snapshot_to(&self, id: &str, dir: &Path, disk_bytes: u64, replace: bool) -> Result<()> {
        let (mounted, root) = self.snapshot_root()?;
        let (_, name) = mounted.child(dir)?;
        let group = quota_group_of(name);
        let failed = |step: &'static str| move |e: io::Error| Error::Disk(format!("{step} from snapshot {id}: {e}"));
        let (sandbox, layer) = self.open_snapshot(id)?;
        if !replace {
            btrfs::create_qgroup(root, group).map_err(failed("making the quota group"))?;
            btrfs::limit_qgroup(root, group, disk_bytes).map_err(failed("limiting the quota group"))?;
        }
        let incoming = format!(".incoming-{name}");
        // A copy left by a crash at this very step goes first.
        let _ = self.destroy_sandbox_subvolume(root, &incoming);
        let made = (|| {
            btrfs::snapshot(root, &incoming, sandbox.as_fd(), false, Some(group)).map_err(failed("copying the sandbox directory"))?;
            let copy = open_beneath(root, &incoming).map_err(failed("opening the copy"))?;
            // A nested subvolume shows in its parent's snapshot as an empty directory.
            match rustix::fs::unlinkat(&copy, LAYER_DIR, rustix::fs::AtFlags::REMOVEDIR) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(failed("clearing the layer's place")(e.into())),
            }
            if let Some(layer) = &layer {
                btrfs::snapshot(copy.as_fd(), LAYER_DIR, layer.as_fd(), false, Some(group))
                    .map_err(failed("copying the writable layer"))?;
                let marker = rustix::fs::openat(
                    &copy,
                    LAYER_FROM_SNAPSHOT,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| failed("marking the layer")(e.into()))?;
                drop(marker);
            }
            Ok(())
        })();
        if let Err(error) = made {
            let _ = self.destroy_sandbox_subvolume(root, &incoming);
            if !replace {
                let _ = btrfs::destroy_qgroup(root, group);
            }
            return Err(error);
        }
        if replace {
            rustix::fs::renameat_with(root, incoming.as_str(), root, name, rustix::fs::RenameFlags::EXCHANGE)
                .map_err(|e| failed("swapping in the copy")(e.into()))?;
            // What was the sandbox's directory is now at `incoming`.
            if let Err(error) = self.destroy_sandbox_subvolume(root, &incoming) {
                tracing::warn!(%error, "deleting a sandbox's directory replaced by a restore failed; it is deleted with the next restore");
            }
        } else {
            rustix::fs::renameat(root, incoming.as_str(), root, name).map_err(|e| failed("putting the copy in place")(e.into()))?;
        }
        Ok(())
    }

    /// Deletes the sandbox subvolume `name` beneath the mount point, its layer first.
    fn destroy_sandbox_subvolume(&self, root: BorrowedFd<'_>, name: &str) -> io::Result<()> {
        if let Ok(dir) = open_beneath(root, name) {
            match btrfs::destroy_subvolume(dir.as_fd(), LAYER_DIR) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
                _ => {}
            }
        }
        btrfs::destroy_subvolume(root, name)
    }
}

/// Opens the directory `name` directly beneath `root`, following no link.
fn open_beneath(root: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    rustix::fs::openat(
        root,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

fn remove_tree(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            Err(file_error("remove sandbox directory", dir)(error))
        }
        _ => Ok(()),
    }
}

fn file_error<'a>(operation: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::File { operation, path: path.display().to_string(), source }
}

/// The level-1 quota group of the sandbox directory `name`: 48 bits of its
/// name's hash (a clash is refused by the kernel when the group is made, never shared).
fn quota_group_of(name: &str) -> u64 {
    let hash = Sha256::digest(name.as_bytes());
    let mut id = [0u8; 8];
    id[2..].copy_from_slice(&hash[..6]);
    (1u64 << 48) | u64::from_be_bytes(id).max(1)
}

/// Why quotas cannot be enforced, as told to the operator.
type Reason = String;

impl Mounted {
    fn open(home: &Path, options: &DiskOptions) -> Result<std::result::Result<(Self, u64), Reason>> {
        if !rustix::process::geteuid().is_root() {
            return Ok(Err("they need root (to loop-mount the home's disk image and set quotas)".into()));
        }
        let sandboxes = home.join("sandboxes");
        let image = home.join(DISK_IMAGE_FILE);
        let lock = open_lock_file(&home.join(DISK_LOCK_FILE))?;
        let users = open_lock_file(&home.join(DISK_USERS_FILE))?;
        // Alone until this runtime counts as a user: nobody unmounts under us.
        rustix::fs::flock(&lock, FlockOperation::LockExclusive).map_err(lock_error(home))?;
        let mut we_mounted = false;
        if !is_btrfs_mount(home, &sandboxes)? {
            let has_entries = std::fs::read_dir(&sandboxes).map_err(file_error("read", &sandboxes))?.next().is_some();
            if has_entries {
                return Ok(Err(format!(
                    "{} holds sandboxes made before disk quotas; destroy them (or move the home) to get quotas",
                    sandboxes.display()
                )));
            }
            if !image.exists()
                && let Err(reason) = make_image(home, &image, options.image_bytes)?
            {
                return Ok(Err(reason));
            }
            if let Err(reason) = mount_image(&image, &sandboxes)? {
                return Ok(Err(reason));
            }
            we_mounted = true;
        }
        let root = rustix::fs::open(&sandboxes, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| file_error("open", &sandboxes)(e.into()))?;
        if let Err(error) = btrfs::enable_simple_quotas(root.as_fd()) {
            drop(root);
            if we_mounted {
                let _ = rustix::mount::unmount(&sandboxes, rustix::mount::UnmountFlags::DETACH);
            }
            return Ok(Err(format!(
                "btrfs simple quotas could not be turned on ({error}); they need Linux 6.7 or later"
            )));
        }
        rustix::fs::flock(&users, FlockOperation::LockShared).map_err(lock_error(home))?;
        let unmount_when_last = loop_backing_file(&sandboxes).is_some_and(|backing| same_file(&backing, &image));
        let image_bytes = std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
        rustix::fs::flock(&lock, FlockOperation::Unlock).map_err(lock_error(home))?;
        Ok(Ok((Self { sandboxes, root: Some(root), lock, users, unmount_when_last }, image_bytes)))
    }

    /// Mount points (in this mount namespace) of the writable layer of the
    /// sandbox directory `name`: mounts of this filesystem whose root is
    /// `/<name>/layer` or beneath it.
    fn layer_mounts(&self, name: &str) -> Vec<PathBuf> {
        let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return Vec::new();
        };
        let fields = |line: &str| -> Option<(String, Vec<u8>, Vec<u8>)> {
            let mut parts = line.split(' ');
            let device = parts.nth(2)?.to_string();
            let root = unescape_mount_field(parts.next()?);
            let point = unescape_mount_field(parts.next()?);
            Some((device, root, point))
        };
        let ours = self.sandboxes.as_os_str().as_encoded_bytes();
        let Some(device) =
            table.lines().rev().filter_map(fields).find(|(_, _, point)| point == ours).map(|(device, ..)| device)
        else {
            return Vec::new();
        };
        let layer = format!("/{name}/{LAYER_DIR}");
        table
            .lines()
            .filter_map(fields)
            .filter(|(dev, root, _)| {
                *dev == device && (root == layer.as_bytes() || root.starts_with(format!("{layer}/").as_bytes()))
            })
            .map(|(.., point)| PathBuf::from(std::ffi::OsString::from(String::from_utf8_lossy(&point).into_owned())))
            .collect()
    }

    /// The mount point and the name of `dir`, which must be directly beneath it.
    fn child<'a>(&'a self, dir: &'a Path) -> Result<(BorrowedFd<'a>, &'a str)> {
        let name = dir.file_name().and_then(|name| name.to_str());
        match (&self.root, name) {
            (Some(root), Some(name)) if dir.parent() == Some(self.sandboxes.as_path()) => Ok((root.as_fd(), name)),
            _ => Err(Error::Disk(format!("{} is not a sandbox directory of this home", dir.display()))),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Closed first: an open directory would keep the filesystem busy.
        self.root = None;
        if rustix::fs::flock(&self.lock, FlockOperation::LockExclusive).is_err() {
            return;
        }
        let _ = rustix::fs::flock(&self.users, FlockOperation::Unlock);
        let last = rustix::fs::flock(&self.users, FlockOperation::NonBlockingLockExclusive).is_ok();
        if last && self.unmount_when_last {
            // Detached: anything still open in it (a workspace handle not yet
            // dropped) keeps it alive until closed, and the loop device, set to
            // clear itself, goes with it.
            if let Err(error) = rustix::mount::unmount(&self.sandboxes, rustix::mount::UnmountFlags::DETACH) {
                tracing::warn!(%error, path = %self.sandboxes.display(), "unmounting the home's disk image failed");
            }
        }
        let _ = rustix::fs::flock(&self.users, FlockOperation::Unlock);
        let _ = rustix::fs::flock(&self.lock, FlockOperation::Unlock);
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(file_error("open", path))
}

fn lock_error(home: &Path) -> impl FnOnce(rustix::io::Errno) -> Error + '_ {
    move |errno| Error::Disk(format!("locking the disk of {}: {errno}", home.display()))
}

/// `sandboxes` is a btrfs filesystem mounted over the home's directory.
fn is_btrfs_mount(home: &Path, sandboxes: &Path) -> Result<bool> {
    const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
    let stat = |path: &Path| rustix::fs::stat(path).map_err(|e| file_error("stat", path)(e.into()));
    if stat(home)?.st_dev == stat(sandboxes)?.st_dev {
        return Ok(false);
    }
    let fs = rustix::fs::statfs(sandboxes).map_err(|e| file_error("statfs", sandboxes)(e.into()))?;
    #[allow(clippy::unnecessary_cast)]
    Ok(fs.f_type as i64 == BTRFS_SUPER_MAGIC)
}

/// Makes a sparse image of the chosen size holding an empty btrfs filesystem.
fn make_image(home: &Path, image: &Path, size: Option<u64>) -> Result<std::result::Result<(), Reason>> {
    let Some(mkfs) = find_program("mkfs.btrfs") else {
        return Ok(Err("mkfs.btrfs is missing: install btrfs-progs (`airlock setup` does)".into()));
    };
    let size = match size {
        Some(size) if size < MIN_IMAGE_BYTES => {
            return Err(Error::Invalid {
                what: "disk image size",
                reason: format!("{} is under the minimum {}", format_size(size), format_size(MIN_IMAGE_BYTES)),
            });
        }
        Some(size) => size,
        None => {
            let vfs = rustix::fs::statvfs(home).map_err(|e| file_error("statvfs", home)(e.into()))?;
            let free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
            (free / 100 * DEFAULT_IMAGE_SHARE_PERCENT).clamp(MIN_IMAGE_BYTES, MAX_DEFAULT_IMAGE_BYTES)
        }
    };
    // Made aside and renamed when complete: a crash leaves no half-made image.
    let partial = home.join(format!("{DISK_IMAGE_FILE}.partial"));
    let file = File::create(&partial).map_err(file_error("create", &partial))?;
    file.set_len(size).map_err(file_error("size", &partial))?;
    drop(file);
    // Single copies of metadata (the host's disk keeps its own integrity); no
    // discard pass over a file that is all holes.
    let output = Command::new(mkfs)
        .args(["-q", "-f", "-m", "single", "-d", "single", "--nodiscard"])
        .arg(&partial)
        .stdin(Stdio::null())
        .output()
        .map_err(file_error("run mkfs.btrfs on", &partial))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(Error::Disk(format!(
            "mkfs.btrfs {}: {}",
            partial.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    std::fs::rename(&partial, image).map_err(file_error("rename into place", image))?;
    Ok(Ok(()))
}

fn mount_image(image: &Path, sandboxes: &Path) -> Result<std::result::Result<(), Reason>> {
    let Some(mount) = find_program("mount") else {
        return Ok(Err("mount(8) is missing".into()));
    };
    // mount(8) sets up a loop device that clears itself at unmount, and reuses
    // the one already attached to this image if another mount holds it.
    let output = Command::new(mount)
        .args(["-t", "btrfs", "-o", IMAGE_MOUNT_OPTIONS])
        .arg(image)
        .arg(sandboxes)
        .stdin(Stdio::null())
        .output()
        .map_err(file_error("run mount for", image))?;
    if output.status.success() {
        Ok(Ok(()))
    } else {
        Ok(Err(format!(
            "mounting {} on {} failed: {}",
            image.display(),
            sandboxes.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// The file behind the loop device mounted at `mount_point`, if it is one.
/// (A file's `st_dev` on btrfs is an anonymous device, not the loop device:
/// the mount table names the device.)
fn loop_backing_file(mount_point: &Path) -> Option<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let source = table.lines().rev().find_map(|line| {
        let (mount, rest) = line.split_once(" - ")?;
        let point = mount.split(' ').nth(4)?;
        (unescape_mount_field(point) == mount_point.as_os_str().as_encoded_bytes())
            .then(|| rest.split(' ').nth(1).map(str::to_string))?
    })?;
    let device = source.strip_prefix("/dev/")?;
    if !device.starts_with("loop") || device.contains('/') {
        return None;
    }
    let text = std::fs::read_to_string(format!("/sys/block/{device}/loop/backing_file")).ok()?;
    Some(PathBuf::from(text.trim_end_matches('\n')))
}

/// The mount table writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_field(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(digits) => {
                out.push(digits.iter().fold(0u8, |value, digit| value.wrapping_mul(8).wrapping_add(digit - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Installs btrfs-progs (for `mkfs.btrfs`) with apt when it is missing; what
/// `airlock setup` calls. A no-op when it is there.
pub fn install_disk_tools() -> Result<()> {
    if find_program("mkfs.btrfs").is_some() {
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() || find_program("apt-get").is_none() {
        return Err(Error::Disk(
            "mkfs.btrfs is missing; install btrfs-progs (as root on Debian, `airlock setup` does)".into(),
        ));
    }
    let install = |update_first: bool| -> Result<std::process::Output> {
        if update_first {
            let _ = Command::new("apt-get").args(["update", "-q"]).stdin(Stdio::null()).output();
        }
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "btrfs-progs"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::Disk(format!("running apt-get: {e}")))
    };
    let mut output = install(false)?;
    if !output.status.success() {
        // A fresh machine may have no package lists yet.
        output = install(true)?;
    }
    if !output.status.success() {
        return Err(Error::Disk(format!(
            "apt-get install btrfs-progs failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The btrfs ioctls, with the kernel's structures (linux/btrfs.h).
#[allow(unsafe_code)]
mod btrfs {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd};

    const MAGIC: u64 = 0x94;
    const fn ioc(dir: u64, nr: u64, size: usize) -> libc::Ioctl {
        ((dir << 30) | ((size as u64) << 16) | (MAGIC << 8) | nr) as libc::Ioctl
    }
    const WRITE: u64 = 1;
    const READ: u64 = 2;

    const QUOTA_CTL: libc::Ioctl = ioc(READ | WRITE, 40, size_of::<QuotaCtlArgs>());
    const QGROUP_CREATE: libc::Ioctl = ioc(WRITE, 42, size_of::<QgroupCreateArgs>());
    // Declared as a read in the kernel's header although the kernel reads it.
    const QGROUP_LIMIT: libc::Ioctl = ioc(READ, 43, size_of::<QgroupLimitArgs>());
    const SUBVOL_CREATE_V2: libc::Ioctl = ioc(WRITE, 24, size_of::<VolArgsV2>());
    const SNAP_DESTROY: libc::Ioctl = ioc(WRITE, 15, size_of::<VolArgs>());
    const SNAP_CREATE_V2: libc::Ioctl = ioc(WRITE, 23, size_of::<VolArgsV2>());
    const SUBVOL_RDONLY: u64 = 1 << 1;

    const QUOTA_CTL_ENABLE_SIMPLE_QUOTA: u64 = 4;
    const QGROUP_LIMIT_MAX_RFER: u64 = 1;
    const SUBVOL_QGROUP_INHERIT: u64 = 1 << 2;
    const VOL_NAME_MAX: usize = 4087;
    const SUBVOL_NAME_MAX: usize = 4039;

    #[repr(C)]
    struct QuotaCtlArgs {
        cmd: u64,
        status: u64,
    }

    #[repr(C)]
    struct QgroupCreateArgs {
        create: u64,
        qgroupid: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct QgroupLimit {
        flags: u64,
        max_rfer: u64,
        max_excl: u64,
        rsv_rfer: u64,
        rsv_excl: u64,
    }

    #[repr(C)]
    struct QgroupLimitArgs {
        qgroupid: u64,
        lim: QgroupLimit,
    }

    /// `struct btrfs_qgroup_inherit` with room for one group.
    #[repr(C)]
    struct QgroupInherit {
        flags: u64,
        num_qgroups: u64,
        num_ref_copies: u64,
        num_excl_copies: u64,
        lim: QgroupLimit,
        qgroups: [u64; 1],
    }

    #[repr(C)]
    struct VolArgs {
        fd: i64,
        name: [u8; VOL_NAME_MAX + 1],
    }

    #[repr(C)]
    struct VolArgsV2 {
        fd: i64,
        transid: u64,
        flags: u64,
        /// The union of `{ size, qgroup_inherit pointer }` and `unused[4]`.
        size: u64,
        qgroup_inherit: u64,
        unused: [u64; 2],
        name: [u8; SUBVOL_NAME_MAX + 1],
    }

    fn call<T>(fd: BorrowedFd<'_>, request: libc::Ioctl, arg: &mut T) -> io::Result<()> {
        // SAFETY: `arg` is a live, exclusively borrowed `repr(C)` value laid out
        // as the structure `request` takes (linux/btrfs.h), valid for the call;
        // any pointer inside it points to a value the caller keeps alive.
        let result = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(arg)) };
        if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    fn name_field<const N: usize>(name: &str) -> io::Result<[u8; N]> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= N || bytes.contains(&0) || bytes.contains(&b'/') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad subvolume name {name:?}")));
        }
        let mut field = [0u8; N];
        field[..bytes.len()].copy_from_slice(bytes);
        Ok(field)
    }

    /// Turns on simple quotas (a no-op when quotas are on already).
    pub fn enable_simple_quotas(fs: BorrowedFd<'_>) -> io::Result<()> {
        call(fs, QUOTA_CTL, &mut QuotaCtlArgs { cmd: QUOTA_CTL_ENABLE_SIMPLE_QUOTA, status: 0 })
    }

    pub fn create_qgroup(fs: BorrowedFd<'_>, qgroupid: u64) -> io::Result<()> {
        call(fs, QGROUP_CREATE, &mut QgroupCreateArgs { create: 1, qgroupid })
    }

    pub fn destroy_qgroup(fs: BorrowedFd<'_>, qgroupid: u64) -> io::Result<()> {
        call(fs, QGROUP_CREATE, &mut QgroupCreateArgs { create: 0, qgroupid })
    }

    /// Limits the bytes the group's subvolumes may reference.
    pub fn limit_qgroup(fs: BorrowedFd<'_>, qgroupid: u64, bytes: u64) -> io::Result<()> {
        let lim = QgroupLimit { flags: QGROUP_LIMIT_MAX_RFER, max_rfer: bytes, ..QgroupLimit::default() };
        call(fs, QGROUP_LIMIT, &mut QgroupLimitArgs { qgroupid, lim })
    }

    /// Makes subvolume `name` in the directory `parent`, in the quota group `qgroupid`.
    pub fn create_subvolume(parent: BorrowedFd<'_>, name: &str, qgroupid: u64) -> io::Result<()> {
        let mut inherit = QgroupInherit {
            flags: 0,
            num_qgroups: 1,
            num_ref_copies: 0,
            num_excl_copies: 0,
            lim: QgroupLimit::default(),
            qgroups: [qgroupid],
        };
        let mut args = VolArgsV2 {
            fd: 0,
            transid: 0,
            flags: SUBVOL_QGROUP_INHERIT,
            size: size_of::<QgroupInherit>() as u64,
            qgroup_inherit: std::ptr::from_mut(&mut inherit) as u64,
            unused: [0; 2],
            name: name_field(name)?,
        };
        call(parent, SUBVOL_CREATE_V2, &mut args)
    }

    /// Snapshots the subvolume open as `source` to `name` in the directory
    /// `parent`: read-only when asked, in the quota group `qgroupid` when given.
    pub fn snapshot(
        parent: BorrowedFd<'_>,
        name: &str,
        source: BorrowedFd<'_>,
        readonly: bool,
        qgroupid: Option<u64>,
    ) -> io::Result<()> {
        let mut inherit = QgroupInherit {
            flags: 0,
            num_qgroups: 1,
            num_ref_copies: 0,
            num_excl_copies: 0,
            lim: QgroupLimit::default(),
            qgroups: [qgroupid.unwrap_or(0)],
        };
        let mut flags = if readonly { SUBVOL_RDONLY } else { 0 };
        let (mut size, mut pointer) = (0, 0);
        if qgroupid.is_some() {
            flags |= SUBVOL_QGROUP_INHERIT;
            size = size_of::<QgroupInherit>() as u64;
            pointer = std::ptr::from_mut(&mut inherit) as u64;
        }
        let mut args = VolArgsV2 {
            fd: i64::from(source.as_raw_fd()),
            transid: 0,
            flags,
            size,
            qgroup_inherit: pointer,
            unused: [0; 2],
            name: name_field(name)?,
        };
        call(parent, SNAP_CREATE_V2, &mut args)
    }

    /// Deletes subvolume `name` in `parent` at once (the kernel frees its
    /// extents in the background). Fails with ENOTEMPTY when it holds subvolumes.
    pub fn destroy_subvolume(parent: BorrowedFd<'_>, name: &str) -> io::Result<()> {
        call(parent, SNAP_DESTROY, &mut VolArgs { fd: 0, name: name_field(name)? })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        #[allow(clippy::unnecessary_cast, reason = "the request type is not u64 on every target")]
        fn request_numbers_match_the_kernel_header() {
            assert_eq!(QUOTA_CTL as u64, 0xc010_9428);
            assert_eq!(QGROUP_CREATE as u64, 0x4010_942a);
            assert_eq!(QGROUP_LIMIT as u64, 0x8030_942b);
            assert_eq!(SUBVOL_CREATE_V2 as u64, 0x5000_9418);
            assert_eq!(SNAP_DESTROY as u64, 0x5000_940f);
            assert_eq!(SNAP_CREATE_V2 as u64, 0x5000_9417);
            assert_eq!(size_of::<QgroupInherit>(), 80);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_groups_are_level_one_and_distinct() {
        let a = quota_group_of("0b6c4a1e-1");
        let b = quota_group_of("0b6c4a1e-2");
        assert_eq!(a >> 48, 1);
        assert_eq!(b >> 48, 1);
        assert_ne!(a, b);
        assert_eq!(a, quota_group_of("0b6c4a1e-1"));
    }

    #[test]
    fn mount_table_escapes_are_undone() {
        assert_eq!(unescape_mount_field("/tmp/a\\040b/sandboxes"), b"/tmp/a b/sandboxes");
        assert_eq!(unescape_mount_field("/plain"), b"/plain");
        assert_eq!(unescape_mount_field("/odd\\9"), b"/odd\\9");
    }
}
