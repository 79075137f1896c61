//! The server's connections: one thread waits on every socket at once (mio), reads each request
//! whole — within a deadline and under a bound on open connections — and hands it to a thread of
//! its own; a connection kept alive comes back to wait for its next request. A client that stalls
//! costs a buffer, not a thread, and is closed at its deadline.

use super::conn::{self, parse_head, Head, HttpRequest};
use super::openai::ApiError;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the listener enforces.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Connections open at once (waiting for a request or being answered); beyond them a new
    /// connection gets 503 and is closed.
    pub max_connections: usize,
    /// Time a connection has to send a whole request, head and body, from when it opens or its
    /// previous answer ends; then it gets 408 (or, idle, is closed).
    pub request_timeout: Duration,
    /// The largest body.
    pub max_body: usize,
}

/// Answers one request through its [`Responder`], on a thread of its own.
pub(super) type Handler = dyn Fn(HttpRequest, Responder) + Send + Sync;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);

/// A running listener; [`stop`](Self::stop) ends it (requests being answered finish on their
/// threads).
pub(super) struct Listener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Listen on `addr` and answer each request with `handler`.
    pub fn bind(addr: SocketAddr, limits: Limits, handler: Arc<Handler>) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let poll = Poll::new()?;
        let mut source = mio::net::TcpListener::from_std(listener.try_clone()?);
        poll.registry().register(&mut source, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (back, returned) = mpsc::channel();
        let mut event_loop = EventLoop {
            poll,
            listener,
            _source: source,
            limits,
            handler,
            conns: HashMap::new(),
            next: 2,
            open: Arc::new(AtomicUsize::new(0)),
            draining_refused: 0,
            back,
            returned,
            waker: waker.clone(),
        };
        let stopped = stop.clone();
        let thread = std::thread::Builder::new().name("agentflux-http".into()).spawn(move || event_loop.run(&stopped))?;
        Ok(Self { addr, stop, waker, thread: Some(thread) })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Wait until the listener ends.
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Stop accepting and close the connections waiting for a request.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        self.join();
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A connection waiting for (the rest of) a request.
struct Waiting {
    stream: TcpStream,
    /// A second handle of the socket, registered with the poll.
    source: mio::net::TcpStream,
    buf: Vec<u8>,
    head: Option<Head>,
    since: Instant,
    /// Refused: what it still sends is read and dropped until it closes or [`LINGER`] passes,
    /// so that closing does not reset the connection before the client has read the refusal.
    closing: bool,
    /// Among the open connections; one refused at accept, beyond the bound, is not.
    counted: bool,
}

/// Connections refused at accept that are drained at once; beyond them one is closed at once
/// (its client may see a reset), so a flood beyond the bound holds few sockets.
const MAX_DRAINING_REFUSED: usize = 64;

/// How long a refused connection is drained before it is closed.
const LINGER: Duration = Duration::from_secs(2);

struct EventLoop {
    poll: Poll,
    listener: TcpListener,
    _source: mio::net::TcpListener,
    limits: Limits,
    handler: Arc<Handler>,
    conns: HashMap<usize, Waiting>,
    next: usize,
    /// Connections open, waiting here or being answered.
    open: Arc<AtomicUsize>,
    /// Connections refused at accept and being drained.
    draining_refused: usize,
    back: Sender<(TcpStream, Vec<u8>)>,
    returned: Receiver<(TcpStream, Vec<u8>)>,
    waker: Arc<Waker>,
}

impl EventLoop {
    fn run(&mut self, stop: &AtomicBool) {
        let mut events = Events::with_capacity(256);
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let next_deadline = self.conns.values().map(|c| self.deadline(c)).min();
            let timeout = next_deadline.map_or(Duration::from_secs(1), |d| d.saturating_duration_since(now)).min(Duration::from_secs(1));
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("the HTTP listener's poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) => self.read(t),
                }
            }
            while let Ok((stream, leftover)) = self.returned.try_recv() {
                self.wait_for_request(stream, leftover);
            }
            self.expire();
        }
        for t in self.conns.keys().copied().collect::<Vec<_>>() {
            self.close(t);
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.open.load(Ordering::SeqCst) >= self.limits.max_connections {
                        let message = format!("{} connections are open; retry later", self.limits.max_connections);
                        refuse(&stream, 503, &message, &[("Retry-After", "1")]);
                        if self.draining_refused < MAX_DRAINING_REFUSED {
                            let _ = stream.shutdown(std::net::Shutdown::Write);
                            if let Some(t) = self.watch(stream, Vec::new(), false) {
                                self.draining_refused += 1;
                                self.read(t);
                            }
                        }
                        continue;
                    }
                    self.open.fetch_add(1, Ordering::SeqCst);
                    self.wait_for_request(stream, Vec::new());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors, typically: the pending connection stays in the
                    // backlog until some close.
                    tracing::warn!("cannot accept a connection: {e}");
                    return;
                }
            }
        }
    }

    /// Watch `stream` for its next request (`leftover`: bytes of it already read).
    fn wait_for_request(&mut self, stream: TcpStream, leftover: Vec<u8>) {
        match self.watch(stream, leftover, true) {
            // A pipelined request may be whole already.
            Some(t) => self.progress(t),
            None => {
                self.open.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Register `stream` with the poll: a connection `counted` among the open ones waits for a
    /// request (`buf`: what of it was read), another is a refused one being drained.
    fn watch(&mut self, stream: TcpStream, buf: Vec<u8>, counted: bool) -> Option<usize> {
        let registered = stream.set_nonblocking(true).and_then(|_| stream.try_clone()).and_then(|clone| {
            let mut source = mio::net::TcpStream::from_std(clone);
            self.poll.registry().register(&mut source, Token(self.next), Interest::READABLE).map(|_| source)
        });
        let source = match registered {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot watch a connection: {e}");
                return None;
            }
        };
        let t = self.next;
        self.next += 1;
        let since = Instant::now();
        self.conns.insert(t, Waiting { stream, source, buf, head: None, since, closing: !counted, counted });
        Some(t)
    }

    /// Read what connection `t` has sent.
    fn read(&mut self, t: usize) {
        let Some(c) = self.conns.get_mut(&t) else { return };
        let mut chunk = [0u8; 16 << 10];
        let cap = c.head.as_ref().map_or(conn::MAX_HEAD_BYTES + 4, |h| h.len + h.body_len);
        let closed = loop {
            if c.buf.len() >= cap && !c.closing {
                break false;
            }
            match c.stream.read(&mut chunk) {
                Ok(0) => break true,
                Ok(_) if c.closing => {}
                Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        if closed {
            self.close(t);
        } else if !c.closing {
            self.progress(t);
        }
    }

    /// Parse what connection `t` holds; a whole request goes to its handler.
    fn progress(&mut self, t: usize) {
        let Some(c) = self.conns.get_mut(&t) else { return };
        if c.head.is_none() {
            match parse_head(&c.buf, self.limits.max_body) {
                Ok(None) => return,
                Ok(Some(h)) => {
                    if h.expects_continue && c.buf.len() < h.len + h.body_len {
                        let _ = c.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    c.head = Some(h);
                }
                Err((status, message)) => {
                    refuse(&c.stream, status, &message, &[]);
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                    c.closing = true;
                    c.since = Instant::now();
                    // Readiness is reported on edges: what the client sent beyond the head is
                    // drained now, or no event would come for it.
                    return self.read(t);
                }
            }
        }
        let whole = c.head.as_ref().is_some_and(|h| c.buf.len() >= h.len + h.body_len);
        if !whole {
            return;
        }
        let Some(mut c) = self.conns.remove(&t) else { return };
        let _ = self.poll.registry().deregister(&mut c.source);
        let Some(h) = c.head.take() else { return };
        let leftover = c.buf.split_off(h.len + h.body_len);
        let body = c.buf.split_off(h.len);
        let request = HttpRequest { method: h.method, target: h.target, headers: h.headers, body, keep_alive: h.keep_alive };
        let stream = c.stream;
        if stream.set_nonblocking(false).and_then(|_| stream.set_write_timeout(Some(conn::WRITE_TIMEOUT))).is_err() {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let responder = Responder {
            stream: Some(stream),
            leftover,
            keep_alive: request.keep_alive,
            answered: false,
            back: self.back.clone(),
            waker: self.waker.clone(),
            open: self.open.clone(),
        };
        let handler = self.handler.clone();
        let spawned = std::thread::Builder::new().name("agentflux-request".into()).spawn(move || handler(request, responder));
        if let Err(e) = spawned {
            // The responder went down with the closure: its connection is closed and uncounted.
            tracing::error!("cannot start a request thread: {e}");
        }
    }

    /// Close the connections past their deadline: 408 to one that sent part of a request.
    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<usize> = self.conns.iter().filter(|(_, c)| self.deadline(c) <= now).map(|(t, _)| *t).collect();
        for t in late {
            if let Some(c) = self.conns.get(&t).filter(|c| !c.buf.is_empty() && !c.closing) {
                let message = format!("the request did not arrive whole within {} s", self.limits.request_timeout.as_secs_f64());
                refuse(&c.stream, 408, &message, &[]);
            }
            self.close(t);
        }
    }

    /// When connection `c` is closed if nothing more happens.
    fn deadline(&self, c: &Waiting) -> Instant {
        c.since + if c.closing { LINGER } else { self.limits.request_timeout }
    }

    fn close(&mut self, t: usize) {
        if let Some(mut c) = self.conns.remove(&t) {
            let _ = self.poll.registry().deregister(&mut c.source);
            if c.counted {
                self.open.fetch_sub(1, Ordering::SeqCst);
            } else {
                self.draining_refused -= 1;
            }
        }
    }
}

/// Answer an error on a connection about to be closed, without waiting on a slow client.
fn refuse(stream: &TcpStream, status: u16, message: &str, headers: &[(&str, &str)]) {
    let body = ApiError::status(status, message).body().to_string();
    let mut w = stream;
    let _ = stream.set_nonblocking(true);
    let _ = conn::write_response(&mut w, status, "application/json", headers, body.as_bytes(), false);
}

/// Where a request's answer goes. A connection kept alive returns to the listener when its
/// responder is dropped after a whole answer; otherwise it is closed.
pub(super) struct Responder {
    stream: Option<TcpStream>,
    leftover: Vec<u8>,
    keep_alive: bool,
    answered: bool,
    back: Sender<(TcpStream, Vec<u8>)>,
    waker: Arc<Waker>,
    open: Arc<AtomicUsize>,
}

impl Responder {
    /// Send a whole answer.
    pub fn respond(mut self, status: u16, content_type: &str, headers: &[(&str, &str)], body: &[u8]) -> io::Result<()> {
        let keep_alive = self.keep_alive;
        let Some(stream) = self.stream.as_mut() else { return Ok(()) };
        conn::write_response(stream, status, content_type, headers, body, keep_alive)?;
        self.answered = true;
        Ok(())
    }

    /// Start an answer of server-sent events (the connection closes after it).
    pub fn events(mut self) -> io::Result<EventStream> {
        let mut stream = self.stream.take().ok_or_else(|| io::Error::other("the answer was already sent"))?;
        conn::write_event_stream_head(&mut stream)?;
        Ok(EventStream { stream, open: self.open.clone() })
    }

    /// Whether the client has left (closed or reset its connection).
    pub fn client_gone(&self) -> bool {
        self.stream.as_ref().is_none_or(conn::client_gone)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else { return };
        if self.answered && self.keep_alive && self.back.send((stream, std::mem::take(&mut self.leftover))).is_ok() {
            let _ = self.waker.wake();
            return;
        }
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An answer of server-sent events in HTTP/1.1 chunks; the connection closes when it is dropped.
pub(super) struct EventStream {
    stream: TcpStream,
    open: Arc<AtomicUsize>,
}

impl EventStream {
    /// Send one chunk.
    pub fn chunk(&mut self, data: &[u8]) -> io::Result<()> {
        conn::write_chunk(&mut self.stream, data)
    }

    /// End the chunked body.
    pub fn finish(&mut self) -> io::Result<()> {
        conn::write_last_chunk(&mut self.stream)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}
