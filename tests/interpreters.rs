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
        (Language::Python, "try:\n    import subprocess; subprocess.check_output('ls')\nexcept Exception:\n    pass", EscalationReason::Subprocess),
        (Language::JavaScript, "require('child_process').execSync('ls')", EscalationReason::Subprocess),
        (Language::JavaScript, "require('left-pad')", EscalationReason::MissingModule("left-pad".into())),
        (Language::JavaScript, "try { fetch('http://127.0.0.1/') } catch (e) {}", EscalationReason::Network),
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
        (Language::JavaScript, "const hoard = []; while (true) { hoard.push(new Uint8Array(1 << 24)); }", Limit::Memory),
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
    let wrote = eval(&py, "import json\nopen('/workspace/shared.json', 'w').write(json.dumps({'from': 'python', 'n': 3}))").await;
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
    let outcome = interpreters().run(Language::Python, fixture.workspace.clone(), "print(1 + 1)", small_limits()).await.unwrap();
    assert_eq!(outcome.stdout_text(), "2\n");
    let outcome = interpreters().run(Language::JavaScript, fixture.workspace.clone(), "console.log(1 + 1)", small_limits()).await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spare_contexts_serve_repeat_one_shots_fresh_and_only_for_their_workspace() {
    let spares = Interpreters::new(engine().clone(), Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/out")).keep_spares(4);
    let fixture = Fixture::new();
    let other = Fixture::new();
    let run = |fixture: &Fixture, code: &'static str| {
        spares.run(Language::Python, fixture.workspace.clone(), code, small_limits())
    };
    // A workspace's first one-shot makes no spare; its second does.
    assert!(run(&fixture, "x = 5").await.unwrap().is_ok());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(spares.spares_ready(), 0, "a spare for a workspace used once");
    assert!(run(&fixture, "x = 6").await.unwrap().is_ok());
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    while spares.spares_ready() == 0 {
        assert!(std::time::Instant::now() < give_up, "no spare was made");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The spare is fresh: nothing from earlier runs, and it takes the workspace's files.
    std::fs::write(fixture.workspace.host_path().join("f.txt"), "seen").unwrap();
    let fresh = run(&fixture, "print(open('/workspace/f.txt').read())\ntry:\n    x\nexcept NameError:\n    print('fresh')").await.unwrap();
    assert_eq!(fresh.stdout_text(), "seen\nfresh\n");
    assert_eq!(spares.spares_ready(), 0, "the spare was not used");
    // Another workspace never gets this workspace's spare.
    while spares.spares_ready() == 0 {
        assert!(std::time::Instant::now() < give_up, "no spare was made again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elsewhere = run(&other, "import os\nprint(os.listdir('/workspace'))").await.unwrap();
    assert_eq!(elsewhere.stdout_text(), "[]\n");
    assert_eq!(spares.spares_ready(), 1, "another workspace took the spare");
    spares.drop_spares(&fixture.workspace);
    assert_eq!(spares.spares_ready(), 0);
}
