//! The two error types both binaries share: [`RepoError`], what went wrong
//! with the repository, sorted by what the caller does next; and [`Fail`],
//! a failure found by a check of ours, with the hint that says what to do.
//! Each binary prints an error once, with the hint of the first cause in its
//! chain that has one.

use std::fmt;

/// A failure found by checking something, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fail {
    pub message: String,
    pub hint: String,
}

impl Fail {
    pub fn new(message: impl Into<String>, hint: impl Into<String>) -> Fail {
        Fail { message: message.into(), hint: hint.into() }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fail {}

/// Why a repository operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("repository {0} does not exist")]
    NoRepository(String),
    #[error("repository {0} is a file, not a directory")]
    NotADirectory(String),
    #[error("unsupported repository URL {0}")]
    UnsupportedUrl(String),
    #[error("cannot use repository {display}")]
    Configuration {
        display: String,
        #[source]
        source: object_store::Error,
    },
    #[error("repository {0} is not initialized (it has no repository.json)")]
    NotInitialized(String),
    #[error("there is no backup {0}")]
    NoSuchBackup(String),
    #[error("object {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// Key files: unreadable, malformed, wrong, missing, or given for a plain repository.
    #[error("{0}")]
    Keys(String),
    /// A key file group or others may access: refused before it is used.
    #[error("{0}")]
    KeyFileExposed(String),
    /// `repository.json` altered, rolled back, or signed by no key given.
    #[error("repository {0}")]
    Metadata(String),
    /// A delete asked of a handle that must not delete (no_delete).
    #[error("refusing to delete {0}: this process runs with no_delete")]
    NoDelete(String),
    /// The store refused or did not answer (network, credentials, outage).
    #[error("{context}")]
    Store {
        context: String,
        #[source]
        source: object_store::Error,
    },
    /// A local file of a `file://` repository (its directory, an fsync).
    #[error("{context}")]
    Local {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl RepoError {
    /// What to do about it, for the `hint:` line.
    pub fn hint(&self) -> &'static str {
        match self {
            RepoError::NoRepository(_) | RepoError::NotADirectory(_) => {
                "check --repo / TIDEMARK_REPO (`tidemark-agent init` creates a repository)"
            }
            RepoError::UnsupportedUrl(_) => {
                "use file:///path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix"
            }
            RepoError::Configuration { .. } => "check the URL and the AWS_* (GOOGLE_*, AZURE_*) variables",
            RepoError::NotInitialized(_) => "run `tidemark-agent init` with the same --repo first, or check --repo",
            RepoError::NoSuchBackup(_) => "`tidemark-restore list` shows the backups",
            RepoError::Corrupt { .. } => {
                "an object is missing or does not match its checksum; run `tidemark-restore verify` and restore from another copy"
            }
            RepoError::Keys(_) => {
                "pass the repository's key files with --key-file (repeat it for keys of objects written before a rotation)"
            }
            RepoError::KeyFileExposed(_) => {
                "make it private to the user that runs Tidemark (chmod 600 FILE), and treat a key others could read as exposed"
            }
            RepoError::Metadata(_) => {
                "put back the repository's own newest repository.json (from a copy); pass the current key's file too if it was not given"
            }
            RepoError::NoDelete(_) => "deleting is left to `tidemark-agent expire`, run with credentials that may delete",
            RepoError::Store {
                source: object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. },
                ..
            } => "these credentials may not do this: see the README's table of roles (only the administrator's may delete)",
            RepoError::Store { .. } => "check the repository is reachable (URL, credentials, network); nothing is guessed",
            RepoError::Local { .. } => "check the disk and the permissions of the repository directory",
        }
    }

    pub fn store(context: impl Into<String>, source: object_store::Error) -> RepoError {
        RepoError::Store { context: context.into(), source }
    }

    pub fn corrupt(key: &str, reason: impl Into<String>) -> RepoError {
        RepoError::Corrupt { key: key.to_string(), reason: reason.into() }
    }
}

/// The hint of the first cause in `error`'s chain that is ours.
pub fn hint_of(error: &anyhow::Error) -> Option<String> {
    error.chain().find_map(|cause| {
        cause
            .downcast_ref::<Fail>()
            .map(|fail| fail.hint.clone())
            .or_else(|| cause.downcast_ref::<RepoError>().map(|e| e.hint().to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_hint_in_the_chain_wins() {
        let error = anyhow::Error::new(Fail::new("inner", "do this")).context("while doing that");
        assert_eq!(hint_of(&error).as_deref(), Some("do this"));
        let error = anyhow::Error::new(RepoError::NoSuchBackup("x".into())).context("plain context");
        assert_eq!(hint_of(&error).as_deref(), Some("`tidemark-restore list` shows the backups"));
        assert_eq!(hint_of(&anyhow::anyhow!("nothing of ours")), None);
    }
}
