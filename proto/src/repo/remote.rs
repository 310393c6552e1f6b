//! Object stores other than a local directory, built the same way by both
//! binaries: `s3://bucket/prefix` (settings from the usual AWS_* variables:
//! AWS_ENDPOINT_URL for an S3-compatible store, AWS_ALLOW_HTTP=true for a
//! plain-http one, path-style unless AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true),
//! `gs://bucket/prefix` (GOOGLE_* variables) and `az://container/prefix`
//! (AZURE_* variables). Only S3 is tested here (against s3s-fs on loopback).
//!
//! Requests that fail transiently (connection refused or reset, timeouts,
//! 5xx, throttling) are retried by object_store with exponential backoff and
//! random jitter; past `RETRY_TIMEOUT` the error reaches the caller, and the
//! agent's uploader retries the whole upload on its own schedule, so an
//! outage of any length only delays uploads.

use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};
use std::sync::Arc;
use std::time::Duration;

/// How long object_store keeps retrying one request.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(60);

fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            base: 2.0,
        },
        max_retries: 8,
        retry_timeout: RETRY_TIMEOUT,
    }
}

fn client_options() -> ClientOptions {
    // A hung connection must fail, not hold an upload forever; a 16 MiB
    // segment at a slow 1 MB/s still fits in the request timeout.
    ClientOptions::new().with_connect_timeout(Duration::from_secs(5)).with_timeout(Duration::from_secs(120))
}

/// The store for a remote URL, `None` if the scheme is not a remote one.
pub fn open(url: &str) -> Option<Result<Arc<dyn ObjectStore>, object_store::Error>> {
    let store: Result<Arc<dyn ObjectStore>, object_store::Error> = if url.starts_with("s3://") {
        object_store::aws::AmazonS3Builder::from_env()
            .with_url(url)
            .with_retry(retry())
            .with_client_options(client_options())
            .build()
            .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
    } else if url.starts_with("gs://") {
        object_store::gcp::GoogleCloudStorageBuilder::from_env()
            .with_url(url)
            .with_retry(retry())
            .with_client_options(client_options())
            .build()
            .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
    } else if url.starts_with("az://") {
        object_store::azure::MicrosoftAzureBuilder::from_env()
            .with_url(url)
            .with_retry(retry())
            .with_client_options(client_options())
            .build()
            .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
    } else {
        return None;
    };
    Some(store)
}
