"""Optional dependencies: a missing one is reported in one line naming the extra that installs it."""

from __future__ import annotations

import importlib


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which `pip install` adds it."""


def require(modules: list[str], extra: str, what: str) -> None:
    """Import each of `modules`, or raise MissingExtra: "<what> needs <module> ...: pip install 'fastdpo[<extra>]'".

    Only a missing module counts: a module that is installed but fails inside its own import
    raises that error unchanged (it is not fixed by installing the extra)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            if e.name is not None and e.name != name and not name.startswith(e.name + "."):
                raise
            raise MissingExtra(f"{what} needs {name}, which is not installed: pip install 'fastdpo[{extra}]'") from None


# What each entry point imports, and the extra that provides it.
TRAIN = ["transformers", "accelerate", "datasets", "safetensors", "tqdm"]
PLOT = ["matplotlib"]
