#!/usr/bin/env bash
# The test command: set up the environment if needed, then run the whole suite.
# Without a GPU the Triton kernels run under the interpreter (see tests/conftest.py).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$repo"
python -m pytest tests -q -p no:cacheprovider "$@"
