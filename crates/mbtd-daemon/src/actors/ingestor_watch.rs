//! The ingestor's view of the inbox: the watcher (notify) and the pump that turns its
//! events into [`Scan`] messages, debounced, plus a scan every `period` as a fallback.
//!
//! What the pump tracks per name: renamed in or hard-linked in (complete by the producer's
//! convention), or open for writing (a create or write seen and no close-write since; inotify reports
//! `IN_CLOSE_WRITE` as `Access(Close(Write))`). A mark without an event for
//! [`WRITER_STALE`] is dropped, so a lost close event cannot hold a file back for ever.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kameo::prelude::*;
use notify::Watcher;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

use super::ingestor::IngestorActor;

/// A name marked as open for writing with no watcher event for this long is treated as
/// closed.
pub const WRITER_STALE: Duration = Duration::from_secs(120);

/// How many inbox events have been seen, which names were renamed in, which are open.
pub struct Scan {
    pub renamed_in: HashSet<String>,
    pub writing: HashSet<String>,
    pub events: u64,
}

/// What a watcher event says about the names it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboxEvent {
    /// Renamed into the inbox (complete by the producer's convention).
    RenamedIn,
    /// Created or written to: a writer has it open.
    Written,
    /// Closed after writing, renamed away or removed.
    Closed,
    /// Anything else (reads, metadata).
    Other,
}

pub fn classify(ev: &mut notify::Event) -> InboxEvent {
    use notify::EventKind as K;
    use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
    match ev.kind {
        // Only the destination of a rename is a file renamed *in*: a name moved out (to
        // `.done/`, or away by a producer) must not make a new file written in place under
        // that name ready before it settles.
        K::Modify(ModifyKind::Name(RenameMode::From)) | K::Remove(_) => InboxEvent::Closed,
        K::Modify(ModifyKind::Name(RenameMode::Both)) => {
            ev.paths.drain(..ev.paths.len().saturating_sub(1));
            InboxEvent::RenamedIn
        }
        K::Modify(ModifyKind::Name(_)) => InboxEvent::RenamedIn,
        // A name created with a second link is a complete file linked in (`ln`), not one
        // being written: it gets no close-write, and waiting for one held it back for
        // `WRITER_STALE`. A file written in place has one link while it is written.
        K::Create(_) if ev.paths.last().is_some_and(|p| linked_in(p)) => InboxEvent::RenamedIn,
        K::Create(_) | K::Modify(ModifyKind::Data(_)) | K::Modify(ModifyKind::Any) => {
            InboxEvent::Written
        }
        K::Access(AccessKind::Close(AccessMode::Write)) => InboxEvent::Closed,
        _ => InboxEvent::Other,
    }
}

/// Whether `path` is a regular file with more than one hard link.
fn linked_in(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.nlink() > 1)
}

/// Watch `inbox` (not recursively). `None` when the platform or the directory does not
/// allow it: the periodic scan alone then finds files (and no writer is seen).
pub fn watch(
    inbox: &Path,
) -> (
    Option<notify::RecommendedWatcher>,
    UnboundedReceiver<(InboxEvent, Vec<PathBuf>)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(InboxEvent, Vec<PathBuf>)>();
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(mut ev) = ev {
            let class = classify(&mut ev);
            let _ = tx.send((class, ev.paths));
        }
    })
    .and_then(|mut w| {
        w.watch(inbox, notify::RecursiveMode::NonRecursive)?;
        Ok(w)
    });
    match watcher {
        Ok(w) => (Some(w), rx),
        Err(e) => {
            tracing::warn!(
                actor = "ingestor",
                error = %e,
                "cannot watch the inbox; relying on the periodic rescan"
            );
            (None, rx)
        }
    }
}

/// The pump: a [`Scan`] shortly after a burst of events, and every `period` otherwise.
/// It holds a strong reference: after a supervisor restart, `me` is a fresh `ActorRef`
/// (same mailbox) that nobody else holds, so a weak one would stop upgrading as soon as
/// `on_start` returns and the restarted ingestor would never scan again. The task is
/// aborted when the actor's state is dropped, which releases the reference.
pub fn spawn_pump(
    mut rx: UnboundedReceiver<(InboxEvent, Vec<PathBuf>)>,
    me: ActorRef<IngestorActor>,
    period: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut renamed_in = HashSet::new();
        let mut writing: HashMap<String, Instant> = HashMap::new();
        let mut events = 0u64;
        // First scan at once: whatever arrived while the daemon was down.
        let mut deadline = tokio::time::Instant::now();
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    let Some((class, paths)) = ev else { return };
                    events += 1;
                    for p in paths {
                        let Some(n) = p.file_name().and_then(|n| n.to_str()) else {
                            continue;
                        };
                        match class {
                            InboxEvent::RenamedIn => {
                                writing.remove(n);
                                renamed_in.insert(n.to_string());
                            }
                            InboxEvent::Written => {
                                renamed_in.remove(n);
                                writing.insert(n.to_string(), Instant::now());
                            }
                            InboxEvent::Closed => {
                                writing.remove(n);
                            }
                            InboxEvent::Other => {}
                        }
                    }
                    // Debounce: scan shortly after a burst of events.
                    let soon = tokio::time::Instant::now() + Duration::from_millis(100);
                    deadline = deadline.min(soon);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    writing.retain(|_, t| t.elapsed() < WRITER_STALE);
                    let scan = Scan {
                        renamed_in: std::mem::take(&mut renamed_in),
                        writing: writing.keys().cloned().collect(),
                        events,
                    };
                    events = 0;
                    // `ask`, not `tell`: scans never pile up in the mailbox. A file is
                    // ingested on a blocking thread; the next one starts when it ends
                    // ([`IngestDone`]), so the mailbox (status, pause) stays responsive.
                    if me.ask(scan).await.is_err() {
                        return;
                    }
                    // Files still settling need another look after `settle`.
                    deadline = tokio::time::Instant::now() + period;
                }
            }
        }
    })
}
