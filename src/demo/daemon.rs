//! The daemon the demo runs: `mbtd run` as a child process in its own process group (so a
//! Ctrl-C in the terminal reaches the demo, which stops the daemon in order), its JSON log in
//! a file, spoken to over its admin socket with the crate's own client.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::admin::client::{self, ClientError};

pub struct DaemonChild {
    child: Option<Child>,
    socket: PathBuf,
    pub log: PathBuf,
}

impl DaemonChild {
    /// Starts `exe run --config config --data-dir data_dir`, stdout and stderr to `log`.
    pub fn spawn(
        exe: &Path,
        config: &Path,
        data_dir: &Path,
        socket: PathBuf,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(exe)
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start the daemon {}", exe.display()))?;
        Ok(Self {
            child: Some(child),
            socket,
            log,
        })
    }

    /// Waits until the daemon answers `ping`; an early exit is an error quoting its log.
    pub fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Some(st) = self.exited() {
                bail!(
                    "the daemon exited at start ({st}); its log {}:\n{}",
                    self.log.display(),
                    self.log_tail(20)
                );
            }
            if self.call("ping", Value::Null).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "the daemon did not answer on {} within {within:?}; its log {}:\n{}",
            self.socket.display(),
            self.log.display(),
            self.log_tail(20)
        )
    }

    /// One request; the final response's data.
    pub fn call(&self, cmd: &str, args: Value) -> Result<Value, ClientError> {
        client::call(&self.socket, cmd, args, |_| {})
    }

    /// A streaming request (`generate`): `on_chunk` sees each chunk.
    pub fn call_stream(
        &self,
        cmd: &str,
        args: Value,
        on_chunk: impl FnMut(&Value),
    ) -> Result<Value, ClientError> {
        client::call(&self.socket, cmd, args, on_chunk)
    }

    /// The exit status, once the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(st)
    }

    /// Ordered stop (`shutdown`, as SIGTERM): the daemon finishes its step and writes its
    /// final checkpoint. After `within`, SIGKILL.
    pub fn shutdown(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            bail!("the daemon had already exited");
        };
        if self.call("shutdown", Value::Null).is_err() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        let child = self.child.as_mut().expect("checked above");
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if t.elapsed() > within {
                let _ = child.kill();
                let st = child.wait()?;
                self.child = None;
                bail!(
                    "the daemon did not stop within {within:?} and was killed ({st}); its log: {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `n` lines of the daemon's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for DaemonChild {
    /// A demo that ends early (an error) still stops its daemon in order.
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.shutdown(Duration::from_secs(30));
        }
    }
}
