#!/usr/bin/env bash
# Creates .venv and installs asft-lightning with its test tools. Idempotent; safe to re-run.
# torch is pinned to 2.13.0 here: on this machine kind the pin takes the CPU build from local disk, while an
# unpinned install would pull a multi-GB CUDA build. The package itself accepts a range of torch versions.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
log=$(mktemp)
if ! .venv/bin/python -m pip install -q --upgrade pip >"$log" 2>&1 \
   || ! .venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]" >>"$log" 2>&1; then
  grep -v "is ignored: it is neither" "$log" >&2
  echo "setup.sh: pip install failed (log above)" >&2
  exit 1
fi
rm -f "$log"
.venv/bin/python -c "import asft_lightning, torch; print('asft-lightning ready: torch', torch.__version__)"
