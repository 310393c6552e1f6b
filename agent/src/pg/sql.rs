//! Ordinary SQL sessions (catalog reads, settings checks, restore points)
//! through tokio-postgres: typed rows and parameters. The connection itself
//! — TCP or Unix socket, TLS per sslmode — is ours (`connection::open_stream`),
//! so both kinds of session honour the same settings; tokio-postgres then
//! speaks the protocol (startup, password, md5 or SCRAM) over that stream.

use super::connection::open_stream;
use super::error::{PgError, ServerError};
use tidemark_proto::conninfo::ConnParams;

/// Opens a session on `params`' database (default `postgres`).
/// An SQL session with the first server of the list that answers (with
/// `target_session_attrs=read-write`, the first that accepts writes).
pub async fn connect(params: &ConnParams) -> Result<tokio_postgres::Client, PgError> {
    let candidates = params.candidates();
    let mut last_error = None;
    for candidate in &candidates {
        let client = match connect_one(candidate).await {
            Ok(client) => client,
            Err(e) => {
                last_error = Some(e);
                continue;
            }
        };
        if params.read_write {
            let read_only = client.query_one("SHOW transaction_read_only", &[]).await.map_err(from_postgres)?;
            if read_only.get::<_, String>(0) == "on" {
                let address = format!("{}:{}", candidate.host.as_deref().unwrap_or("localhost"), candidate.port);
                let refused =
                    std::io::Error::other("a standby: it accepts no writes (target_session_attrs=read-write)");
                last_error = Some(PgError::Connect { address, source: refused });
                continue;
            }
        }
        return Ok(client);
    }
    Err(last_error.unwrap_or_else(|| PgError::Protocol("no server to connect to".into())))
}

async fn connect_one(params: &ConnParams) -> Result<tokio_postgres::Client, PgError> {
    let user = params.user.clone().ok_or_else(|| PgError::Auth("no user name given".into()))?;
    let stream = open_stream(params).await?.stream;
    let mut config = tokio_postgres::Config::new();
    config
        .user(&user)
        .dbname(params.dbname.as_deref().unwrap_or("postgres"))
        // TLS, if any, is already under this stream.
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    if let Some(name) = &params.application_name {
        config.application_name(name);
    }
    if let Some(password) = &params.password {
        config.password(password.expose());
    }
    let (client, connection) = config.connect_raw(stream, tokio_postgres::NoTls).await.map_err(from_postgres)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("SQL session ended: {e}");
        }
    });
    Ok(client)
}

/// tokio-postgres's error as ours, so hints by SQLSTATE apply to both kinds of session.
pub fn from_postgres(error: tokio_postgres::Error) -> PgError {
    match error.as_db_error() {
        Some(db) => PgError::Server(ServerError {
            severity: db.severity().to_string(),
            code: db.code().code().to_string(),
            message: db.message().to_string(),
            detail: db.detail().map(str::to_string),
            hint: db.hint().map(str::to_string),
        }),
        None if error.to_string().contains("password") => PgError::Auth(error.to_string()),
        None => PgError::Protocol(error.to_string()),
    }
}
