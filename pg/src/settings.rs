//! Connection settings completed the way libpq completes them, from this
//! process's environment and files: the service file, the password file,
//! the default user and the default Unix socket. The parsing is pure and
//! lives in `tidemark_proto::conninfo`; this module is its I/O edge.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tidemark_proto::conninfo::{pgpass_lookup, service_section, ConnInfoError, ConnParams, Secret};

/// Where `pg_service.conf` lives when `PGSYSCONFDIR` is not set: Debian's
/// libpq is built with this directory.
const DEFAULT_SYSCONFDIR: &str = "/etc/postgresql-common";

/// Physical replication (a walsender) or an ordinary session on a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionKind {
    Replication,
    Sql,
}

/// Why settings could not be completed; `hint` says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SettingsError {
    pub message: String,
    pub hint: String,
}

impl From<ConnInfoError> for SettingsError {
    fn from(error: ConnInfoError) -> Self {
        SettingsError {
            message: error.to_string(),
            hint: "give a postgresql:// URL or libpq key=value pairs (the PG* variables and a service file count too)"
                .into(),
        }
    }
}

/// Settings from a URL or `key=value` string (or none) and this process's environment.
pub fn resolve(conninfo: Option<&str>) -> Result<ConnParams, SettingsError> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    resolve_in(conninfo, &env)
}

/// As [`resolve`], with the environment passed in (the agent merges its own
/// settings first; tests pass a map).
pub fn resolve_in(conninfo: Option<&str>, env: &BTreeMap<String, String>) -> Result<ConnParams, SettingsError> {
    let section = match ConnParams::service_name(conninfo, env)? {
        Some(name) => Some(find_service(&name, env)?),
        None => None,
    };
    let mut params = ConnParams::resolve_with_service(conninfo, env, section.as_deref())?;
    if params.user.is_none() {
        params.user = os_user_name().or_else(|| env.get("USER").cloned());
    }
    if params.passfile.is_none() {
        params.passfile = home(env).map(|h| h.join(".pgpass").to_string_lossy().into_owned());
    }
    Ok(params)
}

/// The section of the first service file that has it: `PGSERVICEFILE` (or
/// `~/.pg_service.conf`), then `pg_service.conf` in `PGSYSCONFDIR`.
fn find_service(name: &str, env: &BTreeMap<String, String>) -> Result<Vec<(String, String)>, SettingsError> {
    let user_file =
        env.get("PGSERVICEFILE").map(PathBuf::from).or_else(|| home(env).map(|h| h.join(".pg_service.conf")));
    let system_dir = env.get("PGSYSCONFDIR").cloned().unwrap_or_else(|| DEFAULT_SYSCONFDIR.into());
    let files: Vec<PathBuf> = user_file.into_iter().chain([Path::new(&system_dir).join("pg_service.conf")]).collect();
    for file in &files {
        let content = match std::fs::read_to_string(file) {
            Ok(content) => content,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(SettingsError {
                    message: format!("cannot read service file {}: {e}", file.display()),
                    hint: "make it readable, or set PGSERVICEFILE".into(),
                })
            }
        };
        let section = service_section(&content, name).map_err(|e| SettingsError {
            message: format!("service file {}: {e}", file.display()),
            hint: "fix the file: [name] sections of key=value lines".into(),
        })?;
        if let Some(section) = section {
            return Ok(section);
        }
    }
    let searched: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    Err(SettingsError {
        message: format!("service {name:?} is not defined in {}", searched.join(" or ")),
        hint: "add a [name] section to one of them, or set PGSERVICEFILE to the file that has it".into(),
    })
}

/// The password for one server of the list: the settings' own, else the
/// password file's line for this host, port, database and user. libpq
/// matches a replication connection's database field against `replication`
/// and a connection to the default socket against `localhost`.
pub fn password_for(params: &ConnParams, kind: ConnectionKind) -> Option<Secret> {
    if let Some(password) = &params.password {
        return Some(password.clone());
    }
    let path = PathBuf::from(params.passfile.as_deref()?);
    let metadata = std::fs::metadata(&path).ok()?;
    if !metadata.is_file() {
        return None;
    }
    if metadata.permissions().mode() & 0o077 != 0 {
        tracing::warn!("password file {} has group or world access; ignoring it (chmod 0600 it)", path.display());
        return None;
    }
    let content = std::fs::read_to_string(&path).ok()?;
    let socket = default_socket_dir();
    let host = match (params.host.as_deref(), params.hostaddr.as_deref()) {
        (Some(dir), _) if dir == socket.to_string_lossy() => "localhost".to_string(),
        (Some(host), _) => host.to_string(),
        (None, Some(address)) => address.to_string(),
        (None, None) => "localhost".to_string(),
    };
    let user = params.user.as_deref().unwrap_or_default();
    let database = match kind {
        ConnectionKind::Replication => "replication".to_string(),
        ConnectionKind::Sql => database(params).to_string(),
    };
    pgpass_lookup(&content, &host, params.port, &database, user)
}

/// The database an SQL session opens: the one named, else the user's
/// namesake (libpq's default).
pub fn database(params: &ConnParams) -> &str {
    params.dbname.as_deref().or(params.user.as_deref()).unwrap_or("postgres")
}

/// The directory of the Unix socket used when no host is given. libpq
/// compiles one in: Debian's is `/var/run/postgresql`, a source build's `/tmp`.
pub fn default_socket_dir() -> PathBuf {
    let debian = Path::new("/var/run/postgresql");
    if debian.is_dir() {
        debian.to_path_buf()
    } else {
        PathBuf::from("/tmp")
    }
}

fn home(env: &BTreeMap<String, String>) -> Option<PathBuf> {
    env.get("HOME").filter(|h| !h.is_empty()).map(PathBuf::from).or_else(os_home)
}

/// The effective user's name from the password database (libpq's default user).
fn os_user_name() -> Option<String> {
    passwd_field(|entry| entry.pw_name)
}

fn os_home() -> Option<PathBuf> {
    passwd_field(|entry| entry.pw_dir).map(PathBuf::from)
}

fn passwd_field(field: impl Fn(&libc::passwd) -> *mut libc::c_char) -> Option<String> {
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 4096];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes only into `entry` and `buffer`, whose sizes
    // it is given; `found` points at `entry` when an entry was found.
    let status =
        unsafe { libc::getpwuid_r(libc::geteuid(), &mut entry, buffer.as_mut_ptr(), buffer.len(), &mut found) };
    if status != 0 || found.is_null() {
        return None;
    }
    let pointer = field(&entry);
    if pointer.is_null() {
        return None;
    }
    // SAFETY: a non-null field of a found entry is a NUL-terminated string inside `buffer`.
    let text = unsafe { std::ffi::CStr::from_ptr(pointer) };
    Some(text.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_service_is_found_in_the_user_file_then_the_system_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let user_file = dir.path().join("mine.conf");
        std::fs::write(&user_file, "[mine]\nhost=h1\nport=7001\n").expect("write");
        std::fs::create_dir(dir.path().join("etc")).expect("mkdir");
        std::fs::write(dir.path().join("etc/pg_service.conf"), "[shared]\nhost=h2\ndbname=d\n").expect("write");
        let vars = |service: &str| {
            env(&[
                ("PGSERVICE", service),
                ("PGSERVICEFILE", user_file.to_str().expect("utf-8")),
                ("PGSYSCONFDIR", dir.path().join("etc").to_str().expect("utf-8")),
                ("HOME", dir.path().to_str().expect("utf-8")),
            ])
        };
        let mine = resolve_in(None, &vars("mine")).expect("found");
        assert_eq!((mine.host.as_deref(), mine.port), (Some("h1"), 7001));
        let shared = resolve_in(Some("user=u"), &vars("shared")).expect("found");
        assert_eq!((shared.host.as_deref(), shared.dbname.as_deref()), (Some("h2"), Some("d")));
        let missing = resolve_in(None, &vars("nope")).expect_err("refused");
        assert!(missing.message.contains("\"nope\" is not defined"), "{}", missing.message);
    }

    #[test]
    fn password_file_matches_each_host_and_the_real_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pgpass");
        std::fs::write(&file, "a:5432:app:u:for-a\nb:5432:app:u:for-b\nb:5432:replication:u:repl-b\n").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let conninfo = format!("host=a,b dbname=app user=u passfile={}", file.display());
        let params = resolve_in(Some(&conninfo), &env(&[])).expect("ok");
        let candidates = params.candidates();
        let secret = |p: &ConnParams, kind| password_for(p, kind).map(|s| s.expose().to_string());
        assert_eq!(secret(&candidates[0], ConnectionKind::Sql).as_deref(), Some("for-a"));
        assert_eq!(secret(&candidates[1], ConnectionKind::Sql).as_deref(), Some("for-b"));
        assert_eq!(secret(&candidates[1], ConnectionKind::Replication).as_deref(), Some("repl-b"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(secret(&candidates[0], ConnectionKind::Sql), None, "a world-readable file is ignored");
    }

    #[test]
    fn defaults_are_libpqs() {
        let params = resolve_in(Some("dbname=x"), &env(&[("HOME", "/nonexistent")])).expect("ok");
        assert!(params.user.is_some());
        assert_eq!(params.passfile.as_deref(), Some("/nonexistent/.pgpass"));
        assert_eq!(params.host, None, "no host: the default Unix socket");
        let named = resolve_in(Some("user=u"), &env(&[])).expect("ok");
        assert_eq!(database(&named), "u");
    }
}
