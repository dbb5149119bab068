"""Optional dependencies: a missing one is reported in one line naming the extra that installs it."""

from __future__ import annotations

import importlib


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which `pip install` adds it."""


def require(modules: list[str], extra: str, what: str) -> None:
    """Import each of `modules`, or raise MissingExtra: "<what> needs <module>, which is not
    installed: pip install 'fastdpo[<extra>]'".

    A module that is missing itself, or misses one of its own dependencies, is reported (the
    extra installs both); any other import failure (a broken install, a version clash) is raised
    unchanged, since installing the extra would not fix it."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise MissingExtra(f"{what} needs {e.name or name}, which is not installed: "
                               f"pip install 'fastdpo[{extra}]'") from None


# What each entry point imports, and the extra that provides it.
TRAIN = ["transformers", "accelerate", "datasets", "safetensors", "tqdm"]
PLOT = ["matplotlib"]
