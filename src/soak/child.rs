//! The daemon under soak: this executable's `run` as a child process, talked to through the
//! crate's admin client; killed if the soak ends early.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::SoakError;
use crate::admin::client;
use crate::admin::protocol::StatusReply;

/// A running `mbtd run` child.
pub struct DaemonChild {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl DaemonChild {
    /// Starts `<exe> run --config <config> --data-dir <dir>`, output to `<dir>/daemon.log`,
    /// and waits up to `within` for its socket to answer `ping`.
    pub fn start(
        exe: &Path,
        config: &Path,
        dir: &Path,
        socket: &Path,
        within: Duration,
    ) -> Result<Self, SoakError> {
        let log = dir.join("daemon.log");
        let out = std::fs::File::create(&log).map_err(SoakError::io("create", &log))?;
        let err = out.try_clone().map_err(SoakError::io("duplicate", &log))?;
        let child = Command::new(exe)
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(SoakError::io("start the daemon", exe))?;
        let mut d = DaemonChild {
            child: Some(child),
            socket: socket.to_path_buf(),
            log,
        };
        let t = Instant::now();
        loop {
            d.check_alive()?;
            if d.call("ping").is_ok() {
                return Ok(d);
            }
            if t.elapsed() > within {
                return Err(d.failed(format!("did not answer ping within {within:?}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// One request without arguments; its data.
    pub fn call(&self, cmd: &str) -> Result<serde_json::Value, client::ClientError> {
        client::call(&self.socket, cmd, serde_json::Value::Null, |_| {})
    }

    /// `status`, parsed.
    pub fn status(&self) -> Result<StatusReply, SoakError> {
        let v = self.call("status")?;
        serde_json::from_value(v)
            .map_err(|e| self.failed(format!("sent a status that does not parse: {e}")))
    }

    /// An error if the daemon has exited.
    pub fn check_alive(&mut self) -> Result<(), SoakError> {
        let child = self.child.as_mut().expect("a running child");
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => Err(self.failed(format!("exited early ({st})"))),
            Err(e) => Err(self.failed(format!("cannot be waited for: {e}"))),
        }
    }

    /// `ctl shutdown`, then waits up to `within` for the exit; returns the exit code.
    pub fn shutdown(mut self, within: Duration) -> Result<i32, SoakError> {
        self.call("shutdown")?;
        let t = Instant::now();
        let child = self.child.as_mut().expect("a running child");
        loop {
            match child.try_wait() {
                Ok(Some(st)) => {
                    self.child = None;
                    return st
                        .code()
                        .ok_or_else(|| self.failed(format!("ended by a signal ({st})")));
                }
                Ok(None) if t.elapsed() > within => {
                    return Err(self.failed(format!("did not exit within {within:?}")));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(self.failed(format!("cannot be waited for: {e}"))),
            }
        }
    }

    fn failed(&self, what: String) -> SoakError {
        SoakError::Daemon {
            what,
            log: self.log.clone(),
        }
    }
}

impl Drop for DaemonChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A status section by name (`trainer`, `ingest`, …); `Null` when absent.
pub fn section<'a>(s: &'a StatusReply, name: &str) -> &'a serde_json::Value {
    s.sections
        .iter()
        .find(|(n, _)| n == name)
        .map_or(&serde_json::Value::Null, |(_, v)| v)
}
