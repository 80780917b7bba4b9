#!/bin/bash
# Usage: disk_full.sh BIN — checkpoints+replay on a 4 MiB tmpfs, fill it during training, watch 60 s.
BIN=$1; T=$(mktemp -d); D=$T/data; M=$T/disk; mkdir -p $D $M
mount -t tmpfs -o size=4m,mode=0700 tmpfs $M
$BIN config small --set "paths.checkpoints=\"$M/checkpoints\"" --set "paths.replay=\"$M/replay\"" \
  --set checkpoints.every_steps=20 --set checkpoints.keep_last=2 --set checkpoints.keep_daily=0 $EXTRA > $T/cfg.toml || exit 1
$BIN run --config $T/cfg.toml --data-dir $D > $T/log 2>&1 &
PID=$!
for i in $(seq 100); do $BIN ctl --config $T/cfg.toml --data-dir $D ping >/dev/null 2>&1 && break; sleep 0.2; done
ls $D
{ echo "prompt,response,source"; for i in $(seq 300); do echo "question $i about things,answer $i is here,a"; done; } > $D/inbox/a.csv.tmp && mv $D/inbox/a.csv.tmp $D/inbox/a.csv
for i in $(seq 100); do ls $M/checkpoints 2>/dev/null | grep -q . && break; sleep 0.3; done
echo "checkpoints before fill: $(ls $M/checkpoints | tr '\n' ' ')"
while dd if=/dev/zero bs=16k count=1 oflag=append conv=notrunc,fsync of=$M/.filler 2>/dev/null; do :; done
echo "disk filled at $(date +%T)"; df -h $M | tail -1
for s in $(seq 0 5 60); do
  if kill -0 $PID 2>/dev/null; then echo "t=${s}s alive; $($BIN ctl --config $T/cfg.toml --data-dir $D status 2>&1 | grep -iE '^ +(step|state|last_written|last_error|blocked) ' | cut -c1-90 | tr '\n' '|')"; else wait $PID; echo "t=${s}s daemon EXITED rc=$?"; break; fi
  sleep 5
done
echo "--- log lines mentioning checkpoint errors/restarts (count):"
grep -v metrics_snapshot $T/log | grep -i "checkpoint\|restart\|panic" | grep -i "error\|fail\|crash\|panic\|restart" | head -5 | cut -c1-300
kill $PID 2>/dev/null; wait $PID 2>/dev/null; umount -l $M; rm -rf $T
