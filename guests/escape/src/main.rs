//! Hostile: tries to reach files outside /workspace, one way per mode.
//!
//! Every attempt prints `DENIED <attempt>: <error>` or `ESCAPED <attempt>: <what it got>`.
//! Exits 0 when every attempt was denied, 3 when any got through.
//! The host test puts a secret file next to the workspace directory
//! (`/workspace/../secret.txt` on the host) and, for `symlink-follow` and
//! `hardlink-follow`, links inside the workspace named `link-out`.
use std::fs;
use std::io::Write;

struct Report {
    escaped: bool,
}

impl Report {
    fn check<T: std::fmt::Debug>(&mut self, attempt: &str, result: std::io::Result<T>) {
        match result {
            Ok(got) => {
                self.escaped = true;
                println!("ESCAPED {attempt}: {got:?}");
            }
            Err(e) => println!("DENIED {attempt}: {e}"),
        }
    }
}

fn write(path: &str) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new().create(true).write(true).truncate(false).open(path)?;
    file.write_all(b"pwned by a guest\n")
}

unsafe extern "C" {
    // wasi-libc's symlink(2); std's wrapper for it is not stable on WASI.
    #[link_name = "symlink"]
    fn libc_symlink(target: *const std::ffi::c_char, link: *const std::ffi::c_char) -> i32;
}

fn symlink(target: &str, link: &str) -> std::io::Result<()> {
    let target = std::ffi::CString::new(target).map_err(std::io::Error::other)?;
    let link = std::ffi::CString::new(link).map_err(std::io::Error::other)?;
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    if unsafe { libc_symlink(target.as_ptr(), link.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let mut report = Report { escaped: false };
    match mode.as_str() {
        "dotdot" => {
            report.check("read ../secret.txt", fs::read_to_string("/workspace/../secret.txt"));
            report.check("read relative ../secret.txt", fs::read_to_string("../secret.txt"));
            report.check("read deep ..", fs::read_to_string("/workspace/a/../../secret.txt"));
            report.check("write ../secret.txt", write("/workspace/../secret.txt"));
            report.check("create ../pwned.txt", write("/workspace/../pwned.txt"));
            report.check("list /workspace/..", fs::read_dir("/workspace/..").map(|d| d.count()));
            report.check("rename out", {
                fs::write("/workspace/inside.txt", b"x").and_then(|()| fs::rename("/workspace/inside.txt", "/workspace/../moved.txt"))
            });
        }
        "absolute" => {
            report.check("read /etc/passwd", fs::read_to_string("/etc/passwd"));
            report.check("write /tmp/pwned", write("/tmp/pwned"));
            report.check("list /", fs::read_dir("/").map(|d| d.map(|e| e.map(|e| e.file_name())).collect::<Vec<_>>()));
            report.check("read /root", fs::read_dir("/root").map(|d| d.count()));
        }
        "proc" => {
            report.check("read /proc/self/environ", fs::read("/proc/self/environ"));
            report.check("read /proc/self/maps", fs::read_to_string("/proc/self/maps"));
            report.check("read /proc/1/cmdline", fs::read("/proc/1/cmdline"));
            report.check("list /proc", fs::read_dir("/proc").map(|d| d.count()));
        }
        "symlink-follow" => {
            // link-out was made by the host, pointing at the secret outside.
            report.check("read through link-out", fs::read_to_string("/workspace/link-out"));
            report.check("write through link-out", write("/workspace/link-out"));
            report.check("list through dir-out", fs::read_dir("/workspace/dir-out").map(|d| d.count()));
        }
        "symlink-create" => {
            let made = symlink("../secret.txt", "/workspace/my-link");
            println!("made relative link: {made:?}");
            report.check("read through new relative link", fs::read_to_string("/workspace/my-link"));
            let made = symlink("/etc/passwd", "/workspace/abs-link");
            println!("made absolute link: {made:?}");
            report.check("read through new absolute link", fs::read_to_string("/workspace/abs-link"));
            let made = symlink("..", "/workspace/up");
            println!("made directory link: {made:?}");
            report.check("read through new directory link", fs::read_to_string("/workspace/up/secret.txt"));
        }
        "hardlink" => {
            report.check("hard link ../secret.txt in", fs::hard_link("/workspace/../secret.txt", "/workspace/hl"));
            report.check("hard link /etc/passwd in", fs::hard_link("/etc/passwd", "/workspace/hl2"));
            fs::write("/workspace/mine.txt", b"mine").ok();
            report.check("hard link out", fs::hard_link("/workspace/mine.txt", "/workspace/../hl-out"));
        }
        other => {
            eprintln!("unknown mode {other:?}; modes: dotdot absolute proc symlink-follow symlink-create hardlink");
            std::process::exit(2);
        }
    }
    std::process::exit(if report.escaped { 3 } else { 0 });
}
