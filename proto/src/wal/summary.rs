//! The audit's per-segment summary and how summaries become transactions.
//!
//! A [`SegmentSummary`] holds the facts of the records that *start* in one
//! segment: row changes per (sub)transaction and table, transaction ends with
//! their commit times, restore points. A transaction's changes and its commit
//! may sit in different segments, so summaries are facts, not transactions;
//! [`Assembler`] replays them in LSN order into [`Transaction`]s, keeping the
//! changes of committed subtransactions and dropping those of aborted ones.
//!
//! Summaries are stored in the repository (framed JSON) so the restore tool
//! answers from the repository alone.

use super::blockmap::{BlockMapBuilder, ChangedBlocks};
use super::page::PgMajor;
use super::record::{Record, RelFileLocator};
use super::rmgr::{self, XactStatus};
use crate::Lsn;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};

pub const SUMMARY_VERSION: u32 = 1;

/// Row counts of one (sub)transaction on one relation file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub xid: u32,
    /// Database OID and relation file number.
    pub db: u32,
    pub filenode: u32,
    /// The schema-qualified table name, quoted as PostgreSQL would need it;
    /// `None` when the agent could not name the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    #[serde(default)]
    pub ins: u64,
    #[serde(default)]
    pub upd: u64,
    #[serde(default)]
    pub del: u64,
}

/// A transaction's end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub xid: u32,
    pub status: XactStatus,
    /// Commit or abort time, Unix microseconds.
    pub time: i64,
    /// LSN of the commit or abort record.
    pub lsn: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subxacts: Vec<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prepared: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePoint {
    pub name: String,
    pub lsn: u64,
    /// Unix microseconds.
    pub time: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSummary {
    pub version: u32,
    pub timeline: u32,
    /// First LSN of the segment and the end of the last record that starts in it.
    pub start_lsn: u64,
    pub end_lsn: u64,
    pub records: u64,
    pub changes: Vec<Change>,
    /// In LSN order.
    pub ends: Vec<End>,
    pub restore_points: Vec<RestorePoint>,
    /// Transactions prepared in this segment (they outlive restarts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prepared: Vec<u32>,
    /// Every xid below this had ended by the segment's end (from RUNNING_XACTS
    /// or a shutdown checkpoint); changes of such xids that never saw an end
    /// belonged to a backend that crashed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_below: Option<u32>,
    /// The relation blocks this segment's records changed (`None`: not
    /// known, as in summaries written before Tidemark kept them, or when a
    /// record could not be decoded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<ChangedBlocks>,
}

impl SegmentSummary {
    /// The stored form, written to `out` as it is made (see
    /// `frame::encode_zstd_from`: a busy segment's is tens of MB).
    pub fn write_json(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        serde_json::to_writer(out, self).map_err(std::io::Error::other)
    }

    pub fn from_json(bytes: &[u8]) -> Result<SegmentSummary, String> {
        let summary: SegmentSummary = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if summary.version != SUMMARY_VERSION {
            return Err(format!("summary format version {} is not {SUMMARY_VERSION}", summary.version));
        }
        Ok(summary)
    }

    /// The commit times this segment's ends span, if any.
    pub fn time_range(&self) -> Option<(i64, i64)> {
        let times = self.ends.iter().map(|e| e.time);
        Some((times.clone().min()?, times.max()?))
    }
}

/// Collects the facts of records as they are decoded; the owner decides
/// which segment's records go into which builder.
/// (xid, database, relfilenode, tablespace).
type ChangeKey = (u32, u32, u32, u32);

/// Row counts (inserted, updated, deleted) per [`ChangeKey`], in first-seen
/// order. Decoding spends much of its time here, so the lookup is cheap: the
/// last entry is checked first (one transaction's rows of one table usually
/// come together), then the few entries of the same xid, found through a
/// small per-xid index (a segment has far fewer xids than row changes, so
/// that index stays in cache).
#[derive(Default)]
struct ChangeCounts {
    entries: Vec<CountEntry>,
    /// xid → its newest entry; older ones of the same xid are chained.
    by_xid: FxHashMap<u32, usize>,
}

struct CountEntry {
    key: ChangeKey,
    counts: (u64, u64, u64),
    /// The previous entry of the same xid.
    older: Option<usize>,
}

impl ChangeCounts {
    fn add(&mut self, key: ChangeKey, inserted: u64, updated: u64, deleted: u64) {
        let found = match self.entries.last() {
            Some(last) if last.key == key => Some(self.entries.len() - 1),
            _ => {
                let mut at = self.by_xid.get(&key.0).copied();
                while let Some(i) = at {
                    match self.entries.get(i) {
                        Some(entry) if entry.key == key => break,
                        Some(entry) => at = entry.older,
                        None => at = None,
                    }
                }
                at
            }
        };
        let at = found.unwrap_or_else(|| {
            let older = self.by_xid.insert(key.0, self.entries.len());
            self.entries.push(CountEntry { key, counts: (0, 0, 0), older });
            self.entries.len() - 1
        });
        if let Some(entry) = self.entries.get_mut(at) {
            entry.counts.0 += inserted;
            entry.counts.1 += updated;
            entry.counts.2 += deleted;
        }
    }
}

#[derive(Default)]
pub struct SummaryBuilder {
    changes: ChangeCounts,
    ends: Vec<End>,
    restore_points: Vec<RestorePoint>,
    prepared: Vec<u32>,
    finished_below: Option<u32>,
    records: u64,
    end_lsn: u64,
    /// Relation files created (new tables, rewrites): the namer should look again.
    pub created: Vec<RelFileLocator>,
    /// Tables locked AccessExclusive (DDL, TRUNCATE): (database, table OID).
    pub locked: Vec<(u32, u32)>,
    blocks: BlockMapBuilder,
}

impl SummaryBuilder {
    pub fn add(&mut self, record: &Record<'_>, major: PgMajor) {
        self.records += 1;
        self.end_lsn = self.end_lsn.max(record.end.0);
        self.blocks.add(record);
        if let Some(change) = rmgr::parse_row_change(record) {
            let key = (record.xid, change.rel.database, change.rel.relfilenode, change.rel.tablespace);
            self.changes.add(key, u64::from(change.inserted), u64::from(change.updated), u64::from(change.deleted));
        } else if let Some(end) = rmgr::parse_xact_end(record, major) {
            self.ends.push(End {
                xid: end.xid,
                status: end.status,
                time: end.time_micros,
                lsn: record.lsn.0,
                subxacts: end.subxacts,
                prepared: end.prepared,
            });
        } else if let Some((xid, _)) = rmgr::parse_prepare(record) {
            self.prepared.push(xid);
        } else if let Some((name, time)) = rmgr::parse_restore_point(record) {
            self.restore_points.push(RestorePoint { name, lsn: record.lsn.0, time });
        } else if let Some(oldest) = rmgr::parse_oldest_running_xid(record) {
            self.finished_below = Some(oldest);
        } else if rmgr::ends_all_transactions(record) {
            // Nothing older than the next xid can still be running (except prepared ones).
            if let Some(next) = record.main_data.get(24..28).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes) {
                self.finished_below = Some(next);
            }
        } else if let Some(rel) = rmgr::parse_smgr_create(record) {
            self.created.push(rel);
        } else if let Some(locks) = rmgr::parse_standby_locks(record) {
            self.locked.extend(locks);
        }
    }

    /// A record of this stretch could not be decoded: its changed blocks are not known.
    pub fn mark_incomplete(&mut self) {
        self.blocks.mark_incomplete();
    }

    /// The relation files this stretch changed rows in.
    pub fn touched(&self) -> impl Iterator<Item = RelFileLocator> + '_ {
        self.changes.entries.iter().map(|e| RelFileLocator {
            tablespace: e.key.3,
            database: e.key.1,
            relfilenode: e.key.2,
        })
    }

    /// The summary, with tables named by `name` (which returns `Naming::Skip`
    /// for files that are not user tables: toast, indexes, system catalogs).
    pub fn finish(
        self,
        timeline: u32,
        start_lsn: Lsn,
        mut name: impl FnMut(RelFileLocator) -> Naming,
    ) -> SegmentSummary {
        // At most one change per entry: no doubling growth (a busy segment
        // has hundreds of thousands).
        let mut changes = Vec::with_capacity(self.changes.entries.len());
        for CountEntry { key: (xid, db, filenode, tablespace), counts: (ins, upd, del), .. } in self.changes.entries {
            let rel = RelFileLocator { tablespace, database: db, relfilenode: filenode };
            let table = match name(rel) {
                Naming::Table(t) => Some(t),
                Naming::Skip => continue,
                Naming::Unknown => None,
            };
            changes.push(Change { xid, db, filenode, table, ins, upd, del });
        }
        SegmentSummary {
            version: SUMMARY_VERSION,
            timeline,
            start_lsn: start_lsn.0,
            end_lsn: self.end_lsn.max(start_lsn.0),
            records: self.records,
            changes,
            ends: self.ends,
            restore_points: self.restore_points,
            prepared: self.prepared,
            finished_below: self.finished_below,
            blocks: self.blocks.finish(),
        }
    }
}

/// What a relation file is, for the audit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Naming {
    Table(String),
    Skip,
    Unknown,
}

/// Row counts of one transaction on one table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableChange {
    pub table: String,
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    pub xid: u32,
    pub status: XactStatus,
    /// Unix microseconds.
    pub time: i64,
    pub lsn: u64,
    pub timeline: u32,
    pub tables: Vec<TableChange>,
}

/// Whether xid `a` precedes `b` in PostgreSQL's modulo-2³² order.
pub fn xid_precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// Replays summaries, in LSN order, into transactions. Its state (changes of
/// transactions still open) can be saved between runs.
#[derive(Default, Serialize, Deserialize)]
pub struct Assembler {
    pending: HashMap<u32, Vec<Change>>,
    prepared: HashSet<u32>,
}

impl Assembler {
    pub fn add(&mut self, summary: &SegmentSummary) -> Vec<Transaction> {
        for change in &summary.changes {
            self.pending.entry(change.xid).or_default().push(change.clone());
        }
        self.prepared.extend(summary.prepared.iter().copied());
        let mut done = Vec::with_capacity(summary.ends.len());
        for end in &summary.ends {
            self.prepared.remove(&end.xid);
            let mut changes = self.pending.remove(&end.xid).unwrap_or_default();
            for sub in &end.subxacts {
                changes.extend(self.pending.remove(sub).unwrap_or_default());
            }
            done.push(Transaction {
                xid: end.xid,
                status: end.status,
                time: end.time,
                lsn: end.lsn,
                timeline: summary.timeline,
                tables: merge_by_table(changes),
            });
        }
        if let Some(horizon) = summary.finished_below {
            let prepared = &self.prepared;
            self.pending.retain(|xid, _| prepared.contains(xid) || !xid_precedes(*xid, horizon));
        }
        done
    }
}

fn merge_by_table(changes: Vec<Change>) -> Vec<TableChange> {
    let mut tables: BTreeMap<String, TableChange> = BTreeMap::new();
    for c in changes {
        let table = c.table.clone().unwrap_or_else(|| format!("(file {}/{})", c.db, c.filenode));
        let entry = tables.entry(table.clone()).or_insert(TableChange { table, inserted: 0, updated: 0, deleted: 0 });
        entry.inserted += c.ins;
        entry.updated += c.upd;
        entry.deleted += c.del;
    }
    tables.into_values().collect()
}

/// PostgreSQL's reserved key words: an identifier equal to one needs quotes.
const RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

/// An identifier as PostgreSQL's quote_ident writes it: bare when it is
/// lower case letters, digits and underscores (not first a digit) and no
/// reserved word; otherwise in double quotes with quotes doubled.
pub fn quote_ident(ident: &str) -> String {
    let plain = ident.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && ident.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !RESERVED.contains(&ident);
    if plain {
        ident.to_string()
    } else {
        format!("\"{}\"", ident.replace('"', "\"\""))
    }
}

/// `schema.table`, each part quoted only where needed.
pub fn qualified_name(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// Splits a user's table argument (`"AttendanceRecord"`, `public.x`,
/// `public."User"`) into the canonical qualified form; an unqualified name
/// means schema `public`, an unquoted part folds to lower case as in SQL.
pub fn canonical_table(text: &str) -> Result<String, String> {
    // A file the audit could not name is shown as `(file DB/FILENODE)`;
    // given back to --table, it means that file.
    if let Some(inner) = text.trim().strip_prefix("(file ").and_then(|t| t.strip_suffix(')')) {
        if let Some((db, file)) = inner.split_once('/') {
            if db.parse::<u32>().is_ok() && file.parse::<u32>().is_ok() {
                return Ok(format!("(file {db}/{file})"));
            }
        }
    }
    let mut parts = Vec::new();
    let mut chars = text.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(format!("unterminated quote in table name {text:?}")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return Err(format!("empty part in table name {text:?}"));
        }
        parts.push(part);
        match chars.next() {
            None => break,
            Some('.') => continue,
            Some(_) => return Err(format!("unexpected text after a quoted part in {text:?}")),
        }
    }
    match parts.as_slice() {
        [table] => Ok(qualified_name("public", table)),
        [schema, table] => Ok(qualified_name(schema, table)),
        _ => Err(format!("table name {text:?} has more than schema.table")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unnamed_files_can_be_given_back() {
        assert_eq!(canonical_table("(file 16384/24988)"), Ok("(file 16384/24988)".into()));
        assert_eq!(canonical_table(" (file 5/1259) "), Ok("(file 5/1259)".into()));
        assert!(canonical_table("(file x/1)").is_ok_and(|t| t.starts_with("public.")));
    }

    fn change(xid: u32, table: &str, ins: u64, upd: u64) -> Change {
        Change { xid, db: 5, filenode: 1, table: Some(table.into()), ins, upd, del: 0 }
    }

    fn end(xid: u32, status: XactStatus, lsn: u64, subxacts: Vec<u32>) -> End {
        End { xid, status, time: lsn as i64, lsn, subxacts, prepared: false }
    }

    #[test]
    fn subtransactions_and_aborts_are_attributed_across_segments() {
        let mut assembler = Assembler::default();
        let first = SegmentSummary {
            version: SUMMARY_VERSION,
            changes: vec![change(10, "public.a", 1, 0), change(11, "public.a", 5, 0), change(12, "public.b", 0, 2)],
            ends: vec![end(11, XactStatus::Aborted, 100, vec![])],
            ..Default::default()
        };
        let aborted_sub = assembler.add(&first);
        assert_eq!(aborted_sub.len(), 1);
        let second = SegmentSummary {
            version: SUMMARY_VERSION,
            ends: vec![end(10, XactStatus::Committed, 200, vec![12])],
            ..Default::default()
        };
        let committed = assembler.add(&second);
        assert_eq!(committed.len(), 1);
        let tables = &committed.first().expect("one").tables;
        assert_eq!(
            tables,
            &vec![
                TableChange { table: "public.a".into(), inserted: 1, updated: 0, deleted: 0 },
                TableChange { table: "public.b".into(), inserted: 0, updated: 2, deleted: 0 },
            ]
        );
    }

    #[test]
    fn changes_of_a_crashed_backend_are_forgotten_but_prepared_ones_kept() {
        let mut assembler = Assembler::default();
        let summary = SegmentSummary {
            version: SUMMARY_VERSION,
            changes: vec![change(20, "public.a", 1, 0), change(21, "public.a", 1, 0)],
            prepared: vec![21],
            finished_below: Some(30),
            ..Default::default()
        };
        assert!(assembler.add(&summary).is_empty());
        let later = SegmentSummary {
            version: SUMMARY_VERSION,
            ends: vec![end(20, XactStatus::Committed, 5, vec![]), end(21, XactStatus::Committed, 6, vec![])],
            ..Default::default()
        };
        let done = assembler.add(&later);
        assert!(done.first().is_some_and(|t| t.tables.is_empty()), "crashed xid 20 kept its changes");
        assert!(done.get(1).is_some_and(|t| t.tables.len() == 1), "prepared xid 21 lost its changes");
    }

    #[test]
    fn names_are_quoted_as_postgresql_needs() {
        assert_eq!(qualified_name("public", "AttendanceRecord"), "public.\"AttendanceRecord\"");
        assert_eq!(qualified_name("public", "user"), "public.\"user\"");
        assert_eq!(qualified_name("public", "pgbench_accounts"), "public.pgbench_accounts");
        assert_eq!(canonical_table("\"AttendanceRecord\"").as_deref(), Ok("public.\"AttendanceRecord\""));
        assert_eq!(canonical_table("AttendanceRecord").as_deref(), Ok("public.attendancerecord"));
        assert_eq!(canonical_table("app.\"My\"\"T\"").as_deref(), Ok("app.\"My\"\"T\""));
        assert!(canonical_table("a.b.c").is_err());
        assert!(canonical_table("\"open").is_err());
    }

    #[test]
    fn summaries_round_trip_and_refuse_other_versions() {
        let summary = SegmentSummary {
            version: SUMMARY_VERSION,
            changes: vec![change(1, "public.a", 1, 0)],
            ..Default::default()
        };
        assert_eq!(
            SegmentSummary::from_json(&{
                let mut json = Vec::new();
                summary.write_json(&mut json).expect("json");
                json
            }),
            Ok(summary)
        );
        assert!(SegmentSummary::from_json(br#"{"version": 99}"#).is_err());
        assert!(SegmentSummary::from_json(b"\xff").is_err());
    }
}
