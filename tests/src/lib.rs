//! The test harness shared by all end-to-end tests.
//!
//! - [`cluster`]: throwaway PostgreSQL clusters (initdb, free loopback port,
//!   chosen settings and pg_hba lines), SQL through psql, pgbench, stop in Drop.
//! - [`agent`]: the real `tidemark-agent` and `tidemark-restore` binaries.
//! - [`s3`]: a real S3-protocol server (s3s-fs) on loopback, stoppable.
//! - [`moto`]: moto's S3 server with IAM enforced, one user per shipped policy.
//! - [`http`]: plain HTTP GETs (the agent's /metrics and /healthz, Prometheus's API).
//! - [`wait`]: waiting on conditions with generous deadlines, never fixed sleeps.
//! - [`tls`]: a test certificate authority made with openssl.
//! - [`waldump`]: pg_waldump output and our decoder turned into comparable facts.
//! - [`benchmarks`]: what the benchmark programs share (sizes, timed runs, a pgBackRest stanza).

pub mod agent;
pub mod benchmarks;
pub mod cluster;
pub mod http;
pub mod moto;
pub mod s3;
pub mod tls;
pub mod wait;
pub mod waldump;
