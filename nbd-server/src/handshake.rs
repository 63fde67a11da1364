//! Option haggling: fixed-newstyle greeting, then options until the client picks an export
//! (GO or EXPORT_NAME) or leaves. Unknown and malformed options get an error reply and the
//! haggling goes on; only broken framing ends the connection.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::export::{Export, Exports, MAX_PAYLOAD};
use crate::proto::*;

/// The outcome of a successful handshake.
#[derive(Debug)]
pub(crate) struct Negotiated {
    pub export: Arc<Export>,
    pub structured: bool,
    /// `base:allocation` was selected for this export (context id [`ALLOCATION_ID`]).
    pub allocation: bool,
}

/// The id this server gives `base:allocation`.
pub(crate) const ALLOCATION_ID: u32 = 1;

/// How option haggling ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Go(Negotiated),
    /// STARTTLS was acknowledged: the TLS handshake comes next, then haggling starts over.
    StartTls,
    Close,
}

/// What the connection's TLS state allows.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TlsState {
    /// The server can do STARTTLS.
    pub available: bool,
    /// Options other than STARTTLS and ABORT need TLS first.
    pub required: bool,
    /// TLS is up on this connection.
    pub active: bool,
}

struct State<'a> {
    exports: &'a Arc<dyn Exports>,
    shutdown: &'a watch::Receiver<bool>,
    tls: TlsState,
    structured: bool,
    no_zeroes: bool,
    /// The export name of the last SET_META_CONTEXT and whether it selected base:allocation.
    meta: Option<(String, bool)>,
    /// The last export looked up and its name: SET_META_CONTEXT, INFO and GO usually name the
    /// same one, and opening can cost catalogue I/O.
    last: Option<(String, Arc<Export>)>,
}

enum Next {
    Continue,
    StartTls,
    /// Transmission starts with this export, opened under this name (the meta context
    /// selection counts only if SET named it the same way).
    Go(Arc<Export>, String),
    Close,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Send the greeting and read the client's flags; returns whether NO_ZEROES was agreed and
/// whether the client speaks fixed newstyle (STARTTLS needs it).
pub(crate) async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<(bool, bool)> {
    s.write_all(&greeting()).await?;
    s.flush().await?;
    let client = s.read_u32().await?;
    if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(invalid("client flags with unknown bits"));
    }
    Ok((client & FLAG_C_NO_ZEROES != 0, client & FLAG_C_FIXED_NEWSTYLE != 0))
}

/// Haggle over options until the client picks an export, asks for TLS, or leaves.
pub(crate) async fn haggle<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    exports: &Arc<dyn Exports>,
    shutdown: &watch::Receiver<bool>,
    tls: TlsState,
    no_zeroes: bool,
) -> io::Result<Outcome> {
    let mut st = State { exports, shutdown, tls, structured: false, no_zeroes, meta: None, last: None };
    loop {
        let mut head = [0u8; 16];
        match s.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Outcome::Close),
            Err(e) => return Err(e),
        }
        let (option, len) = parse_option_header(&head).map_err(|e| invalid(&e.to_string()))?;
        if len > MAX_OPTION_LEN {
            // Skip it (within reason) and say so; a gigantic option is a hostile client.
            if len > MAX_PAYLOAD {
                return Err(invalid("option payload beyond 32 MiB"));
            }
            tokio::io::copy(&mut (&mut *s).take(u64::from(len)), &mut tokio::io::sink()).await?;
            reply(s, option, REP_ERR_TOO_BIG, b"option too long").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match option_step(s, &mut st, option, &data).await? {
            Next::Continue => {}
            Next::StartTls => return Ok(Outcome::StartTls),
            Next::Close => return Ok(Outcome::Close),
            Next::Go(export, asked) => {
                let allocation = matches!(&st.meta, Some((name, true)) if *name == asked);
                return Ok(Outcome::Go(Negotiated { export, structured: st.structured, allocation }));
            }
        }
    }
}

async fn reply<S: AsyncWrite + Unpin>(s: &mut S, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    s.write_all(&option_reply(option, kind, data)).await?;
    s.flush().await
}

impl State<'_> {
    /// The export called `name`, asking the catalogue (on a blocking thread) only when it
    /// differs from the last one looked up.
    async fn open(&mut self, name: &str) -> io::Result<Option<Arc<Export>>> {
        if let Some((last, e)) = &self.last {
            if last == name {
                return Ok(Some(e.clone()));
            }
        }
        let (exports, owned) = (self.exports.clone(), name.to_owned());
        let found = tokio::task::spawn_blocking(move || exports.open(&owned)).await.map_err(io::Error::other)??;
        if let Some(e) = &found {
            self.last = Some((name.to_owned(), e.clone()));
        }
        Ok(found)
    }
}

async fn option_step<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    st: &mut State<'_>,
    option: u32,
    data: &[u8],
) -> io::Result<Next> {
    if *st.shutdown.borrow() && option != OPT_ABORT {
        reply(s, option, REP_ERR_SHUTDOWN, b"server is shutting down").await?;
        return Ok(Next::Continue);
    }
    if st.tls.required && !st.tls.active && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
        if option == OPT_EXPORT_NAME {
            return Ok(Next::Close); // cannot answer it with an error
        }
        reply(s, option, REP_ERR_TLS_REQD, b"this server requires TLS (STARTTLS)").await?;
        return Ok(Next::Continue);
    }
    match option {
        OPT_EXPORT_NAME => {
            // No way to send an error: an unknown name ends the connection.
            let Ok(name) = parse_export_name(data) else { return Ok(Next::Close) };
            let Some(export) = st.open(&name).await? else { return Ok(Next::Close) };
            let flags = export.transmission_flags(st.structured);
            s.write_all(&export_name_reply(export.dev.len(), flags, st.no_zeroes)).await?;
            s.flush().await?;
            Ok(Next::Go(export, name))
        }
        OPT_ABORT => {
            // The client may already have hung up; that is fine.
            let _ = reply(s, option, REP_ACK, &[]).await;
            Ok(Next::Close)
        }
        OPT_LIST => {
            if !data.is_empty() {
                reply(s, option, REP_ERR_INVALID, b"LIST takes no data").await?;
                return Ok(Next::Continue);
            }
            let exports = st.exports.clone();
            let list = tokio::task::spawn_blocking(move || exports.list()).await.map_err(io::Error::other)?;
            match list {
                Ok(list) => {
                    for (name, description) in list {
                        s.write_all(&option_reply(option, REP_SERVER, &rep_server(&name, &description))).await?;
                    }
                    reply(s, option, REP_ACK, &[]).await?;
                }
                Err(e) => reply(s, option, REP_ERR_INVALID, error_text(&e).as_bytes()).await?,
            }
            Ok(Next::Continue)
        }
        OPT_STARTTLS => {
            if !data.is_empty() {
                reply(s, option, REP_ERR_INVALID, b"STARTTLS takes no data").await?;
            } else if st.tls.active {
                reply(s, option, REP_ERR_INVALID, b"TLS is already up").await?;
            } else if !st.tls.available {
                reply(s, option, REP_ERR_POLICY, b"TLS is not configured on this server").await?;
            } else {
                reply(s, option, REP_ACK, &[]).await?;
                return Ok(Next::StartTls);
            }
            Ok(Next::Continue)
        }
        OPT_INFO | OPT_GO => info_or_go(s, st, option, data).await,
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                reply(s, option, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data").await?;
            } else if st.structured {
                reply(s, option, REP_ERR_INVALID, b"structured replies already negotiated").await?;
            } else {
                st.structured = true;
                reply(s, option, REP_ACK, &[]).await?;
            }
            Ok(Next::Continue)
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            meta_context(s, st, option, data).await?;
            Ok(Next::Continue)
        }
        _ => {
            reply(s, option, REP_ERR_UNSUP, b"option not supported").await?;
            Ok(Next::Continue)
        }
    }
}

fn error_text(e: &io::Error) -> String {
    let mut t = e.to_string();
    t.truncate(512);
    t
}

async fn info_or_go<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    st: &mut State<'_>,
    option: u32,
    data: &[u8],
) -> io::Result<Next> {
    let Ok(req) = parse_info_request(data) else {
        reply(s, option, REP_ERR_INVALID, b"malformed INFO/GO request").await?;
        return Ok(Next::Continue);
    };
    let export = match st.open(&req.name).await {
        Ok(Some(e)) => e,
        Ok(None) => {
            let msg = format!("no export named {:?}", req.name);
            reply(s, option, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
            return Ok(Next::Continue);
        }
        Err(e) => {
            reply(s, option, REP_ERR_UNKNOWN, error_text(&e).as_bytes()).await?;
            return Ok(Next::Continue);
        }
    };
    let flags = export.transmission_flags(st.structured);
    // Like qemu-nbd: block sizes always; name and description when asked.
    let mut infos = vec![info_block_size(1, export.preferred_block, MAX_PAYLOAD)];
    if req.infos.contains(&INFO_NAME) {
        infos.push(info_string(INFO_NAME, &export.name));
    }
    if req.infos.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
        infos.push(info_string(INFO_DESCRIPTION, &export.description));
    }
    infos.push(info_export(export.dev.len(), flags));
    for info in infos {
        s.write_all(&option_reply(option, REP_INFO, &info)).await?;
    }
    reply(s, option, REP_ACK, &[]).await?;
    Ok(if option == OPT_GO { Next::Go(export, req.name) } else { Next::Continue })
}

async fn meta_context<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    st: &mut State<'_>,
    option: u32,
    data: &[u8],
) -> io::Result<()> {
    let set = option == OPT_SET_META_CONTEXT;
    if set {
        st.meta = None; // SET replaces the selection even when it fails
    }
    if !st.structured {
        return reply(s, option, REP_ERR_INVALID, b"negotiate structured replies first").await;
    }
    let Ok(req) = parse_meta_request(data) else {
        return reply(s, option, REP_ERR_INVALID, b"malformed meta context request").await;
    };
    if !matches!(st.open(&req.name).await, Ok(Some(_))) {
        let msg = format!("no export named {:?}", req.name);
        return reply(s, option, REP_ERR_UNKNOWN, msg.as_bytes()).await;
    }
    let matches = |q: &str| q == BASE_ALLOCATION || (!set && q == "base:");
    let selected = if !set && req.queries.is_empty() { true } else { req.queries.iter().any(|q| matches(q)) };
    if selected {
        let id = if set { ALLOCATION_ID } else { 0 };
        s.write_all(&option_reply(option, REP_META_CONTEXT, &rep_meta_context(id, BASE_ALLOCATION))).await?;
    }
    if set {
        st.meta = Some((req.name, selected));
    }
    reply(s, option, REP_ACK, &[]).await
}
