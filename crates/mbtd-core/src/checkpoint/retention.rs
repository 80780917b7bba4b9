//! Retention: which checkpoints to delete (a pure plan) and deleting them.
//!
//! Kept: the newest `keep_last` valid checkpoints (by id order, which is time order); every
//! tagged one; the newest valid one of each of the last `keep_daily` UTC days (today
//! included); the one `LATEST` names and its parent, always; and every invalid one (left for
//! the operator to inspect, `list` shows why it is invalid). Everything else is deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::CheckpointError;
use super::durable;
use super::manifest::{is_valid_id, parse_rfc3339, unix_day};
use super::store::CheckpointSummary;

/// The retention rule (from [`super::CheckpointConfig::retention`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Keep the newest N valid checkpoints.
    pub keep_last: usize,
    /// Keep the newest valid checkpoint of each of the last N UTC days.
    pub keep_daily: usize,
}

/// Ids to delete under `policy` at time `now`, oldest first (see the module doc).
pub fn plan_retention(
    summaries: &[CheckpointSummary],
    policy: &RetentionPolicy,
    now: SystemTime,
) -> Vec<String> {
    let mut keep: BTreeSet<&str> = BTreeSet::new();
    for s in summaries {
        if s.is_latest {
            keep.insert(&s.id);
            if let Some(p) = &s.parent {
                keep.insert(p);
            }
        }
        if s.tag.is_some() || !s.valid {
            keep.insert(&s.id);
        }
    }
    let mut valid: Vec<&CheckpointSummary> = summaries.iter().filter(|s| s.valid).collect();
    valid.sort_by(|a, b| b.id.cmp(&a.id));
    keep.extend(valid.iter().take(policy.keep_last).map(|s| s.id.as_str()));
    let today = unix_day(now);
    let mut newest_of_day: BTreeMap<i64, &str> = BTreeMap::new();
    for s in &valid {
        let Some(t) = s.created_at.as_deref().and_then(parse_rfc3339) else {
            continue;
        };
        let day = unix_day(t);
        if day <= today && today - day < policy.keep_daily as i64 {
            // `valid` is newest first, so the first one seen for a day is its newest.
            newest_of_day.entry(day).or_insert(&s.id);
        }
    }
    keep.extend(newest_of_day.values());
    let mut delete: Vec<String> = valid
        .iter()
        .filter(|s| !keep.contains(s.id.as_str()))
        .map(|s| s.id.clone())
        .collect();
    delete.sort();
    delete
}

/// Deletes the checkpoints `ids` under `root` (each is renamed to a `.tmp-del-` name first,
/// so a crash mid-delete leaves only a leftover that the next start removes). Returns the
/// ids removed. Refuses to delete the one `LATEST` names.
pub fn apply_retention(root: &Path, ids: &[String]) -> Result<Vec<String>, CheckpointError> {
    let latest = super::store::read_latest(root).ok().flatten();
    let mut removed = Vec::new();
    for id in ids {
        if !is_valid_id(id) || latest.as_deref() == Some(id.as_str()) {
            return Err(CheckpointError::InvalidInput(format!(
                "refusing to delete checkpoint {id:?}: not a checkpoint id or named by LATEST"
            )));
        }
        let dir = root.join(id);
        let doomed = root.join(format!(".tmp-del-{id}"));
        fs::rename(&dir, &doomed).map_err(|source| CheckpointError::Fs {
            op: "rename for deletion",
            path: dir.clone(),
            source,
        })?;
        fs::remove_dir_all(&doomed).map_err(|source| CheckpointError::Fs {
            op: "remove",
            path: doomed.clone(),
            source,
        })?;
        removed.push(id.clone());
    }
    if !removed.is_empty() {
        durable::sync_dir(root).map_err(|source| CheckpointError::Fs {
            op: "fsync",
            path: root.to_path_buf(),
            source,
        })?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::manifest::{format_rfc3339, new_id};
    use proptest::prelude::*;
    use std::time::{Duration, UNIX_EPOCH};

    const DAY: u64 = 86_400;
    const T0: u64 = 1_795_392_000; // 2026-11-23T00:00:00Z

    fn summary(secs: u64, step: u64) -> CheckpointSummary {
        let t = UNIX_EPOCH + Duration::from_secs(secs);
        CheckpointSummary {
            id: new_id(t, step),
            step: Some(step),
            created_at: Some(format_rfc3339(t)),
            widths: vec![4],
            control_loss: None,
            tag: None,
            parent: None,
            bytes: 1,
            valid: true,
            problem: None,
            is_latest: false,
        }
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T0 + 12 * 3600)
    }

    #[test]
    fn keeps_last_n_tagged_daily_latest_and_parent() {
        // Two per day for 10 days, oldest first; day 9 is today.
        let mut s: Vec<CheckpointSummary> = (0..20)
            .map(|i| summary(T0 - 9 * DAY + (i / 2) * DAY + (i % 2) * 3600, i))
            .collect();
        s[3].tag = Some("pre-expansion".into());
        s[5].valid = false;
        // LATEST is an old one after a rollback; its parent is older still.
        s[8].is_latest = true;
        s[8].parent = Some(s[1].id.clone());
        let policy = RetentionPolicy {
            keep_last: 3,
            keep_daily: 4,
        };
        let del = plan_retention(&s, &policy, now());
        let kept: Vec<u64> = s
            .iter()
            .filter(|x| !del.contains(&x.id))
            .map(|x| x.step.unwrap())
            .collect();
        // last 3: 17,18,19; daily for days 6..=9: newest of each = 13,15,17,19;
        // tagged 3; invalid 5; LATEST 8; its parent 1.
        assert_eq!(kept, vec![1, 3, 5, 8, 13, 15, 17, 18, 19]);
        let mut sorted = del.clone();
        sorted.sort();
        assert_eq!(del, sorted);
    }

    #[test]
    fn zero_daily_keeps_only_last() {
        let s: Vec<_> = (0..5).map(|i| summary(T0 + i * 60, i)).collect();
        let del = plan_retention(
            &s,
            &RetentionPolicy {
                keep_last: 2,
                keep_daily: 0,
            },
            now(),
        );
        assert_eq!(del, s[..3].iter().map(|x| x.id.clone()).collect::<Vec<_>>());
    }

    #[test]
    fn apply_deletes_and_refuses_latest() {
        use crate::checkpoint::{Manifest, list, write_checkpoint};
        let root = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..4)
            .map(|i| {
                let m = Manifest::new(UNIX_EPOCH + Duration::from_secs(T0 + i * 60), i, 0);
                write_checkpoint(root.path(), &m, &[("model.safetensors", b"w")])
                    .unwrap()
                    .id
            })
            .collect();
        let l = list(root.path()).unwrap();
        let plan = plan_retention(
            &l.checkpoints,
            &RetentionPolicy {
                keep_last: 1,
                keep_daily: 0,
            },
            now(),
        );
        assert_eq!(plan, ids[..3].to_vec());
        assert_eq!(apply_retention(root.path(), &plan).unwrap(), plan);
        let left: Vec<String> = list(root.path())
            .unwrap()
            .checkpoints
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(left, vec![ids[3].clone()]);
        assert!(apply_retention(root.path(), &[ids[3].clone()]).is_err());
        assert!(root.path().join(&ids[3]).is_dir());
    }

    proptest! {
        #[test]
        fn never_deletes_latest_parent_tagged_or_recent(
            specs in prop::collection::vec((0u64..30 * DAY, any::<bool>(), 0u8..10, 0u8..10), 1..40),
            latest_pick in any::<prop::sample::Index>(),
            parent_pick in any::<prop::sample::Index>(),
            keep_last in 0usize..6,
            keep_daily in 0usize..10,
        ) {
            let mut s: Vec<CheckpointSummary> = specs
                .iter()
                .enumerate()
                .map(|(i, &(off, _, tag, valid))| {
                    let mut x = summary(T0 - 20 * DAY + off, i as u64);
                    x.tag = (tag == 0).then(|| "t".to_string());
                    x.valid = valid != 0;
                    x
                })
                .collect();
            let li = latest_pick.index(s.len());
            let pi = parent_pick.index(s.len());
            s[li].is_latest = true;
            s[li].parent = Some(s[pi].id.clone());
            let policy = RetentionPolicy { keep_last, keep_daily };
            let del = plan_retention(&s, &policy, now());
            let del_set: BTreeSet<&String> = del.iter().collect();
            prop_assert_eq!(del_set.len(), del.len(), "no duplicates");
            prop_assert!(!del_set.contains(&s[li].id));
            prop_assert!(!del_set.contains(&s[pi].id));
            for x in &s {
                if x.tag.is_some() || !x.valid {
                    prop_assert!(!del_set.contains(&x.id));
                }
            }
            let mut valid: Vec<&String> = s.iter().filter(|x| x.valid).map(|x| &x.id).collect();
            valid.sort();
            for id in valid.iter().rev().take(keep_last) {
                prop_assert!(!del_set.contains(id));
            }
            for id in &del {
                prop_assert!(s.iter().any(|x| &x.id == id && x.valid));
            }
        }
    }
}
