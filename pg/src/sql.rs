//! Ordinary SQL sessions (catalog reads, settings checks, restore points;
//! the restore tool's sessions with a live database) through tokio-postgres:
//! typed rows and parameters. The socket is ours (`connection::open_socket`),
//! and so is TLS: tokio-postgres sends the SSLRequest and hands the socket
//! to [`RustlsConnect`], which verifies per sslmode and gives SCRAM the
//! server certificate's hash, so channel binding works here too.

use crate::connection::{end_point, open_socket, ConnectionKind, Socket};
use crate::error::{PgError, ServerError};
use crate::settings;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tidemark_proto::conninfo::{ChannelBindingMode, ConnParams, SslMode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::config::{ChannelBinding as BindingConfig, SslMode as TokioSslMode};
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

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
    let mut config = tokio_postgres::Config::new();
    config.user(&user).dbname(settings::database(params));
    config.application_name(params.application_name.as_deref().unwrap_or("tidemark"));
    if let Some(options) = &params.options {
        config.options(options);
    }
    if let Some(password) = settings::password_for(params, ConnectionKind::Sql) {
        config.password(password.expose());
    }
    config.channel_binding(match params.channel_binding {
        ChannelBindingMode::Disable => BindingConfig::Disable,
        ChannelBindingMode::Prefer => BindingConfig::Prefer,
        ChannelBindingMode::Require => BindingConfig::Require,
    });
    let client = match open_socket(params).await? {
        // libpq never uses TLS on a Unix socket, whatever sslmode says.
        Socket::Unix(unix) => {
            config.ssl_mode(TokioSslMode::Disable);
            let (client, connection) = config.connect_raw(unix, tokio_postgres::NoTls).await.map_err(from_postgres)?;
            spawn_connection(connection);
            client
        }
        Socket::Tcp(tcp, name) => {
            config.ssl_mode(match params.sslmode {
                SslMode::Disable => TokioSslMode::Disable,
                SslMode::Prefer => TokioSslMode::Prefer,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => TokioSslMode::Require,
            });
            let tls = RustlsConnect { params: params.clone(), name };
            let (client, connection) = config.connect_raw(tcp, tls).await.map_err(from_postgres)?;
            spawn_connection(connection);
            client
        }
    };
    Ok(client)
}

fn spawn_connection<F: Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static>(connection: F) {
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("SQL session ended: {e}");
        }
    });
}

/// The TLS handshake tokio-postgres asks for once the server has accepted
/// its SSLRequest: our verification per sslmode (`tls::config_for`).
pub struct RustlsConnect {
    params: ConnParams,
    /// The server's name, for SNI and the host-name check.
    name: String,
}

type Handshake = Pin<Box<dyn Future<Output = Result<RustlsStream, PgError>> + Send>>;

impl TlsConnect<TcpStream> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = PgError;
    type Future = Handshake;

    fn connect(self, tcp: TcpStream) -> Handshake {
        Box::pin(async move {
            let inner = crate::tls::handshake(tcp, &self.name, &self.params).await?;
            let certificate = inner.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
            // A certificate whose hash cannot be chosen offers no binding;
            // channel_binding=require then fails in tokio-postgres.
            let binding = certificate.and_then(|cert| end_point(&cert).ok());
            Ok(RustlsStream { inner, binding })
        })
    }
}

/// A TLS session carrying the server certificate's channel-binding data.
pub struct RustlsStream {
    inner: tokio_rustls::client::TlsStream<TcpStream>,
    binding: Option<Vec<u8>>,
}

impl TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        match &self.binding {
            Some(data) => ChannelBinding::tls_server_end_point(data.clone()),
            None => ChannelBinding::none(),
        }
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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
