//! A command's process tree, found from `/proc`, and killed whole.
//!
//! Two things mark a process as the command's, and neither can be undone
//! from inside the tree:
//!
//! - **its marker group.** The shepherd gives the command a supplementary
//!   group of its own (one per run, see [`MARKER_GIDS`]) before dropping to
//!   the sandbox's user. Every process the command starts inherits it, and
//!   changing supplementary groups needs CAP_SETGID, which the sandbox's user
//!   does not have (and no-new-privileges keeps it from gaining). A double
//!   fork, `setsid`, a new process group or a wiped environment change
//!   nothing. This works the same under runc and runsc.
//! - **its ancestry.** Every descendant of the shepherd, by parent links.
//!   Under runc the shepherd is also a child subreaper, so orphans stay its
//!   descendants; this covers commands run as root, which could drop the
//!   group. gVisor refuses PR_SET_CHILD_SUBREAPER, so there root commands'
//!   orphans are caught only while their parents live.
//!
//! Signals go through a pidfd when the kernel has them: membership is
//! checked again after the pidfd is open, so a pid reused by an unrelated
//! process between the scan and the signal is never hit.

use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;
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
/// The supplementary groups runs are marked with, one per running command:
/// inside the 65,536 ids a remapped container commonly has, and above the ids
/// images give their users and groups (where the namespace maps fewer ids,
/// the agent takes the upper half of those). Bounds the commands that run at
/// once (the pids limit bounds them far lower).
pub const MARKER_GIDS: RangeInclusive<u32> = 50_000..=59_999;

/// One command's tree: its shepherd, and the group its processes carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tree {
    pub root: i32,
    pub marker: u32,
}

/// What `/proc/<pid>/status` says about a process.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub ppid: i32,
    pub state: char,
    pub groups: Vec<u32>,
}

/// Reads the fields of `/proc/<pid>/status` the tree needs.
pub fn parse_status(text: &str) -> Option<Status> {
    let mut status = Status::default();
    let mut seen = (false, false);
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("State:") {
            status.state = value.trim().chars().next()?;
            seen.0 = true;
        } else if let Some(value) = line.strip_prefix("PPid:") {
            status.ppid = value.trim().parse().ok()?;
            seen.1 = true;
        } else if let Some(value) = line.strip_prefix("Groups:") {
            status.groups = value.split_whitespace().filter_map(|gid| gid.parse().ok()).collect();
        }
    }
    (seen.0 && seen.1).then_some(status)
}

fn status_of(pid: i32) -> Option<Status> {
    parse_status(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Every living (not zombie) process.
fn scan() -> Vec<(i32, Status)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, status_of(pid)?)))
        .filter(|(_, status)| status.state != 'Z' && status.state != 'X')
        .collect()
}

/// Whether any living process carries `gid` (a marker still in use).
pub fn group_in_use(gid: u32) -> bool {
    scan().iter().any(|(_, status)| status.groups.contains(&gid))
}

/// Every living process of `tree` but its shepherd: those carrying its
/// marker and every descendant of the shepherd.
pub fn members(tree: Tree) -> Vec<i32> {
    let processes = scan();
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    let mut found: HashSet<i32> = HashSet::new();
    for (pid, status) in &processes {
        children.entry(status.ppid).or_default().push(*pid);
        if status.groups.contains(&tree.marker) {
            found.insert(*pid);
        }
    }
    let mut next = vec![tree.root];
    while let Some(parent) = next.pop() {
        if let Some(kids) = children.remove(&parent) {
            found.extend(kids.iter().copied());
            next.extend(kids);
        }
    }
    found.remove(&tree.root);
    let mut found: Vec<i32> = found.into_iter().collect();
    found.sort_unstable();
    found
}

/// Sends `signal` to `pid` if it still belongs to `tree`.
fn signal_member(pid: i32, tree: Tree, members: &HashSet<i32>, signal: Signal) {
    let Some(target) = Pid::from_raw(pid) else { return };
    let still_member = || {
        let mut current = pid;
        for _ in 0..MAX_TREE_DEPTH {
            match status_of(current) {
                Some(status) if current == pid && status.groups.contains(&tree.marker) => return true,
                Some(status) if status.ppid == tree.root || members.contains(&status.ppid) => return true,
                Some(status) if status.ppid > 1 => current = status.ppid,
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

/// Sends `signal` once to every process of `tree` but its shepherd.
pub fn signal_tree(tree: Tree, signal: Signal) {
    let pids = members(tree);
    let set: HashSet<i32> = pids.iter().copied().collect();
    for pid in pids {
        signal_member(pid, tree, &set, signal);
    }
}

/// Stops then kills every process of `tree` but its shepherd, round after
/// round, until none is left; stopping first keeps a fork bomb from
/// outrunning the kills. Forks nothing, so it works while a fork bomb holds
/// every free pid. Returns how many were left when it gave up (0: all gone).
pub fn kill_tree(tree: Tree) -> u32 {
    let mut left = 0;
    for _ in 0..KILL_ROUNDS {
        let pids = members(tree);
        if pids.is_empty() {
            return 0;
        }
        left = u32::try_from(pids.len()).unwrap_or(u32::MAX);
        let set: HashSet<i32> = pids.iter().copied().collect();
        for &pid in &pids {
            signal_member(pid, tree, &set, Signal::STOP);
        }
        for &pid in &pids {
            signal_member(pid, tree, &set, Signal::KILL);
        }
        std::thread::sleep(KILL_ROUND_PAUSE);
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_files_are_read() {
        let text = "Name:\tbash\nState:\tS (sleeping)\nPPid:\t7\nGroups:\t1000 50001 \n";
        assert_eq!(parse_status(text), Some(Status { ppid: 7, state: 'S', groups: vec![1000, 50001] }));
        assert_eq!(parse_status("Name:\tx\n"), None);
    }

    #[test]
    fn a_tree_is_found_and_killed_including_what_left_its_session() {
        // This test process stands in for the shepherd (it is no subreaper, and
        // marks nothing: an unused marker), so its descendants are the tree.
        let mut child =
            std::process::Command::new("sh").args(["-c", "setsid sleep 300 & sleep 300 & wait"]).spawn().unwrap();
        let tree = Tree { root: i32::try_from(std::process::id()).unwrap(), marker: u32::MAX - 1 };
        let mut seen = Vec::new();
        for _ in 0..200 {
            seen = members(tree);
            if seen.len() >= 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(seen.len() >= 3, "{seen:?}");
        assert_eq!(kill_tree(tree), 0);
        let _ = child.wait();
        assert!(members(tree).is_empty());
    }
}
