//! `mbtd run` as a child process, for the commands that drive a real daemon (`demo`,
//! `bench soak`): started in its own process group (a Ctrl-C in the terminal reaches the
//! parent, which stops the daemon in order), its JSON log in a file, spoken to over its admin
//! socket with the crate's own client.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::admin::client::{self, ClientError};

/// What went wrong with a child daemon; every message names the daemon's log.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The log file could not be created.
    #[error("cannot create the daemon log {}: {source}", path.display())]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The executable could not be started.
    #[error("cannot start the daemon {}: {source}", exe.display())]
    Start {
        exe: PathBuf,
        source: std::io::Error,
    },
    /// The daemon ended while it was expected to run.
    #[error("the daemon exited ({status}); its log {}:\n{tail}", log.display())]
    Exited {
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    /// The socket did not answer `ping` in time.
    #[error("the daemon did not answer on {} within {within:?}; its log {}:\n{tail}",
        socket.display(), log.display())]
    NotReady {
        socket: PathBuf,
        within: Duration,
        log: PathBuf,
        tail: String,
    },
    /// An ordered stop overran its time and the daemon was killed.
    #[error("the daemon did not stop within {within:?} and was killed; its log {}", log.display())]
    StopTimeout { within: Duration, log: PathBuf },
    /// The process had already ended before a stop was asked.
    #[error("the daemon had already exited; its log {}", log.display())]
    AlreadyExited { log: PathBuf },
    /// Waiting for the process failed.
    #[error("cannot wait for the daemon: {0}")]
    Wait(#[from] std::io::Error),
}

/// A running `mbtd run` child. Dropping it stops the daemon in order (SIGKILL after 30 s).
pub struct DaemonChild {
    child: Option<Child>,
    socket: PathBuf,
    /// The daemon's stdout and stderr.
    pub log: PathBuf,
}

impl DaemonChild {
    /// Starts `exe run --config config --data-dir data_dir`, stdout and stderr to `log`;
    /// `socket` is the admin socket that config resolves to.
    pub fn spawn(
        exe: &Path,
        config: &Path,
        data_dir: &Path,
        socket: PathBuf,
        log: PathBuf,
    ) -> Result<Self, ChildError> {
        let log_err = |source| ChildError::Log {
            path: log.clone(),
            source,
        };
        let out = File::create(&log).map_err(log_err)?;
        let err = out.try_clone().map_err(log_err)?;
        let child = Command::new(exe)
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .spawn()
            .map_err(|source| ChildError::Start {
                exe: exe.to_path_buf(),
                source,
            })?;
        Ok(Self {
            child: Some(child),
            socket,
            log,
        })
    }

    /// Waits until the daemon answers `ping`; an early exit is an error quoting its log.
    pub fn wait_ready(&mut self, within: Duration) -> Result<(), ChildError> {
        let t = Instant::now();
        while t.elapsed() < within {
            self.check_alive()?;
            if self.call("ping", Value::Null).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(ChildError::NotReady {
            socket: self.socket.clone(),
            within,
            log: self.log.clone(),
            tail: self.log_tail(20),
        })
    }

    /// Process id (0 once the process has been reaped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
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

    /// The exit status, once the process has ended (reaps it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(st)
    }

    /// An error quoting the log if the daemon has ended.
    pub fn check_alive(&mut self) -> Result<(), ChildError> {
        match self.exited() {
            None if self.child.is_some() => Ok(()),
            None => Err(ChildError::AlreadyExited {
                log: self.log.clone(),
            }),
            Some(status) => Err(ChildError::Exited {
                status,
                log: self.log.clone(),
                tail: self.log_tail(20),
            }),
        }
    }

    /// Ordered stop (`shutdown`, else SIGTERM): the daemon finishes its step and writes its
    /// final checkpoint. After `within`, SIGKILL and [`ChildError::StopTimeout`].
    pub fn shutdown(&mut self, within: Duration) -> Result<ExitStatus, ChildError> {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return Err(ChildError::AlreadyExited {
                log: self.log.clone(),
            });
        };
        if self.call("shutdown", Value::Null).is_err() {
            // SAFETY: kill(2) on our own, not yet reaped, child's pid.
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
                child.wait()?;
                self.child = None;
                return Err(ChildError::StopTimeout {
                    within,
                    log: self.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
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
    /// A caller that ends early (an error) still stops its daemon in order.
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.shutdown(Duration::from_secs(30));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_that_cannot_start_names_the_executable() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("no-such-mbtd");
        let err = DaemonChild::spawn(
            &exe,
            &dir.path().join("c.toml"),
            dir.path(),
            dir.path().join("s.sock"),
            dir.path().join("daemon.log"),
        )
        .err()
        .expect("spawn must fail");
        assert!(err.to_string().contains("no-such-mbtd"), "{err}");
    }

    #[test]
    fn an_early_exit_is_reported_with_the_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        // `false` ignores its arguments and exits 1 at once, like a daemon refusing its config.
        let mut d = DaemonChild::spawn(
            Path::new("/bin/false"),
            &dir.path().join("c.toml"),
            dir.path(),
            dir.path().join("s.sock"),
            dir.path().join("daemon.log"),
        )
        .unwrap();
        let err = d.wait_ready(Duration::from_secs(10)).unwrap_err();
        assert!(matches!(err, ChildError::Exited { .. }), "{err}");
        assert!(err.to_string().contains("daemon.log"), "{err}");
    }
}
