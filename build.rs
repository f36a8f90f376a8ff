//! Packs the interpreter components (`guests/out/python.wasm`, `js.wasm`) into
//! the `airlock` binary, zstd-compressed, so an installed or copied binary runs
//! Python and JavaScript with no build tree. Built before the guests (a fresh
//! clone), the binary carries none and says so when asked for an interpreter.

use std::fmt::Write as _;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

/// The components carried, by file name (as the interpreter directory names them).
const CARRIED: [&str; 2] = ["python.wasm", "js.wasm"];
/// zstd level: near the best ratio for these files at a few seconds per build.
const COMPRESSION_LEVEL: i32 = 15;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let guests = PathBuf::from("guests").join("out");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut table = String::from("&[\n");
    // Names this build's set of components (computed here, not at every start).
    let mut digest = Sha256::new();
    let mut all_there = true;
    for name in CARRIED {
        let source = guests.join(name);
        // Cargo reruns this script when a component changes (or appears).
        println!("cargo:rerun-if-changed={}", source.display());
        all_there &= source.is_file();
    }
    if all_there {
        for name in CARRIED {
            let bytes = std::fs::read(guests.join(name))?;
            let packed = zstd::bulk::compress(&bytes, COMPRESSION_LEVEL)?;
            digest.update(name.as_bytes());
            digest.update(bytes.len().to_le_bytes());
            digest.update(&packed);
            let packed_path = out.join(format!("{name}.zst"));
            std::fs::write(&packed_path, packed)?;
            writeln!(table, "    ({name:?}, {}, include_bytes!({:?})),", bytes.len(), packed_path.display())?;
        }
    }
    table.push(']');
    std::fs::write(out.join("carried_interpreters.rs"), table)?;
    let named: String = digest.finalize().iter().take(8).map(|byte| format!("{byte:02x}")).collect();
    std::fs::write(out.join("carried_digest.rs"), format!("{named:?}"))?;
    Ok(())
}
