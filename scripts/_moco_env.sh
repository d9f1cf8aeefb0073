# Sourced by train_moco_mcl.sh and lincls.sh: run from the repository root, with the
# environment both read (the ImageNet folder, the GPUs of this node, the rendezvous port,
# the seeds), each with the paper's default.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA=${DATA:-./data/ImageNet}
GPU_IDS=${GPU_IDS:-0,1,2,3,4,5,6,7}
PORT=${PORT:-10001}
SEEDS=${SEEDS:-0}
