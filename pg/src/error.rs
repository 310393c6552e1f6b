//! Errors of a PostgreSQL connection, sorted by what the user does next.

use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The TCP or socket connection could not be made.
    #[error("could not connect to PostgreSQL at {address}: {source}")]
    Connect { address: String, source: std::io::Error },
    /// The server said no; `code` is the SQLSTATE.
    #[error("{0}")]
    Server(ServerError),
    /// We could not authenticate (missing password, unsupported method).
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("TLS: {0}")]
    Tls(String),
    /// The server sent something the protocol does not allow here.
    #[error("unexpected message from PostgreSQL: {0}")]
    Protocol(String),
    #[error("connection to PostgreSQL lost: {0}")]
    Io(#[from] std::io::Error),
}

/// The fields of an ErrorResponse that we show or act on.
#[derive(Debug, Clone, Default)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgreSQL said: {} (SQLSTATE {})", self.message, self.code)?;
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

impl PgError {
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Server(e) => Some(&e.code),
            _ => None,
        }
    }

    /// Whether retrying later can help (the server restarting, a network blip).
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Connect { .. } | PgError::Io(_) => true,
            // 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now.
            PgError::Server(e) => e.code.starts_with("57P") || e.code.starts_with("08"),
            _ => false,
        }
    }
}
