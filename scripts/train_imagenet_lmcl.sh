#!/usr/bin/env bash
# L-MCL(x2) rows of the ImageNet table of Yang et al., "Online Knowledge Distillation via
# Mutual Contrastive Learning for Visual Recognition" (TPAMI 2023); README, "L-MCL":
# ResNet-34 x2, and ResNet-18 paired with ShuffleNetV2 1x and with ResNet-50 (the paper's
# figure is ResNet-18's, network 0).
#
# Data: ./data/ImageNet/{train,val}/<class>/<images> (or pass --data PATH).
# Every flag below is the authors' ImageNet default (docs/method.md §11), written out:
# 100 epochs, lr 0.1 divided by 10 at 30, 60 and 90, batch 256, weight decay 1e-4, tau 0.07,
# alpha = beta = 0.01, memory banks with 8192 negatives, a meta step every 500 iterations.
# Extra arguments reach every run, e.g.
#   bash scripts/train_imagenet_lmcl.sh --data /datasets/imagenet --manual_seed 1
# Several GPUs (--batch-size stays the global 256):
#   LAUNCH="torchrun --nproc_per_node=8" bash scripts/train_imagenet_lmcl.sh
# Every run is started with --resume: running the script again continues unfinished runs and skips finished ones.
set -euo pipefail
cd "$(dirname "$0")/.."
LAUNCH=${LAUNCH:-python3}
LMCL=(--method lmcl --epochs 100 --milestones 30 60 90 --alpha 0.01 --gamma 1. --beta 0.01 --lam 1.
      --meta-freq 500 --times 2)

for arch in resnet34 resnet18,shufflenet_v2_x1_0 resnet18,resnet50; do
    $LAUNCH main_imagenet.py --arch "$arch" --number-net 2 "${LMCL[@]}" --resume "$@"
done
