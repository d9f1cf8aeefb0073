#!/usr/bin/env bash
# MCL(x4) + logit distillation rows of the paper's CIFAR-100 table (README, "The paper's results").
# Extra arguments are passed to every run, e.g.: bash scripts/train_cifar_mcl_logit.sh --manual_seed 2
# Every run is started with --resume: running the script again continues unfinished runs and skips finished ones.
set -euo pipefail
cd "$(dirname "$0")/.."
# Several GPUs: LAUNCH="torchrun --nproc_per_node=4" bash scripts/train_cifar_mcl_logit.sh
LAUNCH=${LAUNCH:-python3}
for arch in wrn_16_2 wrn_40_2 wrn_28_4 ShuffleNetV2_1x hcgnet_A2; do
    $LAUNCH main_cifar.py --arch "$arch" --number-net 4 \
        --alpha 0.1 --gamma 1. --beta 0.1 --lam 1. --logit-distill --resume "$@"
done
