"""The kernels ship inside the package: a top-level `kernels` module would shadow Hugging Face's
`kernels` package, which transformers probes for."""

import tomllib
from pathlib import Path

import fastdpo.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_install_as_fastdpo_kernels():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "kernels" not in setuptools["packages"]
    assert "fastdpo.kernels" in setuptools["packages"]
    assert setuptools["package-dir"] == {"fastdpo.kernels": "kernels"}
    assert Path(fastdpo.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_every_subpackage_is_listed():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {"fastdpo." + p.parent.name for p in (ROOT / "fastdpo").glob("*/__init__.py")}
    assert found <= set(setuptools["packages"]), found - set(setuptools["packages"])
