#!/usr/bin/env bash
# L-MCL(x2) rows of the CIFAR-100 table of Yang et al., "Online Knowledge Distillation via
# Mutual Contrastive Learning for Visual Recognition" (TPAMI 2023); README, "L-MCL".
# Every flag below is the authors' CIFAR default (docs/method.md §11), written out so that the
# command lines say what they train: 300 epochs, cosine lr from 0.1, batch 128 with 2 images
# per class, tau 0.1, a meta step every 50 iterations with 2 virtual steps.
# Extra arguments are passed to every run, e.g.: bash scripts/train_cifar_lmcl.sh --manual_seed 1
# Every run is started with --resume: running the script again continues unfinished runs and skips finished ones.
set -euo pipefail
cd "$(dirname "$0")/.."
# Several GPUs: LAUNCH="torchrun --nproc_per_node=4" bash scripts/train_cifar_lmcl.sh
LAUNCH=${LAUNCH:-python3}
LMCL=(--method lmcl --alpha 0.1 --gamma 1. --beta 0.1 --lam 1. --meta-freq 50 --times 2)
for arch in resnet32 resnet56 resnet110 wrn_16_2 wrn_40_2 ShuffleNetV2_1x hcgnet_A2; do
    $LAUNCH main_cifar.py --arch "$arch" --number-net 2 "${LMCL[@]}" --resume "$@"
done
