"""The public API of both packages is what their ``__all__`` says: complete, sorted, importable."""

from __future__ import annotations

import importlib
import types

import pytest


@pytest.mark.parametrize("package", ["pice_edge", "pice_cloud"])
def test_all_is_complete_sorted_and_importable(package: str) -> None:
    module = importlib.import_module(package)
    exported = list(module.__all__)
    # isort-style order, as ruff's RUF022 keeps it: CONSTANTS, then Classes, then functions.
    assert exported == sorted(exported, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))
    assert len(set(exported)) == len(exported), "a name is exported twice"
    for name in exported:
        assert hasattr(module, name), f"{package}.__all__ names {name}, which it does not define"
    # Every public name the package's __init__ binds (submodules aside) is exported.
    public = {name for name, value in vars(module).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType) and name != "annotations"}
    assert public == set(exported), f"bound but not exported: {sorted(public - set(exported))}; " \
                                    f"exported but not bound: {sorted(set(exported) - public)}"
