//! A small GET (19 bytes) from a JavaScript isolate through the egress hook
//! (`fetch` → wasi:http → the runtime's hook → `Egress::send_request` under
//! the sandbox's policy → a loopback upstream), against the same GET made
//! directly by the host with reqwest, to the same upstream, in the same run.
//! A third case evaluates a snippet without fetching in the same context, so
//! the fetch's own cost is the difference between the two JavaScript cases.
//! The upstream answers one request per connection, so every case connects.
//!
//! Run: `scripts/build-guests.sh && cargo bench --bench egress_isolate`
//! (numbers and machine in docs/BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench may

#[path = "../tests/egress/upstream.rs"]
mod upstream;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use airlock::runtime::{NetworkPolicy, Runtime, RuntimeOptions, SandboxConfig};
use airlock::{EvalResult, Language};
use criterion::{Criterion, criterion_group, criterion_main};
use upstream::{Answer, Seen, Upstream};

fn bench(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let home = tempfile::tempdir().unwrap();
    let (runtime, sandbox, up) = tokio.block_on(async {
        let mut options = RuntimeOptions::new(home.path());
        options.isolates.cache_dir = Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-cache"));
        let runtime = Runtime::open(options).await.unwrap();
        let up = Upstream::http(Arc::new(|_: &Seen| Answer::ok("hello from upstream\n"))).await;
        let sandbox = runtime.sandbox_with("egress-bench", SandboxConfig::default()).await.unwrap();
        let p = up.port();
        let policy: NetworkPolicy = serde_json::from_value(serde_json::json!({ "allow": [
            { "host": "upstream.test", "ports": [p], "connect_to": format!("127.0.0.1:{p}") },
        ]}))
        .unwrap();
        sandbox.set_network_policy(policy).unwrap();
        (runtime, sandbox, up)
    });
    let p = up.port();
    let context = tokio.block_on(sandbox.create_context(Language::JavaScript)).unwrap();
    let fetch = format!(r#"fetch("http://upstream.test:{p}/hello").then(r => r.text())"#);
    let plain = r#"Promise.resolve("hello from upstream\n")"#;
    // Each case is checked once before it is timed.
    for code in [fetch.as_str(), plain] {
        let outcome = tokio.block_on(sandbox.code_in(&context, code)).unwrap();
        assert!(matches!(outcome.outcome.result, EvalResult::Ok { value: Some(_) }), "{:?}", outcome.outcome.result);
    }
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let direct_url = format!("http://127.0.0.1:{p}/hello");
    let direct = tokio.block_on(async { client.get(&direct_url).send().await.unwrap().text().await.unwrap() });
    assert_eq!(direct, "hello from upstream\n");

    let mut group = c.benchmark_group("egress_isolate");
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("direct_reqwest_get", |b| {
        b.iter(|| tokio.block_on(async { client.get(&direct_url).send().await.unwrap().bytes().await.unwrap() }))
    });
    group.bench_function("js_context_eval_no_fetch", |b| {
        b.iter(|| tokio.block_on(sandbox.code_in(&context, plain)).unwrap())
    });
    group.bench_function("js_fetch_through_hook", |b| {
        b.iter(|| tokio.block_on(sandbox.code_in(&context, &fetch)).unwrap())
    });
    group.finish();
    drop(up);
    tokio.block_on(runtime.destroy("egress-bench")).unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
