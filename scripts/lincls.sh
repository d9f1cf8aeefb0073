#!/usr/bin/env bash
# Linear evaluation of the encoders pre-trained by scripts/train_moco_mcl.sh, with the
# paper's settings: frozen backbone, fresh fc, lr 30, schedule 60/80, 100 epochs, wd 0,
# batch 256 over 8 GPUs. Query encoder 0 of every run by default; NET_INDEX=1 (or
# "0 1") evaluates the other encoders of an MCL(x2) cohort too.
# Environment: DATA, GPU_IDS, PORT, SEEDS as in train_moco_mcl.sh; EPOCH_FILE
# (default checkpoint_0199.pth.tar, the last epoch of a 200-epoch pre-training).
# Extra arguments are passed to every run.
# Every run is started with --resume: running the script again continues unfinished runs and skips finished ones.
source "$(dirname "$0")/_moco_env.sh"
NET_INDEX=${NET_INDEX:-0}
EPOCH_FILE=${EPOCH_FILE:-checkpoint_0199.pth.tar}
for seed in $SEEDS; do
    for n in 1 2; do
        run="./checkpoint/moco_resnet18_n${n}_seed${seed}"
        for i in $NET_INDEX; do
            if [ "$i" -ge "$n" ]; then continue; fi
            python3 main_lincls.py --data "$DATA" -a resnet18 --lr 30.0 --batch-size 256 \
                --pretrained "$run/$EPOCH_FILE" --net-index "$i" \
                --dist-url "tcp://localhost:$PORT" --multiprocessing-distributed --world-size 1 --rank 0 \
                --gpu-ids "$GPU_IDS" --seed "$seed" \
                --checkpoint ./checkpoint --run-name "lincls_resnet18_n${n}_seed${seed}_net$i" --resume "$@"
        done
    done
done
