//! Names relation files for the audit: (database OID, file number) → the
//! schema-qualified table, read from the server's catalog over ordinary SQL
//! connections, one per database.
//!
//! Files change under a table (TRUNCATE, VACUUM FULL, CLUSTER, rewriting
//! ALTERs give it a new file; DROP removes it), so the map only grows: an
//! old file keeps the name it had when we last saw it, a new file is looked
//! up when WAL mentions it. Everything learnt is kept in the index, so a
//! restarted agent still names files dropped while it was down-stream.
//! A file created and dropped between two lookups stays unnamed; the summary
//! then carries its database and file number.

use crate::index::{Index, RelName};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tidemark_pg::sql;
use tidemark_proto::conninfo::ConnParams;
use tidemark_proto::wal::summary::{qualified_name, Naming};
use tidemark_proto::wal::RelFileLocator;
use tracing::{debug, warn};

pub struct RelationNames {
    params: ConnParams,
    index: Arc<Index>,
    names: HashMap<(u32, u32), RelName>,
    databases: HashMap<u32, String>,
}

/// Every relation with storage in the current database, with its file number.
const RELATIONS_SQL: &str = "SELECT pg_relation_filenode(c.oid), n.nspname::text, c.relname::text, c.relkind::text \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE pg_relation_filenode(c.oid) IS NOT NULL";

impl RelationNames {
    pub fn new(params: ConnParams, index: Arc<Index>) -> anyhow::Result<RelationNames> {
        let names = index.rel_names()?.into_iter().collect();
        Ok(RelationNames { params, index, names, databases: HashMap::new() })
    }

    /// The name for a file as the summary records it.
    pub fn naming(&self, rel: RelFileLocator) -> Naming {
        if rel.database == 0 {
            return Naming::Skip; // shared catalogs
        }
        match self.names.get(&(rel.database, rel.relfilenode)) {
            Some(RelName { table: Some(table) }) => Naming::Table(table.clone()),
            Some(RelName { table: None }) => Naming::Skip,
            None => Naming::Unknown,
        }
    }

    /// Looks again at the catalog of every database in `databases`, plus
    /// those of files we cannot name yet. Failures are logged, not raised:
    /// the audit then shows file numbers, and archiving never waits on it.
    pub async fn refresh(&mut self, touched: &[RelFileLocator], databases: &HashSet<u32>) {
        let mut wanted: HashSet<u32> = databases.iter().copied().filter(|db| *db != 0).collect();
        for rel in touched {
            if rel.database != 0 && !self.names.contains_key(&(rel.database, rel.relfilenode)) {
                wanted.insert(rel.database);
            }
        }
        for database in wanted {
            if let Err(e) = self.refresh_database(database).await {
                warn!("could not read table names of database {database}: {e:#}");
            }
        }
    }

    async fn refresh_database(&mut self, database: u32) -> anyhow::Result<()> {
        if !self.databases.contains_key(&database) {
            self.load_databases().await?;
        }
        let Some(dbname) = self.databases.get(&database).cloned() else {
            return Ok(()); // dropped since, or does not allow connections
        };
        let mut params = self.params.clone();
        params.dbname = Some(dbname.clone());
        let client = sql::connect(&params).await?;
        let rows = client.query(RELATIONS_SQL, &[]).await.map_err(sql::from_postgres)?;
        let mut learnt = 0;
        for row in &rows {
            let (filenode, schema, relname, kind): (u32, &str, &str, &str) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?);
            let name = RelName { table: is_user_table(schema, kind).then(|| qualified_name(schema, relname)) };
            if self.names.get(&(database, filenode)) != Some(&name) {
                self.index.put_rel_name(database, filenode, &name)?;
                self.names.insert((database, filenode), name);
                learnt += 1;
            }
        }
        debug!(database = %dbname, learnt, "read table names");
        Ok(())
    }

    async fn load_databases(&mut self) -> anyhow::Result<()> {
        let client = sql::connect(&self.params).await?;
        let rows = client
            .query("SELECT oid, datname::text FROM pg_database WHERE datallowconn", &[])
            .await
            .map_err(sql::from_postgres)?;
        for row in rows {
            self.databases.insert(row.try_get(0)?, row.try_get(1)?);
        }
        Ok(())
    }
}

/// Tables, partitions' parents and materialized views outside the system
/// schemas; toast tables, indexes, sequences and catalogs are skipped.
fn is_user_table(schema: &str, kind: &str) -> bool {
    matches!(kind, "r" | "p" | "m")
        && !matches!(schema, "pg_catalog" | "information_schema" | "pg_toast")
        && !schema.starts_with("pg_temp_")
        && !schema.starts_with("pg_toast_temp_")
}

#[cfg(test)]
mod tests {
    use super::is_user_table;

    #[test]
    fn only_user_tables_are_audited() {
        assert!(is_user_table("public", "r"));
        assert!(is_user_table("app", "m"));
        assert!(!is_user_table("public", "i"));
        assert!(!is_user_table("pg_toast", "t"));
        assert!(!is_user_table("pg_catalog", "r"));
        assert!(!is_user_table("public", "S"));
    }
}
