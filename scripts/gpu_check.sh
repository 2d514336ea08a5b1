#!/usr/bin/env bash
# On a machine with an NVIDIA card: the CUDA equivalence tests (tests/test_cuda.py) and the decode
# benchmark against the card's bandwidth (scripts/bench_gpu.py), then one summary. A few minutes.
#
#   bash scripts/gpu_check.sh            # uses .venv if it has a CUDA build of torch, else makes .venv-gpu
#
# A CUDA build of torch comes from PyPI's default index (pip's torch wheels for Linux carry CUDA);
# without a network, a .venv whose torch sees the card must be there already.
set -uo pipefail
cd "$(dirname "$0")/.."

cuda_python() {
  for py in .venv/bin/python .venv-gpu/bin/python; do
    if [ -x "$py" ] && "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  return 1
}

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no nvidia-smi here: this machine has no NVIDIA driver" >&2; exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

PY=$(cuda_python)
if [ -z "${PY:-}" ]; then
  echo "gpu_check: no Python here whose torch sees the card; making .venv-gpu (needs PyPI)" >&2
  python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q "torch==2.13.0" && \
    .venv-gpu/bin/pip install -q -e ".[test]" || {
      echo "gpu_check: could not install a CUDA build of torch" >&2; exit 2; }
  PY=$(cuda_python) || { echo "gpu_check: the installed torch does not see the card" >&2; exit 2; }
fi
echo "python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))"

"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_devices.py 2>&1 | tail -15
tests=${PIPESTATUS[0]}
bench=$("$PY" scripts/bench_gpu.py --shape 1b --json 2>&1 | tail -1)

echo
echo "== gpu_check summary =="
echo "equivalence tests (tests/test_cuda.py, tests/test_devices.py): $([ "$tests" = 0 ] && echo passed || echo "FAILED (exit $tests)")"
echo "decode benchmark (scripts/bench_gpu.py --shape 1b): $bench"
exit "$tests"
