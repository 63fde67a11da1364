//! A blocking XAPI client: one session per pool, JSON-RPC (or XML-RPC) calls, tasks, and
//! the HTTP transfer handlers (reference §1, §5).
//!
//! Secrets: the password and the session reference never appear in errors or logs. HTTP
//! transfers carry the session in a `session_id` cookie, not in the URL, so transport
//! errors (which print URLs) cannot leak it.

use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::tls::Trust;
use super::wire::{self, Protocol};
use crate::error::{Error, Result};

/// How to reach and log in to a pool.
#[derive(Clone)]
pub struct Connect {
    /// `https://host[:port]` or `http://…` (a bare host name means HTTPS).
    pub url: String,
    pub user: String,
    pub password: String,
    pub trust: Trust,
    pub protocol: Protocol,
    /// Transient transport failures are retried this many times, with back-off.
    pub retries: u32,
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect").field("url", &self.url).field("user", &self.user).field("trust", &self.trust).finish()
    }
}

/// A logged-in session.
pub struct Client {
    base: url::Url,
    agent: ureq::Agent,
    conn: Connect,
    session: Mutex<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.base)
    }
}

/// Parse the pool address: a URL, or a bare host (HTTPS).
pub fn base_url(text: &str) -> Result<url::Url> {
    let with_scheme = if text.contains("://") { text.to_string() } else { format!("https://{text}") };
    let url = url::Url::parse(&with_scheme).map_err(|e| Error::Usage(format!("--host {text:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(Error::Usage(format!("--host {text:?}: expected https://HOST[:PORT]")));
    }
    Ok(url)
}

impl Client {
    /// Connect and log in. A pool member answers `HOST_IS_SLAVE`: the client then logs in
    /// to the master it names instead.
    pub fn connect(conn: Connect) -> Result<Client> {
        let mut base = base_url(&conn.url)?;
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(20))
            .timeout_read(Duration::from_secs(300))
            .redirects(0)
            .user_agent(concat!("vmvault/", env!("CARGO_PKG_VERSION")));
        if let Some(cfg) = conn.trust.client_config() {
            builder = builder.tls_config(cfg);
        }
        let agent = builder.build();
        for _ in 0..2 {
            let client = Client {
                base: base.clone(),
                agent: agent.clone(),
                conn: conn.clone(),
                session: Mutex::new(String::new()),
            };
            match client.login() {
                Ok(()) => return Ok(client),
                Err(Error::Api { code, params, .. }) if code == "HOST_IS_SLAVE" && !params.is_empty() => {
                    base.set_host(Some(&params[0]))
                        .map_err(|e| Error::Usage(format!("master address {:?}: {e}", params[0])))?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::protocol("login", "redirected to the master more than once"))
    }

    fn login(&self) -> Result<()> {
        let args = vec![json!(self.conn.user), json!(self.conn.password), json!("2.0"), json!("vmvault")];
        let s = self.raw_call("session.login_with_password", &args)?;
        let s = s
            .as_str()
            .ok_or_else(|| Error::protocol("session.login_with_password", "the answer is not a session reference"))?;
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = s.to_string();
        Ok(())
    }

    /// Log out (best effort; errors are ignored, the session expires anyway).
    pub fn logout(&self) {
        let s = self.session();
        let _ = self.raw_call("session.logout", &[json!(s)]);
    }

    pub(crate) fn session(&self) -> String {
        self.session.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The pool's address as given.
    pub fn base(&self) -> &url::Url {
        &self.base
    }

    /// Call `method` with the session first. An expired session is renewed once.
    pub fn call(&self, method: &str, args: &[Value]) -> Result<Value> {
        let with_session = |s: String| std::iter::once(json!(s)).chain(args.iter().cloned()).collect::<Vec<_>>();
        match self.raw_call(method, &with_session(self.session())) {
            Err(Error::Api { code, .. }) if code == "SESSION_INVALID" => {
                self.login()?;
                self.raw_call(method, &with_session(self.session()))
            }
            other => other,
        }
    }

    /// One RPC, retried on transient transport errors (connection refused or reset, timeouts)
    /// with 0.5, 1, 2 … s pauses. XAPI-level failures are never retried here.
    fn raw_call(&self, method: &str, args: &[Value]) -> Result<Value> {
        let (path, ctype, body) = wire::encode(self.conn.protocol, method, args);
        let url = self.base.join(path).map_err(|e| Error::Usage(e.to_string()))?;
        let mut pause = Duration::from_millis(500);
        let mut attempt = 0;
        loop {
            let sent = self.agent.request_url("POST", &url).set("Content-Type", ctype).send_string(&body);
            match sent {
                Ok(resp) => {
                    let mut text = String::new();
                    resp.into_reader()
                        .take(256 << 20)
                        .read_to_string(&mut text)
                        .map_err(|e| Error::io(format!("{method}: reading the answer"), e))?;
                    return wire::decode(self.conn.protocol, method, &text);
                }
                Err(e) if attempt < self.conn.retries && transient(&e) => {
                    attempt += 1;
                    std::thread::sleep(pause);
                    pause *= 2;
                }
                Err(e) => return Err(self.transport_error(method, e)),
            }
        }
    }

    pub(crate) fn transport_error(&self, what: &str, e: ureq::Error) -> Error {
        let host = self.base.host_str().unwrap_or("").to_string();
        match e {
            ureq::Error::Status(code, resp) => Error::protocol(what, format!("HTTP {code} {}", resp.status_text())),
            ureq::Error::Transport(t) => {
                // The cause (a rustls error, an OS error) is in the source chain.
                let mut causes = Vec::new();
                let mut src = std::error::Error::source(&t);
                while let Some(e) = src {
                    causes.push(e.to_string());
                    src = e.source();
                }
                let cause = causes.last().cloned().unwrap_or_default();
                let detail = match t.kind() {
                    ureq::ErrorKind::Dns => "the host name does not resolve".to_string(),
                    _ if t.message().is_some_and(|m| m.contains("tls")) || cause.contains("certificate") => {
                        tls_hint(&cause)
                    }
                    ureq::ErrorKind::ConnectionFailed => {
                        format!(
                            "connection failed ({})",
                            if cause.is_empty() {
                                t.message().unwrap_or("refused or unreachable").to_string()
                            } else {
                                cause
                            }
                        )
                    }
                    _ => t.to_string(),
                };
                Error::Connect { host, detail }
            }
        }
    }

    /// Run `Async.<method>` and wait for its task; the task's result, decoded.
    pub fn call_async(&self, method: &str, args: &[Value]) -> Result<Value> {
        let task = self.call(&format!("Async.{method}"), args)?;
        let task = task.as_str().ok_or_else(|| Error::protocol(method, "no task reference"))?.to_string();
        self.wait_task(method, &task, None)
    }

    /// Wait for a task to finish; its result (XML-RPC fragment decoded) or its error. The
    /// task is destroyed afterwards.
    pub fn wait_task(&self, what: &str, task: &str, timeout: Option<Duration>) -> Result<Value> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(20);
        let rec = loop {
            let rec = self.call("task.get_record", &[json!(task)])?;
            if rec["status"] != json!("pending") && rec["status"] != json!("cancelling") {
                break rec;
            }
            if timeout.is_some_and(|t| start.elapsed() > t) {
                return Err(Error::protocol(what, "the task did not finish in time"));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
        };
        let _ = self.call("task.destroy", &[json!(task)]);
        match rec["status"].as_str() {
            Some("success") => {
                let text = rec["result"].as_str().unwrap_or("");
                if text.trim().is_empty() {
                    return Ok(json!(""));
                }
                disk_formats::xva::xmlrpc::parse_document(text)
                    .map_err(|e| Error::protocol(format!("{what} task result"), e))
            }
            _ => {
                let info: Vec<String> = rec["error_info"]
                    .as_array()
                    .map(|a| a.iter().map(|v| v.as_str().map_or_else(|| v.to_string(), String::from)).collect())
                    .unwrap_or_default();
                let code = info.first().cloned().unwrap_or_else(|| "UNKNOWN".into());
                Err(Error::Api { method: what.to_string(), code, params: info.into_iter().skip(1).collect() })
            }
        }
    }

    /// Create a task for an HTTP transfer (`task.create`).
    pub fn create_task(&self, label: &str) -> Result<String> {
        let t = self.call("task.create", &[json!(label), json!("vmvault transfer")])?;
        t.as_str().map(String::from).ok_or_else(|| Error::protocol("task.create", "no task reference"))
    }

    /// Start a GET of an HTTP handler (`/export_raw_vdi`…), following XAPI's 302 redirects
    /// to the host holding the disk. Returns the body reader.
    pub fn http_get(&self, path: &str, query: &[(&str, &str)]) -> Result<Box<dyn Read + Send + Sync + 'static>> {
        let resp = self.http("GET", path, self.url(path, query)?, |req| req.call())?;
        let task = resp.header("task-id").map(String::from);
        let mut reader = resp.into_reader();
        // xapi bug (xen-api #4603): a 200 whose body is a second HTTP error response.
        let mut first = [0u8; 5];
        let n = read_up_to(&mut reader, &mut first).map_err(|e| Error::io(path.to_string(), e))?;
        if &first[..n] == b"HTTP/" {
            let mut rest = String::new();
            let _ = reader.take(4096).read_to_string(&mut rest);
            // The transfer's task says why, in XAPI's terms, when it has failed.
            if let Some(Err(e)) = task.map(|t| self.wait_task(path, &t, Some(Duration::from_secs(2)))) {
                if e.code().is_some() {
                    return Err(e);
                }
            }
            let line = format!("HTTP/{}", rest.lines().next().unwrap_or(""));
            return Err(Error::protocol(path, format!("the pool sent an error inside the transfer: {line}")));
        }
        Ok(Box::new(std::io::Cursor::new(first[..n].to_vec()).chain(reader)))
    }

    /// PUT a body of `len` bytes to an HTTP handler (`/import_raw_vdi`…). A 302 can only be
    /// seen once a body was sent, so an empty probe goes first (without the task, which it
    /// would finish) to find the host that takes the data — as Xen Orchestra does.
    pub fn http_put(
        &self,
        path: &str,
        query: &[(&str, &str)],
        len: u64,
        body: &mut dyn FnMut() -> Box<dyn Read + Send>,
    ) -> Result<()> {
        let probe: Vec<(&str, &str)> = query.iter().filter(|(k, _)| *k != "task_id").copied().collect();
        let mut at = self.url(path, &probe)?;
        for _ in 0..4 {
            let req = self.agent.request_url("PUT", &at).set("Cookie", &format!("session_id={}", self.session()));
            // Only a redirect matters: whatever else the probe gets (an empty import may fail)
            // means this host takes the data. Its task is waited for, so the probe's import is
            // over before the real one starts.
            let resp = match req.send_bytes(&[]) {
                Ok(r) | Err(ureq::Error::Status(_, r)) => r,
                Err(e) => return Err(self.transport_error(path, e)),
            };
            let task = resp.header("task-id").map(String::from);
            let location = (resp.status() == 302).then(|| resp.header("location").unwrap_or("").to_string());
            drop(resp);
            if let Some(t) = task {
                let _ = self.wait_task(path, &t, Some(Duration::from_secs(10)));
            }
            let Some(location) = location else { break };
            follow(&mut at, &location, path)?;
        }
        let mut url = self.url(path, query)?;
        follow(&mut url, at.as_str(), path)?;
        self.http("PUT", path, url, |req| req.set("Content-Length", &len.to_string()).send(body()))?;
        Ok(())
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> Result<url::Url> {
        let mut url = self.base.join(path).map_err(|e| Error::Usage(e.to_string()))?;
        url.query_pairs_mut().extend_pairs(query.iter().copied());
        Ok(url)
    }

    /// Send a request at `url`, following XAPI's 302s to other hosts (see [`follow`]).
    fn http(
        &self,
        method: &str,
        path: &str,
        mut url: url::Url,
        mut send: impl FnMut(ureq::Request) -> std::result::Result<ureq::Response, ureq::Error>,
    ) -> Result<ureq::Response> {
        for _ in 0..4 {
            let req = self.agent.request_url(method, &url).set("Cookie", &format!("session_id={}", self.session()));
            match send(req) {
                Ok(resp) if resp.status() == 302 => follow(&mut url, resp.header("location").unwrap_or(""), path)?,
                Ok(resp) => return Ok(resp),
                Err(ureq::Error::Status(code, resp)) => {
                    let task = resp.header("task-id").map(String::from);
                    let mut text = String::new();
                    let _ = resp.into_reader().take(4096).read_to_string(&mut text);
                    if let Some(task) = task {
                        // The task says why, in XAPI's terms.
                        if let Err(e) = self.wait_task(path, &task, Some(Duration::from_secs(10))) {
                            return Err(e);
                        }
                    }
                    return Err(Error::protocol(path, format!("HTTP {code}")));
                }
                Err(e) => return Err(self.transport_error(path, e)),
            }
        }
        Err(Error::protocol(path, "too many redirects"))
    }
}

/// Point `url` at the host and port of `location` (a redirect), keeping its scheme, path and
/// query: XAPI redirects to the same handler on the host that holds the data.
fn follow(url: &mut url::Url, location: &str, path: &str) -> Result<()> {
    let next = url.join(location).map_err(|e| Error::protocol(path, format!("bad redirect: {e}")))?;
    url.set_host(next.host_str()).map_err(|e| Error::protocol(path, e.to_string()))?;
    let _ = url.set_port(next.port());
    Ok(())
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn transient(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Transport(t) => matches!(t.kind(), ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Io),
        ureq::Error::Status(code, _) => *code == 503,
    }
}

/// A readable reason for a TLS failure, with what to do about it.
fn tls_hint(cause: &str) -> String {
    format!("TLS: {cause} (XAPI hosts use self-signed certificates: pin the host's with --fingerprint or --cert, or pass --insecure)")
}
