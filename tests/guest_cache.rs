//! Guests are compiled once and cached on disk, keyed by content and engine;
//! a damaged or foreign cache file is detected and rebuilt, never loaded.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

mod common;

use std::path::Path;

use airlock::ExecRequest;
use airlock::wasm::{EngineConfig, GuestOrigin, IsolateEngine};
use common::{Fixture, guest};

fn engine_with_cache(dir: &Path) -> IsolateEngine {
    // A separate engine per step stands for a new process; a small pool keeps each cheap.
    IsolateEngine::new(EngineConfig {
        cache_dir: Some(dir.to_path_buf()),
        max_concurrent_runs: 4,
        ..EngineConfig::default()
    })
    .unwrap()
}

async fn runs_hello(engine: &IsolateEngine, guest: &airlock::Guest) {
    let fixture = Fixture::new();
    let outcome = engine.run(guest, &fixture.workspace, &ExecRequest::new("hello").args(["cached"])).await.unwrap();
    assert_eq!(outcome.stdout_text(), "hello, cached\n");
}

fn with_suffix(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut path = path.as_os_str().to_owned();
    path.push(suffix);
    path.into()
}

fn rejected(origin: &GuestOrigin) -> Option<String> {
    match origin {
        GuestOrigin::Compiled { rejected_cache_entry } => rejected_cache_entry.clone(),
        other => panic!("expected a fresh compile, got {other:?}"),
    }
}

#[tokio::test]
async fn compiled_once_then_loaded_from_disk_then_from_memory() {
    let cache = tempfile::tempdir().unwrap();
    let wasm = std::fs::read(guest("hello.wasm")).unwrap();

    let first = engine_with_cache(cache.path());
    let guest_first = first.load_file(guest("hello.wasm")).unwrap();
    assert_eq!(guest_first.origin(), &GuestOrigin::Compiled { rejected_cache_entry: None });
    assert!(first.cache_path_for(&wasm).unwrap().is_file());
    runs_hello(&first, &guest_first).await;
    assert_eq!(first.load_file(guest("hello.wasm")).unwrap().origin(), &GuestOrigin::Memory);

    let second = engine_with_cache(cache.path());
    let guest_second = second.load_file(guest("hello.wasm")).unwrap();
    assert_eq!(guest_second.origin(), &GuestOrigin::DiskCache);
    runs_hello(&second, &guest_second).await;
}

#[tokio::test]
async fn damaged_cache_files_are_rebuilt() {
    let cache = tempfile::tempdir().unwrap();
    let wasm = std::fs::read(guest("hello.wasm")).unwrap();
    let path = engine_with_cache(cache.path()).cache_path_for(&wasm).unwrap();
    engine_with_cache(cache.path()).load_file(guest("hello.wasm")).unwrap();
    let good = std::fs::read(&path).unwrap();

    let damages: [(&str, Vec<u8>, &str); 4] = [
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        (
            "corrupt",
            {
                let mut b = good.clone();
                let i = b.len() - 100;
                b[i] ^= 0xff;
                b
            },
            "corrupt",
        ),
        ("empty", Vec::new(), "truncated"),
        ("garbage of the same length", vec![b'#'; good.len()], "corrupt"),
    ];
    for (what, damaged, reason) in damages {
        // Damage arrives as a new file (a new inode): an artifact that passed
        // its checksum once is not checksummed again while its size,
        // modification time and inode stay the same (see cache.rs).
        let replacement = with_suffix(&path, ".damaged");
        std::fs::write(&replacement, &damaged).unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        let engine = engine_with_cache(cache.path());
        let loaded = engine.load_file(guest("hello.wasm")).unwrap();
        assert_eq!(rejected(loaded.origin()).as_deref(), Some(reason), "{what}");
        runs_hello(&engine, &loaded).await;
        assert_eq!(std::fs::read(&path).unwrap(), good, "{what}: the rebuilt entry should be whole again");
        // The rebuilt entry is used by the next process.
        assert_eq!(
            engine_with_cache(cache.path()).load_file(guest("hello.wasm")).unwrap().origin(),
            &GuestOrigin::DiskCache
        );
    }
}

#[tokio::test]
async fn a_foreign_cache_file_is_not_loaded() {
    let cache = tempfile::tempdir().unwrap();
    let hello = std::fs::read(guest("hello.wasm")).unwrap();
    let spin = std::fs::read(guest("spin.wasm")).unwrap();
    let engine = engine_with_cache(cache.path());
    engine.load_file(guest("spin.wasm")).unwrap();
    // Put spin's compiled code, with its own check file, where hello's would be:
    // loading it would run the wrong program.
    let (spin_entry, hello_entry) = (engine.cache_path_for(&spin).unwrap(), engine.cache_path_for(&hello).unwrap());
    std::fs::copy(&spin_entry, &hello_entry).unwrap();
    std::fs::copy(with_suffix(&spin_entry, ".check"), with_suffix(&hello_entry, ".check")).unwrap();

    let fresh = engine_with_cache(cache.path());
    let loaded = fresh.load_file(guest("hello.wasm")).unwrap();
    assert_eq!(rejected(loaded.origin()).as_deref(), Some("foreign"));
    runs_hello(&fresh, &loaded).await;
}

#[tokio::test]
async fn without_a_cache_dir_guests_still_run() {
    let engine =
        IsolateEngine::new(EngineConfig { cache_dir: None, max_concurrent_runs: 2, ..EngineConfig::default() })
            .unwrap();
    assert!(engine.cache_dir().is_none());
    let loaded = engine.load_file(guest("hello.wasm")).unwrap();
    runs_hello(&engine, &loaded).await;
}

#[tokio::test]
async fn past_the_memory_bound_the_least_recently_used_guest_is_dropped_and_loads_again() {
    let cache = tempfile::tempdir().unwrap();
    let engine = IsolateEngine::new(EngineConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        max_concurrent_runs: 4,
        max_loaded_guests: 2,
        ..EngineConfig::default()
    })
    .unwrap();
    for name in ["hello.wasm", "spin.wasm", "blocker.wasm"] {
        assert!(matches!(engine.load_file(guest(name)).unwrap().origin(), GuestOrigin::Compiled { .. }), "{name}");
    }
    assert_eq!(engine.loaded_guests(), 2);
    // spin and blocker stayed; hello, used least recently, went.
    assert_eq!(engine.load_file(guest("spin.wasm")).unwrap().origin(), &GuestOrigin::Memory);
    let hello = engine.load_file(guest("hello.wasm")).unwrap();
    assert_eq!(hello.origin(), &GuestOrigin::DiskCache, "hello was dropped from memory");
    runs_hello(&engine, &hello).await;
    // Loading hello again dropped blocker, now the least recently used.
    assert_eq!(engine.loaded_guests(), 2);
    assert_eq!(engine.load_file(guest("blocker.wasm")).unwrap().origin(), &GuestOrigin::DiskCache);
    assert_eq!(engine.load_file(guest("hello.wasm")).unwrap().origin(), &GuestOrigin::Memory);
}

/// Bytes of every file directly in the cache directory (the path index aside).
fn cache_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// An artifact's size with its side files.
fn entry_bytes(artifact: &Path) -> u64 {
    ["", ".check", ".verified"]
        .iter()
        .filter_map(|s| std::fs::metadata(with_suffix(artifact, s)).ok())
        .map(|m| m.len())
        .sum()
}

#[tokio::test]
async fn the_disk_cache_stays_under_its_bound_dropping_the_least_recently_used() {
    let names = ["hello.wasm", "spin.wasm", "blocker.wasm"];
    let wasm: Vec<Vec<u8>> = names.iter().map(|n| std::fs::read(guest(n)).unwrap()).collect();
    // Measure the entries in an unbounded cache first.
    let sizing = tempfile::tempdir().unwrap();
    let unbounded = engine_with_cache(sizing.path());
    for name in names {
        unbounded.load_file(guest(name)).unwrap();
    }
    let sizes: Vec<u64> = wasm.iter().map(|w| entry_bytes(&unbounded.cache_path_for(w).unwrap())).collect();
    // Room for blocker with either of the others (and their side files), not for all three.
    let bound = sizes[0].max(sizes[1]) + sizes[2] + 4096;
    assert!(bound < sizes.iter().sum::<u64>());

    let cache = tempfile::tempdir().unwrap();
    let bounded = |max_loaded_guests| {
        IsolateEngine::new(EngineConfig {
            cache_dir: Some(cache.path().to_path_buf()),
            max_concurrent_runs: 4,
            max_cache_bytes: bound,
            max_loaded_guests,
            ..EngineConfig::default()
        })
        .unwrap()
    };
    let engine = bounded(8);
    for name in names {
        engine.load_file(guest(name)).unwrap();
        assert!(cache_bytes(cache.path()) <= bound, "{} > {bound}", cache_bytes(cache.path()));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let artifact = |i: usize| engine.cache_path_for(&wasm[i]).unwrap();
    assert!(!artifact(0).exists() && !with_suffix(&artifact(0), ".check").exists(), "hello was used least recently");
    assert!(artifact(1).exists() && artifact(2).exists());

    // A new process finds spin and blocker cached; hello compiles again, runs,
    // and its entry replaces the least recently used one (spin, just below).
    let next = bounded(8);
    assert_eq!(next.load_file(guest("blocker.wasm")).unwrap().origin(), &GuestOrigin::DiskCache);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let hello = next.load_file(guest("hello.wasm")).unwrap();
    assert_eq!(hello.origin(), &GuestOrigin::Compiled { rejected_cache_entry: None });
    runs_hello(&next, &hello).await;
    assert!(cache_bytes(cache.path()) <= bound, "{} > {bound}", cache_bytes(cache.path()));
    assert!(artifact(0).exists() && !artifact(1).exists() && artifact(2).exists());
}
