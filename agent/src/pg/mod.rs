//! Talking to PostgreSQL: our own client for the replication protocol (which
//! tokio-postgres cannot open) and TLS per libpq's sslmode.

pub mod connection;
pub mod error;
pub mod session;
pub mod tls;

pub use connection::{Connection, ConnectionKind, CopyEvent, QueryEvent, QueryResult};
pub use error::PgError;
