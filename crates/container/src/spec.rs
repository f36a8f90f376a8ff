//! What a sandbox container is made of, and the hardening every one gets
//! (DESIGN.md decision 4): no network interface, every capability dropped but a
//! short list kept for a reason, `no-new-privileges`, Docker's default seccomp
//! profile, pids/memory/CPU limits, a non-root user, the workspace at
//! `/workspace`, and Airlock's label. With egress, the host's egress directory
//! (the proxy's socket and the trust bundle) is mounted read-only and the
//! usual proxy and CA variables point into it; the container still has no
//! network interface.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use airlock_core::WORKSPACE_GUEST_PATH;
use airlock_core::limits::{GIB, MIB, format_size};
use airlock_core::network::{EGRESS_CA_BUNDLE_FILE, EGRESS_GUEST_DIR, EGRESS_PROXY_PORT};
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};

use crate::agent::AGENT_GUEST_PATH;
use crate::engine::ContainerRuntime;
use crate::error::{Error, Result};
use crate::image::SANDBOX_UID;
use crate::layer::LAYER_LABEL;

/// Label every Airlock container carries; its value is the sandbox id.
pub const SANDBOX_LABEL: &str = "airlock.sandbox";
/// Label naming the Airlock home (runtime) a container belongs to, so that one
/// runtime's reconciliation never touches another's containers on a shared engine.
pub const HOME_LABEL: &str = "airlock.home";

/// Label holding the `uid:gid` a sandbox's commands run as (the container
/// itself runs as root: its main process is the agent, see `crates/agent`).
pub const USER_LABEL: &str = "airlock.user";

/// Capabilities kept; everything else is dropped. Commands run as the
/// unprivileged sandbox user, for whom these are inert; they matter to the
/// agent (root, see `crates/agent`) and to commands run as root inside the
/// sandbox, such as a package install.
pub const KEPT_CAPABILITIES: &[(&str, &str)] = &[
    ("CHOWN", "package managers set the owner of the files they unpack"),
    ("DAC_OVERRIDE", "root in the sandbox must write files the sandbox user owns, such as those in /workspace"),
    ("FOWNER", "dpkg and tar set modes and times on files they did not create"),
    ("SETUID", "apt drops to its _apt user to download; root may switch to the sandbox user"),
    ("SETGID", "the group half of the switch above"),
    ("KILL", "the agent, root, kills the trees of commands that run as the sandbox user, a uid it does not share"),
];

/// Variables that name the egress proxy, set in a container with egress.
/// Both spellings: curl reads only the lower-case `http_proxy`, other tools
/// only the upper-case names.
pub const EGRESS_PROXY_VARIABLES: &[&str] = &["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"];
/// Variables that keep the container's own loopback off the proxy.
pub const EGRESS_NO_PROXY_VARIABLES: &[&str] = &["NO_PROXY", "no_proxy"];
/// What [`EGRESS_NO_PROXY_VARIABLES`] hold: a dev server inside the sandbox
/// is reached directly.
pub const EGRESS_NO_PROXY: &str = "localhost,127.0.0.1,::1";
/// Variables through which the usual tools (OpenSSL and everything on it,
/// Node, Python's requests, pip, git, curl) find the trust bundle with the
/// runtime's egress CA in it.
pub const EGRESS_CA_VARIABLES: &[&str] =
    &["SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE", "PIP_CERT", "GIT_SSL_CAINFO", "CURL_CA_BUNDLE"];

/// Where Debian-based images keep the system's trust bundle (OpenSSL's
/// default file, and what `update-ca-certificates` writes). A container with
/// egress gets the egress bundle mounted here read-only, so a tool that reads
/// none of [`EGRESS_CA_VARIABLES`] trusts the runtime's CA too.
pub const SYSTEM_TRUST_BUNDLE_GUEST_PATH: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The environment a container with egress gives every command it runs
/// (exec, background processes and terminals alike; a command's own
/// environment still wins): the proxy at the agent's relay on loopback and
/// the trust bundle in the egress directory.
pub fn egress_environment() -> Vec<(String, String)> {
    let proxy = format!("http://127.0.0.1:{EGRESS_PROXY_PORT}");
    let bundle = format!("{EGRESS_GUEST_DIR}/{EGRESS_CA_BUNDLE_FILE}");
    let proxies = EGRESS_PROXY_VARIABLES.iter().map(|name| ((*name).to_string(), proxy.clone()));
    let no_proxy = EGRESS_NO_PROXY_VARIABLES.iter().map(|name| ((*name).to_string(), EGRESS_NO_PROXY.to_string()));
    let bundles = EGRESS_CA_VARIABLES.iter().map(|name| ((*name).to_string(), bundle.clone()));
    proxies.chain(no_proxy).chain(bundles).collect()
}

/// Default memory of a sandbox container (RAM; swap is not allowed).
pub const DEFAULT_CONTAINER_MEMORY_BYTES: u64 = GIB;
pub const MIN_CONTAINER_MEMORY_BYTES: u64 = 16 * MIB;
pub const MAX_CONTAINER_MEMORY_BYTES: u64 = 64 * GIB;
/// Default cap on processes and threads in a sandbox: contains fork bombs.
pub const DEFAULT_CONTAINER_PIDS: u32 = 256;
pub const MIN_CONTAINER_PIDS: u32 = 8;
pub const MAX_CONTAINER_PIDS: u32 = 32_768;
/// Under runsc the pids limit also binds gVisor's own host threads (the
/// sentry's and, on the ptrace platform, one stub per sandbox thread): this
/// much is added so that the sandbox's own processes get what was asked.
/// A fork bomb still ends the whole gVisor sandbox rather than failing forks.
pub const RUNSC_PIDS_HEADROOM: u32 = 128;
/// Default CPU share, in thousandths of a CPU (1000 = one full CPU).
pub const DEFAULT_CONTAINER_CPU_MILLIS: u32 = 1000;
pub const MIN_CONTAINER_CPU_MILLIS: u32 = 10;
pub const MAX_CONTAINER_CPU_MILLIS: u32 = 64_000;

/// The resource limits of one sandbox container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ContainerResources {
    /// Memory cap in bytes; the kernel's OOM killer acts inside the sandbox at it.
    pub memory_bytes: u64,
    /// Cap on processes and threads.
    pub pids: u32,
    /// CPU in thousandths of a CPU.
    pub cpu_millis: u32,
}

impl Default for ContainerResources {
    fn default() -> Self {
        Self {
            memory_bytes: DEFAULT_CONTAINER_MEMORY_BYTES,
            pids: DEFAULT_CONTAINER_PIDS,
            cpu_millis: DEFAULT_CONTAINER_CPU_MILLIS,
        }
    }
}

impl ContainerResources {
    /// Checks each limit against its range; the error names the limit.
    pub fn validate(&self) -> Result<()> {
        let out_of_range = |what: &'static str, got: String, min: String, max: String| Error::Invalid {
            what,
            reason: format!("{got} is outside {min}..={max}"),
        };
        if !(MIN_CONTAINER_MEMORY_BYTES..=MAX_CONTAINER_MEMORY_BYTES).contains(&self.memory_bytes) {
            return Err(out_of_range(
                "container memory limit",
                format_size(self.memory_bytes),
                format_size(MIN_CONTAINER_MEMORY_BYTES),
                format_size(MAX_CONTAINER_MEMORY_BYTES),
            ));
        }
        if !(MIN_CONTAINER_PIDS..=MAX_CONTAINER_PIDS).contains(&self.pids) {
            return Err(out_of_range(
                "container pids limit",
                self.pids.to_string(),
                MIN_CONTAINER_PIDS.to_string(),
                MAX_CONTAINER_PIDS.to_string(),
            ));
        }
        if !(MIN_CONTAINER_CPU_MILLIS..=MAX_CONTAINER_CPU_MILLIS).contains(&self.cpu_millis) {
            return Err(out_of_range(
                "container cpu limit (thousandths of a cpu)",
                self.cpu_millis.to_string(),
                MIN_CONTAINER_CPU_MILLIS.to_string(),
                MAX_CONTAINER_CPU_MILLIS.to_string(),
            ));
        }
        Ok(())
    }
}

/// Everything that makes one sandbox container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    /// The sandbox this container belongs to: the value of its label.
    pub sandbox_id: String,
    /// A local image (Airlock never pulls).
    pub image: String,
    pub runtime: ContainerRuntime,
    pub resources: ContainerResources,
    /// `uid:gid` commands run as unless an exec names another user.
    pub user: String,
    /// The host directory mounted read-write at `/workspace`.
    pub workspace: PathBuf,
    /// Extra labels (the runtime marks its containers with its home).
    pub labels: HashMap<String, String>,
    /// Cap on the container's writable layer, in bytes (`--storage-opt size=`);
    /// only for an engine that [supports it](crate::DockerEngine::supports_writable_layer_quota).
    pub disk_bytes: Option<u64>,
    /// A directory on the sandbox's quota'd filesystem, empty, to hold the
    /// container's writable layer (see [`LAYER_LABEL`]): how the disk quota
    /// covers the layer when the engine cannot limit it (overlay2 on ext4).
    pub layer_home: Option<PathBuf>,
    /// The sandbox's egress directory on the host (holding the proxy's
    /// socket and the trust bundle), mounted read-only at
    /// `EGRESS_GUEST_DIR`; the proxy variables ([`egress_environment`]) are
    /// set and the agent relays `127.0.0.1:EGRESS_PROXY_PORT` to the socket.
    /// `None` (the default): no egress at all, nothing listens, no variables.
    /// Fixed when the container is created; the policy behind the proxy is
    /// not, and can change while it runs.
    pub egress_dir: Option<PathBuf>,
}

impl SandboxSpec {
    /// A spec with the default runtime (runc), resources and the unprivileged sandbox user.
    pub fn new(sandbox_id: impl Into<String>, image: impl Into<String>, workspace: impl Into<PathBuf>) -> Self {
        Self {
            sandbox_id: sandbox_id.into(),
            image: image.into(),
            runtime: ContainerRuntime::default(),
            resources: ContainerResources::default(),
            user: format!("{SANDBOX_UID}:{SANDBOX_UID}"),
            workspace: workspace.into(),
            labels: HashMap::new(),
            disk_bytes: None,
            layer_home: None,
            egress_dir: None,
        }
    }

    /// Gives the container egress through the host directory `dir` (see
    /// [`SandboxSpec::egress_dir`]).
    pub fn egress(mut self, dir: impl Into<PathBuf>) -> Self {
        self.egress_dir = Some(dir.into());
        self
    }

    /// Caps the writable layer (see [`SandboxSpec::disk_bytes`]).
    pub fn disk_limit(mut self, bytes: u64) -> Self {
        self.disk_bytes = Some(bytes);
        self
    }

    /// Keeps the writable layer in `dir` (see [`SandboxSpec::layer_home`]).
    pub fn writable_layer_in(mut self, dir: impl Into<PathBuf>) -> Self {
        self.layer_home = Some(dir.into());
        self
    }

    pub fn runtime(mut self, runtime: ContainerRuntime) -> Self {
        self.runtime = runtime;
        self
    }

    pub fn resources(mut self, resources: ContainerResources) -> Self {
        self.resources = resources;
        self
    }

    /// The pids limit the engine gets (see [`RUNSC_PIDS_HEADROOM`]).
    pub(crate) fn host_pids_limit(&self) -> u32 {
        match self.runtime {
            ContainerRuntime::Runc => self.resources.pids,
            ContainerRuntime::Runsc => self.resources.pids.saturating_add(RUNSC_PIDS_HEADROOM),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        self.resources.validate()?;
        if self.sandbox_id.is_empty() || !self.sandbox_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(Error::Invalid {
                what: "sandbox id",
                reason: format!("{:?}: use letters, digits and -", self.sandbox_id),
            });
        }
        if !self.workspace.is_absolute() || !self.workspace.is_dir() {
            return Err(Error::Workspace {
                path: self.workspace.clone(),
                reason: "must be an existing directory given by an absolute path".into(),
            });
        }
        if let Some(home) = &self.layer_home
            && (!home.is_absolute() || home.to_str().is_none())
        {
            return Err(Error::Invalid {
                what: "writable layer directory",
                reason: format!("{}: use an absolute UTF-8 path", home.display()),
            });
        }
        if self.workspace.to_str().is_none_or(|path| path.contains(':')) {
            return Err(Error::Workspace { path: self.workspace.clone(), reason: "must be UTF-8 without ':'".into() });
        }
        if let Some(dir) = &self.egress_dir
            && (!dir.is_absolute()
                || !dir.is_dir()
                || !dir.join(EGRESS_CA_BUNDLE_FILE).is_file()
                || dir.to_str().is_none_or(|path| path.contains(':')))
        {
            return Err(Error::Invalid {
                what: "egress directory",
                reason: format!(
                    "{}: use an existing directory holding {EGRESS_CA_BUNDLE_FILE}, by an absolute UTF-8 path without ':'",
                    dir.display()
                ),
            });
        }
        Ok(())
    }

    /// The engine's create request: the hardening lives here. `agent` is the
    /// host file of the in-container agent, mounted read-only.
    pub(crate) fn container_config(&self, agent: &Path) -> ContainerCreateBody {
        let mut labels = self.labels.clone();
        labels.insert(SANDBOX_LABEL.into(), self.sandbox_id.clone());
        labels.insert(USER_LABEL.into(), self.user.clone());
        if let Some(home) = self.layer_home.as_ref().and_then(|home| home.to_str()) {
            labels.insert(LAYER_LABEL.into(), home.into());
        }
        let memory = i64::try_from(self.resources.memory_bytes).unwrap_or(i64::MAX);
        // The agent's environment is every command's (exec, processes,
        // terminals), under each command's own: the egress variables go here.
        let mut env = vec![format!("HOME=/home/{}", crate::image::SANDBOX_USER), "LANG=C.UTF-8".into()];
        let mut binds = vec![
            format!("{}:{WORKSPACE_GUEST_PATH}:rw", self.workspace.display()),
            format!("{}:{AGENT_GUEST_PATH}:ro", agent.display()),
        ];
        if let Some(dir) = &self.egress_dir {
            // Read-only: the sandbox can use the socket (connect needs no
            // write access to the mount) but never replace it or the bundle.
            binds.push(format!("{}:{EGRESS_GUEST_DIR}:ro", dir.display()));
            // The same bundle as the system's trust store (the host's system
            // bundle plus the runtime's CA), read-only like the rest.
            binds.push(format!(
                "{}:{SYSTEM_TRUST_BUNDLE_GUEST_PATH}:ro",
                dir.join(EGRESS_CA_BUNDLE_FILE).display()
            ));
            env.extend(egress_environment().into_iter().map(|(name, value)| format!("{name}={value}")));
        }
        ContainerCreateBody {
            image: Some(self.image.clone()),
            // docker-init (tini) is PID 1 and reaps orphans; the agent under it
            // keeps the container up and runs commands sent on its stdin.
            cmd: Some(vec![AGENT_GUEST_PATH.into()]),
            open_stdin: Some(true),
            stdin_once: Some(false),
            attach_stdin: Some(false),
            attach_stdout: Some(false),
            attach_stderr: Some(false),
            entrypoint: Some(vec![]),
            // The agent runs as root, apart from the sandbox's user, and drops
            // to `self.user` for each command (see `crates/agent`).
            user: Some("0:0".into()),
            working_dir: Some(WORKSPACE_GUEST_PATH.into()),
            hostname: Some("sandbox".into()),
            env: Some(env),
            labels: Some(labels),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                // No interface but loopback: the only way out is the egress socket, when mounted.
                network_mode: Some("none".into()),
                cap_drop: Some(vec!["ALL".into()]),
                cap_add: Some(KEPT_CAPABILITIES.iter().map(|(cap, _)| (*cap).to_string()).collect()),
                // Docker applies its default seccomp profile unless told otherwise; never `seccomp=unconfined`.
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                privileged: Some(false),
                pids_limit: Some(i64::from(self.host_pids_limit())),
                memory: Some(memory),
                // Equal to memory: no swap, so the memory cap is the real cap.
                memory_swap: Some(memory),
                nano_cpus: Some(i64::from(self.resources.cpu_millis) * 1_000_000),
                binds: Some(binds),
                // Command output goes to the host over the agent's stream, never to a log file.
                log_config: Some(HostConfigLogConfig { typ: Some("none".into()), config: None }),
                runtime: Some(self.runtime.name().into()),
                init: Some(true),
                ipc_mode: Some("private".into()),
                readonly_rootfs: Some(false),
                storage_opt: self.disk_bytes.map(|bytes| HashMap::from([("size".to_string(), bytes.to_string())])),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SandboxSpec {
        SandboxSpec::new("sbx-1", "airlock/base:test", std::env::temp_dir())
    }

    #[test]
    fn the_create_request_is_hardened() {
        let config = spec().container_config(Path::new("/var/lib/airlock/agent/airlock-agent-test"));
        let host = config.host_config.unwrap();
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
        let kept = host.cap_add.unwrap();
        for dangerous in ["SYS_ADMIN", "NET_RAW", "SYS_PTRACE", "SYS_MODULE", "NET_ADMIN", "MKNOD"] {
            assert!(!kept.iter().any(|cap| cap == dangerous), "{dangerous} is kept");
        }
        let security = host.security_opt.unwrap();
        assert!(security.contains(&"no-new-privileges:true".to_string()));
        assert!(!security.iter().any(|opt| opt.contains("unconfined")));
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.pids_limit, Some(i64::from(DEFAULT_CONTAINER_PIDS)));
        assert_eq!(host.memory, host.memory_swap, "swap would lift the memory cap");
        assert_eq!(host.nano_cpus, Some(1_000_000_000));
        assert_eq!(config.user.as_deref(), Some("0:0"), "the agent runs as root, apart from the sandbox user");
        let labels = config.labels.unwrap();
        assert_eq!(labels.get(SANDBOX_LABEL).map(String::as_str), Some("sbx-1"));
        assert_eq!(labels.get(USER_LABEL).map(String::as_str), Some("1000:1000"), "commands run as the sandbox user");
        let binds = host.binds.unwrap();
        assert!(binds[0].ends_with(":/workspace:rw"));
        assert_eq!(binds[1], "/var/lib/airlock/agent/airlock-agent-test:/.airlock/agent:ro", "the agent is read-only");
        assert_eq!(config.cmd, Some(vec![AGENT_GUEST_PATH.to_string()]));
        assert_eq!(config.open_stdin, Some(true), "the agent takes requests on stdin");
        assert_eq!(host.log_config.unwrap().typ.as_deref(), Some("none"), "output must not reach a log file");
        assert!(host.port_bindings.is_none() && host.publish_all_ports.is_none());
    }

    #[test]
    fn egress_mounts_its_directory_read_only_and_sets_the_variables() {
        let agent = Path::new("/agent");
        let plain = spec().container_config(agent);
        assert_eq!(plain.host_config.as_ref().unwrap().binds.as_ref().unwrap().len(), 2, "no egress mount unasked");
        assert!(
            !plain
                .env
                .unwrap()
                .iter()
                .any(|var| var.contains("PROXY") || var.contains("proxy") || var.contains("CERT")),
            "proxy variables without egress"
        );

        let egress = tempfile::tempdir().unwrap();
        let dir = egress.path();
        std::fs::write(dir.join("ca-bundle.pem"), "bundle").unwrap();
        let with = spec().egress(dir);
        with.validate().unwrap();
        let config = with.container_config(agent);
        let host = config.host_config.unwrap();
        assert_eq!(host.network_mode.as_deref(), Some("none"), "egress gives no network");
        assert_eq!(config.network_disabled, Some(true));
        let binds = host.binds.unwrap();
        assert!(binds.contains(&format!("{}:/run/airlock/egress:ro", dir.display())));
        // The bundle is the system's trust store too, read-only.
        assert!(binds.contains(&format!("{}/ca-bundle.pem:/etc/ssl/certs/ca-certificates.crt:ro", dir.display())));
        let env = config.env.unwrap();
        for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            assert!(env.contains(&format!("{name}=http://127.0.0.1:3128")), "{name} missing from {env:?}");
        }
        for name in ["NO_PROXY", "no_proxy"] {
            assert!(env.contains(&format!("{name}=localhost,127.0.0.1,::1")), "{name} missing from {env:?}");
        }
        for name in [
            "SSL_CERT_FILE",
            "NODE_EXTRA_CA_CERTS",
            "REQUESTS_CA_BUNDLE",
            "PIP_CERT",
            "GIT_SSL_CAINFO",
            "CURL_CA_BUNDLE",
        ] {
            assert!(env.contains(&format!("{name}=/run/airlock/egress/ca-bundle.pem")), "{name} missing from {env:?}");
        }
    }

    #[test]
    fn an_egress_directory_must_exist_be_absolute_and_mountable() {
        for bad in ["relative/egress", "/no/such/airlock/egress", "/tmp/a:b"] {
            let error = spec().egress(bad).validate().unwrap_err().to_string();
            assert!(error.contains("egress directory"), "{bad}: {error}");
        }
        // A directory without the trust bundle cannot be mounted as one.
        let empty = tempfile::tempdir().unwrap();
        let error = spec().egress(empty.path()).validate().unwrap_err().to_string();
        assert!(error.contains("ca-bundle.pem"), "{error}");
    }

    #[test]
    fn a_disk_limit_caps_the_writable_layer_only_when_asked() {
        let agent = Path::new("/agent");
        assert_eq!(spec().container_config(agent).host_config.unwrap().storage_opt, None);
        let capped = spec().disk_limit(64 * MIB).container_config(agent).host_config.unwrap();
        assert_eq!(capped.storage_opt.unwrap().get("size").map(String::as_str), Some("67108864"));
    }

    #[test]
    fn every_limit_out_of_range_is_named() {
        let too_little = ContainerResources { memory_bytes: MIB, ..ContainerResources::default() };
        assert!(too_little.validate().unwrap_err().to_string().contains("container memory limit"));
        let no_pids = ContainerResources { pids: 1, ..ContainerResources::default() };
        assert!(no_pids.validate().unwrap_err().to_string().contains("container pids limit"));
        let greedy = ContainerResources { cpu_millis: 1_000_000, ..ContainerResources::default() };
        assert!(greedy.validate().unwrap_err().to_string().contains("container cpu limit"));
        ContainerResources::default().validate().unwrap();
    }

    #[test]
    fn a_workspace_must_exist_and_be_absolute() {
        let mut relative = spec();
        relative.workspace = PathBuf::from("relative/dir");
        assert!(matches!(relative.validate(), Err(Error::Workspace { .. })));
        let mut missing = spec();
        missing.workspace = PathBuf::from("/no/such/airlock/dir");
        assert!(matches!(missing.validate(), Err(Error::Workspace { .. })));
        spec().validate().unwrap();
    }
}
