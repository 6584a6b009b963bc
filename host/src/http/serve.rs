//! The accept loop: HTTP/1.1 connections with bounded headers, a header timeout and a cap
//! on open connections, served by a warp filter, drained gracefully on shutdown.
//!
//! `warp::serve` offers none of these bounds, so Warden drives hyper itself: a request
//! head over [`Limits::header_bytes`] is answered 431 by hyper before any handler runs, a
//! client that trickles its head is cut off after [`Limits::header_timeout`], and past
//! [`Limits::connections`] open connections the loop stops accepting (the kernel's backlog
//! holds the rest) instead of spending memory on them.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_service::Service;
use warp::{Filter, Reply};

/// The peer of the connection a request came on (what `warp::addr::remote` would give).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Bounds on connections and request heads.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request head (request line and headers), in bytes; larger is 431.
    pub header_bytes: usize,
    /// How long a client may take to send a request head.
    pub header_timeout: Duration,
    /// Most connections open at once.
    pub connections: usize,
}

/// Serve `filter` on `listener` until `shutdown` resolves, then stop accepting and wait
/// for the connections open to finish their requests.
pub async fn serve<F, R>(
    listener: TcpListener,
    filter: F,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) where
    F: Filter<Extract = (R,), Error = Infallible> + Clone + Send + Sync + 'static,
    R: Reply,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(limits.connections.max(1)));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was
                    // accepted: wait a moment rather than spin.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = warp::service(filter.clone());
        let hyper_service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ClientAddr(peer));
            service.clone().call(req)
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_header_size(limits.header_bytes)
            .max_buf_size(limits.header_bytes.max(8192) * 2);
        let connection = builder.serve_connection(TokioIo::new(stream), hyper_service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // A client's fault (a bad request head, a reset): not the server's.
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
