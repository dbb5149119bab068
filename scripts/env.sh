# Source me: creates (once) and activates a virtual environment with fastdpo installed.
#   FASTDPO_VENV   where the environment lives (default: .venv in the repository)
#   FASTDPO_EXTRAS extras to install (default: test,train,lora,trl,deepspeed)
# A machine without torch gets the CPU build torch==2.13.0 first: a bare `torch` requirement
# would pull a multi-GB CUDA build (PyPI's Linux wheels are CUDA builds). It comes from pip's own
# sources where they hold it (a local wheel house), else from PyTorch's CPU index. A machine that
# already has torch (a GPU box) keeps its own.
# Set-up steps say what they do on stderr (the first run spends about two minutes installing);
# a ready environment is used silently.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FASTDPO_VENV:-$repo/.venv}"
extras="${FASTDPO_EXTRAS:-test,train,lora,trl,deepspeed}"
say() { echo "fastdpo set-up: $*" >&2; }
if [ ! -x "$venv/bin/python" ]; then
  if python3 -c "import torch" 2>/dev/null; then
    say "creating $venv (sharing this machine's torch)"
    python3 -m venv --system-site-packages "$venv"
  else
    say "creating $venv"
    python3 -m venv "$venv"
  fi
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  say "installing torch==2.13.0, CPU build (one time; about a minute)"
  pip install -q "torch==2.13.0+cpu" 2>/dev/null ||
    pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
stamp="$venv/.fastdpo-installed-$(cat "$repo/pyproject.toml" | cksum | cut -d' ' -f1)-$extras"
if [ ! -f "$stamp" ]; then
  say "installing fastdpo with extras [$extras] into $venv (one time; about two minutes)"
  plain="$(echo ",$extras," | sed 's/,deepspeed,/,/; s/^,//; s/,$//')"
  pip install -q -e "$repo[$plain]"
  if [ "$plain" != "$extras" ]; then
    # DeepSpeed ships a source package whose build imports torch: build it against this
    # environment's torch (an isolated build would download a CUDA torch), without compiled ops.
    DS_BUILD_OPS=0 pip install -q --no-build-isolation "$(sed -n 's/^deepspeed = \["\([^"]*\)".*/\1/p' "$repo/pyproject.toml")"
  fi
  touch "$stamp"
  say "done; later runs reuse $venv"
fi
