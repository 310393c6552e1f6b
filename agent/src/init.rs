//! `tidemark-agent init`: check the server, create the slot, create or adopt
//! the repository, and record where streaming starts.
//! Everything is checked before anything is written.

use crate::config::Settings;
use crate::index::{Index, IndexMeta};
use crate::pg::session;
use crate::preflight::ServerFacts;
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;
use tidemark_proto::repo::layout::EncryptionMeta;
use tidemark_proto::repo::layout::{RepositoryMeta, FORMAT_VERSION, FORMAT_VERSION_PLAIN};
use tidemark_proto::repo::seal::Keyring;
use tidemark_repo::Fail;
use tidemark_repo::{Create, RepoError, Repository};

pub struct InitReport {
    pub system_identifier: String,
    pub timeline: u32,
    pub slot_created: bool,
    pub repository_created: bool,
    pub stream_start: String,
    /// What would make Tidemark cheaper on this server (`preflight::advice`).
    pub advice: Vec<String>,
}

/// Writes a new repository's `repository.json` (signed, when encrypted).
async fn create_repository(
    repo: Repository,
    encryption: Option<(EncryptionMeta, Arc<Keyring>)>,
    system_identifier: &str,
    facts: &ServerFacts,
) -> anyhow::Result<()> {
    let (format_version, encryption, keyring, repository_id) = match encryption {
        Some((meta, keyring)) => (FORMAT_VERSION, Some(meta), Some(keyring), Some(random_repository_id()?)),
        None => (FORMAT_VERSION_PLAIN, None, None, None),
    };
    let mut meta = RepositoryMeta {
        format_version,
        system_identifier: system_identifier.to_string(),
        wal_segment_size: facts.wal_segment_size,
        server_version_num: facts.server_version_num,
        created_at: crate::clock::now_rfc3339(),
        encryption,
        repository_id,
        tags: Vec::new(),
    };
    // Objects are bound to the id from the first one on.
    let keyring = keyring.map(|k| Arc::new(Keyring { binding: meta.binding(), ..k.as_ref().clone() }));
    let repo = repo.with_keyring(keyring);
    repo.write_signed_meta(&mut meta, &[]).await?;
    Ok(())
}

/// A new encrypted repository's id: 16 random bytes, hex.
fn random_repository_id() -> anyhow::Result<String> {
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id).map_err(|e| anyhow::anyhow!("draw a random repository id: {e}"))?;
    Ok(tidemark_proto::repo::seal::hex_encode(&id))
}

pub async fn init(settings: &Settings) -> anyhow::Result<InitReport> {
    // 1. The server: reachable, allowed to replicate, configured for it.
    let mut conn = session::connect_replication(&settings.conn).await?;
    let identity = session::identify(&mut conn).await?;
    let facts = session::server_facts(&mut conn).await?;
    crate::preflight::check(&facts)?;

    // 2. The repository and state directory: empty or this cluster's.
    // A missing local directory is created; anything else that is not a
    // repository directory is an error.
    let repo = match Repository::open(&settings.repo_url, &settings.key_files, Create::No) {
        Err(RepoError::NoRepository(_)) => Repository::open(&settings.repo_url, &settings.key_files, Create::Yes)?,
        other => other?,
    }
    .remembering(settings.repo_memory_file());
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
            repo.unlock_with(meta)?;
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
    let repository_created = existing.is_none();
    match existing {
        // An encrypted repository of the older form gets its id and tags.
        Some(meta) => {
            repo.upgrade_if_older(meta).await?;
        }
        None => create_repository(repo, encryption, &identity.system_identifier, &facts).await?,
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
                stream_start_timeline: identity.timeline,
                stream_start_lsn: start,
            };
            index.put_meta(&meta)?;
            meta
        }
    };
    let mut advice = crate::preflight::advice(&facts);
    if (130000..170000).contains(&facts.server_version_num) && settings.read_changed_blocks {
        // Without these grants incremental backups still work, reading every file.
        if let Err(reason) = crate::backup::sql::session(settings, facts.server_version_num / 10000).await {
            advice.push(format!(
                "incremental backups will read every file from the server: {reason}; grant it (see the README) \
                 so that they read only the changed blocks, or set read_changed_blocks = false"
            ));
        }
    }
    Ok(InitReport {
        system_identifier: identity.system_identifier,
        timeline: identity.timeline.0,
        slot_created,
        repository_created,
        stream_start: meta.stream_start_lsn.to_string(),
        advice,
    })
}
