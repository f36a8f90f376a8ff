//! Host-side readings of a container's cgroup: CPU actually used, and how many
//! times the kernel's OOM killer acted inside it.
//!
//! Read from the host's cgroup filesystem, so the numbers cover every process
//! of the container (for runsc, the gVisor sentry doing the sandbox's work).
//! Both cgroup v1 and v2, with the cgroupfs and systemd drivers, are looked for.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Where one container's accounting lives on the host.
#[derive(Debug, Clone, Default)]
pub(crate) struct ContainerCgroup {
    cpu: Option<CpuFile>,
    oom: Option<OomFile>,
}

#[derive(Debug, Clone)]
enum CpuFile {
    /// v1 `cpuacct.usage`: nanoseconds.
    V1(PathBuf),
    /// v2 `cpu.stat`: the `usage_usec` line.
    V2(PathBuf),
}

#[derive(Debug, Clone)]
enum OomFile {
    /// v1 `memory.oom_control`: the `oom_kill` line.
    V1(PathBuf),
    /// v2 `memory.events`: the `oom_kill` line.
    V2(PathBuf),
}

impl ContainerCgroup {
    /// Finds the cgroup of the container with this full id; fields stay empty
    /// where the host does not expose them.
    pub(crate) fn find(container_id: &str) -> Self {
        let root = Path::new(CGROUP_ROOT);
        let leaves = [format!("docker/{container_id}"), format!("system.slice/docker-{container_id}.scope")];
        let mut found = ContainerCgroup::default();
        for leaf in &leaves {
            let v1_cpu = root.join("cpuacct").join(leaf).join("cpuacct.usage");
            let v2 = root.join(leaf);
            if found.cpu.is_none() {
                if v1_cpu.is_file() {
                    found.cpu = Some(CpuFile::V1(v1_cpu));
                } else if v2.join("cpu.stat").is_file() {
                    found.cpu = Some(CpuFile::V2(v2.join("cpu.stat")));
                }
            }
            let v1_oom = root.join("memory").join(leaf).join("memory.oom_control");
            if found.oom.is_none() {
                if v1_oom.is_file() {
                    found.oom = Some(OomFile::V1(v1_oom));
                } else if v2.join("memory.events").is_file() {
                    found.oom = Some(OomFile::V2(v2.join("memory.events")));
                }
            }
        }
        found
    }

    /// CPU time used by the container so far.
    pub(crate) fn cpu_usage(&self) -> Option<Duration> {
        match self.cpu.as_ref()? {
            CpuFile::V1(path) => fs::read_to_string(path).ok()?.trim().parse().ok().map(Duration::from_nanos),
            CpuFile::V2(path) => keyed_value(&fs::read_to_string(path).ok()?, "usage_usec").map(Duration::from_micros),
        }
    }

    /// How many processes the OOM killer has killed in the container so far.
    pub(crate) fn oom_kills(&self) -> Option<u64> {
        let (OomFile::V1(path) | OomFile::V2(path)) = self.oom.as_ref()?;
        keyed_value(&fs::read_to_string(path).ok()?, "oom_kill")
    }
}

fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files_are_read_by_key() {
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_value(oom_control, "oom_kill"), Some(3));
        let cpu_stat = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n";
        assert_eq!(keyed_value(cpu_stat, "usage_usec"), Some(1500));
        assert_eq!(keyed_value(cpu_stat, "nr_periods"), None);
    }

    #[test]
    fn an_unknown_container_has_no_readings() {
        let cgroup = ContainerCgroup::find("not-a-container");
        assert_eq!(cgroup.cpu_usage(), None);
        assert_eq!(cgroup.oom_kills(), None);
    }
}
