//! One connection to PostgreSQL over the frontend/backend protocol: startup,
//! authentication, simple queries and the CopyBoth stream of replication.
//!
//! Message framing and SCRAM come from postgres-protocol; the I/O is ours.
//! Reads are cancel-safe: bytes land in `read_buf` only when a read completes,
//! and messages are parsed out of that buffer, so a `recv_copy` dropped inside
//! `tokio::select!` loses nothing.

use crate::error::{PgError, ServerError};
use crate::settings;
use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;
use tidemark_proto::conninfo::{ChannelBindingMode, ConnParams, SslMode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub use crate::settings::ConnectionKind;

/// Rows of a simple query, each value as text (NULL is `None`).
#[derive(Debug, Default)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl QueryResult {
    /// The first row's value in `column`, or an error naming what is missing.
    pub fn value(&self, column: &str) -> Result<Option<&str>, PgError> {
        let index = self
            .columns
            .iter()
            .position(|c| c == column)
            .ok_or_else(|| PgError::Protocol(format!("result has no column {column:?}")))?;
        let row = self.rows.first().ok_or_else(|| PgError::Protocol("result has no rows".into()))?;
        Ok(row.get(index).and_then(|v| v.as_deref()))
    }
}

/// One step of a command's answer, for commands (BASE_BACKUP) whose answer
/// mixes result sets and a CopyOut stream.
#[derive(Debug)]
pub enum QueryEvent {
    Columns(Vec<String>),
    Row(Vec<Option<String>>),
    Complete,
    CopyOut,
    CopyData(Bytes),
    CopyDone,
    Ready,
}

/// What arrives inside a replication stream.
#[derive(Debug)]
pub enum CopyEvent {
    Data(Bytes),
    /// The server ended the stream (end of timeline, or shutdown).
    Done,
}

pub struct Connection {
    stream: Box<dyn Stream>,
    /// A duplicate of the socket's descriptor when no TLS sits on it: the
    /// receive loop waits on and reads it with plain system calls (see
    /// [`Connection::wait_plain`]).
    plain: Option<OwnedFd>,
    /// The socket's `SO_RCVLOWAT` as last set (1, the kernel's default, until then).
    read_threshold: u32,
    read_buf: BytesMut,
    write_buf: BytesMut,
}

/// What [`Connection::wait_plain`] woke up for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The socket has bytes (or the server closed it: the read says which).
    Readable,
    /// The other descriptor became readable.
    Stop,
    TimedOut,
}

/// The opened byte stream to the server, before the startup exchange.
pub(crate) struct Opened {
    pub stream: Box<dyn Stream>,
    /// The server's certificate under TLS (SCRAM channel binding hashes it).
    pub certificate: Option<Vec<u8>>,
    /// The socket's descriptor, duplicated, when no TLS sits on it.
    pub plain: Option<OwnedFd>,
}

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

impl Connection {
    /// Connects and authenticates. `params.user` must be set by the caller.
    pub async fn connect(params: &ConnParams, kind: ConnectionKind) -> Result<Connection, PgError> {
        let opened = open_stream(params).await?;
        let mut conn = Connection {
            stream: opened.stream,
            plain: opened.plain,
            read_threshold: 1,
            read_buf: BytesMut::with_capacity(256 * 1024),
            write_buf: BytesMut::new(),
        };
        conn.startup(params, kind, opened.certificate).await?;
        Ok(conn)
    }

    async fn startup(
        &mut self,
        params: &ConnParams,
        kind: ConnectionKind,
        cert: Option<Vec<u8>>,
    ) -> Result<(), PgError> {
        let user = params.user.clone().ok_or_else(|| PgError::Auth("no user name given".into()))?;
        let mut startup: Vec<(&str, &str)> = vec![("user", &user)];
        let dbname = settings::database(params).to_string();
        match kind {
            ConnectionKind::Replication => startup.push(("replication", "true")),
            ConnectionKind::Sql => startup.push(("database", &dbname)),
        }
        let app = params.application_name.clone().unwrap_or_else(|| "tidemark".into());
        startup.push(("application_name", &app));
        if let Some(options) = &params.options {
            startup.push(("options", options));
        }
        frontend::startup_message(startup.iter().copied(), &mut self.write_buf)?;
        self.flush().await?;

        let secret = settings::password_for(params, kind);
        let password = || {
            secret.clone().ok_or_else(|| {
                PgError::Auth(
                    "the server asked for a password and none was given (URL, PGPASSWORD, a service or ~/.pgpass)"
                        .into(),
                )
            })
        };
        let mut bound = false;
        loop {
            match self.read_message().await? {
                Message::AuthenticationOk => break,
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.expose().as_bytes(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(user.as_bytes(), password()?.expose().as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mechanisms: Vec<String> =
                        body.mechanisms().map(|m| Ok(m.to_string())).collect().map_err(PgError::Io)?;
                    bound = self.scram(&mechanisms, password()?.expose(), cert.as_deref(), params).await?;
                }
                Message::ErrorResponse(body) => return Err(PgError::Server(server_error(&body))),
                _ => {
                    return Err(PgError::Auth("the server asked for an authentication method we do not support".into()))
                }
            }
        }
        if params.channel_binding == ChannelBindingMode::Require && !bound {
            return Err(channel_binding_missing());
        }
        // ParameterStatus and BackendKeyData until ReadyForQuery.
        loop {
            match self.read_message().await? {
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => return Err(PgError::Server(server_error(&body))),
                _ => {}
            }
        }
    }

    /// SCRAM-SHA-256, bound to the TLS session (`-PLUS`) when the server
    /// offers it and channel_binding allows; returns whether it was bound.
    async fn scram(
        &mut self,
        mechanisms: &[String],
        password: &str,
        cert: Option<&[u8]>,
        params: &ConnParams,
    ) -> Result<bool, PgError> {
        let has = |name: &str| mechanisms.iter().any(|m| m == name);
        let allowed = params.channel_binding != ChannelBindingMode::Disable;
        // Channel binding over TLS when offered; "y" (we could, the server
        // didn't offer) when on TLS without it; "n" without TLS or when disabled.
        let (mechanism, binding) = match cert {
            Some(cert) if allowed && has("SCRAM-SHA-256-PLUS") => {
                ("SCRAM-SHA-256-PLUS", ChannelBinding::tls_server_end_point(end_point(cert)?))
            }
            Some(_) if allowed => ("SCRAM-SHA-256", ChannelBinding::unrequested()),
            _ => ("SCRAM-SHA-256", ChannelBinding::unsupported()),
        };
        if params.channel_binding == ChannelBindingMode::Require && mechanism != "SCRAM-SHA-256-PLUS" {
            return Err(channel_binding_missing());
        }
        if !has("SCRAM-SHA-256") && mechanism == "SCRAM-SHA-256" {
            return Err(PgError::Auth(format!("server offers only SASL mechanisms {mechanisms:?}")));
        }
        let mut scram = ScramSha256::new(password.as_bytes(), binding);
        frontend::sasl_initial_response(mechanism, scram.message(), &mut self.write_buf)?;
        self.flush().await?;
        match self.read_message().await? {
            Message::AuthenticationSaslContinue(body) => {
                scram.update(body.data()).map_err(|e| PgError::Auth(e.to_string()))?
            }
            Message::ErrorResponse(body) => return Err(PgError::Server(server_error(&body))),
            _ => return Err(PgError::Protocol("expected SASL continue".into())),
        }
        frontend::sasl_response(scram.message(), &mut self.write_buf)?;
        self.flush().await?;
        match self.read_message().await? {
            Message::AuthenticationSaslFinal(body) => {
                scram.finish(body.data()).map_err(|e| PgError::Auth(format!("server signature rejected: {e}")))?;
                Ok(mechanism == "SCRAM-SHA-256-PLUS")
            }
            Message::ErrorResponse(body) => Err(PgError::Server(server_error(&body))),
            _ => Err(PgError::Protocol("expected SASL final".into())),
        }
    }

    /// Runs one command with the simple query protocol and collects its rows.
    pub async fn simple_query(&mut self, sql: &str) -> Result<QueryResult, PgError> {
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await?;
        let mut result = QueryResult::default();
        let mut error = None;
        loop {
            match self.read_message().await? {
                Message::RowDescription(body) => result.columns = column_names(&body)?,
                Message::DataRow(body) => result.rows.push(row_values(&body)?),
                Message::ErrorResponse(body) => error = Some(server_error(&body)),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(PgError::Server(e)),
            None => Ok(result),
        }
    }

    /// Sends START_REPLICATION (or any command answered with CopyBoth) and
    /// waits for the stream to begin.
    pub async fn start_copy_both(&mut self, command: &str) -> Result<(), PgError> {
        frontend::query(command, &mut self.write_buf)?;
        self.flush().await?;
        loop {
            match self.next_raw().await? {
                Raw::CopyBothResponse => return Ok(()),
                Raw::Message(Message::ErrorResponse(body)) => {
                    let error = server_error(&body);
                    self.wait_ready().await?;
                    return Err(PgError::Server(error));
                }
                Raw::Message(Message::NoticeResponse(_)) => {}
                Raw::Message(_) => return Err(PgError::Protocol(format!("unexpected reply to {command:?}"))),
            }
        }
    }

    /// Runs a command answered with CopyIn (UPLOAD_MANIFEST) and sends
    /// `data` as its input. An error leaves the connection ready for the
    /// next command.
    pub async fn copy_in(&mut self, command: &str, data: &[u8]) -> Result<(), PgError> {
        frontend::query(command, &mut self.write_buf)?;
        self.flush().await?;
        loop {
            match self.read_message().await? {
                Message::CopyInResponse(_) => break,
                Message::ErrorResponse(body) => {
                    let error = server_error(&body);
                    self.wait_ready().await?;
                    return Err(PgError::Server(error));
                }
                Message::NoticeResponse(_) | Message::ParameterStatus(_) => {}
                _ => return Err(PgError::Protocol(format!("unexpected reply to {command:?}"))),
            }
        }
        for piece in data.chunks(64 * 1024) {
            frontend::CopyData::new(piece)?.write(&mut self.write_buf);
            self.flush().await?;
        }
        frontend::copy_done(&mut self.write_buf);
        self.flush().await?;
        let mut error = None;
        loop {
            match self.read_message().await? {
                Message::ErrorResponse(body) => error = Some(server_error(&body)),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        error.map_or(Ok(()), |e| Err(PgError::Server(e)))
    }

    /// Sends a command whose answer is read with `next_query_event`.
    pub async fn send_query(&mut self, sql: &str) -> Result<(), PgError> {
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await
    }

    /// The next step of the answer; an ErrorResponse becomes an error (after
    /// the server is ready again, so the connection stays usable).
    pub async fn next_query_event(&mut self) -> Result<QueryEvent, PgError> {
        loop {
            let event = match self.read_message().await? {
                Message::RowDescription(body) => QueryEvent::Columns(column_names(&body)?),
                Message::DataRow(body) => QueryEvent::Row(row_values(&body)?),
                Message::CommandComplete(_) => QueryEvent::Complete,
                Message::CopyOutResponse(_) => QueryEvent::CopyOut,
                Message::CopyData(body) => QueryEvent::CopyData(body.into_bytes()),
                Message::CopyDone => QueryEvent::CopyDone,
                Message::ReadyForQuery(_) => QueryEvent::Ready,
                Message::ErrorResponse(body) => {
                    let error = server_error(&body);
                    self.wait_ready().await?;
                    return Err(PgError::Server(error));
                }
                _ => continue,
            };
            return Ok(event);
        }
    }

    /// The next CopyData payload or the end of the stream. Cancel-safe.
    pub async fn recv_copy(&mut self) -> Result<CopyEvent, PgError> {
        loop {
            if let Some(event) = self.try_recv_copy()? {
                return Ok(event);
            }
            self.fill().await?;
        }
    }

    /// A CopyData payload that is already buffered, without reading the socket.
    pub fn try_recv_copy(&mut self) -> Result<Option<CopyEvent>, PgError> {
        loop {
            match self.parse_buffered()? {
                None => return Ok(None),
                Some(Raw::Message(Message::CopyData(body))) => return Ok(Some(CopyEvent::Data(body.into_bytes()))),
                Some(Raw::Message(Message::CopyDone)) => return Ok(Some(CopyEvent::Done)),
                Some(Raw::Message(Message::ErrorResponse(body))) => return Err(PgError::Server(server_error(&body))),
                Some(Raw::Message(Message::NoticeResponse(_) | Message::ParameterStatus(_))) => {}
                Some(_) => return Err(PgError::Protocol("unexpected message inside the replication stream".into())),
            }
        }
    }

    /// Whether the socket can be waited on and read with plain system calls
    /// (no TLS on it): the receive loop then blocks its own thread in
    /// `poll(2)` instead of going through the async runtime for every
    /// message, which on a quiet database cost more CPU than the kernel's
    /// own work per commit.
    pub fn is_plain(&self) -> bool {
        self.plain.is_some()
    }

    /// Blocks the calling thread until the socket has bytes (when `read`),
    /// `stop` is readable, or `timeout` has passed. Only for a thread that
    /// runs nothing else (the receive loop's own).
    pub fn wait_plain(&self, read: bool, stop: BorrowedFd<'_>, timeout: Duration) -> Result<Wake, PgError> {
        let socket = self.plain.as_ref().ok_or_else(|| PgError::Protocol("wait_plain on a TLS connection".into()))?;
        wait_socket(socket.as_fd(), read, stop, timeout).map_err(PgError::Io)
    }

    /// How many bytes the socket must hold before `wait_plain` (and any
    /// other wait on it) sees it readable (see [`set_receive_threshold`]).
    pub fn set_read_threshold(&mut self, bytes: u32) -> Result<(), PgError> {
        if self.read_threshold == bytes {
            return Ok(());
        }
        let socket =
            self.plain.as_ref().ok_or_else(|| PgError::Protocol("read threshold on a TLS connection".into()))?;
        set_receive_threshold(socket.as_fd(), bytes).map_err(PgError::Io)?;
        self.read_threshold = bytes;
        Ok(())
    }

    /// Reads what the plain socket holds without blocking; false if it held
    /// nothing (a spurious wake-up). Parse it with `try_recv_copy`.
    pub fn read_plain(&mut self) -> Result<bool, PgError> {
        let socket = self.plain.as_ref().ok_or_else(|| PgError::Protocol("read_plain on a TLS connection".into()))?;
        self.read_buf.reserve(256 * 1024);
        let spare = self.read_buf.spare_capacity_mut();
        // SAFETY: recv writes at most `spare.len()` bytes into the buffer's
        // spare capacity, which is valid for writes of that length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            return match error.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(false),
                _ => Err(PgError::Io(error)),
            };
        }
        if n == 0 {
            return Err(server_closed());
        }
        // SAFETY: recv initialized the first `n` bytes of the spare capacity.
        unsafe { self.read_buf.set_len(self.read_buf.len() + n as usize) };
        Ok(true)
    }

    pub async fn send_copy_data(&mut self, payload: &[u8]) -> Result<(), PgError> {
        frontend::CopyData::new(payload)?.write(&mut self.write_buf);
        self.flush().await
    }

    /// Ends our side of the stream; then collect what follows with `finish_copy`.
    pub async fn send_copy_done(&mut self) -> Result<(), PgError> {
        frontend::copy_done(&mut self.write_buf);
        self.flush().await
    }

    /// After both sides sent CopyDone: the optional result set (next timeline
    /// and its start) and ReadyForQuery.
    pub async fn finish_copy(&mut self) -> Result<QueryResult, PgError> {
        let mut result = QueryResult::default();
        loop {
            match self.read_message().await? {
                Message::RowDescription(body) => result.columns = column_names(&body)?,
                Message::DataRow(body) => result.rows.push(row_values(&body)?),
                Message::ErrorResponse(body) => return Err(PgError::Server(server_error(&body))),
                Message::ReadyForQuery(_) => return Ok(result),
                // CopyData still in flight when we ended our side.
                _ => {}
            }
        }
    }

    async fn wait_ready(&mut self) -> Result<(), PgError> {
        loop {
            if let Raw::Message(Message::ReadyForQuery(_)) = self.next_raw().await? {
                return Ok(());
            }
        }
    }

    async fn read_message(&mut self) -> Result<Message, PgError> {
        match self.next_raw().await? {
            Raw::Message(message) => Ok(message),
            Raw::CopyBothResponse => Err(PgError::Protocol("unexpected CopyBothResponse".into())),
        }
    }

    async fn next_raw(&mut self) -> Result<Raw, PgError> {
        loop {
            if let Some(raw) = self.parse_buffered()? {
                return Ok(raw);
            }
            self.fill().await?;
        }
    }

    /// One whole message out of `read_buf`, or `None` if it is not all here yet.
    fn parse_buffered(&mut self) -> Result<Option<Raw>, PgError> {
        // postgres-protocol does not know 'W' (CopyBothResponse): peek at the
        // header and consume that one ourselves.
        if self.read_buf.len() >= 5 && self.read_buf.first() == Some(&b'W') {
            let len = self.read_buf.get(1..5).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0);
            let total = 1 + len as usize;
            if self.read_buf.len() < total {
                return Ok(None);
            }
            self.read_buf.advance(total);
            return Ok(Some(Raw::CopyBothResponse));
        }
        match Message::parse(&mut self.read_buf) {
            Ok(Some(message)) => Ok(Some(Raw::Message(message))),
            Ok(None) => Ok(None),
            Err(e) => Err(PgError::Protocol(e.to_string())),
        }
    }

    async fn fill(&mut self) -> Result<(), PgError> {
        self.read_buf.reserve(256 * 1024);
        let n = self.stream.read_buf(&mut self.read_buf).await?;
        if n == 0 {
            return Err(server_closed());
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), PgError> {
        self.stream.write_all(&self.write_buf).await?;
        self.write_buf.clear();
        self.stream.flush().await?;
        Ok(())
    }

    /// Says goodbye politely; errors are irrelevant at this point.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write_buf);
        let _ = self.flush().await;
    }
}

enum Raw {
    Message(Message),
    CopyBothResponse,
}

fn column_names(body: &postgres_protocol::message::backend::RowDescriptionBody) -> Result<Vec<String>, PgError> {
    Ok(body.fields().map(|f| Ok(f.name().to_string())).collect()?)
}

/// A row's values as text; NULL is `None`.
fn row_values(body: &postgres_protocol::message::backend::DataRowBody) -> Result<Vec<Option<String>>, PgError> {
    let buffer = body.buffer();
    Ok(body
        .ranges()
        .map(|range| Ok(range.and_then(|r| buffer.get(r)).map(|v| String::from_utf8_lossy(v).into_owned())))
        .collect()?)
}

fn server_error(body: &postgres_protocol::message::backend::ErrorResponseBody) -> ServerError {
    let mut error = ServerError::default();
    let mut fields = body.fields();
    while let Ok(Some(field)) = fields.next() {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'S' => error.severity = value,
            b'C' => error.code = value,
            b'M' => error.message = value,
            b'D' => error.detail = Some(value),
            b'H' => error.hint = Some(value),
            _ => {}
        }
    }
    error
}

fn server_closed() -> PgError {
    PgError::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the server closed the connection"))
}

/// The byte stream to the server: TCP (with TLS as sslmode asks; the
/// server's certificate comes along for channel binding) or a Unix socket
/// (a host that is a directory, or no host at all: libpq's default socket).
/// Shared by our replication client and the ordinary sessions of `sql`.
pub(crate) async fn open_stream(params: &ConnParams) -> Result<Opened, PgError> {
    match open_socket(params).await? {
        Socket::Unix(unix) => {
            let plain = Some(unix.as_fd().try_clone_to_owned()?);
            Ok(Opened { stream: Box::new(unix), certificate: None, plain })
        }
        Socket::Tcp(tcp, name) => negotiate_tls(tcp, &name, params).await,
    }
}

/// A connected socket before any protocol byte: a Unix socket, or TCP with
/// the server's name (what certificates are checked against).
pub(crate) enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream, String),
}

/// Connects to `params`' server: `hostaddr` if given (the name stays
/// `host`), else `host`, else the default socket directory.
pub(crate) async fn open_socket(params: &ConnParams) -> Result<Socket, PgError> {
    let timeout = params.connect_timeout_secs.map(Duration::from_secs).unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
    let host = match (&params.host, &params.hostaddr) {
        (Some(host), _) => host.clone(),
        (None, Some(address)) => address.clone(),
        (None, None) => settings::default_socket_dir().to_string_lossy().into_owned(),
    };
    if host.starts_with('/') && params.hostaddr.is_none() {
        let address = format!("{host}/.s.PGSQL.{}", params.port);
        let connect_error = |source| PgError::Connect { address: address.clone(), source };
        let unix = tokio::time::timeout(timeout, UnixStream::connect(&address))
            .await
            .map_err(|_| connect_error(timed_out()))?
            .map_err(connect_error)?;
        return Ok(Socket::Unix(unix));
    }
    let target = params.hostaddr.clone().unwrap_or_else(|| host.clone());
    let address = format!("{target}:{}", params.port);
    let connect_error = |source| PgError::Connect { address: address.clone(), source };
    let tcp = tokio::time::timeout(timeout, TcpStream::connect((target.as_str(), params.port)))
        .await
        .map_err(|_| connect_error(timed_out()))?
        .map_err(connect_error)?;
    tcp.set_nodelay(true)?;
    Ok(Socket::Tcp(tcp, host))
}

fn plain_tcp(tcp: TcpStream) -> Result<Opened, PgError> {
    let plain = Some(tcp.as_fd().try_clone_to_owned()?);
    Ok(Opened { stream: Box::new(tcp), certificate: None, plain })
}

/// SSLRequest, then the handshake per sslmode, or plaintext where sslmode allows it.
async fn negotiate_tls(mut tcp: TcpStream, host: &str, params: &ConnParams) -> Result<Opened, PgError> {
    if params.sslmode == SslMode::Disable {
        return plain_tcp(tcp);
    }
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        if params.sslmode == SslMode::Prefer {
            return plain_tcp(tcp);
        }
        return Err(PgError::Tls(format!(
            "the server does not support TLS but sslmode is {:?}; enable ssl on the server or lower sslmode",
            params.sslmode
        )));
    }
    let tls = crate::tls::handshake(tcp, host, params).await?;
    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref().to_vec());
    Ok(Opened { stream: Box::new(tls), certificate: cert, plain: None })
}

/// The `tls-server-end-point` channel-binding data of a server certificate.
pub(crate) fn end_point(cert: &[u8]) -> Result<Vec<u8>, PgError> {
    let hash = tidemark_proto::certificate::binding_hash(cert).map_err(|e| PgError::Tls(e.to_string()))?;
    Ok(hash.digest(cert))
}

fn channel_binding_missing() -> PgError {
    PgError::Auth(
        "channel_binding=require, but the server did not authenticate with SCRAM-SHA-256-PLUS over TLS".into(),
    )
}

/// Blocks until `socket` is readable (when `read`), `stop` is readable, or
/// `timeout` has passed; an interrupted wait counts as timed out (the
/// caller looks at its deadlines again).
fn wait_socket(socket: BorrowedFd<'_>, read: bool, stop: BorrowedFd<'_>, timeout: Duration) -> std::io::Result<Wake> {
    let mut fds = [
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: socket.as_raw_fd(), events: if read { libc::POLLIN } else { 0 }, revents: 0 },
    ];
    // Rounded up, so a deadline less than a millisecond away is not a busy loop.
    let millis = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
    // SAFETY: `fds` is a valid array of two pollfd structs for the duration
    // of the call, and both descriptors are open (the callers' borrows).
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
    if ready < 0 {
        let error = std::io::Error::last_os_error();
        return if error.kind() == std::io::ErrorKind::Interrupted { Ok(Wake::TimedOut) } else { Err(error) };
    }
    if fds[0].revents != 0 {
        return Ok(Wake::Stop);
    }
    if fds[1].revents != 0 {
        return Ok(Wake::Readable);
    }
    Ok(Wake::TimedOut)
}

/// `SO_RCVLOWAT`: how many bytes a socket must hold before a wait on it
/// sees it readable. TCP honours it in poll(2) (and epoll); a Unix socket
/// is readable at any byte whatever it says. A read without blocking
/// returns what is there either way, and the end of the stream or an error
/// wakes the wait at once.
fn set_receive_threshold(socket: BorrowedFd<'_>, bytes: u32) -> std::io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the option value points to a c_int that lives for the call,
    // and its length is passed; the descriptor is open (the caller's borrow).
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod socket_tests {
    use super::*;
    use std::io::{Read, Write};

    /// Reads without blocking, trying again (up to 10 s) while nothing has arrived yet.
    fn read_some(socket: &mut std::net::TcpStream, buffer: &mut [u8]) -> usize {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match socket.read(buffer) {
                Ok(n) => return n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// What the quiet receive loop relies on, on a real loopback TCP pair:
    /// below the threshold the wait times out, yet a read without blocking
    /// gets the bytes; at the threshold, or when the peer closes, the wait
    /// wakes; back at 1 every byte wakes it.
    #[test]
    fn a_receive_threshold_holds_waits_but_not_reads() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut sender = std::net::TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (mut receiver, _) = listener.accept().expect("accept");
        let (stop, _stop_writer) = std::os::unix::net::UnixStream::pair().expect("pair");
        let wait = |receiver: &std::net::TcpStream, millis| {
            wait_socket(receiver.as_fd(), true, stop.as_fd(), Duration::from_millis(millis)).expect("poll")
        };
        set_receive_threshold(receiver.as_fd(), 64 * 1024).expect("set threshold");
        sender.write_all(&[7u8; 150]).expect("send a commit's worth");
        assert_eq!(wait(&receiver, 300), Wake::TimedOut, "150 bytes are below the threshold");
        receiver.set_nonblocking(true).expect("nonblocking");
        let mut buffer = vec![0u8; 256 * 1024];
        // The bytes may still be on their way on a loaded machine: retry the read.
        let got = read_some(&mut receiver, &mut buffer);
        assert_eq!(got, 150, "a read without blocking gets what is below the threshold");
        sender.write_all(&vec![8u8; 64 * 1024]).expect("send load");
        assert_eq!(wait(&receiver, 10_000), Wake::Readable, "64 kB reach the threshold");
        let mut total = 0;
        while total < 64 * 1024 {
            total += read_some(&mut receiver, &mut buffer);
        }
        set_receive_threshold(receiver.as_fd(), 1).expect("reset threshold");
        sender.write_all(&[9u8; 10]).expect("send");
        assert_eq!(wait(&receiver, 10_000), Wake::Readable, "at 1, any byte wakes the wait");
        assert_eq!(read_some(&mut receiver, &mut buffer), 10);
        set_receive_threshold(receiver.as_fd(), 64 * 1024).expect("set threshold");
        drop(sender);
        assert_eq!(wait(&receiver, 10_000), Wake::Readable, "the peer's close wakes the wait");
        assert_eq!(receiver.read(&mut buffer).expect("read"), 0, "end of stream");
    }
}
