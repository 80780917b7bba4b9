#!/usr/bin/env python3
"""Learned vs rotary positions: control loss of the real daemon after a fixed number of
steps on Debian's fortunes (`apt-get install -y fortunes`).

The corpus: one `text` row per fortune of /usr/share/games/fortunes/* (entries separated by
`%` lines; the `.dat` index files and the `.u8` copies skipped), written to one CSV and
dropped into the inbox at the start. Each run: fresh data dir, `mbtd config small` with the
overrides below and `model.positions`, training stops at --steps; then `ctl eval` twice
(after the second every control row is "old": one comparable number). Loss at a fixed step
budget does not depend on the machine's speed or load.

Usage: python3 bench/positions.py [--steps 400] [--seeds 1,2] [--out bench/positions-raw.json]
(needs `cargo build`; uses target/debug/mbtd, whose profile is optimised, unless --bin).
"""
import argparse, csv, glob, json, os, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from growth import unwrap  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

OVERRIDES = [
    "logging.format=\"json\"", "model.d_model=64", "model.n_heads=2", "model.n_layers=2",
    "model.branches=3", "model.max_seq_len=64", "model.vocab_size=512",
    "training.seq_len=64", "training.batch_size=8", "optim.lr=0.003",
    "optim.warmup_steps=20", "tokenizer.bootstrap_rows=2000", "replay.control_fraction=0.05",
    "eval.every_steps=1000000", "eval.max_rows_per_group=256", "governor.enabled=false",
]


def fortunes():
    """Every fortune, in file order, whitespace at the ends stripped, empty ones skipped."""
    out = []
    for path in sorted(glob.glob("/usr/share/games/fortunes/*")):
        if path.endswith((".dat", ".u8")) or os.path.isdir(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            entry = []
            for line in f:
                if line.rstrip("\n") == "%":
                    text = "".join(entry).strip().replace("\0", "")
                    if text:
                        out.append(text)
                    entry = []
                else:
                    entry.append(line)
            text = "".join(entry).strip().replace("\0", "")
            if text:
                out.append(text)
    return out


def ctl(binary, data, *args):
    out = subprocess.run([binary, "ctl", "--data-dir", data, "--json", *args],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"ctl {args}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def run(binary, positions, seed, steps, corpus):
    data = tempfile.mkdtemp(prefix=f"positions-{positions}-{seed}-")
    os.makedirs(os.path.join(data, "inbox"))
    sets = OVERRIDES + [f"model.positions=\"{positions}\"", f"training.seed={seed}",
                        f"training.max_steps={steps}"]
    args = [binary, "config", "small"] + [a for kv in sets for a in ("--set", kv)]
    cfg = os.path.join(data, "bench.toml")
    with open(cfg, "w") as f:
        f.write(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    log = open(os.path.join(data, "daemon.log"), "w")
    p = subprocess.Popen([binary, "run", "--config", cfg, "--data-dir", data],
                         stdout=log, stderr=log)
    try:
        for _ in range(300):
            if os.path.exists(os.path.join(data, "mbtd.sock")):
                break
            time.sleep(0.1)
        tmp = os.path.join(data, "fortunes.csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text"])
            w.writerows([t] for t in corpus)
        os.rename(tmp, os.path.join(data, "inbox", "fortunes.csv"))
        t0, step = time.time(), 0
        while step < steps:
            time.sleep(0.5)
            st = unwrap(ctl(binary, data, "status"))
            step = (st.get("trainer") or {}).get("step") or 0
            if time.time() - t0 > 1800:
                raise RuntimeError(f"{positions} seed {seed}: run took too long")
        ctl(binary, data, "eval")
        ev = unwrap(ctl(binary, data, "eval"))
        st = unwrap(ctl(binary, data, "status"))
        return dict(positions=positions, seed=seed, steps=st["trainer"]["step"],
                    loss_control=ev.get("loss_control_old"),
                    params=st["trainer"].get("params"), wall_s=time.time() - t0,
                    data_dir=data)
    finally:
        try:
            ctl(binary, data, "shutdown")
            p.wait(timeout=120)
        except Exception:
            p.terminate()
            p.wait(timeout=60)
        log.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "mbtd"))
    ap.add_argument("--out", default="bench/positions-raw.json")
    a = ap.parse_args()
    corpus = fortunes()
    print(f"{len(corpus)} fortunes", file=sys.stderr)
    results = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for positions in ("learned", "rope"):
            r = run(a.bin, positions, seed, a.steps, corpus)
            print(json.dumps(r), flush=True)
            results.append(r)
    summary = {}
    for positions in ("learned", "rope"):
        xs = [r["loss_control"] for r in results if r["positions"] == positions]
        summary[positions] = dict(mean=statistics.mean(xs), per_seed=xs)
    with open(a.out, "w") as f:
        json.dump(dict(args=vars(a), rows=len(corpus), config=["mbtd config small"] + OVERRIDES,
                       summary=summary, runs=results), f, indent=1)
    for k, s in summary.items():
        print(f"{k:8s} control loss {s['mean']:.4f} per seed {s['per_seed']}", file=sys.stderr)


if __name__ == "__main__":
    main()
