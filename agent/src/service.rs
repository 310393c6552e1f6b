//! systemd integration for `run` under `Type=notify` (deploy/systemd/):
//! `READY=1` once streaming has started, `WATCHDOG=1` at half the unit's
//! `WatchdogSec` while the runtime is responsive, `STOPPING=1` at shutdown.
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.

pub fn ready() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status("streaming")]);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// The watchdog pinger when the unit asks for one (`WATCHDOG_USEC`). It
/// runs on the agent's runtime, so a runtime that stopped scheduling tasks
/// (a hang) stops the pings and systemd restarts the agent.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    // WATCHDOG_USEC, and WATCHDOG_PID when set naming this process.
    let interval = sd_notify::watchdog_enabled().filter(|d| !d.is_zero())?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }))
}
