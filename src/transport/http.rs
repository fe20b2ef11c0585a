//! HTTP/1.1 and HTTP/2 over accepted [`Connection`]s, serving the axum router with hyper's
//! timers on: HTTP/1.1 connections must send each request's headers within
//! [`HEADER_READ_TIMEOUT`] (keep-alive waits included), HTTP/2 connections answer a ping every
//! [`KEEP_ALIVE_INTERVAL`] or are closed. On `stop` the listener stops accepting and open
//! connections finish their requests (the caller bounds how long).

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::mpsc;
use tower_service::Service;

use super::Connection;

/// Time an HTTP/1.1 connection has to send a request's headers, counted from the end of the
/// previous response (so it also closes idle keep-alive connections).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an HTTP/2 connection (both ports) is pinged.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before its connection is closed.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves `router` on each connection until `stop`, then waits for open connections to end.
pub async fn serve(mut connections: mpsc::Receiver<Connection>, router: Router, stop: impl Future<Output = ()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let connection = tokio::select! {
            connection = connections.recv() => match connection {
                Some(connection) => connection,
                None => break,
            },
            () = &mut stop => break,
        };
        let peer = connection.peer().clone();
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            peer.mark_request();
            request.extensions_mut().insert(ConnectInfo(peer.addr));
            request.extensions_mut().insert(peer.clone());
            let mut router = router.clone();
            async move { router.call(request).await }
        });
        let served = builder
            .serve_connection_with_upgrades(TokioIo::new(connection), service)
            .into_owned();
        let served = graceful.watch(served);
        tokio::spawn(async move {
            if let Err(e) = served.await {
                tracing::debug!("HTTP connection ended: {e}");
            }
        });
    }
    // Closing the channel stops the accept loop.
    drop(connections);
    graceful.shutdown().await;
}
