//! A command's process tree, found from `/proc` by parent links.
//!
//! Every command runs under a shepherd that is a child subreaper (see
//! `shepherd.rs`): whatever the command starts, and whatever is orphaned in
//! it (double forks, `setsid`, a new process group), stays a descendant of
//! the shepherd. Nothing a process can change about itself takes it out of
//! that tree; only the death of the shepherd could, and the shepherd runs
//! as root, which the sandbox's user cannot signal or trace.
//!
//! Signals go through a pidfd when the kernel has them: the pid is checked
//! to still hang off the tree after the pidfd is open, so a pid reused by an
//! unrelated process between the scan and the signal is never hit.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rustix::process::{Pid, PidfdFlags, Signal, kill_process, pidfd_open, pidfd_send_signal};

/// Rounds of stop-then-kill before a tree kill gives up: each round scans
/// `/proc` once, so this bounds a kill to well under a second of work.
pub const KILL_ROUNDS: u32 = 200;
/// Pause between kill rounds, so that a process mid-fork shows up.
const KILL_ROUND_PAUSE: Duration = Duration::from_millis(2);
/// Deepest parent chain followed when checking a pid against a tree: more
/// than the pids limit allows, so it only stops a loop on a racing `/proc`.
const MAX_TREE_DEPTH: usize = 65_536;

/// The parent and state of a process from its `/proc/<pid>/stat`.
pub fn parse_stat(stat: &str) -> Option<(i32, char)> {
    // The command name may hold spaces and parentheses: the fields after it
    // start past its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

fn stat_of(pid: i32) -> Option<(i32, char)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every living (not zombie) descendant of `root`, parents before children.
pub fn descendants(root: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for pid in entries.flatten().filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok()) {
        if let Some((ppid, state)) = stat_of(pid)
            && state != 'Z'
            && state != 'X'
        {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut next = vec![root];
    while let Some(parent) = next.pop() {
        if let Some(kids) = children.remove(&parent) {
            found.extend_from_slice(&kids);
            next.extend(kids);
        }
    }
    found
}

/// Sends `signal` to `pid` if it still belongs to the tree of `root`.
fn signal_member(pid: i32, root: i32, members: &HashSet<i32>, signal: Signal) {
    let Some(target) = Pid::from_raw(pid) else { return };
    let still_member = || {
        let mut current = pid;
        for _ in 0..MAX_TREE_DEPTH {
            match stat_of(current) {
                Some((ppid, _)) if ppid == root => return true,
                Some((ppid, _)) if members.contains(&ppid) => return true,
                Some((ppid, _)) if ppid > 1 => current = ppid,
                _ => return false,
            }
        }
        false
    };
    match pidfd_open(target, PidfdFlags::empty()) {
        Ok(pidfd) => {
            // The pidfd pins this very process: checked after it is open, the
            // check and the signal are about the same one.
            if still_member() {
                let _ = pidfd_send_signal(&pidfd, signal);
            }
        }
        // No pidfds here (an older kernel or sandbox): the check and the
        // signal are two steps, with only the pid-reuse window between them.
        Err(_) => {
            if still_member() {
                let _ = kill_process(target, signal);
            }
        }
    }
}

/// Sends `signal` once to every descendant of `root`.
pub fn signal_tree(root: i32, signal: Signal) {
    let pids = descendants(root);
    let members: HashSet<i32> = pids.iter().copied().collect();
    for pid in pids {
        signal_member(pid, root, &members, signal);
    }
}

/// Stops then kills every descendant of `root`, round after round, until
/// none is left; stopping first keeps a fork bomb from outrunning the kills.
/// Forks nothing, so it works while a fork bomb holds every free pid.
/// Returns how many were left when it gave up (0: all gone).
pub fn kill_tree(root: i32) -> u32 {
    let mut left = 0;
    for _ in 0..KILL_ROUNDS {
        let pids = descendants(root);
        if pids.is_empty() {
            return 0;
        }
        left = u32::try_from(pids.len()).unwrap_or(u32::MAX);
        let members: HashSet<i32> = pids.iter().copied().collect();
        for &pid in &pids {
            signal_member(pid, root, &members, Signal::STOP);
        }
        for &pid in &pids {
            signal_member(pid, root, &members, Signal::KILL);
        }
        std::thread::sleep(KILL_ROUND_PAUSE);
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_read_past_the_command_name() {
        assert_eq!(parse_stat("42 (bash) S 7 42 42 0 -1"), Some((7, 'S')));
        assert_eq!(parse_stat("43 (a) b) (c) Z 1 43 43 0"), Some((1, 'Z')), "a name with parentheses");
        assert_eq!(parse_stat("44 (x"), None);
    }

    #[test]
    fn a_tree_is_found_and_killed_including_what_left_its_session() {
        // This test process stands in for the shepherd: it is not a subreaper,
        // so the orphan is looked for while its parent still lives.
        let mut child =
            std::process::Command::new("sh").args(["-c", "setsid sleep 300 & sleep 300 & wait"]).spawn().unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        let mut seen = Vec::new();
        for _ in 0..200 {
            seen = descendants(me);
            if seen.len() >= 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(seen.len() >= 3, "{seen:?}");
        assert_eq!(kill_tree(me), 0);
        let _ = child.wait();
        assert!(descendants(me).is_empty());
    }
}
