//! PostgreSQL connection settings resolved the way libpq resolves them.
//!
//! Precedence, later wins: built-in defaults, `PG*` environment variables,
//! the service's section of `pg_service.conf` (named by `service=` or
//! `PGSERVICE`), then the URL or `key=value` string. The password comes from
//! there, else a matching `.pgpass` line. Reading the environment and the
//! files is the caller's job (`tidemark_pg::settings`); everything here is pure.

use std::collections::BTreeMap;
use std::fmt;

/// A password or key. Its `Debug` and `Display` print `_`, so it can sit in
/// structs that get logged without leaking.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    /// The secret itself; call only where it is sent to the server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("_")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("_")
    }
}

/// libpq's sslmode values (allow is treated as prefer: TLS when the server
/// offers it, rather than plaintext first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(text: &str) -> Result<SslMode, ConnInfoError> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(ConnInfoError::BadValue("sslmode", other.to_string())),
        })
    }
}

/// Everything needed to open a connection. `Debug` is safe: the password is a [`Secret`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnParams {
    /// A host name, an IP address, or a directory holding a Unix socket (starts with `/`).
    pub host: Option<String>,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub dbname: Option<String>,
    pub sslmode: SslMode,
    /// A file of root certificates, or `system` for the host's trusted roots
    /// (which, as in libpq, implies and requires `verify-full`).
    pub sslrootcert: Option<String>,
    /// A client certificate and its key (PEM), sent when the server asks.
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
    pub channel_binding: ChannelBindingMode,
    /// The address to connect to instead of resolving `host` (which still
    /// names the server for certificate checks and `.pgpass`); one per host.
    pub hostaddr: Option<String>,
    /// The password file (`passfile=`, `PGPASSFILE`); the caller's default is `~/.pgpass`.
    pub passfile: Option<String>,
    /// Command-line options sent at startup (`options=-c search_path=...`).
    pub options: Option<String>,
    pub application_name: Option<String>,
    pub connect_timeout_secs: Option<u64>,
    /// Every server to try, in order, with its port (libpq's `host=a,b
    /// port=5432,5433` or `postgresql://a:5432,b:5433/`); `host` and
    /// `port` are the first. Empty for a single server.
    pub alternatives: Vec<(String, u16)>,
    /// `target_session_attrs=read-write` (or `primary`): only a server that
    /// accepts writes will do, so after a failover the new primary is found.
    pub read_write: bool,
    /// The ports as given (one, or one per host), until paired.
    port_list: Vec<u16>,
    /// Whether sslmode was given (anywhere) rather than defaulted.
    sslmode_given: bool,
    /// The `service=` named in the settings, if any.
    service: Option<String>,
}

/// libpq's `channel_binding`: whether SCRAM must bind the session to the
/// server's TLS certificate (so a man in the middle cannot relay it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelBindingMode {
    Disable,
    Prefer,
    Require,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnInfoError {
    #[error("invalid connection URL: {0}")]
    BadUrl(String),
    #[error("invalid value {1:?} for connection setting {0}")]
    BadValue(&'static str, String),
    #[error("unknown connection setting {0:?}")]
    UnknownKey(String),
    #[error("connection setting {0} is not supported by Tidemark; leave it out")]
    Unsupported(String),
}

impl Default for ConnParams {
    fn default() -> Self {
        ConnParams {
            host: None,
            port: 5432,
            user: None,
            password: None,
            dbname: None,
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            channel_binding: ChannelBindingMode::Prefer,
            hostaddr: None,
            passfile: None,
            options: None,
            application_name: None,
            connect_timeout_secs: None,
            alternatives: Vec::new(),
            read_write: false,
            port_list: Vec::new(),
            sslmode_given: false,
            service: None,
        }
    }
}

impl ConnParams {
    /// Resolves settings from an optional URL or `key=value` string and the
    /// environment (passed in as a map of `PG*` variables), without a service file.
    pub fn resolve(url: Option<&str>, env: &BTreeMap<String, String>) -> Result<ConnParams, ConnInfoError> {
        ConnParams::resolve_with_service(url, env, None)
    }

    /// The service the settings name (`service=` in them, else `PGSERVICE`),
    /// whose section of `pg_service.conf` the caller then reads.
    pub fn service_name(url: Option<&str>, env: &BTreeMap<String, String>) -> Result<Option<String>, ConnInfoError> {
        let mut explicit = ConnParams::default();
        explicit.apply_explicit(url)?;
        Ok(explicit.service.or_else(|| env.get("PGSERVICE").filter(|v| !v.is_empty()).cloned()))
    }

    /// As [`ConnParams::resolve`], with the named service's `key=value` lines
    /// between the environment and the explicit settings, as libpq orders them.
    pub fn resolve_with_service(
        url: Option<&str>,
        env: &BTreeMap<String, String>,
        service: Option<&[(String, String)]>,
    ) -> Result<ConnParams, ConnInfoError> {
        let mut params = ConnParams::default();
        let env_keys = [
            ("PGHOST", "host"),
            ("PGHOSTADDR", "hostaddr"),
            ("PGPORT", "port"),
            ("PGUSER", "user"),
            ("PGPASSWORD", "password"),
            ("PGPASSFILE", "passfile"),
            ("PGDATABASE", "dbname"),
            ("PGOPTIONS", "options"),
            ("PGSSLMODE", "sslmode"),
            ("PGSSLROOTCERT", "sslrootcert"),
            ("PGSSLCERT", "sslcert"),
            ("PGSSLKEY", "sslkey"),
            ("PGCHANNELBINDING", "channel_binding"),
            ("PGAPPNAME", "application_name"),
            ("PGCONNECT_TIMEOUT", "connect_timeout"),
            ("PGTARGETSESSIONATTRS", "target_session_attrs"),
            ("PGGSSENCMODE", "gssencmode"),
        ];
        for (var, key) in env_keys {
            if let Some(value) = env.get(var).filter(|v| !v.is_empty()) {
                params.set(key, value)?;
            }
        }
        for (key, value) in service.unwrap_or_default() {
            if key == "service" {
                return Err(ConnInfoError::BadValue("service", "a service that names another service".into()));
            }
            params.set(key, value)?;
        }
        params.apply_explicit(url)?;
        params.pair_hosts_and_ports()?;
        params.check_root_cert_mode()?;
        Ok(params)
    }

    fn apply_explicit(&mut self, url: Option<&str>) -> Result<(), ConnInfoError> {
        match url {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => self.apply_url(url),
            Some(keywords) if !keywords.trim().is_empty() => {
                for (key, value) in parse_keywords(keywords)? {
                    self.set(&key, &value)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// `sslrootcert=system` trusts every authority the host trusts, so only
    /// a check of the host name makes it safe: libpq defaults sslmode to
    /// verify-full with it and refuses anything weaker.
    fn check_root_cert_mode(&mut self) -> Result<(), ConnInfoError> {
        if self.sslrootcert.as_deref() != Some("system") {
            return Ok(());
        }
        if !self.sslmode_given {
            self.sslmode = SslMode::VerifyFull;
        }
        if self.sslmode != SslMode::VerifyFull {
            return Err(ConnInfoError::BadValue(
                "sslmode",
                format!("{:?} with sslrootcert=system (use sslmode=verify-full)", self.sslmode),
            ));
        }
        Ok(())
    }

    /// One `ConnParams` per server to try, in order.
    pub fn candidates(&self) -> Vec<ConnParams> {
        if self.alternatives.is_empty() {
            return vec![self.clone()];
        }
        let addresses: Vec<&str> = self.hostaddr.as_deref().map(|a| a.split(',').collect()).unwrap_or_default();
        self.alternatives
            .iter()
            .enumerate()
            .map(|(i, (host, port))| ConnParams {
                host: Some(host.clone()).filter(|h| !h.is_empty()),
                hostaddr: addresses.get(i).map(|a| a.to_string()).filter(|a| !a.is_empty()),
                port: *port,
                alternatives: Vec::new(),
                ..self.clone()
            })
            .collect()
    }

    /// Pairs a list of hosts with its ports, as libpq does: one port for
    /// all, or one per host.
    fn pair_hosts_and_ports(&mut self) -> Result<(), ConnInfoError> {
        let mut hosts: Vec<String> = self.host.as_deref().unwrap_or("").split(',').map(str::to_string).collect();
        if let Some(addresses) = &self.hostaddr {
            let count = addresses.split(',').count();
            // hostaddr alone: one (nameless) server per address.
            if self.host.is_none() {
                hosts = vec![String::new(); count];
            }
            if count != hosts.len() {
                return Err(ConnInfoError::BadValue(
                    "hostaddr",
                    format!("{count} addresses for {} hosts (give one per host)", hosts.len()),
                ));
            }
        }
        let ports = if self.port_list.is_empty() { vec![self.port] } else { self.port_list.clone() };
        if hosts.len() == 1 && ports.len() == 1 {
            return Ok(());
        }
        let paired: Vec<(String, u16)> = match (hosts.len(), ports.as_slice()) {
            (_, [one]) => hosts.iter().map(|h| (h.clone(), *one)).collect(),
            (h, many) if h == many.len() => hosts.iter().cloned().zip(many.iter().copied()).collect(),
            _ => {
                return Err(ConnInfoError::BadValue(
                    "port",
                    format!("{} ports for {} hosts (give one port, or one per host)", ports.len(), hosts.len()),
                ))
            }
        };
        if let Some((host, port)) = paired.first() {
            self.host = Some(host.clone()).filter(|h| !h.is_empty());
            self.port = *port;
        }
        self.alternatives = paired;
        Ok(())
    }

    fn set(&mut self, key: &str, value: &str) -> Result<(), ConnInfoError> {
        match key {
            "host" => self.host = Some(value.to_string()),
            "hostaddr" => self.hostaddr = Some(value.to_string()),
            "port" => {
                let ports: Result<Vec<u16>, _> = value.split(',').map(|p| p.trim().parse::<u16>()).collect();
                let ports = ports.map_err(|_| ConnInfoError::BadValue("port", value.to_string()))?;
                self.port = *ports.first().ok_or_else(|| ConnInfoError::BadValue("port", value.to_string()))?;
                self.port_list = ports;
            }
            "target_session_attrs" => {
                self.read_write = match value {
                    "any" => false,
                    "read-write" | "primary" => true,
                    other => return Err(ConnInfoError::BadValue("target_session_attrs", other.to_string())),
                }
            }
            "user" => self.user = Some(value.to_string()),
            "password" => self.password = Some(Secret::new(value)),
            "dbname" => self.dbname = Some(value.to_string()),
            "sslmode" => {
                self.sslmode = SslMode::parse(value)?;
                self.sslmode_given = true;
            }
            "sslrootcert" => self.sslrootcert = Some(value.to_string()),
            "sslcert" => self.sslcert = Some(value.to_string()),
            "sslkey" => self.sslkey = Some(value.to_string()),
            "channel_binding" => {
                self.channel_binding = match value {
                    "disable" => ChannelBindingMode::Disable,
                    "prefer" => ChannelBindingMode::Prefer,
                    "require" => ChannelBindingMode::Require,
                    other => return Err(ConnInfoError::BadValue("channel_binding", other.to_string())),
                }
            }
            "service" => self.service = Some(value.to_string()),
            "passfile" => self.passfile = Some(value.to_string()),
            "options" => self.options = Some(value.to_string()).filter(|o| !o.is_empty()),
            // No GSSAPI here: "prefer" falls back as libpq's does without it.
            "gssencmode" if value == "disable" || value == "prefer" => {}
            "gssencmode" => return Err(ConnInfoError::BadValue("gssencmode", format!("{value} (no GSSAPI support)"))),
            // Certificate revocation lists and encrypted keys are not read:
            // refused rather than ignored, so nobody believes they are checked.
            "sslcrl" | "sslcrldir" | "sslpassword" => return Err(ConnInfoError::Unsupported(key.to_string())),
            "application_name" => self.application_name = Some(value.to_string()),
            "connect_timeout" => {
                self.connect_timeout_secs =
                    Some(value.parse().map_err(|_| ConnInfoError::BadValue("connect_timeout", value.to_string()))?)
            }
            // Accepted and meaningless here: the replication kind is the
            // caller's choice; the rest are TCP and TLS details rustls and
            // the kernel decide.
            "replication"
            | "fallback_application_name"
            | "keepalives"
            | "keepalives_idle"
            | "keepalives_interval"
            | "keepalives_count"
            | "tcp_user_timeout"
            | "sslsni"
            | "sslcompression"
            | "client_encoding" => {}
            other => return Err(ConnInfoError::UnknownKey(other.to_string())),
        }
        Ok(())
    }

    fn apply_url(&mut self, text: &str) -> Result<(), ConnInfoError> {
        // `postgresql://user@a:5432,b:5433/db`: the url crate takes one
        // host, so the list is taken out here and the first put back.
        let (text, listed) = split_host_list(text);
        let parsed = url::Url::parse(&text).map_err(|e| ConnInfoError::BadUrl(e.to_string()))?;
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        if let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            self.host = Some(decode(host));
        }
        if let Some(port) = parsed.port() {
            self.port = port;
        }
        if !parsed.username().is_empty() {
            self.user = Some(decode(parsed.username()));
        }
        if let Some(password) = parsed.password() {
            self.password = Some(Secret::new(decode(password)));
        }
        let path = parsed.path().trim_start_matches('/');
        if !path.is_empty() {
            self.dbname = Some(decode(path));
        }
        for (key, value) in parsed.query_pairs() {
            self.set(&key, &value)?;
        }
        if let Some(listed) = listed {
            let mut hosts = Vec::new();
            let mut ports = Vec::new();
            for entry in &listed {
                let (host, port) = host_and_port(entry, self.port)?;
                hosts.push(decode(&host));
                ports.push(port);
            }
            self.host = Some(hosts.join(","));
            self.port_list = ports;
        }
        Ok(())
    }

    /// The URL form with the password left out, for messages and logs.
    pub fn redacted(&self) -> String {
        format!(
            "host={} port={} user={}",
            self.host.as_deref().unwrap_or("(default)"),
            self.port,
            self.user.as_deref().unwrap_or("(default)")
        )
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` of a URL's host list.
fn host_and_port(entry: &str, default_port: u16) -> Result<(String, u16), ConnInfoError> {
    let bad = || ConnInfoError::BadValue("host", entry.to_string());
    let (host, port) = match entry.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            (host, after.strip_prefix(':'))
        }
        None => match entry.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (entry, None),
        },
    };
    let port = match port {
        Some(text) => text.parse().map_err(|_| ConnInfoError::BadValue("port", text.to_string()))?,
        None => default_port,
    };
    Ok((host.to_string(), port))
}

/// A URL whose host part lists several servers, with the list taken out:
/// the URL with only the first server, and the list (`host[:port]` each).
fn split_host_list(text: &str) -> (String, Option<Vec<String>>) {
    let Some((scheme, rest)) = text.split_once("://") else { return (text.to_string(), None) };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((user, hosts)) => (format!("{user}@"), hosts),
        None => (String::new(), authority),
    };
    if !hosts.contains(',') {
        return (text.to_string(), None);
    }
    let listed: Vec<String> = hosts.split(',').map(str::to_string).collect();
    let first = listed.first().cloned().unwrap_or_default();
    (format!("{scheme}://{userinfo}{first}{tail}"), Some(listed))
}

/// Parses libpq's `key=value key='quoted value'` form.
fn parse_keywords(text: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ConnInfoError::BadUrl(format!("missing \"=\" after {key:?}")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(ConnInfoError::BadUrl("unterminated quoted string".into())),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    value.extend(chars.next());
                    continue;
                }
                value.push(c);
                chars.next();
            }
        }
        pairs.push((key, value));
    }
}

/// The `key=value` lines of the section `[name]` of a `pg_service.conf`,
/// or `None` when the file has no such section. `#` starts a comment line.
pub fn service_section(content: &str, name: &str) -> Result<Option<Vec<(String, String)>>, ConnInfoError> {
    let mut found: Option<Vec<(String, String)>> = None;
    let mut inside = false;
    for (number, line) in content.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[') {
            // The first section of that name counts, as in libpq.
            if found.is_some() && inside {
                break;
            }
            inside = section.strip_suffix(']').map(str::trim) == Some(name);
            if inside {
                found = Some(Vec::new());
            }
            continue;
        }
        if !inside {
            continue;
        }
        let (key, value) = line.split_once('=').ok_or_else(|| {
            ConnInfoError::BadValue("service", format!("line {} of the service file has no \"=\"", number + 1))
        })?;
        if let Some(pairs) = found.as_mut() {
            pairs.push((key.trim().to_string(), value.trim().to_string()));
        }
    }
    Ok(found)
}

/// Finds the password for a connection in `.pgpass` content: the first line
/// `host:port:database:user:password` whose fields match (`*` matches
/// anything; `\` escapes `:` and `\`). Replication connections match the
/// database field `replication`, as in libpq.
pub fn pgpass_lookup(content: &str, host: &str, port: u16, database: &str, user: &str) -> Option<Secret> {
    let port = port.to_string();
    for line in content.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass_line(line);
        let [f_host, f_port, f_db, f_user, password] = fields.as_slice() else { continue };
        let matches = |field: &str, value: &str| field == "*" || field == value;
        // libpq treats a "localhost" entry as matching the default Unix socket too.
        let host_matches = matches(f_host, host) || (f_host == "localhost" && host.starts_with('/'));
        if host_matches && matches(f_port, &port) && matches(f_db, database) && matches(f_user, user) {
            return Some(Secret::new(password.clone()));
        }
    }
    None
}

fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(next), Some(field)) = (chars.next(), fields.last_mut()) {
                    field.push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(field) = fields.last_mut() {
                    field.push(c);
                }
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_hosts_in_urls_and_keywords() {
        let url = "postgresql://tidemark:pw@db1:5432,db2:5433/postgres?target_session_attrs=read-write";
        let params = ConnParams::resolve(Some(url), &env(&[])).expect("valid");
        assert_eq!(params.alternatives, vec![("db1".to_string(), 5432), ("db2".to_string(), 5433)]);
        assert_eq!((params.host.as_deref(), params.port, params.read_write), (Some("db1"), 5432, true));
        assert_eq!(params.user.as_deref(), Some("tidemark"));
        let second = &params.candidates()[1];
        assert_eq!((second.host.as_deref(), second.port, second.alternatives.len()), (Some("db2"), 5433, 0));
        let keywords = ConnParams::resolve(Some("host=a,b port=6000 user=u"), &env(&[])).expect("valid");
        assert_eq!(keywords.alternatives, vec![("a".to_string(), 6000), ("b".to_string(), 6000)]);
        let single = ConnParams::resolve(Some("postgresql://u@db:7/x"), &env(&[])).expect("valid");
        assert!(single.alternatives.is_empty() && single.candidates().len() == 1);
        assert!(ConnParams::resolve(Some("host=a,b,c port=1,2"), &env(&[])).is_err());
        assert!(ConnParams::resolve(Some("host=a target_session_attrs=standby"), &env(&[])).is_err());
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn url_beats_environment() {
        let params = ConnParams::resolve(
            Some("postgresql://alice:s%40cret@db.example:6543/app?sslmode=require&application_name=tm"),
            &env(&[("PGHOST", "other"), ("PGUSER", "bob"), ("PGPORT", "5433")]),
        )
        .expect("valid");
        assert_eq!(params.host.as_deref(), Some("db.example"));
        assert_eq!(params.port, 6543);
        assert_eq!(params.user.as_deref(), Some("alice"));
        assert_eq!(params.password.as_ref().map(Secret::expose), Some("s@cret"));
        assert_eq!(params.dbname.as_deref(), Some("app"));
        assert_eq!(params.sslmode, SslMode::Require);
        assert_eq!(params.application_name.as_deref(), Some("tm"));
    }

    #[test]
    fn environment_alone() {
        let params = ConnParams::resolve(
            None,
            &env(&[("PGHOST", "/run/pg"), ("PGPORT", "5433"), ("PGPASSWORD", "pw"), ("PGSSLMODE", "verify-full")]),
        )
        .expect("valid");
        assert_eq!(params.host.as_deref(), Some("/run/pg"));
        assert_eq!(params.port, 5433);
        assert_eq!(params.sslmode, SslMode::VerifyFull);
        assert_eq!(params.password.as_ref().map(Secret::expose), Some("pw"));
    }

    #[test]
    fn keyword_form() {
        let params =
            ConnParams::resolve(Some("host=127.0.0.1 port=5 user='a b' password=x\\ y"), &env(&[])).expect("valid");
        assert_eq!(params.user.as_deref(), Some("a b"));
        assert_eq!(params.password.as_ref().map(Secret::expose), Some("x y"));
        assert!(ConnParams::resolve(Some("host"), &env(&[])).is_err());
        assert!(ConnParams::resolve(Some("bogus=1"), &env(&[])).is_err());
        assert!(ConnParams::resolve(Some("sslmode=maybe"), &env(&[])).is_err());
    }

    #[test]
    fn password_never_printed() {
        let params = ConnParams::resolve(Some("postgresql://u:hunter2@h/db"), &env(&[])).expect("valid");
        assert!(!format!("{params:?}").contains("hunter2"));
        assert!(!params.redacted().contains("hunter2"));
    }

    #[test]
    fn pgpass_matching() {
        let content = "# comment\nother:5432:*:alice:wrong\n127.0.0.1:5432:replication:alice:a\\:b\n*:*:*:*:fallback\n";
        assert_eq!(pgpass_lookup(content, "127.0.0.1", 5432, "replication", "alice").map(|s| s.0), Some("a:b".into()));
        assert_eq!(
            pgpass_lookup(content, "127.0.0.1", 5433, "replication", "alice").map(|s| s.0),
            Some("fallback".into())
        );
        assert_eq!(pgpass_lookup("h:1:d:u", "h", 1, "d", "u"), None);
    }

    #[test]
    fn service_sits_between_environment_and_explicit_settings() {
        let file =
            "# comment\n[other]\nhost=nowhere\n[prod]\nhost=db.internal\nport = 6432\nuser=svc\nsslmode=verify-full\n";
        let section = service_section(file, "prod").expect("parses").expect("found");
        assert_eq!(section.len(), 4);
        assert_eq!(service_section(file, "missing").expect("parses"), None);
        assert!(service_section("[prod]\nno equals sign\n", "prod").is_err());
        let environment = env(&[("PGSERVICE", "prod"), ("PGHOST", "env-host"), ("PGUSER", "env-user")]);
        assert_eq!(ConnParams::service_name(Some("dbname=app"), &environment), Ok(Some("prod".into())));
        assert_eq!(ConnParams::service_name(Some("postgresql:///app?service=x"), &environment), Ok(Some("x".into())));
        let params =
            ConnParams::resolve_with_service(Some("user=alice dbname=app"), &environment, Some(&section)).expect("ok");
        // The service beats the environment; explicit settings beat the service.
        assert_eq!((params.host.as_deref(), params.port), (Some("db.internal"), 6432));
        assert_eq!(params.user.as_deref(), Some("alice"));
        assert_eq!(params.sslmode, SslMode::VerifyFull);
        let looping = vec![("service".to_string(), "prod".to_string())];
        assert!(ConnParams::resolve_with_service(None, &env(&[]), Some(&looping)).is_err());
    }

    #[test]
    fn system_roots_need_verify_full() {
        let implied = ConnParams::resolve(Some("host=h sslrootcert=system"), &env(&[])).expect("ok");
        assert_eq!(implied.sslmode, SslMode::VerifyFull);
        assert!(ConnParams::resolve(Some("host=h sslrootcert=system sslmode=require"), &env(&[])).is_err());
        assert!(ConnParams::resolve(Some("host=h sslrootcert=system"), &env(&[("PGSSLMODE", "prefer")])).is_err());
        let file = ConnParams::resolve(Some("host=h sslrootcert=/ca.crt"), &env(&[])).expect("ok");
        assert_eq!(file.sslmode, SslMode::Prefer);
    }

    #[test]
    fn hostaddr_pairs_with_hosts_and_tls_settings_parse() {
        let params = ConnParams::resolve(
            Some("host=a.example,b.example hostaddr=10.0.0.1,10.0.0.2 channel_binding=require sslcert=/c sslkey=/k"),
            &env(&[]),
        )
        .expect("ok");
        let candidates = params.candidates();
        assert_eq!(candidates[1].host.as_deref(), Some("b.example"));
        assert_eq!(candidates[1].hostaddr.as_deref(), Some("10.0.0.2"));
        assert_eq!(params.channel_binding, ChannelBindingMode::Require);
        assert_eq!((params.sslcert.as_deref(), params.sslkey.as_deref()), (Some("/c"), Some("/k")));
        let bare = ConnParams::resolve(Some("hostaddr=127.0.0.1"), &env(&[])).expect("ok");
        assert_eq!((bare.host.as_deref(), bare.hostaddr.as_deref()), (None, Some("127.0.0.1")));
        assert!(ConnParams::resolve(Some("host=a,b hostaddr=1.2.3.4"), &env(&[])).is_err());
        assert_eq!(ConnParams::resolve(Some("sslcrl=/x"), &env(&[])), Err(ConnInfoError::Unsupported("sslcrl".into())));
        assert!(ConnParams::resolve(Some("gssencmode=require"), &env(&[])).is_err());
        assert!(ConnParams::resolve(Some("channel_binding=maybe"), &env(&[])).is_err());
    }
}
