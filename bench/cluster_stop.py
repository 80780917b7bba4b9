#!/usr/bin/env python3
"""Step times of a coordinator while one of its two nodes is paused (SIGSTOP).

Starts two `mbtd node` processes on loopback and `mbtd run` as their coordinator (the
tests' small model, `cluster.deadline_ms` = `--deadline-ms`), drops a CSV, waits until
both nodes answer, then pauses node 0 for `--stop-s` seconds and resumes it (SIGCONT).

Two readings of the step time while node 0 is paused:

1. the daemon's own `train_step_seconds` histogram (the whole step: the wait for the
   nodes included), read from `metrics` just before SIGCONT: its p50/p99/max are over
   every step since the start (`steps_before` of them before the pause);
2. the step period seen from outside, by polling `status` every `--poll-ms` ms during
   the pause (as bench/ingest_stall.py does): p50/p99/max of the periods.

Prints one JSON line, with `p99_within_deadline_plus_10pct` comparing the histogram's
p99 with 1.1 x the deadline. Usage:

    cargo build --release
    python3 bench/cluster_stop.py --bin target/release/mbtd [--deadline-ms 1000] [--stop-s 10]
"""

import argparse
import json
import os
import signal
import subprocess
import tempfile
import threading
import time

from admin_socket import daemon, request


def node(binary, data_dir, config, coordinator):
    """Starts `mbtd node` on a free loopback port; returns (process, peer id, address)."""
    proc = subprocess.Popen(
        [binary, "node", "--listen=/ip4/127.0.0.1/tcp/0", "--data-dir", data_dir,
         "--config", config, "--coordinator", coordinator],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        try:
            v = json.loads(line)
        except ValueError:
            continue
        if v.get("event") == "node_listening":
            # keep draining its output so it never blocks on a full pipe
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, v["peer_id"], v["addrs"][0]
    raise RuntimeError("mbtd node exited before listening")


def sums_csv(rows):
    out = ["text,source"]
    x = 1
    for i in range(rows):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        a, b = (x >> 33) % 50, (x >> 45) % 50
        out.append(f'"{a} plus {b} is {a + b}",s{i % 3}')
    return "\n".join(out) + "\n"


def quantile(v, q):
    v = sorted(v)
    return v[round((len(v) - 1) * q)] if v else None


def nodes(sock):
    return request(sock, "nodes")["data"]


def trainer_step(sock):
    for name, section in request(sock, "status")["data"].get("sections", []):
        if name == "trainer":
            return int(section.get("step") or 0)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="target/release/mbtd")
    ap.add_argument("--deadline-ms", type=int, default=1000)
    ap.add_argument("--stop-s", type=float, default=10.0)
    ap.add_argument("--poll-ms", type=float, default=10.0)
    ap.add_argument("--keep", action="store_true", help="keep the data dir")
    a = ap.parse_args()

    root = tempfile.mkdtemp(prefix="mbtd-cluster-stop-")
    coord_dir = os.path.join(root, "coordinator")
    coord = subprocess.run([a.bin, "node", "--print-id", "--data-dir", coord_dir],
                           check=True, capture_output=True, text=True).stdout.strip()
    small = subprocess.run([a.bin, "config", "small", "--set", 'logging.format="json"'],
                           check=True, capture_output=True, text=True).stdout
    node_cfg = os.path.join(root, "node.toml")
    with open(node_cfg, "w") as f:
        f.write(small)
    procs = []
    try:
        listed = []
        for k in range(2):
            d = os.path.join(root, f"node{k}")
            os.makedirs(d)
            p, peer, addr = node(a.bin, d, node_cfg, coord)
            procs.append(p)
            listed.append(f'{{ id = "{peer}", addr = "{addr}" }}')
        data = os.path.join(root, "data")
        os.makedirs(data)
        cfg = os.path.join(root, "coordinator.toml")
        with open(cfg, "w") as f:
            f.write(small + "\n[cluster]\n"
                    f"key_file = {json.dumps(os.path.join(coord_dir, 'identity.key'))}\n"
                    f"nodes = [{', '.join(listed)}]\n"
                    f"deadline_ms = {a.deadline_ms}\n")
        cmd = [a.bin, "run", "--config", cfg, "--data-dir", data]
        with daemon(cmd, data, a.keep, os.path.join(data, "daemon.log")) as (sock, _):
            tmp = os.path.join(data, ".sums.csv.part")
            with open(tmp, "w") as f:
                f.write(sums_csv(2000))
            os.rename(tmp, os.path.join(data, "inbox", "sums.csv"))
            deadline = time.monotonic() + 120
            while not all(n["state"] == "up" and (n["last_step_answered"] or 0) >= 3
                          for n in nodes(sock)["nodes"]):
                if time.monotonic() > deadline:
                    raise RuntimeError("the nodes did not answer within 120 s")
                time.sleep(0.2)
            before = request(sock, "metrics")["data"]
            os.kill(procs[0].pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            periods, (s0, t0) = [], (trainer_step(sock), time.monotonic())
            while time.monotonic() - stopped_at < a.stop_s:
                time.sleep(a.poll_ms / 1e3)
                s1, t1 = trainer_step(sock), time.monotonic()
                if s1 > s0:
                    periods += [(t1 - t0) / (s1 - s0)] * (s1 - s0)
                    s0, t0 = s1, t1
            during = request(sock, "metrics")["data"]
            step_at_cont = nodes(sock)["step"]
            os.kill(procs[0].pid, signal.SIGCONT)
            back = time.monotonic()
            rejoin_s = None
            while time.monotonic() - back < 30:
                n0 = nodes(sock)["nodes"][0]
                if n0["state"] == "up" and (n0["last_step_answered"] or 0) > step_at_cont:
                    rejoin_s = time.monotonic() - back
                    break
                time.sleep(0.05)
            deadline_s = a.deadline_ms / 1e3
            p99 = during["train_step_seconds_p99"]
            print(json.dumps({
                "bench": "cluster_stop",
                "deadline_s": deadline_s,
                "stop_s": a.stop_s,
                "steps_before": before["train_step_seconds_count"],
                "steps_during": during["train_step_seconds_count"]
                - before["train_step_seconds_count"],
                "train_step_seconds_p50_since_start": during["train_step_seconds_p50"],
                "train_step_seconds_p99_since_start": p99,
                "train_step_seconds_max_since_start": during["train_step_seconds_max"],
                "polled_periods_during": len(periods),
                "polled_period_s_p50_during": quantile(periods, 0.5),
                "polled_period_s_p99_during": quantile(periods, 0.99),
                "polled_period_s_max_during": quantile(periods, 1.0),
                "branch_deadline_misses": sum(
                    v for k, v in during.items()
                    if k.startswith("branch_deadline_misses_total")),
                "rejoin_s": rejoin_s,
                "p99_within_deadline_plus_10pct": p99 <= 1.1 * deadline_s,
            }))
    finally:
        for p in procs:
            try:
                p.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
