#!/usr/bin/env bash
# One stretch of GPU time on an offline host whose remote commands are short (minutes each): the work runs detached,
# so it survives between commands, and each command brings back what is done so far.
#   scripts/gpu-stretch.sh start BUDGET_S SWEEP.yaml[,SWEEP2.yaml...] [UNITS] [TRIAL_S]
#       copies the tree to $GPU_STRETCH_DIR/tree (models/ linked) and returns at once. There, in the background: scripts/gpu_steady_evidence.py --only UNITS (when given), then
#       scripts/offline-gpu-sweep.sh on each SWEEP in turn (the next one gets what the last left: a study that is
#       done, or that refused a confirmation it had no time for, hands the rest of the stretch on), each with as
#       many trials as fit: no trial starts later than TRIAL_S (default
#       180: a start-up and a step) before the budget ends, and the sweep is interrupted (servers torn down, study
#       resumable) 20 s before. A trial cut off there is measured again on resume; device time left unused is lost.
#       The confirmation starts only when the study's measured start-ups and steps say it ends TRIAL_S before.
#   scripts/gpu-stretch.sh collect OUT_DIR [WAIT_S]
#       waits until the stretch is done or WAIT_S seconds pass, then packs the state to OUT_DIR/stretch.tgz:
#       results/ and configs/ (no server logs, no compile cache) and the stretch's logs with the server logs' tails. Safe to call while the work runs (a pack of a study mid-trial resumes from its last finished trial).
#   scripts/gpu-stretch.sh stop
#       interrupts the stretch (the sweep gets Ctrl-C: servers torn down, the trial in flight marked failed and
#       measured again on resume) and waits until it has ended.
# $EVIDENCE_ARGS: more arguments for the evidence script (e.g. --retry-failed). $EVIDENCE_AFTER=1 runs the units after
# the sweep instead of before it, in whatever time the sweep leaves (they stop at a step that would not end in time
# and resume from their finished steps): the sweep's trials and confirmation come first, the units fill the rest.
# vLLM must already be importable (see ../shared/gpu/README.md). $GPU_STRETCH_DIR (default /tmp/gpu-stretch) holds
# the stretch's logs; results land where the sweep file and the evidence script put them.
set -uo pipefail
cmd=${1:?start or collect}; shift
w=${GPU_STRETCH_DIR:-/tmp/gpu-stretch}
case $cmd in
start)
  budget=${1:?BUDGET_S} sweep=${2:?SWEEP} units=${3:-} trial_s=${4:-180}
  mkdir -p "$w"; rm -f "$w/done" "$w/stopping"
  # The work runs in a copy of the tree: each remote command syncs the repo root again, which replaces (or
  # removes) files the work writes there, so a stretch that wrote results into the root would lose them.
  rm -rf "$w/tree"; mkdir -p "$w/tree"
  tar --exclude=./.gx --exclude=./models --exclude=./.git --exclude=./.venv -cf - . | tar -xf - -C "$w/tree"
  # models are built into the root's models/ (kept between commands), not into the copy, which the next start
  # replaces: on a fresh host without the folder the sweep and the evidence script each built Mistral again
  mkdir -p models && ln -sfn "$PWD/models" "$w/tree/models"
  cd "$w/tree"
  export PYTHONUNBUFFERED=1 EVIDENCE_ARGS=${EVIDENCE_ARGS:-} EVIDENCE_AFTER=${EVIDENCE_AFTER:-}
  setsid nohup bash -c '
    t0=$(date +%s) budget=$1 sweep=$2 units=$3 trial_s=$4 w=$5
    left() { echo $(( budget - ($(date +%s) - t0) )); }
    evidence() {  # $1: seconds from now by which the units must have ended
      OUT="$w/evidence-out" python3 scripts/gpu_steady_evidence.py --only "$units" --deadline-s "$1" \
        $EVIDENCE_ARGS >> "$w/evidence.log" 2>&1
    }
    [ -n "$units" ] && [ -z "$EVIDENCE_AFTER" ] && evidence "$(( $(left) - trial_s ))"
    : > "$w/sweep.log"; n=0
    for s in ${sweep//,/ }; do
      [ -f "$w/stopping" ] && break  # not after `stop` interrupted the one before
      # minutes to two decimals: whole minutes would cut up to 59 s from what the confirmation may use
      minutes=$(awk -v s="$(( $(left) - trial_s ))" "BEGIN { printf \"%.2f\", s / 60 }")
      out="$w/sweep-out$([ "$n" -gt 0 ] && echo "-$n")"  # sweep-out, sweep-out-1, ...: one per sweep file
      if awk -v m="$minutes" "BEGIN { exit !(m > 0) }"; then
        bash scripts/offline-gpu-sweep.sh "$s" "$minutes" "$(( $(left) - 20 ))" "$out" >> "$w/sweep.log" 2>&1
      else
        echo "no time left for a trial of $s ($(left) s)" >> "$w/sweep.log"
      fi
      n=$((n + 1))
    done
    [ -n "$units" ] && [ -n "$EVIDENCE_AFTER" ] && [ "$(left)" -gt 60 ] && [ ! -f "$w/stopping" ] \
      && evidence "$(( $(left) - 20 ))"  # not after `stop` interrupted the sweep
    touch "$w/done"' _ "$budget" "$sweep" "$units" "$trial_s" "$w" > "$w/stretch.log" 2>&1 < /dev/null &
  echo $! > "$w/pid"
  echo "stretch started (pid $!), budget ${budget} s, logs in $w"
  ;;
stop)
  [ -f "$w/pid" ] || echo "no pid file: stopping by process name only"
  touch "$w/stopping"  # nothing starts after the sweep it interrupts
  py='^[^ ]*python3? '  # the Python processes themselves, not timeout(1) or the stretch's shell around them
  pkill -INT -f "${py}-m harness.sweep"; pkill -INT -f "${py}scripts/gpu_steady_evidence.py"
  for _ in $(seq 60); do
    pgrep -f "${py}(-m harness.sweep|scripts/gpu_steady_evidence.py|-m vllm.entrypoints)" > /dev/null || break; sleep 2
  done
  [ -f "$w/pid" ] && kill -- -"$(cat "$w/pid")" 2>/dev/null; pkill -f "${py}-m vllm.entrypoints"; sleep 2
  pgrep -af "${py}(-m harness.sweep|-m vllm.entrypoints)" || echo "stretch stopped"
  ;;
collect)
  out=${1:?OUT_DIR} wait_s=${2:-0}
  end=$(( $(date +%s) + wait_s ))
  while [ ! -f "$w/done" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
  [ -f "$w/done" ] && echo "stretch done" || echo "stretch still running"
  mkdir -p "$out"
  cd "$w/tree" || exit 1
  for f in results/*/*/logs/*/server*.log results/*/*/*/logs/*/server*.log; do
    [ -f "$f" ] && { echo "== $f"; tail -n 60 "$f"; }
  done > "$w/server-logs-tail.txt" 2>/dev/null
  nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader > "$w/nvidia-smi.txt" 2>&1
  tar -czf "$out/stretch.tgz" --exclude='*/logs/*' --exclude='vllm-cache' --exclude='*.lock' \
    --exclude='./evidence-out' --exclude='./sweep-out*/*.tgz' --exclude='./tree' results configs -C "$w" .
  ls -la "$out"; tail -n 5 "$w"/*.log
  ;;
*) echo "usage: $0 start BUDGET_S SWEEP[,SWEEP2...] [UNITS] [TRIAL_S] | collect OUT_DIR [WAIT_S] | stop" >&2; exit 2 ;;
esac
