//! Rows as text, for `extract` and `repair`: a table's columns and key,
//! rows read by `ctid` or by key, and the INSERT/UPDATE/DELETE statements
//! that write them back. Every value travels in PostgreSQL's text form
//! (`col::text`) and goes back as `'text'::type`, the round trip COPY
//! relies on, so any type (enums, arrays, `timestamp(3)`, bytea, JSON)
//! comes back byte for byte. Sessions use one fixed output style
//! ([`canonical_session`]) so two servers' texts compare equal.

use anyhow::Context;
use tokio_postgres::Client;

/// A column as written back: name, SQL type, and whether it can be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// `format_type` of the column: `timestamp(3) without time zone`, `"Status"`.
    pub type_sql: String,
    /// A generated column: read and compared, never written.
    pub generated: bool,
    /// GENERATED ALWAYS AS IDENTITY: an INSERT must say OVERRIDING SYSTEM VALUE.
    pub identity_always: bool,
}

/// How rows of a table are told apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Primary,
    /// A unique index on NOT NULL columns.
    UniqueNotNull,
    /// Every column (`--all-columns-key`): rows equal in all columns are one.
    AllColumns,
}

#[derive(Clone, Debug)]
pub struct Table {
    /// Schema-qualified and quoted as PostgreSQL needs it.
    pub name: String,
    pub columns: Vec<Column>,
    /// Indexes into `columns`.
    pub key: Vec<usize>,
    pub key_kind: KeyKind,
}

/// One row: each column's text, `None` for NULL, in column order.
pub type Values = Vec<Option<String>>;

/// An identifier, double-quoted (inner quotes doubled).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A value as an SQL literal of its column's type.
pub fn literal(value: &Option<String>, column: &Column) -> String {
    match value {
        None => "NULL".to_string(),
        Some(text) => format!("{}::{}", string_literal(text), column.type_sql),
    }
}

/// A string constant that means `text` on any server, whatever its
/// `standard_conforming_strings`: with it off, a backslash in `'...'`
/// escapes what follows (a value ending in `\` would swallow the closing
/// quote and turn the next value into SQL). Text holding a backslash is
/// therefore written as an escape string, `E'...'`, where backslashes are
/// always escapes and are doubled; other text as `'...'`, which reads the
/// same under both settings. Quotes are doubled in both. (This holds in
/// client encodings where `\` and `'` are never part of a multibyte
/// character, such as UTF-8, which tokio-postgres sessions use and
/// extract's SQL files set.)
pub fn string_literal(text: &str) -> String {
    let quoted = text.replace('\'', "''");
    if text.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// The same text output on every server the tools compare: ISO dates in
/// UTC, floats exact, bytea in hex.
pub async fn canonical_session(client: &Client) -> anyhow::Result<()> {
    client
        .batch_execute(
            "SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres'; \
             SET extra_float_digits = 3; SET bytea_output = 'hex'",
        )
        .await
        .context("set the session's output style")
}

/// Runs `work` inside BEGIN ... COMMIT on `client`, or rolls back when it
/// fails: the live database sees all of it or none.
pub async fn in_transaction<T>(
    client: &Client,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    client.batch_execute("BEGIN").await.context("begin a transaction")?;
    match work.await {
        Ok(done) => {
            client.batch_execute("COMMIT").await.context("commit")?;
            Ok(done)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

impl Table {
    /// Reads `name`'s columns and key; without a key (and without
    /// `all_columns_key`) the table is refused with the way out named.
    pub async fn describe(client: &Client, name: &str, all_columns_key: bool) -> anyhow::Result<Table> {
        let row = client.query_one("SELECT to_regclass($1)::oid", &[&name]).await?;
        let oid: Option<u32> = row.get(0);
        let oid = oid.ok_or_else(|| anyhow::anyhow!("there is no table {name}"))?;
        let columns: Vec<Column> = client
            .query(
                "SELECT attname::text, format_type(atttypid, atttypmod), attgenerated <> '', attidentity = 'a' \
                 FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| Column { name: r.get(0), type_sql: r.get(1), generated: r.get(2), identity_always: r.get(3) })
            .collect();
        // Primary key first, then unique indexes whose columns are all NOT NULL.
        let keys = client
            .query(
                "SELECT i.indisprimary, bool_and(a.attnotnull), array_agg(a.attname::text ORDER BY k.ord) \
                 FROM pg_index i, unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord), pg_attribute a \
                 WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indexprs IS NULL \
                 AND i.indpred IS NULL AND a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 GROUP BY i.indexrelid, i.indisprimary ORDER BY i.indisprimary DESC, i.indexrelid",
                &[&oid],
            )
            .await?;
        let chosen = keys.iter().find(|r| r.get::<_, bool>(0) || r.get::<_, bool>(1));
        let (key_kind, key_names): (KeyKind, Vec<String>) = match chosen {
            Some(r) if r.get::<_, bool>(0) => (KeyKind::Primary, r.get(2)),
            Some(r) => (KeyKind::UniqueNotNull, r.get(2)),
            None if all_columns_key => (KeyKind::AllColumns, columns.iter().map(|c| c.name.clone()).collect()),
            None => anyhow::bail!(
                "table {name} has no primary key and no unique index on NOT NULL columns, so its rows cannot be \
                 told apart; pass --all-columns-key to treat rows equal in every column as the same row"
            ),
        };
        let key = key_names.iter().filter_map(|k| columns.iter().position(|c| &c.name == k)).collect();
        Ok(Table { name: name.to_string(), columns, key, key_kind })
    }

    /// `ctid::text, col1::text, ...` for a SELECT.
    fn select_list(&self) -> String {
        let mut list = vec!["ctid::text".to_string()];
        list.extend(self.columns.iter().map(|c| format!("{}::text", quote_ident(&c.name))));
        list.join(", ")
    }

    /// Rows at these ctids: (ctid, values).
    pub async fn rows_at(&self, client: &Client, ctids: &[String]) -> anyhow::Result<Vec<(String, Values)>> {
        let sql = format!("SELECT {} FROM {} WHERE ctid = ANY($1::text[]::tid[])", self.select_list(), self.name);
        let rows = client.query(&sql, &[&ctids]).await.with_context(|| format!("read rows of {}", self.name))?;
        Ok(rows.iter().map(|r| (r.get(0), (1..r.len()).map(|i| r.get(i)).collect())).collect())
    }

    /// Rows matching an SQL condition (`TRUE` for all): (ctid, values).
    pub async fn rows_where(&self, client: &Client, condition: &str) -> anyhow::Result<Vec<(String, Values)>> {
        let sql = format!("SELECT {} FROM {} WHERE {condition}", self.select_list(), self.name);
        let rows =
            client.query(&sql, &[]).await.with_context(|| format!("read rows of {} where {condition}", self.name))?;
        Ok(rows.iter().map(|r| (r.get(0), (1..r.len()).map(|i| r.get(i)).collect())).collect())
    }

    /// The row with `row`'s key, as it is now (locked with `FOR UPDATE`
    /// when asked); the first of them when the key is all columns.
    pub async fn row_like(&self, client: &Client, row: &Values, lock: bool) -> anyhow::Result<Option<Values>> {
        let lock = if lock { " FOR UPDATE" } else { "" };
        let sql =
            format!("SELECT {} FROM {} WHERE {} LIMIT 1{lock}", self.select_list(), self.name, self.key_condition(row));
        let found = client.query_opt(&sql, &[]).await.with_context(|| format!("look up a row of {}", self.name))?;
        Ok(found.map(|r| (1..r.len()).map(|i| r.get(i)).collect()))
    }

    /// `key1 = 'v'::type AND ...` for `row`'s key (NULL-safe for an all-columns key).
    pub fn key_condition(&self, row: &Values) -> String {
        let parts: Vec<String> = self
            .key
            .iter()
            .map(|&i| {
                let column = &self.columns[i];
                let value = row.get(i).cloned().flatten();
                match (&value, self.key_kind) {
                    (None, _) => format!("{} IS NULL", quote_ident(&column.name)),
                    (Some(_), KeyKind::AllColumns) => {
                        format!("{} IS NOT DISTINCT FROM {}", quote_ident(&column.name), literal(&value, column))
                    }
                    (Some(_), _) => format!("{} = {}", quote_ident(&column.name), literal(&value, column)),
                }
            })
            .collect();
        if parts.is_empty() {
            "FALSE".into()
        } else {
            parts.join(" AND ")
        }
    }

    /// `id=17` or `(email, day)=(a@b, 2026-09-01)`: the key, for people.
    pub fn describe_key(&self, row: &Values) -> String {
        let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_else(|| "NULL".into());
        match self.key.as_slice() {
            [one] => format!("{}={}", self.columns[*one].name, text(*one)),
            many => format!(
                "({})=({})",
                many.iter().map(|&i| self.columns[i].name.clone()).collect::<Vec<_>>().join(", "),
                many.iter().map(|&i| text(i)).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    fn writable(&self) -> impl Iterator<Item = (usize, &Column)> {
        self.columns.iter().enumerate().filter(|(_, c)| !c.generated)
    }

    pub fn insert_sql(&self, row: &Values) -> String {
        let names: Vec<String> = self.writable().map(|(_, c)| quote_ident(&c.name)).collect();
        let values: Vec<String> = self.writable().map(|(i, c)| literal(&row.get(i).cloned().flatten(), c)).collect();
        let overriding = if self.columns.iter().any(|c| c.identity_always) { " OVERRIDING SYSTEM VALUE" } else { "" };
        format!("INSERT INTO {} ({}){overriding} VALUES ({});", self.name, names.join(", "), values.join(", "))
    }

    /// Sets every writable column of the row with `key_of`'s key to `values`.
    pub fn update_sql(&self, key_of: &Values, values: &Values) -> String {
        let sets: Vec<String> = self
            .writable()
            .map(|(i, c)| format!("{} = {}", quote_ident(&c.name), literal(&values.get(i).cloned().flatten(), c)))
            .collect();
        format!("UPDATE {} SET {} WHERE {};", self.name, sets.join(", "), self.key_condition(key_of))
    }

    pub fn delete_sql(&self, key_of: &Values) -> String {
        match self.key_kind {
            // Exactly one of possibly equal rows.
            KeyKind::AllColumns => format!(
                "DELETE FROM {0} WHERE ctid = (SELECT ctid FROM {0} WHERE {1} LIMIT 1);",
                self.name,
                self.key_condition(key_of)
            ),
            _ => format!("DELETE FROM {} WHERE {};", self.name, self.key_condition(key_of)),
        }
    }

    /// The columns whose texts differ: (name, from, to).
    pub fn differences(&self, from: &Values, to: &Values) -> Vec<(String, String, String)> {
        let show = |v: &Option<String>| v.as_deref().map(|t| format!("'{t}'")).unwrap_or_else(|| "NULL".into());
        self.columns
            .iter()
            .enumerate()
            .filter(|(i, _)| from.get(*i) != to.get(*i))
            .map(|(i, c)| (c.name.clone(), show(&from.get(i).cloned().flatten()), show(&to.get(i).cloned().flatten())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(kind: KeyKind) -> Table {
        let column = |name: &str, type_sql: &str| Column {
            name: name.into(),
            type_sql: type_sql.into(),
            generated: false,
            identity_always: false,
        };
        Table {
            name: "public.\"AttendanceRecord\"".into(),
            columns: vec![
                column("id", "text"),
                column("status", "\"Status\""),
                column("at", "timestamp(3) without time zone"),
                Column { generated: true, ..column("day", "date") },
            ],
            key: if kind == KeyKind::AllColumns { vec![0, 1, 2, 3] } else { vec![0] },
            key_kind: kind,
        }
    }

    #[test]
    fn statements_quote_values_and_skip_generated_columns() {
        let t = table(KeyKind::Primary);
        let row: Values =
            vec![Some("it's".into()), None, Some("2026-09-01 08:00:00.123".into()), Some("2026-09-01".into())];
        assert_eq!(
            t.insert_sql(&row),
            "INSERT INTO public.\"AttendanceRecord\" (\"id\", \"status\", \"at\") VALUES ('it''s'::text, NULL, \
             '2026-09-01 08:00:00.123'::timestamp(3) without time zone);"
        );
        let new: Values = vec![Some("it's".into()), Some("late".into()), None, None];
        assert_eq!(
            t.update_sql(&row, &new),
            "UPDATE public.\"AttendanceRecord\" SET \"id\" = 'it''s'::text, \"status\" = 'late'::\"Status\", \
             \"at\" = NULL WHERE \"id\" = 'it''s'::text;"
        );
        assert_eq!(t.delete_sql(&row), "DELETE FROM public.\"AttendanceRecord\" WHERE \"id\" = 'it''s'::text;");
        assert_eq!(t.describe_key(&row), "id=it's");
        assert_eq!(
            t.differences(&row, &new),
            vec![
                ("status".into(), "NULL".into(), "'late'".into()),
                ("at".into(), "'2026-09-01 08:00:00.123'".into(), "NULL".into()),
                ("day".into(), "'2026-09-01'".into(), "NULL".into())
            ]
        );
    }

    #[test]
    fn all_columns_keys_are_null_safe_and_delete_one_row() {
        let t = table(KeyKind::AllColumns);
        let row: Values = vec![Some("a".into()), None, None, None];
        assert!(t.key_condition(&row).starts_with("\"id\" IS NOT DISTINCT FROM 'a'::text AND \"status\" IS NULL"));
        assert!(t.delete_sql(&row).starts_with("DELETE FROM public.\"AttendanceRecord\" WHERE ctid = (SELECT ctid"));
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn backslashes_make_escape_strings_that_read_the_same_on_any_server() {
        assert_eq!(string_literal("plain"), "'plain'");
        assert_eq!(string_literal("it's"), "'it''s'");
        assert_eq!(string_literal("ends in \\"), "E'ends in \\\\'");
        assert_eq!(string_literal("\\'; DROP TABLE t; --"), "E'\\\\''; DROP TABLE t; --'");
        let t = table(KeyKind::Primary);
        let row: Values = vec![Some("k\\".into()), Some("late".into()), None, None];
        assert_eq!(t.delete_sql(&row), "DELETE FROM public.\"AttendanceRecord\" WHERE \"id\" = E'k\\\\'::text;");
    }
}
