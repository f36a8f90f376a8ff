//! `airlock code` with rich results and live output, as a user meets it, in
//! process and through `airlock serve` (the CLI then speaks to the server
//! over the home's socket): `--out-dir` writes one file per MIME type of each
//! display output and prints their paths; without it, one summary line per
//! display; output is printed as the code writes it, not at the end.
//!
//! The display files' names and the summary's format are also unit-tested in
//! `src/sandbox_cli.rs` with made-up outcomes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A 1x1 PNG, base64, as a bundle keeps it.
const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

/// The local home: one for the file, kept between runs (its guest cache
/// with it), used by one test at a time (a CLI process holds it while it runs).
fn local_home() -> (PathBuf, MutexGuard<'static, ()>) {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    (Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-code-rich-home"), guard)
}

fn airlock_command(home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_airlock"));
    command
        .args(args)
        .env("AIRLOCK_HOME", home)
        .env("AIRLOCK_INTERPRETERS", concat!(env!("CARGO_MANIFEST_DIR"), "/guests/out"))
        .stdin(Stdio::null());
    command
}

fn airlock(home: &Path, args: &[&str]) -> Output {
    airlock_command(home, args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn succeeded(output: &Output) -> String {
    assert!(output.status.success(), "{}\n{}", text(&output.stdout), text(&output.stderr));
    text(&output.stdout)
}

/// `airlock serve` on a home; stopped when dropped.
struct Served {
    child: Child,
    _home: tempfile::TempDir,
    home: PathBuf,
}

impl Served {
    fn start() -> Self {
        let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-code-rich-served");
        std::fs::create_dir_all(&parent).unwrap();
        let dir = tempfile::Builder::new().prefix("home-").tempdir_in(&parent).unwrap();
        let home = dir.path().to_path_buf();
        let mut child = airlock_command(&home, &["serve", "--listen", "127.0.0.1:0", "--home"])
            .arg(&home)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains("http://127.0.0.1:"), "{line}");
        Self { child, _home: dir, home }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

fn out_dir_writes_each_type_of_each_display(home: &Path, sandbox: &str) {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("made-by-airlock");
    let code = "print('hi')\ndisplay({'text/html': '<b>x</b>', 'text/plain': 'x'}, raw=True)\n\
                display({'image/png': '"
        .to_string()
        + PNG_1X1
        + "'}, raw=True)";
    let output = airlock(
        home,
        &["code", sandbox, "--lang", "python", "-c", &code, "--out-dir", dir.to_str().unwrap()],
    );
    let stdout = succeeded(&output);
    let expected = ["display-1.html", "display-1.txt", "display-2.png"].map(|name| dir.join(name));
    let printed: Vec<&str> = stdout.lines().collect();
    assert_eq!(printed[0], "hi", "{stdout}");
    for path in &expected {
        assert!(printed.contains(&path.to_str().unwrap()), "{} not printed in {stdout}", path.display());
    }
    assert_eq!(std::fs::read_to_string(&expected[0]).unwrap(), "<b>x</b>");
    assert_eq!(std::fs::read_to_string(&expected[1]).unwrap(), "x");
    let png = std::fs::read(&expected[2]).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "decoded from base64: {png:?}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3);
}

fn a_summary_line_per_display_without_out_dir(home: &Path, sandbox: &str) {
    let code = format!("display({{'image/png': '{PNG_1X1}', 'text/plain': 'a dot'}}, raw=True)");
    let stdout = succeeded(&airlock(home, &["code", sandbox, "--lang", "python", "-c", &code]));
    assert_eq!(stdout, "[display 1: image/png 1x1 (70 bytes), text/plain (5 bytes)]\n");
}

/// The first line is printed well before the code ends.
fn output_is_printed_as_it_is_written(home: &Path, sandbox: &str) {
    let code = "import time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')";
    let mut child = airlock_command(home, &["code", sandbox, "--lang", "python", "-c", code])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let first_at = Instant::now();
    assert_eq!(first, "first\n");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert_eq!(rest, "second\n");
    // Generous: the pause is 1.5 s.
    assert!(first_at.elapsed() >= Duration::from_secs(1), "the first line came only {:?} before the end", first_at.elapsed());
}

#[test]
fn out_dir_writes_the_display_files_in_process() {
    let (home, _one) = local_home();
    out_dir_writes_each_type_of_each_display(&home, "rich-files");
}

#[test]
fn displays_are_summarised_in_process() {
    let (home, _one) = local_home();
    a_summary_line_per_display_without_out_dir(&home, "rich-summary");
}

#[test]
fn output_is_live_in_process() {
    let (home, _one) = local_home();
    output_is_printed_as_it_is_written(&home, "rich-live");
}

#[test]
fn files_summaries_and_live_output_through_the_server() {
    let served = Served::start();
    out_dir_writes_each_type_of_each_display(&served.home, "rich-files");
    a_summary_line_per_display_without_out_dir(&served.home, "rich-summary");
    output_is_printed_as_it_is_written(&served.home, "rich-live");
}

/// Each `airlock code` is a process of its own that attaches to the same
/// container's agent and starts a kernel there, while kernels of earlier
/// processes may still run. Every one must start its own kernel and answer:
/// run ids that restarted at 1 in every process made about half of these
/// fail ("the kernel exited with code 0 while starting"), as the agent
/// handed the new kernel's id to an old one.
#[test]
fn kernels_of_successive_cli_processes_in_one_container_do_not_collide() {
    let (home, _one_at_a_time) = local_home();
    let sandbox = "cli-kernels-successive";
    let _ = airlock(&home, &["sandbox", "rm", sandbox]);
    succeeded(&airlock(&home, &["sandbox", "create", sandbox, "--tier", "container"]));
    for round in 0..8 {
        let (lang, code, expected) =
            if round % 2 == 0 { ("python", "print(6 * 7)", "42") } else { ("js", "console.log(6 * 7)", "42") };
        let output = airlock(&home, &["code", sandbox, "--lang", lang, "-c", code]);
        assert_eq!(succeeded(&output).trim(), expected, "round {round} ({lang}): {}", text(&output.stderr));
    }
    succeeded(&airlock(&home, &["sandbox", "rm", sandbox]));
}

/// `airlock context`: a context made by one command keeps its variables,
/// functions and imports for the next commands (it is kept in the home); a
/// fork has them too and diverges; removing one leaves the other; unknown
/// ids are clear errors.
fn contexts_are_kept_forked_listed_and_removed(home: &Path, sandbox: &str) {
    let _ = airlock(home, &["sandbox", "rm", sandbox]);
    let id = succeeded(&airlock(home, &["context", "new", sandbox, "--lang", "python"])).trim().to_string();
    assert_eq!(id.len(), 32, "{id}");
    let code = |context: &str, code: &str| {
        succeeded(&airlock(home, &["code", sandbox, "--lang", "python", "--context", context, "-c", code]))
    };
    code(&id, "import math\nx = 41\ndef f():\n    return x + 1");
    assert_eq!(code(&id, "print(f(), math.floor(math.pi))").trim(), "42 3");

    let forked = airlock(home, &["context", "fork", sandbox, &id]);
    let fork = succeeded(&forked).trim().to_string();
    assert_ne!(fork, id);
    assert!(text(&forked.stderr).contains("\"replayed_evaluations\":2"), "{}", text(&forked.stderr));
    assert_eq!(code(&fork, "print(f(), math.floor(math.pi))").trim(), "42 3", "the fork has them");
    code(&fork, "x = 0");
    assert_eq!(code(&fork, "print(f())").trim(), "1");
    assert_eq!(code(&id, "print(f())").trim(), "42", "the source is unaffected");

    let listed = succeeded(&airlock(home, &["context", "ls", sandbox]));
    assert!(listed.contains(&id) && listed.contains(&fork) && listed.contains("python"), "{listed}");
    succeeded(&airlock(home, &["context", "rm", sandbox, &fork]));
    let listed = succeeded(&airlock(home, &["context", "ls", sandbox]));
    assert!(listed.contains(&id) && !listed.contains(&fork), "{listed}");
    let gone = airlock(home, &["code", sandbox, "--lang", "python", "--context", &fork, "-c", "1"]);
    assert!(!gone.status.success() && text(&gone.stderr).contains(&fork), "{}", text(&gone.stderr));
    let unknown = airlock(home, &["context", "fork", sandbox, "no-such-context"]);
    assert!(!unknown.status.success() && text(&unknown.stderr).contains("no-such-context"), "{}", text(&unknown.stderr));
    succeeded(&airlock(home, &["sandbox", "rm", sandbox]));
}

#[test]
fn contexts_in_process() {
    let (home, _one_at_a_time) = local_home();
    contexts_are_kept_forked_listed_and_removed(&home, "cli-contexts");
}

#[test]
fn contexts_through_the_server() {
    let served = Served::start();
    contexts_are_kept_forked_listed_and_removed(&served.home, "cli-contexts");
}

/// A one-shot evaluation in a container ends its kernel before the command
/// exits: after several `airlock code` commands, no kernel is left running.
#[test]
fn one_shot_commands_leave_no_kernel_running_in_the_container() {
    let (home, _one_at_a_time) = local_home();
    let sandbox = "cli-kernels-left";
    let _ = airlock(&home, &["sandbox", "rm", sandbox]);
    succeeded(&airlock(&home, &["sandbox", "create", sandbox, "--tier", "container"]));
    for lang in ["python", "js", "python"] {
        let code = if lang == "python" { "print(1)" } else { "console.log(1)" };
        assert_eq!(succeeded(&airlock(&home, &["code", sandbox, "--lang", lang, "-c", code])).trim(), "1");
    }
    // The kernels' command lines start with these; `ps` itself does not match.
    let ps = succeeded(&airlock(&home, &["exec", sandbox, "--", "ps", "-eo", "args"]));
    let kernels: Vec<&str> =
        ps.lines().filter(|line| line.starts_with("python3 -u -c") || line.starts_with("node -e")).collect();
    assert!(kernels.is_empty(), "kernels left running: {kernels:?}\n{ps}");
    succeeded(&airlock(&home, &["sandbox", "rm", sandbox]));
}
