//! The Tidemark agent: streams WAL from PostgreSQL into a repository.
//!
//! Module map, in the order data flows:
//! - [`cli`]: commands, config merging, error messages with hints, exit codes.
//! - [`config`]: the TOML file, `TIDEMARK_*` variables and flags merged into [`config::Settings`].
//! - [`session`]: IDENTIFY_SYSTEM, slots, SHOW over a replication connection (`tidemark_pg`).
//! - [`preflight`]: pure checks of the server's settings, each with a hint.
//! - [`stream`]: the receiver loop: XLogData into the spool, status updates, timeline ends.
//! - [`spool`]: segment files in the state directory, fsynced before they count.
//! - [`uploader`]: frames, compresses and stores spool segments, then records them.
//! - [`summarizer`]: decodes stored segments into the audit's per-segment summaries.
//! - [`catalog`]: names relation files (database, file number) after their tables.
//! - [`index`]: the RocksDB index (the only module that names rocksdb).
//! - [`daemon`]: `run`: the state-directory lock, tasks, reconnects, shutdown.
//! - [`metrics`]: what `run` knows of itself: Prometheus metrics and health.
//! - [`listen`]: `run --listen`: `/metrics` and `/healthz` over HTTP.
//! - [`service`]: systemd readiness and watchdog notifications.
//! - [`drill`]: restore drills: restore, start, check, record, clean up.
//! - [`backup`]: BASE_BACKUP into per-chunk objects and a backup manifest.
//! - [`mark`]: named restore points, protected from retention with `--keep`.
//! - [`expire`]: the `expire` command (the planner and its application live in `tidemark_repo`).
//! - [`status`]: the status report.
//! - [`init`]: checks the server, creates the slot, creates or adopts the repository.
//! - [`backoff`]: the one retry policy.

pub mod backoff;
pub mod backup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod drill;
pub mod expire;
pub mod incremental;
pub mod index;
pub mod init;
pub mod keys;
pub mod listen;
pub mod lock;
pub mod mark;
pub mod metrics;
pub mod preflight;
pub mod priority;
pub mod relnames;
pub mod service;
pub mod session;
pub mod spool;
pub mod status;
pub mod stream;
pub mod summarizer;
pub mod syncrep;
pub mod uploader;
