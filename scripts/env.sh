# Source me: creates (once) and activates a virtual environment with fastdpo installed.
#   FASTDPO_VENV   where the environment lives (default: .venv in the repository)
#   FASTDPO_EXTRAS extras to install (default: test,train,lora,trl)
# A machine without torch gets the CPU build torch==2.13.0 first: a bare `torch` requirement
# would pull a multi-GB CUDA build. A machine that already has torch (a GPU box) keeps its own.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FASTDPO_VENV:-$repo/.venv}"
extras="${FASTDPO_EXTRAS:-test,train,lora,trl}"
if [ ! -x "$venv/bin/python" ]; then
  if python3 -c "import torch" 2>/dev/null; then
    python3 -m venv --system-site-packages "$venv"
  else
    python3 -m venv "$venv"
  fi
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
stamp="$venv/.fastdpo-installed-$(cat "$repo/pyproject.toml" | cksum | cut -d' ' -f1)-$extras"
if [ ! -f "$stamp" ]; then
  pip install -q -e "$repo[$extras]"
  touch "$stamp"
fi
