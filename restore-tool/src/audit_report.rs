//! `tidemark-restore timeline`: the audit as a readable table, as JSON
//! (the stable fields of ARCHITECTURE.md), or as rows changed per table per minute or hour.

use crate::audit::{is_unusual, Audit, Filter};
use crate::target::{format_time, parse_time};
use std::collections::{BTreeMap, BTreeSet};
use tidemark_proto::wal::rmgr::XactStatus;
use tidemark_proto::wal::summary::{canonical_table, Transaction};
use tidemark_proto::Lsn;
use time::OffsetDateTime;

pub struct TimelineOptions {
    pub table: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub xid: Option<tidemark_proto::Xid>,
    pub per: Option<String>,
    pub limit: usize,
    pub json: bool,
}

/// Checks the options before anything is read; errors are one line for the user.
pub fn filter_of(options: &TimelineOptions) -> Result<Filter, String> {
    let micros = |text: &Option<String>| -> Result<Option<i64>, String> {
        text.as_deref().map(|t| parse_time(t).map(|t| (t.unix_timestamp_nanos() / 1000) as i64)).transpose()
    };
    Ok(Filter {
        table: options.table.as_deref().map(canonical_table).transpose()?,
        since: micros(&options.since)?,
        until: micros(&options.until)?,
        xid: options.xid.map(|x| x.0),
    })
}

pub fn time_text(micros: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000).map(format_time).unwrap_or_default()
}

fn status_text(status: XactStatus) -> &'static str {
    match status {
        XactStatus::Committed => "committed",
        XactStatus::Aborted => "aborted",
    }
}

pub fn render(audit: &Audit, options: &TimelineOptions, filter: &Filter) -> String {
    if let Some(per) = &options.per {
        // Periods add up every matching transaction, not only the newest ones.
        return render_per_period(&audit.query(filter, None).transactions, per, options.json);
    }
    let page = audit.query(filter, Some(options.limit));
    let (transactions, total) = (page.transactions, page.matched);
    let typical = typical_of_tables(audit, &transactions);
    let unusual = |table: &str, rows: u64| is_unusual(rows, typical.get(table).copied().flatten());
    let points: Vec<_> = audit
        .restore_points()
        .into_iter()
        .filter(|p| filter.since.is_none_or(|s| p.time >= s) && filter.until.is_none_or(|u| p.time <= u))
        .collect();
    if options.json {
        let value = serde_json::json!({
            "transactions": transactions.iter().map(|t| serde_json::json!({
                "xid": t.xid,
                "commit_time": time_text(t.time),
                "lsn": Lsn(t.lsn).to_string(),
                "status": status_text(t.status),
                "timeline": t.timeline,
                "unusual": t.tables.iter().any(|c| unusual(&c.table, c.inserted + c.updated + c.deleted)),
                "tables": t.tables.iter().map(|c| serde_json::json!({
                    "table": c.table,
                    "inserted": c.inserted,
                    "updated": c.updated,
                    "deleted": c.deleted,
                    "unusual": unusual(&c.table, c.inserted + c.updated + c.deleted),
                    "typical_rows": typical.get(&c.table).copied().flatten(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "restore_points": points.iter().map(|p| serde_json::json!({
                "name": p.name, "lsn": Lsn(p.lsn).to_string(), "time": time_text(p.time),
            })).collect::<Vec<_>>(),
            "matched": total,
            "shown": transactions.len(),
            "covered_to_lsn": audit.covered_to.to_string(),
        });
        return format!("{value:#}\n");
    }
    let mut out = String::new();
    out.push_str(&format!(
        "{:<32} {:>10} {:>12} {:<9} {:<36} {:>8} {:>8} {:>8}\n",
        "COMMIT TIME", "XID", "LSN", "STATUS", "TABLE", "INSERTED", "UPDATED", "DELETED"
    ));
    for t in &transactions {
        let head = format!(
            "{:<32} {:>10} {:>12} {:<9}",
            time_text(t.time),
            t.xid,
            Lsn(t.lsn).to_string(),
            status_text(t.status)
        );
        if t.tables.is_empty() {
            out.push_str(&format!("{head} {:<36}\n", "(no table rows)"));
        }
        for (i, c) in t.tables.iter().enumerate() {
            let lead = if i == 0 { head.clone() } else { " ".repeat(head.len()) };
            let rows = c.inserted + c.updated + c.deleted;
            let flag = if unusual(&c.table, rows) {
                format!(
                    "  <- unusual: {rows} rows, typically {}",
                    typical.get(&c.table).copied().flatten().unwrap_or(0)
                )
            } else {
                String::new()
            };
            out.push_str(&format!(
                "{lead} {:<36} {:>8} {:>8} {:>8}{flag}\n",
                c.table, c.inserted, c.updated, c.deleted
            ));
        }
    }
    if total > transactions.len() {
        out.push_str(&format!(
            "({} older transactions not shown; narrow with --since/--until or raise --limit)\n",
            total - transactions.len()
        ));
    }
    for p in &points {
        out.push_str(&format!("restore point {:?} at {} ({})\n", p.name, time_text(p.time), Lsn(p.lsn)));
    }
    out
}

/// What one transaction typically changes in each table `transactions`
/// touch (each table's histogram read once, however many transactions).
pub fn typical_of_tables(audit: &Audit, transactions: &[Transaction]) -> BTreeMap<String, Option<u64>> {
    let tables: BTreeSet<&str> = transactions.iter().flat_map(|t| t.tables.iter().map(|c| c.table.as_str())).collect();
    tables.into_iter().map(|table| (table.to_string(), audit.typical_rows(table))).collect()
}

/// Rows changed per table in each minute or hour.
fn render_per_period(transactions: &[Transaction], per: &str, json: bool) -> String {
    let width: i64 = if per == "hour" { 3_600_000_000 } else { 60_000_000 };
    let mut buckets: BTreeMap<(i64, String), [u64; 4]> = BTreeMap::new();
    for t in transactions.iter().filter(|t| t.status == XactStatus::Committed) {
        for c in &t.tables {
            let entry = buckets.entry((t.time.div_euclid(width) * width, c.table.clone())).or_default();
            entry[0] += 1;
            entry[1] += c.inserted;
            entry[2] += c.updated;
            entry[3] += c.deleted;
        }
    }
    if json {
        let rows: Vec<_> = buckets
            .iter()
            .map(|((start, table), [n, i, u, d])| {
                serde_json::json!({"period_start": time_text(*start), "table": table, "transactions": n,
                    "inserted": i, "updated": u, "deleted": d})
            })
            .collect();
        return format!("{:#}\n", serde_json::json!({ "per": per, "periods": rows }));
    }
    let mut out = format!(
        "{:<32} {:<36} {:>12} {:>8} {:>8} {:>8}\n",
        "PERIOD START", "TABLE", "TRANSACTIONS", "INSERTED", "UPDATED", "DELETED"
    );
    for ((start, table), [n, i, u, d]) in &buckets {
        out.push_str(&format!("{:<32} {:<36} {n:>12} {i:>8} {u:>8} {d:>8}\n", time_text(*start), table));
    }
    out
}
