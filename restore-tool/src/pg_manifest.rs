//! The server's `backup_manifest` for a directory rebuilt from a chain of
//! incremental backups: the newest backup's manifest, with the checksum of
//! every file put together from several backups replaced by the checksum of
//! what was written, and the manifest's own SHA-256 recomputed, so that
//! `pg_verifybackup` checks the combined result (as pg_combinebackup does).
//!
//! The format (PostgreSQL's `backup_manifest.c`): one file per line,
//! `{ "Path": "...", "Size": N, "Last-Modified": "...", "Checksum-Algorithm":
//! "CRC32C", "Checksum": "<hex>" }`, and a last line `"Manifest-Checksum":
//! "<hex>"}` whose SHA-256 covers every byte before it.

use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// A CRC-32C as the manifest writes it: the checksum's bytes in memory
/// order (little-endian here), in hex.
pub fn crc32c_text(crc: u32) -> String {
    crc.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

const CHECKSUM_KEY: &str = "\"Manifest-Checksum\": \"";

/// What a file of the restored directory holds: its length and CRC-32C.
pub type Written = (u64, u32);

/// `manifest` with the size and CRC-32C of each path in `files` replaced
/// (an `INCREMENTAL.<name>` entry of PostgreSQL 17+ becomes `<name>`), and
/// its own checksum recomputed. Every path must be found, with CRC-32C as
/// its algorithm, and every incremental entry must be among them: the
/// rewrite never leaves a file unchecked.
pub fn rewrite(manifest: &[u8], files: &HashMap<String, Written>) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(manifest).map_err(|_| "the backup_manifest is not UTF-8")?;
    let body_end = text.rfind(CHECKSUM_KEY).ok_or("the backup_manifest has no Manifest-Checksum")?;
    let (body, _) = text.split_at(body_end);
    let mut out = String::with_capacity(text.len());
    let mut found = 0;
    for line in body.split_inclusive('\n') {
        let replaced = if line.starts_with("{ \"Path\":") {
            let rewritten = rewrite_line(line, files)?;
            found += usize::from(rewritten.is_some());
            rewritten
        } else {
            None
        };
        out.push_str(replaced.as_deref().unwrap_or(line));
    }
    if found != files.len() {
        return Err(format!("the backup_manifest lists {found} of the {} rebuilt files", files.len()));
    }
    let digest = Sha256::digest(out.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    out.push_str(&format!("{CHECKSUM_KEY}{hex}\"}}\n"));
    Ok(out.into_bytes())
}

/// One file's line with its path, size and checksum replaced, or `None`
/// when `files` does not name it.
fn rewrite_line(line: &str, files: &HashMap<String, Written>) -> Result<Option<String>, String> {
    // The line's object; a comma or the array's end may follow it.
    let value: serde_json::Value = serde_json::Deserializer::from_str(line)
        .into_iter()
        .next()
        .ok_or("an empty backup_manifest line")?
        .map_err(|e| format!("a backup_manifest line does not parse: {e}"))?;
    let path = value.get("Path").and_then(|p| p.as_str()).ok_or("a backup_manifest line without a path")?;
    let incremental = tidemark_proto::incremental_file::target_path(path);
    let name = incremental.as_deref().unwrap_or(path);
    let Some(&(size, crc)) = files.get(name) else {
        return match incremental {
            Some(_) => Err(format!("the backup_manifest lists {path}, which the restore did not put together")),
            None => Ok(None),
        };
    };
    if value.get("Checksum-Algorithm").and_then(|a| a.as_str()) != Some("CRC32C") {
        return Err("the backup_manifest's checksums are not CRC32C".into());
    }
    let old_checksum = value.get("Checksum").and_then(|c| c.as_str()).ok_or("a file without a checksum")?;
    let old_size = value.get("Size").and_then(|s| s.as_u64()).ok_or("a file without a size")?;
    let json = |text: &str| serde_json::to_string(text).map_err(|e| e.to_string());
    Ok(Some(
        line.replacen(&format!("\"Path\": {}", json(path)?), &format!("\"Path\": {}", json(name)?), 1)
            .replacen(&format!("\"Size\": {old_size},"), &format!("\"Size\": {size},"), 1)
            .replacen(
                &format!("\"Checksum\": \"{old_checksum}\""),
                &format!("\"Checksum\": \"{}\"", crc32c_text(crc)),
                1,
            ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(lines: &[&str]) -> String {
        let mut body = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
        body.push_str(&lines.join(",\n"));
        body.push_str(" ],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }\n],\n");
        let hex: String = Sha256::digest(body.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        format!("{body}{CHECKSUM_KEY}{hex}\"}}\n")
    }

    const A: &str = r#"{ "Path": "base/5/16384", "Size": 8192, "Last-Modified": "2026-11-29 07:00:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": "00000000" }"#;
    const B: &str = r#"{ "Path": "PG_VERSION", "Size": 3, "Last-Modified": "2026-11-29 07:00:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": "11111111" }"#;

    #[test]
    fn replaces_the_checksum_and_reseals_the_manifest() {
        let original = manifest(&[A, B]);
        let checksums = HashMap::from([("base/5/16384".to_string(), (8192, 0x12345678u32))]);
        let rewritten = String::from_utf8(rewrite(original.as_bytes(), &checksums).expect("rewrite")).expect("utf-8");
        let expected = manifest(&[&A.replace("00000000", "78563412"), B]);
        assert_eq!(rewritten, expected);
        // Nothing to replace: the manifest comes back as it was.
        assert_eq!(rewrite(original.as_bytes(), &HashMap::new()).expect("rewrite"), original.as_bytes());
    }

    #[test]
    fn refuses_what_it_cannot_rewrite_faithfully() {
        let original = manifest(&[A, B]);
        let missing = HashMap::from([("base/5/99999".to_string(), (0, 1u32))]);
        assert!(rewrite(original.as_bytes(), &missing).unwrap_err().contains("0 of the 1"));
        let sha = manifest(&[&A.replace("CRC32C", "SHA256"), B]);
        let checksums = HashMap::from([("base/5/16384".to_string(), (8192, 1u32))]);
        assert!(rewrite(sha.as_bytes(), &checksums).is_err());
        assert!(rewrite(b"{}", &checksums).is_err());
        // An incremental entry the restore did not put together.
        let incremental = manifest(&[&A.replace("base/5/16384", "base/5/INCREMENTAL.16384"), B]);
        assert!(rewrite(incremental.as_bytes(), &HashMap::new()).unwrap_err().contains("INCREMENTAL.16384"));
    }

    #[test]
    fn an_incremental_entry_becomes_the_file_put_together() {
        let entry = A.replace("base/5/16384", "base/5/INCREMENTAL.16384").replace("8192", "8204");
        let label = r#"{ "Path": "backup_label", "Size": 300, "Last-Modified": "2026-11-29 07:00:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": "22222222" }"#;
        let original = manifest(&[&entry, label, B]);
        let files = HashMap::from([
            ("base/5/16384".to_string(), (3 * 8192, 0x01020304u32)),
            ("backup_label".to_string(), (240, 0x0a0b0c0du32)),
        ]);
        let rewritten = String::from_utf8(rewrite(original.as_bytes(), &files).expect("rewrite")).expect("utf-8");
        let expected = manifest(&[
            &A.replace("8192", "24576").replace("00000000", "04030201"),
            &label.replace("300", "240").replace("22222222", "0d0c0b0a"),
            B,
        ]);
        assert_eq!(rewritten, expected);
    }
}
