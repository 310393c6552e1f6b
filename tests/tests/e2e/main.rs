//! End-to-end tests against real PostgreSQL servers started by the harness.
//!
//! A scenario (workload, failure, check, recovery, check again) reads best
//! as one story from top to bottom, so these tests may run past the
//! 100-line limit every other function keeps.
#![allow(clippy::too_many_lines)]

mod archive;
mod audit;
mod auth;
mod backup;
mod bad_input;
mod chaos;
mod common;
mod connections;
mod deploy;
mod drill;
mod encryption;
mod failover;
mod force_replace;
mod hostile_repository;
mod incremental;
mod isolation;
mod metadata;
mod metrics;
mod object_store;
mod progress;
mod repair;
mod restore;
mod retention;
mod roles;
mod sync;
mod timeline;
mod timeline_html;
mod versions;
mod wal_decoder;
