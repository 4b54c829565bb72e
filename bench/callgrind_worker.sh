#!/bin/bash
# User-space instructions per message of ONE raftmq worker (or Mosquitto) under a
# real open-loop load, from callgrind: the method of bench/README.md "CPU per
# message in 500 pairs".  The instrumentation is on only for a WINDOW-second
# window after the load is up, so start-up and connection set-up do not count.
#
#   bench/callgrind_worker.sh SRC_DIR|mosquitto [RATE] [WINDOW] [PORT]
#
# SRC_DIR: a tree's src/ (its raftmq is imported, with its built extensions).
# Prints: instructions in the window, messages (RATE x WINDOW), instructions/msg.
# Needs valgrind and bench/loadgen (cc -O2 -o bench/loadgen bench/loadgen.c).
set -uo pipefail
SRC=$1
RATE=${2:-200}
WINDOW=${3:-15}
PORT=${4:-18830}
HERE=$(cd "$(dirname "$0")" && pwd)
LOADGEN=${LOADGEN:-$HERE/loadgen}
PY=$(python3 -c 'import sys; print(sys.executable)')
TMP=$(mktemp -d)
trap 'kill $LG $BROKER 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$TMP"' EXIT

if [ "$SRC" = mosquitto ]; then
    printf 'listener %s 127.0.0.1\nallow_anonymous true\nuser root\n' "$PORT" > "$TMP/m.conf"
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$TMP/cg.out" \
        /usr/sbin/mosquitto -c "$TMP/m.conf" > "$TMP/broker.log" 2>&1 &
else
    # One worker in this process, as the supervisor's child runs it (durability
    # "none": MemoryStore, no raft process).
    cat > "$TMP/worker.py" <<EOF
import functools, pathlib, sys, tempfile
from raftmq.broker.server import run
from raftmq.state.store import MemoryStore
from raftmq.supervisor import _setup_child_logging, load_node_config
from raftmq.workers.node import attach_worker
cfg = pathlib.Path("$TMP") / "r.toml"
cfg.write_text('allow_anonymous = true\ndurability = "none"\nworkers = 1\n')
config, _ = load_node_config(str(cfg), {"port": $PORT, "host": "127.0.0.1"})
_setup_child_logging(config.log_level, batched=True)
node = functools.partial(attach_worker, index=0, count=1, run_dir=tempfile.mkdtemp(dir="$TMP"))
sys.exit(run(config, MemoryStore(), node=node))
EOF
    PYTHONPATH=$SRC valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$TMP/cg.out" "$PY" "$TMP/worker.py" > "$TMP/broker.log" 2>&1 &
fi
BROKER=$!
for _ in $(seq 600); do  # up to 60 s for the listener under valgrind
    (echo > /dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break
    sleep 0.1
done
"$LOADGEN" -p "$PORT" -l pairs -P 500 -r "$RATE" -d $((WINDOW + 15)) --warmup 1 \
    --connect-timeout 60 --stall-timeout 30 > "$TMP/loadgen.json" 2>&1 &
LG=$!
sleep 12  # connections up (slow under valgrind) and the load running
callgrind_control -i on "$BROKER" > /dev/null 2>&1
sleep "$WINDOW"
callgrind_control -i off "$BROKER" > /dev/null 2>&1
callgrind_control -d "$BROKER" > /dev/null 2>&1; sleep 2
wait $LG || true
# The dump holds what was counted since the start (instrumentation on only in the window).
TOTAL=$(awk '/^totals:/ {s += $2} END {print s}' "$TMP"/cg.out.*)
echo "$SRC rate $RATE window ${WINDOW}s: $TOTAL instructions, $((RATE * WINDOW)) messages," \
     "$((TOTAL / (RATE * WINDOW))) instr/msg; loadgen: $(grep -o '"ok": *[a-z]*\|"lost": *[0-9]*' "$TMP/loadgen.json" | tr '\n' ' ')"
