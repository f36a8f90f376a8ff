//! Reads, writes and lists files in /workspace.
//!
//! `workspace-io write <path> <text>`: creates parent directories, writes the file.
//! `workspace-io read <path>`: prints the file.
//! `workspace-io list <dir>`: prints the entry names, sorted, one a line.
//! `workspace-io remove <path>`: removes a file.
//! Paths are relative to /workspace.
use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = |i: usize| PathBuf::from("/workspace").join(&args[i]);
    match args.first().map(String::as_str) {
        Some("write") => {
            let target = path(1);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).expect("create parent directories");
            }
            std::fs::write(&target, &args[2]).expect("write file");
            println!("wrote {} bytes", args[2].len());
        }
        Some("read") => print!("{}", std::fs::read_to_string(path(1)).expect("read file")),
        Some("list") => {
            let mut names: Vec<String> = std::fs::read_dir(path(1))
                .expect("list directory")
                .map(|entry| entry.expect("directory entry").file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for name in names {
                println!("{name}");
            }
        }
        Some("remove") => std::fs::remove_file(path(1)).expect("remove file"),
        _ => {
            eprintln!("usage: workspace-io write|read|list|remove PATH [TEXT]");
            std::process::exit(2);
        }
    }
}
