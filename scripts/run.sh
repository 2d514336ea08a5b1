#!/usr/bin/env bash
# Sets everything up, then runs shoal's main job on the bundled default model: a small local
# cluster (two nodes on this machine) serving it, with the dashboard URL printed. Ctrl-C stops it.
# `scripts/run.sh generate "prompt"` instead runs one generation in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = generate ]; then
  shift
  exec .venv/bin/shoal generate --max-tokens 128 "${@:-Explain in two sentences why the sky is blue.}"
fi
exec bash scripts/demo.sh
