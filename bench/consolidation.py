#!/usr/bin/env python3
"""Control loss after a fixed wall time of the daemon fed one file: consolidation policy
against a fixed idle rate (issue 18, point 4).

The setup: the fortunes "tech" files (computers, debian, linux, linuxcookie, science of
/usr/share/games/fortunes; `apt-get install -y fortunes`), one row per fortune, dropped
into the inbox of a fresh data dir once; model d 128, 4 heads, 2 layers x 3 branches,
every other key the binary's embedded default. After `--minutes` of wall time from the
drop, `eval` runs twice (after the second every control row is "old": one comparable
number, the held-out control loss) and the trainer's step count is read.

For each round, each `--bin` runs in turn (interleaved), so drift of the shared machine
hits all of them alike. A binary from before the consolidation policy (`/work/mbtd-base`)
runs its fixed `training.idle_steps_per_min = 60`, today's default then.

Usage:

    python3 bench/consolidation.py --bin /work/mbtd-base --bin target/release/mbtd \\
        [--rounds 2] [--minutes 4] [--out bench/consolidation-raw.json]

Prints one JSON line per run, then per binary the median control loss and steps.
"""

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from admin_socket import daemon, request  # noqa: E402
from growth import unwrap  # noqa: E402
from fortunes_loss import fortunes  # noqa: E402

TECH = ["computers", "debian", "linux", "linuxcookie", "science"]
CONFIG = """[model]
d_model = 128
n_heads = 4
n_layers = 2
branches = 3
"""


def status(sock):
    return unwrap(request(sock, "status")["data"])


def run(binary, rows, minutes, keep):
    data = tempfile.mkdtemp(prefix="consolidation-")
    os.makedirs(os.path.join(data, "inbox"))
    cfg = os.path.join(data, "bench.toml")
    with open(cfg, "w") as f:
        f.write(CONFIG)
    cmd = [binary, "run", "--config", cfg, "--data-dir", data]
    with daemon(cmd, data, keep, os.path.join(data, "daemon.log")) as (sock, _):
        tmp = os.path.join(data, "tech.csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text"])
            w.writerows([t] for t in rows)
        t0 = time.time()
        os.rename(tmp, os.path.join(data, "inbox", "tech.csv"))
        trace = []
        while time.time() - t0 < minutes * 60:
            time.sleep(5)
            tr = status(sock).get("trainer") or {}
            trace.append(dict(t=round(time.time() - t0, 1), step=tr.get("step"),
                              consolidation=tr.get("consolidation")))
        request(sock, "eval", timeout=300)
        ev = unwrap(request(sock, "eval", timeout=300)["data"])
        tr = status(sock).get("trainer") or {}
        return dict(bin=binary, steps=tr.get("step"), loss_control=ev.get("loss_control_old"),
                    loss_train=tr.get("loss"), wall_s=round(time.time() - t0, 1),
                    trace=trace[:: max(1, len(trace) // 12)], data_dir=data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--keep", action="store_true", help="keep the data dirs")
    ap.add_argument("--out", default="bench/consolidation-raw.json")
    a = ap.parse_args()
    rows = fortunes(TECH)
    print(f"{len(rows)} tech fortunes", file=sys.stderr)
    runs = []
    for _ in range(a.rounds):
        for b in a.bin:
            r = run(b, rows, a.minutes, a.keep)
            print(json.dumps(r), flush=True)
            runs.append(r)
    summary = {}
    for b in a.bin:
        mine = [r for r in runs if r["bin"] == b]
        summary[b] = dict(loss_control=statistics.median(r["loss_control"] for r in mine),
                          steps=statistics.median(r["steps"] for r in mine))
    with open(a.out, "w") as f:
        json.dump(dict(args=vars(a), rows=len(rows), files=TECH, config=CONFIG,
                       summary=summary, runs=runs), f, indent=1)
    for b, s in summary.items():
        print(f"{b}: control loss {s['loss_control']:.4f}, steps {s['steps']}", file=sys.stderr)


if __name__ == "__main__":
    main()
