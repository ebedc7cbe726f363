"""The dependency ranges in setup.py are the ones the tests run against: the installed versions must lie in them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    return kw["install_requires"] + kw["extras_require"]["dev"]


@pytest.mark.parametrize("spec", _requirements())
def test_installed_version_is_inside_the_declared_range(spec):
    from importlib.metadata import PackageNotFoundError, version

    req = Requirement(spec)
    try:
        installed = version(req.name)
    except PackageNotFoundError:
        pytest.fail(f"{req.name} is required by setup.py but not installed")
    assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} is outside {req.specifier}"


def test_libraries_molora_reaches_into_have_an_upper_bound():
    pinned = {Requirement(s).name: Requirement(s).specifier for s in _requirements()}
    for name in ("torch", "transformers", "peft", "deepspeed", "accelerate", "triton"):
        assert any(s.operator == "<" for s in pinned[name]), f"{name} needs an upper bound (tested range)"
