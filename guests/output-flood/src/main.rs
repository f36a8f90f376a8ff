//! Hostile: writes to stdout (or stderr with `stderr`) forever.
use std::io::Write;

fn main() {
    let to_stderr = std::env::args().nth(1).as_deref() == Some("stderr");
    let line = b"flooding the host with output, line after line after line\n";
    loop {
        let written = if to_stderr { std::io::stderr().write_all(line) } else { std::io::stdout().write_all(line) };
        if written.is_err() {
            // A well-behaved program would stop here; a hostile one keeps going.
            continue;
        }
    }
}
