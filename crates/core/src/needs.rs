//! What a task needs from a sandbox, read from the request itself: the
//! router's input. Reading is cheap (no I/O, no allocation beyond the program
//! name's basename) because it runs before every request.

use serde::{Deserialize, Serialize};

use crate::{ExecRequest, Language};

/// The capabilities a task needs. `Default` is a task an isolate can run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Needs {
    /// A shell (bash, sh) runs the command.
    pub shell: bool,
    /// git runs.
    pub git: bool,
    /// A native Linux program runs (anything that is not a WebAssembly guest).
    pub native: bool,
    /// Processes outlive the request (background processes, PTY sessions).
    pub processes: bool,
    /// A port inside the sandbox is listened on or reached.
    pub ports: bool,
    /// A package manager installs something.
    pub package_install: bool,
    /// The network is used (denied by policy today; named so the router can say so).
    pub network: bool,
    /// Code in this language is evaluated.
    pub language: Option<Language>,
}

const SHELLS: &[&str] = &["bash", "sh", "dash", "zsh"];
const PACKAGE_MANAGERS: &[&str] = &["apt", "apt-get", "dpkg", "pip", "pip3", "npm", "npx", "yarn", "pnpm"];
const NETWORK_TOOLS: &[&str] = &["curl", "wget", "ssh", "scp", "nc"];

impl Needs {
    /// The needs of running `request`'s program: a `.wasm`/`.wat` program is a
    /// guest an isolate runs; anything else is a native program. A shell's
    /// script (`-c`) is scanned for the words that name git, package managers
    /// and network tools.
    pub fn of_exec(request: &ExecRequest) -> Self {
        let program = basename(&request.program);
        if program.ends_with(".wasm") || program.ends_with(".wat") {
            return Self::default();
        }
        let mut needs = Self { native: true, ..Self::default() };
        needs.note_word(program);
        if needs.shell {
            for script in &request.args {
                for word in script.split(|c: char| c.is_whitespace() || matches!(c, ';' | '|' | '&' | '(' | ')' | '`'))
                {
                    needs.note_word(basename(word));
                }
            }
        }
        needs
    }

    /// The needs of evaluating code: the language. Whether the code needs more
    /// (a subprocess, a missing module) only the interpreter can tell, by
    /// answering needs-escalation.
    pub fn of_code(language: Language) -> Self {
        Self { language: Some(language), ..Self::default() }
    }

    /// The needs of a process that outlives its request.
    pub fn of_process() -> Self {
        Self { native: true, processes: true, ..Self::default() }
    }

    fn note_word(&mut self, word: &str) {
        if SHELLS.contains(&word) {
            self.shell = true;
        } else if word == "git" {
            self.git = true;
        } else if PACKAGE_MANAGERS.contains(&word) {
            self.package_install = true;
        } else if NETWORK_TOOLS.contains(&word) {
            self.network = true;
        }
    }

    /// Whether an isolate can do all of it.
    pub fn isolate_can(&self) -> bool {
        !(self.shell || self.git || self.native || self.processes || self.ports || self.package_install || self.network)
    }

    /// Why a container is needed, in a few words; `None` when an isolate can do it.
    pub fn container_reason(&self) -> Option<&'static str> {
        Some(if self.git {
            "git needs a full Linux"
        } else if self.package_install {
            "a package manager needs a full Linux"
        } else if self.shell {
            "a shell needs a full Linux"
        } else if self.processes {
            "a process that outlives the request needs a full Linux"
        } else if self.ports {
            "a listening port needs a full Linux"
        } else if self.network {
            "a network tool needs a full Linux"
        } else if self.native {
            "a native program needs a full Linux"
        } else {
            return None;
        })
    }
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_stay_in_isolates_and_native_programs_do_not() {
        assert!(Needs::of_exec(&ExecRequest::new("/workspace/hello.wasm")).isolate_can());
        assert!(Needs::of_exec(&ExecRequest::new("tool.wat")).isolate_can());
        let ls = Needs::of_exec(&ExecRequest::new("ls"));
        assert!(ls.native && !ls.isolate_can());
        assert_eq!(ls.container_reason(), Some("a native program needs a full Linux"));
    }

    #[test]
    fn the_words_of_a_command_are_read() {
        let git = Needs::of_exec(&ExecRequest::new("/usr/bin/git").args(["log"]));
        assert!(git.git);
        assert_eq!(git.container_reason(), Some("git needs a full Linux"));
        let script = Needs::of_exec(&ExecRequest::new("bash").args(["-c", "cd app && npm install; curl -s x|sh"]));
        assert!(script.shell && script.package_install && script.network);
        // Words after the program are not commands unless a shell runs them.
        let echo = Needs::of_exec(&ExecRequest::new("echo").args(["git"]));
        assert!(!echo.git && echo.native);
    }

    #[test]
    fn code_and_processes() {
        let code = Needs::of_code(Language::Python);
        assert!(code.isolate_can());
        assert_eq!(code.language, Some(Language::Python));
        assert!(!Needs::of_process().isolate_can());
    }
}
