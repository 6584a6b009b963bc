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
    // hyper's `GracefulShutdown` does not take connections that may be upgraded (the
    // Realtime API's WebSockets), so each connection task watches `stopping` itself.
    let (stopping, stop) = tokio::sync::watch::channel(false);
    let slots = limits.connections.max(1);
    let open = Arc::new(Semaphore::new(slots));
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
        // An upgraded connection ends here; its socket lives on in the upgrade's task,
        // counted and drained by the Realtime API's connection registry.
        let connection = builder
            .serve_connection(TokioIo::new(stream), hyper_service)
            .with_upgrades();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = async { drop(stop.wait_for(|s| *s).await) } => {
                    // Finish the request in flight, then close.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                // A client's fault (a bad request head, a reset): not the server's.
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    // Every connection holds a permit until it ends: all of them back means all ended.
    let all = u32::try_from(slots).unwrap_or(u32::MAX);
    let _ = open.acquire_many(all).await;
}
