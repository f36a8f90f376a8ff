//! Airlock's in-container agent and the wire protocol the host speaks to it.
//!
//! The agent is the sandbox container's main process (under tini). The host
//! attaches to the container once and keeps that stream: requests go in on
//! the agent's stdin, replies come out on its stdout. Running a command then
//! costs a fork in the container instead of an engine exec (tens of
//! milliseconds each).
//!
//! The agent runs as the sandbox's user, inside the sandbox: it has exactly
//! the privileges of the code it runs, and the host treats every byte it
//! sends back as untrusted (frame sizes are capped, unknown runs ignored).

pub mod protocol;
