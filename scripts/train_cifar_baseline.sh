#!/usr/bin/env bash
# Baselines of the paper's CIFAR-100 table (README, "The paper's results"): two independent networks, no MCL.
# Extra arguments are passed to every run, e.g.: bash scripts/train_cifar_baseline.sh --manual_seed 1 --data ./data/
# Every run is started with --resume: running the script again continues unfinished runs and skips finished ones.
set -euo pipefail
cd "$(dirname "$0")/.."
# Several GPUs: LAUNCH="torchrun --nproc_per_node=4" bash scripts/train_cifar_baseline.sh
LAUNCH=${LAUNCH:-python3}
for arch in resnet32 resnet56 resnet110 wrn_16_2 wrn_40_2 wrn_28_4 hcgnet_A1 hcgnet_A2 ShuffleNetV2_05x ShuffleNetV2_1x; do
    $LAUNCH main_cifar.py --arch "$arch" --number-net 2 --resume "$@"
done
