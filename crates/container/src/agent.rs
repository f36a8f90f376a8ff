//! The host's end of the in-container agent (`crates/agent`).
//!
//! Every sandbox container runs the agent as its main process, mounted
//! read-only from a host file that this module writes from the copy embedded
//! in the library. The host attaches to the container once and keeps that
//! stream as the link: a command is a `Spawn` frame in and its output and exit
//! frames back, with no engine request per command. The link survives pause;
//! a stop ends it and the next command after a start attaches again.
//!
//! Replies come from inside the sandbox and are untrusted: frames are capped,
//! a malformed one ends the link, replies for unknown runs are dropped.
//!
//! A run that started a command owns its process tree: dropping the [`Run`]
//! (its caller's future dropped, a disconnect) sends the agent a kill for the
//! whole tree at once, on a queue that goes ahead of ordinary frames.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub use airlock_agent::protocol::AGENT_GUEST_PATH;
use airlock_agent::protocol::{FrameBuffer, PROTOCOL_VERSION, Reply, Request, Spawn, decode_reply, encode_request};
use bollard::container::LogOutput;
use bollard::query_parameters::AttachContainerOptionsBuilder;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::engine::DockerEngine;
use crate::error::{Error, Result};

/// The agent binary, built static for this target by `build.rs`.
static AGENT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/airlock-agent"));
/// Replies (output chunks of up to 32 KiB) held for one run before the link
/// waits for its reader: bounds host memory per run at about 8 MiB.
const RUN_REPLY_BUFFER: usize = 256;
/// How long a new link waits for the agent's first answer.
pub const AGENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued for the agent's stdin before a sender waits: bounds host
/// memory per link (stdin chunks are at most 64 KiB) while the agent reads slowly.
const REQUEST_QUEUE: usize = 64;

/// The host file containers mount the agent from, written once per process.
/// Named by the binary's hash, so containers made by another Airlock build
/// keep theirs.
pub(crate) fn agent_host_path() -> Result<PathBuf> {
    static WRITTEN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    WRITTEN.get_or_init(write_agent_binary).clone().map_err(|reason| Error::Invalid { what: "agent binary", reason })
}

fn write_agent_binary() -> std::result::Result<PathBuf, String> {
    let hash: String = Sha256::digest(AGENT_BINARY).iter().take(8).map(|byte| format!("{byte:02x}")).collect();
    let uid = rustix::process::geteuid();
    let dir = if uid.is_root() {
        PathBuf::from("/var/lib/airlock/agent")
    } else {
        std::env::temp_dir().join(format!("airlock-agent-{}", uid.as_raw()))
    };
    let path = dir.join(format!("airlock-agent-{hash}"));
    if std::fs::read(&path).is_ok_and(|existing| existing == AGENT_BINARY) {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    // Written aside and renamed: a container starting meanwhile never sees half a binary.
    let partial = dir.join(format!(".airlock-agent-{hash}.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&partial)?;
        file.write_all(AGENT_BINARY)?;
        file.sync_all()?;
        std::fs::set_permissions(&partial, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        std::fs::rename(&partial, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        format!("writing {}: {e}", path.display())
    })?;
    Ok(path)
}

/// Whether a container's command is the agent (containers made before it
/// existed, or adopted from elsewhere, are run through engine execs).
pub(crate) fn runs_agent(cmd: &[String]) -> bool {
    cmd.first().map(String::as_str) == Some(AGENT_GUEST_PATH)
}

/// The agent links of this process, by container id (unique across engines):
/// every handle on one container shares its link, because two streams writing
/// one agent's stdin could interleave their frames. Each container has a slot
/// whose lock is held while its link is made, so two handles never attach twice.
#[derive(Debug, Default)]
pub(crate) struct AgentLinks {
    slots: Mutex<HashMap<String, LinkSlot>>,
}

pub(crate) type LinkSlot = Arc<tokio::sync::Mutex<Option<Arc<AgentLink>>>>;

impl AgentLinks {
    pub fn global() -> &'static AgentLinks {
        static LINKS: OnceLock<AgentLinks> = OnceLock::new();
        LINKS.get_or_init(AgentLinks::default)
    }

    pub fn slot(&self, container_id: &str) -> LinkSlot {
        match self.slots.lock() {
            Ok(mut slots) => slots.entry(container_id.to_string()).or_default().clone(),
            // A poisoned map still yields a working (if unshared) slot.
            Err(_) => LinkSlot::default(),
        }
    }

    /// Drops the container's link (it was removed).
    pub fn forget(&self, container_id: &str) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.remove(container_id);
        }
    }
}

impl AgentLinks {
    /// The links made so far and still open (one being made is skipped).
    fn open_links(&self) -> Vec<Arc<AgentLink>> {
        let slots: Vec<LinkSlot> = match self.slots.lock() {
            Ok(slots) => slots.values().cloned().collect(),
            Err(_) => return Vec::new(),
        };
        slots
            .iter()
            .filter_map(|slot| slot.try_lock().ok().and_then(|link| link.clone()))
            .filter(|link| link.is_open())
            .collect()
    }
}

/// Waits, up to `within`, until every agent has handled what this process
/// already sent it, the kills of dropped commands included (a `Drop` only
/// queues its kill). A process calls it before it exits, so a command it
/// abandoned is killed rather than left running to its deadline. True if all
/// answered in time.
///
/// Agents handle requests in order and kills are written before any ordinary
/// frame, so an agent's answer to a ping sent now means its kills are done.
pub async fn settle_agent_links(within: Duration) -> bool {
    let links = AgentLinks::global().open_links();
    let pings = links.into_iter().map(|link| async move {
        let mut run = link.open_run();
        if run.send(&Request::Ping).await.is_err() {
            return;
        }
        while let Some(reply) = run.recv().await {
            if matches!(reply, Reply::Pong { .. }) {
                return;
            }
        }
    });
    tokio::time::timeout(within, futures_util::future::join_all(pings)).await.is_ok()
}

/// Where a link's run ids start: at random. Every process that attaches to a
/// container (each CLI command, a server, a test) shares the agent's one
/// stdin, and the agent keys commands by run id alone; numbering each link
/// from 1 made a new process's kernel take the id of a kernel an earlier
/// process left running, and the agent replaced it (closing the old one's
/// stdin, which then exited and its end reached the new process). The agent
/// also refuses an id in use, so a collision is an error, never a takeover.
fn first_run_id() -> u32 {
    (uuid::Uuid::new_v4().as_u128() as u32).max(1)
}

/// One attached stream to a container's agent, shared by every command.
pub(crate) struct AgentLink {
    /// Ordinary frames, written in order by the writer task.
    requests: mpsc::Sender<Vec<u8>>,
    /// Kills of dropped runs: never waits (a `Drop` cannot), written before
    /// any queued ordinary frame. One per dropped run, so bounded by the runs.
    kills: mpsc::UnboundedSender<Vec<u8>>,
    runs: Arc<Mutex<HashMap<u32, mpsc::Sender<Reply>>>>,
    next_run: AtomicU32,
    closed: watch::Receiver<bool>,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLink").field("closed", &*self.closed.borrow()).finish_non_exhaustive()
    }
}

impl Drop for AgentLink {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// The replies of one command, and its place on the link. While its command
/// runs, the run owns the command's process tree: dropping it kills the tree.
pub(crate) struct Run {
    pub id: u32,
    replies: mpsc::Receiver<Reply>,
    link: Arc<AgentLink>,
    /// A command was spawned and has not been seen to end.
    owns_tree: bool,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run").field("id", &self.id).field("owns_tree", &self.owns_tree).finish_non_exhaustive()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(mut runs) = self.link.runs.lock() {
            runs.remove(&self.id);
        }
        if self.owns_tree {
            // Dropped while its command runs: the whole tree goes. The agent's
            // answer comes to a run no longer listened to, and is dropped.
            let _ = self.link.kills.send(encode_request(self.id, &Request::KillTree { target: self.id }));
        }
    }
}

impl Run {
    pub async fn send(&self, request: &Request) -> Result<()> {
        self.link.send_to(self.id, request).await
    }

    /// Starts a command on this run; from now until its exit is seen, the run owns its tree.
    pub async fn spawn(&mut self, spawn: Spawn) -> Result<()> {
        self.owns_tree = true;
        self.send(&Request::Spawn(spawn)).await
    }

    /// The next reply; `None` once the link has ended.
    pub async fn recv(&mut self) -> Option<Reply> {
        let reply = self.replies.recv().await;
        match &reply {
            Some(Reply::Exited { .. } | Reply::SpawnFailed { .. }) | None => self.owns_tree = false,
            Some(_) => {}
        }
        reply
    }

    /// Kills the command's whole tree (the answer comes back on this run).
    pub async fn kill_tree(&self) -> Result<()> {
        self.send(&Request::KillTree { target: self.id }).await
    }
}

impl AgentLink {
    /// Attaches to the container's agent and waits for its first answer.
    pub async fn connect(engine: &DockerEngine, container_id: &str) -> Result<Arc<Self>> {
        let options = AttachContainerOptionsBuilder::new().stream(true).stdin(true).stdout(true).stderr(true).build();
        let attached =
            engine.docker().attach_container(container_id, Some(options)).await.map_err(|source| match source {
                bollard::errors::Error::DockerResponseServerError { status_code: 409, .. } => {
                    Error::NotRunning(container_id.to_string())
                }
                source => Error::Docker { operation: "attach to the agent", source },
            })?;
        let runs: Arc<Mutex<HashMap<u32, mpsc::Sender<Reply>>>> = Arc::default();
        let (closed_tx, closed) = watch::channel(false);
        let reader = tokio::spawn(read_replies(attached.output, runs.clone(), closed_tx, container_id.to_string()));
        let (requests, queued) = mpsc::channel(REQUEST_QUEUE);
        let (kills, queued_kills) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_requests(attached.input, queued, queued_kills));
        let link =
            Arc::new(Self { requests, kills, runs, next_run: AtomicU32::new(first_run_id()), closed, reader, writer });
        let mut handshake = link.open_run();
        handshake.send(&Request::Ping).await?;
        match tokio::time::timeout(AGENT_HANDSHAKE_TIMEOUT, handshake.recv()).await {
            Ok(Some(Reply::Pong { version: PROTOCOL_VERSION })) => Ok(link),
            Ok(Some(Reply::Pong { version })) => Err(Error::Agent(format!(
                "the agent in {container_id} speaks protocol {version}, not {PROTOCOL_VERSION} (a container of another Airlock build: recreate it)"
            ))),
            Ok(_) => Err(Error::Agent(format!(
                "the agent in {container_id} did not answer (it may have exited, or be of another Airlock build: recreate the container)"
            ))),
            Err(_) => Err(Error::Agent(format!(
                "the agent in {container_id} did not answer within {}s",
                AGENT_HANDSHAKE_TIMEOUT.as_secs()
            ))),
        }
    }

    pub fn is_open(&self) -> bool {
        !*self.closed.borrow()
    }

    /// Resolves once the link has ended (the container stopped or died).
    pub async fn wait_closed(&self) {
        let mut closed = self.closed.clone();
        let _ = closed.wait_for(|closed| *closed).await;
    }

    /// A new run: replies for it arrive on its receiver until it is dropped
    /// or the link ends.
    pub fn open_run(self: &Arc<Self>) -> Run {
        let mut id = self.next_run.fetch_add(1, Ordering::Relaxed);
        if id == 0 {
            id = self.next_run.fetch_add(1, Ordering::Relaxed);
        }
        let (sender, replies) = mpsc::channel(RUN_REPLY_BUFFER);
        if let Ok(mut runs) = self.runs.lock() {
            // A closed link drops the sender here, so the run sees its end at once.
            if self.is_open() {
                runs.insert(id, sender);
            }
        }
        Run { id, replies, link: self.clone(), owns_tree: false }
    }

    /// Sends `request` on behalf of run `run` (for tasks that outlive the borrow of a [`Run`]).
    pub async fn send_to(&self, run: u32, request: &Request) -> Result<()> {
        self.requests
            .send(encode_request(run, request))
            .await
            .map_err(|_| Error::Agent("the link to the agent has ended".into()))
    }

    /// Sends a `Signal` or `KillTree` request on a run of its own and waits
    /// for the answer: how many processes were left (for a kill).
    pub async fn signal_tree(self: &Arc<Self>, request: Request, timeout: Duration) -> Result<u32> {
        let mut run = self.open_run();
        run.send(&request).await?;
        match tokio::time::timeout(timeout, run.recv()).await {
            Ok(Some(Reply::Signalled { remaining })) => Ok(remaining),
            Ok(_) => Err(Error::Agent("the agent did not answer the signal (the sandbox stopped?)".into())),
            Err(_) => Err(Error::Agent(format!("no answer to the signal within {}s", timeout.as_secs()))),
        }
    }
}

/// Writes queued frames to the agent's stdin, whole and one at a time, kills first.
async fn write_requests(
    mut input: Pin<Box<dyn AsyncWrite + Send>>,
    mut requests: mpsc::Receiver<Vec<u8>>,
    mut kills: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    loop {
        let frame = tokio::select! {
            biased;
            Some(frame) = kills.recv() => frame,
            Some(frame) = requests.recv() => frame,
            else => return,
        };
        if input.write_all(&frame).await.is_err() || input.flush().await.is_err() {
            return;
        }
    }
}

async fn read_replies(
    mut output: Pin<
        Box<dyn futures_util::Stream<Item = std::result::Result<LogOutput, bollard::errors::Error>> + Send>,
    >,
    runs: Arc<Mutex<HashMap<u32, mpsc::Sender<Reply>>>>,
    closed: watch::Sender<bool>,
    container_id: String,
) {
    let mut frames = FrameBuffer::default();
    'stream: while let Some(item) = output.next().await {
        match item {
            Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                frames.push(&message);
                loop {
                    let decoded = match frames.next_frame() {
                        Ok(Some(body)) => decode_reply(&body),
                        Ok(None) => break,
                        Err(error) => Err(error),
                    };
                    match decoded {
                        Ok((run, reply)) => {
                            let sender = runs.lock().ok().and_then(|runs| runs.get(&run).cloned());
                            if let Some(sender) = sender {
                                // Waits while the run's reader is behind: the stream, and
                                // so the agent's output pipes, back up instead of host memory.
                                let _ = sender.send(reply).await;
                            }
                        }
                        Err(error) => {
                            tracing::warn!(%error, container = %container_id, "ending the agent link");
                            break 'stream;
                        }
                    }
                }
            }
            Ok(LogOutput::StdErr { message }) => {
                tracing::debug!(container = %container_id, "agent: {}", String::from_utf8_lossy(&message).trim_end());
            }
            Ok(LogOutput::StdIn { .. }) => {}
            Err(error) => {
                tracing::debug!(%error, container = %container_id, "the agent link ended");
                break;
            }
        }
    }
    // Under the runs lock, so that no run opens on a link that just ended.
    if let Ok(mut runs) = runs.lock() {
        closed.send_replace(true);
        runs.clear();
    }
}
