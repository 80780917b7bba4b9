#!/usr/bin/env python3
"""Growth benchmark: governor-driven expansion from K=2 vs. fixed width, on a 3-phase stream
of rising difficulty. Each run: fresh data dir, same seed, same max_steps, phase files dropped
at fixed trainer steps; at the end `ctl eval` twice (all control rows "old") and the numbers.

Usage: python3 bench/growth.py [--steps N] [--seeds 1,2] [--out bench/growth-raw.json]
"""
import argparse, json, os, random, shutil, subprocess, sys, tempfile, time

BIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "mbtd")

BASE = """
[ingest]
settle_ms = 50
rescan_ms = 200
[logging]
format = "json"
level = "warn"
[model]
vocab_size = 320
d_model = 32
n_heads = 2
n_layers = 2
branches = {branches}
max_seq_len = 32
[optim]
lr = 0.003
warmup_steps = 10
[tokenizer]
bootstrap_rows = 200
[training]
batch_size = 8
seq_len = 32
replay_share = 0.5
idle_steps_per_min = 60000
seed = {seed}
max_steps = {steps}
[eval]
every_steps = {every}
max_rows_per_group = 64
[replay]
control_fraction = 0.1
[checkpoints]
every_steps = 100000
every_seconds = 0
keep_last = 50
[metrics]
log_every_s = 1
[governor]
enabled = {enabled}
patience = 2
plateau_tolerance = 0.05
saturation_threshold = 0.5
ramp_steps = 30
probation_steps = 100
cooldown_steps = 200
min_gain = 0.0
max_regression = 0.05
max_branches_per_layer = 5
branches_per_expansion = 1
beta = 0.2
"""

LETTERS = "abcdefghij"


def phase_rows(phase, n, seed):
    r = random.Random(seed * 1000 + phase)
    rows = []
    for _ in range(n):
        if phase == 1:  # copy a short word
            w = "".join(r.choice(LETTERS) for _ in range(r.randint(3, 4)))
            rows.append((f"copy {w} is {w}", "p1_copy"))
        elif phase == 2:  # two-digit addition
            a, b = r.randint(10, 99), r.randint(10, 99)
            rows.append((f"{a} plus {b} is {a + b}", "p2_add"))
        else:  # multi-step: (a+b)*c - d, and reversal of longer words
            a, b, c, d = r.randint(1, 9), r.randint(1, 9), r.randint(2, 9), r.randint(1, 20)
            rows.append((f"{a} plus {b} times {c} minus {d} is {(a + b) * c - d}", "p3_multi"))
    return rows


def drop(data, name, rows):
    tmp = os.path.join(data, name + ".tmp")
    with open(tmp, "w") as f:
        f.write("text,source\n")
        for t, s in rows:
            f.write(f"\"{t}\",{s}\n")
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


def run(enabled, seed, steps, rows_per_phase, every, branches=2):
    data = tempfile.mkdtemp(prefix=f"growth-{'gov' if enabled else 'fix'}-{seed}-")
    os.makedirs(os.path.join(data, "inbox"))
    cfg = os.path.join(data, "bench.toml")
    with open(cfg, "w") as f:
        f.write(BASE.format(seed=seed, steps=steps, every=every, branches=branches,
                            enabled="true" if enabled else "false"))
    log = open(os.path.join(data, "daemon.log"), "w")
    p = subprocess.Popen([BIN, "run", "--config", cfg, "--data-dir", data], stdout=log, stderr=log)
    try:
        for _ in range(200):
            if os.path.exists(os.path.join(data, "mbtd.sock")):
                break
            time.sleep(0.1)
        t0 = time.time()
        drop(data, "phase1.csv", phase_rows(1, rows_per_phase, seed))
        bounds = [steps // 3, 2 * steps // 3]
        nxt, step, tps = 2, 0, []
        drop_steps = {1: 0}
        while step < steps:
            time.sleep(0.05)
            st = unwrap(ctl(data, "status"))
            step = (st.get("trainer") or {}).get("step") or 0
            if nxt <= 3 and step >= bounds[nxt - 2]:
                drop(data, f"phase{nxt}.csv", phase_rows(nxt, rows_per_phase, seed))
                drop_steps[nxt] = step
                nxt += 1
            m = unwrap(ctl(data, "metrics"))
            v = find_metric(m, "train_tokens_per_sec")
            if v and step > 0:
                tps.append(v)
            if os.environ.get("GROWTH_VERBOSE"):
                print("step", step, file=sys.stderr, flush=True)
            if time.time() - t0 > 600:
                raise RuntimeError("run took too long")
        wall = time.time() - t0
        # Governor probation may still hold a pending verdict; the run ends at max_steps anyway.
        ev1 = unwrap(ctl(data, "eval"))
        ev = unwrap(ctl(data, "eval"))
        st = unwrap(ctl(data, "status"))
        gov = unwrap(ctl(data, "governor"))
        m = unwrap(ctl(data, "metrics"))
        kept = sum(l.get("kept", 0) for l in gov.get("layers", []))
        rolled = sum(l.get("rolled_back", 0) for l in gov.get("layers", []))
        res = dict(
            run=(f"governor from K={branches}" if enabled else f"fixed K={branches}"), seed=seed, steps=st["trainer"]["step"],
            drop_steps=drop_steps, loss_control_old=ev.get("loss_control_old"),
            per_source=ev.get("per_source"), widths=st["trainer"].get("widths"),
            params=st["trainer"].get("params"), expansions_total=gov.get("expansions_total"),
            kept=kept, rolled_back=rolled,
            in_progress=bool(gov.get("in_progress")),
            expansion_events_total=find_metric(m, "expansion_events_total"),
            rollbacks_total=find_metric(m, "rollbacks_total"),
            tokens_per_sec_mean=(sum(tps) / len(tps) if tps else None), wall_s=wall,
            history=gov.get("history"), data_dir=data)
        return res
    finally:
        try:
            ctl(data, "shutdown")
            p.wait(timeout=60)
        except Exception:
            p.terminate()
            p.wait(timeout=30)
        log.close()


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--out", default="bench/growth-raw.json")
    a = ap.parse_args()
    results = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        # fixed K=2, governor from K=2, and fixed K=4 (same parameter count as widths [3,5]).
        for enabled, k in ((False, 2), (True, 2), (False, 4)):
            r = run(enabled, seed, a.steps, a.rows, a.every, k)
            print(json.dumps({k: v for k, v in r.items() if k != "history"}), flush=True)
            results.append(r)
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
