#!/usr/bin/env bash
# Install normuon into the active Python environment.
#
# PyTorch: an existing torch install (CUDA or CPU) is kept as it is. Without one, the CPU build
# torch==2.13.0 is installed (PyPI's default Linux wheel is a multi-GB CUDA build; for CUDA,
# install torch from pytorch.org first and this script leaves it alone).
#
#   bash scripts/install.sh            # the library
#   bash scripts/install.sh --harness  # plus the comparison harness (tqdm, matplotlib)
#   bash scripts/install.sh --dev      # plus test, lint, harness and plotting extras, and
#                                      # torchtitan 0.3.0 for the torchtitan integration's tests
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

# torchtitan (tests/test_integrations_torchtitan.py): its wheel declares no torch version, but two of
# its dependencies do (torch-checkpointing: torch>=2.11), so a plain install could replace the torch
# chosen above. It and those two are installed with --no-deps, their other requirements by name:
# pure-Python packages that never pull torch. Hugging Face datasets and wandb are left out: the
# trainer imports datasets only for its HF text loaders (the CPU test launcher supplies its own
# loader), and datasets<4.8, torchtitan's pin, needs huggingface_hub<2 where transformers (dev
# extra) needs >=2.4. torchtitan needs Python >= 3.11; on 3.10 its tests skip.
install_torchtitan() {
  # The pure-Python requirements first: pip checks installed packages' requirements after an
  # install, and would report torchtitan's datasets and wandb as missing.
  python -m pip install --quiet "tyro==1.0.17" "einops" "safetensors" "tokenizers>=0.15.0" \
    "tensorboard" "pillow" "requests" "urllib3"
  python -m pip install --quiet --no-deps "torchtitan==0.3.0" "torchdata==0.11.0" \
    "torch-checkpointing==0.1.1" "spmd-types==0.2.3"
  python -c "import normuon.integrations.torchtitan" \
    || { echo "torchtitan is installed but normuon.integrations.torchtitan does not import" >&2; exit 1; }
}
if [ "${1:-}" = "--dev" ] && python -c "import sys, torch; sys.exit(sys.version_info < (3, 11))" \
    >/dev/null 2>&1; then
  install_torchtitan
fi
python -c "import torch, normuon; print('normuon', normuon.__version__, 'torch', torch.__version__)"
