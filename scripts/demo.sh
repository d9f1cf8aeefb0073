#!/usr/bin/env bash
# Install the project, then train MCL(x2) with two resnet32 on the synthetic data set
# (no download; a few minutes on 2 CPU cores) and print per-network and ensemble accuracy.
# Usage: bash scripts/demo.sh [extra main_cifar.py flags] (each run replaces the last demo run)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e .
# The fast path (--fast: bf16, channels_last, tensor data) on a GPU or a CPU with native bfloat16; a CPU that
# emulates bf16 (AVX2 only) runs it several times slower than float32, so there it keeps float32.
speed=$(python3 -c "import torch; from utils.precision import cpu_has_native_bf16 as native
print('--fast' if torch.cuda.is_available() or native() else '--channels-last --data-path tensor')")
# shellcheck disable=SC2086  # $speed is one or three flags
python3 main_cifar.py --dataset synthetic --arch resnet32 --number-net 2 \
    --alpha 0.1 --gamma 1. --beta 0.1 --lam 1. \
    --epochs 4 --batch-size 64 --m-per-class 8 --num-workers 0 $speed \
    --checkpoint-dir ./runs/demo --run-name mcl_x2_resnet32 --overwrite "$@"  # a rerun starts the demo again
