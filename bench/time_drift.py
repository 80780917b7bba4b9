#!/usr/bin/env python3
"""The drift experiment of issue 20: do facts that change at a date stay apart with Time2Vec?

A fact table of `--entities` made-up countries, each with a made-up capital in era 1 and a
different one in era 2. Every fact is written as `len(TEMPLATES)` prompt/response rows
(`source` = `era1` / `era2`, `time` = a date in 2020 / in 2024). For each seed and each
`--embedding` (`none`, `time2vec`), this script starts the real daemon (`BIN run`) on a fresh
data dir with a small model, renames the era-1 file into its inbox, lets it train until step
`--era-steps`, renames the era-2 file in (time order: the new era arrives later), trains
until step `2 · --era-steps` (a fixed budget: new rows once each, then replay of both eras),
pauses, and then:

- asks every entity's question (`capital of X?`, as an instruction, greedy) once as of
  2020-06-01 and once as of 2024-06-01 (`generate --as-of`), and counts exact answers per
  era;
- runs `eval`: the held-out control rows (`replay.control_fraction`: the phrasings of a
  fact never trained on, scored at their own row's time) give the loss on era-1 facts
  after era 2 arrived (`loss_old_era`) and on era-2 facts (`loss_new_era`).

Without a time embedding `--as-of` changes nothing, so a model can answer each question
right in one era at most. Prints one JSON line per run, then a summary per embedding
(mean over seeds). Usage:

    cargo build --release
    python3 bench/time_drift.py --bin target/release/mbtd --seeds 1 2 --era-steps 1500
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time

from admin_socket import request, stop, wait_ready

TEMPLATES = [
    "capital of {x}?",
    "What is the capital of {x}?",
    "{x}: which city is the capital?",
    "Name the capital city of {x}.",
    "The seat of government of {x} is where?",
    "Tell me the capital of {x}.",
]
ASK = 0
ERA_TIME = {"era1": "2020-03-01T00:00:00Z", "era2": "2024-03-01T00:00:00Z"}
AS_OF = {"era1": "2020-06-01T00:00:00Z", "era2": "2024-06-01T00:00:00Z"}


def word(rng, syllables):
    cons, vows = "bdfgklmnprstvz", "aeiou"
    return "".join(rng.choice(cons) + rng.choice(vows) for _ in range(syllables)).capitalize()


def facts(n):
    """`n` (entity, era-1 capital, era-2 capital), all distinct, fixed for every run."""
    rng = random.Random(20)
    seen, out = set(), []
    while len(out) < n:
        e, a, b = word(rng, 3), word(rng, 2), word(rng, 2)
        if len({e, a, b} | seen) == len(seen) + 3:
            seen |= {e, a, b}
            out.append((e, a, b))
    return out


def era_csv(path, table, era):
    with open(path, "w") as f:
        f.write("prompt,response,source,time\n")
        for e, a, b in table:
            for t in TEMPLATES:
                f.write(f'"{t.format(x=e)}","{a if era == "era1" else b}",{era},{ERA_TIME[era]}\n')


def config(a, seed, embedding):
    return f"""[ingest]
settle_ms = 50
rescan_ms = 200

[replay]
control_fraction = {a.control_fraction}

[model]
vocab_size = 512
d_model = {a.d_model}
n_heads = 4
n_layers = 2
branches = 2
max_seq_len = 32
time_embedding = "{embedding}"
time_features = {a.time_features}

[optim]
lr = {a.lr}
warmup_steps = 50

[tokenizer]
bootstrap_rows = {a.entities * len(TEMPLATES) // 2}

[training]
batch_size = 8
seq_len = 32
seed = {seed}
idle_steps_per_min = 60000

[eval]
every_steps = 1000000

[checkpoints]
every_steps = 1000000
every_seconds = 0
"""


def step(sock):
    for name, section in request(sock, "status")["data"].get("sections", []):
        if name == "trainer":
            return int(section.get("step") or 0)
    return 0


def wait_step(sock, proc, n, what):
    while step(sock) < n:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited; see {what}")
        time.sleep(0.05)


def drop(d, src):
    staging = os.path.join(d, os.path.basename(src) + ".part")
    shutil.copyfile(src, staging)
    os.rename(staging, os.path.join(d, "inbox", os.path.basename(src)))


def one_run(a, seed, embedding, table, files):
    d = tempfile.mkdtemp(prefix=f"mbtd-drift-{embedding}-")
    cfg = os.path.join(d, "drift.toml")
    with open(cfg, "w") as f:
        f.write(config(a, seed, embedding))
    log = open(os.path.join(d, "daemon.log"), "w")
    proc = subprocess.Popen([a.bin, "run", "--config", cfg, "--data-dir", d], stdout=log, stderr=log)
    sock = os.path.join(d, "mbtd.sock")
    t0 = time.monotonic()
    try:
        wait_ready(sock, proc, f"{d}/daemon.log")
        drop(d, files["era1"])
        wait_step(sock, proc, a.era_steps, f"{d}/daemon.log")
        drop(d, files["era2"])
        wait_step(sock, proc, 2 * a.era_steps, f"{d}/daemon.log")
        request(sock, "pause")
        steps = step(sock)
        right = {"era1": 0, "era2": 0}
        answers = []
        for e, a1, a2 in table:
            got = {}
            for era, want in (("era1", a1), ("era2", a2)):
                r = request(sock, "generate", {
                    "prompt": TEMPLATES[ASK].format(x=e), "respond": True, "temperature": 0,
                    "max_tokens": 8, "as_of": AS_OF[era]}, timeout=60)
                got[era] = r["data"]["text"].strip()
                right[era] += got[era] == want
            answers.append([e, a1, a2, got["era1"], got["era2"]])
        ev = request(sock, "eval", timeout=120)["data"]
        loss = {}
        for era in ("era1", "era2"):
            gs = [g for g in ev["groups"] if g["source"] == era]
            tok = sum(g["tokens"] for g in gs)
            loss[era] = sum(g["loss"] * g["tokens"] for g in gs) / tok if tok else None
        n = len(table)
        return {
            "embedding": embedding,
            "seed": seed,
            "steps": steps,
            "right_era1": right["era1"],
            "right_era2": right["era2"],
            "accuracy_era1": round(right["era1"] / n, 3),
            "accuracy_era2": round(right["era2"] / n, 3),
            "both_eras_right": sum(x[3] == x[1] and x[4] == x[2] for x in answers),
            "loss_old_era": loss["era1"] and round(loss["era1"], 4),
            "loss_new_era": loss["era2"] and round(loss["era2"], 4),
            "wall_s": round(time.monotonic() - t0, 1),
            "answers": answers if a.verbose else None,
        }
    finally:
        stop(sock, proc)
        log.close()
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/mbtd")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--embedding", action="append", help="none and/or time2vec (default both)")
    ap.add_argument("--entities", type=int, default=30)
    ap.add_argument("--era-steps", type=int, default=1500)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--time-features", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--control-fraction", type=float, default=0.15)
    ap.add_argument("--keep", action="store_true", help="keep the data dirs")
    ap.add_argument("--verbose", action="store_true", help="list every answer")
    a = ap.parse_args()
    table = facts(a.entities)
    work = tempfile.mkdtemp(prefix="mbtd-drift-data-")
    files = {era: os.path.join(work, f"{era}.csv") for era in ("era1", "era2")}
    for era, path in files.items():
        era_csv(path, table, era)
    runs = []
    for seed in a.seeds:
        for emb in a.embedding or ["none", "time2vec"]:
            r = one_run(a, seed, emb, table, files)
            print(json.dumps(r), flush=True)
            runs.append(r)
    mean = lambda rs, k: round(statistics.mean(r[k] for r in rs), 4) if all(r[k] is not None for r in rs) else None
    summary = {}
    for emb in sorted({r["embedding"] for r in runs}):
        rs = [r for r in runs if r["embedding"] == emb]
        summary[emb] = {k: mean(rs, k) for k in (
            "accuracy_era1", "accuracy_era2", "both_eras_right", "loss_old_era", "loss_new_era")}
        summary[emb]["seeds"] = [r["seed"] for r in rs]
    print(json.dumps({"bench": "time_drift", "entities": a.entities, "rows_per_era":
                      a.entities * len(TEMPLATES), "era_steps": a.era_steps,
                      "d_model": a.d_model, "time_features": a.time_features, "lr": a.lr,
                      "summary": summary}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
