#!/usr/bin/env bash
# Self-supervised MoCo pre-training on ImageNet as in the paper:
# ResNet-18, lr 0.03, batch 256 over 8 GPUs, 200 epochs, K = 65536, m = 0.999, T = 0.07,
# MoCo v1 head and augmentation (add --mlp --aug-plus --cos for MoCo v2).
#   --number-net 1: the MoCo baseline (47.45 top-1 after linear evaluation)
#   --number-net 2: MCL(x2)                (48.04)
# Then run scripts/lincls.sh. Environment: DATA (default ./data/ImageNet), GPU_IDS
# (default 0,1,2,3,4,5,6,7), PORT (10001), SEEDS (default "0"; the paper used three runs).
# Extra arguments are passed to every run, e.g.: bash scripts/train_moco_mcl.sh --epochs 100
# Every run is started with --resume: running the script again continues unfinished runs and skips finished ones.
source "$(dirname "$0")/_moco_env.sh"
for seed in $SEEDS; do
    for n in 1 2; do
        python3 main_moco_mcl.py --data "$DATA" -a resnet18 --lr 0.03 --batch-size 256 --number-net "$n" \
            --dist-url "tcp://localhost:$PORT" --multiprocessing-distributed --world-size 1 --rank 0 \
            --gpu-ids "$GPU_IDS" --seed "$seed" \
            --checkpoint ./checkpoint --run-name "moco_resnet18_n${n}_seed${seed}" --resume "$@"
    done
done
