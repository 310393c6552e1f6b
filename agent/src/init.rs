//! `tidemark-agent init`: check the server, create the slot, create or adopt
//! the repository, and record where streaming starts.
//! Everything is checked before anything is written, the state directory
//! and a local repository shown writable too; a slot this run created is
//! dropped again when a later step fails (a slot nobody streams from holds
//! the server's WAL until its disk fills).

use crate::config::Settings;
use crate::index::{Index, IndexMeta};
use crate::preflight::ServerFacts;
use crate::session::{self, Identity};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tidemark_proto::repo::layout::{RepositoryMeta, FORMAT_VERSION, FORMAT_VERSION_PLAIN};
use tidemark_proto::repo::seal::{EncryptionMeta, Keyring};
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

/// What the checks found, for the writes that follow them.
struct Checked {
    repo: Repository,
    /// `repository.json` of an existing repository.
    existing: Option<RepositoryMeta>,
    /// A new encrypted repository's settings and keys.
    encryption: Option<(EncryptionMeta, std::sync::Arc<Keyring>)>,
    index_dir: PathBuf,
    prior_state: Option<IndexMeta>,
}

pub async fn init(settings: &Settings) -> anyhow::Result<InitReport> {
    // 1. The server: reachable, allowed to replicate, configured for it.
    let mut conn = session::connect_replication(&settings.conn).await?;
    let identity = session::identify(&mut conn).await?;
    let facts = session::server_facts(&mut conn).await?;
    crate::preflight::check(&facts)?;

    // 2. The state directory and the repository: empty or this cluster's, writable.
    let checked = check(settings, &identity).await?;
    let repository_created = checked.existing.is_none();

    // 3. Write: slot, repository metadata, state. A slot this run created
    // is dropped again if the rest cannot be written.
    let slot_created = session::ensure_slot(&mut conn, &settings.slot).await?;
    conn.close().await;
    let meta = match write(settings, checked, &identity, &facts).await {
        Ok(meta) => meta,
        Err(error) if slot_created => return Err(drop_new_slot(settings, error).await),
        Err(error) => return Err(error),
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

/// Everything `init` checks before it writes: the state directory (this
/// cluster's or new, and writable), then the repository (the same; a
/// missing local directory is created, anything else that is not a
/// repository directory is an error), its keys, and that a local one can
/// be written.
async fn check(settings: &Settings, identity: &Identity) -> anyhow::Result<Checked> {
    let index_dir = settings.state_dir.join("index");
    let prior_state = if index_dir.is_dir() { Index::open(&index_dir)?.meta()? } else { None };
    if let Some(state) = &prior_state {
        session::check_same_cluster(
            &format!("state directory {}", settings.state_dir.display()),
            &state.system_identifier,
            &identity.system_identifier,
        )?;
    }
    check_state_writable(&settings.state_dir, &index_dir)?;
    // The key files before a missing repository directory is created for them.
    tidemark_repo::store::read_key_files(&settings.key_files)?;
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
    repo.check_local_writable().await?;
    Ok(Checked { repo, existing, encryption, index_dir, prior_state })
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

/// Whether the index can be made (or kept) under `state_dir`: the nearest
/// directory on the way to it that exists takes a probe file, created
/// exclusively and removed at once. Catches a directory of another user, a
/// read-only mount, or a file in the way, before the slot exists.
fn check_state_writable(state_dir: &Path, index_dir: &Path) -> Result<(), Fail> {
    let fail = |why: String| {
        Fail::new(
            format!("cannot write state directory {}: {why}", state_dir.display()),
            "point --state-dir at a directory this user can write (it is created if missing)",
        )
    };
    let mut nearest = index_dir;
    while std::fs::symlink_metadata(nearest).is_err() {
        nearest = match nearest.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
    }
    if !nearest.is_dir() {
        return Err(fail(format!("{} is not a directory", nearest.display())));
    }
    let probe = nearest.join(format!(".tidemark-probe.{}", std::process::id()));
    tidemark_repo::durable::create_exclusive(&probe).map_err(|e| fail(e.to_string()))?;
    std::fs::remove_file(&probe).map_err(|e| fail(format!("remove {}: {e}", probe.display())))
}

/// Writes a new repository's metadata and the state directory's index;
/// returns the state's metadata (where streaming starts).
async fn write(
    settings: &Settings,
    checked: Checked,
    identity: &Identity,
    facts: &ServerFacts,
) -> anyhow::Result<IndexMeta> {
    let Checked { repo, existing, encryption, index_dir, prior_state } = checked;
    match existing {
        // An encrypted repository of the older form gets its id and tags.
        Some(meta) => {
            repo.upgrade_if_older(meta).await?;
        }
        None => create_repository(repo, encryption, &identity.system_identifier, facts).await?,
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&index_dir).map_err(|e| {
        Fail::new(
            format!("cannot create state directory {}: {e}", settings.state_dir.display()),
            "check --state-dir and its permissions",
        )
    })?;
    let index = Index::open(&index_dir)?;
    if let Some(state) = prior_state {
        return Ok(state);
    }
    let meta = IndexMeta {
        system_identifier: identity.system_identifier.clone(),
        wal_segment_size: facts.wal_segment_size,
        stream_start_timeline: identity.timeline,
        stream_start_lsn: identity.xlogpos.segment_start(facts.wal_segment_size),
    };
    index.put_meta(&meta)?;
    Ok(meta)
}

/// Drops the slot this run created after `error` stopped the run, and
/// returns the error to report: `error` itself, or, when the slot could
/// not be dropped either, one that says so and how to drop it.
async fn drop_new_slot(settings: &Settings, error: anyhow::Error) -> anyhow::Error {
    let slot = &settings.slot;
    let dropped = async {
        let mut conn = session::connect_replication(&settings.conn).await?;
        conn.simple_query(&format!("DROP_REPLICATION_SLOT \"{slot}\"")).await?;
        conn.close().await;
        anyhow::Ok(())
    }
    .await;
    match dropped {
        Ok(()) => error,
        Err(drop_error) => Fail::new(
            format!("{error:#}; and the replication slot {slot} this run created could not be dropped: {drop_error:#}"),
            format!("drop it (SELECT pg_drop_replication_slot('{slot}')): it holds the server's WAL"),
        )
        .into(),
    }
}
