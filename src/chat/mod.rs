//! `mbtd chat`: an interactive conversation with the running daemon's model over the admin
//! socket. Replies stream as they are generated (`generate`, one connection per reply);
//! `--template` decides how the conversation becomes a prompt; stop sequences end a reply
//! (cut on this side, and the stream is closed, which makes the daemon stop generating);
//! Ctrl-C stops the reply in progress and keeps the session; `/save FILE` writes the
//! conversation as an inbox CSV, `/load FILE` reads one back, `/clear` forgets it.
//!
//! With stdin not a terminal every line is one message (or command) and nothing but the
//! replies goes to stdout, one after the other, each ending with a newline; notices go to
//! stderr.

pub mod stop;
pub mod template;
pub mod transcript;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;

use crate::admin::client::{Call, ClientError, Event};
use crate::admin::protocol::{GenerateArgs, Request};
use stop::StopCut;
use template::{Template, Turn};

/// `mbtd chat` options.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Admin socket (default: admin.socket of --config, resolved against --data-dir).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Configuration file the daemon was started with (to find its socket).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value = ".")]
    pub data_dir: PathBuf,
    /// How the conversation becomes a prompt (`mbtd`: the daemon's prompt/response format).
    #[arg(long, value_enum, default_value_t = Template::Mbtd)]
    pub template: Template,
    /// End a reply where this text appears (repeatable; added to the template's own).
    #[arg(long = "stop")]
    pub stops: Vec<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the first reply's sampling; reply n uses seed + n.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Set by SIGINT; a reply in progress checks it every [`POLL`].
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// How often a streaming reply looks at Ctrl-C.
const POLL: Duration = Duration::from_millis(50);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Routes Ctrl-C to [`INTERRUPTED`] instead of ending the process.
fn catch_ctrl_c() -> std::io::Result<()> {
    // SAFETY: `sigaction` with a zeroed struct, an empty mask and a handler that only stores
    // to an atomic (async-signal-safe). SA_RESTART: a read of stdin at the prompt resumes.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// How a reply ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    /// The daemon finished it (end token, `max_tokens` or the context).
    Done(String),
    /// A stop sequence appeared; the text before it.
    Stopped(String),
    /// Ctrl-C; not kept in the conversation.
    Interrupted,
}

/// One chat session.
struct Session {
    socket: PathBuf,
    args: ChatArgs,
    stops: Vec<String>,
    turns: Vec<Turn>,
    replies: u64,
}

impl Session {
    /// Streams the reply to `message` to `out` as it comes.
    fn ask(&mut self, message: &str, out: &mut impl Write) -> Result<Reply, ClientError> {
        let r = self.args.template.render(&self.turns, message);
        let req = Request::Generate(GenerateArgs {
            prompt: r.prompt,
            respond: r.respond,
            max_tokens: self.args.max_tokens,
            temperature: self.args.temperature as f32,
            top_k: self.args.top_k,
            top_p: self.args.top_p as f32,
            seed: self.args.seed.wrapping_add(self.replies),
            as_of: None,
        });
        self.replies += 1;
        INTERRUPTED.store(false, Ordering::SeqCst);
        let mut call = Call::start(&self.socket, &req)?;
        let mut cut = StopCut::new(self.stops.iter().cloned());
        loop {
            if INTERRUPTED.swap(false, Ordering::SeqCst) {
                call.cancel();
                return Ok(Reply::Interrupted);
            }
            match call.next(Some(POLL))? {
                None => {}
                Some(Event::Chunk(d)) => {
                    let piece = d["text"].as_str().unwrap_or_default();
                    out.write_all(cut.push(piece).as_bytes())?;
                    out.flush()?;
                    if cut.stopped() {
                        call.cancel();
                        return Ok(Reply::Stopped(cut.text().to_string()));
                    }
                }
                Some(Event::Done(_)) => {
                    out.write_all(cut.finish().as_bytes())?;
                    out.flush()?;
                    return Ok(Reply::Done(cut.text().to_string()));
                }
            }
        }
    }

    /// Runs a `/command`; `false` ends the session.
    fn command(&mut self, line: &str) -> bool {
        let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
        let arg = arg.trim();
        match cmd {
            "/quit" | "/exit" => return false,
            "/clear" => {
                self.turns.clear();
                eprintln!("conversation cleared");
            }
            "/save" | "/load" if arg.is_empty() => eprintln!("usage: {cmd} FILE"),
            "/save" => match transcript::save(Path::new(arg), &self.turns) {
                Ok(s) if s.skipped > 0 => eprintln!(
                    "saved {} turns to {arg} ({} with a blank prompt or reply left out)",
                    s.rows, s.skipped
                ),
                Ok(s) => eprintln!("saved {} turns to {arg}", s.rows),
                Err(e) => eprintln!("mbtd chat: {e}"),
            },
            "/load" => match transcript::load(Path::new(arg)) {
                Ok((turns, rejected)) => {
                    eprintln!(
                        "loaded {} turns from {arg}{}",
                        turns.len(),
                        if rejected > 0 {
                            format!(" ({rejected} rows rejected by the inbox rules)")
                        } else {
                            String::new()
                        }
                    );
                    self.turns = turns;
                }
                Err(e) => eprintln!("mbtd chat: {e}"),
            },
            _ => eprintln!("{HELP}"),
        }
        true
    }
}

const HELP: &str = "commands: /save FILE (the conversation as an inbox CSV), /load FILE, \
/clear, /quit; a message starting with / is sent as //message. Ctrl-C stops a reply, \
Ctrl-D leaves.";

/// Runs the session until end of input or `/quit`. `Err` carries the message for stderr.
pub fn run(args: ChatArgs) -> Result<(), String> {
    let socket = crate::ctl::resolve_socket(
        args.socket.as_deref(),
        args.config.as_deref(),
        &args.data_dir,
    )
    .map_err(|e| e.to_string())?;
    // SAFETY: isatty has no preconditions.
    let interactive = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
    catch_ctrl_c().map_err(|e| format!("cannot catch Ctrl-C: {e}"))?;
    let mut stops = args.stops.clone();
    stops.extend(args.template.stops().iter().map(|s| s.to_string()));
    let mut s = Session {
        socket,
        args,
        stops,
        turns: Vec::new(),
        replies: 0,
    };
    if interactive {
        eprintln!(
            "mbtd chat ({:?} template) on {}. {HELP}",
            s.args.template,
            s.socket.display()
        );
    }
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut stdout = std::io::stdout();
    let mut line = String::new();
    loop {
        if interactive {
            print!("> ");
            let _ = stdout.flush();
        }
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("cannot read stdin: {e}")),
        }
        let msg = line.trim_end_matches(['\n', '\r']);
        if msg.trim().is_empty() {
            continue;
        }
        let msg = match msg.strip_prefix('/') {
            Some(rest) if rest.starts_with('/') => rest,
            Some(_) => {
                if !s.command(msg) {
                    break;
                }
                continue;
            }
            None => msg,
        };
        match s.ask(msg, &mut stdout) {
            Ok(Reply::Done(text)) | Ok(Reply::Stopped(text)) => {
                println!();
                s.turns.push(Turn {
                    prompt: msg.to_string(),
                    response: text.trim().to_string(),
                });
            }
            Ok(Reply::Interrupted) => {
                println!();
                eprintln!("(reply stopped)");
            }
            Err(e @ (ClientError::NotRunning(_) | ClientError::Connect { .. })) => {
                return Err(e.to_string());
            }
            Err(ClientError::Daemon(m)) => eprintln!("mbtd: {m}"),
            Err(e) => eprintln!("mbtd chat: {e}"),
        }
    }
    if interactive {
        println!();
    }
    Ok(())
}
