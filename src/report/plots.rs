//! The report's PNG plots (plotters, bitmap backend, text in an embedded DejaVu Sans subset
//! so no system font is needed).

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use super::ReportError;
use super::history::{EventKind, Point, Series, changes, outage_spans, step_runs};
use crate::checkpoint::CheckpointSummary;

const FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");
const FONT: &str = "sans-serif";

const TRAIN: RGBColor = RGBColor(70, 130, 180);
const OLD: RGBColor = RGBColor(230, 120, 0);
const NEW: RGBColor = RGBColor(0, 150, 70);
const EXPAND: RGBColor = RGBColor(128, 0, 160);
const ROLLBACK: RGBColor = RGBColor(210, 30, 30);
const OUTAGE: RGBColor = RGBColor(255, 140, 0);
const CKPT: RGBColor = RGBColor(110, 110, 110);
/// Colours of layers / branches, in order.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn font() -> Result<(), ReportError> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    ok.then_some(()).ok_or(ReportError::Font)
}

fn draw_err(path: &Path) -> impl Fn(String) -> ReportError + '_ {
    move |why| ReportError::Draw {
        path: path.to_path_buf(),
        why,
    }
}

/// Seconds → the unit that suits a time span: (divisor, axis name).
pub fn time_unit(span_s: f64) -> (f64, &'static str) {
    if span_s <= 600.0 {
        (1.0, "time since the first snapshot (s)")
    } else if span_s <= 36_000.0 {
        (60.0, "time since the first snapshot (min)")
    } else {
        (3600.0, "time since the first snapshot (h)")
    }
}

/// `[lo, hi]` of the values with a margin; `[0, 1]` when there are none.
fn value_range(vals: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    let pad = ((hi - lo) * 0.08).max(1e-3);
    (if from_zero { lo } else { lo - pad }, hi + pad)
}

fn legend_line(c: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
}

/// Vertical marks for expansions, rollbacks and restarts at `x_of(event)`, shaded outages,
/// each kind with one legend entry.
fn draw_events<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    s: &Series,
    x_of: &dyn Fn(&super::history::Event) -> Option<f64>,
    x_last: f64,
    (y0, y1): (f64, f64),
    legend: bool,
) -> Result<(), String> {
    let spans = outage_spans(&s.events, |e| x_of(e), x_last);
    let shade = OUTAGE.mix(0.18).filled();
    let a = chart
        .draw_series(
            spans
                .iter()
                .map(|&(a, b)| Rectangle::new([(a, y0), (b.max(a), y1)], shade)),
        )
        .map_err(|e| e.to_string())?;
    if legend && !spans.is_empty() {
        a.label("branch outage (ctl mask)")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], shade));
    }
    for (kind, color, name) in [
        (EventKind::Expansion, EXPAND, "expansion"),
        (EventKind::Rollback, ROLLBACK, "rollback"),
        (EventKind::Restart, BLACK, "daemon restart"),
    ] {
        let xs: Vec<f64> = s
            .events
            .iter()
            .filter(|e| e.kind == kind)
            .filter_map(x_of)
            .collect();
        if xs.is_empty() {
            continue;
        }
        let style = color.stroke_width(2);
        let a = chart
            .draw_series(
                xs.iter()
                    .map(|&x| DashedPathElement::new(vec![(x, y0), (x, y1)], 6, 4, style)),
            )
            .map_err(|e| e.to_string())?;
        if legend {
            a.label(name).legend(legend_line(color));
        }
    }
    Ok(())
}

/// An axis label: no decimals for large numbers, few for small ones.
pub fn tick(v: f64) -> String {
    if v.abs() >= 100.0 {
        return format!("{v:.0}");
    }
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn mesh<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, x_desc: &str, y_desc: &str) -> Result<(), String> {
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| e.to_string())
}

fn legend_box<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    at: SeriesLabelPosition,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(at)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

fn no_data(area: &DrawingArea<BitMapBackend, Shift>, what: &str) -> Result<(), String> {
    let (w, h) = area.dim_in_pixel();
    area.draw(&Text::new(
        what.to_string(),
        (w as i32 / 2 - 150, h as i32 / 2),
        (FONT, 18),
    ))
    .map_err(|e| e.to_string())
}

/// Snapshots averaged by the smoothed training-loss line.
const SMOOTH: usize = 10;

/// Trailing mean of the last `k` values (fewer at the start of the run).
pub fn moving_mean(run: &[(f64, f64)], k: usize) -> Vec<(f64, f64)> {
    let k = k.max(1);
    let mut sum = 0.0;
    run.iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= k {
                sum -= run[i - k].1;
            }
            (x, sum / (i + 1).min(k) as f64)
        })
        .collect()
}

/// Loss, control loss old/new over steps; expansion, rollback and outage marks; kept
/// checkpoints as triangles on the axis (tags written beside).
pub fn loss_plot(path: &Path, s: &Series, ckpts: &[CheckpointSummary]) -> Result<(), ReportError> {
    font()?;
    let e = draw_err(path);
    let root = BitMapBackend::new(path, (1200, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let train = step_runs(&s.points, |p| p.loss);
    let old = changes(&s.points, |p| p.control_old);
    let new = changes(&s.points, |p| p.control_new);
    let steps: Vec<f64> = s.points.iter().filter_map(|p| p.step).collect();
    let title = "mbtd: training loss and control-slice loss over steps";
    if train.is_empty() {
        let area = root
            .titled(title, (FONT, 22))
            .map_err(|x| e(x.to_string()))?;
        no_data(&area, "no training step in the history yet").map_err(&e)?;
        return root.present().map_err(|x| e(x.to_string()));
    }
    let (x0, x1) = value_range(steps.iter().copied(), false);
    let x0 = x0.max(0.0);
    let (_, y1) = value_range(
        train
            .iter()
            .flatten()
            .chain(&old)
            .chain(&new)
            .map(|&(_, v)| v),
        true,
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(|x| e(x.to_string()))?;
    mesh(
        &mut chart,
        "trainer step (a rollback sets it back)",
        "loss (nats per target token)",
    )
    .map_err(&e)?;
    draw_events(&mut chart, s, &|ev| ev.step, x1, (0.0, y1), true).map_err(&e)?;
    let light = TRAIN.mix(0.45);
    for (i, run) in train.iter().enumerate() {
        let a = chart
            .draw_series(LineSeries::new(run.iter().copied(), light.stroke_width(1)))
            .map_err(|x| e(x.to_string()))?;
        if i == 0 {
            a.label("training batch loss (one batch per snapshot)")
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], light.stroke_width(2))
                });
        }
    }
    for (i, run) in train.iter().enumerate() {
        let a = chart
            .draw_series(LineSeries::new(
                moving_mean(run, SMOOTH),
                TRAIN.stroke_width(2),
            ))
            .map_err(|x| e(x.to_string()))?;
        if i == 0 {
            a.label(format!("training loss, mean of {SMOOTH} snapshots"))
                .legend(legend_line(TRAIN));
        }
    }
    for (pts, color, name) in [
        (&old, OLD, "control loss, old rows"),
        (&new, NEW, "control loss, new rows"),
    ] {
        if pts.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?
            .label(name)
            .legend(legend_line(color));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|x| e(x.to_string()))?;
    }
    let marks: Vec<(f64, Option<&str>)> = ckpts
        .iter()
        .filter_map(|c| Some((c.step? as f64, c.tag.as_deref())))
        .filter(|(st, _)| (x0..=x1).contains(st))
        .collect();
    if !marks.is_empty() {
        let y = y1 * 0.015;
        chart
            .draw_series(
                marks
                    .iter()
                    .map(|&(st, _)| TriangleMarker::new((st, y), 6, CKPT.filled())),
            )
            .map_err(|x| e(x.to_string()))?
            .label("checkpoint kept on disk")
            .legend(|(x, y)| TriangleMarker::new((x + 10, y), 6, CKPT.filled()));
        chart
            .draw_series(marks.iter().enumerate().filter_map(|(i, &(st, tag))| {
                // Beside the triangle, clear of an event line at the same step.
                let (x, y) = (st + (x1 - x0) * 0.006, y1 * (0.04 + 0.035 * (i % 3) as f64));
                tag.map(|t| Text::new(t.to_string(), (x, y), (FONT, 12).into_font().color(&CKPT)))
            }))
            .map_err(|x| e(x.to_string()))?;
    }
    legend_box(&mut chart, SeriesLabelPosition::UpperRight).map_err(&e)?;
    root.present().map_err(|x| e(x.to_string()))
}

/// Per-branch (or per-layer) lines over time, broken where a value is missing.
fn time_runs(
    points: &[Point],
    unit: f64,
    v: impl Fn(&Point) -> Option<f64>,
) -> Vec<Vec<(f64, f64)>> {
    let mut runs = vec![Vec::new()];
    for p in points {
        match v(p).filter(|x| x.is_finite()) {
            Some(y) => runs.last_mut().expect("one").push((p.t_s / unit, y)),
            None => {
                if !runs.last().expect("one").is_empty() {
                    runs.push(Vec::new());
                }
            }
        }
    }
    runs.retain(|r| !r.is_empty());
    runs
}

/// What a line shows of each point.
type ValueFn = Box<dyn Fn(&Point) -> Option<f64>>;

struct Line {
    name: String,
    style: ShapeStyle,
    dashed: bool,
    value: ValueFn,
}

/// A panel of lines over time.
struct Panel<'a> {
    caption: &'a str,
    y_desc: &'a str,
    lines: Vec<Line>,
    /// The y range; `None`: from 0 to the largest value.
    y_fixed: Option<(f64, f64)>,
    /// Whether the legend lists the event marks.
    legend_events: bool,
    legend_at: SeriesLabelPosition,
}

/// One panel of lines over time with the event marks.
fn time_panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    s: &Series,
    p: Panel,
) -> Result<(), String> {
    let Panel {
        caption,
        y_desc,
        lines,
        y_fixed,
        legend_events,
        legend_at,
    } = p;
    let span = s.points.last().map_or(1.0, |p| p.t_s).max(1.0);
    let (unit, x_desc) = time_unit(span);
    let runs: Vec<Vec<Vec<(f64, f64)>>> = lines
        .iter()
        .map(|l| time_runs(&s.points, unit, &l.value))
        .collect();
    // Auto range: from 0, with headroom above the lines for the legend.
    let (y0, y1) = y_fixed.unwrap_or_else(|| {
        let (lo, hi) = value_range(runs.iter().flatten().flatten().map(|&(_, y)| y), true);
        (lo, lo + (hi - lo) * LEGEND_HEADROOM)
    });
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(65)
        .build_cartesian_2d(0.0..span / unit, y0..y1)
        .map_err(|e| e.to_string())?;
    mesh(&mut chart, x_desc, y_desc)?;
    draw_events(
        &mut chart,
        s,
        &|e| Some(e.t_s / unit),
        span / unit,
        (y0, y1),
        legend_events,
    )?;
    for (l, rs) in lines.iter().zip(&runs) {
        for (i, r) in rs.iter().enumerate() {
            let style = l.style;
            let anno = if l.dashed {
                chart.draw_series(DashedLineSeries::new(r.iter().copied(), 8, 5, style))
            } else {
                chart.draw_series(LineSeries::new(r.iter().copied(), style))
            }
            .map_err(|e| e.to_string())?;
            if i == 0 {
                let dashed = l.dashed;
                anno.label(l.name.clone()).legend(move |(x, y)| {
                    let len = if dashed { 7 } else { 20 };
                    PathElement::new(vec![(x, y), (x + len, y)], style)
                });
            }
        }
    }
    if runs.iter().all(|r| r.is_empty()) {
        no_data(area, "no values in the history").map_err(|e| e.to_string())?;
    }
    legend_box(&mut chart, legend_at)
}

/// Auto-ranged panels reach this multiple of their largest value (room for the legend).
const LEGEND_HEADROOM: f64 = 1.5;

/// Pixel heights of the branches panel and of each α panel.
const TOP_PANEL: u32 = 380;
const ALPHA_PANEL: u32 = 260;
/// Vertical offset between layers in the branches panel.
const LAYER_OFFSET: f64 = 0.06;

/// Branches and active branches per layer; α of every branch, one panel per layer.
pub fn branches_plot(path: &Path, s: &Series) -> Result<(), ReportError> {
    font()?;
    let e = draw_err(path);
    let n_layers = s.points.iter().map(|p| p.widths.len()).max().unwrap_or(0);
    let height = TOP_PANEL + ALPHA_PANEL * n_layers as u32 + 40;
    let root = BitMapBackend::new(path, (1200, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let root = root
        .titled(
            "mbtd: branches and aggregation weights α per layer",
            (FONT, 22),
        )
        .map_err(|x| e(x.to_string()))?;
    let (top, rest) = root.split_vertically(TOP_PANEL);
    let mut panels = vec![top];
    panels.extend(rest.split_evenly((n_layers.max(1), 1)));
    let mut lines = Vec::new();
    for l in 0..n_layers {
        let color = PALETTE[l % PALETTE.len()];
        // Layers drawn LAYER_OFFSET apart so that equal widths do not hide each other.
        let off = LAYER_OFFSET * l as f64;
        lines.push(Line {
            name: format!("layer {l}: branches"),
            style: color.mix(0.45).stroke_width(5),
            dashed: false,
            value: Box::new(move |p: &Point| p.widths.get(l).map(|&w| w as f64 + off)),
        });
        lines.push(Line {
            name: format!("layer {l}: active in the step"),
            style: color.stroke_width(2),
            dashed: true,
            value: Box::new(move |p: &Point| p.active.get(l).copied().flatten().map(|a| a + off)),
        });
    }
    let max_w = s
        .points
        .iter()
        .flat_map(|p| p.widths.iter())
        .copied()
        .max()
        .unwrap_or(1) as f64;
    time_panel(
        &panels[0],
        s,
        Panel {
            caption: "branches per layer (wide) and active in the last step (dashed); layer l drawn 0.06·l higher",
            y_desc: "branches",
            lines,
            y_fixed: Some((0.0, 2.0 * max_w + 1.0)),
            legend_events: true,
            legend_at: SeriesLabelPosition::UpperRight,
        },
    )
    .map_err(&e)?;
    for l in 0..n_layers {
        let max_b = s
            .points
            .iter()
            .filter_map(|p| p.alpha.get(l).map(Vec::len))
            .max()
            .unwrap_or(0);
        let lines: Vec<Line> = (0..max_b)
            .map(|b| Line {
                name: format!("branch {b}"),
                style: PALETTE[b % PALETTE.len()].stroke_width(2),
                dashed: false,
                value: Box::new(move |p: &Point| p.alpha.get(l).and_then(|a| a.get(b)).copied()),
            })
            .collect();
        time_panel(
            &panels[l + 1],
            s,
            Panel {
                caption: &format!("layer {l}: α per branch"),
                y_desc: "α",
                lines,
                y_fixed: None,
                legend_events: false,
                legend_at: SeriesLabelPosition::UpperRight,
            },
        )
        .map_err(&e)?;
    }
    root.present().map_err(|x| e(x.to_string()))
}

/// Training tokens/s and ingested rows/s over time.
pub fn throughput_plot(path: &Path, s: &Series) -> Result<(), ReportError> {
    font()?;
    let e = draw_err(path);
    let root = BitMapBackend::new(path, (1200, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let root = root
        .titled("mbtd: throughput", (FONT, 22))
        .map_err(|x| e(x.to_string()))?;
    let panels = root.split_evenly((2, 1));
    time_panel(
        &panels[0],
        s,
        Panel {
            caption: "training tokens per second (last step)",
            y_desc: "tokens/s",
            lines: vec![Line {
                name: "tokens/s".into(),
                style: TRAIN.stroke_width(2),
                dashed: false,
                value: Box::new(|p: &Point| p.tokens_per_sec),
            }],
            y_fixed: None,
            legend_events: true,
            legend_at: SeriesLabelPosition::UpperRight,
        },
    )
    .map_err(&e)?;
    time_panel(
        &panels[1],
        s,
        Panel {
            caption: "ingested rows per second (10 s window)",
            y_desc: "rows/s",
            lines: vec![Line {
                name: "rows/s".into(),
                style: NEW.stroke_width(2),
                dashed: false,
                value: Box::new(|p: &Point| p.ingest_rows_per_sec),
            }],
            y_fixed: None,
            legend_events: false,
            legend_at: SeriesLabelPosition::UpperRight,
        },
    )
    .map_err(&e)?;
    root.present().map_err(|x| e(x.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_mean_is_a_trailing_mean() {
        let run = [(0.0, 1.0), (1.0, 3.0), (2.0, 5.0), (3.0, 7.0)];
        assert_eq!(
            moving_mean(&run, 2),
            vec![(0.0, 1.0), (1.0, 2.0), (2.0, 4.0), (3.0, 6.0)]
        );
    }

    #[test]
    fn ticks_drop_useless_decimals() {
        assert_eq!(tick(16000.0), "16000");
        assert_eq!(tick(2.0), "2");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(0.25), "0.25");
        assert_eq!(tick(0.5), "0.5");
        assert_eq!(tick(0.0), "0");
    }

    #[test]
    fn time_unit_suits_the_span() {
        assert_eq!(time_unit(180.0).0, 1.0);
        assert_eq!(time_unit(3600.0).0, 60.0);
        assert_eq!(time_unit(86_400.0).0, 3600.0);
    }

    #[test]
    fn value_range_pads_and_starts_at_zero_when_asked() {
        assert_eq!(value_range(std::iter::empty(), true), (0.0, 1.0));
        let (lo, hi) = value_range([2.0, 4.0].into_iter(), true);
        assert_eq!(lo, 0.0);
        assert!(hi > 4.0);
        let (lo, _) = value_range([2.0, 4.0, f64::NAN].into_iter(), false);
        assert!(lo < 2.0 && lo > 1.0);
    }
}
