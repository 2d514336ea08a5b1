#!/usr/bin/env bash
# Sets everything up, then runs shoal's main job on the bundled default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/shoal generate --max-tokens 128 "${@:-Explain in two sentences why the sky is blue.}"
