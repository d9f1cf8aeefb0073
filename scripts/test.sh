#!/usr/bin/env bash
# Install the project with its test extra, then run the whole test suite.
# Usage: bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e ".[test]"
python3 -m pytest -q "$@" tests
