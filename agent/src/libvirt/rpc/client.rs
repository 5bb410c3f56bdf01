//! One connection to the libvirt daemon over its unix socket, carrying calls of libvirt's RPC
//! program. Callers are blocking threads, several at once: each call gets a serial, writes its
//! packet and waits; one reader thread hands every reply to the call with its serial. When the
//! socket dies (or the daemon breaks the protocol) every waiting call, and every later one,
//! fails with [`RpcError::Lost`], after which the owner opens a new connection.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use super::xdr::{Decoder, Encoder, XdrError};

/// libvirt's main RPC program (`REMOTE_PROGRAM`) and its version.
pub const REMOTE_PROGRAM: u32 = 0x2000_8086;
pub const REMOTE_VERSION: u32 = 1;
/// Largest packet after the length word (`VIR_NET_MESSAGE_MAX`).
const MESSAGE_MAX: u32 = 16 * 1024 * 1024;
const HEADER_LEN: u32 = 24;

const TYPE_CALL: i32 = 0;
const TYPE_REPLY: i32 = 1;
/// Events and keepalives the daemon may send unasked; the agent asks for none and skips them.
const TYPE_MESSAGE: i32 = 2;
const STATUS_OK: i32 = 0;
const STATUS_ERROR: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The connection is gone (closed, reset, or dropped for breaking the protocol).
    #[error("connection to the libvirt daemon lost: {0}")]
    Lost(String),
    /// The daemon carried out the call and answered with this error.
    #[error("{message}")]
    Remote { code: i32, message: String },
    /// The reply to this call cannot be decoded.
    #[error("unreadable reply: {0}")]
    Reply(#[from] XdrError),
}

/// The fixed header of every packet (`virNetMessageHeader`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub program: u32,
    pub version: u32,
    pub procedure: i32,
    pub kind: i32,
    pub serial: u32,
    pub status: i32,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Packet {
    pub header: Header,
    pub payload: Vec<u8>,
}

/// A call packet: length word, header, arguments.
pub fn call_packet(procedure: i32, serial: u32, args: &[u8]) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u32(4 + HEADER_LEN + args.len() as u32)
        .u32(REMOTE_PROGRAM)
        .u32(REMOTE_VERSION)
        .i32(procedure)
        .i32(TYPE_CALL)
        .u32(serial)
        .i32(STATUS_OK);
    let mut bytes = e.into_bytes();
    bytes.extend_from_slice(args);
    bytes
}

/// Reads one packet; a length outside what libvirt may send is an error before any of the
/// body is read (or allocated).
pub fn read_packet(r: &mut impl Read) -> Result<Packet, String> {
    let mut len = [0; 4];
    r.read_exact(&mut len).map_err(|e| format!("reading a packet length: {e}"))?;
    let len = u32::from_be_bytes(len);
    if !(4 + HEADER_LEN..=4 + MESSAGE_MAX).contains(&len) {
        return Err(format!("the daemon sent a packet length of {len} bytes"));
    }
    let mut body = vec![0; len as usize - 4];
    r.read_exact(&mut body).map_err(|e| format!("reading a packet of {len} bytes: {e}"))?;
    let mut d = Decoder::new(&body);
    let header = (|| {
        Ok::<_, XdrError>(Header {
            program: d.u32("program")?,
            version: d.u32("version")?,
            procedure: d.i32("procedure")?,
            kind: d.i32("type")?,
            serial: d.u32("serial")?,
            status: d.i32("status")?,
        })
    })()
    .map_err(|e| e.to_string())?;
    body.drain(..HEADER_LEN as usize);
    Ok(Packet { header, payload: body })
}

/// libvirt's `remote_error`: its code and message matter; the rest is read to be checked.
pub fn decode_error(payload: &[u8]) -> Result<RpcError, XdrError> {
    let mut d = Decoder::new(payload);
    let code = d.i32("error code")?;
    d.i32("error domain")?;
    let message = d.optional("error message", |d| d.string("error message"))?;
    d.i32("error level")?;
    d.optional("error domain object", |d| {
        d.string("domain name")?;
        d.fixed::<16>("domain uuid")?;
        d.i32("domain id")
    })?;
    for _ in 0..3 {
        d.optional("error detail", |d| d.string("error detail"))?;
    }
    d.i32("error int1")?;
    d.i32("error int2")?;
    d.optional("error network", |d| {
        d.string("network name")?;
        d.fixed::<16>("network uuid")
    })?;
    Ok(RpcError::Remote { code, message: message.unwrap_or_else(|| format!("libvirt error {code}")) })
}

type Waiter = mpsc::SyncSender<Result<Vec<u8>, RpcError>>;

#[derive(Default)]
struct Calls {
    next_serial: u32,
    /// Per serial: the procedure called and where its reply goes.
    waiting: HashMap<u32, (i32, Waiter)>,
    /// Why the connection is gone, once it is.
    lost: Option<String>,
}

#[derive(Default)]
struct Shared {
    calls: Mutex<Calls>,
}

impl Shared {
    fn calls(&self) -> MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection lost and fails every waiting call.
    fn lose(&self, why: String) {
        let mut calls = self.calls();
        for (_, (_, waiter)) in calls.waiting.drain() {
            let _ = waiter.send(Err(RpcError::Lost(why.clone())));
        }
        calls.lost.get_or_insert(why);
    }
}

pub struct Connection {
    writer: Mutex<UnixStream>,
    shared: Arc<Shared>,
}

impl Connection {
    pub fn connect(socket: &Path) -> std::io::Result<Connection> {
        Connection::over(UnixStream::connect(socket)?)
    }

    /// A connection over `stream` (the daemon's socket; in tests, one end of a pair).
    pub fn over(stream: UnixStream) -> std::io::Result<Connection> {
        let shared = Arc::new(Shared::default());
        let (reader, reader_shared) = (stream.try_clone()?, shared.clone());
        std::thread::Builder::new()
            .name("libvirt-rpc".into())
            .stack_size(128 * 1024)
            .spawn(move || dispatch_replies(reader, &reader_shared))?;
        Ok(Connection { writer: Mutex::new(stream), shared })
    }

    pub fn is_alive(&self) -> bool {
        self.shared.calls().lost.is_none()
    }

    /// Calls `procedure` with the encoded `args` and waits for its reply's payload.
    pub fn call(&self, procedure: i32, args: &[u8]) -> Result<Vec<u8>, RpcError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let serial = {
            let mut calls = self.shared.calls();
            if let Some(why) = &calls.lost {
                return Err(RpcError::Lost(why.clone()));
            }
            let serial = calls.next_serial;
            calls.next_serial = serial.wrapping_add(1);
            calls.waiting.insert(serial, (procedure, tx));
            serial
        };
        let packet = call_packet(procedure, serial, args);
        let written = self.writer.lock().unwrap_or_else(|p| p.into_inner()).write_all(&packet);
        if let Err(e) = written {
            self.shared.lose(format!("sending a call: {e}"));
        }
        rx.recv().unwrap_or_else(|_| Err(RpcError::Lost("the reply reader stopped".into())))
    }
}

impl Drop for Connection {
    /// Ends the reader thread (it sees the socket shut) and with it the connection.
    fn drop(&mut self) {
        let _ = self.writer.lock().unwrap_or_else(|p| p.into_inner()).shutdown(Shutdown::Both);
    }
}

/// The reader thread: hands each reply to its caller until the socket ends or the daemon
/// sends what no call can be waiting for.
fn dispatch_replies(mut stream: UnixStream, shared: &Shared) {
    let why = loop {
        let packet = match read_packet(&mut stream) {
            Ok(p) => p,
            Err(e) => break e,
        };
        let h = packet.header;
        if h.kind == TYPE_MESSAGE {
            continue;
        }
        if h.program != REMOTE_PROGRAM || h.version != REMOTE_VERSION || h.kind != TYPE_REPLY {
            break format!("unexpected packet: program {:#x} version {} type {}", h.program, h.version, h.kind);
        }
        let Some((procedure, waiter)) = shared.calls().waiting.remove(&h.serial) else {
            break format!("a reply with serial {} no call is waiting for", h.serial);
        };
        let reply = match h.status {
            _ if h.procedure != procedure => {
                Err(RpcError::Lost(format!("the reply to procedure {procedure} names procedure {}", h.procedure)))
            }
            STATUS_OK => Ok(packet.payload),
            STATUS_ERROR => Err(decode_error(&packet.payload).unwrap_or_else(RpcError::Reply)),
            s => Err(RpcError::Lost(format!("a reply with status {s}"))),
        };
        let broken = match &reply {
            Err(RpcError::Lost(why)) => Some(why.clone()),
            _ => None,
        };
        let _ = waiter.send(reply);
        if let Some(why) = broken {
            break why;
        }
    };
    let _ = stream.shutdown(Shutdown::Both);
    shared.lose(why);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(procedure: i32, serial: u32, status: i32, payload: &[u8]) -> Vec<u8> {
        let mut p = call_packet(procedure, serial, payload);
        p[16..20].copy_from_slice(&TYPE_REPLY.to_be_bytes());
        p[24..28].copy_from_slice(&status.to_be_bytes());
        p
    }

    fn remote_error(code: i32, message: &str) -> Vec<u8> {
        let mut e = Encoder::new();
        e.i32(code).i32(10).opt_str(Some(message)).i32(2).u32(0).opt_str(None).opt_str(None).opt_str(None);
        e.i32(0).i32(0).u32(0);
        e.into_bytes()
    }

    #[test]
    fn a_call_packet_has_libvirts_header() {
        let p = call_packet(23, 5, &[0, 0, 0, 1]);
        assert_eq!(p.len(), 32);
        let packet = read_packet(&mut &p[..]).unwrap();
        assert_eq!(
            packet.header,
            Header { program: REMOTE_PROGRAM, version: 1, procedure: 23, kind: TYPE_CALL, serial: 5, status: 0 }
        );
        assert_eq!(packet.payload, [0, 0, 0, 1]);
    }

    #[test]
    fn hostile_packets_are_errors() {
        for len in [0u32, 27, 4 + MESSAGE_MAX + 1, u32::MAX] {
            let err = read_packet(&mut &len.to_be_bytes()[..]).unwrap_err();
            assert!(err.contains(&len.to_string()), "{err}");
        }
        let p = call_packet(1, 1, &[1, 2, 3, 4]);
        for cut in 0..p.len() {
            assert!(read_packet(&mut &p[..cut]).is_err(), "a packet cut at {cut} is an error");
        }
    }

    #[test]
    fn a_remote_error_keeps_code_and_message() {
        let e = decode_error(&remote_error(42, "Domain not found")).unwrap();
        assert!(matches!(e, RpcError::Remote { code: 42, ref message } if message == "Domain not found"), "{e:?}");
        assert!(decode_error(&remote_error(42, "x")[..20]).is_err());
    }

    /// A fake daemon on the other end of a socket pair: it reads `calls` calls and answers
    /// with what `answer` makes of each (call header, arguments); its thread returns its end.
    fn daemon(
        calls: usize,
        answer: impl Fn(Header, Vec<u8>) -> Vec<u8> + Send + 'static,
    ) -> (Connection, std::thread::JoinHandle<UnixStream>) {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut answers = Vec::new();
            for _ in 0..calls {
                let p = read_packet(&mut theirs).unwrap();
                answers.push(answer(p.header, p.payload));
            }
            // Answered in reverse order: replies find their calls by serial.
            for a in answers.into_iter().rev() {
                theirs.write_all(&a).unwrap();
            }
            theirs
        });
        (Connection::over(ours).unwrap(), t)
    }

    #[test]
    fn concurrent_calls_get_their_own_replies() {
        let (conn, t) = daemon(4, |h, args| reply(h.procedure, h.serial, STATUS_OK, &args));
        let conn = Arc::new(conn);
        let callers: Vec<_> = (0..4)
            .map(|i| {
                let conn = conn.clone();
                std::thread::spawn(move || conn.call(100 + i, &(i as u32).to_be_bytes()).unwrap())
            })
            .collect();
        for (i, c) in callers.into_iter().enumerate() {
            assert_eq!(c.join().unwrap(), (i as u32).to_be_bytes());
        }
        let _open = t.join().unwrap();
        assert!(conn.is_alive());
    }

    #[test]
    fn an_error_reply_is_the_daemons_error() {
        let (conn, t) = daemon(1, |h, _| reply(h.procedure, h.serial, STATUS_ERROR, &remote_error(55, "not running")));
        let e = conn.call(7, &[]).unwrap_err();
        assert!(matches!(e, RpcError::Remote { code: 55, .. }), "{e:?}");
        let _open = t.join().unwrap();
        assert!(conn.is_alive(), "an error reply leaves the connection usable");
    }

    #[test]
    fn a_reply_with_a_wrong_serial_loses_the_connection() {
        let (conn, t) = daemon(1, |h, _| reply(h.procedure, h.serial + 7, STATUS_OK, &[]));
        let e = conn.call(7, &[]).unwrap_err();
        assert!(matches!(&e, RpcError::Lost(why) if why.contains("serial")), "{e:?}");
        t.join().unwrap();
        assert!(!conn.is_alive());
        assert!(matches!(conn.call(7, &[]), Err(RpcError::Lost(_))), "later calls fail at once");
    }

    #[test]
    fn a_reply_naming_another_procedure_loses_the_connection() {
        let (conn, t) = daemon(1, |h, _| reply(h.procedure + 1, h.serial, STATUS_OK, &[]));
        assert!(matches!(conn.call(7, &[]), Err(RpcError::Lost(_))));
        t.join().unwrap();
    }

    #[test]
    fn a_truncated_reply_and_a_closed_socket_fail_the_waiting_call() {
        let (conn, t) = daemon(1, |h, _| reply(h.procedure, h.serial, STATUS_OK, &[0; 8])[..20].to_vec());
        let conn = Arc::new(conn);
        let caller = std::thread::spawn({
            let conn = conn.clone();
            move || conn.call(7, &[])
        });
        drop(t.join().unwrap());
        let e = caller.join().unwrap().unwrap_err();
        assert!(matches!(e, RpcError::Lost(_)), "{e:?}");
        assert!(!conn.is_alive());
    }

    #[test]
    fn events_are_skipped() {
        let (conn, t) = daemon(1, |h, _| {
            let mut event = call_packet(318, 0, &[0; 8]);
            event[16..20].copy_from_slice(&TYPE_MESSAGE.to_be_bytes());
            [event, reply(h.procedure, h.serial, STATUS_OK, &[0, 0, 0, 9])].concat()
        });
        assert_eq!(conn.call(7, &[]).unwrap(), [0, 0, 0, 9]);
        t.join().unwrap();
    }
}
