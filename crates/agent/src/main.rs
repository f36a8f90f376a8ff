//! The agent: reads requests on stdin, runs commands, writes replies on stdout.
//! See the library's docs for why it exists and `protocol` for the frames.
//!
//! Threads: the main one reads requests and never blocks on a command; each
//! command gets a waiter, two output readers and, when it takes input, a stdin
//! writer. Killing runs on the main thread and forks nothing, so it works
//! while a fork bomb holds every free pid.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use airlock_agent::protocol::{
    EXEC_MARKER_VAR, OUTPUT_CHUNK_BYTES, Reply, Request, Spawn, decode_request, encode_reply, read_frame,
};

/// After a command exits, how long its output pipes may stay open (held by
/// something it left in the background) before the exit is reported anyway.
const PIPE_DRAIN_GRACE: Duration = Duration::from_millis(200);
/// Rounds of stop-then-kill before a tree kill gives up.
const KILL_ROUNDS: u32 = 200;
/// Pause between kill rounds, so that a process mid-fork shows up.
const KILL_ROUND_PAUSE: Duration = Duration::from_millis(2);

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

/// Commands that take input, by run: where their stdin bytes go.
type Inputs = Arc<Mutex<HashMap<u32, mpsc::Sender<Option<Vec<u8>>>>>>;

fn main() {
    let replies = Replies { out: Arc::new(Mutex::new(io::stdout())) };
    let inputs: Inputs = Arc::default();
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
            Ok((run, request)) => handle(run, request, &replies, &inputs),
            Err(error) => eprintln!("airlock-agent: {error}"),
        }
    }
}

fn handle(run: u32, request: Request, replies: &Replies, inputs: &Inputs) {
    match request {
        Request::Ping => replies.send(run, &Reply::Pong),
        Request::Spawn(spawn) => {
            if let Err(error) = spawn_command(run, spawn, replies, inputs) {
                replies.send(run, &error);
            }
        }
        Request::Stdin(bytes) => {
            if let Ok(inputs) = inputs.lock()
                && let Some(input) = inputs.get(&run)
            {
                let _ = input.send(Some(bytes));
            }
        }
        Request::StdinEnd => {
            if let Ok(mut inputs) = inputs.lock()
                && let Some(input) = inputs.remove(&run)
            {
                let _ = input.send(None);
            }
        }
        Request::Signal { marker, signal } => {
            let remaining = match rustix::process::Signal::from_named_raw(signal) {
                Some(signal) => {
                    signal_marked(&marker, signal);
                    0
                }
                None => u32::MAX,
            };
            replies.send(run, &Reply::Signalled { remaining });
        }
        Request::KillTree { marker } => {
            let remaining = kill_marked(&marker);
            replies.send(run, &Reply::Signalled { remaining });
        }
    }
}

fn spawn_command(run: u32, spawn: Spawn, replies: &Replies, inputs: &Inputs) -> Result<(), Reply> {
    let Some((program, args)) = spawn.argv.split_first() else {
        return Err(Reply::SpawnFailed { code: 126, message: "no program".into() });
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(spawn.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env(EXEC_MARKER_VAR, &spawn.marker)
        .current_dir(&spawn.cwd)
        // Its own process group: when a kill stops part of the tree, the
        // kernel's SIGHUP to an orphaned, stopped group must not reach the agent.
        .process_group(0)
        .stdin(if spawn.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|error| {
        if !std::path::Path::new(&spawn.cwd).is_dir() {
            return Reply::SpawnFailed { code: 126, message: format!("working directory {}: {error}", spawn.cwd) };
        }
        let code = if error.kind() == io::ErrorKind::NotFound { 127 } else { 126 };
        Reply::SpawnFailed { code, message: format!("{program}: {error}") }
    })?;
    replies.send(run, &Reply::Started { pid: child.id() });
    let pipes = (child.stdout.take(), child.stderr.take(), child.stdin.take());
    // The child goes to its waiter only once every thread is up: if one
    // cannot start (no free pid), it is still here to be killed.
    let (hand_over, take_over) = mpsc::channel::<Child>();
    match start_threads(run, pipes, take_over, replies, inputs) {
        Ok(()) => {
            let _ = hand_over.send(child);
        }
        Err(error) => {
            if let Ok(mut inputs) = inputs.lock() {
                inputs.remove(&run);
            }
            let _ = child.kill();
            let _ = child.wait();
            kill_marked(&spawn.marker);
            replies.send(run, &Reply::Stderr(format!("airlock-agent: starting a thread: {error}\n").into_bytes()));
            replies.send(run, &Reply::Exited { code: 128 + 9 });
        }
    }
    Ok(())
}

type Pipes = (Option<ChildStdout>, Option<ChildStderr>, Option<ChildStdin>);

fn start_threads(
    run: u32,
    (stdout, stderr, stdin): Pipes,
    take_over: mpsc::Receiver<Child>,
    replies: &Replies,
    inputs: &Inputs,
) -> io::Result<()> {
    let finished = Arc::new(AtomicBool::new(false));
    let (drained_tx, drained_rx) = mpsc::channel::<()>();
    let mut readers = 0;
    if let Some(stdout) = stdout {
        let (replies, finished, drained) = (replies.clone(), finished.clone(), drained_tx.clone());
        thread::Builder::new()
            .spawn(move || forward_output(run, stdout, Reply::Stdout, &replies, &finished, &drained))?;
        readers += 1;
    }
    if let Some(stderr) = stderr {
        let (replies, finished, drained) = (replies.clone(), finished.clone(), drained_tx.clone());
        thread::Builder::new()
            .spawn(move || forward_output(run, stderr, Reply::Stderr, &replies, &finished, &drained))?;
        readers += 1;
    }
    drop(drained_tx);
    if let Some(stdin) = stdin {
        let (sender, receiver) = mpsc::channel();
        thread::Builder::new().spawn(move || feed_stdin(stdin, &receiver))?;
        if let Ok(mut inputs) = inputs.lock() {
            inputs.insert(run, sender);
        }
    }
    let (replies, inputs) = (replies.clone(), inputs.clone());
    thread::Builder::new().spawn(move || {
        let Ok(mut child) = take_over.recv() else {
            return;
        };
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
        if let Ok(mut inputs) = inputs.lock() {
            inputs.remove(&run);
        }
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
    mut pipe: impl Read,
    wrap: fn(Vec<u8>) -> Reply,
    replies: &Replies,
    finished: &AtomicBool,
    drained: &mpsc::Sender<()>,
) {
    let mut buffer = vec![0u8; OUTPUT_CHUNK_BYTES];
    loop {
        match pipe.read(&mut buffer) {
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

fn feed_stdin(mut stdin: ChildStdin, receiver: &mpsc::Receiver<Option<Vec<u8>>>) {
    while let Ok(Some(bytes)) = receiver.recv() {
        if stdin.write_all(&bytes).is_err() {
            break;
        }
    }
    // Dropping stdin closes the pipe: the command sees end of input.
}

/// Every process whose environment carries `marker`, but this one.
fn marked_processes(marker: &str) -> Vec<rustix::process::Pid> {
    let needle = format!("{EXEC_MARKER_VAR}={marker}");
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()))
        .filter(|&pid| pid != own)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|environ| environ.split(|&byte| byte == 0).any(|entry| entry == needle.as_bytes()))
        })
        .filter_map(|pid| rustix::process::Pid::from_raw(i32::try_from(pid).ok()?))
        .collect()
}

fn signal_marked(marker: &str, signal: rustix::process::Signal) {
    for pid in marked_processes(marker) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// Stops then kills every marked process, round after round, until none is
/// left; stopping first keeps a fork bomb from outrunning the kills. Returns
/// how many were left when it gave up.
fn kill_marked(marker: &str) -> u32 {
    let mut left = 0;
    for _ in 0..KILL_ROUNDS {
        let pids = marked_processes(marker);
        if pids.is_empty() {
            return 0;
        }
        left = u32::try_from(pids.len()).unwrap_or(u32::MAX);
        for &pid in &pids {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::STOP);
        }
        for &pid in &pids {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        thread::sleep(KILL_ROUND_PAUSE);
    }
    left
}
