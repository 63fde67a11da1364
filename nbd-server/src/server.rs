//! The accept loop, shaped like mini-redis: the caller binds the listener and passes a
//! shutdown future; a semaphore caps connections; a watch channel announces shutdown, and
//! every connection finishes the replies it owes before the exports are flushed.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::export::Exports;
use crate::handshake::{greet, haggle, Outcome, TlsState};
use crate::tls::Tls;
use crate::transmission::{self, Budget};

/// Server limits.
#[derive(Clone, Debug)]
pub struct Config {
    /// Connections served at once; more are closed right after accept.
    pub max_connections: usize,
    /// Requests in flight on one connection (qemu uses 16, nbdcopy up to 64).
    pub max_in_flight: usize,
    /// Bytes of read and write payloads in flight over all connections.
    pub io_budget: u64,
    /// A client must finish option haggling within this time.
    pub handshake_timeout: Duration,
    /// STARTTLS support, and whether TLS is required.
    pub tls: Option<Tls>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_in_flight: 64,
            io_budget: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// Where clients connect.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Something worth telling an operator.
#[derive(Debug)]
pub enum Event {
    Connected { peer: String, export: String },
    Closed { peer: String, error: Option<io::Error> },
    Refused { peer: String, why: &'static str },
}

pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// Serve until `shutdown` completes, then drain connections and call
/// [`Exports::shutdown`].
pub async fn serve(
    listener: Listener,
    exports: Arc<dyn Exports>,
    config: Config,
    events: Option<EventSink>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let (tx, rx) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let budget = Arc::new(Budget::new(&config));
    let emit = Emit(events);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Ok(event) = done {
                    emit.send(event);
                }
                continue;
            }
            a = accept(&listener) => a,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                emit.send(Event::Refused { peer: e.to_string(), why: "accept failed" });
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            emit.send(Event::Refused { peer, why: "too many connections" });
            continue;
        };
        let c = Conn {
            exports: exports.clone(),
            budget: budget.clone(),
            shutdown: rx.clone(),
            timeout: config.handshake_timeout,
            tls: config.tls.clone(),
            emit: emit.clone(),
            peer: peer.clone(),
        };
        conns.spawn(async move {
            let error = match stream {
                Stream::Tcp(s) => c.run(s).await,
                Stream::Unix(s) => c.run(s).await,
            }
            .err();
            drop(slot);
            Event::Closed { peer, error }
        });
    }
    let _ = tx.send(true);
    while let Some(done) = conns.join_next().await {
        if let Ok(event) = done {
            emit.send(event);
        }
    }
    tokio::task::spawn_blocking(move || exports.shutdown()).await.map_err(io::Error::other)?
}

/// Serve one already-connected client (a TLS stream, a socketpair, a test's in-memory pipe):
/// handshake, then transmission until it leaves. Uses `config`'s per-connection limits.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    exports: Arc<dyn Exports>,
    config: &Config,
) -> io::Result<()> {
    let (_tx, rx) = watch::channel(false);
    let budget = Arc::new(Budget::new(config));
    let conn = Conn {
        exports,
        budget,
        shutdown: rx,
        timeout: config.handshake_timeout,
        tls: config.tls.clone(),
        emit: Emit(None),
        peer: String::new(),
    };
    conn.run(stream).await
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> io::Result<(Stream, String)> {
    match l {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            s.set_nodelay(true)?;
            Ok((Stream::Tcp(s), peer.to_string()))
        }
        Listener::Unix(l) => {
            let (s, _) = l.accept().await?;
            Ok((Stream::Unix(s), "unix socket".to_owned()))
        }
    }
}

#[derive(Clone)]
struct Emit(Option<EventSink>);

impl Emit {
    fn send(&self, e: Event) {
        if let Some(sink) = &self.0 {
            sink(e)
        }
    }
}

/// What one connection needs.
struct Conn {
    exports: Arc<dyn Exports>,
    budget: Arc<Budget>,
    shutdown: watch::Receiver<bool>,
    timeout: Duration,
    tls: Option<Tls>,
    emit: Emit,
    peer: String,
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "handshake took too long")
}

impl Conn {
    async fn run<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(self, mut s: S) -> io::Result<()> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (no_zeroes, fixed) = tokio::time::timeout_at(deadline, greet(&mut s)).await.map_err(|_| timed_out())??;
        let mut tls = TlsState {
            available: self.tls.is_some() && fixed,
            required: self.tls.as_ref().is_some_and(|t| t.required),
            active: false,
        };
        let outcome = tokio::time::timeout_at(deadline, haggle(&mut s, &self.exports, &self.shutdown, tls, no_zeroes))
            .await
            .map_err(|_| timed_out())??;
        match outcome {
            Outcome::Go(n) => self.transmit(s, n).await,
            Outcome::Close => Ok(()),
            Outcome::StartTls => {
                let Some(t) = &self.tls else { return Ok(()) };
                let mut s =
                    tokio::time::timeout_at(deadline, t.acceptor.accept(s)).await.map_err(|_| timed_out())??;
                tls.active = true;
                // All negotiated state is forgotten; haggling starts over inside TLS.
                let outcome =
                    tokio::time::timeout_at(deadline, haggle(&mut s, &self.exports, &self.shutdown, tls, no_zeroes))
                        .await
                        .map_err(|_| timed_out())??;
                match outcome {
                    Outcome::Go(n) => self.transmit(s, n).await,
                    _ => Ok(()),
                }
            }
        }
    }

    async fn transmit<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        self,
        s: S,
        n: crate::handshake::Negotiated,
    ) -> io::Result<()> {
        self.emit.send(Event::Connected { peer: self.peer.clone(), export: n.export.name.clone() });
        transmission::serve(s, n, &self.budget, self.shutdown).await
    }
}
