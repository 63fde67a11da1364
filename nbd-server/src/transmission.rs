//! The transmission phase of one connection: read requests, run each on a blocking thread
//! as soon as it arrives, and send replies in whatever order they finish. A global byte
//! budget bounds the memory all requests in flight may hold.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Mutex, Semaphore};
use tokio::task::JoinSet;

use crate::command::{execute, reply_error};
use crate::export::MAX_PAYLOAD;
use crate::handshake::Negotiated;
use crate::proto::*;

/// Unit of the byte budget.
const BUDGET_UNIT: u64 = 4096;

/// Limits shared by every connection of one server.
#[derive(Debug)]
pub(crate) struct Budget {
    /// Requests in flight on one connection.
    pub per_connection: usize,
    /// Bytes of payloads and replies in flight over all connections, in [`BUDGET_UNIT`]s.
    pub bytes: Arc<Semaphore>,
    pub units: u32,
}

impl Budget {
    pub(crate) fn new(config: &crate::Config) -> Self {
        let units = u32::try_from(config.io_budget.div_ceil(BUDGET_UNIT).max(8192)).unwrap_or(u32::MAX >> 4);
        Self { per_connection: config.max_in_flight.max(1), bytes: Arc::new(Semaphore::new(units as usize)), units }
    }
}

fn cost(budget: &Budget, req: &Request) -> u32 {
    let bytes = match req.command {
        CMD_READ | CMD_WRITE => u64::from(req.length.min(MAX_PAYLOAD)),
        _ => 0,
    };
    (bytes.div_ceil(BUDGET_UNIT) as u32).clamp(1, budget.units)
}

/// Serve requests until the client disconnects (DISC or EOF), the framing breaks, or the
/// server shuts down; replies to everything already received are sent before returning.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    n: Negotiated,
    budget: &Budget,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let n = Arc::new(n);
    let (mut rd, wr) = tokio::io::split(stream);
    let wr = Arc::new(Mutex::new(wr));
    let slots = Arc::new(Semaphore::new(budget.per_connection));
    let mut tasks = JoinSet::new();
    let result = loop {
        while tasks.try_join_next().is_some() {}
        let mut head = [0u8; REQUEST_LEN];
        let got = tokio::select! {
            r = rd.read_exact(&mut head) => r,
            _ = shutdown.wait_for(|&s| s) => break Ok(()),
        };
        match got {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let req = match Request::parse(&head) {
            Ok(r) => r,
            Err(e) => break Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        };
        if req.command == CMD_DISC {
            break Ok(());
        }
        let slot = slots.clone().acquire_owned().await.map_err(io::Error::other)?;
        let bytes = budget.bytes.clone().acquire_many_owned(cost(budget, &req)).await.map_err(io::Error::other)?;
        let mut payload = Vec::new();
        if req.command == CMD_WRITE {
            if req.length > MAX_PAYLOAD {
                // Cannot skip that much safely: the framing is lost for good.
                break Err(io::Error::new(io::ErrorKind::InvalidData, "write payload beyond 32 MiB"));
            }
            payload.resize(req.length as usize, 0);
            if let Err(e) = rd.read_exact(&mut payload).await {
                break Err(e);
            }
        }
        let (n, wr) = (n.clone(), wr.clone());
        tasks.spawn(async move {
            let reply = {
                let n = n.clone();
                tokio::task::spawn_blocking(move || execute(&n, &req, &payload)).await
            };
            let reply = reply.unwrap_or_else(|_| reply_error(&n, req.cookie, EIO, "request handler failed"));
            let mut w = wr.lock().await;
            // A failed send means the client is gone; the read side notices.
            let _ = async {
                w.write_all(&reply).await?;
                w.flush().await
            }
            .await;
            drop((slot, bytes));
        });
    };
    while tasks.join_next().await.is_some() {}
    let _ = wr.lock().await.shutdown().await;
    result
}
