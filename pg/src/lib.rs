//! Connections to a PostgreSQL server, made as libpq makes them, for both
//! binaries: the agent's replication and SQL sessions, and the restore
//! tool's sessions with a live database it did not start.
//!
//! Module map:
//! - [`settings`]: a connection string completed from `PG*` variables, the
//!   service file and the password file (the I/O edge of `tidemark_proto::conninfo`).
//! - [`connection`]: our own protocol client: startup, authentication
//!   (SCRAM with channel binding), simple queries, the CopyBoth stream.
//! - [`tls`]: rustls configurations per sslmode, client certificates, and
//!   the channel-binding hash of a server certificate.
//! - [`sql`]: ordinary SQL sessions through tokio-postgres over the same
//!   streams and TLS.
//! - [`error`]: `PgError`, sorted by what the user does next, with hints.

pub mod connection;
pub mod error;
pub mod settings;
pub mod sql;
pub mod tls;

pub use connection::{Connection, ConnectionKind, CopyEvent, QueryEvent, QueryResult, Wake};
pub use error::PgError;
