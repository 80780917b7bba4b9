#!/bin/bash
# Usage: retention.sh BIN RESTARTS — restart the daemon RESTARTS times with training between, count checkpoints.
BIN=$1; N=${2:-8}; T=$(mktemp -d); D=$T/data; mkdir -p $D
$BIN config small --set checkpoints.every_steps=1000000 --set checkpoints.keep_last=2 --set checkpoints.keep_daily=0 > $T/cfg.toml || exit 1
for r in $(seq $N); do
  $BIN run --config $T/cfg.toml --data-dir $D >> $T/log 2>&1 &
  PID=$!
  for i in $(seq 100); do $BIN ctl --config $T/cfg.toml --data-dir $D ping >/dev/null 2>&1 && break; sleep 0.2; done
  if [ $r = 1 ]; then { echo "prompt,response,source"; for i in $(seq 300); do echo "question $i about things,answer $i is here,a"; done; } > $D/inbox/a.csv.tmp && mv $D/inbox/a.csv.tmp $D/inbox/a.csv; fi
  sleep 3
  if [ $r = 4 ]; then $BIN ctl --config $T/cfg.toml --data-dir $D expand --layer 0 --branches 1 --noise=-1 2>&1 | head -2 | cut -c1-200; fi
  $BIN ctl --config $T/cfg.toml --data-dir $D shutdown >/dev/null 2>&1 || kill -TERM $PID; wait $PID
  echo "restart $r: $(ls $D/checkpoints | grep -v LATEST | wc -l) checkpoints, $(du -sk $D/checkpoints | cut -f1) KiB"
done
$BIN ctl --help >/dev/null 2>&1
$BIN inspect checkpoints --data-dir $D 2>/dev/null | head -20 || ls $D/checkpoints
rm -rf $T
