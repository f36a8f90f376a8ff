//! Compiling a guest a sandbox supplies is bounded: in size (refused before
//! any work), in time (the caller stops waiting at the compile timeout) and
//! in threads (a cap on compiles in flight, counting those nobody waits for).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

mod common;

use std::time::{Duration, Instant};

use airlock::ExecRequest;
use airlock::wasm::{EngineConfig, IsolateEngine, MAX_WORKSPACE_GUEST_BYTES};
use common::{Fixture, guest};

fn leb128(mut value: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn section(id: u8, body: &[u8], out: &mut Vec<u8>) {
    out.push(id);
    leb128(body.len() as u64, out);
    out.extend_from_slice(body);
}

/// A valid WASI command module (`_start` does nothing) carrying a passive
/// data segment of `data_bytes` bytes, so its size is whatever a test needs.
fn command_with_data(data_bytes: u64) -> Vec<u8> {
    let mut wasm = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut wasm); // type 0: [] -> []
    section(3, &[1, 0], &mut wasm); // one function of type 0
    section(7, &[1, 6, b'_', b's', b't', b'a', b'r', b't', 0, 0], &mut wasm); // export it as _start
    section(12, &[1], &mut wasm); // data count: one segment
    section(10, &[1, 2, 0, 0x0b], &mut wasm); // its body: no locals, end
    let mut data = vec![1, 1]; // one segment, passive
    leb128(data_bytes, &mut data);
    data.resize(data.len() + data_bytes as usize, 0x2a);
    section(11, &data, &mut wasm);
    wasm
}

#[tokio::test]
async fn a_guest_past_the_size_limit_is_refused_and_one_under_it_runs() {
    let engine =
        IsolateEngine::new(EngineConfig { cache_dir: None, max_concurrent_runs: 2, ..EngineConfig::default() })
            .unwrap();
    let oversized = command_with_data(MAX_WORKSPACE_GUEST_BYTES);
    assert!(oversized.len() as u64 > MAX_WORKSPACE_GUEST_BYTES);
    let started = Instant::now();
    let err = engine.load_bytes("big.wasm", &oversized).unwrap_err().to_string();
    assert!(err.contains("the guest size limit is 67108864 bytes (64 MiB)"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "refused without compiling: {:?}", started.elapsed());
    assert_eq!(engine.compiles_in_flight(), 0);

    // The same module with a small segment compiles and runs.
    let small = engine.load_bytes("small.wasm", &command_with_data(1024)).unwrap();
    let fixture = Fixture::new();
    let outcome = engine.run(&small, &fixture.workspace, &ExecRequest::new("small")).await.unwrap();
    assert!(outcome.success(), "{outcome:?}");

    // The cap is the engine's setting.
    let tight = IsolateEngine::new(EngineConfig {
        cache_dir: None,
        max_concurrent_runs: 2,
        max_guest_bytes: 512,
        ..EngineConfig::default()
    })
    .unwrap();
    let err = tight.load_bytes("small.wasm", &command_with_data(1024)).unwrap_err().to_string();
    assert!(err.contains("the guest size limit is 512 bytes"), "{err}");
}

fn waits_for_no_compiles(engine: &IsolateEngine) {
    let until = Instant::now() + Duration::from_secs(300);
    while engine.compiles_in_flight() > 0 {
        assert!(Instant::now() < until, "an abandoned compile never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_compile_past_the_timeout_returns_an_error() {
    let engine = IsolateEngine::new(EngineConfig {
        cache_dir: None,
        max_concurrent_runs: 2,
        compile_timeout: Duration::from_millis(1),
        ..EngineConfig::default()
    })
    .unwrap();
    let js = std::fs::read(guest("js.wasm")).unwrap();
    let started = Instant::now();
    let err = engine.load_bytes("js.wasm", &js).unwrap_err().to_string();
    assert!(err.contains("did not compile within the compile timeout of 1ms"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1), "the caller stopped waiting: {:?}", started.elapsed());
    // The compile itself goes on, counted, until it ends; then its slot is free.
    waits_for_no_compiles(&engine);
    assert_eq!(engine.loaded_guests(), 0, "an abandoned compile's result is dropped");
}

#[test]
fn compiles_in_flight_are_capped_counting_abandoned_ones() {
    let engine = IsolateEngine::new(EngineConfig {
        cache_dir: None,
        max_concurrent_runs: 2,
        compile_timeout: Duration::from_millis(1),
        max_concurrent_compiles: 1,
        ..EngineConfig::default()
    })
    .unwrap();
    let js = std::fs::read(guest("js.wasm")).unwrap();
    let hello = std::fs::read(guest("hello.wasm")).unwrap();
    assert!(engine.load_bytes("js.wasm", &js).unwrap_err().to_string().contains("did not compile within"));
    assert_eq!(engine.compiles_in_flight(), 1);
    // The JavaScript interpreter compiles for seconds, holding the only slot: hello is refused, not queued.
    let err = engine.load_bytes("hello.wasm", &hello).unwrap_err().to_string();
    assert!(err.contains("cannot be compiled now: all 1 compile slots stayed busy"), "{err}");
    assert_eq!(engine.compiles_in_flight(), 1, "the refused load started no compile");
    waits_for_no_compiles(&engine);
    // With the slot free again, hello gets to compile (and, at 1ms, times out like js did).
    let err = engine.load_bytes("hello.wasm", &hello).unwrap_err().to_string();
    assert!(err.contains("did not compile within"), "{err}");
    waits_for_no_compiles(&engine);
}

#[test]
fn the_operators_files_are_not_held_to_the_compile_timeout_or_slots() {
    let engine = IsolateEngine::new(EngineConfig {
        cache_dir: None,
        max_concurrent_runs: 2,
        compile_timeout: Duration::from_millis(1),
        max_concurrent_compiles: 1,
        ..EngineConfig::default()
    })
    .unwrap();
    let js = std::fs::read(guest("js.wasm")).unwrap();
    // A sandbox's guest holds the only slot, compiling for seconds...
    assert!(engine.load_bytes("js.wasm", &js).unwrap_err().to_string().contains("did not compile within"));
    assert_eq!(engine.compiles_in_flight(), 1);
    // ...and the operator's file (as the interpreters are loaded) still compiles, however long it takes.
    let hello = engine.load_file(guest("hello.wasm")).unwrap();
    assert!(matches!(hello.origin(), airlock::GuestOrigin::Compiled { .. }));
    waits_for_no_compiles(&engine);
}
