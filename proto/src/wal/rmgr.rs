//! Resource managers: their names as pg_waldump prints them, the names of
//! their record types, and the payloads Tidemark reads (transaction ends,
//! row changes, restore points, relation files, locks).

use super::page::{i64_at, u16_at, u32_at, PgMajor};
use super::record::{read_timestamptz, Record, RelFileLocator};

pub const RM_XLOG: u8 = 0;
pub const RM_XACT: u8 = 1;
pub const RM_SMGR: u8 = 2;
pub const RM_RELMAP: u8 = 7;
pub const RM_STANDBY: u8 = 8;
pub const RM_HEAP2: u8 = 9;
pub const RM_HEAP: u8 = 10;

pub const XLOG_CHECKPOINT_SHUTDOWN: u8 = 0x00;
pub const XLOG_SWITCH: u8 = 0x40;
pub const XLOG_RESTORE_POINT: u8 = 0x70;
pub const XLOG_END_OF_RECOVERY: u8 = 0x90;

const RMGR_NAMES: [&str; 22] = [
    "XLOG",
    "Transaction",
    "Storage",
    "CLOG",
    "Database",
    "Tablespace",
    "MultiXact",
    "RelMap",
    "Standby",
    "Heap2",
    "Heap",
    "Btree",
    "Hash",
    "Gin",
    "Gist",
    "Sequence",
    "SPGist",
    "BRIN",
    "CommitTs",
    "ReplicationOrigin",
    "Generic",
    "LogicalMessage",
];

/// The rmgr's name as pg_waldump prints it; `None` for ids of custom rmgrs.
pub fn rmgr_name(rmid: u8) -> Option<&'static str> {
    RMGR_NAMES.get(usize::from(rmid)).copied()
}

/// The record type as pg_waldump's `desc:` starts, for the rmgrs Tidemark
/// reads and a few common others; `None` where we do not name them.
pub fn record_type_name(rmid: u8, info: u8, major: PgMajor) -> Option<String> {
    let op = info & 0xF0;
    let init = |name: &str| if info & 0x80 != 0 { format!("{name}+INIT") } else { name.to_string() };
    let name = match rmid {
        RM_XLOG => match op {
            0x00 => "CHECKPOINT_SHUTDOWN",
            0x10 => "CHECKPOINT_ONLINE",
            0x20 => "NOOP",
            0x30 => "NEXTOID",
            0x40 => "SWITCH",
            0x50 => "BACKUP_END",
            0x60 => "PARAMETER_CHANGE",
            0x70 => "RESTORE_POINT",
            0x80 => "FPW_CHANGE",
            0x90 => "END_OF_RECOVERY",
            0xA0 => "FPI_FOR_HINT",
            0xB0 => "FPI",
            0xD0 => "OVERWRITE_CONTRECORD",
            0xE0 if major >= PgMajor(17) => "CHECKPOINT_REDO",
            _ => return None,
        },
        RM_XACT => match info & 0x70 {
            0x00 => "COMMIT",
            0x10 => "PREPARE",
            0x20 => "ABORT",
            0x30 => "COMMIT_PREPARED",
            0x40 => "ABORT_PREPARED",
            0x50 => "ASSIGNMENT",
            0x60 => "INVALIDATION",
            _ => return None,
        },
        RM_SMGR => match op {
            0x10 => "CREATE",
            0x20 => "TRUNCATE",
            _ => return None,
        },
        RM_STANDBY => match op {
            0x00 => "LOCK",
            0x10 => "RUNNING_XACTS",
            0x20 => "INVALIDATIONS",
            _ => return None,
        },
        RM_RELMAP => match op {
            0x00 => "UPDATE",
            _ => return None,
        },
        RM_HEAP => {
            return match info & 0x70 {
                0x00 => Some(init("INSERT")),
                0x10 => Some("DELETE".into()),
                0x20 => Some(init("UPDATE")),
                0x30 => Some("TRUNCATE".into()),
                0x40 => Some(init("HOT_UPDATE")),
                0x50 => Some("HEAP_CONFIRM".into()),
                0x60 => Some("LOCK".into()),
                _ => Some("INPLACE".into()),
            }
        }
        RM_HEAP2 => {
            let names: [&str; 8] = match major.0 {
                ..=13 => [
                    "REWRITE",
                    "CLEAN",
                    "FREEZE_PAGE",
                    "CLEANUP_INFO",
                    "VISIBLE",
                    "MULTI_INSERT",
                    "LOCK_UPDATED",
                    "NEW_CID",
                ],
                14..=16 => {
                    ["REWRITE", "PRUNE", "VACUUM", "FREEZE_PAGE", "VISIBLE", "MULTI_INSERT", "LOCK_UPDATED", "NEW_CID"]
                }
                _ => [
                    "REWRITE",
                    "PRUNE_ON_ACCESS",
                    "PRUNE_VACUUM_SCAN",
                    "PRUNE_VACUUM_CLEANUP",
                    "VISIBLE",
                    "MULTI_INSERT",
                    "LOCK_UPDATED",
                    "NEW_CID",
                ],
            };
            let name = names.get(usize::from((info & 0x70) >> 4))?;
            return Some(if *name == "MULTI_INSERT" { init(name) } else { name.to_string() });
        }
        _ => return None,
    };
    Some(name.to_string())
}

/// How a transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XactStatus {
    Committed,
    Aborted,
}

/// A COMMIT, ABORT, COMMIT PREPARED or ABORT PREPARED record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XactEnd {
    pub status: XactStatus,
    /// The top-level xid (for a prepared transaction, from the record's twophase part).
    pub xid: u32,
    pub prepared: bool,
    /// Commit or abort time, Unix microseconds.
    pub time_micros: i64,
    pub subxacts: Vec<u32>,
    /// Relation files the end dropped (commit) or removed (abort).
    pub dropped: Vec<RelFileLocator>,
    pub database: Option<u32>,
}

const XINFO_HAS_DBINFO: u32 = 0x001;
const XINFO_HAS_SUBXACTS: u32 = 0x002;
const XINFO_HAS_RELFILENODES: u32 = 0x004;
const XINFO_HAS_INVALS: u32 = 0x008;
const XINFO_HAS_TWOPHASE: u32 = 0x010;
const XINFO_HAS_DROPPED_STATS: u32 = 0x100;

/// Reads a transaction end; `None` for other Transaction records or bytes
/// that do not hold what the flags announce.
pub fn parse_xact_end(record: &Record<'_>, major: PgMajor) -> Option<XactEnd> {
    if record.rmid != RM_XACT {
        return None;
    }
    let (status, prepared) = match record.info & 0x70 {
        0x00 => (XactStatus::Committed, false),
        0x20 => (XactStatus::Aborted, false),
        0x30 => (XactStatus::Committed, true),
        0x40 => (XactStatus::Aborted, true),
        _ => return None,
    };
    let b = record.main_data;
    let time_micros = read_timestamptz(b, 0)?;
    let mut at = 8;
    let xinfo = if record.info & 0x80 != 0 {
        at += 4;
        u32_at(b, 8)?
    } else {
        0
    };
    let mut end = XactEnd {
        status,
        xid: record.xid,
        prepared,
        time_micros,
        subxacts: Vec::new(),
        dropped: Vec::new(),
        database: None,
    };
    if xinfo & XINFO_HAS_DBINFO != 0 {
        end.database = Some(u32_at(b, at)?);
        at += 8;
    }
    if xinfo & XINFO_HAS_SUBXACTS != 0 {
        let n = count_at(b, at)?;
        at += 4;
        for i in 0..n {
            end.subxacts.push(u32_at(b, at + 4 * i)?);
        }
        at += 4 * n;
    }
    if xinfo & XINFO_HAS_RELFILENODES != 0 {
        let n = count_at(b, at)?;
        at += 4;
        for i in 0..n {
            end.dropped.push(RelFileLocator::parse(b, at + 12 * i)?);
        }
        at += 12 * n;
    }
    if xinfo & XINFO_HAS_DROPPED_STATS != 0 {
        let n = count_at(b, at)?;
        let item = if major >= PgMajor(18) { 16 } else { 12 };
        at += 4 + item * n;
    }
    if status == XactStatus::Committed && xinfo & XINFO_HAS_INVALS != 0 {
        let n = count_at(b, at)?;
        at += 4 + 16 * n;
    }
    if xinfo & XINFO_HAS_TWOPHASE != 0 {
        end.xid = u32_at(b, at)?;
    }
    if b.len() < at {
        return None;
    }
    Some(end)
}

/// A non-negative i32 count, bounded by what the bytes could hold.
fn count_at(b: &[u8], at: usize) -> Option<usize> {
    let n = usize::try_from(i32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?)).ok()?;
    (n <= b.len()).then_some(n)
}

/// PREPARE TRANSACTION: the prepared xid and when it was prepared.
pub fn parse_prepare(record: &Record<'_>) -> Option<(u32, i64)> {
    if record.rmid != RM_XACT || record.info & 0x70 != 0x10 {
        return None;
    }
    Some((u32_at(record.main_data, 8)?, read_timestamptz(record.main_data, 16)?))
}

/// ASSIGNMENT: a top-level xid and subxids assigned under it.
pub fn parse_assignment(record: &Record<'_>) -> Option<(u32, Vec<u32>)> {
    if record.rmid != RM_XACT || record.info & 0x70 != 0x50 {
        return None;
    }
    let b = record.main_data;
    let top = u32_at(b, 0)?;
    let n = count_at(b, 4)?;
    let subs = (0..n).map(|i| u32_at(b, 8 + 4 * i)).collect::<Option<Vec<_>>>()?;
    Some((top, subs))
}

/// Rows a heap record changed: (relation, inserted, updated, deleted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowChange {
    pub rel: RelFileLocator,
    pub inserted: u32,
    pub updated: u32,
    pub deleted: u32,
}

/// The user-visible row changes of a Heap or Heap2 record; `None` for
/// maintenance (prune, vacuum, freeze, locks, in-place catalog updates).
pub fn parse_row_change(record: &Record<'_>) -> Option<RowChange> {
    let rel = record.blocks.first()?.rel;
    let change = |inserted, updated, deleted| Some(RowChange { rel, inserted, updated, deleted });
    match (record.rmid, record.info & 0x70) {
        (RM_HEAP, 0x00) => change(1, 0, 0),
        (RM_HEAP, 0x20) | (RM_HEAP, 0x40) => change(0, 1, 0),
        (RM_HEAP, 0x10) => {
            // A super-deletion undoes a speculative insert (ON CONFLICT); not a user delete.
            let flags = *record.main_data.get(7)?;
            if flags & 0x08 != 0 {
                None
            } else {
                change(0, 0, 1)
            }
        }
        (RM_HEAP2, 0x50) => change(u32::from(u16_at(record.main_data, 2)?), 0, 0),
        _ => None,
    }
}

/// A heap tuple's address: block and line pointer (PostgreSQL's `ctid`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tid {
    pub block: u32,
    pub offset: u16,
}

impl std::fmt::Display for Tid {
    /// As PostgreSQL writes a `tid`: `(block,offset)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({},{})", self.block, self.offset)
    }
}

/// One tuple a heap record wrote: the exact rows a transaction touched,
/// for `repair`. An update names both versions (they may be on different pages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TupleChange {
    Insert { rel: RelFileLocator, new: Tid },
    Update { rel: RelFileLocator, old: Tid, new: Tid },
    Delete { rel: RelFileLocator, old: Tid },
}

/// XLOG_HEAP_INIT_PAGE: the record's page was (re)initialized.
const XLOG_HEAP_INIT_PAGE: u8 = 0x80;

/// The tuples a Heap or Heap2 record inserted, updated or deleted, from
/// its main data (`xl_heap_insert`, `xl_heap_delete`, `xl_heap_update`,
/// `xl_heap_multi_insert`) and block references (block 0 is the page of the
/// new tuple; an update's old tuple is on block 1, or on block 0 when both
/// share a page). Empty for other records and for malformed ones.
pub fn parse_tuple_changes(record: &Record<'_>) -> Vec<TupleChange> {
    tuple_changes(record).unwrap_or_default()
}

fn tuple_changes(record: &Record<'_>) -> Option<Vec<TupleChange>> {
    let first = record.blocks.first()?;
    let (rel, block) = (first.rel, first.block);
    let data = record.main_data;
    let tid = |block, offset| Tid { block, offset };
    match (record.rmid, record.info & 0x70) {
        (RM_HEAP, 0x00) => Some(vec![TupleChange::Insert { rel, new: tid(block, u16_at(data, 0)?) }]),
        (RM_HEAP, 0x10) => {
            let flags = *data.get(7)?;
            if flags & 0x08 != 0 {
                return Some(Vec::new()); // a super-deletion (ON CONFLICT), not a user delete
            }
            Some(vec![TupleChange::Delete { rel, old: tid(block, u16_at(data, 4)?) }])
        }
        (RM_HEAP, 0x20) | (RM_HEAP, 0x40) => {
            let old_block = record.blocks.iter().find(|b| b.id == 1).map(|b| b.block).unwrap_or(block);
            Some(vec![TupleChange::Update {
                rel,
                old: tid(old_block, u16_at(data, 4)?),
                new: tid(block, u16_at(data, 12)?),
            }])
        }
        (RM_HEAP2, 0x50) => {
            let count = u16_at(data, 2)?;
            let mut changes = Vec::with_capacity(usize::from(count));
            for i in 0..count {
                // With a freshly initialized page the offsets are left out: 1, 2, 3, ...
                let offset =
                    if record.info & XLOG_HEAP_INIT_PAGE != 0 { i + 1 } else { u16_at(data, 4 + 2 * usize::from(i))? };
                changes.push(TupleChange::Insert { rel, new: tid(block, offset) });
            }
            Some(changes)
        }
        _ => Some(Vec::new()),
    }
}

/// XLOG RESTORE_POINT: (name, time in Unix microseconds).
pub fn parse_restore_point(record: &Record<'_>) -> Option<(String, i64)> {
    if record.rmid != RM_XLOG || record.rmgr_info() != XLOG_RESTORE_POINT {
        return None;
    }
    let time = read_timestamptz(record.main_data, 0)?;
    let raw = record.main_data.get(8..8 + 64)?;
    let len = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    Some((String::from_utf8_lossy(raw.get(..len)?).into_owned(), time))
}

/// A checkpoint's time (Unix microseconds) from CHECKPOINT_SHUTDOWN/ONLINE.
pub fn parse_checkpoint_time(record: &Record<'_>) -> Option<i64> {
    if record.rmid != RM_XLOG || record.rmgr_info() > 0x10 {
        return None;
    }
    // pg_time_t: Unix seconds.
    i64_at(record.main_data, 64).map(|s| s.saturating_mul(1_000_000))
}

/// Storage CREATE: a new relation file (a new table, or a rewrite of one).
pub fn parse_smgr_create(record: &Record<'_>) -> Option<RelFileLocator> {
    if record.rmid != RM_SMGR || record.rmgr_info() != 0x10 {
        return None;
    }
    RelFileLocator::parse(record.main_data, 0)
}

/// Standby LOCK: the (database, table OID) pairs locked AccessExclusive.
pub fn parse_standby_locks(record: &Record<'_>) -> Option<Vec<(u32, u32)>> {
    if record.rmid != RM_STANDBY || record.rmgr_info() != 0x00 {
        return None;
    }
    let b = record.main_data;
    let n = count_at(b, 0)?;
    (0..n).map(|i| Some((u32_at(b, 4 + 12 * i + 4)?, u32_at(b, 4 + 12 * i + 8)?))).collect()
}

/// Standby RUNNING_XACTS: the oldest xid still running.
pub fn parse_oldest_running_xid(record: &Record<'_>) -> Option<u32> {
    if record.rmid != RM_STANDBY || record.rmgr_info() != 0x10 {
        return None;
    }
    u32_at(record.main_data, 16)
}

/// A shutdown checkpoint or end of recovery: no transaction from before it is
/// still running (a crashed backend's transaction never writes an ABORT).
pub fn ends_all_transactions(record: &Record<'_>) -> bool {
    record.rmid == RM_XLOG && matches!(record.rmgr_info(), XLOG_CHECKPOINT_SHUTDOWN | XLOG_END_OF_RECOVERY)
}

/// RelMap UPDATE: the database whose mapped catalogs moved (0 = shared).
pub fn parse_relmap_update(record: &Record<'_>) -> Option<u32> {
    if record.rmid != RM_RELMAP || record.rmgr_info() != 0x00 {
        return None;
    }
    u32_at(record.main_data, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::record::BlockRef;
    use crate::Lsn;

    fn record<'a>(rmid: u8, info: u8, blocks: &[(u8, u32)], main_data: &'a [u8]) -> Record<'a> {
        let rel = RelFileLocator { tablespace: 1663, database: 5, relfilenode: 16384 };
        Record {
            lsn: Lsn(0x100),
            end: Lsn(0x200),
            total_len: 100,
            xid: 742,
            previous: Lsn(0),
            info,
            rmid,
            blocks: blocks
                .iter()
                .map(|&(id, block)| BlockRef { id, fork: 0, flags: 0, rel, block, image: None, data_len: 0 })
                .collect(),
            main_data,
            origin: None,
            toplevel_xid: None,
        }
    }

    #[test]
    fn tuple_addresses_of_heap_records() {
        let rel = RelFileLocator { tablespace: 1663, database: 5, relfilenode: 16384 };
        let tid = |block, offset| Tid { block, offset };
        // INSERT: offnum 7, flags 0.
        let insert = record(RM_HEAP, 0x00, &[(0, 3)], &[7, 0, 0]);
        assert_eq!(parse_tuple_changes(&insert), vec![TupleChange::Insert { rel, new: tid(3, 7) }]);
        // DELETE: xmax, offnum 9, infobits, flags; a super-deletion is none.
        let delete = record(RM_HEAP, 0x10, &[(0, 4)], &[1, 0, 0, 0, 9, 0, 0, 0]);
        assert_eq!(parse_tuple_changes(&delete), vec![TupleChange::Delete { rel, old: tid(4, 9) }]);
        let super_delete = record(RM_HEAP, 0x10, &[(0, 4)], &[1, 0, 0, 0, 9, 0, 0, 0x08]);
        assert!(parse_tuple_changes(&super_delete).is_empty());
        // UPDATE across pages (old on block ref 1), and HOT on one page.
        let update_data = [1, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 2, 0];
        let update = record(RM_HEAP, 0x20, &[(0, 8), (1, 2)], &update_data);
        assert_eq!(parse_tuple_changes(&update), vec![TupleChange::Update { rel, old: tid(2, 5), new: tid(8, 2) }]);
        let hot = record(RM_HEAP, 0x40, &[(0, 8)], &update_data);
        assert_eq!(parse_tuple_changes(&hot), vec![TupleChange::Update { rel, old: tid(8, 5), new: tid(8, 2) }]);
        // MULTI_INSERT: explicit offsets, or 1..n on an initialized page.
        let multi = record(RM_HEAP2, 0x50, &[(0, 6)], &[0, 0, 2, 0, 4, 0, 5, 0]);
        let expected = vec![TupleChange::Insert { rel, new: tid(6, 4) }, TupleChange::Insert { rel, new: tid(6, 5) }];
        assert_eq!(parse_tuple_changes(&multi), expected);
        let init = record(RM_HEAP2, 0x50 | 0x80, &[(0, 6)], &[0, 0, 3, 0]);
        assert_eq!(parse_tuple_changes(&init).len(), 3);
        assert_eq!(parse_tuple_changes(&init)[2], TupleChange::Insert { rel, new: tid(6, 3) });
        // Truncated main data and maintenance records give nothing.
        assert!(parse_tuple_changes(&record(RM_HEAP, 0x20, &[(0, 8)], &[1, 0])).is_empty());
        assert!(parse_tuple_changes(&record(RM_HEAP2, 0x10, &[(0, 8)], &[0; 16])).is_empty());
    }
}
