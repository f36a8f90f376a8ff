//! Says hello: shows that args, env, stdin, stdout, stderr and exit codes pass through.
//!
//! - stdout: `hello, <args joined by spaces>`
//! - `GREETING` env var, if set: printed as `greeting: <value>`
//! - `--stdin` as the first arg: prints `stdin: <what was read>`
//! - `EXIT_CODE` env var, if set: the exit status
use std::io::Read;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("hello, {}", args.join(" "));
    if let Ok(greeting) = std::env::var("GREETING") {
        println!("greeting: {greeting}");
    }
    if args.first().map(String::as_str) == Some("--stdin") {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input).expect("read stdin");
        println!("stdin: {input}");
    }
    eprintln!("hello on stderr");
    if let Ok(code) = std::env::var("EXIT_CODE") {
        std::process::exit(code.parse().expect("EXIT_CODE is a number"));
    }
}
