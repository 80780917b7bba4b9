//! The metrics history as series for plotting, and the events read from it.
//!
//! Events come from changes between consecutive snapshots: a rise of `expansion_events_total`,
//! `rollbacks_total` or `checkpoints_total` (by the size of the rise), `branches_forced_off`
//! going from 0 to more (outage start) or back to 0 (outage end), and `uptime_seconds`
//! falling (the daemon restarted; counters start again from 0, so a fall of a counter is no
//! event). An event is placed at the first snapshot that shows it, so its time and step are
//! late by at most one history period.

use std::collections::BTreeMap;

use crate::telemetry::history::HistoryRecord;
use crate::telemetry::names as n;

/// One snapshot, reduced to what the plots show.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Point {
    /// Seconds since the first snapshot.
    pub t_s: f64,
    /// The trainer's step (`train_step`, or `train_steps_total` in histories without it).
    pub step: Option<f64>,
    pub loss: Option<f64>,
    pub control_old: Option<f64>,
    pub control_new: Option<f64>,
    pub tokens_per_sec: Option<f64>,
    pub ingest_rows_per_sec: Option<f64>,
    /// Branches per layer.
    pub widths: Vec<usize>,
    /// Branches per layer active in the last step.
    pub active: Vec<Option<f64>>,
    /// α per layer and branch (branches beyond the layer's width are left out: their gauges
    /// are stale after a rollback undid an expansion).
    pub alpha: Vec<Vec<f64>>,
    pub forced_off: f64,
    uptime_s: f64,
    expansions: Option<f64>,
    rollbacks: Option<f64>,
    checkpoints: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EventKind {
    Expansion,
    Rollback,
    OutageStart,
    OutageEnd,
    Checkpoint,
    Restart,
}

impl EventKind {
    pub fn label(self) -> &'static str {
        match self {
            EventKind::Expansion => "expansion",
            EventKind::Rollback => "rollback",
            EventKind::OutageStart => "outage start",
            EventKind::OutageEnd => "outage end",
            EventKind::Checkpoint => "checkpoint",
            EventKind::Restart => "daemon restart",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub t_s: f64,
    pub step: Option<f64>,
    /// How many (a counter may rise by more than one between snapshots).
    pub count: u64,
}

/// The history as points and events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    pub points: Vec<Point>,
    pub events: Vec<Event>,
    /// Unix time (ms) of the first snapshot.
    pub start_unix_ms: u64,
}

/// Splits `name{a="1",b="x"}` into the name and its labels.
pub fn split_key(key: &str) -> (&str, BTreeMap<&str, &str>) {
    let Some(open) = key.find('{') else {
        return (key, BTreeMap::new());
    };
    let inner = key[open + 1..].trim_end_matches('}');
    let labels = inner
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k, v.trim_matches('"')))
        .collect();
    (&key[..open], labels)
}

fn label_index(labels: &BTreeMap<&str, &str>, key: &str) -> Option<usize> {
    labels.get(key)?.parse().ok()
}

fn set_at<T: Clone + Default>(v: &mut Vec<T>, i: usize, x: T) {
    if v.len() <= i {
        v.resize(i + 1, T::default());
    }
    v[i] = x;
}

fn point(rec: &HistoryRecord, t0: u64) -> Point {
    let m = &rec.metrics;
    let get = |k: &str| m.get(k).copied().flatten();
    let mut p = Point {
        t_s: rec.unix_ms.saturating_sub(t0) as f64 / 1000.0,
        step: get(n::TRAIN_STEP).or_else(|| get(n::TRAIN_STEPS_TOTAL)),
        loss: get(n::LOSS),
        control_old: get(n::LOSS_CONTROL_OLD),
        control_new: get(n::LOSS_CONTROL_NEW),
        tokens_per_sec: get(n::TRAIN_TOKENS_PER_SEC),
        ingest_rows_per_sec: get(n::INGEST_ROWS_PER_SEC_WINDOW),
        forced_off: get(n::BRANCHES_FORCED_OFF).unwrap_or(0.0),
        uptime_s: rec.uptime_s,
        expansions: get(n::EXPANSION_EVENTS_TOTAL),
        rollbacks: get(n::ROLLBACKS_TOTAL),
        checkpoints: get(n::CHECKPOINTS_TOTAL),
        ..Point::default()
    };
    let mut widths: Vec<Option<usize>> = Vec::new();
    let mut alpha: Vec<Vec<Option<f64>>> = Vec::new();
    for (key, v) in m {
        let (name, labels) = split_key(key);
        let Some(layer) = label_index(&labels, "layer") else {
            continue;
        };
        match name {
            _ if name == n::LAYER_WIDTH => set_at(&mut widths, layer, v.map(|w| w as usize)),
            _ if name == n::LAYER_ACTIVE_BRANCHES => set_at(&mut p.active, layer, *v),
            _ if name == n::ALPHA => {
                if let Some(b) = label_index(&labels, "branch") {
                    if alpha.len() <= layer {
                        alpha.resize(layer + 1, Vec::new());
                    }
                    set_at(&mut alpha[layer], b, *v);
                }
            }
            _ => {}
        }
    }
    // Histories without `layer_width`: every α gauge counts as a branch.
    let n_layers = widths.len().max(alpha.len());
    p.widths = (0..n_layers)
        .map(|l| {
            widths
                .get(l)
                .copied()
                .flatten()
                .unwrap_or_else(|| alpha.get(l).map_or(0, Vec::len))
        })
        .collect();
    p.alpha = (0..n_layers)
        .map(|l| {
            let a = alpha.get(l).cloned().unwrap_or_default();
            a.into_iter()
                .take(p.widths[l])
                .map(|x| x.unwrap_or(f64::NAN))
                .collect()
        })
        .collect();
    p
}

/// Builds points and events from history records (oldest first).
pub fn series(records: &[HistoryRecord]) -> Series {
    let Some(first) = records.first() else {
        return Series::default();
    };
    let t0 = first.unix_ms;
    let points: Vec<Point> = records.iter().map(|r| point(r, t0)).collect();
    let mut events = Vec::new();
    for w in points.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let mut push = |kind, count| {
            events.push(Event {
                kind,
                t_s: b.t_s,
                step: b.step,
                count,
            })
        };
        if b.uptime_s < a.uptime_s {
            push(EventKind::Restart, 1);
            continue;
        }
        for (kind, x, y) in [
            (EventKind::Expansion, a.expansions, b.expansions),
            (EventKind::Rollback, a.rollbacks, b.rollbacks),
            (EventKind::Checkpoint, a.checkpoints, b.checkpoints),
        ] {
            if let (Some(x), Some(y)) = (x, y)
                && y > x
            {
                push(kind, (y - x).round() as u64);
            }
        }
        if a.forced_off == 0.0 && b.forced_off > 0.0 {
            push(EventKind::OutageStart, b.forced_off as u64);
        } else if a.forced_off > 0.0 && b.forced_off == 0.0 {
            push(EventKind::OutageEnd, a.forced_off as u64);
        }
    }
    Series {
        points,
        events,
        start_unix_ms: t0,
    }
}

/// Outage spans `(start, end)` in the units `at` picks from an event (an outage still on at
/// the end of the history ends at `last`).
pub fn outage_spans(
    events: &[Event],
    at: impl Fn(&Event) -> Option<f64>,
    last: f64,
) -> Vec<(f64, f64)> {
    let mut spans = Vec::new();
    let mut open: Option<f64> = None;
    for e in events {
        match e.kind {
            EventKind::OutageStart => open = at(e).or(open),
            EventKind::OutageEnd | EventKind::Restart => {
                if let (Some(s), Some(t)) = (open.take(), at(e)) {
                    spans.push((s, t));
                }
            }
            _ => {}
        }
    }
    if let Some(s) = open {
        spans.push((s, last));
    }
    spans
}

/// Runs of points whose step does not go back (a rollback starts a new run), each as
/// `(step, value)` pairs of the points that have both.
pub fn step_runs(points: &[Point], value: impl Fn(&Point) -> Option<f64>) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    let mut last_step = f64::NEG_INFINITY;
    for p in points {
        let Some(s) = p.step else { continue };
        if s < last_step {
            runs.push(Vec::new());
        }
        last_step = s;
        if let Some(v) = value(p).filter(|v| v.is_finite()) {
            runs.last_mut().expect("one run at least").push((s, v));
        }
    }
    runs.retain(|r| !r.is_empty());
    runs
}

/// The points where `value` changed (control losses change only at evaluations), as
/// `(step, value)`.
pub fn changes(points: &[Point], value: impl Fn(&Point) -> Option<f64>) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    let mut prev: Option<f64> = None;
    for p in points {
        let (Some(s), Some(v)) = (p.step, value(p).filter(|v| v.is_finite())) else {
            continue;
        };
        if prev != Some(v) {
            out.push((s, v));
        }
        prev = Some(v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(t: u64, uptime: f64, kv: &[(&str, f64)]) -> HistoryRecord {
        HistoryRecord {
            v: 1,
            unix_ms: 1_000_000 + t * 1000,
            uptime_s: uptime,
            metrics: kv.iter().map(|(k, v)| (k.to_string(), Some(*v))).collect(),
        }
    }

    #[test]
    fn keys_split_into_name_and_labels() {
        let (name, l) = split_key("alpha{branch=\"2\",layer=\"1\"}");
        assert_eq!(name, "alpha");
        assert_eq!(l["branch"], "2");
        assert_eq!(l["layer"], "1");
        assert_eq!(split_key("loss").0, "loss");
    }

    #[test]
    fn points_read_steps_widths_and_alpha_without_stale_branches() {
        let r = rec(
            3,
            3.0,
            &[
                ("train_step", 120.0),
                ("train_steps_total", 200.0),
                ("loss", 2.5),
                ("layer_width{layer=\"0\"}", 2.0),
                ("layer_width{layer=\"1\"}", 3.0),
                ("layer_active_branches{layer=\"1\"}", 2.0),
                ("alpha{branch=\"0\",layer=\"0\"}", 0.6),
                ("alpha{branch=\"1\",layer=\"0\"}", 0.4),
                // Stale: layer 0 had a third branch before a rollback.
                ("alpha{branch=\"2\",layer=\"0\"}", 0.1),
                ("alpha{branch=\"0\",layer=\"1\"}", 0.5),
                ("alpha{branch=\"1\",layer=\"1\"}", 0.3),
                ("alpha{branch=\"2\",layer=\"1\"}", 0.2),
            ],
        );
        let s = series(&[r]);
        let p = &s.points[0];
        assert_eq!(p.step, Some(120.0));
        assert_eq!(p.widths, vec![2, 3]);
        assert_eq!(p.alpha, vec![vec![0.6, 0.4], vec![0.5, 0.3, 0.2]]);
        assert_eq!(p.active, vec![None, Some(2.0)]);
    }

    #[test]
    fn events_come_from_counter_rises_outages_and_restarts() {
        let recs = vec![
            rec(
                0,
                10.0,
                &[
                    ("train_step", 0.0),
                    ("checkpoints_total", 0.0),
                    ("expansion_events_total", 0.0),
                    ("rollbacks_total", 0.0),
                ],
            ),
            rec(
                1,
                11.0,
                &[
                    ("train_step", 10.0),
                    ("checkpoints_total", 2.0),
                    ("expansion_events_total", 1.0),
                    ("rollbacks_total", 0.0),
                    ("branches_forced_off", 1.0),
                ],
            ),
            rec(
                2,
                12.0,
                &[
                    ("train_step", 20.0),
                    ("checkpoints_total", 2.0),
                    ("expansion_events_total", 1.0),
                    ("rollbacks_total", 0.0),
                    ("branches_forced_off", 0.0),
                ],
            ),
            rec(
                3,
                13.0,
                &[
                    ("train_step", 12.0),
                    ("checkpoints_total", 2.0),
                    ("expansion_events_total", 1.0),
                    ("rollbacks_total", 1.0),
                ],
            ),
            // Restart: counters back at 0 are no events.
            rec(4, 1.0, &[("train_step", 12.0), ("checkpoints_total", 0.0)]),
        ];
        let s = series(&recs);
        let ev: Vec<(EventKind, f64, u64)> = s
            .events
            .iter()
            .map(|e| (e.kind, e.step.unwrap(), e.count))
            .collect();
        assert_eq!(
            ev,
            vec![
                (EventKind::Expansion, 10.0, 1),
                (EventKind::Checkpoint, 10.0, 2),
                (EventKind::OutageStart, 10.0, 1),
                (EventKind::OutageEnd, 20.0, 1),
                (EventKind::Rollback, 12.0, 1),
                (EventKind::Restart, 12.0, 1),
            ]
        );
        assert_eq!(s.points[4].t_s, 4.0);
        assert_eq!(
            outage_spans(&s.events, |e| e.step, 99.0),
            vec![(10.0, 20.0)]
        );
    }

    #[test]
    fn an_outage_open_at_the_end_runs_to_the_last_point() {
        let ev = vec![Event {
            kind: EventKind::OutageStart,
            t_s: 5.0,
            step: None,
            count: 1,
        }];
        assert_eq!(outage_spans(&ev, |e| Some(e.t_s), 9.0), vec![(5.0, 9.0)]);
    }

    #[test]
    fn a_rollback_starts_a_new_run_and_changes_keep_only_new_values() {
        let pts: Vec<Point> = [
            (0.0, 3.0),
            (10.0, 2.0),
            (20.0, 1.5),
            (12.0, 1.9),
            (22.0, 1.4),
        ]
        .iter()
        .map(|&(s, l)| Point {
            step: Some(s),
            loss: Some(l),
            control_old: Some(if s < 15.0 { 2.0 } else { 1.0 }),
            ..Point::default()
        })
        .collect();
        let runs = step_runs(&pts, |p| p.loss);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[1], vec![(12.0, 1.9), (22.0, 1.4)]);
        assert_eq!(
            changes(&pts, |p| p.control_old),
            vec![(0.0, 2.0), (20.0, 1.0), (12.0, 2.0), (22.0, 1.0)]
        );
    }
}
