//! Hostile: blocks inside a host call, where no wasm runs to be interrupted.
//! `blocker sleep`: sleeps for an hour. `blocker stdin`: reads stdin until it ends.
use std::io::Read;

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("sleep") => std::thread::sleep(std::time::Duration::from_secs(3600)),
        Some("stdin") => {
            let mut input = Vec::new();
            std::io::stdin().read_to_end(&mut input).expect("read stdin");
            println!("read {} bytes", input.len());
        }
        _ => {
            eprintln!("usage: blocker sleep|stdin");
            std::process::exit(2);
        }
    }
}
