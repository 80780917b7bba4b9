//! A branch host's generation sessions: per session, per opened branch, the decode state
//! of `model::generate` (half-precision weight panels and the key/value cache), so the
//! host computes each new position exactly as the single-process generation does.
//!
//! Bounded ([`SessionLimits`]): at most `max_sessions` sessions are kept; opening one
//! more drops the least recently used, and a session untouched for `idle` is dropped at
//! the host's next request. A request naming a session the host does not hold (closed,
//! dropped, or opened on a host that has since restarted) is refused with a message that
//! says so; the coordinator masks those branches for the rest of the generation.

use super::protocol::BranchKey;
use crate::model::decode::BranchDecode;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// How many generation sessions a host keeps, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Most sessions held at once (at least 1); opening one more drops the least
    /// recently used.
    pub max_sessions: usize,
    /// A session not used for this long is dropped.
    pub idle: Duration,
}

impl Default for SessionLimits {
    /// 4 sessions, 5 minutes: the coordinator runs one generation at a time and closes
    /// it, so more are only left by a coordinator that stopped mid-generation.
    fn default() -> Self {
        Self {
            max_sessions: 4,
            idle: Duration::from_secs(300),
        }
    }
}

/// One opened branch of a session.
#[derive(Debug)]
pub(super) struct Cached {
    pub dec: BranchDecode,
    /// Position of the next decode.
    pub pos: u64,
    /// The branch's weight version when it was opened.
    pub version: u64,
}

/// One generation session.
#[derive(Debug)]
pub(super) struct Session {
    pub branches: BTreeMap<BranchKey, Cached>,
    last_used: Instant,
}

/// The sessions of one host.
#[derive(Debug, Default)]
pub(super) struct Sessions {
    limits: SessionLimits,
    map: HashMap<u64, Session>,
}

impl Sessions {
    pub(super) fn new(limits: SessionLimits) -> Self {
        Self {
            limits,
            map: HashMap::new(),
        }
    }

    /// Drops the sessions idle for longer than the limit at `now`.
    fn evict_idle(&mut self, now: Instant) {
        let idle = self.limits.idle;
        self.map
            .retain(|_, s| now.saturating_duration_since(s.last_used) <= idle);
    }

    /// Session `id`, marked used at `now`, created when it is not held: after dropping
    /// idle sessions and, at the cap, the least recently used one.
    pub(super) fn open(&mut self, id: u64, now: Instant) -> &mut Session {
        self.evict_idle(now);
        while !self.map.contains_key(&id) && self.map.len() >= self.limits.max_sessions.max(1) {
            let oldest = self.map.iter().min_by_key(|(_, s)| s.last_used);
            let Some((&old, _)) = oldest else { break };
            self.map.remove(&old);
        }
        let s = self.map.entry(id).or_insert(Session {
            branches: BTreeMap::new(),
            last_used: now,
        });
        s.last_used = now;
        s
    }

    /// Session `id`, marked used at `now`; an error saying why it is not held.
    pub(super) fn get(&mut self, id: u64, now: Instant) -> Result<&mut Session, String> {
        self.evict_idle(now);
        let SessionLimits { max_sessions, idle } = self.limits;
        let s = self.map.get_mut(&id).ok_or_else(|| {
            format!(
                "generation session {id:#x} is not open on this host: it was closed, idle for more than {}s, dropped for a newer session (at most {max_sessions} are kept), or this node restarted; start the generation again",
                idle.as_secs_f64()
            )
        })?;
        s.last_used = now;
        Ok(s)
    }

    /// Drops session `id`; the number of branch caches dropped (0: not held).
    pub(super) fn close(&mut self, id: u64) -> usize {
        self.map.remove(&id).map_or(0, |s| s.branches.len())
    }

    /// Number of sessions held.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
}
