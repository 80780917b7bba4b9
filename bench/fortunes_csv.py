#!/usr/bin/env python3
"""Builds a CSV with one row per fortune from Debian's `fortunes` corpus.

Reads every fortune file of `--dir` (default /usr/share/games/fortunes; install it with
`apt-get install -y fortunes`), skipping the `.dat` index files and the `.u8` links (they
point at the plain files), and writes `text,source` rows: the fortune (entries are
separated by a line holding only `%`; line breaks inside a fortune are kept, trailing
blank lines dropped) and its file name as the source. Empty entries are skipped. The
order is the files' sorted order, then the entries' order in each file, so the output is
the same on every run.

Usage:

    python3 bench/fortunes_csv.py [--dir /usr/share/games/fortunes] --out fortunes.csv

Prints one JSON line: rows, files, mean and max characters per row.
"""

import argparse
import csv
import json
import os
import sys


def entries(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        cur = []
        for line in f:
            if line.rstrip("\r\n") == "%":
                yield "".join(cur)
                cur = []
            else:
                cur.append(line)
        yield "".join(cur)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/usr/share/games/fortunes")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    names = sorted(
        n
        for n in os.listdir(a.dir)
        if not n.endswith((".dat", ".u8"))
        and not os.path.islink(os.path.join(a.dir, n))
        and os.path.isfile(os.path.join(a.dir, n))
    )
    if not names:
        sys.exit(f"no fortune files in {a.dir}: install them with `apt-get install -y fortunes`")
    rows, lens = 0, []
    tmp = a.out + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "source"])
        for n in names:
            for e in entries(os.path.join(a.dir, n)):
                text = e.rstrip()
                if not text.strip():
                    continue
                w.writerow([text, n])
                rows += 1
                lens.append(len(text))
    os.replace(tmp, a.out)
    print(json.dumps({
        "out": a.out,
        "files": len(names),
        "rows": rows,
        "chars_mean": round(sum(lens) / max(1, rows), 1),
        "chars_max": max(lens, default=0),
    }))


if __name__ == "__main__":
    main()
