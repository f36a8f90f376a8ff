//! Code kernels (issue 14, point 2 and the container side of points 4 and
//! 5) against the real Docker engine and the base image: a persistent
//! Python or Node process per context, driven through the agent, with state
//! kept, values, errors, limits with restarts, live output and rich
//! results. The engine must be set up (`airlock setup`); without it every
//! test here fails, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock_container::{
    ContainerResources, ContainerRuntime, ContainerSandbox, DockerEngine, EngineOptions, ImageRecipe, Kernel,
    SandboxSpec, ensure_base_image,
};
use airlock_core::{
    EvalOutcome, EvalResult, ExecRequest, Language, Limit, LimitExceeded, Limits, OutputChunk, OutputSender,
    OutputStream, SandboxId,
};

/// Connects to the engine (setting it up where needed) and makes sure the
/// base image exists; one build at a time per test binary.
async fn engine_and_image() -> (DockerEngine, String) {
    static BUILD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one_at_a_time = BUILD.lock().await;
    let engine = DockerEngine::connect_or_setup(&EngineOptions::default())
        .await
        .expect("the docker engine is required for container tests: run `airlock setup` as root");
    let image = ensure_base_image(&engine, &ImageRecipe::default(), Arc::new(|line: &str| eprintln!("{line}")))
        .await
        .expect("building the base image");
    (engine, image)
}

/// A sandbox for one test, removed when the test ends, even by a panic.
struct TestSandbox {
    sandbox: ContainerSandbox,
    _dir: tempfile::TempDir,
}

impl TestSandbox {
    async fn new() -> Self {
        Self::with_resources(ContainerResources::default()).await
    }

    async fn with_resources(resources: ContainerResources) -> Self {
        Self::with(ContainerRuntime::Runc, resources).await
    }

    async fn with(runtime: ContainerRuntime, resources: ContainerResources) -> Self {
        let (engine, image) = engine_and_image().await;
        let dir = tempfile::tempdir().unwrap();
        engine.let_remapped_root_pass(dir.path()).unwrap();
        let workspace = dir.path().join("workspace");
        std::fs::create_dir(&workspace).unwrap();
        let spec =
            SandboxSpec::new(SandboxId::new().to_string(), image, &workspace).runtime(runtime).resources(resources);
        let sandbox = ContainerSandbox::create_started(&engine, spec).await.unwrap();
        Self { sandbox, _dir: dir }
    }

    async fn kernel(&self, language: Language) -> Kernel {
        self.sandbox.start_kernel(language).await.unwrap()
    }

    async fn eval(&self, kernel: &mut Kernel, code: &str) -> EvalOutcome {
        self.eval_with(kernel, code, &Limits::default()).await
    }

    async fn eval_with(&self, kernel: &mut Kernel, code: &str, limits: &Limits) -> EvalOutcome {
        kernel.eval(&self.sandbox, code, limits, None).await.unwrap()
    }

    /// Evaluates `code`, which must succeed, and returns its value's text.
    async fn value(&self, kernel: &mut Kernel, code: &str) -> String {
        let outcome = self.eval(kernel, code).await;
        match &outcome.result {
            EvalResult::Ok { value: Some(value) } => value.text.clone(),
            _ => panic!("{code:?} gave no value: {}", show(&outcome)),
        }
    }
}

impl Drop for TestSandbox {
    fn drop(&mut self) {
        let sandbox = self.sandbox.clone();
        // Drop cannot await; a thread with its own runtime removes the container.
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                let _ = runtime.block_on(sandbox.remove());
            }
        })
        .join();
    }
}

fn show(outcome: &EvalOutcome) -> String {
    format!(
        "{:?}\nstdout: {}\nstderr: {}\ndisplays: {}",
        outcome.result,
        outcome.stdout_text(),
        outcome.stderr_text(),
        outcome.displays.len()
    )
}

/// Decodes standard base64 (with padding), as display bundles carry images.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            other => panic!("not base64: {other:#x}"),
        }
    };
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::new();
    for quad in clean.chunks(4) {
        let digits: Vec<u8> = quad.iter().copied().filter(|&c| c != b'=').collect();
        let mut bits = 0u32;
        for (i, &c) in digits.iter().enumerate() {
            bits |= value(c) << (18 - 6 * i);
        }
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..digits.len()]);
    }
    out
}

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&png[12..16], b"IHDR", "IHDR first");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    (width, height)
}

/// Chunks an output sender got, each with when it came.
type Seen = Arc<Mutex<Vec<(Instant, OutputChunk)>>>;

/// Records every chunk the sender gets, with when it came.
fn recorder() -> (OutputSender, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let sender: OutputSender = Arc::new(move |chunk| record.lock().unwrap().push((Instant::now(), chunk)));
    (sender, seen)
}

async fn process_exists(sandbox: &ContainerSandbox, pid: u32) -> bool {
    path_exists(sandbox, &format!("/proc/{pid}")).await
}

/// Whether `path` exists in the container.
async fn path_exists(sandbox: &ContainerSandbox, path: &str) -> bool {
    let outcome = sandbox.exec(ExecRequest::new("test").args(["-e", path])).await.unwrap();
    matches!(outcome.termination, airlock_core::Termination::Exited { code: 0 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_state_and_values_persist_in_one_process() {
    let sandbox = TestSandbox::new().await;
    let mut kernel = sandbox.kernel(Language::Python).await;
    let pid = kernel.pid().expect("a running kernel has a pid");
    assert_eq!(kernel.language(), Language::Python);

    let assigned = sandbox.eval(&mut kernel, "x = 41").await;
    assert_eq!(assigned.result, EvalResult::Ok { value: None }, "{}", show(&assigned));
    let outcome = sandbox.eval(&mut kernel, "x + 1").await;
    let value = outcome.value().expect("a value");
    assert_eq!((value.text.as_str(), value.json.as_deref()), ("42", Some("42")));

    let listed = sandbox.eval(&mut kernel, "[x, 'a', None]").await;
    let value = listed.value().unwrap();
    assert_eq!(value.text, "[41, 'a', None]");
    assert_eq!(value.json.as_deref(), Some("[41, \"a\", null]"));
    // Text beyond ASCII travels both ways, lone surrogates included.
    assert_eq!(sandbox.value(&mut kernel, "'héllo ✓ 😀'").await, "'héllo ✓ 😀'");
    let surrogate = sandbox.eval(&mut kernel, "display({'text/html': 'a' + chr(0xd800)}, raw=True)\nchr(0xd800)").await;
    assert_eq!(surrogate.value().map(|v| v.text.as_str()), Some("'\\ud800'"), "{}", show(&surrogate));
    assert_eq!(surrogate.displays.first().and_then(|d| d.get("text/html")), Some("a?"), "{}", show(&surrogate));
    let object = sandbox.eval(&mut kernel, "object()").await;
    assert!(object.value().unwrap().json.is_none(), "not JSON-serialisable");
    let none = sandbox.eval(&mut kernel, "None").await;
    assert_eq!(none.result, EvalResult::Ok { value: None });

    // The same process answers every evaluation, in /workspace, as the sandbox's user.
    assert_eq!(sandbox.value(&mut kernel, "import os\nos.getpid()").await, pid.to_string());
    assert_eq!(sandbox.value(&mut kernel, "os.getcwd()").await, "'/workspace'");
    assert_ne!(sandbox.value(&mut kernel, "os.getuid()").await, "0");
    assert_eq!(kernel.pid(), Some(pid));
    assert_eq!(kernel.restarts(), 0);
    // Top-level await works, Jupyter style.
    assert_eq!(sandbox.value(&mut kernel, "import asyncio\nawait asyncio.sleep(0.01)\nx * 2").await, "82");
    // Wall and CPU time are measured.
    let timed = sandbox.eval(&mut kernel, "sum(i * i for i in range(2_000_000))").await;
    assert!(timed.wall_time > Duration::ZERO && timed.cpu_time > Duration::ZERO, "{timed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_errors_carry_their_kind_line_and_traceback() {
    let sandbox = TestSandbox::new().await;
    let mut kernel = sandbox.kernel(Language::Python).await;
    let pid = kernel.pid();
    sandbox.eval(&mut kernel, "kept = 'yes'").await;

    let syntax = sandbox.eval(&mut kernel, "a = 1\ndef broken(:\n    pass").await;
    let EvalResult::SyntaxError(error) = &syntax.result else { panic!("{}", show(&syntax)) };
    assert_eq!(error.kind, "SyntaxError");
    assert_eq!(error.line, Some(2));
    assert!(error.traceback.contains("<code>"), "{}", error.traceback);

    let runtime = sandbox.eval(&mut kernel, "def divide():\n    return 1 / 0\n\ndivide()").await;
    let EvalResult::RuntimeError(error) = &runtime.result else { panic!("{}", show(&runtime)) };
    assert_eq!(error.kind, "ZeroDivisionError");
    assert_eq!(error.message, "division by zero");
    assert_eq!(error.line, Some(2), "the innermost line of the code");
    assert!(error.traceback.contains("File \"<code>\", line 4"), "{}", error.traceback);
    assert!(error.traceback.contains("File \"<code>\", line 2, in divide"), "{}", error.traceback);
    assert!(!error.traceback.contains("<string>"), "kernel frames are trimmed: {}", error.traceback);

    // exit() ends the snippet, not the kernel; the state survives errors.
    let exited = sandbox.eval(&mut kernel, "raise SystemExit(3)").await;
    assert!(matches!(&exited.result, EvalResult::RuntimeError(e) if e.kind == "SystemExit"), "{}", show(&exited));
    assert_eq!(sandbox.value(&mut kernel, "kept").await, "'yes'");
    assert_eq!(kernel.pid(), pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_arrives_while_the_evaluation_runs() {
    let sandbox = TestSandbox::new().await;
    let mut kernel = sandbox.kernel(Language::Python).await;
    let (sender, seen) = recorder();
    let code = "import sys, time\nfor i in range(5):\n    print(i)\n    time.sleep(0.4)\nprint('err', file=sys.stderr)";
    let outcome = kernel.eval(&sandbox.sandbox, code, &Limits::default(), Some(&sender)).await.unwrap();
    let returned = Instant::now();
    assert!(outcome.is_ok(), "{}", show(&outcome));
    assert_eq!(outcome.stdout_text(), "0\n1\n2\n3\n4\n");
    assert_eq!(outcome.stderr_text(), "err\n");
    let seen = seen.lock().unwrap();
    let stdout: Vec<&(Instant, OutputChunk)> = seen.iter().filter(|(_, c)| c.stream == OutputStream::Stdout).collect();
    assert!(stdout.len() >= 3, "output came in pieces, not at the end: {} chunks", stdout.len());
    let first = stdout[0].0;
    // The loop ran 2 s: its first line came long before the end.
    assert!(
        returned.duration_since(first) > Duration::from_secs(1),
        "first chunk {:?} before the end",
        returned - first
    );
    let streamed: Vec<u8> = stdout.iter().flat_map(|(_, c)| c.bytes.clone()).collect();
    assert_eq!(streamed, outcome.stdout, "the sender saw what was captured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_kills_the_kernel_and_the_next_evaluation_starts_fresh() {
    let sandbox = TestSandbox::new().await;
    let mut kernel = sandbox.kernel(Language::Python).await;
    let old_pid = kernel.pid().unwrap();
    sandbox.eval(&mut kernel, "state = 1").await;
    let limits = Limits { deadline: Duration::from_secs(2), ..Limits::default() };
    let started = Instant::now();
    // A child process too: the whole tree goes.
    let code = "import subprocess\nchild = subprocess.Popen(['sleep', '600'])\nprint(child.pid, flush=True)\nwhile True:\n    pass";
    let spun = sandbox.eval_with(&mut kernel, code, &limits).await;
    assert_eq!(
        spun.result,
        EvalResult::LimitExceeded(LimitExceeded { limit: Limit::Deadline, value: 2000 }),
        "{}",
        show(&spun)
    );
    assert!(started.elapsed() < Duration::from_secs(10), "killed at the deadline, not forever");
    assert_eq!(kernel.pid(), None, "no kernel until the next evaluation");
    let child: u32 = spun.stdout_text().trim().parse().unwrap();

    let fresh = sandbox.eval(&mut kernel, "state").await;
    assert!(matches!(&fresh.result, EvalResult::RuntimeError(e) if e.kind == "NameError"), "{}", show(&fresh));
    let new_pid = kernel.pid().unwrap();
    assert_ne!(new_pid, old_pid);
    assert_eq!(kernel.restarts(), 1);
    assert_eq!(sandbox.value(&mut kernel, "import os\nos.getpid()").await, new_pid.to_string());
    assert!(!process_exists(&sandbox.sandbox, old_pid).await, "the old kernel is gone");
    assert!(!process_exists(&sandbox.sandbox, child).await, "its child is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_past_the_container_limit_restarts_the_kernel() {
    let resources = ContainerResources { memory_bytes: 256 * 1024 * 1024, ..ContainerResources::default() };
    let sandbox = TestSandbox::with_resources(resources).await;
    let mut kernel = sandbox.kernel(Language::Python).await;
    sandbox.eval(&mut kernel, "state = 1").await;
    let code = "blocks = []\nfor _ in range(64):\n    blocks.append(b'\\x01' * (16 * 1024 * 1024))";
    let outcome = sandbox.eval(&mut kernel, code).await;
    match &outcome.result {
        EvalResult::LimitExceeded(LimitExceeded { limit: Limit::Memory, value }) => {
            assert_eq!(*value, 256 * 1024 * 1024)
        }
        _ => panic!("{}", show(&outcome)),
    }
    assert_eq!(kernel.pid(), None);
    let fresh = sandbox.eval(&mut kernel, "'state' in globals(), 1 + 1").await;
    assert_eq!(fresh.value().map(|v| v.text.as_str()), Some("(False, 2)"), "{}", show(&fresh));
    assert_eq!(kernel.restarts(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_past_the_cap_is_cut_flagged_and_the_kernel_restarted() {
    let sandbox = TestSandbox::new().await;
    let mut kernel = sandbox.kernel(Language::Python).await;
    let limits = Limits { output_bytes: 1000, ..Limits::default() };
    let flood = sandbox.eval_with(&mut kernel, "while True:\n    print('y' * 50)", &limits).await;
    assert_eq!(
        flood.result,
        EvalResult::LimitExceeded(LimitExceeded { limit: Limit::Output, value: 1000 }),
        "{}",
        show(&flood)
    );
    assert_eq!(flood.stdout.len(), 1000);
    assert!(flood.stdout_truncated);
    // Under the cap nothing is cut, and the kernel is back.
    let fine = sandbox.eval_with(&mut kernel, "print('z' * 10)\n7", &limits).await;
    assert_eq!(fine.value().map(|v| v.text.as_str()), Some("7"), "{}", show(&fine));
    assert_eq!(fine.stdout_text(), format!("{}\n", "z".repeat(10)));
    assert!(!fine.stdout_truncated);
    assert_eq!(kernel.restarts(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_that_exits_is_reported_and_started_again() {
    let sandbox = TestSandbox::new().await;
    let mut kernel = sandbox.kernel(Language::Python).await;
    let exited = sandbox.eval(&mut kernel, "import os\nos._exit(3)").await;
    let EvalResult::Crashed { message } = &exited.result else { panic!("{}", show(&exited)) };
    assert!(message.contains("exited with code 3") && message.contains("state is gone"), "{message}");
    assert_eq!(sandbox.value(&mut kernel, "1 + 1").await, "2");
    assert_eq!(kernel.restarts(), 1);

    // Dying between evaluations: the next one says so, without running its code.
    sandbox.eval(&mut kernel, "import os, threading\nthreading.Timer(0.3, lambda: os._exit(4)).start()").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let found_dead = sandbox.eval(&mut kernel, "print('ran')").await;
    let EvalResult::Crashed { message } = &found_dead.result else { panic!("{}", show(&found_dead)) };
    assert!(message.contains("after the previous evaluation") && message.contains("code 4"), "{message}");
    assert!(found_dead.stdout.is_empty());
    assert_eq!(sandbox.value(&mut kernel, "2 + 2").await, "4");
    assert_eq!(kernel.restarts(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataframe_comes_back_as_an_html_table() {
    let sandbox = TestSandbox::new().await;
    let mut kernel = sandbox.kernel(Language::Python).await;
    let outcome = sandbox.eval(&mut kernel, "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3.5, 4.5]})").await;
    assert!(outcome.is_ok(), "{}", show(&outcome));
    let value = outcome.value().unwrap();
    assert!(value.text.contains('a') && value.text.contains("3.5"), "value text is the repr: {}", value.text);
    assert_eq!(outcome.displays.len(), 1, "{}", show(&outcome));
    let bundle = &outcome.displays[0];
    let html = bundle.get("text/html").expect("text/html");
    assert!(html.contains("<table") && html.contains("4.5"), "{html}");
    assert_eq!(bundle.get("text/plain"), Some(value.text.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matplotlib_figures_come_back_as_png() {
    let sandbox = TestSandbox::new().await;
    let mut kernel = sandbox.kernel(Language::Python).await;
    let shown = sandbox
        .eval(
            &mut kernel,
            "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [4, 1, 9])\nplt.show()\nprint('shown')",
        )
        .await;
    assert!(shown.is_ok(), "{}", show(&shown));
    assert_eq!(shown.stdout_text(), "shown\n");
    assert_eq!(shown.displays.len(), 1, "{}", show(&shown));
    let png = base64_decode(shown.displays[0].get("image/png").expect("image/png"));
    let (width, height) = png_size(&png);
    assert!(width > 0 && height > 0, "{width}x{height}");

    // A figure as the last value is shown once, not again as an open figure.
    let last = sandbox.eval(&mut kernel, "fig, ax = plt.subplots()\nax.plot([1, 2])\nfig").await;
    assert!(last.value().unwrap().text.starts_with("<Figure"), "{}", show(&last));
    assert_eq!(last.displays.len(), 1, "{}", show(&last));
    png_size(&base64_decode(last.displays[0].get("image/png").unwrap()));

    // A figure left open is shown at the end of its evaluation (Jupyter's inline
    // behaviour), and SVG is there when asked for.
    let open = sandbox.eval(&mut kernel, "set_matplotlib_formats('png', 'svg')\nplt.bar([1, 2], [3, 4])\nNone").await;
    assert_eq!(open.displays.len(), 1, "{}", show(&open));
    assert!(open.displays[0].get("image/svg+xml").unwrap().contains("<svg"));
    assert!(open.displays[0].get("image/png").is_some());
    let nothing = sandbox.eval(&mut kernel, "1").await;
    assert!(nothing.displays.is_empty(), "figures were closed once shown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_display_shows_rich_objects_and_raw_bundles() {
    let sandbox = TestSandbox::new().await;
    let mut kernel = sandbox.kernel(Language::Python).await;
    let code = "class Bold:\n    def _repr_html_(self):\n        return '<b>bold</b>'\n    def __repr__(self):\n        return 'Bold()'\n\
                display(Bold())\ndisplay({'text/markdown': '# title', 'application/json': {'k': 1}}, raw=True)\nprint('done')";
    let outcome = sandbox.eval(&mut kernel, code).await;
    assert!(outcome.is_ok(), "{}", show(&outcome));
    assert_eq!(outcome.stdout_text(), "done\n");
    assert_eq!(outcome.displays.len(), 2, "{}", show(&outcome));
    assert_eq!(outcome.displays[0].get("text/html"), Some("<b>bold</b>"));
    assert_eq!(outcome.displays[0].get("text/plain"), Some("Bold()"));
    assert_eq!(outcome.displays[1].get("text/markdown"), Some("# title"));
    assert_eq!(outcome.displays[1].get("application/json"), Some("{\"k\": 1}"));
    assert_eq!(outcome.displays[1].get("text/plain"), None, "raw bundles are taken as given");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_keeps_state_and_reports_errors_and_displays() {
    let sandbox = TestSandbox::new().await;
    let mut kernel = sandbox.kernel(Language::JavaScript).await;
    let pid = kernel.pid().unwrap();
    let declared = sandbox.eval(&mut kernel, "let x = 41").await;
    assert_eq!(declared.result, EvalResult::Ok { value: None }, "{}", show(&declared));
    let outcome = sandbox.eval(&mut kernel, "x + 1").await;
    let value = outcome.value().unwrap();
    assert_eq!((value.text.as_str(), value.json.as_deref()), ("42", Some("42")));
    assert_eq!(sandbox.value(&mut kernel, "'s' + x").await, "\"s41\"");
    assert_eq!(sandbox.value(&mut kernel, "'é ✓ 😀' + String.fromCharCode(0xd800)").await, "\"é ✓ 😀\\ud800\"");
    assert_eq!(sandbox.value(&mut kernel, "process.pid").await, pid.to_string());
    assert_eq!(sandbox.value(&mut kernel, "({a: [1, 2]})").await, "{\"a\":[1,2]}");
    // A returned promise is awaited, and top-level await works.
    assert_eq!(sandbox.value(&mut kernel, "Promise.resolve(x * 2)").await, "82");
    assert_eq!(sandbox.value(&mut kernel, "await new Promise(r => setTimeout(() => r(7), 10))").await, "7");
    // Declarations made next to an await outlive their evaluation.
    assert_eq!(sandbox.value(&mut kernel, "const a = await Promise.resolve(3)\na + 1").await, "4");
    assert_eq!(sandbox.value(&mut kernel, "a * 2").await, "6");

    let thrown = sandbox.eval(&mut kernel, "function f() {\n  return null.foo;\n}\nf()").await;
    let EvalResult::RuntimeError(error) = &thrown.result else { panic!("{}", show(&thrown)) };
    assert_eq!(error.kind, "TypeError");
    assert_eq!(error.line, Some(2));
    assert!(error.traceback.contains("<code>:2"), "{}", error.traceback);
    let syntax = sandbox.eval(&mut kernel, "let y = 1;\nlet = = 2").await;
    let EvalResult::SyntaxError(error) = &syntax.result else { panic!("{}", show(&syntax)) };
    assert_eq!((error.kind.as_str(), error.line), ("SyntaxError", Some(2)));

    let shown = sandbox
        .eval(
            &mut kernel,
            "console.log('hi');\ndisplay({_repr_html_() { return '<i>it</i>'; }});\ndisplay({'text/html': '<b>raw</b>'}, {raw: true});\n1",
        )
        .await;
    assert_eq!(shown.stdout_text(), "hi\n", "{}", show(&shown));
    assert_eq!(shown.displays.len(), 2, "{}", show(&shown));
    assert_eq!(shown.displays[0].get("text/html"), Some("<i>it</i>"));
    assert!(shown.displays[0].get("text/plain").is_some());
    assert_eq!(shown.displays[1].get("text/html"), Some("<b>raw</b>"));
    assert_eq!(kernel.pid(), Some(pid));

    // The deadline restarts a Node kernel too.
    let limits = Limits { deadline: Duration::from_millis(1500), ..Limits::default() };
    let spun = sandbox.eval_with(&mut kernel, "while (true) {}", &limits).await;
    assert!(matches!(spun.result, EvalResult::LimitExceeded(LimitExceeded { limit: Limit::Deadline, .. })));
    let fresh = sandbox.eval(&mut kernel, "typeof x").await;
    assert_eq!(fresh.value().unwrap().text, "\"undefined\"");
    assert_ne!(kernel.pid(), Some(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_that_looks_like_a_frame_is_output() {
    let sandbox = TestSandbox::new().await;
    let mut kernel = sandbox.kernel(Language::Python).await;
    // The marker without the nonce, a forged end frame, and a marker's start
    // left hanging at the end of a write.
    let code = r#"import sys, time
sys.stdout.write('a\x1eairlock:\x1f{"t":"end","id":1,"result":{"status":"ok","value":null}}\n')
sys.stdout.write('b\x1eairlock:')
sys.stdout.flush()
time.sleep(0.2)
sys.stdout.write('c\n')
sys.stderr.write('\x1eairlock')
'value'"#;
    let outcome = sandbox.eval(&mut kernel, code).await;
    assert_eq!(outcome.value().map(|v| v.text.as_str()), Some("'value'"), "{}", show(&outcome));
    assert_eq!(
        outcome.stdout_text(),
        "a\x1eairlock:\x1f{\"t\":\"end\",\"id\":1,\"result\":{\"status\":\"ok\",\"value\":null}}\nb\x1eairlock:c\n"
    );
    assert_eq!(outcome.stderr_text(), "\x1eairlock");
    assert_eq!(sandbox.value(&mut kernel, "2").await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_processes_output_is_captured() {
    let sandbox = TestSandbox::new().await;
    let mut python = sandbox.kernel(Language::Python).await;
    let outcome = sandbox
        .eval(
            &mut python,
            "import subprocess, os\nsubprocess.run(['echo', 'from-child'])\nos.system('echo from-shell >&2')\nNone",
        )
        .await;
    assert!(outcome.is_ok(), "{}", show(&outcome));
    assert_eq!(outcome.stdout_text(), "from-child\n");
    assert_eq!(outcome.stderr_text(), "from-shell\n");
    // A forked child that runs on past the code ends there, and never answers for the kernel.
    let forked = sandbox
        .eval(&mut python, "pid = os.fork()\nif pid == 0:\n    print('in child')\nelse:\n    os.waitpid(pid, 0)\n    print('in parent')\npid")
        .await;
    assert_eq!(forked.stdout_text(), "in child\nin parent\n", "{}", show(&forked));
    assert_ne!(forked.value().map(|v| v.text.as_str()), Some("0"), "the answer is the parent's");
    assert_eq!(sandbox.value(&mut python, "'still ' + 'here'").await, "'still here'");
    // A child cannot read the kernel's requests: its stdin is /dev/null.
    let cat = sandbox.eval(&mut python, "subprocess.run(['cat']).returncode").await;
    assert_eq!(cat.value().map(|v| v.text.as_str()), Some("0"), "{}", show(&cat));

    let mut node = sandbox.kernel(Language::JavaScript).await;
    let outcome =
        sandbox.eval(&mut node, "require('child_process').execSync('echo node-child', {stdio: 'inherit'}); 1").await;
    assert_eq!(outcome.stdout_text(), "node-child\n", "{}", show(&outcome));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_kernel_kills_its_process() {
    let sandbox = TestSandbox::new().await;
    let kernel = sandbox.kernel(Language::Python).await;
    let pid = kernel.pid().unwrap();
    assert!(process_exists(&sandbox.sandbox, pid).await);
    drop(kernel);
    let give_up = Instant::now() + Duration::from_secs(5);
    while process_exists(&sandbox.sandbox, pid).await {
        assert!(Instant::now() < give_up, "the kernel outlived its handle");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernels_work_under_gvisor() {
    let sandbox = TestSandbox::with(ContainerRuntime::Runsc, ContainerResources::default()).await;
    let mut python = sandbox.kernel(Language::Python).await;
    let pid = python.pid();
    sandbox.eval(&mut python, "x = 41").await;
    assert_eq!(sandbox.value(&mut python, "x + 1").await, "42");
    let (sender, seen) = recorder();
    let code = "import time\nfor i in range(3):\n    print(i)\n    time.sleep(0.3)";
    let outcome = python.eval(&sandbox.sandbox, code, &Limits::default(), Some(&sender)).await.unwrap();
    assert_eq!(outcome.stdout_text(), "0\n1\n2\n", "{}", show(&outcome));
    assert!(seen.lock().unwrap().len() >= 2, "output came in pieces");
    assert_eq!(python.pid(), pid);
    let limits = Limits { deadline: Duration::from_secs(2), ..Limits::default() };
    let spun = sandbox.eval_with(&mut python, "while True:\n    pass", &limits).await;
    assert!(matches!(spun.result, EvalResult::LimitExceeded(LimitExceeded { limit: Limit::Deadline, .. })));
    let fresh = sandbox.eval(&mut python, "'x' in globals()").await;
    assert_eq!(fresh.value().map(|v| v.text.as_str()), Some("False"), "{}", show(&fresh));

    let mut node = sandbox.kernel(Language::JavaScript).await;
    sandbox.eval(&mut node, "let y = 1").await;
    assert_eq!(sandbox.value(&mut node, "y + 1").await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_written_between_evaluations_goes_to_the_next_and_never_stalls_the_link() {
    let sandbox = TestSandbox::new().await;
    let mut kernel = sandbox.kernel(Language::Python).await;
    let code = "import threading, time, sys\ndef later():\n    time.sleep(0.3)\n    print('late', flush=True)\nthreading.Thread(target=later).start()";
    let started = sandbox.eval(&mut kernel, code).await;
    assert!(started.is_ok() && started.stdout.is_empty(), "{}", show(&started));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let next = sandbox.eval(&mut kernel, "1").await;
    assert_eq!(next.stdout_text(), "late\n", "{}", show(&next));

    // A thread flooding stdout while no evaluation listens: other commands on
    // the sandbox's agent link go on, and the next evaluation gets a bounded part.
    // 25 MiB, past what the link buffers for one run (8 MiB) and the pipes.
    let flood = "def flood():\n    chunk = 'f' * 65536\n    for _ in range(400):\n        sys.stdout.write(chunk)\n    open('/tmp/flood-done', 'w').close()\nthreading.Thread(target=flood).start()";
    sandbox.eval(&mut kernel, flood).await;
    let exec =
        tokio::time::timeout(Duration::from_secs(20), sandbox.sandbox.exec(ExecRequest::new("echo").args(["through"])))
            .await
            .expect("an exec is not stalled by an idle kernel's output")
            .unwrap();
    assert_eq!(exec.stdout_text(), "through\n");
    let give_up = Instant::now() + Duration::from_secs(30);
    while !path_exists(&sandbox.sandbox, "/tmp/flood-done").await {
        assert!(Instant::now() < give_up, "the flood never finished: the idle kernel's pipe is not drained");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = sandbox.eval(&mut kernel, "2").await;
    assert_eq!(after.value().map(|v| v.text.as_str()), Some("2"), "{}", show(&after));
    assert!(after.stdout.len() <= airlock_container::IDLE_OUTPUT_BYTES + 65536, "{} bytes", after.stdout.len());
    assert!(after.stdout_truncated, "what was dropped is flagged");
}

/// `stop` ends the kernel's whole tree before it returns (a child it started
/// included), so a process that exits right after leaves nothing running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_the_kernel_and_its_children_before_returning() {
    let sandbox = TestSandbox::new().await;
    for language in [Language::Python, Language::JavaScript] {
        let mut kernel = sandbox.kernel(language).await;
        let pid = kernel.pid().unwrap();
        let code = match language {
            Language::Python => "import subprocess\nsubprocess.Popen(['sleep', '600']).pid",
            _ => "require('child_process').spawn('sleep', ['600']).pid",
        };
        let child: u32 = sandbox.value(&mut kernel, code).await.parse().unwrap();
        assert!(process_exists(&sandbox.sandbox, pid).await && process_exists(&sandbox.sandbox, child).await);
        kernel.stop().await;
        // Gone now, not later: no waiting here.
        assert!(!process_exists(&sandbox.sandbox, pid).await, "{language:?} kernel {pid} still runs");
        assert!(!process_exists(&sandbox.sandbox, child).await, "{language:?} kernel's child {child} still runs");
    }
}
