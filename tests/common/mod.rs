//! Shared test fixtures: the built guests, one engine per test binary, and
//! workspaces with a secret file beside them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use airlock::{EngineConfig, IsolateEngine, Workspace};

/// The path of a guest built by `scripts/build-guests.sh`. Fails loudly if the
/// guests were not built: a test never passes by skipping.
pub fn guest(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/out").join(name);
    assert!(path.is_file(), "guest {} is missing: run scripts/build-guests.sh first", path.display());
    path
}

/// Runs of one test binary share one engine, as in a real process.
pub fn engine() -> &'static IsolateEngine {
    static ENGINE: OnceLock<IsolateEngine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache");
        IsolateEngine::new(EngineConfig { cache_dir: Some(cache), ..EngineConfig::default() }).unwrap()
    })
}

/// A workspace directory inside a temporary parent that also holds
/// `secret.txt`, the host file every escape attempt aims at.
pub struct Fixture {
    pub parent: tempfile::TempDir,
    pub workspace: Workspace,
}

pub const SECRET: &str = "host secret: never readable by a guest\n";

impl Fixture {
    pub fn new() -> Self {
        let parent = tempfile::tempdir().unwrap();
        std::fs::write(parent.path().join("secret.txt"), SECRET).unwrap();
        let workspace = Workspace::create(parent.path().join("workspace")).unwrap();
        Self { parent, workspace }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.workspace.host_path().join(relative)
    }

    /// Every path under the parent outside the workspace, with file contents,
    /// to show that nothing outside changed.
    pub fn outside_snapshot(&self) -> Vec<(PathBuf, Option<Vec<u8>>)> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(self.parent.path()).unwrap() {
            let path = entry.unwrap().path();
            if path == self.workspace.host_path() {
                continue;
            }
            let contents = std::fs::symlink_metadata(&path).unwrap().is_file().then(|| std::fs::read(&path).unwrap());
            entries.push((path, contents));
        }
        entries.sort();
        entries
    }
}

/// A runtime in a fresh home, sharing the test binaries' guest cache.
pub async fn runtime_in(home: &Path) -> airlock::runtime::Runtime {
    let mut options = airlock::runtime::RuntimeOptions::new(home);
    options.isolates.cache_dir = Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache"));
    airlock::runtime::Runtime::open(options).await.expect("opening the runtime")
}

/// A bash script as a command.
pub fn bash(script: &str) -> airlock::ExecRequest {
    airlock::ExecRequest::new("bash").args(["-c", script])
}

/// Removes these sandboxes' containers however the test ends.
pub struct Cleanup(pub Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for sandbox in &self.0 {
            let out = std::process::Command::new("docker")
                .args(["ps", "-aq", "--filter", &format!("label=airlock.sandbox={sandbox}")])
                .output();
            if let Ok(out) = out {
                for id in String::from_utf8_lossy(&out.stdout).lines() {
                    let _ = std::process::Command::new("docker").args(["rm", "-f", id]).output();
                }
            }
        }
    }
}
