#!/usr/bin/env bash
# Creates .venv and installs asft-lightning with its test tools. Idempotent and safe to re-run.
# torch is pinned to 2.13.0 here: on this machine kind that pin takes the CPU build from local disk,
# while an unpinned install would pull a multi-GB CUDA build. The package itself accepts a range.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import asft_lightning, torch, lightning, peft, transformers; print('asft-lightning ready: torch', torch.__version__)"
