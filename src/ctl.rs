//! `mbtd ctl`: turns a subcommand into a request, prints the answer as a table or JSON.

use std::path::PathBuf;

use crate::admin::client::{self, ClientError};
use crate::admin::protocol::StatusReply;
use crate::cli::{CheckpointAction, CtlArgs, CtlCommand};
use crate::config::Config;

/// Finds the socket: `--socket`, else `admin.socket` of `--config` (or the default config)
/// resolved against `--data-dir`.
pub fn socket_path(args: &CtlArgs) -> anyhow::Result<PathBuf> {
    if let Some(s) = &args.socket {
        return Ok(s.clone());
    }
    let mut cfg = Config::load(args.config.as_deref())?;
    cfg.resolve_paths(&args.data_dir);
    Ok(cfg.admin.socket)
}

fn request(cmd: &CtlCommand) -> (&'static str, serde_json::Value) {
    use serde_json::json;
    match cmd {
        CtlCommand::Pause => ("pause", serde_json::Value::Null),
        CtlCommand::Resume => ("resume", serde_json::Value::Null),
        CtlCommand::Mask { layer, branch } => ("mask", json!({"layer": layer, "branch": branch})),
        CtlCommand::Unmask { layer, branch } => {
            ("unmask", json!({"layer": layer, "branch": branch}))
        }
        CtlCommand::Eval => ("eval", serde_json::Value::Null),
        CtlCommand::Diagnostics => ("diagnostics", serde_json::Value::Null),
        CtlCommand::Governor => ("governor", serde_json::Value::Null),
        CtlCommand::Generate {
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            respond,
        } => (
            "generate",
            json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                "top_k": top_k, "top_p": top_p, "seed": seed, "respond": respond}),
        ),
        CtlCommand::Expand {
            layer,
            branches,
            beta,
            ramp_steps,
            noise,
        } => (
            "expand",
            json!({"layer": layer, "branches": branches, "beta": beta,
                "ramp_steps": ramp_steps, "noise": noise}),
        ),
        CtlCommand::Checkpoint {
            action: Some(CheckpointAction::Delete { target }),
            ..
        } => ("checkpoint-delete", json!({ "target": target })),
        CtlCommand::Checkpoint { tag, action: None } => ("checkpoint", json!({ "tag": tag })),
        CtlCommand::Checkpoints => ("checkpoints", serde_json::Value::Null),
        CtlCommand::Rollback { target } => ("rollback", json!({ "target": target })),
        CtlCommand::Status => ("status", serde_json::Value::Null),
        CtlCommand::Ping => ("ping", serde_json::Value::Null),
        CtlCommand::Metrics => ("metrics", serde_json::Value::Null),
        CtlCommand::Shutdown => ("shutdown", serde_json::Value::Null),
        CtlCommand::PauseIngest => ("pause-ingest", serde_json::Value::Null),
        CtlCommand::ResumeIngest => ("resume-ingest", serde_json::Value::Null),
        #[cfg(feature = "fault-injection")]
        CtlCommand::DebugCrash { actor } => ("debug-crash", serde_json::json!({ "actor": actor })),
    }
}

/// Runs the command; `Err` carries the message for stderr (exit code 1).
pub fn run(args: &CtlArgs) -> Result<(), String> {
    let socket = socket_path(args).map_err(|e| e.to_string())?;
    let (cmd, req_args) = request(&args.command);
    let streaming = matches!(args.command, CtlCommand::Generate { .. });
    let data = client::call(&socket, cmd, req_args, |chunk| {
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
            match serde_json::from_value::<crate::checkpoint::CheckpointList>(data.clone()) {
                Ok(l) => l.to_string(),
                Err(_) => format!("{data:#}\n"),
            }
        }
        CtlCommand::Diagnostics => format_diagnostics(data),
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
