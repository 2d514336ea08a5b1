#!/usr/bin/env bash
# Sets everything up (with the test dependencies), then runs the test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k models -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
mkdir -p artifacts
exec .venv/bin/python -m pytest -q -ra "$@"
