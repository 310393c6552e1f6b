//! Talking to PostgreSQL: our own client for the replication protocol (which
//! tokio-postgres cannot open), ordinary SQL sessions through tokio-postgres
//! over the same streams, and TLS per libpq's sslmode.

pub mod connection;
pub mod error;
pub mod session;
pub mod sql;
pub mod tls;

pub use connection::{Connection, ConnectionKind, CopyEvent, QueryEvent, QueryResult, Wake};
pub use error::PgError;
