//! The shipped systemd unit, config/mbtd.service: `systemd-analyze security --offline=true`
//! rates it at most 2.5, `systemd-analyze verify` is clean, and the daemon works within its
//! limits. There is no systemd to start the unit under here, so the last check runs the real
//! binary the way the unit's restrictions shape it: without any capability (`setpriv` empties
//! the bounding, inheritable and ambient sets and sets no_new_privs), in the unit's environment
//! and working directory, under `strace -f`, through a run that ingests a file, trains, writes
//! checkpoints, answers admin requests, sends sd_notify READY and WATCHDOG, stops, resumes and
//! stops again. The seccomp and mount restrictions are checked on the recorded calls rather
//! than enforced: every call must be in the unit's `SystemCallFilter=` set (expanded with
//! `systemd-analyze syscall-filter`), no mapping may be made writable and executable or
//! executable later (`MemoryDenyWriteExecute=`), every socket must be AF_UNIX
//! (`RestrictAddressFamilies=`), no namespace may be created (`RestrictNamespaces=`), nothing
//! outside the data dir may be written (`ProtectSystem=strict`) and nothing hidden by
//! `ProtectHome=`, `PrivateTmp=`, `PrivateDevices=` or `ProcSubset=pid` may be opened.
//!
//! Each test prints "SKIPPED <test>: …" and passes where a tool it needs is absent (.ci/run
//! installs Debian's `systemd` and `strace` packages).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Highest overall exposure `systemd-analyze security` may give the unit.
const MAX_EXPOSURE: f64 = 2.5;
/// The binary named by the unit's ExecStart=.
const INSTALLED_BIN: &str = "/usr/local/bin/mbtd";

/// config/mbtd.service, found from this package's directory upwards (the package may sit in a
/// workspace member directory).
fn unit_path() -> PathBuf {
    config_file("mbtd.service")
}

/// config/`name`, found from this package's directory upwards.
fn config_file(name: &str) -> PathBuf {
    let mut dir = Some(Path::new(env!("CARGO_MANIFEST_DIR")));
    while let Some(d) = dir {
        let p = d.join("config").join(name);
        if p.is_file() {
            return p;
        }
        dir = d.parent();
    }
    panic!(
        "config/{name} not found above {}",
        env!("CARGO_MANIFEST_DIR")
    );
}

/// Whether `tool --version` runs; prints why the test is skipped when it does not.
fn have(tool: &str, test: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "SKIPPED {test}: `{tool}` is not installed (Debian: apt-get install systemd strace util-linux)"
        );
    }
    ok
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The number of the "→ Overall exposure level for mbtd.service: 0.2 SAFE" line.
fn overall_exposure(report: &str) -> Option<f64> {
    unit_exposure(report, "mbtd.service")
}

/// The overall exposure `systemd-analyze security` gives `unit`.
fn unit_exposure(report: &str, unit: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|l| l.contains(&format!("Overall exposure level for {unit}:")))?;
    line.rsplit_once(&format!("{unit}:"))?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn security_exposure_is_at_most_2_5() {
    if !have("systemd-analyze", "security_exposure_is_at_most_2_5") {
        return;
    }
    let o = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit_path()));
    let report = text(&o);
    let level = overall_exposure(&report)
        .unwrap_or_else(|| panic!("no overall exposure line in:\n{report}"));
    assert!(
        level <= MAX_EXPOSURE,
        "systemd-analyze security rates the unit {level} (> {MAX_EXPOSURE}):\n{report}"
    );
    eprintln!("overall exposure {level}");
}

#[test]
fn verify_is_clean() {
    if !have("systemd-analyze", "verify_is_clean") {
        return;
    }
    let unit = unit_path();
    let shipped = std::fs::read_to_string(&unit).unwrap();

    // The shipped file: verify's only complaint may be that ExecStart's binary is not
    // installed on this machine.
    let o = run(Command::new("systemd-analyze")
        .args(["verify", "--no-pager"])
        .arg(&unit));
    let report = text(&o);
    let missing_bin = format!("Command {INSTALLED_BIN} is not executable");
    let other: Vec<&str> = report
        .lines()
        .filter(|l| !l.contains(&missing_bin) || Path::new(INSTALLED_BIN).exists())
        .collect();
    assert!(
        other.is_empty(),
        "systemd-analyze verify {}:\n{report}",
        unit.display()
    );

    // The same unit with ExecStart= naming the binary this build made: fully clean.
    verifies_with_this_build(&shipped, "mbtd.service", "");
}

/// `systemd-analyze verify` is fully clean on the unit text `shipped` (file name `name`)
/// once its one `ExecStart=<installed binary> <args>` line names the binary this build made.
fn verifies_with_this_build(shipped: &str, name: &str, args: &str) {
    let exec = format!("ExecStart={INSTALLED_BIN} {args}");
    assert_eq!(
        shipped.matches(&exec).count(),
        1,
        "the unit should have one `{exec}…` line"
    );
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join(name);
    std::fs::write(
        &copy,
        shipped.replace(&exec, &format!("ExecStart={BIN} {args}")),
    )
    .unwrap();
    let o = run(Command::new("systemd-analyze")
        .args(["verify", "--no-pager"])
        .arg(&copy));
    let report = text(&o);
    assert!(
        o.status.success() && report.trim().is_empty(),
        "systemd-analyze verify (ExecStart={BIN}) exited {}:\n{report}",
        o.status
    );
}

/// config/mbtd-node.service (the branch host): verify is clean apart from the binary not
/// being installed here, and the same exposure bound as the daemon's unit.
#[test]
fn node_unit_verifies_and_is_as_hardened() {
    if !have("systemd-analyze", "node_unit_verifies_and_is_as_hardened") {
        return;
    }
    let unit = config_file("mbtd-node.service");
    let shipped = std::fs::read_to_string(&unit).unwrap();
    verifies_with_this_build(&shipped, "mbtd-node.service", "node ");
    let o = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit));
    let report = text(&o);
    let level = unit_exposure(&report, "mbtd-node.service")
        .unwrap_or_else(|| panic!("no overall exposure line in:\n{report}"));
    assert!(level <= MAX_EXPOSURE, "rated {level}:\n{report}");
    // the node keeps the daemon's filesystem, kernel and system-call restrictions
    let daemon = std::fs::read_to_string(unit_path()).unwrap();
    for key in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateDevices=yes",
        "MemoryDenyWriteExecute=yes",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged @resources",
    ] {
        assert!(daemon.contains(key) && shipped.contains(key), "{key}");
    }
}

/// Every group of `systemd-analyze syscall-filter` with its direct members (calls and groups).
fn syscall_groups() -> BTreeMap<String, Vec<String>> {
    let o = run(Command::new("systemd-analyze").args(["syscall-filter", "--no-pager"]));
    assert!(o.status.success(), "syscall-filter: {}", text(&o));
    let mut groups = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let t = line.trim();
        if t.is_empty() {
            current = None;
        } else if !line.starts_with(char::is_whitespace) && t.starts_with('@') {
            groups.insert(t.to_string(), Vec::new());
            current = Some(t.to_string());
        } else if let Some(g) = &current
            && !t.starts_with('#')
        {
            groups.get_mut(g).unwrap().push(t.to_string());
        }
    }
    assert!(
        groups.contains_key("@system-service"),
        "no @system-service group in syscall-filter output"
    );
    groups
}

fn expand(item: &str, groups: &BTreeMap<String, Vec<String>>, out: &mut BTreeSet<String>) {
    if item.starts_with('@') {
        let members = groups
            .get(item)
            .unwrap_or_else(|| panic!("systemd-analyze knows no group {item}"));
        for m in members {
            expand(m, groups, out);
        }
    } else {
        out.insert(item.to_string());
    }
}

/// The calls the unit's `SystemCallFilter=` lines allow: the first is an allow list, later
/// lines add to it or (with `~`) take away from it, in order.
fn allowed_syscalls(unit: &str, groups: &BTreeMap<String, Vec<String>>) -> BTreeSet<String> {
    let lines: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("SystemCallFilter="))
        .collect();
    assert!(
        lines.first().is_some_and(|l| !l.starts_with('~')),
        "the unit's first SystemCallFilter= should be an allow list: {lines:?}"
    );
    let mut allowed = BTreeSet::new();
    for l in lines {
        let (deny, items) = match l.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, l),
        };
        let mut set = BTreeSet::new();
        for item in items.split_whitespace() {
            expand(item, groups, &mut set);
        }
        if deny {
            allowed.retain(|c| !set.contains(c));
        } else {
            allowed.extend(set);
        }
    }
    allowed
}

/// One traced call: its name and the text of its arguments (None for the "resumed" half of a
/// call whose arguments were on its "unfinished" line).
fn traced_calls(trace: &str) -> Vec<(String, Option<String>)> {
    let mut calls = Vec::new();
    for line in trace.lines() {
        // "<pid> name(args…) = r", "<pid> name(args… <unfinished …>",
        // "<pid> <… name resumed>…", "<pid> +++ exited …", "<pid> --- SIGCHLD …".
        let rest = line.split_once(' ').map_or(line, |(_, r)| r).trim_start();
        if let Some(resumed) = rest.strip_prefix("<... ") {
            if let Some(name) = resumed.split_whitespace().next() {
                calls.push((name.to_string(), None));
            }
        } else if let Some((name, args)) = rest.split_once('(')
            && !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            calls.push((name.to_string(), Some(args.to_string())));
        }
    }
    calls
}

/// The top-level arguments of a traced call ("a, {b, c}, \"d,e\")" → a | {b, c} | "d,e").
fn split_args(args: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut quoted, mut escaped, mut start) = (0i32, false, false, 0);
    for (i, c) in args.char_indices() {
        if quoted {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => quoted = false,
                _ => escaped = false,
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            '(' | '[' | '{' | '<' => depth += 1,
            ')' | ']' | '}' | '>' if depth > 0 => depth -= 1,
            ',' if depth == 0 => {
                out.push(args[start..i].trim());
                start = i + 1;
            }
            ')' => {
                out.push(args[start..i].trim());
                return out;
            }
            _ => {}
        }
    }
    out.push(args[start..].trim());
    out
}

/// The path a `dirfd, "name"` pair names (strace -y prints a descriptor as `5</its/path>`);
/// `AT_FDCWD` and plain calls resolve against `cwd`. None for a non-string argument.
fn resolve(dirfd: Option<&str>, name: &str, cwd: &Path) -> Option<PathBuf> {
    let name = name.strip_prefix('"')?.split('"').next()?;
    if name.starts_with('/') {
        return Some(PathBuf::from(name));
    }
    let base = match dirfd {
        None | Some("AT_FDCWD") => cwd.to_path_buf(),
        Some(fd) => PathBuf::from(fd.split_once('<')?.1.strip_suffix('>')?),
    };
    Some(base.join(name))
}

/// The paths a call opens (`written` = opened for writing, created, renamed, removed…).
fn call_paths(call: &str, args: &str, cwd: &Path) -> Vec<(PathBuf, bool)> {
    let a = split_args(args);
    let at = |fd: usize, name: usize| resolve(a.get(fd).copied(), a.get(name)?, cwd);
    let plain = |name: usize| resolve(None, a.get(name)?, cwd);
    let opens_for_write = |flags: Option<&&str>| {
        flags.is_some_and(|f| {
            ["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC"]
                .iter()
                .any(|w| f.contains(w))
        })
    };
    let found: Vec<(Option<PathBuf>, bool)> = match call {
        "openat" | "openat2" => vec![(at(0, 1), opens_for_write(a.get(2)))],
        "open" => vec![(plain(0), opens_for_write(a.get(1)))],
        "creat" | "mkdir" | "rmdir" | "unlink" | "truncate" | "chmod" | "mknod" => {
            vec![(plain(0), true)]
        }
        "mkdirat" | "unlinkat" | "fchmodat" | "mknodat" | "utimensat" => vec![(at(0, 1), true)],
        "rename" | "link" | "symlink" => vec![(plain(0), true), (plain(1), true)],
        "renameat" | "renameat2" | "linkat" => vec![(at(0, 1), true), (at(2, 3), true)],
        "symlinkat" => vec![(at(1, 2), true)],
        "bind" => vec![(
            args.split_once("sun_path=")
                .and_then(|(_, p)| resolve(None, p, cwd)),
            true,
        )],
        "execve" | "execveat" => vec![(plain(0), false)],
        _ => Vec::new(),
    };
    found
        .into_iter()
        .filter_map(|(p, w)| Some((p?, w)))
        .collect()
}

/// Why the unit would make `path` unavailable to the daemon, if it would. `data` is the data
/// dir (`ReadWritePaths=`), `bin` the executable.
fn refused_path(path: &Path, written: bool, data: &Path, bin: &Path) -> Option<&'static str> {
    let s = path.to_string_lossy();
    // glibc's malloc reads this once, when it first shrinks an arena's heap; where it cannot
    // (ProcSubset=pid), it assumes the kernel's default heuristic overcommit.
    if !written && s == "/proc/sys/vm/overcommit_memory" {
        return None;
    }
    // PrivateDevices=yes leaves only these (and /dev/shm, /dev/pts) below /dev.
    const DEVICES: [&str; 7] = [
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/random",
        "/dev/urandom",
        "/dev/tty",
        "/dev/ptmx",
    ];
    if path.starts_with(data) {
        None
    } else if s.starts_with("/dev/") {
        let ok = DEVICES.contains(&s.as_ref())
            || s.starts_with("/dev/shm/")
            || s.starts_with("/dev/pts/");
        (!ok).then_some("PrivateDevices=yes hides it")
    } else if written {
        Some("ProtectSystem=strict: only the data dir (ReadWritePaths=) is writable")
    } else if ["/home/", "/root/", "/run/user/"]
        .iter()
        .any(|p| s.starts_with(p))
        && !path.starts_with(bin)
    {
        Some("ProtectHome=yes hides it")
    } else if ["/tmp/", "/var/tmp/"].iter().any(|p| s.starts_with(p)) && !path.starts_with(bin) {
        Some("PrivateTmp=yes hides other software's temporary files")
    } else if let Some(rest) = s.strip_prefix("/proc/") {
        let first = rest.split('/').next().unwrap_or("");
        let process =
            first == "self" || first == "thread-self" || first.chars().all(|c| c.is_ascii_digit());
        (!process).then_some("ProcSubset=pid shows only process directories of /proc")
    } else {
        None
    }
}

#[test]
fn strace_lines_give_calls_and_the_paths_the_unit_would_refuse() {
    let trace = r#"7 openat(AT_FDCWD</d>, "/d/checkpoints/.tmp-1/m.safetensors", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0666) = 9</d/checkpoints/.tmp-1/m.safetensors>
7 renameat2(AT_FDCWD</d>, "a.tmp", 4</d/inbox>, "a, b.csv", RENAME_NOREPLACE) = 0
8 openat(4</d/inbox>, "x.csv", O_RDONLY|O_CLOEXEC <unfinished ...>
7 <... futex resumed>) = 0
8 <... openat resumed>) = 8</d/inbox/x.csv>
7 bind(5<socket:[99]>, {sa_family=AF_UNIX, sun_path="/d/mbtd.sock"}, 19) = 0
7 openat(AT_FDCWD</d>, "/proc/meminfo", O_RDONLY) = 3</proc/meminfo>
7 openat(AT_FDCWD</d>, "/proc/self/status", O_RDONLY) = 3</proc/self/status>
7 openat(AT_FDCWD</d>, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3</etc/ld.so.cache>
7 openat(AT_FDCWD</d>, "/dev/sda", O_RDONLY) = -1 EACCES (Permission denied)
7 openat(AT_FDCWD</d>, "/root/.cache/x", O_RDONLY) = -1 ENOENT (No such file or directory)
7 mkdir("/var/cache/mbtd", 0777) = 0
7 --- SIGCHLD {si_signo=SIGCHLD, si_code=CLD_EXITED} ---
7 +++ exited with 0 +++
"#;
    let calls = traced_calls(trace);
    let names: Vec<&str> = calls.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "openat",
            "renameat2",
            "openat",
            "futex",
            "openat",
            "bind",
            "openat",
            "openat",
            "openat",
            "openat",
            "openat",
            "mkdir"
        ]
    );
    assert!(calls[3].1.is_none() && calls[4].1.is_none());
    let (data, bin) = (Path::new("/d"), Path::new("/usr/local/bin/mbtd"));
    let verdicts: Vec<(String, bool, Option<&str>)> = calls
        .iter()
        .filter_map(|(c, a)| Some((c, a.as_deref()?)))
        .flat_map(|(c, a)| call_paths(c, a, data))
        .map(|(p, w)| {
            let why = refused_path(&p, w, data, bin);
            (p.to_string_lossy().into_owned(), w, why)
        })
        .collect();
    let expect = [
        ("/d/checkpoints/.tmp-1/m.safetensors", true, None),
        ("/d/a.tmp", true, None),
        ("/d/inbox/a, b.csv", true, None),
        ("/d/inbox/x.csv", false, None),
        ("/d/mbtd.sock", true, None),
        ("/proc/meminfo", false, Some("ProcSubset")),
        ("/proc/self/status", false, None),
        ("/etc/ld.so.cache", false, None),
        ("/dev/sda", false, Some("PrivateDevices")),
        ("/root/.cache/x", false, Some("ProtectHome")),
        ("/var/cache/mbtd", true, Some("ProtectSystem")),
    ];
    assert_eq!(verdicts.len(), expect.len(), "{verdicts:?}");
    for ((path, written, why), (p, w, setting)) in verdicts.iter().zip(expect) {
        assert_eq!((path.as_str(), *written), (p, w));
        match setting {
            None => assert_eq!(*why, None, "{path}"),
            Some(s) => assert!(why.is_some_and(|y| y.starts_with(s)), "{path}: {why:?}"),
        }
    }
}

/// The small test model with evaluations, periodic checkpoints with retention, and metrics
/// history lines, so that the traced run goes through each of them.
fn trace_config() -> String {
    small(&[
        ("eval.every_steps", "10"),
        ("replay.control_fraction", "0.1"),
        ("checkpoints.every_steps", "20"),
        ("checkpoints.keep_last", "2"),
        ("checkpoints.keep_daily", "0"),
        ("metrics.history_every_s", "1"),
    ])
}

/// setpriv → strace → mbtd in a process group of their own. strace does not take its tracee
/// down when it is killed, so dropping this (a failed assertion) kills the whole group.
struct Traced(Daemon);

impl Drop for Traced {
    fn drop(&mut self) {
        if let Some(c) = &self.0.child {
            // SAFETY: kill with the (negated) id of the group this test created.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
        }
    }
}

/// Starts `mbtd run` on `dir` with no capabilities, under strace writing to `trace`, with a
/// notify socket and the unit's environment; waits for READY on the notify socket.
fn start_traced(dir: tempfile::TempDir, trace: &Path, notify: &UnixDatagram) -> Traced {
    let cfg = dir.path().join("test.toml");
    std::fs::write(&cfg, format!("{BASE_CONFIG}{}", trace_config())).unwrap();
    let log = dir.path().join(format!(
        "daemon-{}.log",
        trace.file_stem().unwrap().to_string_lossy()
    ));
    let logf = std::fs::File::create(&log).unwrap();
    let notify_path = notify.local_addr().unwrap();
    let child = Command::new("setpriv")
        .args([
            "--no-new-privs",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "strace",
            "-f",
            "-qq",
            "-y",
            "-o",
        ])
        .arg(trace)
        .args([BIN, "run", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path())
        // The environment systemd gives the unit (not cargo's LD_LIBRARY_PATH and the like).
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("NOTIFY_SOCKET", notify_path.as_pathname().unwrap())
        .env("WATCHDOG_USEC", "1000000")
        .env("MALLOC_ARENA_MAX", "2")
        .env("HOME", dir.path())
        .current_dir(dir.path())
        .stdout(Stdio::from(logf.try_clone().unwrap()))
        .stderr(Stdio::from(logf))
        .process_group(0)
        .spawn()
        .expect("spawn setpriv strace mbtd");
    let t = Traced(Daemon {
        dir,
        child: Some(child),
        log,
        env: Vec::new(),
    });
    let d = &t.0;
    d.wait_ready(Duration::from_secs(120));
    let messages = read_notify(notify, Duration::from_secs(30), "READY=1");
    assert!(
        messages.iter().any(|m| m.contains("READY=1")),
        "no READY=1 on $NOTIFY_SOCKET: {messages:?}; log:\n{}",
        d.log_text()
    );
    t
}

/// Notify datagrams until one contains `until` or `within` passes.
fn read_notify(sock: &UnixDatagram, within: Duration, until: &str) -> Vec<String> {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let t = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while t.elapsed() < within {
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = m.contains(until);
            got.push(m);
            if done {
                break;
            }
        }
    }
    got
}

/// SIGTERM to the daemon itself (strace, its parent, would kill it instead), then waits for
/// strace to end with the daemon's exit status.
fn stop(t: &mut Traced) {
    let d = &mut t.0;
    let pid = d.data("status", Value::Null)["pid"]
        .as_u64()
        .expect("status has pid");
    // SAFETY: kill with a pid the daemon just reported.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let st = d.wait_exit(Duration::from_secs(120));
    assert!(st.success(), "daemon exited {st}; log:\n{}", d.log_text());
}

#[test]
fn daemon_runs_within_the_units_system_call_filter_without_capabilities() {
    let name = "daemon_runs_within_the_units_system_call_filter_without_capabilities";
    if !(have("systemd-analyze", name) && have("strace", name) && have("setpriv", name)) {
        return;
    }
    let unit = std::fs::read_to_string(unit_path()).unwrap();
    let groups = syscall_groups();
    // The group parser read nested groups: @system-service reaches these through @basic-io,
    // @sync, @io-event, @file-system.
    let mut service = BTreeSet::new();
    expand("@system-service", &groups, &mut service);
    for must in ["read", "futex", "epoll_wait", "fsync", "renameat2"] {
        assert!(
            service.contains(must),
            "@system-service without {must}: {service:?}"
        );
    }
    let allowed = allowed_syscalls(&unit, &groups);

    let traces = tempfile::tempdir().unwrap();
    let notify = UnixDatagram::bind(traces.path().join("notify.sock")).unwrap();

    // First run: bootstrap the tokenizer, ingest, train, checkpoint, answer admin requests.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("inbox")).unwrap();
    let mut csv = String::from("prompt,response,source\n");
    for i in 0..300u32 {
        csv.push_str(&format!("\"what is {i} times 3\",\"{}\",m\n", i * 3));
    }
    let staged = dir.path().join("d.tmp");
    std::fs::write(&staged, csv).unwrap();
    std::fs::rename(&staged, dir.path().join("inbox/d.csv")).unwrap();
    let first = traces.path().join("first.trace");
    let mut t = start_traced(dir, &first, &notify);
    let d = &t.0;
    d.wait_for(Duration::from_secs(120), "the ingest sidecar", || {
        d.path()
            .join("inbox/.done/d.csv.json")
            .exists()
            .then_some(())
    });
    d.wait_steps(25, Duration::from_secs(300));
    let watchdog = read_notify(&notify, Duration::from_secs(10), "WATCHDOG=1");
    assert!(
        watchdog.iter().any(|m| m.contains("WATCHDOG=1")),
        "no WATCHDOG=1 within 10 s with WATCHDOG_USEC=1 s: {watchdog:?}"
    );
    d.data("checkpoint", json!({"tag": "traced"}));
    d.data("eval", Value::Null);
    d.data("metrics", Value::Null);
    d.data("checkpoints", Value::Null);
    d.data("diagnostics", Value::Null);
    d.data(
        "generate",
        json!({"prompt": "what is 2 times 3", "max_tokens": 8}),
    );
    stop(&mut t);

    // Second run: resume from the checkpoint, train a little, stop.
    let second = traces.path().join("second.trace");
    let dir = std::mem::replace(&mut t.0.dir, tempfile::tempdir().unwrap());
    let mut t = start_traced(dir, &second, &notify);
    t.0.wait_steps(3, Duration::from_secs(120));
    stop(&mut t);

    let mut calls = Vec::new();
    for t in [&first, &second] {
        calls.extend(traced_calls(&std::fs::read_to_string(t).unwrap()));
    }
    let used: BTreeSet<&str> = calls.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        used.contains("epoll_wait")
            && used.contains("fsync")
            && (used.contains("sendto") || used.contains("sendmsg")),
        "the trace looks incomplete: {used:?}"
    );
    let refused: Vec<&&str> = used.iter().filter(|c| !allowed.contains(**c)).collect();
    assert!(
        refused.is_empty(),
        "the daemon made system calls the unit's SystemCallFilter= refuses: {refused:?}"
    );

    let with_args = calls
        .iter()
        .filter_map(|(c, a)| Some((c.as_str(), a.as_deref()?)));
    for (call, args) in with_args.clone() {
        let flagged = match call {
            // MemoryDenyWriteExecute=: no W+X mapping, no mapping made executable later.
            "mmap" | "mmap2" => args.contains("PROT_WRITE") && args.contains("PROT_EXEC"),
            "mprotect" | "pkey_mprotect" => args.contains("PROT_EXEC"),
            "shmat" => args.contains("SHM_EXEC"),
            // RestrictAddressFamilies=AF_UNIX.
            "socket" | "socketpair" => !args.starts_with("AF_UNIX"),
            // RestrictNamespaces=yes.
            "clone" | "clone3" | "unshare" | "setns" => args.contains("CLONE_NEW"),
            // LockPersonality=yes: querying (0xffffffff) is all that is left.
            "personality" => !args.starts_with("0xffffffff"),
            _ => false,
        };
        assert!(!flagged, "{call}({args} is refused by the unit's hardening");
    }
    // The daemon's cwd in the traced runs was the data dir, as WorkingDirectory= makes it.
    let data = t.0.path().canonicalize().unwrap();
    let bin = Path::new(BIN).canonicalize().unwrap();
    let mut paths = 0;
    let mut fail = BTreeSet::new();
    for (call, args) in with_args {
        for (path, written) in call_paths(call, args, &data) {
            paths += 1;
            if let Some(why) = refused_path(&path, written, &data, &bin) {
                fail.insert(format!("{call} {}: {why}", path.display()));
            }
        }
    }
    assert!(
        fail.is_empty(),
        "paths the unit makes unavailable:\n{}",
        fail.into_iter().collect::<Vec<_>>().join("\n")
    );
    assert!(paths > 100, "only {paths} paths found in the trace");
    eprintln!(
        "{} traced calls, {} distinct, all allowed: {used:?}",
        calls.len(),
        used.len()
    );
}
