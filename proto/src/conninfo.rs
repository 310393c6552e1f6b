//! PostgreSQL connection settings resolved the way libpq resolves them.
//!
//! Precedence, later wins: built-in defaults, `PG*` environment variables,
//! then the URL or `key=value` string. The password comes from the URL, else
//! `PGPASSWORD`, else a matching `.pgpass` line. Reading the environment and the
//! `.pgpass` file is the caller's job; everything here is pure.

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

/// libpq's sslmode values (allow is treated as prefer: we never downgrade on retry).
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
    pub sslrootcert: Option<String>,
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
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnInfoError {
    #[error("invalid connection URL: {0}")]
    BadUrl(String),
    #[error("invalid value {1:?} for connection setting {0}")]
    BadValue(&'static str, String),
    #[error("unknown connection setting {0:?}")]
    UnknownKey(String),
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
            application_name: None,
            connect_timeout_secs: None,
            alternatives: Vec::new(),
            read_write: false,
            port_list: Vec::new(),
        }
    }
}

impl ConnParams {
    /// Resolves settings from an optional URL or `key=value` string and the
    /// environment (passed in as a map of `PG*` variables).
    pub fn resolve(url: Option<&str>, env: &BTreeMap<String, String>) -> Result<ConnParams, ConnInfoError> {
        let mut params = ConnParams::default();
        let env_keys = [
            ("PGHOST", "host"),
            ("PGPORT", "port"),
            ("PGUSER", "user"),
            ("PGPASSWORD", "password"),
            ("PGDATABASE", "dbname"),
            ("PGSSLMODE", "sslmode"),
            ("PGSSLROOTCERT", "sslrootcert"),
            ("PGAPPNAME", "application_name"),
            ("PGCONNECT_TIMEOUT", "connect_timeout"),
        ];
        for (var, key) in env_keys {
            if let Some(value) = env.get(var).filter(|v| !v.is_empty()) {
                params.set(key, value)?;
            }
        }
        match url {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => params.apply_url(url)?,
            Some(keywords) if !keywords.trim().is_empty() => {
                for (key, value) in parse_keywords(keywords)? {
                    params.set(&key, &value)?;
                }
            }
            _ => {}
        }
        params.pair_hosts_and_ports()?;
        Ok(params)
    }

    /// One `ConnParams` per server to try, in order.
    pub fn candidates(&self) -> Vec<ConnParams> {
        if self.alternatives.is_empty() {
            return vec![self.clone()];
        }
        self.alternatives
            .iter()
            .map(|(host, port)| ConnParams {
                host: Some(host.clone()).filter(|h| !h.is_empty()),
                port: *port,
                alternatives: Vec::new(),
                ..self.clone()
            })
            .collect()
    }

    /// Pairs a list of hosts with its ports, as libpq does: one port for
    /// all, or one per host.
    fn pair_hosts_and_ports(&mut self) -> Result<(), ConnInfoError> {
        let hosts: Vec<String> = self.host.as_deref().unwrap_or("").split(',').map(str::to_string).collect();
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
            "host" | "hostaddr" => self.host = Some(value.to_string()),
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
            "sslmode" => self.sslmode = SslMode::parse(value)?,
            "sslrootcert" => self.sslrootcert = Some(value.to_string()),
            "application_name" => self.application_name = Some(value.to_string()),
            "connect_timeout" => {
                self.connect_timeout_secs =
                    Some(value.parse().map_err(|_| ConnInfoError::BadValue("connect_timeout", value.to_string()))?)
            }
            // Accepted and meaningless for a physical replication connection.
            "replication" | "options" | "fallback_application_name" => {}
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
}
