"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py``: scripts/ is not a package, so load it by path.

    The module is registered in ``sys.modules`` (dataclasses and pickling look it up there),
    and loaded once per session.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def mock_cerebras_module() -> ModuleType:
    """The mock upstream (``scripts/mock_cerebras.py``) as an imported module."""
    return load_script("mock_cerebras")
