//! The WAL decoder: pages into records ([`reader`]), records into their parts
//! ([`record`]), and the payloads Tidemark needs ([`rmgr`]); [`summary`] turns
//! a stretch of records into what the audit stores per segment.
//!
//! Facts from PostgreSQL's access/xlog_internal.h, xlogrecord.h, xact.h,
//! heapam_xlog.h; checked against pg_waldump by the end-to-end tests.

pub mod blockmap;
pub mod exercise;
pub mod page;
pub mod reader;
pub mod record;
pub mod rmgr;
pub mod summary;
pub mod writer;

pub use page::PgMajor;
pub use reader::{EndOfWal, RawRecord, WalReader};
pub use record::{decode, BlockRef, Record, RecordError, RelFileLocator};
