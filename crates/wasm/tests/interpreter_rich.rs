//! Issue 14 in the isolate tier, with the real interpreter guests: rich
//! results (`display()` and a rich last value, as MIME bundles, bounded),
//! live output (chunks reach the caller while the code runs), and side
//! effects (files changed, requests sent), reported for every kind of result.
//!
//! Needs the interpreters built (`scripts/build-guests.sh`); no Docker.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use airlock_core::{
    EscalationReason, EvalOutcome, EvalResult, Language, Limit, Limits, MAX_DISPLAYS_PER_EVALUATION, OutputChunk,
    OutputSender, SideEffect, Workspace,
};
use airlock_wasm::interpreter::Interpreters;
use airlock_wasm::{EngineConfig, IsolateEngine, Outbound, OutboundBody, OutboundFuture, OutboundHttp};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http_body_util::BodyExt;

fn guests_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests/out")
}

fn interpreters() -> &'static Interpreters {
    static INTERPRETERS: OnceLock<Interpreters> = OnceLock::new();
    INTERPRETERS.get_or_init(|| {
        for file in ["python.wasm", "js.wasm"] {
            let path = guests_dir().join(file);
            assert!(path.is_file(), "{} is missing: run scripts/build-guests.sh first", path.display());
        }
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache");
        let engine = IsolateEngine::new(EngineConfig { cache_dir: Some(cache), ..EngineConfig::default() }).unwrap();
        Interpreters::new(engine, guests_dir())
    })
}

fn limits() -> Limits {
    Limits { deadline: Duration::from_secs(5), memory_bytes: 256 << 20, output_bytes: 64 * 1024, ..Limits::default() }
}

struct Fixture {
    _dir: tempfile::TempDir,
    workspace: Workspace,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let workspace = Workspace::create(dir.path().join("workspace")).unwrap();
        Self { _dir: dir, workspace }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.workspace.host_path().join(name)
    }
}

async fn context(language: Language, fixture: &Fixture) -> String {
    interpreters().create_context(language, fixture.workspace.clone(), limits()).await.unwrap()
}

async fn eval(id: &str, code: &str) -> EvalOutcome {
    interpreters().eval(id, code).await.unwrap()
}

fn ok(outcome: &EvalOutcome) {
    assert!(outcome.is_ok(), "{:?}\nstderr: {}", outcome.result, outcome.stderr_text());
}

fn file(operation: &str, path: &str) -> SideEffect {
    SideEffect::File { operation: operation.into(), path: path.into() }
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

#[tokio::test]
async fn python_display_of_an_object_with_repr_html_and_a_rich_last_value() {
    let fixture = Fixture::new();
    let id = context(Language::Python, &fixture).await;
    let code = r#"
class Table:
    def _repr_html_(self):
        return "<table><tr><td>1</td></tr></table>"
    def _repr_markdown_(self):
        return None  # left out, as Jupyter leaves it out
    def __repr__(self):
        return "Table()"
display(Table(), 7)
Table()
"#;
    let outcome = eval(&id, code).await;
    ok(&outcome);
    // The value's text stays its repr.
    assert_eq!(outcome.value().unwrap().text, "Table()");
    assert_eq!(outcome.displays.len(), 3, "{:?}", outcome.displays);
    let html = "<table><tr><td>1</td></tr></table>";
    assert_eq!(outcome.displays[0].get("text/html"), Some(html));
    assert_eq!(outcome.displays[0].get("text/plain"), Some("Table()"));
    assert_eq!(outcome.displays[0].get("text/markdown"), None);
    // A plain object is text/plain only.
    assert_eq!(outcome.displays[1].data.len(), 1);
    assert_eq!(outcome.displays[1].get("text/plain"), Some("7"));
    // The rich last value, last.
    assert_eq!(outcome.displays[2].get("text/html"), Some(html));
    assert!(!outcome.displays_truncated);
    // A plain last value makes no display; displays are per evaluation.
    let outcome = eval(&id, "41 + 1").await;
    assert_eq!(outcome.value().unwrap().text, "42");
    assert!(outcome.displays.is_empty(), "{:?}", outcome.displays);
}

#[tokio::test]
async fn javascript_display_of_an_object_with_repr_html_and_a_rich_last_value() {
    let fixture = Fixture::new();
    let id = context(Language::JavaScript, &fixture).await;
    let code = r#"
class Table {
  _repr_html_() { return "<table><tr><td>1</td></tr></table>"; }
  _repr_json_() { return { rows: 1 }; }
}
display(new Table());
display(7);
new Table()
"#;
    let outcome = eval(&id, code).await;
    ok(&outcome);
    assert_eq!(outcome.displays.len(), 3, "{:?}", outcome.displays);
    let html = "<table><tr><td>1</td></tr></table>";
    assert_eq!(outcome.displays[0].get("text/html"), Some(html));
    assert_eq!(outcome.displays[0].get("application/json"), Some(r#"{"rows":1}"#));
    assert!(outcome.displays[0].get("text/plain").is_some());
    assert_eq!(outcome.displays[1].get("text/plain"), Some("7"));
    assert_eq!(outcome.displays[2].get("text/html"), Some(html));
    let outcome = eval(&id, "({ a: 1 })").await;
    assert!(outcome.displays.is_empty(), "{:?}", outcome.displays);
}

#[tokio::test]
async fn python_helper_classes_show_their_type() {
    let fixture = Fixture::new();
    std::fs::write(fixture.path("dot.png"), b"\x89PNG\r\n\x1a\nfile").unwrap();
    let id = context(Language::Python, &fixture).await;
    let code = "import airlock\nairlock.display(airlock.Markdown('# Hi'), airlock.Image(filename='dot.png'))\nairlock.HTML('<p>x</p>')";
    let outcome = eval(&id, code).await;
    ok(&outcome);
    assert_eq!(outcome.displays.len(), 3, "{:?}", outcome.displays);
    assert_eq!(outcome.displays[0].get("text/markdown"), Some("# Hi"));
    assert_eq!(BASE64.decode(outcome.displays[1].get("image/png").unwrap()).unwrap(), b"\x89PNG\r\n\x1a\nfile");
    assert_eq!(outcome.displays[1].get("image/jpeg"), None);
    assert_eq!(outcome.displays[2].get("text/html"), Some("<p>x</p>"));
    assert_eq!(outcome.value().unwrap().text, "<HTML object>");
}

#[tokio::test]
async fn a_repr_mimebundle_comes_first_and_is_not_repeated() {
    let fixture = Fixture::new();
    let code = r#"
class Both:
    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/html": "<b>bundle</b>", "text/plain": "plain from bundle"}
    def _repr_html_(self):
        return "<b>method</b>"
    def _repr_markdown_(self):
        return "*method*"
display(Both())
"#;
    let id = context(Language::Python, &fixture).await;
    let outcome = eval(&id, code).await;
    ok(&outcome);
    assert_eq!(outcome.displays.len(), 1);
    let shown = &outcome.displays[0];
    assert_eq!(shown.get("text/html"), Some("<b>bundle</b>"));
    assert_eq!(shown.get("text/plain"), Some("plain from bundle"));
    assert_eq!(shown.get("text/markdown"), Some("*method*"));
    assert!(!outcome.displays_truncated, "nothing was dropped");

    let code = r#"display({
  _repr_mimebundle_() { return { "text/html": "<b>bundle</b>", "text/plain": "plain" }; },
  _repr_html_() { return "<b>method</b>"; },
})"#;
    let id = context(Language::JavaScript, &fixture).await;
    let outcome = eval(&id, code).await;
    ok(&outcome);
    assert_eq!(outcome.displays.len(), 1);
    assert_eq!(outcome.displays[0].get("text/html"), Some("<b>bundle</b>"));
    assert_eq!(outcome.displays[0].get("text/plain"), Some("plain"));
    assert!(!outcome.displays_truncated);
}

#[tokio::test]
async fn raw_bundles_are_shown_as_given() {
    let fixture = Fixture::new();
    let id = context(Language::Python, &fixture).await;
    let outcome = eval(&id, "display({'text/markdown': '# Title', 'application/json': {'a': [1, 2]}}, raw=True)").await;
    ok(&outcome);
    assert_eq!(outcome.displays.len(), 1);
    assert_eq!(outcome.displays[0].get("text/markdown"), Some("# Title"));
    assert_eq!(outcome.displays[0].get("application/json"), Some(r#"{"a": [1, 2]}"#));
    assert_eq!(outcome.displays[0].get("text/plain"), None, "a raw bundle is exactly what was given");
    // Not a dict: a TypeError in the code.
    let outcome = eval(&id, "display('x', raw=True)").await;
    assert!(matches!(&outcome.result, EvalResult::RuntimeError(e) if e.kind == "TypeError"), "{:?}", outcome.result);

    let id = context(Language::JavaScript, &fixture).await;
    let outcome =
        eval(&id, r##"display({ "text/markdown": "# Title", "text/html": "<i>x</i>" }, { raw: true })"##).await;
    ok(&outcome);
    assert_eq!(outcome.displays.len(), 1, "{:?}", outcome.displays);
    assert_eq!(outcome.displays[0].get("text/markdown"), Some("# Title"));
    assert_eq!(outcome.displays[0].get("text/html"), Some("<i>x</i>"));
    assert_eq!(outcome.displays[0].data.len(), 2);
}

fn png_of(outcome: &EvalOutcome) -> Vec<u8> {
    ok(outcome);
    assert_eq!(outcome.displays.len(), 1, "{:?}", outcome.displays);
    let encoded = outcome.displays[0].get("image/png").expect("an image/png representation");
    BASE64.decode(encoded).expect("base64")
}

#[tokio::test]
async fn png_bytes_come_back_base64_encoded() {
    let fixture = Fixture::new();
    // A whole 1x1 PNG, made with zlib in the guest.
    let code = r#"
import struct, zlib
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))
display({"image/png": png, "text/plain": "<a 1x1 image>"}, raw=True)
"#;
    let id = context(Language::Python, &fixture).await;
    let png = png_of(&eval(&id, code).await);
    assert!(png.starts_with(PNG_SIGNATURE), "{:?}", &png[..png.len().min(16)]);
    assert_eq!(&png[12..16], b"IHDR");
    assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 1, "width");
    assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 1, "height");

    // An object's _repr_png_ answering bytes.
    let code =
        "class Chart:\n    def _repr_png_(self):\n        return b'\\x89PNG\\r\\n\\x1a\\nrest'\ndisplay(Chart())";
    let png = png_of(&eval(&id, code).await);
    assert_eq!(png, b"\x89PNG\r\n\x1a\nrest");

    // JavaScript: a Uint8Array is encoded by the guest.
    let id = context(Language::JavaScript, &fixture).await;
    let code =
        r#"display({ "image/png": new Uint8Array([0x89, 0x50, 0x4e, 0x47, 13, 10, 26, 10, 1, 2]) }, { raw: true })"#;
    let png = png_of(&eval(&id, code).await);
    assert_eq!(png, b"\x89PNG\r\n\x1a\n\x01\x02");
}

#[tokio::test]
async fn displays_past_the_cap_are_dropped_and_flagged() {
    let fixture = Fixture::new();
    for (language, code) in [
        (Language::Python, "for i in range(65):\n    display(i)"),
        (Language::JavaScript, "for (let i = 0; i < 65; i++) display(i);"),
    ] {
        let id = context(language, &fixture).await;
        let outcome = eval(&id, code).await;
        ok(&outcome);
        assert_eq!(outcome.displays.len(), MAX_DISPLAYS_PER_EVALUATION, "{language}");
        assert!(outcome.displays_truncated, "{language}");
        assert_eq!(outcome.displays[63].get("text/plain"), Some("63"), "{language}: the first ones are kept");
        // The next evaluation has the whole cap again.
        let outcome = eval(&id, "display(1)").await;
        assert_eq!(outcome.displays.len(), 1);
        assert!(!outcome.displays_truncated);
    }
    // A bundle with absurd entries is clipped, and says so.
    let id = context(Language::Python, &fixture).await;
    let code = "display({'not a mime type': 'x', 'image/png': 'not base64!', 'text/plain': 'kept'}, raw=True)";
    let outcome = eval(&id, code).await;
    ok(&outcome);
    assert_eq!(outcome.displays.len(), 1);
    assert_eq!(outcome.displays[0].data.len(), 1);
    assert_eq!(outcome.displays[0].get("text/plain"), Some("kept"));
    assert!(outcome.displays_truncated);
}

/// Each chunk a sender received, with the moment it arrived.
type Received = Arc<Mutex<Vec<(Instant, OutputChunk)>>>;

/// A sender recording each chunk with the moment it arrived.
fn recording_sender() -> (OutputSender, Received) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let sender: OutputSender = Arc::new(move |chunk: OutputChunk| sink.lock().unwrap().push((Instant::now(), chunk)));
    (sender, seen)
}

/// The chunks arrived while the code ran: the first well before the
/// evaluation returned, and in more than one piece.
fn assert_streamed(seen: &Mutex<Vec<(Instant, OutputChunk)>>, returned: Instant, outcome: &EvalOutcome, expect: &str) {
    ok(outcome);
    let seen = seen.lock().unwrap();
    let streamed: Vec<u8> = seen.iter().flat_map(|(_, chunk)| chunk.bytes.clone()).collect();
    assert_eq!(String::from_utf8_lossy(&streamed), expect);
    assert_eq!(outcome.stdout_text(), expect, "the captured copy is still returned");
    assert!(seen.len() >= 3, "{} chunks", seen.len());
    let first = seen[0].0;
    assert!(
        returned.duration_since(first) >= Duration::from_millis(300),
        "the first chunk came {:?} before the evaluation returned",
        returned.duration_since(first)
    );
}

#[tokio::test]
async fn output_reaches_the_caller_while_the_code_runs() {
    let fixture = Fixture::new();
    let slow_python = "import time\nfor i in range(3):\n    print('tick', i)\n    time.sleep(0.25)";
    let id = context(Language::Python, &fixture).await;
    let (sender, seen) = recording_sender();
    let outcome = interpreters().eval_streaming(&id, slow_python, Some(sender)).await.unwrap();
    assert_streamed(&seen, Instant::now(), &outcome, "tick 0\ntick 1\ntick 2\n");
    // Without a sender the context still captures, and the old sender hears nothing more.
    let before = seen.lock().unwrap().len();
    let outcome = eval(&id, "print('quiet')").await;
    assert_eq!(outcome.stdout_text(), "quiet\n");
    assert_eq!(seen.lock().unwrap().len(), before);

    // JavaScript, busy-waiting between lines.
    let slow_js =
        "for (let i = 0; i < 3; i++) { console.log('tick', i); const t = Date.now(); while (Date.now() - t < 250) {} }";
    let id = context(Language::JavaScript, &fixture).await;
    let (sender, seen) = recording_sender();
    let outcome = interpreters().eval_streaming(&id, slow_js, Some(sender)).await.unwrap();
    assert_streamed(&seen, Instant::now(), &outcome, "tick 0\ntick 1\ntick 2\n");

    // The one-shot path streams too.
    let (sender, seen) = recording_sender();
    let outcome = interpreters()
        .run_streaming(Language::Python, fixture.workspace.clone(), slow_python, limits(), None, Some(sender))
        .await
        .unwrap();
    assert_streamed(&seen, Instant::now(), &outcome, "tick 0\ntick 1\ntick 2\n");
}

#[tokio::test]
async fn stderr_streams_as_stderr() {
    let fixture = Fixture::new();
    let id = context(Language::Python, &fixture).await;
    let (sender, seen) = recording_sender();
    let code = "import sys, time\nprint('warn', file=sys.stderr)\ntime.sleep(0.4)\nprint('out')";
    let outcome = interpreters().eval_streaming(&id, code, Some(sender)).await.unwrap();
    let returned = Instant::now();
    ok(&outcome);
    let seen = seen.lock().unwrap();
    // Written as it came (print may write the text and the newline apart),
    // all of it before the sleep.
    let (at, _) = &seen[0];
    assert!(returned.duration_since(*at) >= Duration::from_millis(300), "stderr came at the end");
    let before_stdout: Vec<u8> = seen
        .iter()
        .take_while(|(_, chunk)| chunk.stream == airlock_core::OutputStream::Stderr)
        .flat_map(|(_, chunk)| chunk.bytes.clone())
        .collect();
    assert_eq!(before_stdout, b"warn\n");
    assert_eq!(seen.last().unwrap().1.stream, airlock_core::OutputStream::Stdout);
    assert_eq!(outcome.stderr_text(), "warn\n");
}

#[tokio::test]
async fn streamed_output_stops_at_the_output_cap() {
    let fixture = Fixture::new();
    let small = Limits { output_bytes: 1000, ..limits() };
    let (sender, seen) = recording_sender();
    let outcome = interpreters()
        .run_streaming(Language::Python, fixture.workspace.clone(), "print('x' * 5000)", small, None, Some(sender))
        .await
        .unwrap();
    assert!(
        matches!(outcome.result, EvalResult::LimitExceeded(hit) if hit.limit == Limit::Output),
        "{:?}",
        outcome.result
    );
    let streamed: usize = seen.lock().unwrap().iter().map(|(_, chunk)| chunk.bytes.len()).sum();
    assert_eq!(streamed, 1000);
}

#[tokio::test]
async fn python_file_changes_are_side_effects_even_when_the_code_escalates() {
    let fixture = Fixture::new();
    let id = context(Language::Python, &fixture).await;
    // Wrote a file, then needed a container: the caller learns the write happened.
    let outcome = eval(&id, "open('a.txt', 'w').write('x')\nimport pandas").await;
    assert_eq!(
        outcome.result,
        EvalResult::NeedsEscalation { reason: EscalationReason::MissingModule("pandas".into()) }
    );
    assert_eq!(outcome.side_effects, vec![file("write", "a.txt")]);
    assert_eq!(std::fs::read_to_string(fixture.path("a.txt")).unwrap(), "x");

    // Reading records nothing.
    let outcome = eval(&id, "open('a.txt').read()\nimport os\nos.listdir('.')\nos.stat('a.txt')").await;
    ok(&outcome);
    assert!(outcome.side_effects.is_empty(), "{:?}", outcome.side_effects);

    let code = r#"
import os, pathlib, shutil
os.mkdir("d")
pathlib.Path("d/b.txt").write_text("b")
os.rename("d/b.txt", "d/c.txt")
shutil.copyfile("a.txt", "copy.txt")
os.remove("a.txt")
with open("log.txt", "a") as log:
    log.write("line")
fd = os.open("raw.bin", os.O_WRONLY | os.O_CREAT)
os.close(fd)
"#;
    let outcome = eval(&id, code).await;
    ok(&outcome);
    for expected in [
        file("mkdir", "d"),
        file("write", "d/b.txt"),
        file("rename", "d/b.txt"),
        file("rename-to", "d/c.txt"),
        file("copy", "copy.txt"),
        file("write", "copy.txt"),
        file("remove", "a.txt"),
        file("write", "log.txt"),
        file("write", "raw.bin"),
    ] {
        assert!(outcome.side_effects.contains(&expected), "{expected} missing from {:?}", outcome.side_effects);
    }
    assert!(!outcome.side_effects.iter().any(|e| matches!(e, SideEffect::Request { .. })));

    // A runtime error after a write, and a limit hit after one, still report it.
    let outcome = eval(&id, "open('e.txt', 'w').close()\n1 / 0").await;
    assert!(matches!(outcome.result, EvalResult::RuntimeError(_)));
    assert_eq!(outcome.side_effects, vec![file("write", "e.txt")]);
    let short = Limits { deadline: Duration::from_millis(500), ..limits() };
    let outcome = interpreters()
        .run(Language::Python, fixture.workspace.clone(), "open('f.txt', 'w').close()\nwhile True: pass", short)
        .await
        .unwrap();
    assert!(matches!(outcome.result, EvalResult::LimitExceeded(hit) if hit.limit == Limit::Deadline));
    assert_eq!(outcome.side_effects, vec![file("write", "f.txt")]);
}

#[tokio::test]
async fn many_python_file_changes_are_capped_per_evaluation() {
    let fixture = Fixture::new();
    let id = context(Language::Python, &fixture).await;
    let code = "import sys\nfor i in range(100):\n    open(f'f{i}.txt', 'w').close()";
    let outcome = eval(&id, code).await;
    ok(&outcome);
    assert_eq!(outcome.side_effects.len(), airlock_core::MAX_SIDE_EFFECTS_PER_EVALUATION);
    assert!(outcome.side_effects_truncated);
    let outcome = eval(&id, "open('g.txt', 'w').close()").await;
    assert_eq!(outcome.side_effects, vec![file("write", "g.txt")]);
    assert!(!outcome.side_effects_truncated);
}

#[tokio::test]
async fn javascript_file_writes_are_side_effects_even_when_the_code_escalates() {
    let fixture = Fixture::new();
    let id = context(Language::JavaScript, &fixture).await;
    let outcome = eval(&id, "fs.writeFile('b.txt', 'y'); require('lodash')").await;
    assert_eq!(
        outcome.result,
        EvalResult::NeedsEscalation { reason: EscalationReason::MissingModule("lodash".into()) }
    );
    assert_eq!(outcome.side_effects, vec![file("write", "b.txt")]);
    let outcome = eval(&id, "fs.readFile('b.txt') + fs.readdir('.').length + fs.exists('b.txt')").await;
    ok(&outcome);
    assert!(outcome.side_effects.is_empty(), "{:?}", outcome.side_effects);
    let outcome = eval(&id, "fs.mkdir('d'); fs.rm('b.txt')").await;
    ok(&outcome);
    assert_eq!(outcome.side_effects, vec![file("mkdir", "d"), file("remove", "b.txt")]);
}

/// An outbound hook answering every request with "ok".
#[derive(Debug)]
struct Answering;

impl OutboundHttp for Answering {
    fn send(&self, _request: http::Request<OutboundBody>) -> OutboundFuture {
        let body: OutboundBody =
            http_body_util::Full::new(bytes::Bytes::from_static(b"ok")).map_err(|never| match never {}).boxed_unsync();
        Box::pin(async move { Ok(http::Response::new(body)) })
    }
}

#[tokio::test]
async fn outbound_requests_are_side_effects() {
    let fixture = Fixture::new();
    let outbound = Some(Outbound::new(Arc::new(Answering)));
    let id = interpreters()
        .create_context_with_outbound(Language::Python, fixture.workspace.clone(), limits(), outbound.clone())
        .await
        .unwrap();
    let code = "import airlock\nairlock.fetch('http://api.test/items?x=1', method='POST', body='{}').text()";
    let outcome = eval(&id, code).await;
    ok(&outcome);
    assert_eq!(outcome.value().unwrap().text, "'ok'");
    assert_eq!(
        outcome.side_effects,
        vec![SideEffect::Request { method: "POST".into(), url: "http://api.test/items?x=1".into() }]
    );
    assert!(eval(&id, "1").await.side_effects.is_empty(), "recorded per evaluation");

    // JavaScript, and a request then an escalation.
    let id = interpreters()
        .create_context_with_outbound(Language::JavaScript, fixture.workspace.clone(), limits(), outbound)
        .await
        .unwrap();
    let outcome =
        eval(&id, "fetch('http://api.test/a').then(r => r.text()).then(() => require('child_process'))").await;
    assert_eq!(outcome.result, EvalResult::NeedsEscalation { reason: EscalationReason::Subprocess });
    assert_eq!(
        outcome.side_effects,
        vec![SideEffect::Request { method: "GET".into(), url: "http://api.test/a".into() }]
    );

    // Refused without a hook: nothing went out, nothing is recorded.
    let id = context(Language::Python, &fixture).await;
    let outcome =
        eval(&id, "import airlock\ntry:\n    airlock.fetch('http://api.test/')\nexcept OSError:\n    pass").await;
    ok(&outcome);
    assert!(outcome.side_effects.is_empty(), "{:?}", outcome.side_effects);
}
