//! The standard library in the Python isolate (guests/python/stdlib_bundle.py):
//! modules that used to ask for a container import and work in an isolate
//! (asyncio with its loop for isolates, unittest, sqlite3 on a workspace file,
//! zoneinfo with the bundled tzdata, and the rest), and the ones that cannot
//! work still escalate, naming the module.
//!
//! `AIRLOCK_INTERPRETERS` may name another interpreter directory (to try a
//! component before installing it into guests/out).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use airlock::limits::MIB;
use airlock::wasm::interpreter::Interpreters;
use airlock::{EscalationReason, EvalResult, Language, Limits};
use common::{Fixture, engine, guest};

fn interpreter_dir() -> PathBuf {
    match std::env::var_os("AIRLOCK_INTERPRETERS").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            // Fail loudly if the interpreter was not built.
            guest("python.wasm");
            Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/out")
        }
    }
}

fn interpreters() -> &'static Interpreters {
    static INTERPRETERS: OnceLock<Interpreters> = OnceLock::new();
    INTERPRETERS.get_or_init(|| Interpreters::new(engine().clone(), interpreter_dir()))
}

fn limits() -> Limits {
    Limits { deadline: Duration::from_secs(20), memory_bytes: 512 * MIB, output_bytes: 256 * 1024, ..Limits::default() }
}

/// Runs `code` in a fresh Python context over the fixture's workspace.
async fn run(fixture: &Fixture, code: &str) -> airlock::EvalOutcome {
    interpreters().run(Language::Python, fixture.workspace.clone(), code, limits()).await.unwrap()
}

fn json_value(outcome: &airlock::EvalOutcome) -> String {
    assert!(outcome.is_ok(), "{outcome:?}\nstderr: {}", outcome.stderr_text());
    outcome.value().and_then(|value| value.json.clone()).unwrap_or_else(|| panic!("no JSON value: {outcome:?}"))
}

#[tokio::test]
async fn modules_that_asked_for_a_container_now_import() {
    let fixture = Fixture::new();
    // Each of these answered "needs a container (missing-module)" before the bundle.
    let modules = "asyncio, unittest, sqlite3, zoneinfo, logging, argparse, pprint, pickle, tomllib, \
        zipfile, tarfile, gzip, xml.etree.ElementTree, html.parser, doctest, graphlib, contextvars, \
        concurrent.futures, queue, secrets, hmac, calendar, gettext, shelve, dbm.sqlite3, email.message, \
        urllib.parse, http.client, configparser, decimal, fractions, difflib, unittest.mock, wave, \
        xml.dom.minidom, plistlib, ipaddress, mailbox, zipapp";
    let code = format!("import {modules}\n'imported'");
    let outcome = run(&fixture, &code).await;
    assert_eq!(json_value(&outcome), "\"imported\"");
    // A module imported at build time reloads (from the bundle: its file is gone).
    let outcome = run(&fixture, "import importlib, json\nimportlib.reload(json).dumps([1])").await;
    assert_eq!(json_value(&outcome), "\"[1]\"");
}

#[tokio::test]
async fn every_bundled_module_imports_or_names_its_reason() {
    // The bundle's own list of what it ships: each module imports in one
    // fresh context, or refuses with the reason the bundle names for a module
    // that cannot work here (a submodule of a REPL that needs termios, a
    // codec over bz2). `__main__` modules are programs, not imported.
    let fixture = Fixture::new();
    let code = r#"
import importlib, io, json, contextlib, stdlib_bundle
failed, refused = {}, []
names = sorted(n for n in stdlib_bundle.shipped() if not n.endswith("__main__"))
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    for name in names:
        try:
            importlib.import_module(name)
        except stdlib_bundle.Unsupported:
            refused.append(name)
        except BaseException as error:
            failed[name] = f"{type(error).__name__}: {error}"
json.dumps([len(names), refused, failed])
"#;
    let outcome = run(&fixture, code).await;
    let value: serde_json::Value =
        serde_json::from_str(&serde_json::from_str::<String>(&json_value(&outcome)).unwrap()).unwrap();
    let imported = value[0].as_u64().unwrap();
    assert!(imported > 400, "the bundle ships {imported} modules");
    assert!(value[1].as_array().unwrap().len() < 20, "{value}");
    assert_eq!(value[2], serde_json::json!({}), "shipped modules that fail to import");
}

#[tokio::test]
async fn asyncio_runs_coroutines_in_an_isolate() {
    let fixture = Fixture::new();
    let code = r#"
import asyncio

async def double(i):
    await asyncio.sleep(0.01 * i)
    return i * 2

async def main():
    queue = asyncio.Queue()
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(double(i)) for i in range(5)]
    await queue.put(sum(t.result() for t in tasks))
    timed_out = False
    try:
        async with asyncio.timeout(0.02):
            await asyncio.sleep(30)
    except TimeoutError:
        timed_out = True
    inline = await asyncio.to_thread(lambda: 41 + 1)
    return [await queue.get(), timed_out, inline, type(asyncio.get_running_loop()).__name__]

asyncio.run(main())
"#;
    let outcome = run(&fixture, code).await;
    assert_eq!(json_value(&outcome), "[20, true, 42, \"IsolateEventLoop\"]");
    // A loop with nothing to wait for says so instead of hanging until the deadline.
    let outcome =
        run(&fixture, "import asyncio\nasync def main():\n    await asyncio.Event().wait()\nasyncio.run(main())").await;
    let EvalResult::RuntimeError(error) = &outcome.result else { panic!("{outcome:?}") };
    assert!(error.message.contains("wait forever"), "{error:?}");
}

#[tokio::test]
async fn unittest_runs_a_test_case() {
    let fixture = Fixture::new();
    let code = r#"
import io, unittest

class Arithmetic(unittest.TestCase):
    def test_adds(self):
        self.assertEqual(1 + 1, 2)
    def test_fails(self):
        self.assertEqual(1 + 1, 3)
    @unittest.skip("not here")
    def test_skipped(self):
        pass

suite = unittest.defaultTestLoader.loadTestsFromTestCase(Arithmetic)
result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(suite)
[result.testsRun, len(result.failures), len(result.skipped), result.failures[0][0].id().rsplit(".", 1)[1]]
"#;
    let outcome = run(&fixture, code).await;
    assert_eq!(json_value(&outcome), "[3, 1, 1, \"test_fails\"]");
}

#[tokio::test]
async fn zoneinfo_knows_the_zones() {
    let fixture = Fixture::new();
    let code = r#"
import datetime, zoneinfo
new_york = zoneinfo.ZoneInfo("America/New_York")
hours = lambda when: when.utcoffset().total_seconds() / 3600
[hours(datetime.datetime(2024, 1, 15, 12, tzinfo=new_york)),
 hours(datetime.datetime(2024, 7, 15, 12, tzinfo=new_york)),
 hours(datetime.datetime(2024, 7, 15, 12, tzinfo=zoneinfo.ZoneInfo("Asia/Kolkata"))),
 len(zoneinfo.available_timezones()) > 400]
"#;
    let outcome = run(&fixture, code).await;
    assert_eq!(json_value(&outcome), "[-5.0, -4.0, 5.5, true]");
}

#[tokio::test]
async fn sqlite3_keeps_a_database_in_the_workspace() {
    let fixture = Fixture::new();
    let code = r#"
import sqlite3
db = sqlite3.connect("data.db")
db.execute("create table t (k integer, v integer)")
db.executemany("insert into t values (?, ?)", ((i % 10, i) for i in range(10000)))
db.commit()
db.close()
db = sqlite3.connect("/workspace/data.db")
db.execute("select count(*), sum(v) from t where k = 3").fetchone()
"#;
    let outcome = run(&fixture, code).await;
    assert_eq!(json_value(&outcome), "[1000, 4998000]");
    // A real SQLite file, on the host side of the workspace.
    let file = std::fs::read(fixture.path("data.db")).unwrap();
    assert!(file.starts_with(b"SQLite format 3\0"), "{:?}", &file[..16.min(file.len())]);
}

#[tokio::test]
async fn modules_that_cannot_work_in_an_isolate_escalate_with_their_reason() {
    let fixture = Fixture::new();
    for module in ["ctypes", "multiprocessing", "lzma", "bz2"] {
        let outcome = run(&fixture, &format!("import {module}")).await;
        assert_eq!(
            outcome.result,
            EvalResult::NeedsEscalation { reason: EscalationReason::NativeExtension(module.into()) },
            "{module}"
        );
    }
    // Caught, the error says why.
    let outcome = run(&fixture, "try:\n    import ctypes\nexcept ImportError as e:\n    reason = str(e)\nreason").await;
    let reason = json_value(&outcome);
    assert!(reason.contains("dlopen") && reason.contains("container"), "{reason}");
    // asyncio's ways out escalate like the synchronous ones.
    let cases = [
        ("asyncio.create_subprocess_exec('ls')", EscalationReason::Subprocess),
        ("asyncio.open_connection('example.com', 80)", EscalationReason::Network),
    ];
    for (call, reason) in cases {
        let code = format!("import asyncio\nasync def main():\n    await {call}\nasyncio.run(main())");
        let outcome = run(&fixture, &code).await;
        assert_eq!(outcome.result, EvalResult::NeedsEscalation { reason }, "{call}");
    }
}
