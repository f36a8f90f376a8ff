//! A 1 GiB file goes up to a sandbox through `airlock serve` and comes back
//! with the same checksum, while the server's resident memory stays flat.
//! The server runs as its own process, so its memory is measured alone
//! (`/proc/<pid>/status`), not mixed with the test's or other tests'.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const SIZE: u64 = 1024 * 1024 * 1024;
const CHUNK: usize = 1024 * 1024;
/// How much the server's peak resident memory may grow while the file moves
/// both ways: a few buffers' worth, far below the file's size.
const FLAT_MEMORY_MIB: u64 = 64;

struct Served {
    child: Child,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn byte_at(offset: u64) -> u8 {
    (offset * 7 % 253) as u8
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_goes_up_and_back_with_the_server_memory_flat() {
    let home = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["serve", "--listen", "127.0.0.1:0", "--home"])
        .arg(home.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let served = Served { child };
    let pid = served.child.id();
    let base = first.trim().rsplit(' ').next().unwrap().to_string();
    let token = std::fs::read_to_string(home.path().join("admin.token")).unwrap().trim().to_string();
    let client = reqwest::Client::new();
    let created = client
        .post(format!("{base}/sandboxes"))
        .bearer_auth(&token)
        .json(&json!({ "name": "big", "config": { "disk": 2 * SIZE } }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "{}", created.text().await.unwrap());

    // The server is warm (runtime open, a sandbox made): its memory from here on.
    let before = status_kib(pid, "VmRSS:");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut highest = 0;
            while !stop.load(Ordering::SeqCst) {
                highest = highest.max(status_kib(pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(20));
            }
            highest
        })
    };

    // Generated as it is sent and hashed as it goes: the test holds one chunk at a time.
    let (hash_sender, hash_receiver) = tokio::sync::oneshot::channel();
    let upload = futures_util::stream::unfold((0u64, Sha256::new(), Some(hash_sender)), |(sent, mut hash, done)| async move {
        if sent == SIZE {
            if let Some(done) = done {
                done.send(hash.finalize().to_vec()).unwrap();
            }
            return None;
        }
        let chunk: Vec<u8> = (0..CHUNK as u64).map(|i| byte_at(sent + i)).collect();
        hash.update(&chunk);
        Some((Ok::<_, std::io::Error>(chunk), (sent + CHUNK as u64, hash, done)))
    });
    let put = client
        .put(format!("{base}/sandboxes/big/files/big.bin"))
        .bearer_auth(&token)
        .body(reqwest::Body::wrap_stream(upload))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200, "{}", put.text().await.unwrap());
    assert_eq!(put.json::<Value>().await.unwrap()["size"], SIZE);
    let sent = hash_receiver.await.unwrap();

    let got = client.get(format!("{base}/sandboxes/big/files/big.bin")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.content_length(), Some(SIZE));
    let mut body = got.bytes_stream();
    let (mut hash, mut received) = (Sha256::new(), 0u64);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        received += chunk.len() as u64;
        hash.update(&chunk);
    }
    assert_eq!(received, SIZE);
    assert_eq!(hash.finalize().to_vec(), sent, "the same bytes came back");

    stop.store(true, Ordering::SeqCst);
    let grew_mib = sampler.join().unwrap().saturating_sub(before) / 1024;
    eprintln!("the server's resident memory grew by at most {grew_mib} MiB while 1 GiB went up and back");
    assert!(grew_mib < FLAT_MEMORY_MIB, "the server's memory grew by {grew_mib} MiB moving a 1 GiB file");

    let deleted = client.delete(format!("{base}/sandboxes/big")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
}
