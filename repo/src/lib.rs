//! The Tidemark repository, once for both binaries: opening a URL (local
//! directory or object store), unlocking keys, sealing and unsealing,
//! framed reads and writes, listing, the catalog of backups, WAL and
//! timelines with the restorable window, and durable local writes.
//!
//! Layering: `tidemark-proto` (formats, no I/O) below; `tidemark-agent` and
//! `tidemark-restore` above, neither depending on the other. The restore
//! tool only reads (nothing here that writes is called by it).
//!
//! Module map:
//! - [`store`]: [`Repository`]: open, keys, list, get (frames and contents).
//! - [`write`]: puts (sealed, multipart on remote stores, fsynced locally), deletes.
//! - [`pages`]: backup chunks read back and checked; the whole copy's pages that undo an XOR.
//! - [`partial`]: a segment's durable prefix as a chain of objects: read, measured, and when the agent folds it.
//! - [`catalog`]: backups, archived WAL ranges, timelines, the [`catalog::Window`].
//! - [`remote`]: S3, GCS and Azure stores from their URLs and environment.
//! - [`events`], [`drills`]: the operations log and restore drill records.
//! - [`progress`]: progress of long operations: a bar on a terminal, log lines otherwise.
//! - [`trust`]: what this machine remembers of a repository's keys, so an older `repository.json` is refused.
//! - [`durable`]: fsync, atomic replace, durable removal of local files.
//! - [`error`]: [`RepoError`] and [`Fail`], each with a hint.

pub mod catalog;
pub mod drills;
pub mod durable;
pub mod error;
pub mod events;
pub mod expire;
pub mod lease;
pub mod pages;
pub mod partial;
pub mod progress;
pub mod remote;
pub mod retention;
pub mod store;
pub mod trust;
pub mod write;

pub use error::{hint_of, Fail, RepoError};
pub use store::{redact_url, Create, Repository};
