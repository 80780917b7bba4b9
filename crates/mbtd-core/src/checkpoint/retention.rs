//! Retention: which checkpoints to delete, as a pure plan over the listing.
//!
//! Classes, in the order they are decided:
//! - **Protected** (never deleted, not even over budget): the one `LATEST` names, its
//!   parent, and the checkpoints `LATEST` pins (the `pre-expand` checkpoint of an expansion
//!   not yet kept or rolled back).
//! - **Operator-tagged** (any tag but the automatic ones): the newest `keep_tagged` are
//!   kept and not deleted over budget; older ones are ordinary. `ctl checkpoint delete`
//!   removes them.
//! - **Ordinary**, kept while any rule holds: among the newest `keep_last` valid
//!   non-operator-tagged checkpoints; the newest of its UTC day for the last `keep_daily`
//!   days; the newest `shutdown` one; one of the newest `keep_decided_pre_expand`
//!   `pre-expand` ones. Everything else is deleted.
//! - **Invalid** ones (unreadable manifest, file missing or of another size) are left for
//!   the operator to inspect, but deleted first when over budget.
//!
//! **Budget**: while the kept checkpoints total more than `max_bytes` (0 = no budget), the
//! oldest that is neither protected nor among the kept operator-tagged is deleted too,
//! invalid ones first. The number left on disk is therefore at most `keep_last` + 1
//! (`shutdown`) + `keep_decided_pre_expand` + 3 (`LATEST`, its parent, one pinned
//! `pre-expand`) + `keep_daily` + `keep_tagged` + the invalid ones, and their size is at most
//! `max_bytes` unless the protected and operator-tagged ones alone exceed it
//! ([`RetentionPlan::over_budget`]). Retention runs after each write, so while a checkpoint
//! is being written the total can exceed the budget by that one checkpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::listing::CheckpointSummary;
use super::manifest::{AUTOMATIC_TAGS, TAG_PRE_EXPAND, TAG_SHUTDOWN, parse_rfc3339, unix_day};

/// The retention rule (from [`super::CheckpointConfig::retention`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Keep the newest N valid checkpoints (operator-tagged ones not counted).
    pub keep_last: usize,
    /// Keep the newest valid checkpoint of each of the last N UTC days.
    pub keep_daily: usize,
    /// Keep the newest N operator-tagged checkpoints regardless of the budget.
    pub keep_tagged: usize,
    /// Keep the newest N `pre-expand` checkpoints of decided expansions.
    pub keep_decided_pre_expand: usize,
    /// Budget for all checkpoints, bytes (0 = none).
    pub max_bytes: u64,
}

/// What retention will do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RetentionPlan {
    /// Ids to delete, oldest first.
    pub delete: Vec<String>,
    /// Bytes left after the deletions.
    pub kept_bytes: u64,
    /// Whether `kept_bytes` still exceeds the budget (the protected and operator-tagged
    /// checkpoints alone are larger than `max_bytes`).
    pub over_budget: bool,
}

fn is_operator_tagged(s: &CheckpointSummary) -> bool {
    s.tag
        .as_deref()
        .is_some_and(|t| !AUTOMATIC_TAGS.contains(&t))
}

/// The plan under `policy` at time `now` (see the module doc). `summaries` in any order.
pub fn plan_retention(
    summaries: &[CheckpointSummary],
    policy: &RetentionPolicy,
    now: SystemTime,
) -> RetentionPlan {
    let mut by_age: Vec<&CheckpointSummary> = summaries.iter().collect();
    by_age.sort_by(|a, b| a.id.cmp(&b.id));
    let newest_first = || by_age.iter().rev().copied();

    // Never deleted.
    let mut pinned: BTreeSet<&str> = BTreeSet::new();
    for s in summaries.iter().filter(|s| s.is_latest) {
        pinned.insert(&s.id);
        pinned.extend(s.parent.as_deref());
        pinned.extend(s.pins.iter().map(String::as_str));
    }
    pinned.extend(
        newest_first()
            .filter(|s| s.valid && is_operator_tagged(s))
            .take(policy.keep_tagged)
            .map(|s| s.id.as_str()),
    );

    let mut keep: BTreeSet<&str> = pinned.clone();
    keep.extend(summaries.iter().filter(|s| !s.valid).map(|s| s.id.as_str()));
    let ordinary = || newest_first().filter(|s| s.valid && !is_operator_tagged(s));
    keep.extend(ordinary().take(policy.keep_last).map(|s| s.id.as_str()));
    let with_tag = |tag: &'static str| ordinary().filter(move |s| s.tag.as_deref() == Some(tag));
    keep.extend(with_tag(TAG_SHUTDOWN).take(1).map(|s| s.id.as_str()));
    keep.extend(
        with_tag(TAG_PRE_EXPAND)
            .filter(|s| !pinned.contains(s.id.as_str()))
            .take(policy.keep_decided_pre_expand)
            .map(|s| s.id.as_str()),
    );
    let today = unix_day(now);
    let mut newest_of_day: BTreeMap<i64, &str> = BTreeMap::new();
    for s in ordinary() {
        let Some(t) = s.created_at.as_deref().and_then(parse_rfc3339) else {
            continue;
        };
        let day = unix_day(t);
        if day <= today && today - day < policy.keep_daily as i64 {
            // Newest first, so the first one seen for a day is its newest.
            newest_of_day.entry(day).or_insert(&s.id);
        }
    }
    keep.extend(newest_of_day.values());

    let mut kept_bytes: u64 = by_age
        .iter()
        .filter(|s| keep.contains(s.id.as_str()))
        .map(|s| s.bytes)
        .sum();
    if policy.max_bytes > 0 {
        // Oldest first, invalid ones before valid ones.
        let mut candidates: Vec<&CheckpointSummary> = by_age
            .iter()
            .copied()
            .filter(|s| keep.contains(s.id.as_str()) && !pinned.contains(s.id.as_str()))
            .collect();
        candidates.sort_by_key(|s| s.valid);
        for s in candidates {
            if kept_bytes <= policy.max_bytes {
                break;
            }
            keep.remove(s.id.as_str());
            kept_bytes -= s.bytes;
        }
    }
    RetentionPlan {
        delete: by_age
            .iter()
            .filter(|s| !keep.contains(s.id.as_str()))
            .map(|s| s.id.clone())
            .collect(),
        kept_bytes,
        over_budget: policy.max_bytes > 0 && kept_bytes > policy.max_bytes,
    }
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
            pins: Vec::new(),
            bytes: 1,
            valid: true,
            problem: None,
            is_latest: false,
        }
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T0 + 12 * 3600)
    }

    fn policy(keep_last: usize, keep_daily: usize) -> RetentionPolicy {
        RetentionPolicy {
            keep_last,
            keep_daily,
            keep_tagged: 10,
            keep_decided_pre_expand: 0,
            max_bytes: 0,
        }
    }

    fn kept_steps(s: &[CheckpointSummary], plan: &RetentionPlan) -> Vec<u64> {
        s.iter()
            .filter(|x| !plan.delete.contains(&x.id))
            .map(|x| x.step.unwrap())
            .collect()
    }

    #[test]
    fn keeps_last_n_tagged_daily_latest_and_parent() {
        // Two per day for 10 days, oldest first; day 9 is today.
        let mut s: Vec<CheckpointSummary> = (0..20)
            .map(|i| summary(T0 - 9 * DAY + (i / 2) * DAY + (i % 2) * 3600, i))
            .collect();
        s[3].tag = Some("before-upgrade".into());
        s[5].valid = false;
        // LATEST is an old one after a rollback; its parent is older still.
        s[8].is_latest = true;
        s[8].parent = Some(s[1].id.clone());
        let plan = plan_retention(&s, &policy(3, 4), now());
        // last 3: 17,18,19; daily for days 6..=9: newest of each = 13,15,17,19;
        // tagged 3; invalid 5; LATEST 8; its parent 1.
        assert_eq!(kept_steps(&s, &plan), vec![1, 3, 5, 8, 13, 15, 17, 18, 19]);
        let mut sorted = plan.delete.clone();
        sorted.sort();
        assert_eq!(plan.delete, sorted);
        assert_eq!(plan.kept_bytes, 9);
        assert!(!plan.over_budget);
    }

    #[test]
    fn zero_daily_keeps_only_last() {
        let s: Vec<_> = (0..5).map(|i| summary(T0 + i * 60, i)).collect();
        let plan = plan_retention(&s, &policy(2, 0), now());
        assert_eq!(
            plan.delete,
            s[..3].iter().map(|x| x.id.clone()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn only_the_newest_shutdown_checkpoint_is_a_class_of_its_own() {
        // Eight restarts, each leaving a shutdown checkpoint after two periodic ones.
        let mut s: Vec<_> = (0..24).map(|i| summary(T0 + i * 60, i)).collect();
        for x in s.iter_mut().skip(2).step_by(3) {
            x.tag = Some(TAG_SHUTDOWN.into());
        }
        s[23].is_latest = true;
        s[23].parent = Some(s[22].id.clone());
        let plan = plan_retention(&s, &policy(2, 0), now());
        // keep_last 2 (22, 23) and the newest shutdown (23): nothing else.
        assert_eq!(kept_steps(&s, &plan), vec![22, 23]);
        // With the newest shutdown older than the keep_last window it still stays.
        s[23].tag = None;
        s[22].tag = None;
        let plan = plan_retention(&s, &policy(2, 0), now());
        assert_eq!(kept_steps(&s, &plan), vec![20, 22, 23]);
    }

    #[test]
    fn pre_expand_is_kept_while_undecided_and_the_last_k_decided() {
        let mut s: Vec<_> = (0..12).map(|i| summary(T0 + i * 60, i)).collect();
        for i in [1, 4, 7, 9] {
            s[i].tag = Some(TAG_PRE_EXPAND.into());
        }
        // The expansion after 9 is undecided: LATEST pins its pre-expand checkpoint.
        s[11].is_latest = true;
        s[11].parent = Some(s[10].id.clone());
        s[11].pins = vec![s[9].id.clone()];
        let p = RetentionPolicy {
            keep_decided_pre_expand: 1,
            ..policy(2, 0)
        };
        let plan = plan_retention(&s, &p, now());
        // last 2: 10, 11; pinned 9; newest decided pre-expand 7; 1 and 4 go.
        assert_eq!(kept_steps(&s, &plan), vec![7, 9, 10, 11]);
        // Decided (no pin any more): 9 becomes the newest decided one, 7 goes.
        s[11].pins.clear();
        let plan = plan_retention(&s, &p, now());
        assert_eq!(kept_steps(&s, &plan), vec![9, 10, 11]);
    }

    #[test]
    fn the_budget_deletes_oldest_unprotected_first_invalid_before_valid() {
        let mut s: Vec<_> = (0..6).map(|i| summary(T0 + i * 60, i)).collect();
        for x in &mut s {
            x.bytes = 100;
        }
        s[2].valid = false;
        s[0].tag = Some("keep-me".into());
        // After a rollback LATEST is old: 1, with parent 0 (also operator-tagged).
        s[1].is_latest = true;
        s[1].parent = Some(s[0].id.clone());
        let p = RetentionPolicy {
            max_bytes: 350,
            ..policy(10, 0)
        };
        let plan = plan_retention(&s, &p, now());
        // Protected: 0, 1. Over 350 bytes: invalid 2 first, then the oldest valid, 3, 4.
        assert_eq!(kept_steps(&s, &plan), vec![0, 1, 5]);
        assert_eq!(plan.kept_bytes, 300);
        assert!(!plan.over_budget);
        let p = RetentionPolicy {
            max_bytes: 150,
            ..p
        };
        let plan = plan_retention(&s, &p, now());
        assert_eq!(kept_steps(&s, &plan), vec![0, 1]);
        assert_eq!(plan.kept_bytes, 200);
        assert!(plan.over_budget, "protected alone exceed the budget");
    }

    #[test]
    fn remove_deletes_and_refuses_latest() {
        use crate::checkpoint::{Manifest, list, remove_checkpoints, write_checkpoint};
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
        let plan = plan_retention(&l.checkpoints, &policy(1, 0), now());
        assert_eq!(plan.delete, ids[..3].to_vec());
        assert_eq!(
            remove_checkpoints(root.path(), &plan.delete).unwrap(),
            plan.delete
        );
        let left: Vec<String> = list(root.path())
            .unwrap()
            .checkpoints
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(left, vec![ids[3].clone()]);
        assert!(remove_checkpoints(root.path(), &[ids[3].clone()]).is_err());
        assert!(root.path().join(&ids[3]).is_dir());
    }

    proptest! {
        #[test]
        fn never_deletes_protected_and_bounds_count_and_bytes(
            specs in prop::collection::vec((0u64..30 * DAY, 0u8..12, 0u8..10, 1u64..1000), 1..40),
            latest_pick in any::<prop::sample::Index>(),
            parent_pick in any::<prop::sample::Index>(),
            pin_pick in any::<prop::sample::Index>(),
            keep_last in 0usize..6,
            keep_daily in 0usize..10,
            keep_tagged in 0usize..4,
            keep_decided_pre_expand in 0usize..3,
            max_bytes in 0u64..20_000,
        ) {
            let mut s: Vec<CheckpointSummary> = specs
                .iter()
                .enumerate()
                .map(|(i, &(off, tag, valid, bytes))| {
                    let mut x = summary(T0 - 20 * DAY + off, i as u64);
                    x.tag = match tag {
                        0 => Some("op".to_string()),
                        1 | 2 => Some(TAG_SHUTDOWN.to_string()),
                        3 | 4 => Some(TAG_PRE_EXPAND.to_string()),
                        _ => None,
                    };
                    x.valid = valid != 0;
                    x.bytes = bytes;
                    x
                })
                .collect();
            let li = latest_pick.index(s.len());
            let pi = parent_pick.index(s.len());
            let ni = pin_pick.index(s.len());
            s[li].is_latest = true;
            s[li].parent = Some(s[pi].id.clone());
            s[li].pins = vec![s[ni].id.clone()];
            let policy = RetentionPolicy { keep_last, keep_daily, keep_tagged, keep_decided_pre_expand, max_bytes };
            let plan = plan_retention(&s, &policy, now());
            let del: BTreeSet<&String> = plan.delete.iter().collect();
            prop_assert_eq!(del.len(), plan.delete.len(), "no duplicates");
            for i in [li, pi, ni] {
                prop_assert!(!del.contains(&s[i].id));
            }
            let kept: Vec<&CheckpointSummary> = s.iter().filter(|x| !del.contains(&x.id)).collect();
            let bytes: u64 = kept.iter().map(|x| x.bytes).sum();
            prop_assert_eq!(bytes, plan.kept_bytes);
            if max_bytes > 0 && !plan.over_budget {
                prop_assert!(bytes <= max_bytes);
            }
            if plan.over_budget {
                // Only protected and kept operator-tagged checkpoints remain.
                let protected = [&s[li].id, &s[pi].id, &s[ni].id];
                for x in &kept {
                    prop_assert!(protected.contains(&&x.id) || x.tag.as_deref() == Some("op"));
                }
            }
            let invalid = s.iter().filter(|x| !x.valid).count();
            let bound = keep_last + 1 + keep_decided_pre_expand + 3 + keep_daily + keep_tagged + invalid;
            prop_assert!(kept.len() <= bound, "{} kept > {}", kept.len(), bound);
            if max_bytes == 0 {
                // Without a budget the newest keep_last ordinary valid ones all stay.
                let mut ordinary: Vec<&String> = s.iter()
                    .filter(|x| x.valid && x.tag.as_deref() != Some("op"))
                    .map(|x| &x.id)
                    .collect();
                ordinary.sort();
                for id in ordinary.iter().rev().take(keep_last) {
                    prop_assert!(!del.contains(id));
                }
            }
        }
    }
}
