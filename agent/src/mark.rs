//! `tidemark-agent mark NAME [--keep DURATION|forever]`: a named restore
//! point in the WAL (pg_create_restore_point), recorded in the repository
//! (`marks/`) so retention can protect it, and in the operations log.

use crate::config::Settings;
use tidemark_proto::repo::frame::{self, Compression};
use tidemark_proto::repo::records::{mark_key, MarkRecord, KEEP_FOREVER};
use tidemark_proto::{Lsn, TimelineId};
use tidemark_repo::retention::parse_duration;
use tidemark_repo::Fail;
use time::format_description::well_known::Rfc3339;

/// Until when `--keep` protects the mark, checked before the restore point is made.
fn keep_until(keep: Option<&str>, now: time::OffsetDateTime) -> Result<Option<String>, Fail> {
    match keep {
        None => Ok(None),
        Some(KEEP_FOREVER) => Ok(Some(KEEP_FOREVER.into())),
        Some(text) => {
            let duration = parse_duration(text)
                .map_err(|e| Fail::new(format!("--keep {e}"), "use e.g. --keep 30d or --keep forever"))?;
            Ok(Some((now + duration).format(&Rfc3339).unwrap_or_default()))
        }
    }
}

pub async fn mark(settings: &Settings, name: &str, keep: Option<&str>) -> anyhow::Result<MarkRecord> {
    if name.is_empty() || name.len() >= 64 {
        return Err(Fail::new(format!("invalid restore point name {name:?}"), "use 1 to 63 characters").into());
    }
    let now = time::OffsetDateTime::now_utc();
    let keep_until = keep_until(keep, now)?;
    let (repo, _) = settings.open_initialized(true).await?;
    // pg_create_restore_point over an ordinary session (replication sessions
    // run no SQL); the WAL file name carries the timeline it was written on.
    let client = tidemark_pg::sql::connect(&settings.conn).await?;
    let row = client
        .query_one("SELECT p::text, substr(pg_walfile_name(p), 1, 8) FROM pg_create_restore_point($1) AS p", &[&name])
        .await
        .map_err(tidemark_pg::sql::from_postgres)?;
    let lsn: Lsn = row.try_get::<_, String>(0)?.parse().map_err(|e| anyhow::anyhow!("restore point LSN: {e}"))?;
    let timeline = u32::from_str_radix(&row.try_get::<_, String>(1)?, 16)?;
    let record = MarkRecord {
        name: name.to_string(),
        lsn,
        timeline: TimelineId(timeline),
        time: crate::clock::now_rfc3339(),
        keep_until,
    };
    let (object, _) = frame::encode(&serde_json::to_vec(&record)?, Compression::None)?;
    repo.put(&mark_key(lsn), object).await?;
    let protected = record.keep_until.as_deref().map(|k| format!(", kept until {k}")).unwrap_or_default();
    let summary = format!("restore point {name:?} at {lsn}{protected}");
    tidemark_repo::events::record(&repo, "mark", summary, serde_json::to_value(&record)?).await;
    Ok(record)
}

/// The command that restores to the mark, credentials left out of the URL.
pub fn restore_command(settings: &Settings, name: &str) -> String {
    let quote = |text: &str| format!("'{}'", text.replace('\'', "'\\''"));
    let mut command = format!("tidemark-restore --repo {}", quote(&tidemark_repo::redact_url(&settings.repo_url)));
    for key in &settings.key_files {
        command.push_str(&format!(" --key-file {}", quote(&key.display().to_string())));
    }
    command.push_str(&format!(" restore --name {} --pgdata /path/to/new/data --start", quote(name)));
    command
}

/// Waits until the repository holds the WAL up to the mark (on its
/// timeline), polling; the running agent uploads it within its partial
/// upload interval.
pub async fn wait_archived(settings: &Settings, mark: &MarkRecord, timeout: std::time::Duration) -> anyhow::Result<()> {
    let (repo, _) = settings.open_initialized(false).await?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let catalog = tidemark_repo::catalog::Catalog::load(&repo).await?;
        let held =
            catalog.ranges.iter().any(|r| r.timeline == mark.timeline && r.start <= mark.lsn && r.end >= mark.lsn);
        if held {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Fail::new(
                format!(
                    "the repository does not hold the WAL of restore point {:?} ({}) after {} s",
                    mark.name,
                    mark.lsn,
                    timeout.as_secs()
                ),
                "is `tidemark-agent run` streaming? `tidemark-agent status` shows the archived LSN",
            )
            .into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_durations() {
        let now = time::OffsetDateTime::parse("2026-11-28T22:00:00Z", &Rfc3339).expect("time");
        assert_eq!(keep_until(None, now), Ok(None));
        assert_eq!(keep_until(Some("forever"), now), Ok(Some("forever".into())));
        assert_eq!(keep_until(Some("2d"), now), Ok(Some("2026-11-30T22:00:00Z".into())));
        assert!(keep_until(Some("a while"), now).is_err());
    }

    #[test]
    fn restore_commands_quote_and_hide_credentials() {
        let file: crate::config::FileConfig = toml::from_str("repo = 's3://AKIA:secret@bucket/prefix'").expect("toml");
        let settings = crate::config::resolve(file, Default::default(), &Default::default()).expect("settings");
        let command = restore_command(&settings, "before it's migrated");
        assert!(!command.contains("secret"), "{command}");
        assert!(command.contains(r"--name 'before it'\''s migrated'"), "{command}");
    }
}
