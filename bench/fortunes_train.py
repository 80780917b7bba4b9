#!/usr/bin/env python3
"""Real tokens per second and position utilisation of the daemon's trainer on a CSV.

For each round and each `--bin` in turn (interleaved: old, new, old, new, ...), starts
`BIN run` on a fresh data dir with the embedded default configuration (or `--config`),
renames the CSV into its inbox, waits until the trainer has done `--warmup-steps` steps
(tokenizer bootstrap and the first steps excluded), then measures over `--window-s`
seconds of wall time, polling `status` and `metrics` on the admin socket every `--poll-s`:

- `real_tokens_per_sec`: growth of the trainer's `tokens` (loss tokens, i.e. text, the
  count the checkpoint manifest keeps) per second of wall time: the end-to-end figure,
  evaluations and checkpoints included;
- `steps_per_sec`, `real_tokens_per_step`;
- `gauge_tokens_per_sec`, `gauge_position_utilization`: means of the
  `train_tokens_per_sec` / `train_position_utilization` gauges over the polls (null when
  the binary has no such gauge);
- `machine_idle_share`: the share of the machine's CPU time that was idle during the
  window (from /proc/stat; a loaded machine makes every figure noisy).

Prints one JSON line per run, then one summary line: per binary the median of its runs,
and the ratio of each later binary's median `real_tokens_per_sec` to the first's. Usage:

    python3 bench/fortunes_csv.py --out /tmp/fortunes.csv
    python3 bench/fortunes_train.py --csv /tmp/fortunes.csv \\
        --bin /work/mbtd-base --bin target/release/mbtd --rounds 2 --window-s 120
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from admin_socket import daemon, request


def trainer(sock):
    data = request(sock, "status")["data"]
    for name, section in data.get("sections", []):
        if name == "trainer":
            return section
    return {}


def gauges(sock):
    try:
        m = request(sock, "metrics")["data"] or {}
    except (OSError, RuntimeError, ValueError):
        return None, None
    return m.get("train_tokens_per_sec"), m.get("train_position_utilization")


def cpu_times():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v), v[3] + v[4]


def one_run(binary, csv_path, config, a):
    d = tempfile.mkdtemp(prefix="mbtd-fortunes-")
    cmd = [binary, "run", "--data-dir", d]
    if config:
        cmd[2:2] = ["--config", config]
    with daemon(cmd, d, a.keep, f"{binary}: {d}/daemon.log") as (sock, proc):
        staging = os.path.join(d, "staging.tmp")
        shutil.copyfile(csv_path, staging)
        os.rename(staging, os.path.join(d, "inbox", os.path.basename(csv_path)))
        deadline = time.monotonic() + a.start_timeout_s
        while int(trainer(sock).get("step") or 0) < a.warmup_steps:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{binary}: no {a.warmup_steps} steps; see {d}/daemon.log")
            time.sleep(a.poll_s)
        t0, s0 = time.monotonic(), trainer(sock)
        c0 = cpu_times()
        tps, util = [], []
        end = t0 + a.window_s
        while time.monotonic() < end:
            time.sleep(a.poll_s)
            g_tps, g_util = gauges(sock)
            if g_tps is not None:
                tps.append(g_tps)
            if g_util is not None:
                util.append(g_util)
        t1, s1 = time.monotonic(), trainer(sock)
        c1 = cpu_times()
        secs = t1 - t0
        steps = int(s1["step"]) - int(s0["step"])
        tokens = int(s1["tokens"]) - int(s0["tokens"])
        return {
            "bin": binary,
            "window_s": round(secs, 1),
            "steps": steps,
            "real_tokens": tokens,
            "real_tokens_per_sec": round(tokens / secs, 1),
            "steps_per_sec": round(steps / secs, 3),
            "real_tokens_per_step": round(tokens / max(1, steps), 1),
            "gauge_tokens_per_sec": round(statistics.mean(tps), 1) if tps else None,
            "gauge_position_utilization": round(statistics.mean(util), 4) if util else None,
            "trainer_state": s1.get("state"),
            "machine_idle_share": round((c1[1] - c0[1]) / max(1, c1[0] - c0[0]), 3),
            "data_dir": d if a.keep else None,
        }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", required=True, help="e.g. from bench/fortunes_csv.py")
    ap.add_argument("--bin", action="append", required=True,
                    help="binary to measure (repeat: the first is the baseline)")
    ap.add_argument("--config", help="configuration file (default: the embedded default)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--window-s", type=float, default=120.0)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--poll-s", type=float, default=2.0)
    ap.add_argument("--start-timeout-s", type=float, default=600.0)
    ap.add_argument("--keep", action="store_true", help="keep the data dirs")
    a = ap.parse_args()
    runs = {b: [] for b in a.bin}
    for _ in range(a.rounds):
        for b in a.bin:
            r = one_run(b, a.csv, a.config, a)
            print(json.dumps(r), flush=True)
            runs[b].append(r)
    med = lambda rs, k: statistics.median(r[k] for r in rs) if rs and rs[0][k] is not None else None
    summary = {
        b: {
            "runs": len(rs),
            "real_tokens_per_sec": med(rs, "real_tokens_per_sec"),
            "real_tokens_per_step": med(rs, "real_tokens_per_step"),
            "steps_per_sec": med(rs, "steps_per_sec"),
            "gauge_position_utilization": med(rs, "gauge_position_utilization"),
            "machine_idle_share": med(rs, "machine_idle_share"),
        }
        for b, rs in runs.items()
    }
    base = summary[a.bin[0]]["real_tokens_per_sec"]
    print(json.dumps({
        "bench": "fortunes_train",
        "csv": a.csv,
        "window_s": a.window_s,
        "per_bin": summary,
        "ratio_to_first": {b: round(s["real_tokens_per_sec"] / base, 3) for b, s in summary.items()},
    }))


if __name__ == "__main__":
    main()
