//! The restored cluster's own configuration, as the backup holds it:
//! `postgresql.conf` (absent when it lived outside the data directory, as
//! on Debian's `/etc/postgresql` layout) and `postgresql.auto.conf`, read
//! from the repository before anything is fetched and parsed as PostgreSQL
//! reads them (the auto file after the main one, the last setting wins);
//! what in them reaches outside the copy; and the subscriptions in a
//! started copy's catalog, which live there rather than in a file.

use std::collections::BTreeMap;
use std::path::Path;
use tidemark_proto::repo::backup::{BackupManifest, FileKind};
use tidemark_repo::Repository;

/// Settings of one or more configuration files: names lowercased, values
/// unquoted, the last one of a name winning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    values: BTreeMap<String, String>,
    /// `include`, `include_if_exists` and `include_dir` targets: files a
    /// backup of the data directory may not hold.
    pub includes: Vec<String>,
}

impl Settings {
    /// Parses a configuration file's text (`name = value` or `name value`,
    /// values quoted with `'` or bare, `#` comments).
    pub fn parse(text: &str) -> Settings {
        let mut settings = Settings::default();
        for (name, value) in text.lines().filter_map(parse_line) {
            match name.as_str() {
                "include" | "include_if_exists" | "include_dir" => settings.includes.push(value),
                _ => {
                    settings.values.insert(name, value);
                }
            }
        }
        settings
    }

    /// `later`'s settings over these (as postgresql.auto.conf over postgresql.conf).
    pub fn merge(&mut self, later: Settings) {
        self.values.extend(later.values);
        self.includes.extend(later.includes);
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// An integer setting (no unit), if set and readable.
    pub fn int(&self, name: &str) -> Option<i64> {
        self.get(name)?.trim().parse().ok()
    }
}

/// One `name = value` line, or `None` for blanks, comments and lines
/// PostgreSQL would not read as a setting.
fn parse_line(line: &str) -> Option<(String, String)> {
    let line = line.trim_start();
    let name_len =
        line.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.' || c == '-')).unwrap_or(line.len());
    let (name, rest) = line.split_at(name_len);
    if name.is_empty() {
        return None;
    }
    let rest = rest.trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
    let value = match rest.strip_prefix('\'') {
        Some(quoted) => unquote(quoted),
        None => rest.split(|c: char| c.is_whitespace() || c == '#').next().unwrap_or("").to_string(),
    };
    Some((name.to_lowercase(), value))
}

/// The rest of a `'`-quoted value: `''` and `\'` are quotes, `\x` is `x`.
fn unquote(quoted: &str) -> String {
    let mut value = String::new();
    let mut chars = quoted.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' if chars.peek() == Some(&'\'') => {
                chars.next();
                value.push('\'');
            }
            '\'' => break,
            '\\' => value.extend(chars.next()),
            _ => value.push(c),
        }
    }
    value
}

/// The configuration files a backup holds in its data directory.
#[derive(Clone, Debug, Default)]
pub struct BackupConfig {
    /// False on Debian's layout: postgresql.conf lived in /etc, outside
    /// the data directory, and the backup has none.
    pub has_postgresql_conf: bool,
    /// postgresql.conf, then postgresql.auto.conf over it.
    pub settings: Settings,
}

/// Reads `postgresql.conf` and `postgresql.auto.conf` of `backup` from the
/// repository (each a few kB, checked like any chunk).
pub async fn read(repo: &Repository, backup: &BackupManifest) -> anyhow::Result<BackupConfig> {
    let main = file_text(repo, backup, "postgresql.conf").await?;
    let auto = file_text(repo, backup, "postgresql.auto.conf").await?;
    let mut settings = main.as_deref().map(Settings::parse).unwrap_or_default();
    settings.merge(auto.as_deref().map(Settings::parse).unwrap_or_default());
    Ok(BackupConfig { has_postgresql_conf: main.is_some(), settings })
}

async fn file_text(repo: &Repository, backup: &BackupManifest, path: &str) -> anyhow::Result<Option<String>> {
    let Some(file) = backup
        .files
        .iter()
        .find(|f| f.archive == "base" && f.path == path && f.kind == FileKind::File && f.blocks.is_none())
    else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    for chunk in &file.chunks {
        bytes.extend(crate::fetch::fetch_chunk(repo, chunk, &file.path).await?);
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

fn is_on(value: &str) -> bool {
    matches!(value.trim().to_lowercase().as_str(), "on" | "always" | "true" | "yes" | "1")
}

/// Only this host's own loopback: `localhost`, 127.0.0.1, ::1 (or nothing).
fn only_loopback(addresses: &str) -> bool {
    addresses.split(',').map(str::trim).all(|a| matches!(a, "" | "localhost" | "127.0.0.1" | "::1"))
}

/// What in these settings reaches outside a copy started with them, one
/// line each. Values that may hold credentials (archive_command,
/// primary_conninfo) are named, never shown.
pub fn reaches_outside(settings: &Settings) -> Vec<String> {
    let mut found = Vec::new();
    if let Some(names) = settings.get("synchronous_standby_names").filter(|v| !v.trim().is_empty()) {
        found.push(format!(
            "synchronous_standby_names = '{names}': every commit waits for one of those standbys, which this copy does not have"
        ));
    }
    if settings.get("archive_mode").is_some_and(is_on) {
        found.push(
            "archive_mode is on: its archive_command would send this copy's WAL where the source's goes; \
             this restore turned it off (archive_mode = 'off' in postgresql.auto.conf)"
                .to_string(),
        );
    }
    if settings.get("primary_conninfo").is_some_and(|v| !v.trim().is_empty()) {
        found.push(
            "primary_conninfo is set (a standby's backup): this restore cleared it, so the copy never streams from that server"
                .to_string(),
        );
    }
    if let Some(addresses) = settings.get("listen_addresses").filter(|v| !only_loopback(v)) {
        found.push(format!(
            "listen_addresses = '{addresses}': this start listens on 127.0.0.1 only, but started with its own settings \
             it takes connections on those addresses, by its own pg_hba.conf"
        ));
    }
    if let Some(libraries) = settings.get("shared_preload_libraries").filter(|v| !v.trim().is_empty()) {
        found.push(format!(
            "shared_preload_libraries = '{libraries}': their background workers run in the copy (pg_cron's, for one, run its jobs)"
        ));
    }
    for include in &settings.includes {
        found.push(format!(
            "the configuration includes '{include}', which the backup does not hold: its settings are unknown here"
        ));
    }
    found
}

/// A subscription in a restored catalog and where it connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    pub name: String,
    pub database: String,
    pub enabled: bool,
    /// `host=… port=… user=…` of its publisher, never its password.
    pub publisher: String,
}

impl Subscription {
    /// One line for people: which publisher it reaches, and how to drop it safely.
    pub fn describe(&self) -> String {
        let state = if self.enabled { "enabled" } else { "disabled" };
        format!(
            "subscription \"{}\" (database {}, {state}) connects to its publisher at {} once recovery ends and consumes \
             its slot there (--isolate keeps it off); before DROP SUBSCRIPTION on a copy, ALTER SUBSCRIPTION ... \
             SET (slot_name = NONE), or the drop removes the source's slot",
            self.name, self.database, self.publisher
        )
    }
}

/// The subscriptions in the catalog of the server on `pgdata`'s socket
/// (`pg_subscription` is shared: one query sees every database's).
pub async fn subscriptions(pgdata: &Path, port: u16) -> anyhow::Result<Vec<Subscription>> {
    let client = connect(pgdata, port, "postgres").await?;
    let rows = client
        .query(
            "SELECT s.subname::text, d.datname::text, s.subenabled, s.subconninfo \
             FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid ORDER BY 2, 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let conninfo: String = row.get(3);
            let publisher = tidemark_proto::conninfo::ConnParams::resolve(Some(&conninfo), &BTreeMap::new())
                .map(|p| p.redacted())
                .unwrap_or_else(|_| "(a connection string not shown here)".into());
            Subscription { name: row.get(0), database: row.get(1), enabled: row.get(2), publisher }
        })
        .collect())
}

/// A session as `postgres` on the restored server's private socket.
pub(crate) async fn connect(pgdata: &Path, port: u16, database: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::Config::new()
        .host_path(pgdata)
        .port(port)
        .user("postgres")
        .dbname(database)
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(connection);
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_read_as_postgresql_reads_them() {
        let text = "# comment\nlisten_addresses = '*'\t\t# what IP\nport=5433\nmax_connections 200\n\
                    Shared_Preload_Libraries = 'pg_cron, pg_stat_statements'\n\
                    archive_command = 'cp %p /arch/%f && echo ''done'''\ninclude_dir 'conf.d'\n\
                    include_if_exists = '/etc/extra.conf'\n   \n=broken\nmax_connections = 300 # later wins\n";
        let settings = Settings::parse(text);
        assert_eq!(settings.get("listen_addresses"), Some("*"));
        assert_eq!(settings.int("port"), Some(5433));
        assert_eq!(settings.int("max_connections"), Some(300));
        assert_eq!(settings.get("shared_preload_libraries"), Some("pg_cron, pg_stat_statements"));
        assert_eq!(settings.get("archive_command"), Some("cp %p /arch/%f && echo 'done'"));
        assert_eq!(settings.includes, vec!["conf.d".to_string(), "/etc/extra.conf".to_string()]);
        assert_eq!(settings.get("missing"), None);
        assert_eq!(unquote(r"it\'s' trailing"), "it's");
    }

    #[test]
    fn the_auto_file_wins() {
        let mut settings = Settings::parse("synchronous_standby_names = 'a'\nwork_mem = 4MB\n");
        settings.merge(Settings::parse("synchronous_standby_names = ''\n"));
        assert_eq!(settings.get("synchronous_standby_names"), Some(""));
        assert_eq!(settings.get("work_mem"), Some("4MB"));
    }

    #[test]
    fn what_reaches_outside_is_named_and_secrets_are_not_shown() {
        let settings = Settings::parse(
            "listen_addresses = '*'\nsynchronous_standby_names = 'FIRST 1 (s1, s2)'\narchive_mode = on\n\
             archive_command = 'AWS_SECRET=hunter2 aws s3 cp %p s3://b/%f'\n\
             primary_conninfo = 'host=p password=hunter2'\nshared_preload_libraries = 'pg_cron'\ninclude 'x.conf'\n",
        );
        let found = reaches_outside(&settings);
        assert_eq!(found.len(), 6, "{found:#?}");
        let all = found.join("\n");
        assert!(all.contains("synchronous_standby_names = 'FIRST 1 (s1, s2)'"), "{all}");
        assert!(all.contains("listen_addresses = '*'") && all.contains("pg_cron") && all.contains("x.conf"), "{all}");
        assert!(!all.contains("hunter2"), "{all}");
        // A cluster reachable only from its own host, without those: nothing.
        let quiet = Settings::parse(
            "listen_addresses = 'localhost,127.0.0.1'\narchive_mode = off\nsynchronous_standby_names = ''\n",
        );
        assert!(reaches_outside(&quiet).is_empty());
        assert!(reaches_outside(&Settings::default()).is_empty());
    }
}
