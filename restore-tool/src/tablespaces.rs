//! Where a backup's tablespaces go on restore.
//!
//! By default each tablespace goes back to the directory it had on the
//! source (what an operator restoring onto a replacement machine expects).
//! `--tablespace-map FROM=TO` moves one: FROM is the tablespace's OID or its
//! original location, as `restore --dry-run` shows them. Every target must be
//! missing or empty — also with `--force`, which only ever clears --pgdata:
//! restoring on the source's own machine, a tablespace's original directory
//! is the live one of the running source.
//!
//! The original location comes from the repository, so it is used only
//! when it is a plain absolute path and not a protected place (`/`, a
//! system directory, a home directory or one holding it, the repository:
//! `places::protected`); anywhere else needs an explicit `--tablespace-map`.

use std::path::{Path, PathBuf};
use tidemark_proto::repo::backup::Tablespace;

/// One tablespace of the backup and the directory it is restored into.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Placement {
    pub oid: u32,
    /// The location on the source, from the backup.
    pub original: String,
    pub target: PathBuf,
}

impl Placement {
    /// True when the tablespace goes elsewhere than on the source.
    pub fn moved(&self) -> bool {
        Path::new(&self.original) != self.target
    }
}

/// `FROM=TO` from the command line.
pub fn parse_mapping(text: &str) -> Result<(String, PathBuf), String> {
    match text.split_once('=') {
        Some((from, to)) if !from.is_empty() && !to.is_empty() => Ok((from.to_string(), PathBuf::from(to))),
        _ => Err(format!("--tablespace-map {text:?} is not FROM=TO (FROM: the tablespace's OID or original location)")),
    }
}

/// Characters PostgreSQL escapes in tablespace_map; refused in a location we write there.
fn awkward(path: &str) -> bool {
    path.contains(['\n', '\r', '\\'])
}

/// The placement of every tablespace in `tablespaces`: the mapped directory
/// or the original one. Refuses a mapping that names no tablespace of the
/// backup, a relative or awkward target, two tablespaces in one directory,
/// and a target inside `pgdata` (or `pgdata` inside a target); and an
/// unmapped tablespace whose original location is not a plain absolute path
/// or is protected (that place or one under it in `keep`: see the module comment).
pub fn place(
    tablespaces: &[Tablespace],
    mappings: &[(String, PathBuf)],
    pgdata: &Path,
    keep: &[PathBuf],
) -> Result<Vec<Placement>, String> {
    let known = || {
        let list: Vec<String> = tablespaces.iter().map(|t| format!("{} ({})", t.oid, t.location)).collect();
        if list.is_empty() {
            "it has none".to_string()
        } else {
            format!("it has {}", list.join(", "))
        }
    };
    for (from, _) in mappings {
        let matches = tablespaces.iter().filter(|t| t.oid.to_string() == *from || t.location == *from).count();
        if matches == 0 {
            return Err(format!("--tablespace-map {from}=…: the backup has no tablespace {from}; {}", known()));
        }
    }
    let mut placements: Vec<Placement> = Vec::new();
    for tablespace in tablespaces {
        let mapped: Vec<&PathBuf> = mappings
            .iter()
            .filter(|(from, _)| tablespace.oid.to_string() == *from || tablespace.location == *from)
            .map(|(_, to)| to)
            .collect();
        let target = match mapped.as_slice() {
            [] => default_place(tablespace, keep)?,
            [one] => (*one).clone(),
            _ => return Err(format!("tablespace {} is mapped more than once", tablespace.oid)),
        };
        let text = target.to_string_lossy();
        if !target.is_absolute() {
            return Err(format!("tablespace {} would go to {text:?}, which is not an absolute path", tablespace.oid));
        }
        if awkward(&text) {
            return Err(format!(
                "tablespace {} would go to {text:?}; choose a path without newlines or backslashes",
                tablespace.oid
            ));
        }
        if let Some(other) = placements.iter().find(|p| p.target == target) {
            return Err(format!("tablespaces {} and {} would both go to {text}", other.oid, tablespace.oid));
        }
        if target.starts_with(pgdata) || pgdata.starts_with(&target) {
            return Err(format!(
                "tablespace {} would go to {text}, which overlaps --pgdata {}",
                tablespace.oid,
                pgdata.display()
            ));
        }
        placements.push(Placement { oid: tablespace.oid, original: tablespace.location.clone(), target });
    }
    Ok(placements)
}

/// The original location of an unmapped tablespace, unless it is not a
/// plain absolute path or is a protected place.
fn default_place(tablespace: &Tablespace, keep: &[PathBuf]) -> Result<PathBuf, String> {
    let location = &tablespace.location;
    let why = match crate::places::is_plain_absolute(location) {
        false => Some("not a plain absolute path".to_string()),
        true => crate::places::protected(Path::new(location), keep),
    };
    match why {
        None => Ok(PathBuf::from(location)),
        Some(why) => Err(format!(
            "tablespace {} of the backup is at {location:?} ({why}), where a restore never puts one on its own; \
             choose its place with --tablespace-map {}=DIR",
            tablespace.oid, tablespace.oid
        )),
    }
}

/// True when some tablespace moves: the backup's tablespace_map must then be rewritten.
pub fn relocated(placements: &[Placement]) -> bool {
    placements.iter().any(Placement::moved)
}

/// The tablespace_map PostgreSQL reads at the start of recovery: a line
/// `OID LOCATION` per tablespace (it makes pg_tblspc/OID a link to LOCATION).
/// `place` refused the characters PostgreSQL would escape.
pub fn tablespace_map(placements: &[Placement]) -> String {
    placements.iter().map(|p| format!("{} {}\n", p.oid, p.target.display())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spaces() -> Vec<Tablespace> {
        vec![
            Tablespace { oid: 16384, location: "/srv/ts/fast".into() },
            Tablespace { oid: 16390, location: "/srv/ts/slow".into() },
        ]
    }

    fn map(from: &str, to: &str) -> (String, PathBuf) {
        (from.to_string(), PathBuf::from(to))
    }

    #[test]
    fn parses_from_equals_to() {
        assert_eq!(parse_mapping("16384=/new/fast").unwrap(), map("16384", "/new/fast"));
        assert_eq!(parse_mapping("/srv/ts/fast=/new/fast").unwrap(), map("/srv/ts/fast", "/new/fast"));
        for bad in ["16384", "=/x", "16384=", ""] {
            assert!(parse_mapping(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unmapped_tablespaces_go_back_where_they_were() {
        let placed = place(&spaces(), &[], Path::new("/restore/data"), &[]).unwrap();
        assert_eq!(placed[0].target, PathBuf::from("/srv/ts/fast"));
        assert_eq!(placed[1].target, PathBuf::from("/srv/ts/slow"));
        assert!(!relocated(&placed));
        assert_eq!(tablespace_map(&placed), "16384 /srv/ts/fast\n16390 /srv/ts/slow\n");
    }

    #[test]
    fn maps_by_oid_or_by_original_location() {
        let placed = place(
            &spaces(),
            &[map("16384", "/new/fast"), map("/srv/ts/slow", "/new/slow")],
            Path::new("/restore/data"),
            &[],
        )
        .unwrap();
        assert_eq!(placed[0].target, PathBuf::from("/new/fast"));
        assert_eq!(placed[1].target, PathBuf::from("/new/slow"));
        assert!(relocated(&placed));
        assert_eq!(tablespace_map(&placed), "16384 /new/fast\n16390 /new/slow\n");
    }

    #[test]
    fn refuses_what_cannot_work() {
        let pgdata = Path::new("/restore/data");
        let error = place(&spaces(), &[map("99", "/x")], pgdata, &[]).unwrap_err();
        assert!(error.contains("no tablespace 99") && error.contains("16384 (/srv/ts/fast)"), "{error}");
        assert!(place(&[], &[map("99", "/x")], pgdata, &[]).unwrap_err().contains("it has none"));
        assert!(place(&spaces(), &[map("16384", "relative/dir")], pgdata, &[])
            .unwrap_err()
            .contains("not an absolute"));
        assert!(place(&spaces(), &[map("16384", "/a\nb")], pgdata, &[]).unwrap_err().contains("newlines"));
        let error = place(&spaces(), &[map("16384", "/same"), map("16390", "/same")], pgdata, &[]).unwrap_err();
        assert!(error.contains("both go to /same"), "{error}");
        let error = place(&spaces(), &[map("16384", "/a"), map("/srv/ts/fast", "/b")], pgdata, &[]).unwrap_err();
        assert!(error.contains("more than once"), "{error}");
        assert!(place(&spaces(), &[map("16384", "/restore/data/ts")], pgdata, &[]).unwrap_err().contains("overlaps"));
        assert!(place(&spaces(), &[map("16384", "/restore")], pgdata, &[]).unwrap_err().contains("overlaps"));
    }

    #[test]
    fn an_original_location_is_used_only_when_plain_and_not_protected() {
        let pgdata = Path::new("/restore/data");
        let at = |location: &str| vec![Tablespace { oid: 16384, location: location.into() }];
        let keep = [PathBuf::from("/home/alice")];
        for bad in ["relative", "/srv/../etc/cron.d", "/srv//ts", "/etc/ts", "/", "/home", "/home/alice", "/usr"] {
            let error = place(&at(bad), &[], pgdata, &keep).expect_err(bad);
            assert!(error.contains("tablespace 16384") && error.contains("--tablespace-map 16384=DIR"), "{error}");
        }
        assert!(place(&at("/srv/ts"), &[], pgdata, &keep).is_ok());
        assert!(place(&at("/home/alice/ts"), &[], pgdata, &keep).is_ok(), "below a home is a place like any other");
        // Asked for explicitly: the mapping decides, whatever the backup says.
        let placed = place(&at("/srv/../etc"), &[map("16384", "/new/ts")], pgdata, &keep).expect("mapped");
        assert_eq!(placed[0].target, PathBuf::from("/new/ts"));
    }
}
