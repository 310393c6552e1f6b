//! Formats both Tidemark binaries agree on byte for byte.
//!
//! Crate map:
//! - [`base_backup`]: BASE_BACKUP's result sets and CopyData messages.
//! - [`lsn`]: `Lsn`, its `X/Y` text form and segment arithmetic.
//! - [`timeline`]: `TimelineId` and timeline history files.
//! - [`segment`]: WAL segment and history file names.
//! - [`certificate`]: the hash SCRAM channel binding applies to a server certificate.
//! - [`conninfo`]: libpq-style connection settings (URL, `PG*` variables, service file, `.pgpass`).
//! - [`incremental_file`]: PostgreSQL 17+'s `INCREMENTAL.*` files, read into block ranges.
//! - [`replication`]: messages of the physical replication stream.
//! - [`repo`]: the repository layout and the envelope every stored object is framed in.
//! - [`tar`]: a streaming reader of the tar archives BASE_BACKUP sends.
//! - [`wal`]: the WAL page and record decoder and the per-segment audit summary.
//! - [`xid`]: `Xid`, a transaction id.
//!
//! **Architecture invariant:** this crate does no I/O, spawns nothing and never
//! panics on any input; every decoder of outside bytes returns an error instead.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic))]

pub mod base_backup;
pub mod certificate;
pub mod conninfo;
pub mod incremental_file;
pub mod lsn;
pub mod replication;
pub mod repo;
pub mod segment;
pub mod tar;
pub mod timeline;
pub mod wal;
pub mod xid;

pub use lsn::Lsn;
pub use timeline::TimelineId;
pub use xid::Xid;
