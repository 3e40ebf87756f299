//! The API's connections: accepted one at a time and served by hyper (HTTP/1.1, with the
//! upgrades socket.io's websockets need), under limits that an idle, slow or greedy client
//! cannot get around. Each comes from `[api]`:
//!
//! - `max_connections` open at once. Past it the listener stops accepting (new connections
//!   wait in the kernel's backlog) until one closes, so the process never runs out of file
//!   descriptors because of its clients.
//! - `max_connections_per_client` from one address (an IPv6 /64 counts as one address). Past
//!   it, a new connection is answered `429 TOO_MANY_CONNECTIONS` in the envelope and closed.
//! - `header_read_timeout`: a connection must send a complete request head within this,
//!   counted from when it opened or from its previous response. An idle keep-alive
//!   connection is therefore closed after this long too.
//! - `idle_timeout`: a connection on which nothing was read or written for this long is
//!   closed. This covers what hyper no longer sees: stalled request bodies, streamed
//!   responses nobody reads, and upgraded websockets (socket.io pings every 25 s, so a live
//!   one is never idle for that long).
//!
//! A connection's slot (global and per client) goes with its I/O, so a websocket keeps its
//! slot after the upgrade until it closes.
//!
//! Each request carries the peer's address as [`ConnectInfo<SocketAddr>`]. The failed-login
//! limit ([`super::auth`]) uses it.

use super::ApiConfig;
use super::envelope::ApiError;
use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, Sleep};

/// The connection limits, from `[api]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    /// 0: no limit per client.
    pub max_connections_per_client: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long requests in flight may take to finish once the server stops.
    pub drain: Duration,
}

impl From<&ApiConfig> for Limits {
    fn from(c: &ApiConfig) -> Limits {
        Limits {
            max_connections: c.max_connections.max(1),
            max_connections_per_client: c.max_connections_per_client,
            header_read_timeout: c.header_read_timeout,
            idle_timeout: c.idle_timeout,
            drain: c.request_timeout,
        }
    }
}

/// The address limits are counted by: an IPv4 address, or an IPv6 /64 (one host's share of a
/// network, and what one client can choose addresses from).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Serves `router` on `listener` until `stop` resolves, then lets requests in flight finish
/// (for at most `limits.drain`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let clients = Arc::new(Clients::default());
    // Dropping `shutdown` tells every connection to finish; `open` is closed when they have.
    let (shutdown, shutdown_rx) = watch::channel(());
    let (open, open_rx) = watch::channel(());
    let mut stop = pin!(stop);
    let mut full = Throttled::default();
    let mut refused = Throttled::default();
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                full.warn(|| {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "the API has max_connections open: new connections wait until one closes"
                    )
                });
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    () = &mut stop => break,
                }
            }
        };
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Some(client) = clients.admit(addr.ip(), limits.max_connections_per_client) else {
            refused.warn(|| {
                tracing::warn!(
                    client = %client_key(addr.ip()),
                    limit = limits.max_connections_per_client,
                    "connections refused: max_connections_per_client reached for this address"
                )
            });
            refuse(&tcp, limits.max_connections_per_client);
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set on a connection");
        }
        let io = Conn::new(tcp, limits.idle_timeout, slot, client);
        let service = Connected {
            router: router.clone(),
            addr,
        };
        tokio::spawn(serve_connection(
            io,
            service,
            limits.header_read_timeout,
            shutdown_rx.clone(),
            open_rx.clone(),
        ));
    }
    drop(listener);
    drop(shutdown_rx);
    drop(shutdown);
    drop(open_rx);
    if tokio::time::timeout(limits.drain, open.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            "API connections still open {:?} after stopping; closing them",
            limits.drain
        );
    }
    Ok(())
}

/// One connection, until it closes, is upgraded, or the server stops.
async fn serve_connection(
    io: Conn,
    service: Connected,
    header_read_timeout: Duration,
    mut shutdown: watch::Receiver<()>,
    _open: watch::Receiver<()>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
        .with_upgrades();
    let mut conn = pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = result {
        // Timeouts, resets, malformed requests: the client's business.
        tracing::debug!(error = %e, "API connection ended");
    }
}

/// The router, with the peer's address in each request's extensions.
#[derive(Clone)]
struct Connected {
    router: Router,
    addr: SocketAddr,
}

impl tower_service::Service<axum::http::Request<Incoming>> for Connected {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = axum::routing::future::RouteFuture<std::convert::Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: axum::http::Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(ConnectInfo(self.addr));
        self.router.call(request)
    }
}

/// Errors of one connection are not the listener's: go on. Others (out of file descriptors)
/// pass with time: wait a moment, as axum's `serve` does.
async fn accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "the API cannot accept connections; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Answers a connection over its address's limit before reading anything, and closes it.
/// Best effort: a new connection's send buffer is empty, so the answer fits without waiting.
fn refuse(tcp: &TcpStream, limit: usize) {
    let refusal = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "TOO_MANY_CONNECTIONS",
        "too many connections from this address",
    )
    .details(serde_json::json!({ "max_connections_per_client": limit }));
    let _ = tcp.try_write(&super::envelope::raw_response(refusal));
}

/// Logs at most once every ten seconds.
#[derive(Default)]
struct Throttled(Option<Instant>);

impl Throttled {
    fn warn(&mut self, log: impl FnOnce()) {
        if self
            .0
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.0 = Some(Instant::now());
            log();
        }
    }
}

/// Open connections per client address.
#[derive(Default)]
struct Clients(Mutex<HashMap<IpAddr, usize>>);

impl Clients {
    fn admit(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<ClientSlot> {
        let key = client_key(ip);
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if limit > 0 && *n >= limit {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            clients: self.clone(),
            key,
        })
    }
}

/// One open connection of a client; closing it frees the slot.
struct ClientSlot {
    clients: Arc<Clients>,
    key: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// A client's TCP stream with its slots and its idle timer: reading or writing fails with
/// `TimedOut` once nothing has moved for `idle`.
struct Conn {
    tcp: TcpStream,
    idle: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
    _client: ClientSlot,
}

impl Conn {
    fn new(tcp: TcpStream, idle: Duration, slot: OwnedSemaphorePermit, client: ClientSlot) -> Conn {
        let now = Instant::now();
        Conn {
            tcp,
            idle,
            last: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
            _slot: slot,
            _client: client,
        }
    }

    /// Notes progress, or, while the stream waits, whether it has waited too long. The timer
    /// is moved only when it fires, not on every read and write.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.last = Instant::now();
            return poll;
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            let deadline = self.last + self.idle;
            if deadline <= Instant::now() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "nothing read or written for idle_timeout",
                )));
            }
            self.timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.tcp).poll_read(cx, buf);
        this.watch(cx, poll)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.tcp).poll_write(cx, buf);
        this.watch(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_ipv4_is_itself() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(
            client_key(a),
            client_key("2001:db8:1:3::1".parse().unwrap())
        );
        assert_eq!(
            client_key("::ffff:10.0.0.7".parse().unwrap()),
            "10.0.0.7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_client_slot_is_given_back_when_its_connection_closes() {
        let clients = Arc::new(Clients::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let first = clients.admit(ip, 2).unwrap();
        let _second = clients.admit(ip, 2).unwrap();
        assert!(clients.admit(ip, 2).is_none());
        assert!(clients.admit("10.0.0.2".parse().unwrap(), 2).is_some());
        drop(first);
        assert!(clients.admit(ip, 2).is_some());
    }
}
