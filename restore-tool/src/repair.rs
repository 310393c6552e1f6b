//! `tidemark-restore repair --xid N`: undo one transaction in the live
//! database, and nothing else.
//!
//! 1. From the WAL: the exact heap tuples N (and its committed
//!    subtransactions) inserted, updated and deleted, by block and offset
//!    ([`tidemark_proto::wal::rmgr::parse_tuple_changes`]), netted per row
//!    (a row N inserted and then updated is one insert).
//! 2. From a scratch restore paused just before N: those rows' old values;
//!    moved on to just after N: the values N left.
//! 3. Against the live database, by key: deleted by N → insert it back;
//!    updated by N → set the old values back; inserted by N → delete it.
//!    A row that changed again since N is a conflict: shown with both
//!    versions and left alone unless `--on-conflict ours` (write the old
//!    values anyway) or `theirs` (keep the live row, quietly).
//!
//! The repair is ordinary DML in one transaction: constraints and triggers
//! of the live database apply. Each row is locked and checked again just
//! before it is written; a row that moved meanwhile aborts the whole repair.

use crate::audit::{Audit, Filter};
use crate::rows::{Table, Values};
use crate::scratch::{Scratch, ScratchOptions};
use crate::target::Target;
use anyhow::Context;
use std::collections::{BTreeMap, HashMap};
use tidemark_proto::wal::page::major_for_magic;
use tidemark_proto::wal::record::RelFileLocator;
use tidemark_proto::wal::rmgr::{self, Tid, TupleChange, XactStatus};
use tidemark_proto::wal::summary::Transaction;
use tidemark_proto::wal::{self, WalReader};
use tidemark_proto::{Lsn, TimelineId, Xid};
use tidemark_repo::catalog::Catalog;
use tidemark_repo::{Fail, Repository};
use tokio_postgres::Client;

/// What one row ends up as after N, relative to before N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    Inserted { new: Tid },
    Updated { old: Tid, new: Tid },
    Deleted { old: Tid },
}

/// Nets a transaction's tuple changes (in WAL order) per row: follows each
/// row from its version before the transaction to its version after it.
pub fn net_effect(changes: &[TupleChange]) -> Vec<(RelFileLocator, Net)> {
    #[derive(Clone, Copy)]
    enum Origin {
        Existing(Tid),
        New,
    }
    // Current version of a row -> where it came from.
    let mut live: HashMap<(RelFileLocator, Tid), Origin> = HashMap::new();
    let mut deleted: Vec<(RelFileLocator, Tid)> = Vec::new();
    for change in changes {
        match *change {
            TupleChange::Insert { rel, new } => {
                live.insert((rel, new), Origin::New);
            }
            TupleChange::Update { rel, old, new } => {
                let origin = live.remove(&(rel, old)).unwrap_or(Origin::Existing(old));
                live.insert((rel, new), origin);
            }
            TupleChange::Delete { rel, old } => match live.remove(&(rel, old)).unwrap_or(Origin::Existing(old)) {
                Origin::Existing(original) => deleted.push((rel, original)),
                Origin::New => {} // inserted and deleted by the same transaction
            },
        }
    }
    let mut net: Vec<(RelFileLocator, Net)> =
        deleted.into_iter().map(|(rel, old)| (rel, Net::Deleted { old })).collect();
    for ((rel, current), origin) in live {
        net.push(match origin {
            Origin::Existing(old) => (rel, Net::Updated { old, new: current }),
            Origin::New => (rel, Net::Inserted { new: current }),
        });
    }
    net.sort_by_key(|(rel, n)| {
        let tid = match n {
            Net::Inserted { new } | Net::Updated { new, .. } => *new,
            Net::Deleted { old } => *old,
        };
        (rel.relfilenode, tid)
    });
    net
}

/// What N did, from the WAL.
pub struct Found {
    pub transaction: Transaction,
    pub changes: Vec<TupleChange>,
}

/// The committed transaction `xid` and its tuple changes, decoded from the
/// repository's WAL: segments back from its commit, twice as many each
/// round, until the changes of N and its subtransactions account for every
/// row the audit counted (catalog changes, which the audit leaves out, may
/// come on top).
pub async fn find(repo: &Repository, catalog: &Catalog, audit: &Audit, xid: Xid) -> anyhow::Result<Found> {
    let found = audit.query(&Filter { xid: Some(xid.0), ..Default::default() }, None).transactions;
    let transaction = found.into_iter().rev().find(|t| t.status == XactStatus::Committed).ok_or_else(|| {
        Fail::new(
            format!("transaction {xid} has no commit in the archived WAL"),
            "`tidemark-restore timeline` lists the archived transactions",
        )
    })?;
    let counted: u64 = transaction.tables.iter().map(|t| t.inserted + t.updated + t.deleted).sum();
    let size = repo.meta().await?.wal_segment_size;
    let steps = tidemark_repo::catalog::history(&catalog.timelines, TimelineId(transaction.timeline))
        .context("the transaction's timeline has no history in the repository")?;
    let commit = Lsn(transaction.lsn);
    let mut back = 1u64;
    loop {
        let start = Lsn(commit.segment_start(size).0.saturating_sub(back * size));
        let (changes, subxacts) = decode_range(repo, &steps, start, commit, size).await?;
        let mut xids = subxacts;
        xids.push(xid.0);
        let ours: Vec<(u32, TupleChange)> = changes.into_iter().filter(|(x, _)| xids.contains(x)).collect();
        let user_rows = ours.iter().filter(|(_, c)| rel_of(c).relfilenode >= 16384).count() as u64;
        if user_rows >= counted || start == Lsn(0) {
            return Ok(Found { transaction, changes: ours.into_iter().map(|(_, c)| c).collect() });
        }
        back *= 2;
    }
}

fn rel_of(change: &TupleChange) -> RelFileLocator {
    match change {
        TupleChange::Insert { rel, .. } | TupleChange::Update { rel, .. } | TupleChange::Delete { rel, .. } => *rel,
    }
}

/// Tuple changes (with the xid that made each) from `start` to `commit`,
/// and the subtransactions the commit record at `commit` names.
async fn decode_range(
    repo: &Repository,
    steps: &[tidemark_repo::catalog::Step],
    start: Lsn,
    commit: Lsn,
    size: u64,
) -> anyhow::Result<(Vec<(u32, TupleChange)>, Vec<u32>)> {
    let mut reader = WalReader::new(start, size);
    let mut changes: Vec<(u32, TupleChange)> = Vec::new();
    let mut subxacts = Vec::new();
    for segment in tidemark_repo::catalog::segments_along(steps, start, commit, size) {
        let (bytes, _) = crate::wal_get::segment_bytes(repo, segment, size).await?.ok_or_else(|| {
            Fail::new(
                format!("WAL segment {} is not in the repository", segment.file_name(size)),
                "`tidemark-restore list` shows the archived WAL",
            )
        })?;
        let Some(major) = bytes.get(..2).and_then(|b| major_for_magic(u16::from_le_bytes([b[0], b[1]]))) else {
            anyhow::bail!("WAL segment {} has no page header PostgreSQL 13-18 writes", segment.file_name(size));
        };
        let (r, c, s) = tokio::task::spawn_blocking(move || {
            let (mut changes, mut subxacts) = (changes, subxacts);
            reader.feed(&bytes, |raw| {
                let Ok(record) = wal::decode(raw.lsn, raw.end, raw.bytes, major) else { return };
                if record.lsn > commit {
                    return;
                }
                if record.lsn == commit {
                    if let Some(end) = rmgr::parse_xact_end(&record, major) {
                        subxacts = end.subxacts;
                    }
                }
                let xid = record.xid;
                changes.extend(rmgr::parse_tuple_changes(&record).into_iter().map(|c| (xid, c)));
            });
            (reader, changes, subxacts)
        })
        .await
        .context("join the WAL decoder")?;
        (reader, changes, subxacts) = (r, c, s);
    }
    Ok((changes, subxacts))
}

/// How conflicts are settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnConflict {
    /// Report them and leave the live rows (the default).
    Report,
    /// Keep the live rows without reporting each.
    Theirs,
    /// Write the old values over the live rows.
    Ours,
}

/// One statement of the repair and what it was planned against.
pub struct Step {
    pub table: usize,
    /// The live row as it was when planned (None: absent).
    pub live: Option<Values>,
    /// The row whose key finds the live row.
    pub key_of: Values,
    pub sql: String,
    /// A line for people: `public."User" id=7: insert back (deleted by 742)`.
    pub text: String,
}

pub struct Conflict {
    pub text: String,
    pub left_by_n: Option<Values>,
    pub live: Option<Values>,
    pub table: usize,
}

pub struct Plan {
    pub xid: Xid,
    pub tables: Vec<Table>,
    pub steps: Vec<Step>,
    pub conflicts: Vec<Conflict>,
    /// Rows already as they were before N (nothing to do).
    pub already: usize,
    /// Changes N made in other databases or system tables, left alone.
    pub ignored: Vec<String>,
    /// N's commit time, for people.
    pub committed: String,
    /// What the scratch restore fetched.
    pub scratch: String,
}

pub struct RepairOptions {
    pub xid: Xid,
    /// Only this table (canonical name).
    pub table: Option<String>,
    /// The live database (`postgresql://...`).
    pub into: String,
    pub on_conflict: OnConflict,
    pub all_columns_key: bool,
    pub apply: bool,
    pub scratch: ScratchOptions,
}

/// What `--apply` did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Applied {
    pub inserted: usize,
    pub updated: usize,
    pub deleted: usize,
}

/// A session on the live database, in the canonical output style. The
/// connection string is libpq's (URL or key=value, `PG*` variables, a
/// service, `~/.pgpass`, sslmode up to verify-full, channel binding).
pub async fn connect_live(conninfo: &str) -> anyhow::Result<Client> {
    let params = tidemark_pg::settings::resolve(Some(conninfo))
        .map_err(|e| Fail::new(format!("--into: {}", e.message), e.hint))?;
    let client = tidemark_pg::sql::connect(&params).await.map_err(|e| {
        Fail::new(format!("cannot connect to the --into database ({}): {e}", params.redacted()), live_hint(&e))
    })?;
    crate::rows::canonical_session(&client).await?;
    Ok(client)
}

/// What to do when the live database cannot be reached.
fn live_hint(error: &tidemark_pg::PgError) -> String {
    use tidemark_pg::PgError;
    match error {
        PgError::Connect { .. } => "is the server running and listening there? check --into, PGHOST and PGPORT".into(),
        PgError::Tls(_) => {
            "check sslmode, sslrootcert (a file, or system), sslcert and sslkey; verify-full needs the server's name in its certificate".into()
        }
        PgError::Auth(_) => {
            "give the password through PGPASSWORD, ~/.pgpass or a service (PGSERVICE), not in the URL where ps shows it".into()
        }
        PgError::Server(e) if e.code == "28P01" => "check the password (PGPASSWORD, ~/.pgpass or the service)".into(),
        PgError::Server(e) if e.code == "28000" => "the server's pg_hba.conf refuses this connection: check the user, address and sslmode".into(),
        _ => "check the connection string given with --into".into(),
    }
}

/// Plans the repair (and applies it with `apply`).
pub async fn repair(
    repo: &Repository,
    repo_url: &str,
    options: &RepairOptions,
) -> anyhow::Result<(Plan, Option<Applied>)> {
    // The live side is checked before anything is restored.
    let live = connect_live(&options.into).await?;
    let database: String = live.query_one("SELECT current_database()::text", &[]).await?.get(0);
    let catalog = Catalog::load(repo).await?;
    let audit = Audit::load(repo, &catalog, options.scratch.cache_dir.as_deref()).await?;
    let found = find(repo, &catalog, &audit, options.xid).await?;
    drop(audit);
    let net = net_effect(&found.changes);
    let only = crate::scratch::live_database_oid(repo, &live).await;
    let scratch = Scratch::start(repo, repo_url, Target::BeforeXid(options.xid), only, &options.scratch).await?;
    let before = scratch.connect(&database).await?;
    let (mut tables, grouped, ignored) = tables_of(&before, &live, &net, options).await?;
    let mut olds: BTreeMap<usize, HashMap<String, Values>> = BTreeMap::new();
    for (index, changes) in &grouped {
        let tids: Vec<String> = changes.iter().filter_map(old_tid).map(|t| t.to_string()).collect();
        olds.insert(*index, tables[*index].rows_at(&before, &tids).await?.into_iter().collect());
    }
    drop(before);
    scratch.advance_to_xid(options.xid.0, options.scratch.wait_timeout).await?;
    let after = scratch.connect(&database).await?;
    let mut news: BTreeMap<usize, HashMap<String, Values>> = BTreeMap::new();
    for (index, changes) in &grouped {
        let tids: Vec<String> = changes.iter().filter_map(new_tid).map(|t| t.to_string()).collect();
        news.insert(*index, tables[*index].rows_at(&after, &tids).await?.into_iter().collect());
    }
    drop(after);
    let scratch_summary = scratch.summary();
    drop(scratch);
    let committed = crate::audit_report::time_text(found.transaction.time);
    let mut plan = Plan {
        xid: options.xid,
        tables: Vec::new(),
        steps: Vec::new(),
        conflicts: Vec::new(),
        already: 0,
        ignored,
        committed,
        scratch: scratch_summary,
    };
    for (index, changes) in &grouped {
        let (old_rows, new_rows) = (&olds[index], &news[index]);
        for change in changes {
            let row = |rows: &HashMap<String, Values>, tid: Option<Tid>| -> anyhow::Result<Option<Values>> {
                let Some(tid) = tid else { return Ok(None) };
                rows.get(&tid.to_string()).cloned().map(Some).ok_or_else(|| {
                    anyhow::anyhow!("row {tid} of {} is missing from the scratch restore", tables[*index].name)
                })
            };
            let (old, new) = (row(old_rows, old_tid(change))?, row(new_rows, new_tid(change))?);
            plan_row(&mut plan, &tables[*index], *index, &live, old, new, options.on_conflict).await?;
        }
    }
    plan.tables = std::mem::take(&mut tables);
    let applied = if options.apply { Some(apply(&live, &plan).await?) } else { None };
    Ok((plan, applied))
}

fn old_tid(net: &Net) -> Option<Tid> {
    match net {
        Net::Updated { old, .. } | Net::Deleted { old } => Some(*old),
        Net::Inserted { .. } => None,
    }
}

fn new_tid(net: &Net) -> Option<Tid> {
    match net {
        Net::Updated { new, .. } | Net::Inserted { new } => Some(*new),
        Net::Deleted { .. } => None,
    }
}

type Grouped = BTreeMap<usize, Vec<Net>>;

/// The tables N changed (named in the scratch restore, described from the
/// live database, which must have the same columns), N's row changes per
/// table, and what is left alone.
async fn tables_of(
    scratch: &Client,
    live: &Client,
    net: &[(RelFileLocator, Net)],
    options: &RepairOptions,
) -> anyhow::Result<(Vec<Table>, Grouped, Vec<String>)> {
    let database_oid: u32 =
        scratch.query_one("SELECT oid FROM pg_database WHERE datname = current_database()", &[]).await?.get(0);
    let mut names: HashMap<u32, Option<String>> = HashMap::new();
    let (mut tables, mut grouped, mut ignored): (Vec<Table>, Grouped, Vec<String>) = Default::default();
    let mut other_databases = BTreeMap::new();
    for (rel, change) in net {
        if rel.database != database_oid {
            *other_databases.entry(rel.database).or_insert(0usize) += 1;
            continue;
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = names.entry(rel.relfilenode) {
            let row = scratch
                .query_opt(
                    "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE pg_relation_filenode(c.oid) = $1 AND c.relkind = 'r' \
                     AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')",
                    &[&rel.relfilenode],
                )
                .await?;
            slot.insert(row.map(|r| r.get(0)));
        }
        let Some(name) = names[&rel.relfilenode].clone() else { continue };
        if options.table.as_ref().is_some_and(|wanted| *wanted != name) {
            continue;
        }
        let index = match tables.iter().position(|t| t.name == name) {
            Some(index) => index,
            None => {
                let live_table = Table::describe(live, &name, options.all_columns_key).await.map_err(|e| {
                    Fail::new(format!("{e:#}"), "the live database must have the table N changed, with a key")
                })?;
                let scratch_table = Table::describe(scratch, &name, true).await?;
                if scratch_table.columns != live_table.columns {
                    return Err(Fail::new(
                        format!(
                            "{name} has other columns in the live database than when transaction {} ran",
                            options.xid
                        ),
                        "a repair writes whole rows; undo the schema change first, or use extract",
                    )
                    .into());
                }
                tables.push(live_table);
                tables.len() - 1
            }
        };
        grouped.entry(index).or_default().push(*change);
    }
    for (oid, rows) in other_databases {
        ignored.push(format!(
            "{rows} row changes in another database (OID {oid}): repair runs on one database, the --into one"
        ));
    }
    if grouped.is_empty() {
        return Err(Fail::new(
            format!(
                "transaction {} changed no rows of a user table in database {database_oid} that repair can undo",
                options.xid
            ),
            "check --xid, --table and the database in --into (`tidemark-restore timeline --xid N` shows its changes)",
        )
        .into());
    }
    Ok((tables, grouped, ignored))
}

/// One row to decide about: before N (None: N inserted it), as N left it
/// (None: N deleted it), and live now (None: absent), found by the key N
/// left (or, for a row N deleted, its old key).
struct RowCase<'a> {
    table: &'a Table,
    index: usize,
    xid: Xid,
    who: String,
    now: Option<Values>,
}

impl RowCase<'_> {
    fn step(&self, sql: String, what: &str, key_of: &Values) -> Step {
        Step {
            table: self.index,
            live: self.now.clone(),
            key_of: key_of.clone(),
            sql,
            text: format!("{} {}: {what}", self.table.name, self.who),
        }
    }

    fn conflict(&self, what: &str, left_by_n: Option<&Values>) -> Conflict {
        Conflict {
            text: format!("{} {}: {what} after transaction {}", self.table.name, self.who, self.xid),
            left_by_n: left_by_n.cloned(),
            live: self.now.clone(),
            table: self.index,
        }
    }
}

/// Decides what to do about one row (see [`RowCase`]).
async fn plan_row(
    plan: &mut Plan,
    table: &Table,
    index: usize,
    live: &Client,
    old: Option<Values>,
    new: Option<Values>,
    on_conflict: OnConflict,
) -> anyhow::Result<()> {
    let key_of = new.clone().or(old.clone()).unwrap_or_default();
    let now = table.row_like(live, &key_of, false).await?;
    let case = RowCase { table, index, xid: plan.xid, who: table.describe_key(&key_of), now };
    match (&old, &new) {
        (Some(old), None) => deleted_by_n(plan, &case, old, on_conflict),
        (None, Some(new)) => inserted_by_n(plan, &case, new, on_conflict),
        (Some(old), Some(new)) => updated_by_n(plan, &case, old, new, on_conflict),
        (None, None) => {}
    }
    Ok(())
}

fn deleted_by_n(plan: &mut Plan, case: &RowCase<'_>, old: &Values, on_conflict: OnConflict) {
    let table = case.table;
    match (&case.now, on_conflict) {
        (None, _) => {
            plan.steps.push(case.step(table.insert_sql(old), &format!("insert back (deleted by {})", case.xid), old))
        }
        (Some(now), _) if now == old => plan.already += 1,
        (Some(_), OnConflict::Ours) => {
            plan.steps.push(case.step(table.update_sql(old, old), "overwrite with the row as it was deleted", old))
        }
        (Some(_), OnConflict::Theirs) => {}
        (Some(_), OnConflict::Report) => plan.conflicts.push(case.conflict("inserted again", None)),
    }
}

fn inserted_by_n(plan: &mut Plan, case: &RowCase<'_>, new: &Values, on_conflict: OnConflict) {
    let table = case.table;
    match (&case.now, on_conflict) {
        (None, _) => plan.already += 1,
        (Some(now), _) if now == new => {
            plan.steps.push(case.step(table.delete_sql(new), &format!("delete (inserted by {})", case.xid), new))
        }
        (Some(_), OnConflict::Ours) => {
            plan.steps.push(case.step(table.delete_sql(new), "delete although changed since it was inserted", new))
        }
        (Some(_), OnConflict::Theirs) => {}
        (Some(_), OnConflict::Report) => plan.conflicts.push(case.conflict("changed", Some(new))),
    }
}

fn updated_by_n(plan: &mut Plan, case: &RowCase<'_>, old: &Values, new: &Values, on_conflict: OnConflict) {
    let table = case.table;
    match (&case.now, on_conflict) {
        (Some(now), _) if now == new => {
            let diff: Vec<String> =
                table.differences(new, old).iter().map(|(c, from, to)| format!("{c}: {from} -> {to}")).collect();
            plan.steps.push(case.step(table.update_sql(new, old), &format!("set back {}", diff.join(", ")), new));
        }
        (Some(now), _) if now == old => plan.already += 1,
        (Some(_), OnConflict::Ours) => {
            plan.steps.push(case.step(table.update_sql(new, old), "set back although changed since", new))
        }
        (None, OnConflict::Ours) => {
            plan.steps.push(case.step(table.insert_sql(old), "insert back although deleted since", new))
        }
        (_, OnConflict::Theirs) => {}
        (None, OnConflict::Report) => plan.conflicts.push(case.conflict("deleted", Some(new))),
        (Some(_), OnConflict::Report) => plan.conflicts.push(case.conflict("updated again", Some(new))),
    }
}

/// Runs the plan in one transaction: each row locked and checked against
/// what was planned, each statement touching exactly one row.
async fn apply(live: &Client, plan: &Plan) -> anyhow::Result<Applied> {
    let work = async {
        let mut applied = Applied::default();
        for step in &plan.steps {
            let table = &plan.tables[step.table];
            let now = table.row_like(live, &step.key_of, true).await?;
            if now != step.live {
                return Err(Fail::new(
                    format!("{}: the row changed while the repair was planned; nothing was changed", step.text),
                    "run the repair again",
                )
                .into());
            }
            let rows = live.execute(step.sql.as_str(), &[]).await.with_context(|| step.sql.clone())?;
            anyhow::ensure!(rows == 1, "{} changed {rows} rows instead of one; nothing was changed", step.sql);
            match step.sql.split_whitespace().next() {
                Some("INSERT") => applied.inserted += 1,
                Some("UPDATE") => applied.updated += 1,
                _ => applied.deleted += 1,
            }
        }
        Ok(applied)
    };
    crate::rows::in_transaction(live, work).await
}

/// The dry run (or the record of an apply): what changes, the conflicts
/// with both versions, and the SQL script.
pub fn render(plan: &Plan, applied: Option<&Applied>) -> String {
    let mut out = format!(
        "transaction {} (committed {}): {} rows to put back, {} conflicts, {} already as before\n",
        plan.xid,
        plan.committed,
        plan.steps.len(),
        plan.conflicts.len(),
        plan.already
    );
    for step in &plan.steps {
        out.push_str(&format!("  {}\n", step.text));
    }
    if !plan.conflicts.is_empty() {
        out.push_str(
            "conflicts (left as they are; --on-conflict ours overwrites them, theirs keeps them without this list):\n",
        );
    }
    for conflict in &plan.conflicts {
        let table = &plan.tables[conflict.table];
        out.push_str(&format!("  {}\n", conflict.text));
        let show = |row: &Option<Values>| match row {
            None => "(no row)".to_string(),
            Some(values) => table
                .columns
                .iter()
                .zip(values)
                .map(|(c, v)| {
                    format!("{}={}", c.name, v.as_deref().map(|t| format!("'{t}'")).unwrap_or_else(|| "NULL".into()))
                })
                .collect::<Vec<_>>()
                .join(" "),
        };
        out.push_str(&format!(
            "    as {} left it: {}\n    live now:       {}\n",
            plan.xid,
            show(&conflict.left_by_n),
            show(&conflict.live)
        ));
    }
    for note in &plan.ignored {
        out.push_str(&format!("left alone: {note}\n"));
    }
    out.push_str(&format!("({})\n", plan.scratch));
    match applied {
        Some(a) => out.push_str(&format!(
            "applied in one transaction: {} rows inserted back, {} updated back, {} deleted; {} conflicts left\n",
            a.inserted,
            a.updated,
            a.deleted,
            plan.conflicts.len()
        )),
        None => {
            out.push_str("-- the SQL that --apply runs (in one transaction, each row checked first):\nBEGIN;\n");
            for step in &plan.steps {
                out.push_str(&step.sql);
                out.push('\n');
            }
            out.push_str("COMMIT;\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_net_per_row() {
        let rel = RelFileLocator { tablespace: 1663, database: 5, relfilenode: 16384 };
        let t = |block, offset| Tid { block, offset };
        let changes = [
            // updated twice: one net update from the first old to the last new version
            TupleChange::Update { rel, old: t(0, 1), new: t(0, 9) },
            TupleChange::Update { rel, old: t(0, 9), new: t(1, 2) },
            // inserted then updated: a net insert of the last version
            TupleChange::Insert { rel, new: t(1, 3) },
            TupleChange::Update { rel, old: t(1, 3), new: t(1, 4) },
            // inserted then deleted: nothing
            TupleChange::Insert { rel, new: t(1, 5) },
            TupleChange::Delete { rel, old: t(1, 5) },
            // updated then deleted: a net delete of the original
            TupleChange::Update { rel, old: t(0, 3), new: t(1, 6) },
            TupleChange::Delete { rel, old: t(1, 6) },
        ];
        let net: Vec<Net> = net_effect(&changes).into_iter().map(|(_, n)| n).collect();
        assert_eq!(
            net,
            vec![
                Net::Deleted { old: t(0, 3) },
                Net::Updated { old: t(0, 1), new: t(1, 2) },
                Net::Inserted { new: t(1, 4) }
            ]
        );
    }
}
