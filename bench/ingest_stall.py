#!/usr/bin/env python3
"""Trainer step time with and without a large file arriving in the inbox.

Starts `mbtd run` on a fresh data dir with a small model (d 64, 2 layers x 3 branches),
seeds the inbox, lets training warm up, then measures the trainer's step period twice
in the same daemon:

1. baseline: `--window-s` seconds with nothing arriving;
2. during ingest: from the moment a `--mb` MB CSV file (written and fsynced beforehand,
   before the baseline window) is renamed into the inbox until its sidecar appears in
   `inbox/.done/`;

repeated `--files` times (pooled), `--nice` sets the daemon's `ingest.nice` and
`--store-share-pct` its `ingest.store_share_pct`.

The step period is observed from outside, by polling `status` on the admin socket every
`--poll-ms` ms: when the step goes from s0 (seen at t0) to s1 (at t1), each of the s1-s0
steps is counted with period (t1-t0)/(s1-s0). A stall of the trainer (waiting for rows
while a file is ingested) therefore shows as long periods. `train_step_seconds` is not
used: it times the compute of a step only, not the wait for its rows.

Prints one JSON line: p50/p99/max step period (ms) of both phases, their p99 ratio, and
the ingest time. Usage:

    cargo build --release
    python3 bench/ingest_stall.py --bin target/release/mbtd [--mb 100] [--window-s 20]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from admin_socket import daemon, request

# The tests' small configuration (`mbtd config small`) with this benchmark's model: d 64,
# 2 layers x 3 branches, context 32, training at full speed.
OVERRIDES = [
    "logging.format=\"json\"", "logging.level=\"info\"", "ingest.settle_ms=200",
    "ingest.rescan_ms=500", "model.vocab_size=512", "model.d_model=64", "model.branches=3",
    "optim.lr=0.003", "optim.warmup_steps=20", "tokenizer.bootstrap_rows=500",
    "checkpoints.every_steps=1000000",
]


def config_text(binary, nice, share):
    sets = OVERRIDES + ([f"ingest.nice={nice}"] if nice is not None else [])
    sets += [f"ingest.store_share_pct={share}"] if share is not None else []
    args = [binary, "config", "small"] + [a for kv in sets for a in ("--set", kv)]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def step(sock_path):
    data = request(sock_path, "status")["data"]
    for name, section in data.get("sections", []):
        if name == "trainer":
            return int(section.get("step") or 0)
    return 0


def csv_rows(tag, n):
    return "text\n" + "".join(f"{tag} row {i}: some words for the tokenizer to split\n" for i in range(n))


def stage(data_dir, name, text):
    """Writes `text` to `<data_dir>/staging/name` and fsyncs it (the producer's writing
    and its write-back are over before the file arrives); returns the staged path."""
    staging = os.path.join(data_dir, "staging")
    os.makedirs(staging, exist_ok=True)
    p = os.path.join(staging, name)
    with open(p, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return p


def arrive(data_dir, staged):
    inbox = os.path.join(data_dir, "inbox")
    os.makedirs(inbox, exist_ok=True)
    os.rename(staged, os.path.join(inbox, os.path.basename(staged)))


def drop(data_dir, name, text):
    arrive(data_dir, stage(data_dir, name, text))


def periods(sock_path, poll_s, until):
    """Step periods (s) observed while `until()` is false."""
    out = []
    t0, s0 = time.monotonic(), step(sock_path)
    while not until():
        time.sleep(poll_s)
        t1, s1 = time.monotonic(), step(sock_path)
        if s1 > s0:
            out.extend([(t1 - t0) / (s1 - s0)] * (s1 - s0))
            t0, s0 = t1, s1
    return out


def summary(ps):
    ps = sorted(ps)
    if not ps:
        return {"steps": 0}
    q = lambda f: round(ps[min(len(ps) - 1, int(f * len(ps)))] * 1e3, 3)
    return {"steps": len(ps), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": round(ps[-1] * 1e3, 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/mbtd")
    ap.add_argument("--mb", type=float, default=100.0, help="size of the arriving file")
    ap.add_argument("--window-s", type=float, default=20.0, help="baseline window")
    ap.add_argument("--warmup-s", type=float, default=15.0)
    ap.add_argument("--poll-ms", type=float, default=5.0)
    ap.add_argument("--files", type=int, default=3,
                    help="baseline window then one arriving file, this many times (pooled)")
    ap.add_argument("--nice", type=int, default=None,
                    help="ingest.nice for the daemon (default: the daemon's default)")
    ap.add_argument("--store-share-pct", type=int, default=None,
                    help="ingest.store_share_pct for the daemon (default: the daemon's default)")
    ap.add_argument("--keep", action="store_true", help="keep the data dir")
    a = ap.parse_args()

    d = tempfile.mkdtemp(prefix="mbtd-ingest-stall-")
    cfg = os.path.join(d, "bench.toml")
    with open(cfg, "w") as f:
        f.write(config_text(a.bin, a.nice, a.store_share_pct))
    cmd = [a.bin, "run", "--config", cfg, "--data-dir", d]
    with daemon(cmd, d, a.keep, f"{d}/daemon.log") as (sock, _):
        drop(d, "seed.csv", csv_rows("seed", 5000))
        while step(sock) < 20:
            time.sleep(0.2)
        time.sleep(a.warmup_s)

        big, n, target = [], 0, int(a.mb * (1 << 20))
        size = len("text\n")
        while size < target:
            line = f"large file row {n}: a sentence of ordinary length with words to tokenize\n"
            big.append(line)
            size += len(line)
            n += 1
        text = "text\n" + "".join(big)
        del big
        base, during, ingest_s, appended = [], [], [], 0
        for i in range(a.files):
            # Each file's rows differ, so none is deduplicated away.
            staged = stage(d, f"big{i}.csv", text.replace("large file row", f"file {i} row"))
            end = time.monotonic() + a.window_s
            base += periods(sock, a.poll_ms / 1e3, lambda: time.monotonic() >= end)
            done = os.path.join(d, "inbox", ".done", f"big{i}.csv.json")
            t = time.monotonic()
            arrive(d, staged)
            during += periods(sock, a.poll_ms / 1e3, lambda: os.path.exists(done))
            ingest_s.append(round(time.monotonic() - t, 3))
            with open(done) as f:
                appended += json.load(f).get("rows_appended") or 0

        b, g = summary(base), summary(during)
        print(json.dumps({
            "bench": "ingest_stall",
            "file_mb": round(size / (1 << 20), 1),
            "files": a.files,
            "nice": a.nice,
            "store_share_pct": a.store_share_pct,
            "file_rows": n,
            "rows_appended": appended,
            "ingest_s": ingest_s,
            "poll_ms": a.poll_ms,
            "baseline": b,
            "during_ingest": g,
            "p99_ratio": round(g["p99_ms"] / b["p99_ms"], 3) if b.get("p99_ms") and g.get("p99_ms") else None,
            "data_dir": d if a.keep else None,
        }))


if __name__ == "__main__":
    sys.exit(main())
