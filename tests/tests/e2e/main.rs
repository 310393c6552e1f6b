//! End-to-end tests against real PostgreSQL servers started by the harness.

mod archive;
mod audit;
mod auth;
mod backup;
mod bad_input;
mod common;
mod encryption;
mod object_store;
mod restore;
mod sync;
mod timeline;
mod wal_decoder;
