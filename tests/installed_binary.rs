//! The `airlock` binary copied alone into an empty directory, with no build
//! tree above it and no `$AIRLOCK_INTERPRETERS`: it runs Python and JavaScript
//! from the interpreters it carries (build.rs packs them; src/carried.rs
//! unpacks them once into the user's cache), on the CLI and through
//! `airlock serve`'s `POST /v1/run`.
//!
//! These fail if the binary was built before the guests (it then carries none).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// A directory with only the binary in it, far from the build tree, plus a
/// home and a cache of its own.
struct Installed {
    root: tempfile::TempDir,
}

impl Installed {
    fn new() -> Self {
        let root = tempfile::Builder::new().prefix("airlock-installed-").tempdir_in("/tmp").unwrap();
        std::fs::create_dir(root.path().join("bin")).unwrap();
        std::fs::copy(env!("CARGO_BIN_EXE_airlock"), root.path().join("bin").join("airlock")).unwrap();
        Self { root }
    }

    fn cache(&self) -> PathBuf {
        self.root.path().join("cache")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(self.root.path().join("bin").join("airlock"));
        command
            .args(args)
            .current_dir(self.root.path())
            .env_remove("AIRLOCK_INTERPRETERS")
            .env("XDG_CACHE_HOME", self.cache())
            .env("AIRLOCK_HOME", self.root.path().join("home"));
        command
    }
}

fn unpacked_files(cache: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for set in std::fs::read_dir(cache.join("airlock").join("interpreters")).unwrap() {
        for file in std::fs::read_dir(set.unwrap().path()).unwrap() {
            files.push(file.unwrap().path());
        }
    }
    files.sort();
    files
}

#[test]
fn a_copied_binary_runs_python_and_javascript_from_what_it_carries() {
    let installed = Installed::new();
    let script = installed.root.path().join("sum.txt");
    std::fs::write(&script, "print(6 * 7)\n").unwrap();
    let python = installed.command(&["run", "--lang", "python", script.to_str().unwrap()]).output().unwrap();
    assert!(python.status.success(), "{}", String::from_utf8_lossy(&python.stderr));
    assert_eq!(String::from_utf8_lossy(&python.stdout), "42\n");

    std::fs::write(&script, "console.log(40 + 2)\n").unwrap();
    let js = installed.command(&["run", "--lang", "javascript", script.to_str().unwrap()]).output().unwrap();
    assert!(js.status.success(), "{}", String::from_utf8_lossy(&js.stderr));
    assert_eq!(String::from_utf8_lossy(&js.stdout), "42\n");

    // Unpacked once, into a directory only this user can enter, never into the build tree.
    let files = unpacked_files(&installed.cache());
    let names: Vec<_> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["js.wasm", "python.wasm"]);
    let set = files[0].parent().unwrap();
    assert_eq!(std::fs::metadata(set).unwrap().permissions().mode() & 0o777, 0o700);
    let python_wasm = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/out/python.wasm");
    assert_eq!(std::fs::read(&files[1]).unwrap(), std::fs::read(python_wasm).unwrap(), "the carried component is the built one");
    let first_written = std::fs::metadata(&files[1]).unwrap().modified().unwrap();
    let again = installed.command(&["run", "--lang", "javascript", script.to_str().unwrap()]).output().unwrap();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(std::fs::metadata(&files[1]).unwrap().modified().unwrap(), first_written, "not unpacked again");
}

#[test]
fn a_damaged_unpacked_component_is_replaced() {
    let installed = Installed::new();
    let script = installed.root.path().join("hello.py");
    std::fs::write(&script, "print('hi')\n").unwrap();
    assert!(installed.command(&["run", "--lang", "python", script.to_str().unwrap()]).output().unwrap().status.success());
    // A crash or a full disk can leave a short file: the next start writes it whole.
    let python = unpacked_files(&installed.cache()).into_iter().find(|f| f.ends_with("python.wasm")).unwrap();
    std::fs::write(&python, b"\0asm").unwrap();
    let output = installed.command(&["run", "--lang", "python", script.to_str().unwrap()]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hi\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_binary_serves_one_shot_runs_over_http() {
    let installed = Installed::new();
    let home = installed.root.path().join("home");
    let mut child = installed
        .command(&["serve", "--listen", "127.0.0.1:0", "--home", home.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    });
    let first = tokio::time::timeout(Duration::from_secs(120), first).await.expect("the server starts").unwrap();
    let base = first.trim().rsplit(' ').next().unwrap().to_string();
    assert!(base.starts_with("http://127.0.0.1:"), "{first}");

    let client = reqwest::Client::new();
    let run = |language: &str, code: &str| {
        let mut request = client.post(format!("{base}/run")).json(&json!({ "language": language, "code": code }));
        if let Some(token) = admin_token(&home) {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let python: Value = run("python", "print(6 * 7)").await.unwrap().json().await.unwrap();
    assert_eq!(python["stdout"], "42\n", "{python}");
    let js: Value = run("javascript", "console.log(40 + 2)").await.unwrap().json().await.unwrap();
    assert_eq!(js["stdout"], "42\n", "{js}");

    let stopped = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(stopped.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "serve stops cleanly on SIGTERM: {status}");
}

/// The server's admin token, where `serve` writes one on first start.
fn admin_token(home: &Path) -> Option<String> {
    std::fs::read_to_string(home.join("admin.token")).ok().map(|token| token.trim().to_string())
}
