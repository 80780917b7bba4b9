//! `mbtd ctl`: turns a subcommand into a request, prints the answer as a table or JSON.

mod args;

use std::path::{Path, PathBuf};

use crate::client::{self, ClientError};
use crate::protocol::{
    AsOf, BranchArgs, CheckpointArgs, CheckpointDeleteArgs, CheckpointRef, CheckpointTag,
    ExpandArgs, GenerateArgs, NoArgs, Request, RollbackArgs, StatusReply,
};
pub use args::{CheckpointAction, CtlArgs, CtlCommand};
use mbtd_core::config::Config;

/// Finds the socket: `--socket`, else `admin.socket` of `--config` (or the default config)
/// resolved against `--data-dir`.
pub fn socket_path(args: &CtlArgs) -> anyhow::Result<PathBuf> {
    resolve_socket(
        args.socket.as_deref(),
        args.config.as_deref(),
        &args.data_dir,
    )
}

/// The socket given, else `admin.socket` of `config` (or the default config) resolved
/// against `data_dir`.
pub fn resolve_socket(
    socket: Option<&Path>,
    config: Option<&Path>,
    data_dir: &Path,
) -> anyhow::Result<PathBuf> {
    if let Some(s) = socket {
        return Ok(s.to_path_buf());
    }
    let mut cfg = Config::load(config)?;
    cfg.resolve_paths(data_dir);
    Ok(cfg.admin.socket)
}

/// The typed request of a subcommand. Tags and targets are checked here by the protocol's
/// rules, so a bad one is refused before anything is sent.
fn request(cmd: &CtlCommand) -> Result<Request, String> {
    let none = NoArgs {};
    Ok(match cmd {
        CtlCommand::Pause => Request::Pause(none),
        CtlCommand::Resume => Request::Resume(none),
        CtlCommand::Mask { layer, branch } => Request::Mask(BranchArgs {
            layer: *layer,
            branch: *branch,
        }),
        CtlCommand::Unmask { layer, branch } => Request::Unmask(BranchArgs {
            layer: *layer,
            branch: *branch,
        }),
        CtlCommand::Eval => Request::Eval(none),
        CtlCommand::Diagnostics => Request::Diagnostics(none),
        CtlCommand::Governor => Request::Governor(none),
        CtlCommand::Nodes => Request::Nodes(none),
        CtlCommand::Generate {
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            respond,
            as_of,
        } => Request::Generate(GenerateArgs {
            prompt: prompt.clone(),
            max_tokens: *max_tokens,
            temperature: *temperature as f32,
            top_k: *top_k,
            top_p: *top_p as f32,
            seed: *seed,
            respond: *respond,
            as_of: as_of.clone().map(AsOf::try_from).transpose()?,
        }),
        CtlCommand::Expand {
            layer,
            branches,
            beta,
            ramp_steps,
            noise,
        } => Request::Expand(ExpandArgs {
            layer: *layer,
            branches: *branches,
            beta: beta.map(|b| b as f32),
            ramp_steps: *ramp_steps,
            noise: *noise as f32,
        }),
        CtlCommand::Checkpoint {
            action: Some(CheckpointAction::Delete { target }),
            ..
        } => Request::CheckpointDelete(CheckpointDeleteArgs {
            target: CheckpointRef::try_from(target.clone())
                .map_err(|e| format!("mbtd ctl checkpoint delete: {e}"))?,
        }),
        CtlCommand::Checkpoint { tag, action: None } => Request::Checkpoint(CheckpointArgs {
            tag: tag
                .clone()
                .map(CheckpointTag::try_from)
                .transpose()
                .map_err(|e| format!("mbtd ctl checkpoint: {e}"))?,
        }),
        CtlCommand::Checkpoints => Request::Checkpoints(none),
        CtlCommand::Rollback { target } => Request::Rollback(RollbackArgs {
            target: CheckpointRef::try_from(target.clone())
                .map_err(|e| format!("mbtd ctl rollback: {e}"))?,
        }),
        CtlCommand::Status => Request::Status(none),
        CtlCommand::Ping => Request::Ping(none),
        CtlCommand::Metrics => Request::Metrics(none),
        CtlCommand::Shutdown => Request::Shutdown(none),
        CtlCommand::PauseIngest => Request::PauseIngest(none),
        CtlCommand::ResumeIngest => Request::ResumeIngest(none),
        #[cfg(feature = "fault-injection")]
        CtlCommand::DebugCrash { actor } => Request::DebugCrash(crate::protocol::DebugCrashArgs {
            actor: actor.clone(),
        }),
    })
}

/// Runs the command; `Err` carries the message for stderr (exit code 1).
pub fn run(args: &CtlArgs) -> Result<(), String> {
    let socket = socket_path(args).map_err(|e| e.to_string())?;
    let req = request(&args.command)?;
    let streaming = matches!(args.command, CtlCommand::Generate { .. });
    let data = client::call(&socket, &req, |chunk| {
        if args.json {
            println!("{chunk}");
        } else if let Some(t) = chunk.get("text").and_then(|t| t.as_str()) {
            use std::io::Write;
            print!("{t}");
            let _ = std::io::stdout().flush();
        }
    })
    .map_err(|e| match e {
        ClientError::Daemon(m) => format!("mbtd: {m}"),
        other => other.to_string(),
    })?;
    if args.json {
        println!("{data}");
        return Ok(());
    }
    if streaming {
        println!();
        if let Some(masked) = data["masked"].as_array().filter(|m| !m.is_empty()) {
            let list: Vec<String> = masked
                .iter()
                .map(|b| {
                    format!(
                        "layer {} branch {} (node {}, from position {})",
                        b["layer"], b["branch"], b["node"], b["position"]
                    )
                })
                .collect();
            eprintln!(
                "mbtd: generated without these branches, their node failed: {}",
                list.join("; ")
            );
        }
        return Ok(());
    }
    print!("{}", human(&args.command, &data));
    Ok(())
}

fn human(cmd: &CtlCommand, data: &serde_json::Value) -> String {
    match cmd {
        CtlCommand::Status => match serde_json::from_value::<StatusReply>(data.clone()) {
            Ok(s) => format_status(&s),
            Err(_) => format!("{data:#}\n"),
        },
        CtlCommand::Ping => "pong\n".to_string(),
        CtlCommand::Shutdown => "mbtd is stopping\n".to_string(),
        CtlCommand::PauseIngest => "ingest paused\n".to_string(),
        CtlCommand::ResumeIngest => "ingest resumed\n".to_string(),
        CtlCommand::Metrics => format_metrics(data),
        CtlCommand::Checkpoints => {
            match serde_json::from_value::<mbtd_core::checkpoint::CheckpointList>(data.clone()) {
                Ok(l) => l.to_string(),
                Err(_) => format!("{data:#}\n"),
            }
        }
        CtlCommand::Diagnostics => format_diagnostics(data),
        CtlCommand::Nodes => format_nodes(data),
        CtlCommand::Pause
        | CtlCommand::Resume
        | CtlCommand::Mask { .. }
        | CtlCommand::Unmask { .. }
        | CtlCommand::Eval
        | CtlCommand::Governor
        | CtlCommand::Generate { .. }
        | CtlCommand::Expand { .. }
        | CtlCommand::Checkpoint { .. }
        | CtlCommand::Rollback { .. } => format!("{data:#}\n"),
        #[cfg(feature = "fault-injection")]
        CtlCommand::DebugCrash { .. } => format!("{data}\n"),
    }
}

/// The status as a table a person can read.
pub fn format_status(s: &StatusReply) -> String {
    let mut out = format!(
        "mbtd {}  pid {}  up {}  data dir {}\n\n{:<14} {:<10} {:>8}\n",
        s.version,
        s.pid,
        human_duration(s.uptime_s),
        s.data_dir,
        "ACTOR",
        "STATE",
        "RESTARTS"
    );
    for a in &s.actors {
        out.push_str(&format!(
            "{:<14} {:<10} {:>8}\n",
            a.name, a.state, a.restarts
        ));
    }
    for (name, v) in &s.sections {
        out.push_str(&format!("\n{name}\n"));
        if let Some(obj) = v.as_object() {
            for (k, val) in obj {
                out.push_str(&format!("  {k:<28} {}\n", scalar(val)));
            }
        } else {
            out.push_str(&format!("  {}\n", scalar(v)));
        }
    }
    out
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() != 0.0 => format!("{f:.4}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn format_metrics(data: &serde_json::Value) -> String {
    let mut out = String::new();
    if let Some(obj) = data.as_object() {
        let w = obj.keys().map(|k| k.len()).max().unwrap_or(0);
        for (k, v) in obj {
            out.push_str(&format!("{k:<w$}  {}\n", scalar(v)));
        }
    }
    out
}

fn format_diagnostics(data: &serde_json::Value) -> String {
    let mut out = format!(
        "step {}  params {}  widths {}\n\n{:<6} {:<6} {:<10} {:<10} {:<10} {:<28} {}\n",
        data["step"],
        data["params"],
        data["widths"],
        "LAYER",
        "K",
        "STARV",
        "EFF_PATHS",
        "TOP1",
        "ALPHA",
        "PARTICIPATION"
    );
    let f = |v: &serde_json::Value| v.as_f64().map(|x| format!("{x:.3}")).unwrap_or("-".into());
    let list = |v: &serde_json::Value| {
        v.as_array()
            .map(|a| a.iter().map(f).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    for l in data["layers"].as_array().into_iter().flatten() {
        let d = &l["last_step"];
        out.push_str(&format!(
            "{:<6} {:<6} {:<10} {:<10} {:<10} {:<28} {}\n",
            l["layer"].to_string(),
            l["width"].to_string(),
            f(&d["path_starvation_index"]),
            f(&d["effective_num_paths"]),
            f(&d["top1_share"]),
            list(&l["alpha"]),
            list(&l["participation"]),
        ));
    }
    out
}

/// `ctl nodes`: one line per branch host.
fn format_nodes(data: &serde_json::Value) -> String {
    let last_step = match (
        data["wire_bytes_last_step"].as_u64(),
        data["raw_tensor_bytes_last_step"].as_u64(),
    ) {
        (Some(wire), Some(raw)) => format!("{wire} (tensors {raw})"),
        _ => "-".into(),
    };
    let mut out = format!(
        "step {}  steps skipped for quorum {}  bytes on the wire last step {}\n\n{:<4} {:<54} {:<26} {:<6} {:>9} {:>9} {:>9} {:>12} {:>12}  {}\n",
        data["step"],
        data["steps_skipped_quorum"],
        last_step,
        "NODE",
        "ID",
        "ADDRESS",
        "STATE",
        "RTT_P50",
        "RTT_P99",
        "LAST_STEP",
        "BYTES_IN",
        "BYTES_OUT",
        "BRANCHES (layer.branch)"
    );
    let ms = |v: &serde_json::Value| {
        v.as_f64()
            .map(|x| format!("{:.1}ms", x * 1e3))
            .unwrap_or("-".into())
    };
    for n in data["nodes"].as_array().into_iter().flatten() {
        let branches = n["branches"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|b| format!("{}.{}", b[0], b[1]))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<4} {:<54} {:<26} {:<6} {:>9} {:>9} {:>9} {:>12} {:>12}  {}\n",
            n["node"].to_string(),
            n["id"].as_str().unwrap_or("-"),
            n["addr"].as_str().unwrap_or("-"),
            n["state"].as_str().unwrap_or("-"),
            ms(&n["rtt_p50_s"]),
            ms(&n["rtt_p99_s"]),
            n["last_step_answered"]
                .as_u64()
                .map_or("-".into(), |s| s.to_string()),
            n["bytes_in"].to_string(),
            n["bytes_out"].to_string(),
            branches,
        ));
    }
    out
}

fn human_duration(s: f64) -> String {
    let s = s as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(5.2), "5s");
        assert_eq!(human_duration(125.0), "2m05s");
        assert_eq!(human_duration(7260.0), "2h01m");
        assert_eq!(human_duration(90_000.0), "1d01h");
    }
}
