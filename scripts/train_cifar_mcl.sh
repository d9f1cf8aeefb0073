#!/usr/bin/env bash
# MCL(x2) and MCL(x4) rows of the paper's CIFAR-100 table (README, "The paper's results").
# N = 4 uses the original's branched network (shared stem, 4 branches).
# Extra arguments are passed to every run, e.g.: bash scripts/train_cifar_mcl.sh --manual_seed 1
# Every run is started with --resume: running the script again continues unfinished runs and skips finished ones.
set -euo pipefail
cd "$(dirname "$0")/.."
# Several GPUs: LAUNCH="torchrun --nproc_per_node=4" bash scripts/train_cifar_mcl.sh
LAUNCH=${LAUNCH:-python3}
for n in 2 4; do
    for arch in resnet32 resnet56 resnet110 wrn_16_2 wrn_40_2 hcgnet_A1 ShuffleNetV2_05x ShuffleNetV2_1x; do
        $LAUNCH main_cifar.py --arch "$arch" --number-net "$n" \
            --alpha 0.1 --gamma 1. --beta 0.1 --lam 1. --resume "$@"
    done
done
