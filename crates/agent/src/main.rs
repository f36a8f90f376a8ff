//! The agent: reads requests on stdin, runs commands, writes replies on stdout.
//! See the library's docs for why it exists and `protocol` for the frames.
//!
//! It runs as root in the container, apart from the sandbox's user, and is
//! not dumpable: the sandbox's processes can neither signal it, trace it,
//! read its memory or environment, nor reach its stdin (which only the host's
//! attached stream writes). Each command runs under a shepherd (`shepherd.rs`)
//! that drops to the requested user for the command only and holds the
//! command's whole tree (`tree.rs`), however it forks.
//!
//! Threads: the main one reads requests and never blocks on a command; the
//! egress relay (when the sandbox has egress) has one of its own; each
//! command gets a waiter, output readers and, when it takes input, a stdin
//! writer. Killing runs on the main thread and forks nothing, so it works
//! while a fork bomb holds every free pid.

mod shepherd;
mod tree;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use airlock_agent::protocol::{
    OUTPUT_CHUNK_BYTES, PROTOCOL_VERSION, Reply, Request, Spawn, TtySize, decode_request, encode_reply, read_frame,
};

use crate::shepherd::{SHEPHERD_ARG, SHEPHERD_NAME, Streams};
use crate::tree::{MARKER_GIDS, Tree};

/// After a command's shepherd exits (its whole tree is gone), how long its
/// output may stay open (a descriptor passed out of the tree) before the exit
/// is reported anyway.
const PIPE_DRAIN_GRACE: Duration = Duration::from_millis(200);
/// How long a spawn waits for its shepherd to start the command before the
/// agent goes on to the next request (a shepherd starts in milliseconds).
const SHEPHERD_START_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between looks at a starting shepherd.
const SHEPHERD_START_POLL: Duration = Duration::from_micros(500);
/// The program the agent runs itself again from, as a shepherd.
const OWN_BINARY: &str = "/proc/self/exe";

/// Replies go out whole, one frame at a time, from any thread.
#[derive(Clone)]
struct Replies {
    out: Arc<Mutex<io::Stdout>>,
}

impl Replies {
    fn send(&self, run: u32, reply: &Reply) {
        let frame = encode_reply(run, reply);
        if let Ok(mut out) = self.out.lock() {
            // The host going away is not the agent's to handle: the container lives on.
            let _ = out.write_all(&frame).and_then(|()| out.flush());
        }
    }
}

/// Where one command's stdin bytes go (`None`: close it).
type Input = mpsc::Sender<Option<Vec<u8>>>;

/// What the agent keeps per running command.
#[derive(Default, Clone)]
struct State {
    /// Where each run's stdin bytes go.
    inputs: Arc<Mutex<HashMap<u32, Input>>>,
    /// Each run's shepherd, the root of its tree. An entry is removed before
    /// the shepherd is reaped (and its pid can be reused), under this lock,
    /// which kills hold while they work.
    trees: Arc<Mutex<HashMap<u32, Tree>>>,
    /// The terminal master of each run that has one, for resizes.
    terminals: Arc<Mutex<HashMap<u32, Arc<OwnedFd>>>>,
}

fn main() {
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|first| first == SHEPHERD_ARG) {
        shepherd::run(args);
    }
    harden();
    // After harden: the relay's thread inherits its credentials. It runs apart
    // from the request loop below, which never waits on it.
    if let Err(error) = airlock_agent::egress::start_if_configured() {
        eprintln!("airlock-agent: egress relay not started: {error}");
    }
    let replies = Replies { out: Arc::new(Mutex::new(io::stdout())) };
    let state = State::default();
    let mut stdin = io::stdin().lock();
    loop {
        let body = match read_frame(&mut stdin) {
            Ok(Some(body)) => body,
            // The engine keeps stdin open across attaches (StdinOnce is off),
            // so its end means no request can come again; commands already
            // running finish, and the container stays up until stopped.
            Ok(None) => loop {
                thread::park();
            },
            // Frames no longer line up: nothing after this can be trusted.
            // Ending takes the container down, which the host sees.
            Err(error) => {
                eprintln!("airlock-agent: reading a request: {error}");
                std::process::exit(2);
            }
        };
        match decode_request(&body) {
            Ok((run, request)) => handle(run, request, &replies, &state),
            Err(error) => eprintln!("airlock-agent: {error}"),
        }
    }
}

/// Not dumpable, so that nothing in the sandbox (not even root without
/// CAP_SYS_PTRACE) traces it or opens its `/proc` memory, environment or
/// descriptors; and no supplementary groups for the shepherds to inherit.
fn harden() {
    if let Err(error) = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable) {
        eprintln!("airlock-agent: PR_SET_DUMPABLE: {error}");
    }
    if rustix::process::geteuid().is_root()
        && let Err(error) = rustix::thread::set_thread_groups(&[])
    {
        eprintln!("airlock-agent: clearing supplementary groups: {error}");
    }
    if !rustix::process::geteuid().is_root() {
        eprintln!("airlock-agent: not root: commands run as the agent's own user, which they can then signal");
    }
}

fn handle(run: u32, request: Request, replies: &Replies, state: &State) {
    match request {
        Request::Ping => replies.send(run, &Reply::Pong { version: PROTOCOL_VERSION }),
        Request::Spawn(spawn) => {
            if let Err(error) = spawn_command(run, spawn, replies, state) {
                replies.send(run, &error);
            }
        }
        Request::Stdin(bytes) => {
            if let Ok(inputs) = state.inputs.lock()
                && let Some(input) = inputs.get(&run)
            {
                let _ = input.send(Some(bytes));
            }
        }
        Request::StdinEnd => {
            if let Ok(mut inputs) = state.inputs.lock()
                && let Some(input) = inputs.remove(&run)
            {
                let _ = input.send(None);
            }
        }
        Request::Resize(size) => {
            if let Ok(terminals) = state.terminals.lock()
                && let Some(master) = terminals.get(&run)
            {
                let _ = rustix::termios::tcsetwinsize(&**master, winsize(size));
            }
        }
        Request::Signal { target, signal } => {
            let remaining = match rustix::process::Signal::from_named_raw(signal) {
                Some(signal) => {
                    if let Ok(trees) = state.trees.lock()
                        && let Some(&tree) = trees.get(&target)
                    {
                        tree::signal_tree(tree, signal);
                    }
                    0
                }
                None => u32::MAX,
            };
            replies.send(run, &Reply::Signalled { remaining });
        }
        Request::KillTree { target } => {
            let remaining = match state.trees.lock() {
                Ok(trees) => trees.get(&target).map_or(0, |&tree| tree::kill_tree(tree)),
                Err(_) => u32::MAX,
            };
            replies.send(run, &Reply::Signalled { remaining });
        }
    }
}

fn winsize(size: TtySize) -> rustix::termios::Winsize {
    rustix::termios::Winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 }
}

/// A new terminal: its master (for the agent) and its subsidiary end (for the command).
fn open_terminal(size: TtySize) -> io::Result<(OwnedFd, File)> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let path = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(name.as_bytes()));
    let subsidiary = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(i32::try_from(rustix::fs::OFlags::NOCTTY.bits()).unwrap_or(0))
        .open(path)?;
    rustix::termios::tcsetwinsize(&master, winsize(size))?;
    Ok((master, subsidiary))
}

fn spawn_command(run: u32, spawn: Spawn, replies: &Replies, state: &State) -> Result<(), Reply> {
    if spawn.argv.is_empty() {
        return Err(Reply::SpawnFailed { code: 126, message: "no program".into() });
    }
    // Every attached host shares this stdin: a run id still in use is
    // another command's, which a new spawn must not take over.
    let in_use = state.trees.lock().map_or(true, |trees| trees.contains_key(&run))
        || state.inputs.lock().map_or(true, |inputs| inputs.contains_key(&run));
    if in_use {
        return Err(Reply::SpawnFailed { code: 126, message: format!("run id {run} is in use by another command") });
    }
    let identity = shepherd::resolve(&spawn.user).map_err(|message| Reply::SpawnFailed { code: 126, message })?;
    let own_uid = rustix::process::geteuid();
    if !own_uid.is_root() && identity.uid != own_uid.as_raw() {
        return Err(Reply::SpawnFailed {
            code: 126,
            message: format!("the agent is not root here and cannot run commands as {}", spawn.user),
        });
    }
    let streams = if spawn.tty.is_some() { Streams::Terminal } else { Streams::Pipes };
    let marker = new_marker(state)
        .ok_or_else(|| Reply::SpawnFailed { code: 126, message: "every marker group is in use".into() })?;
    let mut command = Command::new(OWN_BINARY);
    command
        .arg0(SHEPHERD_NAME)
        .args(shepherd::arguments(identity, marker, streams, &spawn.cwd, &spawn.argv))
        .envs(spawn.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        // Its own process group: when a kill stops part of the tree, the
        // kernel's SIGHUP to an orphaned, stopped group must not reach the agent.
        .process_group(0);
    let mut terminal = None;
    match spawn.tty {
        None => {
            command
                .stdin(if spawn.stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
        Some(size) => {
            let failed =
                |error: io::Error| Reply::SpawnFailed { code: 126, message: format!("opening a terminal: {error}") };
            let (master, subsidiary) = open_terminal(size).map_err(failed)?;
            let (out, err) = (subsidiary.try_clone().map_err(failed)?, subsidiary.try_clone().map_err(failed)?);
            command.stdin(Stdio::from(subsidiary)).stdout(Stdio::from(out)).stderr(Stdio::from(err));
            terminal = Some(Arc::new(master));
        }
    }
    let mut child = command.spawn().map_err(|error| Reply::SpawnFailed {
        code: 126,
        message: format!("starting the command's shepherd: {error}"),
    })?;
    // The subsidiary ends now live only in the shepherd and its tree.
    drop(command);
    let root = i32::try_from(child.id()).unwrap_or(-1);
    let tree = Tree { root, marker };
    if let Ok(mut trees) = state.trees.lock() {
        trees.insert(run, tree);
    }
    // Requests are handled in order: a signal or kill right behind this spawn
    // must find the command in the tree, so the spawn ends only once it is.
    wait_until_started(tree);
    replies.send(run, &Reply::Started { pid: child.id() });
    let ends = match &terminal {
        Some(master) => {
            if let Ok(mut terminals) = state.terminals.lock() {
                terminals.insert(run, master.clone());
            }
            match (master.try_clone(), master.try_clone()) {
                (Ok(read), Ok(write)) => Ends {
                    stdout: Some(Box::new(File::from(read))),
                    stderr: None,
                    stdin: Some(Box::new(File::from(write))),
                },
                // No descriptor to spare: the command runs, unread, until killed.
                _ => Ends { stdout: None, stderr: None, stdin: None },
            }
        }
        None => Ends {
            stdout: child.stdout.take().map(|pipe| Box::new(pipe) as Box<dyn Read + Send>),
            stderr: child.stderr.take().map(|pipe| Box::new(pipe) as Box<dyn Read + Send>),
            stdin: child.stdin.take().map(|pipe| Box::new(pipe) as Box<dyn Write + Send>),
        },
    };
    // The child goes to its waiter only once every thread is up: if one
    // cannot start (no free pid), it is still here to be killed.
    let (hand_over, take_over) = mpsc::channel::<Child>();
    match start_threads(run, ends, take_over, replies, state) {
        Ok(()) => {
            let _ = hand_over.send(child);
        }
        Err(error) => {
            forget(run, state);
            tree::kill_tree(tree);
            let _ = child.kill();
            let _ = child.wait();
            replies.send(run, &Reply::Stderr(format!("airlock-agent: starting a thread: {error}\n").into_bytes()));
            replies.send(run, &Reply::Exited { code: 128 + 9 });
        }
    }
    Ok(())
}

/// Waits until the shepherd `root` has started its command (it has a child)
/// or has exited, for at most [`SHEPHERD_START_TIMEOUT`].
fn wait_until_started(tree: Tree) {
    let Some(pid) = rustix::process::Pid::from_raw(tree.root) else { return };
    let give_up = Instant::now() + SHEPHERD_START_TIMEOUT;
    while Instant::now() < give_up {
        if !tree::members(tree).is_empty() {
            return;
        }
        let options = rustix::process::WaitIdOptions::EXITED
            | rustix::process::WaitIdOptions::NOHANG
            | rustix::process::WaitIdOptions::NOWAIT;
        if !matches!(rustix::process::waitid(rustix::process::WaitId::Pid(pid), options), Ok(None)) {
            return;
        }
        thread::sleep(SHEPHERD_START_POLL);
    }
}

/// A marker group for a new run: one no running command has, no group of
/// the image is, and no process (left from an earlier run) carries.
fn new_marker(state: &State) -> Option<u32> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let in_use: Vec<u32> = state.trees.lock().ok()?.values().map(|tree| tree.marker).collect();
    let image_groups: Vec<u32> = std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(':').nth(2)?.parse().ok())
        .collect();
    let (first, last) = marker_range(highest_mapped_gid());
    let span = last - first + 1;
    (0..span).find_map(|_| {
        let gid = first + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        (!in_use.contains(&gid) && !image_groups.contains(&gid) && !tree::group_in_use(gid)).then_some(gid)
    })
}

/// The highest group id this container can use: its user namespace maps
/// only so many (a remapped container, commonly 65,536).
fn highest_mapped_gid() -> u32 {
    let Ok(map) = std::fs::read_to_string("/proc/self/gid_map") else { return u32::MAX - 1 };
    map.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().map(str::parse::<u64>);
            let (Some(Ok(inside)), Some(Ok(_)), Some(Ok(count))) = (fields.next(), fields.next(), fields.next()) else {
                return None;
            };
            u32::try_from((inside + count).saturating_sub(1)).ok()
        })
        .max()
        .unwrap_or(u32::MAX - 1)
}

/// The marker groups to use when `highest` is the highest usable gid:
/// [`MARKER_GIDS`] where it fits, else the upper half of what is mapped.
fn marker_range(highest: u32) -> (u32, u32) {
    if highest >= *MARKER_GIDS.end() {
        (*MARKER_GIDS.start(), *MARKER_GIDS.end())
    } else {
        let last = highest.saturating_sub(1).max(2);
        ((highest / 2).max(1).min(last), last)
    }
}

/// The agent's ends of a command's streams.
struct Ends {
    stdout: Option<Box<dyn Read + Send>>,
    stderr: Option<Box<dyn Read + Send>>,
    stdin: Option<Box<dyn Write + Send>>,
}

fn forget(run: u32, state: &State) {
    if let Ok(mut trees) = state.trees.lock() {
        trees.remove(&run);
    }
    if let Ok(mut inputs) = state.inputs.lock() {
        inputs.remove(&run);
    }
    if let Ok(mut terminals) = state.terminals.lock() {
        terminals.remove(&run);
    }
}

fn start_threads(
    run: u32,
    ends: Ends,
    take_over: mpsc::Receiver<Child>,
    replies: &Replies,
    state: &State,
) -> io::Result<()> {
    let finished = Arc::new(AtomicBool::new(false));
    let (drained_tx, drained_rx) = mpsc::channel::<()>();
    let mut readers = 0;
    for (pipe, wrap) in [(ends.stdout, Reply::Stdout as fn(Vec<u8>) -> Reply), (ends.stderr, Reply::Stderr)] {
        if let Some(pipe) = pipe {
            let (replies, finished, drained) = (replies.clone(), finished.clone(), drained_tx.clone());
            thread::Builder::new().spawn(move || forward_output(run, pipe, wrap, &replies, &finished, &drained))?;
            readers += 1;
        }
    }
    drop(drained_tx);
    if let Some(stdin) = ends.stdin {
        let (sender, receiver) = mpsc::channel();
        thread::Builder::new().spawn(move || feed_stdin(stdin, &receiver))?;
        if let Ok(mut inputs) = state.inputs.lock() {
            inputs.insert(run, sender);
        }
    }
    let (replies, state) = (replies.clone(), state.clone());
    thread::Builder::new().spawn(move || {
        let Ok(mut child) = take_over.recv() else {
            return;
        };
        // Wait for the shepherd without reaping it, so that its pid cannot be
        // reused while a kill may still be looking at its tree.
        if let Some(pid) = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap_or(-1)) {
            loop {
                let waited = rustix::process::waitid(
                    rustix::process::WaitId::Pid(pid),
                    rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
                );
                if !matches!(waited, Err(rustix::io::Errno::INTR)) {
                    break;
                }
            }
        }
        // A shepherd kills what its command left before it exits; should it
        // have died first (the OOM killer), the marker still finds the rest.
        let tree = state.trees.lock().ok().and_then(|mut trees| trees.remove(&run));
        if let Some(tree) = tree {
            tree::kill_tree(tree);
        }
        let status = child.wait();
        let give_up = Instant::now() + PIPE_DRAIN_GRACE;
        for _ in 0..readers {
            let left = give_up.saturating_duration_since(Instant::now());
            if drained_rx.recv_timeout(left).is_err() {
                break;
            }
        }
        let code = match status {
            Ok(status) => status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            Err(_) => -1,
        };
        forget(run, &state);
        // Under the reply lock, so that no output of this run follows its exit.
        if let Ok(mut out) = replies.out.lock() {
            finished.store(true, Ordering::SeqCst);
            let _ = out.write_all(&encode_reply(run, &Reply::Exited { code })).and_then(|()| out.flush());
        }
    })?;
    Ok(())
}

fn forward_output(
    run: u32,
    mut pipe: Box<dyn Read + Send>,
    wrap: fn(Vec<u8>) -> Reply,
    replies: &Replies,
    finished: &AtomicBool,
    drained: &mpsc::Sender<()>,
) {
    let mut buffer = vec![0u8; OUTPUT_CHUNK_BYTES];
    loop {
        match pipe.read(&mut buffer) {
            // A terminal's master reads EIO once every subsidiary end is closed.
            Ok(0) | Err(_) => break,
            Ok(count) => {
                if let Ok(mut out) = replies.out.lock()
                    && !finished.load(Ordering::SeqCst)
                {
                    let frame = encode_reply(run, &wrap(buffer[..count].to_vec()));
                    let _ = out.write_all(&frame).and_then(|()| out.flush());
                }
            }
        }
    }
    let _ = drained.send(());
}

fn feed_stdin(mut stdin: Box<dyn Write + Send>, receiver: &mpsc::Receiver<Option<Vec<u8>>>) {
    while let Ok(Some(bytes)) = receiver.recv() {
        if stdin.write_all(&bytes).is_err() {
            break;
        }
    }
    // Dropping stdin closes the pipe: the command sees end of input.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_fit_in_what_the_namespace_maps() {
        assert_eq!(marker_range(u32::MAX - 1), (50_000, 59_999));
        assert_eq!(marker_range(65_535), (50_000, 59_999));
        assert_eq!(marker_range(4_095), (2_047, 4_094), "a remapped range of 4096 ids");
        let (first, last) = marker_range(0);
        assert!(first <= last);
    }
}
