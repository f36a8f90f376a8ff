//! The Docker engine: found, or installed and started by Airlock itself.
//!
//! [`DockerEngine::connect_or_setup`] makes the engine available on a fresh
//! Debian machine as root: it installs `docker.io` and `runsc` when they are
//! missing, registers `runsc` as a runtime, starts `dockerd` with no default
//! bridge and no iptables rules (sandboxes never get a network interface) and
//! with user-namespace remapping (container uids are not host uids), and
//! waits until it answers. When everything is there it only pings. Everything
//! after set-up talks to the engine through bollard.
//!
//! Whether containers' uids are remapped is the daemon's decision
//! (`--userns-remap`); [`DockerEngine::user_mapping`] reports what it does and
//! [`DockerEngine::host_owner`] turns a container uid/gid into the host's.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bollard::{API_DEFAULT_VERSION, Docker};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Where a root-run engine listens on Debian.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Environment variable naming another engine socket for [`EngineOptions::default`]
/// (to run the suites or benches against a second daemon).
pub const DOCKER_SOCKET_ENV: &str = "AIRLOCK_DOCKER_SOCKET";
/// The `userns-remap` value Airlock starts `dockerd` with: Docker makes the
/// `dockremap` user and gives it a subordinate range in `/etc/subuid` and
/// `/etc/subgid`; every container's uid 0 is the range's first host uid.
pub const USERNS_REMAP: &str = "default";
/// The size of a remapped range when `/etc/subuid` does not say (the size
/// Docker gives `dockremap`): every uid a container can use maps into it.
pub const DEFAULT_REMAP_RANGE: u32 = 65_536;
/// How long set-up waits for a freshly started `dockerd` to answer.
pub const ENGINE_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of each request to the engine (bollard's per-request timeout).
pub const ENGINE_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The flags `dockerd` gets when Airlock starts it: no default bridge, no
/// iptables rules (sandboxes run with `--network none`, so nothing is lost),
/// and containers' uids remapped away from the host's ([`USERNS_REMAP`]),
/// so that root or uid 1000 in a sandbox is nobody on the host.
pub const DOCKERD_FLAGS: &[&str] =
    &["--bridge=none", "--iptables=false", "--ip6tables=false", "--userns-remap=default"];
/// What to do about an engine that runs without remapping (it is never
/// restarted by Airlock: that would stop every container it runs).
pub const NO_REMAP_ADVICE: &str = "the docker engine does not remap user namespaces: uid 0 and uid 1000 in a \
     sandbox are uid 0 and uid 1000 on the host. When no containers run, restart dockerd with \
     --userns-remap=default (or \"userns-remap\": \"default\" in /etc/docker/daemon.json), then run \
     `airlock setup` again: a remapping engine keeps its own images, so the base image is built once more";
/// Arguments runsc is registered with: gVisor's own network stack off, since
/// sandboxes have no network; the sentry then has only loopback. And
/// `--host-uds=open`: a sandbox may connect to (never create) a host Unix
/// socket bind-mounted into it, which is how it reaches the egress proxy
/// (gVisor refuses host sockets by default). Only sockets mounted into the
/// container are visible to it, and Airlock mounts only the proxy's.
pub const RUNSC_RUNTIME_ARGS: &[&str] = &["--network=none", "--host-uds=open"];

/// Which OCI runtime a container runs under.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerRuntime {
    /// Linux namespaces and cgroups (Docker's default).
    #[default]
    Runc,
    /// gVisor: a user-space kernel between the sandbox and the host kernel.
    Runsc,
}

impl ContainerRuntime {
    pub fn name(self) -> &'static str {
        match self {
            ContainerRuntime::Runc => "runc",
            ContainerRuntime::Runsc => "runsc",
        }
    }
}

impl std::fmt::Display for ContainerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ContainerRuntime {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "runc" => Ok(ContainerRuntime::Runc),
            "runsc" | "gvisor" => Ok(ContainerRuntime::Runsc),
            other => Err(Error::Invalid { what: "container runtime", reason: format!("{other:?}: use runc or runsc") }),
        }
    }
}

/// How to find or set up the engine. Every field has a default (see `Default`).
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The engine's Unix socket: `$AIRLOCK_DOCKER_SOCKET` when set, else
    /// [`DEFAULT_DOCKER_SOCKET`].
    pub socket: PathBuf,
    /// Install `docker.io`/`runsc` with apt and start `dockerd` when the engine
    /// does not answer. Off: only connect.
    pub set_up: bool,
    /// Also install and register `runsc` (gVisor).
    pub with_runsc: bool,
    /// Where a `dockerd` started by Airlock writes its log.
    pub daemon_log: PathBuf,
    /// Docker's daemon configuration, where `runsc` is registered.
    pub daemon_config: PathBuf,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            set_up: true,
            with_runsc: true,
            daemon_log: PathBuf::from("/var/log/airlock-dockerd.log"),
            daemon_config: PathBuf::from("/etc/docker/daemon.json"),
        }
    }
}

/// `$AIRLOCK_DOCKER_SOCKET` when set and not empty, else [`DEFAULT_DOCKER_SOCKET`].
fn default_socket() -> PathBuf {
    std::env::var_os(DOCKER_SOCKET_ENV)
        .filter(|value| !value.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_DOCKER_SOCKET), PathBuf::from)
}

/// How the engine maps container uids and gids to host ones when it remaps
/// user namespaces (`dockerd --userns-remap`): container id `n` is host id
/// `first + n`, for `n` below the range's size. One range for every container
/// of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserMapping {
    /// The host uid of container uid 0.
    pub first_uid: u32,
    /// How many uids are mapped.
    pub uid_count: u32,
    /// The host gid of container gid 0.
    pub first_gid: u32,
    /// How many gids are mapped.
    pub gid_count: u32,
}

impl UserMapping {
    /// The host uid and gid of a container's `uid` and `gid`; `None` when
    /// either is outside the mapped range (the kernel shows such ids as the
    /// overflow id, nobody, and nothing can be given to them).
    pub fn host_ids(&self, uid: u32, gid: u32) -> Option<(u32, u32)> {
        let host_uid = (uid < self.uid_count).then(|| self.first_uid.checked_add(uid)).flatten()?;
        let host_gid = (gid < self.gid_count).then(|| self.first_gid.checked_add(gid)).flatten()?;
        Some((host_uid, host_gid))
    }
}

/// A connected engine: the bollard client, at the API version both sides speak.
#[derive(Debug, Clone)]
pub struct DockerEngine {
    docker: Docker,
    runtimes: BTreeSet<String>,
    /// The storage driver can cap a container's writable layer (`--storage-opt size=`).
    writable_layer_quota: bool,
    /// The daemon's uid/gid remapping; `None` when container ids are host ids.
    user_mapping: Option<UserMapping>,
    /// The arguments the daemon runs runsc with, as it reports them (`None`: no runsc).
    runsc_args: Option<Vec<String>>,
}

impl DockerEngine {
    /// Connects to a running engine; never installs or starts anything.
    pub async fn connect(socket: &Path) -> Result<Self> {
        let docker = client(socket)?;
        let docker = docker.negotiate_version().await.map_err(Error::docker("version"))?;
        let info = docker.info().await.map_err(Error::docker("info"))?;
        let registered = info.runtimes.clone().unwrap_or_default();
        let runsc_args =
            registered.get(ContainerRuntime::Runsc.name()).map(|runsc| runsc.runtime_args.clone().unwrap_or_default());
        let runtimes = registered.into_keys().collect();
        let writable_layer_quota = storage_size_supported(&info);
        let user_mapping = user_mapping_of(&info)?;
        Ok(Self { docker, runtimes, writable_layer_quota, user_mapping, runsc_args })
    }

    /// Connects, setting the engine up first where `options` allow it. A no-op
    /// beyond a ping when the engine answers and every wanted runtime is registered.
    pub async fn connect_or_setup(options: &EngineOptions) -> Result<Self> {
        if let Ok(engine) = Self::connect(&options.socket).await {
            if options.set_up && engine.user_mapping.is_none() {
                // Never restarted here: that would stop every container it runs.
                tracing::warn!("{NO_REMAP_ADVICE}");
            }
            if !options.with_runsc || !options.set_up {
                return Ok(engine);
            }
            if engine.has_runtime(ContainerRuntime::Runsc) {
                if engine.runsc_args_are_current() {
                    return Ok(engine);
                }
                // Registered, perhaps by an older Airlock, with other arguments
                // (without --host-uds: no egress under gVisor). Brought up to
                // date in place and reloaded (SIGHUP: dockerd re-reads its
                // runtimes; running containers keep theirs). Never restarted.
                if options.socket != Path::new(DEFAULT_DOCKER_SOCKET) {
                    tracing::warn!(
                        "the engine at {} runs runsc with {:?}, not {:?}; update that daemon's configuration",
                        options.socket.display(),
                        engine.runsc_args,
                        RUNSC_RUNTIME_ARGS
                    );
                    return Ok(engine);
                }
                check_can_set_up()?;
                if !runsc_registered_as_wanted(&options.daemon_config) {
                    register_runsc(&options.daemon_config)?;
                }
                reload_dockerd()?;
                return wait_for_runsc_args(&options.socket).await;
            }
            // Running, but without runsc: install and register it, then ask dockerd to reload.
            if options.socket != Path::new(DEFAULT_DOCKER_SOCKET) {
                return Err(Error::Setup(format!(
                    "the engine at {} has no runsc; register it in that daemon's configuration and reload it",
                    options.socket.display()
                )));
            }
            check_can_set_up()?;
            install_missing(&["runsc"])?;
            register_runsc(&options.daemon_config)?;
            reload_dockerd()?;
            return wait_for_runtime(&options.socket, ContainerRuntime::Runsc).await;
        }
        // Only the default engine is started here: a daemon on another socket is its owner's.
        if !options.set_up || options.socket != Path::new(DEFAULT_DOCKER_SOCKET) {
            return Err(Error::EngineUnavailable(format!(
                "nothing answers on {}; start dockerd with {}",
                options.socket.display(),
                DOCKERD_FLAGS.join(" ")
            )));
        }
        check_can_set_up()?;
        let mut packages = vec!["docker.io"];
        if options.with_runsc {
            packages.push("runsc");
        }
        install_missing(&packages)?;
        if options.with_runsc {
            register_runsc(&options.daemon_config)?;
        }
        start_dockerd(&options.daemon_log, &options.daemon_config)?;
        let started = Instant::now();
        loop {
            match Self::connect(&options.socket).await {
                Ok(engine) => return Ok(engine),
                Err(error) if started.elapsed() > ENGINE_START_TIMEOUT => {
                    return Err(Error::Setup(format!(
                        "dockerd did not answer within {}s ({error}); its log is {}:\n{}",
                        ENGINE_START_TIMEOUT.as_secs(),
                        options.daemon_log.display(),
                        tail(&options.daemon_log, 15)
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Whether the engine runs runsc with exactly [`RUNSC_RUNTIME_ARGS`].
    fn runsc_args_are_current(&self) -> bool {
        self.runsc_args
            .as_deref()
            .is_some_and(|args| args.iter().map(String::as_str).eq(RUNSC_RUNTIME_ARGS.iter().copied()))
    }

    /// Whether containers under runsc can connect to a host Unix socket
    /// mounted into them (runsc runs with `--host-uds=open` or `=all`): how
    /// they reach the egress proxy. Always true of runc.
    pub fn reaches_host_sockets(&self, runtime: ContainerRuntime) -> bool {
        match runtime {
            ContainerRuntime::Runc => true,
            ContainerRuntime::Runsc => self.runsc_args.as_deref().is_some_and(runsc_args_allow_host_sockets),
        }
    }

    /// Whether the engine can start containers under `runtime`.
    pub fn has_runtime(&self, runtime: ContainerRuntime) -> bool {
        runtime == ContainerRuntime::Runc || self.runtimes.contains(runtime.name())
    }

    /// Whether containers' writable layers can get a size limit: overlay2 on
    /// XFS (mounted with project quotas, which Docker checks when it starts), or
    /// the btrfs or zfs driver. With overlay2 on ext4, as a default install has,
    /// they cannot, and the limit is left to the container's memory and pids caps.
    pub fn supports_writable_layer_quota(&self) -> bool {
        self.writable_layer_quota
    }

    /// The daemon's uid/gid remapping (`dockerd --userns-remap`), or `None`
    /// when container uids and gids are the host's.
    pub fn user_mapping(&self) -> Option<UserMapping> {
        self.user_mapping
    }

    /// The host uid and gid that a container's `uid:gid` is on the host: the
    /// same ids without remapping; an error for ids outside a remapped range.
    /// Files the host gives a sandbox's user belong to these.
    pub fn host_owner(&self, uid: u32, gid: u32) -> Result<airlock_core::Owner> {
        let Some(mapping) = self.user_mapping else {
            return Ok(airlock_core::Owner { uid, gid });
        };
        let (uid_on_host, gid_on_host) = mapping.host_ids(uid, gid).ok_or_else(|| Error::Invalid {
            what: "sandbox user",
            reason: format!(
                "{uid}:{gid} is outside the engine's remapped range ({} uids, {} gids)",
                mapping.uid_count, mapping.gid_count
            ),
        })?;
        Ok(airlock_core::Owner { uid: uid_on_host, gid: gid_on_host })
    }

    /// Lets the engine's remapped root pass through `dir` (search only, never
    /// list or read) by giving `dir` the remapped root's group with `g+x`;
    /// nothing without remapping or when it can pass already. runsc needs it:
    /// its gofer opens bind-mount sources as the remapped root, so every
    /// directory above a workspace must let that uid through, while Airlock
    /// keeps its home closed to other host users (mode 0700). A directory whose
    /// group already has permissions is not changed (its group would lose them):
    /// that is an error naming it.
    pub fn let_remapped_root_pass(&self, dir: &Path) -> Result<()> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let Some(mapping) = self.user_mapping else {
            return Ok(());
        };
        let metadata = fs::metadata(dir).map_err(Error::io(format!("reading {}", dir.display())))?;
        if remapped_root_can_pass(&metadata, mapping) {
            return Ok(());
        }
        if metadata.mode() & 0o070 != 0 && metadata.gid() != mapping.first_gid {
            return Err(Error::Workspace {
                path: dir.to_path_buf(),
                reason: format!(
                    "the engine's remapped root (host uid {}) cannot pass it, and its group {} has permissions \
                     that giving it group {} would take away; let the remapped root through yourself",
                    mapping.first_uid,
                    metadata.gid(),
                    mapping.first_gid
                ),
            });
        }
        std::os::unix::fs::chown(dir, None, Some(mapping.first_gid))
            .map_err(Error::io(format!("giving {} the remapped root's group", dir.display())))?;
        let mode = (metadata.mode() & 0o7777) | 0o010;
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .map_err(Error::io(format!("letting the remapped root pass {}", dir.display())))
    }

    /// Checks that the engine's remapped root can reach `path` (every
    /// directory from `/` down to it lets it pass); always true without
    /// remapping. The error names the first directory that stops it.
    pub fn check_remapped_root_can_reach(&self, path: &Path) -> Result<()> {
        let Some(mapping) = self.user_mapping else {
            return Ok(());
        };
        for dir in path.ancestors().collect::<Vec<_>>().into_iter().rev() {
            let metadata = fs::metadata(dir).map_err(Error::io(format!("reading {}", dir.display())))?;
            if !remapped_root_can_pass(&metadata, mapping) {
                return Err(Error::Workspace {
                    path: path.to_path_buf(),
                    reason: format!(
                        "the engine remaps uids and {} is closed to its remapped root (host uid {}, gid {}), \
                         which runsc opens the workspace as: give that directory group {} and g+x \
                         (DockerEngine::let_remapped_root_pass), or use a workspace it can reach",
                        dir.display(),
                        mapping.first_uid,
                        mapping.first_gid,
                        mapping.first_gid
                    ),
                });
            }
        }
        Ok(())
    }

    /// Refuses a runtime the engine does not have, with an error naming it.
    pub fn require_runtime(&self, runtime: ContainerRuntime) -> Result<()> {
        if self.has_runtime(runtime) { Ok(()) } else { Err(Error::RuntimeUnavailable(runtime.name().into())) }
    }
}

/// The remapping a daemon applies, from `docker info`: its security options
/// name `userns` when it remaps, and its root directory then ends in
/// `<first uid>.<first gid>` (Docker keeps a remapping daemon's images and
/// containers apart there). The ranges' sizes come from `/etc/subuid` and
/// `/etc/subgid`, the entries that start at those ids.
fn user_mapping_of(info: &bollard::models::SystemInfo) -> Result<Option<UserMapping>> {
    let remaps =
        info.security_options.iter().flatten().any(|option| option.split(',').any(|part| part == "name=userns"));
    if !remaps {
        return Ok(None);
    }
    let root = info.docker_root_dir.as_deref().unwrap_or_default();
    let unreadable = || {
        Error::EngineUnavailable(format!(
            "the engine remaps user namespaces, but its root {root:?} does not end in <uid>.<gid>"
        ))
    };
    let (first_uid, first_gid) = Path::new(root)
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.split_once('.'))
        .and_then(|(uid, gid)| Some((uid.parse::<u32>().ok()?, gid.parse::<u32>().ok()?)))
        .ok_or_else(unreadable)?;
    let uid_count = subordinate_range_size(Path::new("/etc/subuid"), first_uid);
    let gid_count = subordinate_range_size(Path::new("/etc/subgid"), first_gid);
    Ok(Some(UserMapping { first_uid, uid_count, first_gid, gid_count }))
}

/// Whether the remapped root (container uid and gid 0) may search `metadata`'s
/// directory: as its owner, its group, or anyone (ACLs are not read).
fn remapped_root_can_pass(metadata: &fs::Metadata, mapping: UserMapping) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mode = metadata.mode();
    if metadata.uid() == mapping.first_uid {
        mode & 0o100 != 0
    } else if metadata.gid() == mapping.first_gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// The size of the range starting at `first` in a `/etc/subuid`-style file
/// (`name:first:count` lines), or [`DEFAULT_REMAP_RANGE`] when none starts there.
fn subordinate_range_size(file: &Path, first: u32) -> u32 {
    let text = fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.trim().split(':').skip(1);
            Some((fields.next()?.parse::<u32>().ok()?, fields.next()?.parse::<u32>().ok()?))
        })
        .find_map(|(start, count)| (start == first).then_some(count))
        .unwrap_or(DEFAULT_REMAP_RANGE)
}

/// Reads the storage driver (and for overlay2, its backing filesystem) from `docker info`.
fn storage_size_supported(info: &bollard::models::SystemInfo) -> bool {
    let backing = info.driver_status.iter().flatten().find_map(|pair| match pair.as_slice() {
        [key, value] if key == "Backing Filesystem" => Some(value.as_str()),
        _ => None,
    });
    match info.driver.as_deref() {
        Some("overlay2") => backing == Some("xfs"),
        Some("btrfs" | "zfs") => true,
        _ => false,
    }
}

fn client(socket: &Path) -> Result<Docker> {
    let path = socket.to_str().ok_or_else(|| Error::Invalid {
        what: "docker socket path",
        reason: format!("{} is not UTF-8", socket.display()),
    })?;
    Docker::connect_with_unix(path, ENGINE_REQUEST_TIMEOUT.as_secs(), API_DEFAULT_VERSION)
        .map_err(|e| Error::EngineUnavailable(format!("{}: {e}", socket.display())))
}

/// Set-up installs packages and starts a daemon: it needs root on Debian.
fn check_can_set_up() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        return Err(Error::EngineUnavailable(
            "setting it up needs root (to install docker.io and runsc and start dockerd); \
             run `airlock setup` as root, or start dockerd yourself"
                .into(),
        ));
    }
    if !Path::new("/etc/debian_version").exists() || which("apt-get").is_none() {
        return Err(Error::EngineUnavailable(format!(
            "this is not Debian (no /etc/debian_version or apt-get); install Docker Engine and runsc yourself \
             and start dockerd with {}",
            DOCKERD_FLAGS.join(" ")
        )));
    }
    Ok(())
}

/// The binary each package provides, to tell whether it is installed.
fn provided_binary(package: &str) -> &str {
    match package {
        "docker.io" => "dockerd",
        other => other,
    }
}

/// Installs the packages whose binaries are missing; nothing when all are there.
pub(crate) fn install_missing(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| which(provided_binary(p)).is_none()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let install = |update_first: bool| -> Result<std::process::Output> {
        if update_first {
            run_quiet(Command::new("apt-get").args(["update", "-q"]))?;
        }
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .map_err(Error::io("running apt-get"))
    };
    let mut output = install(false)?;
    if !output.status.success() {
        // A fresh machine may have no package lists yet.
        output = install(true)?;
    }
    if !output.status.success() {
        return Err(Error::Setup(format!(
            "apt-get install {} failed: {}",
            missing.join(" "),
            last_lines(&String::from_utf8_lossy(&output.stderr), 10)
        )));
    }
    Ok(())
}

/// Whether Docker's daemon configuration registers runsc exactly as
/// [`register_runsc`] would (same path, same [`RUNSC_RUNTIME_ARGS`]).
fn runsc_registered_as_wanted(config_path: &Path) -> bool {
    let Some(runsc) = which("runsc") else { return false };
    let Some(config) = fs::read_to_string(config_path).ok().and_then(|text| serde_json::from_str::<Value>(&text).ok())
    else {
        return false;
    };
    config.get("runtimes").and_then(|runtimes| runtimes.get("runsc")) == Some(&wanted_runsc_entry(&runsc))
}

fn wanted_runsc_entry(runsc: &Path) -> Value {
    serde_json::json!({ "path": runsc, "runtimeArgs": RUNSC_RUNTIME_ARGS })
}

/// Adds runsc to the `runtimes` of Docker's daemon configuration, or brings
/// its entry up to date, keeping everything else in it. Nothing is written
/// when it is already there as wanted; returns whether the file changed.
fn register_runsc(config_path: &Path) -> Result<bool> {
    let runsc = which("runsc").ok_or_else(|| Error::Setup("runsc is not installed".into()))?;
    let mut config: Map<String, Value> = match fs::read_to_string(config_path) {
        Ok(text) if !text.trim().is_empty() => serde_json::from_str(&text).map_err(|e| {
            Error::Setup(format!("{} is not a JSON object ({e}); fix or remove it", config_path.display()))
        })?,
        Ok(_) => Map::new(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Map::new(),
        Err(e) => return Err(Error::io(format!("reading {}", config_path.display()))(e)),
    };
    let wanted = wanted_runsc_entry(&runsc);
    let runtimes = config.entry("runtimes").or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(runtimes) = runtimes else {
        return Err(Error::Setup(format!("`runtimes` in {} is not an object", config_path.display())));
    };
    if runtimes.get("runsc") == Some(&wanted) {
        return Ok(false);
    }
    runtimes.insert("runsc".into(), wanted);
    if let Some(parent) = config_path.parent() {
        fs::create_dir_all(parent).map_err(Error::io(format!("creating {}", parent.display())))?;
    }
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Setup(e.to_string()))?;
    fs::write(config_path, text).map_err(Error::io(format!("writing {}", config_path.display())))?;
    Ok(true)
}

/// Starts `dockerd` in its own session so that it outlives this process. A
/// `userns-remap` already in the daemon's configuration stands (dockerd
/// refuses a setting given both as a flag and in the file).
fn start_dockerd(log: &Path, config_path: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let dockerd = which("dockerd").ok_or_else(|| Error::Setup("dockerd is not installed".into()))?;
    if let Some(parent) = log.parent() {
        fs::create_dir_all(parent).map_err(Error::io(format!("creating {}", parent.display())))?;
    }
    let log_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(Error::io(format!("opening {}", log.display())))?;
    let err_file = log_file.try_clone().map_err(Error::io("duplicating the log handle"))?;
    let configured: Option<Map<String, Value>> =
        fs::read_to_string(config_path).ok().and_then(|text| serde_json::from_str(&text).ok());
    let remap_configured = configured.is_some_and(|config| config.contains_key("userns-remap"));
    let flags = DOCKERD_FLAGS.iter().filter(|flag| !(remap_configured && flag.starts_with("--userns-remap")));
    Command::new(dockerd)
        .args(flags)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(err_file)
        .process_group(0)
        .spawn()
        .map_err(Error::io("starting dockerd"))?;
    Ok(())
}

/// dockerd re-reads its runtimes on SIGHUP.
fn reload_dockerd() -> Result<()> {
    let pid_text = fs::read_to_string("/var/run/docker.pid")
        .map_err(|_| Error::Setup("dockerd runs but /var/run/docker.pid is missing; restart it to add runsc".into()))?;
    let pid = pid_text
        .trim()
        .parse::<i32>()
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| Error::Setup(format!("/var/run/docker.pid holds {pid_text:?}")))?;
    // A stale pid file may name a pid since reused by another process, which
    // a SIGHUP would end: signal only a process that is dockerd.
    let command = fs::read_to_string(format!("/proc/{}/comm", pid.as_raw_nonzero())).unwrap_or_default();
    if command.trim() != "dockerd" {
        return Err(Error::Setup(format!(
            "/var/run/docker.pid names pid {}, which is not dockerd ({:?}); restart dockerd to add runsc",
            pid.as_raw_nonzero(),
            command.trim()
        )));
    }
    rustix::process::kill_process(pid, rustix::process::Signal::HUP)
        .map_err(|e| Error::Setup(format!("signalling dockerd to reload: {e}")))
}

/// Whether runsc arguments let a sandbox connect to host Unix sockets
/// (`--host-uds=open` or `=all`, with one dash or two; a later one wins).
fn runsc_args_allow_host_sockets(args: &[String]) -> bool {
    args.iter()
        .filter_map(|arg| match arg.trim_start_matches('-').split_once('=') {
            Some(("host-uds", value)) => Some(matches!(value, "open" | "all")),
            _ => None,
        })
        .next_back()
        .unwrap_or(false)
}

/// Waits until the engine at `socket` runs runsc with [`RUNSC_RUNTIME_ARGS`] (after a reload).
async fn wait_for_runsc_args(socket: &Path) -> Result<DockerEngine> {
    let started = Instant::now();
    loop {
        let engine = DockerEngine::connect(socket).await?;
        if engine.runsc_args_are_current() {
            return Ok(engine);
        }
        if started.elapsed() > ENGINE_START_TIMEOUT {
            return Err(Error::Setup(format!(
                "dockerd did not take runsc's new arguments {RUNSC_RUNTIME_ARGS:?} within {}s (it reports {:?})",
                ENGINE_START_TIMEOUT.as_secs(),
                engine.runsc_args
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_runtime(socket: &Path, runtime: ContainerRuntime) -> Result<DockerEngine> {
    let started = Instant::now();
    loop {
        let engine = DockerEngine::connect(socket).await?;
        if engine.has_runtime(runtime) {
            return Ok(engine);
        }
        if started.elapsed() > ENGINE_START_TIMEOUT {
            return Err(Error::RuntimeUnavailable(runtime.name().into()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn run_quiet(command: &mut Command) -> Result<()> {
    let output = command.stdin(Stdio::null()).output().map_err(Error::io(format!("running {command:?}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Setup(format!("{command:?} failed: {}", last_lines(&String::from_utf8_lossy(&output.stderr), 10))))
    }
}

/// Finds `program` on `PATH` or in the sbin directories root's PATH has.
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn tail(path: &Path, lines: usize) -> String {
    fs::read_to_string(path).map(|text| last_lines(&text, lines)).unwrap_or_default()
}

pub(crate) fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runsc_is_added_beside_existing_settings_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.json");
        fs::write(&path, r#"{"log-level":"warn","runtimes":{"other":{"path":"/bin/other"}}}"#).unwrap();
        assert!(which("runsc").is_some(), "runsc is not installed: run `airlock setup` (scripts/test.sh does)");
        register_runsc(&path).unwrap();
        let config: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(config["log-level"], "warn");
        assert_eq!(config["runtimes"]["other"]["path"], "/bin/other");
        assert_eq!(config["runtimes"]["runsc"]["runtimeArgs"][0], "--network=none");
        assert_eq!(config["runtimes"]["runsc"]["runtimeArgs"][1], "--host-uds=open");
        assert!(runsc_registered_as_wanted(&path));
        let modified = fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!register_runsc(&path).unwrap(), "a second call reported a change");
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), modified, "a second call rewrote the file");
    }

    #[test]
    fn host_sockets_are_reachable_under_runsc_only_with_host_uds_open_or_all() {
        let args = |list: &[&str]| list.iter().map(|arg| (*arg).to_string()).collect::<Vec<_>>();
        assert!(runsc_args_allow_host_sockets(&args(RUNSC_RUNTIME_ARGS)));
        assert!(runsc_args_allow_host_sockets(&args(&["-host-uds=all"])));
        assert!(!runsc_args_allow_host_sockets(&args(&["--network=none"])));
        assert!(!runsc_args_allow_host_sockets(&args(&["--host-uds=create"])));
        assert!(!runsc_args_allow_host_sockets(&args(&["--host-uds=open", "--host-uds=none"])), "the last one wins");
        assert!(!runsc_args_allow_host_sockets(&[]));
    }

    #[test]
    fn an_older_runsc_entry_gains_host_uds_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.json");
        assert!(which("runsc").is_some(), "runsc is not installed: run `airlock setup` (scripts/test.sh does)");
        let runsc = which("runsc").unwrap();
        let old = serde_json::json!({
            "userns-remap": "default",
            "runtimes": { "runsc": { "path": runsc, "runtimeArgs": ["--network=none"] } }
        });
        fs::write(&path, old.to_string()).unwrap();
        assert!(!runsc_registered_as_wanted(&path));
        assert!(register_runsc(&path).unwrap(), "the older entry was not updated");
        let config: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(config["userns-remap"], "default");
        let args: Vec<&str> = config["runtimes"]["runsc"]["runtimeArgs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args, ["--network=none", "--host-uds=open"]);
        assert!(runsc_registered_as_wanted(&path));
    }

    #[test]
    fn a_daemon_config_that_is_not_json_is_named_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.json");
        fs::write(&path, "not json").unwrap();
        assert!(which("runsc").is_some(), "runsc is not installed: run `airlock setup` (scripts/test.sh does)");
        let error = register_runsc(&path).unwrap_err().to_string();
        assert!(error.contains("is not a JSON object"), "{error}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "not json");
    }

    #[test]
    fn a_remapping_daemon_is_read_from_its_info() {
        let mut info = bollard::models::SystemInfo {
            security_options: Some(vec!["name=seccomp,profile=default".into()]),
            docker_root_dir: Some("/var/lib/docker".into()),
            ..Default::default()
        };
        assert_eq!(user_mapping_of(&info).unwrap(), None, "no userns option: ids are the host's");
        info.security_options = Some(vec!["name=seccomp,profile=default".into(), "name=userns".into()]);
        info.docker_root_dir = Some("/var/lib/docker/231072.231072".into());
        let mapping = user_mapping_of(&info).unwrap().unwrap();
        assert_eq!((mapping.first_uid, mapping.first_gid), (231_072, 231_072));
        assert_eq!(mapping.host_ids(0, 0), Some((231_072, 231_072)));
        assert_eq!(mapping.host_ids(1000, 1000), Some((232_072, 232_072)));
        assert_eq!(mapping.host_ids(mapping.uid_count, 0), None, "past the range is nobody");
        info.docker_root_dir = Some("/var/lib/docker".into());
        assert!(user_mapping_of(&info).is_err(), "remapping without <uid>.<gid> in the root is not guessed");
    }

    #[test]
    fn the_remapped_root_passes_as_owner_group_or_anyone() {
        use std::os::unix::fs::PermissionsExt;
        let mapping = UserMapping { first_uid: 100_000, uid_count: 65_536, first_gid: 100_000, gid_count: 65_536 };
        let dir = tempfile::tempdir().unwrap();
        let mode = |mode: u32| fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
        let passes = || remapped_root_can_pass(&fs::metadata(dir.path()).unwrap(), mapping);
        mode(0o700);
        assert!(!passes(), "a private directory of another user");
        mode(0o701);
        assert!(passes(), "search for anyone");
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(dir.path(), None, Some(mapping.first_gid)).unwrap();
            mode(0o700);
            assert!(!passes(), "its group without search");
            mode(0o710);
            assert!(passes(), "its group with search");
        }
    }

    #[test]
    fn subordinate_ranges_are_found_by_their_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subuid");
        fs::write(&path, "alice:100000:65536\ndockremap:165536:4096\n").unwrap();
        assert_eq!(subordinate_range_size(&path, 165_536), 4096);
        assert_eq!(subordinate_range_size(&path, 100_000), 65_536);
        assert_eq!(subordinate_range_size(&path, 7), DEFAULT_REMAP_RANGE);
        assert_eq!(subordinate_range_size(&dir.path().join("missing"), 7), DEFAULT_REMAP_RANGE);
    }

    #[test]
    fn runtimes_parse_by_name() {
        assert_eq!("runsc".parse::<ContainerRuntime>().unwrap(), ContainerRuntime::Runsc);
        assert_eq!("runc".parse::<ContainerRuntime>().unwrap(), ContainerRuntime::Runc);
        assert!("kata".parse::<ContainerRuntime>().unwrap_err().to_string().contains("use runc or runsc"));
    }
}
