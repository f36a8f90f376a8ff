//! The base image, built locally from Debian packages: there is no registry.
//!
//! `airlock/base:<recipe-hash>` is a debootstrap of Debian (minbase) with the
//! recipe's packages installed in a chroot, a non-root `sandbox` user, and
//! `/workspace`; the root filesystem is streamed into the engine as an import.
//! The tag is a hash of the recipe, so the image is rebuilt exactly when the
//! recipe changes and found again otherwise.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use bollard::query_parameters::CreateImageOptionsBuilder;
use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::engine::{DockerEngine, install_missing, last_lines, which};
use crate::error::{Error, Result};

/// The repository every base image is tagged in.
pub const BASE_IMAGE_REPOSITORY: &str = "airlock/base";
/// Bumped whenever the build steps below change, so that the tag changes too.
const BUILD_STEPS_VERSION: u32 = 1;
/// The unprivileged user commands run as by default, and its ids.
pub const SANDBOX_USER: &str = "sandbox";
pub const SANDBOX_UID: u32 = 1000;
/// Label on the image carrying its recipe hash.
pub const RECIPE_LABEL: &str = "airlock.recipe";

/// Receives one line of build progress at a time.
pub type Progress = Arc<dyn Fn(&str) + Send + Sync>;

/// What goes into a base image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecipe {
    /// Debian release, such as `bookworm`.
    pub suite: String,
    /// debootstrap variant; `minbase` is the smallest that has apt.
    pub variant: String,
    /// Where packages come from. Not part of the hash: the same packages from
    /// another mirror make the same image.
    pub mirror: String,
    /// Installed on top of the variant, without recommends.
    pub packages: Vec<String>,
}

impl Default for ImageRecipe {
    fn default() -> Self {
        Self {
            suite: "bookworm".into(),
            variant: "minbase".into(),
            mirror: "http://deb.debian.org/debian".into(),
            packages: [
                "bash",
                "git",
                "python3",
                "nodejs",
                "npm",
                "curl",
                "ca-certificates",
                "procps",
                // pip and venv: package installs go through the egress proxy.
                "python3-pip",
                "python3-venv",
                // The data stack code-interpreter users expect.
                "python3-numpy",
                "python3-pandas",
                "python3-matplotlib",
                "python3-scipy",
                "python3-pil",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl ImageRecipe {
    /// A short hash of everything that changes the image's contents.
    pub fn hash(&self) -> String {
        let mut packages = self.packages.clone();
        packages.sort();
        packages.dedup();
        let canonical = format!(
            "steps={BUILD_STEPS_VERSION}\nsuite={}\nvariant={}\npackages={}\nuser={SANDBOX_USER}:{SANDBOX_UID}\n",
            self.suite,
            self.variant,
            packages.join(",")
        );
        let digest = Sha256::digest(canonical.as_bytes());
        digest.iter().take(6).map(|byte| format!("{byte:02x}")).collect()
    }

    /// `airlock/base:<hash>`.
    pub fn tag(&self) -> String {
        format!("{BASE_IMAGE_REPOSITORY}:{}", self.hash())
    }
}

/// Whether the local engine has `image`.
pub async fn image_exists(engine: &DockerEngine, image: &str) -> Result<bool> {
    match engine.docker().inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(false),
        Err(source) => Err(Error::Docker { operation: "inspect image", source }),
    }
}

/// Returns the recipe's tag, building and importing the image first when the
/// engine does not have it. Progress lines go to `progress`.
pub async fn ensure_base_image(engine: &DockerEngine, recipe: &ImageRecipe, progress: Progress) -> Result<String> {
    let tag = recipe.tag();
    if image_exists(engine, &tag).await? {
        return Ok(tag);
    }
    progress(&format!("building {tag} from Debian {} ({}); this takes a few minutes, once", recipe.suite, recipe.variant));
    let staging = staging_dir(&recipe.hash());
    let rootfs = staging.join("rootfs");
    let build = {
        let recipe = recipe.clone();
        let rootfs = rootfs.clone();
        let progress = progress.clone();
        let tag = tag.clone();
        tokio::task::spawn_blocking(move || build_rootfs(&recipe, &rootfs, &progress, &tag))
    };
    let built = build.await.map_err(|e| Error::ImageBuild { image: tag.clone(), reason: e.to_string() })?;
    let imported = match built {
        Ok(()) => import_rootfs(engine, &rootfs, recipe, &progress).await,
        Err(error) => Err(error),
    };
    // The staging tree is large; it goes whether or not the build worked.
    let _ = fs::remove_dir_all(&staging);
    imported?;
    progress(&format!("built {tag}"));
    Ok(tag)
}

fn staging_dir(hash: &str) -> PathBuf {
    std::env::temp_dir().join(format!("airlock-image-{hash}-{}", std::process::id()))
}

fn build_rootfs(recipe: &ImageRecipe, rootfs: &Path, progress: &Progress, tag: &str) -> Result<()> {
    let fail = |reason: String| Error::ImageBuild { image: tag.to_string(), reason };
    if !rustix::process::geteuid().is_root() {
        return Err(fail("debootstrap and chroot need root".into()));
    }
    install_missing(&["debootstrap"])?;
    fs::create_dir_all(rootfs).map_err(Error::io(format!("creating {}", rootfs.display())))?;
    // Stage one: the minimal system. Its resolver cannot take npm's many
    // virtual packages, so the recipe's packages come in stage two, from apt.
    let variant = format!("--variant={}", recipe.variant);
    stream_command(
        Command::new("debootstrap").arg(&variant).arg(&recipe.suite).arg(rootfs).arg(&recipe.mirror),
        progress,
        "debootstrap",
    )
    .map_err(&fail)?;

    // Stage two: apt inside the chroot; services must not start there.
    let policy = rootfs.join("usr/sbin/policy-rc.d");
    fs::write(&policy, "#!/bin/sh\nexit 101\n").map_err(Error::io("writing policy-rc.d"))?;
    fs::set_permissions(&policy, fs::Permissions::from_mode(0o755)).map_err(Error::io("chmod policy-rc.d"))?;
    fs::copy("/etc/resolv.conf", rootfs.join("etc/resolv.conf")).map_err(Error::io("copying resolv.conf"))?;
    stream_command(
        Command::new("chroot")
            .arg(rootfs)
            .args(["apt-get", "install", "-y", "-q", "--no-install-recommends"])
            .args(&recipe.packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        progress,
        "apt",
    )
    .map_err(&fail)?;

    add_sandbox_user(rootfs)?;
    // What the image does not need: package caches, the build's resolver and policy.
    for leftover in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let dir = rootfs.join(leftover);
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.path().is_file() {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
    fs::remove_file(&policy).map_err(Error::io("removing policy-rc.d"))?;
    fs::write(rootfs.join("etc/resolv.conf"), "").map_err(Error::io("emptying resolv.conf"))?;
    Ok(())
}

/// The unprivileged `sandbox` user (uid/gid 1000), its home, and `/workspace`.
fn add_sandbox_user(rootfs: &Path) -> Result<()> {
    let append = |file: &str, line: String| -> Result<()> {
        use std::io::Write;
        let path = rootfs.join(file);
        let mut handle =
            fs::OpenOptions::new().append(true).open(&path).map_err(Error::io(format!("opening {}", path.display())))?;
        writeln!(handle, "{line}").map_err(Error::io(format!("writing {}", path.display())))
    };
    let id = SANDBOX_UID;
    append("etc/passwd", format!("{SANDBOX_USER}:x:{id}:{id}:Airlock sandbox:/home/{SANDBOX_USER}:/bin/bash"))?;
    append("etc/group", format!("{SANDBOX_USER}:x:{id}:"))?;
    append("etc/shadow", format!("{SANDBOX_USER}:!:19000:0:99999:7:::"))?;
    for dir in [format!("home/{SANDBOX_USER}"), "workspace".to_string()] {
        let path = rootfs.join(dir);
        fs::create_dir_all(&path).map_err(Error::io(format!("creating {}", path.display())))?;
        std::os::unix::fs::chown(&path, Some(id), Some(id)).map_err(Error::io(format!("chown {}", path.display())))?;
    }
    Ok(())
}

/// Runs `command`, passing each line it prints to `progress` with a prefix.
fn stream_command(command: &mut Command, progress: &Progress, prefix: &str) -> std::result::Result<(), String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {prefix}: {e}"))?;
    let stderr = child.stderr.take();
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stderr) = stderr {
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        }
        text
    });
    let mut last = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(std::result::Result::ok) {
            progress(&format!("{prefix}: {line}"));
            last.push(line);
            if last.len() > 20 {
                last.remove(0);
            }
        }
    }
    let status = child.wait().map_err(|e| format!("waiting for {prefix}: {e}"))?;
    let stderr_text = stderr_reader.join().unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        Err(format!("{prefix} failed ({status}):\n{}\n{}", last.join("\n"), last_lines(&stderr_text, 20)))
    }
}

/// Streams the root filesystem into the engine as `docker import` would.
async fn import_rootfs(engine: &DockerEngine, rootfs: &Path, recipe: &ImageRecipe, progress: &Progress) -> Result<()> {
    let tag = recipe.tag();
    let fail = |reason: String| Error::ImageBuild { image: tag.clone(), reason };
    progress(&format!("importing {tag} into the docker engine"));
    let tar = which("tar").ok_or_else(|| fail("tar is not installed".into()))?;
    let mut child = tokio::process::Command::new(tar)
        .arg("-C")
        .arg(rootfs)
        .args(["--numeric-owner", "-c", "."])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("starting tar: {e}")))?;
    let stdout = child.stdout.take().ok_or_else(|| fail("tar has no stdout".into()))?;
    let body = futures_util::stream::unfold(stdout, |mut out| async move {
        let mut buffer = vec![0u8; 256 * 1024];
        match out.read(&mut buffer).await {
            Ok(0) => None,
            Ok(n) => {
                buffer.truncate(n);
                Some((Ok::<Bytes, std::io::Error>(Bytes::from(buffer)), out))
            }
            Err(e) => Some((Err(e), out)),
        }
    });
    let hash = recipe.hash();
    let options = CreateImageOptionsBuilder::new()
        .from_src("-")
        .repo(BASE_IMAGE_REPOSITORY)
        .tag(&hash)
        .changes(vec![
            "WORKDIR /workspace".to_string(),
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            "ENV LANG=C.UTF-8".to_string(),
            "CMD [\"sleep\", \"infinity\"]".to_string(),
            format!("LABEL {RECIPE_LABEL}={hash}"),
        ])
        .build();
    let mut stream =
        engine.docker().create_image(Some(options), Some(bollard::body_try_stream(body)), None).boxed();
    while let Some(message) = stream.next().await {
        let message = message.map_err(Error::docker("import image"))?;
        if let Some(status) = message.status {
            progress(&format!("import: {status}"));
        }
    }
    let output = child.wait_with_output().await.map_err(|e| fail(format!("waiting for tar: {e}")))?;
    if !output.status.success() {
        return Err(fail(format!("tar failed: {}", last_lines(&String::from_utf8_lossy(&output.stderr), 10))));
    }
    if !image_exists(engine, &tag).await? {
        return Err(fail("the engine accepted the import but has no such image".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_changes_with_the_recipe_and_only_with_it() {
        let base = ImageRecipe::default();
        assert!(base.tag().starts_with("airlock/base:"));
        assert_eq!(base.hash().len(), 12);
        let mut reordered = base.clone();
        reordered.packages.reverse();
        assert_eq!(reordered.tag(), base.tag(), "package order is not content");
        let mut mirrored = base.clone();
        mirrored.mirror = "http://mirror.example/debian".into();
        assert_eq!(mirrored.tag(), base.tag(), "the mirror is not content");
        let mut more = base.clone();
        more.packages.push("make".into());
        assert_ne!(more.tag(), base.tag());
        let mut other_suite = base.clone();
        other_suite.suite = "trixie".into();
        assert_ne!(other_suite.tag(), base.tag());
    }
}
