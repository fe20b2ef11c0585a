//! What each listener allows a connection: a deadline for its first request's headers (half
//! a request line, an idle socket, a bare HTTP/2 preface are closed), and a cap on connections
//! open at once.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::server::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// Whether the server closes `stream` within `limit` (EOF or reset on read).
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // An HTTP/2 server speaks first (its SETTINGS); keep reading until the close.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn connections_that_send_no_whole_request_in_time_are_closed() {
    let server = TestServer::start(&["--header-timeout-ms", "500"]);
    let (http, grpc) = (addr(&server.base), addr(&server.grpc));
    let limit = Duration::from_secs(10);

    let mut idle = TcpStream::connect(http).await.unwrap();
    assert!(closed_within(&mut idle, limit).await, "an idle socket stayed open");

    let mut partial = TcpStream::connect(http).await.unwrap();
    partial
        .write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut partial, limit).await, "half a request stayed open");

    let mut preface = TcpStream::connect(grpc).await.unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    assert!(
        closed_within(&mut preface, limit).await,
        "a bare HTTP/2 preface stayed open"
    );

    // A whole request in time is served, and its connection may then wait for the next one.
    let mut whole = TcpStream::connect(http).await.unwrap();
    whole
        .write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 512];
    let n = whole.read(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    whole
        .write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = whole.read(&mut answer).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"),
        "keep-alive connection was cut"
    );
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_at_once() {
    let server = TestServer::start(&["--max-connections", "2", "--header-timeout-ms", "60000"]);
    let http = addr(&server.base);
    let first = TcpStream::connect(http).await.unwrap();
    let second = TcpStream::connect(http).await.unwrap();
    // Accepted in order: give the server a moment to count both.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = TcpStream::connect(http).await.unwrap();
    assert!(
        closed_within(&mut third, Duration::from_secs(5)).await,
        "a third connection was kept"
    );
    drop((first, second));
    let served = TestServer::wait_for(Duration::from_secs(5), || async {
        reqwest::get(server.url("/v2/health/live"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(served, "a place did not come back when connections closed");
}
