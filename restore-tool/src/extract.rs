//! `tidemark-restore extract`: tables (or the rows a `--where` picks) as of
//! any target, out of the repository, into a file (CSV, SQL or COPY) or
//! straight into a live database.
//!
//! The rows come from a scratch restore ([`crate::scratch`]). With
//! `--with-dependents`, foreign keys are followed from the chosen rows to
//! the rows that reference them (the profile and attendance rows an
//! `ON DELETE CASCADE` removed with a user), level by level; each table's
//! selection is an SQL condition, so even a million rows cost one query.
//! Into a live database, tables go parents first, in one transaction, and
//! only rows whose key is absent there are inserted.

use crate::rows::{quote_ident, Table};
use crate::scratch::{Scratch, ScratchOptions};
use crate::target::Target;
use anyhow::Context;
use futures::StreamExt;
use std::io::Write;
use std::path::{Path, PathBuf};
use tidemark_repo::{Fail, Repository};
use tokio_postgres::Client;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Csv,
    Sql,
    Copy,
}

pub enum Destination {
    File { path: PathBuf, format: Format },
    Into { url: String },
}

pub struct ExtractOptions {
    /// Canonical table names (`public."User"`).
    pub tables: Vec<String>,
    pub condition: Option<String>,
    pub target: Target,
    /// The database that holds the tables (default: --into's, else postgres).
    pub database: Option<String>,
    pub destination: Destination,
    pub with_dependents: bool,
    pub all_columns_key: bool,
    pub scratch: ScratchOptions,
}

/// One table's share: which rows (an SQL condition on it).
pub struct Selection {
    pub table: String,
    pub condition: String,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Extracted {
    /// Per table, parents first: (table, rows written or inserted, rows skipped as already present).
    pub tables: Vec<(String, u64, u64)>,
    /// What the scratch restore fetched and left out.
    pub fetched_bytes: u64,
    pub left_out_bytes: u64,
}

/// Checks what can be checked before restoring anything.
fn check(options: &ExtractOptions) -> anyhow::Result<()> {
    if options.tables.is_empty() {
        return Err(Fail::new("no --table given", "name the table: --table '\"User\"' (quoted as in SQL)").into());
    }
    if let Destination::File { path, format } = &options.destination {
        if *format == Format::Csv && (options.tables.len() > 1 || options.with_dependents) {
            return Err(Fail::new(
                "CSV holds one table",
                "extract one table to CSV, or use --format sql or copy for several (or --with-dependents)",
            )
            .into());
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(Fail::new(
                format!("{} does not exist", parent.display()),
                "write --to into an existing directory",
            )
            .into());
        }
    }
    Ok(())
}

pub async fn extract(repo: &Repository, repo_url: &str, options: ExtractOptions) -> anyhow::Result<Extracted> {
    check(&options)?;
    // The live side first: its tables must exist with a key.
    let live = match &options.destination {
        Destination::Into { url } => Some(crate::repair::connect_live(url).await?),
        Destination::File { .. } => None,
    };
    let database = match (&options.database, &live) {
        (Some(name), _) => name.clone(),
        (None, Some(live)) => live.query_one("SELECT current_database()::text", &[]).await?.get(0),
        (None, None) => "postgres".to_string(),
    };
    if let Some(live) = &live {
        for table in &options.tables {
            Table::describe(live, table, options.all_columns_key).await.map_err(|e| {
                Fail::new(
                    format!("{e:#}"),
                    "the --into database needs the table, with a primary key (or --all-columns-key)",
                )
            })?;
        }
    }
    // Into the cluster it came from: that database's files alone are fetched.
    let only = match (&live, &options.database) {
        (Some(live), None) => crate::scratch::live_database_oid(repo, live).await,
        _ => None,
    };
    let scratch = Scratch::start(repo, repo_url, options.target.clone(), only, &options.scratch).await?;
    let client = scratch.connect(&database).await?;
    let mut selections: Vec<Selection> = Vec::new();
    for table in &options.tables {
        let described = Table::describe(&client, table, true).await.map_err(|e| {
            Fail::new(
                format!("{e:#} (as of the target)"),
                "`tidemark-restore timeline` shows table names as they are written",
            )
        })?;
        let condition = options.condition.clone().map(|c| format!("({c})")).unwrap_or_else(|| "TRUE".into());
        selections.push(Selection { table: described.name, condition });
    }
    if options.with_dependents {
        selections = with_dependents(&client, selections).await?;
    }
    let result = match &options.destination {
        Destination::File { path, format } => write_file(&client, &selections, path, *format).await,
        Destination::Into { .. } => {
            let live = live.as_ref().context("the live connection")?;
            insert_into(&client, live, &selections, options.all_columns_key).await
        }
    };
    drop(client);
    let (fetched_bytes, left_out_bytes) = (scratch.fetched_bytes, scratch.left_out_bytes);
    drop(scratch);
    result.map(|extracted| Extracted { fetched_bytes, left_out_bytes, ..extracted })
}

/// Adds, level by level, the rows that reference the selected rows through
/// foreign keys; a table reached twice gets both conditions (OR).
async fn with_dependents(client: &Client, roots: Vec<Selection>) -> anyhow::Result<Vec<Selection>> {
    let mut selections = roots;
    let mut next = 0;
    while next < selections.len() {
        if selections.len() > 64 {
            anyhow::bail!("more than 64 tables depend on the chosen rows; extract fewer at once");
        }
        let parent = selections[next].table.clone();
        let parent_condition = selections[next].condition.clone();
        let references = client
            .query(
                "SELECT format('%I.%I', n.nspname, c.relname), \
                 (SELECT array_agg(a.attname::text ORDER BY k.ord) FROM unnest(f.conkey) WITH ORDINALITY k(attnum, ord) \
                  JOIN pg_attribute a ON a.attrelid = f.conrelid AND a.attnum = k.attnum), \
                 (SELECT array_agg(a.attname::text ORDER BY k.ord) FROM unnest(f.confkey) WITH ORDINALITY k(attnum, ord) \
                  JOIN pg_attribute a ON a.attrelid = f.confrelid AND a.attnum = k.attnum) \
                 FROM pg_constraint f JOIN pg_class c ON c.oid = f.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE f.contype = 'f' AND f.confrelid = to_regclass($1) ORDER BY 1",
                &[&parent],
            )
            .await
            .with_context(|| format!("read the foreign keys referencing {parent}"))?;
        for reference in references {
            let child: String = reference.get(0);
            if child == parent {
                continue; // a table referencing itself: its own rows are already chosen by the condition
            }
            let columns: Vec<String> = reference.get(1);
            let parent_columns: Vec<String> = reference.get(2);
            let list = |names: &[String]| names.iter().map(|n| quote_ident(n)).collect::<Vec<_>>().join(", ");
            let condition = format!(
                "(({}) IN (SELECT {} FROM {parent} WHERE {parent_condition}))",
                list(&columns),
                list(&parent_columns)
            );
            match selections.iter_mut().find(|s| s.table == child) {
                Some(existing) if existing.condition.contains(&condition) => {}
                Some(existing) => existing.condition = format!("({} OR {condition})", existing.condition),
                None => selections.push(Selection { table: child, condition }),
            }
        }
        next += 1;
    }
    Ok(selections)
}

/// Writes the selections to a temporary file beside `path`, fsyncs it and
/// renames it into place.
async fn write_file(
    client: &Client,
    selections: &[Selection],
    path: &Path,
    format: Format,
) -> anyhow::Result<Extracted> {
    let temporary = path.with_file_name(format!(
        ".{}.tidemark-{}",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let mut file = std::io::BufWriter::new(
        tidemark_repo::durable::create_exclusive(&temporary)
            .with_context(|| format!("create {}", temporary.display()))?,
    );
    let written = async {
        let mut extracted = Extracted::default();
        if format != Format::Csv {
            // The file is UTF-8 (the scratch session's encoding): psql must
            // read it as such, whatever PGCLIENTENCODING says.
            writeln!(file, "SET client_encoding = 'UTF8';")?;
        }
        if format == Format::Sql {
            writeln!(file, "BEGIN;")?;
        }
        for selection in selections {
            let table = Table::describe(client, &selection.table, true).await?;
            let columns: Vec<String> =
                table.columns.iter().filter(|c| !c.generated).map(|c| quote_ident(&c.name)).collect();
            let select = format!("SELECT {} FROM {} WHERE {}", columns.join(", "), table.name, selection.condition);
            let rows = match format {
                Format::Csv => {
                    copy_out(client, &format!("COPY ({select}) TO STDOUT WITH (FORMAT csv, HEADER)"), &mut file).await?
                }
                Format::Copy => {
                    writeln!(file, "COPY {} ({}) FROM stdin;", table.name, columns.join(", "))?;
                    let rows = copy_out(client, &format!("COPY ({select}) TO STDOUT"), &mut file).await?;
                    writeln!(file, "\\.")?;
                    rows
                }
                Format::Sql => {
                    let rows = table.rows_where(client, &selection.condition).await?;
                    for (_, values) in &rows {
                        writeln!(file, "{}", table.insert_sql(values))?;
                    }
                    rows.len() as u64
                }
            };
            extracted.tables.push((table.name.clone(), rows, 0));
        }
        if format == Format::Sql {
            writeln!(file, "COMMIT;")?;
        }
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok::<_, anyhow::Error>(extracted)
    }
    .await;
    match written {
        Ok(extracted) => {
            std::fs::rename(&temporary, path).with_context(|| format!("rename into {}", path.display()))?;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                tidemark_repo::durable::fsync_dir(parent).with_context(|| format!("fsync {}", parent.display()))?;
            }
            Ok(extracted)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&temporary);
            Err(e)
        }
    }
}

/// Streams a `COPY ... TO STDOUT` into `out`; returns the data lines (rows,
/// plus a CSV header).
async fn copy_out(client: &Client, copy: &str, out: &mut impl Write) -> anyhow::Result<u64> {
    let stream = client.copy_out(copy).await.with_context(|| copy.to_string())?;
    futures::pin_mut!(stream);
    let mut lines = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        out.write_all(&chunk)?;
    }
    Ok(lines)
}

/// Inserts, parents first and in one transaction, every selected row whose
/// key the live table does not have.
async fn insert_into(
    scratch: &Client,
    live: &Client,
    selections: &[Selection],
    all_columns_key: bool,
) -> anyhow::Result<Extracted> {
    let work = async {
        let mut extracted = Extracted::default();
        for selection in selections {
            let table = Table::describe(live, &selection.table, all_columns_key).await.map_err(|e| {
                Fail::new(format!("{e:#}"), "the --into database needs every table the rows go to, each with a key")
            })?;
            let source = Table::describe(scratch, &selection.table, true).await?;
            if source.columns != table.columns {
                anyhow::bail!("{} has other columns in the --into database than as of the target", table.name);
            }
            let (mut inserted, mut present) = (0u64, 0u64);
            for (_, values) in table.rows_where(scratch, &selection.condition).await? {
                if table.row_like(live, &values, false).await?.is_some() {
                    present += 1;
                    continue;
                }
                live.execute(table.insert_sql(&values).as_str(), &[])
                    .await
                    .with_context(|| format!("insert into {}", table.name))?;
                inserted += 1;
            }
            extracted.tables.push((table.name.clone(), inserted, present));
        }
        Ok(extracted)
    };
    crate::rows::in_transaction(live, work).await
}
