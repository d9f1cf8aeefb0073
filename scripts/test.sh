#!/usr/bin/env bash
# Install the project with its test extra, then run the whole test suite.
# Usage: bash scripts/test.sh [extra pytest arguments, e.g. --slow]
# Two pytest-xdist workers (MCL_TEST_WORKERS=N for another count, 0 for none), tests grouped by module so
# that a module's shared runs happen once.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e ".[test]"
workers="${MCL_TEST_WORKERS:-2}"
if [ "$workers" != 0 ] && ! python3 -c "import xdist" 2>/dev/null; then
    echo "pytest-xdist is not installed: running the tests in one process" >&2
    workers=0
fi
if [ "$workers" = 0 ]; then
    python3 -m pytest -q "$@" tests
else
    python3 -m pytest -q -n "$workers" --dist loadscope "$@" tests
fi
