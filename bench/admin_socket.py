"""One request on the daemon's admin socket (JSON lines), for the benchmark scripts."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time


def request(sock_path, cmd, args=None, timeout=30.0):
    """Sends `cmd` with `args`; returns the final (`done`) response, after any stream chunks."""
    line = json.dumps({"id": 1, "cmd": cmd, "args": args}) + "\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(line.encode())
        buf = b""
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                raise RuntimeError(f"{cmd}: connection closed before a done response")
            buf += chunk
            while b"\n" in buf:
                one, buf = buf.split(b"\n", 1)
                v = json.loads(one)
                if v.get("done"):
                    return v


def wait_ready(sock_path, proc, what, within_s=60.0):
    """Waits until the daemon `proc` answers `ping` on `sock_path`; raises naming `what`."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            if request(sock_path, "ping", timeout=1.0).get("ok"):
                return
        except (OSError, RuntimeError, ValueError):
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"daemon not ready; see {what}")
        time.sleep(0.1)


def stop(sock_path, proc):
    """Asks the daemon `proc` for an ordered stop; kills it if it has not exited in 60 s."""
    try:
        request(sock_path, "shutdown", timeout=5.0)
    except (OSError, RuntimeError, ValueError):
        pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def daemon(cmd, data_dir, keep, what):
    """Runs the daemon command `cmd` on `data_dir` (its output in `<data_dir>/daemon.log`) for
    the `with` block: yields `(socket path, process)` once it answers, then stops it in order
    and removes `data_dir` unless `keep`. `what` names the log in a start-up error."""
    log = open(os.path.join(data_dir, "daemon.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    sock = os.path.join(data_dir, "mbtd.sock")
    try:
        wait_ready(sock, proc, what)
        yield sock, proc
    finally:
        stop(sock, proc)
        log.close()
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)
