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

use object_store::{BackoffConfig, ObjectStore, RetryConfig};
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

// A hung connection must fail, not hold an upload forever; a 16 MiB
// segment at a slow 1 MB/s still fits in the request timeout. Set as config
// values so the variables from_env read (AWS_ALLOW_HTTP, ...) still apply.
const CONNECT_TIMEOUT: &str = "5s";
const REQUEST_TIMEOUT: &str = "120s";

/// The store for a remote URL, `None` if the scheme is not a remote one.
pub fn open(url: &str) -> Option<Result<Arc<dyn ObjectStore>, object_store::Error>> {
    use object_store::ClientConfigKey::{ConnectTimeout, Timeout};
    // The three builders have the same methods but no common trait.
    macro_rules! build {
        ($builder:ty, $client:path) => {
            <$builder>::from_env()
                .with_url(url)
                .with_retry(retry())
                .with_config($client(ConnectTimeout), CONNECT_TIMEOUT)
                .with_config($client(Timeout), REQUEST_TIMEOUT)
                .build()
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        };
    }
    let store: Result<Arc<dyn ObjectStore>, object_store::Error> = if url.starts_with("s3://") {
        build!(object_store::aws::AmazonS3Builder, object_store::aws::AmazonS3ConfigKey::Client)
    } else if url.starts_with("gs://") {
        build!(object_store::gcp::GoogleCloudStorageBuilder, object_store::gcp::GoogleConfigKey::Client)
    } else if url.starts_with("az://") {
        build!(object_store::azure::MicrosoftAzureBuilder, object_store::azure::AzureConfigKey::Client)
    } else {
        return None;
    };
    // The builders take only the bucket from the URL; the rest is our prefix.
    let prefix = prefix_of(url);
    Some(store.map(|store| match prefix {
        Some(prefix) => Arc::new(object_store::prefix::PrefixStore::new(store, prefix)) as Arc<dyn ObjectStore>,
        None => store,
    }))
}

/// The path after the bucket, without leading or trailing slashes.
fn prefix_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let path = rest.split_once('/')?.1.trim_matches('/');
    (!path.is_empty()).then(|| path.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefixes() {
        assert_eq!(super::prefix_of("s3://bucket/prod/cluster-a/").as_deref(), Some("prod/cluster-a"));
        assert_eq!(super::prefix_of("s3://bucket"), None);
        assert_eq!(super::prefix_of("s3://bucket/"), None);
        assert_eq!(super::prefix_of("gs://b/x").as_deref(), Some("x"));
    }
}
