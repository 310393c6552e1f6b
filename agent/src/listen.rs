//! `run --listen ADDR`: `/metrics` (Prometheus text format) and `/healthz`
//! (200 or 503 with the reasons, as JSON) over plain HTTP/1, on the agent's
//! own runtime. Nothing here changes state: scraping is read-only. Bind it
//! to loopback or a management network; it tells the archive's positions
//! to whoever can reach it (no secrets: URLs and errors are redacted where
//! they are made).

use crate::metrics::Metrics;
use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tidemark_repo::Fail;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// How long a client may take to send a request's headers (also the wait
/// for the next request on a kept-alive connection): a client that opens a
/// connection and sends nothing is dropped after this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; more are closed as soon as they are
/// accepted. Scrapers and health checks need a handful; the cap bounds the
/// descriptors and memory a flood of connections can take from the agent.
pub const MAX_CONNECTIONS: usize = 32;

/// The pause after a failed accept (out of descriptors, say): retrying at
/// once would spin on the same error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(500);

/// Binds first (so a taken port fails `run` at startup with a clear line),
/// then serves until the returned task is aborted.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        Fail::new(
            format!("cannot listen on {addr} for /metrics: {e}"),
            "choose a free address with --listen (e.g. 127.0.0.1:9187), or leave it unset",
        )
    })?;
    let bound = listener.local_addr().context("listening address")?;
    info!(address = %bound, "serving /metrics and /healthz");
    Ok(tokio::spawn(accept_loop(listener, metrics)))
}

/// Accepts connections until aborted, each served on its own task while a
/// permit lasts.
async fn accept_loop(listener: TcpListener, metrics: Arc<Metrics>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("cannot accept a /metrics connection: {e}");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!("{MAX_CONNECTIONS} /metrics connections open: one more closed at once");
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            serve_connection(stream, metrics).await;
            drop(permit);
        });
    }
}

async fn serve_connection(stream: TcpStream, metrics: Arc<Metrics>) {
    let service = hyper::service::service_fn(move |request| {
        let metrics = metrics.clone();
        async move { Ok::<_, Infallible>(answer(&request, &metrics)) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        debug!("metrics connection ended: {e}");
    }
}

fn answer(request: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n".into());
    }
    match request.uri().path() {
        "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", metrics.render()),
        "/healthz" => {
            let health = metrics.health();
            let status = if health.healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            let body = serde_json::to_string(&health).unwrap_or_default() + "\n";
            reply(status, "application/json", body)
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics or /healthz\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
