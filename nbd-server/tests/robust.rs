//! Protocol robustness with a hand-driven client: malformed handshakes, unknown options,
//! oversized and out-of-range requests, disconnects mid-request. Each bad connection gets a
//! protocol answer or is closed alone; the server keeps serving the others.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use blockdev::{BlockDev, FileDev, MemDev};
use nbd_server::proto::*;
use nbd_server::{Config, Export, Listener, StaticExports};

const SIZE: usize = 1 << 20;

fn content() -> Vec<u8> {
    (0..SIZE).map(|i| if i >= SIZE / 2 { 0 } else { (i % 253) as u8 }).collect()
}

/// A server on a free port with one read-only export "ro" (default) and one writable "rw".
fn start() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            // A sparse file: data, then a hole the server reports as such.
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ro.img");
            std::fs::write(&path, &content()[..SIZE / 2]).unwrap();
            std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(SIZE as u64).unwrap();
            let ro: Arc<dyn BlockDev> = Arc::new(FileDev::open(&path).unwrap());
            std::mem::forget(dir);
            let rw: Arc<dyn BlockDev> = Arc::new(MemDev::new(vec![0; SIZE]));
            let exports = StaticExports::new(vec![Export::new("ro", "read-only", ro), Export::new("rw", "", rw)]);
            let cfg = Config { handshake_timeout: Duration::from_secs(2), max_connections: 8, ..Config::default() };
            nbd_server::serve(Listener::Tcp(l), Arc::new(exports), cfg, None, std::future::pending()).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

struct Client(TcpStream);

impl Client {
    fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut c = Client(s);
        let mut g = [0u8; 18];
        c.0.read_exact(&mut g).unwrap();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        c
    }
    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }
    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.0.read_exact(&mut b).unwrap();
        u32::from_be_bytes(b)
    }
    fn u64(&mut self) -> u64 {
        (u64::from(self.u32()) << 32) | u64::from(self.u32())
    }
    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }
    /// One option reply: (reply type, data).
    fn reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.u64(), OPTION_REPLY_MAGIC);
        assert_eq!(self.u32(), opt, "option not echoed");
        let kind = self.u32();
        let mut data = vec![0u8; self.u32() as usize];
        self.0.read_exact(&mut data).unwrap();
        (kind, data)
    }
    /// Client flags, structured replies, then GO to `name`; returns the transmission flags.
    fn go(addr: SocketAddr, name: &str, structured: bool) -> (Self, u16) {
        let mut c = Self::connect(addr);
        c.send(&3u32.to_be_bytes());
        if structured {
            c.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(c.reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
        }
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        c.option(OPT_GO, &d);
        let mut flags = 0;
        loop {
            let (kind, data) = c.reply(OPT_GO);
            match kind {
                REP_INFO if data[..2] == [0, 0] => flags = u16::from_be_bytes([data[10], data[11]]),
                REP_INFO => {}
                REP_ACK => return (c, flags),
                other => panic!("GO failed: {other:#x} {:?}", String::from_utf8_lossy(&data)),
            }
        }
    }
    fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        self.send(&Request { flags, command, cookie, offset, length }.to_bytes());
    }
    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        (self.u32(), self.u64())
    }
    /// One structured reply chunk: (flags, type, payload).
    fn chunk(&mut self) -> (u16, u16, Vec<u8>) {
        assert_eq!(self.u32(), STRUCTURED_REPLY_MAGIC);
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut p = vec![0u8; len as usize];
        self.0.read_exact(&mut p).unwrap();
        (u16::from_be_bytes([h[0], h[1]]), u16::from_be_bytes([h[2], h[3]]), p)
    }
    fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

/// The server still serves a fresh, well-behaved client correctly.
fn still_serves(addr: SocketAddr) {
    let (mut c, _) = Client::go(addr, "ro", false);
    c.request(CMD_READ, 0, 9, 1000, 100);
    assert_eq!(c.simple(), (0, 9));
    let mut data = vec![0u8; 100];
    c.0.read_exact(&mut data).unwrap();
    assert_eq!(data, content()[1000..1100]);
}

#[test]
fn malformed_handshakes_close_only_their_connection() {
    let addr = start();
    // Unknown client flag bits.
    let mut c = Client::connect(addr);
    c.send(&0x80u32.to_be_bytes());
    assert!(c.is_closed());
    // Bad option magic.
    let mut c = Client::connect(addr);
    c.send(&1u32.to_be_bytes());
    c.send(b"IHAVEOPX\0\0\0\x07\0\0\0\0");
    assert!(c.is_closed());
    // Silence: the handshake timeout closes it.
    let mut c = Client::connect(addr);
    assert!(c.is_closed());
    // Disconnect in the middle of an option.
    let mut c = Client::connect(addr);
    c.send(&1u32.to_be_bytes());
    c.send(&IHAVEOPT.to_be_bytes());
    drop(c);
    still_serves(addr);
}

#[test]
fn unknown_and_malformed_options_get_error_replies() {
    let addr = start();
    let mut c = Client::connect(addr);
    c.send(&1u32.to_be_bytes());
    c.option(99, b"whatever");
    assert_eq!(c.reply(99).0, REP_ERR_UNSUP);
    c.option(OPT_LIST, b"x");
    assert_eq!(c.reply(OPT_LIST).0, REP_ERR_INVALID);
    c.option(OPT_GO, &[0, 0, 1]);
    assert_eq!(c.reply(OPT_GO).0, REP_ERR_INVALID);
    c.option(OPT_INFO, &[0, 0, 0, 4, b'n', b'o', b'n', b'e', 0, 0]);
    assert_eq!(c.reply(OPT_INFO).0, REP_ERR_UNKNOWN);
    c.option(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(c.reply(OPT_SET_META_CONTEXT).0, REP_ERR_INVALID, "meta context before structured replies");
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply(OPT_STARTTLS).0, REP_ERR_POLICY);
    let big = vec![7u8; 100_000];
    c.option(OPT_INFO, &big);
    assert_eq!(c.reply(OPT_INFO).0, REP_ERR_TOO_BIG);
    // Still in the handshake and able to list.
    c.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (kind, data) = c.reply(OPT_LIST);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_SERVER);
        let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["ro", "rw"]);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.reply(OPT_ABORT).0, REP_ACK);
    assert!(c.is_closed());
}

#[test]
fn bad_requests_get_errors_and_the_connection_survives() {
    let addr = start();
    let (mut c, flags) = Client::go(addr, "ro", false);
    assert_ne!(flags & TF_READ_ONLY, 0);
    assert_eq!(flags & (TF_SEND_FLUSH | TF_SEND_DF), 0, "no flush on read-only, no DF without structured replies");
    c.request(CMD_READ, 0, 1, SIZE as u64 - 10, 11);
    assert_eq!(c.simple(), (EINVAL, 1), "read past the end");
    c.request(CMD_READ, 0, 2, u64::MAX - 5, 10);
    assert_eq!(c.simple(), (EINVAL, 2), "offset overflow");
    c.request(CMD_READ, 0, 3, 0, 64 << 20);
    assert_eq!(c.simple(), (EINVAL, 3), "read beyond 32 MiB");
    c.request(CMD_WRITE, 0, 4, 0, 3);
    c.send(b"abc");
    assert_eq!(c.simple(), (EPERM, 4), "write on a read-only export");
    c.request(77, 0, 5, 0, 0);
    assert_eq!(c.simple(), (EINVAL, 5), "unknown command");
    c.request(CMD_READ, 1 << 9, 6, 0, 10);
    assert_eq!(c.simple(), (EINVAL, 6), "unknown flag");
    c.request(CMD_BLOCK_STATUS, 0, 7, 0, 512);
    assert_eq!(c.simple(), (EINVAL, 7), "block status without a context");
    still_serves(addr);
    // A write whose payload never arrives, then a hang-up: the server lets go.
    let (mut w, _) = Client::go(addr, "rw", false);
    w.request(CMD_WRITE, 0, 8, 0, 4096);
    w.send(&[1; 100]);
    drop(w);
    // A write payload beyond 32 MiB cannot be skipped: that connection is closed.
    let (mut w, _) = Client::go(addr, "rw", false);
    w.request(CMD_WRITE, 0, 9, 0, 40 << 20);
    assert!(w.is_closed());
    still_serves(addr);
}

#[test]
fn many_requests_in_flight_are_all_answered() {
    let addr = start();
    let (mut c, _) = Client::go(addr, "rw", false);
    let data: Vec<u8> = (0..64 * 4096).map(|i| (i * 7 % 256) as u8).collect();
    for i in 0..64u64 {
        c.request(CMD_WRITE, 0, i, i * 4096, 4096);
        c.send(&data[(i * 4096) as usize..][..4096]);
    }
    let mut seen: Vec<u64> = (0..64)
        .map(|_| c.simple())
        .map(|(e, k)| {
            assert_eq!(e, 0);
            k
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (0..64).collect::<Vec<_>>());
    c.request(CMD_FLUSH, 0, 100, 0, 0);
    assert_eq!(c.simple(), (0, 100));
    for i in 0..64u64 {
        c.request(CMD_READ, 0, 1000 + i, i * 4096, 4096);
    }
    for _ in 0..64 {
        let (e, k) = c.simple();
        assert_eq!(e, 0);
        let i = (k - 1000) as usize;
        let mut got = vec![0u8; 4096];
        c.0.read_exact(&mut got).unwrap();
        assert_eq!(got, data[i * 4096..][..4096], "reply {k} carries the wrong block");
    }
    c.request(CMD_DISC, 0, 0, 0, 0);
    assert!(c.is_closed());
}

#[test]
fn structured_reads_send_holes_and_errors_in_chunks() {
    let addr = start();
    let (mut c, flags) = Client::go(addr, "ro", true);
    assert_ne!(flags & TF_SEND_DF, 0);
    // Half data, half zeros: one data chunk then one hole chunk, DONE on the last.
    c.request(CMD_READ, 0, 5, SIZE as u64 / 2 - 4096, 8192);
    let mut chunks = Vec::new();
    loop {
        let (fl, kind, p) = c.chunk();
        chunks.push((kind, u64::from_be_bytes(p[..8].try_into().unwrap()), p.len()));
        if fl & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(
        chunks,
        vec![(REPLY_TYPE_OFFSET_DATA, SIZE as u64 / 2 - 4096, 8 + 4096), (REPLY_TYPE_OFFSET_HOLE, SIZE as u64 / 2, 12)]
    );
    // An error is a structured error chunk.
    c.request(CMD_READ, 0, 6, SIZE as u64, 1);
    let (fl, kind, p) = c.chunk();
    assert_eq!((fl, kind), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR));
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), EINVAL);
    // With DF, one data chunk covers data and zeros alike.
    c.request(CMD_READ, CMD_FLAG_DF, 7, SIZE as u64 / 2 - 4096, 8192);
    let (fl, kind, p) = c.chunk();
    assert_eq!((fl, kind, p.len()), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8 + 8192));
}

#[test]
fn connections_beyond_the_cap_are_closed_and_slots_come_back() {
    let addr = start(); // max_connections = 8
    let held: Vec<Client> = (0..8).map(|_| Client::connect(addr)).collect();
    let mut extra = TcpStream::connect(addr).unwrap();
    extra.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    let started = std::time::Instant::now();
    let mut b = [0u8; 18];
    assert!(matches!(extra.read(&mut b), Ok(0)), "the ninth connection got a greeting");
    assert!(started.elapsed() < Duration::from_secs(1), "refusal should be immediate");
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    still_serves(addr);
}

#[test]
fn export_name_clients_get_size_flags_and_the_padding_they_asked_for() {
    let addr = start();
    for no_zeroes in [true, false] {
        let mut c = Client::connect(addr);
        c.send(&(if no_zeroes { 3u32 } else { 1 }).to_be_bytes());
        c.option(OPT_EXPORT_NAME, b"ro");
        assert_eq!(c.u64(), SIZE as u64);
        let mut f = [0u8; 2];
        c.0.read_exact(&mut f).unwrap();
        assert_ne!(u16::from_be_bytes(f) & TF_READ_ONLY, 0);
        if !no_zeroes {
            let mut pad = [1u8; 124];
            c.0.read_exact(&mut pad).unwrap();
            assert_eq!(pad, [0u8; 124]);
        }
        c.request(CMD_READ, 0, 3, 10, 5);
        assert_eq!(c.simple(), (0, 3));
        let mut d = [0u8; 5];
        c.0.read_exact(&mut d).unwrap();
        assert_eq!(d, content()[10..15]);
    }
    // An unknown name cannot be answered with an error: the connection ends.
    let mut c = Client::connect(addr);
    c.send(&3u32.to_be_bytes());
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.is_closed());
    // The empty name is the default export.
    let mut c = Client::connect(addr);
    c.send(&3u32.to_be_bytes());
    c.option(OPT_EXPORT_NAME, b"");
    assert_eq!(c.u64(), SIZE as u64);
}
