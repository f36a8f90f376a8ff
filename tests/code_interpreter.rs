//! The code interpreter through the runtime, against real isolates and the
//! real Docker engine: contexts that move to a container kernel with their
//! state, one-shot snippets that are not run twice, rich results from the
//! data stack, and output that arrives while the code runs.
//!
//! Needs the guests built and the engine set up (`scripts/test.sh` does both);
//! a missing engine fails these tests, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock::runtime::{ContextOptions, SandboxConfig};
use airlock::{EscalationReason, EvalResult, Language, OutputChunk, OutputStream, SideEffect, TierKind};
use base64::Engine as _;
use common::{Cleanup, runtime_in};

fn value_text(outcome: &airlock::EvalOutcome) -> String {
    match &outcome.result {
        EvalResult::Ok { value: Some(value) } => value.text.clone(),
        other => panic!("expected a value, got {other:?}; stderr: {}", outcome.stderr_text()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_context_moves_to_the_container_with_its_state() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("notebook-moves").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    let context = sandbox.create_context(Language::Python).await.unwrap();

    let first = sandbox.code_in(&context, "x = 41\ndef twice(n):\n    return 2 * n").await.unwrap();
    assert_eq!(first.placement.tier, TierKind::Isolate);
    // A failing evaluation is not replayed (it would fail again, or worse).
    let failing = sandbox.code_in(&context, "undefined_name").await.unwrap();
    assert!(matches!(failing.outcome.result, EvalResult::RuntimeError(_)));

    let moved = sandbox.code_in(&context, "import pandas as pd\nlen(pd.DataFrame({'a': [x]}))").await.unwrap();
    assert_eq!(moved.placement.tier, TierKind::Container);
    assert_eq!(moved.placement.escalated, Some(EscalationReason::MissingModule("pandas".into())));
    let report = moved.placement.context_moved.clone().expect("the move is reported");
    assert!(report.replayed);
    assert_eq!(report.replayed_evaluations, 1, "{report:?}");
    assert!(report.replay_failures.is_empty(), "{report:?}");
    assert_eq!(value_text(&moved.outcome), "1");

    let next = sandbox.code_in(&context, "twice(x + 1) // 2").await.unwrap();
    assert_eq!(next.placement.tier, TierKind::Container);
    assert!(next.placement.context_moved.is_none(), "only the moving evaluation reports the move");
    assert_eq!(value_text(&next.outcome), "42");
    let listed = sandbox.contexts();
    let info = listed.iter().find(|info| info.id == context).unwrap();
    assert_eq!(info.tier, TierKind::Container);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replay_off_a_moved_context_starts_fresh_and_says_so() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("notebook-fresh").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    let options = ContextOptions { replay_on_escalation: false };
    let context = sandbox.create_context_with(Language::Python, options).await.unwrap();
    sandbox.code_in(&context, "x = 41").await.unwrap();
    let moved = sandbox.code_in(&context, "import numpy").await.unwrap();
    let report = moved.placement.context_moved.clone().unwrap();
    assert!(!report.replayed);
    assert_eq!(report.replayed_evaluations, 0);
    let gone = sandbox.code_in(&context, "x + 1").await.unwrap();
    match gone.outcome.result {
        EvalResult::RuntimeError(error) => assert_eq!(error.kind, "NameError"),
        other => panic!("x survived a move without replay: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_context_moves_to_a_node_kernel_with_its_state() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("notebook-js").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    let context = sandbox.create_context(Language::JavaScript).await.unwrap();
    let first = sandbox.code_in(&context, "var x = 41; function twice(n) { return 2 * n; }").await.unwrap();
    assert_eq!(first.placement.tier, TierKind::Isolate);
    let moved = sandbox
        .code_in(&context, "const { execSync } = require('child_process'); execSync('echo ' + (x + 1)).toString().trim()")
        .await
        .unwrap();
    assert_eq!(moved.placement.tier, TierKind::Container);
    assert_eq!(moved.placement.escalated, Some(EscalationReason::Subprocess));
    assert_eq!(moved.placement.context_moved.as_ref().unwrap().replayed_evaluations, 1);
    assert!(value_text(&moved.outcome).contains("42"), "{:?}", moved.outcome.result);
    let next = sandbox.code_in(&context, "twice(x) / 2 + 1").await.unwrap();
    assert_eq!(value_text(&next.outcome), "42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_that_already_wrote_a_file_is_not_run_twice() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("once-only").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    let code = "with open('log.txt', 'a') as f:\n    f.write('ran\\n')\nimport pandas";
    let answer = sandbox.code(Language::Python, code).await.unwrap();
    assert_eq!(answer.placement.tier, TierKind::Isolate);
    assert!(matches!(answer.outcome.result, EvalResult::NeedsEscalation { .. }), "{:?}", answer.outcome.result);
    assert!(
        answer.outcome.side_effects.iter().any(|e| matches!(e, SideEffect::File { path, .. } if path.ends_with("log.txt"))),
        "{:?}",
        answer.outcome.side_effects
    );
    assert!(answer.placement.reason.contains("not run again"), "{}", answer.placement.reason);
    assert_eq!(sandbox.read_file("log.txt").await.unwrap(), b"ran\n", "the snippet ran twice");

    // Without a side effect first, the same escalation runs in the container.
    let clean = sandbox.code(Language::Python, "import pandas\nprint(pandas.__name__)").await.unwrap();
    assert_eq!(clean.placement.tier, TierKind::Container);
    assert_eq!(clean.outcome.stdout_text(), "pandas\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataframe_comes_back_as_html_and_a_plot_as_a_png() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("data-stack").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    let table = sandbox
        .code(Language::Python, "import pandas as pd\npd.DataFrame({'city': ['Oslo', 'Lima'], 'n': [1, 2]})")
        .await
        .unwrap();
    assert_eq!(table.placement.tier, TierKind::Container);
    let html = table.outcome.displays.iter().find_map(|d| d.get("text/html")).expect("an HTML display");
    assert!(html.contains("<table") && html.contains("Oslo"), "{html}");

    let plot = sandbox
        .code(Language::Python, "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()")
        .await
        .unwrap();
    assert!(plot.outcome.is_ok(), "{:?} {}", plot.outcome.result, plot.outcome.stderr_text());
    let png = plot.outcome.displays.iter().find_map(|d| d.get("image/png")).expect("a PNG display");
    let png = base64::engine::general_purpose::STANDARD.decode(png).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&png[12..16], b"IHDR");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert!(width >= 100 && height >= 100, "{width}x{height}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_kernel_past_its_deadline_restarts_and_the_next_evaluation_works() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let mut config = SandboxConfig::default();
    config.limits.deadline = Duration::from_secs(3);
    let sandbox = runtime.create_sandbox("kernel-deadline", config, None).await.unwrap().unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    let context = sandbox.create_context(Language::Python).await.unwrap();
    sandbox.code_in(&context, "import numpy as np\nkept = np.arange(3)").await.unwrap();
    let stuck = sandbox.code_in(&context, "while True: pass").await.unwrap();
    assert_eq!(stuck.placement.tier, TierKind::Container);
    assert!(matches!(stuck.outcome.result, EvalResult::LimitExceeded(_)), "{:?}", stuck.outcome.result);
    let after = sandbox.code_in(&context, "6 * 7").await.unwrap();
    assert_eq!(value_text(&after.outcome), "42");
    let state_gone = sandbox.code_in(&context, "kept").await.unwrap();
    assert!(matches!(state_gone.outcome.result, EvalResult::RuntimeError(_)), "state survived a kernel restart");
    assert!(sandbox.contexts().iter().any(|info| info.id == context && info.resets >= 1));
}

/// Chunks with the moment each arrived.
type Arrivals = Arc<Mutex<Vec<(Instant, OutputChunk)>>>;

fn recording() -> (Arrivals, airlock::OutputSender) {
    let arrivals: Arrivals = Arc::default();
    let sink = arrivals.clone();
    (arrivals, Arc::new(move |chunk| sink.lock().unwrap().push((Instant::now(), chunk))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_arrives_while_the_code_runs_in_both_tiers() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("live-output").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    let slow = "import time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')";
    for (code, tier) in [(slow.to_string(), TierKind::Isolate), (format!("import numpy\n{slow}"), TierKind::Container)] {
        let (arrivals, sender) = recording();
        let answer = sandbox.code_streaming(Language::Python, &code, sender).await.unwrap();
        let returned = Instant::now();
        assert_eq!(answer.placement.tier, tier);
        assert!(answer.outcome.is_ok(), "{:?} {}", answer.outcome.result, answer.outcome.stderr_text());
        let arrivals = arrivals.lock().unwrap();
        let (first_at, _) = arrivals
            .iter()
            .find(|(_, chunk)| chunk.stream == OutputStream::Stdout && String::from_utf8_lossy(&chunk.bytes).contains("first"))
            .unwrap_or_else(|| panic!("no live 'first' in {tier:?}: {arrivals:?}"));
        assert!(
            returned.duration_since(*first_at) >= Duration::from_millis(1000),
            "in {tier:?} the first line came only {:?} before the end",
            returned.duration_since(*first_at)
        );
        assert!(answer.outcome.stdout_text().ends_with("second\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_reports_the_side_effects_replay_repeats_and_a_half_run_snippet_does_not_move() {
    let home = tempfile::tempdir().unwrap();
    let runtime = runtime_in(home.path()).await;
    let sandbox = runtime.sandbox("notebook-effects").await.unwrap();
    let _cleanup = Cleanup(vec![sandbox.id().to_string()]);
    let context = sandbox.create_context(Language::Python).await.unwrap();
    let wrote = sandbox.code_in(&context, "with open('notes.txt', 'a') as f:\n    f.write('x\\n')").await.unwrap();
    assert!(wrote.outcome.is_ok(), "{:?}", wrote.outcome.result);

    // Half-run: it appended, then needed the container. It stays in the isolate, not run twice.
    let half = sandbox.code_in(&context, "with open('notes.txt', 'a') as f:\n    f.write('y\\n')\nimport pandas").await.unwrap();
    assert_eq!(half.placement.tier, TierKind::Isolate);
    assert!(matches!(half.outcome.result, EvalResult::NeedsEscalation { .. }));
    assert!(half.placement.context_moved.is_none());
    assert_eq!(sandbox.read_file("notes.txt").await.unwrap(), b"x\ny\n");
    assert_eq!(sandbox.contexts().iter().find(|c| c.id == context).unwrap().tier, TierKind::Isolate);

    // A clean escalation moves it; replay appends 'x' again, and the answer says so.
    let moved = sandbox.code_in(&context, "import pandas\n'moved'").await.unwrap();
    assert_eq!(moved.placement.tier, TierKind::Container);
    let report = moved.placement.context_moved.clone().unwrap();
    assert_eq!(report.replayed_evaluations, 1, "{report:?}");
    assert!(
        report.repeated_side_effects.iter().any(|e| matches!(e, SideEffect::File { path, .. } if path.ends_with("notes.txt"))),
        "{report:?}"
    );
    assert_eq!(sandbox.read_file("notes.txt").await.unwrap(), b"x\ny\nx\n", "replay ran the write again");
}
