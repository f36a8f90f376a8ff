//! The container's writable layer, moved onto a directory of the caller's
//! choosing: the way a sandbox's disk quota covers what its container writes
//! outside `/workspace` when the engine's storage cannot limit a layer itself
//! (overlay2 on ext4).
//!
//! overlay2 keeps a container's writable layer in one directory per container,
//! `<data root>/overlay2/<id>`, holding `diff` (the overlay's upper dir), `work`
//! (its work dir, which must sit on the same mount as `diff`), and two small
//! files naming the layer (`link`) and its lower layers (`lower`). Right after
//! the container is made, before its first start, that directory holds no
//! data: it is rebuilt in the caller's directory (same names, owners, modes)
//! and the caller's directory is bind-mounted over it. Docker then mounts the
//! overlay through the bind mount at every start, so every byte the container
//! writes lands on the caller's filesystem and counts against its quota. The
//! container carries [`LAYER_LABEL`] naming that directory, so that a start
//! after a reboot (mount gone) puts it back, and removal takes it off first.
//!
//! The paths touched are Docker's layer directory (host-owned, root only) and
//! the caller's directory with its top-level entries, which the caller made
//! and no sandbox can reach; nothing beneath `diff` or `work` (where the
//! container writes) is ever opened.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::models::ContainerInspectResponse;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::error::{Error, Result};

/// Label naming the host directory a container's writable layer was moved
/// onto (see the module's documentation).
pub const LAYER_LABEL: &str = "airlock.layer";

/// How long removal waits for Docker to take the stopped container's overlay
/// off the layer before it detaches the layer's mount anyway.
pub const LAYER_UNMOUNT_WAIT: Duration = Duration::from_secs(2);

/// The most bytes a top-level file of a layer directory may hold (`link` and
/// `lower` hold tens of bytes each): bounds what is copied.
const LAYER_FILE_MAX_BYTES: u64 = 64 * 1024;

/// Where the container's writable layer lives: its overlay2 directory and the
/// directory it was moved onto, when the container carries [`LAYER_LABEL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MovedLayer {
    /// Docker's `<data root>/overlay2/<id>`.
    pub layer: PathBuf,
    /// The caller's directory, bind-mounted over `layer`.
    pub home: PathBuf,
}

/// Docker's overlay2 directory of the container's writable layer: the common
/// parent of its upper and work dirs. `None` for another storage driver.
pub(crate) fn layer_dir_of(inspected: &ContainerInspectResponse) -> Option<PathBuf> {
    let driver = inspected.graph_driver.as_ref()?;
    if driver.name != "overlay2" {
        return None;
    }
    let upper = Path::new(driver.data.get("UpperDir")?);
    let work = Path::new(driver.data.get("WorkDir")?);
    let dir = upper.parent()?;
    (upper.is_absolute() && work.parent() == Some(dir) && upper.file_name()? == "diff" && work.file_name()? == "work")
        .then(|| dir.to_path_buf())
}

/// The container's moved layer, from its label and its storage.
pub(crate) fn moved_layer_of(inspected: &ContainerInspectResponse) -> Option<MovedLayer> {
    let home = inspected.config.as_ref()?.labels.as_ref()?.get(LAYER_LABEL)?;
    Some(MovedLayer { layer: layer_dir_of(inspected)?, home: PathBuf::from(home) })
}

fn io_error(what: &str, path: &Path) -> impl FnOnce(rustix::io::Errno) -> Error {
    let context = format!("{what} {}", path.display());
    move |errno| Error::Io { context, source: errno.into() }
}

fn open_dir(path: &Path) -> Result<OwnedFd> {
    rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        .map_err(io_error("open directory", path))
}

/// Rebuilds the freshly made layer directory `layer` in `home` (an empty
/// directory, or one holding a snapshot's layer: its data is kept) and
/// bind-mounts `home` over it. Refuses a Docker layer that holds data.
pub(crate) fn move_layer(moved: &MovedLayer) -> Result<()> {
    let MovedLayer { layer, home } = moved;
    let from = open_dir(layer)?;
    let to = open_dir(home)?;
    let mut entries = Vec::new();
    for_each_entry(&from, layer, |name, kind| {
        entries.push((name.to_owned(), kind));
        Ok(())
    })?;
    // A home may already hold a layer's data (`diff` and `work`, with the
    // `link` and `lower` of the layer it came from): a restored or forked
    // snapshot's. Its data stays; Docker's own small files replace the old ones.
    let mut prefilled = false;
    for_each_entry(&to, home, |name, kind| match (name, kind) {
        ("diff", FileType::Directory) => {
            prefilled = true;
            Ok(())
        }
        // `work` is overlay's scratch space, `merged` its (unmounted) mount point.
        ("work" | "merged", FileType::Directory) => Ok(()),
        ("link" | "lower", FileType::RegularFile) => Ok(()),
        _ => Err(Error::Invalid { what: "writable layer home", reason: format!("{} holds {name:?}", home.display()) }),
    })?;
    if prefilled {
        for name in ["link", "lower"] {
            match rustix::fs::unlinkat(&to, name, AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(errno) => return Err(io_error("remove", &home.join(name))(errno)),
            }
        }
    }
    for (name, kind) in entries {
        let stat = rustix::fs::statat(&from, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(io_error("stat", &layer.join(&name)))?;
        let mode = Mode::from_raw_mode(stat.st_mode) & Mode::from_bits_truncate(0o7777);
        let owner = (Some(rustix::fs::Uid::from_raw(stat.st_uid)), Some(rustix::fs::Gid::from_raw(stat.st_gid)));
        let made = match kind {
            FileType::Directory => {
                // Only empty: the container has not run, so `diff` holds nothing
                // (and `work` at most overlay's own empty `work/work`, remade at mount).
                let sub = rustix::fs::openat(
                    &from,
                    name.as_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io_error("open", &layer.join(&name)))?;
                if name == "diff" && !prefilled {
                    for_each_entry(&sub, &layer.join(&name), |entry, _| {
                        Err(Error::Invalid {
                            what: "writable layer",
                            reason: format!("{} holds {entry:?}: the container has run", layer.display()),
                        })
                    })?;
                }
                match rustix::fs::mkdirat(&to, name.as_str(), Mode::empty()) {
                    Err(rustix::io::Errno::EXIST) if prefilled => {}
                    made => made.map_err(io_error("make", &home.join(&name)))?,
                }
                rustix::fs::openat(
                    &to,
                    name.as_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io_error("open", &home.join(&name)))?
            }
            FileType::RegularFile if (stat.st_size as u64) <= LAYER_FILE_MAX_BYTES => {
                let source = rustix::fs::openat(
                    &from,
                    name.as_str(),
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io_error("open", &layer.join(&name)))?;
                let target = rustix::fs::openat(
                    &to,
                    name.as_str(),
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(io_error("create", &home.join(&name)))?;
                let mut reader = std::fs::File::from(source);
                let mut writer = std::fs::File::from(target);
                io::copy(&mut io::Read::take(&mut reader, LAYER_FILE_MAX_BYTES), &mut writer)
                    .map_err(Error::io(format!("copy {}", layer.join(&name).display())))?;
                OwnedFd::from(writer)
            }
            _ => {
                return Err(Error::Invalid {
                    what: "writable layer",
                    reason: format!("{} is not a small file or a directory", layer.join(&name).display()),
                });
            }
        };
        rustix::fs::fchown(&made, owner.0, owner.1).map_err(io_error("chown", &home.join(&name)))?;
        rustix::fs::fchmod(&made, mode).map_err(io_error("chmod", &home.join(&name)))?;
    }
    let stat = rustix::fs::fstat(&from).map_err(io_error("stat", layer))?;
    rustix::fs::fchown(&to, Some(rustix::fs::Uid::from_raw(stat.st_uid)), Some(rustix::fs::Gid::from_raw(stat.st_gid)))
        .map_err(io_error("chown", home))?;
    rustix::fs::fchmod(&to, Mode::from_raw_mode(stat.st_mode) & Mode::from_bits_truncate(0o7777))
        .map_err(io_error("chmod", home))?;
    drop((from, to));
    rustix::mount::mount_bind(home.as_path(), layer.as_path()).map_err(io_error("bind-mount the layer on", layer))
}

/// Whether `home` is mounted over `layer` (the same directory seen from both).
pub(crate) fn is_mounted(moved: &MovedLayer) -> bool {
    let flags = AtFlags::SYMLINK_NOFOLLOW;
    match (
        rustix::fs::statat(rustix::fs::CWD, moved.layer.as_path(), flags),
        rustix::fs::statat(rustix::fs::CWD, moved.home.as_path(), flags),
    ) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

/// Puts the layer's mount back when it went (a reboot, or an unmount by
/// hand), before a start: otherwise the container would start on an empty
/// layer that no quota covers.
pub(crate) fn ensure_mounted(moved: &MovedLayer) -> Result<()> {
    if is_mounted(moved) {
        return Ok(());
    }
    let home = open_dir(&moved.home)?;
    drop(home);
    tracing::info!(layer = %moved.layer.display(), home = %moved.home.display(), "mounting the writable layer again");
    rustix::mount::mount_bind(moved.home.as_path(), moved.layer.as_path())
        .map_err(io_error("bind-mount the layer on", &moved.layer))
}

/// Takes the layer's mount off (the container stopped), so that removal
/// deletes Docker's own directory and the caller keeps a filesystem with no
/// mount left on it. Waits up to [`LAYER_UNMOUNT_WAIT`] for Docker to take
/// the overlay off, then detaches.
pub(crate) async fn release(moved: &MovedLayer) -> Result<()> {
    let started = std::time::Instant::now();
    while is_mounted(moved) {
        match rustix::mount::unmount(moved.layer.as_path(), rustix::mount::UnmountFlags::empty()) {
            Ok(()) => {}
            Err(rustix::io::Errno::BUSY) if started.elapsed() < LAYER_UNMOUNT_WAIT => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(rustix::io::Errno::BUSY) => {
                rustix::mount::unmount(moved.layer.as_path(), rustix::mount::UnmountFlags::DETACH)
                    .map_err(io_error("detach the layer from", &moved.layer))?;
            }
            Err(errno) => return Err(io_error("unmount the layer from", &moved.layer)(errno)),
        }
    }
    Ok(())
}

/// Calls `each` with every entry's name and type in the directory `dir`.
fn for_each_entry(dir: &OwnedFd, path: &Path, mut each: impl FnMut(&str, FileType) -> Result<()>) -> Result<()> {
    let fd = rustix::fs::openat(dir.as_fd(), ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(io_error("open", path))?;
    let entries = rustix::fs::Dir::read_from(&fd).map_err(io_error("read", path))?;
    for entry in entries {
        let entry = entry.map_err(io_error("read", path))?;
        let name = entry.file_name().to_str().map_err(|_| Error::Invalid {
            what: "writable layer",
            reason: format!("{} holds a name that is not UTF-8", path.display()),
        })?;
        if name == "." || name == ".." {
            continue;
        }
        each(name, entry.file_type())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn inspected(driver: &str, upper: &str, work: &str, label: Option<&str>) -> ContainerInspectResponse {
        let data =
            HashMap::from([("UpperDir".to_string(), upper.to_string()), ("WorkDir".to_string(), work.to_string())]);
        let labels = label.map(|home| HashMap::from([(LAYER_LABEL.to_string(), home.to_string())]));
        ContainerInspectResponse {
            graph_driver: Some(bollard::models::DriverData { name: driver.into(), data }),
            config: Some(bollard::models::ContainerConfig { labels, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn the_layer_is_found_only_for_overlay2_with_upper_and_work_side_by_side() {
        let ok = inspected("overlay2", "/d/overlay2/abc/diff", "/d/overlay2/abc/work", Some("/h/layer"));
        assert_eq!(layer_dir_of(&ok), Some(PathBuf::from("/d/overlay2/abc")));
        assert_eq!(moved_layer_of(&ok), Some(MovedLayer { layer: "/d/overlay2/abc".into(), home: "/h/layer".into() }));
        let unlabelled = inspected("overlay2", "/d/overlay2/abc/diff", "/d/overlay2/abc/work", None);
        assert_eq!(moved_layer_of(&unlabelled), None);
        assert_eq!(layer_dir_of(&inspected("btrfs", "/d/a/diff", "/d/a/work", None)), None);
        assert_eq!(layer_dir_of(&inspected("overlay2", "/d/a/diff", "/d/b/work", None)), None);
        assert_eq!(layer_dir_of(&inspected("overlay2", "d/a/diff", "d/a/work", None)), None);
    }
}
