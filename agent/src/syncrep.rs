//! Whether the server may be waiting for this agent's flushes: is our
//! `application_name` (or `*`) in its `synchronous_standby_names`?
//!
//! As a possible synchronous standby the agent fsyncs and replies after
//! every batch it receives: a commit is waiting for that reply. Otherwise
//! nobody waits, and the receive loop gathers writes for up to
//! [`crate::stream::ASYNC_FLUSH_DELAY`] before one fsync, which costs the
//! host a few fsyncs a second instead of one per commit. Either way a flush
//! is reported only once it is fsynced.
//!
//! The setting is read with an ordinary SQL session (any role may read it)
//! every [`CHECK_INTERVAL`], so a reload that names the agent takes effect
//! within that. Until the first answer, and whenever the server cannot be
//! asked, the agent assumes it may be synchronous: the cautious side costs
//! CPU, the other side would cost commit latency.

use std::time::Duration;
use tidemark_proto::conninfo::ConnParams;
use tokio::sync::watch;
use tracing::{debug, info};

pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Whether `setting` (a `synchronous_standby_names` value) can make a
/// standby named `application_name` synchronous. The forms are `a, b`,
/// `N (a, b)`, `FIRST N (a, b)` and `ANY N (a, b)`; names may be
/// double-quoted; `*` matches every standby; PostgreSQL compares names
/// without regard to case.
pub fn names_us(setting: &str, application_name: &str) -> bool {
    let list = match (setting.find('('), setting.rfind(')')) {
        (Some(open), Some(close)) if open < close => &setting[open + 1..close],
        _ => setting,
    };
    list.split(',').map(unquote).any(|name| name == "*" || name.eq_ignore_ascii_case(application_name))
}

fn unquote(name: &str) -> String {
    let name = name.trim();
    match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => name.to_string(),
    }
}

/// Starts watching the setting; the receiver says "may be synchronous".
pub fn watch(params: ConnParams, application_name: String) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(true);
    let task = tokio::spawn(async move {
        let mut client = None;
        loop {
            let answer = ask(&mut client, &params, &application_name).await;
            let synchronous = answer.unwrap_or_else(|e| {
                debug!("cannot read synchronous_standby_names, assuming the agent may be a synchronous standby: {e:#}");
                client = None;
                true
            });
            if *tx.borrow() != synchronous {
                info!(
                    synchronous,
                    "{}",
                    if synchronous {
                        "the server may wait for this agent (synchronous_standby_names names it): fsync after every batch"
                    } else {
                        "no commit waits for this agent: fsyncs gathered for up to 200 ms"
                    }
                );
            }
            tx.send_replace(synchronous);
            tokio::time::sleep(CHECK_INTERVAL).await;
        }
    });
    (rx, task)
}

async fn ask(
    client: &mut Option<tokio_postgres::Client>,
    params: &ConnParams,
    application_name: &str,
) -> anyhow::Result<bool> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        let mut params = params.clone();
        params.application_name = Some(format!("{application_name}_settings"));
        *client = Some(tidemark_pg::sql::connect(&params).await?);
    }
    let Some(session) = client.as_ref() else { anyhow::bail!("no session") };
    // The simple protocol: one round trip, no statement prepared and closed
    // again every 10 s as `query_one` would.
    let messages =
        session.simple_query("SHOW synchronous_standby_names").await.map_err(tidemark_pg::sql::from_postgres)?;
    let setting = messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
        _ => None,
    });
    let setting = setting.ok_or_else(|| anyhow::anyhow!("SHOW synchronous_standby_names returned no value"))?;
    Ok(names_us(setting, application_name))
}

#[cfg(test)]
mod tests {
    use super::names_us;

    #[test]
    fn every_form_of_the_setting() {
        assert!(!names_us("", "tidemark"));
        assert!(names_us("tidemark", "tidemark"));
        assert!(names_us("Tidemark", "tidemark"), "names compare without case");
        assert!(names_us("*", "tidemark"));
        assert!(names_us("s1, tidemark", "tidemark"));
        assert!(!names_us("s1, s2", "tidemark"));
        assert!(names_us("FIRST 1 (s1, tidemark)", "tidemark"));
        assert!(names_us("ANY 2 (s1, \"tidemark\", s3)", "tidemark"));
        assert!(names_us("2 (s1, *)", "tidemark"));
        assert!(!names_us("ANY 1 (s1, \"tidemark_x\")", "tidemark"));
        assert!(names_us("\"we\"\"ird\"", "we\"ird"));
        assert!(!names_us("tidemark_settings", "tidemark"));
    }
}
