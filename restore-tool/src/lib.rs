//! The Tidemark restore tool: everything it needs comes from the repository.
//!
//! Module map:
//! - [`audit`]: transactions and their table changes from the agent's WAL summaries (cached locally).
//! - [`audit_report`]: the `timeline` command's table, JSON and per-period views.
//! - [`timeline_html`]: the `timeline --html` page: chart, flagged transactions, commands; self-contained.
//! - [`cli`]: commands, settings, error lines and exit codes.
//! - [`fetch`]: a base backup into a new data directory.
//! - [`beneath`]: writes beneath a directory that never follow links; manifest paths checked to stay beneath.
//! - [`force`]: what `restore --force` may replace (the swap at the end is `fetch::swap_in`).
//! - [`places`]: system, home and Tidemark directories never replaced nor given a tablespace by default.
//! - [`tablespaces`]: where each tablespace goes (original place or `--tablespace-map`).
//! - [`target`]: restore targets and their recovery settings; times need a zone.
//! - [`planner`]: catalog + target -> which backup, which WAL, or why not.
//! - [`prefetch`]: WAL staged ahead of replay during `restore --start`.
//! - [`restore`]: checks, fetch, recovery settings, start and wait.
//! - [`pg_bin`]: which PostgreSQL installation runs a restored cluster (checked before writing).
//! - [`server_config`]: the source's configuration files as the backup holds them; what in them reaches outside.
//! - [`isolate`]: the inert configuration an isolated copy starts from (drills, scratch restores, `--isolate`).
//! - [`scratch`]: a private throwaway restore for `extract` and `repair`.
//! - [`rows`]: rows as text: columns, keys, reads by ctid or key, the statements that write them back.
//! - [`extract`]: tables (and their dependents) as of a target, to a file or into a live database.
//! - [`repair`]: one transaction undone in a live database, row by row, conflicts reported.
//! - [`verify`]: every object the backups need, read and checked; each bad one named.
//! - [`wal_get`]: the restore_command: one WAL file to the path PostgreSQL gives.
//!
//! **Architecture invariant:** nothing here reads the agent's state directory.

pub mod audit;
pub mod audit_report;
pub mod beneath;
pub mod cli;
pub mod delta;
pub mod extract;
pub mod fetch;
pub mod force;
pub mod isolate;
pub mod pg_bin;
pub mod pg_manifest;
pub mod places;
pub mod planner;
pub mod prefetch;
pub mod repair;
pub mod restore;
#[cfg(test)]
mod retention_model;
pub mod rows;
pub mod scratch;
pub mod server_config;
pub mod tablespaces;
pub mod target;
pub mod timeline_html;
pub mod verify;
pub mod wal_get;
