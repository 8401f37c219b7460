#!/usr/bin/env bash
# The suite on a busy machine (issue 15): CI's command (`.ci/run`, i.e. `make test`) in a fresh clone of this
# checkout's HEAD, with one 2-rank DeepSpeed launch at a time beside it, a new one every INTERVAL seconds (a user's other jobs),
# the provocation under which ranks once aborted at exit. Prints the suite's result, every beside launch's exit
# code, and any rank abort ("terminate called", SIGABRT) found in the suite's or the launches' output.
#
#   benchmarks/busy_suite.sh [WORKDIR]          # INTERVAL=50 by default; WORKDIR defaults to a new /tmp dir
set -uo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d /tmp/memprof-busy.XXXXXX)}
INTERVAL=${INTERVAL:-50}
mkdir -p "$WORK/beside"
git clone -q "$SRC" "$WORK/main" || exit 2
[ -d "$SRC/../shared" ] && ln -sfn "$(cd "$SRC/../shared" && pwd)" "$WORK/shared"
cd "$WORK/main" || exit 2
echo "busy_suite: fresh clone of $(git rev-parse --short HEAD) in $WORK; installing"
make install > "$WORK/install.log" 2>&1 || { echo "busy_suite: make install failed, see $WORK/install.log"; exit 2; }

beside() {  # one 2-rank launch at a time, a new one every INTERVAL s (or when the last ends, if later)
  local i=0 pid=""
  while true; do
    i=$((i + 1))
    [ -n "$pid" ] && wait "$pid"
    DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 --master_port $((29600 + i % 300)) launch/train.py \
      --deepspeed_config configs/demo.json --model gpt2-tiny --steps 3 --out "$WORK/beside/run$i" \
      > "$WORK/beside/run$i.log" 2>&1 &
    pid=$!
    sleep "$INTERVAL"
  done
}
beside & BESIDE=$!
start=$(date +%s)
CI=true bash .ci/run > "$WORK/suite.log" 2>&1
rc=$?
kill "$BESIDE" 2>/dev/null; wait "$BESIDE" 2>/dev/null
sleep 60  # let the last beside launches end
echo "busy_suite: .ci/run exit $rc after $(( $(date +%s) - start )) s; its last lines:"
tail -4 "$WORK/suite.log"
n=$(ls "$WORK"/beside/run*.log | wc -l)
ok=$(grep -L -i "error\|Traceback" "$WORK"/beside/run*.log | wc -l)
echo "busy_suite: $n launches beside it, $ok without an error line"
aborts=$(grep -l "terminate called\|SIGABRT\|exit code -6\|exits with return code = -6" "$WORK/suite.log" "$WORK"/beside/run*.log)
echo "busy_suite: rank aborts: ${aborts:-none}"
exit "$rc"
