//! `mbtd chat` end to end through a pseudo-terminal (openpty; the chat is the session leader
//! with the terminal as its controlling tty, so Ctrl-C is a real SIGINT from the line
//! discipline): replies stream, a stop sequence cuts a reply, `/save` writes a CSV that the
//! inbox ingests, Ctrl-C stops a reply (and the daemon's generation) and keeps the session.
//! Also the script mode (stdin not a terminal).

mod common;
#[path = "common/model.rs"]
mod model;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
#[cfg(feature = "fault-injection")]
use model::daemon_with_slow_generation;
use model::{daemon_with_model, long_generation};
use serde_json::{Value, json};

/// A child process on a pseudo-terminal; everything it writes is collected.
struct Pty {
    master: File,
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Pty {
    fn spawn(args: &[&str]) -> Pty {
        let (mut m, mut s) = (0, 0);
        let ws = libc::winsize {
            ws_row: 50,
            ws_col: 200,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty fills two descriptors; fcntl marks them close-on-exec so that only
        // the child's stdio (dup2'ed by Command) refers to the terminal.
        unsafe {
            assert_eq!(
                libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws),
                0
            );
            libc::fcntl(m, libc::F_SETFD, libc::FD_CLOEXEC);
            libc::fcntl(s, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        // SAFETY: both descriptors were just opened and are owned here.
        let (master, slave) = unsafe { (File::from_raw_fd(m), File::from_raw_fd(s)) };
        let mut cmd = Command::new(BIN);
        cmd.arg("chat")
            .args(args)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl are async-signal-safe; they make the terminal (stdin) the
        // controlling tty of the new session, as a login shell would.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn mbtd chat");
        drop(cmd);
        let out = Arc::new(Mutex::new(Vec::new()));
        let (mut rd, sink) = (master.try_clone().unwrap(), out.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once the child has exited.
            while let Ok(n @ 1..) = rd.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty { master, child, out }
    }

    /// Everything written so far, with the terminal's `\r\n` turned back into `\n`.
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).replace("\r\n", "\n")
    }

    /// Types `keys` (a line ends with `\r`, as the Enter key sends).
    fn send(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).unwrap();
    }

    fn wait_for<T>(&self, what: &str, within: Duration, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let t = Instant::now();
        loop {
            if let Some(v) = f(&self.text()) {
                return v;
            }
            assert!(
                t.elapsed() < within,
                "timed out waiting for {what}; terminal:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The reply to the `n`-th message `msg` (echoed by the terminal): the text between the
    /// echo and the next prompt.
    fn reply(&self, msg: &str, within: Duration) -> String {
        let echo = format!("> {msg}\n");
        self.wait_for(&format!("the reply to {msg:?}"), within, |t| {
            let start = t.rfind(&echo)? + echo.len();
            let end = t[start..].find("\n> ")?;
            Some(t[start..start + end].to_string())
        })
    }

    fn exit(mut self) -> std::process::ExitStatus {
        self.send("/quit\r");
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "chat did not quit:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A prompt whose greedy reply (as `mbtd chat` asks it) is long enough to cut, the reply,
/// and a stop sequence taken from its middle.
fn prompt_with_stop(d: &Daemon) -> (String, String, String) {
    for i in [5, 11, 17, 23, 42] {
        let prompt = format!("row {i} says");
        let args = json!({"prompt": prompt, "respond": true, "temperature": 0, "max_tokens": 40});
        let reply = d.data("generate", args)["text"]
            .as_str()
            .unwrap()
            .to_string();
        let chars: Vec<char> = reply.chars().collect();
        if chars.len() >= 12 {
            let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
            return (prompt, reply, stop);
        }
    }
    panic!("no prompt got a reply of 12 characters or more");
}

#[test]
fn chat_stops_saves_for_the_inbox_and_scripts() {
    let d = daemon_with_model();
    let sock = d.socket().display().to_string();
    let (prompt, full, stop) = prompt_with_stop(&d);
    let expected = &full[..full.find(&stop).unwrap()];

    // Script mode: one message per line, only replies on stdout.
    let stop_arg = format!("--stop={stop}");
    let chat_args = [
        "--socket",
        &sock,
        "--temperature",
        "0",
        "--max-tokens",
        "40",
        &stop_arg,
    ];
    let mut script = Command::new(BIN)
        .arg("chat")
        .args(chat_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(script.stdin.take().unwrap(), "{prompt}\n").unwrap();
    let out = script.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{expected}\n")
    );

    // A stop sequence on the terminal, then /save, the file into the inbox, ingested.
    let mut a = Pty::spawn(&chat_args);
    a.wait_for("the prompt", Duration::from_secs(30), |t| {
        t.contains("> ").then_some(())
    });
    a.send(&format!("{prompt}\r"));
    let got = a.reply(&prompt, Duration::from_secs(60));
    assert_eq!(got, expected, "full reply {full:?}, stop {stop:?}");
    a.send("row 7 says\r");
    let second = a.reply("row 7 says", Duration::from_secs(60));
    let saved = d.path().join("saved-chat.csv");
    a.send(&format!("/save {}\r", saved.display()));
    let rows = [expected, second.as_str()]
        .iter()
        .filter(|r| !r.trim().is_empty())
        .count();
    a.wait_for("the save notice", Duration::from_secs(30), |t| {
        t.contains(&format!("saved {rows} turns to")).then_some(())
    });
    a.send("/clear\r");
    a.wait_for("the clear notice", Duration::from_secs(30), |t| {
        t.contains("conversation cleared").then_some(())
    });
    a.send(&format!("/load {}\r", saved.display()));
    a.wait_for("the load notice", Duration::from_secs(30), |t| {
        t.contains(&format!("loaded {rows} turns from"))
            .then_some(())
    });
    assert!(a.exit().success());
    let csv = std::fs::read_to_string(&saved).unwrap();
    assert!(csv.starts_with("prompt,response,source\n"), "{csv}");
    std::fs::rename(&saved, d.path().join("inbox/saved-chat.csv")).unwrap();
    let inbox = d.path().join("inbox");
    let sc = d.wait_for(Duration::from_secs(60), "the saved chat's sidecar", || {
        sidecars(&inbox, ".done").remove("saved-chat.csv")
    });
    assert_eq!(sc.rows_accepted as usize, rows, "{sc:?}");
    assert_eq!(sc.rows_rejected, 0, "{sc:?}");
}

#[cfg(feature = "fault-injection")]
#[test]
fn chat_ctrl_c_stops_the_reply_and_the_daemon_and_keeps_the_session() {
    let d = daemon_with_slow_generation(10);
    let sock = d.socket().display().to_string();
    // Streaming and Ctrl-C: a long reply is seen growing, Ctrl-C stops it (and the
    // daemon's generation), the session goes on.
    let (long_prompt, seed, full_tokens) = long_generation(&d);
    let seed = seed.to_string();
    let mut b = Pty::spawn(&[
        "--socket",
        &sock,
        "--temperature",
        "1",
        "--seed",
        &seed,
        "--max-tokens",
        "2000",
    ]);
    b.wait_for("the prompt", Duration::from_secs(30), |t| {
        t.contains("> ").then_some(())
    });
    b.send(&format!("{long_prompt}\r"));
    let echo = &format!("> {long_prompt}\n");
    let mut lengths = Vec::new();
    b.wait_for("a reply seen growing", Duration::from_secs(60), |t| {
        let start = t.find(echo)? + echo.len();
        assert!(
            !t[start..].contains("\n> "),
            "the reply ended before Ctrl-C could be sent (the model generates too fast for \
             this test): {:?}",
            &t[start..]
        );
        let len = t.len() - start;
        if len > 0 && lengths.last() != Some(&len) {
            lengths.push(len);
        }
        (lengths.len() >= 3).then_some(())
    });
    b.send("\x03");
    b.wait_for("the stop notice", Duration::from_secs(30), |t| {
        t.contains("(reply stopped)").then_some(())
    });
    let tokens = d.wait_for(Duration::from_secs(30), "the daemon's cancel", || {
        d.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["event"] == "admin_generate_cancelled")
            .map(|v| v["tokens"].as_u64())
    });
    let tokens = tokens.expect("the trainer reports the tokens it produced");
    assert!(
        tokens < full_tokens,
        "{tokens} of {full_tokens} tokens generated after Ctrl-C"
    );
    // The session is still there: it takes commands and leaves cleanly.
    b.send("/clear\r");
    b.wait_for("the clear notice", Duration::from_secs(30), |t| {
        t.contains("conversation cleared").then_some(())
    });
    assert!(b.exit().success());
}
