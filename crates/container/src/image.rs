//! The base image, built locally from Debian packages: there is no registry.
//!
//! `airlock/base:<recipe-hash>` is a debootstrap of Debian (minbase) with the
//! recipe's packages installed in a chroot, a non-root `sandbox` user, and
//! `/workspace`; the root filesystem is streamed into the engine as an import.
//! The tag is a hash of the recipe, so the image is rebuilt exactly when the
//! recipe changes and found again otherwise.

use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bollard::query_parameters::CreateImageOptionsBuilder;
use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::build_progress::{
    AptParser, BuildEvent, BuildReporter, BuildStage, DebootstrapParser, LineParser, ProgressUnit, Step,
};
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

/// Receives one line of build progress at a time: one line per stage start
/// and end ([`BuildEvent::plain_line`]), never the tools' own output.
pub type Progress = Arc<dyn Fn(&str) + Send + Sync>;

/// Where [`ensure_base_image`] keeps the build log: the build needs root and
/// its image serves every runtime home on the engine, so the log is the
/// host's, not a home's. One file per recipe, `base-image-<hash>.log`,
/// started afresh by each build of that recipe and kept afterwards.
pub const DEFAULT_BUILD_LOG_DIR: &str = "/var/log/airlock";
/// How many of the log's last lines a failed build's error carries: enough
/// for apt's or debootstrap's reason, short enough for a terminal.
pub const BUILD_LOG_TAIL_LINES: usize = 20;
/// How much of the log's end is read to find those lines, so a failure never
/// reads a large log whole.
const BUILD_LOG_TAIL_BYTES: u64 = 16 * 1024;
/// At most this much of debootstrap's own log (which is inside the staging
/// tree, removed after a failure) is copied into the build log when
/// debootstrap fails.
const DEBOOTSTRAP_LOG_COPY_BYTES: u64 = 1024 * 1024;
/// A tool's output line longer than this is logged and parsed in pieces, so
/// one endless line cannot grow memory.
const MAX_TOOL_LINE_BYTES: u64 = 64 * 1024;
/// Size of each read of the root filesystem's tar stream into the engine.
const IMPORT_CHUNK_BYTES: usize = 256 * 1024;
/// The packages installed in their own stage, after the rest: the data stack.
pub const DATA_STACK_PACKAGES: &[&str] =
    &["python3-numpy", "python3-pandas", "python3-matplotlib", "python3-scipy", "python3-pil"];

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
/// engine does not have it. One line per stage start and end goes to
/// `progress` (nothing when the image is there); the tools' output goes to
/// the build log in [`DEFAULT_BUILD_LOG_DIR`].
pub async fn ensure_base_image(engine: &DockerEngine, recipe: &ImageRecipe, progress: Progress) -> Result<String> {
    let reporter: BuildReporter = Arc::new(move |event: &BuildEvent| {
        if let Some(line) = event.plain_line() {
            progress(&line);
        }
    });
    ensure_base_image_with(engine, recipe, Path::new(DEFAULT_BUILD_LOG_DIR), reporter).await
}

/// The build log of `recipe` in `log_dir`.
pub fn build_log_path(log_dir: &Path, recipe: &ImageRecipe) -> PathBuf {
    log_dir.join(format!("base-image-{}.log", recipe.hash()))
}

/// The stages a build of `recipe` runs, in order.
pub fn build_stages(recipe: &ImageRecipe) -> Vec<BuildStage> {
    let (_, data_stack) = split_data_stack(recipe);
    let mut stages = vec![BuildStage::Debootstrap, BuildStage::Packages];
    if !data_stack.is_empty() {
        stages.push(BuildStage::DataStack);
    }
    stages.extend([BuildStage::Finish, BuildStage::Import]);
    stages
}

/// The recipe's packages apart from the data stack, and its data stack.
fn split_data_stack(recipe: &ImageRecipe) -> (Vec<String>, Vec<String>) {
    recipe.packages.iter().cloned().partition(|package| !DATA_STACK_PACKAGES.contains(&package.as_str()))
}

/// As [`ensure_base_image`], with the build's events sent to `reporter` and
/// its log kept in `log_dir` (at [`build_log_path`]). A stage that fails ends
/// the build with [`Error::ImageBuildStage`], which names the log and carries
/// its last lines. The image is looked up first: when the engine has it,
/// nothing is reported.
pub async fn ensure_base_image_with(
    engine: &DockerEngine,
    recipe: &ImageRecipe,
    log_dir: &Path,
    reporter: BuildReporter,
) -> Result<String> {
    let tag = recipe.tag();
    if image_exists(engine, &tag).await? {
        return Ok(tag);
    }
    if !rustix::process::geteuid().is_root() {
        return Err(Error::ImageBuild { image: tag, reason: "debootstrap and chroot need root".into() });
    }
    let mut build = Build::open(tag.clone(), build_log_path(log_dir, recipe), build_stages(recipe), reporter)?;
    let staging = staging_dir(&recipe.hash());
    let rootfs = staging.join("rootfs");
    let task = {
        let recipe = recipe.clone();
        let rootfs = rootfs.clone();
        tokio::task::spawn_blocking(move || {
            let built = build_rootfs(&mut build, &recipe, &rootfs);
            (build, built)
        })
    };
    let result = match task.await {
        Ok((mut build, Ok(()))) => import_rootfs(engine, &rootfs, recipe, &mut build).await.map(|()| build),
        Ok((_, Err(error))) => Err(error),
        Err(joined) => Err(Error::ImageBuild { image: tag.clone(), reason: format!("the build task ended: {joined}") }),
    };
    // The staging tree is large; it goes whether or not the build worked.
    let _ = fs::remove_dir_all(&staging);
    result?.finished();
    Ok(tag)
}

fn staging_dir(hash: &str) -> PathBuf {
    std::env::temp_dir().join(format!("airlock-image-{hash}-{}", std::process::id()))
}

/// One build under way: its log, its reporter, and the stage it is in. Every
/// stage runs through [`Build::stage`], so a failure anywhere is reported the
/// same way: the stage, the reason, the log's path and its tail.
struct Build {
    image: String,
    log_path: PathBuf,
    log: fs::File,
    stages: Vec<BuildStage>,
    reporter: BuildReporter,
    started: Instant,
}

impl Build {
    /// Starts the log afresh (making its directory) and reports the start.
    fn open(image: String, log_path: PathBuf, stages: Vec<BuildStage>, reporter: BuildReporter) -> Result<Self> {
        if let Some(dir) = log_path.parent() {
            fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        }
        let log = fs::File::create(&log_path).map_err(Error::io(format!("creating {}", log_path.display())))?;
        let mut build = Self { image, log_path, log, stages, reporter, started: Instant::now() };
        build.log_line(&format!("airlock: building {}", build.image));
        (build.reporter)(&BuildEvent::Started {
            image: build.image.clone(),
            log: build.log_path.clone(),
            stages: build.stages.clone(),
        });
        Ok(build)
    }

    /// Appends a line to the log. Best effort: a log that cannot be written
    /// does not stop the build.
    fn log_line(&mut self, line: &str) {
        let _ = writeln!(self.log, "{line}");
    }

    /// Runs `body` as `stage`: reports its start and its end or failure.
    fn stage<T>(
        &mut self,
        stage: BuildStage,
        title: &str,
        body: impl FnOnce(&mut Self) -> std::result::Result<T, String>,
    ) -> Result<T> {
        let started = self.begin(stage, title);
        match body(self) {
            Ok(value) => {
                self.end(stage, started);
                Ok(value)
            }
            Err(reason) => Err(self.fail(stage, started, reason)),
        }
    }

    fn begin(&mut self, stage: BuildStage, title: &str) -> Instant {
        let index = self.stages.iter().position(|known| *known == stage).map_or(0, |at| at + 1);
        let count = self.stages.len();
        self.log_line(&format!("==== [{index}/{count}] {title}"));
        (self.reporter)(&BuildEvent::StageStarted { stage, index, count, title: title.to_string() });
        Instant::now()
    }

    fn end(&mut self, stage: BuildStage, started: Instant) {
        let elapsed = started.elapsed();
        self.log_line(&format!("==== {stage}: done in {:.1}s", elapsed.as_secs_f64()));
        (self.reporter)(&BuildEvent::StageFinished { stage, elapsed });
    }

    /// Reports the stage's failure and makes its error: the reason, the log's
    /// path, and the log's last lines.
    fn fail(&mut self, stage: BuildStage, started: Instant, reason: String) -> Error {
        let elapsed = started.elapsed();
        self.log_line(&format!("==== {stage}: failed after {:.1}s: {reason}", elapsed.as_secs_f64()));
        (self.reporter)(&BuildEvent::StageFailed { stage, elapsed });
        Error::ImageBuildStage {
            image: self.image.clone(),
            stage,
            reason,
            log: self.log_path.clone(),
            tail: read_tail(&self.log_path, BUILD_LOG_TAIL_LINES),
        }
    }

    fn progress(&self, stage: BuildStage, unit: ProgressUnit, step: Step) {
        (self.reporter)(&BuildEvent::StageProgress {
            stage,
            done: step.done,
            total: step.total,
            unit,
            detail: step.detail,
        });
    }

    /// The build is done: reports it with the log's path.
    fn finished(self) {
        (self.reporter)(&BuildEvent::Finished {
            image: self.image.clone(),
            log: self.log_path.clone(),
            elapsed: self.started.elapsed(),
        });
    }

    /// Runs `command` with stdout and stderr, merged in the order written,
    /// going to the log; each line also goes through `parser`, whose progress
    /// is reported for `stage`. Fails when the command cannot start or exits
    /// unsuccessfully.
    fn run(
        &mut self,
        stage: BuildStage,
        mut command: Command,
        parser: &mut dyn LineParser,
    ) -> std::result::Result<(), String> {
        let program = command.get_program().to_string_lossy().into_owned();
        self.log_line(&format!("$ {command:?}"));
        let (reader, writer) = std::io::pipe().map_err(|e| format!("making a pipe for {program}: {e}"))?;
        let error_writer = writer.try_clone().map_err(|e| format!("making a pipe for {program}: {e}"))?;
        command.stdin(Stdio::null()).stdout(writer).stderr(error_writer);
        let mut child = command.spawn().map_err(|e| format!("starting {program}: {e}"))?;
        // The command holds the pipe's write ends; they must close here so
        // that the read below ends when the child (and what it started) does.
        drop(command);
        let mut reader = BufReader::new(reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.by_ref().take(MAX_TOOL_LINE_BYTES).read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {
                    let _ = self.log.write_all(&line);
                    if !line.ends_with(b"\n") {
                        let _ = self.log.write_all(b"\n");
                    }
                    let text = String::from_utf8_lossy(&line);
                    if let Some(step) = parser.line(text.trim_end()) {
                        self.progress(stage, ProgressUnit::Steps, step);
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("reading the output of {program}: {e}"));
                }
            }
        }
        let status = child.wait().map_err(|e| format!("waiting for {program}: {e}"))?;
        if status.success() { Ok(()) } else { Err(format!("{program} failed ({status})")) }
    }

    /// Appends the end of another log (at most `max_bytes`) to the build log.
    fn append_log_of(&mut self, what: &str, path: &Path, max_bytes: u64) {
        let Ok(mut file) = fs::File::open(path) else { return };
        let length = file.metadata().map(|meta| meta.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(length.saturating_sub(max_bytes)));
        self.log_line(&format!("==== {what} ({})", path.display()));
        let _ = std::io::copy(&mut file.take(max_bytes), &mut self.log);
        self.log_line("");
    }
}

/// The last `lines` lines of the file at `path`, reading no more than
/// [`BUILD_LOG_TAIL_BYTES`] of it.
fn read_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = fs::File::open(path) else { return String::new() };
    let length = file.metadata().map(|meta| meta.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(length.saturating_sub(BUILD_LOG_TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = file.take(BUILD_LOG_TAIL_BYTES).read_to_end(&mut bytes);
    last_lines(String::from_utf8_lossy(&bytes).trim_end(), lines)
}

fn build_rootfs(build: &mut Build, recipe: &ImageRecipe, rootfs: &Path) -> Result<()> {
    let (packages, data_stack) = split_data_stack(recipe);
    // Stage one: the minimal system. Its resolver cannot take npm's many
    // virtual packages, so the recipe's packages come in stage two, from apt.
    let title = format!("debootstrap ({}, {})", recipe.variant, recipe.suite);
    build.stage(BuildStage::Debootstrap, &title, |build| {
        install_missing(&["debootstrap"]).map_err(|e| e.to_string())?;
        fs::create_dir_all(rootfs).map_err(|e| format!("creating {}: {e}", rootfs.display()))?;
        let mut command = Command::new("debootstrap");
        command.arg(format!("--variant={}", recipe.variant)).arg(&recipe.suite).arg(rootfs).arg(&recipe.mirror);
        let ran = build.run(BuildStage::Debootstrap, command, &mut DebootstrapParser::default());
        if ran.is_err() {
            // debootstrap keeps its full log inside the tree, which goes with
            // the staging directory: the reason is usually there.
            let own_log = rootfs.join("debootstrap/debootstrap.log");
            build.append_log_of("debootstrap's own log", &own_log, DEBOOTSTRAP_LOG_COPY_BYTES);
        }
        ran
    })?;

    // Stage two: apt inside the chroot; services must not start there.
    let policy = rootfs.join("usr/sbin/policy-rc.d");
    let apt = |packages: &[String]| {
        let mut command = Command::new("chroot");
        command
            .arg(rootfs)
            .args(["apt-get", "install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    let title = format!("apt: installing {} packages", packages.len());
    build.stage(BuildStage::Packages, &title, |build| {
        fs::write(&policy, "#!/bin/sh\nexit 101\n").map_err(|e| format!("writing policy-rc.d: {e}"))?;
        fs::set_permissions(&policy, fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod policy-rc.d: {e}"))?;
        fs::copy("/etc/resolv.conf", rootfs.join("etc/resolv.conf"))
            .map_err(|e| format!("copying resolv.conf: {e}"))?;
        build.run(BuildStage::Packages, apt(&packages), &mut AptParser::default())
    })?;
    if !data_stack.is_empty() {
        let title = format!("data stack: {} packages", data_stack.len());
        build.stage(BuildStage::DataStack, &title, |build| {
            build.run(BuildStage::DataStack, apt(&data_stack), &mut AptParser::default())
        })?;
    }

    build.stage(BuildStage::Finish, BuildStage::Finish.name(), |_| {
        add_sandbox_user(rootfs).map_err(|e| e.to_string())?;
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
        fs::remove_file(&policy).map_err(|e| format!("removing policy-rc.d: {e}"))?;
        fs::write(rootfs.join("etc/resolv.conf"), "").map_err(|e| format!("emptying resolv.conf: {e}"))
    })
}

/// The unprivileged `sandbox` user (uid/gid 1000), its home, and `/workspace`.
fn add_sandbox_user(rootfs: &Path) -> Result<()> {
    let append = |file: &str, line: String| -> Result<()> {
        let path = rootfs.join(file);
        let mut handle = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(Error::io(format!("opening {}", path.display())))?;
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

/// Streams the root filesystem into the engine as `docker import` would, as
/// the build's last stage; the bytes sent are its progress.
async fn import_rootfs(engine: &DockerEngine, rootfs: &Path, recipe: &ImageRecipe, build: &mut Build) -> Result<()> {
    let stage = BuildStage::Import;
    let started = build.begin(stage, stage.name());
    match import_stream(engine, rootfs, recipe, build).await {
        Ok(()) => {
            build.end(stage, started);
            Ok(())
        }
        Err(reason) => Err(build.fail(stage, started, reason)),
    }
}

async fn import_stream(
    engine: &DockerEngine,
    rootfs: &Path,
    recipe: &ImageRecipe,
    build: &mut Build,
) -> std::result::Result<(), String> {
    let tag = recipe.tag();
    let tar = which("tar").ok_or("tar is not installed")?;
    let mut child = tokio::process::Command::new(tar)
        .arg("-C")
        .arg(rootfs)
        .args(["--numeric-owner", "-c", "."])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting tar: {e}"))?;
    let stdout = child.stdout.take().ok_or("tar has no stdout")?;
    let sent = Arc::new(AtomicU64::new(0));
    let reporter = build.reporter.clone();
    let body = futures_util::stream::unfold(stdout, move |mut out| {
        let sent = sent.clone();
        let reporter = reporter.clone();
        async move {
            let mut buffer = vec![0u8; IMPORT_CHUNK_BYTES];
            match out.read(&mut buffer).await {
                Ok(0) => None,
                Ok(n) => {
                    buffer.truncate(n);
                    let bytes = u64::try_from(n).unwrap_or(u64::MAX);
                    let done = sent.fetch_add(bytes, Ordering::Relaxed).saturating_add(bytes);
                    reporter(&BuildEvent::StageProgress {
                        stage: BuildStage::Import,
                        done,
                        total: None,
                        unit: ProgressUnit::Bytes,
                        detail: "sending the root filesystem".into(),
                    });
                    Some((Ok::<Bytes, std::io::Error>(Bytes::from(buffer)), out))
                }
                Err(e) => Some((Err(e), out)),
            }
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
    let mut stream = engine.docker().create_image(Some(options), Some(bollard::body_try_stream(body)), None).boxed();
    while let Some(message) = stream.next().await {
        let message = message.map_err(|e| format!("docker import: {e}"))?;
        if let Some(status) = message.status {
            build.log_line(&format!("import: {status}"));
        }
    }
    let output = child.wait_with_output().await.map_err(|e| format!("waiting for tar: {e}"))?;
    let tar_errors = String::from_utf8_lossy(&output.stderr);
    if !tar_errors.trim().is_empty() {
        build.log_line(tar_errors.trim_end());
    }
    if !output.status.success() {
        return Err(format!("tar failed ({})", output.status));
    }
    match image_exists(engine, &tag).await {
        Ok(true) => Ok(()),
        Ok(false) => Err("the engine accepted the import but has no such image".into()),
        Err(e) => Err(e.to_string()),
    }
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

    fn recording_build(dir: &Path, stages: Vec<BuildStage>) -> (Build, Arc<std::sync::Mutex<Vec<BuildEvent>>>) {
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = events.clone();
        let reporter: BuildReporter = Arc::new(move |event: &BuildEvent| seen.lock().unwrap().push(event.clone()));
        let build =
            Build::open("airlock/base:test".into(), dir.join("logs/base-image-test.log"), stages, reporter).unwrap();
        (build, events)
    }

    fn shell(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[test]
    fn a_failing_stage_names_the_log_and_carries_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let stages = vec![BuildStage::Debootstrap, BuildStage::Packages, BuildStage::Import];
        let (mut build, events) = recording_build(dir.path(), stages);
        let log = dir.path().join("logs/base-image-test.log");

        // A stage that works: its lines go to the log and become progress.
        let fake_debootstrap = "echo 'I: Retrieving libc6 2.36-9'; echo 'I: Validating libc6 2.36-9'; \
                                echo 'I: Unpacking libc6:amd64...'; echo 'I: Configuring libc6:amd64...'";
        build
            .stage(BuildStage::Debootstrap, "fake debootstrap", |build| {
                build.run(BuildStage::Debootstrap, shell(fake_debootstrap), &mut DebootstrapParser::default())
            })
            .unwrap();
        // A stage that fails after much output, its reason last and on stderr.
        let fake_apt = "for i in $(seq 1 100); do echo \"apt line $i\"; done; \
                        echo 'E: Unable to locate package no-such-package' >&2; exit 100";
        let error = build
            .stage(BuildStage::Packages, "fake apt", |build| {
                build.run(BuildStage::Packages, shell(fake_apt), &mut AptParser::default())
            })
            .unwrap_err();

        let message = error.to_string();
        assert!(message.contains(&log.display().to_string()), "the error names the log: {message}");
        assert!(message.contains("E: Unable to locate package no-such-package"), "{message}");
        let Error::ImageBuildStage { image, stage, reason, log: named, tail } = error else {
            panic!("not a stage error: {message}");
        };
        assert_eq!((image.as_str(), stage, named), ("airlock/base:test", BuildStage::Packages, log.clone()));
        assert!(reason.contains("sh failed") && reason.contains("100"), "{reason}");
        assert!(tail.contains("apt line 100\nE: Unable to locate package no-such-package"), "stderr in order: {tail}");
        assert!(!tail.contains("apt line 50\n"), "only the tail: {tail}");
        assert!(tail.lines().count() <= BUILD_LOG_TAIL_LINES, "{tail}");

        // The log keeps everything, from both stages.
        let full = fs::read_to_string(&log).unwrap();
        for kept in ["I: Retrieving libc6 2.36-9", "apt line 1\n", "apt line 50\n", "no-such-package", "fake apt"] {
            assert!(full.contains(kept), "{kept:?} missing from the log:\n{full}");
        }

        // The reporter saw stages and counts, never the tools' raw lines.
        let events = events.lock().unwrap();
        assert!(matches!(&events[0], BuildEvent::Started { log: started_log, stages, .. }
            if *started_log == log && stages.len() == 3));
        assert!(matches!(
            &events[1],
            BuildEvent::StageStarted { stage: BuildStage::Debootstrap, index: 1, count: 3, .. }
        ));
        let progress: Vec<u64> = events
            .iter()
            .filter_map(|event| match event {
                BuildEvent::StageProgress { stage: BuildStage::Debootstrap, done, .. } => Some(*done),
                _ => None,
            })
            .collect();
        assert_eq!(progress, [1, 1, 2, 3]);
        assert!(matches!(events[events.len() - 3], BuildEvent::StageFinished { stage: BuildStage::Debootstrap, .. }));
        assert!(matches!(
            &events[events.len() - 2],
            BuildEvent::StageStarted { stage: BuildStage::Packages, index: 2, .. }
        ));
        assert!(matches!(events[events.len() - 1], BuildEvent::StageFailed { stage: BuildStage::Packages, .. }));
        assert!(
            !events
                .iter()
                .any(|event| matches!(event, BuildEvent::StageProgress { detail, .. } if detail.contains("apt line")))
        );
    }

    #[test]
    fn a_command_that_cannot_start_fails_its_stage_with_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut build, _) = recording_build(dir.path(), vec![BuildStage::Debootstrap]);
        let error = build
            .stage(BuildStage::Debootstrap, "missing tool", |build| {
                let command = Command::new("/nonexistent/airlock-no-such-tool");
                build.run(BuildStage::Debootstrap, command, &mut DebootstrapParser::default())
            })
            .unwrap_err();
        let Error::ImageBuildStage { reason, tail, .. } = error else { panic!("not a stage error") };
        assert!(reason.contains("starting /nonexistent/airlock-no-such-tool"), "{reason}");
        assert!(tail.contains("missing tool"), "the log's tail shows the stage: {tail}");
    }

    #[test]
    fn the_data_stack_is_its_own_stage_only_when_the_recipe_has_it() {
        let full = ImageRecipe::default();
        assert_eq!(
            build_stages(&full),
            [
                BuildStage::Debootstrap,
                BuildStage::Packages,
                BuildStage::DataStack,
                BuildStage::Finish,
                BuildStage::Import
            ]
        );
        let (rest, data) = split_data_stack(&full);
        assert!(data.contains(&"python3-pandas".to_string()) && !rest.contains(&"python3-pandas".to_string()));
        assert!(rest.contains(&"git".to_string()));
        let mut plain = full.clone();
        plain.packages.retain(|package| !DATA_STACK_PACKAGES.contains(&package.as_str()));
        assert!(!build_stages(&plain).contains(&BuildStage::DataStack));
        assert_eq!(
            build_log_path(Path::new("/var/log/airlock"), &full).file_name().unwrap().to_string_lossy(),
            format!("base-image-{}.log", full.hash())
        );
    }
}
