//! The egress relay: how a sandbox without a network reaches the host's
//! egress proxy.
//!
//! The host bind-mounts a directory read-only at [`EGRESS_GUEST_DIR`]; in it
//! is the proxy's Unix socket ([`EGRESS_SOCKET_FILE`]). Programs expect a
//! proxy at a TCP address (`HTTP_PROXY=http://127.0.0.1:3128`), so the agent
//! listens on the container's own loopback at [`EGRESS_PROXY_PORT`] and
//! relays each accepted connection, byte for byte, to a fresh connection to
//! that socket. A fresh one per connection: a proxy restarted on the host
//! (its socket made again) is reached by the next connection. When the
//! socket is missing or refuses, the client's connection is closed at once.
//! The relay reads nothing of what it carries: the proxy decides everything.
//!
//! One thread runs the whole relay as a `poll(2)` loop over non-blocking
//! sockets, rather than a thread or two per connection: threads count
//! against the sandbox's pids limit (256 by default) and would compete with
//! its own processes, and one loop's memory is bounded by
//! [`MAX_RELAYED_CONNECTIONS`] × 2 × [`RELAY_BUFFER_BYTES`]. The agent's
//! request loop runs on another thread and never waits on the relay.

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, poll};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SendFlags, Shutdown, SocketAddrUnix, SocketFlags, SocketType};

/// Where the host's egress directory appears in the container (read-only).
/// Equal to `airlock_core::EGRESS_GUEST_DIR` (this crate does not depend on
/// core; `crates/container`'s tests check that the two agree).
pub const EGRESS_GUEST_DIR: &str = "/run/airlock/egress";
/// The proxy's Unix socket in [`EGRESS_GUEST_DIR`] (core's `EGRESS_SOCKET_FILE`).
pub const EGRESS_SOCKET_FILE: &str = "proxy.sock";
/// The loopback port the relay listens on (core's `EGRESS_PROXY_PORT`).
pub const EGRESS_PROXY_PORT: u16 = 3128;
/// Connections relayed at once. One more is accepted and closed straight
/// away, so a client sees a refusal rather than a hang. Bounds the relay's
/// memory (two buffers each) and descriptors (two each), which come out of
/// the sandbox's own limits.
pub const MAX_RELAYED_CONNECTIONS: usize = 256;
/// Bytes buffered per direction of one relayed connection: what is read
/// from one side and not yet written to the other. With the limit above,
/// at most 16 MiB in all.
pub const RELAY_BUFFER_BYTES: usize = 32 * 1024;
/// Pause after `accept` fails for a reason that does not go away by itself
/// (no descriptors left): the listener stays readable, and without a pause
/// the loop would spin on it.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Starts the relay on its own thread when the egress directory exists;
/// `Ok(false)` when it does not (a sandbox without egress: nothing listens).
pub fn start_if_configured() -> io::Result<bool> {
    let dir = Path::new(EGRESS_GUEST_DIR);
    if !dir.is_dir() {
        return Ok(false);
    }
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, EGRESS_PROXY_PORT))?;
    let relay = Relay::new(listener, dir.join(EGRESS_SOCKET_FILE), MAX_RELAYED_CONNECTIONS)?;
    thread::Builder::new().name("egress-relay".into()).spawn(move || relay.run())?;
    Ok(true)
}

/// A relay from a TCP listener to a Unix socket path, connected anew for
/// every accepted connection.
#[derive(Debug)]
pub struct Relay {
    listener: TcpListener,
    socket: PathBuf,
    limit: usize,
}

impl Relay {
    /// A relay of what `listener` accepts to `socket`, at most `limit` at once.
    pub fn new(listener: TcpListener, socket: PathBuf, limit: usize) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self { listener, socket, limit })
    }

    /// Relays until the process ends.
    pub fn run(self) {
        let mut connections: Vec<Connection> = Vec::new();
        loop {
            let mut fds = Vec::with_capacity(1 + 2 * connections.len());
            // Which connection each descriptor after the listener's belongs to.
            let mut owners = Vec::with_capacity(2 * connections.len());
            fds.push(PollFd::new(&self.listener, PollFlags::IN));
            for (index, connection) in connections.iter().enumerate() {
                // A side that waits for nothing is left out: poll reports a
                // hang-up whatever was asked, and the loop would spin on one
                // that cannot be acted on yet (its unread bytes wait for room).
                let (client, upstream) = connection.interest();
                if !client.is_empty() {
                    fds.push(PollFd::new(&connection.client, client));
                    owners.push(index);
                }
                if !upstream.is_empty() {
                    fds.push(PollFd::new(&connection.upstream, upstream));
                    owners.push(index);
                }
            }
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(error) => {
                    // Not expected (EINVAL, ENOMEM); try again later rather than spin.
                    eprintln!("airlock-agent: egress relay: poll: {error}");
                    thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            }
            let listener_ready = !fds[0].revents().is_empty();
            let mut ready = vec![false; connections.len()];
            for (fd, &owner) in fds[1..].iter().zip(&owners) {
                if !fd.revents().is_empty()
                    && let Some(slot) = ready.get_mut(owner)
                {
                    *slot = true;
                }
            }
            drop(fds);
            let mut index = 0;
            connections.retain_mut(|connection| {
                let keep = !ready.get(index).copied().unwrap_or(false) || connection.pump();
                index += 1;
                keep
            });
            if listener_ready {
                self.accept_all(&mut connections);
            }
        }
    }

    /// Accepts every pending connection, connecting each to the socket.
    fn accept_all(&self, connections: &mut Vec<Connection>) {
        loop {
            match self.listener.accept() {
                Ok((client, _)) => {
                    if connections.len() >= self.limit {
                        // Over the limit: closed at once (dropped).
                        continue;
                    }
                    // Not connected (no socket, a proxy down): the client's
                    // connection is closed, which it sees as a refusal.
                    if let Some(mut connection) = Connection::open(client, &self.socket) {
                        // Whatever is ready already goes now.
                        if connection.pump() {
                            connections.push(connection);
                        }
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if matches!(error.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {
                }
                Err(error) => {
                    eprintln!("airlock-agent: egress relay: accept: {error}");
                    thread::sleep(ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }
}

/// Bytes on their way from one socket to the other.
struct Direction {
    buffer: Vec<u8>,
    /// What is buffered: `buffer[start..end]`.
    start: usize,
    end: usize,
    /// The source reached its end (or failed to read).
    source_done: bool,
    /// The destination was told no more is coming (`shutdown(SHUT_WR)`).
    shut: bool,
}

impl Direction {
    fn new() -> Self {
        Self { buffer: vec![0; RELAY_BUFFER_BYTES], start: 0, end: 0, source_done: false, shut: false }
    }

    fn wants_read(&self) -> bool {
        !self.source_done && self.end < self.buffer.len()
    }

    fn wants_write(&self) -> bool {
        self.start < self.end
    }

    /// Moves what it can from `from` into the buffer and from the buffer to
    /// `to`, without blocking. `Err` ends the whole connection.
    fn pump(&mut self, from: &mut impl Read, to: &impl AsFd) -> Result<(), ()> {
        loop {
            let mut progressed = false;
            if self.wants_read() {
                match from.read(&mut self.buffer[self.end..]) {
                    Ok(0) => self.source_done = true,
                    Ok(count) => {
                        self.end += count;
                        progressed = true;
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => progressed = true,
                    // A reset source: nothing more comes from it, and what
                    // went before may be incomplete; end the connection.
                    Err(_) => return Err(()),
                }
            }
            if self.wants_write() {
                // send with MSG_NOSIGNAL: a closed peer is an error here, never a SIGPIPE.
                match rustix::net::send(to, &self.buffer[self.start..self.end], SendFlags::NOSIGNAL) {
                    Ok(count) => {
                        self.start += count;
                        progressed |= count > 0;
                    }
                    Err(Errno::AGAIN) => {}
                    Err(Errno::INTR) => progressed = true,
                    Err(_) => return Err(()),
                }
                if self.start == self.end {
                    self.start = 0;
                    self.end = 0;
                } else if self.end == self.buffer.len() && self.start > 0 {
                    self.buffer.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                }
            }
            if self.source_done && !self.wants_write() && !self.shut {
                // Half-close: the other side sees the end, and may still answer.
                let _ = rustix::net::shutdown(to, Shutdown::Write);
                self.shut = true;
            }
            if !progressed {
                return Ok(());
            }
        }
    }
}

/// One relayed connection: the client inside the sandbox and the proxy's socket.
struct Connection {
    client: TcpStream,
    upstream: UnixStream,
    /// The socket's connect has not finished yet (it may, on a busy proxy).
    connecting: bool,
    to_upstream: Direction,
    to_client: Direction,
}

impl Connection {
    /// Connects to `socket` without blocking; `None` when that fails at once.
    fn open(client: TcpStream, socket: &Path) -> Option<Self> {
        client.set_nonblocking(true).ok()?;
        let address = SocketAddrUnix::new(socket).ok()?;
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )
        .ok()?;
        let connecting = match rustix::net::connect(&fd, &address) {
            Ok(()) => false,
            Err(Errno::INPROGRESS) => true,
            // No socket, nobody listening, or a full backlog (EAGAIN): refused.
            Err(_) => return None,
        };
        Some(Self {
            client,
            upstream: UnixStream::from(fd),
            connecting,
            to_upstream: Direction::new(),
            to_client: Direction::new(),
        })
    }

    /// The poll events each side waits for: (client, upstream).
    fn interest(&self) -> (PollFlags, PollFlags) {
        if self.connecting {
            return (PollFlags::empty(), PollFlags::OUT);
        }
        let mut client = PollFlags::empty();
        let mut upstream = PollFlags::empty();
        if self.to_upstream.wants_read() {
            client |= PollFlags::IN;
        }
        if self.to_upstream.wants_write() {
            upstream |= PollFlags::OUT;
        }
        if self.to_client.wants_read() {
            upstream |= PollFlags::IN;
        }
        if self.to_client.wants_write() {
            client |= PollFlags::OUT;
        }
        (client, upstream)
    }

    /// Moves bytes both ways; `false` when the connection is over.
    fn pump(&mut self) -> bool {
        if self.connecting {
            match rustix::net::sockopt::socket_error(&self.upstream) {
                Ok(Ok(())) => {
                    // Still connecting looks like success with no peer yet.
                    if self.upstream.peer_addr().is_err() {
                        return true;
                    }
                    self.connecting = false;
                }
                _ => return false,
            }
        }
        let Self { client, upstream, to_upstream, to_client, .. } = self;
        if to_upstream.pump(client, &*upstream).is_err() || to_client.pump(upstream, &*client).is_err() {
            return false;
        }
        !(to_upstream.shut && to_client.shut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    /// A fresh directory under the system's temporary one, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!("airlock-agent-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A relay on an ephemeral loopback port to `socket`; returns the port.
    fn relay(socket: PathBuf, limit: usize) -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let relay = Relay::new(listener, socket, limit).unwrap();
        thread::spawn(move || relay.run());
        port
    }

    /// An upstream that answers each connection with `prefix` and then echoes
    /// what it reads until the end, then closes.
    fn echo_upstream(listener: UnixListener, prefix: &'static [u8]) {
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                thread::spawn(move || {
                    stream.write_all(prefix).unwrap();
                    let mut buffer = [0u8; 4096];
                    loop {
                        match stream.read(&mut buffer) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if stream.write_all(&buffer[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
    }

    fn read_some(stream: &mut TcpStream, want: usize) -> Vec<u8> {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let mut buffer = [0u8; 65536];
        while got.len() < want {
            let n = stream.read(&mut buffer).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buffer[..n]);
        }
        got
    }

    #[test]
    fn bytes_go_both_ways_and_a_half_close_reaches_the_proxy() {
        let dir = TempDir::new("relay-both-ways");
        let socket = dir.0.join("proxy.sock");
        echo_upstream(UnixListener::bind(&socket).unwrap(), b"hello ");
        let port = relay(socket, 4);
        let mut client = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        // More than one buffer's worth, so the relay must wait for room.
        let payload: Vec<u8> = (0..RELAY_BUFFER_BYTES * 5).map(|i| (i % 251) as u8).collect();
        let writer = {
            let mut client = client.try_clone().unwrap();
            let payload = payload.clone();
            thread::spawn(move || {
                client.write_all(&payload).unwrap();
                client.shutdown(std::net::Shutdown::Write).unwrap();
            })
        };
        let got = read_some(&mut client, usize::MAX);
        writer.join().unwrap();
        assert_eq!(&got[..6], b"hello ");
        assert_eq!(got.len(), 6 + payload.len(), "the upstream saw the end and closed after echoing all");
        assert_eq!(&got[6..], &payload[..]);
    }

    #[test]
    fn a_missing_socket_closes_the_client_and_a_new_one_is_used_next_time() {
        let dir = TempDir::new("relay-restart");
        let socket = dir.0.join("proxy.sock");
        let port = relay(socket.clone(), 4);
        let mut refused = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        assert!(read_some(&mut refused, 1).is_empty(), "no proxy: the connection is closed");

        let first = UnixListener::bind(&socket).unwrap();
        echo_upstream(first, b"first ");
        let mut one = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        assert_eq!(read_some(&mut one, 6), b"first ");

        // The proxy restarts: its socket is made again.
        std::fs::remove_file(&socket).unwrap();
        echo_upstream(UnixListener::bind(&socket).unwrap(), b"second ");
        let mut two = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        assert_eq!(read_some(&mut two, 7), b"second ");
    }

    #[test]
    fn connections_over_the_limit_are_closed_and_the_others_go_on() {
        let dir = TempDir::new("relay-limit");
        let socket = dir.0.join("proxy.sock");
        echo_upstream(UnixListener::bind(&socket).unwrap(), b"hi");
        let port = relay(socket, 2);
        let mut held: Vec<TcpStream> = (0..2)
            .map(|_| {
                let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
                assert_eq!(read_some(&mut stream, 2), b"hi");
                stream
            })
            .collect();
        let mut over = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        assert!(read_some(&mut over, 1).is_empty(), "the third connection was relayed");
        // The held ones still work; closing one makes room.
        held[0].write_all(b"ping").unwrap();
        assert_eq!(read_some(&mut held[0], 4), b"ping");
        drop(held.remove(0));
        // The relay notices the close on its next look; give it a moment, bounded.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
            if read_some(&mut stream, 2) == b"hi" {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no room came free after a close");
            thread::sleep(Duration::from_millis(20));
        }
    }
}
