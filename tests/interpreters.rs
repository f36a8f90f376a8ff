//! Python and JavaScript in isolates: persistent contexts, isolation, errors
//! with tracebacks, escalation reasons, limits per evaluation, and a shared
//! workspace between languages.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

mod common;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use airlock::limits::MIB;
use airlock::wasm::interpreter::Interpreters;
use airlock::{EscalationReason, EvalResult, Language, Limit, Limits};
use common::{Fixture, engine, guest};

fn interpreters() -> &'static Interpreters {
    static INTERPRETERS: OnceLock<Interpreters> = OnceLock::new();
    INTERPRETERS.get_or_init(|| {
        // Fail loudly if the interpreters were not built.
        guest("python.wasm");
        guest("js.wasm");
        Interpreters::new(engine().clone(), Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/out"))
    })
}

fn small_limits() -> Limits {
    Limits { deadline: Duration::from_secs(2), memory_bytes: 256 * MIB, output_bytes: 64 * 1024, ..Limits::default() }
}

async fn context(language: Language, fixture: &Fixture) -> String {
    interpreters().create_context(language, fixture.workspace.clone(), small_limits()).await.unwrap()
}

async fn eval(id: &str, code: &str) -> airlock::EvalOutcome {
    interpreters().eval(id, code).await.unwrap()
}

#[tokio::test]
async fn python_state_persists_across_evaluations() {
    let fixture = Fixture::new();
    let id = context(Language::Python, &fixture).await;
    assert!(eval(&id, "import json\nx = 40\ndef add(a, b):\n    return a + b").await.is_ok());
    let outcome = eval(&id, "print('sum is', add(x, 2))\njson.dumps({'x': x})").await;
    assert_eq!(outcome.stdout_text(), "sum is 42\n");
    let value = outcome.value().unwrap();
    assert_eq!(value.text, "'{\"x\": 40}'");
    assert_eq!(value.json.as_deref(), Some("\"{\\\"x\\\": 40}\""));
    let outcome = eval(&id, "[x, x * 2, {'k': None}]").await;
    assert_eq!(outcome.value().unwrap().json.as_deref(), Some("[40, 80, {\"k\": null}]"));
    let outcome = eval(&id, "object()").await;
    assert!(outcome.value().unwrap().text.starts_with("<object object"));
    assert_eq!(outcome.value().unwrap().json, None);
    interpreters().delete(&id).unwrap();
}

#[tokio::test]
async fn python_standard_library_works() {
    let fixture = Fixture::new();
    let id = context(Language::Python, &fixture).await;
    let code = r#"
import json, re, math, datetime, collections, itertools, pathlib
assert re.findall(r"\d+", "a1b22") == ["1", "22"]
assert math.isclose(math.sqrt(2) ** 2, 2)
assert datetime.date(2024, 2, 29).isoformat() == "2024-02-29"
assert collections.Counter("aab")["a"] == 2
assert list(itertools.islice(itertools.count(), 3)) == [0, 1, 2]
pathlib.Path("/workspace/py.txt").write_text("from pathlib")
with open("/workspace/py2.txt", "w") as f:
    f.write("from open")
sorted(p.name for p in pathlib.Path("/workspace").iterdir())
"#;
    let outcome = eval(&id, code).await;
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(outcome.value().unwrap().json.as_deref(), Some("[\"py.txt\", \"py2.txt\"]"));
    assert_eq!(std::fs::read_to_string(fixture.path("py.txt")).unwrap(), "from pathlib");
    assert_eq!(std::fs::read_to_string(fixture.path("py2.txt")).unwrap(), "from open");
}

#[tokio::test]
async fn javascript_state_persists_and_promises_settle() {
    let fixture = Fixture::new();
    let id = context(Language::JavaScript, &fixture).await;
    assert!(eval(&id, "var counter = 1; function bump() { counter += 1; return counter; }").await.is_ok());
    let outcome = eval(&id, "console.log('bumped', bump()); ({a: counter, list: [1, 'two']})").await;
    assert_eq!(outcome.stdout_text(), "bumped 2\n");
    assert_eq!(outcome.value().unwrap().json.as_deref(), Some("{\"a\":2,\"list\":[1,\"two\"]}"));
    let outcome = eval(&id, "(async () => { const v = await Promise.resolve(20); return v + counter; })()").await;
    assert_eq!(outcome.value().unwrap().text, "22");
    let outcome = eval(&id, "Promise.reject(new TypeError('nope'))").await;
    let EvalResult::RuntimeError(error) = &outcome.result else { panic!("{outcome:?}") };
    assert_eq!((error.kind.as_str(), error.message.as_str()), ("TypeError", "nope"));
    let outcome = eval(&id, "console.error('to stderr'); undefined").await;
    assert_eq!(outcome.stderr_text(), "to stderr\n");
    assert_eq!(outcome.value(), None);
}

#[tokio::test]
async fn contexts_are_isolated_from_each_other() {
    let fixture = Fixture::new();
    for language in Language::ALL {
        let a = context(language, &fixture).await;
        let b = context(language, &fixture).await;
        let (set, get) = match language {
            Language::Python => ("secret = 'only in a'", "secret"),
            Language::JavaScript => ("var secret = 'only in a'", "secret"),
        };
        assert!(eval(&a, set).await.is_ok());
        assert_eq!(eval(&a, get).await.value().unwrap().json.as_deref(), Some("\"only in a\""));
        let in_b = eval(&b, get).await;
        let EvalResult::RuntimeError(error) = &in_b.result else { panic!("{language}: {in_b:?}") };
        assert!(error.kind.contains("NameError") || error.kind.contains("ReferenceError"), "{error:?}");
        let listed: Vec<String> = interpreters().list().into_iter().map(|c| c.id).collect();
        assert!(listed.contains(&a) && listed.contains(&b));
        interpreters().delete(&a).unwrap();
        interpreters().delete(&b).unwrap();
        assert!(!interpreters().list().iter().any(|c| c.id == a));
        let gone = interpreters().eval(&a, "1").await.unwrap_err().to_string();
        assert!(gone.contains("no context"), "{gone}");
    }
}

#[tokio::test]
async fn errors_carry_kind_message_and_traceback() {
    let fixture = Fixture::new();
    let py = context(Language::Python, &fixture).await;
    let outcome = eval(&py, "def inner():\n    return 1 / 0\n\ndef outer():\n    return inner()\n\nouter()").await;
    let EvalResult::RuntimeError(error) = &outcome.result else { panic!("{outcome:?}") };
    assert_eq!(error.kind, "ZeroDivisionError");
    assert_eq!(error.line, Some(2));
    assert!(error.traceback.contains("in outer") && error.traceback.contains("in inner"), "{}", error.traceback);
    assert!(!error.traceback.contains("app.py"), "host frames leaked: {}", error.traceback);

    let outcome = eval(&py, "def broken(:\n    pass").await;
    let EvalResult::SyntaxError(error) = &outcome.result else { panic!("{outcome:?}") };
    assert_eq!(error.line, Some(1));

    let js = context(Language::JavaScript, &fixture).await;
    let outcome = eval(&js, "let = ;").await;
    assert!(matches!(outcome.result, EvalResult::SyntaxError(_)), "{outcome:?}");
    let outcome = eval(&js, "function f() { null.x }\nf()").await;
    let EvalResult::RuntimeError(error) = &outcome.result else { panic!("{outcome:?}") };
    assert_eq!(error.kind, "TypeError");
}

#[tokio::test]
async fn code_that_needs_a_container_asks_for_escalation() {
    let fixture = Fixture::new();
    let cases: [(Language, &str, EscalationReason); 8] = [
        (Language::Python, "import subprocess\nsubprocess.run(['git', 'status'])", EscalationReason::Subprocess),
        (Language::Python, "import os\nos.system('ls')", EscalationReason::Subprocess),
        (Language::Python, "import numpy", EscalationReason::MissingModule("numpy".into())),
        (Language::Python, "import socket\nsocket.create_connection(('127.0.0.1', 80))", EscalationReason::Network),
        (
            Language::Python,
            "try:\n    import subprocess; subprocess.check_output('ls')\nexcept Exception:\n    pass",
            EscalationReason::Subprocess,
        ),
        (Language::JavaScript, "require('child_process').execSync('ls')", EscalationReason::Subprocess),
        (Language::JavaScript, "require('left-pad')", EscalationReason::MissingModule("left-pad".into())),
        // fetch goes out through the egress hook (tests/egress_isolates.rs); raw sockets still escalate.
        (Language::JavaScript, "try { require('net').connect(80) } catch (e) {}", EscalationReason::Network),
    ];
    for (language, code, expected) in cases {
        let id = context(language, &fixture).await;
        let outcome = eval(&id, code).await;
        assert_eq!(outcome.result, EvalResult::NeedsEscalation { reason: expected }, "{language}: {code}");
        interpreters().delete(&id).unwrap();
    }
}

#[tokio::test]
async fn limits_stop_hostile_code_and_reset_only_that_context() {
    let fixture = Fixture::new();
    let hostile: [(Language, &str, Limit); 6] = [
        (Language::Python, "while True:\n    pass", Limit::Deadline),
        (Language::Python, "hoard = []\nwhile True:\n    hoard.append(bytearray(1 << 20))", Limit::Memory),
        (Language::Python, "while True:\n    print('flood' * 100)", Limit::Output),
        (Language::JavaScript, "while (true) {}", Limit::Deadline),
        (
            Language::JavaScript,
            "const hoard = []; while (true) { hoard.push(new Uint8Array(1 << 24)); }",
            Limit::Memory,
        ),
        (Language::JavaScript, "while (true) { console.log('flood'.repeat(100)); }", Limit::Output),
    ];
    for (language, code, limit) in hostile {
        let bystander = context(language, &fixture).await;
        let victim = context(language, &fixture).await;
        let keep = if language == Language::Python { "kept = 7" } else { "var kept = 7" };
        assert!(eval(&bystander, keep).await.is_ok());
        assert!(eval(&victim, keep).await.is_ok());

        let outcome = eval(&victim, code).await;
        let EvalResult::LimitExceeded(hit) = outcome.result else { panic!("{language} {limit:?}: {outcome:?}") };
        assert_eq!(hit.limit, limit, "{language}: {code}");
        if limit == Limit::Output {
            assert!(outcome.stdout_truncated);
        }
        // The victim was reset: it works again, without its old state.
        let after = eval(&victim, "kept").await;
        assert!(matches!(after.result, EvalResult::RuntimeError(_)), "{language}: {after:?}");
        assert!(eval(&victim, "1 + 1").await.value().is_some());
        // The bystander lives on with its state.
        assert_eq!(eval(&bystander, "kept").await.value().unwrap().text, "7");
        interpreters().delete(&bystander).unwrap();
        interpreters().delete(&victim).unwrap();
    }
}

#[tokio::test]
async fn a_file_written_by_python_is_read_by_javascript() {
    let fixture = Fixture::new();
    let py = context(Language::Python, &fixture).await;
    let js = context(Language::JavaScript, &fixture).await;
    let wrote =
        eval(&py, "import json\nopen('/workspace/shared.json', 'w').write(json.dumps({'from': 'python', 'n': 3}))")
            .await;
    assert!(wrote.is_ok(), "{wrote:?}");
    let read = eval(&js, "const data = JSON.parse(fs.readFile('shared.json')); data.from + ':' + data.n").await;
    assert_eq!(read.value().unwrap().text, "\"python:3\"");
    let written = eval(&js, "require('fs').writeFile('back.txt', 'from js'); fs.readdir('.')").await;
    assert_eq!(written.value().unwrap().json.as_deref(), Some("[\"back.txt\",\"shared.json\"]"));
    assert_eq!(eval(&py, "open('/workspace/back.txt').read()").await.value().unwrap().text, "'from js'");
}

#[tokio::test]
async fn one_shot_runs_discard_their_context() {
    let fixture = Fixture::new();
    let outcome =
        interpreters().run(Language::Python, fixture.workspace.clone(), "print(1 + 1)", small_limits()).await.unwrap();
    assert_eq!(outcome.stdout_text(), "2\n");
    let outcome = interpreters()
        .run(Language::JavaScript, fixture.workspace.clone(), "console.log(1 + 1)", small_limits())
        .await
        .unwrap();
    assert_eq!(outcome.stdout_text(), "2\n");
}

#[tokio::test]
async fn escapes_from_the_workspace_are_denied_to_interpreters_too() {
    let fixture = Fixture::new();
    let py = context(Language::Python, &fixture).await;
    let outcome = eval(&py, "open('/workspace/../secret.txt').read()").await;
    let EvalResult::RuntimeError(error) = &outcome.result else { panic!("{outcome:?}") };
    assert!(error.kind == "PermissionError" || error.kind == "FileNotFoundError", "{error:?}");
    let js = context(Language::JavaScript, &fixture).await;
    let outcome = eval(&js, "fs.readFile('/etc/passwd')").await;
    assert!(matches!(outcome.result, EvalResult::RuntimeError(_)), "{outcome:?}");
    assert!(!outcome.stdout_text().contains("root:"));
}

#[tokio::test]
async fn python_value_is_that_of_the_last_statement_however_it_is_laid_out() {
    let fixture = Fixture::new();
    let id = context(Language::Python, &fixture).await;
    // In order, in one context; each expected value is what CPython's syntax
    // tree says: the last statement's value if it is an expression.
    let cases: &[(&str, Option<&str>)] = &[
        ("x = 1 + 1", None),
        ("x", Some("2")),
        ("x = 1; 5", Some("5")),
        ("5; x = 1", None),
        ("x = 1\n5", Some("5")),
        ("x == 1", Some("True")),
        ("x <= 0", Some("False")),
        ("x += 1", None),
        ("a, b = x, 4\nb", Some("4")),
        ("d = {}\nd['k'] = x", None),
        ("d['k']", Some("2")),
        ("n: int = 7", None),
        ("n", Some("7")),
        ("def f(a):\n    return a * 2\nf(\n    n,\n)", Some("14")),
        ("g = f(\n    1,\n)", None),
        ("g", Some("2")),
        ("if True:\n    99", None),
        ("for i in range(3):\n    i\n", None),
        ("import functools\n@functools.cache\ndef h():\n    return 8\nh()", Some("8")),
        ("s = '''\nx = 1\n'''\ns", Some(r"'\nx = 1\n'")),
        ("t = '''\n5'''", None),
        ("t", Some(r"'\n5'")),
        ("print('a;b')", None),
        ("match = 3\nmatch", Some("3")),
        ("# only a comment", None),
        ("x\n# trailing comment", Some("2")),
        ("try:\n    1 / 0\nexcept ZeroDivisionError:\n    'caught'", None),
        ("[i for i in range(3)]", Some("[0, 1, 2]")),
        ("x = [\n    1,\n    2,\n]\nlen(x)", Some("2")),
        ("'''doc'''", Some("'doc'")),
        ("f'{x!r}'", Some("'[1, 2]'")),
        ("passing = 1\npassing", Some("1")),
        ("formatted = 2\nformatted", Some("2")),
        ("y = lambda v=1: v\ny()", Some("1")),
        ("x if x else\\\n 0", Some("[1, 2]")),
    ];
    for (code, expected) in cases {
        let outcome = eval(&id, code).await;
        assert!(outcome.is_ok(), "{code:?}: {outcome:?}");
        assert_eq!(outcome.value().map(|v| v.text.as_str()), *expected, "{code:?}");
    }
    assert_eq!(eval(&id, "print('a;b')").await.stdout_text(), "a;b\n");
    // Syntax errors keep their line, wherever the code would be split.
    for (code, kind, line) in
        [(" x", "IndentationError", 1), ("x = 1\ny = (", "SyntaxError", 2), ("x = (\n1\n]", "SyntaxError", 3)]
    {
        let outcome = eval(&id, code).await;
        let EvalResult::SyntaxError(error) = &outcome.result else { panic!("{code:?}: {outcome:?}") };
        assert_eq!((error.kind.as_str(), error.line), (kind, Some(line)), "{code:?}");
    }
    // A runtime error in the last statement reports that statement's line.
    let outcome = eval(&id, "ok = 1\n\nundefined_name").await;
    let EvalResult::RuntimeError(error) = &outcome.result else { panic!("{outcome:?}") };
    assert_eq!((error.kind.as_str(), error.line), ("NameError", Some(3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_contexts_serve_any_workspace_fresh_under_the_callers_limits() {
    let warm =
        Interpreters::new(engine().clone(), Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/out")).keep_warm(2);
    let (first, second) = (Fixture::new(), Fixture::new());
    std::fs::write(first.path("f.txt"), "first's file").unwrap();
    std::fs::write(second.path("f.txt"), "second's file").unwrap();
    async fn wait_for(warm: &Interpreters, language: Language, count: usize) {
        let give_up = std::time::Instant::now() + Duration::from_secs(60);
        while warm.warm_ready(language) < count {
            assert!(std::time::Instant::now() < give_up, "the {language} pool did not fill to {count}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(warm.warm_ready(Language::Python), 0, "nothing is made before first use");
    warm.prewarm(Language::Python).await.unwrap();
    wait_for(&warm, Language::Python, 2).await;

    // A warm context takes the workspace of whichever run takes it, and leaves
    // nothing behind for the next.
    let code = "print(open('f.txt').read())\nopen('out.txt', 'w').write('written')\ntry:\n    left\nexcept NameError:\n    print('fresh')\nleft = 1";
    let in_first = warm.run(Language::Python, first.workspace.clone(), code, small_limits()).await.unwrap();
    assert_eq!(in_first.stdout_text(), "first's file\nfresh\n", "{in_first:?}");
    assert_eq!(warm.warm_ready(Language::Python), 1, "the run did not take a warm context");
    let in_second = warm.run(Language::Python, second.workspace.clone(), code, small_limits()).await.unwrap();
    assert_eq!(in_second.stdout_text(), "second's file\nfresh\n", "{in_second:?}");
    assert_eq!(std::fs::read_to_string(first.path("out.txt")).unwrap(), "written");
    assert_eq!(std::fs::read_to_string(second.path("out.txt")).unwrap(), "written");
    let listed = warm.run(
        Language::Python,
        second.workspace.clone(),
        "import os\nsorted(os.listdir('/workspace'))",
        small_limits(),
    );
    assert_eq!(listed.await.unwrap().value().unwrap().text, "['f.txt', 'out.txt']");

    // The caller's limits hold, not the pool's defaults.
    wait_for(&warm, Language::Python, 2).await;
    let capped = Limits { output_bytes: 10, ..small_limits() };
    let flood = warm.run(Language::Python, first.workspace.clone(), "print('x' * 100)", capped).await.unwrap();
    assert!(flood.stdout_truncated && flood.stdout.len() == 10, "{flood:?}");
    assert!(matches!(flood.result, EvalResult::LimitExceeded(hit) if hit.limit == Limit::Output), "{flood:?}");
    let quick = Limits { deadline: Duration::from_millis(300), ..small_limits() };
    let spin = warm.run(Language::Python, first.workspace.clone(), "while True:\n    pass", quick).await.unwrap();
    assert!(matches!(spin.result, EvalResult::LimitExceeded(hit) if hit.limit == Limit::Deadline), "{spin:?}");
    let bomb = warm.run(Language::Python, first.workspace.clone(), "b = bytearray(300 * 1024 * 1024)", small_limits());
    let bomb = bomb.await.unwrap();
    assert!(matches!(bomb.result, EvalResult::LimitExceeded(hit) if hit.limit == Limit::Memory), "{bomb:?}");

    // Limits a warm context cannot meet leave it in the pool; the run starts
    // cold and fails as a cold start would.
    wait_for(&warm, Language::Python, 2).await;
    let tiny = Limits { memory_bytes: MIB, ..small_limits() };
    let refused = warm.run(Language::Python, first.workspace.clone(), "1", tiny).await.unwrap_err().to_string();
    assert!(refused.contains("memory"), "{refused}");
    assert_eq!(warm.warm_ready(Language::Python), 2);

    // New contexts come from the pool too, and keep their state.
    let id = warm.create_context(Language::Python, second.workspace.clone(), small_limits()).await.unwrap();
    assert!(warm.eval(&id, "kept = open('f.txt').read()").await.unwrap().is_ok());
    assert_eq!(warm.eval(&id, "kept").await.unwrap().value().unwrap().text, "\"second's file\"");
    let info = warm.list().into_iter().find(|c| c.id == id).unwrap();
    assert_eq!(info.evaluations, 2, "the warm-up is not counted");

    // JavaScript has its own pool.
    warm.prewarm(Language::JavaScript).await.unwrap();
    wait_for(&warm, Language::JavaScript, 2).await;
    let js =
        warm.run(Language::JavaScript, first.workspace.clone(), "console.log(fs.readFile('f.txt'))", small_limits());
    assert_eq!(js.await.unwrap().stdout_text(), "first's file\n");
}

#[test]
fn a_refill_queued_when_its_runtime_goes_leaves_the_pool_working() {
    let warm =
        Interpreters::new(engine().clone(), Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/out")).keep_warm(2);
    // One blocking thread, busy, so the refill is still queued when the
    // runtime is dropped; whether it then runs or is dropped unstarted, the
    // pool must not be left marked as being refilled (the unit test of
    // `RefillMark` covers the dropped case on its own).
    let runtime = tokio::runtime::Builder::new_current_thread().max_blocking_threads(1).enable_all().build().unwrap();
    runtime.block_on(async {
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(200)));
        warm.prewarm(Language::JavaScript).await.unwrap();
    });
    drop(runtime);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        warm.prewarm(Language::JavaScript).await.unwrap();
        let give_up = std::time::Instant::now() + Duration::from_secs(60);
        while warm.warm_ready(Language::JavaScript) < 2 {
            assert!(std::time::Instant::now() < give_up, "the pool is stuck after its runtime went away");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let fixture = Fixture::new();
        let outcome = warm.run(Language::JavaScript, fixture.workspace.clone(), "1 + 1", small_limits()).await;
        assert_eq!(outcome.unwrap().value().unwrap().text, "2");
    });
}
