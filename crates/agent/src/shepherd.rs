//! The shepherd: one per command, between the agent and the command.
//!
//! The agent starts it by running its own binary again (`/proc/self/exe`
//! with [`SHEPHERD_ARG`]), so that it begins as a fresh single-threaded
//! process. It stays root, is not dumpable, and marks itself a child
//! subreaper where the kernel allows (runc; gVisor refuses): orphans of the
//! command's tree are reparented to it. It starts the command with the run's
//! marker group as its only supplementary group, then as the user it was
//! given (`setgroups`, `setgid`, `setuid`, in the child before exec; see
//! `tree.rs`), reaps its children, and when the command itself ends, kills
//! what it left behind: a command's processes end with it. It exits with
//! the command's code, or 128 + the signal that ended it.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use rustix::process::WaitOptions;

use crate::tree::{self, Tree};

/// The first argument that makes the agent's binary a shepherd.
pub const SHEPHERD_ARG: &str = "--airlock-shepherd";
/// The name the shepherd shows in `ps`.
pub const SHEPHERD_NAME: &str = "airlock-shepherd";

/// Who a command runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

/// How the command's standard streams are set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streams {
    /// Pipes (or `/dev/null`), inherited as the shepherd got them.
    Pipes,
    /// A terminal on stdin, stdout and stderr: the command gets a session of
    /// its own with it as the controlling terminal.
    Terminal,
}

impl Streams {
    pub fn arg(self) -> &'static str {
        match self {
            Streams::Pipes => "pipes",
            Streams::Terminal => "tty",
        }
    }
}

/// The shepherd's arguments after [`SHEPHERD_ARG`], for the agent to pass.
pub fn arguments(identity: Identity, marker: u32, streams: Streams, cwd: &str, argv: &[String]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        SHEPHERD_ARG.into(),
        identity.uid.to_string().into(),
        identity.gid.to_string().into(),
        marker.to_string().into(),
        streams.arg().into(),
        cwd.into(),
        "--".into(),
    ];
    args.extend(argv.iter().map(OsString::from));
    args
}

/// Runs as the shepherd with the arguments after [`SHEPHERD_ARG`]; never returns.
pub fn run(args: impl Iterator<Item = OsString>) -> ! {
    let mut args: Vec<OsString> = args.collect();
    let argv = args.split_off(args.len().min(6));
    let mut fields = args.into_iter();
    let mut next = || fields.next().unwrap_or_default();
    let (uid, gid, marker, streams, cwd, separator) = (next(), next(), next(), next(), next(), next());
    let parsed = (|| {
        let number = |value: &OsString| value.to_str().and_then(|text| text.parse::<u32>().ok());
        let identity = Identity { uid: number(&uid)?, gid: number(&gid)? };
        let marker = number(&marker)?;
        let streams = match streams.to_str()? {
            "pipes" => Streams::Pipes,
            "tty" => Streams::Terminal,
            _ => return None,
        };
        (separator == "--" && !argv.is_empty()).then_some((identity, marker, streams))
    })();
    let Some((identity, marker, streams)) = parsed else {
        eprintln!("airlock-shepherd: malformed arguments");
        std::process::exit(126);
    };
    std::process::exit(shepherd(identity, marker, streams, &cwd, &argv))
}

fn shepherd(identity: Identity, marker: u32, streams: Streams, cwd: &OsString, argv: &[OsString]) -> i32 {
    if let Err(error) = harden() {
        eprintln!("airlock-shepherd: {error}");
        return 126;
    }
    let Some((program, args)) = argv.split_first() else { return 126 };
    if !std::path::Path::new(cwd).is_dir() {
        eprintln!("working directory {}: not a directory", cwd.to_string_lossy());
        return 126;
    }
    let Ok(cwd_c) = std::ffi::CString::new(cwd.as_encoded_bytes()) else { return 126 };
    let mut command = Command::new(program);
    command.args(args).current_dir(cwd);
    if let Streams::Pipes = streams {
        // Its own process group, so that nothing it sends its group reaches the shepherd.
        command.process_group(0);
    }
    let root = rustix::process::geteuid().is_root();
    let terminal = streams == Streams::Terminal;
    let (uid, gid) = (rustix::process::Uid::from_raw(identity.uid), rustix::process::Gid::from_raw(identity.gid));
    let marker_gid = rustix::process::Gid::from_raw(marker);
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec. It makes
    // system calls only (setgroups, setgid, setuid, chdir, setsid, ioctl),
    // which are async-signal-safe; it allocates nothing (the directory name is
    // made beforehand) and takes no lock. The identity calls are per thread,
    // and the forked child has one thread.
    unsafe {
        command.pre_exec(move || {
            if root {
                // The run's marker group, the only supplementary one; then the
                // group and user, the user last (it gives up the right to the rest).
                rustix::thread::set_thread_groups(&[marker_gid])?;
                if identity.gid != 0 {
                    rustix::thread::set_thread_gid(gid)?;
                }
                if identity.uid != 0 {
                    rustix::thread::set_thread_uid(uid)?;
                }
                // Entered again as the user: the first chdir was root's.
                rustix::process::chdir(cwd_c.as_c_str())?;
            }
            if terminal {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
            }
            Ok(())
        });
    }
    let main = match command.spawn() {
        Ok(child) => child.id(),
        Err(error) => {
            eprintln!("{}: {error}", program.to_string_lossy());
            return if error.kind() == io::ErrorKind::NotFound { 127 } else { 126 };
        }
    };
    let main = i32::try_from(main).unwrap_or(-1);
    let own = i32::try_from(std::process::id()).unwrap_or(-1);
    let mut code = None;
    loop {
        match rustix::process::wait(WaitOptions::empty()) {
            Ok(Some((pid, status))) => {
                if pid.as_raw_nonzero().get() == main {
                    code = Some(match (status.exit_status(), status.terminating_signal()) {
                        (Some(exit), _) => exit,
                        (None, Some(signal)) => 128 + signal,
                        (None, None) => 128,
                    });
                    // The command is over: what it left behind goes with it.
                    tree::kill_tree(Tree { root: own, marker });
                }
            }
            Ok(None) => {}
            Err(rustix::io::Errno::INTR) => {}
            // No children left: the whole tree is gone.
            Err(_) => break,
        }
    }
    code.unwrap_or(128)
}

/// Not dumpable (no ptrace, no reading its memory or environment, even by
/// root without CAP_SYS_PTRACE), a subreaper, and named for `ps`.
fn harden() -> Result<(), String> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|error| format!("PR_SET_DUMPABLE: {error}"))?;
    // The flag is "non-zero": 1, which gVisor also takes (it refuses other values).
    // The flag is "non-zero". gVisor refuses it (EINVAL): there the marker
    // group alone holds the tree (see `tree.rs`), so a refusal is not an
    // error (and nothing is said: this process's stderr is the command's).
    let _ = rustix::process::set_child_subreaper(Some(rustix::process::Pid::INIT));
    let name = std::ffi::CString::new(SHEPHERD_NAME.as_bytes()).unwrap_or_default();
    let _ = rustix::thread::set_name(&name);
    Ok(())
}

/// Finds `user` (`uid[:gid]`, or names from the image's `/etc/passwd` and
/// `/etc/group`).
pub fn resolve(user: &str) -> Result<Identity, String> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (user, None),
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let by_name = |table: &str, name: &str| -> Option<(u32, Option<u32>)> {
        table.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name))
                .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3).and_then(|gid| gid.parse().ok()))))?
        })
    };
    let (uid, primary_gid) = match user_part.parse::<u32>() {
        Ok(uid) => {
            let gid = passwd.lines().find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                (fields.get(2)?.parse::<u32>().ok()? == uid).then(|| fields.get(3)?.parse().ok())?
            });
            (uid, gid)
        }
        Err(_) if !user_part.is_empty() => {
            by_name(&passwd, user_part).ok_or_else(|| format!("no user {user_part:?} in the image"))?
        }
        Err(_) => return Err("no user given".into()),
    };
    let gid = match group_part {
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
                by_name(&groups, group).map(|(gid, _)| gid).ok_or_else(|| format!("no group {group:?} in the image"))?
            }
        },
        None => primary_gid.unwrap_or(uid),
    };
    Ok(Identity { uid, gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_users_need_no_lookup() {
        assert_eq!(resolve("1000:1000"), Ok(Identity { uid: 1000, gid: 1000 }));
        assert_eq!(resolve("0"), Ok(Identity { uid: 0, gid: 0 }));
        assert!(resolve("").is_err());
        assert!(resolve("no-such-user-here").is_err());
    }

    #[test]
    fn the_arguments_carry_everything() {
        let args = arguments(Identity { uid: 7, gid: 8 }, 50_001, Streams::Terminal, "/w", &["a b".into(), "c".into()]);
        let text: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(text, [SHEPHERD_ARG, "7", "8", "50001", "tty", "/w", "--", "a b", "c"]);
    }
}
