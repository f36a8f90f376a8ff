//! Opens one workspace file again and again, keeping every handle, until the
//! host refuses one; then closes them all and opens it once more.
//!
//! Prints `hogging` first (so its output stream exists before handles run
//! out), then `opened N` and `refused: <error>` (or `never refused` after
//! `MAX` opens, default 100000), then `reopened after closing` if a fresh
//! open works once the handles are gone.
use std::fs::File;

fn main() {
    let max: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(100_000);
    println!("hogging");
    let path = "/workspace/hog.txt";
    std::fs::write(path, b"held open many times\n").expect("create the file");
    let mut held: Vec<File> = Vec::new();
    let mut refusal = None;
    while held.len() < max {
        match File::open(path) {
            Ok(file) => held.push(file),
            Err(error) => {
                refusal = Some(error);
                break;
            }
        }
    }
    println!("opened {}", held.len());
    match refusal {
        Some(error) => println!("refused: {error}"),
        None => println!("never refused"),
    }
    held.clear();
    match File::open(path) {
        Ok(_) => println!("reopened after closing"),
        Err(error) => println!("still refused: {error}"),
    }
}
