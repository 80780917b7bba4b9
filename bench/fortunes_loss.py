#!/usr/bin/env python3
"""Control loss of the real daemon after a fixed number of steps on Debian's fortunes
(`apt-get install -y fortunes`), for each value of one configuration key (`--vary`):
learned vs rotary positions (the default), f32 vs bf16 products, ...

The corpus: one `text` row per fortune of /usr/share/games/fortunes/* (entries separated by
`%` lines; the `.dat` index files and the `.u8` copies skipped), written to one CSV and
dropped into the inbox at the start. Each run: fresh data dir, `mbtd config small` with the
overrides below (and `--set` ones) and the varied key, training stops at --steps; then `ctl eval` twice
(after the second every control row is "old": one comparable number). Loss at a fixed step
budget does not depend on the machine's speed or load.

Usage: python3 bench/fortunes_loss.py [--vary model.positions=learned,rope] [--steps 400]
           [--seeds 1,2] [--set model.d_model=128 ...] [--out bench/positions-raw.json]
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


def fortunes(names=None):
    """Every fortune (of the files `names`, default all), in file order, whitespace at the
    ends stripped, empty ones skipped."""
    out = []
    for path in sorted(glob.glob("/usr/share/games/fortunes/*")):
        if path.endswith((".dat", ".u8")) or os.path.isdir(path):
            continue
        if names is not None and os.path.basename(path) not in names:
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


def run(binary, overrides, key, value, seed, steps, corpus):
    data = tempfile.mkdtemp(prefix=f"fortunes-loss-{value}-{seed}-")
    os.makedirs(os.path.join(data, "inbox"))
    sets = overrides + [f"{key}=\"{value}\"", f"training.seed={seed}",
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
                raise RuntimeError(f"{key}={value} seed {seed}: run took too long")
        ctl(binary, data, "eval")
        ev = unwrap(ctl(binary, data, "eval"))
        st = unwrap(ctl(binary, data, "status"))
        return dict(value=value, seed=seed, steps=st["trainer"]["step"],
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
    ap.add_argument("--vary", default="model.positions=learned,rope",
                    help="KEY=V1,V2,...: one run per value and seed")
    ap.add_argument("--set", action="append", default=[],
                    help="KEY=VALUE added to the overrides (repeatable)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "mbtd"))
    ap.add_argument("--out", default="bench/positions-raw.json")
    a = ap.parse_args()
    key, values = a.vary.split("=", 1)
    values = values.split(",")
    overrides = OVERRIDES + a.set
    corpus = fortunes()
    print(f"{len(corpus)} fortunes", file=sys.stderr)
    results = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for value in values:
            r = run(a.bin, overrides, key, value, seed, a.steps, corpus)
            print(json.dumps(r), flush=True)
            results.append(r)
    summary = {}
    for value in values:
        xs = [r["loss_control"] for r in results if r["value"] == value]
        summary[value] = dict(mean=statistics.mean(xs), per_seed=xs)
    with open(a.out, "w") as f:
        json.dump(dict(args=vars(a), rows=len(corpus), config=["mbtd config small"] + overrides,
                       summary=summary, runs=results), f, indent=1)
    for k, s in summary.items():
        print(f"{key}={k}: control loss {s['mean']:.4f} per seed {s['per_seed']}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
