//! The replication commands the agent runs before streaming, and the
//! explanation of a refused connection.

use crate::preflight::ServerFacts;
use tidemark_pg::{Connection, ConnectionKind, PgError};
use tidemark_proto::conninfo::ConnParams;
use tidemark_proto::replication::parse_size_with_unit;
use tidemark_proto::{Lsn, TimelineId};
use tidemark_repo::Fail;

/// IDENTIFY_SYSTEM's answer.
#[derive(Debug, Clone)]
pub struct Identity {
    pub system_identifier: String,
    pub timeline: TimelineId,
    /// The server's current flush position.
    pub xlogpos: Lsn,
}

/// Opens a replication connection. When the server refuses because it has no
/// WAL senders, an ordinary session finds out whether wal_level is the cause,
/// so the message names the setting to change.
/// A replication connection to the first server of the list that answers
/// (and, with `target_session_attrs=read-write`, accepts writes: after a
/// failover, the promoted standby).
pub async fn connect_replication(params: &ConnParams) -> anyhow::Result<Connection> {
    let candidates = params.candidates();
    let mut last_error = None;
    for candidate in &candidates {
        let mut conn = match connect_one(candidate).await {
            Ok(conn) => conn,
            Err(e) if candidates.len() > 1 => {
                last_error = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        if params.read_write && show(&mut conn, "transaction_read_only").await? == "on" {
            conn.close().await;
            // As a connection failure, so the daemon keeps trying (a promotion may be under way).
            let address = format!("{}:{}", candidate.host.as_deref().unwrap_or("localhost"), candidate.port);
            let refused = std::io::Error::other("a standby: it accepts no writes (target_session_attrs=read-write)");
            last_error = Some(PgError::Connect { address, source: refused }.into());
            continue;
        }
        return Ok(conn);
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no server to connect to")))
}

async fn connect_one(params: &ConnParams) -> anyhow::Result<Connection> {
    match Connection::connect(params, ConnectionKind::Replication).await {
        Ok(conn) => Ok(conn),
        Err(PgError::Server(e)) if e.code == "53300" && e.message.contains("max_wal_senders") => {
            let wal_level = match tidemark_pg::sql::connect(params).await {
                Ok(client) => match client.query_one("SHOW wal_level", &[]).await {
                    Ok(row) => row.try_get::<_, String>(0).ok(),
                    Err(_) => None,
                },
                Err(_) => None,
            };
            let facts = ServerFacts {
                server_version_num: 999999,
                wal_level: wal_level.unwrap_or_else(|| "replica".into()),
                max_wal_senders: 0,
                wal_segment_size: 16 << 20,
                summarize_wal: None,
            };
            Err(crate::preflight::check(&facts)
                .err()
                .map(anyhow::Error::new)
                .unwrap_or_else(|| PgError::Server(e).into()))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn identify(conn: &mut Connection) -> anyhow::Result<Identity> {
    let result = conn.simple_query("IDENTIFY_SYSTEM").await?;
    let field = |name: &str| -> anyhow::Result<String> {
        result.value(name)?.map(str::to_string).ok_or_else(|| anyhow::anyhow!("IDENTIFY_SYSTEM returned no {name}"))
    };
    Ok(Identity {
        system_identifier: field("systemid")?,
        timeline: TimelineId(field("timeline")?.parse()?),
        xlogpos: field("xlogpos")?.parse()?,
    })
}

async fn show(conn: &mut Connection, name: &str) -> anyhow::Result<String> {
    let result = conn.simple_query(&format!("SHOW {name}")).await?;
    result.value(name)?.map(str::to_string).ok_or_else(|| anyhow::anyhow!("SHOW {name} returned nothing"))
}

pub async fn server_facts(conn: &mut Connection) -> anyhow::Result<ServerFacts> {
    let size_text = show(conn, "wal_segment_size").await?;
    let server_version_num: u32 = show(conn, "server_version_num").await?.parse()?;
    let summarize_wal = match server_version_num >= 170000 {
        true => Some(show(conn, "summarize_wal").await?),
        false => None,
    };
    Ok(ServerFacts {
        server_version_num,
        summarize_wal,
        wal_level: show(conn, "wal_level").await?,
        max_wal_senders: show(conn, "max_wal_senders").await?.parse()?,
        wal_segment_size: parse_size_with_unit(&size_text)
            .ok_or_else(|| anyhow::anyhow!("cannot read wal_segment_size {size_text:?}"))?,
    })
}

/// Creates the physical slot, reserving WAL now; an existing slot is adopted.
pub async fn ensure_slot(conn: &mut Connection, slot: &str) -> anyhow::Result<bool> {
    match conn.simple_query(&format!("CREATE_REPLICATION_SLOT \"{slot}\" PHYSICAL RESERVE_WAL")).await {
        Ok(_) => Ok(true),
        Err(PgError::Server(e)) if e.code == "42710" => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Fails with a hint if the repository or state belongs to another cluster.
pub fn check_same_cluster(what: &str, recorded: &str, server: &str) -> Result<(), Fail> {
    if recorded == server {
        return Ok(());
    }
    Err(Fail::new(
        format!("{what} belongs to another cluster (system identifier {recorded}, this server is {server})"),
        "point --repo / --state-dir at this cluster's own, or use a new empty one",
    ))
}
