#!/usr/bin/env bash
# Run (or resume) a sweep on an offline GPU host, inside a time slot, and pack the results for the trip back.
#   scripts/offline-gpu-sweep.sh SWEEP.yaml MINUTES HARD_STOP_S OUT_DIR [STATE_DIR]
# MINUTES: start no new trial after this; HARD_STOP_S: Ctrl-C the sweep then (servers torn down, resumable).
# vLLM must already be importable (see docs/gpu-hosts.md). The sweep file's results_dir holds its study. STATE_DIR holds results.tgz (and vllm-cache.tgz) from an
# earlier slot: each is restored when this host has none yet, so a sweep survives a lost host and its servers keep
# their compiled graphs. Each slot writes OUT_DIR/:
#   sweep.log  results.tgz (results_dir and configs_dir: studies.db, tables, run records, confirm.json, configs;
#              no server logs, no compile cache)
#   vllm-cache.tgz (<results_dir>/vllm-cache: vLLM's torch.compile cache, packed apart: it is only for the next slot)
#   logs-tail.txt  env.txt
set -uo pipefail
sweep=$1 minutes=$2 hard=$3 out=$4 state=${5:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the sweep's own results folder (results_dir in the sweep file): its studies.db says whether a study exists here
dirs=$(python3 -c 'import sys; from harness.study.sweepfile import load_sweep; s = load_sweep(sys.argv[1]); print(s.results_dir); print(s.configs_dir)' "$sweep") || exit 2
rdir=$(sed -n 1p <<< "$dirs") cdir=$(sed -n 2p <<< "$dirs")
mkdir -p "$out" "$rdir"
if [ ! -f "$rdir/studies.db" ] && [ -n "$state" ] && [ -f "$state/results.tgz" ]; then
  # files this host already has that are newer (another sweep's) are kept
  tar -xzf "$state/results.tgz" --keep-newer-files && echo "restored results from $state/results.tgz"
fi
caches() { find "$rdir" -maxdepth 2 -type d -name vllm-cache -prune; }  # <results_dir>/vllm-cache
if [ -z "$(caches)" ] && [ -n "$state" ] && [ -f "$state/vllm-cache.tgz" ]; then
  tar -xzf "$state/vllm-cache.tgz" && echo "restored vLLM's compile cache: $(du -shc $(caches) | tail -n 1 | cut -f1)"
fi
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import importlib.metadata as m; print("vllm", m.version("vllm"), "torch", m.version("torch"))'; } > "$out/env.txt" 2>&1
timeout -s INT -k 60 "$hard" python3 -m harness.sweep "$sweep" --max-minutes "$minutes" 2>&1 | tee "$out/sweep.log"
rc=${PIPESTATUS[0]}
python3 -m harness.report "$rdir" > "$out/report.log" 2>&1 || true
for f in "$rdir"/*/logs/*/server*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 40 "$f"; }; done > "$out/logs-tail.txt" 2>/dev/null
tar -czf "$out/results.tgz" --exclude='*/logs/*' --exclude='vllm-cache' "$rdir" $([ -d "$cdir" ] && printf %s "$cdir")
if [ -n "$(caches)" ]; then
  tar -czf "$out/vllm-cache.tgz" $(caches) \
    && echo "compile cache: $(du -shc $(caches) | tail -n 1 | cut -f1) on disk, $(du -h "$out/vllm-cache.tgz" | cut -f1) packed"
fi
ls -la "$out"
exit $rc
