#!/usr/bin/env bash
# One command that checks the project's CUDA and NCCL paths on a machine with one NVIDIA GPU
# (under 8 minutes, the install included): installs the project with its test extra, then runs
# scripts/gpu_check.py, which prints one line per check, "PASS|FAIL|SKIP <name>: <reason>", and
# last "N passed, M failed"; the exit code is non-zero when a check failed. Without a GPU it is
# a dry run: the CUDA checks SKIP and the rest run on the CPU.
#
# Usage: bash scripts/gpu_check.sh [--no-install] [gpu_check.py options: --quick, --only TEXT, --jobs N, ...]
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(python3 -c 'import time; print(time.time())')
install=1
args=()
for arg in "$@"; do
    if [ "$arg" = "--no-install" ]; then install=0; else args+=("$arg"); fi
done
line=""
if [ "$install" = 1 ]; then
    log=$(mktemp)
    if python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e ".[test]" >"$log" 2>&1; then
        line="PASS install: pip install -e .[test] in $(python3 -c "import time; print(round(time.time() - $started))") s"
    else
        line="FAIL install: pip install -e .[test] failed: $(grep -i error "$log" | tail -n 1 | cut -c1-200)"
    fi
    rm -f "$log"
fi
exec python3 scripts/gpu_check.py --started-at "$started" ${line:+--install "$line"} "${args[@]+"${args[@]}"}"
