#!/usr/bin/env python3
"""Growth benchmark: governor-driven expansion from K=2 vs. fixed width on a stream whose
difficulty rises, where capacity matters.

The stream: three phases of a fixed key -> value lookup table (random 3-letter keys, random
4-letter values, the mapping fixed for the run), with 64, 256 and 512 keys. Rows are
prompt/response pairs (loss on the value and the end token only, so the loss is learnable
down to ~0 and differences are memorisation capacity, not irreducible noise). Each fact is
asked with one of 8 wordings, so the content-hash control slice holds rows whose facts also
occur in training. Each phase arrives as several files spread over its steps, so new-era
control rows keep appearing. Every run: fresh data dir, the same file schedule by trainer
step, training stops at --steps; then `ctl eval` twice (all control rows "old") and the
numbers. By default every run gets the same stream (tables and rows from --data-seed 1) and
the seeds vary training (initialisation, sampling); `--data-seed same` draws the stream from
each run's seed instead (other tables and other control rows per seed).

Usage: python3 bench/growth.py [--steps N] [--seeds 1,2,3] [--data-seed 1|same]
                               [--out bench/growth-raw.json]
(the reported runs: `nice -n 19 python3 bench/growth.py`, all defaults, and
`nice -n 19 python3 bench/growth.py --data-seed same --out bench/growth-raw-dataseeds.json`).
"""
import argparse, json, os, random, statistics, subprocess, sys, tempfile, time

BIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "mbtd")

# The tests' small configuration (`mbtd config small`) with this benchmark's overrides.
OVERRIDES = [
    "logging.format=\"json\"", "optim.lr=0.003", "optim.warmup_steps=10",
    "tokenizer.bootstrap_rows=200", "training.replay_share=0.5",
    "eval.max_rows_per_group=64", "replay.control_fraction=0.1", "checkpoints.keep_last=50",
    "governor.patience=2", "governor.plateau_tolerance=0.05",
    "governor.saturation_threshold=0.5", "governor.ramp_steps=30",
    "governor.probation_steps=100", "governor.cooldown_steps=200", "governor.min_gain=0.0",
    "governor.max_regression=0.5", "governor.max_branches_per_layer=5",
    "governor.branches_per_expansion=1", "governor.beta=0.2",
]


def config_text(enabled, seed, steps, every, branches):
    """The TOML of one run: `mbtd config small` with the overrides above and the run's own."""
    sets = OVERRIDES + [f"model.branches={branches}", f"training.seed={seed}",
                        f"training.max_steps={steps}", f"eval.every_steps={every}",
                        f"governor.enabled={'true' if enabled else 'false'}"]
    args = [BIN, "config", "small"] + [a for kv in sets for a in ("--set", kv)]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDINGS = ["what is {k}?", "{k} means", "look up {k}:", "define {k}", "{k} =",
            "tell me {k}", "the value of {k}", "{k} ->"]
TABLE_SIZES = (64, 256, 512)


def table(n, seed):
    """`n` facts: distinct random 3-letter keys, each with a random 4-letter value."""
    r = random.Random(seed)
    keys = set()
    while len(keys) < n:
        keys.add("".join(r.choice(LETTERS) for _ in range(3)))
    keys = sorted(keys)
    r.shuffle(keys)
    return [(k, "".join(r.choice(LETTERS) for _ in range(4))) for k in keys]


def schedule(seed, steps, files, rows):
    """(trainer step, file name, rows) for every file of the stream, in drop order."""
    phase_len = steps // len(TABLE_SIZES)
    out = []
    for p, n in enumerate(TABLE_SIZES):
        facts = table(n, seed * 100 + p)
        src = f"p{p + 1}_{n}keys"
        for f in range(files):
            r = random.Random(seed * 10000 + p * 100 + f)
            body = []
            for _ in range(rows):
                k, v = r.choice(facts)
                body.append((r.choice(WORDINGS).format(k=k), v, src))
            out.append((p * phase_len + f * phase_len // files, f"p{p + 1}_{f}.csv", body))
    return out


def drop(data, name, rows):
    tmp = os.path.join(data, name + ".tmp")
    with open(tmp, "w") as f:
        f.write("prompt,response,source\n")
        for p, v, s in rows:
            f.write(f"\"{p}\",\"{v}\",{s}\n")
    os.rename(tmp, os.path.join(data, "inbox", name))


def ctl(data, *args):
    out = subprocess.run([BIN, "ctl", "--data-dir", data, "--json", *args],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"ctl {args}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def unwrap(v):
    # `status` carries its sections as [name, object] pairs: make them keys.
    if isinstance(v, dict) and isinstance(v.get("sections"), list):
        v = dict(v)
        v.update({k: x for k, x in v["sections"]})
    return v


def find_metric(m, name):
    """Finds a metric by name in whatever shape `ctl metrics --json` returns."""
    if isinstance(m, dict):
        if name in m and isinstance(m[name], (int, float)):
            return m[name]
        for k, v in m.items():
            if k == name and isinstance(v, dict) and "value" in v:
                return v["value"]
            r = find_metric(v, name)
            if r is not None:
                return r
    elif isinstance(m, list):
        for x in m:
            if isinstance(x, dict) and x.get("name") == name and "value" in x:
                return x["value"]
            r = find_metric(x, name)
            if r is not None:
                return r
    return None


def decisions(data):
    """The governor's expand / keep / rollback decisions from the daemon log, compacted."""
    out = []
    with open(os.path.join(data, "daemon.log")) as f:
        for line in f:
            if '"governor_decision"' not in line:
                continue
            d = json.loads(json.loads(line)["detail"])
            kind = d["decision"]
            if kind == "expand":
                p = d["basis"]["plateau"]
                out.append(dict(step=d["step"], decision=kind, layer=d["layer"],
                                metric=p["metric"], window=p["window"],
                                saturation=[l["saturation"] for l in d["basis"]["layers"]]))
            elif kind in ("keep", "rollback"):
                j = d["judgement"]
                out.append(dict(step=d["step"], decision=kind, layer=d["layer"],
                                metric=j["metric"], gain=j["gain"], regression=j["regression"],
                                sources=j["sources"]))
    return out


def run(enabled, seed, data_seed, steps, files, rows, every, branches):
    label = f"governor from K={branches}" if enabled else f"fixed K={branches}"
    data = tempfile.mkdtemp(prefix=f"growth-{'gov' if enabled else 'fix'}{branches}-{seed}-")
    os.makedirs(os.path.join(data, "inbox"))
    cfg = os.path.join(data, "bench.toml")
    with open(cfg, "w") as f:
        f.write(config_text(enabled, seed, steps, every, branches))
    log = open(os.path.join(data, "daemon.log"), "w")
    p = subprocess.Popen([BIN, "run", "--config", cfg, "--data-dir", data], stdout=log, stderr=log)
    try:
        for _ in range(200):
            if os.path.exists(os.path.join(data, "mbtd.sock")):
                break
            time.sleep(0.1)
        t0 = time.time()
        todo = schedule(data_seed, steps, files, rows)
        step, tps, dropped = 0, [], []
        while step < steps:
            while todo and step >= todo[0][0]:
                _, name, body = todo.pop(0)
                drop(data, name, body)
                dropped.append((name, step))
            time.sleep(0.05)
            st = unwrap(ctl(data, "status"))
            step = (st.get("trainer") or {}).get("step") or 0
            v = find_metric(unwrap(ctl(data, "metrics")), "train_tokens_per_sec")
            if v and step > 0:
                tps.append(v)
            if time.time() - t0 > 900:
                raise RuntimeError(f"{label} seed {seed}: run took too long")
        wall = time.time() - t0
        # Two evals: after the second every control row is "old" (one comparable number).
        ctl(data, "eval")
        ev = unwrap(ctl(data, "eval"))
        st = unwrap(ctl(data, "status"))
        gov = unwrap(ctl(data, "governor"))
        layers = gov.get("layers") or []
        return dict(
            run=label, seed=seed, data_seed=data_seed, steps=st["trainer"]["step"],
            drops=dropped,
            loss_control=ev.get("loss_control_old"),
            per_source={k.split("/")[0]: v for k, v in (ev.get("per_source") or {}).items()},
            widths=st["trainer"].get("widths"), params=st["trainer"].get("params"),
            expansions_total=gov.get("expansions_total"),
            kept=sum(l.get("kept", 0) for l in layers),
            rolled_back=sum(l.get("rolled_back", 0) for l in layers),
            in_progress_at_end=bool(gov.get("in_progress")),
            tokens_per_sec_mean=(sum(tps) / len(tps) if tps else None), wall_s=wall,
            decisions=decisions(data), data_dir=data)
    finally:
        try:
            ctl(data, "shutdown")
            p.wait(timeout=60)
        except Exception:
            p.terminate()
            p.wait(timeout=30)
        log.close()


def summary(results):
    """Per configuration: mean, sample std and range over seeds of the headline numbers."""
    out = {}
    for label in dict.fromkeys(r["run"] for r in results):
        rs = [r for r in results if r["run"] == label]
        col = lambda f: [f(r) for r in rs]
        stat = lambda xs: dict(mean=statistics.mean(xs), min=min(xs), max=max(xs),
                               std=statistics.stdev(xs) if len(xs) > 1 else 0.0)
        sources = sorted({s for r in rs for s in r["per_source"]})
        out[label] = dict(
            seeds=len(rs), loss_control=stat(col(lambda r: r["loss_control"])),
            per_source={s: statistics.mean(r["per_source"][s] for r in rs) for s in sources},
            params=stat(col(lambda r: r["params"])), kept=stat(col(lambda r: r["kept"])),
            rolled_back=stat(col(lambda r: r["rolled_back"])),
            tokens_per_sec=stat(col(lambda r: r["tokens_per_sec_mean"])),
            wall_s=stat(col(lambda r: r["wall_s"])),
            widths=col(lambda r: r["widths"]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4500)
    ap.add_argument("--seeds", default="1,2,3", help="training seeds")
    ap.add_argument("--data-seed", default="1",
                    help="seed of the stream, or 'same': each run's training seed")
    ap.add_argument("--files", type=int, default=6, help="files per phase")
    ap.add_argument("--rows", type=int, default=600, help="rows per file")
    ap.add_argument("--every", type=int, default=50, help="eval.every_steps")
    ap.add_argument("--out", default="bench/growth-raw.json")
    a = ap.parse_args()
    results = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = os.getloadavg()
    for seed in [int(s) for s in a.seeds.split(",")]:
        # Interleaved per seed, so that the three share the machine's load alike.
        for enabled, k in ((False, 2), (True, 2), (False, 4)):
            ds = seed if a.data_seed == "same" else int(a.data_seed)
            r = run(enabled, seed, ds, a.steps, a.files, a.rows, a.every, k)
            print(json.dumps({k: v for k, v in r.items() if k not in ("decisions", "drops")}),
                  flush=True)
            results.append(r)
    doc = dict(started_utc=started, finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               loadavg_before=load_before, loadavg_after=os.getloadavg(), args=vars(a),
               config=["mbtd config small"] + OVERRIDES, summary=summary(results), runs=results)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    for label, s in doc["summary"].items():
        l = s["loss_control"]
        print(f"{label:22s} loss {l['mean']:.4f} ± {l['std']:.4f} (range {l['min']:.4f}–{l['max']:.4f})"
              f"  params {s['params']['mean']:.0f}  kept/rolled {s['kept']['mean']:.1f}/"
              f"{s['rolled_back']['mean']:.1f}  tok/s {s['tokens_per_sec']['mean']:.0f}"
              f"  wall {s['wall_s']['mean']:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
