//! Frames between the host and the agent.
//!
//! Every frame is `u32 length | u8 kind | u32 run | payload`, little-endian,
//! where `length` counts the bytes after itself. `run` names the command a
//! frame belongs to; the host picks it. Strings are `u32 length | UTF-8`.

use std::io::{self, Read};

/// Largest frame either side accepts; larger is a protocol error.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
/// Output is sent in chunks of at most this many bytes.
pub const OUTPUT_CHUNK_BYTES: usize = 32 * 1024;
/// Where the agent binary is mounted in every sandbox container.
pub const AGENT_GUEST_PATH: &str = "/.airlock/agent";
/// The protocol's version, sent in every `Pong`: a host refuses an agent that
/// speaks another (a container made by another Airlock build).
pub const PROTOCOL_VERSION: u32 = 2;

/// What the host asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Start a command. Replies: `Started` or `SpawnFailed`, then output, then `Exited`.
    Spawn(Spawn),
    /// Bytes for the command's stdin (only when spawned with `stdin` or a terminal).
    Stdin(Vec<u8>),
    /// Close the command's stdin.
    StdinEnd,
    /// Change the size of the command's terminal (only when spawned with one).
    Resize(TtySize),
    /// Send `signal` once to every process of run `target`'s tree. Reply: `Signalled`.
    Signal { target: u32, signal: i32 },
    /// Stop and kill every process of run `target`'s tree, round after round,
    /// until none is left. Reply: `Signalled`.
    KillTree { target: u32 },
    /// Reply: `Pong`. Shows the agent is there and answering.
    Ping,
}

/// One command to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawn {
    pub argv: Vec<String>,
    /// Added to the container's environment.
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// Who it runs as: `uid[:gid]`, or a user (and group) name of the image.
    pub user: String,
    /// Whether stdin is a pipe fed by `Stdin` frames (else `/dev/null`).
    pub stdin: bool,
    /// On a new terminal of this size instead of pipes (its output comes as `Stdout`).
    pub tty: Option<TtySize>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtySize {
    pub cols: u16,
    pub rows: u16,
}

/// What the agent tells the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Started {
        pid: u32,
    },
    /// The command could not start: `code` is 127 when the program was not
    /// found and 126 otherwise, as a shell would say.
    SpawnFailed {
        code: i32,
        message: String,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command ended: its code, or 128 + the signal that ended it.
    Exited {
        code: i32,
    },
    /// How many processes of the tree were left when the agent gave up (0: all gone).
    Signalled {
        remaining: u32,
    },
    /// The agent's [`PROTOCOL_VERSION`].
    Pong {
        version: u32,
    },
}

mod kind {
    pub const SPAWN: u8 = 1;
    pub const STDIN: u8 = 2;
    pub const STDIN_END: u8 = 3;
    pub const SIGNAL: u8 = 4;
    pub const KILL_TREE: u8 = 5;
    pub const PING: u8 = 6;
    pub const RESIZE: u8 = 7;
    pub const STARTED: u8 = 101;
    pub const SPAWN_FAILED: u8 = 102;
    pub const STDOUT: u8 = 103;
    pub const STDERR: u8 = 104;
    pub const EXITED: u8 = 105;
    pub const SIGNALLED: u8 = 106;
    pub const PONG: u8 = 107;
}

/// A malformed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "agent protocol: {}", self.0)
    }
}

impl std::error::Error for ProtocolError {}

fn bad(reason: impl Into<String>) -> ProtocolError {
    ProtocolError(reason.into())
}

struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    fn new(kind: u8, run: u32) -> Self {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.push(kind);
        bytes.extend_from_slice(&run.to_le_bytes());
        Self { bytes }
    }

    fn u8(&mut self, value: u8) -> &mut Self {
        self.bytes.push(value);
        self
    }

    fn u16(&mut self, value: u16) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    fn u32(&mut self, value: u32) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    fn tty(&mut self, size: TtySize) -> &mut Self {
        self.u16(size.cols).u16(size.rows)
    }

    fn i32(&mut self, value: i32) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    fn bytes(&mut self, value: &[u8]) -> &mut Self {
        self.u32(u32::try_from(value.len()).unwrap_or(u32::MAX));
        self.bytes.extend_from_slice(value);
        self
    }

    fn str(&mut self, value: &str) -> &mut Self {
        self.bytes(value.as_bytes())
    }

    fn finish(&mut self) -> Vec<u8> {
        let length = u32::try_from(self.bytes.len() - 4).unwrap_or(u32::MAX);
        self.bytes[..4].copy_from_slice(&length.to_le_bytes());
        std::mem::take(&mut self.bytes)
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], ProtocolError> {
        if self.rest.len() < count {
            return Err(bad("frame ends early"));
        }
        let (taken, rest) = self.rest.split_at(count);
        self.rest = rest;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        let bytes = self.take(2)?;
        Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
    }

    fn tty(&mut self) -> Result<TtySize, ProtocolError> {
        Ok(TtySize { cols: self.u16()?, rows: self.u16()? })
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn i32(&mut self) -> Result<i32, ProtocolError> {
        let bytes = self.take(4)?;
        Ok(i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let length = self.u32()? as usize;
        self.take(length)
    }

    fn string(&mut self) -> Result<String, ProtocolError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| bad("a string is not UTF-8"))
    }

    fn strings(&mut self) -> Result<Vec<String>, ProtocolError> {
        let count = self.u32()? as usize;
        // Each string takes at least its 4-byte length: a count past that is a lie.
        if count > self.rest.len() / 4 {
            return Err(bad("a list is longer than its frame"));
        }
        (0..count).map(|_| self.string()).collect()
    }

    fn end(&self) -> Result<(), ProtocolError> {
        if self.rest.is_empty() { Ok(()) } else { Err(bad("trailing bytes in a frame")) }
    }
}

/// Encodes one request for `run`.
pub fn encode_request(run: u32, request: &Request) -> Vec<u8> {
    match request {
        Request::Spawn(spawn) => {
            let mut writer = Writer::new(kind::SPAWN, run);
            writer.u32(u32::try_from(spawn.argv.len()).unwrap_or(u32::MAX));
            for arg in &spawn.argv {
                writer.str(arg);
            }
            writer.u32(u32::try_from(spawn.env.len()).unwrap_or(u32::MAX));
            for (key, value) in &spawn.env {
                writer.str(&format!("{key}={value}"));
            }
            writer.str(&spawn.cwd).str(&spawn.user).u8(u8::from(spawn.stdin));
            match spawn.tty {
                Some(size) => writer.u8(1).tty(size),
                None => writer.u8(0),
            };
            writer.finish()
        }
        Request::Stdin(bytes) => Writer::new(kind::STDIN, run).bytes(bytes).finish(),
        Request::StdinEnd => Writer::new(kind::STDIN_END, run).finish(),
        Request::Resize(size) => Writer::new(kind::RESIZE, run).tty(*size).finish(),
        Request::Signal { target, signal } => Writer::new(kind::SIGNAL, run).u32(*target).i32(*signal).finish(),
        Request::KillTree { target } => Writer::new(kind::KILL_TREE, run).u32(*target).finish(),
        Request::Ping => Writer::new(kind::PING, run).finish(),
    }
}

/// Encodes one reply for `run`.
pub fn encode_reply(run: u32, reply: &Reply) -> Vec<u8> {
    match reply {
        Reply::Started { pid } => Writer::new(kind::STARTED, run).u32(*pid).finish(),
        Reply::SpawnFailed { code, message } => Writer::new(kind::SPAWN_FAILED, run).i32(*code).str(message).finish(),
        Reply::Stdout(bytes) => Writer::new(kind::STDOUT, run).bytes(bytes).finish(),
        Reply::Stderr(bytes) => Writer::new(kind::STDERR, run).bytes(bytes).finish(),
        Reply::Exited { code } => Writer::new(kind::EXITED, run).i32(*code).finish(),
        Reply::Signalled { remaining } => Writer::new(kind::SIGNALLED, run).u32(*remaining).finish(),
        Reply::Pong { version } => Writer::new(kind::PONG, run).u32(*version).finish(),
    }
}

/// Decodes a request from a frame body (the bytes after the length).
pub fn decode_request(body: &[u8]) -> Result<(u32, Request), ProtocolError> {
    let mut reader = Reader { rest: body };
    let frame_kind = reader.u8()?;
    let run = reader.u32()?;
    let request = match frame_kind {
        kind::SPAWN => {
            let argv = reader.strings()?;
            if argv.is_empty() {
                return Err(bad("a spawn without a program"));
            }
            let env = reader
                .strings()?
                .into_iter()
                .map(|entry| match entry.split_once('=') {
                    Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
                    _ => Err(bad("an environment entry without a name")),
                })
                .collect::<Result<_, _>>()?;
            let cwd = reader.string()?;
            let user = reader.string()?;
            let stdin = reader.u8()? != 0;
            let tty = if reader.u8()? != 0 { Some(reader.tty()?) } else { None };
            Request::Spawn(Spawn { argv, env, cwd, user, stdin, tty })
        }
        kind::STDIN => Request::Stdin(reader.bytes()?.to_vec()),
        kind::STDIN_END => Request::StdinEnd,
        kind::RESIZE => Request::Resize(reader.tty()?),
        kind::SIGNAL => Request::Signal { target: reader.u32()?, signal: reader.i32()? },
        kind::KILL_TREE => Request::KillTree { target: reader.u32()? },
        kind::PING => Request::Ping,
        other => return Err(bad(format!("unknown request kind {other}"))),
    };
    reader.end()?;
    Ok((run, request))
}

/// Decodes a reply from a frame body (the bytes after the length).
pub fn decode_reply(body: &[u8]) -> Result<(u32, Reply), ProtocolError> {
    let mut reader = Reader { rest: body };
    let frame_kind = reader.u8()?;
    let run = reader.u32()?;
    let reply = match frame_kind {
        kind::STARTED => Reply::Started { pid: reader.u32()? },
        kind::SPAWN_FAILED => Reply::SpawnFailed { code: reader.i32()?, message: reader.string()? },
        kind::STDOUT => Reply::Stdout(reader.bytes()?.to_vec()),
        kind::STDERR => Reply::Stderr(reader.bytes()?.to_vec()),
        kind::EXITED => Reply::Exited { code: reader.i32()? },
        kind::SIGNALLED => Reply::Signalled { remaining: reader.u32()? },
        kind::PONG => Reply::Pong { version: reader.u32()? },
        other => return Err(bad(format!("unknown reply kind {other}"))),
    };
    reader.end()?;
    Ok((run, reply))
}

/// Reads one frame body from a blocking reader; `None` at a clean end of input.
pub fn read_frame(input: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut length = [0u8; 4];
    match input.read_exact(&mut length) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let length = u32::from_le_bytes(length) as usize;
    if length > MAX_FRAME_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {length} bytes is over the cap")));
    }
    let mut body = vec![0u8; length];
    input.read_exact(&mut body)?;
    Ok(Some(body))
}

/// Splits a byte stream that arrives in arbitrary pieces into frame bodies.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    pending: Vec<u8>,
}

impl FrameBuffer {
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// The next whole frame body, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        if self.pending.len() < 4 {
            return Ok(None);
        }
        let length = u32::from_le_bytes([self.pending[0], self.pending[1], self.pending[2], self.pending[3]]) as usize;
        if length > MAX_FRAME_BYTES {
            return Err(bad(format!("a frame of {length} bytes is over the cap")));
        }
        if self.pending.len() < 4 + length {
            return Ok(None);
        }
        let body = self.pending[4..4 + length].to_vec();
        self.pending.drain(..4 + length);
        Ok(Some(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(frame: &[u8]) -> &[u8] {
        &frame[4..]
    }

    #[test]
    fn requests_survive_the_wire() {
        let requests = [
            Request::Spawn(Spawn {
                argv: vec!["bash".into(), "-c".into(), "echo hé".into()],
                env: vec![("A".into(), "b=c".into())],
                cwd: "/workspace".into(),
                user: "1000:1000".into(),
                stdin: true,
                tty: None,
            }),
            Request::Spawn(Spawn {
                argv: vec!["bash".into()],
                env: vec![],
                cwd: "/".into(),
                user: "root".into(),
                stdin: false,
                tty: Some(TtySize { cols: 132, rows: 40 }),
            }),
            Request::Stdin(vec![0, 1, 2, 255]),
            Request::StdinEnd,
            Request::Resize(TtySize { cols: 80, rows: 24 }),
            Request::Signal { target: 3, signal: 15 },
            Request::KillTree { target: 3 },
            Request::Ping,
        ];
        for request in requests {
            let frame = encode_request(7, &request);
            assert_eq!(decode_request(body(&frame)).unwrap(), (7, request));
        }
    }

    #[test]
    fn replies_survive_the_wire() {
        let replies = [
            Reply::Started { pid: 42 },
            Reply::SpawnFailed { code: 127, message: "no such file".into() },
            Reply::Stdout(b"out".to_vec()),
            Reply::Stderr(vec![]),
            Reply::Exited { code: -1 },
            Reply::Signalled { remaining: 3 },
            Reply::Pong { version: PROTOCOL_VERSION },
        ];
        for reply in replies {
            let frame = encode_reply(u32::MAX, &reply);
            assert_eq!(decode_reply(body(&frame)).unwrap(), (u32::MAX, reply));
        }
    }

    #[test]
    fn frames_split_anywhere_are_put_back_together() {
        let mut stream = encode_reply(1, &Reply::Stdout(b"hello".to_vec()));
        stream.extend(encode_reply(1, &Reply::Exited { code: 0 }));
        let mut buffer = FrameBuffer::default();
        let mut replies = Vec::new();
        for byte in stream {
            buffer.push(&[byte]);
            while let Some(frame) = buffer.next_frame().unwrap() {
                replies.push(decode_reply(&frame).unwrap().1);
            }
        }
        assert_eq!(replies, vec![Reply::Stdout(b"hello".to_vec()), Reply::Exited { code: 0 }]);
    }

    #[test]
    fn malformed_frames_are_refused() {
        assert!(decode_reply(&[99, 0, 0, 0, 0]).is_err(), "unknown kind");
        assert!(decode_reply(&[kind::PONG, 0, 0, 0, 0]).is_err(), "a pong without a version (an older agent)");
        assert!(decode_reply(&[kind::STARTED, 0, 0, 0, 0, 1]).is_err(), "short");
        let mut trailing = encode_reply(1, &Reply::Pong { version: PROTOCOL_VERSION });
        trailing.push(0);
        assert!(decode_reply(body(&trailing)).is_err(), "trailing bytes");
        let mut lying = Writer::new(kind::SPAWN, 1);
        lying.u32(1_000_000);
        assert!(decode_request(body(&lying.finish())).is_err(), "a count longer than the frame");
        let mut empty = Writer::new(kind::SPAWN, 1);
        empty.u32(0).u32(0).str("/").str("u").u8(0).u8(0);
        assert!(decode_request(body(&empty.finish())).is_err(), "no program");
        let mut huge = FrameBuffer::default();
        huge.push(&u32::MAX.to_le_bytes());
        assert!(huge.next_frame().is_err(), "over the frame cap");
    }
}
