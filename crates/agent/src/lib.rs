//! Airlock's in-container agent and the wire protocol the host speaks to it.
//!
//! The agent is the sandbox container's main process (under tini). The host
//! attaches to the container once and keeps that stream: requests go in on
//! the agent's stdin, replies come out on its stdout. Running a command then
//! costs a fork in the container instead of an engine exec (tens of
//! milliseconds each).
//!
//! The agent runs as root inside the sandbox (nobody on the host once the
//! engine remaps uids), apart from the sandbox's user, and is not dumpable:
//! the code it runs can neither signal, trace nor read it, nor reach its
//! stdin. Each command runs under a shepherd that drops to the requested user
//! and holds the command's whole process tree (see `main.rs`). The host still
//! treats every byte the agent sends back as untrusted (frame sizes are
//! capped, unknown runs ignored).
//!
//! When the host mounts an egress directory into the container, the agent
//! also relays `127.0.0.1:3128` inside the container to the host's egress
//! proxy socket (see [`egress`]).

pub mod egress;
pub mod protocol;
