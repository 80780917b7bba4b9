//! The human tables of `mbtd ctl checkpoints` and `mbtd inspect checkpoint`.

use std::fmt;

use super::inspect::Inspection;
use super::listing::CheckpointList;

fn opt<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), ToString::to_string)
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl fmt::Display for CheckpointList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.checkpoints.is_empty() {
            return writeln!(f, "no checkpoints under {}", self.root.display());
        }
        let id_w = self
            .checkpoints
            .iter()
            .map(|c| c.id.len())
            .max()
            .unwrap_or(2)
            .max(2);
        let line = |f: &mut fmt::Formatter<'_>, mark: char, cols: [&str; 8]| {
            let [id, step, created, widths, loss, size, tag, status] = cols;
            writeln!(
                f,
                "{mark} {id:<id_w$}  {step:>10}  {created:<24}  {widths:<12}  {loss:>9}  {size:>10}  {tag:<14}  {status}"
            )
        };
        let header = [
            "ID",
            "STEP",
            "CREATED",
            "WIDTHS",
            "CTRL_LOSS",
            "SIZE",
            "TAG",
            "STATUS",
        ];
        line(f, ' ', header)?;
        for c in &self.checkpoints {
            let widths: Vec<String> = c.widths.iter().map(ToString::to_string).collect();
            let loss = c
                .control_loss
                .map_or_else(|| "-".to_string(), |l| format!("{l:.4}"));
            let status = match &c.problem {
                None => "ok".to_string(),
                Some(p) => format!("INVALID: {p}"),
            };
            let mark = if c.is_latest { '*' } else { ' ' };
            let (step, created, tag) = (opt(&c.step), opt(&c.created_at), opt(&c.tag));
            let size = human_bytes(c.bytes);
            let row = [
                &c.id,
                &step,
                &created,
                &widths.join(","),
                &loss,
                &size,
                &tag,
                &status,
            ];
            line(f, mark, row.map(String::as_str))?;
        }
        write!(f, "(* = LATEST)")
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "checkpoint {}", self.dir.display())?;
        writeln!(
            f,
            "status:  {}",
            if self.valid { "valid" } else { "INVALID" }
        )?;
        if let Some(m) = &self.manifest {
            writeln!(f, "id:      {}", m.id)?;
            writeln!(f, "format:  {}", m.format_version)?;
            writeln!(f, "created: {}", m.created_at)?;
            writeln!(f, "step:    {}  tokens: {}", m.step, m.tokens)?;
            writeln!(f, "widths:  {:?}", m.widths)?;
            writeln!(f, "parent:  {}  tag: {}", opt(&m.parent), opt(&m.tag))?;
            writeln!(
                f,
                "control loss: {}",
                m.control_loss
                    .map_or_else(|| "-".to_string(), |l| format!("{l:.4}"))
            )?;
        }
        for c in &self.files {
            writeln!(
                f,
                "  {:<24} {:>12} {}  {}",
                c.name,
                human_bytes(c.expected_bytes),
                &c.expected_blake3.get(..16).unwrap_or(&c.expected_blake3),
                if c.ok { "ok" } else { "MISMATCH" }
            )?;
        }
        let mut file = "";
        for t in &self.tensors {
            if t.file != file {
                file = &t.file;
                let total: u64 = self
                    .tensors
                    .iter()
                    .filter(|x| x.file == file)
                    .map(|x| x.elements)
                    .sum();
                writeln!(f, "{file}: {total} elements")?;
            }
            writeln!(f, "  {:<48} {:<5} {:?}", t.name, t.dtype, t.shape)?;
        }
        for p in &self.problems {
            writeln!(f, "problem: {p}")?;
        }
        Ok(())
    }
}
