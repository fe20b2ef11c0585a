//! The listeners' side of a connection, shared by HTTP and gRPC: an accept loop that caps the
//! connections open at once, runs TLS handshakes (when configured) off the accept path with a
//! deadline, and hands over [`Connection`]s — plain or TLS — that close themselves when no
//! request has arrived within the header timeout (half-sent headers, idle sockets, a bare
//! HTTP/2 preface). Once requests flow, hyper's own timers take over (HTTP/1 header reads,
//! HTTP/2 keep-alive pings).

pub mod http;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;

use tls::Tls;

/// Limits every listener applies to its connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Time a new connection has to finish its TLS handshake and send its first request's
    /// headers.
    pub header_timeout: Duration,
}

/// The client's side of a connection, in each request's extensions (both protocols).
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    served: Arc<AtomicBool>,
}

impl Peer {
    /// Marks the connection as having sent a request: its header deadline no longer applies.
    pub fn mark_request(&self) {
        self.served.store(true, Ordering::Relaxed);
    }
}

/// A plain or TLS byte stream.
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection: its stream, its client, its place among the open connections, and
/// the deadline of its first request.
pub struct Connection {
    io: Io,
    peer: Peer,
    first_request: Option<Pin<Box<Sleep>>>,
    _open: OwnedSemaphorePermit,
}

impl Connection {
    /// Who is at the other end.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Fails reads once the first request's deadline passes without one.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(deadline) = &mut self.first_request {
            if self.peer.served.load(Ordering::Relaxed) {
                self.first_request = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the header timeout",
                ));
            }
        }
        Ok(())
    }
}

impl AsyncRead for Connection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check_deadline(cx)?;
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

/// Accepts connections on `listener` under `limits`, with TLS when `tls` is given; the
/// connections come out of the returned channel (closed when `listener` fails for good).
pub fn accept(
    listener: TcpListener,
    tls: Option<Tls>,
    limits: ConnectionLimits,
    what: &'static str,
) -> mpsc::Receiver<Connection> {
    let (tx, rx) = mpsc::channel(64);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // The server stopped taking connections.
                () = tx.closed() => return,
            };
            let (tcp, addr) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, as hyper does, then go on.
                    tracing::warn!(listener = what, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
                tracing::warn!(listener = what, client = %addr, max = limits.max_connections, "connection refused: too many open connections");
                drop(tcp);
                continue;
            };
            // Nagle's algorithm with the client's delayed ACK holds small writes (a streamed
            // token) for up to 40 ms: send each write at once.
            let _ = tcp.set_nodelay(true);
            let deadline = Instant::now() + limits.header_timeout;
            let peer = Peer {
                addr,
                served: Arc::new(AtomicBool::new(false)),
            };
            let tx = tx.clone();
            let tls = tls.clone();
            // The handshake runs in its own task: a slow client never holds up the next accept.
            tokio::spawn(async move {
                let io = match tls {
                    None => Io::Plain(tcp),
                    Some(tls) => match tokio::time::timeout_at(deadline, tls.acceptor().accept(tcp)).await {
                        Ok(Ok(stream)) => Io::Tls(Box::new(stream)),
                        Ok(Err(e)) => {
                            tracing::debug!(listener = what, client = %addr, "TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(listener = what, client = %addr, "TLS handshake timed out");
                            return;
                        }
                    },
                };
                let connection = Connection {
                    io,
                    peer,
                    first_request: Some(Box::pin(tokio::time::sleep_until(deadline))),
                    _open: permit,
                };
                let _ = tx.send(connection).await;
            });
        }
    });
    rx
}
