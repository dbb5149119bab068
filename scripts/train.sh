#!/usr/bin/env bash
# The main job: set up the environment if needed, then `fastdpo train` (no options: the embedded
# default model and dataset, no downloads). Options are passed through: scripts/train.sh --help
set -euo pipefail
source "$(dirname "$0")/env.sh"
fastdpo train "$@"
