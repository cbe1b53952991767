#!/usr/bin/env bash
# Install normuon into the active Python environment.
#
# PyTorch: an existing torch install (CUDA or CPU) is kept as it is. Without one, the CPU build
# torch==2.13.0 is installed (PyPI's default Linux wheel is a multi-GB CUDA build; for CUDA,
# install torch from pytorch.org first and this script leaves it alone).
#
#   bash scripts/install.sh            # the library
#   bash scripts/install.sh --harness  # plus the comparison harness (tqdm, matplotlib)
#   bash scripts/install.sh --dev      # plus test, lint, harness and plotting extras
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
case "${1:-}" in
  --dev) extras="[dev]" ;;
  --harness) extras="[harness]" ;;
  "") ;;
  *) echo "usage: bash scripts/install.sh [--dev|--harness]" >&2; exit 2 ;;
esac
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet "torch==2.13.0" \
    || python -m pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
python -m pip install --quiet -e ".${extras}"
python -c "import torch, normuon; print('normuon', normuon.__version__, 'torch', torch.__version__)"
