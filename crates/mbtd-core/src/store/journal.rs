//! Ingest journal: which input files are completely and durably in the store.
//!
//! File `replay/journal.log`:
//!
//! ```text
//! header : magic "MBTDJRNL" (8) | version u32 LE (= 1) | crc32 of the 12 bytes before
//! entry  : len u32 LE (= 80) | crc32(payload) u32 LE | payload:
//!          file_hash [32] | rows_accepted u64 | rows_rejected u64 | rows_appended u64
//!          | first_seq u64 | last_seq u64 | committed_ms u64
//! ```
//!
//! An entry is appended and fsynced only after the file's rows are fsynced in the
//! segments, so an entry always means "every valid row of this file is durable (or was
//! evicted later)". Entries have a fixed size: a corrupt one is skipped (reported), a
//! short tail (torn write) is truncated.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StoreError;
use super::fsutil::fsync_dir;

const MAGIC: &[u8; 8] = b"MBTDJRNL";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 16;
const PAYLOAD_LEN: usize = 80;
const ENTRY_LEN: usize = 8 + PAYLOAD_LEN;

/// One completed file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// blake3 of the file content.
    pub file_hash: [u8; 32],
    /// Valid rows in the file.
    pub rows_accepted: u64,
    /// Rejected rows in the file.
    pub rows_rejected: u64,
    /// Rows appended by the run that completed it (the others were already present).
    pub rows_appended: u64,
    /// Smallest sequence number appended for it (0 if none).
    pub first_seq: u64,
    /// Largest sequence number appended for it (0 if none).
    pub last_seq: u64,
    /// When the entry was written, ms since the Unix epoch.
    pub committed_ms: u64,
}

impl JournalEntry {
    fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[0..4].copy_from_slice(&(PAYLOAD_LEN as u32).to_le_bytes());
        let p = &mut b[8..];
        p[0..32].copy_from_slice(&self.file_hash);
        let nums = [
            self.rows_accepted,
            self.rows_rejected,
            self.rows_appended,
            self.first_seq,
            self.last_seq,
            self.committed_ms,
        ];
        for (i, n) in nums.iter().enumerate() {
            p[32 + 8 * i..40 + 8 * i].copy_from_slice(&n.to_le_bytes());
        }
        let crc = crc32fast::hash(&b[8..]);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<JournalEntry> {
        let len = u32::from_le_bytes(b[0..4].try_into().ok()?) as usize;
        let crc = u32::from_le_bytes(b[4..8].try_into().ok()?);
        if len != PAYLOAD_LEN || crc32fast::hash(&b[8..ENTRY_LEN]) != crc {
            return None;
        }
        let p = &b[8..ENTRY_LEN];
        let n = |i: usize| u64::from_le_bytes(p[32 + 8 * i..40 + 8 * i].try_into().expect("8"));
        Some(JournalEntry {
            file_hash: p[0..32].try_into().ok()?,
            rows_accepted: n(0),
            rows_rejected: n(1),
            rows_appended: n(2),
            first_seq: n(3),
            last_seq: n(4),
            committed_ms: n(5),
        })
    }
}

fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What reading a journal found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalScan {
    /// Valid entries.
    pub entries: usize,
    /// Entries skipped for a bad checksum.
    pub corrupt_entries: usize,
    /// Bytes of an incomplete last entry.
    pub torn_tail_bytes: u64,
}

/// Parse journal bytes. Errors name the file.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<(Vec<JournalEntry>, JournalScan), StoreError> {
    let mut scan = JournalScan::default();
    if bytes.len() < HEADER_LEN {
        scan.torn_tail_bytes = bytes.len() as u64;
        return Ok((Vec::new(), scan));
    }
    if bytes[..HEADER_LEN] != header() {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: "journal header has a wrong magic, version or checksum; move the file away to rebuild it (files already ingested may then be ingested again)".into(),
        });
    }
    let body = &bytes[HEADER_LEN..];
    let mut entries = Vec::new();
    let whole = body.len() / ENTRY_LEN * ENTRY_LEN;
    for chunk in body[..whole].chunks_exact(ENTRY_LEN) {
        match JournalEntry::decode(chunk) {
            Some(e) => entries.push(e),
            None => scan.corrupt_entries += 1,
        }
    }
    scan.entries = entries.len();
    scan.torn_tail_bytes = (body.len() - whole) as u64;
    Ok((entries, scan))
}

/// The open journal: an index of completed file hashes and an append handle.
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Bytes of the file (header and whole entries).
    len: u64,
    entries: HashMap<[u8; 32], JournalEntry>,
}

impl Journal {
    /// Open or create `dir/journal.log`, truncating a torn tail.
    pub fn open(dir: &Path) -> Result<(Journal, JournalScan), StoreError> {
        let path = dir.join("journal.log");
        let io = |what: &str| {
            let path = path.clone();
            let what = what.to_string();
            move |source| StoreError::Io { what, path, source }
        };
        let mut bytes = Vec::new();
        if path.exists() {
            File::open(&path)
                .map_err(io("open journal"))?
                .read_to_end(&mut bytes)
                .map_err(io("read journal"))?;
        }
        let (list, scan) = parse(&path, &bytes)?;
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io("open journal for append"))?;
        let mut len = bytes.len() as u64 - scan.torn_tail_bytes;
        if bytes.len() < HEADER_LEN {
            len = HEADER_LEN as u64;
            file.set_len(0).map_err(io("reset journal"))?;
            file.write_all(&header())
                .map_err(io("write journal header"))?;
            file.sync_all().map_err(io("fsync journal"))?;
            fsync_dir(dir).map_err(io("fsync replay directory"))?;
        } else if scan.torn_tail_bytes > 0 {
            let keep = bytes.len() as u64 - scan.torn_tail_bytes;
            file.set_len(keep).map_err(io("truncate journal tail"))?;
            file.sync_all().map_err(io("fsync journal"))?;
        }
        let entries = list.into_iter().map(|e| (e.file_hash, e)).collect();
        Ok((
            Journal {
                path,
                file,
                len,
                entries,
            },
            scan,
        ))
    }

    /// The entry for a file hash, if that file is complete.
    pub fn get(&self, hash: &[u8; 32]) -> Option<&JournalEntry> {
        self.entries.get(hash)
    }

    /// Number of completed files.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if no file is complete.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Append an entry and fsync it. On an error (a full disk) the file is cut back to
    /// its previous length, so a partly written entry cannot shift the entries after it.
    pub fn append(&mut self, entry: JournalEntry) -> Result<(), StoreError> {
        let io = |what: &str| {
            let path = self.path.clone();
            let what = what.to_string();
            move |source| StoreError::Io { what, path, source }
        };
        let written = self
            .file
            .write_all(&entry.encode())
            .map_err(io("append journal entry"))
            .and_then(|_| self.file.sync_data().map_err(io("fsync journal")));
        if let Err(e) = written {
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += ENTRY_LEN as u64;
        self.entries.insert(entry.file_hash, entry);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u8) -> JournalEntry {
        JournalEntry {
            file_hash: [i; 32],
            rows_accepted: 10 + i as u64,
            rows_rejected: 2,
            rows_appended: 3,
            first_seq: 4,
            last_seq: 5,
            committed_ms: 6,
        }
    }

    #[test]
    fn entries_survive_reopen_corruption_is_skipped_torn_tail_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        for i in 0..3 {
            j.append(entry(i)).unwrap();
        }
        drop(j);
        let path = dir.path().join("journal.log");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN + ENTRY_LEN + 40] ^= 1;
        bytes.extend_from_slice(&entry(9).encode()[..30]);
        std::fs::write(&path, &bytes).unwrap();
        let (mut j, scan) = Journal::open(dir.path()).unwrap();
        assert_eq!(
            scan,
            JournalScan {
                entries: 2,
                corrupt_entries: 1,
                torn_tail_bytes: 30
            }
        );
        assert_eq!(j.get(&[0; 32]), Some(&entry(0)));
        assert!(j.get(&[1; 32]).is_none());
        j.append(entry(7)).unwrap();
        drop(j);
        let (j, scan) = Journal::open(dir.path()).unwrap();
        assert_eq!((scan.entries, scan.torn_tail_bytes), (3, 0));
        assert_eq!(j.get(&[7; 32]), Some(&entry(7)));
    }

    #[test]
    fn wrong_header_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("journal.log"), [7u8; 40]).unwrap();
        let err = Journal::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("journal.log"), "{err}");
    }
}
