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
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tidemark_repo::Fail;
use tokio::net::TcpListener;
use tracing::{debug, info};

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
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(answer(&request, &metrics)) }
                });
                if let Err(e) =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
                {
                    debug!("metrics connection ended: {e}");
                }
            });
        }
    }))
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
