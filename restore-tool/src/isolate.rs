//! The inert configuration a restored copy starts from with `restore
//! --start --isolate`: drills, the scratch restores behind `extract` and
//! `repair`, and a staging copy beside production. Built here and nowhere
//! else. Such a copy reaches nothing outside itself: no TCP (its Unix
//! socket in its own data directory only), no subscription workers, no
//! synchronous standby to wait for, no archiving, no streaming, no
//! preloaded libraries but those its data needs to be read, its own
//! pg_hba.conf. The source's files are kept beside as `*.production`.
//!
//! Recovery refuses to run a standby with less of some resources than the
//! source had: those settings come from the restored `pg_control` (through
//! `pg_controldata`) and from the source's own files, whichever is higher.

use crate::server_config::Settings;
use anyhow::Context;
use std::path::{Path, PathBuf};
use tidemark_repo::durable::{write_atomically, Durability};

/// The source's configuration files, moved aside (`<name>.production`)
/// for reference; the copy runs on generated ones.
const REPLACED: [&str; 3] = ["postgresql.conf", "postgresql.auto.conf", "pg_hba.conf"];

/// Libraries kept in shared_preload_libraries when the source preloads
/// them, because their data cannot be read without them (TimescaleDB's
/// hypertables refuse queries unless it is preloaded). Everything else
/// (pg_cron's scheduler, pglogical, statistics collectors) is left out.
const NEEDED_TO_READ: &[&str] = &["timescaledb"];

/// Settings that must be at least the source's for recovery to run a hot
/// standby, with PostgreSQL's defaults: (name here, name in pg_controldata, default).
const AT_LEAST_THE_SOURCE: [(&str, &str, i64); 5] = [
    ("max_connections", "max_connections setting:", 100),
    ("max_worker_processes", "max_worker_processes setting:", 8),
    ("max_wal_senders", "max_wal_senders setting:", 10),
    ("max_prepared_transactions", "max_prepared_xacts setting:", 0),
    ("max_locks_per_transaction", "max_locks_per_xact setting:", 64),
];

/// What the data needs of the server that reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Needed {
    /// [`AT_LEAST_THE_SOURCE`]'s settings, in that order.
    pub at_least: Vec<(&'static str, i64)>,
    /// `replica` or `logical`, as on the source (a logical slot needs `logical`).
    pub wal_level: String,
    /// The libraries of [`NEEDED_TO_READ`] the source preloads.
    pub preload: Vec<String>,
}

impl Needed {
    /// From the source's configuration files (`settings`) and, when
    /// `pg_controldata` could be run, its output for the restored directory.
    pub fn new(settings: &Settings, controldata: Option<&str>) -> Needed {
        let control = |label: &str| -> Option<String> {
            let line = controldata?.lines().find(|l| l.starts_with(label))?;
            Some(line.trim_start_matches(label).trim().to_string())
        };
        let at_least = AT_LEAST_THE_SOURCE
            .iter()
            .map(|&(name, label, default)| {
                let from_control = control(label).and_then(|v| v.parse().ok());
                (name, default.max(settings.int(name).unwrap_or(0)).max(from_control.unwrap_or(0)))
            })
            .collect();
        let wal_level = control("wal_level setting:")
            .or_else(|| settings.get("wal_level").map(str::to_string))
            .filter(|level| level == "logical")
            .unwrap_or_else(|| "replica".into());
        let preload = settings
            .get("shared_preload_libraries")
            .unwrap_or("")
            .split(',')
            .map(|l| l.trim().trim_matches('"').to_string())
            .filter(|l| NEEDED_TO_READ.contains(&l.as_str()))
            .collect();
        Needed { at_least, wal_level, preload }
    }
}

/// `'text'` for a configuration file.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The generated postgresql.conf of an isolated copy on `pgdata` (absolute).
pub fn postgresql_conf(needed: &Needed, pgdata: &Path, port: u16) -> String {
    let mut text = String::from(
        "# Written by tidemark-restore: an isolated copy, which reaches nothing outside\n\
         # itself. The source's own settings, where the backup held them, are in\n\
         # postgresql.conf.production and postgresql.auto.conf.production.\n\n\
         # Its Unix socket, in its own data directory, is the only way in.\n\
         listen_addresses = ''\n",
    );
    text.push_str(&format!("port = {port}\nunix_socket_directories = {}\n", quoted(&pgdata.display().to_string())));
    text.push_str(
        "unix_socket_permissions = 0700\n\n\
         # Subscriptions in its catalog never start: no worker may apply them.\n\
         max_logical_replication_workers = 0\n\
         max_sync_workers_per_subscription = 0\n\
         # No standby to wait for, no archive to send to, no server to stream from.\n\
         synchronous_standby_names = ''\n\
         archive_mode = off\n\
         primary_conninfo = ''\n\
         primary_slot_name = ''\n",
    );
    text.push_str(&format!(
        "# Only what its data needs to be read.\nshared_preload_libraries = {}\n\n",
        quoted(&needed.preload.join(","))
    ));
    text.push_str("# At least the source's: recovery refuses less.\n");
    text.push_str(&format!("wal_level = {}\n", needed.wal_level));
    for (name, value) in &needed.at_least {
        text.push_str(&format!("{name} = {value}\n"));
    }
    text.push_str("hot_standby = on\n");
    text
}

/// The generated pg_hba.conf: the private socket only.
const PG_HBA: &str = "# Written by tidemark-restore for an isolated copy: connections over its Unix\n\
                      # socket only, which lives in the data directory, where only its owner may enter.\n\
                      # The source's own rules are in pg_hba.conf.production.\n\
                      local all all trust\n";

/// `pg_controldata`'s output for `pgdata` (in English), or `None` when
/// the installation has no pg_controldata (the source's files decide then).
pub async fn controldata(pg_bin: &Path, pgdata: &Path) -> Option<String> {
    let output = tokio::process::Command::new(pg_bin.join("pg_controldata"))
        .arg("-D")
        .arg(pgdata)
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Puts the inert configuration in place in a restored `pgdata`, before
/// the recovery settings are appended to the (new) postgresql.auto.conf:
/// the source's files moved aside, the generated ones written.
pub fn apply(pgdata: &Path, postgresql_conf: &str) -> anyhow::Result<()> {
    for name in REPLACED {
        let path = pgdata.join(name);
        if path.exists() {
            let aside = pgdata.join(format!("{name}.production"));
            std::fs::rename(&path, &aside).with_context(|| format!("move {} aside", path.display()))?;
        }
    }
    let write = |name: &str, text: &str| -> anyhow::Result<()> {
        let path: PathBuf = pgdata.join(name);
        // Durable with the rest: PostgreSQL syncs the data directory before replay.
        write_atomically(&path, text.as_bytes(), Durability::PageCache)
            .with_context(|| format!("write {}", path.display()))
    };
    write("postgresql.conf", postgresql_conf)?;
    write("pg_hba.conf", PG_HBA)?;
    if !pgdata.join("pg_ident.conf").exists() {
        write("pg_ident.conf", "# Written by tidemark-restore: no user name maps.\n")?;
    }
    Ok(())
}

/// Disables every enabled subscription of a promoted isolated copy, so it
/// stays off should someone later start the copy with more workers.
/// `ALTER SUBSCRIPTION ... DISABLE` only changes the catalog: it connects
/// to no publisher (unlike DROP SUBSCRIPTION, and `slot_name = NONE` is
/// not needed for it). Returns `database.subscription` of each.
pub async fn disable_subscriptions(pgdata: &Path, port: u16) -> anyhow::Result<Vec<String>> {
    let enabled: Vec<_> =
        crate::server_config::subscriptions(pgdata, port).await?.into_iter().filter(|s| s.enabled).collect();
    let mut disabled = Vec::new();
    for subscription in enabled {
        let client = crate::server_config::connect(pgdata, port, &subscription.database)
            .await
            .with_context(|| format!("connect to database {:?} of the isolated copy", subscription.database))?;
        let name = format!("\"{}\"", subscription.name.replace('"', "\"\""));
        client
            .batch_execute(&format!("ALTER SUBSCRIPTION {name} DISABLE"))
            .await
            .with_context(|| format!("disable subscription {name} in the isolated copy"))?;
        disabled.push(format!("{}.{}", subscription.database, subscription.name));
    }
    Ok(disabled)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTROLDATA: &str = "pg_control version number:            1300\n\
        wal_level setting:                    logical\n\
        max_connections setting:              250\n\
        max_worker_processes setting:         8\n\
        max_wal_senders setting:              10\n\
        max_prepared_xacts setting:           5\n\
        max_locks_per_xact setting:           64\n";

    #[test]
    fn the_data_needs_at_least_the_sources_resources() {
        let settings = Settings::parse(
            "max_connections = 100\nmax_locks_per_transaction = 256\nwal_level = replica\n\
             shared_preload_libraries = 'pg_cron,timescaledb, pg_stat_statements'\n",
        );
        let needed = Needed::new(&settings, Some(CONTROLDATA));
        // pg_control's 250 connections beat the file's 100; the file's 256 locks beat pg_control's 64.
        assert_eq!(
            needed.at_least,
            vec![
                ("max_connections", 250),
                ("max_worker_processes", 8),
                ("max_wal_senders", 10),
                ("max_prepared_transactions", 5),
                ("max_locks_per_transaction", 256)
            ]
        );
        assert_eq!(needed.wal_level, "logical");
        assert_eq!(needed.preload, vec!["timescaledb".to_string()]);
        // Nothing known (Debian's layout, no pg_controldata): PostgreSQL's defaults.
        let bare = Needed::new(&Settings::default(), None);
        assert_eq!(bare.at_least.first(), Some(&("max_connections", 100)));
        assert_eq!(bare.wal_level, "replica");
        assert!(bare.preload.is_empty());
    }

    #[test]
    fn the_generated_configuration_reaches_nothing() {
        let needed = Needed::new(&Settings::default(), Some(CONTROLDATA));
        let text = postgresql_conf(&needed, Path::new("/srv/it's/data"), 5499);
        let settings = Settings::parse(&text);
        for (name, value) in [
            ("listen_addresses", ""),
            ("max_logical_replication_workers", "0"),
            ("synchronous_standby_names", ""),
            ("archive_mode", "off"),
            ("primary_conninfo", ""),
            ("shared_preload_libraries", ""),
            ("unix_socket_directories", "/srv/it's/data"),
            ("port", "5499"),
            ("max_connections", "250"),
            ("wal_level", "logical"),
        ] {
            assert_eq!(settings.get(name), Some(value), "{name} in\n{text}");
        }
        assert!(crate::server_config::reaches_outside(&settings).is_empty(), "{text}");
    }

    #[test]
    fn the_sources_files_are_kept_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("postgresql.conf"), "listen_addresses = '*'\n").expect("write");
        std::fs::write(dir.path().join("postgresql.auto.conf"), "synchronous_standby_names = 's1'\n").expect("write");
        apply(dir.path(), "listen_addresses = ''\n").expect("apply");
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        assert_eq!(read("postgresql.conf"), "listen_addresses = ''\n");
        assert_eq!(read("postgresql.conf.production"), "listen_addresses = '*'\n");
        assert_eq!(read("postgresql.auto.conf.production"), "synchronous_standby_names = 's1'\n");
        assert!(!dir.path().join("postgresql.auto.conf").exists(), "the recovery settings start a new one");
        assert!(read("pg_hba.conf").contains("local all all trust"));
        assert!(dir.path().join("pg_ident.conf").exists());
        assert!(!dir.path().join("pg_hba.conf.production").exists(), "Debian's layout: there was none");
    }
}
