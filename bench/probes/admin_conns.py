#!/usr/bin/env python3
"""1,100 idle admin connections against BIN: does ping answer, is a file ingested?"""
import os, resource, socket, subprocess, sys, tempfile, time
binary = sys.argv[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
t = tempfile.mkdtemp(); d = os.path.join(t, "data"); os.makedirs(d)
cfg = subprocess.run([binary, "config", "small", "--set", "tokenizer.bootstrap_rows=20"], capture_output=True, text=True, check=True).stdout
open(os.path.join(t, "cfg.toml"), "w").write(cfg)
ctl = [binary, "ctl", "--config", os.path.join(t, "cfg.toml"), "--data-dir", d]
p = subprocess.Popen([binary, "run", "--config", os.path.join(t, "cfg.toml"), "--data-dir", d], stdout=open(os.path.join(t, "log"), "w"), stderr=subprocess.STDOUT)
for _ in range(100):
    if subprocess.run(ctl + ["ping"], capture_output=True).returncode == 0: break
    time.sleep(0.2)
subprocess.run(["prlimit", "--pid", str(p.pid), "--nofile=1024:1024"], check=True)
sock = [f for f in os.listdir(d) if f.endswith(".sock")][0]
conns = []
for i in range(1100):
    s = socket.socket(socket.AF_UNIX); s.connect(os.path.join(d, sock)); conns.append(s)
print("1100 connections open; daemon fds:", len(os.listdir(f"/proc/{p.pid}/fd")))
r = subprocess.run(["timeout", "20"] + ctl + ["ping"], capture_output=True, text=True)
print("ctl ping rc:", r.returncode, "(124 = no answer in 20 s)", (r.stdout + r.stderr).strip()[:200])
rows = "text\n" + "".join(f'"line {i} of the file"\n' for i in range(40))
open(os.path.join(d, "a.tmp"), "w").write(rows); os.rename(os.path.join(d, "a.tmp"), os.path.join(d, "inbox", "a.csv"))
time.sleep(20)
done = os.path.join(d, "inbox", ".done")
print("sidecar after 20 s:", os.path.exists(done) and any(f.startswith("a.csv") for f in os.listdir(done)))
log = open(os.path.join(t, "log")).read()
print("log lines with 'accept':", sum('accept' in l for l in log.splitlines()), "| EMFILE/Too many open files:", sum('Too many open files' in l for l in log.splitlines()))
p.terminate(); p.wait(timeout=60)
