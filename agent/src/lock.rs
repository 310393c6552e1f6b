//! Locks on files in the state directory (flock): one `run` per spool
//! (`agent.lock`), one backup at a time (`backup.lock`). The kernel drops a
//! lock when its holder dies, so a killed agent never leaves one behind.

use anyhow::Context;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use tidemark_repo::Fail;

/// Holds the state directory's lock for as long as it lives.
pub struct StateLock(#[allow(dead_code)] std::fs::File);

/// Takes `<state-dir>/agent.lock` (flock), so two `run`s never share a spool.
pub fn lock_state_dir(state_dir: &Path) -> anyhow::Result<StateLock> {
    lock_file(state_dir, "agent.lock", "another tidemark-agent run")
}

/// An exclusive flock on `<state-dir>/<name>` holding our pid; `who` names
/// the holder in the refusal.
pub fn lock_file(state_dir: &Path, name: &str, who: &str) -> anyhow::Result<StateLock> {
    let path = state_dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("open lock file {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(Fail::new(
            format!("{who} (pid {}) is using state directory {}", holder.trim(), state_dir.display()),
            "stop it first, or give this one its own --state-dir",
        )
        .into());
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(StateLock(file))
}
