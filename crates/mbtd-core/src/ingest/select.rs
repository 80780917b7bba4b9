//! Candidate selection: which inbox entries are complete files ready to process.
//!
//! Rules: names starting with `.` and names ending in `.tmp` or `.part` are ignored,
//! directories are ignored. Symbolic links and other non-regular entries (FIFOs, sockets,
//! devices) are to be refused: moved to `.failed/` with a sidecar giving the reason.
//! Names that are not UTF-8 cannot be moved under a name a sidecar can state: they are
//! refused in place (reported until someone removes them). A regular file is ready when
//! no writer has it open (as far as the watcher saw: written to and not closed since) and
//! its (size, mtime) is the same as at the previous scan and has been so for
//! `settle_ms`; or at once when the watcher saw it renamed into the inbox and not
//! written to since. Ready files come oldest first (mtime, then name).

use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Kind of a directory entry (from `symlink_metadata`, links not followed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// FIFO, socket, device.
    Other,
    /// A name that is not UTF-8 (listed with a lossy name).
    BadName,
}

/// One inbox entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboxEntry {
    /// File name.
    pub name: String,
    /// Kind.
    pub kind: EntryKind,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ms since the Unix epoch.
    pub mtime_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    size: u64,
    mtime_ms: u64,
    stable_since_ms: u64,
}

/// What the previous scan saw (carry it from scan to scan).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanMemory {
    seen: HashMap<String, Seen>,
}

impl ScanMemory {
    /// Forget `name`: it has to settle again from the next scan on (a file found to be
    /// still growing while it was read).
    pub fn forget(&mut self, name: &str) {
        self.seen.remove(name);
    }
}

/// Result of one scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Files to process now, oldest first.
    pub ready: Vec<String>,
    /// Files still settling or open for writing.
    pub waiting: Vec<String>,
    /// Entries to refuse with a sidecar in `.failed/` (links, FIFOs, sockets, devices).
    pub to_fail: Vec<String>,
    /// Entries refused in place, with the reason (names that are not UTF-8).
    pub refused: Vec<(String, String)>,
}

/// True for names the ingestor never looks at.
pub fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part")
}

/// Decide which entries of `listing` are ready. `renamed_in` holds names the watcher
/// saw renamed into the inbox since the last scan, `writing` names a writer has open
/// (written to, not closed yet). Pure: returns the memory for the next scan.
pub fn select_candidates(
    listing: &[InboxEntry],
    memory: &ScanMemory,
    renamed_in: &HashSet<String>,
    writing: &HashSet<String>,
    now_ms: u64,
    settle_ms: u64,
) -> (Selection, ScanMemory) {
    let mut sel = Selection::default();
    let mut next = ScanMemory::default();
    let mut ready = Vec::new();
    for e in listing {
        if is_ignored_name(&e.name) {
            continue;
        }
        match e.kind {
            EntryKind::Dir => continue,
            EntryKind::Symlink | EntryKind::Other => {
                sel.to_fail.push(e.name.clone());
                continue;
            }
            EntryKind::BadName => {
                sel.refused.push((
                    e.name.clone(),
                    "the name is not UTF-8; rename the file".into(),
                ));
                continue;
            }
            EntryKind::File => {}
        }
        let stable_since_ms = match memory.seen.get(&e.name) {
            Some(s) if s.size == e.size && s.mtime_ms == e.mtime_ms => s.stable_since_ms,
            _ => now_ms,
        };
        next.seen.insert(
            e.name.clone(),
            Seen {
                size: e.size,
                mtime_ms: e.mtime_ms,
                stable_since_ms,
            },
        );
        let settled = stable_since_ms < now_ms && now_ms - stable_since_ms >= settle_ms;
        if !writing.contains(&e.name) && (settled || renamed_in.contains(&e.name)) {
            ready.push((e.mtime_ms, e.name.clone()));
        } else {
            sel.waiting.push(e.name.clone());
        }
    }
    ready.sort();
    sel.ready = ready.into_iter().map(|(_, n)| n).collect();
    (sel, next)
}

/// List the inbox (links not followed). Names that are not UTF-8 are listed as refused
/// entries of kind `Other` with a lossy name.
pub fn list_inbox(inbox: &Path) -> std::io::Result<Vec<InboxEntry>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(inbox)? {
        let entry = entry?;
        let meta = match entry.path().symlink_metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let ft = meta.file_type();
        let (name, utf8) = match entry.file_name().into_string() {
            Ok(n) => (n, true),
            Err(os) => (os.to_string_lossy().into_owned(), false),
        };
        let kind = if !utf8 {
            EntryKind::BadName
        } else if ft.is_symlink() {
            EntryKind::Symlink
        } else if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_file() {
            EntryKind::File
        } else {
            EntryKind::Other
        };
        let mtime_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        out.push(InboxEntry {
            name,
            kind,
            size: meta.len(),
            mtime_ms,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, size: u64, mtime_ms: u64) -> InboxEntry {
        InboxEntry {
            name: name.into(),
            kind: EntryKind::File,
            size,
            mtime_ms,
        }
    }

    #[test]
    fn files_settle_then_come_oldest_first() {
        let none = HashSet::new();
        let listing = vec![file("b.csv", 10, 200), file("a.csv", 10, 300)];
        let (s1, m1) = select_candidates(&listing, &ScanMemory::default(), &none, &none, 1000, 500);
        assert!(s1.ready.is_empty());
        assert_eq!(s1.waiting.len(), 2);
        let (s2, m2) = select_candidates(&listing, &m1, &none, &none, 1400, 500);
        assert!(s2.ready.is_empty());
        let (s3, _) = select_candidates(&listing, &m2, &none, &none, 1500, 500);
        assert_eq!(s3.ready, vec!["b.csv".to_string(), "a.csv".to_string()]);
    }

    #[test]
    fn growth_resets_the_clock_and_renames_are_ready_at_once() {
        let (none, fresh) = (HashSet::new(), ScanMemory::default());
        let (_, m1) = select_candidates(&[file("a.csv", 10, 1)], &fresh, &none, &none, 0, 500);
        let (s2, m2) = select_candidates(&[file("a.csv", 20, 2)], &m1, &none, &none, 600, 500);
        assert_eq!(s2.waiting, vec!["a.csv".to_string()]);
        let (s3, _) = select_candidates(&[file("a.csv", 20, 2)], &m2, &none, &none, 1100, 500);
        assert_eq!(s3.ready, vec!["a.csv".to_string()]);
        let renamed: HashSet<String> = ["r.csv".to_string()].into();
        let (s4, _) = select_candidates(&[file("r.csv", 5, 9)], &fresh, &renamed, &none, 5, 500);
        assert_eq!(s4.ready, vec!["r.csv".to_string()]);
    }

    /// Found by a hostile-operator probe: a CSV appended once a second in place was taken
    /// after its first row. A name a writer still has open is never ready, settled or not.
    #[test]
    fn files_open_for_writing_wait_until_closed() {
        let none = HashSet::new();
        let writing: HashSet<String> = ["a.csv".to_string()].into();
        let listing = [file("a.csv", 10, 1)];
        let (_, m1) = select_candidates(&listing, &ScanMemory::default(), &none, &writing, 0, 500);
        let (s2, m2) = select_candidates(&listing, &m1, &none, &writing, 5_000, 500);
        assert!(s2.ready.is_empty());
        assert_eq!(s2.waiting, vec!["a.csv".to_string()]);
        let (s3, _) = select_candidates(&listing, &m2, &none, &none, 5_001, 500);
        assert_eq!(s3.ready, vec!["a.csv".to_string()]);
    }

    #[test]
    fn ignored_and_refused_entries() {
        let mut listing = vec![
            file(".hidden.csv", 1, 0),
            file("x.csv.tmp", 1, 0),
            file("y.part", 1, 0),
        ];
        for (kind, name) in [
            (EntryKind::Dir, "d.csv"),
            (EntryKind::Symlink, "l.csv"),
            (EntryKind::Other, "fifo.csv"),
            (EntryKind::BadName, "bad\u{fffd}.csv"),
        ] {
            listing.push(InboxEntry {
                kind,
                ..file(name, 0, 0)
            });
        }
        let renamed: HashSet<String> = listing.iter().map(|e| e.name.clone()).collect();
        let none = HashSet::new();
        let (s, m) =
            select_candidates(&listing, &ScanMemory::default(), &renamed, &none, 10_000, 0);
        assert!(s.ready.is_empty() && s.waiting.is_empty());
        assert_eq!(s.to_fail, vec!["l.csv".to_string(), "fifo.csv".to_string()]);
        assert_eq!(s.refused.len(), 1);
        assert_eq!(s.refused[0].0, "bad\u{fffd}.csv");
        assert!(m.seen.is_empty());
    }

    #[test]
    fn list_inbox_reports_kinds_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.csv"), b"text\nx\n").unwrap();
        std::fs::create_dir(dir.path().join("x.csv")).unwrap();
        std::os::unix::fs::symlink("a.csv", dir.path().join("l.csv")).unwrap();
        let mut l = list_inbox(dir.path()).unwrap();
        l.sort_by(|a, b| a.name.cmp(&b.name));
        let kinds: Vec<(&str, EntryKind)> = l.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                ("a.csv", EntryKind::File),
                ("l.csv", EntryKind::Symlink),
                ("x.csv", EntryKind::Dir)
            ]
        );
        assert_eq!(l[0].size, 7);
    }
}
