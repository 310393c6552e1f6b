//! `tidemark-agent init`: check the server, create the slot, create or adopt
//! the repository, and record where streaming starts.
//! Everything is checked before anything is written.

use crate::config::Settings;
use crate::fail::Fail;
use crate::index::{Index, IndexMeta};
use crate::pg::session;
use crate::store::Repository;
use std::os::unix::fs::DirBuilderExt;
use tidemark_proto::repo::layout::{RepositoryMeta, FORMAT_VERSION, FORMAT_VERSION_PLAIN};

pub struct InitReport {
    pub system_identifier: String,
    pub timeline: u32,
    pub slot_created: bool,
    pub repository_created: bool,
    pub stream_start: String,
}

pub async fn init(settings: &Settings) -> anyhow::Result<InitReport> {
    // 1. The server: reachable, allowed to replicate, configured for it.
    let mut conn = session::connect_replication(&settings.conn).await?;
    let identity = session::identify(&mut conn).await?;
    let facts = session::server_facts(&mut conn).await?;
    crate::preflight::check(&facts)?;

    // 2. The repository and state directory: empty or this cluster's.
    let mut repo = Repository::open(&settings.repo_url, false).or_else(|e| {
        // A missing local directory is created below; anything else is an error.
        if settings.repo_url.contains("://") && !settings.repo_url.starts_with("file://") {
            Err(e)
        } else {
            check_creatable(&settings.repo_url)?;
            Ok(Repository::open(&settings.repo_url, true)?)
        }
    })?;
    let existing = repo.read_meta().await?;
    if let Some(meta) = &existing {
        session::check_same_cluster(
            &format!("repository {}", repo.display),
            &meta.system_identifier,
            &identity.system_identifier,
        )?;
    }
    // Keys: an existing repository checks the given ones; a new one with
    // key files is created encrypted (compression before encryption, every
    // object sealed), and one without stays plain.
    let encryption = match &existing {
        Some(meta) => {
            crate::store::unlock(meta, &repo.display, &settings.key_files)?;
            None
        }
        None if settings.key_files.is_empty() => None,
        None => Some(crate::keys::new_encryption(&settings.key_files)?),
    };
    let index_dir = settings.state_dir.join("index");
    let prior_state = if index_dir.is_dir() { Index::open(&index_dir)?.meta()? } else { None };
    if let Some(state) = &prior_state {
        session::check_same_cluster(
            &format!("state directory {}", settings.state_dir.display()),
            &state.system_identifier,
            &identity.system_identifier,
        )?;
    }

    // 3. Write: slot, repository metadata, state.
    let slot_created = session::ensure_slot(&mut conn, &settings.slot).await?;
    conn.close().await;
    if existing.is_none() {
        let (format_version, encryption, keyring) = match encryption {
            Some((meta, keyring)) => (FORMAT_VERSION, Some(meta), Some(keyring)),
            None => (FORMAT_VERSION_PLAIN, None, None),
        };
        repo.set_keyring(keyring);
        repo.write_meta(&RepositoryMeta {
            format_version,
            system_identifier: identity.system_identifier.clone(),
            wal_segment_size: facts.wal_segment_size,
            server_version_num: facts.server_version_num,
            created_at: now_rfc3339(),
            encryption,
        })
        .await?;
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&index_dir).map_err(|e| {
        Fail::new(
            format!("cannot create state directory {}: {e}", settings.state_dir.display()),
            "check --state-dir and its permissions",
        )
    })?;
    let index = Index::open(&index_dir)?;
    let start = identity.xlogpos.segment_start(facts.wal_segment_size);
    let meta = match prior_state {
        Some(state) => state,
        None => {
            let meta = IndexMeta {
                system_identifier: identity.system_identifier.clone(),
                wal_segment_size: facts.wal_segment_size,
                stream_start_timeline: identity.timeline.0,
                stream_start_lsn: start.0,
            };
            index.put_meta(&meta)?;
            meta
        }
    };
    Ok(InitReport {
        system_identifier: identity.system_identifier,
        timeline: identity.timeline.0,
        slot_created,
        repository_created: existing.is_none(),
        stream_start: tidemark_proto::Lsn(meta.stream_start_lsn).to_string(),
    })
}

/// A local repository path must be a directory or creatable as one.
fn check_creatable(url: &str) -> Result<(), Fail> {
    let path = std::path::PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
    if path.exists() && !path.is_dir() {
        return Err(Fail::new(
            format!("repository path {} is not a directory", path.display()),
            "point --repo at a directory",
        ));
    }
    Ok(())
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}
